"""The pieces of mae_jax.train: schedule, weight-decay groups, config checks, the step itself."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mae_jax import config_lib
from mae_jax import models
from mae_jax import optim
from mae_jax import train

TINY_MODEL = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, dtype="float32")


def _config(**overrides) -> ml_collections.ConfigDict:
  c = config_lib.pretrain_config("vit_b")
  c.model = config_lib.model_config("vit_b", **TINY_MODEL)
  c.input.batch_size = 8
  c.total_steps = 100
  c.warmup_steps = 10
  c.update_from_flattened_dict(overrides)  # dotted keys, as on the command line
  return c


# --- learning rate ----------------------------------------------------------------------------

def test_learning_rate_is_linear_warmup_then_half_cosine_with_blr_scaling():
  # blr 1.5e-4 at batch 4096 -> 2.4e-3; 40 warmup epochs of 10 steps, 800 epochs.
  c = _config(**{"input.batch_size": 4096, "total_steps": 0, "warmup_steps": 0})
  lr = train.create_learning_rate_fn(c, steps_per_epoch=10)
  peak = 1.5e-4 * 4096 / 256
  assert math.isclose(peak, 2.4e-3)
  total, warmup = 8000, 400
  for step, expected in [(0, 0.0), (1, peak / warmup), (200, peak / 2), (399, peak * 399 / 400),
                         (warmup, peak),
                         (warmup + (total - warmup) // 2, peak / 2),
                         (warmup + (total - warmup) // 4, peak * 0.5 * (1 + math.cos(math.pi / 4))),
                         (total, 0.0), (total + 50, 0.0)]:
    # optax's schedule computes in float32: a few ulps from the exact curve.
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-5, atol=1e-12,
                               err_msg=f"step {step}")


def test_explicit_lr_and_warmup_steps_override_blr_and_warmup_epochs():
  c = _config(**{"optimizer.lr": 1e-3, "warmup_steps": 20, "total_steps": 300})
  lr = train.create_learning_rate_fn(c, steps_per_epoch=7)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 10, 20, 160, 300)],
                             [0.0, 5e-4, 1e-3, 5e-4, 0.0], rtol=1e-5, atol=1e-12)


def test_warmup_longer_than_training_is_refused_naming_the_fields():
  with pytest.raises(ValueError, match="warmup_steps.*total_steps"):
    train.create_learning_rate_fn(_config(warmup_steps=100, total_steps=100), 10)


# --- optimizer ----------------------------------------------------------------------------------

def _tiny_params(**model_overrides):
  model = models.from_config(config_lib.model_config("vit_b", **{**TINY_MODEL,
                                                                  **model_overrides}))
  images = jnp.zeros((1, 16, 16, 3))
  return jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "mask": jax.random.key(1)}, images)["params"])


def _decayed(params, **kwargs):
  mask = optim.weight_decay_mask(params, **kwargs)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  return flat, sorted(k for k, v in flat.items() if v)


@pytest.mark.parametrize("scan", [False, True])
def test_official_weight_decay_groups_are_timms_add_weight_decay(scan):
  """main_pretrain.py's groups: no decay on 1-D params and biases, every other param decayed,
  the [1, 1, D] cls and mask tokens included; the same with scanned (stacked) blocks."""
  params = _tiny_params(scan=scan)
  flat, decayed = _decayed(params)
  kernels = [k for k in flat if k.endswith("['kernel']")]
  assert decayed == sorted(kernels + ["['cls']", "['mask_token']"])
  for name in ("['embedding']['bias']", "['Transformer']['encoder_norm']['scale']",
               "['Decoder']['decoder_norm']['bias']"):
    assert flat[name] is False, name
  for prefix, block in (("Transformer", "encoderblock"), ("Decoder", "decoderblock")):
    block = block if scan else block + "_0"
    assert flat[f"['{prefix}']['{block}']['LayerNorm_0']['scale']"] is False
    assert flat[f"['{prefix}']['{block}']['MlpBlock_0']['Dense_0']['bias']"] is False
    assert flat[f"['{prefix}']['{block}']['MlpBlock_0']['Dense_0']['kernel']"] is True


@pytest.mark.parametrize("scan", [False, True])
def test_kernels_weight_decay_groups_decay_weight_matrices_only(scan):
  params = _tiny_params(scan=scan)
  flat, decayed = _decayed(params, groups="kernels")
  assert decayed == sorted(k for k in flat if k.endswith("['kernel']"))
  assert "['embedding']['kernel']" in decayed and "['decoder_pred']['kernel']" in decayed
  assert flat["['cls']"] is False and flat["['mask_token']"] is False


@pytest.mark.parametrize("groups,cls_decayed", [("official", True), ("kernels", False)])
def test_create_optimizer_decays_the_configured_groups(groups, cls_decayed):
  c = _config(**{"optimizer.weight_decay": 0.5, "optimizer.weight_decay_groups": groups})
  tx = train.create_optimizer(c, lambda step: 0.1)
  params = {"cls": jnp.full((1, 1, 4), 2.0), "dense": {"kernel": jnp.full((4, 4), 2.0),
                                                       "bias": jnp.full((4,), 2.0)}}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  # First AdamW step: -lr * (1 + wd * p) where decayed, -lr elsewhere.
  np.testing.assert_allclose(updates["cls"], -0.1 * (2.0 if cls_decayed else 1.0), rtol=1e-6)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.2, rtol=1e-6)
  np.testing.assert_allclose(updates["dense"]["bias"], -0.1, rtol=1e-6)


def test_unknown_weight_decay_groups_are_refused():
  with pytest.raises(ValueError, match="weight-decay groups 'all'"):
    optim.weight_decay_mask({"w": jnp.ones((2, 2))}, groups="all")


def test_adamw_matches_torch_semantics_b2_and_decoupled_masked_decay():
  c = _config(**{"optimizer.lr": 0.1, "optimizer.weight_decay": 0.5})
  tx = train.create_optimizer(c, lambda step: 0.1)
  params = {"dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # First AdamW step: m/(sqrt(v)+eps) = 1 (bias-corrected), so the update is -lr * (1 + wd * p)
  # on the kernel and -lr on the bias.
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * (1 + 0.5 * 2.0), rtol=1e-6)
  np.testing.assert_allclose(updates["dense"]["bias"], -0.1, rtol=1e-6)
  adam = tx.init(params)[0]
  assert isinstance(adam, optax.ScaleByAdamState)
  # b2 = 0.95: second moment after one step of g = 1 is 1 - 0.95.
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(state[0].nu["dense"]["bias"], 0.05, rtol=1e-6)


# --- config checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,devices,field", [
    ({"model.patch_size": 5}, 1, "config.model.patch_size=5"),
    ({"model.mask_ratio": 1.0}, 1, "config.model.mask_ratio=1.0"),
    ({"model.mask_ratio": -0.1}, 1, "config.model.mask_ratio=-0.1"),
    ({"input.batch_size": 12}, 8, "config.input.batch_size=12"),
    ({"input.batch_size": 8, "optimizer.grad_accum_steps": 2}, 8, "grad_accum_steps=2"),
    ({"input.batch_size": 0}, 1, "config.input.batch_size=0"),
    ({"mesh.fsdp": 3}, 8, "config.mesh.fsdp=3"),
    ({"mesh.data": 2, "mesh.fsdp": 2}, 8, "config.mesh.data=2"),
    ({"model.num_heads": 3}, 1, "config.model.num_heads=3"),
    ({"model.dtype": "bf16"}, 1, "config.model.dtype='bf16'"),
    ({"optimizer.b2": 1.0}, 1, "config.optimizer.b2=1.0"),
    ({"optimizer.weight_decay_groups": "all"}, 1, "config.optimizer.weight_decay_groups='all'"),
])
def test_wrong_config_is_refused_naming_the_field(overrides, devices, field):
  with pytest.raises(ValueError) as e:
    train.validate_config(_config(**overrides), device_count=devices, process_count=1)
  assert field in str(e.value)


def test_batch_must_split_over_processes():
  with pytest.raises(ValueError, match="batch_size=8 is not divisible by the 3 processes"):
    train.validate_config(_config(), device_count=1, process_count=3)


def test_good_configs_pass():
  for name in ("vit_b", "vit_l", "vit_h"):
    train.validate_config(config_lib.pretrain_config(name), device_count=8, process_count=2)
  train.validate_config(_config(**{"mesh.fsdp": 4}), device_count=8, process_count=1)


# --- the step -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
  """A fresh train state and the jitted step at grad_accum_steps 1 and 4 (compiled once)."""
  config = _config(**{"optimizer.lr": 3e-3, "warmup_steps": 1})
  mesh = jax.make_mesh((1, 1), train.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = models.from_config(config.model)
  lr = train.create_learning_rate_fn(config, steps_per_epoch=10)
  tx = train.create_optimizer(config, lr)
  abstract = train.abstract_train_state(model, tx, config.seed, mesh)
  state = train.create_train_state(model, tx, config.seed, abstract)
  steps = {}
  for accum in (1, 4):
    config.optimizer.grad_accum_steps = accum
    steps[accum] = train.jit_train_step(config, model, tx, lr, abstract, mesh)
  config.optimizer.grad_accum_steps = 1
  for guard in ("cond", "select"):
    config.nonfinite_guard = guard
    steps[guard] = train.jit_train_step(config, model, tx, lr, abstract, mesh)
  # Each use gets a copy: the step donates its input state.
  return lambda: jax.tree.map(jnp.copy, state), steps


def _images(n=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 16, 16, 3)), jnp.float32)


def test_train_step_learns_and_reports_metrics(tiny):
  fresh, steps = tiny
  state, images, losses = fresh(), _images(), []
  for _ in range(30):
    state, metrics = steps[1](state, images)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 30
  assert float(metrics["grad_norm"]) > 0 and float(metrics["lr"]) > 0
  assert losses[-1] < 0.8 * losses[1], losses


def test_gradient_accumulation_equals_the_full_batch_update(tiny):
  fresh, steps = tiny
  results = []
  for accum in (1, 4):
    state = fresh()
    for _ in range(2):
      state, metrics = steps[accum](state, _images())
    results.append((metrics, state.params))
  (m1, p1), (m4, p4) = results
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p4)):
    name = jax.tree_util.keystr(path)
    # The key bias's true gradient is 0 (softmax ignores a shift shared by all keys); Adam
    # scales the rounding noise there up to about lr, so it proves nothing either way.
    if not name.endswith("['key']['bias']"):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_nonfinite_guard_setting_picks_the_branch_and_changes_no_number(tiny):
  fresh, steps = tiny
  text = {g: steps[g].lower(fresh(), _images()).as_text() for g in ("cond", "select")}
  assert "stablehlo.case" in text["cond"] and "stablehlo.case" not in text["select"]
  results = {}
  for guard in ("cond", "select"):
    state = fresh()
    # float32, not a weakly typed full(): another argument type would compile the step again.
    for batch in (_images(), jnp.full((8, 16, 16, 3), jnp.nan, jnp.float32), _images(seed=1)):
      state, metrics = steps[guard](state, batch)
    results[guard] = (state, metrics)
  (a, ma), (b, mb) = results["cond"], results["select"]
  assert int(a.step) == int(b.step) == 3 and float(ma["nonfinite"]) == 0.0
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_masking_noise_is_per_example_and_a_function_of_seed_and_step():
  rng = jax.random.key_data(jax.random.key(0))
  a = train.masking_noise(rng, jnp.int32(3), 4, 16)
  np.testing.assert_array_equal(a, train.masking_noise(rng, jnp.int32(3), 4, 16))
  assert not np.array_equal(a, train.masking_noise(rng, jnp.int32(4), 4, 16))
  # Each example its own permutation.
  orders = {tuple(np.argsort(np.asarray(row))) for row in a}
  assert len(orders) == 4


def test_fsdp_sharding_picks_the_largest_divisible_axis():
  mesh = jax.make_mesh((1, 1), train.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert train.fsdp_sharding(mesh, (64, 128)).spec == jax.sharding.PartitionSpec(None, None)
  # With a 4-wide fsdp axis (abstract mesh: no devices needed).
  abstract = jax.sharding.AbstractMesh((2, 4), train.MESH_AXES,
                                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = lambda shape: train.fsdp_sharding(abstract, shape).spec
  assert spec((64, 128)) == jax.sharding.PartitionSpec(None, "fsdp")
  assert spec((128, 6)) == jax.sharding.PartitionSpec("fsdp", None)
  assert spec((6, 3)) == jax.sharding.PartitionSpec(None, None)
  assert spec(()) == jax.sharding.PartitionSpec()


def test_fsdp_keeps_arrays_up_to_the_minimum_size_replicated():
  abstract = jax.sharding.AbstractMesh((2, 4), train.MESH_AXES,
                                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  min_bytes = train.fsdp_min_bytes(_config())
  assert min_bytes == 4 * 2**20  # big_vision's default
  spec = lambda shape, dtype=jnp.float32: train.fsdp_sharding(
      abstract, shape, dtype, min_bytes=min_bytes).spec
  assert spec((1024, 1024)) == jax.sharding.PartitionSpec(None, None)  # exactly 4 MiB
  assert spec((1024, 1025 * 4)) == jax.sharding.PartitionSpec(None, "fsdp")
  assert spec((2048, 1024), jnp.bfloat16) == jax.sharding.PartitionSpec(None, None)
  assert spec((5120,)) == jax.sharding.PartitionSpec(None)  # a ViT-H bias
  # ViT-H/14's state: its matrices sharded, every bias and LayerNorm scale replicated.
  config = config_lib.pretrain_config("vit_h")
  model = models.from_config(config.model)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 1000))
  state = train.abstract_train_state(model, tx, 0, abstract, fsdp_min_bytes=min_bytes)
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  sharded = {jax.tree_util.keystr(p) for p, x in leaves if "fsdp" in x.sharding.spec}
  assert all("kernel" in p for p in sharded)
  assert any("encoderblock" in p or "Transformer" in p for p in sharded)
  assert len(sharded) < len(leaves) / 2


def test_importing_train_does_not_import_tensorflow():
  code = ("import sys, mae_jax.models, mae_jax.train, mae_jax.main, mae_jax.visualize; "
          "assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow'], 'tf'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_bf16_compute_keeps_float32_params_and_optimizer_state():
  config = _config(**{"model.dtype": "bfloat16"})
  mesh = jax.make_mesh((1, 1), train.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = models.from_config(config.model)
  lr = train.create_learning_rate_fn(config, steps_per_epoch=10)
  tx = train.create_optimizer(config, lr)
  abstract = train.abstract_train_state(model, tx, config.seed, mesh)
  step = train.jit_train_step(config, model, tx, lr, abstract, mesh)
  images = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
  new_state, metrics = jax.eval_shape(step, abstract, images)
  dtypes = {x.dtype for x in jax.tree.leaves((new_state.params, new_state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32
  # The matmuls themselves run in bfloat16 (lowering only; nothing is compiled).
  hlo = step.lower(abstract, images).as_text()
  assert "bf16" in hlo and "dot_general" in hlo


@pytest.mark.parametrize("branch", [True, False], ids=["cond", "select"])
def test_update_if_finite_updates_or_keeps_everything(branch):
  """Both ways (lax.cond on CPU, a select on accelerators) give optax's own update when the loss
  and gradient are finite, and the old params, optimizer state and extra state otherwise."""
  tx = optax.adamw(0.1, weight_decay=0.05)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda x: 0.5 * x + 1.0, params)
  stats, new_stats = {"mean": jnp.zeros(3)}, {"mean": jnp.ones(3)}
  fn = jax.jit(lambda loss, grads: train.update_if_finite(
      tx, loss, grads, opt_state, params, stats, new_stats, branch=branch))
  updates, want_opt = tx.update(grads, opt_state, params)
  want = optax.apply_updates(params, updates)
  got, got_opt, got_stats, norm, finite = fn(jnp.float32(1.0), grads)
  assert bool(finite)
  np.testing.assert_allclose(float(norm), float(optax.tree.norm(grads)), rtol=1e-6)
  # (one float32 ulp apart at most: XLA may fuse the update's arithmetic differently)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-7, atol=0),
               (got, got_opt, got_stats), (want, want_opt, new_stats))
  inf_grads = {**grads, "b": grads["b"].at[0].set(np.inf)}
  for loss, bad in ((jnp.float32(np.nan), grads), (jnp.float32(1.0), inf_grads)):
    got, got_opt, got_stats, _, finite = fn(loss, bad)
    assert not bool(finite)
    jax.tree.map(np.testing.assert_array_equal, (got, got_opt, got_stats),
                 (params, opt_state, stats))


def test_continued_pretraining_of_a_decoder_trained_for_the_other_target_warns(tmp_path,
                                                                               caplog):
  """A converted full checkpoint (WORKDIR/params) whose decoder predicts normalized patches,
  pretrained on with norm_pix_loss=False: the target switches, which once happened silently."""
  import logging  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  saved = _config(**{"model.norm_pix_loss": True})
  model = models.from_config(saved.model)
  mesh = jax.make_mesh((1, 1), train.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  tx = train.create_optimizer(saved, 1e-3)
  abstract = train.abstract_train_state(model, tx, saved.seed, mesh)
  fresh = train.create_train_state(model, tx, saved.seed, abstract).params
  checkpoint.save_params(str(tmp_path), fresh, saved)
  for norm_pix_loss, warned in ((True, False), (False, True)):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      params = train._start_params(_config(**{"model.norm_pix_loss": norm_pix_loss}),  # pylint: disable=protected-access
                                   str(tmp_path), fresh, abstract.params)
    assert ("trained to predict normalized patches (norm_pix_loss=True); with "
            "config.model.norm_pix_loss=False continued pretraining switches it to pixels"
            in caplog.text) == warned
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(fresh))
