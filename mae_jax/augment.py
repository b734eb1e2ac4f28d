"""Fine-tuning augmentations in JAX, on device, on whole batches, deterministic from a key.

The official fine-tuning (timm 0.3.2 via main_finetune.py) applies, per image, RandAugment
`rand-m9-mstd0.5-inc1` on the uint8 crop, then normalization, then RandomErasing(0.25,
mode="pixel"); then per batch Mixup(mixup 0.8, cutmix 1.0, switch 0.5, mode "batch",
label smoothing 0.1). This module does the same on the input pipeline's uint8 crops:
`finetune_augment(key, pixels, labels, ...)`; with `key = fold_in(seed, step)` a resumed run
sees the same augmentations. RandAugment's ops follow PIL's arithmetic (the affine ops PIL's
bicubic, a = -1, with the ImageNet-mean fill) up to float32 rounding; each op is a pure
function of one image, tested against PIL.

Other data (README, "Any image"): the colour ops are defined on 8-bit RGB only, so for other
channel counts and for float bands (.npy / .tif of non-uint8 values) only the geometric ops
run (`config.augment.rand_augment_ops="geometric"`, else refused); on float bands they
interpolate as PIL does a float ("F") image, values neither clipped nor rounded, filling with
`input.mean` in the data's units, and normalization does not divide by 255, as in the input
pipeline.

On a sharded global batch the mixing partner is the flipped global batch and one lambda serves
the whole global batch (the official code mixes each GPU's own batch with its own lambda).
"""

import dataclasses
import math
import re
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.config_lib import IMAGENET_MEAN, IMAGENET_STD


def fill_colour(mean, uint8: bool = True) -> Tuple[float, ...]:
  """timm's fill of the corners of rotated/sheared/translated images: the mean colour, in uint8
  levels (input.mean is on [0, 1]), or for float bands (uint8=False) the mean as it is."""
  if not uint8:
    return tuple(float(m) for m in mean)
  return tuple(min(255, round(255 * m)) for m in mean)


FILL = fill_colour(IMAGENET_MEAN)

# ---------------------------------------------------------------------------------------------
# RandAugment: single-image ops on float32 images holding uint8 values [H, W, 3].

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
# The ops that only move pixels: the ones that mean the same for any channel count.
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# augment.rand_augment_ops: which of OPS RandAugment draws from.
OP_SETS = {"all": OPS, "geometric": GEOMETRIC_OPS}


def _histogram(img: jax.Array) -> jax.Array:
  """[3, 256] per-channel histogram of an image of uint8 values."""
  idx = img.astype(jnp.int32).reshape(-1, 3)
  return jnp.zeros((3, 256), jnp.int32).at[jnp.arange(3)[None, :], idx].add(1)


def apply_lut(img: jax.Array, lut: jax.Array) -> jax.Array:
  """Maps each channel c through lut[c] ([3, 256])."""
  idx = img.astype(jnp.int32)
  return jnp.stack([lut[c][idx[..., c]] for c in range(3)], axis=-1).astype(img.dtype)


def _identity_lut() -> jax.Array:
  return jnp.broadcast_to(jnp.arange(256, dtype=jnp.float32), (3, 256))


def auto_contrast_lut(hist: jax.Array) -> jax.Array:
  """PIL ImageOps.autocontrast (cutoff 0): stretch [lo, hi] of each channel to [0, 255]."""
  levels = jnp.arange(256)
  present = hist > 0
  lo = jnp.min(jnp.where(present, levels, 255), axis=1, keepdims=True)
  hi = jnp.max(jnp.where(present, levels, 0), axis=1, keepdims=True)
  scale = 255.0 / jnp.maximum(hi - lo, 1)
  stretched = jnp.clip(jnp.trunc(levels * scale - lo * scale), 0, 255)
  return jnp.where(hi <= lo, levels, stretched).astype(jnp.float32)


