"""Decoding and cropping single files of any channel count and size, as the official transforms
crop them, and normalization (no TensorFlow, no JAX).

Files are read as [h, w, C] arrays: PNG, JPEG and the other PIL formats as RGB (C = 3) or
grayscale (C = 1), `.npy` and `.tif`/`.tiff` files as the H x W x C bands they store (a 2-D
array is one band), integer or float. Values keep their type: uint8 stays uint8 (normalization
divides it by 255, as torchvision's ToTensor does), other types become float32 as they are, so
`input.mean` / `input.std` are in the file's own units for those.

The crops follow the official code (main_pretrain.py / main_finetune.py, torchvision on PIL
images) at any source size and aspect:
- training, RandomResizedCrop: a box of whole source pixels, cropped, then resized to the
  output size with PIL's antialiased bicubic (`crop_and_resize`);
- evaluation, Resize(int(size / crop_pct)) + CenterCrop(size): the whole image resized (PIL
  bicubic) so that it covers (int(H / crop_pct), int(W / crop_pct)) with its aspect kept - for
  a square size that is torchvision's shorter side to int(size / crop_pct), the longer side
  rounded down - then the centre (H, W) cut out at torchvision's offsets (`eval_resize_and_crop`).
Each band of other data is resized as PIL resizes a one-band (L or F) image.
"""


import functools
import io
import math
import struct
from typing import Callable
import zlib

import cv2
import numpy as np
from PIL import Image

from mae_jax.config_lib import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.input_pipeline import file_issues

# What PIL raises on files that are not images, or are corrupt, truncated or absurdly large.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                 Image.DecompressionBombError, cv2.error)

# One core per worker process: the pipeline's parallelism is its workers.
cv2.setNumThreads(1)

Box = tuple[float, float, float, float]  # left, top, width, height in pixels of the source image
# Files read as arrays of bands rather than as pictures.
ARRAY_EXTENSIONS = frozenset((".npy", ".tif", ".tiff"))
Size = tuple[int, int]  # (height, width) in pixels
# A training crop of a JPEG is decoded at 1/k scale in the DCT domain (k = 4 or 8: much less
# work) only when its box spans at least DCT_MARGIN * k output pixels per axis: then it stays
# within a grey level of the full decode's crop on average (0.2-0.7 measured: README, "Data").
# 1/2 scale is not used: its 4x4 inverse DCT drifts further (up to 1.6 grey levels).
DCT_MARGIN = 3
_DCT_COLOR = {1: cv2.IMREAD_COLOR, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_DCT_GREY = {1: cv2.IMREAD_GRAYSCALE, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
             8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
_GREY_MODES = ("L", "LA", "1", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")


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


class DatasetMismatch(Exception):
  """A file that does not fit the model or the rest of the dataset: a channel count other than
  config.model.in_chans, or another type of values than the dataset's first file.

  Not a decode error: an unreadable file is skipped, but this stops the run, since the data or
  the config is wrong (a folder mixing channel counts, bands stored first, ...).
  """


def size_hw(size) -> Size:
  """(height, width) of a size given as an int (a square) or an (H, W) pair."""
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  height, width = size
  return int(height), int(width)


def is_array_file(name: str) -> bool:
  """Whether a file (by its name) is read as an array of bands."""
  return name.lower().endswith(tuple(ARRAY_EXTENSIONS))


def decode_array(data: bytes, where: str) -> np.ndarray:
  """`.npy` or TIFF bytes -> [h, w, C] as stored (a 2-D array is one band).

  Raises ValueError (a decode error: the file is skipped) for arrays of other ranks or of
  non-numeric types.
  """
  if data[:6] == b"\x93NUMPY":
    array = np.load(io.BytesIO(data), allow_pickle=False)
  else:
    import tifffile  # pylint: disable=g-import-not-at-top  # only for TIFF data
    array = tifffile.imread(io.BytesIO(data))
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.dtype.kind not in "uif" or min(array.shape[:2]) < 1:
    raise ValueError(f"an array of shape {array.shape} and type {array.dtype}: expected H x W "
                     f"or H x W x C numbers")
  return array if array.dtype == np.uint8 else array.astype(np.float32)


def check_channels(pixels: np.ndarray, channels: int, where: str) -> np.ndarray:
  """`pixels` [h, w, C], or DatasetMismatch naming the file when C is not `channels`."""
  c = pixels.shape[-1]
  if c != channels:
    fix = (f"stored bands first, as {pixels.shape[0]} x ...? write it as H x W x C"
           if pixels.shape[0] == channels else
           f"set --config.model.in_chans={c}, with {c} values in input.mean and input.std, if "
           f"the data has {c}; else give this file {channels}")
    raise DatasetMismatch(
        f"{where} has {c} channel{'s' * (c != 1)}, but config.model.in_chans={channels}: "
        f"every file of a dataset needs the model's channel count; {fix}")
  return pixels


def resize(pixels: np.ndarray, height: int, width: int,
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """[h, w, C] -> [height, width, C] with PIL's antialiased bicubic (torchvision's resize of PIL
  images): uint8 RGB and grayscale as PIL resizes them, other data band by band as L (uint8) or
  F (float32) images. `box` (left, top, right, bottom; fractions allowed) resizes that region
  only, PIL's `box` argument."""
  if box is None and pixels.shape[:2] == (height, width):
    return pixels
  c = pixels.shape[-1]
  if pixels.dtype == np.uint8 and c in (1, 3):
    image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if c == 1 else pixels))
    out = np.asarray(image.resize((width, height), Image.BICUBIC, box=box))
    return out[..., None] if c == 1 else out
  mode = "L" if pixels.dtype == np.uint8 else "F"
  bands = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., i]), mode).resize(
      (width, height), Image.BICUBIC, box=box)) for i in range(c)]
  return np.stack(bands, axis=-1)


