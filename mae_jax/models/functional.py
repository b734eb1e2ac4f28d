"""Pure functions of MAE's maths: patches, position table, masking, loss.

Each function follows the official PyTorch release (models_mae.py, util/pos_embed.py) exactly;
only the image layout differs (NHWC here, NCHW there).
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, L, p*p*C], patches row-major, vector order (p_row, p_col, channel)."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: Tuple[int, int],
               channels: int) -> jax.Array:
  """Exact inverse of `patchify`: [B, L, p*p*C] -> [B, H, W, C] for a (rows, cols) grid."""
  b = patches.shape[0]
  gh, gw = grid
  p = patch_size
  x = patches.reshape(b, gh, gw, p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: Tuple[int, int], cls_token: bool = True) -> np.ndarray:
  """MAE's fixed 2D sin-cos table, [(1 +) rows*cols, dim] float32.

  Columns: [sin(w*omega) | cos(w*omega) | sin(h*omega) | cos(h*omega)], each dim/4 wide,
  w = patch column, h = patch row; with `cls_token` a row of zeros comes first. This is the
  official util/pos_embed.py table, not big_vision's posemb_sincos_2d. For a non-square
  (rows, cols) grid it is the official construction with its square `arange(grid_size)`
  replaced by `arange(cols)` for w and `arange(rows)` for h; a square grid gives the official
  table bit for bit.
  """
  if dim % 4:
    raise ValueError(f"the 2D sin-cos position embedding needs a width divisible by 4, got {dim}")
  gh, gw = grid
  hh, ww = np.meshgrid(np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32),
                       indexing="ij")
  emb = np.concatenate([_sincos_1d(dim // 2, ww), _sincos_1d(dim // 2, hh)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  return emb.astype(np.float32)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Visible tokens per example, computed as the official code does."""
  return int(num_patches * (1 - mask_ratio))


def random_masking(x: jax.Array, mask_ratio: float, noise: jax.Array
                   ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example random-permutation masking.

  Args:
    x: [B, L, D] tokens.
    mask_ratio: fraction removed.
    noise: [B, L] in [0, 1); each row gives its example's permutation (small = keep).

  Returns:
    (x_visible [B, keep, D], mask [B, L] with 1 = removed in the original order,
     ids_restore [B, L]).
  """
  b, length, _ = x.shape
  if noise.shape != (b, length):
    raise ValueError(f"noise must have shape [batch, num_patches] = {(b, length)}, "
                     f"got {noise.shape}")
  keep = num_kept(length, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :keep]
  x_visible = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
  # Position i of the shuffled order is removed iff i >= keep; map back with ids_restore.
  mask = (ids_restore >= keep).astype(jnp.float32)
  return x_visible, mask, ids_restore


def normalized_targets(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Per-patch normalization of norm_pix_loss, with the unbiased (ddof=1) variance."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def masked_mse(target: jax.Array, pred: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-patch MSE averaged over the removed patches only: sum(l * mask) / sum(mask)."""
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def mae_loss(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix_loss: bool) -> jax.Array:
  """The official forward_loss on NHWC images."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    target = normalized_targets(target)
  return masked_mse(target, pred, mask)


def unnormalize_pred(pred: jax.Array, images: jax.Array, patch_size: int,
                     eps: float = 1e-6) -> jax.Array:
  """Maps norm_pix predictions back to pixels with each target patch's mean and variance."""
  target = patchify(images.astype(jnp.float32), patch_size)
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return pred.astype(jnp.float32) * jnp.sqrt(var + eps) + mean
