"""Throughput of the real pretraining step on the local devices: the command.

    python -m mae_jax.benchmark --config=configs/vit_l.py --batch_size=256 --steps=20 \
        [--config.FIELD=VALUE ...] [--peak_tflops=F] [--mask_ratio=R] [--warmup=N] \
        [--profile_dir=DIR]

The code is `mae_jax.benchmarks.step` (see there and BENCHMARKS.md); this module is its entry
point and re-exports its functions, so that `mae_jax.benchmarks` never imports upwards. On a CPU
it first restarts itself with 2 MiB pages for XLA's buffers, as `mae_jax.main` does
(`mae_jax.huge_pages`; MAE_JAX_HUGE_PAGES=0 times the process as it was).
"""

if __name__ == "__main__":  # before jax loads: the process may be replaced
  from mae_jax import huge_pages as _huge_pages  # pylint: disable=g-import-not-at-top
  _huge_pages.restart_with_huge_pages("mae_jax.benchmark")

# pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.benchmarks.step import apply_overrides
from mae_jax.benchmarks.step import main
from mae_jax.benchmarks.step import matmul_peak_tflops
from mae_jax.benchmarks.step import peak_memory
from mae_jax.benchmarks.step import run
from mae_jax.benchmarks.step import summary

__all__ = ["apply_overrides", "main", "matmul_peak_tflops", "peak_memory", "run", "summary"]

if __name__ == "__main__":
  main()
