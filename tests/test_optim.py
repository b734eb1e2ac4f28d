"""Layer-wise lr decay AdamW and LARS against hand computations of the official semantics."""

import jax
import numpy as np
import optax

from mae_jax import optim
from mae_jax.models import unrolled_to_scan, scan_to_unrolled


def _tree(rng):
  def a(*shape):
    return rng.normal(size=shape).astype(np.float32)

  block = lambda: {"LayerNorm_0": {"scale": a(4), "bias": a(4)},
                   "MlpBlock_0": {"Dense_0": {"kernel": a(4, 6), "bias": a(6)}}}
  return {"embedding": {"kernel": a(2, 2, 3, 4), "bias": a(4)}, "cls": a(1, 1, 4),
          "pos_embedding": a(1, 5, 4),
          "Transformer": {"encoderblock_0": block(), "encoderblock_1": block()},
          "fc_norm": {"scale": a(4), "bias": a(4)}, "head": {"kernel": a(4, 3), "bias": a(3)}}


def _path_items(tree):
  return {"/".join(getattr(k, "key", str(k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_layer_ids_scales_and_decay_mask_follow_param_groups_lrd():
  params = _tree(np.random.default_rng(0))
  ids = _path_items(optim.layer_ids(params, depth=2))
  assert ids["embedding/kernel"] == ids["embedding/bias"] == ids["cls"] == 0
  assert ids["pos_embedding"] == 0
  assert ids["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] == 1
  assert ids["Transformer/encoderblock_1/LayerNorm_0/scale"] == 2
  assert ids["fc_norm/scale"] == ids["head/kernel"] == 3
  scales = _path_items(optim.layer_decay_scales(params, depth=2, layer_decay=0.5))
  assert scales["cls"] == 0.125 and scales["Transformer/encoderblock_0/LayerNorm_0/bias"] == 0.25
  assert scales["Transformer/encoderblock_1/LayerNorm_0/bias"] == 0.5
  assert scales["head/bias"] == 1.0
  # param_groups_lrd: no decay on 1-D params and the model's no_weight_decay() tokens.
  decayed = {k for k, v in _path_items(optim.weight_decay_mask(
      params, no_decay=("cls", "pos_embedding"))).items() if v}
  assert decayed == {"embedding/kernel", "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel",
                     "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel", "head/kernel"}


def test_adamw_layer_decay_two_steps_by_hand():
  rng = np.random.default_rng(1)
  params = _tree(rng)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(2)]
  lrs = [0.1, 0.05]
  b1, b2, eps, wd, decay = 0.9, 0.999, 1e-8, 0.05, 0.5
  tx = optim.adamw_layer_decay(lambda count: np.asarray(lrs)[count], params, depth=2,
                               layer_decay=decay, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  state = tx.init(params)
  p = params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)

  scales = _path_items(optim.layer_decay_scales(params, 2, decay))
  mask = _path_items(optim.weight_decay_mask(params, no_decay=("cls", "pos_embedding")))
  expected = {}
  for name, p0 in _path_items(params).items():
    m = v = 0.0
    x = p0.astype(np.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
      gt = _path_items(g)[name]
      m = b1 * m + (1 - b1) * gt
      v = b2 * v + (1 - b2) * gt**2
      # torch.optim.AdamW with the group lr = lr * lr_scale, decoupled decay on the group.
      group_lr = lr * scales[name]
      x = x * (1 - group_lr * wd * mask[name])
      x = x - group_lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    expected[name] = x
  for name, value in _path_items(p).items():
    np.testing.assert_allclose(value, expected[name], rtol=2e-5, atol=1e-6, err_msg=name)


def test_adamw_layer_decay_on_scanned_params_matches_unrolled():
  rng = np.random.default_rng(2)
  params = _tree(rng)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  scanned = unrolled_to_scan(params)
  kwargs = dict(depth=2, layer_decay=0.65, weight_decay=0.05)
  tx, tx_scan = (optim.adamw_layer_decay(1e-2, p, **kwargs) for p in (params, scanned))
  updates, _ = tx.update(grads, tx.init(params), params)
  scan_updates, _ = tx_scan.update(unrolled_to_scan(grads), tx_scan.init(scanned), scanned)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates,
               scan_to_unrolled(scan_updates))


def test_lars_two_steps_by_hand():
  rng = np.random.default_rng(3)
  params = {"head": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                     "bias": rng.normal(size=(2,)).astype(np.float32)},
            "zero": np.zeros((2, 2), np.float32)}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(2)]
  lrs, wd, momentum, trust = [0.5, 0.25], 0.1, 0.9, 0.001
  tx = optim.lars(lambda count: np.asarray(lrs)[count], weight_decay=wd, momentum=momentum,
                  trust_coefficient=trust)
  state = tx.init(params)
  p = params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)

  for name, p0 in _path_items(params).items():
    x, mu = p0.astype(np.float64), 0.0
    for g, lr in zip(grads, lrs):
      dp = _path_items(g)[name].astype(np.float64)
      if x.ndim > 1:
        dp = dp + wd * x
        pn, un = np.linalg.norm(x), np.linalg.norm(dp)
        dp = dp * (trust * pn / un if pn > 0 and un > 0 else 1.0)
      mu = momentum * mu + dp
      x = x - lr * mu
    np.testing.assert_allclose(_path_items(p)[name], x, rtol=1e-5, atol=1e-7, err_msg=name)
  # The zero matrix took plain momentum SGD steps (trust ratio 1), the bias no decay.
  assert np.abs(_path_items(p)["zero"]).max() > 0.1
