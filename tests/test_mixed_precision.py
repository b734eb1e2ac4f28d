"""Gradients under bfloat16 and float16 compute, against float64 truth and PyTorch autocast.

bfloat16: leaf by leaf, mae_jax's bfloat16 gradient is no further from the float64 gradient
than 1.5x the error of transformers' ViTMAE under torch.autocast(bfloat16) with the same weights,
images and noise (the official code trains under autocast). float16: with dynamic loss scaling,
the gradients of a ViT-B/16-geometry step (224 px, patch 16, batch 64) stay close to float32's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mae_jax import models
from mae_jax.convert import params_from_torch, params_to_torch
from torch_tools import official_name, official_state_dict, vitmae

# (img, patch, width, depth, heads, decoder width, decoder depth, decoder heads): the issue's
# 2-block ViT at 224 px / patch 16, narrow to stay fast; batch 16.
SHAPE = (224, 16, 128, 2, 2, 64, 2, 1)
BATCH = 16


def _relative_error(a: np.ndarray, truth: np.ndarray) -> float:
  return float(np.linalg.norm(a - truth) / np.linalg.norm(truth))


def _by_official_name(grads: dict) -> dict:
  """transformers' per-param gradients under official keys, q/k/v joined into `attn.qkv`."""
  joined = {}
  for name, g in grads.items():
    joined.setdefault(official_name(name), {})[name] = g
  out = {}
  for key, parts in joined.items():
    if len(parts) == 1:
      out[key] = next(iter(parts.values()))
    else:  # q, k, v in that order
      out[key] = np.concatenate([parts[n] for n in sorted(parts, key=lambda n: "qkv".index(
          n.rsplit(".", 2)[-2][0]))])
  return out


def _torch_grads(model, images, noise, autocast_dtype=None, float64=False) -> dict:
  dtype = torch.float64 if float64 else torch.float32
  model.to(dtype).zero_grad()
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(dtype)
  n = torch.from_numpy(noise).to(dtype)
  with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                      enabled=autocast_dtype is not None):
    loss = model(pixel_values=x, noise=n).loss
  loss.backward()
  grads = {name: p.grad.double().numpy().copy() for name, p in model.named_parameters()
           if p.grad is not None}
  model.float()
  return _by_official_name(grads)


def _leaves(grads: dict, width: int, key_biases: bool = False):
  """(name, array) per official key, qkv split into q, k, v; key biases left out unless asked:
  their true gradient is 0 (softmax ignores a shift shared by all keys), so any relative error
  there measures nothing."""
  for key in sorted(grads):
    g = grads[key]
    if ".attn.qkv." in key:
      d = g.shape[0] // 3
      for j, part in enumerate("qkv"):
        if part == "k" and key.endswith("bias") and not key_biases:
          continue
        yield f"{key}.{part}", g[j * d:(j + 1) * d]
    else:
      yield key, g


def test_bfloat16_gradients_are_as_close_to_float64_as_torch_autocast():
  img, patch, width, depth, heads, dwidth, ddepth, dheads = SHAPE
  hf = vitmae(*SHAPE, norm_pix=True)
  params = params_from_torch({k: np.array(v) for k, v in official_state_dict(hf).items()})
  rng = np.random.default_rng(0)
  images = rng.normal(size=(BATCH, img, img, 3)).astype(np.float32)
  noise = rng.uniform(size=(BATCH, (img // patch)**2)).astype(np.float32)
  truth = _torch_grads(hf, images, noise, float64=True)
  autocast = _torch_grads(hf, images, noise, autocast_dtype=torch.bfloat16)
  model = models.MaskedAutoencoder(
      img_size=img, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
      decoder_embed_dim=dwidth, decoder_depth=ddepth, decoder_num_heads=dheads,
      norm_pix_loss=True, dtype=jnp.bfloat16)
  grad_fn = jax.jit(jax.grad(lambda p, x, n: model.apply({"params": p}, x, noise=n)[0]))
  grads = grad_fn(params, images, noise)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  ours = params_to_torch(jax.tree.map(lambda x: np.asarray(x, np.float64), grads))
  ours["patch_embed.proj.weight"] = ours["patch_embed.proj.weight"].reshape(
      truth["patch_embed.proj.weight"].shape)
  worse = []
  table = []
  for (name, t), (_, a), (_, o) in zip(_leaves(truth, width), _leaves(autocast, width),
                                       _leaves(ours, width)):
    e_torch, e_ours = _relative_error(a, t), _relative_error(o, t)
    table.append(f"{name}: ours {e_ours:.2e}, autocast {e_torch:.2e}")
    if e_ours > 1.5 * e_torch:
      worse.append(table[-1])
  assert len(table) == len(list(_leaves(truth, width))) > 60
  assert not worse, "\n".join(worse)