def equalize_lut(hist: jax.Array) -> jax.Array:
  """PIL ImageOps.equalize: lut[i] = (step // 2 + #pixels below i) // step per channel."""
  levels = jnp.arange(256)
  last = jnp.max(jnp.where(hist > 0, levels, -1), axis=1, keepdims=True)
  last_count = jnp.take_along_axis(hist, jnp.maximum(last, 0), axis=1)
  step = (hist.sum(axis=1, keepdims=True) - last_count) // 255
  below = jnp.cumsum(hist, axis=1) - hist
  lut = jnp.clip((step // 2 + below) // jnp.maximum(step, 1), 0, 255)
  # One grey level, or too few pixels off the top level: PIL leaves the channel unchanged.
  return jnp.where(step == 0, levels, lut).astype(jnp.float32)


def posterize_lut(bits: jax.Array) -> jax.Array:
  """Keeps the top `bits` bits (0 bits gives black, as PIL did before it refused bits=0)."""
  mask = 255 - (jnp.left_shift(1, 8 - bits) - 1)
  return jnp.broadcast_to(jnp.bitwise_and(jnp.arange(256), mask), (3, 256)).astype(jnp.float32)


def solarize_lut(threshold: jax.Array) -> jax.Array:
  """Inverts the levels >= threshold."""
  levels = jnp.arange(256)
  return jnp.broadcast_to(jnp.where(levels < threshold, levels, 255 - levels),
                          (3, 256)).astype(jnp.float32)


def solarize_add_lut(add: jax.Array, threshold: int = 128) -> jax.Array:
  """Adds `add` to the levels below threshold, saturating at 255."""
  levels = jnp.arange(256)
  return jnp.broadcast_to(jnp.where(levels < threshold, jnp.minimum(levels + add, 255), levels),
                          (3, 256)).astype(jnp.float32)


def grayscale(img: jax.Array) -> jax.Array:
  """PIL's RGB -> L -> RGB: L = (19595 R + 38470 G + 7471 B + 2**15) >> 16."""
  rgb = img.astype(jnp.int32)
  lum = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) >> 16
  return jnp.broadcast_to(lum[..., None], img.shape).astype(img.dtype)


def mean_gray(img: jax.Array) -> jax.Array:
  """ImageEnhance.Contrast's degenerate: a flat image at the rounded mean of L."""
  mean = jnp.floor(jnp.mean(grayscale(img)[..., 0]) + 0.5)
  return jnp.full_like(img, mean)


def smooth(img: jax.Array) -> jax.Array:
  """ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13), borders copied, as PIL filters."""
  h, w, _ = img.shape
  pad = jnp.pad(img, ((1, 1), (1, 1), (0, 0)))
  total = sum(pad[i:i + h, j:j + w] for i in range(3) for j in range(3)) + 4 * img
  inner = jnp.clip(jnp.floor(total / 13.0 + 0.5), 0, 255)
  border = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  return jnp.where(border, inner, img)


def blend(degenerate: jax.Array, img: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL Image.blend(degenerate, img, factor), ImageEnhance's core: clip, then truncate."""
  return jnp.floor(jnp.clip(degenerate + factor * (img - degenerate), 0, 255))


def rotate_matrix(degrees: jax.Array, height: int, width: int) -> jax.Array:
  """PIL Image.rotate's output -> input affine map (counter-clockwise about the centre)."""
  a = -jnp.deg2rad(degrees)
  cos, sin = jnp.cos(a), jnp.sin(a)
  cx, cy = width / 2.0, height / 2.0
  return jnp.stack([cos, sin, cos * -cx + sin * -cy + cx,
                    -sin, cos, -sin * -cx + cos * -cy + cy])


def affine(img: jax.Array, matrix: jax.Array, fill=FILL, uint8: bool = True) -> jax.Array:
  """PIL Image.transform(AFFINE, matrix, BICUBIC, fillcolor=fill) of one image.

  Output pixel (x, y) samples the input at (a (x + .5) + b (y + .5) + c, d (..) + e (..) + f)
  with PIL's cubic (a = -1) on clamped neighbours; samples outside the image take `fill`.
  uint8 levels are clipped to [0, 255] and truncated as PIL does for 8-bit images; with
  uint8=False (float bands, PIL's "F" images) the values stay as interpolated.
  """
  h, w, _ = img.shape
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                        jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
  a, b, c, d, e, f = (matrix[i] for i in range(6))
  xin, yin = a * xs + b * ys + c, d * xs + e * ys + f
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  x0, y0 = jnp.floor(xin - 0.5), jnp.floor(yin - 0.5)
  dx, dy = (xin - 0.5 - x0)[..., None], (yin - 0.5 - y0)[..., None]

  def cubic(v1, v2, v3, v4, t):
    return v2 + t * (-v1 + v3 + t * (2 * (v1 - v2) + v3 - v4 + t * (-v1 + v2 - v3 + v4)))

  cols = [jnp.clip(x0 + k, 0, w - 1).astype(jnp.int32) for k in (-1, 0, 1, 2)]
  rows = [jnp.clip(y0 + k, 0, h - 1).astype(jnp.int32) for k in (-1, 0, 1, 2)]
  across = [cubic(*(img[r, cc] for cc in cols), dx) for r in rows]
  out = cubic(*across, dy)
  if uint8:
    out = jnp.floor(jnp.clip(out, 0, 255))
  return jnp.where(inside[..., None], out, jnp.asarray(fill, img.dtype))


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
  """timm's RandAugment: `num_layers` ops, each applied with `prob`, magnitude ~ N(m, std)."""
  magnitude: float = 9.0
  magnitude_std: float = 0.5
  num_layers: int = 2
  increasing: bool = True
  prob: float = 0.5
  ops: Tuple[str, ...] = OPS  # drawn uniformly; timm's are all of OPS
  fill: Tuple[float, ...] = FILL  # the affine ops' fill, per channel
  uint8: bool = True  # uint8 levels; False: float bands (geometric ops only, values unclipped)


def parse_rand_augment(spec: str, ops: str = "all", fill: Tuple[float, ...] = FILL,
                       uint8: bool = True) -> RandAugmentPolicy:
  """timm's config string, e.g. "rand-m9-mstd0.5-inc1" (keys m, n, mstd, inc), drawing from
  OP_SETS[ops], with the affine ops filling with `fill`; uint8=False for float bands, which
  take the geometric ops only (ValueError otherwise)."""
  if ops not in OP_SETS:
    raise ValueError(f"augment.rand_augment_ops={ops!r} is not one of {tuple(OP_SETS)}")
  if not uint8 and ops != "geometric":
    raise ValueError(f"augment.rand_augment_ops={ops!r}: float bands take the geometric ops "
                     f"only (rand_augment_ops='geometric')")
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"augment.rand_augment must look like 'rand-m9-mstd0.5-inc1', got {spec!r}")
  fields = {}
  for part in parts[1:]:
    m = re.fullmatch(r"([a-z]+)([\d.]+)", part)
    if not m or m.group(1) not in ("m", "n", "mstd", "inc"):
      raise ValueError(f"augment.rand_augment {spec!r}: unknown section {part!r} "
                       "(supported: m<magnitude>, n<layers>, mstd<std>, inc<0|1>)")
    fields[m.group(1)] = float(m.group(2))
  return RandAugmentPolicy(magnitude=fields.get("m", 10.0),
                           magnitude_std=fields.get("mstd", 0.0),
                           num_layers=int(fields.get("n", 2)),
                           increasing=bool(fields.get("inc", 0)), ops=OP_SETS[ops],
                           fill=tuple(fill), uint8=uint8)


def _rand_augment_layer(img: jax.Array, u: jax.Array, z: jax.Array,
                        policy: RandAugmentPolicy) -> jax.Array:
  """One RandAugment op on one image: a LUT, a blend or an affine warp (the others identity).

  u: 3 uniforms (op choice, whether to apply, sign), z: a standard normal (magnitude noise).
  """
  ops = policy.ops
  op = jnp.minimum(jnp.floor(u[0] * len(ops)).astype(jnp.int32), len(ops) - 1)
  op = jnp.where(u[1] < policy.prob, op, -1)  # -1: skipped
  level = jnp.clip(policy.magnitude + policy.magnitude_std * z, 0.0, 10.0) / 10.0
  sign = jnp.where(u[2] > 0.5, -1.0, 1.0)
  h, w, _ = img.shape
  if policy.increasing:
    bits = 4 - jnp.floor(level * 4).astype(jnp.int32)
    threshold = 256 - jnp.floor(level * 256).astype(jnp.int32)
    factor = jnp.maximum(0.1, 1.0 + sign * level * 0.9)
  else:
    bits = jnp.floor(level * 4).astype(jnp.int32)
    threshold = jnp.floor(level * 256).astype(jnp.int32)
    factor = level * 1.8 + 0.1

  # Colour ops are traced only when the policy draws them (they assume 3 channels).
  if any(name not in GEOMETRIC_OPS for name in ops):
    hist = _histogram(img)
    luts = jnp.stack([auto_contrast_lut(hist), equalize_lut(hist),
                      255.0 - _identity_lut(), posterize_lut(bits), solarize_lut(threshold),
                      solarize_add_lut(jnp.floor(level * 110).astype(jnp.int32)),
                      _identity_lut()])
    lut_index = {"AutoContrast": 0, "Equalize": 1, "Invert": 2, "Posterize": 3, "Solarize": 4,
                 "SolarizeAdd": 5}
    lut_of_op = jnp.asarray([lut_index.get(name, 6) for name in ops] + [6])
    img = apply_lut(img, luts[lut_of_op[op]])

    degenerates = jnp.stack([grayscale(img), mean_gray(img), jnp.zeros_like(img), smooth(img)])
    blend_index = {"Color": 0, "Contrast": 1, "Brightness": 2, "Sharpness": 3}
    is_blend = jnp.asarray([name in blend_index for name in ops] + [False])[op]
    degenerate = degenerates[jnp.asarray([blend_index.get(n, 0) for n in ops] + [0])[op]]
    img = jnp.where(is_blend, blend(degenerate, img, factor), img)

  one, zero = jnp.ones(()), jnp.zeros(())
  shear, shift = sign * level * 0.3, sign * level * 0.45
  matrices = jnp.stack([
      rotate_matrix(sign * level * 30.0, h, w),
      jnp.stack([one, shear, zero, zero, one, zero]),
      jnp.stack([one, zero, zero, shear, one, zero]),
      jnp.stack([one, zero, shift * w, zero, one, zero]),
      jnp.stack([one, zero, zero, zero, one, shift * h]),
  ])
  affine_index = {"Rotate": 0, "ShearX": 1, "ShearY": 2, "TranslateXRel": 3,
                  "TranslateYRel": 4}
  is_affine = jnp.asarray([name in affine_index for name in ops] + [False])[op]
  matrix = matrices[jnp.asarray([affine_index.get(n, 0) for n in ops] + [0])[op]]
  return jnp.where(is_affine, affine(img, matrix, policy.fill, policy.uint8), img)


def rand_augment(key: jax.Array, images: jax.Array,
                 policy: RandAugmentPolicy = RandAugmentPolicy()) -> jax.Array:
  """RandAugment on a batch [B, H, W, C] of uint8 values (as float32; C = 3 for the colour
  ops), or of float bands for a `policy` with uint8=False; per-image randomness."""

  b, layers = images.shape[0], policy.num_layers
  k_u, k_z = jax.random.split(key)
  # Few, batched draws: XLA compiles each random op separately, and slowly on CPU.
  u = jax.random.uniform(k_u, (b, layers, 3))
  z = jax.random.normal(k_z, (b, layers))

  def one(img, u_img, z_img):
    # A scan over the layers compiles the (large) layer body once.
    layer = lambda x, uz: (_rand_augment_layer(x, uz[0], uz[1], policy), None)
    return jax.lax.scan(layer, img, (u_img, z_img))[0]

  return jax.vmap(one)(images, u, z)


# ---------------------------------------------------------------------------------------------
# Random erasing (timm RandomErasing, mode "pixel", one box, on normalized images).

def random_erasing(key: jax.Array, images: jax.Array, prob: float = 0.25,
                   min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, attempts: int = 10) -> jax.Array:
  """With probability `prob` per image, one box filled with N(0, 1) noise per pixel/channel.

  As timm: up to 10 tries of (area ~ U(min_area, max_area) * H * W, log-uniform aspect);
  the first box that fits strictly inside the image is erased, none if no try fits.
  """
  b, h, w, _ = images.shape
  k_u, k_noise = jax.random.split(key)
  u = jax.random.uniform(k_u, (b, 2 * attempts + 3))
  noise = jax.random.normal(k_noise, images.shape, images.dtype)

  def one(img, u_img, noise_img):
    area = (min_area + (max_area - min_area) * u_img[:attempts]) * h * w
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_img[attempts:2 * attempts])
    bh = jnp.round(jnp.sqrt(area * aspect))
    bw = jnp.round(jnp.sqrt(area / aspect))
    fits = (bw < w) & (bh < h)
    first = jnp.argmax(fits)
    bh, bw = bh[first], bw[first]
    top = jnp.floor(u_img[-3] * (h - bh + 1))
    left = jnp.floor(u_img[-2] * (w - bw + 1))
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]
    box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    erase = (u_img[-1] < prob) & fits[first]
    return jnp.where(box & erase, noise_img, img)

  return jax.vmap(one)(images, u, noise)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix (timm Mixup, mode "batch") with label smoothing.

