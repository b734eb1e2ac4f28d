"""Pretraining, fine-tuning and linear probing: the job that the config chooses (config.mode).

    python -m mae_jax.main --config=configs/X.py --workdir=DIR [--config.FIELD=VALUE ...]

Runs in DIR, resuming from its newest checkpoint. Every field of the config can be changed on
the command line (--config.model.mask_ratio=0.9); the fields are documented in docs/configs.md
and in the config files themselves (configs/*.py, mae_jax/config_lib.py). On a multi-host job
every process runs the same command (see mae_jax.distributed).

A wrong flag, config file or field ends in a short message that names it and the fix, exit
status 2, before anything is compiled or written.

On a CPU it first restarts itself (same pid) so that XLA's per-step buffers get 2 MiB pages
(`mae_jax.huge_pages`; MAE_JAX_HUGE_PAGES=0 turns that off).
"""

if __name__ == "__main__":  # before jax and TensorFlow load: the process may be replaced
  from mae_jax import huge_pages as _huge_pages  # pylint: disable=g-import-not-at-top
  _huge_pages.restart_with_huge_pages("mae_jax.main")

# pylint: disable=g-import-not-at-top,wrong-import-position
import atexit
import os
import sys
from typing import List, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mae_jax import checkpoint
from mae_jax import config_checks
from mae_jax import config_lib
from mae_jax import distributed
from mae_jax.input_pipeline.decode import DatasetMismatch
from mae_jax import finetune
from mae_jax import huge_pages
from mae_jax import train
from mae_jax import trainer
from mae_jax import writers
# pylint: enable=g-import-not-at-top,wrong-import-position

CONFIG_DOCS = config_lib.CONFIG_DOCS
USAGE_ERROR = config_lib.USAGE_ERROR
INTERRUPTED = 130  # the shell's status of a command stopped by Ctrl-C (128 + SIGINT)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"A config file (configs/*.py). Its fields are documented in {CONFIG_DOCS} "
    "and the config files; change any with --config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and figures go.")
flags.mark_flags_as_required(["config", "workdir"])

_JOBS = {"pretrain": train.train_and_evaluate, "finetune": finetune.train_and_evaluate,
         "linprobe": finetune.train_and_evaluate}


def parse_flags(argv: Sequence[str]) -> List[str]:
  """absl's flag parsing with short messages for a wrong config file or field
  (`config_lib.parse_flags`)."""
  return config_lib.parse_flags(argv, _CONFIG)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  writers.show_own_info_logs()
  logging.info(huge_pages.status())
  config = _CONFIG.value
  if config.get("mode") not in _JOBS:
    config_lib.usage_error(
        f"config.mode={config.get('mode')!r} is not one of {sorted(_JOBS)}.")
  distributed.initialize()  # before anything touches a device
  try:
    # Absolute, so that Orbax (which refuses relative paths) and every later message agree.
    _JOBS[config.mode](config, checkpoint.absolute(_WORKDIR.value))
  except config_checks.ConfigError as e:  # raised before anything is compiled or written
    config_lib.usage_error(f"{e}\nThe fields are documented in {CONFIG_DOCS}.")
  except DatasetMismatch as e:  # a file met during the run that the first files did not show
    sys.stderr.write(f"Error: {e}\nThe run stopped; checkpoints saved before it are kept, and a "
                     f"rerun with the same --workdir resumes from the newest.\n")
    sys.exit(1)
  except KeyboardInterrupt:  # Ctrl-C before the steps began, or a second one during them
    sys.stderr.write(
        "\nStopped by Ctrl-C without saving. Checkpoints saved before are kept (a save cut short "
        "is never used); the same command resumes from the newest, or starts afresh if there "
        "is none.\n")
    # Not sys.exit: XLA may still be compiling on its own threads, and the interpreter's
    # shutdown under them crashed (segmentation fault, status 139). The exit functions (the
    # workdir's lock among them) run first; then the process ends without that shutdown.
    atexit._run_exitfuncs()  # pylint: disable=protected-access
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED)  # pylint: disable=protected-access
  if trainer.stopped_by_ctrl_c():  # the checkpoint is saved; the command did not finish
    sys.exit(INTERRUPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
