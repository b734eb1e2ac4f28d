"""The global sampler and the per-example work: which record each batch row reads, and filling
this process's rows of a batch; both picklable for the worker processes."""

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from mae_jax.input_pipeline import decode
from mae_jax.input_pipeline import file_issues
from mae_jax.input_pipeline.sources import Source

AUGMENTS = ("mae", "eval")
# A training example whose file is bad is replaced by the next record; this many bad records in
# a row means the data is broken, not a few files.
MAX_SUBSTITUTES = 16


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  # Word 0 tags the stream: 0 = order, 1 = augmentation (SeedSequence pads with zeros, so
  # keys of different lengths could collide; equal-length tagged keys cannot).
  return np.random.default_rng([0, seed, epoch, 0]).permutation(n)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Global positions -> records; local element k of process p -> global position."""
  num_records: int
  global_batch: int
  process_index: int = 0
  process_count: int = 1
  seed: int = 0
  shuffle: bool = True

  def position(self, k: int) -> int:
    """Global stream position of this process's k-th example."""
    local = self.global_batch // self.process_count
    step, row = divmod(k, local)
    return step * self.global_batch + self.process_index * local + row

  def record(self, position: int) -> tuple[int, int]:
    """(epoch, record index) at a global stream position."""
    epoch, i = divmod(position, self.num_records)
    if self.shuffle:
      i = int(_permutation(self.seed, epoch, self.num_records)[i])
    return epoch, i


class DecodedCache:
  """Records' encoded bytes, labels and decoded pixels, kept in memory up to `budget` bytes (the
  `input.decoded_cache_mb` of a config) for datasets small enough that each image recurs many
  times: the decode, most of the input's cost, then happens once per image and DCT scale. Each
  process and worker keeps its own; a record that does not fit is read and decoded each time,
  as without a cache. The output is the same either way."""

  def __init__(self, budget: int):
    self.budget = budget
    self.used = 0
    self.entries: dict[int, tuple[bytes, int, dict[int, np.ndarray]]] = {}
    self.sizes: dict[int, int] = {}  # bytes of each entry as last counted in `used`

  def read(self, source: Source, record: int) -> tuple[bytes, int, dict[int, np.ndarray] | None]:
    """(data, label, the record's dict of decodes to pass to decode_and_crop, or None)."""
    entry = self.entries.get(record)
    if entry is not None:
      return entry
    data, label = source.read(record)
    if not self.budget or self.used + len(data) > self.budget:
      return data, label, None
    entry = self.entries[record] = (data, label, {})
    self.sizes[record] = len(data)
    self.used += len(data)
    return entry

  def settle(self, record: int) -> None:
    """Counts the record's new decodes, if any; drops the record when that goes over budget."""
    entry = self.entries.get(record)
    if entry is None:
      return
    size = len(entry[0]) + sum(p.nbytes for p in entry[2].values())
    self.used += size - self.sizes[record]
    self.sizes[record] = size
    if self.used > self.budget:
      del self.entries[record]
      self.used -= self.sizes.pop(record)


