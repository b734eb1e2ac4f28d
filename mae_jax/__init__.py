"""mae_jax: Masked Autoencoders (He et al. 2021) in JAX/Flax."""

import importlib.util
import os


def _skip_absent_tpu() -> None:
  """With libtpu installed (`pip install -e '.[tpu]'`, for `mae_jax.plan`) on a machine without
  TPUs, jax would still try to start a TPU backend in every process: libtpu prints start-up
  warnings and the first device use takes about 0.3 s longer before jax falls back to the CPU.
  Where no TPU chip is attached (jax's own check at import), that backend is not offered; a
  chosen JAX_PLATFORMS or JAX_FORCE_TPU_INIT is left as it is. Compiling for a TPU topology
  (`jax.experimental.topologies`) loads libtpu by itself and is not affected."""
  if (importlib.util.find_spec("libtpu") is None or os.environ.get("JAX_PLATFORMS")
      or "JAX_FORCE_TPU_INIT" in os.environ):
    return
  # pylint: disable=g-import-not-at-top
  import jax
  from jax._src import cloud_tpu_init
  from jax._src import xla_bridge
  # pylint: enable=g-import-not-at-top
  if cloud_tpu_init.running_in_cloud_tpu_vm or jax.config.jax_platforms:
    return
  # No public switch skips one platform while keeping jax's choice among the others (an
  # explicit jax_platforms list would make any missing one an error). The TPU stays a known
  # platform; its backend fails at once, quietly, as it would after trying.

  def no_tpu():
    raise RuntimeError("no TPU is attached to this machine (mae_jax skipped libtpu's start)")

  xla_bridge.register_backend_factory("tpu", no_tpu, priority=300, fail_quietly=True)


_skip_absent_tpu()


def load_encoder_params(path: str):
  """The pretrained encoder's params (big_vision ViT layout, nested dict of numpy arrays) from
  an npz written by `python -m mae_jax.export` or from a workdir."""
  from mae_jax import export  # pylint: disable=g-import-not-at-top
  return export.load_encoder_params(path)
