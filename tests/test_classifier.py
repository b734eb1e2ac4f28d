"""The ViT classifier: same encoder as the MAE, official pooling, posemb resampling, merging."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import MaskedAutoencoder, image_hw, sincos_pos_embed_2d, unrolled_to_scan
from mae_jax.models.classifier import VisionTransformer, merge_pretrained, resample_posemb

MAE = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4.0,
           norm_pix_loss=True)
VIT = dict(num_classes=10, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


# XLA's CPU compiles dominate these tests: "pretrained" params are random numpy values in the
# MAE's abstract shapes, and classifier params are merged from them (the classifier's own init
# is compiled once, in the init test).
@functools.lru_cache(maxsize=None)
def _mae_params():
  shapes = jax.eval_shape(MaskedAutoencoder(**MAE).init,
                          {"params": jax.random.key(0), "mask": jax.random.key(1)},
                          jnp.zeros((1, 32, 32, 3)))["params"]
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: (1.0 + rng.normal(0, 0.1, x.shape)).astype(np.float32)
                      if x.ndim == 1 else rng.normal(0, 0.1, x.shape).astype(np.float32),
                      shapes)


def _shapes(model):
  images = jnp.zeros((2, *image_hw(model.img_size), 3))
  return jax.eval_shape(model.init, {"params": jax.random.key(5)}, images)


def _load(model, pretrained=None, **grids):
  """Pretrained params merged into the model; what is missing filled with N(0, 0.02)."""
  params, _ = merge_pretrained(_shapes(model)["params"], pretrained or _mae_params(), **grids)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else rng.normal(
      0, 0.02, x.shape).astype(np.float32), params)
  return {"params": params}


def _apply(model, *args, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))(*args)


def _tokens_and_features(module, images):
  return module.encode(images), module.features(images)


def test_features_at_mask_ratio_zero_equal_the_mae_encoder_latent():
  images = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
  # Increasing noise keeps the original token order at mask ratio 0.
  noise = jnp.broadcast_to(jnp.linspace(0.0, 0.9, 16), (3, 16))
  latent, mask, _ = _apply(MaskedAutoencoder(**MAE), {"params": _mae_params()}, images,
                           mask_ratio=0.0, noise=noise, method=MaskedAutoencoder.encode)
  assert float(mask.sum()) == 0
  model = VisionTransformer(**VIT, global_pool=False)
  tokens, features = _apply(model, _load(model), images, method=_tokens_and_features)
  np.testing.assert_allclose(tokens, latent, atol=1e-6, rtol=0)
  np.testing.assert_allclose(features, latent[:, 0], atol=1e-6, rtol=0)


def test_global_pool_normalizes_the_mean_of_pre_norm_patch_tokens():
  mae_params = _mae_params()
  images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  gap = VisionTransformer(**VIT, global_pool=True)
  gap_vars = _load(gap)
  assert "encoder_norm" not in gap_vars["params"]["Transformer"]
  gap_vars["params"]["fc_norm"] = {"scale": np.ones(64, np.float32),
                                   "bias": np.zeros(64, np.float32)}
  pre_norm, features = _apply(gap, gap_vars, images, method=_tokens_and_features)
  # The cls-token model's tokens are the same tokens after encoder_norm.
  cls_model = VisionTransformer(**VIT, global_pool=False)
  normed = _apply(cls_model, _load(cls_model), images, method=VisionTransformer.encode)
  scale = np.asarray(mae_params["Transformer"]["encoder_norm"]["scale"])
  bias = np.asarray(mae_params["Transformer"]["encoder_norm"]["bias"])

  def layer_norm(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)

  np.testing.assert_allclose(normed, layer_norm(pre_norm) * scale + bias, atol=2e-5)
  np.testing.assert_allclose(features, layer_norm(np.asarray(pre_norm)[:, 1:].mean(1)),
                             atol=2e-5)


def test_encoder_params_have_the_mae_layout():
  mae_params = _mae_params()
  encoder = {k: mae_params[k] for k in ("embedding", "cls", "Transformer")}
  shapes = jax.tree.map(np.shape, encoder)
  cls_params = _shapes(VisionTransformer(**VIT, global_pool=False))["params"]
  assert jax.tree.map(lambda x: x.shape, {k: cls_params[k] for k in shapes}) == shapes
  assert set(cls_params) == set(shapes) | {"pos_embedding", "head"}
  _, report = merge_pretrained(cls_params, mae_params)
  assert report["missing"] == ["head/bias", "head/kernel"]
  assert report["mismatched"] == []
  assert report["extra"] and all(p.startswith(("Decoder/", "decoder_", "mask_token"))
                                 for p in report["extra"])
  _, gap_report = merge_pretrained(_shapes(VisionTransformer(**VIT))["params"], mae_params)
  assert gap_report["missing"] == ["fc_norm/bias", "fc_norm/scale", "head/bias", "head/kernel"]
  assert {"Transformer/encoder_norm/bias", "Transformer/encoder_norm/scale"} <= set(
      gap_report["extra"])
  other = _shapes(VisionTransformer(**dict(VIT, num_classes=7), global_pool=False))["params"]
  _, mismatch = merge_pretrained(other, _load(VisionTransformer(**VIT, global_pool=False))[
      "params"])
  assert mismatch["mismatched"] == ["head/bias (10,) -> (7,)", "head/kernel (64, 10) -> (64, 7)"]


def test_scanned_classifier_takes_unrolled_pretrained_params():
  images = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
  unrolled = VisionTransformer(**VIT, global_pool=False)
  scanned = VisionTransformer(**VIT, global_pool=False, scan=True)
  variables = _load(unrolled)
  ref = _apply(unrolled, variables, images)
  scan_vars = _load(scanned, variables["params"])
  assert "encoderblock" in scan_vars["params"]["Transformer"]
  np.testing.assert_allclose(_apply(scanned, scan_vars, images), ref, atol=1e-6)
  # And scanned params back into the unrolled model.
  back, report = merge_pretrained(_shapes(unrolled)["params"],
                                  unrolled_to_scan(variables["params"]))
  assert report["missing"] == report["extra"] == []
  jax.tree.map(np.testing.assert_array_equal, back, variables["params"])


def test_resample_posemb_is_torch_bicubic_interpolation():
  import torch  # pylint: disable=g-import-not-at-top
  table = sincos_pos_embed_2d(16, (3, 5), cls_token=False)
  ours = resample_posemb(table, (3, 5), (7, 4))
  grid = torch.tensor(table).reshape(1, 3, 5, 16).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(7, 4), mode="bicubic",
                                        align_corners=False)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).reshape(28, 16).numpy(), atol=1e-5)
  np.testing.assert_array_equal(resample_posemb(table, (3, 5), (3, 5)), table)


def test_position_table_is_resampled_to_a_new_image_size():
  model = VisionTransformer(**dict(VIT, img_size=48), global_pool=False)
  params, report = merge_pretrained(_shapes(model)["params"], _mae_params(),
                                    pretrained_grid=(4, 4))
  assert report["pos_embedding"] == ["4x4 -> 6x6"]  # logged, as the official code prints it
  table = sincos_pos_embed_2d(64, (4, 4))
  expected = np.concatenate([table[:1], resample_posemb(table[1:], (4, 4), (6, 6))])
  np.testing.assert_allclose(params["pos_embedding"][0], expected, atol=1e-6)
  # A classifier's own (learned) table is resampled from its grid; the cls row is kept.
  small = VisionTransformer(**dict(VIT, img_size=24), global_pool=False)
  params2, _ = merge_pretrained(_shapes(small)["params"], params)
  np.testing.assert_allclose(params2["pos_embedding"][0, 1:],
                             resample_posemb(expected[1:], (6, 6), (3, 3)), atol=1e-6)
  np.testing.assert_array_equal(params2["pos_embedding"][0, 0], expected[0])


def test_position_tables_are_resampled_between_non_square_grids():
  # A square MAE (4x4 patches) fine-tuned at 32x64 (4x8), then moved to 48x40 (6x5).
  wide = VisionTransformer(**dict(VIT, img_size=(32, 64)), global_pool=False)
  params, _ = merge_pretrained(_shapes(wide)["params"], _mae_params(), pretrained_grid=(4, 4),
                               grid=(4, 8))
  table = sincos_pos_embed_2d(64, (4, 4))
  expected = np.concatenate([table[:1], resample_posemb(table[1:], (4, 4), (4, 8))])
  np.testing.assert_allclose(params["pos_embedding"][0], expected, atol=1e-6)
  other = VisionTransformer(**dict(VIT, img_size=(48, 40)), global_pool=False)
  params2, _ = merge_pretrained(_shapes(other)["params"], params, pretrained_grid=(4, 8),
                                grid=(6, 5))
  np.testing.assert_allclose(params2["pos_embedding"][0, 1:],
                             resample_posemb(expected[1:], (4, 8), (6, 5)), atol=1e-6)
  # A non-square table's grid cannot be guessed from its length: it must be given, and match.
  with pytest.raises(ValueError, match="not a square grid"):
    merge_pretrained(_shapes(other)["params"], params, grid=(6, 5))
  with pytest.raises(ValueError, match="not the 5x7 grid"):
    merge_pretrained(_shapes(other)["params"], params, pretrained_grid=(5, 7), grid=(6, 5))
  # The non-square classifier runs on H x W images and refuses transposed ones.
  variables = _load(wide, pretrained_grid=(4, 4), grid=(4, 8))
  logits = _apply(wide, variables, jnp.ones((2, 32, 64, 3)))
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match=r"\[batch, 32, 64, 3\]"):
    wide.apply(variables, jnp.ones((2, 64, 32, 3)))


def test_drop_path_acts_only_in_training():
  model = VisionTransformer(**VIT, drop_path=0.5)
  variables = _load(model)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

  @jax.jit
  def both(key):
    return model.apply(variables, images, method=lambda m, x: (m(x), m(x, train=True)),
                       rngs={"dropout": key})

  evaluated, trained = both(jax.random.key(0))
  evaluated2, trained2 = both(jax.random.key(1))
  np.testing.assert_array_equal(evaluated, evaluated2)
  assert not np.allclose(trained, evaluated, atol=1e-4)
  assert not np.allclose(trained, trained2, atol=1e-4)


def test_heads_follow_the_official_inits_and_batchnorm():
  probe = VisionTransformer(**dict(VIT, num_classes=400), global_pool=False,
                            head_batchnorm=True, head_init_std=2e-5)
  variables = jax.jit(probe.init)({"params": jax.random.key(5)}, jnp.zeros((2, 32, 32, 3)))
  head = variables["params"]["head"]
  assert 1.8e-5 < float(np.std(head["kernel"])) < 2.2e-5
  np.testing.assert_array_equal(head["bias"], 0)
  np.testing.assert_allclose(variables["params"]["pos_embedding"][0],
                             sincos_pos_embed_2d(64, (4, 4)))
  assert set(variables["batch_stats"]["head_norm"]) == {"mean", "var"}
  assert "head_norm" not in variables["params"]  # no affine params
  feats = jax.random.normal(jax.random.key(0), (8, 64)) * 3 + 1
  logits, updates = _apply(probe, variables, feats, train=True,
                           method=VisionTransformer.classify, mutable=["batch_stats"])
  f = np.asarray(feats, np.float64)
  normed = (f - f.mean(0)) / np.sqrt(f.var(0) + 1e-6)
  np.testing.assert_allclose(logits, normed @ np.asarray(head["kernel"]), atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["head_norm"]["mean"], 0.1 * f.mean(0),
                             rtol=1e-5, atol=1e-7)


def test_official_fine_tuned_state_dicts_convert_with_their_learned_table():
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
  model = VisionTransformer(**VIT, global_pool=True)
  params = _load(model)["params"]
  params["pos_embedding"] = params["pos_embedding"] + 0.5  # as if trained
  sd = convert.params_to_torch(params, img_size=32)
  assert {"pos_embed", "fc_norm.weight", "head.weight"} <= set(sd)
  assert "norm.weight" not in sd  # the official global-pool model deletes it
  np.testing.assert_array_equal(sd["pos_embed"], params["pos_embedding"])
  back = convert.params_from_torch(sd)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert jax.tree.map(np.shape, back) == jax.tree.map(lambda x: x.shape, _shapes(model)["params"])
