"""Fine-tuning and linear probing: the steps, the schedule floor, resume, and a run end to end."""

import functools
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import checkpoint, config_lib, finetune, train
from mae_jax.models import from_config

TINY = dict(num_classes=10, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
            dtype="float32")


def _config(mode: str, **overrides) -> ml_collections.ConfigDict:
  if mode == "finetune":
    c = config_lib.finetune_config("vit_b")
    c.model = config_lib.classifier_model_config("vit_b", drop_path=0.1, **TINY)
  else:
    c = config_lib.linprobe_config("vit_b")
    c.model = config_lib.classifier_model_config("vit_b", global_pool=False,
                                                 head_batchnorm=True, head_init_std=0.01,
                                                 **TINY)
  c.input.dataset = "sklearn_digits"
  c.input.batch_size = 8
  c.input.num_workers = 0
  c.eval_batch_size = 120
  c.total_steps = 4
  c.warmup_steps = 1
  c.optimizer.lr = 1e-3
  c.log_every_steps = 2
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  c.update_from_flattened_dict(overrides)
  return c


# RandAugment and erasing have their own tests (test_augment.py); leaving them out here saves
# XLA compile time on CPU. Mixup/cutmix and drop path stay: they use the per-step keys.
LIGHT = {"augment.rand_augment": "", "augment.reprob": 0.0}


def _setup(config):
  model = finetune.create_model(config)
  lr = train.create_learning_rate_fn(config, steps_per_epoch=10)
  shapes = jax.eval_shape(functools.partial(finetune.init_state, model, finetune.optax.identity(),
                                            config.seed, config.mode)).params
  tx = finetune.create_optimizer(config, finetune.trainable(shapes, config.mode), lr)
  # Committed to the device like every later state (a step's output, a restored checkpoint), so
  # the step compiles once rather than once for uncommitted and once for committed arguments.
  state = jax.device_put(jax.jit(functools.partial(finetune.init_state, model, tx, config.seed,
                                                   config.mode))(), jax.devices()[0])
  step = jax.jit(functools.partial(finetune.train_step, model=model, tx=tx, learning_rate=lr,
                                   **finetune.step_options(config)))
  return model, tx, state, step


def _batch(mode, seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)
  images = pixels if mode == "finetune" else (pixels / 255.0 - 0.45) / 0.225
  return jnp.asarray(images), jnp.asarray(rng.integers(0, 10, 8), jnp.int32)


def test_schedule_ends_at_min_lr():
  c = _config("finetune", **{"optimizer.min_lr": 1e-6, "total_steps": 100, "warmup_steps": 10})
  lr = train.create_learning_rate_fn(c, steps_per_epoch=10)
  np.testing.assert_allclose([float(lr(s)) for s in (5, 10, 55, 100)],
                             [5e-4, 1e-3, 1e-6 + (1e-3 - 1e-6) / 2, 1e-6], rtol=1e-5)


def test_linear_probe_trains_only_the_head_and_its_batch_statistics():
  config = _config("linprobe", warmup_steps=0, warmup_epochs=0)  # lr > 0 at step 0
  _, _, state, step = _setup(config)
  before = jax.tree.map(np.asarray, state)
  state, metrics = step(state, *_batch("linprobe"))
  assert math.isfinite(float(metrics["loss"]))
  for name, value in before.params.items():
    changed = not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(value), jax.tree.leaves(state.params[name])))
    assert changed == (name == "head"), name
  assert not np.array_equal(before.batch_stats["head_norm"]["mean"],
                            state.batch_stats["head_norm"]["mean"])
  # Optimizer state (LARS momentum) exists for the head only.
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 32 * 10 + 10


def test_finetune_resumes_exactly_from_a_checkpoint(tmp_path):
  config = _config("finetune", **LIGHT)
  _, _, state, step = _setup(config)
  images, labels = _batch("finetune")
  straight = state
  for _ in range(3):
    straight, _ = step(straight, images, labels)
  manager = checkpoint.manager(str(tmp_path), keep=2)
  resumed, _ = step(state, images, labels)
  checkpoint.save(manager, resumed, config)
  manager.wait_until_finished()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        resumed)
  resumed = checkpoint.restore_latest(manager, target, config)
  manager.close()
  assert int(resumed.step) == 1
  for _ in range(2):
    resumed, _ = step(resumed, images, labels)
  # Augmentation and drop path are keyed by (seed, step): the same updates after the restart.
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)


def _pretraining_workdir(path) -> str:
  _pretrained_workdir(path)
  return str(path)


