"""The encoder's features of a labeled dataset split, from any workdir, into an npz.

    python -m mae_jax.extract --workdir=DIR --output=FILE.npz [--split=NAME] [--dataset=NAME]

DIR: a pretraining workdir (its newest checkpoint), one step folder, a fine-tuning or linear
probing workdir, or one written by `mae_jax.convert` (full or encoder-only). The features are
the kNN monitor's (mae_jax.monitor): for an MAE the encoder sees every patch (no masking) and
gives its cls token (or, with --feature=mean, the mean of its patch tokens) after encoder_norm;
for a fine-tuned or probed classifier they are the pooled feature its head takes (a linear
probe's before the head's BatchNorm). Images are center crops (input.eval_crop_pct) at the
model's size, normalized as in training.

The npz holds `features` float32 [N, D], `labels` int32 [N] (in the split's order, or that of a
random subset with --num_examples), and `dataset`, `split` (strings). The dataset defaults to
the workdir config's config.monitor.dataset, else its input.dataset, and must be labeled.
Batches are split over all devices (and processes: process 0 writes the file); progress is
logged, with a bar on a terminal.
"""

import io
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import checkpoint
from mae_jax import config_checks
from mae_jax import config_lib
from mae_jax import distributed
from mae_jax import monitor
from mae_jax import writers

Params = Dict[str, Any]
CLASSIFIER_MODES = config_checks.CLASSIFIER_JOBS


def model_for(params: Params, config: ml_collections.ConfigDict) -> Any:
  """The model that `params` belong to: a fine-tuning VisionTransformer for a finetune or
  linprobe config, else a MaskedAutoencoder, in the params' own (scan or unrolled) layout."""
  from mae_jax import models  # pylint: disable=g-import-not-at-top
  from mae_jax.models.classifier import classifier_from_config  # pylint: disable=g-import-not-at-top
  if config.get("mode", "pretrain") in CLASSIFIER_MODES:
    model = classifier_from_config(config.model)
  else:
    model = models.from_config(config.model)
  return model.clone(scan=models.is_scanned(params))


def input_config(config: ml_collections.ConfigDict, *, dataset: Optional[str] = None,
                 data_dir: Optional[str] = None, batch_size: int = 256
                 ) -> ml_collections.ConfigDict:
  """The workdir config's input (the kNN monitor's dataset when it has one), with overrides."""
  if config.get("monitor") is not None:
    c = monitor.monitor_input(config)
  else:
    c = config.input.copy_and_resolve_references()
  with c.unlocked():
    c.dataset = dataset or c.dataset
    c.data_dir = data_dir or c.get("data_dir")
    c.batch_size = batch_size
    c.decoded_cache_mb = 0
  return c


def extract(path: str, *, split: Optional[str] = None, dataset: Optional[str] = None,
            data_dir: Optional[str] = None, batch_size: int = 256, num_examples: int = 0,
            feature: Optional[str] = None, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, str, str]:
  """(features float32 [N, D], labels int32 [N], dataset, split) of the params in `path`.

  `split` defaults to the input's training split; `feature` (monitor.FEATURES, for MAE params)
  to the config's config.monitor.feature, else "cls"; `num_examples` > 0 takes a random subset of
  that size (the input pipeline's order for `seed`). Every process returns the same arrays.
  Raises ValueError for a dataset without labels, a batch the devices do not divide, or a
  workdir without a config.
  """
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if batch_size < 1 or batch_size % jax.device_count():
    raise ValueError(f"--batch_size={batch_size} must be a positive multiple of the "
                     f"{jax.device_count()} devices.")
  if num_examples < 0:
    raise ValueError(f"--num_examples={num_examples} must be >= 0 (0 = the whole split).")
  params, config = checkpoint.load_params(path)
  if config is None:
    raise ValueError(f"{path} holds no config.json, so its model is unknown; convert or train "
                     f"it with mae_jax.convert / mae_jax.main, which write one.")
  model = model_for(params, config)
  feature = feature or (config.monitor.feature if config.get("monitor") is not None else "cls")
  c = input_config(config, dataset=dataset, data_dir=data_dir, batch_size=batch_size)
  input_pipeline.validate(c)
  if input_pipeline.num_classes(c) is None:
    raise ValueError(f"The dataset {c.dataset!r} has no labels: pass --dataset=NAME of a "
                     f"labeled one (e.g. sklearn_digits, imagenet2012, folder:/path with one "
                     f"subfolder per class).")
  split = split or c.split
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  params = jax.tree.map(lambda x: _replicate(np.asarray(x), replicated), params)
  batches, n, examples = monitor.split_batches(c, image_size=model.img_size, split=split,
                                               seed=seed, max_examples=num_examples,
                                               channels=model.in_chans)
  logging.info("Extracting %s features of %d images of %s[%s] from %s on %d devices.",
               feature if config.get("mode", "pretrain") not in CLASSIFIER_MODES else "head",
               examples, c.dataset, split, path, jax.device_count())
  progress = _Progress(examples)
  parts = list(monitor.embedded_batches(
      jax.jit(monitor.feature_fn(model, feature), out_shardings=sharding), params, batches,
      num_batches=n, examples=examples, sharding=sharding, progress=progress))
  progress.close()
  features, labels, valid = (multihost_utils.process_allgather(x, tiled=True)
                             for x in monitor.concatenate(parts, sharding))
  valid = np.asarray(valid, bool)
  return (np.asarray(features, np.float32)[valid], np.asarray(labels, np.int32)[valid],
          c.dataset, split)


