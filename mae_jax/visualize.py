"""Reconstruction figures as in the paper's Figure 2, from any checkpoint.

    python -m mae_jax.visualize --workdir=DIR [--images a.jpg b.png] [--output=FILE.png]

Each row: original | masked | prediction | prediction with the visible patches pasted back, and
for norm_pix models one more column. A norm_pix model predicts each removed patch up to its
brightness and contrast (each patch normalized to mean 0, variance 1), so the prediction
columns put its patches back on the mean and variance of the image's *visible* patches: what
they show comes from the model and the visible pixels only. The last column maps them back
with each removed patch's own true mean and variance instead, as other MAE visualizations do:
that uses statistics of the very patches being predicted, so it resembles the photo whatever
the model predicts (even a random init's), and only shows the model's texture within them.
The ImageNet normalization is undone. DIR is a training workdir (its newest
checkpoint) or one written by `mae_jax.convert` (official `*_full` checkpoints carry the decoder
that this needs). Without --images a few of scikit-image's sample photos are used.
"""

import io
import math
import os
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw

from mae_jax import config_lib
from mae_jax import models
from mae_jax import writers
from mae_jax.models import functional as F

IMAGENET_MEAN = np.array(config_lib.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.array(config_lib.IMAGENET_STD, np.float32)
# Recognizable colour photos that install with scikit-image.
SAMPLE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
COLUMNS = ("original", "masked", "prediction", "prediction + visible", "w/ true patch stats")

Params = Dict[str, Any]


def load_images(paths: Sequence[str], size: models.ImageSize, channels: int = 3,
                mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                ) -> np.ndarray:
  """Image or band files (read as the input pipeline reads them for `channels`) -> resized to
  just cover `size` (an int or (H, W)), centre crop, normalized per channel: float32
  [N, H, W, C]. A colour picture for a 1-channel model is shown in grey."""
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  image_files = input_pipeline.decode
  out = []
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    if channels == 1 and not image_files.is_array_file(path):
      pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"))[..., None]
    else:
      pixels = image_files.read_pixels(data, path, channels)
    out.append(image_files.eval_resize_and_crop(pixels, image_files.size_hw(size), 1.0).astype(
        np.float32)
        / (255.0 if pixels.dtype == np.uint8 else 1.0))
  return input_pipeline.normalize(np.stack(out), mean=tuple(mean), std=tuple(std))


def sample_images(size: models.ImageSize, channels: int = 3,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                  ) -> np.ndarray:
  """scikit-image's sample photos, normalized float32 [N, H, W, C]; in grey for C = 1."""
  if channels not in (1, 3):
    raise ValueError(f"the sample photos have no {channels}-band version: pass image or band "
                     f"files of your data (--images)")
  import skimage.data  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(skimage.data.__file__)
  return load_images([os.path.join(folder, name) for name in SAMPLE_PHOTOS], size, channels,
                     mean, std)


def reconstruction_inputs(config) -> np.ndarray:
  """The images that training's reconstruction figures show: the sample photos (in grey for a
  1-channel model), or the first files of the training data for other channel counts."""
  m, c = config.model, config.input
  mean, std = tuple(c.get("mean", IMAGENET_MEAN)), tuple(c.get("std", IMAGENET_STD))
  if m.in_chans in (1, 3):
    return sample_images(m.img_size, m.in_chans, mean, std)
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  first = c.copy_and_resolve_references()
  first.unlock()
  first.update(batch_size=len(SAMPLE_PHOTOS), num_workers=0, prefetch=0)
  batch = next(input_pipeline.create_iterator(
      first, image_size=m.img_size, seed=0, train=False, split=c.split, process_index=0,
      process_count=1, channels=m.in_chans))
  return batch["image"][batch["valid"]]


def display_normalization(images_: np.ndarray, mean: Sequence[float], std: Sequence[float]
                          ) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) for `panels` that show normalized `images_` [N, H, W, C] on [0, 1]: the
  data's own when its values lie in [0, 1] (8-bit pictures and bands), else each channel
  stretched between its 1st and 99th percentile (bands in other units)."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  values = np.asarray(images_, np.float32) * std + mean
  if values.min() >= -0.01 and values.max() <= 1.01:
    return mean, std
  lo, hi = np.percentile(values.reshape(-1, values.shape[-1]), [1, 99], axis=0)
  span = np.maximum(hi - lo, 1e-6)
  return (mean - lo) / span, std / span