def crop_and_resize(pixels: np.ndarray, box: tuple[int, int, int, int], size: Size
                    ) -> np.ndarray:
  """RandomResizedCrop's second half: the box (left, top, width, height, whole pixels) cut
  out, then resized to `size` (H, W)."""
  left, top, w, h = (int(v) for v in box)
  return resize(pixels[top:top + h, left:left + w], *size)


def eval_resize_shape(width: int, height: int, size: Size, crop_pct: float) -> Size:
  """(height, width) that the evaluation resize gives a width x height image (see the module
  docstring): torchvision's Resize(int(S / crop_pct)) for a square size S."""
  cover_h, cover_w = int(size[0] / crop_pct), int(size[1] / crop_pct)
  if cover_w * height >= cover_h * width:  # the width binds: it becomes cover_w
    return int(cover_w * height / width), cover_w
  return cover_h, int(cover_h * width / height)


def eval_resize_and_crop(pixels: np.ndarray, size: Size, crop_pct: float) -> np.ndarray:
  """Resize(int(size / crop_pct)) then CenterCrop(size), as the official evaluation does."""
  h, w = eval_resize_shape(pixels.shape[1], pixels.shape[0], size, crop_pct)
  resized = resize(pixels, h, w)
  top, left = int(round((h - size[0]) / 2.0)), int(round((w - size[1]) / 2.0))
  return resized[top:top + size[0], left:left + size[1]]


def channel_stats(arrays) -> tuple[np.ndarray, np.ndarray, int]:
  """Per-channel mean and standard deviation over every pixel of `arrays` ([h, w, C] each), in
  the units normalization sees (uint8 / 255, other types as they are), and the pixel count.

  Sums in float64, so millions of images add up without drift.
  """
  total = total_sq = None
  count = 0
  for pixels in arrays:
    x = pixels.astype(np.float64).reshape(-1, pixels.shape[-1])
    if pixels.dtype == np.uint8:
      x /= 255.0
    s, sq = x.sum(0), np.square(x).sum(0)
    total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
    count += len(x)
  if not count:
    raise ValueError("no images to compute statistics from")
  mean = total / count
  return mean, np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0)), count


