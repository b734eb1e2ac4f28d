"""Released MAE checkpoints <-> mae_jax params: the official PyTorch ones and transformers'
ViTMAE.

    python -m mae_jax.convert --torch_checkpoint=mae_pretrain_vit_large_full.pth \
        --config=configs/vit_l.py --workdir=DIR
    python -m mae_jax.convert --torch_checkpoint=vit-mae-base/ --workdir=DIR

`--torch_checkpoint`: an official `.pth` (pretrained, fine-tuned or linear-probed), a
transformers ViTMAE checkpoint (a `save_pretrained` directory, `model.safetensors` or
`pytorch_model.bin`: `ViTMAEForPreTraining`, or `ViTMAEModel` as an encoder-only checkpoint,
with the `config.json` beside it when there is one), or an `.npz` of official keys. A `.pth`
holds the state dict under "model" (as the official code saves it) or is the state dict itself;
`module.` and `_orig_mod.` prefixes are dropped. A `.pth` is read with
`torch.load(weights_only=True)` (tensors, plain containers and the official flags' `args`), so
that a downloaded file cannot run code; `--trust_pickle` reads one that pickles other objects.

The checkpoint's own facts win over a config's guess: the model fields its arrays fix (patch
size, channels, widths, depths, MLP ratio, the patch grid from the length of its position
table, a classifier's classes and pooling) and those its transformers `config.json` records
(head counts) are read from the file. A `--config` field that disagrees is an error naming both
values; without `--config`, the model is the checkpoint's. Everything is checked before
DIR/params (Orbax), DIR/batch_stats (a linear probe's BatchNorm statistics) and DIR/config.json
are written; `mae_jax.main`, `mae_jax.visualize`, `mae_jax.export` and `config.init_from` start
from them. torch is needed only for `.pth` and `.bin` files (`pip install -e .[torch]`). On the
command line a checkpoint, config or workdir that cannot be converted ends in a few lines naming
it, with exit status 2.
"""

import argparse
import functools
import json
import math
import os
import pickle
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mae_jax.models import functional as F
from mae_jax.models.layout import is_scanned, scan_to_unrolled, unrolled_to_scan

Params = Dict[str, Any]

# (official suffix inside a block, params path inside `*block_{i}`, kind)
_BLOCK_MAP = [
    ("norm1", ("LayerNorm_0",), "norm"),
    ("attn.proj", ("MultiHeadDotProductAttention_0", "out"), "linear"),
    ("norm2", ("LayerNorm_1",), "norm"),
    ("mlp.fc1", ("MlpBlock_0", "Dense_0"), "linear"),
    ("mlp.fc2", ("MlpBlock_0", "Dense_1"), "linear"),
]
# (official prefix, params path, kind) outside the blocks; `head.1` is a linear probe's Linear
# after its BatchNorm `head.0` (official main_linprobe.py).
_TOP_MAP = [
    ("norm", ("Transformer", "encoder_norm"), "norm"),
    ("decoder_embed", ("decoder_embed",), "linear"),
    ("decoder_norm", ("Decoder", "decoder_norm"), "norm"),
    ("decoder_pred", ("decoder_pred",), "linear"),
    ("fc_norm", ("fc_norm",), "norm"),
    ("head", ("head",), "linear"),
    ("head.1", ("head",), "linear"),
]
# Fixed tables and training-only buffers that carry no trainable params.
_IGNORED = {"pos_embed", "decoder_pos_embed", "head.0.num_batches_tracked"}
_STACKS = {"blocks": ("Transformer", "encoderblock"),
           "decoder_blocks": ("Decoder", "decoderblock")}
# The top-level params of the MAE decoder: an encoder-only checkpoint has none of them.
DECODER_PARAMS = ("decoder_embed", "mask_token", "Decoder", "decoder_pred")
# A linear probe's BatchNorm statistics (torch buffer -> flax batch_stats name).
_PROBE_STATS = {"head.0.running_mean": "mean", "head.0.running_var": "var"}

# transformers ViTMAE keys -> official models_mae.py keys, for both of transformers' layouts:
# 4.x (and the facebook/vit-mae-* files) `encoder.layer.N.attention.attention.query`,
# `attention.output.dense`, `intermediate.dense`, `output.dense`; 5.x `layers.N.attention.q_proj`,
# `attention.o_proj`, `mlp.fc1`, `mlp.fc2`; 5.x's save_pretrained writes the 4.x names, its
# decoder layers as `decoder.decoder_encoder.layer.N`. ViTMAEModel's keys lack the `vit.` prefix.
_HF_TO_OFFICIAL = [
    (r"^vit\.", ""),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.layer|layers)\.", "blocks."),
    (r"^layernorm\.", "norm."),
    (r"^decoder\.decoder_(?:layers|encoder\.layer)\.", "decoder_blocks."),
    (r"^decoder\.", ""),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.(?:intermediate\.dense|mlp\.fc1)\.", ".mlp.fc1."),
    (r"\.(?:output\.dense|mlp\.fc2)\.", ".mlp.fc2."),
]
_HF_QKV = re.compile(r"^(.*)\.attention\.(?:attention\.(query|key|value)|([qkv])_proj)\."
                     r"(weight|bias)$")
_HF_MARK = "embeddings.patch_embeddings.projection.weight"


def _to_numpy(x, key: str = "") -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu().float().numpy()
  if not hasattr(x, "shape"):
    raise ValueError(f"{key!r} holds a {type(x).__name__}, not an array: a state dict maps "
                     f"names to tensors; the official checkpoints keep theirs under 'model'")
  return np.asarray(x, dtype=np.float32)


