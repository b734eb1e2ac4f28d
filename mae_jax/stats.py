"""Per-channel mean and std of a dataset, for `config.input.mean` / `config.input.std`.

    python -m mae_jax.stats --config=configs/demo.py \
        --config.input.dataset=folder:/data/bands --config.model.in_chans=4 [--max_images=N]

Reads every file of `config.input.split` (or N of them, evenly spaced) whole, as the input
pipeline reads them for a model of `config.model.in_chans` channels (uint8 values divided by
255, other arrays as they are), and prints the two overrides to add to the training command.
ImageNet's (the default for 3 channels) are the official code's, computed the same way on
ImageNet's training images.
"""

import json
import sys
from typing import Sequence

import numpy as np

from mae_jax import input_pipeline
from mae_jax.input_pipeline import decode


def dataset_stats(input_config, channels: int, max_images: int = 0) -> dict:
  """{"mean": [C], "std": [C], "images": n, "pixels": n, "skipped": n} over the split's files
  (all of them, or `max_images` evenly spaced ones); unreadable files are skipped and counted."""
  source = input_pipeline.open_source(input_config)
  n = len(source)
  chosen = (np.linspace(0, n - 1, max_images).round().astype(int) if 0 < max_images < n
            else np.arange(n))
  skipped = []

  def each():
    for index in chosen:
      where = source.describe(index)
      try:
        data, _ = source.read(index)
        yield decode.read_pixels(data, where, channels)
      except input_pipeline.DECODE_ERRORS:
        skipped.append(where)

  mean, std, pixels = decode.channel_stats(each())
  return {"mean": decode.round_stats(mean), "std": decode.round_stats(std),
          "images": len(chosen) - len(skipped), "pixels": pixels,
          "skipped": len(skipped)}


def overrides(stats: dict) -> str:
  """The command-line overrides that set these statistics."""
  return (f"--config.input.mean='{tuple(stats['mean'])}' "
          f"--config.input.std='{tuple(stats['std'])}'")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  try:
    stats = dataset_stats(config.input, config.model.in_chans, _MAX_IMAGES.value)
  except decode.DatasetMismatch as e:  # names the file, the field and the fix
    sys.stderr.write(f"Error: {e}\n")
    sys.exit(1)
  print(f"{stats['images']} images ({stats['pixels']:,} pixels, {stats['skipped']} unreadable "
        f"skipped) of {config.input.dataset}, split {config.input.split}, "
        f"{config.model.in_chans} channel{'s' * (config.model.in_chans != 1)}:")
  print(overrides(stats))
  print(json.dumps(stats))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).",
                                            lock_config=True)
  _MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Read only this many files, evenly "
                                     "spaced (0: all).")
  flags.mark_flags_as_required(["config"])
  from mae_jax import config_lib  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=lambda argv: config_lib.parse_flags(argv, _CONFIG))
