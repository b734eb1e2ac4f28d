"""The exported encoder drops into a ViT written against the big_vision layout."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mae_jax
from mae_jax import checkpoint, config_lib, export
from mae_jax.models import MaskedAutoencoder, from_config, sincos_pos_embed_2d
from mae_jax.models.classifier import VisionTransformer

MODEL = config_lib.model_config("vit_b", img_size=32, patch_size=8, embed_dim=64, depth=2,
                                num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                                decoder_num_heads=4, dtype="float32")


# A ViT in big_vision's layout, written here from its parameter names alone: Conv patch
# embedding, learned posemb added to the patch tokens, cls prepended, pre-norm blocks of flax's
# own MultiHeadDotProductAttention (DenseGeneral kernels), final encoder_norm.
class Mlp(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim)(x), approximate=False)
    return nn.Dense(x.shape[-1])(y)


class Block(nn.Module):
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
    return x + Mlp(self.mlp_dim, name="MlpBlock_0")(nn.LayerNorm(epsilon=1e-6)(x))


class Encoder(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(x)


class BigVisionViT(nn.Module):
  patch: int
  width: int
  depth: int
  num_heads: int

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", name="embedding")(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, c))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    return Encoder(self.depth, self.num_heads, 4 * c, name="Transformer")(x)


def _random_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)


def _mae_params():
  shapes = jax.eval_shape(from_config(MODEL).init, {"params": jax.random.key(0),
                                                    "mask": jax.random.key(0)},
                          jnp.zeros((1, 32, 32, 3)))["params"]
  return _random_params(shapes)


def test_exported_npz_gives_the_mae_encoder_features_in_a_big_vision_vit(tmp_path):
  params = _mae_params()
  config = config_lib.pretrain_config("vit_b")
  config.model = MODEL
  workdir, npz = str(tmp_path / "pretrain"), str(tmp_path / "encoder.npz")
  checkpoint.save_params(workdir, params, config)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "mae_jax.export", f"--workdir={workdir}",
                        f"--output={npz}"], capture_output=True, text=True, env=env, check=True)
  assert "wrote" in out.stdout
  # Orbax's INFO lines (every file it reads) stay out of the command's output.
  assert "checkpointer.py" not in out.stderr and "event_tracking.py" not in out.stderr, out.stderr
  with np.load(npz) as f:
    keys = set(f.files)
    assert f["Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"].shape == (
        64, 4, 16)
    assert f["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel"].shape == (
        4, 16, 64)
    assert f["pos_embedding"].shape == (1, 16, 64)
  assert not any(k.startswith(("Decoder", "decoder", "mask_token")) for k in keys)

  encoder = mae_jax.load_encoder_params(npz)
  vit = BigVisionViT(patch=8, width=64, depth=2, num_heads=4)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  expected_shapes = jax.eval_shape(vit.init, jax.random.key(0), images)["params"]
  # Exactly big_vision's names and shapes: nothing missing, nothing extra.
  assert jax.tree.map(lambda x: x.shape, expected_shapes) == jax.tree.map(np.shape, encoder)
  tokens = jax.jit(vit.apply)({"params": encoder}, images)
  noise = jnp.broadcast_to(jnp.linspace(0.0, 0.9, 16), (2, 16))  # keeps the token order
  latent, _, _ = jax.jit(lambda p, x: from_config(MODEL).apply(
      {"params": p}, x, mask_ratio=0.0, noise=noise, method=MaskedAutoencoder.encode))(
          params, images)
  np.testing.assert_allclose(tokens, latent, atol=2e-5, rtol=1e-5)
  # The same tree straight from the workdir.
  jax.tree.map(np.testing.assert_array_equal, mae_jax.load_encoder_params(workdir), encoder)


def test_classifier_params_export_with_their_learned_table_and_head():
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  kwargs = dict(num_classes=5, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
  gap = VisionTransformer(**kwargs, global_pool=True)
  gap_params = _random_params(jax.eval_shape(gap.init, jax.random.key(0), images)["params"])
  gap_encoder = export.to_big_vision(gap_params, num_heads=4)
  assert "encoder_norm" not in gap_encoder["Transformer"]
  assert {"fc_norm", "head"} <= set(gap_encoder)
  model = VisionTransformer(**kwargs, global_pool=False)
  params = _random_params(jax.eval_shape(model.init, jax.random.key(0), images)["params"], 3)
  assert np.abs(params["pos_embedding"][0, 0]).max() > 0.1  # a learned cls row
  encoder = export.to_big_vision(params, num_heads=4)
  vit = BigVisionViT(patch=8, width=64, depth=2, num_heads=4)
  # The cls row of the learned table is folded into cls: the same tokens.
  tokens = jax.jit(vit.apply)({"params": {k: v for k, v in encoder.items() if k != "head"}},
                              images)
  np.testing.assert_allclose(tokens, jax.jit(lambda p, x: model.apply(
      {"params": p}, x, method=VisionTransformer.encode))(params, images), atol=2e-5, rtol=1e-5)


def test_an_export_under_any_name_reads_back_and_serves_as_init_from(tmp_path):
  params = _mae_params()
  config = config_lib.pretrain_config("vit_b")
  config.model = MODEL
  workdir, out = str(tmp_path / "pretrain"), str(tmp_path / "encoder")  # no .npz suffix
  checkpoint.save_params(workdir, params, config)
  written = export.export_workdir(workdir, out)
  jax.tree.map(np.testing.assert_array_equal, mae_jax.load_encoder_params(out), written)
  # As config.init_from: the encoder's params again, the table as a classifier's (cls row 0).
  loaded, source_config = checkpoint.load_params(out)
  assert source_config is None
  table = loaded.pop("pos_embedding")
  np.testing.assert_allclose(table[0], sincos_pos_embed_2d(64, (4, 4)), atol=1e-6)
  encoder = {k: v for k, v in params.items() if k in ("embedding", "cls", "Transformer")}
  jax.tree.map(np.testing.assert_array_equal, loaded, encoder)


def test_a_linear_probe_exports_its_head_with_the_batchnorm_folded_in(tmp_path):
  # A linear probe's head sees BatchNorm(features) (running statistics, no affine): exported
  # without them, the head would give other logits in any model that loads it.
  kwargs = dict(num_classes=5, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                global_pool=False, head_batchnorm=True, dtype="float32")
  model = VisionTransformer(**kwargs)
  images = jax.random.normal(jax.random.key(4), (3, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  params = _random_params(variables["params"], 5)
  rng = np.random.default_rng(6)
  stats = {"head_norm": {"mean": rng.normal(0, 1, 64).astype(np.float32),
                         "var": rng.uniform(0.01, 4, 64).astype(np.float32)}}
  config = config_lib.linprobe_config("vit_b")
  config.model = config_lib.classifier_model_config("vit_b", **kwargs)
  workdir, npz = str(tmp_path / "probe"), str(tmp_path / "probe.npz")
  checkpoint.save_params(workdir, params, config, batch_stats=stats)
  expected = model.apply({"params": params, "batch_stats": stats}, images)
  vit = BigVisionViT(patch=8, width=64, depth=2, num_heads=4)
  for encoder in (export.export_workdir(workdir, npz), mae_jax.load_encoder_params(npz),
                  mae_jax.load_encoder_params(workdir)):
    tokens = jax.jit(vit.apply)({"params": {k: v for k, v in encoder.items() if k != "head"}},
                                images)
    logits = tokens[:, 0] @ encoder["head"]["kernel"] + encoder["head"]["bias"]
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_export_checks_its_output_and_heads_first_and_never_leaves_half_a_file(tmp_path,
                                                                               monkeypatch):
  params = _mae_params()
  config = config_lib.pretrain_config("vit_b")
  config.model = MODEL
  workdir = str(tmp_path / "pretrain")
  checkpoint.save_params(workdir, params, config)
  (tmp_path / "a_file").write_text("not a directory")
  read = checkpoint.load_variables

  def not_read(*_, **__):
    raise AssertionError("the checkpoint was read before the output was checked")

  monkeypatch.setattr(checkpoint, "load_variables", not_read)
  bad_outputs = [(export.export_workdir, str(tmp_path), "is a directory"),
                 (export.export_workdir, str(tmp_path / "a_file" / "x.npz"), "not a directory"),
                 (export.export_transformers, str(tmp_path / "a_file"), "is a file"),
                 (export.export_transformers, str(tmp_path / "a_file" / "hf"), "not a directory")]
  for function, output, message in bad_outputs:
    try:
      function(workdir, output)
      raise AssertionError(f"{function.__name__} to {output} passed")
    except ValueError as e:
      assert message in str(e) and output in str(e), str(e)
  monkeypatch.setattr(checkpoint, "load_variables", read)
  # Heads other than the ones the params were trained with would split the kernels wrongly.
  for function in (export.export_workdir, export.export_transformers):
    try:
      function(workdir, str(tmp_path / "out"), num_heads=2)
      raise AssertionError("--num_heads=2 for a 4-head model passed")
    except ValueError as e:
      assert "--num_heads=2, but" in str(e) and "4 heads" in str(e), str(e)
  assert not (tmp_path / "out").exists()
  # Missing folders are made; a failed write keeps the earlier file whole, with no leftovers.
  npz = tmp_path / "new" / "dir" / "encoder.npz"
  written = export.export_workdir(workdir, str(npz), num_heads=4)
  before = npz.read_bytes()

  def disk_full(*_, **__):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(np, "savez", disk_full)
  try:
    export.export_workdir(workdir, str(npz))
    raise AssertionError("the failed write passed")
  except OSError:
    pass
  assert npz.read_bytes() == before and os.listdir(npz.parent) == ["encoder.npz"]
  jax.tree.map(np.testing.assert_array_equal, mae_jax.load_encoder_params(str(npz)), written)
