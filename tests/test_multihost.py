"""A miniature pod (launch/local_pod.sh: 2 processes x 2 CPU devices) against one process with 4.

Same global batch and device count, so the same losses; a preemption notice to one process
makes both save at the same step; checkpoints move between the pod and the lone process.
Four runs in all: one process from scratch, the pod preempted, each resuming the other's
checkpoint.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
SAVE_EVERY = 3

# A 40k-parameter MAE on 32px crops: the point is the plumbing, not the model.
TINY = ["--config=configs/demo.py", "--config.model.img_size=32", "--config.model.patch_size=8",
        "--config.model.embed_dim=32", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.model.decoder_embed_dim=32", "--config.model.decoder_depth=1",
        "--config.model.decoder_num_heads=2", "--config.input.batch_size=16",
        f"--config.total_steps={STEPS}", "--config.warmup_steps=2",
        "--config.log_every_steps=1", f"--config.checkpoint_every_steps={SAVE_EVERY}",
        "--config.keep_checkpoints=10",
        "--config.reconstruction_every_steps=0",
        # The kNN monitor on the shipped digits (a random 256 of train as neighbours).
        f"--config.monitor.every_steps={STEPS // 2}", "--config.monitor.dataset=sklearn_digits",
        "--config.monitor.batch_size=64", "--config.monitor.train_examples=256"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("MAE_JAX_", "SLURM_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  return env


def _pod_command(workdir: pathlib.Path) -> list[str]:
  return [str(REPO / "launch" / "local_pod.sh"), "2", "--devices_per_process=2", "--", *TINY,
          f"--workdir={workdir}"]


def _run(command: list[str], env: dict[str, str]) -> str:
  result = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
  if result.returncode != 0:
    # The error is rarely in the last lines: the other process's shutdown follows it.
    errors = [l for l in result.stdout.splitlines()
              if re.search(r"Error|error:|(^|\] )[EF]\d{4} |Check failed|Traceback|failed", l)]
    pytest.fail(f"{command[0]} exited with {result.returncode}:\n" + "\n".join(errors[:60]))
  return result.stdout


def _single(workdir: pathlib.Path, env: dict[str, str]) -> str:
  return _run([sys.executable, "-m", "mae_jax.main", *TINY, f"--workdir={workdir}",
               "--num_cpu_devices=4"], env)


def _rows(workdir: pathlib.Path, key: str) -> list[dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [row for row in rows if key in row]


def _knn(workdir: pathlib.Path) -> dict[int, float]:
  rows = _rows(workdir, "knn_top1")
  assert all((r["knn_train"], r["knn_eval"]) == (256, 360) for r in rows)
  return {row["step"]: row["knn_top1"] for row in rows}


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = _rows(workdir, "loss")
  steps = [row["step"] for row in rows]
  assert len(steps) == len(set(steps)), f"steps logged twice (by several processes?): {steps}"
  return {row["step"]: row["loss"] for row in rows}


def _assert_close(actual: dict[int, float], expected: dict[int, float]) -> None:
  assert sorted(actual) == sorted(expected)
  for step, loss in expected.items():
    assert actual[step] == pytest.approx(loss, rel=1e-5), f"step {step}"


def _resume_from(source: pathlib.Path, step: int, target: pathlib.Path) -> pathlib.Path:
  """A fresh workdir holding only `source`'s checkpoint of `step`."""
  shutil.copytree(source / "checkpoints" / str(step), target / "checkpoints" / str(step))
  return target


@pytest.fixture(scope="module")
def single_workdir(tmp_path_factory, env) -> pathlib.Path:
  """One process with 4 CPU devices, all STEPS steps."""
  workdir = tmp_path_factory.mktemp("single")
  _single(workdir, env)
  return workdir


