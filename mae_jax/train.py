"""MAE pretraining: its optimizer, sharded train state, the jitted step and
`train_and_evaluate`. The machinery it shares with fine-tuning (mesh, schedule, non-finite
guard, preemption, reporting, the loop) is mae_jax.trainer, the one check of every job's config
mae_jax.config_checks; the names of them that users import from here (`validate_config`,
`MESH_AXES`, `batch_sharding`, `create_learning_rate_fn`, ...) stay importable.

Everything here is importable without TensorFlow: the input pipeline (which uses it) is imported
inside `train_and_evaluate` only, so GPU hosts can run the step, tests and benchmarks without it.
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

from mae_jax import checkpoint
from mae_jax import loss_scale
from mae_jax import models
from mae_jax import monitor
from mae_jax import optim
from mae_jax import plot
from mae_jax import trainer
from mae_jax import visualize
from mae_jax import writers
# Names that users import from here (mae_jax's public interface).
from mae_jax.config_checks import (  # pylint: disable=unused-import
    COMPUTE_DTYPES, GUARDS, validate_config)
from mae_jax.trainer import (  # pylint: disable=unused-import
    BATCH_AXES, MESH_AXES, Params, Schedule, base_learning_rate, batch_sharding,
    create_learning_rate_fn, fsdp_min_bytes, fsdp_sharding, make_mesh, num_train_steps,
    update_if_finite)


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds; the input position is `step` (the input is a function of it)."""
  step: jax.Array       # int32 [], optimizer updates done
  params: Params
  opt_state: optax.OptState
  rng: jax.Array        # uint32 key data; masking noise of step s uses fold_in(rng, s)
  # float16 compute: the dynamic loss scale (mae_jax.loss_scale); None otherwise.
  loss_scale: Any = None


# --- optimizer --------------------------------------------------------------------------------

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
                    rng=jax.random.key_data(noise_key), loss_scale=loss_scale.init(model.dtype))


def abstract_train_state(model: models.MaskedAutoencoder, tx: optax.GradientTransformation,
                         seed: int, mesh: jax.sharding.Mesh, *,
                         fsdp_min_bytes: int = 0) -> TrainState:
  """ShapeDtypeStructs of the train state carrying their target shardings (nothing allocated);
  `fsdp_min_bytes`: see `trainer.fsdp_min_bytes(config)`."""
  return trainer.with_shardings(
      mesh, jax.eval_shape(functools.partial(init_train_state, model, tx, seed)),
      fsdp_min_bytes=fsdp_min_bytes)


def create_train_state(model: models.MaskedAutoencoder, tx: optax.GradientTransformation,
                       seed: int, abstract_state: TrainState) -> TrainState:
  """Initializes the state directly into its shardings (no full copy on one device)."""
  return jax.jit(functools.partial(init_train_state, model, tx, seed),
                 out_shardings=trainer.shardings_of(abstract_state))()


# --- the step ---------------------------------------------------------------------------------

