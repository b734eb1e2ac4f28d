"""The kNN monitor and feature extraction: DINO's weighted kNN exactly, the monitor on a tiny
model (in range, rows written, a subset of train), pretraining writing its rows on 4 devices
with the figures of 1 device, and `python -m mae_jax.extract` on that workdir and on a
fine-tuning one."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mae_jax import checkpoint
from mae_jax import config_checks
from mae_jax import config_lib
from mae_jax import input_pipeline
from mae_jax import models
from mae_jax import monitor
from mae_jax import train
from mae_jax import writers
import workdir_tools

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, dtype="float32")


def _loop_knn(train, labels, test, num_classes, k, temperature):
  """DINO's rule written out example by example, in float64."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  scores = np.zeros((len(test), num_classes))
  for i, x in enumerate(test):
    similarity = train @ x
    for j in np.argsort(-similarity, kind="stable")[:k]:
      scores[i, labels[j]] += np.exp(similarity[j] / temperature)
  return scores


def test_knn_votes_of_a_hand_worked_example():
  train = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
  labels = jnp.asarray([0, 1, 1, 0])
  test = jnp.asarray([[2.0, 0.0]])
  # cosines with the test point: 1, 0, 1/sqrt(2), -1; the k=2 nearest are rows 0 and 2.
  scores = monitor.knn_votes(train, labels, test, num_classes=3, k=2, temperature=0.5)
  np.testing.assert_allclose(scores, [[np.exp(2.0), np.exp(np.sqrt(0.5) / 0.5), 0.0]],
                             rtol=1e-6)
  # Row 0 as padding: the neighbours become rows 2 and 1.
  scores = monitor.knn_votes(train, labels, test, num_classes=3, k=2, temperature=0.5,
                             train_valid=jnp.asarray([False, True, True, True]))
  np.testing.assert_allclose(scores, [[0.0, np.exp(np.sqrt(0.5) / 0.5) + 1.0, 0.0]], rtol=1e-6)


def test_knn_votes_and_hits_match_the_rule_written_out():
  rng = np.random.default_rng(0)
  train, test = rng.normal(size=(50, 8)), rng.normal(size=(12, 8))
  labels, test_labels = rng.integers(0, 4, 50), rng.integers(0, 4, 12)
  expected = _loop_knn(train, labels, test, 4, k=20, temperature=0.07)
  scores = monitor.knn_votes(jnp.asarray(train, jnp.float32), jnp.asarray(labels),
                             jnp.asarray(test, jnp.float32), num_classes=4)
  np.testing.assert_allclose(scores, expected, rtol=2e-4)
  # k larger than the bank: every train example votes.
  everyone = monitor.knn_votes(jnp.asarray(train), jnp.asarray(labels), jnp.asarray(test),
                               num_classes=4, k=80, temperature=1.0)
  np.testing.assert_allclose(everyone, _loop_knn(train, labels, test, 4, 50, 1.0), rtol=1e-5)
  # Hits: padded test rows do not count, padded train rows never vote.
  test_valid = np.arange(12) < 10
  train_valid = np.arange(50) < 45
  hits, count = monitor.knn_hits(jnp.asarray(train), jnp.asarray(labels),
                                 jnp.asarray(train_valid), jnp.asarray(test),
                                 jnp.asarray(test_labels), jnp.asarray(test_valid),
                                 num_classes=4, k=20, temperature=0.07)
  reference = _loop_knn(train[:45], labels[:45], test[:10], 4, 20, 0.07).argmax(1)
  assert (float(hits), float(count)) == (float(np.sum(reference == test_labels[:10])), 10.0)


def _digits_config(**monitor_fields) -> ml_collections.ConfigDict:
  c = config_lib.pretrain_config("vit_b")
  c.model = config_lib.model_config("vit_b", **TINY_MODEL)
  c.input.dataset = "sklearn_digits"
  c.input.num_workers = 0
  c.monitor.every_steps = 2
  c.monitor.train_examples = 0
  c.monitor.batch_size = 128
  c.monitor.update(monitor_fields)
  return c


def _random_params(model):
  return model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                    jnp.zeros((1, model.img_size, model.img_size, 3)))["params"]


def test_monitor_on_a_tiny_model_writes_a_row_in_range(tmp_path):
  config = _digits_config(train_examples=100)
  model = models.from_config(config.model)
  mesh = train.make_mesh(config)
  knn = monitor.create(config, model, mesh, train.BATCH_AXES)
  assert [knn.due(s, 9) for s in (0, 1, 2, 3, 9)] == [True, False, True, False, True]
  writer = writers.MetricWriter(str(tmp_path))
  row = knn.write(6, _random_params(model), writer)
  writer.close()
  assert 0.0 <= row["knn_top1"] <= 100.0
  # 100 random train digits (the subset) as neighbours, all 360 test digits classified.
  assert (row["knn_train"], row["knn_eval"]) == (100, 360)
  assert writers.read_metrics(str(tmp_path)) == [{"step": 6, **row}]
  # A random encoder's features of digits already beat chance (10%) by far.
  assert row["knn_top1"] > 30.0


def test_monitor_is_off_by_default_and_its_config_is_checked():
  config = config_lib.pretrain_config("vit_b")
  assert config.monitor.every_steps == 0
  assert monitor.create(config, None, None, ()) is None
  config = _digits_config(batch_size=100, k=0, temperature=0.0, feature="max",
                          train_examples=-1)
  errors = "\n".join(config_checks.monitor_problems(config, device_count=8, process_count=2))
  for field in ("batch_size=100", "k=0", "temperature=0.0", "feature='max'",
                "train_examples=-1"):
    assert f"config.monitor.{field}" in errors
  with pytest.raises(ValueError, match="config.monitor.batch_size=100"):
    train.validate_config(config, device_count=8, process_count=2)