def round_stats(values: np.ndarray) -> tuple[float, ...]:
  """Values rounded to 4 significant digits, for a config."""
  return tuple(float(f"{v:.4g}") if v else 0.0 for v in values)


def picture_pixels(image: Image.Image, channels: int, where: str) -> np.ndarray:
  """A PIL image's pixels as uint8 [h, w, channels] (1: grayscale, 3: RGB).

  For an RGB model every mode is converted (grayscale, CMYK, palette; alpha dropped; 16-bit
  grayscale keeps its top 8 bits), each conversion counted (file_issues). For a grayscale model
  a grayscale file is read as such and a colour file is a DatasetMismatch; other channel
  counts need arrays (.npy, .tif).
  """
  image.load()
  mode = image.mode
  grey = mode in _GREY_MODES or (mode == "P" and _grey_palette(image))
  if channels not in (1, 3) or (channels == 1 and not grey):
    raise DatasetMismatch(
        f"{where} is a {'grayscale' if grey else 'colour'} image ({mode}), but "
        f"config.model.in_chans={channels}: every file of a dataset needs the model's channel "
        f"count; set --config.model.in_chans={1 if grey else 3} if the data is "
        f"{'grayscale' if grey else 'colour'}" + (
            ", else convert the file to grayscale" if channels == 1 else
            " (other counts than 1 and 3 come from .npy or .tif files)"))
  if mode.startswith("I;16"):
    # 16-bit grayscale: keep the top 8 bits (PIL's convert would clip at 255).
    if channels == 3:
      file_issues.note("16-bit grayscale image converted to RGB", where)
    image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
    mode = "L"
  target = "L" if channels == 1 else "RGB"
  if mode != target:
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
      file_issues.note("image with alpha: alpha dropped", where)
    elif mode == "CMYK":
      file_issues.note("CMYK image converted to RGB", where)
    elif grey and channels == 3:
      file_issues.note("grayscale image converted to RGB", where)
    image = image.convert(target)
  pixels = np.asarray(image)
  return pixels[..., None] if channels == 1 else pixels


def _grey_palette(image: Image.Image) -> bool:
  palette = np.asarray(image.getpalette() or [], np.int32).reshape(-1, 3)
  return bool(len(palette)) and bool((palette == palette[:, :1]).all())


def read_pixels(data: bytes, where: str = "", channels: int = 3) -> np.ndarray:
  """A file's whole image [h, w, channels] as the crops see it (uint8, or float32 for
  non-uint8 arrays); DatasetMismatch when its channels are not `channels`."""
  image = _picture(data, channels)
  if image is None:
    return check_channels(decode_array(data, where), channels, where)
  return picture_pixels(image, channels, where)


def _picture(data: bytes, channels: int) -> Image.Image | None:
  """The file as a PIL image (header parsed only), or None to read it as an array: `.npy`
  always; TIFF for models of other than 3 channels, or where PIL cannot read it (float or
  multi-band TIFFs); an RGB model reads TIFF photos as pictures (alpha dropped, grayscale
  converted), like the other formats."""
  if data[:6] == b"\x93NUMPY":
    return None
  tiff = data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
  if tiff and channels != 3:
    return None
  try:
    return Image.open(io.BytesIO(data))
  except (OSError, ValueError):
    if tiff:
      return None
    raise


def dct_scale(box: Box, size: Size) -> int:
  """The JPEG DCT scale (1, 4 or 8) to decode at for a crop `box` to `size` (DCT_MARGIN)."""
  fit = min(box[2] / size[1], box[3] / size[0])
  return next((k for k in (8, 4) if k * DCT_MARGIN <= fit), 1)


