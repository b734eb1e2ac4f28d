"""The one check of a config, for every job: pretraining, fine-tuning and linear probing.

`validate_config` looks at the config alone (every field, what the devices and processes need);
`data_problems` adds what must agree with the data (its classes, the schedule's length against
the data's size, the channels of each split's first file); `mae_jax.trainer.prepare` runs both
for every job. Every wrong field is reported at once, each with its fix, before anything is
compiled or written. The fields are documented in docs/configs.md.
"""

import math
from typing import Any, List, Optional, Sequence, Tuple

import ml_collections

from mae_jax import models
from mae_jax import optim
from mae_jax.models.functional import num_kept

JOBS = ("pretrain", "finetune", "linprobe")
CLASSIFIER_JOBS = ("finetune", "linprobe")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# config.nonfinite_guard -> trainer.update_if_finite's `branch`.
GUARDS = {"auto": None, "cond": True, "select": False}
# The kNN monitor's features (mae_jax.monitor.FEATURES).
MONITOR_FEATURES = ("cls", "mean")


class ConfigError(ValueError):
  """A config with wrong fields; `problems` lists each field with its fix."""

  def __init__(self, problems: List[str]):
    self.problems = list(problems)
    super().__init__("Invalid config:\n  " + "\n  ".join(self.problems))


# The config files of each job (configs/), for messages.
_CONFIG_FILES = {"pretrain": "configs/vit_{b,l,h}.py, configs/demo.py",
                 "finetune": "configs/finetune_*.py", "linprobe": "configs/linprobe_*.py"}


def _field_names(config: ml_collections.ConfigDict, prefix: str = "config.") -> List[str]:
  names = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      names += _field_names(value, f"{prefix}{key}.")
    else:
      names.append(f"{prefix}{key}")
  return names


def _fields_lacking(config: ml_collections.ConfigDict, mode: str) -> List[str]:
  """The fields that `mode`'s own config (config_lib) has and `config` lacks, such as a linear
  probing config's missing `config.augment` when config.mode is set to "finetune" (the mode
  field itself aside)."""
  from mae_jax import config_lib  # pylint: disable=g-import-not-at-top
  template = {"pretrain": config_lib.pretrain_config, "finetune": config_lib.finetune_config,
              "linprobe": config_lib.linprobe_config}[mode]("vit_b")
  have = set(_field_names(config))
  return [name for name in _field_names(template) if name not in have]


