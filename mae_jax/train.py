"""MAE pretraining: schedule, optimizer, sharded train state, the jitted step and the loop.

Everything here is importable without TensorFlow: the input pipeline (which uses it) is imported
inside `train_and_evaluate` only, so GPU hosts can run the step, tests and benchmarks without it.
"""

import contextlib
import functools
import math
import signal
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import checkpoint
from mae_jax import models
from mae_jax import optim
from mae_jax import visualize
from mae_jax import writers
from mae_jax.models.functional import num_kept

Params = Dict[str, Any]
Schedule = Callable[[jax.Array], jax.Array]
MESH_AXES = ("data", "fsdp")
# The batch is split over every device: data parallel across both mesh axes, as FSDP does.
BATCH_AXES = MESH_AXES
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds; the input position is `step` (the input is a function of it)."""
  step: jax.Array       # int32 [], optimizer updates done
  params: Params
  opt_state: optax.OptState
  rng: jax.Array        # uint32 key data; masking noise of step s uses fold_in(rng, s)


# --- configuration checks -------------------------------------------------------------------

def validate_config(config: ml_collections.ConfigDict, *, device_count: Optional[int] = None,
                    process_count: Optional[int] = None) -> None:
  """Raises ValueError listing every wrong field (with its fix) before anything compiles."""
  device_count = jax.device_count() if device_count is None else device_count
  process_count = jax.process_count() if process_count is None else process_count
  m, o, mesh = config.model, config.optimizer, config.mesh
  errors = []

  def check(ok: bool, message: str) -> None:
    if not ok:
      errors.append(message)

  try:
    height, width = models.image_hw(m.img_size)
  except ValueError as e:
    errors.append(f"config.model.img_size={m.img_size!r}: {e} (e.g. "
                  f"--config.model.img_size=224 or --config.model.img_size='(192, 256)').")
  positive = [("model.patch_size", m.patch_size),
              ("model.in_chans", m.in_chans), ("model.embed_dim", m.embed_dim),
              ("model.num_heads", m.num_heads), ("model.decoder_embed_dim", m.decoder_embed_dim),
              ("model.decoder_num_heads", m.decoder_num_heads), ("input.batch_size",
               config.input.batch_size), ("optimizer.grad_accum_steps", o.grad_accum_steps),
              ("log_every_steps", config.log_every_steps),
              ("checkpoint_every_steps", config.checkpoint_every_steps),
              ("keep_checkpoints", config.keep_checkpoints), ("mesh.fsdp", mesh.fsdp)]
  for name, value in positive:
    check(value >= 1, f"config.{name}={value} must be at least 1.")
  if errors:  # the checks below divide by these
    raise ValueError("Invalid config:\n  " + "\n  ".join(errors))

  check(height % m.patch_size == 0 and width % m.patch_size == 0,
        f"config.model.patch_size={m.patch_size} does not divide config.model.img_size="
        f"{m.img_size}; choose a patch size that divides the image size (e.g. "
        f"{_divisor_near(math.gcd(height, width), m.patch_size)}).")
  check(0.0 <= m.mask_ratio < 1.0,
        f"config.model.mask_ratio={m.mask_ratio} is outside [0, 1); the paper uses 0.75.")
  patches = (height // m.patch_size) * (width // m.patch_size)
  check(not 0.0 <= m.mask_ratio < 1.0 or num_kept(patches, m.mask_ratio) < patches,
        f"config.model.mask_ratio={m.mask_ratio} masks none of the {patches} patches, and the "
        f"loss is the error on masked patches only (0/0, as in the official code): use at least "
        f"{1 / patches:.4g} (one patch); the paper uses 0.75.")
  check(height == width, f"config.model.img_size={m.img_size}: the input pipeline makes "
        f"square crops only; give one size.")
  check(m.in_chans == 3, f"config.model.in_chans={m.in_chans}: the input pipeline gives RGB "
        f"images; set it to 3.")
  for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
    check(m[width] % m[heads] == 0,
          f"config.model.{heads}={m[heads]} does not divide config.model.{width}={m[width]}; "
          f"pick a head count that divides the width.")
    check(m[width] % 4 == 0, f"config.model.{width}={m[width]}: the 2D sin-cos position table "
          f"needs a width divisible by 4.")
  for name in ("depth", "decoder_depth"):
    check(m[name] >= 0, f"config.model.{name}={m[name]} must be >= 0.")
  check(m.dtype in COMPUTE_DTYPES,
        f"config.model.dtype={m.dtype!r} is not one of {COMPUTE_DTYPES}.")
  check(config.get("nonfinite_guard", "auto") in GUARDS,
        f"config.nonfinite_guard={config.get('nonfinite_guard')!r} is not one of "
        f"{tuple(GUARDS)}.")

  check(o.lr > 0 or o.blr > 0, f"config.optimizer.blr={o.blr} and config.optimizer.lr={o.lr}: "
        f"set blr > 0 (lr = blr * batch / 256) or lr > 0.")
  for name in ("b1", "b2"):
    check(0.0 <= o[name] < 1.0, f"config.optimizer.{name}={o[name]} must lie in [0, 1).")
  check(o.weight_decay >= 0, f"config.optimizer.weight_decay={o.weight_decay} must be >= 0.")
  check(o.get("weight_decay_groups", "official") in optim.DECAY_GROUPS,
        f"config.optimizer.weight_decay_groups={o.get('weight_decay_groups')!r} is not one of "
        f"{optim.DECAY_GROUPS} (\"official\": main_pretrain.py's groups; \"kernels\": the "
        f"weight matrices only).")

  batch, accum = config.input.batch_size, o.grad_accum_steps
  check(batch % accum == 0,
        f"config.input.batch_size={batch} is not divisible by config.optimizer.grad_accum_steps="
        f"{accum}; the global batch is split into that many equal micro-batches, so choose a "
        f"divisor of {batch}.")
  check(batch % process_count == 0,
        f"config.input.batch_size={batch} is not divisible by the {process_count} processes; "
        f"use a multiple of {process_count}.")
  micro = batch // accum
  check(micro % device_count == 0,
        f"config.input.batch_size={batch} is not divisible by the {device_count} devices"
        + (f" in {accum} micro-batches (config.optimizer.grad_accum_steps={accum})"
           if accum > 1 else "") + f"; use a multiple of {device_count * accum}.")
  if mesh.data == -1:
    check(device_count % mesh.fsdp == 0,
          f"config.mesh.fsdp={mesh.fsdp} does not divide the {device_count} devices; choose a "
          f"divisor of {device_count}.")
  else:
    check(mesh.data >= 1 and mesh.data * mesh.fsdp == device_count,
          f"config.mesh.data={mesh.data} x config.mesh.fsdp={mesh.fsdp} must equal the "
          f"{device_count} devices; set config.mesh.data=-1 to use all remaining devices.")

  check(config.total_steps >= 0, f"config.total_steps={config.total_steps} must be >= 0 "
        f"(0 = derive it from config.num_epochs).")
  check(config.total_steps > 0 or config.num_epochs > 0,
        f"config.num_epochs={config.num_epochs} must be > 0 when config.total_steps is 0.")
  check(config.warmup_epochs >= 0, f"config.warmup_epochs={config.warmup_epochs} must be >= 0.")
  check(config.get("warmup_steps", 0) >= 0,
        f"config.warmup_steps={config.get('warmup_steps')} must be >= 0 (0 = use warmup_epochs).")
  check(config.reconstruction_every_steps >= 0,
        f"config.reconstruction_every_steps={config.reconstruction_every_steps} must be >= 0 "
        f"(0 = only at the end).")
  if errors:
    raise ValueError("Invalid config:\n  " + "\n  ".join(errors))


def _divisor_near(n: int, k: int) -> int:
  """The divisor of n closest to k (a suggestion for error messages)."""
  return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


# --- mesh and shardings ---------------------------------------------------------------------

def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The ("data", "fsdp") device mesh of `config.mesh` over every device of the job."""
  fsdp = config.mesh.fsdp
  data = jax.device_count() // fsdp if config.mesh.data == -1 else config.mesh.data
  return jax.make_mesh((data, fsdp), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def fsdp_sharding(mesh: jax.sharding.Mesh, shape: Tuple[int, ...]) -> NamedSharding:
  """Shards an array over "fsdp" on its largest axis that the axis size divides, else
  replicates it."""
  n = mesh.shape["fsdp"]
  spec = [None] * len(shape)
  if n > 1:
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % n == 0:
        spec[axis] = "fsdp"
        break
  return NamedSharding(mesh, P(*spec))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


# --- schedule and optimizer -----------------------------------------------------------------

def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.total_steps, or num_epochs worth of steps when it is 0."""
  return config.total_steps or int(config.num_epochs * steps_per_epoch)


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """optimizer.lr when set, else the paper's blr * global_batch / 256."""
  o = config.optimizer
  return o.lr if o.lr > 0 else o.blr * config.input.batch_size / 256


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedule:
  """Linear warmup from 0, then a half-cycle cosine to `config.optimizer.min_lr` (default 0),
  evaluated per optimizer step.

  The official code sets lr from the fractional epoch step / steps_per_epoch, which is the same
  curve in steps. `config.warmup_steps` > 0 overrides `config.warmup_epochs`.
  """
  base = base_learning_rate(config)
  floor = config.optimizer.get("min_lr", 0.0)  # fine-tuning's 1e-6
  total = num_train_steps(config, steps_per_epoch)
  warmup = config.get("warmup_steps", 0) or int(round(config.warmup_epochs * steps_per_epoch))
  if warmup >= total:
    raise ValueError(f"The warmup ({warmup} steps, from config.warmup_epochs / "
                     f"config.warmup_steps) must be shorter than training ({total} steps, from "
                     f"config.total_steps / config.num_epochs); shorten the warmup.")

  def learning_rate(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
    cosine = floor + (base - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return learning_rate


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate: Schedule) -> optax.GradientTransformation:
  """torch.optim.AdamW as main_pretrain.py builds it: b2 0.95, decoupled decay over the
  groups of config.optimizer.weight_decay_groups (`optim.weight_decay_mask`; default the
  official ones)."""
  o = config.optimizer
  groups = o.get("weight_decay_groups", "official")
  return optax.adamw(learning_rate, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=o.weight_decay,
                     mask=functools.partial(optim.weight_decay_mask, groups=groups))


# --- state ------------------------------------------------------------------------------------

def init_train_state(model: models.MaskedAutoencoder, tx: optax.GradientTransformation,
                     seed: int) -> TrainState:
  """Fresh params (the official init), optimizer state, step 0 and the run's noise key."""
  params_key, noise_key = jax.random.split(jax.random.key(seed))
  images = jnp.zeros((1, *models.image_hw(model.img_size), model.in_chans), jnp.float32)
  params = model.init({"params": params_key, "mask": noise_key}, images)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(noise_key))


def state_shardings(mesh: jax.sharding.Mesh, abstract_state: TrainState) -> TrainState:
  """NamedShardings for every leaf: big arrays split over "fsdp", the rest replicated."""
  return jax.tree.map(lambda x: fsdp_sharding(mesh, x.shape), abstract_state)


def abstract_train_state(model: models.MaskedAutoencoder, tx: optax.GradientTransformation,
                         seed: int, mesh: jax.sharding.Mesh) -> TrainState:
  """ShapeDtypeStructs of the train state carrying their target shardings (nothing allocated)."""
  shapes = jax.eval_shape(functools.partial(init_train_state, model, tx, seed))
  shardings = state_shardings(mesh, shapes)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def create_train_state(model: models.MaskedAutoencoder, tx: optax.GradientTransformation,
                       seed: int, abstract_state: TrainState) -> TrainState:
  """Initializes the state directly into its shardings (no full copy on one device)."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  return jax.jit(functools.partial(init_train_state, model, tx, seed),
                 out_shardings=shardings)()


# --- the step ---------------------------------------------------------------------------------

def masking_noise(rng: jax.Array, step: jax.Array, batch: int, num_patches: int) -> jax.Array:
  """Per-example uniform noise [batch, L] of one step: a pure function of (rng, step)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  return jax.random.uniform(key, (batch, num_patches), jnp.float32)


# config.nonfinite_guard -> update_if_finite's `branch`.
GUARDS = {"auto": None, "cond": True, "select": False}


def update_if_finite(tx: optax.GradientTransformation, loss: jax.Array, grads: Params,
                     opt_state: Any, params: Params, extra: Any = None, new_extra: Any = None,
                     *, branch: Optional[bool] = None):
  """(params, opt_state, extra, grad_norm, finite): the optimizer's update (and `new_extra`,
  state that the forward pass updated, e.g. BatchNorm statistics) when the loss and the gradient
  are finite, else the params, optimizer state and `extra` as they were.

  `branch` (default: on CPU only) takes a lax.cond instead of computing the update and then
  selecting between old and new: on CPU the select reads and writes the params and optimizer
  state once more (0.4 s of a 3.6 s ViT-B/16 step on the 2-core CPU, BENCHMARKS.md). On GPU a
  conditional waits for its predicate on the host and the select fuses into the update, so
  accelerators keep the select (not yet compared there). Both give the same numbers.
  """
  if branch is None:
    branch = jax.default_backend() == "cpu"
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(grads, opt_state, params, extra, new_extra):
    del extra
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_extra

  def keep(grads, opt_state, params, extra, new_extra):
    del grads, new_extra
    return params, opt_state, extra

  operands = (grads, opt_state, params, extra, new_extra)
  if branch:
    params, opt_state, extra = jax.lax.cond(finite, update, keep, *operands)
  else:
    params, opt_state, extra = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                            update(*operands), keep(*operands))
  return params, opt_state, extra, grad_norm, finite


