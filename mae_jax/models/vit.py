"""ViT building blocks shared by the MAE and the classifier: image sizes and the patch grid
(`image_hw`, `patch_grid`, `check_images`), the patch embedding, the Transformer.

Parameter names follow big_vision / vision_transformer (`encoderblock_{i}/LayerNorm_0`,
`MultiHeadDotProductAttention_0/{query,key,value,out}`, `MlpBlock_0/Dense_{0,1}`, ...).
Attention kernels are kept 2D ([D, D]) so that a params tree never depends on the head count:
an official state dict converts without knowing it. `mae_jax.export` reshapes them to
big_vision's [D, heads, head_dim] when writing the encoder out.
"""

import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models import functional as F

Dtype = Any
ATTENTION_IMPLS = ("softmax", "xla", "cudnn")


def xavier_uniform_fans(fan_in: int, fan_out: int) -> Callable:
  """torch's xavier_uniform_ for a Linear of (fan_in -> fan_out), applied to any kernel shape."""
  bound = math.sqrt(6.0 / (fan_in + fan_out))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def linear_init(fan_in: int, fan_out: int) -> Callable:
  return xavier_uniform_fans(fan_in, fan_out)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), in torch's erf form (cheaper on CPU than jax.nn.gelu's erfc)."""
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x @ kernel + bias over the last axis of x, in x's dtype, with float32 params.

  The product accumulates in float32 and the bias is added before the one rounding to x's dtype
  (as torch's addmm under autocast). The hand-written VJP keeps the params' gradients in float32
  under bfloat16 / float16 compute: the kernel's product and the bias's sum over batch and tokens
  accumulate in float32 and are never rounded to the compute dtype (autodiff summed the bias
  gradient in bfloat16: 2-25x torch autocast's error; tests/test_mixed_precision.py). The input's
  gradient stays in x's dtype, its product in that dtype.
  """
  return dense_fwd(x, kernel, bias)[0]


def dense_fwd(x, kernel, bias):
  y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
  return (y + bias).astype(x.dtype), (x, kernel)


def dense_bwd(residuals, g):
  x, kernel = residuals
  dx = jnp.dot(g, kernel.astype(g.dtype).T)
  rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dkernel = jnp.dot(rows_x.T, rows_g, preferred_element_type=jnp.float32)
  dbias = jnp.sum(rows_g, axis=0, dtype=jnp.float32)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias


dense.defvjp(dense_fwd, dense_bwd)


def broadcast_param(param: jax.Array, shape, dtype: Dtype) -> jax.Array:
  """A float32 param (a token) broadcast to `shape`, then cast to `dtype`: its gradient is
  summed over the copies in float32, not in the compute dtype."""
  return jnp.broadcast_to(param, shape).astype(dtype)


class Dense(nn.Module):
  """nn.Dense's params (kernel [in, out], bias [out]) applied by `dense` in `dtype`."""
  features: int
  kernel_init: Callable
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return dense(x.astype(self.dtype), kernel, bias)


class MlpBlock(nn.Module):
  """Linear -> exact GELU -> Linear."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = Dense(self.mlp_dim, dtype=self.dtype, kernel_init=linear_init(d, self.mlp_dim))(x)
    x = gelu(x)
    return Dense(d, dtype=self.dtype, kernel_init=linear_init(self.mlp_dim, d))(x)


def _softmax_attention_fwd(q, k, v):
  """Attention over [B, H, T, head_dim]: softmax in float32, probabilities kept for the VJP."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  probs = (e / e.sum(axis=-1, keepdims=True)).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v), (q, k, v, probs)