def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm's one_hot(on = 1 - s + s / K, off = s / K)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int
               ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """timm rand_bbox for a box centre: cut = int(side * sqrt(1 - lam)), half = cut // 2."""
  ratio = jnp.sqrt(1.0 - lam)
  half_h = jnp.floor(height * ratio).astype(jnp.int32) // 2
  half_w = jnp.floor(width * ratio).astype(jnp.int32) // 2
  return (jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height),
          jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width))


def mix(images: jax.Array, labels: jax.Array, num_classes: int, lam: jax.Array,
        use_cutmix: jax.Array, box: Tuple[jax.Array, ...], smoothing: float
        ) -> Tuple[jax.Array, jax.Array]:
  """Mixes each example with the batch flipped: mixup (lam) or the cutmix `box`.

  For cutmix, lam becomes 1 - box area / image area (timm's correct_lam). Returns (images,
  soft targets lam * y + (1 - lam) * y_flipped with label smoothing).
  """
  _, h, w, _ = images.shape
  flipped = images[::-1]
  yl, yh, xl, xh = box
  rows = jnp.arange(h)[:, None, None]
  cols = jnp.arange(w)[None, :, None]
  inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
  box_lam = 1.0 - jnp.asarray((yh - yl) * (xh - xl), jnp.float32) / (h * w)
  lam = jnp.where(use_cutmix, box_lam, lam)
  cut = jnp.where(inside[None], flipped, images)
  blended = images * lam + flipped * (1.0 - lam)
  images = jnp.where(use_cutmix, cut, blended).astype(images.dtype)
  y = smooth_one_hot(labels, num_classes, smoothing)
  return images, y * lam + y[::-1] * (1.0 - lam)


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1
                 ) -> Tuple[jax.Array, jax.Array]:
  """timm Mixup(mode="batch"): one lambda and one choice of mixup or cutmix per batch."""
  if images.shape[0] % 2:
    raise ValueError(f"mixup/cutmix need an even batch, got {images.shape[0]}: change "
                     "input.batch_size")
  _, h, w, _ = images.shape
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError("mixup_cutmix needs augment.mixup > 0 or augment.cutmix > 0")
  k_u, k_lam = jax.random.split(key)
  u = jax.random.uniform(k_u, (4,))  # apply, switch, box centre row, box centre column
  # One draw for both; a disabled (zero) alpha is never selected, 1e-3 keeps its draw defined.
  alphas = jnp.asarray([max(mixup_alpha, 1e-3), max(cutmix_alpha, 1e-3)])
  lam_mix, lam_cut = jax.random.beta(k_lam, alphas, alphas)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = u[1] < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  active = u[0] < prob
  lam = jnp.where(active, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0)
  use_cutmix = use_cutmix & active
  cy = jnp.floor(u[2] * h).astype(jnp.int32)
  cx = jnp.floor(u[3] * w).astype(jnp.int32)
  box = cutmix_box(lam, cy, cx, h, w)
  return mix(images, labels, num_classes, lam, use_cutmix, box, smoothing)


