"""The ViT classifier of fine-tuning and linear probing (official models_vit.py), in Flax.

Its encoder params have exactly the MAE encoder's names and shapes (`embedding`, `cls`,
`Transformer/encoderblock_{i}`, `Transformer/encoder_norm`), so pretrained params drop in.
On top of them:
- `pos_embedding` [1, 1 + L, D]: a learned position embedding with the cls row, as in the
  official (timm) ViT, where fine-tuning trains it. It starts as MAE's fixed sin-cos table;
  `resample_posemb` resizes a pretrained one to another patch grid exactly as the official
  `interpolate_pos_embed` does (bicubic, torch's A = -0.75, align_corners=False).
- `global_pool=True` (the fine-tuning default): the mean of the patch tokens, then `fc_norm`;
  the final `Transformer/encoder_norm` is left out, as the official code deletes `norm`.
  `global_pool=False`: `encoder_norm`, then the cls token (linear probing's feature).
- `head`: Linear, init normal(`head_init_std`) (fine-tuning 2e-5, linear probing 0.01); with
  `head_batchnorm` a BatchNorm without affine params (eps 1e-6) comes first (linear probing).
"""

from typing import Any, Dict, List, Optional, Tuple

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models import functional as F
from mae_jax.models.layout import is_scanned, scan_to_unrolled, unrolled_to_scan
from mae_jax.models.vit import (ImageSize, PatchEmbed, Transformer, broadcast_param,
                                canonical_img_size, check_images, patch_grid)

Dtype = Any


def resample_posemb(posemb: np.ndarray, old_grid: Tuple[int, int],
                    new_grid: Tuple[int, int]) -> np.ndarray:
  """Resizes the patch rows [old_h*old_w, D] of a position table to [new_h*new_w, D] (float32):
  torch's bicubic interpolation (A = -0.75, align_corners=False, no antialiasing), which the
  official `interpolate_pos_embed` uses, is jax.image.resize's "bicubic-pytorch"."""
  if tuple(old_grid) == tuple(new_grid):
    return np.asarray(posemb)
  d = posemb.shape[-1]
  grid = jnp.asarray(posemb, jnp.float32).reshape(old_grid[0], old_grid[1], d)
  resized = jax.image.resize(grid, (new_grid[0], new_grid[1], d), method="bicubic-pytorch",
                             antialias=False)
  return np.asarray(resized, np.float32).reshape(-1, d)


class VisionTransformer(nn.Module):
  """ViT classifier: `apply(vars, images_nhwc, train=False)` -> logits [B, num_classes].

  `img_size` is an int (square) or an (H, W) pair, as in `MaskedAutoencoder`.
  """
  num_classes: int = 1000
  img_size: ImageSize = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  global_pool: bool = True
  drop_path: float = 0.0
  head_init_std: float = 2e-5
  head_batchnorm: bool = False
  dtype: Dtype = jnp.float32
  scan: bool = False
  remat: bool = False
  attention_impl: Optional[str] = None

  def setup(self):
    self.grid = patch_grid(self.img_size, self.patch_size)
    self.embedding = PatchEmbed(self.patch_size, self.embed_dim, self.dtype)
    self.cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.embed_dim))
    table = F.sincos_pos_embed_2d(self.embed_dim, self.grid)[None]
    self.pos_embedding = self.param("pos_embedding", lambda *_: jnp.asarray(table))
    self.Transformer = Transformer(self.depth, self.num_heads,
                                   int(self.embed_dim * self.mlp_ratio), prefix="encoder",
                                   dtype=self.dtype, scan=self.scan, remat=self.remat,
                                   drop_path=self.drop_path,
                                   attention_impl=self.attention_impl,
                                   final_norm=not self.global_pool)
    if self.global_pool:
      self.fc_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
    if self.head_batchnorm:
      # torch's BatchNorm1d(affine=False, eps=1e-6), momentum 0.1. Its running variance is the
      # unbiased one; flax keeps the biased one, a factor n / (n - 1) off (1 + 6e-5 at 16384).
      self.head_norm = nn.BatchNorm(momentum=0.9, epsilon=1e-6, use_bias=False,
                                    use_scale=False, use_fast_variance=False)
    # timm's trunc_normal_ cuts at +-2 absolute, i.e. never at these stds: a plain normal.
    self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(
        self.head_init_std))

  def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Encoder tokens [B, 1 + L], cls first (after `encoder_norm` unless `global_pool`)."""
    check_images(images, self.img_size, self.in_chans)
    x = self.embedding(images)
    cls = broadcast_param(self.cls, (x.shape[0], 1, x.shape[-1]), x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding.astype(x.dtype)
    return self.Transformer(x, not train)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """The pooled feature [B, D] that the head sees."""
    x = self.encode(images, train)
    if self.global_pool:
      return self.fc_norm(x[:, 1:].mean(axis=1))
    return x[:, 0]

  def classify(self, features: jax.Array, train: bool = False) -> jax.Array:
    """Logits [B, num_classes] (float32) from features [B, D]."""
    x = features.astype(jnp.float32)
    if self.head_batchnorm:
      x = self.head_norm(x, use_running_average=not train)
    return self.head(x)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Logits [B, num_classes]; `train` turns on drop path (rng "dropout") and batch stats."""
    return self.classify(self.features(images, train), train)