def masking_noise(rng: jax.Array, step: jax.Array, batch: int, num_patches: int) -> jax.Array:
  """Per-example uniform noise [batch, L] of one step: a pure function of (rng, step)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  return jax.random.uniform(key, (batch, num_patches), jnp.float32)


def train_step(state: TrainState, images: jax.Array, *, model: models.MaskedAutoencoder,
               tx: optax.GradientTransformation, learning_rate: Schedule, mask_ratio: float,
               grad_accum_steps: int = 1, guard_branch: Optional[bool] = None
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer update on a global batch of NHWC images, optionally in micro-batches;
  `guard_branch` is `update_if_finite`'s `branch`."""
  num_patches = models.num_patches(model.img_size, model.patch_size)
  noise = masking_noise(state.rng, state.step, images.shape[0], num_patches)

  def loss_fn(params, aux, micro, index):
    del index
    images, noise = micro
    loss, _, _ = model.apply({"params": params}, images, mask_ratio=mask_ratio, noise=noise)
    return loss_scale.scale(state.loss_scale, loss), aux

  # Every example masks the same number of patches, so the mean of the micro-batch losses (and
  # gradients) is exactly the full batch's.
  (loss, _), grads = trainer.accumulate_gradients(
      jax.value_and_grad(loss_fn, has_aux=True), state.params, (images, noise),
      grad_accum_steps)
  loss, grads = loss_scale.unscale(state.loss_scale, loss, grads)
  # A non-finite loss or gradient leaves params and optimizer state as they were, so nothing
  # non-finite reaches a checkpoint; the loop then stops or skips (trainer.NonFiniteGuard). The
  # step still advances: the next update takes the next batch.
  params, opt_state, _, grad_norm, finite = update_if_finite(tx, loss, grads, state.opt_state,
                                                             state.params, branch=guard_branch)
  scale, finite = loss_scale.after_update(state.loss_scale, loss, finite)
  metrics = trainer.step_metrics(loss, grad_norm, learning_rate(state.step), finite, scale)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       loss_scale=scale), metrics


def jit_train_step(config: ml_collections.ConfigDict, model: models.MaskedAutoencoder,
                   tx: optax.GradientTransformation, learning_rate: Schedule,
                   abstract_state: TrainState, mesh: jax.sharding.Mesh) -> Callable:
  """`train_step` as one jax.jit over the mesh; the incoming state's buffers are donated."""
  shardings = trainer.shardings_of(abstract_state)
  step = functools.partial(train_step, model=model, tx=tx, learning_rate=learning_rate,
                           mask_ratio=config.model.mask_ratio,
                           grad_accum_steps=config.optimizer.grad_accum_steps,
                           guard_branch=GUARDS[config.get("nonfinite_guard", "auto")])
  return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


# --- the run ----------------------------------------------------------------------------------

def _reconstruction_writer(config: ml_collections.ConfigDict, model: models.MaskedAutoencoder,
                           mesh: jax.sharding.Mesh, workdir: str,
                           writer: writers.MetricWriter) -> Callable[[Params, int], None]:
  """A function that renders the fixed reconstruction images with given params at a step into
  WORKDIR/reconstruction_<step>.png (and TensorBoard); every process computes, process 0
  writes."""
  replicated = NamedSharding(mesh, P())
  images = visualize.reconstruction_inputs(config)
  mean, std = visualize.display_normalization(
      images, config.input.get("mean", visualize.IMAGENET_MEAN),
      config.input.get("std", visualize.IMAGENET_STD))
  # Every process holds the same images and noise: a replicated global array each.
  images = jax.make_array_from_process_local_data(replicated, images)
  noise = jax.make_array_from_process_local_data(replicated, visualize.fixed_noise(
      config.seed, images.shape[0], models.num_patches(model.img_size, model.patch_size)))
  render = jax.jit(functools.partial(visualize.reconstruct, model,
                                     mask_ratio=config.model.mask_ratio, mean=mean, std=std),
                   out_shardings=replicated)

  def write(params: Params, step: int) -> None:
    panels = np.asarray(render(params, images, noise))
    if jax.process_index() == 0:
      grid = visualize.grid_image(visualize.select_bands(panels))
      path = visualize.save_png(grid, f"{workdir}/reconstruction_{step:08d}.png")
      writer.write_image(step, "reconstruction", grid)
      logging.info("Wrote %s", path)

  return write


