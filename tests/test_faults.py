"""Faults tried on purpose: SIGKILL during an asynchronous save, damaged checkpoints, SIGTERM,
non-finite losses, a checkpoint of another model, an unwritable or full workdir, wrong configs.

Runs are `python -m mae_jax.main` in subprocesses (faults injected by tests/inject_faults.py)
on one tiny model; one uninterrupted run is the reference that every other run must repeat bit
for bit. tests/test_pretrain.py covers the rest of preemption: SIGTERM saves the current step
and exits 0, and a run SIGKILLed between saves resumes bit-identically.
"""

import collections
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
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
from mae_jax import input_pipeline
from mae_jax import models
from mae_jax import train
import workdir_tools
from workdir_tools import largest_array_file as _largest_array_file
from workdir_tools import losses as _losses
from workdir_tools import rows as _rows
from workdir_tools import steps as _steps
from workdir_tools import truncate as _truncate

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 3
TINY = {"total_steps": STEPS, "checkpoint_every_steps": EVERY, "keep_checkpoints": 10,
        "log_every_steps": 1, "warmup_steps": 2, "reconstruction_every_steps": 0,
        "input.batch_size": 8, "model.img_size": 16, "model.patch_size": 4,
        "model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2,
        "model.decoder_embed_dim": 16, "model.decoder_depth": 1, "model.decoder_num_heads": 2}