@pytest.fixture(scope="module")
def preempted_pod(tmp_path_factory, env) -> tuple[pathlib.Path, str, int]:
  """The pod from scratch, with process 1 alone sent SIGTERM once step 2 has been logged:
  (workdir, output, last step logged before the signal)."""
  workdir = tmp_path_factory.mktemp("pod")
  pod = subprocess.Popen(_pod_command(workdir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  # If anything hangs, Ctrl-C the pod: local_pod.sh then kills its processes.
  watchdog = threading.Timer(540, pod.send_signal, (signal.SIGINT,))
  watchdog.start()
  try:
    lines, pids, signalled_at = [], {}, None
    for line in pod.stdout:
      lines.append(line)
      if m := re.match(r"\[local_pod\] process (\d)/2: pid (\d+)", line):
        pids[int(m.group(1))] = int(m.group(2))
      m = re.match(r"\[0/2\] .*\] step (\d+)/", line)
      if signalled_at is None and m and int(m.group(1)) >= 2:
        signalled_at = int(m.group(1))
        os.kill(pids[1], signal.SIGTERM)
    pod.wait(timeout=60)
  finally:
    watchdog.cancel()
  output = "".join(lines)
  assert pod.returncode == 0, output[-5000:]
  return workdir, output, signalled_at


def test_preempting_one_process_saves_every_process_at_one_step(preempted_pod):
  workdir, output, signalled_at = preempted_pod
  assert "Joined a explicit job as process 1 of 2: 2 local of 4 devices" in output
  saved = {int(m.group(1)): int(m.group(2)) for m in re.finditer(
      r"\[(\d)/2\] .*Preempted: saved the checkpoint of step (\d+)", output)}
  assert sorted(saved) == [0, 1], output[-5000:]
  assert saved[0] == saved[1]
  assert signalled_at < saved[0] < STEPS
  checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert checkpoints[-1] == saved[0]
  assert max(_losses(workdir)) == saved[0]


def test_pod_losses_match_one_process(preempted_pod, single_workdir):
  expected = _losses(single_workdir)
  assert sorted(expected) == list(range(1, STEPS + 1))
  pod_losses = _losses(preempted_pod[0])
  assert len(pod_losses) >= 3  # updates with a non-zero learning rate included
  _assert_close(pod_losses, {s: l for s, l in expected.items() if s <= max(pod_losses)})


def test_pod_writes_one_event_file(preempted_pod):
  # Process 0 alone writes TensorBoard events (and metrics.jsonl: _losses checks its rows).
  assert len(list((preempted_pod[0] / "tensorboard").iterdir())) == 1


def test_pod_checkpoint_resumes_in_one_process(preempted_pod, single_workdir, tmp_path, env):
  pod_workdir = preempted_pod[0]
  step = max(_losses(pod_workdir))
  workdir = _resume_from(pod_workdir, step, tmp_path)
  assert f"Resumed from {workdir}/checkpoints/{step}" in _single(workdir, env)
  expected = {s: l for s, l in _losses(single_workdir).items() if s > step}
  _assert_close(_losses(workdir), expected)


def test_one_process_checkpoint_resumes_in_pod(single_workdir, tmp_path, env):
  workdir = _resume_from(single_workdir, SAVE_EVERY, tmp_path)
  output = _run(_pod_command(workdir), env)
  assert output.count(f"Resumed from {workdir}/checkpoints/{SAVE_EVERY}") == 2  # both processes
  expected = {s: l for s, l in _losses(single_workdir).items() if s > SAVE_EVERY}
  _assert_close(_losses(workdir), expected)
  # The kNN monitor on 2 processes x 2 devices: the figures of 1 process x 4 (within one of
  # the 360 test digits: the params agree to 1e-7, not bit for bit).
  single, pod = _knn(single_workdir), _knn(workdir)
  assert sorted(single) == [0, STEPS // 2, STEPS] and sorted(pod) == [STEPS // 2, STEPS]
  for step in pod:
    assert pod[step] == pytest.approx(single[step], abs=100 / 360 + 1e-9), step


def test_processes_agree_on_the_newest_checkpoint_every_one_can_read(preempted_pod,
                                                                      single_workdir, tmp_path,
                                                                      env):
  newest = max(_losses(preempted_pod[0]))
  shutil.copytree(preempted_pod[0] / "checkpoints", tmp_path / "checkpoints")
  before = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())[-2]
  # Process 1 alone cannot read the newest checkpoint; process 0 can.
  faults = {"FAULT_UNREADABLE_STEP": str(newest), "FAULT_UNREADABLE_PROCESS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])}
  command = _pod_command(tmp_path)
  command.insert(3, "--module=inject_faults")
  output = _run(command, {**env, **faults})
  assert output.count(f"Resumed from {tmp_path}/checkpoints/{before}.") == 2, output[-5000:]
  assert re.search(rf"\[0/2\] .*The checkpoint {tmp_path}/checkpoints/{newest} is damaged.*"
                   r"process\(es\) \[1\] cannot read it", output)
  assert (tmp_path / "damaged_checkpoints" / str(newest)).is_dir()
  expected = {s: l for s, l in _losses(single_workdir).items() if s > before}
  _assert_close(_losses(tmp_path), expected)
