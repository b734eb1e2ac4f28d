"""Fine-tuning and linear probing of a pretrained encoder (config.mode "finetune"/"linprobe").

The official main_finetune.py / main_linprobe.py recipes, on the trainer that pretraining
uses too (mae_jax.trainer: mesh, checkpoints, schedule, non-finite guard, logging, the loop):
- finetune: every param trained; AdamW with layer-wise lr decay (mae_jax.optim), drop path,
  RandAugment + random erasing + mixup/cutmix with label smoothing (mae_jax.augment, on device,
  keyed by (seed, step)), soft-target cross-entropy.
- linprobe: the encoder frozen (its cls feature under stop_gradient), BatchNorm without affine
  + linear head trained with LARS, plain cross-entropy.
Both start from `config.init_from` (a pretraining, converted or fine-tuned workdir), evaluate
top-1/top-5 (percent) over the whole evaluation split, and write `eval_top1`, `eval_top5` and
`eval_loss` rows into metrics.jsonl next to the training rows.
"""

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import augment
from mae_jax import checkpoint
from mae_jax import config_checks
from mae_jax import convert
from mae_jax import loss_scale
from mae_jax import models
from mae_jax import optim
from mae_jax import plot
from mae_jax import trainer
# One check for every job's config; importable from here as it always was.
from mae_jax.config_checks import validate_config  # pylint: disable=unused-import
from mae_jax.models.classifier import (VisionTransformer, classifier_from_config,
                                       merge_pretrained)

Params = Dict[str, Any]
MODES = config_checks.CLASSIFIER_JOBS


@flax.struct.dataclass
class FinetuneState:
  """What a checkpoint holds. Only `trainable(params)` has optimizer state."""
  step: jax.Array       # int32 [], optimizer updates done
  params: Params
  opt_state: optax.OptState
  batch_stats: Params   # the linear probe's BatchNorm running statistics ({} otherwise)
  rng: jax.Array        # uint32 key data; step s augments and drops paths with fold_in(rng, s)
  loss_scale: Any = None  # float16 compute: the dynamic loss scale (mae_jax.loss_scale)


def create_model(config: ml_collections.ConfigDict) -> VisionTransformer:
  """The classifier of `config.model`."""
  return classifier_from_config(config.model)


def trainable(params: Params, mode: str) -> Params:
  """The params the optimizer updates: all of them, or the linear probe's head."""
  return {"head": params["head"]} if mode == "linprobe" else params


def create_optimizer(config: ml_collections.ConfigDict, params: Params,
                     learning_rate: trainer.Schedule) -> optax.GradientTransformation:
  """AdamW with layer-wise lr decay (finetune) or LARS (linprobe), over `trainable(params)`."""
  o = config.optimizer
  if config.mode == "linprobe":
    return optim.lars(learning_rate, weight_decay=o.weight_decay, momentum=o.momentum,
                      trust_coefficient=o.trust_coefficient)
  return optim.adamw_layer_decay(learning_rate, params, depth=config.model.depth,
                                 layer_decay=o.layer_decay, b1=o.b1, b2=o.b2,
                                 weight_decay=o.weight_decay)


def init_state(model: VisionTransformer, tx: optax.GradientTransformation, seed: int,
               mode: str) -> FinetuneState:
  """Fresh params (the official init), optimizer state of the params that `mode` ("finetune" or
  "linear_probe") trains, step 0 and the run's key, all from `seed`. Its arguments are static
  (a jitted call keys its compile on them), as in train.init_train_state."""
  params_key, rng = jax.random.split(jax.random.key(seed))
  images = jnp.zeros((2, *models.image_hw(model.img_size), model.in_chans), jnp.float32)
  variables = model.init({"params": params_key}, images)
  params = variables["params"]
  return FinetuneState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(trainable(params, mode)),
                       batch_stats=variables.get("batch_stats", {}),
                       rng=jax.random.key_data(rng), loss_scale=loss_scale.init(model.dtype))


