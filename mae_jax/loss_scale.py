"""Dynamic loss scaling for float16 compute, with torch.amp.GradScaler's semantics.

The official code trains under autocast with GradScaler at its defaults (util/misc.py,
NativeScalerWithGradNormCount): the loss is multiplied by the scale before the backward pass
and the gradients divided by it after; a step whose gradients are not finite is skipped and
halves the scale (backoff 0.5); after `GROWTH_INTERVAL` finite steps in a row the scale
doubles. Without it, float16's range loses the small gradients: at ViT-B/16 geometry (224 px,
batch 64) the patch embedding's gradient came out 1.6 (relative) off float32's and most
query-kernel entries exactly zero.

The state is a dict of two scalars, {"scale": float32, "growth_tracker": int32} (the finite
steps since the scale last changed), carried in the train state (`loss_scale`) and its
checkpoints; it is None, and every function here the identity, for float32 and bfloat16
compute, whose range needs no scaling. flax.training.dynamic_scale grows one step later than
GradScaler and differentiates the whole loss at once, without micro-batches: hence this unit.
"""

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

LossScale = Optional[Dict[str, jax.Array]]

# torch.amp.GradScaler's defaults, which the official code uses.
INIT_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000


def init(dtype: Any) -> LossScale:
  """The initial state for a model computing in `dtype`: scaled only for float16."""
  if jnp.dtype(dtype) != jnp.float16:
    return None
  return {"scale": jnp.asarray(INIT_SCALE, jnp.float32),
          "growth_tracker": jnp.zeros((), jnp.int32)}


def scale(state: LossScale, loss: jax.Array) -> jax.Array:
  """The loss to differentiate: loss x scale."""
  return loss if state is None else loss * state["scale"]


def unscale(state: LossScale, loss: jax.Array, grads: Any) -> Tuple[jax.Array, Any]:
  """(loss, grads) of a scaled loss divided back by the scale, in float32 (exact: the scale is
  a power of 2)."""
  if state is None:
    return loss, grads
  inverse = 1.0 / state["scale"]
  return loss * inverse, jax.tree.map(lambda g: g.astype(jnp.float32) * inverse, grads)


def adjust(state: LossScale, finite: jax.Array, *,
           growth_interval: int = GROWTH_INTERVAL) -> LossScale:
  """The state after a step whose loss and gradients were `finite` (or not): GradScaler.update.

  Not finite: scale x 0.5, tracker 0 (the step itself was skipped). Finite: tracker + 1; at
  `growth_interval` the scale doubles (unless that overflows float32) and the tracker restarts.
  """
  if state is None:
    return None
  tracker = state["growth_tracker"] + 1
  reached = tracker >= growth_interval
  grown = state["scale"] * GROWTH_FACTOR
  new_scale = jnp.where(finite, jnp.where(reached & jnp.isfinite(grown), grown, state["scale"]),
                        state["scale"] * BACKOFF_FACTOR)
  new_tracker = jnp.where(finite & ~reached, tracker, 0)
  return {"scale": new_scale.astype(jnp.float32), "growth_tracker": new_tracker.astype(jnp.int32)}


def after_update(state: LossScale, loss: jax.Array,
                 finite: jax.Array) -> Tuple[LossScale, jax.Array]:
  """(the next state, whether the step counts as finite for the non-finite guard) after an
  update that was applied only if `finite` (loss and gradients). With scaling, gradients that
  overflow under a finite loss are the scaler's business (skipped, as GradScaler skips them),
  not a failed step; a non-finite loss still is (the official code stops there)."""
  if state is None:
    return None, finite
  return adjust(state, finite), jnp.isfinite(loss)
