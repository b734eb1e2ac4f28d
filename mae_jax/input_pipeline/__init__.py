"""Input pipeline for pretraining, fine-tuning and linear probing: deterministic by step.

The data is an endless stream of global positions g = 0, 1, 2, ...: position g reads record
perm_e[g % N] of epoch e = g // N, where perm_e is a permutation of the N records drawn from
(seed, e), and that example's crop and flip are drawn from (seed, e, record). The global batch
at step s is positions s*B .. s*B + B - 1, so it is a pure function of (dataset, seed, s):
process p of P builds only its rows p*B/P .. (p+1)*B/P - 1, a resumed run needs only the step,
and 1 process or 8 see the same batches. That needs random access to records.

The package, one concern a module:
- `sources`: the `Source` protocol; TFDS splits (ArrayRecord) and image folders; the messages
  that say how to prepare a dataset. TensorFlow is imported there only, for TFDS datasets.
- `decode`: reading files of any channel count (pictures, .npy / .tif bands), the crops as the
  official transforms make them at any source and output size, normalization per channel.
- `file_issues`: the accounting of converted and unreadable files.
- `batches`: the sampler (positions -> records) and the filling of one batch.
- `workers`: running that in a thread or in worker processes over shared memory.
This module holds the public entry points; JAX is imported only by `to_global` and when
process_index/process_count are not given.
"""

import itertools
import os
from typing import Any, Iterator

import ml_collections
import numpy as np

from mae_jax.input_pipeline import workers
# The package's public names, importable from mae_jax.input_pipeline.
from mae_jax.input_pipeline.batches import AUGMENTS, BatchMaker, DecodedCache, Sampler
from mae_jax.input_pipeline import decode
from mae_jax.input_pipeline.decode import (DECODE_ERRORS, IMAGENET_MEAN, IMAGENET_STD,
                                           DatasetMismatch, decode_and_crop, normalize,
                                           random_resized_crop_box, read_pixels)
from mae_jax.input_pipeline.file_issues import SKIPPED, file_issue_counts
from mae_jax.input_pipeline.sources import (FOLDER_PREFIX, SHIPPED, FolderSource, Source,
                                            TfdsSource, default_eval_split, open_source)

__all__ = [
    "validate", "config_problems", "first_file_mismatch", "pixel_dtype", "open_source", "default_eval_split", "open_eval_source",
    "num_examples", "num_classes", "create_iterator", "to_global", "Source", "FolderSource",
    "TfdsSource", "Sampler", "BatchMaker", "DecodedCache", "decode_and_crop",
    "random_resized_crop_box", "read_pixels", "normalize", "file_issue_counts",
    "DatasetMismatch", "DECODE_ERRORS", "IMAGENET_MEAN", "IMAGENET_STD", "STATS_COMMAND",
    "AUGMENTS", "SHIPPED", "FOLDER_PREFIX", "SKIPPED",
]


def _num_workers(requested: int) -> int:
  return len(os.sched_getaffinity(0)) if requested < 0 else requested


STATS_COMMAND = "python -m mae_jax.stats --config=CONFIG [--config.FIELD=VALUE ...]"


def check_normalization(input_config: ml_collections.ConfigDict, channels: int) -> None:
  """ValueError unless input.mean and input.std give one value per channel, each std > 0."""
  mean = tuple(input_config.get("mean", IMAGENET_MEAN))
  std = tuple(input_config.get("std", IMAGENET_STD))
  if len(mean) != channels or len(std) != channels:
    default = " (ImageNet's, the default)" if mean == IMAGENET_MEAN else ""
    raise ValueError(
        f"input.mean={mean}{default} and input.std={std} need one value per channel for "
        f"config.model.in_chans={channels}: set --config.input.mean and --config.input.std "
        f"(the lines `{STATS_COMMAND}` prints for your data).")
  if min(std) <= 0:
    raise ValueError(f"input.std={std} must be > 0 for every channel.")


