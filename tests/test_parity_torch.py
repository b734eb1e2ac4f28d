"""Parity with an independent PyTorch implementation of the official MAE: transformers'
ViTMAEForPreTraining with random weights, mapped into the official key layout and converted with
`params_from_torch`."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mae_jax import checkpoint, config_lib, convert, export
from mae_jax.convert import official_from_transformers, params_from_torch, params_to_torch
from mae_jax.models import MaskedAutoencoder, from_config, image_hw, sincos_pos_embed_2d
from torch_tools import official_state_dict as _official_state_dict
from torch_tools import vitmae as _hf_model

SHAPES = {
    # (img, patch, width, depth, heads, dec width, dec depth, dec heads)
    "two_heads": (32, 8, 64, 2, 2, 32, 2, 4),
    "eight_heads": (24, 4, 96, 3, 8, 48, 1, 3),
}


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_matches_transformers_vitmae(shape, norm_pix):
  img, patch, width, depth, heads, dwidth, ddepth, dheads = SHAPES[shape]
  hf = _hf_model(*SHAPES[shape], norm_pix)
  sd = _official_state_dict(hf)
  params = params_from_torch(sd)
  model = MaskedAutoencoder(img_size=img, patch_size=patch, in_chans=3, embed_dim=width,
                            depth=depth, num_heads=heads, decoder_embed_dim=dwidth,
                            decoder_depth=ddepth, decoder_num_heads=dheads, mlp_ratio=4.0,
                            norm_pix_loss=norm_pix)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(3, img, img, 3)).astype(np.float32)
  num_patches = (img // patch)**2
  noise = rng.uniform(size=(3, num_patches)).astype(np.float32)
  with torch.no_grad():
    out = hf(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise))
  # Each of the two applies compiled as one program rather than run op by op.
  loss, pred, mask = jax.jit(functools.partial(model.apply, mask_ratio=0.75))(
      {"params": params}, images, noise=noise)
  np.testing.assert_array_equal(np.asarray(mask), out.mask.numpy())
  np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(pred), out.logits.numpy(), rtol=1e-5, atol=1e-5)
  latent, mask2, ids_restore = jax.jit(functools.partial(
      model.apply, mask_ratio=0.75, method=MaskedAutoencoder.encode))(
          {"params": params}, images, noise=noise)
  with torch.no_grad():
    enc = hf.vit(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise))
  np.testing.assert_allclose(np.asarray(latent), enc.last_hidden_state.numpy(),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(ids_restore), enc.ids_restore.numpy())
  np.testing.assert_array_equal(np.asarray(mask2), enc.mask.numpy())


def test_position_tables_match_transformers():
  hf = _hf_model(*SHAPES["two_heads"], False)
  sd = _official_state_dict(hf)
  np.testing.assert_allclose(sd["pos_embed"][0], sincos_pos_embed_2d(64, (4, 4)), atol=1e-6)
  np.testing.assert_allclose(sd["decoder_pos_embed"][0], sincos_pos_embed_2d(32, (4, 4)),
                             atol=1e-6)


def test_encoder_only_state_dict_gives_encoder_params_that_encode():
  img, patch, width, depth, heads, dwidth, ddepth, dheads = SHAPES["eight_heads"]
  hf = _hf_model(*SHAPES["eight_heads"], False)
  full = _official_state_dict(hf)
  encoder_only = {k: v for k, v in full.items()
                  if not k.startswith(("decoder", "mask_token"))}
  params = params_from_torch(encoder_only)
  assert set(params) == {"embedding", "cls", "Transformer"}
  model = MaskedAutoencoder(img_size=img, patch_size=patch, embed_dim=width, depth=depth,
                            num_heads=heads, decoder_embed_dim=dwidth, decoder_depth=ddepth,
                            decoder_num_heads=dheads)
  images = np.random.default_rng(3).normal(size=(2, img, img, 3)).astype(np.float32)
  noise = np.random.default_rng(4).uniform(size=(2, (img // patch)**2)).astype(np.float32)
  latent, _, _ = model.apply({"params": params}, images, noise=noise,
                             method=MaskedAutoencoder.encode)
  with torch.no_grad():
    enc = hf.vit(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise))
  np.testing.assert_allclose(np.asarray(latent), enc.last_hidden_state.numpy(),
                             rtol=1e-5, atol=1e-5)


def test_params_to_torch_round_trips_and_loads_strictly():
  hf = _hf_model(*SHAPES["two_heads"], True)
  sd = _official_state_dict(hf)
  params = params_from_torch(sd)
  back = params_to_torch(params, img_size=SHAPES["two_heads"][0])
  assert set(back) == set(sd)
  for key, value in sd.items():
    np.testing.assert_allclose(back[key], value, atol=1e-7, err_msg=key)
  again = params_from_torch(back)
  jax.tree.map(np.testing.assert_array_equal, again, params)


# --- transformers checkpoints, both ways -----------------------------------------------------------

def _encode(model, params, images, noise):
  """mae_jax's latent in float32."""
  return jax.jit(lambda p, x, n: model.clone(dtype=jnp.float32).apply(
      {"params": p}, x, mask_ratio=0.75, noise=n, method=MaskedAutoencoder.encode)[0])(
          params, images, noise)