def train_step(state: TrainState, images: jax.Array, *, model: models.MaskedAutoencoder,
               tx: optax.GradientTransformation, learning_rate: Schedule, mask_ratio: float,
               grad_accum_steps: int = 1, guard_branch: Optional[bool] = None
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer update on a global batch of NHWC images, optionally in micro-batches;
  `guard_branch` is `update_if_finite`'s `branch`."""
  b = images.shape[0]
  num_patches = models.num_patches(model.img_size, model.patch_size)
  noise = masking_noise(state.rng, state.step, b, num_patches)

  def loss_fn(params, images, noise):
    loss, _, _ = model.apply({"params": params}, images, mask_ratio=mask_ratio, noise=noise)
    return loss

  grad_fn = jax.value_and_grad(loss_fn)
  if grad_accum_steps == 1:
    loss, grads = grad_fn(state.params, images, noise)
  else:
    # Micro-batch j takes examples j, j + A, j + 2A, ...: every micro-batch stays spread over
    # all devices. Every example masks the same number of patches, so the mean of the
    # micro-batch losses (and gradients) is exactly the full batch's.
    def split(x):
      return x.reshape((b // grad_accum_steps, grad_accum_steps) + x.shape[1:]).swapaxes(0, 1)

    def accumulate(carry, micro):
      loss, grads = grad_fn(state.params, *micro)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (split(images), split(noise)))
    loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
  # A non-finite loss or gradient leaves params and optimizer state as they were, so nothing
  # non-finite reaches a checkpoint; the loop then stops or skips (_NonFiniteGuard). The step
  # still advances: the next update takes the next batch.
  params, opt_state, _, grad_norm, finite = update_if_finite(tx, loss, grads, state.opt_state,
                                                             state.params, branch=guard_branch)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": learning_rate(state.step),
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(config: ml_collections.ConfigDict, model: models.MaskedAutoencoder,
                   tx: optax.GradientTransformation, learning_rate: Schedule,
                   abstract_state: TrainState, mesh: jax.sharding.Mesh) -> Callable:
  """`train_step` as one jax.jit over the mesh; the incoming state's buffers are donated."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  step = functools.partial(train_step, model=model, tx=tx, learning_rate=learning_rate,
                           mask_ratio=config.model.mask_ratio,
                           grad_accum_steps=config.optimizer.grad_accum_steps,
                           guard_branch=GUARDS[config.get("nonfinite_guard", "auto")])
  return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


# --- the loop ---------------------------------------------------------------------------------

class _Preemption:
  """A preemption notice (SIGTERM) asks the loop to save at the next step and stop.

  With several processes every host must stop at the same step, so jax's preemption sync point
  (fed by the distributed runtime's own SIGTERM notifier) decides; a lone process uses a signal
  handler.
  """

  def __init__(self):
    self._requested = False
    self._previous = None

  def __enter__(self) -> "_Preemption":
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after the current step.")
    self._requested = True

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop (the same answer on every process)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested


class _Reporter:
  """Turns each step's device metrics into a log line, a metrics.jsonl row and TensorBoard
  scalars every `log_every` steps, without stalling the device: an interval's metrics are
  fetched only once the following step has been dispatched."""

  def __init__(self, writer: writers.MetricWriter, bar: writers.ProgressBar, *, start: int,
               total: int, log_every: int, batch_size: int, num_examples: int):
    self._writer, self._bar = writer, bar
    self._total, self._log_every = total, log_every
    self._batch_size, self._num_examples = batch_size, num_examples
    self._history = []
    self._pending = None
    self._start = (start, time.time())
    self._mark = self._start  # (step, time) the next images/s figure counts from

  def first_step_done(self, step: int, metrics: Dict[str, jax.Array]) -> None:
    """Waits for the first (compiling) step once, then starts the throughput clock."""
    jax.block_until_ready(metrics)
    self._mark = (step, time.time())
    logging.info("First step done after %.1f s (compilation included).",
                 self._mark[1] - self._start[1])

  def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
    """Records the metrics of `step` (just dispatched); reports the previous interval."""
    self._history.append(metrics)
    self.flush()
    if step % self._log_every == 0 or step == self._total:
      self._pending, self._history = (step, self._history), []
    self._bar.update(step)

  def flush(self, upto: Optional[int] = None) -> None:
    """Reports the interval that has ended, if any (blocks until its last step is done); with
    `upto`, also the steps after it up to that step (a run stopping between log steps)."""
    if self._pending is not None:
      self._report(*self._pending)
      self._pending = None
    if upto is not None and self._history:
      self._report(upto, self._history)
      self._history = []

  def _report(self, step: int, history: list) -> None:
    values = jax.device_get(history)
    now = time.time()
    mark_step, mark_time = self._mark
    if step == mark_step:  # the first step alone: its time includes compilation
      mark_step, mark_time = self._start
    steps_per_s = (step - mark_step) / max(now - mark_time, 1e-9)
    self._mark = (step, now)
    row = {"step": step,
           "loss": float(np.mean([v["loss"] for v in values])),
           "lr": float(values[-1]["lr"]),
           "grad_norm": float(np.mean([v["grad_norm"] for v in values])),
           "img_per_s": steps_per_s * self._batch_size,
           "steps_per_s": steps_per_s,
           "epoch": step * self._batch_size / self._num_examples,  # passes over the data
           "eta_s": (self._total - step) / max(steps_per_s, 1e-9)}
    if "nonfinite" in values[-1]:
      row["skipped_steps"] = int(sum(v["nonfinite"] for v in values))
    self._bar.clear()
    logging.info("step %d/%d (epoch %.2f): loss %.4f  lr %.3e  grad_norm %.4f  %.1f img/s  "
                 "ETA %s", step, self._total, row["epoch"], row["loss"], row["lr"],
                 row["grad_norm"], row["img_per_s"], writers.format_duration(row["eta_s"]))
    self._writer.write_scalars(step, row)
    self._bar.set_postfix(f"loss {row['loss']:.4f}  {row['img_per_s']:.1f} img/s  "
                          f"ETA {writers.format_duration(row['eta_s'])}")


class _NonFiniteGuard:
  """Looks at each step's `nonfinite` flag (the step already kept the old params when it was
  set): with config.skip_nonfinite_steps the run goes on and counts them, else it stops with
  the step and the last good checkpoint, before anything after that step is saved."""

  def __init__(self, skip: bool, manager):
    self._skip, self._manager = skip, manager
    self._unchecked = []  # (step, metrics) not looked at yet
    self.skipped = 0

  def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
    self._unchecked.append((step, metrics))

  def check(self, *, all_steps: bool) -> None:
    """Looks at the steps recorded so far; all but the newest unless `all_steps` (waiting for
    the step just dispatched would idle the device; before a save it must be looked at)."""
    ready = self._unchecked if all_steps else self._unchecked[:-1]
    self._unchecked = self._unchecked[len(ready):]
    values = jax.device_get([m for _, m in ready])
    bad = [(step, v) for (step, _), v in zip(ready, values) if v["nonfinite"]]
    if not bad:
      return
    if self._skip:
      self.skipped += len(bad)
      logging.warning("Skipped the update of step(s) %s: non-finite loss or gradient "
                      "(config.skip_nonfinite_steps=True); %d skipped in this run.",
                      [step for step, _ in bad], self.skipped)
      return
    step, v = bad[0]
    self._manager.wait_until_finished()  # the last good checkpoint is complete before we stop
    last = self._manager.latest_step()
    where = (f"the last good checkpoint is {self._manager.directory}/{last} (step {last}); "
             f"running the same command resumes from it" if last is not None else
             "no checkpoint was saved before it")
    raise FloatingPointError(
        f"Non-finite loss or gradient at step {step} (loss {v['loss']}, grad_norm "
        f"{v['grad_norm']}): stopped, saving nothing from step {step} on; {where}. "
        f"Set config.skip_nonfinite_steps=True to skip such updates instead; if they recur, "
        f"lower config.optimizer.blr (or lr) or lengthen the warmup.")


def run_steps(state, batches: Iterator[Dict[str, np.ndarray]],
              step_fn: Callable[[Any, Dict[str, np.ndarray]], Tuple[Any, Dict[str, jax.Array]]],
              *, start: int, total: int, config: ml_collections.ConfigDict, manager,
              reporter: _Reporter, guard: _NonFiniteGuard,
              after_step: Optional[Callable[[int, Any], None]] = None) -> Tuple[Any, int]:
  """The loop shared by pretraining and fine-tuning: runs `step_fn` on each batch from step
  `start` to `total`, reporting, checking for non-finite steps, saving every
  config.checkpoint_every_steps and at the end, and stopping after a save on SIGTERM. Returns
  the state and the step it stopped at (`total` unless preempted)."""
  step = start
  # closing: an error that stops the run must also stop the input thread, or the interpreter
  # kills it mid-decode at exit and the process aborts instead of exiting with the error.
  with contextlib.closing(batches), _Preemption() as preemption:
    while step < total:
      state, metrics = step_fn(state, next(batches))
      step += 1
      reporter.add(step, metrics)
      guard.add(step, metrics)
      if step == start + 1:
        reporter.first_step_done(step, metrics)
      preempted = preemption.reached(step)
      saving = preempted or step % config.checkpoint_every_steps == 0 or step == total
      if saving or step % config.log_every_steps == 0:
        guard.check(all_steps=saving)
      if preempted:
        reporter.flush(upto=step)
        checkpoint.save(manager, state, config, force=True)
        logging.warning("Preempted: saved the checkpoint of step %d; run the same command to "
                        "resume.", step)
        break
      if saving:
        checkpoint.save(manager, state, config)
      if after_step is not None:
        after_step(step, state)
  reporter.flush(upto=step)
  return state, step


def _reconstruction_writer(config: ml_collections.ConfigDict, model: models.MaskedAutoencoder,
                           mesh: jax.sharding.Mesh, workdir: str,
                           writer: writers.MetricWriter) -> Callable[[Params, int], None]:
  """A function that renders the fixed reconstruction images with given params at a step into
  WORKDIR/reconstruction_<step>.png (and TensorBoard); every process computes, process 0
  writes."""
  replicated = NamedSharding(mesh, P())
  images = visualize.sample_images(model.img_size)
  # Every process holds the same images and noise: a replicated global array each.
  images = jax.make_array_from_process_local_data(replicated, images)
  noise = jax.make_array_from_process_local_data(replicated, visualize.fixed_noise(
      config.seed, images.shape[0], models.num_patches(model.img_size, model.patch_size)))
  render = jax.jit(functools.partial(visualize.reconstruct, model,
                                     mask_ratio=config.model.mask_ratio),
                   out_shardings=replicated)

  def write(params: Params, step: int) -> None:
    panels = np.asarray(render(params, images, noise))
    if jax.process_index() == 0:
      grid = visualize.grid_image(panels)
      path = visualize.save_png(grid, f"{workdir}/reconstruction_{step:08d}.png")
      writer.write_image(step, "reconstruction", grid)
      logging.info("Wrote %s", path)

  return write


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Pretrains per `config`, resuming from the newest checkpoint in `workdir`."""
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  validate_config(config)
  input_pipeline.validate(config.input)
  batch_size = config.input.batch_size
  num_examples = input_pipeline.num_examples(config.input)
  steps_per_epoch = max(1, num_examples // batch_size)
  total = num_train_steps(config, steps_per_epoch)
  learning_rate = create_learning_rate_fn(config, steps_per_epoch)
  mesh = make_mesh(config)
  model = models.from_config(config.model)
  tx = create_optimizer(config, learning_rate)
  abstract_state = abstract_train_state(model, tx, config.seed, mesh)
  is_main = jax.process_index() == 0
  checkpoint.check_workdir(workdir, keep=config.keep_checkpoints, checkpoint_bytes=sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)))
  manager = checkpoint.manager(workdir, keep=config.keep_checkpoints)
  state = checkpoint.restore_latest(manager, abstract_state, config)
  if is_main:  # only now: a refused workdir keeps the config.json of its checkpoints
    checkpoint.write_config(workdir, config)
  if state is None:
    state = create_train_state(model, tx, config.seed, abstract_state)
    if checkpoint.has_params(workdir):
      params, _ = checkpoint.load_params(workdir, target=abstract_state.params)
      state = state.replace(params=params)
      logging.info("Starting from the params in %s/%s.", workdir, checkpoint.PARAMS)
  start = int(state.step)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info("Training %s params on a %s mesh of %d devices (%d processes): steps %d -> %d, "
               "%d steps per epoch, global batch %d.", f"{n_params:,}", dict(mesh.shape),
               jax.device_count(), jax.process_count(), start, total, steps_per_epoch,
               batch_size)

  batches = input_pipeline.create_iterator(
      config.input, image_size=config.model.img_size, seed=config.seed, train=True,
      start_step=start, process_index=jax.process_index(), process_count=jax.process_count())
  step_fn = jit_train_step(config, model, tx, learning_rate, abstract_state, mesh)
  data_sharding = batch_sharding(mesh)
  writer = writers.MetricWriter(workdir, enabled=is_main)
  bar = writers.ProgressBar(total, initial=start, enabled=is_main)
  reporter = _Reporter(writer, bar, start=start, total=total,
                       log_every=config.log_every_steps, batch_size=batch_size,
                       num_examples=num_examples)
  write_reconstructions = _reconstruction_writer(config, model, mesh, workdir, writer)
  guard = _NonFiniteGuard(config.skip_nonfinite_steps, manager)

  def after_step(step: int, state: TrainState) -> None:
    if (config.reconstruction_every_steps and step % config.reconstruction_every_steps == 0
        and step < total):
      write_reconstructions(state.params, step)

  state, step = run_steps(
      state, batches, lambda state, batch: step_fn(
          state, input_pipeline.to_global({"image": batch["image"]}, data_sharding)["image"]),
      start=start, total=total, config=config, manager=manager, reporter=reporter, guard=guard,
      after_step=after_step)
  bar.close()
  if step == total:
    write_reconstructions(state.params, step)
  manager.wait_until_finished()
  manager.close()
  writer.close()
  return state
