"""Sources: random access to a dataset split's (encoded image, label) records.

TFDS datasets are read through `tfds.data_source` (ArrayRecord files), image folders through a
file list. TensorFlow is imported only here (and in mae_jax/datasets/), and only for TFDS
datasets.
"""

import fcntl
import functools
import os
from typing import Any, Protocol

from absl import logging
import ml_collections
import numpy as np

# Built by mae_jax/datasets from files that pip installs (scikit-image, scikit-learn).
SHIPPED = ("skimage_photos", "sklearn_digits")
FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = frozenset((".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".npy"))  # .npy, .tif: bands (decode)
IMAGENET_URL = "https://image-net.org/challenges/LSVRC/2012/2012-downloads.php"


class Source(Protocol):
  """The records of one dataset split, by index; picklable (worker processes read it too)."""
  num_classes: int | None  # of the labels; None for an unlabeled dataset

  def __len__(self) -> int:
    ...

  def read(self, index: int) -> tuple[bytes, int]:
    """(encoded image, label or -1 when unlabeled); OSError when the record cannot be read."""
    ...

  def describe(self, index: int) -> str:
    """Where the record is, for messages (a path, or dataset[split] record i)."""
    ...


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


def default_eval_split(input_config: ml_collections.ConfigDict) -> str:
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


def open_source(input_config: ml_collections.ConfigDict, split: str | None = None) -> Source:
  """The records of one split (default input.split); ValueError with the fix when the dataset
  is missing, unprepared or has no such split."""
  dataset = input_config.dataset
  split = split or input_config.split
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f"input.dataset={dataset!r}: give a TFDS name ('imagenet2012'), one of "
                     f"{SHIPPED}, or '{FOLDER_PREFIX}/path/to/images'.")
  if dataset.startswith(FOLDER_PREFIX):
    return _open_folder(dataset[len(FOLDER_PREFIX):], split)
  return _open_tfds(dataset, split, input_config.data_dir, input_config.manual_dir)
