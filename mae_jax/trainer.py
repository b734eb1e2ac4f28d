"""The trainer that pretraining (mae_jax.train) and fine-tuning (mae_jax.finetune) share.

The device mesh and shardings, the learning-rate schedule, gradient accumulation, the
non-finite guard, preemption, the reporter, the loop (`run_steps`), and the run's one setup
(`prepare`, `Session`) and close-down (`Session.close`). A job supplies its model, optimizer,
state and step; everything around them lives here.

Importable without TensorFlow: the input pipeline is imported inside `prepare` only.
"""

import atexit
import contextlib
import dataclasses
import resource
import signal
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

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
from mae_jax import config_checks
from mae_jax import writers

Params = Dict[str, Any]
Schedule = Callable[[jax.Array], jax.Array]
MESH_AXES = ("data", "fsdp")
# The batch is split over every device: data parallel across both mesh axes, as FSDP does.
BATCH_AXES = MESH_AXES


# --- mesh and shardings ---------------------------------------------------------------------

def make_mesh(config: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """The ("data", "fsdp") device mesh of `config.mesh` over every device of the job (or over
  `devices`, e.g. a TPU slice's from `jax.experimental.topologies` for a compile-only plan)."""
  fsdp = config.mesh.fsdp
  count = jax.device_count() if devices is None else len(devices)
  data = count // fsdp if config.mesh.data == -1 else config.mesh.data
  return jax.make_mesh((data, fsdp), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def fsdp_min_bytes(config: ml_collections.ConfigDict) -> int:
  """Arrays up to `config.mesh.fsdp_min_mb` MiB (default 4, as big_vision's fsdp rule) stay
  replicated under fsdp: sharding biases, LayerNorm scales and small matrices saves little
  memory and costs an all-gather each, every step (401 of them for the 6-block demo model)."""
  return int(config.mesh.get("fsdp_min_mb", 4.0) * 2**20)


def fsdp_sharding(mesh: jax.sharding.Mesh, shape: Tuple[int, ...], dtype: Any = jnp.float32,
                  *, min_bytes: int = 0) -> NamedSharding:
  """Shards an array of more than `min_bytes` over "fsdp" on its largest axis that the axis
  size divides; replicates it otherwise."""
  n = mesh.shape["fsdp"]
  spec = [None] * len(shape)
  if n > 1 and np.prod(shape, dtype=np.int64) * np.dtype(dtype).itemsize > min_bytes:
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % n == 0:
        spec[axis] = "fsdp"
        break
  return NamedSharding(mesh, P(*spec))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def state_shardings(mesh: jax.sharding.Mesh, abstract_state: Any, *,
                    fsdp_min_bytes: int = 0) -> Any:
  """NamedShardings for every leaf: arrays of more than `fsdp_min_bytes` split over "fsdp",
  the rest replicated."""
  return jax.tree.map(lambda x: fsdp_sharding(mesh, x.shape, x.dtype, min_bytes=fsdp_min_bytes),
                      abstract_state)


def with_shardings(mesh: jax.sharding.Mesh, shapes: Any, *, fsdp_min_bytes: int = 0) -> Any:
  """ShapeDtypeStructs of `shapes` carrying their target shardings (`state_shardings`)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, state_shardings(mesh, shapes, fsdp_min_bytes=fsdp_min_bytes))


def shardings_of(abstract_state: Any) -> Any:
  """The sharding of every leaf of an abstract state (`with_shardings`)."""
  return jax.tree.map(lambda x: x.sharding, abstract_state)


# --- schedule ------------------------------------------------------------------------------

def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.total_steps, or num_epochs worth of steps when it is 0."""
  return config_checks.schedule_lengths(config, steps_per_epoch)[0]


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """optimizer.lr when set, else the paper's blr * global_batch / 256."""
  o = config.optimizer
  return o.lr if o.lr > 0 else o.blr * config.input.batch_size / 256


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedule:
  """Linear warmup from 0, then a half-cycle cosine to `config.optimizer.min_lr` (default 0),
  evaluated per optimizer step (optax.warmup_cosine_decay_schedule).

  The official code (util/lr_sched.py) sets lr from the fractional epoch step / steps_per_epoch,
  which is the same curve in steps. `config.warmup_steps` > 0 overrides `config.warmup_epochs`.
  Raises ValueError when the warmup is not shorter than the run.
  """
  total, warmup = config_checks.schedule_lengths(config, steps_per_epoch)
  problem = config_checks.warmup_problem(config, steps_per_epoch)
  if problem:
    raise ValueError(problem)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_learning_rate(config), warmup_steps=warmup,
      decay_steps=total, end_value=config.optimizer.get("min_lr", 0.0))  # fine-tuning's 1e-6


# --- inside the step -------------------------------------------------------------------------

def accumulate_gradients(grad_fn: Callable, params: Params, batch: Tuple[jax.Array, ...],
                         steps: int, aux: Any = None) -> Tuple[Tuple[jax.Array, Any], Params]:
  """((loss, aux), grads) of a batch, averaged over `steps` micro-batches in a lax.scan.

  `grad_fn(params, aux, micro_batch, index)` -> ((loss, aux), grads) is
  `jax.value_and_grad(..., has_aux=True)` of a mean loss; `aux` (e.g. BatchNorm statistics)
  is threaded through the micro-batches in order. Micro-batch j takes examples j, j + A,
  j + 2A, ... of every array in `batch` (A = `steps`): every micro-batch stays spread over all
  devices. With equal micro-batches the mean of their mean losses (and gradients) is the full
  batch's, as the official code's --accum_iter gets by scaling each backward pass.
  """
  if steps == 1:
    return grad_fn(params, aux, batch, 0)
  b = batch[0].shape[0]

  def split(x):
    return x.reshape((b // steps, steps) + x.shape[1:]).swapaxes(0, 1)

  def add(carry, micro):
    loss_sum, grad_sum, aux = carry
    (loss, aux), grads = grad_fn(params, aux, micro[0], micro[1])
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), aux), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params), aux)
  (loss, grads, aux), _ = jax.lax.scan(
      add, zeros, (tuple(split(x) for x in batch), jnp.arange(steps)))
  loss, grads = jax.tree.map(lambda x: x / steps, (loss, grads))
  return (loss, aux), grads


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


