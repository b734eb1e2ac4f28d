"""The Masked Autoencoder, an exact port of the official models_mae.py to Flax linen."""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models import functional as F
from mae_jax.models.vit import (Dense, ImageSize, PatchEmbed, Transformer, broadcast_param,
                                canonical_img_size, check_images, linear_init, patch_grid)

Dtype = Any
class MaskedAutoencoder(nn.Module):
  """MAE with a ViT encoder over the visible tokens only and a narrow decoder.

  The first eleven fields are the official constructor's; the rest are ours. `img_size` is an
  int (a square image, as officially) or an (H, W) pair: the patch grid is then
  (H / patch_size, W / patch_size), and both sin-cos tables are built on it.
  """
  img_size: ImageSize = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  norm_pix_loss: bool = False
  dtype: Dtype = jnp.float32
  scan: bool = False
  remat: bool = False
  attention_impl: Optional[str] = None

  def setup(self):
    self.grid = patch_grid(self.img_size, self.patch_size)
    self.num_patches = self.grid[0] * self.grid[1]
    common = dict(dtype=self.dtype, scan=self.scan, remat=self.remat,
                  attention_impl=self.attention_impl)
    self.embedding = PatchEmbed(self.patch_size, self.embed_dim, self.dtype)
    self.cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.embed_dim))
    self.Transformer = Transformer(self.depth, self.num_heads,
                                   int(self.embed_dim * self.mlp_ratio), prefix="encoder",
                                   **common)
    self.decoder_embed = Dense(self.decoder_embed_dim, dtype=self.dtype,
                                  kernel_init=linear_init(self.embed_dim,
                                                          self.decoder_embed_dim))
    self.Decoder = Transformer(self.decoder_depth, self.decoder_num_heads,
                               int(self.decoder_embed_dim * self.mlp_ratio), prefix="decoder",
                               **common)
    out = self.patch_size**2 * self.in_chans
    self.decoder_pred = Dense(out, dtype=self.dtype,
                                 kernel_init=linear_init(self.decoder_embed_dim, out))

  def _noise(self, batch: int, noise: Optional[jax.Array]) -> jax.Array:
    if noise is None:
      return jax.random.uniform(self.make_rng("mask"), (batch, self.num_patches))
    return noise

  def encode(self, images: jax.Array, mask_ratio: float = 0.75,
             noise: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (latent [B, 1 + keep, D], mask [B, L], ids_restore [B, L])."""
    if not 0.0 <= mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    check_images(images, self.img_size, self.in_chans)
    pos = jnp.asarray(F.sincos_pos_embed_2d(self.embed_dim, self.grid), self.dtype)
    x = self.embedding(images) + pos[None, 1:]
    x, mask, ids_restore = F.random_masking(x, mask_ratio, self._noise(x.shape[0], noise))
    cls = broadcast_param(self.cls + pos[None, :1], (x.shape[0], 1, x.shape[-1]), self.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    return self.Transformer(x), mask, ids_restore

  @nn.compact
  def decode(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """Returns pred [B, L, p*p*C] (the cls output dropped)."""
    # Declared here rather than in setup so that encoder-only params can run `encode`.
    mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                            (1, 1, self.decoder_embed_dim))
    x = self.decoder_embed(latent)
    b, t, d = x.shape
    n_mask = ids_restore.shape[1] + 1 - t
    tokens = broadcast_param(mask_token, (b, n_mask, d), x.dtype)
    x_ = jnp.concatenate([x[:, 1:], tokens], axis=1)
    x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], x_], axis=1)
    pos = F.sincos_pos_embed_2d(self.decoder_embed_dim, self.grid)
    x = x + jnp.asarray(pos, self.dtype)[None]
    x = self.Decoder(x)
    return self.decoder_pred(x)[:, 1:]

  def __call__(self, images: jax.Array, mask_ratio: float = 0.75,
               noise: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (loss, pred [B, L, p*p*C], mask [B, L])."""
    latent, mask, ids_restore = self.encode(images, mask_ratio, noise)
    pred = self.decode(latent, ids_restore)
    loss = F.mae_loss(images, pred, mask, self.patch_size, self.norm_pix_loss)
    return loss, pred.astype(jnp.float32), mask


def from_config(model_config) -> MaskedAutoencoder:
  """A `MaskedAutoencoder` from `config.model` (every field but `mask_ratio`)."""
  fields = {k: v for k, v in dict(model_config).items() if k != "mask_ratio"}
  fields["img_size"] = canonical_img_size(fields["img_size"])
  return MaskedAutoencoder(**fields)