def decode_and_crop(data: bytes, size: Size | int,
                    choose_box: Callable[[int, int], Box] | None, *, crop_pct: float = 0.875,
                    where: str = "", channels: int = 3,
                    decoded: dict[int, np.ndarray] | None = None) -> np.ndarray:
  """An encoded image or array file -> its crop [H, W, channels] (uint8, or float32 for
  non-uint8 arrays), as the official transforms make it (module docstring).

  `choose_box(width, height)` gives a training crop box (whole pixels: RandomResizedCrop);
  None means the evaluation resize and centre crop at `crop_pct`. `decoded`, when given,
  caches this one file's decoded pixels ({JPEG DCT scale: pixels}, colour as BGR): read before
  decoding and added to after, so a cached file gives the same crop as a fresh decode. Raises
  DatasetMismatch for a file whose channels are not `channels`, and one of DECODE_ERRORS for
  data that is not a readable image.
  """
  size = size_hw(size)
  decoded = {} if decoded is None else decoded
  image = _picture(data, channels)
  if image is None or image.format != "JPEG" or image.mode not in ("RGB", "L"):
    if 1 not in decoded:
      decoded[1] = (check_channels(decode_array(data, where), channels, where) if image is None
                    else picture_pixels(image, channels, where))
    pixels = decoded[1]
    if choose_box is None:
      return eval_resize_and_crop(pixels, size, crop_pct)
    return crop_and_resize(pixels, choose_box(pixels.shape[1], pixels.shape[0]), size)
  # JPEG: OpenCV's libjpeg-turbo gives PIL's pixels without PIL's copies (EXIF orientation
  # ignored, as PIL does), at 1/4 or 1/8 scale in the DCT domain when the box allows.
  width, height = image.size
  if channels not in (1, 3) or (channels == 1 and image.mode != "L"):
    picture_pixels(image, channels, where)  # raises the mismatch, naming the file
  if channels == 3 and image.mode == "L":
    file_issues.note("grayscale image converted to RGB", where)
  box = None if choose_box is None else choose_box(width, height)
  scale = 1 if box is None else dct_scale(box, size)
  pixels = decoded.get(scale)
  if pixels is None:
    flags = (_DCT_GREY if channels == 1 else _DCT_COLOR)[scale] | cv2.IMREAD_IGNORE_ORIENTATION
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is None:
      raise OSError("corrupt or truncated JPEG")
    pixels = decoded[scale] = pixels[..., None] if pixels.ndim == 2 else pixels
  # Colour comes as BGR: each band is resized alike, so the order is swapped on the output.
  if box is None:
    out = eval_resize_and_crop(pixels, size, crop_pct)
  elif scale == 1:
    out = crop_and_resize(pixels, box, size)
  else:
    sx, sy = width / pixels.shape[1], height / pixels.shape[0]
    left, top, w, h = box
    out = resize(pixels, *size, box=(left / sx, top / sy, (left + w) / sx, (top + h) / sy))
  return np.ascontiguousarray(out[..., ::-1]) if channels == 3 else out


@functools.lru_cache(maxsize=8)
def _normalizer(row: int, mean: tuple[float, ...], std: tuple[float, ...], levels: float
                ) -> tuple[np.ndarray, np.ndarray]:
  """x * scale + offset over one image row of `row` // C pixels (long rows: fast numpy)."""
  std_ = np.asarray(std, np.float32)
  scale = 1.0 / (levels * std_)
  offset = -np.asarray(mean, np.float32) / std_
  return np.tile(scale, row // len(std)), np.tile(offset, row // len(std))


def normalize(images: np.ndarray, out: np.ndarray | None = None,
              mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
              ) -> np.ndarray:
  """[..., H, W, C] -> float32 (x - mean) / std per channel (into `out`); uint8 values are
  first divided by 255 (torchvision's ToTensor), other types are used as they are."""
  if images.shape[-1] != len(mean) or len(mean) != len(std):
    raise ValueError(f"{images.shape[-1]}-channel images need {images.shape[-1]} means and "
                     f"stds, got {len(mean)} and {len(std)} (input.mean, input.std)")
  row = images.shape[-2] * images.shape[-1]
  levels = 255.0 if images.dtype == np.uint8 else 1.0
  scale, offset = _normalizer(row, tuple(mean), tuple(std), levels)
  if out is None:
    out = np.empty(images.shape, np.float32)
  flat = out.reshape(-1, row)
  np.multiply(images.reshape(-1, row), scale, out=flat)
  flat += offset
  return out