def state_dict_of(checkpoint: Any, source: str = "the checkpoint") -> Mapping[str, Any]:
  """The state dict in what `torch.load` returned: its "model" entry (as the official
  main_pretrain.py / main_finetune.py save it, beside "optimizer", "epoch", ...), or the
  checkpoint itself when every entry is an array; a whole model saved with torch.save(model)
  gives its state_dict(). ValueError naming what it holds otherwise."""
  if not isinstance(checkpoint, Mapping) and callable(getattr(checkpoint, "state_dict", None)):
    checkpoint = checkpoint.state_dict()  # an nn.Module whose class was importable here
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{source} holds a {type(checkpoint).__name__}, not a state dict (a dict "
                     f"of tensors, or a dict with one under 'model' as the official code saves)")
  if isinstance(checkpoint.get("model"), Mapping):
    return checkpoint["model"]
  nested = [k for k, v in checkpoint.items() if isinstance(v, Mapping)]
  if nested:
    raise ValueError(
        f"{source} has no 'model' entry, where the official code keeps the state dict; its "
        f"entries are {sorted(map(str, checkpoint))[:10]}. If one of {nested[:5]} is the "
        f"model's state dict, save it as the official code does: "
        f"torch.save({{'model': ckpt[{nested[0]!r}]}}, PATH)")
  return checkpoint


def is_transformers(state_dict: Mapping[str, Any]) -> bool:
  """Whether a state dict has transformers' ViTMAE key names (else the official ones)."""
  return any(k.endswith(_HF_MARK) for k in state_dict)


