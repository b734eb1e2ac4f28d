"""The CPU fast paths of the model compute the same function as the reference ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models.vit import (MultiHeadDotProductAttention, default_attention_impl, gelu,
                                softmax_attention)


def _qkv(shape, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype) * 2 for k in keys]


def _loss(fn):
  # A fixed random cotangent, so that every output element's gradient path is exercised.
  def loss(*args):
    out = fn(*args).astype(jnp.float32)
    return jnp.sum(out * jax.random.normal(jax.random.key(1), out.shape))
  return loss


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_softmax_attention_and_its_vjp_match_dot_product_attention(dtype, tol):
  q, k, v = _qkv((2, 9, 3, 8), dtype)  # [B, T, H, head_dim]
  heads_major = lambda x: x.transpose(0, 2, 1, 3)
  ours = lambda q, k, v: heads_major(softmax_attention(heads_major(q), heads_major(k),
                                                       heads_major(v)))
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  # Each side jitted: one compile per function rather than one per op.
  np.testing.assert_allclose(np.asarray(jax.jit(ours)(q, k, v), np.float32),
                             np.asarray(jax.jit(ref)(q, k, v), np.float32), atol=tol, rtol=tol)
  grads = jax.jit(jax.grad(_loss(ours), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.jit(jax.grad(_loss(ref), argnums=(0, 1, 2)))(q, k, v)
  for g, e in zip(grads, expected):
    assert g.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32),
                               atol=tol * 4, rtol=tol)


def test_gelu_is_the_exact_gelu_with_its_exact_gradient():
  x = jnp.linspace(-8.0, 8.0, 4001)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x),
                             jax.vmap(jax.grad(lambda y: jax.nn.gelu(y, approximate=False)))(x),
                             atol=1e-6)
  # Far from the tanh approximation, which differs by ~1e-3 near |x| = 2.
  assert float(jnp.abs(gelu(x) - jax.nn.gelu(x, approximate=True)).max()) > 1e-4


def test_attention_module_cpu_path_equals_the_xla_path():
  assert jax.default_backend() == "cpu"
  x = jax.random.normal(jax.random.key(2), (2, 7, 16))
  auto = MultiHeadDotProductAttention(num_heads=4)
  xla = MultiHeadDotProductAttention(num_heads=4, attention_impl="xla")
  params = auto.init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, xla.init(jax.random.key(3), x))
  # attention_impl=None takes the hand-written VJP ("softmax") on CPU; "xla" does not. (The
  # projections are custom VJPs of their own, `dense`, under every attention_impl.)
  assert "name=softmax_attention" in str(jax.make_jaxpr(lambda p: auto.apply(p, x))(params))
  assert "name=softmax_attention" not in str(jax.make_jaxpr(lambda p: xla.apply(p, x))(params))
  np.testing.assert_allclose(jax.jit(auto.apply)(params, x), jax.jit(xla.apply)(params, x),
                             atol=1e-5, rtol=1e-5)
  grads = jax.jit(jax.grad(_loss(lambda p: auto.apply(p, x))))(params)
  expected = jax.jit(jax.grad(_loss(lambda p: xla.apply(p, x))))(params)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-4), grads,
               expected)


def test_default_attention_impl_per_backend(monkeypatch):
  assert default_attention_impl(jnp.float32, 64) == "softmax"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert default_attention_impl(jnp.bfloat16, 64) == "cudnn"
  assert default_attention_impl(jnp.bfloat16, 80) == "cudnn"  # ViT-H/14: 1280 / 16 heads
  assert default_attention_impl(jnp.float32, 64) == "xla"  # cuDNN takes 16-bit inputs only
  assert default_attention_impl(jnp.bfloat16, 36) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert default_attention_impl(jnp.bfloat16, 64) == "xla"


def test_unknown_attention_impl_is_refused_naming_the_choices():
  x = jnp.zeros((1, 3, 8))
  with pytest.raises(ValueError, match="attention_impl='flash' is not one of"):
    MultiHeadDotProductAttention(num_heads=2, attention_impl="flash").init(jax.random.key(0), x)
