"""Shared pieces of the configs in configs/: model sizes and the paper's pretraining recipe;
and the parsing of the command lines' --config flag (`parse_flags`)."""

import contextlib
import difflib
import importlib.util
import os
import re
import sys
from typing import List, Optional, Sequence

import ml_collections
from ml_collections import config_dict

# ImageNet's per-channel mean and std of RGB values in [0, 1], as the official code normalizes.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ViT sizes of the paper (docs/recipe.md); decoder 512 x 8, 16 heads, for all.
MODEL_SIZES = {
    "vit_b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_l": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_h": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def image_size_field(img_size=224) -> config_dict.FieldReference:
  """A config field for `img_size` that holds an int (square) or an (H, W) pair.

  ml_collections parses a command-line override by the type of the field's value, so an int
  field would refuse `'(48, 64)'` and a tuple field `224`. A field typed `object` is parsed as
  a Python literal, so both `--config.model.img_size=224` and
  `--config.model.img_size='(48, 64)'` work; the models check the value
  (`mae_jax.models.image_hw`).
  """
  return config_dict.FieldReference(img_size, field_type=object)


def no_variant(arg, config_file: str) -> None:
  """Refuses the `:VARIANT` of `--config=configs/X.py:VARIANT` for a config file that has none
  (ml_collections hands it to get_config, which would otherwise ignore it)."""
  if arg:
    name = os.path.join(os.path.basename(os.path.dirname(config_file)),
                        os.path.basename(config_file))
    raise ValueError(
        f"{name} has no variants, but got {name}:{arg}. Each size and job is its own file "
        f"(configs/vit_b.py, vit_l.py, vit_h.py, finetune_vit_b.py, ...); change single fields "
        f"with --config.FIELD=VALUE.")


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """`MaskedAutoencoder` constructor fields (same names) plus `mask_ratio`; `img_size` is an
  int or an (H, W) pair (`image_size_field`)."""
  fields = dict(img_size=224, in_chans=3, decoder_embed_dim=512, decoder_depth=8,
                decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=True,
                dtype="bfloat16", scan=False, remat=False,
                attention_impl=config_dict.placeholder(str), mask_ratio=0.75)
  fields.update(MODEL_SIZES[size])
  fields.update(overrides)
  fields["img_size"] = image_size_field(fields["img_size"])
  return ml_collections.ConfigDict(fields)


def pretrain_config(size: str) -> ml_collections.ConfigDict:
  """The paper's pretraining recipe (Table 8) for one ViT size on ImageNet-1k."""
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"
  c.seed = 0
  c.model = model_config(size)
  c.input = ml_collections.ConfigDict(dict(
      dataset="imagenet2012",   # a TFDS name, or "folder:/path/to/images"
      split="train",
      data_dir=config_dict.placeholder(str),    # TFDS data_dir (None = TFDS default)
      manual_dir=config_dict.placeholder(str),  # where the ILSVRC tars are, for imagenet2012
      batch_size=4096,          # global, over all processes
      crop_scale=(0.2, 1.0),
      crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
      random_flip=True,         # horizontal flip with probability 1/2 (training)
      num_workers=-1,           # decoding worker processes per host (-1 = one per core)
      prefetch=2,               # batches kept ready ahead, per host
      decoded_cache_mb=0,       # decoded images kept in memory per process (small datasets)
      eval_split=config_dict.placeholder(str),  # None = the dataset's validation/val/test split
      eval_crop_pct=0.875,      # evaluation: resize to img_size / eval_crop_pct, center crop
      # Per-channel normalization (x - mean) / std, uint8 values first divided by 255; one value
      # per channel of config.model.in_chans (`python -m mae_jax.stats` computes them).
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
  ))
  c.num_epochs = 800
  c.warmup_epochs = 40
  c.warmup_steps = 0            # > 0 overrides warmup_epochs
  c.total_steps = 0             # 0 = derive from num_epochs and the dataset size
  c.optimizer = ml_collections.ConfigDict(dict(
      blr=1.5e-4,               # lr = blr * global_batch / 256
      lr=0.0,                   # > 0 overrides blr scaling
      b1=0.9, b2=0.95, weight_decay=0.05,
      # "official": no decay on 1-D params and biases, the rest (cls, mask_token) decayed, as
      # main_pretrain.py; "kernels": the weight matrices only.
      weight_decay_groups="official",
      grad_accum_steps=1,       # micro-batches per update (for global batches that do not fit)
  ))
  # data -1 = all remaining devices; arrays up to fsdp_min_mb MiB stay replicated under fsdp.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_mb=4.0))
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.reconstruction_every_steps = 5000
  # The kNN monitor (mae_jax.monitor): top-1 of DINO's weighted kNN on the encoder's features of
  # a labeled dataset, written as `knn_top1` rows at the start, every `every_steps` and at the end.
  c.monitor = ml_collections.ConfigDict(dict(
      every_steps=0,            # 0 = off
      dataset=config_dict.placeholder(str),  # labeled; None = input.dataset
      train_split="train",      # the neighbours
      train_examples=100_000,   # a random subset of train_split of this size (0 = all of it)
      eval_split=config_dict.placeholder(str),  # None = the dataset's validation/val/test split
      batch_size=256,           # global, over all devices and processes
      k=20, temperature=0.07,   # DINO's weighted kNN
      feature="cls",            # "cls" token (as linear probing) or "mean" of the patch tokens
  ))
  # A non-finite loss or gradient stops the run (False) or skips that update (True).
  c.skip_nonfinite_steps = False
  # How the step keeps the old state on a non-finite update: "cond" (a branch), "select" (compute
  # the update, then pick) or "auto" (cond on CPU, select elsewhere); the same numbers.
  c.nonfinite_guard = "auto"
  return c


# Fine-tuning recipe per size (FINETUNE.md; paper Table 9).
FINETUNE = {
    "vit_b": dict(blr=5e-4, layer_decay=0.65, drop_path=0.1, num_epochs=100),
    "vit_l": dict(blr=1e-3, layer_decay=0.75, drop_path=0.2, num_epochs=50),
    "vit_h": dict(blr=1e-3, layer_decay=0.75, drop_path=0.3, num_epochs=50),
}


def classifier_model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """`VisionTransformer` fields (mae_jax.models.classifier) for one ViT size; `img_size` as in
  `model_config`."""
  fields = dict(num_classes=1000, img_size=224, in_chans=3, mlp_ratio=4.0, global_pool=True,
                drop_path=0.0, head_init_std=2e-5, head_batchnorm=False, dtype="bfloat16",
                scan=False, remat=False, attention_impl=config_dict.placeholder(str))
  fields.update(MODEL_SIZES[size])
  fields.update(overrides)
  fields["img_size"] = image_size_field(fields["img_size"])
  return ml_collections.ConfigDict(fields)


def _classifier_common(size: str, mode: str) -> ml_collections.ConfigDict:
  pretrain = pretrain_config(size)
  c = ml_collections.ConfigDict()
  c.mode = mode
  c.seed = 0
  c.init_from = ""              # a pretraining, converted (mae_jax.convert) or fine-tuned workdir
  # True: params of init_from that do not fit config.model (other shapes, missing encoder parts)
  # keep their fresh init; False: such a start is an error that lists them.
  c.init_partial = False
  c.input = pretrain.input
  c.input.crop_scale = (0.08, 1.0)  # RandomResizedCrop's default, as the official code uses
  c.input.eval_split = config_dict.placeholder(str)  # None = the dataset's held-out split
  c.input.eval_crop_pct = 0.875  # resize to 256, center crop 224
  c.eval_batch_size = 1024
  c.eval_every_steps = 0        # 0 = once per epoch (and always at the end)
  c.eval_only = False           # evaluate init_from (or the workdir's checkpoint) and stop
  c.warmup_steps = 0            # > 0 overrides warmup_epochs
  c.total_steps = 0             # 0 = derive from num_epochs and the dataset size
  c.mesh = pretrain.mesh
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.skip_nonfinite_steps = False  # as in pretraining: stop (False) or skip such an update
  c.nonfinite_guard = "auto"    # as in pretraining: "cond", "select" or "auto"
  return c


def finetune_config(size: str) -> ml_collections.ConfigDict:
  """The paper's end-to-end fine-tuning recipe (Table 9, FINETUNE.md) on ImageNet-1k."""
  r = FINETUNE[size]
  c = _classifier_common(size, "finetune")
  c.model = classifier_model_config(size, drop_path=r["drop_path"])
  c.input.batch_size = 1024
  c.augment = ml_collections.ConfigDict(dict(
      rand_augment="rand-m9-mstd0.5-inc1",  # timm RandAugment string ("" = off)
      rand_augment_ops="all",   # "geometric": rotate/shear/translate only (not RGB, float)
      reprob=0.25,              # random erasing probability (mode "pixel")
      mixup=0.8, cutmix=1.0,    # Beta alphas (0 = off)
      mixup_prob=1.0, mixup_switch_prob=0.5,
      smoothing=0.1,            # label smoothing
  ))
  c.num_epochs = r["num_epochs"]
  c.warmup_epochs = 5
  c.optimizer = ml_collections.ConfigDict(dict(
      blr=r["blr"], lr=0.0, min_lr=1e-6, b1=0.9, b2=0.999, weight_decay=0.05,
      layer_decay=r["layer_decay"], grad_accum_steps=1))
  return c


def linprobe_config(size: str) -> ml_collections.ConfigDict:
  """The paper's linear probing recipe (Table 10): frozen encoder, cls feature, BN + linear,
  LARS."""
  c = _classifier_common(size, "linprobe")
  c.model = classifier_model_config(size, global_pool=False, head_batchnorm=True,
                                    head_init_std=0.01)
  c.input.batch_size = 16384
  c.num_epochs = 90
  c.warmup_epochs = 10
  c.optimizer = ml_collections.ConfigDict(dict(
      blr=0.1, lr=0.0, min_lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001,
      grad_accum_steps=1))
  return c


# --- the command lines' --config flag -------------------------------------------------------------

CONFIG_DOCS = "docs/configs.md"
USAGE_ERROR = 2  # the exit status of a wrong command line or config, as absl's own


def usage_error(message: str) -> None:
  """Exits with `message` (a few lines) and the usual status of a wrong command line."""
  sys.stderr.write(f"Error: {message}\n")
  sys.exit(USAGE_ERROR)


@contextlib.contextmanager
def input_errors_end_the_command(note: str = ""):
  """For the body of a command line's main: a ValueError or FileNotFoundError, which mae_jax
  raises for input that cannot serve (a workdir, file, flag or config, its message naming it
  and the fix), ends the command as a wrong flag does (`usage_error`: `Error: MESSAGE` and
  `note`, exit status 2) rather than with a traceback."""
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    usage_error(f"{e}{note}")


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of --name=VALUE or --name VALUE in argv (the last one), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _load_config(path: str) -> Optional[ml_collections.ConfigDict]:
  """The config of a `configs/X.py` path (no variant), or None when it does not load."""
  spec = importlib.util.spec_from_file_location("_config_for_message", path)
  if spec is None or not os.path.isfile(path):
    return None
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config()
  except Exception:  # pylint: disable=broad-except  # only a suggestion depends on it
    return None


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      paths += _field_paths(value, f"{prefix}{key}.")
  return paths


def _unknown_field(argv: Sequence[str], config_path: str) -> Optional[str]:
  """A message for the first --config.FIELD override that the config does not have."""
  config = _load_config(config_path)
  if config is None:
    return None
  known = _field_paths(config)
  for arg in argv:
    match = re.match(r"--config\.([^=\s]+)", arg)
    if match and match.group(1) not in known:
      field = match.group(1)
      guess = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
      hint = f" Did you mean --config.{guess[0]}?" if guess else ""
      jobs = [f"{mode} (configs/{files})" for mode, make, files in (
          ("pretraining", pretrain_config, "vit_*.py, demo*.py"),
          ("fine-tuning", finetune_config, "finetune_*.py"),
          ("linear probing", linprobe_config, "linprobe_*.py")) if field in _field_paths(
              make("vit_b"))]
      if jobs:  # an exact field of another job says more than a near name of this one
        hint = f" It is a field of {' and '.join(jobs)} configs."
        if field == "init_from" and config.get("mode") == "pretrain":
          hint += (" Pretraining starts from a converted checkpoint when --workdir is the "
                   "workdir mae_jax.convert wrote (its params/ start the run).")
      return (f"--config.{field}: {config_path} has no field config.{field}.{hint} The fields "
              f"are documented in {CONFIG_DOCS}.")
  return None


def _describe(error: BaseException) -> str:
  """The innermost useful message of an error raised while the config file loads."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return " ".join(str(error).split())


# The commands' path flags, with an example for the message when one is given empty.
PATH_FLAGS = {"workdir": "workdirs/demo", "output": "out.npz", "data_dir": "~/tensorflow_datasets",
              "images": "a.jpg,b.jpg"}


def parse_flags(argv: Sequence[str], config_flag=None) -> List[str]:
  """absl's flag parsing with a short message and exit status 2 instead of absl's status 1 or
  a traceback: for any wrong or missing flag, and for a command with a `--config` flag
  (`config_flag`, the holder DEFINE_config_file returned) a config file that does not exist or
  does not load, a variant it does not have, a field it does not have (with the field meant)
  or a value of the wrong type; and a path flag (PATH_FLAGS) given empty. Serves every command
  line of mae_jax."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  config_arg = _flag_value(argv[1:], "config") if config_flag is not None else None
  config_path = None if config_arg is None else config_arg.split(":", 1)[0]
  if config_path is not None and not os.path.isfile(config_path):
    usage_error(f"--config={config_arg}: no such config file {config_path!r}; use one of "
                f"configs/*.py (e.g. configs/demo.py).")
  try:
    rest = flags.FLAGS(argv)
    for name in PATH_FLAGS:  # `--workdir=` would quietly mean the current directory
      if name not in flags.FLAGS or not flags.FLAGS[name].present:
        continue
      value = flags.FLAGS[name].value  # a string, or a list for multi-string and list flags
      if not value or (isinstance(value, list) and not all(value)):
        usage_error(f"--{name} is empty: give a path (e.g. --{name}={PATH_FLAGS[name]}).")
    if config_arg is not None:
      _ = config_flag.value  # loads the file now, so that its errors end here
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # ml_collections puts a config file's traceback in the message
      message = f"--config={config_arg}: " + message.strip().splitlines()[-1]
    usage_error(message)
  except (AttributeError, KeyError) as e:  # a field that the config does not have
    usage_error(_unknown_field(argv[1:], config_path) or _describe(e))
  except (OSError, ValueError, TypeError) as e:  # the file fails to load, or refuses a variant
    usage_error(f"--config={config_arg}: {_describe(e)}")
  return rest