def select_bands(figure: np.ndarray, bands: Optional[Sequence[int]] = None) -> np.ndarray:
  """[..., C] panels -> [..., 3] for display: grey for one band, RGB for three; for other
  counts the chosen `bands` (1 or 3 indices; default the first three)."""
  c = figure.shape[-1]
  if bands is None:
    bands = [0] if c == 1 else [0, 1, 2] if c >= 3 else [0]
  bands = list(bands)
  if len(bands) not in (1, 3) or not all(0 <= b < c for b in bands):
    raise ValueError(f"--bands={bands}: give 1 (grey) or 3 (red, green, blue) band indices "
                     f"in 0..{c - 1}")
  picked = figure[..., bands]
  return np.repeat(picked, 3, axis=-1) if len(bands) == 1 else picked


def fixed_noise(seed: int, batch: int, num_patches: int) -> np.ndarray:
  """Masking noise [batch, L] that depends on the seed only, so figures of different steps
  mask the same patches."""
  return np.random.default_rng(seed).random((batch, num_patches), dtype=np.float32)


def unnormalize_with_visible(pred: jax.Array, target: jax.Array, mask: jax.Array,
                             eps: float = 1e-6) -> jax.Array:
  """norm_pix predictions [N, L, D] -> pixels with the statistics of the visible patches only:
  each image's mean of its visible patches' means, and the square root of the mean of their
  variances (unbiased, as norm_pix_loss normalizes), from `target` [N, L, D] (the patchified
  input) and `mask` [N, L] (1 = removed)."""
  visible = (1.0 - mask)[..., None]
  count = jnp.maximum(jnp.sum(visible, axis=1, keepdims=True), 1.0)
  mean = jnp.sum(target.mean(-1, keepdims=True) * visible, axis=1, keepdims=True) / count
  var = jnp.sum(target.var(-1, ddof=1, keepdims=True) * visible, axis=1, keepdims=True) / count
  return pred.astype(jnp.float32) * jnp.sqrt(var + eps) + mean