# ---------------------------------------------------------------------------------------------

def from_pixels(pixels: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                levels: float = 255.0) -> jax.Array:
  """uint8 levels -> float32 images normalized per channel (ToTensor + Normalize); levels=1
  for float bands, normalized as they are (the input pipeline's `normalize`)."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (pixels.astype(jnp.float32) / levels - mean) / std


@dataclasses.dataclass(frozen=True)
class FinetuneAugment:
  """The fields of a fine-tuning config's `config.augment` (mae_jax.config_lib documents them),
  as hashable values that a jitted step takes as a static argument."""
  rand_augment: str        # timm RandAugment string ("" = off)
  reprob: float            # random erasing probability (mode "pixel")
  mixup: float             # Beta alphas of mixup and cutmix (0 = off)
  cutmix: float
  mixup_prob: float
  mixup_switch_prob: float
  smoothing: float         # label smoothing
  rand_augment_ops: str = "all"  # "geometric": rotate, shear, translate only
  mean: Tuple[float, ...] = IMAGENET_MEAN  # config.input's normalization, per channel
  std: Tuple[float, ...] = IMAGENET_STD

  @classmethod
  def from_config(cls, augment_config, input_config=None) -> "FinetuneAugment":
    """From `config.augment` (its fields of these names; defaults where it lacks one) and
    `config.input`'s mean and std."""
    fields = {f.name: augment_config.get(f.name, f.default) for f in dataclasses.fields(cls)
              if f.name not in ("mean", "std")}
    if input_config is not None:
      fields.update(mean=tuple(input_config.get("mean", IMAGENET_MEAN)),
                    std=tuple(input_config.get("std", IMAGENET_STD)))
    return cls(**fields)


