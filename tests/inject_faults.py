"""`python -m mae_jax.main` with faults injected on purpose, for tests/test_faults.py.

    python tests/inject_faults.py --config=... --workdir=... [more mae_jax.main flags]

Environment variables choose the faults; steps count updates from 1, as the logs do:
  FAULT_SIGTERM_AT_STEP=k    the process sends itself SIGTERM as step k starts (a preemption
                             notice arriving during that step).
  FAULT_NONFINITE_AT_STEP=k  every pixel of step k's images becomes FAULT_VALUE ("nan" or "inf").
  FAULT_KILL_AT_COMMIT=k     SIGKILL just before Orbax commits the checkpoint of step k: its
                             arrays are written in a temporary folder that is never renamed (an
                             asynchronous save cut short).
  FAULT_ENOSPC_AT_SAVE=k     the disk is full while the checkpoint of step k is written: every
                             file write inside its temporary folder that goes through epath
                             (Orbax's JSON items, the checksums) fails with ENOSPC.
  FAULT_UNREADABLE_STEP=k    the checkpoint of step k cannot be read by process
  FAULT_UNREADABLE_PROCESS=i (default 0) alone: every file read under checkpoints/k/ through
                             epath fails with EIO there (a host with a bad disk cache or a
                             file not yet visible to it), while the other processes read it.
"""

import contextlib
import errno
import os
import runpy
import signal
import sys
from typing import Any, Callable, Iterator

import numpy as np


def _step_env(name: str) -> int:
  return int(os.environ.get(name, "0"))


def _faulty_batches(create_iterator: Callable[..., Iterator[dict]]) -> Callable[..., Any]:
  """create_iterator, with the batch faults of the environment injected."""
  sigterm_at = _step_env("FAULT_SIGTERM_AT_STEP")
  nonfinite_at = _step_env("FAULT_NONFINITE_AT_STEP")
  value = float(os.environ.get("FAULT_VALUE", "nan"))

  def create(*args, start_step: int = 0, **kwargs) -> Iterator[dict]:
    with contextlib.closing(create_iterator(*args, start_step=start_step, **kwargs)) as batches:
      for step, batch in enumerate(batches, start_step + 1):  # taken just before step `step`
        if step == sigterm_at:
          os.kill(os.getpid(), signal.SIGTERM)
        if step == nonfinite_at:
          batch = {**batch, "image": np.full_like(batch["image"], value)}
        yield batch

  return create


def _kill_before_commit(step: int) -> None:
  """SIGKILL the process when Orbax is about to rename the checkpoint of `step` into place."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize_or_die(self):
    if self.get_final().name == str(step):
      os.kill(os.getpid(), signal.SIGKILL)
    await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die


def _disk_full_during_save(step: int) -> None:
  """ENOSPC for every epath write into the temporary folder of the checkpoint of `step`."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  for name in ("write_text", "write_bytes"):
    original = getattr(gpath.PosixGPath, name)

    def write(self, *args, _original=original, **kwargs):
      if f"/{step}.orbax-checkpoint-tmp" in str(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
      return _original(self, *args, **kwargs)

    setattr(gpath.PosixGPath, name, write)


def _unreadable_on_one_process(step: int, process: int) -> None:
  """EIO for every epath read under checkpoints/`step`/ on process `process` alone."""
  import jax  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  original = gpath.PosixGPath.open

  def open_(self, mode="r", *args, **kwargs):
    if ("r" in mode and f"/checkpoints/{step}/" in str(self)
        and jax.process_index() == process):
      raise OSError(errno.EIO, "Input/output error (injected)", str(self))
    return original(self, mode, *args, **kwargs)

  gpath.PosixGPath.open = open_


def main() -> None:
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.create_iterator = _faulty_batches(input_pipeline.create_iterator)
  if _step_env("FAULT_KILL_AT_COMMIT"):
    _kill_before_commit(_step_env("FAULT_KILL_AT_COMMIT"))
  if _step_env("FAULT_ENOSPC_AT_SAVE"):
    _disk_full_during_save(_step_env("FAULT_ENOSPC_AT_SAVE"))
  if _step_env("FAULT_UNREADABLE_STEP"):
    _unreadable_on_one_process(_step_env("FAULT_UNREADABLE_STEP"),
                               _step_env("FAULT_UNREADABLE_PROCESS"))
  sys.argv = ["mae_jax.main", *sys.argv[1:]]
  runpy.run_module("mae_jax.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  from mae_jax import huge_pages  # pylint: disable=g-import-not-at-top
  huge_pages.restart_with_huge_pages()  # this script stands for `python -m mae_jax.main`
  main()