def _rows(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_finetune_end_to_end_from_a_pretraining_workdir(tmp_path, caplog):
  config = _config("finetune", init_from=_pretraining_workdir(tmp_path / "pretrain"), **LIGHT)
  workdir = str(tmp_path / "finetune")
  state = finetune.train_and_evaluate(config, workdir)
  assert int(state.step) == 4
  # The pretrained encoder went in: its first block's params are the workdir's.
  pretrained, _ = checkpoint.load_params(config.init_from)
  np.testing.assert_array_equal(
      checkpoint.load_params(workdir)[0]["embedding"]["kernel"].shape,
      pretrained["embedding"]["kernel"].shape)
  evals = [r for r in _rows(workdir) if "eval_top1" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:
    assert r["eval_examples"] == 360  # the whole test split, padding excluded
    assert 0 <= r["eval_top1"] <= r["eval_top5"] <= 100
  assert [r["step"] for r in _rows(workdir) if "loss" in r] == [2, 4]
  # As pretraining does, the run draws its curves at the end (loss, lr, eval top-1).
  with open(os.path.join(workdir, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Rerunning the command restores the final checkpoint and has nothing left to do, and says so.
  rows = _rows(workdir)
  with caplog.at_level(logging.INFO):
    again = finetune.train_and_evaluate(config, workdir)
  assert int(again.step) == 4 and _rows(workdir) == rows
  jax.tree.map(np.testing.assert_array_equal, again.params, state.params)
  assert "holds step 4, the last of this config's 4 steps: nothing left to train" in caplog.text
  # eval_only evaluates the restored params once more: the same numbers, logged as what it is.
  caplog.clear()
  config.eval_only = True
  with caplog.at_level(logging.INFO):
    finetune.train_and_evaluate(config, workdir)
  last = _rows(workdir)[-1]
  assert last["step"] == 4 and last["eval_top1"] == evals[-1]["eval_top1"]
  assert "eval_only: evaluating the params of step 4" in caplog.text
  assert "nothing left to train" not in caplog.text and "steps 4 -> 4" not in caplog.text
  # eval_only into a fresh workdir, the fine-tuned one as init_from (as with a converted
  # official classifier): the same numbers, and no empty checkpoints/ left behind that would
  # look like a run to resume.
  fresh = str(tmp_path / "evaluated")
  finetune.train_and_evaluate(_config("finetune", init_from=workdir, eval_only=True, **LIGHT),
                              fresh)
  assert _rows(fresh)[-1]["eval_top1"] == evals[-1]["eval_top1"]
  assert not os.path.exists(os.path.join(fresh, "checkpoints"))


# --- config.init_from ------------------------------------------------------------------------------

def _pretrained_workdir(path, **model):
  """A pretraining workdir (params/ + config.json) of a tiny MAE, `model` overriding TINY.

  Its params are random draws of the model's shapes: only shapes and values are checked, so
  nothing compiles the model's init here.
  """
  config = config_lib.pretrain_config("vit_b")
  fields = {k: v for k, v in TINY.items() if k != "num_classes"}
  config.model = config_lib.model_config("vit_b", decoder_embed_dim=16, decoder_depth=1,
                                         decoder_num_heads=2, **{**fields, **model})
  size = config.model.img_size
  shapes = jax.eval_shape(from_config(config.model).init,
                          {"params": jax.random.key(3), "mask": jax.random.key(4)},
                          jnp.zeros((1, size, size, 3)))["params"]
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
  checkpoint.save_params(str(path), params, config)
  return params


@functools.lru_cache(maxsize=None)
def _fresh_state(mode: str):
  """A fresh state of `mode`'s tiny classifier, built once: init_from and init_partial, all the
  starts below vary, do not enter init_state."""
  return _setup(_config(mode))[2]


def _start(config):
  state = _fresh_state(config.mode)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
  return finetune.start_params(config, state.params, target.params, state.batch_stats)


def test_init_from_of_another_model_is_an_error_listing_it_unless_a_partial_start(tmp_path):
  _pretrained_workdir(tmp_path / "p8", patch_size=8)  # another patch size: other shapes
  config = _config("finetune", init_from=str(tmp_path / "p8"))
  try:
    _start(config)
    raise AssertionError("a start from another patch size passed")
  except ValueError as e:
    assert f"config.init_from={str(tmp_path / 'p8')!r} does not fit config.model" in str(e)
    assert "embedding/kernel (8, 8, 3, 32) -> (4, 4, 3, 32) has another shape" in str(e)
    assert "init_partial=True" in str(e)
  params, _ = _start(_config("finetune", init_from=str(tmp_path / "p8"), init_partial=True))
  assert params["embedding"]["kernel"].shape == (4, 4, 3, 32)
  # A deeper encoder: its last blocks would be dropped without a word.
  _pretrained_workdir(tmp_path / "d3", depth=3)
  try:
    _start(_config("finetune", init_from=str(tmp_path / "d3")))
    raise AssertionError("a start from a deeper encoder passed")
  except ValueError as e:
    assert ("Transformer/encoderblock_1, Transformer/encoderblock_2 in the checkpoint have no "
            "place in this model") in str(e)
    assert "init_partial=True" in str(e)
  _start(_config("finetune", init_from=str(tmp_path / "d3"), init_partial=True))
  # A classifier fine-tuned for another number of classes: its head starts fresh, as the
  # official main_finetune.py drops a head of another shape; the rest is loaded and checked.
  state = _fresh_state("finetune")
  classes7 = jax.device_get(state.params)
  classes7 = {**classes7, "head": {"kernel": np.ones((32, 7), np.float32),
                                   "bias": np.ones((7,), np.float32)}}
  checkpoint.save_params(str(tmp_path / "c7"), classes7,
                         _config("finetune", **{"model.num_classes": 7}))
  params, _ = _start(_config("finetune", init_from=str(tmp_path / "c7")))
  assert params["head"]["kernel"].shape == (32, 10)
  np.testing.assert_array_equal(params["head"]["kernel"], state.params["head"]["kernel"])
  np.testing.assert_array_equal(params["cls"], classes7["cls"])
  # Evaluating only is evaluating a trained head: a fresh one would score chance, silently.
  checkpoint.save_params(str(tmp_path / "c10"), jax.device_get(state.params), _config("finetune"))
  _start(_config("finetune", init_from=str(tmp_path / "c10"), eval_only=True))
  for source, what in (("", "config.init_from is empty"), (str(tmp_path / "c7"), "7 classes"),
                       (str(tmp_path / "d3"), "has no head")):
    try:
      _start(_config("finetune", init_from=source, eval_only=True, init_partial=True))
      raise AssertionError(f"eval_only from {source!r} passed")
    except ValueError as e:
      assert "config.eval_only=True" in str(e) and what in str(e), str(e)
  # ... and the head as it was trained: a probe's head (cls token, BatchNorm) evaluated in a
  # fine-tuning model (pooled tokens, fresh fc_norm, no BatchNorm) scores a wrong number.
  stats = {"head_norm": {"mean": np.full((32,), 0.5, np.float32),
                         "var": np.full((32,), 2.0, np.float32)}}
  probe_state = _fresh_state("linprobe")
  checkpoint.save_params(str(tmp_path / "probe"), jax.device_get(probe_state.params),
                         _config("linprobe"), batch_stats=stats)
  checkpoint.save_params(str(tmp_path / "bn"), jax.device_get(state.params), _config("finetune"),
                         batch_stats=stats)
  for source, what in (("probe", "fc_norm"), ("bn", "BatchNorm")):
    try:
      _start(_config("finetune", init_from=str(tmp_path / source), eval_only=True))
      raise AssertionError(f"eval_only from {source} passed")
    except ValueError as e:
      assert "config.eval_only=True" in str(e) and what in str(e), str(e)
  _start(_config("linprobe", init_from=str(tmp_path / "probe"), eval_only=True))
  # Other heads: no shape shows them, the saved config does.
  _pretrained_workdir(tmp_path / "h4", num_heads=4)
  try:
    _start(_config("finetune", init_from=str(tmp_path / "h4")))
    raise AssertionError("a start from other attention heads passed")
  except ValueError as e:
    assert "config.model.num_heads=2, but the params in" in str(e)
    assert "were trained with 4" in str(e)


def test_an_exported_npz_and_a_probe_with_its_statistics_serve_as_init_from(tmp_path):
  from mae_jax import export  # pylint: disable=g-import-not-at-top
  pretrained = _pretrained_workdir(tmp_path / "pre")
  export.export_workdir(str(tmp_path / "pre"), str(tmp_path / "encoder.npz"))
  params, _ = _start(_config("finetune", init_from=str(tmp_path / "encoder.npz")))
  for name in ("embedding", "cls", "Transformer"):
    if name != "Transformer":
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(params[name]),
                   pretrained[name])
  np.testing.assert_array_equal(
      params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"],
      pretrained["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"])
  # A converted linear probe: its head comes with its BatchNorm statistics.
  probe = _config("linprobe")
  state = _fresh_state("linprobe")
  stats = {"head_norm": {"mean": np.full((32,), 0.5, np.float32),
                         "var": np.full((32,), 2.0, np.float32)}}
  checkpoint.save_params(str(tmp_path / "probe"), jax.device_get(state.params), probe,
                         batch_stats=stats)
  _, batch_stats = _start(_config("linprobe", init_from=str(tmp_path / "probe")))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(batch_stats), stats)