def official_from_transformers(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """transformers ViTMAE keys (4.x or 5.x layout, ViTMAEForPreTraining or ViTMAEModel) -> the
  official keys, separate q/k/v projections joined into `attn.qkv` ([3D, D], q, k, v)."""
  sd, qkv = {}, {}
  for key, value in state_dict.items():
    for pattern, repl in _HF_TO_OFFICIAL:
      key = re.sub(pattern, repl, key)
    m = _HF_QKV.match(key)
    if m:
      part = (m.group(2) or m.group(3))[0]  # "q", "k" or "v"
      qkv.setdefault((m.group(1), m.group(4)), {})[part] = _to_numpy(value, key)
    else:
      sd[key] = _to_numpy(value, key)
  for (prefix, kind), parts in qkv.items():
    missing = sorted({"q", "k", "v"} - set(parts))
    if missing:
      raise ValueError(f"{prefix}: the attention's {missing} {kind} is missing")
    sd[f"{prefix}.attn.qkv.{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
  return sd


def transformers_from_official(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Official keys -> transformers ViTMAE keys in the layout of the facebook/vit-mae-* files
  (transformers 4.x; 5.x renames them on load). With a decoder: ViTMAEForPreTraining's keys;
  without: ViTMAEModel's (no `vit.` prefix)."""
  full = "decoder_embed.weight" in state_dict
  out = {}
  for key, value in state_dict.items():
    m = re.match(r"^(decoder_)?blocks\.(\d+)\.(.*)$", key)
    if m:
      base = (f"decoder.decoder_layers.{m.group(2)}" if m.group(1) else
              f"{'vit.' if full else ''}encoder.layer.{m.group(2)}")
      rest = m.group(3)
      if rest.startswith("attn.qkv."):
        kind = rest.rsplit(".", 1)[1]
        for part, chunk in zip(("query", "key", "value"), np.split(np.asarray(value), 3)):
          out[f"{base}.attention.attention.{part}.{kind}"] = chunk
        continue
      for old, new in (("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
                       ("attn.proj.", "attention.output.dense."),
                       ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense.")):
        if rest.startswith(old):
          rest = new + rest[len(old):]
      out[f"{base}.{rest}"] = value
      continue
    new = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}.get(key)
    if new is not None:
      out[("vit." if full else "") + new] = value
    elif key.startswith(("decoder_", "mask_token")):
      out[f"decoder.{key}"] = value
    else:
      raise ValueError(f"{key}: transformers' ViTMAE has no counterpart (a classifier's head or "
                       f"fc_norm); export the encoder of a pretraining workdir instead")
  return out


def _official(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Any supported state dict (or a checkpoint holding one under "model") with official key
  names, as float32 numpy. Wrappers' prefixes are dropped: `module.` (DistributedDataParallel,
  DataParallel) and `_orig_mod.` (torch.compile)."""
  state_dict = state_dict_of(state_dict)
  if is_transformers(state_dict):
    return official_from_transformers(state_dict)
  return {re.sub(r"^(?:module\.|_orig_mod\.)+", "", k): _to_numpy(v, k)
          for k, v in state_dict.items()}


def _set(tree: Params, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  if path[-1] in tree:
    raise ValueError(f"two official keys map to {'/'.join(path)}")
  tree[path[-1]] = value


def _put(tree: Params, sd: Mapping[str, np.ndarray], prefix: str, path, kind: str) -> None:
  if f"{prefix}.weight" not in sd:
    return
  w, b = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
  if kind == "norm":
    _set(tree, path + ("scale",), w)
  else:
    _set(tree, path + ("kernel",), w.T)
  _set(tree, path + ("bias",), b)


def _depth(sd: Mapping[str, Any], stack: str) -> int:
  return 1 + max([int(m.group(1)) for k in sd if (m := re.match(rf"^{stack}\.(\d+)\.", k))],
                 default=-1)


def _is_classifier(sd: Mapping[str, Any]) -> bool:
  return "head.weight" in sd or "head.1.weight" in sd


def check_keys(sd: Mapping[str, Any]) -> None:
  """ValueError unless the official-keyed `sd` holds the keys of models_mae.py's or
  models_vit.py's model and no others: naming the keys missing (a damaged or partial state
  dict, attention without biases) and the keys mae_jax has no counterpart for (another
  architecture: a distillation token, a convolutional stem, ...)."""
  if "patch_embed.proj.weight" not in sd:
    raise ValueError("not an official MAE/ViT state dict: it has no 'patch_embed.proj.weight' "
                     f"(its keys start with {sorted(sd)[:5]}); mae_jax converts the models of "
                     "the official models_mae.py and models_vit.py, and transformers' ViTMAE")
  missing = [k for k in ("patch_embed.proj.bias", "cls_token") if k not in sd]
  known = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "mask_token",
           *_IGNORED, *_PROBE_STATS}
  pairs = [prefix for prefix, _, _ in _TOP_MAP]
  for stack in _STACKS:
    for i in range(_depth(sd, stack)):
      for suffix in ["attn.qkv"] + [suffix for suffix, _, _ in _BLOCK_MAP]:
        missing += [f"{stack}.{i}.{suffix}.{kind}" for kind in ("weight", "bias")
                    if f"{stack}.{i}.{suffix}.{kind}" not in sd]
        known.update({f"{stack}.{i}.{suffix}.weight", f"{stack}.{i}.{suffix}.bias"})
  for prefix in pairs:
    both = {f"{prefix}.weight", f"{prefix}.bias"}
    known.update(both)
    if both & set(sd):
      missing += sorted(both - set(sd))
  if any(k in sd for k in _PROBE_STATS):
    missing += [k for k in _PROBE_STATS if k not in sd]
  unknown = sorted(set(sd) - known)
  problems = []
  if missing:
    problems.append(f"missing {missing[:10]} (a damaged or partial state dict; MAE's attention "
                    f"and every linear layer have biases)")
  if unknown:
    problems.append(f"keys with no counterpart in MAE's ViT {unknown[:10]} (another "
                    f"architecture than the official models_mae.py / models_vit.py)")
  if problems:
    raise ValueError("not an official MAE/ViT state dict that mae_jax can convert: "
                     + "; ".join(problems))


def params_from_torch(state_dict: Mapping[str, Any], scan: bool = False) -> Params:
  """Official (or transformers ViTMAE) key names -> params tree (unrolled, or scanned with
  `scan=True`).

  Accepts numpy arrays or torch tensors, with or without a `module.` prefix, or the whole
  checkpoint of the official code (the state dict under "model"). An encoder-only
  dict (the released `mae_pretrain_vit_*.pth`, a ViTMAEModel) gives encoder params only; a
  fine-tuned one also gives `fc_norm`, `head` and its learned `pos_embedding`; a linear-probed
  one (`head.0` BatchNorm, `head.1` Linear) `head` (its statistics: `batch_stats_from_torch`).
  Missing and unknown keys are a ValueError naming them (`check_keys`), not silently dropped.
  """
  sd = _official(state_dict)
  check_keys(sd)
  params: Params = {}
  w = sd["patch_embed.proj.weight"]  # [D, C, p, p]
  _set(params, ("embedding", "kernel"), w.transpose(2, 3, 1, 0))
  _set(params, ("embedding", "bias"), sd["patch_embed.proj.bias"])
  _set(params, ("cls",), sd["cls_token"])
  if "mask_token" in sd:
    _set(params, ("mask_token",), sd["mask_token"])
  if _is_classifier(sd) and "pos_embed" in sd:
    # A fine-tuned classifier trained its position table: keep it (the classifier's param).
    _set(params, ("pos_embedding",), sd["pos_embed"])
  for prefix, path, kind in _TOP_MAP:
    _put(params, sd, prefix, path, kind)
  for stack, (outer, block) in _STACKS.items():
    for i in range(_depth(sd, stack)):
      base = (outer, f"{block}_{i}")
      pre = f"{stack}.{i}"
      qkv_w, qkv_b = sd[f"{pre}.attn.qkv.weight"], sd[f"{pre}.attn.qkv.bias"]
      d = qkv_w.shape[1]
      for j, name in enumerate(("query", "key", "value")):
        attn = base + ("MultiHeadDotProductAttention_0", name)
        _set(params, attn + ("kernel",), qkv_w[j * d:(j + 1) * d].T)
        _set(params, attn + ("bias",), qkv_b[j * d:(j + 1) * d])
      for suffix, path, kind in _BLOCK_MAP:
        _put(params, sd, f"{pre}.{suffix}", base + path, kind)
  params = _copy_arrays(params)
  return unrolled_to_scan(params) if scan else params


def batch_stats_from_torch(state_dict: Mapping[str, Any]) -> Params:
  """A linear probe's BatchNorm statistics (`head.0.running_mean/var`) as the classifier's
  `batch_stats` ({"head_norm": {"mean", "var"}} [D] float32); {} for any other state dict.
  torch keeps the unbiased running variance, flax the biased one (a factor 1 + 1/(batch - 1))."""
  sd = _official(state_dict)
  if not all(k in sd for k in _PROBE_STATS):
    return {}
  return {"head_norm": {name: np.ascontiguousarray(sd[k]) for k, name in _PROBE_STATS.items()}}


def _copy_arrays(tree):
  if isinstance(tree, dict):
    return {k: _copy_arrays(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)


def params_to_torch(params: Params, img_size=None,
                    patch_size: Optional[int] = None,
                    batch_stats: Optional[Params] = None) -> Dict[str, np.ndarray]:
  """params tree (unrolled or scanned) -> official key names, as numpy arrays.

  With `img_size` (an int or an (H, W) pair) the fixed `pos_embed` (and `decoder_pos_embed`)
  tables of its patch grid are added, so that the
  official model loads the dict with `strict=True`. With a linear probe's `batch_stats`, the
  head is written as the official `head.0` (BatchNorm statistics) and `head.1` (Linear).
  """
  params = jax_free_tree(params)
  if is_scanned(params):
    params = scan_to_unrolled(params)
  sd: Dict[str, np.ndarray] = {}

  def get(path):
    node = params
    for key in path:
      node = node[key]
    return np.asarray(node, np.float32)

  def has(path):
    node = params
    for key in path:
      if not isinstance(node, dict) or key not in node:
        return False
      node = node[key]
    return True

  def put(prefix, path, kind):
    if not has(path):
      return
    sd[f"{prefix}.weight"] = get(path + ("scale",)) if kind == "norm" else get(
        path + ("kernel",)).T
    sd[f"{prefix}.bias"] = get(path + ("bias",))

  probe = (batch_stats or {}).get("head_norm")
  kernel = get(("embedding", "kernel"))  # [p, p, C, D]
  sd["cls_token"] = get(("cls",))
  sd["patch_embed.proj.weight"] = kernel.transpose(3, 2, 0, 1)
  sd["patch_embed.proj.bias"] = get(("embedding", "bias"))
  if has(("mask_token",)):
    sd["mask_token"] = get(("mask_token",))
  if has(("pos_embedding",)):  # a classifier's learned table
    sd["pos_embed"] = get(("pos_embedding",))
  for prefix, path, kind in _TOP_MAP:
    if prefix != ("head" if probe is not None else "head.1"):
      put(prefix, path, kind)
  if probe is not None:
    for key, name in _PROBE_STATS.items():
      sd[key] = np.asarray(probe[name], np.float32)
    sd["head.0.num_batches_tracked"] = np.zeros((), np.int64)
  for stack, (outer, block) in _STACKS.items():
    i = 0
    while has((outer, f"{block}_{i}")):
      base = (outer, f"{block}_{i}")
      attn = base + ("MultiHeadDotProductAttention_0",)
      sd[f"{stack}.{i}.attn.qkv.weight"] = np.concatenate(
          [get(attn + (n, "kernel")).T for n in ("query", "key", "value")], axis=0)
      sd[f"{stack}.{i}.attn.qkv.bias"] = np.concatenate(
          [get(attn + (n, "bias")) for n in ("query", "key", "value")])
      for suffix, path, kind in _BLOCK_MAP:
        put(f"{stack}.{i}.{suffix}", base + path, kind)
      i += 1
  if img_size is not None and "pos_embed" not in sd:
    p = patch_size or kernel.shape[0]
    grid = _grid_of(img_size, p)
    sd["pos_embed"] = F.sincos_pos_embed_2d(kernel.shape[-1], grid)[None]
    if has(("decoder_embed",)):
      dd = get(("decoder_embed", "kernel")).shape[1]
      sd["decoder_pos_embed"] = F.sincos_pos_embed_2d(dd, grid)[None]
  return sd


def jax_free_tree(tree):
  """A nested dict of numpy arrays from any params tree (FrozenDict, jax.Array leaves)."""
  if hasattr(tree, "items"):
    return {k: jax_free_tree(v) for k, v in tree.items()}
  return np.asarray(tree)


# --- the facts a checkpoint carries ---------------------------------------------------------------

def checkpoint_grid(num_patches: int, img_size=None, patch_size: Optional[int] = None
                    ) -> Tuple[int, int]:
  """The (rows, cols) patch grid of a position table with `num_patches` patch rows (its cls row
  left out): the grid of `img_size` / `patch_size` when that has as many patches, else the
  square one. ValueError when neither fits. The one place where a table's length becomes a grid.
  """
  if img_size is not None and patch_size:
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if (h // patch_size) * (w // patch_size) == num_patches:
      return h // patch_size, w // patch_size
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(f"a position table of {num_patches} patches is not a square grid; set "
                     f"config.model.img_size to the checkpoint's image size")
  return side, side


class Fact:
  """A model field's value as a checkpoint fixes it, and where in the file it comes from."""

  def __init__(self, value: Any, source: str):
    self.value, self.source = value, source

  def __repr__(self) -> str:
    return f"{self.value!r} ({self.source})"


def _shape(sd, key) -> str:
  return f"{key} {list(np.shape(sd[key]))}"


def checkpoint_facts(state_dict: Mapping[str, Any],
                     hf_config: Optional[Mapping[str, Any]] = None,
                     recorded: Optional[Mapping[str, Any]] = None) -> Dict[str, Fact]:
  """The model config fields (`config.model` names) that a state dict's arrays fix, the head
  counts and image size of a transformers `config.json`, and the `norm_pix_loss` of a
  decoder that the official flags saved with it record (`recorded`, see `recorded_args`: the
  target the decoder learned to predict); `img_size` is the grid's size in pixels.
  ValueError for what mae_jax's models cannot represent (non-square patches, another activation,
  attention without biases, a position table that is not MAE's fixed one)."""
  sd = _official(state_dict)
  check_keys(sd)
  facts: Dict[str, Fact] = {}
  d, c, ph, pw = np.shape(sd["patch_embed.proj.weight"])
  src = _shape(sd, "patch_embed.proj.weight")
  if ph != pw:
    raise ValueError(f"{src}: non-square patches ({ph}x{pw}) are not supported")
  facts.update(patch_size=Fact(ph, src), in_chans=Fact(c, src), embed_dim=Fact(d, src))
  depth = _depth(sd, "blocks")
  facts["depth"] = Fact(depth, f"blocks.0-{depth - 1}")
  if depth:
    facts["mlp_ratio"] = Fact(np.shape(sd["blocks.0.mlp.fc1.weight"])[0] / d,
                              _shape(sd, "blocks.0.mlp.fc1.weight"))
  if "decoder_embed.weight" in sd:
    facts["decoder_embed_dim"] = Fact(np.shape(sd["decoder_embed.weight"])[0],
                                      _shape(sd, "decoder_embed.weight"))
    n = _depth(sd, "decoder_blocks")
    facts["decoder_depth"] = Fact(n, f"decoder_blocks.0-{n - 1}")
    if "norm_pix_loss" in (recorded or {}):
      facts["norm_pix_loss"] = Fact(bool(recorded["norm_pix_loss"]),
                                    "args.norm_pix_loss, saved by main_pretrain.py")
  for field in ("num_heads", "decoder_num_heads"):  # mae_jax.export --format=official
    if field in (recorded or {}) and (field == "num_heads" or "decoder_embed_dim" in facts):
      facts[field] = Fact(recorded[field], f"args.{field}, saved by mae_jax.export")
  if _is_classifier(sd):
    head = "head.1.weight" if "head.1.weight" in sd else "head.weight"
    facts["num_classes"] = Fact(np.shape(sd[head])[0], _shape(sd, head))
    facts["global_pool"] = Fact("fc_norm.weight" in sd, "fc_norm " + (
        "present" if "fc_norm.weight" in sd else "absent"))
    facts["head_batchnorm"] = Fact("head.0.running_mean" in sd, "head.0 BatchNorm " + (
        "present" if "head.0.running_mean" in sd else "absent"))
  hf = dict(hf_config or {})
  if hf:
    for ours, theirs in (("num_heads", "num_attention_heads"),
                         ("decoder_num_heads", "decoder_num_attention_heads")):
      if theirs in hf and (ours == "num_heads" or "decoder_embed_dim" in facts):
        facts[ours] = Fact(int(hf[theirs]), f"config.json {theirs}")
    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
      raise ValueError(f"config.json: hidden_act={hf.get('hidden_act')!r}, "
                       f"qkv_bias={hf.get('qkv_bias')!r}; MAE (and mae_jax) use exact GELU "
                       f"and attention biases")
  if "pos_embed" in sd:
    length = np.shape(sd["pos_embed"])[1] - 1
    grid = checkpoint_grid(length, hf.get("image_size") or (recorded or {}).get("input_size"),
                           ph)
    source = f"{_shape(sd, 'pos_embed')}: a {grid[0]}x{grid[1]} patch grid"
    facts["img_size"] = Fact(grid[0] * ph if grid[0] == grid[1] else
                             (grid[0] * ph, grid[1] * ph), source)
    if not _is_classifier(sd):
      _check_fixed_table(sd, "pos_embed", grid)
      if "decoder_pos_embed" in sd:
        _check_fixed_table(sd, "decoder_pos_embed", grid)
  return facts


def _check_fixed_table(sd, key: str, grid: Tuple[int, int]) -> None:
  """MaskedAutoencoder recomputes its position tables: refuse a file whose table is another.
  A file saved in half precision holds the table rounded to float16 or bfloat16: that is the
  fixed table too."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  table = np.asarray(sd[key])[0]
  expected = F.sincos_pos_embed_2d(table.shape[-1], grid)
  if table.shape != expected.shape or not any(
      np.allclose(table, expected.astype(dtype).astype(np.float32), atol=1e-4)
      for dtype in (np.float32, np.float16, jnp.bfloat16)):
    raise ValueError(f"{_shape(sd, key)} is not MAE's fixed 2D sin-cos table of a "
                     f"{grid[0]}x{grid[1]} grid, which MaskedAutoencoder recomputes; a learned "
                     f"table would be lost")


def fit_config(model_config, facts: Mapping[str, Fact]) -> List[str]:
  """Fills the fields of `model_config` (a ConfigDict) that are None with the checkpoint's facts,
  and returns one line per field that disagrees, naming both values."""
  problems = []
  for field, fact in facts.items():
    if field not in model_config:
      continue
    ours = model_config[field]
    if ours is None:
      setattr(model_config, field, fact.value)
      continue
    if field == "img_size":
      same = _grid_of(ours, facts["patch_size"].value) == _grid_of(
          fact.value, facts["patch_size"].value)
    elif isinstance(fact.value, float):
      same = math.isclose(float(ours), fact.value, rel_tol=1e-6)
    else:
      same = ours == fact.value
    if not same:
      problems.append(f"config.model.{field}={ours!r}, but the checkpoint's is {fact!r}"
                      + (" (to fine-tune or evaluate at another size, convert at the file's "
                         "and set the new img_size in the fine-tuning run: init_from resizes "
                         "the position table as the official interpolate_pos_embed does)"
                         if field == "img_size" else ""))
  return problems


def _grid_of(img_size, patch_size: int) -> Tuple[int, int]:
  h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
  return h // patch_size, w // patch_size


def default_config(facts: Mapping[str, Fact], hf_config: Optional[Mapping[str, Any]] = None):
  """The config of a checkpoint converted without --config: the recipe of the paper's ViT size
  with the checkpoint's width (ViT-B's otherwise), the checkpoint's model fields, and head counts
  from its config.json or the paper's size of that width and depth. A classifier gets the
  fine-tuning (or, with a BatchNorm head, linear probing) recipe. ValueError when a field the
  file does not fix cannot be inferred."""
  from mae_jax import config_lib  # pylint: disable=g-import-not-at-top
  sizes = [s for s, f in config_lib.MODEL_SIZES.items()
           if f["embed_dim"] == facts["embed_dim"].value]
  size = sizes[0] if sizes else "vit_b"
  if "num_classes" in facts:
    probe = facts["head_batchnorm"].value
    config = (config_lib.linprobe_config if probe else config_lib.finetune_config)(size)
  else:
    config = config_lib.pretrain_config(size)
  known = config_lib.MODEL_SIZES[size]
  paper = (known["embed_dim"], known["depth"]) == (facts["embed_dim"].value,
                                                   facts["depth"].value)
  guessed = dict(facts)
  if "num_heads" not in guessed:
    if not paper:
      raise ValueError("the checkpoint does not record its attention heads (width "
                       f"{facts['embed_dim'].value}, depth {facts['depth'].value} is none of "
                       "the paper's sizes): pass --config with config.model.num_heads")
    guessed["num_heads"] = Fact(known["num_heads"], f"the paper's {size}")
  if "decoder_embed_dim" in facts and "decoder_num_heads" not in guessed:
    if (facts["decoder_embed_dim"].value, facts["decoder_depth"].value) != (512, 8):
      raise ValueError("the checkpoint does not record its decoder's attention heads: pass "
                       "--config with config.model.decoder_num_heads")
    guessed["decoder_num_heads"] = Fact(16, "the paper's decoder")
  for field, fact in guessed.items():
    if field in config.model:
      setattr(config.model, field, fact.value)
  for field in ("norm_pix_loss", "mask_ratio"):  # training choices a config.json may record
    if hf_config and field in hf_config and field in config.model:
      setattr(config.model, field, type(config.model[field])(hf_config[field]))
  return config


# --- reading files ---------------------------------------------------------------------------------

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  out = {}
  with safe_open(path, framework="flax") as f:  # numpy has no bfloat16; jax reads every dtype
    for key in f.keys():
      out[key] = np.asarray(f.get_tensor(key), np.float32)
  return out


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


# Beside tensors and plain containers, what the official main_pretrain.py / main_finetune.py
# pickle into every checkpoint: their command-line flags ("args").
_SAFE_GLOBALS = (argparse.Namespace,)


class UnsafePickleError(ValueError):
  """A torch.save file that pickles Python objects torch.load(weights_only=True) refuses."""


def _read_torch(path: str, trust_pickle: bool = False) -> Any:
  """torch.load(path) on the CPU. By default with `weights_only=True` (tensors, plain
  containers and the official flags' argparse.Namespace only: unpickling anything else can run
  code); UnsafePickleError names what else the file pickles. `trust_pickle`: a full unpickle."""
  import torch  # pylint: disable=g-import-not-at-top
  if trust_pickle:
    return torch.load(path, map_location="cpu", weights_only=False)
  try:
    with torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    try:
      unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError):
      unsafe = []  # not a zip checkpoint (cut short, or another kind of file): said below
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
    unsafe = [name for name in unsafe if name not in allowed]
    if not unsafe:
      raise
    raise UnsafePickleError(
        f"{path} pickles Python objects beside tensors ({', '.join(unsafe[:5])}"
        f"{', ...' if len(unsafe) > 5 else ''}), which torch.load(weights_only=True) does not "
        f"load because unpickling them can run any code (a whole model saved with "
        f"torch.save(model) is such a file). If you trust where the file came from, convert "
        f"it with --trust_pickle (convert(..., trust_pickle=True)); or, where that model's "
        f"code imports, save its state dict: torch.save({{'model': model.state_dict()}}, PATH)"
    ) from e


def _weights_file(directory: str) -> str:
  for name in _HF_WEIGHTS:
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise FileNotFoundError(f"{directory} holds none of {', '.join(_HF_WEIGHTS)}: point "
                          "--torch_checkpoint at a save_pretrained directory or a weights file")


def load_torch_state_dict(path: str, trust_pickle: bool = False) -> Dict[str, np.ndarray]:
  """The state dict of a checkpoint file or directory, its own key names, float32 numpy: an
  official `.pth` (its "model" entry), an `.npz`, a `.safetensors`, a `pytorch_model.bin`, a
  sharded one's `*.index.json`, or a save_pretrained directory. torch files are read with
  `weights_only=True` unless `trust_pickle` (`_read_torch`); UnsafePickleError (a ValueError)
  for a file that pickles other objects."""
  return _load(path, trust_pickle)[0]


def recorded_args(checkpoint: Any) -> Dict[str, Any]:
  """The model fields that the saved flags beside "model" record and the arrays do not fix:
  `norm_pix_loss` (bool) from the official main_pretrain.py's `args` (an argparse.Namespace),
  and from the `args` dict of `mae_jax.export --format=official` also `num_heads`,
  `decoder_num_heads` (ints) and a non-square `input_size` ([H, W], which tells the grid of the
  position table); {} when absent (the released files keep "model" only)."""
  args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
  fields = vars(args) if hasattr(args, "__dict__") else dict(args or {}) if isinstance(
      args, Mapping) else {}
  recorded = {k: bool(fields[k]) for k in ("norm_pix_loss",) if k in fields}
  recorded.update({k: int(fields[k]) for k in ("num_heads", "decoder_num_heads")
                   if isinstance(fields.get(k), int)})
  size = fields.get("input_size")
  if isinstance(size, (list, tuple)) and len(size) == 2:  # a non-square grid's (H, W)
    recorded["input_size"] = [int(x) for x in size]
  return recorded


def _load(path: str, trust_pickle: bool = False
          ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """(load_torch_state_dict(path, trust_pickle), recorded_args of the file)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = _weights_file(path)
  if path.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(load_torch_state_dict(os.path.join(os.path.dirname(path), shard),
                                       trust_pickle))
    return out, {}
  if path.endswith(".npz"):
    reader, kind = _read_npz, "numpy .npz file"
  elif path.endswith(".safetensors"):
    reader, kind = _read_safetensors, ".safetensors file"
  else:
    reader, kind = functools.partial(_read_torch, trust_pickle=trust_pickle), \
        "PyTorch checkpoint (torch.save)"
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ImportError(f"reading {path} needs torch: pip install -e '.[torch]' (or save the "
                        "state dict as .npz or .safetensors elsewhere)") from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  try:
    checkpoint = reader(path)
  except (FileNotFoundError, PermissionError, UnsafePickleError):
    raise
  except (ImportError, AttributeError) as e:  # a pickled class that is not importable here
    raise ValueError(
        f"{path} pickles an object whose class is not importable here ({type(e).__name__}: "
        f"{e}): a whole model saved with torch.save(model). Where that model's code imports, "
        f"save its state dict instead: torch.save({{'model': model.state_dict()}}, PATH)"
    ) from e
  except Exception as e:  # pylint: disable=broad-except  # re-raised, naming the file
    detail = " ".join(str(e).split())
    if len(detail) > 200:
      detail = detail[:200].rsplit(" ", 1)[0] + " ..."
    elif not detail.endswith("."):
      detail += "."
    raise ValueError(
        f"{path} ({os.path.getsize(path):,} bytes) does not read as a {kind}: "
        f"{type(e).__name__}: {detail} A file cut short (an "
        f"interrupted download or copy) or another kind of file fails like this: compare its "
        f"size with the original's and fetch it again.") from e
  return ({k: _to_numpy(v, k) for k, v in state_dict_of(checkpoint, path).items()},
          recorded_args(checkpoint))


def load_checkpoint(path: str, trust_pickle: bool = False
                    ) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
  """(state dict with official keys, the transformers config.json beside it or None);
  `trust_pickle` as in `load_torch_state_dict`."""
  return read_checkpoint(path, trust_pickle)[:2]


def read_checkpoint(path: str, trust_pickle: bool = False
                    ) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]], Dict[str, Any]]:
  """load_checkpoint(path) and the model fields its official `args` record (`recorded_args`)."""
  sd, recorded = _load(path, trust_pickle)
  directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  hf_config = None
  if is_transformers(sd) and os.path.exists(os.path.join(directory, "config.json")):
    with open(os.path.join(directory, "config.json")) as f:
      hf_config = json.load(f)
    if hf_config.get("model_type", "vit_mae") != "vit_mae":
      raise ValueError(f"{directory}/config.json is of model_type "
                       f"{hf_config['model_type']!r}, not vit_mae")
    eps = hf_config.get("layer_norm_eps", 1e-6)
    if eps != 1e-6:
      from absl import logging  # pylint: disable=g-import-not-at-top
      logging.warning("%s/config.json says layer_norm_eps=%g; mae_jax uses the official 1e-6, "
                      "so outputs differ slightly from transformers' with this config.",
                      directory, eps)
  return _official(sd), hf_config, recorded