def pixel_dtype(source: Source, channels: int) -> str:
  """What the dataset's files decode to: "uint8", or "float32" when its first readable array
  file (.npy, .tif) holds other values. Each file is checked against it as it is read."""
  for index in range(len(source) if isinstance(source, FolderSource) else 0):
    where = source.describe(index)
    if decode.is_array_file(where):
      try:
        data, _ = source.read(index)
        return decode.decode_and_crop(data, 1, None, where=where, channels=channels).dtype.name
      except DECODE_ERRORS:
        continue  # skipped when it is read, like any unreadable file
  return "uint8"


def first_file_mismatch(source: Source, channels: int, tries: int = 4) -> str:
  """Whether the first readable file of `source` fits a model of `channels` channels, read as
  the batches read it (`read_pixels`): its DatasetMismatch message naming the file and the fix,
  or "" when it fits or none of the first `tries` files reads (an unreadable file is skipped
  when read). One file decoded: a check that can run before anything is written; the files
  after it are checked as they are read."""
  for index in range(min(tries, len(source))):
    try:
      read_pixels(source.read(index)[0], source.describe(index), channels)
    except DatasetMismatch as e:
      return str(e)
    except DECODE_ERRORS:
      continue
    return ""
  return ""


def config_problems(input_config: ml_collections.ConfigDict, channels: int | None = None
                    ) -> list[str]:
  """Every wrong field of input_config (each naming the field and its fix), without opening
  the dataset; with `channels` (config.model.in_chans) input.mean and input.std too."""
  c = input_config
  errors = []
  if channels is not None:
    try:
      check_normalization(c, channels)
    except ValueError as e:
      errors.append(str(e))
  if not isinstance(c.batch_size, int) or c.batch_size <= 0:
    errors.append(f"input.batch_size={c.batch_size!r} must be a positive integer (global).")
  lo, hi = c.crop_scale
  if not 0 < lo <= hi <= 1:
    errors.append(f"input.crop_scale={tuple(c.crop_scale)} must satisfy 0 < lo <= hi <= 1.")
  lo, hi = c.crop_ratio
  if not 0 < lo <= hi:
    errors.append(f"input.crop_ratio={tuple(c.crop_ratio)} must satisfy 0 < lo <= hi.")
  if c.num_workers < -1:
    errors.append(f"input.num_workers={c.num_workers}: use -1 (one per core), 0 (decode in "
                  "this process) or a count.")
  if c.prefetch < 0:
    errors.append(f"input.prefetch={c.prefetch} must be >= 0.")
  if not isinstance(c.get("decoded_cache_mb", 0), int) or c.get("decoded_cache_mb", 0) < 0:
    errors.append(f"input.decoded_cache_mb={c.decoded_cache_mb!r} must be an integer >= 0 "
                  "(0: no cache).")
  if not 0 < c.get("eval_crop_pct", 0.875) <= 1:
    errors.append(f"input.eval_crop_pct={c.eval_crop_pct} must be in (0, 1].")
  return errors


def validate(input_config: ml_collections.ConfigDict, channels: int | None = None
             ) -> Source:
  """Checks input_config and that its dataset is ready (building the shipped ones); returns the
  training split's source, for `create_iterator(..., source=...)` (opened once per run). With
  `channels` (config.model.in_chans), input.mean and input.std are checked against it.

  Raises ValueError that names every wrong field and says how to fix it.
  """
  errors = config_problems(input_config, channels)
  if errors:
    raise ValueError("Invalid input config:\n  " + "\n  ".join(errors))
  return open_source(input_config)


def open_eval_source(input_config: ml_collections.ConfigDict) -> Source:
  """The evaluation split's source: input.eval_split, else the dataset's validation, val or
  test split."""
  return open_source(input_config, default_eval_split(input_config))


def num_examples(input_config: ml_collections.ConfigDict, split: str | None = None) -> int:
  """Records in `split` (default input.split)."""
  return len(open_source(input_config, split))