def step_metrics(loss: jax.Array, grad_norm: jax.Array, lr: jax.Array, finite: jax.Array,
                 scale: Any = None) -> Dict[str, jax.Array]:
  """The metrics every step returns, which the Reporter and the NonFiniteGuard read; with
  float16 compute also `loss_scale`, the dynamic loss scale after the step (mae_jax.loss_scale:
  what the next step multiplies its loss by)."""
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  if scale is not None:
    metrics["loss_scale"] = scale["scale"]
  return metrics


# --- the loop ---------------------------------------------------------------------------------

# Set when Ctrl-C stopped a run after saving its checkpoint (`Preemption`): mae_jax.main then
# exits with 130, the shell's status for an interrupted command, rather than 0.
_stopped_by_ctrl_c = False


def stopped_by_ctrl_c() -> bool:
  """Whether Ctrl-C (SIGINT) stopped a run of this process after a save."""
  return _stopped_by_ctrl_c


class Preemption:
  """A preemption notice (SIGTERM) asks the loop to save at the next step and stop; so does a
  first Ctrl-C (SIGINT) in a lone process, and a second one stops at once (KeyboardInterrupt).

  With several processes every host must stop at the same step, so jax's preemption sync point
  (fed by the distributed runtime's own SIGTERM notifier) decides; a lone process uses signal
  handlers. A SIGINT handler other than Python's default is left in place.
  """

  def __init__(self):
    self._requested = None  # what asked to stop: "SIGTERM" or "Ctrl-C"
    self._previous = {}

  def __enter__(self) -> "Preemption":
    if jax.process_count() == 1:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
      if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after the current step.")
    self._requested = self._requested or "SIGTERM"

  def _on_sigint(self, signum, frame) -> None:
    del signum, frame
    # The next Ctrl-C raises KeyboardInterrupt at once, as without this handler.
    signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))
    logging.warning("Ctrl-C: saving a checkpoint after the current step, then stopping (Ctrl-C "
                    "again stops at once, losing the steps since the last checkpoint).")
    self._requested = self._requested or "Ctrl-C"

  @property
  def reason(self) -> Optional[str]:
    """What asked this process to stop ("SIGTERM" or "Ctrl-C"), or None."""
    return self._requested

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop (the same answer on every process)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested is not None


