"""Official PyTorch MAE checkpoints <-> mae_jax params.

    python -m mae_jax.convert --torch_checkpoint=mae_pretrain_vit_large_full.pth \
        --config=configs/vit_l.py --workdir=DIR

writes DIR/params (an Orbax checkpoint) and DIR/config.json, which `mae_jax.main`,
`mae_jax.visualize`, `mae_jax.export` and `config.init_from` start from. torch is needed only to
read `.pth` files (`pip install -e .[torch]`); `.npz` state dicts convert without it.
"""

import re
from typing import Any, Dict, Mapping, Optional

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
# (official prefix, params path, kind) outside the blocks
_TOP_MAP = [
    ("norm", ("Transformer", "encoder_norm"), "norm"),
    ("decoder_embed", ("decoder_embed",), "linear"),
    ("decoder_norm", ("Decoder", "decoder_norm"), "norm"),
    ("decoder_pred", ("decoder_pred",), "linear"),
    ("fc_norm", ("fc_norm",), "norm"),
    ("head", ("head",), "linear"),
]
# Fixed tables and training-only buffers that carry no trainable params.
_IGNORED = {"pos_embed", "decoder_pos_embed"}
_STACKS = {"blocks": ("Transformer", "encoderblock"),
           "decoder_blocks": ("Decoder", "decoderblock")}


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def _set(tree: Params, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  if path[-1] in tree:
    raise ValueError(f"two official keys map to {'/'.join(path)}")
  tree[path[-1]] = value


def _put(tree: Params, sd: Mapping[str, np.ndarray], prefix: str, path, kind: str,
         used: set) -> None:
  if f"{prefix}.weight" not in sd:
    return
  w, b = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
  used.update({f"{prefix}.weight", f"{prefix}.bias"})
  if kind == "norm":
    _set(tree, path + ("scale",), w)
  else:
    _set(tree, path + ("kernel",), w.T)
  _set(tree, path + ("bias",), b)


def params_from_torch(state_dict: Mapping[str, Any], scan: bool = False) -> Params:
  """Official key names -> params tree (unrolled, or scanned with `scan=True`).

  Accepts numpy arrays or torch tensors, with or without a `module.` prefix. An encoder-only
  dict (the released `mae_pretrain_vit_*.pth`) gives encoder params only; a fine-tuned one also
  gives `fc_norm` and `head`. Unknown keys are an error, not silently dropped.
  """
  sd = {re.sub(r"^module\.", "", k): _to_numpy(v) for k, v in state_dict.items()}
  if "patch_embed.proj.weight" not in sd:
    raise ValueError("not an official MAE/ViT state dict: 'patch_embed.proj.weight' is missing "
                     f"(keys start with {sorted(sd)[:5]}); pass torch.load(path)['model']")
  used = set(_IGNORED & set(sd))
  params: Params = {}
  w = sd["patch_embed.proj.weight"]  # [D, C, p, p]
  _set(params, ("embedding", "kernel"), w.transpose(2, 3, 1, 0))
  _set(params, ("embedding", "bias"), sd["patch_embed.proj.bias"])
  _set(params, ("cls",), sd["cls_token"])
  used.update({"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token"})
  if "mask_token" in sd:
    _set(params, ("mask_token",), sd["mask_token"])
    used.add("mask_token")
  if "head.weight" in sd and "pos_embed" in sd:
    # A fine-tuned classifier trained its position table: keep it (the classifier's param).
    _set(params, ("pos_embedding",), sd["pos_embed"])
  for prefix, path, kind in _TOP_MAP:
    _put(params, sd, prefix, path, kind, used)
  for stack, (outer, block) in _STACKS.items():
    depth = 1 + max([int(m.group(1)) for k in sd
                     if (m := re.match(rf"^{stack}\.(\d+)\.", k))], default=-1)
    for i in range(depth):
      base = (outer, f"{block}_{i}")
      pre = f"{stack}.{i}"
      qkv_w, qkv_b = sd[f"{pre}.attn.qkv.weight"], sd[f"{pre}.attn.qkv.bias"]
      used.update({f"{pre}.attn.qkv.weight", f"{pre}.attn.qkv.bias"})
      d = qkv_w.shape[1]
      for j, name in enumerate(("query", "key", "value")):
        attn = base + ("MultiHeadDotProductAttention_0", name)
        _set(params, attn + ("kernel",), qkv_w[j * d:(j + 1) * d].T)
        _set(params, attn + ("bias",), qkv_b[j * d:(j + 1) * d])
      for suffix, path, kind in _BLOCK_MAP:
        _put(params, sd, f"{pre}.{suffix}", base + path, kind, used)
  unknown = sorted(set(sd) - used)
  if unknown:
    raise ValueError(f"official keys with no mae_jax counterpart: {unknown[:10]}")
  params = _copy_arrays(params)
  return unrolled_to_scan(params) if scan else params


def _copy_arrays(tree):
  if isinstance(tree, dict):
    return {k: _copy_arrays(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)


def params_to_torch(params: Params, img_size: Optional[int] = None,
                    patch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
  """params tree (unrolled or scanned) -> official key names, as numpy arrays.

  With `img_size` the fixed `pos_embed` (and `decoder_pos_embed`) tables are added, so that the
  official model loads the dict with `strict=True`.
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

  kernel = get(("embedding", "kernel"))  # [p, p, C, D]
  sd["cls_token"] = get(("cls",))
  sd["patch_embed.proj.weight"] = kernel.transpose(3, 2, 0, 1)
  sd["patch_embed.proj.bias"] = get(("embedding", "bias"))
  if has(("mask_token",)):
    sd["mask_token"] = get(("mask_token",))
  if has(("pos_embedding",)):  # a classifier's learned table
    sd["pos_embed"] = get(("pos_embedding",))
  for prefix, path, kind in _TOP_MAP:
    put(prefix, path, kind)
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
    grid = (img_size // p, img_size // p)
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


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads an official `.pth` (its "model" entry) or an `.npz` of official keys."""
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading .pth files needs torch: pip install -e '.[torch]' "
                      "(or convert the state dict to .npz elsewhere)") from e
  ckpt = torch.load(path, map_location="cpu", weights_only=False)
  sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
  return {k: v.detach().cpu().float().numpy() for k, v in sd.items()}


def main(argv) -> None:
  """`python -m mae_jax.convert`: an official checkpoint -> a workdir that mae_jax starts from."""
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from mae_jax.models import classifier as vit  # pylint: disable=g-import-not-at-top
  from mae_jax.models.mae import from_config  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  state_dict = load_torch_state_dict(_TORCH_CHECKPOINT.value)
  params = params_from_torch(state_dict, scan=bool(config.model.scan))
  # A fine-tuning config (configs/finetune_*.py) takes a fine-tuned classifier checkpoint.
  classifier = config.get("mode", "pretrain") != "pretrain"
  model = vit.classifier_from_config(config.model) if classifier else from_config(config.model)
  # Check every converted array against the shapes the config's model expects.
  expected = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "mask": jax.random.key(0)},
      jax.numpy.zeros((1, model.img_size, model.img_size, model.in_chans)))["params"])
  problems = _shape_problems(params, expected)
  if problems:
    raise ValueError(f"{_TORCH_CHECKPOINT.value} does not fit --config's model "
                     f"(check model size, patch_size and img_size): " + "; ".join(problems[:8]))
  checkpoint.save_params(_WORKDIR.value, params, config)
  kind = ("classifier" if classifier else
          "full (encoder + decoder)" if "decoder_pred" in params else "encoder-only")
  logging.info("wrote %s params (%d arrays) to %s", kind, len(jax.tree.leaves(params)),
               _WORKDIR.value)


def _shape_problems(params: Params, expected: Params, prefix: str = "") -> list:
  """Differences between a converted tree and the expected one (missing parts are allowed for
  an encoder-only checkpoint's decoder)."""
  problems = []
  for key, value in params.items():
    path = f"{prefix}{key}"
    if key not in expected:
      problems.append(f"{path} is not in the model")
    elif isinstance(value, dict):
      problems.extend(_shape_problems(value, expected[key], path + "/"))
    elif tuple(value.shape) != tuple(expected[key].shape):
      problems.append(f"{path} has shape {tuple(value.shape)}, the model expects "
                      f"{tuple(expected[key].shape)}")
  return problems


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _TORCH_CHECKPOINT = flags.DEFINE_string(
      "torch_checkpoint", None, "An official .pth (or an .npz of official keys).", required=True)
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/vit_l.py).",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the converted checkpoint.",
                                 required=True)
  flags.mark_flag_as_required("config")
  app.run(main)