def _model_shapes(config) -> Params:
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax.models import classifier as vit  # pylint: disable=g-import-not-at-top
  from mae_jax.models.mae import from_config  # pylint: disable=g-import-not-at-top
  classifier = config.get("mode", "pretrain") != "pretrain"
  model = vit.classifier_from_config(config.model) if classifier else from_config(config.model)
  size = model.img_size if isinstance(model.img_size, (tuple, list)) else (model.img_size,) * 2
  return jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "mask": jax.random.key(0)},
      jax.numpy.zeros((1, *size, model.in_chans))))


def checked_conversion(state_dict: Mapping[str, Any], config=None,
                       hf_config: Optional[Mapping[str, Any]] = None,
                       recorded: Optional[Mapping[str, Any]] = None):
  """(params, batch_stats, config) of a state dict, everything checked: the checkpoint's facts
  (`recorded`: the model fields its official `args` record) against `config` (None: the
  checkpoint's own config, see `default_config`), then every array against the shapes of the
  config's model. ValueError listing each disagreement."""
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  sd = _official(state_dict)
  facts = checkpoint_facts(sd, hf_config, recorded)
  if config is None:
    config = default_config(facts, hf_config)
  else:
    config = config.copy_and_resolve_references()
  classifier = config.get("mode", "pretrain") != "pretrain"
  if "num_classes" in facts and not classifier:
    raise ValueError(f"the checkpoint is a classifier (head {facts['num_classes']!r}): convert "
                     f"it with a fine-tuning or linear probing config (configs/finetune_*.py, "
                     f"configs/linprobe_*.py), or without --config")
  if "num_classes" not in facts and classifier:
    raise ValueError("the checkpoint is a pretrained MAE (no head): convert it with a "
                     "pretraining config (configs/vit_*.py) or without --config, then start "
                     f"{config.mode} from that workdir with --config.init_from")
  problems = fit_config(config.model, facts)
  if problems:
    raise ValueError("the checkpoint's facts disagree with --config (the file wins: set these "
                     "fields to the checkpoint's values, or leave out --config): "
                     + "; ".join(problems))
  # The model fields no array fixes (mask ratio, dtype, heads, ...) get the one config check,
  # so that what is written is a config the commands that read it accept.
  from mae_jax import config_checks  # pylint: disable=g-import-not-at-top
  problems = [p for p in config_checks.config_problems(config, device_count=1, process_count=1)
              if p.startswith("config.model.")]
  if problems:
    raise ValueError("the config's model is not one mae_jax can run: " + " ".join(problems))
  if "decoder_embed_dim" in facts and "norm_pix_loss" not in facts and not hf_config:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning(
        "The checkpoint does not record what its decoder learned to predict: taking "
        "config.model.norm_pix_loss=%s. The official *_full.pth files predict normalized "
        "patches (True); the official mae_visualize_vit_*.pth ones predict pixels: convert "
        "those with --config=configs/vit_X.py --config.model.norm_pix_loss=False. It sets how "
        "mae_jax.visualize maps predictions to pixels and the loss of continued pretraining.",
        config.model.norm_pix_loss)
  params = params_from_torch(sd, scan=bool(config.model.scan))
  batch_stats = batch_stats_from_torch(sd)
  expected = _model_shapes(config)
  problems = checkpoint.shape_problems(params, expected["params"], optional=DECODER_PARAMS)
  if batch_stats:
    problems += checkpoint.shape_problems(batch_stats, expected.get("batch_stats", {}))
  if problems:
    raise ValueError("the checkpoint does not fit the config's model (check the model size, "
                     "patch_size and img_size): " + "; ".join(problems[:8]))
  return params, batch_stats, config


