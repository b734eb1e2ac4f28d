"""The encoder in the big_vision / vision_transformer ViT layout, for other Flax models.

    python -m mae_jax.export --workdir=DIR --output=FILE.npz

writes a flat npz with "a/b/c" keys, the format of big_vision's `load_params`:
- `embedding/{kernel [p, p, C, D], bias}`, `cls` [1, 1, D];
- `pos_embedding` [1, L, D]: MAE's fixed sin-cos table (or a fine-tuned classifier's learned
  one) without the cls row. big_vision adds it to the patch tokens before it prepends `cls`;
  the cls row of the table is folded into `cls` (MAE's is zeros, so `cls` is unchanged);
- `Transformer/encoderblock_{i}/{LayerNorm_0, LayerNorm_1, MlpBlock_0/Dense_{0,1}}` as stored,
  `MultiHeadDotProductAttention_0/{query,key,value}/kernel` [D, heads, head_dim] (bias
  [heads, head_dim]) and `out/kernel` [heads, head_dim, D], flax's DenseGeneral layout;
- `Transformer/encoder_norm/{scale, bias}`; a fine-tuned classifier's `fc_norm` and `head` too.
  A global-pool classifier has no encoder_norm: the official one averages the un-normalized
  tokens, then applies `fc_norm`, which a model must then do in that order.
The decoder and `mask_token` are left out. One difference remains for big_vision's own ViT: its
MLP uses the tanh approximation of GELU, MAE the exact one.
"""

from typing import Any, Dict, Optional

import numpy as np

from mae_jax.models.layout import is_scanned, scan_to_unrolled

Params = Dict[str, Any]
_ENCODER = ("embedding", "cls", "Transformer")


def _numpy_tree(tree) -> Params:
  if hasattr(tree, "items"):
    return {k: _numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def _flat(tree: Params, prefix: str = "") -> Dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _nested(flat: Dict[str, np.ndarray]) -> Params:
  out: Params = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def to_big_vision(params: Params, num_heads: int, grid: Optional[tuple] = None) -> Params:
  """MAE or classifier params -> the encoder as a nested dict in big_vision's ViT layout.

  `grid` (patch rows, cols) is needed for MAE params, whose position table is not a param.
  """
  from mae_jax.models import functional as F  # pylint: disable=g-import-not-at-top
  params = _numpy_tree(params)
  if is_scanned(params):
    params = scan_to_unrolled(params)
  missing = [k for k in _ENCODER if k not in params]
  if missing:
    raise ValueError(f"not MAE/ViT params: {missing} missing (found {sorted(params)})")
  d = params["cls"].shape[-1]
  if d % num_heads:
    raise ValueError(f"width {d} is not divisible by num_heads {num_heads}")
  head_dim = d // num_heads
  if "pos_embedding" in params:
    table = params["pos_embedding"][0]
  elif grid is None:
    raise ValueError("MAE params need the patch grid (config.model.img_size // patch_size)")
  else:
    table = F.sincos_pos_embed_2d(d, tuple(grid))
  out: Params = {"embedding": params["embedding"],
                 "cls": params["cls"] + table[None, :1],
                 "pos_embedding": table[None, 1:].astype(np.float32)}
  transformer = {}
  for name, block in params["Transformer"].items():
    if not name.startswith("encoderblock_"):
      continue
    block = dict(block)
    attn = {}
    for part, value in block["MultiHeadDotProductAttention_0"].items():
      if part == "out":
        attn[part] = {"kernel": value["kernel"].reshape(num_heads, head_dim, d),
                      "bias": value["bias"]}
      else:
        attn[part] = {"kernel": value["kernel"].reshape(d, num_heads, head_dim),
                      "bias": value["bias"].reshape(num_heads, head_dim)}
    block["MultiHeadDotProductAttention_0"] = attn
    transformer[name] = block
  if "encoder_norm" in params["Transformer"]:
    transformer["encoder_norm"] = params["Transformer"]["encoder_norm"]
  out["Transformer"] = transformer
  for extra in ("fc_norm", "head"):
    if extra in params:
      out[extra] = params[extra]
  return out


def _grid(config) -> Optional[tuple]:
  if config is None:
    return None
  g = config.model.img_size // config.model.patch_size
  return (g, g)


def export_workdir(workdir: str, output: str, num_heads: Optional[int] = None) -> Params:
  """Writes the encoder of a workdir (pretraining, converted or fine-tuned) to `output`."""
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  params, config = checkpoint.load_params(workdir)
  heads = num_heads or (config.model.num_heads if config is not None else None)
  if heads is None:
    raise ValueError(f"{workdir} has no config.json: pass --num_heads")
  encoder = to_big_vision(params, heads, _grid(config))
  with open(output, "wb") as f:
    np.savez(f, **_flat(encoder))
  return encoder


def load_encoder_params(path: str) -> Params:
  """Encoder params (big_vision layout, nested dict of numpy arrays) from an npz or a workdir."""
  if str(path).endswith(".npz"):
    with np.load(path) as f:
      return _nested({k: f[k] for k in f.files})
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  params, config = checkpoint.load_params(path)
  if config is None:
    raise ValueError(f"{path} has no config.json, so its head count is unknown: export it with "
                     "`python -m mae_jax.export --workdir=... --num_heads=N --output=...`")
  return to_big_vision(params, config.model.num_heads, _grid(config))


def main(argv) -> None:
  """`python -m mae_jax.export`: a workdir's encoder -> a big_vision-layout npz."""
  del argv
  encoder = export_workdir(_WORKDIR.value, _OUTPUT.value, _NUM_HEADS.value)
  arrays = _flat(encoder)
  print(f"wrote {_OUTPUT.value}: {len(arrays)} arrays, "
        f"{sum(v.size for v in arrays.values()):,} parameters")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import

  _WORKDIR = flags.DEFINE_string("workdir", None, "A workdir of mae_jax.main or mae_jax.convert.",
                                 required=True)
  _OUTPUT = flags.DEFINE_string("output", None, "The .npz file to write.", required=True)
  _NUM_HEADS = flags.DEFINE_integer("num_heads", None,
                                    "Attention heads (default: the workdir's config).")
  app.run(main)
