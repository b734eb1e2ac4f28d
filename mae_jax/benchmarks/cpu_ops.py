"""Where a ViT-B/16 MAE train step spends its time, per kind of operation, mae_jax beside PyTorch.

    python -m mae_jax.benchmarks.cpu_ops [--batch_size=4] [--mask_ratio=0.75] [--rounds=5]

Times, at the shapes of one ViT-B/16 step (float32, the encoder at `--mask_ratio`, the decoder
at full length) and in one process, each kind of operation as mae_jax runs it (jitted, forward
and backward where the step has both) and as the official code runs it in PyTorch (timm's
`Block`: F.layer_norm, F.gelu, F.scaled_dot_product_attention, nn.Linear's three matmuls,
torch.optim.AdamW): attention's core, the heads-major layout copies around it, LayerNorm, GELU,
the forward, input-gradient and weight-gradient matmuls of the Linear layers, and AdamW over
every parameter. The two sides alternate op by op, `--rounds` times; each figure is the median
over rounds of the fastest of `--reps` calls, times how often the step runs it, in ms per step.
Each op alone: XLA fuses some of them into their neighbours inside the real step, so the sum is
a guide to where the difference lies, not the step time. Last line: one JSON object.
"""

import argparse
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax import config_lib
from mae_jax import models
from mae_jax import train
from mae_jax.models import vit
from mae_jax.models.functional import num_kept


def _time(fn: Callable[[], Any], reps: int, sync: Callable[[Any], Any]) -> float:
  sync(fn())
  best = math.inf
  for _ in range(reps):
    start = time.perf_counter()
    sync(fn())
    best = min(best, time.perf_counter() - start)
  return best


