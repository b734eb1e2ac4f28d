"""`python -m mae_jax.main` end to end, in subprocesses: outputs, exact resume after SIGKILL,
SIGTERM, 8 simulated devices with fsdp against 1, checkpoints moving between them, and config
errors before compiling."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mae_jax import config_lib
from mae_jax import train
import workdir_tools
from workdir_tools import losses as _losses
from workdir_tools import rows as _rows
from workdir_tools import steps as _steps

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 24, 6
# A tiny model on the shipped photos (whose decoding keeps a run going for a few seconds, time
# enough to interrupt it); every run shares this config, so one compilation per device count
# serves all of them (through the compilation cache below).
TINY = [f"--config.total_steps={STEPS}", f"--config.checkpoint_every_steps={EVERY}",
        "--config.keep_checkpoints=10", "--config.log_every_steps=1",
        "--config.warmup_steps=3", "--config.reconstruction_every_steps=0",
        "--config.input.batch_size=8", "--config.model.img_size=16",
        "--config.model.patch_size=4", "--config.model.embed_dim=32", "--config.model.depth=1",
        "--config.model.num_heads=2", "--config.model.decoder_embed_dim=16",
        "--config.model.decoder_depth=1", "--config.model.decoder_num_heads=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: fast CPU compiles, a shared compilation cache, no pod settings."""
  return workdir_tools.subprocess_env(tmp_path_factory.mktemp("jax_cache"))


def _command(workdir, devices=1, extra=(), tiny=True):
  return [sys.executable, "-m", "mae_jax.main", f"--config={REPO}/configs/demo.py",
          f"--workdir={workdir}", f"--num_cpu_devices={devices}", *(TINY if tiny else []),
          *extra]


def _start(env, workdir, devices=1, extra=(), tiny=True, relative=False) -> subprocess.Popen:
  """Starts a run; its stderr goes to a file (pipes of runs waited on in turn could fill up).
  `relative`: run in the workdir's parent, passing `--workdir=NAME` as the README does."""
  workdir = pathlib.Path(workdir)
  log = workdir.parent / f"{workdir.name}.{time.time_ns()}.log"
  command = _command(workdir.name if relative else workdir, devices, extra, tiny)
  if relative:  # outside the checkout, `-m mae_jax.main` must still import this checkout
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                               env.get("PYTHONPATH")]))}
  with open(log, "w") as f:
    proc = subprocess.Popen(command, env=env, cwd=workdir.parent if relative else REPO,
                            stdout=subprocess.DEVNULL, stderr=f, text=True)
  proc.log = log
  return proc


def _log(proc: subprocess.Popen) -> str:
  return proc.log.read_text()


def _finish(*procs: subprocess.Popen) -> list:
  """Waits for runs started together (independent runs share the two cores); their logs."""
  for proc in procs:
    proc.wait(timeout=900)
    assert proc.returncode == 0, _log(proc)[-3000:]
  return [_log(proc) for proc in procs]