def test_unlabeled_monitor_dataset_stops_before_training():
  config = _digits_config(dataset="skimage_photos")
  with pytest.raises(ValueError, match="has no labels"):
    monitor.create(config, models.from_config(config.model), train.make_mesh(config),
                   train.BATCH_AXES)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return workdir_tools.subprocess_env(tmp_path_factory.mktemp("jax_cache"))


def _runs(arg_lists, env):
  """Runs `python -m ARGS` for each list of args, side by side; their stdouts."""
  processes = [subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for args in arg_lists]
  outputs = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    outputs.append(stdout)
  return outputs


def _run(args, env):
  return _runs([args], env)[0]


def _labels(split):
  c = config_lib.pretrain_config("vit_b").input
  c.dataset = "sklearn_digits"
  source = input_pipeline.open_source(c, split)
  return np.asarray([source.read(i)[1] for i in range(len(source))])


def test_pretraining_rows_on_4_devices_equal_1_device_and_extract_agrees(tmp_path, env):
  workdir = tmp_path / "pretrain"
  overrides = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()]
  _run(["mae_jax.main", f"--config={REPO}/configs/demo_digits.py", f"--workdir={workdir}",
        "--num_cpu_devices=4", "--config.total_steps=5", "--config.warmup_steps=1",
        "--config.log_every_steps=5", "--config.checkpoint_every_steps=5",
        "--config.reconstruction_every_steps=0", "--config.monitor.every_steps=2",
        "--config.monitor.batch_size=128", "--config.input.batch_size=16", *overrides], env)
  all_rows = workdir_tools.rows(workdir)
  rows = [r for r in all_rows if "knn_top1" in r]
  assert [r["step"] for r in rows] == [0, 2, 4, 5]  # the start, every 2 steps, the end
  # Each training row says where the time went; curves.png is drawn at the end.
  training = [r for r in all_rows if "loss" in r]
  assert training and all(0.0 <= r["input_wait"] <= 1.0 and 0.1 < r["peak_memory_gb"] < 64
                          for r in training)
  assert (workdir / "curves.png").stat().st_size > 10_000
  assert all(0 <= r["knn_top1"] <= 100 and r["knn_eval"] == 360 and r["knn_train"] == 1437
             for r in rows)
  # The figure of the last params, recomputed here on one device, is the same.
  params, config = checkpoint.load_params(str(workdir))
  model = models.from_config(config.model)
  one = monitor.KnnMonitor(config, model, train.make_mesh(config), train.BATCH_AXES)
  assert jax.device_count() == 1
  assert one(params)["knn_top1"] == rows[-1]["knn_top1"]

  # extract on 2 devices: the split's labels in order, and an independent kNN on its features
  # gives the monitor's last figure. The two splits are extracted side by side.
  files = {split: tmp_path / f"{split}.npz" for split in ("train", "test")}
  outputs = _runs([["mae_jax.extract", f"--workdir={workdir}", f"--output={files[split]}",
                    f"--split={split}", "--batch_size=100", "--num_cpu_devices=2"]
                   for split in files], env)
  for split, out in zip(files, outputs):
    assert str(files[split]) in out
  train_set, test_set = (np.load(files[s]) for s in ("train", "test"))
  assert train_set["features"].shape == (1437, 32) and test_set["features"].shape == (360, 32)
  assert train_set["features"].dtype == np.float32
  np.testing.assert_array_equal(train_set["labels"], _labels("train"))
  np.testing.assert_array_equal(test_set["labels"], _labels("test"))
  scores = _loop_knn(train_set["features"], train_set["labels"], test_set["features"], 10,
                     k=20, temperature=0.07)
  top1 = 100.0 * np.mean(scores.argmax(1) == test_set["labels"])
  assert top1 == pytest.approx(rows[-1]["knn_top1"], abs=100.0 / 360 + 1e-6)


def test_extract_reads_a_finetuning_workdir(tmp_path, env):
  from mae_jax.models.classifier import classifier_from_config  # pylint: disable=g-import-not-at-top
  config = config_lib.finetune_config("vit_b")
  config.model = config_lib.classifier_model_config(
      "vit_b", num_classes=10, **{k: v for k, v in TINY_MODEL.items() if "decoder" not in k})
  config.input.dataset = "sklearn_digits"
  model = classifier_from_config(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  checkpoint.save_params(str(tmp_path / "ft"), params, config)
  _run(["mae_jax.extract", f"--workdir={tmp_path / 'ft'}", f"--output={tmp_path / 'f.npz'}",
        "--split=test", "--num_examples=50", "--batch_size=32"], env)
  with np.load(tmp_path / "f.npz") as f:
    # A random subset of 50 test digits; a global-pool classifier's fc_norm feature [50, 32].
    assert f["features"].shape == (50, 32) and f["labels"].shape == (50,)
    assert str(f["split"]) == "test" and str(f["dataset"]) == "sklearn_digits"
    assert set(f["labels"]) <= set(range(10)) and len(set(f["labels"])) > 3
    np.testing.assert_allclose(f["features"].mean(1), 0.0, atol=1e-4)  # after fc_norm's LN
