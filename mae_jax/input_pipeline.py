"""Input pipeline for pretraining, fine-tuning and linear probing: deterministic by step.

The data is an endless stream of global positions g = 0, 1, 2, ...: position g reads record
perm_e[g % N] of epoch e = g // N, where perm_e is a permutation of the N records drawn from
(seed, e), and that example's crop and flip are drawn from (seed, e, record). The global batch
at step s is positions s*B .. s*B + B - 1, so it is a pure function of (dataset, seed, s):
process p of P builds only its rows p*B/P .. (p+1)*B/P - 1, a resumed run needs only the step,
and 1 process or 8 see the same batches. That needs random access to records: TFDS datasets
are read through `tfds.data_source` (ArrayRecord files), image folders through a file list.

Worker processes (spawned; `input.num_workers`, default one per core) each fill whole batches
in shared memory that is reused, normalized in place; step j goes to worker j % W, so the
order never depends on timing. Images are decoded straight into the crop: the crop box is
chosen from the image header; JPEGs are decoded by OpenCV's libjpeg-turbo (PIL's pixels
exactly, with fewer copies), at 1/2, 1/4 or 1/8 scale in the DCT domain when the box is at
least twice the output size; other formats and modes go through PIL. OpenCV's SIMD bicubic
resize maps the box to the output, after a Gaussian prefilter when it shrinks, which keeps it
within about one grey level of PIL's antialiased bicubic (the official resize, 5x slower).
TensorFlow is imported only here and in mae_jax/datasets/, and only for TFDS datasets; JAX
only by `to_global` and when process_index/process_count are not given.
"""

import collections
import contextlib
import dataclasses
import fcntl
import functools
import io
import itertools
import math
import multiprocessing
from multiprocessing import shared_memory
import os
import queue
import signal
import struct
import threading
import traceback
from typing import Any, Callable, Iterator, NoReturn
import zlib

from absl import logging
import cv2
import ml_collections
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("mae", "eval")
# Built by mae_jax/datasets from files that pip installs (scikit-image, scikit-learn).
SHIPPED = ("skimage_photos", "sklearn_digits")
FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = frozenset((".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm"))
# What PIL raises on files that are not images, or are corrupt, truncated or absurdly large.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                 Image.DecompressionBombError, cv2.error)
SKIPPED = "unreadable file skipped"
# A training example whose file is bad is replaced by the next record; this many bad records in
# a row means the data is broken, not a few files.
MAX_SUBSTITUTES = 16
IMAGENET_URL = "https://image-net.org/challenges/LSVRC/2012/2012-downloads.php"

# One core per worker process: the pipeline's parallelism is its workers.
cv2.setNumThreads(1)

Box = tuple[float, float, float, float]  # left, top, width, height in pixels of the source image


# ---------------------------------------------------------------------------------------------
# Crops, decoding and normalization of single images.