def rand_augment_problem(augment_config, channels: int, dtype: str = "uint8",
                         data: str = "") -> str:
  """Why `augment_config` (config.augment or a FinetuneAugment) cannot augment
  `channels`-channel images of `dtype` values ("uint8": 8-bit levels, as pictures decode;
  "float32": float bands) ("" if it can). `data` says where the values come from, for the
  message."""
  ops = getattr(augment_config, "rand_augment_ops", "all")
  if not augment_config.rand_augment or ops == "geometric":
    return ""
  if channels == 3 and dtype == "uint8":
    return ""
  colour = ", ".join(op for op in OP_SETS.get(ops, OPS) if op not in GEOMETRIC_OPS)
  what = (f"config.model.in_chans={channels}" if channels != 3 else
          f"{data or 'the data'} decodes to {dtype} values, not 8-bit levels")
  return (f"config.augment.rand_augment={augment_config.rand_augment!r} draws colour "
          f"operations ({colour}) that are defined on 8-bit RGB images, and {what}: set "
          f"--config.augment.rand_augment_ops=geometric (rotate, shear, translate only) or "
          f"--config.augment.rand_augment=''.")


def finetune_augment(key: jax.Array, pixels: jax.Array, labels: jax.Array, num_classes: int,
                     augment_config: FinetuneAugment) -> Tuple[jax.Array, jax.Array]:
  """RandAugment -> normalize -> random erasing -> mixup/cutmix with label smoothing.

  `pixels`: the crops [B, H, W, C] as the input pipeline gives them with normalize=False:
  uint8 values, or float32 for float bands (normalized as they are, not divided by 255);
  `augment_config`: a FinetuneAugment (or `config.augment`, normalizing with ImageNet's mean
  and std). Returns (normalized images, soft targets [B, K]). A stage set to zero/empty is
  skipped; label smoothing then still applies to the one-hot targets. Raises ValueError for
  RandAugment's colour ops on other than 3 channels or on float bands (`rand_augment_problem`).
  """
  k_ra, k_re, k_mix = jax.random.split(key, 3)
  c = augment_config
  mean, std = getattr(c, "mean", IMAGENET_MEAN), getattr(c, "std", IMAGENET_STD)
  uint8 = pixels.dtype == jnp.uint8
  problem = rand_augment_problem(c, pixels.shape[-1], "uint8" if uint8 else pixels.dtype.name)
  if problem:
    raise ValueError(problem)
  pixels = pixels.astype(jnp.float32)
  if c.rand_augment:
    pixels = rand_augment(k_ra, pixels, parse_rand_augment(
        c.rand_augment, getattr(c, "rand_augment_ops", "all"), fill_colour(mean, uint8),
        uint8))
  images = from_pixels(pixels, mean, std, 255.0 if uint8 else 1.0)
  if c.reprob > 0:
    images = random_erasing(k_re, images, c.reprob)
  if c.mixup > 0 or c.cutmix > 0:
    return mixup_cutmix(k_mix, images, labels, num_classes, mixup_alpha=c.mixup,
                        cutmix_alpha=c.cutmix, prob=c.mixup_prob,
                        switch_prob=c.mixup_switch_prob, smoothing=c.smoothing)
  return images, smooth_one_hot(labels, num_classes, c.smoothing)
