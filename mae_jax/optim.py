"""Weight-decay groups and the optimizers of fine-tuning and linear probing, with the official
semantics, in optax.

- `weight_decay_mask`: which params AdamW decays. By default the official groups: timm's
  add_weight_decay (main_pretrain.py) and param_groups_lrd (util/lr_decay.py) both leave out
  1-D params and biases; fine-tuning also leaves out the tokens (timm's no_weight_decay()).
- `adamw_layer_decay`: AdamW with layer-wise lr decay (official util/lr_decay.py,
  param_groups_lrd): layer id 0 for `embedding`, `cls`, `pos_embedding`; i + 1 for
  `encoderblock_i`; depth + 1 for everything else; lr scale decay ** (depth + 1 - id). No weight
  decay on 1-D params and on the tokens (`cls`, `pos_embedding`). torch scales a group's whole
  lr, which multiplies AdamW's whole update (decoupled decay included): scaling optax's update
  by the same factor is the same step.
- `lars`: official util/lars.py (from MoCo v3): for params with more than one dimension,
  g <- (g + wd p) * trust |p| / |g + wd p| (1 where either norm is 0); 1-D params take g as is;
  mu <- momentum mu + g; p <- p - lr mu. The lr applies after the momentum, as in torch.

Both take scanned params (`encoderblock` with the layer as leading axis) as well as unrolled
ones; LARS's norms then cover a whole stacked leaf (it serves the linear-probe head).
"""

import re
from typing import Any, Callable, Dict, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Dict[str, Any]
Schedule = Union[float, Callable[[jax.Array], jax.Array]]

_TOKENS = ("cls", "pos_embedding")
_BLOCK = re.compile(r"^encoderblock(?:_(\d+))?$")
# Scanned blocks (mae_jax.models.layout): their leaves carry the layer as an extra leading axis.
_SCANNED = ("encoderblock", "decoderblock")
# config.optimizer.weight_decay_groups: the official groups, or the weight matrices only.
DECAY_GROUPS = ("official", "kernels")


def _map_with_path(fn: Callable, params: Params) -> Any:
  """fn(path_of_key_names, leaf) over a nested dict, keeping its structure."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: fn(tuple(getattr(k, "key", str(k)) for k in path), leaf), params)


def _block(path) -> tuple:
  """(is a block param, its layer index or None when scanned)."""
  for key in path:
    m = _BLOCK.match(key)
    if m:
      return True, None if m.group(1) is None else int(m.group(1))
  return False, None


def _ndim(leaf) -> int:
  """ndim of an array or a `jax.ShapeDtypeStruct` (optimizers are built from either)."""
  return len(leaf.shape) if hasattr(leaf, "shape") else np.ndim(leaf)


def _layer_ndim(path, leaf) -> int:
  """The ndim of one layer's param: scanned block params carry an extra leading axis."""
  return _ndim(leaf) - (1 if any(key in _SCANNED for key in path) else 0)


def layer_ids(params: Params, depth: int) -> Any:
  """Official get_layer_id_for_vit per leaf; an int array [depth] for scanned block leaves."""

  def layer_id(path, leaf):
    is_block, index = _block(path)
    if is_block:
      return np.arange(1, depth + 1) if index is None else index + 1
    if path[0] in _TOKENS + ("embedding",):
      return 0
    return depth + 1

  return _map_with_path(layer_id, params)


def layer_decay_scales(params: Params, depth: int, layer_decay: float) -> Any:
  """lr multipliers layer_decay ** (depth + 1 - layer_id), broadcastable to each leaf."""

  def leaf_scale(layer_id, leaf):
    s = np.power(float(layer_decay), depth + 1 - np.asarray(layer_id, np.float64))
    if s.ndim:  # scanned: one scale per layer along the leading axis
      return jnp.asarray(s.reshape((-1,) + (1,) * (_ndim(leaf) - 1)), jnp.float32)
    return float(s)

  return jax.tree.map(leaf_scale, layer_ids(params, depth), params)


def weight_decay_mask(params: Params, groups: str = "official", no_decay: tuple = ()) -> Any:
  """A bool per leaf of `params` (arrays or `jax.ShapeDtypeStruct`s): True where AdamW decays.

  groups "official": the official code's groups. Pretraining (main_pretrain.py) uses timm's
  add_weight_decay: no decay where a param is 1-D or a bias, every other param decayed, the
  [1, 1, D] `cls` and `mask_token` included (the sin-cos position tables are fixed, not
  params). Fine-tuning (util/lr_decay.py, param_groups_lrd) is the same rule with the model's
  no_weight_decay() names skipped too: pass `no_decay=("cls", "pos_embedding")`. Scanned blocks
  count the dimensions of one layer.
  groups "kernels": the weight matrices (`kernel`) only: no decay on the tokens either.
  `no_decay`: top-level names never decayed. Raises ValueError for another `groups`.
  """
  if groups not in DECAY_GROUPS:
    raise ValueError(f"weight-decay groups {groups!r} are not one of {DECAY_GROUPS}")

  def decayed(path, leaf):
    if path[0] in no_decay:
      return False
    if groups == "kernels":
      return path[-1] == "kernel"
    return path[-1] != "bias" and _layer_ndim(path, leaf) > 1

  return _map_with_path(decayed, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-leaf factor."""
  return optax.stateless(lambda updates, params: jax.tree.map(
      lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales))


def adamw_layer_decay(learning_rate: Schedule, params: Params, *, depth: int,
                      layer_decay: float, b1: float = 0.9, b2: float = 0.999,
                      eps: float = 1e-8, weight_decay: float = 0.05
                      ) -> optax.GradientTransformation:
  """torch.optim.AdamW over official param_groups_lrd groups."""
  return optax.chain(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=weight_decay_mask(params, no_decay=_TOKENS)),
      scale_by_tree(layer_decay_scales(params, depth, layer_decay)))


def lars(learning_rate: Schedule, *, weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coefficient: float = 0.001) -> optax.GradientTransformation:
  """The official LARS: decay and trust ratio only for params with more than one dimension."""

  def matrices(params):
    return _map_with_path(lambda path, leaf: _layer_ndim(path, leaf) > 1, params)

  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=matrices),
      optax.masked(optax.scale_by_trust_ratio(min_norm=0.0, trust_coefficient=trust_coefficient,
                                              eps=0.0), matrices),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate))
