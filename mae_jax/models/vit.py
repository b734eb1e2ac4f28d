"""ViT building blocks shared by the MAE and the classifier.

Parameter names follow big_vision / vision_transformer (`encoderblock_{i}/LayerNorm_0`,
`MultiHeadDotProductAttention_0/{query,key,value,out}`, `MlpBlock_0/Dense_{0,1}`, ...).
Attention kernels are kept 2D ([D, D]) so that a params tree never depends on the head count:
an official state dict converts without knowing it. `mae_jax.export` reshapes them to
big_vision's [D, heads, head_dim] when writing the encoder out.
"""

import math
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def xavier_uniform_fans(fan_in: int, fan_out: int) -> Callable:
  """torch's xavier_uniform_ for a Linear of (fan_in -> fan_out), applied to any kernel shape."""
  bound = math.sqrt(6.0 / (fan_in + fan_out))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def linear_init(fan_in: int, fan_out: int) -> Callable:
  return xavier_uniform_fans(fan_in, fan_out)


class MlpBlock(nn.Module):
  """Linear -> exact GELU -> Linear."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=linear_init(d, self.mlp_dim))(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, dtype=self.dtype, kernel_init=linear_init(self.mlp_dim, d))(x)


class _LinearParams(nn.Module):
  """The kernel [in, out] and bias [out] of a Linear, returned rather than applied."""
  in_features: int
  features: int
  kernel_init: Callable

  @nn.compact
  def __call__(self) -> Tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with qkv bias: separate query/key/value params, one fused matmul."""
  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    head_dim = d // self.num_heads
    # The official qkv is one Linear(d, 3d): xavier over fans (d, 3d) for each third.
    qkv_init = xavier_uniform_fans(d, 3 * d)
    kb = [_LinearParams(d, d, qkv_init, name=n)() for n in ("query", "key", "value")]
    kernel = jnp.concatenate([k for k, _ in kb], axis=1).astype(self.dtype)
    bias = jnp.concatenate([b_ for _, b_ in kb]).astype(self.dtype)
    qkv = jnp.dot(x.astype(self.dtype), kernel) + bias
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.num_heads, head_dim), 3, axis=2)
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    out = out.reshape(b, t, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=linear_init(d, d), name="out")(out)


class DropPath(nn.Module):
  """Stochastic depth per example (timm's DropPath), active only when not deterministic."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if self.rate == 0.0 or deterministic:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block; returns (x, None) so that it scans."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  drop_path: float = 0.0
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    norm = lambda: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
    y = norm()(x)
    y = MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl)(y)
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = norm()(x)
    y = MlpBlock(self.mlp_dim, self.dtype)(y)
    x = x + DropPath(self.drop_path)(y, deterministic)
    return x, None


class Transformer(nn.Module):
  """A stack of blocks and a final LayerNorm, unrolled or as one `nn.scan` (+ `nn.remat`).

  Unrolled params are `{prefix}block_{i}/...`; scanned ones are `{prefix}block/...` with the
  layer index as leading axis (convert with `mae_jax.models.scan_to_unrolled` and back).
  `final_norm=False` leaves out `{prefix}_norm`, as the official global-pool classifier does.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  prefix: str = "encoder"
  dtype: Dtype = jnp.float32
  scan: bool = False
  remat: bool = False
  drop_path: float = 0.0
  attention_impl: Optional[str] = None
  final_norm: bool = True

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    block = Encoder1DBlock
    if self.remat:
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(2,))
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                  attention_impl=self.attention_impl)
    if self.scan:
      if self.drop_path:
        raise ValueError("drop_path needs an unrolled model (scan=False): its rate grows "
                         "with depth")
      x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=self.depth)(
                         name=f"{self.prefix}block", **kwargs)(x, deterministic)
    else:
      for i in range(self.depth):
        rate = self.drop_path * i / max(self.depth - 1, 1)
        x, _ = block(name=f"{self.prefix}block_{i}", drop_path=rate, **kwargs)(x, deterministic)
    if not self.final_norm:
      return x
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"{self.prefix}_norm")(x)