def check_target(workdir: str) -> None:
  """ValueError when `workdir` cannot be written (a file, a read-only folder) or holds a
  training run (its checkpoints, lock or metrics): a conversion there would replace the run's
  config.json and set params beside its checkpoints. An earlier conversion's params/ may be
  replaced."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from mae_jax import checkpoint, writers  # pylint: disable=g-import-not-at-top
  writers.check_writable(workdir, flag="--workdir", kind="directory")
  root = epath.Path(checkpoint.absolute(workdir))
  found = [name for name in (checkpoint.CHECKPOINTS, checkpoint.LOCK, writers.METRICS_FILE)
           if (root / name).exists()]
  if found:
    raise ValueError(f"--workdir={workdir} holds a training run ({', '.join(found)}): "
                     f"converting into it would replace that run's config.json. Convert into "
                     f"a new --workdir, and start from it with --config.init_from=DIR or by "
                     f"running mae_jax.main on it.")


def convert_state_dict(state_dict: Mapping[str, Any], workdir: str, config=None,
                       hf_config: Optional[Mapping[str, Any]] = None, source: str = "state dict",
                       recorded: Optional[Mapping[str, Any]] = None):
  """Writes a state dict's params (and batch_stats) and config into `workdir` once every check
  of `checked_conversion` passes (nothing is written otherwise); returns (params, batch_stats,
  config)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  check_target(workdir)
  try:
    params, batch_stats, config = checked_conversion(state_dict, config, hf_config, recorded)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e
  checkpoint.save_params(workdir, params, config, batch_stats=batch_stats)
  kind = ("classifier" if "head" in params else
          "full (encoder + decoder)" if "decoder_pred" in params else "encoder-only")
  logging.info("wrote %s params (%d arrays) of %s to %s", kind, len(jax.tree.leaves(params)),
               source, workdir)
  return params, batch_stats, config