def _start_params(config: ml_collections.ConfigDict, workdir: str, fresh: Params,
                  target: Params) -> Params:
  """The params in WORKDIR/params (mae_jax.convert's) to start pretraining from, checked
  against the config (WrongModelError naming the fields that differ, heads included; a warning
  when a decoder trained for the other `norm_pix_loss` target is switched). An encoder-only
  release (`mae_pretrain_vit_*.pth`) starts continued pretraining: its encoder
  loaded, the decoder kept as freshly initialized."""
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
  params, source = checkpoint.load_params(workdir, target=target,
                                          optional=convert.DECODER_PARAMS)
  unseen = checkpoint.unseen_model_differences(source, config, params, workdir)
  if unseen:
    raise checkpoint.WrongModelError(
        f"The params in {workdir}/{checkpoint.PARAMS} do not fit this config: "
        + "; ".join(unseen) + ". Set those fields to the checkpoint's values.")
  saved = (source.model.get("norm_pix_loss") if source is not None and "model" in source
           else None)
  if "decoder_pred" in params and saved is not None and saved != config.model.norm_pix_loss:
    target = {True: "normalized patches", False: "pixels"}
    logging.warning(
        "The decoder in %s/%s was trained to predict %s (norm_pix_loss=%s); with "
        "config.model.norm_pix_loss=%s continued pretraining switches it to %s. Set "
        "--config.model.norm_pix_loss=%s to keep its target.", workdir, checkpoint.PARAMS,
        target[saved], saved, config.model.norm_pix_loss, target[config.model.norm_pix_loss],
        saved)
  fresh_parts = sorted(k for k in fresh if k not in params)
  logging.info("Starting from the params in %s/%s.", workdir, checkpoint.PARAMS)
  if fresh_parts:
    logging.info("%s/%s holds an encoder only: continued pretraining starts with a freshly "
                 "initialized decoder (%s).", workdir, checkpoint.PARAMS, ", ".join(fresh_parts))
  return {**fresh, **params}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Pretrains per `config`, resuming from the newest checkpoint in `workdir`."""
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  job = trainer.prepare(config)
  model = models.from_config(config.model)
  tx = create_optimizer(config, job.learning_rate)
  abstract_state = abstract_train_state(model, tx, config.seed, job.mesh,
                                        fsdp_min_bytes=trainer.fsdp_min_bytes(config))
  knn = monitor.create(config, model, job.mesh, BATCH_AXES)  # its dataset checked before writing

  def init() -> TrainState:
    state = create_train_state(model, tx, config.seed, abstract_state)
    if checkpoint.has_params(workdir):
      state = state.replace(params=_start_params(config, workdir, state.params,
                                                 abstract_state.params))
    return state

  session = trainer.Session(job, workdir, abstract_state, init)
  start, total = session.start, job.total
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info("Training %s params on a %s mesh of %d devices (%d processes): steps %d -> %d, "
               "global batch %d, %s.", f"{n_params:,}", dict(job.mesh.shape),
               jax.device_count(), jax.process_count(), start, total, job.batch_size,
               job.epoch_text())

  batches = input_pipeline.create_iterator(
      config.input, image_size=config.model.img_size, seed=config.seed, train=True,
      start_step=start, process_index=jax.process_index(), process_count=jax.process_count(),
      source=job.source, channels=config.model.in_chans)
  step_fn = jit_train_step(config, model, tx, job.learning_rate, abstract_state, job.mesh)
  data_sharding = batch_sharding(job.mesh)
  write_reconstructions = _reconstruction_writer(config, model, job.mesh, workdir,
                                                 session.writer)

  def after_step(step: int, state: TrainState) -> None:
    if (config.reconstruction_every_steps and step % config.reconstruction_every_steps == 0
        and step < total):
      write_reconstructions(state.params, step)
    if knn is not None and knn.due(step, total):
      session.flush()  # the training row of this step first
      session.exclude(knn.write(step, state.params, session.writer)["knn_s"])

  if knn is not None and start == 0:
    knn.write(0, session.state.params, session.writer)  # the random init: where the curve starts

  state, step = session.run(
      lambda state, batch: step_fn(
          state, input_pipeline.to_global({"image": batch["image"]}, data_sharding)["image"]),
      batches, after_step)
  if step == total:
    write_reconstructions(state.params, step)
  session.close()
  if session.is_main:
    logging.info("Wrote %s", plot.write([workdir]))
  return state