def _wait_for(predicate, proc, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f"the run ended early: {_log(proc)[-3000:]}"
    assert time.time() < deadline, "timed out"
    time.sleep(0.02)


# Sharded 4 ways: every array the axis divides (the tiny model has none above the default
# 4 MiB minimum).
FSDP4 = ["--config.mesh.fsdp=4", "--config.mesh.fsdp_min_mb=0"]


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
  """Three uninterrupted runs, side by side: the tiny config on 1 device ("reference") and on 8
  simulated devices with params and optimizer state sharded 4 ways ("fsdp8"), and the demo
  config itself for 2 steps ("demo", with a relative --workdir, as in the README)."""
  workdirs = {name: tmp_path_factory.mktemp(name) for name in ("reference", "fsdp8", "demo")}
  _finish(_start(env, workdirs["reference"]),
          _start(env, workdirs["fsdp8"], devices=8, extra=FSDP4),
          _start(env, workdirs["demo"], tiny=False, relative=True,
                 extra=["--config.total_steps=2", "--config.warmup_steps=1",
                        "--config.log_every_steps=1", "--config.checkpoint_every_steps=1"]))
  return workdirs


@pytest.fixture(scope="module")
def reference(runs):
  return runs["reference"]


def test_run_writes_metrics_tensorboard_png_and_step_checkpoints(reference):
  rows = _rows(reference)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert {"step", "loss", "lr", "img_per_s", "grad_norm", "eta_s"} <= set(rows[0])
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert _steps(reference) == list(range(EVERY, STEPS + 1, EVERY))
  assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
  assert (reference / f"reconstruction_{STEPS:08d}.png").exists()
  config = json.loads((reference / "config.json").read_text())
  assert config["model"]["embed_dim"] == 32


def test_resume_after_sigkill_gives_bit_identical_losses(env, reference, tmp_path):
  proc = _start(env, tmp_path)
  try:
    _wait_for(lambda: (tmp_path / "checkpoints" / str(EVERY)).is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  killed_at = max([r["step"] for r in _rows(tmp_path)], default=0)
  assert killed_at < STEPS, "the run finished before it was killed"
  log, = _finish(_start(env, tmp_path))
  resumed = max(s for s in _steps(tmp_path) if f"Resumed from {tmp_path}/checkpoints/{s}." in log)
  assert EVERY <= resumed < STEPS
  expected, got = _losses(reference), _losses(tmp_path)
  assert sorted(got) == list(range(1, STEPS + 1))  # one row per step: none twice, none lost
  for step, value in got.items():  # bit for bit, before the kill and after the restart
    assert value == expected[step], f"step {step}: {value} != {expected[step]}"


def test_sigterm_saves_the_current_step_and_exits_0(env, tmp_path):
  # Logging every 4 steps: the rows stop at the saved step all the same.
  proc = _start(env, tmp_path, extra=["--config.log_every_steps=4"])
  _wait_for(lambda: len(_rows(tmp_path)) >= 1, proc)
  proc.send_signal(signal.SIGTERM)
  log, = _finish(proc)
  last = _steps(tmp_path)[-1]
  assert last < STEPS, "the run finished before SIGTERM arrived"
  assert f"Preempted: saved the checkpoint of step {last}" in log
  assert max(r["step"] for r in _rows(tmp_path)) == last  # every step done was logged


def test_ctrl_c_saves_the_current_step_and_exits_130_and_the_rerun_resumes(env, tmp_path):
  """A first Ctrl-C (SIGINT) saves the step just done and stops, as SIGTERM does, with the
  shell's status of an interrupted command; it once died with a KeyboardInterrupt traceback,
  losing the steps since the last checkpoint."""
  log = tmp_path.parent / f"{tmp_path.name}.ctrl_c.log"
  with open(log, "w") as f:  # SIGINT as a terminal delivers it, even if the caller ignores it
    proc = subprocess.Popen(_command(tmp_path), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=f, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  proc.log = log
  _wait_for(lambda: len(_rows(tmp_path)) >= 2, proc)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=900)
  text = log.read_text()
  assert proc.returncode == 130, text[-3000:]
  last = _steps(tmp_path)[-1]
  assert last < STEPS, "the run finished before Ctrl-C arrived"
  # The step Ctrl-C stopped at is saved (it may be a periodic one too), and nothing after it.
  assert f"Stopped by Ctrl-C: saved the checkpoint of step {last}" in text
  assert "Traceback" not in text
  assert max(r["step"] for r in _rows(tmp_path)) == last
  log, = _finish(_start(env, tmp_path))
  assert f"Resumed from {tmp_path}/checkpoints/{last}." in log
  assert sorted(_losses(tmp_path)) == list(range(1, STEPS + 1))


def test_ctrl_c_before_the_first_step_exits_130_with_a_message_and_no_crash(env, tmp_path):
  """Ctrl-C while the run sets up or compiles (before the trainer's own handler) once ended in
  a KeyboardInterrupt traceback and then a segmentation fault as the interpreter shut down
  under XLA's compile threads (status 139). Now: one message, status 130, the workdir free."""
  log = tmp_path.parent / f"{tmp_path.name}.early_ctrl_c.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(_command(tmp_path), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=f, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  proc.log = log
  _wait_for(lambda: "host memory:" in log.read_text(), proc)  # main() has begun
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=900)
  text = log.read_text()
  assert proc.returncode == 130, text[-3000:]
  assert "Stopped by Ctrl-C without saving." in text
  assert "Traceback" not in text and "Segmentation fault" not in text
  assert not (tmp_path / "metrics.jsonl").exists() or not _rows(tmp_path)  # no step ran
  log, = _finish(_start(env, tmp_path))  # the lock was released: the rerun trains
  assert sorted(_losses(tmp_path)) == list(range(1, STEPS + 1))


def test_8_devices_with_fsdp_give_the_losses_of_1_device(runs):
  one, eight = _losses(runs["reference"]), _losses(runs["fsdp8"])
  assert sorted(one) == sorted(eight) == list(range(1, STEPS + 1))
  for step in one:
    np.testing.assert_allclose(eight[step][0], one[step][0], rtol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(eight[step][2], one[step][2], rtol=1e-6)


def test_checkpoints_restore_on_another_device_count(env, runs, tmp_path):
  """A checkpoint written on 8 devices resumes on 1, and one written on 1 resumes on 8."""
  resume_at = 2 * EVERY
  moves = [("fsdp8", 1, []), ("reference", 8, FSDP4)]
  workdirs = [tmp_path / f"{source}_on_{devices}" for source, devices, _ in moves]
  for (source, _, _), workdir in zip(moves, workdirs):
    shutil.copytree(runs[source] / "checkpoints" / str(resume_at),
                    workdir / "checkpoints" / str(resume_at))
  logs = _finish(*[_start(env, workdir, devices, extra)
                   for (_, devices, extra), workdir in zip(moves, workdirs)])
  for (source, _, _), workdir, log in zip(moves, workdirs, logs):
    assert f"Resumed from {workdir}/checkpoints/{resume_at}." in log
    before, after = _losses(runs[source]), _losses(workdir)
    assert sorted(after) == list(range(resume_at + 1, STEPS + 1))
    for step, value in after.items():
      np.testing.assert_allclose(value[0], before[step][0], rtol=1e-5, err_msg=f"step {step}")


def _tensorboard_tags(logdir) -> set:
  """Scalar tags in the event files (read with tensorboard's protos, no TensorFlow)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in pathlib.Path(logdir).glob("events.out.tfevents.*"):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      tags |= {v.tag for v in event.summary.value}
      offset += 12 + length + 4
  return tags


def test_demo_config_trains_end_to_end(runs):
  demo = runs["demo"]
  rows = _rows(demo)
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  assert {"loss", "lr", "img_per_s", "grad_norm", "reconstruction"} <= _tensorboard_tags(
      demo / "tensorboard")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(demo / "reconstruction_00000002.png") as image:
    assert image.size == (5 * 128 + 6 * 4, 16 + 4 * 128 + 5 * 4)  # 4 photos x 5 panels, 64px shown 2x
  assert _steps(demo) == [1, 2]  # an asynchronous save at step 1, the final one at step 2


def _config(**fields):
  c = config_lib.pretrain_config("vit_b")
  c.input.dataset = "skimage_photos"
  c.input.batch_size = 8
  c.total_steps = 10
  for key, value in fields.items():
    parent, leaf = key.rsplit(".", 1) if "." in key else (None, key)
    (c[parent] if parent else c)[leaf] = value
  return c


@pytest.mark.parametrize("fields,message", [
    ({"model.patch_size": 12}, "config.model.patch_size=12 does not divide config.model.img_size=224"),
    ({"model.mask_ratio": 1.0}, "config.model.mask_ratio=1.0 is outside [0, 1)"),
    ({"input.dataset": "no_such_dataset"}, "input.dataset='no_such_dataset'"),
])
def test_wrong_config_fails_before_compiling_naming_the_field(tmp_path, fields, message):
  started = time.time()
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(_config(**fields), str(tmp_path))
  assert message in str(e.value)
  assert time.time() - started < 30
  assert not list(tmp_path.iterdir())  # nothing written, nothing compiled

