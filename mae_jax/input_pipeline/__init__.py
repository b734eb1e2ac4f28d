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
- `decode`: crops, decoding straight into the crop, resizing, normalization.
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
from mae_jax.input_pipeline.decode import (IMAGENET_MEAN, IMAGENET_STD, center_crop_box,
                                           decode_and_crop, normalize, random_resized_crop_box)
from mae_jax.input_pipeline.file_issues import SKIPPED, file_issue_counts
from mae_jax.input_pipeline.sources import (FOLDER_PREFIX, SHIPPED, FolderSource, Source,
                                            TfdsSource, default_eval_split, open_source)

__all__ = [
    "validate", "config_problems", "open_source", "default_eval_split", "open_eval_source",
    "num_examples", "num_classes", "create_iterator", "to_global", "Source", "FolderSource",
    "TfdsSource", "Sampler", "BatchMaker", "DecodedCache", "decode_and_crop",
    "random_resized_crop_box", "center_crop_box", "normalize", "file_issue_counts",
    "IMAGENET_MEAN", "IMAGENET_STD", "AUGMENTS", "SHIPPED", "FOLDER_PREFIX", "SKIPPED",
]


def _num_workers(requested: int) -> int:
  return len(os.sched_getaffinity(0)) if requested < 0 else requested


def config_problems(input_config: ml_collections.ConfigDict) -> list[str]:
  """Every wrong field of input_config (each naming the field and its fix), without opening
  the dataset."""
  c = input_config
  errors = []
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


def validate(input_config: ml_collections.ConfigDict) -> Source:
  """Checks input_config and that its dataset is ready (building the shipped ones); returns the
  training split's source, for `create_iterator(..., source=...)` (opened once per run).

  Raises ValueError that names every wrong field and says how to fix it.
  """
  errors = config_problems(input_config)
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


def create_iterator(input_config: ml_collections.ConfigDict, *, image_size: int, seed: int,
                    train: bool, start_step: int = 0, process_index: int | None = None,
                    process_count: int | None = None, augment: str | None = None,
                    normalize: bool = True, split: str | None = None,
                    source: Source | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of each global batch, from step `start_step` on.

  Yields {"image": float32 [B / P, S, S, 3] ImageNet-normalized (uint8 with normalize=False),
  "label": int32 [B / P] when the dataset has labels}. train=True: endless, shuffled per epoch;
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
  if source is None:
    source = open_source(c, split or (c.split if train else default_eval_split(c)))
  n = len(source)
  maker = BatchMaker(
      source, Sampler(n, c.batch_size, process_index, process_count, seed, shuffle=train),
      image_size, augment, one_pass=not train, labeled=source.num_classes is not None,
      normalize=normalize, crop_scale=tuple(c.crop_scale), crop_ratio=tuple(c.crop_ratio),
      eval_crop_pct=c.get("eval_crop_pct", 0.875), random_flip=c.get("random_flip", True),
      decoded_cache_bytes=c.get("decoded_cache_mb", 0) << 20)
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