def _outputs(model, params, images, noise):
  """(loss, pred, mask, latent) of mae_jax in float32, in one compiled call (op by op, the
  two passes took 7 s on this machine's busy CPUs)."""
  model = model.clone(dtype=jnp.float32)

  def outputs(p, x, n):
    loss, pred, mask = model.apply({"params": p}, x, mask_ratio=0.75, noise=n)
    latent = model.apply({"params": p}, x, mask_ratio=0.75, noise=n,
                         method=MaskedAutoencoder.encode)[0]
    return loss, pred, mask, latent

  return jax.jit(outputs)(params, images, noise)


def _inputs(img, patch, seed=5):
  rng = np.random.default_rng(seed)
  h, w = image_hw(img)
  images = rng.normal(size=(2, h, w, 3)).astype(np.float32)
  return images, rng.uniform(size=(2, (h // patch) * (w // patch))).astype(np.float32)


def _torch(images, noise):
  return torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(noise)


@pytest.mark.parametrize("form", ["save_pretrained", "model.safetensors", "pytorch_model.bin",
                                  "encoder_only"])
def test_transformers_checkpoints_convert_with_their_own_config(tmp_path, form):
  img, patch, width, depth, heads, dwidth, ddepth, dheads = SHAPES["eight_heads"]
  hf = _hf_model(*SHAPES["eight_heads"], norm_pix=True)
  if form == "encoder_only":
    hf = hf.vit  # a ViTMAEModel
  hf.save_pretrained(tmp_path / "hf")  # transformers 5 writes the 4.x key names
  path = tmp_path / "hf"
  if form == "model.safetensors":
    path = path / form
  elif form == "pytorch_model.bin":  # torch.save of the in-memory (5.x) names
    os.remove(path / "model.safetensors")
    torch.save(hf.state_dict(), path / form)
  # No --config: every model field comes from the checkpoint (arrays and config.json).
  convert.convert(str(path), str(tmp_path / "workdir"))
  params, config = checkpoint.load_params(str(tmp_path / "workdir"))
  m = config.model
  assert (m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio) == (
      img, patch, width, depth, heads, 4.0)
  images, noise = _inputs(img, patch)
  with torch.no_grad():
    out = hf(*_torch(images, noise))
  if form == "encoder_only":
    assert "decoder_embed" not in params
    np.testing.assert_allclose(_encode(from_config(m), params, images, noise),
                               out.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)
    return
  loss, pred, mask, latent = _outputs(from_config(m), params, images, noise)
  with torch.no_grad():
    enc = hf.vit(*_torch(images, noise))
  assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.norm_pix_loss) == (
      dwidth, ddepth, dheads, True)
  np.testing.assert_array_equal(np.asarray(mask), out.mask.numpy())
  np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
  np.testing.assert_allclose(pred, out.logits.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(latent, enc.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)


def _mae_workdir(path, shape, encoder_only=False, img_size=None):
  img, patch, width, depth, heads, dwidth, ddepth, dheads = SHAPES[shape]
  img = img_size or img
  config = config_lib.pretrain_config("vit_b")
  config.model = config_lib.model_config(
      "vit_b", img_size=img, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
      decoder_embed_dim=dwidth, decoder_depth=ddepth, decoder_num_heads=dheads,
      norm_pix_loss=True, dtype="float32")
  model = from_config(config.model)
  shapes = jax.eval_shape(model.init, {"params": jax.random.key(0), "mask": jax.random.key(0)},
                          jnp.zeros((1, *image_hw(img), 3)))["params"]
  rng = np.random.default_rng(7)
  params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  if encoder_only:
    params = {k: v for k, v in params.items() if k not in convert.DECODER_PARAMS}
  checkpoint.save_params(str(path), params, config)
  return model, params


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_export_writes_what_transformers_loads_and_convert_reads_back(tmp_path, shape):
  model, params = _mae_workdir(tmp_path / "workdir", shape)
  out = tmp_path / "hf"
  subprocess.run([sys.executable, "-m", "mae_jax.export", f"--workdir={tmp_path / 'workdir'}",
                  "--format=transformers", f"--output={out}"], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True)
  hf = transformers.ViTMAEForPreTraining.from_pretrained(out, attn_implementation="eager").eval()
  images, noise = _inputs(model.img_size, model.patch_size, seed=8)
  loss, pred, mask, latent = _outputs(model, params, images, noise)
  with torch.no_grad():
    got = hf(*_torch(images, noise))
    enc = hf.vit(*_torch(images, noise))
  np.testing.assert_array_equal(np.asarray(mask), got.mask.numpy())
  np.testing.assert_allclose(float(loss), got.loss.item(), rtol=1e-5)
  np.testing.assert_allclose(pred, got.logits.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(latent, enc.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)
  # ... and back: the same params.
  state_dict, hf_config = convert.load_checkpoint(str(out))
  back, _, config = convert.checked_conversion(state_dict, hf_config=hf_config)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert (config.model.num_heads, config.model.decoder_num_heads) == (model.num_heads,
                                                                      model.decoder_num_heads)


def test_encoder_only_workdir_exports_a_vitmae_model(tmp_path):
  model, params = _mae_workdir(tmp_path / "workdir", "two_heads", encoder_only=True)
  sd, hf_config = export.to_transformers(*checkpoint.load_params(str(tmp_path / "workdir")))
  assert hf_config["architectures"] == ["ViTMAEModel"]
  export.export_transformers(str(tmp_path / "workdir"), str(tmp_path / "hf"))
  mode = lambda name: (tmp_path / "hf" / name).stat().st_mode & 0o777
  assert mode("model.safetensors") == mode("config.json")  # not safetensors' private 600
  hf = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf",
                                                attn_implementation="eager").eval()
  assert set(hf.state_dict()) >= {k.replace("encoder.layer.", "layers.") for k in sd
                                  if "attention" not in k and "dense" not in k}
  images, noise = _inputs(model.img_size, model.patch_size, seed=9)
  latent = _encode(model, params, images, noise)
  with torch.no_grad():
    got = hf(*_torch(images, noise))
  np.testing.assert_allclose(latent, got.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("img_size", [(16, 64), (32, 16)])
def test_non_square_export_gives_mae_jax_outputs_where_transformers_runs_it(tmp_path, caplog,
                                                                            img_size):
  # (16, 64) at patch 8: a 2x8 grid, 16 patches, so transformers can build ViTMAEForPreTraining;
  # (32, 16): 4x2, 8 patches, for which it cannot (its decoder makes a square table).
  model, params = _mae_workdir(tmp_path / "workdir", "two_heads", img_size=img_size)
  out = tmp_path / "hf"
  with caplog.at_level("WARNING"):
    sd = export.export_transformers(str(tmp_path / "workdir"), str(out))
  assert f"img_size {img_size} is not square" in caplog.text
  assert "interpolate_pos_encoding=True" in caplog.text
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["image_size"] == list(img_size)
  assert hf_config["architectures"] == ["ViTMAEModel"]
  images, noise = _inputs(img_size, model.patch_size, seed=10)
  loss, pred, mask, latent = _outputs(model, params, images, noise)
  encoder = transformers.ViTMAEModel.from_pretrained(out, attn_implementation="eager").eval()
  # The exported (not a re-made square) table is the one in use.
  np.testing.assert_array_equal(encoder.embeddings.position_embeddings.detach().numpy(),
                                sd["vit.embeddings.position_embeddings"])
  with torch.no_grad():
    got = encoder(*_torch(images, noise))
  np.testing.assert_allclose(latent, got.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(mask), got.mask.numpy())
  if img_size == (32, 16):
    assert "cannot be built for a 4x2 patch grid" in caplog.text
    with pytest.raises(RuntimeError):
      transformers.ViTMAEForPreTraining.from_pretrained(out)
  else:
    assert "ViTMAEForPreTraining builds" in caplog.text
    hf = transformers.ViTMAEForPreTraining.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf.decoder.decoder_pos_embed.detach().numpy(),
                                  sd["decoder.decoder_pos_embed"])
    with torch.no_grad():
      enc = hf.vit(*_torch(images, noise))
      logits = hf.decoder(enc.last_hidden_state, enc.ids_restore).logits
      np.testing.assert_allclose(latent, enc.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(pred, logits.numpy(), rtol=1e-5, atol=1e-5)
      with pytest.raises(ValueError, match="squared size"):  # what the warning says
        hf(*_torch(images, noise))
  # mae_jax.convert reads the whole model back, decoder included.
  state_dict, hf_config = convert.load_checkpoint(str(out))
  back, _, config = convert.checked_conversion(state_dict, hf_config=hf_config)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert tuple(config.model.img_size) == img_size
