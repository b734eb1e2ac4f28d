"""A workdir's model for other code: the encoder in the big_vision / vision_transformer ViT
layout (other Flax models), a transformers ViTMAE checkpoint directory, or a PyTorch file in the
official code's layout.

    python -m mae_jax.export --workdir=DIR --output=FILE.npz
    python -m mae_jax.export --workdir=DIR --format=transformers --output=DIR2
    python -m mae_jax.export --workdir=DIR --format=official --output=FILE.pth

--format=official (needs torch: `pip install -e '.[torch]'`) writes what the official code
saves, `torch.save({"model": state_dict, "args": {...}})`, with the official keys
(`convert.params_to_torch`) and float32 tensors; `args` is a plain dict rather than the official
argparse.Namespace, so that torch.load's default `weights_only=True` (torch >= 2.6) reads it. A pretraining workdir gives models_mae.py's
keys (decoder and fixed `pos_embed` tables included: `load_state_dict(strict=True)`; args
carry `norm_pix_loss` and the head counts, which `mae_jax.convert` reads back, so that the
file converts to the same params and config without --config); a fine-tuned classifier gives
models_vit.py's (`fc_norm` and no final `norm` for a global-pool one, as main_finetune.py
leaves it); a linear probe gives main_linprobe.py's `head.0` BatchNorm statistics and `head.1`
Linear. main_finetune.py's `--finetune FILE.pth` and `--eval --resume FILE.pth`, and timm's
VisionTransformer (global_pool="avg", fc_norm=True for a global-pool classifier), load it.
models_mae.py builds square models only: a non-square MAE is written with a warning
(`official_limits`), for mae_jax.convert and models_vit.py (its encoder, into a classifier of the
same img_size); a non-square classifier loads into models_vit.py.

--format=transformers writes DIR2/model.safetensors and DIR2/config.json, which
`transformers.ViTMAEForPreTraining.from_pretrained(DIR2)` loads (an encoder-only workdir, such
as a converted `mae_pretrain_vit_*.pth`: `ViTMAEModel`), keys in the layout of the
facebook/vit-mae-* files, which transformers 4.x and 5.x both read; `layer_norm_eps` is MAE's
1e-6. A fine-tuned classifier has no ViTMAE counterpart and is refused.

A non-square model (img_size (H, W), H != W) goes only part of the way into transformers, whose
ViTMAE assumes square images beyond its config (checked with transformers 5.24 and 4.46):
`ViTMAEModel.from_pretrained(DIR2)` keeps the exported (H/p) x (W/p) position table and its
forward gives mae_jax's encoder output; `ViTMAEForPreTraining` cannot be built unless the
patch count is a square number (its decoder makes a sqrt(L) x sqrt(L) table at construction;
transformers 4 does so for ViTMAEModel's table too); where it builds, its `.vit` and
`.decoder` give mae_jax's outputs but its forward refuses non-square pixel values
(`patchify`), and `interpolate_pos_encoding=True` reads the table as a square grid: wrong
outputs, or an error. The config.json then names `ViTMAEModel`, the decoder weights are still
written (`mae_jax.convert` reads the directory back whole), and the export logs a warning
saying this (`transformers_limits`).

The npz (the default format)
is a flat npz with "a/b/c" keys, the format of big_vision's `load_params`:
- `embedding/{kernel [p, p, C, D], bias}`, `cls` [1, 1, D];
- `pos_embedding` [1, L, D]: MAE's fixed sin-cos table (or a fine-tuned classifier's learned
  one) without the cls row. big_vision adds it to the patch tokens before it prepends `cls`;
  the cls row of the table is folded into `cls` (MAE's is zeros, so `cls` is unchanged);
- `Transformer/encoderblock_{i}/{LayerNorm_0, LayerNorm_1, MlpBlock_0/Dense_{0,1}}` as stored,
  `MultiHeadDotProductAttention_0/{query,key,value}/kernel` [D, heads, head_dim] (bias
  [heads, head_dim]) and `out/kernel` [heads, head_dim, D], flax's DenseGeneral layout;
- `Transformer/encoder_norm/{scale, bias}`; a fine-tuned classifier's `fc_norm` and `head` too.
  A global-pool classifier has no encoder_norm: the official one averages the un-normalized
  tokens, then applies `fc_norm`, which a model must then do in that order. A linear probe's
  head comes with its BatchNorm folded in (`fold_head_batchnorm`): a plain `head` Dense on the
  cls token gives the probe's logits.
The decoder and `mask_token` are left out. One difference remains for big_vision's own ViT: its
MLP uses the tanh approximation of GELU, MAE the exact one.
"""