def _jax_ops(b: int, t: int, d: int, h: int, mlp: int) -> Dict[str, Callable]:
  """One block's operations at [b, t, d] with h heads, each a jitted call with fixed inputs."""
  keys = iter(jax.random.split(jax.random.key(0), 32))
  rand = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
  x, hidden, hidden_g = rand(b * t, d), rand(b * t, mlp), rand(b * t, mlp)
  q, k, v = (rand(b, h, t, d // h) for _ in range(3))
  ln = vit.nn.LayerNorm(epsilon=1e-6)
  ln_params = ln.init(jax.random.key(0), x)

  def vjp_call(f, *args):
    out, pull = jax.vjp(f, *args)
    return out, pull(jnp.ones_like(out))

  def attention_core(q, k, v):
    return vjp_call(vit.softmax_attention, q, k, v)

  def heads_major(q, k, v):  # [b, t, h, dh] -> [b, h, t, dh] for q, k, v, back for the output
    move = lambda y: y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)
    out = (move(q) + move(k) + move(v)).transpose(0, 2, 1, 3).reshape(b * t, d)
    return out

  # Four different [d, d] kernels and gradients (query, key, value, out): identical operands
  # would be computed once (CSE).
  w_d, w_fc1, w_fc2 = [rand(d, d) for _ in range(4)], rand(d, mlp), rand(mlp, d)
  gs, xs = [rand(b * t, d) for _ in range(4)], [rand(b * t, d) for _ in range(2)]
  dot = lambda lhs, rhs, contract: jax.lax.dot_general(lhs, rhs, (contract, ((), ())))

  def bind(fn, *args):  # the inputs are arguments: closed-over arrays would be constant-folded
    jitted = jax.jit(fn)
    return lambda: jitted(*args)

  return {
      "attention core (fwd+bwd)": bind(attention_core, q, k, v),
      "heads-major layout copies (fwd+bwd)": bind(
          lambda x: vjp_call(heads_major, x, x, x), x),
      "LayerNorm x2 (fwd+bwd)": bind(
          lambda p, xs: [vjp_call(lambda x: ln.apply(p, x), x) for x in xs], ln_params, xs),
      "GELU (fwd+bwd)": bind(lambda y: vjp_call(vit.gelu, y), hidden),
      "Linear forward matmuls": bind(
          lambda x, hidden, w_d, w_fc1, w_fc2: [x @ w for w in w_d]
          + [x @ w_fc1, hidden @ w_fc2], x, hidden, w_d, w_fc1, w_fc2),
      "Linear input-gradient matmuls": bind(
          lambda gs, hidden_g, w_d, w_fc1, w_fc2: [dot(g, w, ((1,), (1,)))
                                                   for g, w in zip(gs, w_d)]
          + [dot(hidden_g, w_fc1, ((1,), (1,))), dot(gs[0], w_fc2, ((1,), (1,)))],
          gs, hidden_g, w_d, w_fc1, w_fc2),
      "Linear weight-gradient matmuls": bind(
          lambda x, gs, hidden, hidden_g: [dot(x, g, ((0,), (0,))) for g in gs]
          + [dot(x, hidden_g, ((0,), (0,))), dot(hidden, gs[0], ((0,), (0,)))],
          x, gs, hidden, hidden_g),
  }


def _torch_ops(b: int, t: int, d: int, h: int, mlp: int) -> Dict[str, Callable]:
  """The same operations as timm's Block runs them in PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(0)
  rand = lambda *shape, grad=False: torch.randn(*shape, generator=gen).requires_grad_(grad)
  x, g = rand(b * t, d, grad=True), rand(b * t, d)
  hidden, hidden_g = rand(b * t, mlp, grad=True), rand(b * t, mlp)
  q, k, v = (rand(b, h, t, d // h, grad=True) for _ in range(3))
  qkv = rand(b, t, 3 * d, grad=True)
  ln_w, ln_b = rand(d, grad=True), rand(d, grad=True)
  w_d, w_fc1, w_fc2 = rand(d, d), rand(mlp, d), rand(d, mlp)  # torch weights are [out, in]
  xd, hd = x.detach(), hidden.detach()

  def backward(out, *leaves):
    for leaf in leaves:  # zero_grad(set_to_none=True), as every step does
      leaf.grad = None
    out.backward(torch.ones_like(out))
    return out

  def heads_major():  # timm: qkv.reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4), then back
    y = qkv.reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    out = (y[0] + y[1] + y[2]).transpose(1, 2).reshape(b * t, d)
    return backward(out, qkv)

  return {
      "attention core (fwd+bwd)": lambda: backward(F.scaled_dot_product_attention(q, k, v),
                                                   q, k, v),
      "heads-major layout copies (fwd+bwd)": heads_major,
      "LayerNorm x2 (fwd+bwd)": lambda: [backward(F.layer_norm(x, (d,), ln_w, ln_b, 1e-6),
                                                  x, ln_w, ln_b) for _ in range(2)],
      "GELU (fwd+bwd)": lambda: backward(F.gelu(hidden), hidden),
      "Linear forward matmuls": lambda: [xd @ w_d.t() for _ in range(4)]
                                        + [xd @ w_fc1.t(), hd @ w_fc2.t()],
      "Linear input-gradient matmuls": lambda: [g @ w_d for _ in range(4)]
                                               + [hidden_g @ w_fc1, g @ w_fc2],
      "Linear weight-gradient matmuls": lambda: [g.t() @ xd for _ in range(4)]
                                                + [hidden_g.t() @ xd, g.t() @ hd],
  }


def _adamw(m) -> Dict[str, Callable]:
  """AdamW over every parameter of `config.model` m: train.create_optimizer's update against
  torch.optim.AdamW (as main_pretrain.py builds it, on CPU: one tensor at a time)."""
  import torch  # pylint: disable=g-import-not-at-top
  config = config_lib.pretrain_config("vit_b")
  config.model = m
  model = models.from_config(m)
  params = model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                      jnp.zeros((1, m.img_size, m.img_size, m.in_chans)))["params"]
  tx = train.create_optimizer(config, lambda step: 1e-4)
  state = [params, tx.init(params)]
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update = jax.jit(update, donate_argnums=(0, 1))

  def jax_step():
    state[0], state[1] = update(state[0], state[1], grads)
    return state[0]

  tensors = [torch.nn.Parameter(torch.from_numpy(np.array(p)))
             for p in jax.tree.leaves(params)]
  decay = [p for p in tensors if p.ndim > 1]
  rest = [p for p in tensors if p.ndim <= 1]
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.05),
                           dict(params=rest, weight_decay=0.0)], lr=1e-4, betas=(0.9, 0.95))
  for p in tensors:
    p.grad = torch.full_like(p, 1e-3)

  def torch_step():
    opt.step()
    return tensors[0]

  return dict(jax=jax_step, torch=torch_step,
              params=sum(p.size for p in jax.tree.leaves(params)))


def main(argv: List[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--mask_ratio", type=float, default=0.75)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--model_overrides", type=json.loads, default=None,
                      help='Model fields to change, as JSON: \'{"depth": 2, "img_size": 32}\'')
  args = parser.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top

  m = config_lib.model_config("vit_b", **{"dtype": "float32", **(args.model_overrides or {})})
  patches = (m.img_size // m.patch_size) ** 2
  b = args.batch_size
  parts = [("encoder", 1 + num_kept(patches, args.mask_ratio), m.embed_dim, m.num_heads,
            m.depth),
           ("decoder", 1 + patches, m.decoder_embed_dim, m.decoder_num_heads, m.decoder_depth)]
  sides = {}
  for name, t, d, h, depth in parts:
    mlp = int(d * m.mlp_ratio)
    sides[name] = (depth, _jax_ops(b, t, d, h, mlp), _torch_ops(b, t, d, h, mlp))
  adamw = _adamw(m)
  jax_sync = jax.block_until_ready
  torch_sync = lambda out: out
  times = {}  # (op, side) -> per-round ms per step
  for _ in range(args.rounds):
    for part, (depth, jax_ops, torch_ops) in sides.items():
      for op in jax_ops:
        for side, fn, sync in (("mae_jax", jax_ops[op], jax_sync),
                               ("torch", torch_ops[op], torch_sync)):
          ms = 1e3 * depth * _time(fn, args.reps, sync)
          times.setdefault((op, side), {}).setdefault(part, []).append(ms)
    for side, sync in (("mae_jax", jax_sync), ("torch", torch_sync)):
      ms = 1e3 * _time(adamw["jax" if side == "mae_jax" else side], args.reps, sync)
      times.setdefault(("AdamW (all params)", side), {}).setdefault("all", []).append(ms)
  rows = []
  for op in dict.fromkeys(op for op, _ in times):
    ours = sum(statistics.median(v) for v in times[(op, "mae_jax")].values())
    theirs = sum(statistics.median(v) for v in times[(op, "torch")].values())
    rows.append(dict(op=op, mae_jax_ms=ours, torch_ms=theirs, diff_ms=ours - theirs))
  print(f"ViT {m.embed_dim}x{m.depth}/{m.patch_size} batch {b}, mask ratio {args.mask_ratio}, "
        f"float32; ms per train step (each op alone, fwd+bwd where the step has both); "
        f"median of {args.rounds} rounds; load {os.getloadavg()[0]:.1f}; "
        f"jax {jax.__version__}, torch {torch.__version__}")
  print("| operation | mae_jax ms | PyTorch ms | mae_jax - PyTorch |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['op']} | {r['mae_jax_ms']:.1f} | {r['torch_ms']:.1f} | {r['diff_ms']:+.1f} |")
  total = dict(mae_jax=sum(r["mae_jax_ms"] for r in rows),
               torch=sum(r["torch_ms"] for r in rows))
  print(f"| sum | {total['mae_jax']:.1f} | {total['torch']:.1f} | "
        f"{total['mae_jax'] - total['torch']:+.1f} |")
  print(json.dumps(dict(rows=rows, total=total, batch_size=b, mask_ratio=args.mask_ratio,
                        rounds=args.rounds, load_avg_1min=os.getloadavg()[0],
                        jax=jax.__version__, torch=torch.__version__,
                        threads=torch.get_num_threads())))


if __name__ == "__main__":
  main()