def _replicate(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


class _Progress:
  """Images done so far: a log line every 10 s and at the end, a bar on a terminal."""

  def __init__(self, total: int):
    self._total, self._start, self._logged = total, time.time(), time.time()
    self._bar = writers.ProgressBar(total, enabled=jax.process_index() == 0)

  def __call__(self, done: int) -> None:
    now = time.time()
    rate = done / max(now - self._start, 1e-9)
    self._bar.set_postfix(f"{rate:.1f} img/s")
    self._bar.update(done)
    if now - self._logged >= 10 or done == self._total:
      self._logged = now
      self._bar.clear()
      logging.info("%d/%d images (%.0f%%), %.1f img/s, %s left.", done, self._total,
                   100 * done / max(self._total, 1), rate,
                   writers.format_duration((self._total - done) / max(rate, 1e-9)))

  def close(self) -> None:
    self._bar.close()


def save(output: str, features: np.ndarray, labels: np.ndarray, dataset: str,
         split: str) -> str:
  """Writes the npz (any epath location) and returns its path."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  np.savez(buffer, features=features, labels=labels, dataset=np.str_(dataset),
           split=np.str_(split))
  path = epath.Path(output)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
  return os.fspath(path)


def main(argv: Sequence[str]) -> None:
  """`python -m mae_jax.extract`: a workdir's features of a labeled split -> an npz."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  writers.show_own_info_logs()
  with config_lib.input_errors_end_the_command():
    writers.check_writable(_OUTPUT.value)  # before a pass over the split that may take hours
    distributed.initialize()
    features, labels, dataset, split = extract(
        checkpoint.absolute(_WORKDIR.value), split=_SPLIT.value, dataset=_DATASET.value,
        data_dir=_DATA_DIR.value, batch_size=_BATCH_SIZE.value,
        num_examples=_NUM_EXAMPLES.value, feature=_FEATURE.value)
  if jax.process_index() == 0:
    path = save(_OUTPUT.value, features, labels, dataset, split)
    print(f"wrote {path}: features {features.shape[0]} x {features.shape[1]} float32, labels "
          f"of {len(np.unique(labels))} classes ({dataset}[{split}])")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import

  _WORKDIR = flags.DEFINE_string("workdir", None, "A workdir of mae_jax.main or mae_jax.convert "
                                 "(or one step folder of it).", required=True)
  _OUTPUT = flags.DEFINE_string("output", None, "The .npz file to write.", required=True)
  _SPLIT = flags.DEFINE_string("split", None, "The split (default: the input's training split, "
                               "e.g. train; test or validation for the held-out images).")
  _DATASET = flags.DEFINE_string("dataset", None, "A labeled dataset (default: the workdir's "
                                 "config.monitor.dataset, else its input.dataset).")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the config's).")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Global batch (a multiple of the "
                                     "devices).")
  _NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 0, "A random subset of this many images "
                                       "(0 = the whole split).")
  _FEATURE = flags.DEFINE_enum("feature", None, list(monitor.FEATURES), "For MAE params: the "
                               "cls token or the mean of the patch tokens (default: the "
                               "config's monitor.feature, else cls).")
  app.run(main, flags_parser=config_lib.parse_flags)
