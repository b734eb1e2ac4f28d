"""Shared by every test: XLA's backend at optimization level 0, and one persistent XLA
compilation cache for the whole run.

Level 0 skips LLVM's optimization of the generated CPU code; XLA's own HLO passes (fusion,
layout, algebraic simplification) still run and no fast-math is enabled at any level, so results
differ from level 2 only by float rounding (a tiny MAE's loss: 1.2811069 at level 2, 1.2811068 at
0), far inside every tolerance here, while the tests' many small compiles take about a quarter
less CPU time (measured on test_models, test_train, test_train_parity and test_mixed_precision:
277 -> 209 CPU s). The runs started as subprocesses get the same level, so comparisons between a
test and its subprocesses see one build. A run that sets the flag in XLA_FLAGS keeps its own.

Many tests compile the same tiny programs, in this process and in the subprocesses they start
(the trainer, the fault injector, the pod's processes, the plan). JAX's persistent cache keys an
executable by its program, compiler options and devices, so a hit returns the same executable a
compile would: results are unchanged, only the compiles are shared. The cache lives in a fresh
directory for each run (removed at its end), so no run depends on an earlier one; a run that sets
JAX_COMPILATION_CACHE_DIR itself keeps its own.
"""

import os
import shutil
import tempfile

_LEVEL = "--xla_backend_optimization_level"
if _LEVEL not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_LEVEL}=0".strip()

_CREATED = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _CREATED = tempfile.mkdtemp(prefix="mae_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CREATED  # read by jax here and in subprocesses
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _CREATED is not None:
    shutil.rmtree(_CREATED, ignore_errors=True)