def _tiny_config(**fields):
  """The config the subprocess runs get from configs/demo.py and the TINY flags."""
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict({**TINY, **fields})  # dotted keys, as the flags give them
  return config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: fast CPU compiles, a shared compilation cache, no pod settings."""
  return workdir_tools.subprocess_env(tmp_path_factory.mktemp("jax_cache"),
                                      drop=("MAE_JAX_", "SLURM_", "FAULT_"))


def _start(env, workdir, *flags, faults=None, tiny=True):
  """Starts mae_jax.main on `workdir` (through the fault injector when `faults` are given);
  its output goes to files (pipes of runs waited on in turn could fill up)."""
  entry = [str(REPO / "tests" / "inject_faults.py")] if faults else ["-m", "mae_jax.main"]
  tiny_flags = [f"--config.{k}={v}" for k, v in TINY.items()] if tiny else []
  log = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.{time.time_ns()}"
  with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
    process = subprocess.Popen(
        [sys.executable, *entry, f"--config={REPO}/configs/demo.py", f"--workdir={workdir}",
         *tiny_flags, *flags], env={**env, **(faults or {})}, cwd=REPO, stdout=out,
        stderr=err, text=True)
  return process, log


def _finish(started) -> subprocess.CompletedProcess:
  process, log = started
  process.wait(timeout=600)
  return subprocess.CompletedProcess(process.args, process.returncode,
                                     pathlib.Path(f"{log}.out").read_text(),
                                     pathlib.Path(f"{log}.err").read_text())


def _run(env, workdir, *flags, faults=None, tiny=True) -> subprocess.CompletedProcess:
  """mae_jax.main on `workdir` (through the fault injector when `faults` are given)."""
  return _finish(_start(env, workdir, *flags, faults=faults, tiny=tiny))


def _ok(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


def _params(step_dir) -> dict:
  params, _ = checkpoint.load_params(str(step_dir))
  return jax.device_get(params)


def _assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _copy_checkpoints(reference, workdir, steps=None):
  for step in steps or _steps(reference):
    shutil.copytree(reference / "checkpoints" / str(step), workdir / "checkpoints" / str(step))


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """An uninterrupted run: checkpoints 3, 6, 9, 12 and the losses every other run must repeat."""
  workdir = tmp_path_factory.mktemp("reference")
  _ok(_run(env, workdir))
  assert _steps(workdir) == [3, 6, 9, 12] and sorted(_losses(workdir)) == list(range(1, 13))
  return workdir


# The first run of each fault below, on a fresh workdir: none needs another's result, so they
# run side by side (the runs of one test are still in order), once the reference has filled
# the compilation cache they all read.
FIRST_RUNS = {"sigkill": {"FAULT_KILL_AT_COMMIT": "9"}, "enospc": {"FAULT_ENOSPC_AT_SAVE": "9"},
              "sigterm": {"FAULT_SIGTERM_AT_STEP": "7"},
              "nonfinite": {"FAULT_NONFINITE_AT_STEP": "8", "FAULT_VALUE": "nan"}}


@pytest.fixture(scope="module")
def first_runs(env, reference, tmp_path_factory):
  """name -> (its workdir, its finished run) for each of FIRST_RUNS."""
  del reference  # run first
  workdirs = {name: tmp_path_factory.mktemp(name) for name in FIRST_RUNS}
  started = {name: _start(env, workdirs[name], faults=faults)
             for name, faults in FIRST_RUNS.items()}
  return {name: (workdirs[name], _finish(run)) for name, run in started.items()}


# --- SIGKILL during an asynchronous save --------------------------------------------------------

def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint_and_resumes_from_it(
    env, reference, first_runs):
  tmp_path, killed = first_runs["sigkill"]
  assert killed.returncode == -9, killed.stderr[-3000:]
  names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert names[:2] == ["3", "6"] and len(names) == 3, names
  assert names[2].startswith("9.orbax-checkpoint-tmp")  # written, never committed
  _assert_same_params(_params(tmp_path / "checkpoints" / "6"),
                      _params(reference / "checkpoints" / "6"))

  log = _ok(_run(env, tmp_path))
  assert f"Resumed from {tmp_path}/checkpoints/6." in log
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["12", "3", "6", "9"]
  assert _losses(tmp_path) == _losses(reference)  # before the kill and after, bit for bit


# --- out of disk space during a save --------------------------------------------------------------

def test_out_of_space_during_a_save_stops_clearly_loses_nothing_and_resumes(env, reference,
                                                                            first_runs):
  tmp_path, full = first_runs["enospc"]
  assert full.returncode != 0
  message = next(line for line in full.stderr.splitlines()
                 if "Out of disk space while saving" in line)
  assert (f"Out of disk space while saving the checkpoint of step 9 in {tmp_path}/checkpoints"
          in message)
  assert "the checkpoints of steps [3, 6] are intact" in message
  assert "it resumes from step 6" in message
  assert _steps(tmp_path) == [3, 6]  # nothing older lost
  log = _ok(_run(env, tmp_path))
  assert f"Resumed from {tmp_path}/checkpoints/6." in log
  assert _steps(tmp_path) == [3, 6, 9, 12]
  assert _losses(tmp_path) == _losses(reference)


# --- one run per workdir, and starts that are refused before anything is written ------------------

def test_a_second_run_on_a_workdir_refuses_naming_the_first(env, tmp_path):
  first = subprocess.Popen(
      [sys.executable, "-m", "mae_jax.main", f"--config={REPO}/configs/demo.py",
       f"--workdir={tmp_path}", *[f"--config.{k}={v}" for k, v in TINY.items()],
       "--config.total_steps=100000"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
  try:
    for line in first.stderr:  # training has started: the first holds the workdir
      if re.search(r"\] step \d+/100000", line):
        break
    second = _run(env, tmp_path)
    assert second.returncode != 0
    assert (f"{tmp_path} is in use by another run: process {first.pid} on host "
            f"{socket.gethostname()}") in second.stderr
  finally:
    first.send_signal(signal.SIGTERM)  # a preemption notice: it saves and exits
    first.communicate(timeout=300)
  assert first.returncode == 0
  steps = [row["step"] for row in workdir_tools.rows(tmp_path)]
  assert len(steps) == len(set(steps))  # only the first run wrote metrics
  assert not (tmp_path / checkpoint.LOCK).exists()  # released at its end


def test_a_bad_init_from_fails_before_anything_is_written(env, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "mae_jax.main", f"--config={REPO}/configs/finetune_demo.py",
       f"--workdir={tmp_path}", f"--config.init_from={tmp_path / 'nowhere'}"], env=env,
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode != 0 and "nowhere does not exist" in result.stderr
  assert sorted(os.listdir(tmp_path)) == []  # no config.json, no checkpoints/, no lock


def test_an_encoder_only_release_starts_continued_pretraining(env, tmp_path):
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
  config = _tiny_config()
  mae = models.from_config(config.model)
  params = jax.device_get(mae.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                                   jnp.zeros((1, 16, 16, 3)))["params"])
  official = convert.params_to_torch(params, img_size=16)
  encoder_only = {k: v for k, v in official.items()  # as mae_pretrain_vit_*.pth
                  if not k.startswith(("decoder", "mask_token"))}
  convert.convert_state_dict(encoder_only, str(tmp_path), config)
  log = _ok(_run(env, tmp_path, "--config.total_steps=3"))
  assert "holds an encoder only: continued pretraining starts with a freshly initialized " \
         "decoder (Decoder, decoder_embed, decoder_pred, mask_token)" in log
  assert _steps(tmp_path) == [3]
  trained = _params(tmp_path / "checkpoints" / "3")
  assert set(trained) >= {"Decoder", "decoder_pred", "Transformer"}


# --- damaged checkpoints --------------------------------------------------------------------------

def test_damaged_newest_checkpoint_falls_back_to_the_one_before(env, reference, tmp_path):
  _copy_checkpoints(reference, tmp_path)
  _truncate(_largest_array_file(tmp_path / "checkpoints" / "12" / "params"))
  log = _ok(_run(env, tmp_path))
  warning = next(line for line in log.splitlines() if "is damaged" in line)
  assert f"The checkpoint {tmp_path}/checkpoints/12 is damaged, trying the one before it" in warning
  assert f"{tmp_path}/checkpoints/12/params" in warning  # the root cause names the file
  assert f"Resumed from {tmp_path}/checkpoints/9." in log
  assert (tmp_path / "damaged_checkpoints" / "12").is_dir()  # set aside, not deleted
  assert _steps(tmp_path) == [3, 6, 9, 12]
  expected = _losses(reference)
  assert _losses(tmp_path) == {s: expected[s] for s in (10, 11, 12)}
  _assert_same_params(_params(tmp_path / "checkpoints" / "12"),
                      _params(reference / "checkpoints" / "12"))


def test_a_flipped_byte_fails_the_checksums_and_falls_back(reference, tmp_path, caplog):
  _copy_checkpoints(reference, tmp_path)
  ckpts = tmp_path / "checkpoints"
  assert all((ckpts / str(s) / "checksums.json").exists() for s in _steps(tmp_path))
  victim = _largest_array_file(ckpts / "12" / "params")
  with open(victim, "r+b") as f:  # one bit of one byte, size unchanged: Orbax alone reads it
    f.seek(os.path.getsize(victim) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  params, _ = checkpoint.load_params(str(tmp_path))  # init_from, export, visualize fall back
  _assert_same_params(params, _params(reference / "checkpoints" / "9"))
  config = _tiny_config()
  manager = checkpoint.manager(str(tmp_path), keep=10)
  state = checkpoint.restore_latest(manager, _abstract_state(config), config)
  manager.close()
  assert int(state.step) == 9
  damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(damaged) == 1 and f"{victim} has other bytes than when saved" in damaged[0]
  assert (tmp_path / "damaged_checkpoints" / "12").is_dir()


def _abstract_state(config):
  model = models.from_config(config.model)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 1))
  return train.abstract_train_state(model, tx, config.seed, train.make_mesh(config))


def test_each_kind_of_damage_is_named_and_none_restoring_fails_loudly(reference, tmp_path, caplog):
  _copy_checkpoints(reference, tmp_path)
  ckpts = tmp_path / "checkpoints"
  os.remove(_largest_array_file(ckpts / "12" / "opt_state"))
  os.remove(ckpts / "9" / "params" / "_METADATA")
  (ckpts / "6" / "config" / "metadata").write_text('{"model": {"embed')
  config = _tiny_config()
  abstract = _abstract_state(config)
  manager = checkpoint.manager(str(tmp_path), keep=10)
  state = checkpoint.restore_latest(manager, abstract, config)
  assert int(state.step) == 3
  _assert_same_params(jax.device_get(state.params), _params(reference / "checkpoints" / "3"))
  damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert [m.split(" is damaged")[0] for m in damaged] == [
      f"The checkpoint {ckpts}/{s}" for s in (12, 9, 6)]
  assert f"{ckpts}/12/opt_state" in damaged[0]
  assert "_METADATA" in damaged[1] and f"{ckpts}/9/params" in damaged[1]
  assert f"{ckpts}/6/config: unreadable JSON" in damaged[2]
  assert sorted(os.listdir(tmp_path / "damaged_checkpoints")) == ["12", "6", "9"]
  assert manager.all_steps() == [3]

  _truncate(_largest_array_file(ckpts / "3" / "params"))
  with pytest.raises(RuntimeError, match=r"No checkpoint in .* restores, so the run stops "
                                         r"instead of starting from scratch\. step 3: "):
    checkpoint.restore_latest(manager, abstract, config)
  manager.close()
  empty = checkpoint.manager(str(tmp_path / "fresh"), keep=10)
  assert checkpoint.restore_latest(empty, abstract, config) is None  # nothing there: start
  empty.close()


# --- SIGTERM --------------------------------------------------------------------------------------

def test_restart_after_sigterm_continues_exactly(env, reference, first_runs):
  tmp_path, preempted = first_runs["sigterm"]
  log = _ok(preempted)
  assert "Preempted: saved the checkpoint of step 7" in log and _steps(tmp_path) == [3, 6, 7]
  log = _ok(_run(env, tmp_path))
  assert f"Resumed from {tmp_path}/checkpoints/7." in log
  assert _losses(tmp_path) == _losses(reference)


# --- non-finite loss or gradients -----------------------------------------------------------------

def test_nonfinite_loss_stops_at_the_last_good_checkpoint_and_the_skip_option_goes_on(
    env, reference, first_runs):
  tmp_path, stopped = first_runs["nonfinite"]
  assert stopped.returncode == 1
  assert ("FloatingPointError: Non-finite loss or gradient at step 8 (loss nan, grad_norm nan): "
          f"stopped, saving nothing from step 8 on; the last good checkpoint is "
          f"{tmp_path}/checkpoints/6 (step 6)") in stopped.stderr
  assert "config.skip_nonfinite_steps=True" in stopped.stderr
  assert _steps(tmp_path) == [3, 6]
  _assert_same_params(_params(tmp_path / "checkpoints" / "6"),
                      _params(reference / "checkpoints" / "6"))

  log = _ok(_run(env, tmp_path, "--config.skip_nonfinite_steps=True",
                 faults={"FAULT_NONFINITE_AT_STEP": "8", "FAULT_VALUE": "inf"}))
  assert f"Resumed from {tmp_path}/checkpoints/6." in log
  assert "config.skip_nonfinite_steps: False in the checkpoint, True now" in log
  assert "Skipped the update of step(s) [8]" in log
  rows = {r["step"]: r for r in _rows(tmp_path)}  # the last row of each step
  assert [s for s, r in rows.items() if r["skipped_steps"]] == [8]
  assert rows[7]["loss"] == _losses(reference)[7][0]
  assert _steps(tmp_path) == [3, 6, 9, 12]
  final = _params(tmp_path / "checkpoints" / "12")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(final))


def test_a_nonfinite_step_leaves_params_and_optimizer_state_untouched():
  config = _tiny_config(**{"optimizer.lr": 1e-2})
  model = models.from_config(config.model)
  lr = train.create_learning_rate_fn(config, 1)
  tx = train.create_optimizer(config, lr)
  abstract = train.abstract_train_state(model, tx, config.seed, train.make_mesh(config))
  step = train.jit_train_step(config, model, tx, lr, abstract, train.make_mesh(config))
  state = train.create_train_state(model, tx, config.seed, abstract)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)), jnp.float32)
  state, metrics = step(state, images)
  assert float(metrics["nonfinite"]) == 0.0
  before = jax.device_get(state)
  for bad in (np.nan, np.inf):
    state, metrics = step(state, images.at[0, 0, 0, 0].set(bad))
    assert float(metrics["nonfinite"]) == 1.0
    _assert_same_params(jax.device_get((state.params, state.opt_state)),
                        (before.params, before.opt_state))
  assert int(state.step) == 3  # the batch is used up: the next step takes the next one
  state, metrics = step(state, images)
  assert float(metrics["nonfinite"]) == 0.0
  assert not np.array_equal(jax.device_get(state.params["cls"]), before.params["cls"])


# --- a checkpoint of another model ----------------------------------------------------------------

def test_checkpoint_of_another_model_is_refused_naming_what_differs(reference, tmp_path):
  _copy_checkpoints(reference, tmp_path, steps=[12])
  shutil.copy(reference / "config.json", tmp_path / "config.json")
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  # dtype only says how the model computes, total_steps is no model field: neither is named.
  config = _tiny_config(**{"model.embed_dim": 64, "model.dtype": "bfloat16", "total_steps": 20})
  with pytest.raises(checkpoint.WrongModelError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert message.startswith(f"{tmp_path}/checkpoints/12 is a checkpoint of another model than "
                            f"this config's: config.model.embed_dim: 32 in the checkpoint, 64 "
                            f"now. Use a new --workdir for this config, or set those fields back")
  assert "dtype" not in message and "total_steps" not in message
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written


def test_config_changes_tell_model_fields_from_the_rest():
  saved = json.loads(_tiny_config().to_json_best_effort())
  config = _tiny_config(**{"model.depth": 2, "model.remat": True, "optimizer.lr": 0.5,
                           "mode": "linprobe"})
  model, other = checkpoint.config_changes(saved, config)
  assert model == ["config.mode: 'pretrain' in the checkpoint, 'linprobe' now",
                   "config.model.depth: 1 in the checkpoint, 2 now"]
  assert other == ["config.model.remat: False in the checkpoint, True now",  # how, not what
                   "config.optimizer.lr: 0.001 in the checkpoint, 0.5 now"]
  del saved["skip_nonfinite_steps"]  # written before the field existed
  assert checkpoint.config_changes(saved, _tiny_config())[1] == [
      "config.skip_nonfinite_steps: not set in the checkpoint, False now"]


def test_params_of_other_shapes_are_refused_without_a_saved_config(reference, tmp_path):
  _copy_checkpoints(reference, tmp_path, steps=[12])
  shutil.rmtree(tmp_path / "checkpoints" / "12" / "config")
  manager = checkpoint.manager(str(tmp_path), keep=10)
  with pytest.raises(checkpoint.WrongModelError,
                     match=r"checkpoints/12 do not fit this config's model \(check config.model\)"
                           r": Transformer/encoder_norm/bias has shape \(32,\), "
                           r"the model expects \(64,\)"):
    checkpoint.restore_latest(manager, _abstract_state(_tiny_config(**{"model.embed_dim": 64})))
  manager.close()
  assert _steps(tmp_path) == [12]  # refused, not set aside as damaged


# --- the workdir ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_workdir_fails_before_training(tmp_path, where):
  (tmp_path / "file").write_text("not a directory")
  workdir = tmp_path / "file" / "run" if where == "under_a_file" else tmp_path / "file"
  expected = (re.escape(f"--workdir={workdir} is not writable (") + r".*\); point --workdir at "
              r"a directory this job can create and write")
  with pytest.raises(OSError, match=expected):
    train.train_and_evaluate(_tiny_config(), str(workdir))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
  config = _tiny_config()
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(_abstract_state(config)))
  needed = (config.keep_checkpoints + 1) * nbytes
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12, needed - 1))
  with pytest.raises(OSError, match=r"has 0.00 GiB free, but this run needs about 0.00 GiB for "
                                    r"its checkpoints .*config.keep_checkpoints=10 kept plus one "
                                    r"being written, 0 there now\)\. Free some space"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # nothing trained or saved
  # With enough room for what is still to come the check passes.
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, needed))
  checkpoint.check_workdir(str(tmp_path / "run"), checkpoint_bytes=nbytes, keep=10)


# --- wrong configs --------------------------------------------------------------------------------

def _validate_train(devices=1, processes=1):
  return lambda config: train.validate_config(config, device_count=devices,
                                              process_count=processes)


def _validate_input(config):
  input_pipeline.validate(config.input)


def _schedule(config):
  train.create_learning_rate_fn(config, steps_per_epoch=1)


BAD_CONFIGS = [  # (fields, check, the field as named, the fix)
    ({"model.img_size": 0}, _validate_train(), "config.model.img_size=0", "must be at least 1"),
    ({"model.patch_size": 7}, _validate_train(), "config.model.patch_size=7 does not divide "
     "config.model.img_size=16", "choose a patch size that divides the image size (e.g. 8)"),
    ({"model.mask_ratio": 1.5}, _validate_train(), "config.model.mask_ratio=1.5",
     "the paper uses 0.75"),
    ({"model.mask_ratio": 0.0}, _validate_train(), "config.model.mask_ratio=0.0 masks none of "
     "the 16 patches", "use at least 0.0625 (one patch)"),
    ({"model.num_heads": 3}, _validate_train(), "config.model.num_heads=3",
     "pick a head count that divides the width"),
    ({"model.decoder_embed_dim": 18}, _validate_train(), "config.model.decoder_embed_dim=18",
     "needs a width divisible by 4"),
    ({"model.in_chans": 1}, _validate_train(), "config.model.in_chans=1",
     "set --config.input.mean and --config.input.std"),
    ({"nonfinite_guard": "maybe"}, _validate_train(), "config.nonfinite_guard='maybe'",
     "is not one of ('auto', 'cond', 'select')"),
    ({"model.dtype": "fp16"}, _validate_train(), "config.model.dtype='fp16'",
     "is not one of ('float32', 'bfloat16', 'float16')"),
    ({"optimizer.lr": 0.0, "optimizer.blr": 0.0}, _validate_train(), "config.optimizer.blr=0.0",
     "set blr > 0 (lr = blr * batch / 256) or lr > 0"),
    ({"optimizer.b1": 1.5}, _validate_train(), "config.optimizer.b1=1.5", "must lie in [0, 1)"),
    ({"optimizer.weight_decay": -0.1}, _validate_train(), "config.optimizer.weight_decay=-0.1",
     "must be >= 0"),
    ({"optimizer.grad_accum_steps": 3}, _validate_train(), "config.optimizer.grad_accum_steps=3",
     "choose a divisor of 8"),
    ({}, _validate_train(devices=16), "config.input.batch_size=8 is not divisible by the 16 "
     "devices", "use a multiple of 16"),
    ({}, _validate_train(processes=3), "config.input.batch_size=8 is not divisible by the 3 "
     "processes", "use a multiple of 3"),
    ({"mesh.fsdp": 3}, _validate_train(devices=8), "config.mesh.fsdp=3",
     "choose a divisor of 8"),
    ({"mesh.data": 3, "mesh.fsdp": 2}, _validate_train(devices=8), "config.mesh.data=3 x "
     "config.mesh.fsdp=2", "set config.mesh.data=-1"),
    ({"total_steps": 0, "num_epochs": 0}, _validate_train(), "config.num_epochs=0",
     "must be > 0 when config.total_steps is 0"),
    ({"keep_checkpoints": 0}, _validate_train(), "config.keep_checkpoints=0",
     "must be at least 1"),
    ({"warmup_steps": 12}, _schedule, "config.warmup_steps=12", "shorten the warmup"),
    # warmup_steps=0 is no "no warmup": it defers to warmup_epochs, which the message names.
    ({"warmup_steps": 0, "warmup_epochs": 40}, _schedule, "config.warmup_epochs=40 x",
     "--config.warmup_epochs=0 --config.warmup_steps=0 for none"),
    ({"input.dataset": "no_such_dataset"}, _validate_input, "input.dataset='no_such_dataset'",
     "'folder:/path/to/images'"),
    ({"input.dataset": "folder:/no/such/folder"}, _validate_input,
     "input.dataset='folder:/no/such/folder'", "Point it at a folder of images"),
    ({"input.dataset": "imagenet2012"}, _validate_input, "input.dataset='imagenet2012' is not "
     "prepared", "then set input.manual_dir to it, then prepare it once"),
    ({"input.crop_scale": (0.5, 0.2)}, _validate_input, "input.crop_scale=(0.5, 0.2)",
     "0 < lo <= hi <= 1"),
    ({"input.num_workers": -2}, _validate_input, "input.num_workers=-2",
     "use -1 (one per core), 0"),
]


@pytest.mark.parametrize("fields,check,field,fix", BAD_CONFIGS,
                         ids=[",".join(f) or "batch" for f, *_ in BAD_CONFIGS])
def test_wrong_config_names_the_field_and_the_fix(tmp_path, fields, check, field, fix):
  config = _tiny_config(**{"input.data_dir": str(tmp_path), **fields})  # imagenet2012: unprepared
  with pytest.raises(ValueError) as e:
    check(config)
  assert field in str(e.value) and fix in str(e.value), str(e.value)


def test_main_lists_every_wrong_field_before_compiling_anything(env, tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  result = _run({**env, "JAX_COMPILATION_CACHE_DIR": str(cache)}, tmp_path / "run",
                "--config.model.patch_size=5", "--config.mesh.fsdp=3",
                "--config.optimizer.b2=1.0")
  assert result.returncode != 0
  for message in ("config.model.patch_size=5 does not divide config.model.img_size=16",
                  "config.mesh.fsdp=3 does not divide the 1 devices",
                  "config.optimizer.b2=1.0 must lie in [0, 1)"):
    assert message in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / "run").exists() and not list(cache.iterdir())  # nothing compiled