def peak_memory() -> Tuple[float, str]:
  """(peak GiB, source): the devices' allocator peak where they report one (GPU, TPU; max over
  this process's devices), else the process's peak resident set size (CPU)."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
  if peaks:
    return max(peaks) / 2**30, "device peak_bytes_in_use (max over local devices)"
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS"


class Reporter:
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
    self._input_wait = 0.0  # seconds spent waiting for input batches since the mark

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` spent outside the steps (e.g. the kNN monitor) out of the interval's
    time, so that images/s and the input-wait fraction describe the steps alone."""
    self._mark = (self._mark[0], self._mark[1] + seconds)

  def first_step_done(self, step: int, metrics: Dict[str, jax.Array]) -> None:
    """Waits for the first (compiling) step once, then starts the throughput clock."""
    jax.block_until_ready(metrics)
    self._mark = (step, time.time())
    self._input_wait = 0.0
    logging.info("First step done after %.1f s (compilation included).",
                 self._mark[1] - self._start[1])

  def add(self, step: int, metrics: Dict[str, jax.Array], input_wait: float = 0.0) -> None:
    """Records the metrics of `step` (just dispatched) and the seconds the loop waited for its
    batch; reports the previous interval."""
    self._input_wait += input_wait
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
    elapsed = max(now - mark_time, 1e-9)
    steps_per_s = (step - mark_step) / elapsed
    input_wait = min(self._input_wait / elapsed, 1.0)
    self._mark, self._input_wait = (step, now), 0.0
    row = {"step": step,
           "loss": float(np.mean([v["loss"] for v in values])),
           "lr": float(values[-1]["lr"]),
           "grad_norm": float(np.mean([v["grad_norm"] for v in values])),
           "img_per_s": steps_per_s * self._batch_size,
           "steps_per_s": steps_per_s,
           "epoch": step * self._batch_size / self._num_examples,  # passes over the data
           "eta_s": (self._total - step) / max(steps_per_s, 1e-9),
           # Where the time goes: an input bottleneck shows as input_wait near 1.
           "input_wait": input_wait,
           "peak_memory_gb": peak_memory()[0]}
    if "nonfinite" in values[-1]:
      row["skipped_steps"] = int(sum(v["nonfinite"] for v in values))
    scale = ""
    if "loss_scale" in values[-1]:  # float16 compute
      row["loss_scale"] = float(values[-1]["loss_scale"])
      scale = f"  loss scale {row['loss_scale']:g}"
    logging.info("step %d/%d (epoch %.2f): loss %.4f  lr %.3e  grad_norm %.4f%s  %.1f img/s  "
                 "input wait %.0f%%  peak memory %.2f GB  ETA %s", step, self._total,
                 row["epoch"], row["loss"], row["lr"], row["grad_norm"], scale,
                 row["img_per_s"], 100 * input_wait, row["peak_memory_gb"],
                 writers.format_duration(row["eta_s"]))
    self._writer.write_scalars(step, row)
    self._bar.set_postfix(f"loss {row['loss']:.4f}  {row['img_per_s']:.1f} img/s  "
                          f"ETA {writers.format_duration(row['eta_s'])}")