def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float], ratio: tuple[float, float]) -> Box:
  """torchvision's RandomResizedCrop box: area fraction in `scale`, log-uniform aspect ratio."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  # After 10 misses (extreme aspect ratios): the largest centred box within `ratio`.
  aspect = width / height
  if aspect < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif aspect > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, crop_pct: float) -> Box:
  """Resize-shorter-side-to-size/crop_pct then center-crop-size, as one box of the source."""
  side = min(width, height) * crop_pct
  return (width - side) / 2, (height - side) / 2, side, side


# Gaussian prefilter strength that brings OpenCV's bicubic within about one grey level of
# PIL's antialiased bicubic (the official resize) at 1.25-4x shrink; none makes it 1.5-5.
AA_SIGMA = 0.4
# imdecode flags for decoding at 1/scale (OR-ed with IMREAD_COLOR they decode colour).
_DCT_FLAGS = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
              8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def _dct_scale(box: Box, size: int) -> int:
  """The largest JPEG DCT scale (1, 2, 4, 8) that keeps the box at least `size` pixels."""
  fit = min(box[2], box[3]) / size
  return next(s for s in (8, 4, 2, 1) if s <= fit or s == 1)


def _to_rgb(image: Image.Image, where: str) -> Image.Image:
  """Loads the pixels and converts any mode to 8-bit RGB, counting the conversions in the log."""
  image.load()
  mode = image.mode
  if mode == "RGB":
    return image
  if mode.startswith("I;16"):
    # 16-bit grayscale: keep the top 8 bits (PIL's convert would clip at 255).
    _note("16-bit grayscale image converted to RGB", where)
    grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
    _note("image with alpha: alpha dropped", where)
  elif mode == "CMYK":
    _note("CMYK image converted to RGB", where)
  elif mode in ("L", "1", "I", "F"):
    _note("grayscale image converted to RGB", where)
  return image.convert("RGB")


def decode_and_crop(data: bytes, size: int, choose_box: Callable[[int, int], Box],
                    where: str = "", decoded: dict[int, np.ndarray] | None = None) -> np.ndarray:
  """Encoded image -> uint8 RGB [size, size, 3]: the box `choose_box(width, height)` resized.

  `decoded`, when given, caches this one image's decoded pixels ({JPEG DCT scale: pixels}): read
  before decoding and added to after, so a cached image gives the same output as a fresh decode.
  Raises one of DECODE_ERRORS for data that is not a readable image.
  """
  image = Image.open(io.BytesIO(data))  # parses the header only
  width, height = image.size
  box = choose_box(width, height)
  jpeg = image.format == "JPEG" and image.mode in ("RGB", "L")
  scale = _dct_scale(box, size) if jpeg else 1
  pixels = None if decoded is None else decoded.get(scale)
  if pixels is None:
    if jpeg:
      if image.mode == "L":
        _note("grayscale image converted to RGB", where)
      # OpenCV's libjpeg-turbo gives PIL's pixels without PIL's copies, at 1/2, 1/4 or 1/8
      # scale in the DCT domain when the box allows; EXIF orientation is ignored, as PIL does.
      # BGR (IMREAD_COLOR_RGB needs OpenCV >= 4.11): swapped after the resize, on fewer pixels.
      flags = _DCT_FLAGS[scale] | cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
      pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
      if pixels is None:
        raise OSError("corrupt or truncated JPEG")
    else:
      pixels = np.asarray(_to_rgb(image, where))
    if decoded is not None:
      decoded[scale] = pixels
  sx, sy = width / pixels.shape[1], height / pixels.shape[0]
  left, top, w, h = box
  out = _resize(pixels, (left / sx, top / sy, w / sx, h / sy), size)
  return cv2.cvtColor(out, cv2.COLOR_BGR2RGB) if jpeg else out


def _resize(pixels: np.ndarray, box: Box, size: int) -> np.ndarray:
  """The box of uint8 [H, W, 3] pixels, to the nearest pixel, resized to [size, size, 3].

  Bicubic, antialiased like PIL's when shrinking: a Gaussian prefilter of standard deviation
  AA_SIGMA * sqrt(shrink^2 - 1) per axis, over the box and a margin of real neighbours.
  """
  height, width = pixels.shape[:2]
  left, top, w, h = box
  x0, y0 = min(int(round(left)), width - 1), min(int(round(top)), height - 1)
  x1 = min(max(int(round(left + w)), x0 + 1), width)
  y1 = min(max(int(round(top + h)), y0 + 1), height)
  sigma_x, sigma_y = (AA_SIGMA * math.sqrt(max(n * n / (size * size) - 1, 0))
                      for n in (x1 - x0, y1 - y0))
  if sigma_x or sigma_y:
    mx, my = math.ceil(3 * sigma_x), math.ceil(3 * sigma_y)
    ax, ay = max(x0 - mx, 0), max(y0 - my, 0)
    region = pixels[ay:min(y1 + my, height), ax:min(x1 + mx, width)]
    ksize = (2 * mx + 1, 2 * my + 1)
    # A zero sigma would mean "same as the other axis" to OpenCV; 1e-6 with a 1-tap kernel is none.
    region = cv2.GaussianBlur(region, ksize, sigmaX=sigma_x or 1e-6, sigmaY=sigma_y or 1e-6,
                              borderType=cv2.BORDER_REPLICATE)
    pixels, x0, x1, y0, y1 = region, x0 - ax, x1 - ax, y0 - ay, y1 - ay
  return cv2.resize(pixels[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_CUBIC)


@functools.lru_cache(maxsize=8)
def _normalizer(row: int) -> tuple[np.ndarray, np.ndarray]:
  """x * scale + offset over one image row of `row` // 3 RGB pixels (long rows: fast numpy)."""
  std = np.asarray(IMAGENET_STD, np.float32)
  scale = 1.0 / (255.0 * std)
  offset = -np.asarray(IMAGENET_MEAN, np.float32) / std
  return np.tile(scale, row // 3), np.tile(offset, row // 3)


def normalize(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [..., H, W, 3] -> float32 (x / 255 - ImageNet mean) / ImageNet std (into `out`)."""
  row = images.shape[-2] * images.shape[-1]
  scale, offset = _normalizer(row)
  if out is None:
    out = np.empty(images.shape, np.float32)
  flat = out.reshape(-1, row)
  np.multiply(images.reshape(-1, row), scale, out=flat)
  flat += offset
  return out


# ---------------------------------------------------------------------------------------------
# Bad-file accounting. Conversions are logged the 1st, 2nd, 4th, 8th, ... time in each process
# (ImageNet holds many grayscale JPEGs); every unreadable file is logged once.

_counts: dict[str, int] = {}
_skipped: set[str] = set()
_counts_lock = threading.Lock()


def _note(kind: str, where: str) -> None:
  with _counts_lock:
    count = _counts[kind] = _counts.get(kind, 0) + 1
  if count & (count - 1) == 0:
    logging.warning("Input: %s (%d so far in process %d): %s", kind, count, os.getpid(), where)


def _note_skipped(where: str, error: Exception) -> None:
  with _counts_lock:
    if where in _skipped:
      return
    _skipped.add(where)
    count = _counts[SKIPPED] = len(_skipped)
  logging.warning("Input: %s (%d distinct so far in process %d): %s (%s: %s)", SKIPPED, count,
                  os.getpid(), where, type(error).__name__, " ".join(str(error).split())[:120])


def file_issue_counts() -> dict[str, int]:
  """Conversions of each kind and distinct unreadable files, so far in this process."""
  with _counts_lock:
    return dict(_counts)


# ---------------------------------------------------------------------------------------------
# Sources: random access to (encoded image, label) records.

class FolderSource:
  """Image files under a folder: one subfolder per class (labels in sorted order), or flat."""

  def __init__(self, root: str):
    self.root = root
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
    paths, labels, ignored = [], [], []
    if classes:
      ignored += [e.name for e in os.scandir(root) if e.is_file()]
      for label, name in enumerate(classes):
        for path in _image_files(os.path.join(root, name), ignored):
          paths.append(os.path.relpath(path, root))
          labels.append(label)
    else:
      paths = [os.path.relpath(p, root) for p in _image_files(root, ignored, recursive=False)]
    if ignored:
      logging.warning("Input: ignored %d files under %s that are not images by their name "
                      "(e.g. %s).", len(ignored), root, ignored[0])
    # Bytes in one numpy array: cheap to send to worker processes even for millions of files.
    self._paths = np.array([os.fsencode(p) for p in paths], dtype=bytes)
    self._labels = np.asarray(labels, np.int32) if classes else None
    self.classes = classes
    self.num_classes = len(classes) if classes else None

  def __len__(self) -> int:
    return len(self._paths)

  def read(self, index: int) -> tuple[bytes, int]:
    """(file contents, label or -1); OSError if the file cannot be read."""
    with open(os.path.join(os.fsencode(self.root), self._paths[index]), "rb") as f:
      data = f.read()
    return data, (-1 if self._labels is None else int(self._labels[index]))

  def describe(self, index: int) -> str:
    return os.path.join(self.root, os.fsdecode(self._paths[index]))


def _image_files(folder: str, ignored: list[str], recursive: bool = True) -> list[str]:
  """Sorted image paths under `folder`; other files are appended to `ignored`."""
  found = []
  for parent, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if d[0] != ".") if recursive else []
    for name in sorted(files):
      if name[0] == ".":
        continue
      path = os.path.join(parent, name)
      (found if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS else ignored).append(path)
  return found


class TfdsSource:
  """A split of a TFDS image dataset prepared as ArrayRecord, read without decoding images."""

  def __init__(self, builder: Any, data: Any, split: str):
    tfds = _tfds()
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
      raise ValueError(f"input.dataset={builder.name!r} has no 'image' feature (it has "
                       f"{sorted(features.keys())}); use an image dataset.")
    label = features["label"] if "label" in features else None
    self.num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else None
    self.name = f"{builder.name}[{split}]"
    self._data = data

  def __len__(self) -> int:
    return len(self._data)

  def read(self, index: int) -> tuple[bytes, int]:
    """(encoded image, label or -1)."""
    example = self._data[index]
    return example["image"], (-1 if self.num_classes is None else int(example["label"]))

  def describe(self, index: int) -> str:
    return f"{self.name} record {index}"


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


@functools.lru_cache(maxsize=16)
def _folder_source(root: str) -> FolderSource:
  return FolderSource(root)


def _open_folder(path: str, split: str) -> FolderSource:
  if not os.path.isdir(path):
    raise ValueError(f"input.dataset='folder:{path}': no such folder. Point it at a folder of "
                     "images, one subfolder per class (or flat, unlabeled).")
  root = os.path.join(path, split)
  if not os.path.isdir(root):
    if split != "train":
      raise ValueError(f"input.dataset='folder:{path}' has no subfolder {split!r} for split "
                       f"{split!r}; create it or set input.eval_split / input.split to one "
                       "that exists.")
    root = path  # A folder without split subfolders is all training data.
  source = _folder_source(os.path.abspath(root))
  if not len(source):
    raise ValueError(f"input.dataset='folder:{path}': no image files under {root} (looked for "
                     f"{', '.join(sorted(IMAGE_EXTENSIONS))}).")
  return source


def _prepare_command(name: str, data_dir: str, manual_dir: str | None) -> str:
  manual = f" --manual_dir={manual_dir or '<input.manual_dir>'}" if manual_dir is not None or (
      name == "imagenet2012") else ""
  return f"tfds build {name}{manual} --data_dir={data_dir} --file_format=array_record"


def _unprepared_message(builder: Any, data_dir: str, manual_dir: str | None) -> str:
  name = builder.name
  command = _prepare_command(name, data_dir, manual_dir)
  if name == "imagenet2012":
    where = manual_dir or "a folder of your choice, then set input.manual_dir to it"
    return (f"input.dataset='imagenet2012' is not prepared in {data_dir} (input.data_dir). "
            f"Download ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB) "
            f"from {IMAGENET_URL} (free account) into {where}, then prepare it once "
            f"(a few hours, about 150 GB):\n  {command}")
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  manual = (f" It needs a manual download into input.manual_dir: {instructions.strip()}"
            if instructions else "")
  return (f"input.dataset={name!r} is not prepared in {data_dir} (input.data_dir).{manual} "
          f"Prepare it once with:\n  {command}")


def _tfds_builder(name: str, data_dir: str | None) -> Any:
  """The TFDS builder of `name`; the shipped datasets are built on first use."""
  tfds = _tfds()
  if name in SHIPPED:
    import mae_jax.datasets  # pylint: disable=g-import-not-at-top,unused-import  # registers them
    return _build_shipped(tfds, name, data_dir)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"input.dataset={name!r} is not a TFDS dataset, one of {SHIPPED}, or "
                     f"'{FOLDER_PREFIX}/path/to/images'.") from e


def _open_tfds(name: str, split: str, data_dir: str | None, manual_dir: str | None
               ) -> TfdsSource:
  """A TFDS split for random access; ValueError with the fix when it is not ready."""
  tfds = _tfds()
  builder = _tfds_builder(name, data_dir)
  try:
    data = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  except (NotImplementedError, ValueError, AssertionError) as e:
    if not builder.is_prepared():
      raise ValueError(_unprepared_message(builder, os.fspath(builder.data_dir_root),
                                           manual_dir)) from e
    formats = sorted(f.value for f in builder.info.available_file_formats())
    if "array_record" not in formats:
      raise ValueError(
          f"input.dataset={name!r} is prepared in {builder.data_dir} as {formats}, but the "
          "input pipeline needs random access (ArrayRecord). Convert it once with:\n  tfds "
          f"convert_format --dataset_version_dir={builder.data_dir} "
          "--out_file_format=array_record") from e
    raise ValueError(f"input.dataset={name!r}: split {split!r} ({e}); set input.split / "
                     f"input.eval_split to one of {sorted(builder.info.splits)}.") from e
  return TfdsSource(builder, data, split)


def _build_shipped(tfds: Any, name: str, data_dir: str | None) -> Any:
  """Builds a shipped dataset into data_dir once, holding a file lock against other processes."""
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  root = os.fspath(builder.data_dir_root)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f".{name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      logging.info("Input: building %s into %s (first use; seconds).", name, root)
      tfds.disable_progress_bar()
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False))
  return builder


def _default_eval_split(input_config: ml_collections.ConfigDict) -> str:
  """input.eval_split, else the dataset's held-out split: validation, val or test."""
  if input_config.get("eval_split"):
    return input_config.eval_split
  dataset = input_config.dataset
  if dataset.startswith(FOLDER_PREFIX):
    path = dataset[len(FOLDER_PREFIX):]
    splits = [s for s in ("validation", "val", "test") if os.path.isdir(os.path.join(path, s))]
  else:
    builder = _tfds_builder(dataset, input_config.data_dir)
    splits = [s for s in ("validation", "test") if s in builder.info.splits]
  if not splits:
    raise ValueError(f"input.dataset={dataset!r} has no validation or test split; set "
                     "input.eval_split.")
  return splits[0]


def open_source(input_config: ml_collections.ConfigDict, split: str | None = None) -> Any:
  """The records of one split (default input.split): `len`, `read(i)`, `num_classes`."""
  dataset = input_config.dataset
  split = split or input_config.split
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f"input.dataset={dataset!r}: give a TFDS name ('imagenet2012'), one of "
                     f"{SHIPPED}, or '{FOLDER_PREFIX}/path/to/images'.")
  if dataset.startswith(FOLDER_PREFIX):
    return _open_folder(dataset[len(FOLDER_PREFIX):], split)
  return _open_tfds(dataset, split, input_config.data_dir, input_config.manual_dir)


# ---------------------------------------------------------------------------------------------
# The global sampler and the per-example work, both picklable for Grain's worker processes.

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

  def read(self, source: Any, record: int) -> tuple[bytes, int, dict[int, np.ndarray] | None]:
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
  source: Any
  sampler: Sampler
  image_size: int
  augment: str
  one_pass: bool     # one pass in order: a padded last batch and a "valid" mask
  labeled: bool
  normalize: bool
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  eval_crop_pct: float
  random_flip: bool = True  # horizontal flip with probability 1/2 in the "mae" augmentation
  decoded_cache_bytes: int = 0  # DecodedCache budget per process (0: no cache)
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
    size = self.image_size
    spec = {"image": ((rows, size, size, 3), np.float32 if self.normalize else np.uint8)}
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
        normalize(image, out=out["image"][row])
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
    return np.zeros((self.image_size, self.image_size, 3), np.uint8)

  def _image(self, record: int, rng: np.random.Generator) -> tuple[np.ndarray | None, int]:
    where = self.source.describe(record)
    try:
      data, label, decoded = self._cache.read(self.source, record)
      if self.augment == "mae":
        box = lambda w, h: random_resized_crop_box(rng, w, h, self.crop_scale, self.crop_ratio)
      else:
        box = lambda w, h: center_crop_box(w, h, self.eval_crop_pct)
      image = decode_and_crop(data, self.image_size, box, where, decoded)
    except DECODE_ERRORS as e:
      _note_skipped(where, e)
      return None, -1
    finally:
      self._cache.settle(record)
    if self.augment == "mae" and self.random_flip and rng.random() < 0.5:
      image = cv2.flip(image, 1)
    return image, label


# ---------------------------------------------------------------------------------------------
# Running a BatchMaker: in a thread of this process, or in worker processes.

_END = object()


def _thread_batches(maker: BatchMaker, steps: Iterator[int], prefetch: int
                    ) -> Iterator[dict[str, np.ndarray]]:
  """Batches made in this process, by a thread working `prefetch` batches ahead."""
  # OpenCV, PIL and numpy release the GIL: the thread overlaps with training.
  if not prefetch:
    for step in steps:
      batch = maker.arrays()
      maker.fill(step, batch)
      yield batch
    return
  ready: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def offer(item: Any) -> bool:
    """Puts `item` unless the consumer has stopped; False then."""
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for step in steps:
        batch = maker.arrays()
        maker.fill(step, batch)
        if not offer(batch):
          return
      offer(_END)
    except BaseException as e:  # pylint: disable=broad-except  # re-raised by the consumer
      offer(e)

  thread = threading.Thread(target=produce, name="mae_jax-input", daemon=True)
  thread.start()
  try:
    while (item := ready.get()) is not _END:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


def _worker_main(maker: BatchMaker, conn: Any, slot_names: list[str]) -> None:
  """A worker process: fills the batch of each (step, slot) it receives into shared memory."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
  slots = [shared_memory.SharedMemory(name=name) for name in slot_names]
  views = [maker.arrays(slot.buf) for slot in slots]
  while True:
    try:
      message = conn.recv()
    except EOFError:  # the main process went away
      break
    if message is None:
      break
    step, slot = message
    try:
      maker.fill(step, views[slot])
      conn.send(None)
    except Exception:  # pylint: disable=broad-except  # re-raised in the main process
      conn.send(traceback.format_exc())
  del views
  for slot in slots:
    slot.close()


class _WorkerPool:
  """Worker processes that fill batches in reused shared memory; batches come out in order.

  Step j goes to worker j % W, so the output does not depend on timing; each worker keeps
  `depth` batches in flight.
  """

  def __init__(self, maker: BatchMaker, steps: Iterator[int], workers: int, depth: int):
    context = multiprocessing.get_context("spawn")  # fork is unsafe with JAX's threads
    self._steps = steps
    self._depth = depth
    self._slots = [shared_memory.SharedMemory(create=True, size=maker.nbytes())
                   for _ in range(workers * depth)]
    self._views = [maker.arrays(slot.buf) for slot in self._slots]
    self._conns, self._processes = [], []
    for w in range(workers):
      conn, child = context.Pipe()
      names = [slot.name for slot in self._slots[w * depth:(w + 1) * depth]]
      process = context.Process(target=_worker_main, args=(maker, child, names),
                                name=f"mae_jax-input-{w}", daemon=True)
      process.start()
      child.close()
      self._conns.append(conn)
      self._processes.append(process)
    self._pending = collections.deque()  # (worker, slot) per batch in flight, in step order
    for j in range(workers * depth):
      if not self._submit(j % workers, j // workers):
        break

  def _submit(self, worker: int, slot: int) -> bool:
    step = next(self._steps, None)
    if step is None:
      return False
    try:
      self._conns[worker].send((step, slot))
    except OSError:
      self._died(worker)
    self._pending.append((worker, slot))
    return True

  def _died(self, worker: int) -> NoReturn:
    process = self._processes[worker]
    process.join(timeout=1)
    raise RuntimeError(f"Input worker {worker} died (exit code {process.exitcode}); see its "
                       "log above. Out of memory? Lower input.num_workers.") from None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._pending:
      raise StopIteration
    worker, slot = self._pending.popleft()
    try:
      error = self._conns[worker].recv()
    except (EOFError, OSError):  # the pipe closed or was reset: the worker is gone
      self._died(worker)
    if error is not None:
      raise RuntimeError(f"Input worker {worker} failed:\n{error}")
    # A copy: the slot is refilled at once, and callers may keep batches (JAX may alias them).
    batch = {k: v.copy() for k, v in self._views[worker * self._depth + slot].items()}
    self._submit(worker, slot)
    return batch

  def close(self) -> None:
    for conn in self._conns:
      with contextlib.suppress(OSError):  # a worker that is gone already needs no message
        conn.send(None)
    for process in self._processes:
      process.join(timeout=5)
      if process.is_alive():
        process.terminate()
        process.join()
    for conn in self._conns:
      conn.close()
    self._views.clear()
    for slot in self._slots:
      slot.close()
      slot.unlink()
    self._slots.clear()


# ---------------------------------------------------------------------------------------------
# Public entry points.

def _num_workers(requested: int) -> int:
  return len(os.sched_getaffinity(0)) if requested < 0 else requested


def validate(input_config: ml_collections.ConfigDict) -> None:
  """Checks input_config and that its dataset is ready (building the shipped ones).

  Raises ValueError that names the config field and says how to fix it.
  """
  c = input_config
  if not isinstance(c.batch_size, int) or c.batch_size <= 0:
    raise ValueError(f"input.batch_size={c.batch_size!r} must be a positive integer (global).")
  lo, hi = c.crop_scale
  if not 0 < lo <= hi <= 1:
    raise ValueError(f"input.crop_scale={tuple(c.crop_scale)} must satisfy 0 < lo <= hi <= 1.")
  lo, hi = c.crop_ratio
  if not 0 < lo <= hi:
    raise ValueError(f"input.crop_ratio={tuple(c.crop_ratio)} must satisfy 0 < lo <= hi.")
  if c.num_workers < -1:
    raise ValueError(f"input.num_workers={c.num_workers}: use -1 (one per core), 0 (decode "
                     "in this process) or a count.")
  if c.prefetch < 0:
    raise ValueError(f"input.prefetch={c.prefetch} must be >= 0.")
  if not isinstance(c.get("decoded_cache_mb", 0), int) or c.get("decoded_cache_mb", 0) < 0:
    raise ValueError(f"input.decoded_cache_mb={c.decoded_cache_mb!r} must be an integer >= 0 "
                     "(0: no cache).")
  if not 0 < c.get("eval_crop_pct", 0.875) <= 1:
    raise ValueError(f"input.eval_crop_pct={c.eval_crop_pct} must be in (0, 1].")
  open_source(c)


def num_examples(input_config: ml_collections.ConfigDict, split: str | None = None) -> int:
  """Records in `split` (default input.split)."""
  return len(open_source(input_config, split))


def num_classes(input_config: ml_collections.ConfigDict) -> int | None:
  """Number of classes of the dataset's labels, or None when it has none."""
  return open_source(input_config).num_classes


def create_iterator(input_config: ml_collections.ConfigDict, *, image_size: int, seed: int,
                    train: bool, start_step: int = 0, process_index: int | None = None,
                    process_count: int | None = None, augment: str | None = None,
                    normalize: bool = True, split: str | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of each global batch, from step `start_step` on.

  Yields {"image": float32 [B / P, S, S, 3] ImageNet-normalized (uint8 with normalize=False),
  "label": int32 [B / P] when the dataset has labels}. train=True: endless, shuffled per epoch;
  train=False: one pass over the split in order, the last batch padded, with "valid": bool.
  augment: "mae" (RandomResizedCrop input.crop_scale/crop_ratio + flip unless
  input.random_flip is False; default for train) or
  "eval" (resize + center crop input.eval_crop_pct; default otherwise). split: default
  input.split for train, input.eval_split (or the dataset's held-out split) otherwise.
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
  split = split or (c.split if train else _default_eval_split(c))
  source = open_source(c, split)
  n = len(source)
  maker = BatchMaker(
      source, Sampler(n, c.batch_size, process_index, process_count, seed, shuffle=train),
      image_size, augment, one_pass=not train, labeled=source.num_classes is not None,
      normalize=normalize, crop_scale=tuple(c.crop_scale), crop_ratio=tuple(c.crop_ratio),
      eval_crop_pct=c.get("eval_crop_pct", 0.875), random_flip=c.get("random_flip", True),
      decoded_cache_bytes=c.get("decoded_cache_mb", 0) << 20)
  steps = itertools.count(start_step) if train else iter(range(start_step,
                                                               -(-n // c.batch_size)))
  workers = _num_workers(c.num_workers)
  if not workers:
    return _thread_batches(maker, steps, c.prefetch)
  return _pooled(_WorkerPool(maker, steps, workers, depth=max(1, -(-c.prefetch // workers))))


def _pooled(pool: _WorkerPool) -> Iterator[dict[str, np.ndarray]]:
  # Stops the worker processes as soon as the caller closes or drops the iterator.
  try:
    yield from pool
  finally:
    pool.close()


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
