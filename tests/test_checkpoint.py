"""mae_jax.checkpoint: params-only checkpoints and the training checkpoints' layout."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import checkpoint
from mae_jax import config_lib
from mae_jax import loss_scale
from mae_jax import train
import workdir_tools


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"embedding": {"kernel": jnp.asarray(rng.normal(size=(2, 2, 3, 8)), jnp.float32),
                        "bias": jnp.zeros((8,), jnp.float32)},
          "cls": jnp.asarray(rng.normal(size=(1, 1, 8)), jnp.float32)}


def _state(params, step, scale=None):
  return train.TrainState(step=jnp.int32(step), params=params,
                          opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
                          rng=jax.random.key_data(jax.random.key(3)), loss_scale=scale)


def _abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def test_save_params_then_load_params_round_trips_with_config(tmp_path):
  config = config_lib.pretrain_config("vit_b")
  config.model.embed_dim = 8
  params = _params()
  checkpoint.save_params(str(tmp_path), params, config)
  assert (tmp_path / "config.json").exists() and checkpoint.has_params(str(tmp_path))
  loaded, loaded_config = checkpoint.load_params(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert loaded_config.model.embed_dim == 8 and loaded_config.input.batch_size == 4096
  # The params directory itself works too, and saving again replaces it.
  checkpoint.save_params(str(tmp_path), _params(1), config)
  loaded, _ = checkpoint.load_params(str(tmp_path / "params"))
  jax.tree.map(np.testing.assert_array_equal, loaded, _params(1))


def test_load_params_refuses_a_target_of_other_shapes_naming_the_param(tmp_path):
  checkpoint.save_params(str(tmp_path), _params(), config_lib.pretrain_config("vit_b"))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
  target["cls"] = jax.ShapeDtypeStruct((1, 1, 16), jnp.float32)
  with pytest.raises(ValueError, match=r"cls has shape \(1, 1, 8\), the model expects "
                                       r"\(1, 1, 16\)"):
    checkpoint.load_params(str(tmp_path), target=target)


def test_training_checkpoints_are_step_folders_and_load_params_takes_the_newest(tmp_path,
                                                                                caplog):
  config = config_lib.pretrain_config("vit_b")
  config.seed = 7
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  for step in (3, 6, 9):
    checkpoint.save(mngr, _state(_params(step), step), config)
  mngr.wait_until_finished()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6", "9"]
  with caplog.at_level(logging.WARNING):
    params, loaded_config = checkpoint.load_params(str(tmp_path))
  # A sound checkpoint reads without a warning (init_from, export, visualize, extract).
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  jax.tree.map(np.testing.assert_array_equal, params, _params(9))
  assert loaded_config.seed == 7
  params, _ = checkpoint.load_params(str(tmp_path / "checkpoints" / "6"))
  jax.tree.map(np.testing.assert_array_equal, params, _params(6))
  # A step's params/ folder comes with that step's config (export needs its head count).
  params, step_config = checkpoint.load_params(str(tmp_path / "checkpoints" / "6" / "params"))
  jax.tree.map(np.testing.assert_array_equal, params, _params(6))
  assert step_config is not None and step_config.seed == 7

  restored = checkpoint.restore_latest(mngr, _abstract(_state(_params(), 0)))
  assert int(restored.step) == 9
  np.testing.assert_array_equal(restored.rng, _state(_params(), 0).rng)
  jax.tree.map(np.testing.assert_array_equal, restored.params, _params(9))
  mngr.close()


@pytest.mark.parametrize("saved_dtype, resumed_dtype", [("bfloat16", "float16"),
                                                        ("float16", "float32")])
def test_a_run_resumes_when_model_dtype_switches_to_or_from_float16(tmp_path, saved_dtype,
                                                                    resumed_dtype):
  # float16 compute carries a dynamic loss scale in the state, the others carry none: a
  # checkpoint without one starts the scale afresh, one with a scale is read without it.
  saved_scale = loss_scale.init(saved_dtype)
  if saved_scale is not None:
    saved_scale = {"scale": jnp.float32(1024.0), "growth_tracker": jnp.int32(5)}
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  checkpoint.save(mngr, _state(_params(4), 4, saved_scale), config_lib.pretrain_config("vit_b"))
  mngr.wait_until_finished()
  restored = checkpoint.restore_latest(
      mngr, _abstract(_state(_params(), 0, loss_scale.init(resumed_dtype))))
  mngr.close()
  assert int(restored.step) == 4
  jax.tree.map(np.testing.assert_array_equal, restored.params, _params(4))
  if resumed_dtype == "float16":
    assert float(restored.loss_scale["scale"]) == loss_scale.INIT_SCALE
    assert int(restored.loss_scale["growth_tracker"]) == 0
  else:
    assert restored.loss_scale is None


def test_relative_workdirs_save_and_load(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_lib.pretrain_config("vit_b")
  mngr = checkpoint.manager("runs/a", keep=2)
  checkpoint.save(mngr, _state(_params(1), 1), config)
  mngr.wait_until_finished()
  mngr.close()
  checkpoint.save_params("runs/b", _params(2), config)
  monkeypatch.chdir(tmp_path / "runs")
  for name, seed in (("a", 1), ("b", 2)):
    params, _ = checkpoint.load_params(name)
    jax.tree.map(np.testing.assert_array_equal, params, _params(seed))
  assert checkpoint.absolute("gs://bucket/run") == "gs://bucket/run"
  assert checkpoint.absolute("x/y") == str(tmp_path / "runs" / "x" / "y")


def test_load_params_says_what_it_expected_when_nothing_is_there(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoints/<step>/ or params/"):
    checkpoint.load_params(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.load_params(str(tmp_path / "nowhere"))
  (tmp_path / "running" / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="holds no finished checkpoint yet"):
    checkpoint.load_params(str(tmp_path / "running"))
  # What a user may hand over instead of a converted workdir: the way to convert it.
  (tmp_path / "hf").mkdir()
  for name in ("hf/model.safetensors", "hf/config.json", "mae_pretrain_vit_base.pth"):
    (tmp_path / name).write_bytes(b"\0" * 8)
  for given in ("hf", "hf/model.safetensors", "mae_pretrain_vit_base.pth"):
    with pytest.raises(FileNotFoundError) as e:
      checkpoint.load_params(str(tmp_path / given))
    assert (f"python -m mae_jax.convert --torch_checkpoint={tmp_path / given} --workdir="
            in str(e.value)), str(e.value)
  np.savez(tmp_path / "official.npz", **{"cls_token": np.zeros((1, 1, 8)),
                                          "blocks.0.norm1.weight": np.ones(8)})
  with pytest.raises(ValueError, match="an npz of PyTorch keys.*mae_jax.convert"):
    checkpoint.load_params(str(tmp_path / "official.npz"))


def test_a_workdirs_checkpoints_folder_reads_as_the_workdir(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  checkpoint.save(mngr, _state(_params(4), 4), config_lib.pretrain_config("vit_b"))
  mngr.wait_until_finished()
  mngr.close()
  params, _ = checkpoint.load_params(str(tmp_path / "checkpoints"))
  jax.tree.map(np.testing.assert_array_equal, params, _params(4))


def test_load_params_skips_a_damaged_newest_checkpoint_for_the_one_before(tmp_path):
  config = config_lib.pretrain_config("vit_b")
  mngr = checkpoint.manager(str(tmp_path), keep=3)
  for step in (3, 6):
    checkpoint.save(mngr, _state(_params(step), step), config)
  mngr.wait_until_finished()
  mngr.close()
  workdir_tools.truncate(
      workdir_tools.largest_array_file(tmp_path / "checkpoints" / "6" / "params"))
  params, _ = checkpoint.load_params(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, _params(3))
  assert (tmp_path / "checkpoints" / "6").is_dir()  # a reader leaves the damaged one in place
  # Every one damaged: an error naming each, not a silent start from scratch.
  workdir_tools.truncate(
      workdir_tools.largest_array_file(tmp_path / "checkpoints" / "3" / "params"))
  with pytest.raises(RuntimeError, match=r"checkpoints/6/params.*checkpoints/3/params"):
    checkpoint.load_params(str(tmp_path))


def test_one_run_per_workdir_and_a_dead_runs_lock_is_stale(tmp_path, caplog):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from mae_jax import checkpoint; "
       "checkpoint.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); "
       "time.sleep(120)", str(tmp_path)],
      stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(checkpoint.WorkdirBusyError,
                       match=rf"{tmp_path} is in use by another run: process {holder.pid} on "
                             rf"host {socket.gethostname()} \(started "):
      checkpoint.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()
  # Killed without releasing: its lock names a process that no longer exists on this host.
  with checkpoint.WorkdirLock(str(tmp_path)) as lock:
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"process {holder.pid} on this host" in caplog.text
  assert not (tmp_path / checkpoint.LOCK).exists()  # released at the end


def test_a_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path, caplog):
  lock_file = tmp_path / checkpoint.LOCK
  record = {"host": "tpu-worker-7", "pid": 4242, "boot_id": "x", "token": "t",
            "started": "earlier", "heartbeat": time.time() - 5}
  lock_file.write_text(json.dumps(record))
  with pytest.raises(checkpoint.WorkdirBusyError, match="process 4242 on host tpu-worker-7"):
    checkpoint.WorkdirLock(str(tmp_path)).acquire()
  record["heartbeat"] = time.time() - 3600
  lock_file.write_text(json.dumps(record))
  lock = checkpoint.WorkdirLock(str(tmp_path), heartbeat_s=0.05).acquire()
  assert "no heartbeat from it for 3600 s" in caplog.text
  first = json.loads(lock_file.read_text())["heartbeat"]
  time.sleep(0.3)
  assert json.loads(lock_file.read_text())["heartbeat"] > first  # renewed while held
  lock_file.write_text(json.dumps(record))  # someone else's now: release leaves it alone
  lock.release()
  assert json.loads(lock_file.read_text())["host"] == "tpu-worker-7"


def test_a_workdir_of_another_mode_is_refused_saying_to_start_from_it(tmp_path):
  # The usual slip: fine-tuning into the pretraining's own workdir.
  pretrain = config_lib.pretrain_config("vit_b")
  saved = json.loads(pretrain.to_json_best_effort())
  step = tmp_path / "checkpoints" / "30"
  with pytest.raises(checkpoint.WrongModelError) as e:
    checkpoint._check_same_model(step, saved, config_lib.finetune_config("vit_b"), {}, {})
  message = str(e.value)
  assert message.startswith(f"{step} is a checkpoint of a pretrain run, and this config is a "
                            "finetune one"), message
  assert f"--config.init_from={tmp_path}" in message and "set those fields back" not in message