import os
from typing import Any, Dict, Optional, Tuple

from absl import logging
from flax import traverse_util
import numpy as np

from mae_jax import writers
from mae_jax.models.layout import is_scanned, scan_to_unrolled
from mae_jax.models.mae import patch_grid
from mae_jax.models.vit import image_hw

Params = Dict[str, Any]
_ENCODER = ("embedding", "cls", "Transformer")


def _numpy_tree(tree) -> Params:
  if hasattr(tree, "items"):
    return {k: _numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def fold_head_batchnorm(head: Params, stats: Params, eps: float = 1e-6) -> Params:
  """A linear probe's `head` Dense {kernel [D, K], bias [K]} with its BatchNorm in front of it
  (running `stats` {mean, var} [D], no affine: main_linprobe.py's BatchNorm1d(affine=False,
  eps=1e-6)) folded in, as one Dense: head((x - mean) / sqrt(var + eps)) = x @ kernel' + bias'
  with kernel' = kernel / sqrt(var + eps)[:, None], bias' = bias - (mean / sqrt(var + eps)) @
  kernel. float32, computed in float64."""
  kernel, bias = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
  inv_std = 1.0 / np.sqrt(np.asarray(stats["var"], np.float64) + eps)
  return {"kernel": (kernel * inv_std[:, None]).astype(np.float32),
          "bias": (bias - (np.asarray(stats["mean"], np.float64) * inv_std) @ kernel
                   ).astype(np.float32)}


def to_big_vision(params: Params, num_heads: int, grid: Optional[tuple] = None,
                  batch_stats: Optional[Params] = None) -> Params:
  """MAE or classifier params -> the encoder as a nested dict in big_vision's ViT layout.

  `grid` (patch rows, cols) is needed for MAE params, whose position table is not a param.
  `batch_stats`: a linear probe's ({"head_norm": {"mean", "var"}}), folded into its `head`
  (`fold_head_batchnorm`); a probe's head exported without them gives other logits.
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
  if "head" in out and (batch_stats or {}).get("head_norm"):
    out["head"] = fold_head_batchnorm(out["head"], _numpy_tree(batch_stats["head_norm"]))
  return out


def _grid(config) -> Optional[tuple]:
  if config is None:
    return None
  return patch_grid(config.model.img_size, config.model.patch_size)


def check_output(output: str, directory: bool, file_format: str = "npz") -> None:
  """ValueError, before anything is read or written, when `output` cannot be written: a file
  (`directory=False`: the npz, or the official .pth) that names a directory, a directory
  (transformers) that names a file, or a path below a file. Folders that do not exist yet are
  fine: they are made."""
  kind = "directory" if directory else "file"
  other = "--format=transformers" if not directory else "the default --format=npz"
  if os.path.isdir(output) and not directory:
    example = os.path.join(output, "encoder.npz" if file_format == "npz" else "model.pth")
    # The official format is asked for by name: another format is no way out of this.
    switch = f", or use {other} to write a directory" if file_format == "npz" else ""
    raise ValueError(f"--output={output} is a directory, but the {file_format} format writes one "
                     f"file: name a file (such as {example}){switch}")
  if os.path.exists(output) and not os.path.isdir(output) and directory:
    raise ValueError(f"--output={output} is a file, but --format=transformers writes a "
                     "directory (model.safetensors, config.json): name a new or existing "
                     f"directory, or use {other} to write one file")
  writers.check_writable(output, kind=kind)


def _heads(workdir: str, config, num_heads: Optional[int]) -> int:
  """The attention heads to split the kernels by: the config's; `num_heads` must agree."""
  if config is None:
    if num_heads is None:
      raise ValueError(f"{workdir} has no config.json: pass --num_heads")
    return num_heads
  heads = config.model.num_heads
  if num_heads is not None and num_heads != heads:
    raise ValueError(f"--num_heads={num_heads}, but the model in {workdir} has {heads} heads "
                     "(its config): leave --num_heads out")
  return heads


def _savez(path: str, arrays: Dict[str, np.ndarray]) -> None:
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def export_workdir(workdir: str, output: str, num_heads: Optional[int] = None) -> Params:
  """Writes the encoder of a workdir (pretraining, converted or fine-tuned) to `output` (an
  npz; missing folders made; an existing file replaced whole). ValueError for an output that
  cannot be written (`check_output`, before anything is read) or a `num_heads` that differs
  from the workdir's config; `num_heads` is needed only without one."""
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  check_output(output, directory=False)
  params, batch_stats, config = checkpoint.load_variables(workdir)
  encoder = to_big_vision(params, _heads(workdir, config, num_heads), _grid(config), batch_stats)
  writers.write_whole(output, lambda path: _savez(path, traverse_util.flatten_dict(encoder, sep="/")))
  return encoder


def from_big_vision(encoder: Params) -> Params:
  """The inverse of `to_big_vision`: an exported encoder -> mae_jax params (2D attention
  kernels) with a `pos_embedding` [1, 1 + L, D] whose cls row is zero (the npz folded it into
  `cls`), the form of a classifier's learned table, which `merge_pretrained` takes."""
  encoder = _numpy_tree(encoder)
  missing = [k for k in _ENCODER + ("pos_embedding",) if k not in encoder]
  if missing:
    raise ValueError(f"not an encoder exported by mae_jax.export: {missing} missing "
                     f"(found {sorted(encoder)})")
  params = dict(encoder)
  table = encoder["pos_embedding"]
  params["pos_embedding"] = np.concatenate([np.zeros_like(table[:, :1]), table], axis=1)
  transformer = {}
  for name, block in encoder["Transformer"].items():
    if name.startswith("encoderblock_"):
      block = dict(block)
      attn = {}
      for part, value in block["MultiHeadDotProductAttention_0"].items():
        kernel = value["kernel"]
        if part == "out":
          attn[part] = {"kernel": kernel.reshape(-1, kernel.shape[-1]), "bias": value["bias"]}
        else:
          attn[part] = {"kernel": kernel.reshape(kernel.shape[0], -1),
                        "bias": value["bias"].reshape(-1)}
      block["MultiHeadDotProductAttention_0"] = attn
    transformer[name] = block
  params["Transformer"] = transformer
  return params


def load_encoder_params(path: str) -> Params:
  """Encoder params (big_vision layout, nested dict of numpy arrays) from a file written by
  `python -m mae_jax.export` (whatever its name ends with) or from a workdir."""
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if checkpoint._is_npz(path):  # pylint: disable=protected-access
    with np.load(path) as f:
      return traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")
  params, batch_stats, config = checkpoint.load_variables(path)
  if config is None:
    raise ValueError(f"{path} has no config.json, so its head count is unknown: export it with "
                     "`python -m mae_jax.export --workdir=... --num_heads=N --output=...`")
  return to_big_vision(params, config.model.num_heads, _grid(config), batch_stats)


def transformers_limits(model_config, with_decoder: bool = True) -> Optional[str]:
  """What transformers' ViTMAE cannot do with this model (see the module docstring), or None
  for a square one, which it runs whole. `model_config` is a config's `model` field."""
  h, w = image_hw(model_config.img_size)
  if h == w:
    return None
  rows, cols = patch_grid((h, w), model_config.patch_size)
  side = int(round((rows * cols)**0.5))
  message = (f"img_size ({h}, {w}) is not square, and transformers' ViTMAE assumes square "
             f"images beyond its config. ")
  if side * side == rows * cols:
    message += "Its ViTMAEModel runs this encoder as mae_jax does"
    if with_decoder:
      message += ("; ViTMAEForPreTraining builds, and its .vit and .decoder give mae_jax's "
                  "outputs, but its forward (loss, patchify) refuses non-square pixel values")
  else:
    refused = ("ViTMAEForPreTraining (and, in transformers 4, ViTMAEModel too) cannot be built"
               if with_decoder else "transformers 4 cannot build it")
    message += (f"transformers 5's ViTMAEModel runs this encoder as mae_jax does, but {refused} "
                f"for a {rows}x{cols} patch grid ({rows * cols} patches, not a square number)")
  message += (". Do not pass interpolate_pos_encoding=True: it reads the position table as "
              "a square grid (wrong outputs, or an error).")
  if with_decoder:
    message += (" Compute reconstructions and the loss with mae_jax; the decoder's weights are "
                "written for mae_jax.convert.")
  return message


def to_transformers(params: Params, config) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """(state dict, config.json fields) of transformers' ViTMAEForPreTraining for MAE params
  with a decoder, ViTMAEModel for encoder-only ones or a non-square img_size (whose limits in
  transformers this logs as a warning: `transformers_limits`). State dict: numpy float32
  arrays under the facebook/vit-mae-* keys. ValueError for a classifier."""
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
  if "head" in params:
    raise ValueError("transformers' ViTMAE has no classifier: export a fine-tuned workdir with "
                     "the default --format=npz, or its pretraining workdir as transformers")
  m = config.model
  sd = convert.transformers_from_official(convert.params_to_torch(
      params, img_size=m.img_size, patch_size=m.patch_size))
  full = "decoder_embed" in params
  limits = transformers_limits(m, with_decoder=full)
  if limits:
    logging.warning("Export to transformers: %s", limits)
  h, w = image_hw(m.img_size)
  hf_config = dict(
      architectures=["ViTMAEForPreTraining" if full and not limits else "ViTMAEModel"],
      model_type="vit_mae",
      hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
      intermediate_size=int(m.embed_dim * m.mlp_ratio), hidden_act="gelu",
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02,
      layer_norm_eps=1e-6, image_size=h if h == w else [h, w], patch_size=m.patch_size,
      num_channels=m.in_chans, qkv_bias=True, decoder_num_attention_heads=m.decoder_num_heads,
      decoder_hidden_size=m.decoder_embed_dim, decoder_num_hidden_layers=m.decoder_depth,
      decoder_intermediate_size=int(m.decoder_embed_dim * m.mlp_ratio),
      mask_ratio=float(m.get("mask_ratio", 0.75)), norm_pix_loss=bool(m.norm_pix_loss),
      torch_dtype="float32")
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, hf_config


def export_transformers(workdir: str, output: str, num_heads: Optional[int] = None
                        ) -> Dict[str, np.ndarray]:
  """Writes OUTPUT/model.safetensors and OUTPUT/config.json (see the module docstring) from a
  workdir's params (missing folders made; earlier files replaced whole); returns the state
  dict. ValueError as for `export_workdir`."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  check_output(output, directory=True)
  params, config = checkpoint.load_params(workdir)
  if config is None:
    raise ValueError(f"{workdir} has no config.json: transformers' config needs the model's "
                     "fields (heads, sizes)")
  _heads(workdir, config, num_heads)
  sd, hf_config = to_transformers(params, config)
  weights, hf_json = os.path.join(output, "model.safetensors"), os.path.join(output, "config.json")
  writers.write_whole(weights, lambda path: save_file(sd, path, metadata={"format": "pt"}))

  def write_json(path):
    with open(path, "w") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)

  writers.write_whole(hf_json, write_json)
  # safetensors writes through a private temporary file (mode 600): the weights take the mode of
  # config.json, written as any file is, so that whoever may read one can read the other.
  shutil.copymode(hf_json, weights)
  return sd


def to_official(params: Params, config, batch_stats: Optional[Params] = None
                ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """(state dict, args) in the official code's layout: numpy arrays under models_mae.py's or
  models_vit.py's keys (`convert.params_to_torch`, the fixed sin-cos tables of the config's
  patch grid added where the model has no learned one; a linear probe's `batch_stats` as
  `head.0`), and the fields of the official `args` that describe the model."""
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
  m = config.model
  sd = convert.params_to_torch(params, img_size=m.img_size, patch_size=m.patch_size,
                               batch_stats=batch_stats or None)
  h, w = image_hw(m.img_size)
  # The official fields, and the head counts the arrays do not fix (for mae_jax.convert).
  args = dict(input_size=h if h == w else [h, w], num_heads=int(m.num_heads))
  if "decoder_embed" in params:
    args.update(norm_pix_loss=bool(m.norm_pix_loss), decoder_num_heads=int(m.decoder_num_heads))
  if "head" in params:
    args.update(nb_classes=int(np.shape(params["head"]["kernel"])[-1]),
                global_pool="fc_norm" in params)
  return sd, args


def _no_config_for_official(workdir: str, num_heads: Optional[int]) -> str:
  """The error for params without their config: what is missing, and where it comes from."""
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  missing = ("the official file records the model's image size and head counts (and an MAE's "
             "norm_pix_loss), which the arrays do not hold"
             + (" (--num_heads alone is not enough)" if num_heads is not None else ""))
  if checkpoint._is_npz(workdir):  # pylint: disable=protected-access
    return (f"{workdir} is an encoder exported by mae_jax.export, without its config: {missing}. "
            "Export the workdir it came from instead")
  return (f"{workdir} has no config.json: {missing}. Pass the run's workdir (the folder that "
          "holds params/ or checkpoints/ and config.json) rather than a folder inside it, or "
          "copy the config.json of the run that wrote these params beside its params/ folder")


def official_limits(params: Params, model_config) -> Optional[str]:
  """What the official code cannot do with this model, or None. Its models_mae.py builds square
  models only: it fills its fixed position tables from a sqrt(L) x sqrt(L) grid and `patchify`
  asserts H == W, so an MAE (params without a learned `pos_embedding`) of a non-square img_size
  does not load into `MaskedAutoencoderViT`. models_vit.py's classifier (timm's patch embedding
  and a learned table) takes any (H, W)."""
  h, w = image_hw(model_config.img_size)
  if h == w or "pos_embedding" in params:
    return None
  return (f"img_size ({h}, {w}) is not square, and the official models_mae.py builds square "
          "models only (its fixed position tables come from a sqrt(L) x sqrt(L) patch grid, and "
          "patchify asserts equal height and width): MaskedAutoencoderViT cannot load this "
          "file. Its encoder loads into a models_vit.py VisionTransformer of the same img_size "
          "(main_finetune.py's --finetune keeps a position table of the model's length as it "
          "is), and mae_jax.convert reads the file back whole")


def export_official(workdir: str, output: str, num_heads: Optional[int] = None
                    ) -> Dict[str, np.ndarray]:
  """Writes OUTPUT (one torch.save file, see the module docstring; missing folders made, an
  earlier file replaced whole) from a workdir's params; returns the state dict as numpy
  arrays. ValueError as for `export_workdir`, for a workdir without config.json (the file
  records the image size and head counts, which the arrays do not hold) and when torch is not
  installed, all before anything is written. A model the official code cannot build (a
  non-square MAE: `official_limits`) is written with a warning."""
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  check_output(output, directory=False, file_format="official")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("--format=official writes a PyTorch file and needs torch: "
                     "pip install -e '.[torch]'") from e
  params, batch_stats, config = checkpoint.load_variables(workdir)
  if config is None:
    raise ValueError(_no_config_for_official(workdir, num_heads))
  _heads(workdir, config, num_heads)
  sd, args = to_official(params, config, batch_stats)
  limits = official_limits(params, config.model)
  if limits:
    logging.warning("Export to the official code: %s", limits)
  tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}  # contiguous, writable
  writers.write_whole(output, lambda path: torch.save(
      {"model": tensors, "args": args}, path))
  return sd


def main(argv) -> None:
  """`python -m mae_jax.export`: a workdir's encoder -> a big_vision-layout npz, or its model ->
  a transformers ViTMAE directory or an official-layout .pth."""
  del argv
  from mae_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mae_jax import writers  # pylint: disable=g-import-not-at-top
  writers.show_own_info_logs()
  with config_lib.input_errors_end_the_command("\nNothing was written."):
    if _FORMAT.value in ("transformers", "official"):
      write = export_transformers if _FORMAT.value == "transformers" else export_official
      sd = write(_WORKDIR.value, _OUTPUT.value, _NUM_HEADS.value)
      print(f"wrote {_OUTPUT.value}: {len(sd)} arrays, "
            f"{sum(v.size for v in sd.values()):,} numbers")
      return
    encoder = export_workdir(_WORKDIR.value, _OUTPUT.value, _NUM_HEADS.value)
    arrays = traverse_util.flatten_dict(encoder, sep="/")
    print(f"wrote {_OUTPUT.value}: {len(arrays)} arrays, "
          f"{sum(v.size for v in arrays.values()):,} parameters")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import

  _WORKDIR = flags.DEFINE_string("workdir", None, "A workdir of mae_jax.main or mae_jax.convert.",
                                 required=True)
  _OUTPUT = flags.DEFINE_string("output", None, "The .npz file to write (--format=transformers: "
                                "the directory; --format=official: the .pth file).",
                                required=True)
  _FORMAT = flags.DEFINE_enum("format", "npz", ["npz", "transformers", "official"],
                              "npz: the encoder, big_vision layout; transformers: ViTMAE; "
                              "official: a .pth in the official code's layout (needs torch).")
  _NUM_HEADS = flags.DEFINE_integer("num_heads", None,
                                    "Attention heads: needed only for a workdir without a "
                                    "config.json; otherwise the config's (another is refused).")
  from mae_jax import config_lib  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=config_lib.parse_flags)
