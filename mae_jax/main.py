"""Entry point: `python -m mae_jax.main --config=configs/X.py --workdir=DIR [--config.FIELD=V]`.

Runs the job the config chooses (`config.mode`) in DIR, resuming from its newest checkpoint.
On a multi-host job every process runs the same command (see mae_jax.distributed).
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mae_jax import checkpoint
from mae_jax import distributed
from mae_jax import finetune
from mae_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and figures go.")
flags.mark_flags_as_required(["config", "workdir"])

_JOBS = {"pretrain": train.train_and_evaluate, "finetune": finetune.train_and_evaluate,
         "linprobe": finetune.train_and_evaluate}


def _show_own_info_logs() -> None:
  """INFO lines of mae_jax on stderr; other libraries' from WARNING up (Orbax alone logs every
  file it writes at INFO)."""
  logging.set_stderrthreshold(logging.INFO)
  package = os.path.dirname(os.path.abspath(__file__)) + os.sep
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or record.pathname.startswith(package))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["stderrthreshold"].present:
    _show_own_info_logs()
  config = _CONFIG.value
  if config.mode not in _JOBS:
    raise app.UsageError(f"config.mode={config.mode!r} is not one of {sorted(_JOBS)}.")
  distributed.initialize()  # before anything touches a device
  # Absolute, so that Orbax (which refuses relative paths) and every later message agree.
  _JOBS[config.mode](config, checkpoint.absolute(_WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