@dataclasses.dataclass(frozen=True)
class BatchMaker:
  """Fills this process's rows of the global batch at a step; picklable for worker processes."""
  source: Source
  sampler: Sampler
  image_size: decode.Size  # (height, width)
  augment: str
  one_pass: bool     # one pass in order: a padded last batch and a "valid" mask
  labeled: bool
  normalize: bool
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  eval_crop_pct: float
  random_flip: bool = True  # horizontal flip with probability 1/2 in the "mae" augmentation
  decoded_cache_bytes: int = 0  # DecodedCache budget per process (0: no cache)
  channels: int = 3
  mean: tuple[float, ...] = decode.IMAGENET_MEAN  # per channel, for normalize
  std: tuple[float, ...] = decode.IMAGENET_STD
  pixel_dtype: str = "uint8"  # what the files decode to: uint8, or float32 for other arrays
  _cache: DecodedCache = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, "_cache", DecodedCache(self.decoded_cache_bytes))

  def __getstate__(self):
    # A worker process starts with an empty cache of its own.
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_cache"}

  def __setstate__(self, state):
    for k, v in state.items():
      object.__setattr__(self, k, v)
    self.__post_init__()

  def spec(self) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of each array of a batch."""
    rows = self.sampler.global_batch // self.sampler.process_count
    shape = (rows, *self.image_size, self.channels)
    spec = {"image": (shape, np.float32 if self.normalize else np.dtype(self.pixel_dtype))}
    if self.labeled:
      spec["label"] = ((rows,), np.int32)
    if self.one_pass:
      spec["valid"] = ((rows,), np.bool_)
    return spec

  def nbytes(self) -> int:
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in self.spec().values())

  def arrays(self, buffer: Any = None) -> dict[str, np.ndarray]:
    """Arrays of one batch: new ones, or views packed into `buffer` (shared memory)."""
    if buffer is None:
      return {k: np.empty(shape, dtype) for k, (shape, dtype) in self.spec().items()}
    out, offset = {}, 0
    for k, (shape, dtype) in self.spec().items():
      out[k] = np.ndarray(shape, dtype, buffer=buffer, offset=offset)
      offset += out[k].nbytes
    return out

  def fill(self, step: int, out: dict[str, np.ndarray]) -> None:
    """Writes the batch of global step `step` (this process's rows) into `out`."""
    rows = len(out["image"])
    for row in range(rows):
      image, label, valid = self._example(step * rows + row)
      if self.normalize:
        decode.normalize(image, out["image"][row], self.mean, self.std)
      else:
        out["image"][row] = image
      if self.labeled:
        out["label"][row] = label
      if self.one_pass:
        out["valid"][row] = valid

  def _example(self, k: int) -> tuple[np.ndarray, int, bool]:
    """(uint8 image, label, valid) of this process's k-th example."""
    position = self.sampler.position(k)
    n = self.sampler.num_records
    if self.one_pass and position >= n:  # padding of the last batch
      return self._blank(), 0, False
    epoch, index = self.sampler.record(position)
    rng = np.random.default_rng([1, self.sampler.seed, epoch, index])
    # In one pass a bad file becomes an invalid row; in training the next record stands in.
    for attempt in range(1 if self.one_pass else MAX_SUBSTITUTES):
      record = (index + attempt) % n
      image, label = self._image(record, rng)
      if image is not None:
        return image, max(label, 0), True
    if self.one_pass:
      return self._blank(), 0, False
    raise RuntimeError(f"Input: {MAX_SUBSTITUTES} records in a row from "
                       f"{self.source.describe(index)} on are unreadable; the data is broken.")

  def _blank(self) -> np.ndarray:
    return np.zeros((*self.image_size, self.channels), self.pixel_dtype)

  def _image(self, record: int, rng: np.random.Generator) -> tuple[np.ndarray | None, int]:
    where = self.source.describe(record)
    try:
      data, label, decoded = self._cache.read(self.source, record)
      box = None  # the evaluation crop
      if self.augment == "mae":
        box = lambda w, h: decode.random_resized_crop_box(rng, w, h, self.crop_scale,
                                                          self.crop_ratio)
      image = decode.decode_and_crop(data, self.image_size, box, crop_pct=self.eval_crop_pct,
                                     where=where, channels=self.channels, decoded=decoded)
    except decode.DECODE_ERRORS as e:
      file_issues.note_skipped(where, e)
      return None, -1
    finally:
      self._cache.settle(record)
    if image.dtype != self.pixel_dtype:
      raise decode.DatasetMismatch(
          f"{where} decodes to {image.dtype} values where the dataset's first file gave "
          f"{self.pixel_dtype}: normalization needs one kind of value per dataset (uint8 "
          f"pictures and 8-bit arrays, or other arrays only); convert the files to one type")
    if self.augment == "mae" and self.random_flip and rng.random() < 0.5:
      image = np.ascontiguousarray(image[:, ::-1])
    return image, label