class NonFiniteGuard:
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
              reporter: Reporter, guard: NonFiniteGuard,
              after_step: Optional[Callable[[int, Any], None]] = None) -> Tuple[Any, int]:
  """The loop shared by pretraining and fine-tuning: runs `step_fn` on each batch from step
  `start` to `total`, reporting, checking for non-finite steps, saving every
  config.checkpoint_every_steps and at the end, and stopping after a save on SIGTERM or a first
  Ctrl-C (`Preemption`). Returns
  the state and the step it stopped at (`total` unless preempted)."""
  step = start
  # closing: an error that stops the run must also stop the input thread, or the interpreter
  # kills it mid-decode at exit and the process aborts instead of exiting with the error.
  with contextlib.closing(batches), Preemption() as preemption:
    while step < total:
      waiting = time.perf_counter()
      batch = next(batches)
      waiting = time.perf_counter() - waiting
      state, metrics = step_fn(state, batch)
      step += 1
      reporter.add(step, metrics, waiting)
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
        if preemption.reason == "Ctrl-C":
          global _stopped_by_ctrl_c
          _stopped_by_ctrl_c = True
          logging.warning("Stopped by Ctrl-C: saved the checkpoint of step %d; run the same "
                          "command to resume.", step)
        else:
          logging.warning("Preempted: saved the checkpoint of step %d; run the same command "
                          "to resume.", step)
        break
      if saving:
        checkpoint.save(manager, state, config)
      if after_step is not None:
        after_step(step, state)
  reporter.flush(upto=step)
  return state, step




