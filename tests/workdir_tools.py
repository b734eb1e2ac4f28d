"""What several test files need to run mae_jax in subprocesses and read or damage its workdirs."""

import glob
import json
import os
import pathlib


def subprocess_env(cache_dir, drop=("MAE_JAX_", "SLURM_")) -> dict:
  """This environment without the variables starting with `drop` (pod settings, injected
  faults), with fast CPU compiles and a compilation cache shared by the runs: the test run's
  own (tests/conftest.py sets one for every test and subprocess) or else one in `cache_dir`."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop))}
  env.update(XLA_FLAGS="--xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR") or
             str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def rows(workdir) -> list:
  """The rows of WORKDIR/metrics.jsonl ([] before the first)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(workdir) -> dict:
  """step -> (loss, grad_norm, lr); one row per step (a resumed run drops the rows it logs
  again)."""
  out = {}
  for row in rows(workdir):
    assert row["step"] not in out, f"step {row['step']} logged twice"
    out[row["step"]] = (row["loss"], row["grad_norm"], row["lr"])
  return out


def steps(workdir) -> list:
  """The steps of the checkpoints in WORKDIR/checkpoints, in order."""
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def largest_array_file(item_dir) -> str:
  """The biggest data file of a checkpoint item (OCDBT keeps arrays under .../d/)."""
  return max(glob.glob(f"{item_dir}/**/d/*", recursive=True), key=os.path.getsize)


def truncate(path: str) -> None:
  """Cuts a file to half its size, as a crash mid-write would."""
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