def convert(torch_checkpoint: str, workdir: str, config=None, trust_pickle: bool = False):
  """Converts a checkpoint file or directory (see the module docstring) into `workdir`.
  `trust_pickle`: read a torch file that pickles Python objects beside tensors (see
  `load_torch_state_dict`)."""
  check_target(workdir)  # before reading a file of gigabytes
  state_dict, hf_config, recorded = read_checkpoint(torch_checkpoint, trust_pickle)
  return convert_state_dict(state_dict, workdir, config, hf_config, source=torch_checkpoint,
                            recorded=recorded)


def main(argv: Sequence[str]) -> None:
  """`python -m mae_jax.convert`: a released checkpoint -> a workdir that mae_jax starts from."""
  del argv
  from mae_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mae_jax import writers  # pylint: disable=g-import-not-at-top
  writers.show_own_info_logs()
  # The file, the workdir or the config: named, in a few lines.
  with config_lib.input_errors_end_the_command("\nNothing was written."):
    convert(_TORCH_CHECKPOINT.value, _WORKDIR.value, _CONFIG.value, _TRUST_PICKLE.value)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _TORCH_CHECKPOINT = flags.DEFINE_string(
      "torch_checkpoint", None, "An official .pth, a transformers ViTMAE checkpoint (directory, "
      ".safetensors or .bin) or an .npz of official keys.", required=True)
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "A config file (configs/vit_l.py); default: the checkpoint's own model.",
      lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the converted checkpoint.",
                                 required=True)
  _TRUST_PICKLE = flags.DEFINE_bool(
      "trust_pickle", False, "Read a torch file that pickles Python objects beside tensors (a "
      "whole model saved with torch.save(model)): unpickling them can run any code, so only "
      "for a file from a source you trust. Default: torch.load(weights_only=True).")
  from mae_jax import config_lib  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=lambda argv: config_lib.parse_flags(argv, _CONFIG))