# --- setup and close-down -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
  """What a run knows before any state exists: the size of its data, its length in steps, its
  learning-rate schedule and its device mesh."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  num_examples: int      # records in the training split
  steps_per_epoch: int   # global batches per pass over the training split (at least 1)
  total: int             # the optimizer step the run ends at
  learning_rate: Schedule
  source: Any            # the training split (input_pipeline.Source), opened once per run
  eval_source: Any       # the evaluation split of fine-tuning and probing, else None

  def epoch_text(self) -> str:
    """How steps relate to passes over the training split, for the start-of-run log line."""
    if self.num_examples >= self.batch_size:
      n = self.steps_per_epoch
      return f"{n} step{'s' * (n != 1)} per epoch of {self.num_examples:,} examples"
    return (f"{self.batch_size / self.num_examples:.1f} passes over the {self.num_examples:,} "
            f"examples per step (an epoch of the schedule is 1 step)")

  @property
  def batch_size(self) -> int:
    return self.config.input.batch_size


def prepare(config: ml_collections.ConfigDict) -> Job:
  """The setup every job starts with: the one check of the config (config_checks) together with
  the input's and what must agree with the data (its classes, the warmup against its size,
  the channels of its first file),
  raising one config_checks.ConfigError that lists every wrong field; then the data's size, the
  schedule and the mesh. Each dataset split is opened here, once per run. Nothing is compiled
  or written yet."""
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  errors = config_checks.config_problems(config, device_count=jax.device_count(),
                                         process_count=jax.process_count())
  # The input pipeline checks its own fields for every caller; a field already named above is
  # not reported twice.
  named = {e.split("=", 1)[0].removeprefix("config.") for e in errors}
  errors += [e for e in input_pipeline.config_problems(config.input)
             if e.split("=", 1)[0] not in named]
  source = eval_source = None
  try:
    source = input_pipeline.open_source(config.input)
    if config.get("mode") in config_checks.CLASSIFIER_JOBS:
      eval_source = input_pipeline.open_eval_source(config.input)
  except ValueError as e:  # the dataset is missing, unprepared, or has no such split
    errors.append(str(e))
  if source is not None:
    errors += config_checks.data_problems(
        config, num_examples=len(source), num_classes=source.num_classes,
        eval_classes=-1 if eval_source is None else eval_source.num_classes,
        sources=[s for s in (source, eval_source) if s is not None])
  if errors:
    raise config_checks.ConfigError(errors)
  steps_per_epoch = max(1, len(source) // config.input.batch_size)
  return Job(config=config, mesh=make_mesh(config), num_examples=len(source),
             steps_per_epoch=steps_per_epoch, total=num_train_steps(config, steps_per_epoch),
             learning_rate=create_learning_rate_fn(config, steps_per_epoch), source=source,
             eval_source=eval_source)


class Session:
  """A job's workdir while it runs: the workdir lock, the checkpoint manager, the metric writer
  and the state to start from (the newest checkpoint, else `init()`); `run` loops, `close`
  closes down.

  Opening checks the workdir (writable, disk space), takes its lock (checkpoint.WorkdirLock:
  one run per workdir), then checks before anything else is written: a workdir without
  checkpoints builds its start state first (`init`, which loads and checks config.init_from or
  a converted WORKDIR/params), one with checkpoints is checked for a different model while
  restoring; only then does it write config.json, so that a refused start leaves no
  config.json or checkpoints/ behind and a refused workdir keeps the config.json of its
  checkpoints.
  """

  def __init__(self, job: Job, workdir: str, abstract_state: Any, init: Callable[[], Any]):
    config = job.config
    self.job, self.workdir = job, workdir
    self.is_main = jax.process_index() == 0
    checkpoint.check_workdir(workdir, keep=config.keep_checkpoints, checkpoint_bytes=sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)))
    self.lock = checkpoint.WorkdirLock(workdir).acquire()
    atexit.register(self.lock.release)  # a run that dies of an exception frees the workdir
    try:
      state = None if checkpoint.has_checkpoints(workdir) else init()
      self.manager = checkpoint.manager(workdir, keep=config.keep_checkpoints)
      if state is None:
        state = checkpoint.restore_latest(self.manager, abstract_state, config)
      if self.is_main:
        checkpoint.write_config(workdir, config)
      self.state = init() if state is None else state
    except BaseException:
      self.lock.release()  # a refused start leaves the workdir free (and as it found it)
      raise
    self.start = int(self.state.step)
    if self.start >= job.total and self.is_main and not config.get("eval_only", False):
      # A finished run started again.
      logging.info(
          "%s holds step %d, %s this config's %d steps: nothing left to train (the figures "
          "are written again). To train on, raise --config.total_steps (or "
          "--config.num_epochs); the schedule is recomputed for the new length.", workdir,
          self.start, "the last of" if self.start == job.total else "past", job.total)
    self.writer = writers.MetricWriter(workdir, enabled=self.is_main, resume_step=self.start)
    self._bar = None
    self._reporter = None

  def run(self, step_fn: Callable[[Any, Dict[str, np.ndarray]],
                                  Tuple[Any, Dict[str, jax.Array]]],
          batches: Iterator[Dict[str, np.ndarray]],
          after_step: Optional[Callable[[int, Any], None]] = None) -> Tuple[Any, int]:
    """`run_steps` from the session's state to the job's last step, with a progress bar,
    the reporter and the non-finite guard. Returns (state, the step it stopped at)."""
    job = self.job
    self._bar = writers.ProgressBar(job.total, initial=self.start, enabled=self.is_main)
    self._reporter = Reporter(self.writer, self._bar, start=self.start, total=job.total,
                              log_every=job.config.log_every_steps,
                              batch_size=job.batch_size, num_examples=job.num_examples)
    guard = NonFiniteGuard(job.config.skip_nonfinite_steps, self.manager)
    self.state, step = run_steps(self.state, batches, step_fn, start=self.start,
                                 total=job.total, config=job.config, manager=self.manager,
                                 reporter=self._reporter, guard=guard, after_step=after_step)
    self._bar.close()
    return self.state, step

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation between steps) out of the next row's images/s."""
    if self._reporter is not None:
      self._reporter.exclude(seconds)

  def flush(self) -> None:
    """Reports the training interval that has ended, so that a row written now (an
    evaluation) comes after it."""
    if self._reporter is not None:
      self._reporter.flush()

  def close(self) -> None:
    """The close-down: waits for the last checkpoint to be written, then closes the manager
    and the metric writer, and frees the workdir."""
    checkpoint.wait(self.manager)  # a save that ran out of disk says so here
    self.writer.close()
    self.lock.release()