def _softmax_attention_bwd(residuals, g):
  q, k, v, probs = residuals
  scale = 1.0 / math.sqrt(q.shape[-1])
  dv = jnp.einsum("bhqk,bhqd->bhkd", probs, g)
  dp = jnp.einsum("bhqd,bhkd->bhqk", g, v, preferred_element_type=jnp.float32)
  p = probs.astype(jnp.float32)
  ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * scale).astype(q.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", ds, k), jnp.einsum("bhqk,bhqd->bhkd", ds, q), dv


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v over [B, H, T, head_dim], with a hand-written VJP.

  The CPU path of `MultiHeadDotProductAttention`: heads-major matmuls and a backward pass from
  the saved probabilities run faster on XLA CPU than autodiff through
  `jax.nn.dot_product_attention` (BENCHMARKS.md, "CPU").
  """
  return _softmax_attention_fwd(q, k, v)[0]


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def default_attention_impl(dtype: Dtype, head_dim: int) -> str:
  """The fastest exact attention kernel for the default backend.

  "softmax" (`softmax_attention`) on CPU; "cudnn" (flash attention) on NVIDIA GPUs for the
  dtypes and head sizes cuDNN takes, since `jax.nn.dot_product_attention(implementation=None)`
  still means XLA's kernel (0.66 ms against cuDNN's 0.14 ms at [256, 197, 8, 64] bf16, measured
  on one H100 80GB); "xla" otherwise.
  """
  backend = jax.default_backend()
  if backend == "cpu":
    return "softmax"
  if (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and
      head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return "xla"


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with qkv bias: separate query/key/value projections.

  `attention_impl`: None picks `default_attention_impl`; "softmax" is `softmax_attention`;
  "xla" and "cudnn" are those implementations of `jax.nn.dot_product_attention`.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    head_dim = d // self.num_heads
    impl = self.attention_impl or default_attention_impl(self.dtype, head_dim)
    if impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={impl!r} is not one of {ATTENTION_IMPLS} (or None for "
                       f"the backend's fastest)")
    shape = (b, t, self.num_heads, head_dim)
    # The official qkv is one Linear(d, 3d): xavier over fans (d, 3d) for each third. Three
    # matmuls rather than one over concatenated kernels: no [d, 3d] copy per step.
    q, k, v = (Dense(d, dtype=self.dtype, kernel_init=xavier_uniform_fans(d, 3 * d),
                        name=name)(x).reshape(shape) for name in ("query", "key", "value"))
    if impl == "softmax":
      heads_major = lambda y: y.transpose(0, 2, 1, 3)
      out = heads_major(softmax_attention(heads_major(q), heads_major(k), heads_major(v)))
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    out = out.reshape(b, t, d)
    return Dense(d, dtype=self.dtype, kernel_init=linear_init(d, d), name="out")(out)


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


# An image size: one int for a square image, or a (height, width) pair.
ImageSize = Union[int, Tuple[int, int]]


class PatchEmbed(nn.Module):
  """Linear patch embedding with the kernel in conv layout [p, p, C, D] (big_vision's
  `embedding`), applied as one matmul over patchified pixels."""
  patch_size: int
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, c = self.patch_size, images.shape[-1]
    # The official init is xavier_uniform on the conv weight viewed as [D, p*p*C].
    kernel = self.param("kernel", linear_init(p * p * c, self.features),
                        (p, p, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    patches = F.patchify(images, p).astype(self.dtype)
    return dense(patches, kernel.reshape(-1, self.features), bias)


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def image_hw(img_size: Union[ImageSize, Sequence[int]]) -> Tuple[int, int]:
  """(height, width) in pixels of an `img_size` given as an int (a square) or an (H, W) pair.

  A list [H, W] (a config read back from JSON) is taken as the pair. Raises ValueError for
  anything else: a float, a bool, a string, a triple, a side below 1.
  """
  if _is_int(img_size):
    hw = (int(img_size), int(img_size))
  elif (isinstance(img_size, (tuple, list)) and len(img_size) == 2 and
        all(_is_int(s) for s in img_size)):
    hw = (int(img_size[0]), int(img_size[1]))
  else:
    raise ValueError(f"img_size must be an int (a square image) or an (H, W) pair of ints, "
                     f"got {img_size!r}")
  if min(hw) < 1:
    raise ValueError(f"img_size {img_size!r} must be at least 1 pixel on each side")
  return hw


def canonical_img_size(img_size: Union[ImageSize, Sequence[int]]) -> ImageSize:
  """`img_size` as a hashable module field: an int stays an int, a pair becomes a tuple."""
  hw = image_hw(img_size)
  return hw[0] if _is_int(img_size) else hw


def patch_grid(img_size: ImageSize, patch_size: int) -> Tuple[int, int]:
  """The (rows, cols) of patches of an image; an error if the patches do not tile it."""
  h, w = image_hw(img_size)
  if h % patch_size or w % patch_size:
    raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}: "
                     f"choose a patch size that divides the image's height and width")
  return h // patch_size, w // patch_size


def num_patches(img_size: ImageSize, patch_size: int) -> int:
  """L, the number of patches (tokens without cls) of an image."""
  rows, cols = patch_grid(img_size, patch_size)
  return rows * cols


def check_images(images: jax.Array, img_size: ImageSize, in_chans: int) -> None:
  """An error naming the expected shape unless `images` is NHWC [B, H, W, in_chans]."""
  expected = (*image_hw(img_size), in_chans)
  if images.ndim != 4 or tuple(images.shape[1:]) != expected:
    raise ValueError(f"images must be NHWC [batch, {expected[0]}, {expected[1]}, "
                     f"{expected[2]}], got shape {tuple(images.shape)}")