def panels(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
           norm_pix_loss: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """The panels of each row in pixels, float32 [N, K, H, W, C] in [0, 1] (K = 5 for norm_pix
  predictions, else 4; titles in COLUMNS), from the model's normalized input, its predictions
  [N, L, p*p*C] and mask [N, L] (1 = removed); `mean` / `std` undo the normalization
  (`display_normalization`)."""
  n, h, w, c = images.shape
  p = patch_size
  grid = (h // p, w // p)
  target = F.patchify(images.astype(jnp.float32), p)
  honest = unnormalize_with_visible(pred, target, mask) if norm_pix_loss else pred
  recon = F.unpatchify(honest, p, grid, c)
  removed = F.unpatchify(jnp.repeat(mask[..., None], p * p * c, axis=-1), p, grid, c)
  # Removed patches become 0 in normalized space, i.e. the mean colour (as the official demo
  # shows them).
  masked = images * (1.0 - removed)
  columns = [images, masked, recon, masked + recon * removed]
  if norm_pix_loss:
    columns.append(F.unpatchify(F.unnormalize_pred(pred, images, p), p, grid, c))
  out = jnp.stack(columns, axis=1)
  return jnp.clip(out * jnp.asarray(std) + jnp.asarray(mean), 0.0, 1.0)


def reconstruct(model: models.MaskedAutoencoder, params: Params, images: jax.Array,
                noise: jax.Array, *, mask_ratio: float, mean=IMAGENET_MEAN, std=IMAGENET_STD
                ) -> jax.Array:
  """Runs the model and returns its figure panels [N, K, H, W, C] (see `panels`)."""
  _, pred, mask = model.apply({"params": params}, images, mask_ratio=mask_ratio, noise=noise)
  return panels(images, pred, mask, model.patch_size, model.norm_pix_loss, mean, std)


def grid_image(figure: np.ndarray, *, min_panel: int = 128, gap: int = 4) -> np.ndarray:
  """[N, K, H, W, 3] panels in [0, 1] -> one uint8 image with a titled column per panel.

  Small images are enlarged by an integer factor (nearest neighbour) so patches stay sharp.
  """
  n, cols, h, w, _ = figure.shape
  k = max(1, math.ceil(min_panel / h))
  figure = np.repeat(np.repeat(figure, k, axis=2), k, axis=3)
  ph, pw = h * k, w * k
  header = 16
  height = header + n * ph + (n + 1) * gap
  width = cols * pw + (cols + 1) * gap
  canvas = np.full((height, width, 3), 255, np.uint8)
  for i in range(n):
    for j in range(cols):
      top, left = header + gap + i * (ph + gap), gap + j * (pw + gap)
      canvas[top:top + ph, left:left + pw] = np.round(figure[i, j] * 255).astype(np.uint8)
  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  for j, title in enumerate(COLUMNS[:cols]):
    draw.text((gap + j * (pw + gap) + 2, 2), title, fill=(0, 0, 0))
  return np.asarray(image)


def save_png(image: np.ndarray, path: str) -> str:
  """Writes an HxWx3 uint8 image as PNG (any epath location) and returns the path."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    Image.fromarray(image).save(f, format="PNG")
  return os.fspath(path)


def render(path: str, *, images: Optional[Sequence[str]] = None, output: Optional[str] = None,
           mask_ratio: Optional[float] = None, seed: int = 0, model_config=None,
           bands: Optional[Sequence[int]] = None) -> str:
  """Renders reconstructions with the params of `path` (see checkpoint.load_params) into
  `output` (default PATH/visualize.png) and returns the PNG's path. Images are normalized with
  the workdir config's input.mean / input.std (ImageNet's without one); a 1-channel model is
  drawn in grey, others from `bands` (1 or 3 indices, default the first three)."""
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  output = output or os.path.join(path, "visualize.png")
  writers.check_writable(output)  # before reading params and compiling
  params, config = checkpoint.load_params(path)
  model_config = model_config or (config.model if config is not None else None)
  if model_config is None:
    raise ValueError(f"{path} holds no config.json: pass --config=configs/X.py for its model.")
  if "decoder_pred" not in params:
    raise ValueError(f"The params in {path} have no decoder (a released encoder-only "
                     f"checkpoint?); reconstructions need a *_full checkpoint.")
  # Whatever the training compute dtype, render in float32 with the params' own layout.
  model = models.from_config(model_config).clone(dtype="float32",
                                                 scan=models.is_scanned(params))
  input_config = config.get("input", {}) if config is not None else {}
  mean = tuple(input_config.get("mean", IMAGENET_MEAN))
  std = tuple(input_config.get("std", IMAGENET_STD))
  if images:
    pixels = load_images(images, model.img_size, model.in_chans, mean, std)
  elif model.in_chans in (1, 3) or config is None:
    pixels = sample_images(model.img_size, model.in_chans, mean, std)
  else:
    pixels = reconstruction_inputs(config)
  noise = fixed_noise(seed, pixels.shape[0], models.num_patches(model.img_size, model.patch_size))
  ratio = model_config.get("mask_ratio", 0.75) if mask_ratio is None else mask_ratio
  shown_mean, shown_std = display_normalization(pixels, mean, std)
  figure = jax.jit(lambda p, x, z: reconstruct(model, p, x, z, mask_ratio=ratio,
                                               mean=shown_mean, std=shown_std))(
      params, pixels, noise)
  figure = select_bands(np.asarray(figure), bands)
  return save_png(grid_image(figure), output)


def main(argv: Sequence[str]) -> None:
  """`python -m mae_jax.visualize`: a reconstruction PNG from a workdir's params."""
  writers.show_own_info_logs()
  paths = list(_IMAGES.value or []) + list(argv[1:])  # `--images a.jpg b.png` also works
  model_config = _CONFIG.value.model if _CONFIG.value is not None else None
  bands = [int(b) for b in _BANDS.value] if _BANDS.value else None
  with config_lib.input_errors_end_the_command():
    print(render(_WORKDIR.value, images=paths, output=_OUTPUT.value,
                 mask_ratio=_MASK_RATIO.value, seed=_SEED.value, model_config=model_config,
                 bands=bands))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir or a converted checkpoint.",
                                 required=True)
  _IMAGES = flags.DEFINE_list("images", None, "Image files (default: scikit-image's samples).")
  _OUTPUT = flags.DEFINE_string("output", None, "Where to write the PNG (default "
                                "WORKDIR/visualize.png).")
  _MASK_RATIO = flags.DEFINE_float("mask_ratio", None, "Fraction of patches removed, in [0, 1) "
                                   "(default: the config's model.mask_ratio).")
  flags.register_validator("mask_ratio", lambda r: r is None or 0.0 <= r < 1.0,
                           "must lie in [0, 1): the fraction of patches removed (the paper's "
                           "0.75); 1.0 would leave the encoder no patch to see.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the masking noise.")
  _BANDS = flags.DEFINE_list("bands", None, "Bands to draw for a model of other than 1 or 3 "
                             "channels: 3 indices (as red, green, blue) or 1 (grey); default "
                             "the first three.")
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "The model's config, for params without a config.json.")
  from mae_jax import config_lib  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=lambda argv: config_lib.parse_flags(argv, _CONFIG))