def classifier_from_config(model_config) -> VisionTransformer:
  """A `VisionTransformer` from a fine-tuning or linear-probing `config.model`."""
  fields = dict(model_config)
  fields["img_size"] = canonical_img_size(fields["img_size"])
  return VisionTransformer(**fields)


def _table_grid(table_shape: Tuple[int, ...], grid: Optional[Tuple[int, int]], what: str
                ) -> Tuple[int, int]:
  """The patch grid of a position table [1, 1 + L, D]: `grid`, or the square one L allows."""
  length = table_shape[1] - 1
  if grid is None:
    side = int(round(length**0.5))
    if side * side != length:
      raise ValueError(f"the {what} position table has {length} patch rows, not a square "
                       f"grid: pass its (rows, cols) grid")
    return side, side
  if grid[0] * grid[1] != length:
    raise ValueError(f"the {what} position table has {length} patch rows, not the "
                     f"{grid[0]}x{grid[1]} grid given")
  return tuple(grid)


def merge_pretrained(params, pretrained, pretrained_grid: Optional[Tuple[int, int]] = None,
                     grid: Optional[Tuple[int, int]] = None
                     ) -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
  """Pretrained params (MAE or classifier, scanned or not) merged into fresh classifier params.

  Every fresh param (arrays or `jax.ShapeDtypeStruct`s) whose path and shape the pretrained
  tree has is replaced by the pretrained numpy value. `pos_embedding` comes from the
  pretrained one if present, else from MAE's fixed table on `pretrained_grid`, resized to the
  classifier's grid like the official interpolate_pos_embed. `grid` is the classifier's
  (rows, cols) patch grid and `pretrained_grid` the pretrained model's; either may be left
  out where the table is square (`pretrained_grid` then defaults to `grid`). Returns
  (params, report) with the sorted "missing" (kept fresh), "mismatched" (shape differs, kept
  fresh) and "extra" (unused) paths as "a/b/c" strings, and "pos_embedding": ["RxC -> RxC"]
  when the table was resized to another grid ([] otherwise). Raises ValueError when a grid does
  not match its table's length.
  """
  params = dict(params)
  pretrained = jax.tree.map(np.asarray, dict(pretrained))
  if is_scanned(pretrained) and not is_scanned(params):
    pretrained = scan_to_unrolled(pretrained)
  elif is_scanned(params) and not is_scanned(pretrained):
    pretrained = unrolled_to_scan(pretrained)
  pretrained = jax.tree.map(np.asarray, pretrained)
  grid = _table_grid(params["pos_embedding"].shape, grid, "classifier's")
  if "pos_embedding" in pretrained:
    table = pretrained["pos_embedding"][0]
    old_grid = _table_grid(pretrained["pos_embedding"].shape, pretrained_grid, "pretrained")
  else:
    old_grid = tuple(pretrained_grid or grid)
    table = F.sincos_pos_embed_2d(params["pos_embedding"].shape[-1], old_grid)
  pretrained["pos_embedding"] = np.concatenate(
      [table[:1], resample_posemb(table[1:], old_grid, grid)])[None]
  fresh = traverse_util.flatten_dict(params)
  loaded = traverse_util.flatten_dict(pretrained)
  report = {"missing": [], "mismatched": [], "extra": [], "pos_embedding": []}
  if tuple(old_grid) != tuple(grid):
    report["pos_embedding"].append(f"{old_grid[0]}x{old_grid[1]} -> {grid[0]}x{grid[1]}")
  merged = {}
  for path, value in fresh.items():
    name = "/".join(path)
    if path not in loaded:
      report["missing"].append(name)
      merged[path] = value
    elif loaded[path].shape != value.shape:
      report["mismatched"].append(f"{name} {loaded[path].shape} -> {value.shape}")
      merged[path] = value
    else:
      merged[path] = loaded[path].astype(value.dtype)
  report["extra"] = ["/".join(p) for p in loaded if p not in fresh]
  return traverse_util.unflatten_dict(merged), {k: sorted(v) for k, v in report.items()}
