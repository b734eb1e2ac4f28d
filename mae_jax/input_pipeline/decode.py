"""Crops, decoding, resizing and normalization of single images (no TensorFlow, no JAX).

JPEGs are decoded by OpenCV's libjpeg-turbo (PIL's pixels exactly, with fewer copies), at 1/2,
1/4 or 1/8 scale in the DCT domain when the crop box is at least twice the output size; other
formats and modes go through PIL. OpenCV's SIMD bicubic resize maps the box to the output, after
a Gaussian prefilter when it shrinks, which keeps it within about one grey level of PIL's
antialiased bicubic (the official resize, 5x slower).
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

from mae_jax.input_pipeline import file_issues

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What PIL raises on files that are not images, or are corrupt, truncated or absurdly large.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                 Image.DecompressionBombError, cv2.error)

# One core per worker process: the pipeline's parallelism is its workers.
cv2.setNumThreads(1)

Box = tuple[float, float, float, float]  # left, top, width, height in pixels of the source image


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


def dct_scale(box: Box, size: int) -> int:
  """The largest JPEG DCT scale (1, 2, 4, 8) that keeps the box at least `size` pixels."""
  fit = min(box[2], box[3]) / size
  return next(s for s in (8, 4, 2, 1) if s <= fit or s == 1)


def to_rgb(image: Image.Image, where: str) -> Image.Image:
  """Loads the pixels and converts any mode to 8-bit RGB, counting the conversions in the log."""
  image.load()
  mode = image.mode
  if mode == "RGB":
    return image
  if mode.startswith("I;16"):
    # 16-bit grayscale: keep the top 8 bits (PIL's convert would clip at 255).
    file_issues.note("16-bit grayscale image converted to RGB", where)
    grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
    file_issues.note("image with alpha: alpha dropped", where)
  elif mode == "CMYK":
    file_issues.note("CMYK image converted to RGB", where)
  elif mode in ("L", "1", "I", "F"):
    file_issues.note("grayscale image converted to RGB", where)
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
  scale = dct_scale(box, size) if jpeg else 1
  pixels = None if decoded is None else decoded.get(scale)
  if pixels is None:
    if jpeg:
      if image.mode == "L":
        file_issues.note("grayscale image converted to RGB", where)
      # OpenCV's libjpeg-turbo gives PIL's pixels without PIL's copies, at 1/2, 1/4 or 1/8
      # scale in the DCT domain when the box allows; EXIF orientation is ignored, as PIL does.
      # BGR (IMREAD_COLOR_RGB needs OpenCV >= 4.11): swapped after the resize, on fewer pixels.
      flags = _DCT_FLAGS[scale] | cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
      pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
      if pixels is None:
        raise OSError("corrupt or truncated JPEG")
    else:
      pixels = np.asarray(to_rgb(image, where))
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
