"""Pretraining, fine-tuning and linear probing: the job that the config chooses (config.mode).

    python -m mae_jax.main --config=configs/X.py --workdir=DIR [--config.FIELD=VALUE ...]

Runs in DIR, resuming from its newest checkpoint. Every field of the config can be changed on
the command line (--config.model.mask_ratio=0.9); the fields are documented in docs/configs.md
and in the config files themselves (configs/*.py, mae_jax/config_lib.py). On a multi-host job
every process runs the same command (see mae_jax.distributed).

A wrong flag, config file or field ends in a short message that names it and the fix, exit
status 2, before anything is compiled or written.
"""

import difflib
import importlib.util
import os
import re
import sys
from typing import List, Optional, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from mae_jax import checkpoint
from mae_jax import config_checks
from mae_jax import distributed
from mae_jax.input_pipeline.decode import DatasetMismatch
from mae_jax import finetune
from mae_jax import train
from mae_jax import writers

CONFIG_DOCS = "docs/configs.md"
USAGE_ERROR = 2  # the exit status of a wrong command line or config, as absl's own

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"A config file (configs/*.py). Its fields are documented in {CONFIG_DOCS} "
    "and the config files; change any with --config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and figures go.")
flags.mark_flags_as_required(["config", "workdir"])

_JOBS = {"pretrain": train.train_and_evaluate, "finetune": finetune.train_and_evaluate,
         "linprobe": finetune.train_and_evaluate}


def _usage_error(message: str) -> None:
  """Exits with `message` (a few lines) and the usual status of a wrong command line."""
  sys.stderr.write(f"Error: {message}\n")
  sys.exit(USAGE_ERROR)


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of --name=VALUE or --name VALUE in argv (the last one), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _load_config(path: str) -> Optional[ml_collections.ConfigDict]:
  """The config of a `configs/X.py` path (no variant), or None when it does not load."""
  spec = importlib.util.spec_from_file_location("_config_for_message", path)
  if spec is None or not os.path.isfile(path):
    return None
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config()
  except Exception:  # pylint: disable=broad-except  # only a suggestion depends on it
    return None


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      paths += _field_paths(value, f"{prefix}{key}.")
  return paths


def _unknown_field(argv: Sequence[str], config_path: str) -> Optional[str]:
  """A message for the first --config.FIELD override that the config does not have."""
  config = _load_config(config_path)
  if config is None:
    return None
  known = _field_paths(config)
  for arg in argv:
    match = re.match(r"--config\.([^=\s]+)", arg)
    if match and match.group(1) not in known:
      field = match.group(1)
      guess = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
      hint = f" Did you mean --config.{guess[0]}?" if guess else ""
      return (f"--config.{field}: {config_path} has no field config.{field}.{hint} The fields "
              f"are documented in {CONFIG_DOCS}.")
  return None


def _describe(error: BaseException) -> str:
  """The innermost useful message of an error raised while the config file loads."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return " ".join(str(error).split())


def parse_flags(argv: Sequence[str]) -> List[str]:
  """absl's flag parsing, with a short message and exit status 2 instead of a traceback for a
  config file that does not exist or does not load, a variant it does not have, a field it does
  not have (with the field meant) or a value of the wrong type."""
  config_arg = _flag_value(argv[1:], "config")
  config_path = None if config_arg is None else config_arg.split(":", 1)[0]
  if config_path is not None and not os.path.isfile(config_path):
    _usage_error(f"--config={config_arg}: no such config file {config_path!r}; use one of "
                 f"configs/*.py (e.g. configs/demo.py).")
  try:
    rest = flags.FLAGS(argv)
    if config_arg is not None:
      _ = _CONFIG.value  # loads the file now, so that its errors end here
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # ml_collections puts a config file's traceback in the message
      message = f"--config={config_arg}: " + message.strip().splitlines()[-1]
    _usage_error(message)
  except (AttributeError, KeyError) as e:  # a field that the config does not have
    _usage_error(_unknown_field(argv[1:], config_path) or _describe(e))
  except (OSError, ValueError, TypeError) as e:  # the file fails to load, or refuses a variant
    _usage_error(f"--config={config_arg}: {_describe(e)}")
  return rest


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  writers.show_own_info_logs()
  config = _CONFIG.value
  if config.get("mode") not in _JOBS:
    _usage_error(f"config.mode={config.get('mode')!r} is not one of {sorted(_JOBS)}.")
  distributed.initialize()  # before anything touches a device
  try:
    # Absolute, so that Orbax (which refuses relative paths) and every later message agree.
    _JOBS[config.mode](config, checkpoint.absolute(_WORKDIR.value))
  except config_checks.ConfigError as e:  # raised before anything is compiled or written
    _usage_error(f"{e}\nThe fields are documented in {CONFIG_DOCS}.")
  except DatasetMismatch as e:  # a file met during the run that the first files did not show
    sys.stderr.write(f"Error: {e}\nThe run stopped; checkpoints saved before it are kept, and a "
                     f"rerun with the same --workdir resumes from the newest.\n")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
