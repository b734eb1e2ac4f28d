"""Parity with an independent PyTorch implementation of the official MAE: transformers'
ViTMAEForPreTraining with random weights, mapped into the official key layout and converted with
`params_from_torch`."""

import re

import jax
import numpy as np
import pytest
import torch
import transformers

from mae_jax.convert import params_from_torch, params_to_torch
from mae_jax.models import MaskedAutoencoder, sincos_pos_embed_2d

# transformers' key fragments -> the official models_mae.py ones.
_HF_TO_OFFICIAL = [
    (r"^vit\.embeddings\.cls_token$", "cls_token"),
    (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^vit\.layers\.", "blocks."),
    (r"^vit\.layernorm\.", "norm."),
    (r"^decoder\.decoder_layers\.", "decoder_blocks."),
    (r"^decoder\.", ""),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
]

SHAPES = {
    # (img, patch, width, depth, heads, dec width, dec depth, dec heads)
    "two_heads": (32, 8, 64, 2, 2, 32, 2, 4),
    "eight_heads": (24, 4, 96, 3, 8, 48, 1, 3),
}


def _hf_model(img, patch, width, depth, heads, dwidth, ddepth, dheads, norm_pix):
  config = transformers.ViTMAEConfig(
      hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
      intermediate_size=4 * width, image_size=img, patch_size=patch, num_channels=3,
      decoder_hidden_size=dwidth, decoder_num_hidden_layers=ddepth,
      decoder_num_attention_heads=dheads, decoder_intermediate_size=4 * dwidth,
      layer_norm_eps=1e-6, hidden_act="gelu", norm_pix_loss=norm_pix, mask_ratio=0.75,
      attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.ViTMAEForPreTraining(config).eval()
  # transformers 5 can leave the fixed sin-cos tables at zero on a fresh model; fill them with
  # its own table code (independent of ours), before randomizing every trainable weight.
  model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
  model.vit.embeddings.initialize_weights()
  model.decoder.initialize_weights(model.vit.embeddings.patch_embeddings.num_patches)
  assert model.vit.embeddings.position_embeddings.abs().sum() > 0
  # Random values everywhere (biases and norms too), except the fixed position tables.
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "pos_embed" in name or "position_embeddings" in name:
        continue
      p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if "layernorm" in name and
                                                            name.endswith("weight") else 0.0))
  return model


def _official_state_dict(model):
  sd = {}
  qkv = {}
  for key, value in model.state_dict().items():
    for pattern, repl in _HF_TO_OFFICIAL:
      key = re.sub(pattern, repl, key)
    m = re.match(r"^(.*)\.attention\.([qkv])_proj\.(weight|bias)$", key)
    if m:
      qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value.numpy()
      continue
    sd[key] = value.numpy()
  for (prefix, kind), parts in qkv.items():
    sd[f"{prefix}.attn.qkv.{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
  return sd


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
  loss, pred, mask = model.apply({"params": params}, images, mask_ratio=0.75, noise=noise)
  np.testing.assert_array_equal(np.asarray(mask), out.mask.numpy())
  np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(pred), out.logits.numpy(), rtol=1e-5, atol=1e-5)
  latent, mask2, ids_restore = model.apply({"params": params}, images, mask_ratio=0.75,
                                           noise=noise, method=MaskedAutoencoder.encode)
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