def _divisor_near(n: int, k: int) -> int:
  """The divisor of n closest to k (a suggestion for error messages)."""
  return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def config_problems(config: ml_collections.ConfigDict, *, device_count: int,
                    process_count: int) -> List[str]:
  """Every wrong field of `config` (a pretraining, fine-tuning or linear probing config)."""
  mode = config.get("mode")
  if mode not in JOBS:
    return [f"config.mode={mode!r} is not one of {JOBS}; start from a config in configs/."]
  lacking = _fields_lacking(config, mode)
  made_for = [job for job in JOBS if lacking and not _fields_lacking(config, job)]
  if made_for:  # a whole config of another job; a config missing a field or two goes on
    more = f" and {len(lacking) - 4} more" if len(lacking) > 4 else ""
    return [f"config.mode={mode!r}, but this config lacks {', '.join(lacking[:4])}{more}: it "
            f"was made for {made_for[0]}, and config.mode alone does not turn it into a "
            f"{mode} config. Start from a {mode} config file ({_CONFIG_FILES[mode]})."]
  classifier = mode in CLASSIFIER_JOBS
  m, o, mesh = config.model, config.optimizer, config.mesh
  errors = []

  def check(ok: bool, message: str) -> None:
    if not ok:
      errors.append(message)

  bad = set()  # fields too wrong for the checks that compute with them
  try:
    height, width = models.image_hw(m.img_size)
  except ValueError as e:
    bad.add("model.img_size")
    errors.append(f"config.model.img_size={m.img_size!r}: {e} (e.g. "
                  f"--config.model.img_size=224 or --config.model.img_size='(192, 256)').")
  counts = [("model.patch_size", m.patch_size),
            ("model.in_chans", m.in_chans), ("model.embed_dim", m.embed_dim),
            ("model.num_heads", m.num_heads), ("input.batch_size", config.input.batch_size),
            ("optimizer.grad_accum_steps", o.grad_accum_steps),
            ("log_every_steps", config.log_every_steps),
            ("checkpoint_every_steps", config.checkpoint_every_steps),
            ("keep_checkpoints", config.keep_checkpoints), ("mesh.fsdp", mesh.fsdp)]
  if classifier:
    counts += [("model.num_classes", m.num_classes), ("eval_batch_size", config.eval_batch_size)]
  else:
    counts += [("model.decoder_embed_dim", m.decoder_embed_dim),
               ("model.decoder_num_heads", m.decoder_num_heads)]
  for name, value in counts:
    if not (_is_int(value) and value >= 1):
      bad.add(name)
      errors.append(f"config.{name}={value!r} must be at least 1 (an integer).")

  def fine(*names: str) -> bool:
    return not bad.intersection(names)

  patches = None
  if fine("model.img_size", "model.patch_size"):
    check(height % m.patch_size == 0 and width % m.patch_size == 0,
          f"config.model.patch_size={m.patch_size} does not divide config.model.img_size="
          f"{m.img_size}; choose a patch size that divides the image size (e.g. "
          f"{_divisor_near(math.gcd(height, width), m.patch_size)}).")
    patches = (height // m.patch_size) * (width // m.patch_size)
  # The data's normalization: one input.mean and input.std per channel (ImageNet's fit 3).
  if fine("model.in_chans"):
    from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top  # no TensorFlow
    try:
      input_pipeline.check_normalization(config.input, m.in_chans)
    except ValueError as e:
      errors.append(str(e))
  widths = [("embed_dim", "num_heads")] + ([] if classifier else
                                           [("decoder_embed_dim", "decoder_num_heads")])
  for dim, heads in widths:
    if fine(f"model.{dim}", f"model.{heads}"):
      check(m[dim] % m[heads] == 0,
            f"config.model.{heads}={m[heads]} does not divide config.model.{dim}={m[dim]}; "
            f"pick a head count that divides the width.")
      check(m[dim] % 4 == 0, f"config.model.{dim}={m[dim]}: the 2D sin-cos position table "
            f"needs a width divisible by 4.")
  for name in ("depth",) if classifier else ("depth", "decoder_depth"):
    check(_is_int(m[name]) and m[name] >= 0, f"config.model.{name}={m[name]!r} must be an "
          f"integer >= 0.")
  check(m.dtype in COMPUTE_DTYPES,
        f"config.model.dtype={m.dtype!r} is not one of {COMPUTE_DTYPES}.")
  check(config.get("nonfinite_guard", "auto") in GUARDS,
        f"config.nonfinite_guard={config.get('nonfinite_guard')!r} is not one of "
        f"{tuple(GUARDS)}.")
  if classifier:
    errors += _classifier_problems(config)
  else:
    errors += _pretrain_problems(config, patches)
    errors += monitor_problems(config, device_count=device_count, process_count=process_count)

  check(o.lr > 0 or o.blr > 0, f"config.optimizer.blr={o.blr} and config.optimizer.lr={o.lr}: "
        f"set blr > 0 (lr = blr * batch / 256) or lr > 0.")
  for name in ("b1", "b2"):
    if name in o:
      check(0.0 <= o[name] < 1.0, f"config.optimizer.{name}={o[name]} must lie in [0, 1).")
  check(o.weight_decay >= 0, f"config.optimizer.weight_decay={o.weight_decay} must be >= 0.")
  if not classifier:
    check(o.get("weight_decay_groups", "official") in optim.DECAY_GROUPS,
          f"config.optimizer.weight_decay_groups={o.get('weight_decay_groups')!r} is not one of "
          f"{optim.DECAY_GROUPS} (\"official\": main_pretrain.py's groups; \"kernels\": the "
          f"weight matrices only).")

  batch, accum = config.input.batch_size, o.grad_accum_steps
  if fine("input.batch_size", "optimizer.grad_accum_steps"):
    errors += _batch_problems(batch, accum, device_count=device_count,
                              process_count=process_count)
  if fine("mesh.fsdp"):
    errors += _mesh_problems(mesh, device_count)
  if classifier and fine("eval_batch_size"):
    check(config.eval_batch_size % device_count == 0 and
          config.eval_batch_size % process_count == 0,
          f"config.eval_batch_size={config.eval_batch_size} is not divisible by the "
          f"{device_count} devices and {process_count} processes; use a multiple of "
          f"{device_count}.")
  seed = config.get("seed", 0)
  check(_is_int(seed) and 0 <= seed < 2**63,
        f"config.seed={seed!r} must be an integer in [0, 2**63).")
  check(config.total_steps >= 0, f"config.total_steps={config.total_steps} must be >= 0 "
        f"(0 = derive it from config.num_epochs).")
  check(config.total_steps > 0 or config.num_epochs > 0,
        f"config.num_epochs={config.num_epochs} must be > 0 when config.total_steps is 0.")
  check(config.warmup_epochs >= 0, f"config.warmup_epochs={config.warmup_epochs} must be >= 0.")
  check(config.get("warmup_steps", 0) >= 0,
        f"config.warmup_steps={config.get('warmup_steps')} must be >= 0 (0 = use warmup_epochs).")
  return errors


def _batch_problems(batch: int, accum: int, *, device_count: int,
                    process_count: int) -> List[str]:
  errors = []
  if batch % accum:
    errors.append(
        f"config.input.batch_size={batch} is not divisible by config.optimizer.grad_accum_steps="
        f"{accum}; the global batch is split into that many equal micro-batches, so choose a "
        f"divisor of {batch}.")
  if batch % process_count:
    errors.append(f"config.input.batch_size={batch} is not divisible by the {process_count} "
                  f"processes; use a multiple of {process_count}.")
  if (batch // accum) % device_count:
    errors.append(
        f"config.input.batch_size={batch} is not divisible by the {device_count} devices"
        + (f" in {accum} micro-batches (config.optimizer.grad_accum_steps={accum})"
           if accum > 1 else "") + f"; use a multiple of {device_count * accum}.")
  return errors


def _mesh_problems(mesh: ml_collections.ConfigDict, device_count: int) -> List[str]:
  if mesh.get("fsdp_min_mb", 0) < 0:
    return [f"config.mesh.fsdp_min_mb={mesh.fsdp_min_mb} must be >= 0 (0 = shard every array "
            f"that the fsdp axis divides)."]
  if mesh.data == -1:
    if device_count % mesh.fsdp:
      return [f"config.mesh.fsdp={mesh.fsdp} does not divide the {device_count} devices; choose "
              f"a divisor of {device_count}."]
  elif not (mesh.data >= 1 and mesh.data * mesh.fsdp == device_count):
    return [f"config.mesh.data={mesh.data} x config.mesh.fsdp={mesh.fsdp} must equal the "
            f"{device_count} devices; set config.mesh.data=-1 to use all remaining devices."]
  return []


def _pretrain_problems(config: ml_collections.ConfigDict,
                       patches: Optional[int]) -> List[str]:
  m = config.model
  errors = []
  if not 0.0 <= m.mask_ratio < 1.0:
    errors.append(f"config.model.mask_ratio={m.mask_ratio} is outside [0, 1); the paper uses "
                  f"0.75.")
  elif patches and num_kept(patches, m.mask_ratio) >= patches:
    errors.append(
        f"config.model.mask_ratio={m.mask_ratio} masks none of the {patches} patches, and the "
        f"loss is the error on masked patches only (0/0, as in the official code): use at "
        f"least {1 / patches:.4g} (one patch); the paper uses 0.75.")
  if config.reconstruction_every_steps < 0:
    errors.append(f"config.reconstruction_every_steps={config.reconstruction_every_steps} must "
                  f"be >= 0 (0 = only at the end).")
  return errors


def monitor_problems(config: ml_collections.ConfigDict, *, device_count: int,
                     process_count: int) -> List[str]:
  """What is wrong with `config.monitor` (messages naming the field and the fix); [] when the
  config has no monitor or it is off."""
  m = config.get("monitor")
  if m is None:
    return []
  if m.every_steps < 0:
    return [f"config.monitor.every_steps={m.every_steps} must be >= 0 (0 = off)."]
  if not m.every_steps:
    return []
  errors = []
  if m.batch_size < 1 or m.batch_size % device_count or m.batch_size % process_count:
    errors.append(f"config.monitor.batch_size={m.batch_size} must be a positive multiple of "
                  f"the {device_count} devices and the {process_count} processes.")
  if m.k < 1:
    errors.append(f"config.monitor.k={m.k} must be at least 1 (DINO uses 20).")
  if not m.temperature > 0:
    errors.append(f"config.monitor.temperature={m.temperature} must be > 0 (DINO uses 0.07).")
  if m.train_examples < 0:
    errors.append(f"config.monitor.train_examples={m.train_examples} must be >= 0 (0 = the "
                  f"whole split).")
  if m.feature not in MONITOR_FEATURES:
    errors.append(f"config.monitor.feature={m.feature!r} is not one of {MONITOR_FEATURES}.")
  return errors


def _classifier_problems(config: ml_collections.ConfigDict) -> List[str]:
  m, o = config.model, config.optimizer
  errors = []
  if not 0.0 <= m.drop_path < 1.0:
    errors.append(f"config.model.drop_path={m.drop_path} must lie in [0, 1): the rate of "
                  f"dropping a block's residual branch (the recipe's 0.1 / 0.2 / 0.3 for B / L "
                  f"/ H).")
  if m.scan and m.drop_path:
    errors.append("config.model.scan=True cannot use drop path (its rate grows with depth): "
                  "set config.model.scan=False or config.model.drop_path=0.")
  if config.mode == "linprobe":
    if not (m.head_batchnorm and not m.global_pool and not m.drop_path):
      errors.append("linear probing uses the cls token, a BatchNorm head and no drop path: set "
                    "config.model.global_pool=False, head_batchnorm=True, drop_path=0.")
  else:
    if not 0.0 < o.get("layer_decay", 1.0) <= 1.0:
      errors.append(f"config.optimizer.layer_decay={o.get('layer_decay')} must lie in (0, 1].")
    a = config.augment
    from mae_jax import augment  # pylint: disable=g-import-not-at-top
    problem = augment.rand_augment_problem(a, m.in_chans)
    if problem:
      errors.append(problem)
    if a.rand_augment:
      try:
        augment.parse_rand_augment(a.rand_augment, a.get("rand_augment_ops", "all"))
      except ValueError as e:
        errors.append(f"config.{e} (the recipe: rand_augment='rand-m9-mstd0.5-inc1', '' for "
                      f"none; rand_augment_ops='all').")
    ranges = [("smoothing", 0.0, 1.0, False, "the recipe's 0.1"),
              ("reprob", 0.0, 1.0, True, "a probability; the recipe's 0.25"),
              ("mixup_prob", 0.0, 1.0, True, "a probability; the recipe's 1.0"),
              ("mixup_switch_prob", 0.0, 1.0, True, "a probability; the recipe's 0.5")]
    for name, low, high, closed, hint in ranges:
      if name in a and not (low <= a[name] <= high if closed else low <= a[name] < high):
        errors.append(f"config.augment.{name}={a[name]} must lie in [{low:g}, {high:g}"
                      f"{']' if closed else ')'} ({hint}).")
    for name in ("mixup", "cutmix"):
      if name in a and a[name] < 0:
        errors.append(f"config.augment.{name}={a[name]} must be >= 0 (a Beta alpha; 0 = off).")
    batch = config.input.batch_size
    if (a.mixup or a.cutmix) and _is_int(batch) and batch % 2:
      errors.append(f"config.input.batch_size={config.input.batch_size} must be even for "
                    f"mixup/cutmix (config.augment.mixup / cutmix > 0).")
  if config.eval_every_steps < 0:
    errors.append(f"config.eval_every_steps={config.eval_every_steps} must be >= 0 (0 = once "
                  f"per epoch).")
  return errors


def data_problems(config: ml_collections.ConfigDict, *, num_examples: int,
                  num_classes: Optional[int], eval_classes: Optional[int] = -1,
                  sources: Sequence[Any] = ()) -> List[str]:
  """What must agree between `config` and its data: the classes, the schedule's warmup, the
  channels (config.model.in_chans) of the first readable file of each of `sources` (the
  first that does not fit is reported), RandAugment's colour ops against float bands.

  `num_classes`: the training split's (None: unlabeled); `eval_classes`: the evaluation
  split's, for the classifier jobs (-1: not known); `sources`: the opened splits
  (input_pipeline.Source), whose first file is read here (one decode each; the later files are
  checked as the input pipeline reads them).
  """
  m = config.model
  errors = []
  if _is_int(m.in_chans) and m.in_chans >= 1 and sources:
    from mae_jax import augment, input_pipeline  # pylint: disable=g-import-not-at-top,g-multiple-import
    for source in sources:  # one file that does not fit is enough to say what to change
      mismatch = input_pipeline.first_file_mismatch(source, m.in_chans)
      if mismatch:
        errors.append(f"input.dataset={config.input.dataset!r}: {mismatch}.")
        break
    # RandAugment's colour ops on float bands (a wrong channel count is named by
    # config_problems); the data's kind of values is read only when it matters.
    a = config.get("augment")
    if (not errors and config.mode == "finetune" and a is not None and
        not augment.rand_augment_problem(a, m.in_chans) and
        augment.rand_augment_problem(a, m.in_chans, "float32")):
      data = f"input.dataset={config.input.dataset!r}"
      try:
        problem = augment.rand_augment_problem(
            a, m.in_chans, input_pipeline.pixel_dtype(sources[0], m.in_chans), data=data)
      except input_pipeline.DatasetMismatch as e:  # its first array file, after pictures
        problem = f"{data}: {e}."
      if problem:
        errors.append(problem)
  if config.mode in CLASSIFIER_JOBS:
    if num_classes is None:
      errors.append(f"input.dataset={config.input.dataset!r} has no labels; {config.mode} "
                    f"needs a labeled dataset (a TFDS one with a ClassLabel, or a folder with "
                    f"one subfolder per class).")
    elif m.num_classes != num_classes:
      errors.append(f"config.model.num_classes={m.num_classes}, but input.dataset="
                    f"{config.input.dataset!r} has {num_classes} classes; set "
                    f"config.model.num_classes={num_classes}.")
    if eval_classes not in (-1, num_classes):
      errors.append(f"the evaluation split of input.dataset={config.input.dataset!r} has "
                    f"{eval_classes} classes, the training split {num_classes}; set "
                    f"input.eval_split to a split of the same classes.")
  batch = config.input.batch_size
  if not _is_int(batch) or batch < 1:
    return errors  # reported by config_problems
  problem = warmup_problem(config, max(1, num_examples // batch))
  if problem:
    errors.append(problem)
  return errors


def schedule_lengths(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Tuple[int, int]:
  """(total, warmup) in optimizer steps: config.total_steps or num_epochs' worth of steps, and
  config.warmup_steps or warmup_epochs' worth (rounded). The one definition of both, for the
  schedule (`trainer.create_learning_rate_fn`) and for the check below."""
  total = config.total_steps or int(config.num_epochs * steps_per_epoch)
  warmup = config.get("warmup_steps", 0) or int(round(config.warmup_epochs * steps_per_epoch))
  return total, warmup


def warmup_problem(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Optional[str]:
  """Why the warmup is not shorter than the run, naming the fields each length comes from and
  the fix; None when it is."""
  total, warmup = schedule_lengths(config, steps_per_epoch)
  steps = config.get("warmup_steps", 0)
  if total <= 0 or warmup < total:
    return None
  per_epoch = f"{steps_per_epoch} steps per epoch"
  warmup_from = (f"config.warmup_steps={steps}" if steps else
                 f"config.warmup_epochs={config.warmup_epochs} x {per_epoch}, since "
                 f"config.warmup_steps={steps} defers to it")
  total_from = (f"config.total_steps={config.total_steps}" if config.total_steps else
                f"config.num_epochs={config.num_epochs} x {per_epoch}")
  fix = (f"--config.warmup_steps=N with 0 < N < {total}, or " if total > 1 else "")
  return (f"The warmup ({warmup} steps: {warmup_from}) must be shorter than training ({total} "
          f"steps: {total_from}); shorten the warmup: {fix}--config.warmup_epochs=0 "
          f"--config.warmup_steps=0 for none.")


def validate_config(config: ml_collections.ConfigDict, *, device_count: Optional[int] = None,
                    process_count: Optional[int] = None) -> None:
  """Raises ConfigError (a ValueError) listing every wrong field of a pretraining, fine-tuning
  or linear probing config, each with its fix; `device_count` / `process_count` default to the
  job's (JAX's)."""
  if device_count is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    device_count = jax.device_count() if device_count is None else device_count
    process_count = jax.process_count() if process_count is None else process_count
  errors = config_problems(config, device_count=device_count, process_count=process_count)
  if errors:
    raise ConfigError(errors)
