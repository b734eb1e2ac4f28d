"""Reconstruction figures: exact pixel mapping, the grid, and the command on a converted
official-format checkpoint."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mae_jax import config_lib
from mae_jax import convert
from mae_jax import visualize
from mae_jax.models import from_config, normalized_targets, patchify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n=2, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_perfect_prediction_maps_back_to_the_original_pixels(norm_pix):
  images, p = _images(), 4
  target = patchify(images, p)
  pred = normalized_targets(target) if norm_pix else target
  mask = jnp.asarray(np.random.default_rng(1).random((2, 16)) < 0.75, jnp.float32)
  figure = np.asarray(visualize.panels(images, pred, mask, p, norm_pix))
  assert figure.shape == (2, 5 if norm_pix else 4, 16, 16, 3)
  pixels = np.clip(np.asarray(images) * visualize.IMAGENET_STD + visualize.IMAGENET_MEAN, 0, 1)
  np.testing.assert_allclose(figure[:, 0], pixels, atol=1e-6)
  # Without norm_pix the prediction is pixels; with it, the last column uses each patch's own
  # statistics, which a perfect prediction turns back into the original.
  exact = [2, 3] if not norm_pix else [4]
  for column in exact:
    np.testing.assert_allclose(figure[:, column], pixels, atol=2e-5)
  # Masked panel: visible patches as they are, removed ones the ImageNet mean colour.
  removed = np.asarray(mask).reshape(2, 4, 4).repeat(4, 1).repeat(4, 2)[..., None] > 0
  np.testing.assert_allclose(figure[:, 1], np.where(removed, visualize.IMAGENET_MEAN, pixels),
                             atol=1e-6)


def test_prediction_columns_use_nothing_of_the_removed_pixels():
  images, p = _images(), 4
  pred = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 48)), jnp.float32)
  mask = jnp.asarray(np.arange(16) % 3 == 0, jnp.float32)[None].repeat(2, 0)
  removed = np.asarray(mask).reshape(2, 4, 4).repeat(4, 1).repeat(4, 2)[..., None] > 0
  # Other pixels (brightness, contrast, content) inside the removed patches only.
  other = jnp.where(removed, 3.0 * images[::-1] + 1.0, images)
  before = np.asarray(visualize.panels(images, pred, mask, p, True))
  after = np.asarray(visualize.panels(other, pred, mask, p, True))
  np.testing.assert_array_equal(before[:, 1:4], after[:, 1:4])
  assert np.abs(before[:, 4] - after[:, 4]).max() > 0.1  # the true-statistics column changes


def test_pasted_panel_keeps_visible_pixels_and_uses_predictions_elsewhere():
  images, p = _images(), 4
  pred = jnp.zeros((2, 16, 48))  # norm_pix 0 = a flat patch
  mask = jnp.asarray(np.arange(16) % 2, jnp.float32)[None].repeat(2, 0)
  figure = np.asarray(visualize.panels(images, pred, mask, p, True))
  removed = np.asarray(mask).reshape(2, 4, 4).repeat(4, 1).repeat(4, 2)[..., None] > 0
  np.testing.assert_array_equal(np.where(removed, figure[:, 2], figure[:, 0]), figure[:, 3])
  # A zero norm_pix prediction is flat inside each patch.
  patch = figure[0, 2, 0:4, 0:4]
  np.testing.assert_allclose(patch, np.broadcast_to(patch[0, 0], patch.shape), atol=1e-6)


def _ramps(n: int, size: int, seed: int) -> jax.Array:
  """Colour ramps in random directions: a tiny MAE learns their patches in a few steps."""
  rng = np.random.default_rng(seed)
  y, x = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
  angle = rng.uniform(0, 2 * np.pi, n)
  ramp = np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y
  return jnp.asarray(4 * ramp[..., None] * rng.normal(size=(n, 1, 1, 3))
                     + rng.normal(size=(n, 1, 1, 3)), jnp.float32)


def test_prediction_column_of_a_random_model_is_far_from_the_original_a_trained_one_closer():
  import optax  # pylint: disable=g-import-not-at-top
  model = from_config(config_lib.model_config(
      "vit_b", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, dtype="float32"))
  images = _ramps(16, 16, 0)
  noise = jnp.asarray(visualize.fixed_noise(0, 16, 16))
  render = jax.jit(lambda params: visualize.reconstruct(model, params, images, noise,
                                                        mask_ratio=0.75))

  apply = jax.jit(lambda params: model.apply({"params": params}, images, mask_ratio=0.75,
                                             noise=noise))

  def error(params):
    """Mean squared error of the prediction column on the removed pixels, in [0, 1] units."""
    figure = np.asarray(render(params))
    _, _, mask = apply(params)
    removed = np.asarray(mask).reshape(16, 4, 4).repeat(4, 1).repeat(4, 2)[..., None] > 0
    return float(np.sum((figure[:, 2] - figure[:, 0]) ** 2 * removed) / (3 * removed.sum()))

  params = model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                      images[:1])["params"]
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.grad(lambda p: model.apply({"params": p}, images, mask_ratio=0.75,
                                           rngs={"mask": key})[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  random_error = error(params)
  opt_state = tx.init(params)
  for i in range(60):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  trained_error = error(params)
  # Measured: 0.12 random, 0.036 after 50 steps.
  assert random_error > 0.08 and trained_error < random_error / 2.5, (random_error,
                                                                      trained_error)


def test_grid_enlarges_small_panels_and_lays_out_rows_and_columns():
  figure = np.random.default_rng(0).random((3, 4, 16, 16, 3)).astype(np.float32)
  grid = visualize.grid_image(figure, min_panel=64, gap=4)
  assert grid.dtype == np.uint8
  assert grid.shape == (16 + 3 * 64 + 4 * 4, 4 * 64 + 5 * 4, 3)
  top, left = 16 + 4 + 2 * (64 + 4), 4 + 1 * (64 + 4)  # row 2, column 1
  expected = np.round(figure[2, 1].repeat(4, 0).repeat(4, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(grid[top:top + 64, left:left + 64], expected)


def test_command_renders_given_images_from_a_converted_official_full_checkpoint(tmp_path):
  overrides = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                   decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, dtype="float32")
  model = from_config(config_lib.model_config("vit_b", **overrides))
  # Any params render: random draws of the model's shapes (no init to compile).
  shapes = jax.eval_shape(model.init, {"params": jax.random.key(0), "mask": jax.random.key(1)},
                          jnp.zeros((1, 32, 32, 3)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes)
  state_dict = convert.params_to_torch(params, img_size=32)  # official key names
  np.savez(tmp_path / "mae_tiny_full.npz", **state_dict)
  flags = [f"--config.model.{k}={v}" for k, v in overrides.items()]
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  workdir = tmp_path / "official"
  subprocess.run([sys.executable, "-m", "mae_jax.convert",
                  f"--torch_checkpoint={tmp_path / 'mae_tiny_full.npz'}",
                  f"--config={REPO}/configs/vit_b.py", f"--workdir={workdir}", *flags],
                 check=True, cwd=REPO, env=env, capture_output=True)
  photos = []
  for i, size in enumerate([(40, 30), (50, 80)]):
    photos.append(str(tmp_path / f"photo{i}.png"))
    Image.fromarray(np.random.default_rng(i).integers(0, 255, size + (3,), np.uint8)).save(
        photos[-1])
  result = subprocess.run([sys.executable, "-m", "mae_jax.visualize", f"--workdir={workdir}",
                           "--images", *photos], check=True, cwd=REPO, env=env,
                          capture_output=True, text=True)
  png = result.stdout.strip().splitlines()[-1]
  assert png == str(workdir / "visualize.png")
  with Image.open(png) as image:
    # Two rows of five 32px panels (a norm_pix model), enlarged 4x to 128px.
    assert image.size == (5 * 128 + 6 * 4, 16 + 2 * 128 + 3 * 4)


def test_encoder_only_params_are_refused_with_the_fix(tmp_path):
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config = config_lib.pretrain_config("vit_b")
  checkpoint.save_params(str(tmp_path), {"embedding": {"bias": jnp.zeros(4)}}, config)
  with pytest.raises(ValueError, match=r"\*_full checkpoint"):
    visualize.render(str(tmp_path))
