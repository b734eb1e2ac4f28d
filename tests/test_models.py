"""Exact tests of the MAE pieces and of the model's invariants."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import config_lib
from mae_jax.models import (MaskedAutoencoder, from_config, image_hw, normalized_targets,
                            num_kept, num_patches, patch_grid, patchify, random_masking,
                            scan_to_unrolled, sincos_pos_embed_2d, unnormalize_pred, unpatchify,
                            unrolled_to_scan)

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0,
            norm_pix_loss=True)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _init(model, batch=2):
  images = jnp.zeros((batch, *image_hw(model.img_size), model.in_chans))
  return model.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, images)["params"]


@functools.lru_cache(maxsize=None)
def _cached_params(overrides):
  return jax.jit(lambda: _init(MaskedAutoencoder(**dict(TINY, **dict(overrides)))))()


def _params(**overrides):
  """`_init` of MaskedAutoencoder(**TINY, **overrides), compiled as one program and built once
  per model for the tests that share it (the params do not depend on the batch size)."""
  return _cached_params(tuple(sorted(overrides.items())))


@pytest.mark.parametrize("size,total,encoder", [
    ("vit_b", 111_655_680, 85_647_360),
    ("vit_l", 329_239_296, 303_099_904),
    ("vit_h", 656_613_964, 630_435_840),
])
def test_param_counts_equal_the_official_models(size, total, encoder):
  model = from_config(config_lib.model_config(size))
  shapes = jax.eval_shape(lambda: _init(model, batch=1))
  assert _count(shapes) == total
  assert _count({k: shapes[k] for k in ("embedding", "cls", "Transformer")}) == encoder


def test_unpatchify_inverts_patchify_and_order_is_prow_pcol_channel():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 8, 3)), jnp.float32)
  p = patchify(x, 4)
  assert p.shape == (2, 6, 48)
  np.testing.assert_array_equal(unpatchify(p, 4, (3, 2), 3), x)
  # Patch 1 is row 0, column 1 of the grid; its vector is (p_row, p_col, channel).
  np.testing.assert_array_equal(p[1, 1].reshape(4, 4, 3), x[1, 0:4, 4:8, :])


def test_sincos_table_layout_is_mae_not_big_vision():
  dim, grid = 16, (3, 5)
  table = sincos_pos_embed_2d(dim, grid)
  assert table.shape == (1 + 15, dim)
  np.testing.assert_array_equal(table[0], 0)
  omega = 1.0 / 10000**(np.arange(4) / 4.0)
  h, w = 2, 3
  row = table[1 + h * grid[1] + w]
  expected = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega),
                             np.cos(h * omega)])
  np.testing.assert_allclose(row, expected, rtol=1e-6)


@pytest.mark.parametrize("length,ratio,keep", [(196, 0.75, 49), (256, 0.75, 64), (16, 0.5, 8),
                                               (10, 0.0, 10), (7, 0.6, 2)])
def test_num_kept_matches_official_int_rounding(length, ratio, keep):
  assert num_kept(length, ratio) == keep == int(length * (1 - ratio))


def test_masking_is_per_example_and_consistent_with_ids_restore():
  b, length, d = 16, 49, 5
  x = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32)[None, :, None], (b, length, d))
  noise = jax.random.uniform(jax.random.key(0), (b, length))
  visible, mask, ids_restore = random_masking(x, 0.75, noise)
  keep = num_kept(length, 0.75)
  assert visible.shape == (b, keep, d)
  np.testing.assert_array_equal(mask.sum(1), length - keep)
  kept_ids = np.asarray(visible[:, :, 0]).astype(int)
  for i in range(b):
    # Kept tokens are exactly the ones the mask marks visible, smallest noise first.
    assert set(kept_ids[i]) == set(np.flatnonzero(np.asarray(mask[i]) == 0))
    np.testing.assert_array_equal(kept_ids[i], np.argsort(np.asarray(noise[i]))[:keep])
    # ids_restore inverts the shuffle.
    shuffle = np.argsort(np.asarray(noise[i]))
    np.testing.assert_array_equal(shuffle[np.asarray(ids_restore[i])], np.arange(length))
  assert len({tuple(np.flatnonzero(np.asarray(m))) for m in mask}) == b


def test_model_masks_differ_across_the_batch_without_noise():
  apply = jax.jit(MaskedAutoencoder(**TINY).apply)
  params = _params()
  images = jnp.ones((8, 32, 32, 3))
  _, _, mask = apply({"params": params}, images, rngs={"mask": jax.random.key(3)})
  assert len({tuple(np.asarray(m)) for m in mask}) > 1
  _, _, mask2 = apply({"params": params}, images, rngs={"mask": jax.random.key(3)})
  np.testing.assert_array_equal(mask, mask2)


def test_encoder_sees_only_visible_tokens_plus_cls():
  model = MaskedAutoencoder(**TINY)
  params = _params()
  images = jnp.ones((3, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(0), (3, 16))
  for ratio, keep in [(0.75, 4), (0.5, 8), (0.0, 16)]:
    # Shapes only: traced, not run.
    latent, mask, _ = jax.eval_shape(functools.partial(
        model.apply, mask_ratio=ratio, method=MaskedAutoencoder.encode),
        {"params": params}, images, noise=noise)
    assert latent.shape == (3, 1 + keep, 64)
    assert mask.shape == (3, 16)
  # The encoder's attention never runs over L tokens: trace its input shapes.
  seen = []

  def record(next_fun, args, kwargs, context):
    if context.module.__class__.__name__ == "MultiHeadDotProductAttention":
      seen.append((context.module.path, args[0].shape[1]))
    return next_fun(*args, **kwargs)

  import flax.linen as nn
  with nn.intercept_methods(record):  # the shapes are those of tracing: nothing needs to run
    jax.eval_shape(functools.partial(model.apply, mask_ratio=0.75), {"params": params}, images,
                   noise=noise)
  encoder = [t for path, t in seen if path[0] == "Transformer"]
  decoder = [t for path, t in seen if path[0] == "Decoder"]
  assert encoder == [1 + 4] * 2 and decoder == [1 + 16] * 2


def test_loss_gradient_is_zero_on_visible_patches():
  model = MaskedAutoencoder(**TINY)
  params = _params()
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(2), (2, 16))
  _, pred, mask = jax.jit(model.apply)({"params": params}, images, noise=noise)
  from mae_jax.models import mae_loss
  grad = jax.grad(lambda p: mae_loss(images, p, mask, 8, True))(pred)
  per_patch = np.abs(np.asarray(grad)).sum(-1)
  assert np.all(per_patch[np.asarray(mask) == 0] == 0)
  assert np.all(per_patch[np.asarray(mask) == 1] > 0)


def test_norm_pix_uses_unbiased_variance_and_unnormalize_inverts_it():
  patches = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 12)), jnp.float32)
  t = normalized_targets(patches)
  p = np.asarray(patches)
  expected = (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(t, expected, rtol=1e-5)
  images = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  target = normalized_targets(patchify(images, 4))
  np.testing.assert_allclose(unnormalize_pred(target, images, 4), patchify(images, 4),
                             atol=1e-5)


def test_scan_remat_matches_unrolled_loss_and_gradients():
  unrolled = MaskedAutoencoder(**TINY)
  scanned = MaskedAutoencoder(**TINY, scan=True, remat=True)
  params = _params()
  scan_params = unrolled_to_scan(params)
  assert (jax.tree.map(jnp.shape, scan_params)
          == jax.tree.map(jnp.shape, jax.eval_shape(lambda: _init(scanned))))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(2), (2, 16))

  def loss_fn(model):
    return lambda p: model.apply({"params": p}, images, noise=noise)[0]

  l1, g1 = jax.jit(jax.value_and_grad(loss_fn(unrolled)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(loss_fn(scanned)))(scan_params)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g1,
               scan_to_unrolled(g2))
  jax.tree.map(np.testing.assert_array_equal, scan_to_unrolled(scan_params), params)


def test_bfloat16_compute_stays_close_to_float32():
  params = _params()
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(2), (4, 16))
  l32, p32, _ = jax.jit(MaskedAutoencoder(**TINY).apply)({"params": params}, images, noise=noise)
  l16, p16, _ = jax.jit(MaskedAutoencoder(**TINY, dtype=jnp.bfloat16).apply)(
      {"params": params}, images, noise=noise)
  assert p16.dtype == jnp.float32 and l16.dtype == jnp.float32
  assert abs(float(l16) - float(l32)) / float(l32) < 1e-2
  assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_init_follows_official_distributions():
  params = _params(embed_dim=256, num_heads=4)
  block = params["Transformer"]["encoderblock_0"]
  attn = block["MultiHeadDotProductAttention_0"]
  # qkv is one Linear(d, 3d) officially: xavier bound sqrt(6 / (d + 3d)).
  q = np.asarray(attn["query"]["kernel"])
  assert np.abs(q).max() <= math.sqrt(6 / (4 * 256)) + 1e-7
  assert np.abs(q).max() > 0.9 * math.sqrt(6 / (4 * 256))
  out = np.asarray(attn["out"]["kernel"])
  assert np.abs(out).max() > math.sqrt(6 / (4 * 256)) * 1.1  # xavier over (d, d) is wider
  emb = np.asarray(params["embedding"]["kernel"])
  assert np.abs(emb).max() <= math.sqrt(6 / (8 * 8 * 3 + 256)) + 1e-7
  for leaf in (attn["query"]["bias"], block["LayerNorm_0"]["bias"]):
    np.testing.assert_array_equal(leaf, 0)
  np.testing.assert_array_equal(block["LayerNorm_0"]["scale"], 1)
  assert 0.015 < float(np.std(np.asarray(params["cls"]))) < 0.025
  assert abs(float(np.std(np.asarray(params["mask_token"]))) - 0.02) < 0.01


@pytest.mark.parametrize("kwargs,shape,message", [
    (dict(mask_ratio=1.0), (1, 32, 32, 3), "mask_ratio"),
    (dict(mask_ratio=-0.1), (1, 32, 32, 3), "mask_ratio"),
    (dict(), (1, 32, 32, 1), "NHWC"),
    (dict(), (1, 3, 32, 32), "NHWC"),
])
def test_bad_inputs_are_refused_with_a_clear_message(kwargs, shape, message):
  model = MaskedAutoencoder(**TINY)
  params = _params()
  with pytest.raises(ValueError, match=message):
    model.apply({"params": params}, jnp.zeros(shape), noise=jnp.zeros((1, 16)), **kwargs)


def test_patch_size_that_does_not_divide_the_image_is_refused():
  with pytest.raises(ValueError, match="patch_size"):
    _init(MaskedAutoencoder(**dict(TINY, patch_size=7)))


def _official_sincos_table(dim, rows, cols):
  """util/pos_embed.py's get_2d_sincos_pos_embed step by step (float64, as it computes), with
  its square arange(grid_size) replaced by arange(rows) for h and arange(cols) for w."""
  def one_d(d, pos):
    omega = np.arange(d // 2, dtype=np.float64)
    omega /= d / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
  grid = np.stack(grid, axis=0).reshape([2, 1, rows, cols])  # grid[0]: w first, as official
  emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros([1, dim]), emb], axis=0)


@pytest.mark.parametrize("dim,rows,cols", [(64, 4, 4), (768, 14, 14), (1280, 16, 16),
                                           (64, 4, 8), (32, 3, 5), (96, 12, 7)])
def test_sincos_table_is_the_official_construction_on_any_grid(dim, rows, cols):
  ours = sincos_pos_embed_2d(dim, (rows, cols))
  # Bit for bit the official table as the model holds it (float32), square or not.
  np.testing.assert_array_equal(ours, _official_sincos_table(dim, rows, cols).astype(np.float32))


@pytest.mark.parametrize("img_size,hw", [(224, (224, 224)), ((48, 64), (48, 64)),
                                         ([48, 64], (48, 64)), (np.int64(32), (32, 32))])
def test_image_size_is_an_int_or_a_height_width_pair(img_size, hw):
  assert image_hw(img_size) == hw
  assert patch_grid(img_size, 16) == (hw[0] // 16, hw[1] // 16)
  assert num_patches(img_size, 16) == (hw[0] // 16) * (hw[1] // 16)


@pytest.mark.parametrize("img_size", [224.0, "224", True, (48,), (48, 64, 3), (48.0, 64),
                                      0, (0, 64), (-16, 64)])
def test_bad_image_sizes_are_refused_with_what_is_accepted(img_size):
  with pytest.raises(ValueError, match="img_size"):
    image_hw(img_size)


def test_patch_size_must_divide_both_sides():
  with pytest.raises(ValueError, match="height and width"):
    patch_grid((48, 60), 8)


def test_non_square_model_embeds_patches_row_major_with_the_hw_table():
  # Zero patch-embedding weights: the encoder's input is then cls + the position table, in
  # the order of the visible patches, which must be the official row-major (row, col) order.
  model = MaskedAutoencoder(**dict(TINY, img_size=(16, 40)))
  grid = (2, 5)
  assert patch_grid(model.img_size, model.patch_size) == grid
  # The position tables are fixed, not params: the square model's params fit this one.
  params = _params()
  assert (jax.tree.map(jnp.shape, params)
          == jax.tree.map(jnp.shape, jax.eval_shape(lambda: _init(model))))
  params = dict(params, embedding=jax.tree.map(jnp.zeros_like, params["embedding"]))
  images = jax.random.normal(jax.random.key(0), (2, 16, 40, 3))
  noise = jnp.tile(jnp.linspace(0.0, 0.9, 10)[None], (2, 1))  # keeps patches 0..4 in order
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  @jax.jit
  def apply_seeing_the_encoder_input(params, images, noise):
    seen = []

    def record(next_fun, args, kwargs, context):
      if (context.module.__class__.__name__ == "Transformer"
          and context.module.name == "Transformer"):
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      outputs = model.apply({"params": params}, images, mask_ratio=0.5, noise=noise)
    return outputs, seen

  (loss, pred, mask), seen = apply_seeing_the_encoder_input(params, images, noise)
  table = sincos_pos_embed_2d(64, grid)
  np.testing.assert_allclose(seen[0][0, 1:], table[1:6], atol=1e-6)
  np.testing.assert_allclose(seen[0][0, 0], np.asarray(params["cls"])[0, 0], atol=1e-6)
  assert pred.shape == (2, 10, 8 * 8 * 3) and mask.shape == (2, 10)
  np.testing.assert_array_equal(mask[0], [0] * 5 + [1] * 5)
  assert unpatchify(pred, 8, grid, 3).shape == (2, 16, 40, 3)
  # The loss is the official one on this image's own (row-major) patches.
  expected = (np.square(np.asarray(pred) - np.asarray(normalized_targets(patchify(
      images, 8)))).mean(-1) * np.asarray(mask)).sum() / np.asarray(mask).sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  with pytest.raises(ValueError, match=r"\[batch, 16, 40, 3\]"):
    model.apply({"params": params}, jnp.zeros((2, 40, 16, 3)), noise=noise)