def abstract_state(model: VisionTransformer, config: ml_collections.ConfigDict,
                   tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> FinetuneState:
  """ShapeDtypeStructs of the state carrying their target shardings (nothing allocated)."""
  return trainer.with_shardings(
      mesh, jax.eval_shape(functools.partial(init_state, model, tx, config.seed, config.mode)),
      fsdp_min_bytes=trainer.fsdp_min_bytes(config))


def _global_array(value: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
  """A host array (the same on every process) placed into `target`'s sharding."""
  value = np.asarray(value, target.dtype)
  return jax.make_array_from_callback(value.shape, target.sharding, lambda idx: value[idx])


# Parts of a classifier that a pretrained encoder lacks by nature: they start fresh.
_NEW_PARTS = ("head", "fc_norm")
# Parts of a pretrained model that a classifier leaves unused by nature: the MAE decoder, the
# final norm that a global-pool classifier drops (as the official code deletes it) and the
# fc_norm of a global-pool classifier probed on its cls token.
_UNUSED_PARTS = convert.DECODER_PARAMS + ("fc_norm", "Transformer/encoder_norm")


def _unplaced(extra) -> list:
  """The pretrained params (paths "a/b/c") of `extra` that no part of the classifier takes and
  that are not unused by nature (`_UNUSED_PARTS`): e.g. the last blocks of a deeper encoder,
  named per block."""
  names = []
  for path in extra:
    parts = path.split("/")
    if parts[0] in _UNUSED_PARTS or "/".join(parts[:2]) in _UNUSED_PARTS:
      continue
    name = "/".join(parts[:2]) if parts[0] == "Transformer" else path
    if name not in names:
      names.append(name)
  return names


def start_params(config: ml_collections.ConfigDict, params: Params, target: Params,
                 batch_stats: Optional[Params] = None) -> Tuple[Params, Params]:
  """(params, batch_stats) to start from: fresh ones with `config.init_from`'s merged in.

  init_from is a workdir, step folder, converted checkpoint or exported encoder npz
  (checkpoint.load_variables). A new head (and `fc_norm`; a head of another class count is
  replaced too, as main_finetune.py does) and an unused decoder are expected; anything else
  that does not fit (params of other shapes: another patch size or width; encoder parts missing
  or left over: another depth; other attention heads) is a ValueError listing each, unless
  `config.init_partial=True` asks for a partial start (those params then keep their fresh init,
  listed in the log). A linear probe's BatchNorm statistics come along with its head. With
  `config.eval_only`, a head that is not loaded (or no init_from), or one that would see other
  features than it was trained on, is a ValueError.
  """
  if not config.init_from:
    if config.get("eval_only", False):
      raise ValueError("config.eval_only=True evaluates a trained classifier, but "
                       "config.init_from is empty and the workdir has no checkpoint: set "
                       "--config.init_from to a fine-tuned or linear-probing workdir (or a "
                       "converted official classifier).")
    logging.warning("config.init_from is empty: training from a random init.")
    return params, batch_stats
  pretrained, pretrained_stats, source_config = checkpoint.load_variables(config.init_from)
  source_grid = None
  if source_config is not None:
    source_grid = models.patch_grid(source_config.model.img_size,
                                    source_config.model.patch_size)
  elif "pos_embedding" not in pretrained:
    logging.warning("%s has no config, so the patch grid it was pretrained at is unknown: the "
                    "position table starts as MAE's fixed table at this model's grid, not one "
                    "interpolated from the pretraining grid.", config.init_from)
  merged, report = merge_pretrained(
      params, pretrained, pretrained_grid=source_grid,
      grid=models.patch_grid(config.model.img_size, config.model.patch_size))
  problems = checkpoint.unseen_model_differences(source_config, config, pretrained,
                                                 config.init_from)
  # A head of another shape (a classifier fine-tuned for other classes) starts fresh, as
  # main_finetune.py drops it ("Removing key head.weight from pretrained checkpoint").
  problems += [f"{m} has another shape" for m in report["mismatched"]
               if not m.startswith("head/")]
  problems += [f"{m} is missing" for m in report["missing"]
               if m.split("/")[0] not in _NEW_PARTS]
  unplaced = _unplaced(report["extra"])
  if unplaced:
    problems.append(f"{', '.join(unplaced)} in the checkpoint have no place in this model (a "
                    "deeper or other encoder: check config.model.depth)")
  if problems and not config.get("init_partial", False):
    raise ValueError(
        f"config.init_from={config.init_from!r} does not fit config.model: "
        + "; ".join(problems[:12]) + ". Use a config of the checkpoint's model, or set "
        "--config.init_partial=True to start from the params that fit (the others freshly "
        "initialized).")
  logging.info("Loaded %s from %s.", "pretrained params", config.init_from)
  for kind in ("missing", "mismatched", "extra"):
    if report[kind]:
      logging.info("  %s (%d): %s", kind, len(report[kind]), ", ".join(report[kind]))
  if report["pos_embedding"]:
    logging.info("  position table resized from the checkpoint's patch grid to this model's: "
                 "%s (bicubic, as the official interpolate_pos_embed).",
                 report["pos_embedding"][0])
  if problems:
    logging.warning("config.init_partial: a partial start, fresh where %s", "; ".join(problems))
  if any(m.startswith("head/") for m in report["mismatched"]):
    logging.info("  a new head for config.model.num_classes=%d: the checkpoint's head has "
                 "another number of classes.", config.model.num_classes)
  head_loaded = "head/kernel" not in report["missing"] and not any(
      m.startswith("head/") for m in report["mismatched"])
  if config.get("eval_only", False) and not head_loaded:
    found = ("has no head (a pretraining checkpoint)" if "head" not in pretrained else
             f"has a head of {np.shape(pretrained['head']['bias'])[0]} classes")
    raise ValueError(f"config.eval_only=True evaluates the head of config.init_from, but "
                     f"{config.init_from} {found}, and config.model.num_classes="
                     f"{config.model.num_classes}: a fresh head would score chance. Set "
                     "--config.init_from to a classifier of this dataset's classes, or "
                     "fine-tune (eval_only=False).")
  stats_fit = bool(pretrained_stats and batch_stats and head_loaded and jax.tree.map(
      np.shape, pretrained_stats) == jax.tree.map(np.shape, batch_stats))
  if config.get("eval_only", False):
    _check_evaluated_as_trained(config, report, bool(pretrained_stats) and not stats_fit)
  place = lambda tree, like: jax.tree.map(
      lambda v, t: v if isinstance(v, jax.Array) else _global_array(v, t), tree, like)
  if stats_fit:
    logging.info("  with the BatchNorm statistics of its head.")
    batch_stats = place(pretrained_stats, batch_stats)
  return place(merged, target), batch_stats


def _check_evaluated_as_trained(config: ml_collections.ConfigDict, report: Dict[str, Any],
                                stats_dropped: bool) -> None:
  """ValueError when eval_only would evaluate init_from's head behind other features than it
  was trained on: params of the model left fresh (a pooling of another kind: fc_norm or
  encoder_norm missing), or a linear probe's BatchNorm statistics dropped."""
  fresh = report["missing"]
  if fresh:
    raise ValueError(
        f"config.eval_only=True evaluates {config.init_from} as it was trained, but this "
        f"model would compute with fresh {', '.join(fresh[:6])}: the checkpoint pools its "
        "features another way. Use the config of the job that trained it (configs/"
        "finetune_*.py: global_pool=True; configs/linprobe_*.py: the cls token).")
  if stats_dropped:
    raise ValueError(
        f"config.eval_only=True evaluates {config.init_from} as it was trained, but its head "
        "was trained behind a BatchNorm (a linear probe) that this model lacks: use a linear "
        "probing config (config.model.head_batchnorm=True).")


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -sum(targets * log_softmax(logits)) (timm's SoftTargetCE)."""
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))


def step_options(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """`train_step`'s static arguments from a config: plain hashable values, so that no
  ConfigDict is closed into the jitted step."""
  return dict(mode=config.mode,
              augment_options=(None if config.mode == "linprobe" else
                               augment.FinetuneAugment.from_config(config.augment,
                                                                   config.input)),
              grad_accum_steps=config.optimizer.grad_accum_steps,
              guard_branch=config_checks.GUARDS[config.get("nonfinite_guard", "auto")])


def train_step(state: FinetuneState, images: jax.Array, labels: jax.Array, *,
               model: VisionTransformer, tx: optax.GradientTransformation,
               learning_rate: trainer.Schedule, mode: str,
               augment_options: Optional[augment.FinetuneAugment] = None,
               grad_accum_steps: int = 1, guard_branch: Optional[bool] = None
               ) -> Tuple[FinetuneState, Dict[str, jax.Array]]:
  """One optimizer update on a global batch, optionally in micro-batches (`step_options` gives
  the keyword arguments after `learning_rate` from a config).

  `images`: uint8 crops for "finetune" (augmented per `augment_options` and normalized here),
  normalized for "linprobe"; `labels`: int32 [B]. `guard_branch` is
  `trainer.update_if_finite`'s `branch` (config.nonfinite_guard).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  aug_key, drop_key = jax.random.split(key)
  k = model.num_classes
  if mode == "linprobe":
    targets = jax.nn.one_hot(labels, k)
  else:
    images, targets = augment.finetune_augment(aug_key, images, labels, k, augment_options)

  def loss_fn(weights, batch_stats, micro, index):
    images, targets = micro
    params = {**state.params, **weights}
    if mode == "linprobe":
      features = jax.lax.stop_gradient(model.apply({"params": params}, images,
                                                   method=VisionTransformer.features))
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, features,
                                    train=True, method=VisionTransformer.classify,
                                    mutable=["batch_stats"])
      batch_stats = updates["batch_stats"]
    else:
      logits = model.apply({"params": params}, images, train=True,
                           rngs={"dropout": jax.random.fold_in(drop_key, index)})
    return loss_scale.scale(state.loss_scale, cross_entropy(logits, targets)), batch_stats

  weights = trainable(state.params, mode)
  (loss, batch_stats), grads = trainer.accumulate_gradients(
      jax.value_and_grad(loss_fn, has_aux=True), weights, (images, targets),
      grad_accum_steps, state.batch_stats)
  loss, grads = loss_scale.unscale(state.loss_scale, loss, grads)
  # As in train.train_step: a non-finite loss or gradient keeps the old state (the official
  # code stops there; trainer.NonFiniteGuard stops or skips).
  weights, opt_state, batch_stats, grad_norm, finite = trainer.update_if_finite(
      tx, loss, grads, state.opt_state, weights, state.batch_stats, batch_stats,
      branch=guard_branch)
  params = {**state.params, **weights}
  scale, finite = loss_scale.after_update(state.loss_scale, loss, finite)
  metrics = trainer.step_metrics(loss, grad_norm, learning_rate(state.step), finite, scale)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       batch_stats=batch_stats, loss_scale=scale), metrics


def eval_step(params: Params, batch_stats: Params, images: jax.Array, labels: jax.Array,
              valid: jax.Array, *, model: VisionTransformer) -> Dict[str, jax.Array]:
  """Sums over the valid examples of a batch: top-1 and top-5 hits, loss, count."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  logits = model.apply(variables, images).astype(jnp.float32)
  _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
  hit = top == labels[:, None]
  valid = valid.astype(jnp.float32)
  loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
  return {"top1": jnp.sum(hit[:, 0] * valid), "top5": jnp.sum(hit.any(axis=1) * valid),
          "loss": jnp.sum(loss * valid), "count": jnp.sum(valid)}


def _eval_input(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = config.input.copy_and_resolve_references()
  with c.unlocked():
    c.batch_size = config.eval_batch_size
  return c


def evaluate(config: ml_collections.ConfigDict, state: FinetuneState,
             eval_fn: Callable, data_sharding: NamedSharding,
             source: Optional[Any] = None) -> Dict[str, float]:
  """Top-1 / top-5 accuracy (percent) and loss over the whole evaluation split (`source`, that
  split opened once per run; opened here when None)."""
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  totals = None
  for batch in input_pipeline.create_iterator(
      _eval_input(config), image_size=config.model.img_size, seed=config.seed, train=False,
      process_index=jax.process_index(), process_count=jax.process_count(), source=source,
      channels=config.model.in_chans):
    batch = input_pipeline.to_global(batch, data_sharding)
    sums = eval_fn(state.params, state.batch_stats, batch["image"], batch["label"],
                   batch["valid"])
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  n = max(totals["count"], 1.0)
  return {"eval_top1": 100.0 * totals["top1"] / n, "eval_top5": 100.0 * totals["top5"] / n,
          "eval_loss": totals["loss"] / n, "eval_examples": int(totals["count"])}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> FinetuneState:
  """Fine-tunes or linear-probes per `config`, resuming from the newest checkpoint in `workdir`."""
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  job = trainer.prepare(config)
  eval_every = config.eval_every_steps or job.steps_per_epoch
  model = create_model(config)
  param_shapes = jax.eval_shape(functools.partial(init_state, model, optax.identity(),
                                                  config.seed, config.mode)).params
  tx = create_optimizer(config, trainable(param_shapes, config.mode), job.learning_rate)
  target = abstract_state(model, config, tx, job.mesh)
  shardings = trainer.shardings_of(target)

  def init() -> FinetuneState:
    state = jax.jit(functools.partial(init_state, model, tx, config.seed, config.mode),
                    out_shardings=shardings)()
    params, batch_stats = start_params(config, state.params, target.params,
                                       state.batch_stats)
    return state.replace(params=params, batch_stats=batch_stats)

  session = trainer.Session(job, workdir, target, init)
  start, total = session.start, job.total
  n_train = sum(x.size for x in jax.tree.leaves(trainable(target.params, config.mode)))
  if config.eval_only:
    logging.info("%s, eval_only: evaluating the params of step %d on a %s mesh of %d devices "
                 "(nothing is trained).", config.mode, start, dict(job.mesh.shape),
                 jax.device_count())
  else:
    logging.info("%s: %s trainable params on a %s mesh of %d devices: steps %d -> %d, %d steps "
                 "per epoch, global batch %d.", config.mode, f"{n_train:,}",
                 dict(job.mesh.shape), jax.device_count(), start, total, job.steps_per_epoch,
                 job.batch_size)

  data_sharding = trainer.batch_sharding(job.mesh)
  replicated = NamedSharding(job.mesh, P())
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx,
                                      learning_rate=job.learning_rate, **step_options(config)),
                    in_shardings=(shardings, data_sharding, data_sharding),
                    out_shardings=(shardings, replicated), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(shardings.params, shardings.batch_stats, data_sharding,
                                  data_sharding, data_sharding), out_shardings=replicated)

  def run_eval(step: int, state: FinetuneState) -> None:
    row = evaluate(config, state, eval_fn, data_sharding, job.eval_source)
    logging.info("step %d: eval top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d examples)", step,
                 row["eval_top1"], row["eval_top5"], row["eval_loss"], row["eval_examples"])
    session.writer.write_scalars(step, row)

  if config.eval_only:  # e.g. a converted official fine-tuned checkpoint as config.init_from
    run_eval(start, session.state)
    session.close()
    if session.is_main:  # the checkpoint manager's folder, empty: no run to resume
      checkpoint.remove_empty_checkpoints_dir(workdir)
    return session.state

  batches = input_pipeline.create_iterator(
      config.input, image_size=config.model.img_size, seed=config.seed, train=True,
      start_step=start, process_index=jax.process_index(), process_count=jax.process_count(),
      normalize=config.mode != "finetune",  # fine-tuning augments the uint8 crops on device
      source=job.source, channels=config.model.in_chans)

  def after_step(step: int, state: FinetuneState) -> None:
    if step % eval_every == 0 or step == total:
      session.flush()  # the training row of this interval before the evaluation's
      run_eval(step, state)

  def one_step(state: FinetuneState, batch: Dict[str, np.ndarray]):
    batch = input_pipeline.to_global(batch, data_sharding)
    return step_fn(state, batch["image"], batch["label"])

  state, _ = session.run(one_step, batches, after_step)
  session.close()
  if session.is_main:
    logging.info("Wrote %s", plot.write([workdir]))
  return state