def num_classes(input_config: ml_collections.ConfigDict) -> int | None:
  """Number of classes of the dataset's labels, or None when it has none."""
  return open_source(input_config).num_classes


def create_iterator(input_config: ml_collections.ConfigDict, *,
                    image_size: int | decode.Size, seed: int, train: bool, start_step: int = 0,
                    process_index: int | None = None, process_count: int | None = None,
                    augment: str | None = None, normalize: bool = True,
                    split: str | None = None, source: Source | None = None, channels: int = 3
                    ) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of each global batch, from step `start_step` on.

  Yields {"image": float32 [B / P, H, W, C] normalized with input.mean / input.std (default
  ImageNet's) - with normalize=False the decoded values, uint8 (float32 for arrays of other
  types) -, "label": int32 [B / P] when the dataset has labels}. `image_size` is an int
  (square) or an (H, W) pair; `channels` the model's in_chans (1 reads grayscale files; other
  counts than 1 and 3 need .npy / .tif bands; a file that does not fit raises DatasetMismatch
  naming it). train=True: endless, shuffled per epoch;
  train=False: one pass over the split in order, the last batch padded, with "valid": bool.
  augment: "mae" (RandomResizedCrop input.crop_scale/crop_ratio + flip unless
  input.random_flip is False; default for train) or
  "eval" (resize + center crop input.eval_crop_pct; default otherwise). split: default
  input.split for train, input.eval_split (or the dataset's held-out split) otherwise.
  source: that split already opened (`validate`, `open_eval_source`); opened here when None.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # workers never need it
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  augment = augment or ("mae" if train else "eval")
  c = input_config
  if augment not in AUGMENTS:
    raise ValueError(f"augment={augment!r}: use one of {AUGMENTS}.")
  if c.batch_size % process_count:
    raise ValueError(f"input.batch_size={c.batch_size} must be divisible by the number of "
                     f"processes ({process_count}).")
  if seed < 0:
    raise ValueError(f"seed={seed} (config.seed) must be >= 0.")
  check_normalization(c, channels)
  if source is None:
    source = open_source(c, split or (c.split if train else default_eval_split(c)))
  n = len(source)
  maker = BatchMaker(
      source, Sampler(n, c.batch_size, process_index, process_count, seed, shuffle=train),
      decode.size_hw(image_size), augment, one_pass=not train,
      labeled=source.num_classes is not None,
      normalize=normalize, crop_scale=tuple(c.crop_scale), crop_ratio=tuple(c.crop_ratio),
      eval_crop_pct=c.get("eval_crop_pct", 0.875), random_flip=c.get("random_flip", True),
      decoded_cache_bytes=c.get("decoded_cache_mb", 0) << 20, channels=channels,
      mean=tuple(c.get("mean", IMAGENET_MEAN)), std=tuple(c.get("std", IMAGENET_STD)),
      pixel_dtype=pixel_dtype(source, channels))
  steps = itertools.count(start_step) if train else iter(range(start_step,
                                                               -(-n // c.batch_size)))
  count = _num_workers(c.num_workers)
  if not count:
    return workers.thread_batches(maker, steps, c.prefetch)
  return workers.pooled(workers.WorkerPool(maker, steps, count,
                                           depth=max(1, -(-c.prefetch // count))))


def to_global(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, Any]:
  """Process-local rows -> global jax.Arrays sharded over the batch axis.

  Assumes the usual device order, in which process p holds rows p*B/P .. (p+1)*B/P - 1.
  Arrays of lower rank than the sharding's spec (labels) use its leading entries.
  """
  import jax  # pylint: disable=g-import-not-at-top  # workers never need it

  def place(x: np.ndarray) -> jax.Array:
    s = sharding
    if isinstance(s, jax.sharding.NamedSharding) and len(s.spec) > x.ndim:
      s = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[:x.ndim]))
    return jax.make_array_from_process_local_data(s, x)
  return {k: place(v) for k, v in batch.items()}
