"""Converters between the unrolled (`encoderblock_{i}`) and scanned (`encoderblock`) layouts."""

import re
from typing import Any, Dict

import jax
import jax.numpy as jnp

Params = Dict[str, Any]
_UNROLLED = re.compile(r"^(\w+block)_(\d+)$")
_BLOCK_NAMES = ("encoderblock", "decoderblock")


def scan_to_unrolled(params: Params) -> Params:
  """Splits every stacked `*block` subtree into `*block_{i}` along its leading axis."""
  out = {}
  for key, value in params.items():
    if key in _BLOCK_NAMES:
      depth = jax.tree.leaves(value)[0].shape[0]
      for i in range(depth):
        out[f"{key}_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
    elif isinstance(value, dict):
      out[key] = scan_to_unrolled(value)
    else:
      out[key] = value
  return out


def unrolled_to_scan(params: Params) -> Params:
  """Stacks `*block_{i}` subtrees into one `*block` subtree with the layer as leading axis."""
  out, blocks = {}, {}
  for key, value in params.items():
    m = _UNROLLED.match(key)
    if m and m.group(1) in _BLOCK_NAMES:
      blocks.setdefault(m.group(1), {})[int(m.group(2))] = value
    elif isinstance(value, dict):
      out[key] = unrolled_to_scan(value)
    else:
      out[key] = value
  for name, layers in blocks.items():
    ordered = [layers[i] for i in range(len(layers))]
    out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
  return out


def is_scanned(params: Params) -> bool:
  """Whether any subtree holds a stacked block."""
  return any(k in _BLOCK_NAMES or (isinstance(v, dict) and is_scanned(v))
             for k, v in params.items())
