"""mae_jax.huge_pages: when the CPU commands restart under glibc.malloc.hugetlb=1, that the
restart keeps the process and its command line, and that it takes XLA's per-call buffers off
4 KiB page faults (counted, not timed)."""

import json
import os
import re
import subprocess
import sys

import pytest

from mae_jax import huge_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = dict(thp="madvise", glibc=(2, 36), on_cpu=True)


def _reason(environ=None, **kwargs):
  args = {**GOOD, **kwargs}
  return huge_pages.reason_not_to_restart(environ or {}, args["thp"], args["glibc"],
                                          args["on_cpu"])


def test_restarts_only_where_the_tunable_can_help_and_nobody_chose_otherwise():
  assert _reason() is None
  assert _reason(glibc=(2, 35)) is None
  assert "MAE_JAX_HUGE_PAGES=0" in _reason({"MAE_JAX_HUGE_PAGES": "0"})
  assert _reason({"MAE_JAX_HUGE_PAGES": "1"}) is None
  assert "already" in _reason({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert _reason({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None
  assert "glibc" in _reason(glibc=(2, 34))
  assert "glibc" in _reason(glibc=None)  # musl, macOS
  assert "without the tunable" in _reason(thp="always")  # huge pages without asking
  assert "never" in _reason(thp="never")
  assert "unavailable" in _reason(thp=None)
  assert "accelerator" in _reason(on_cpu=False)


def test_a_program_read_from_stdin_is_never_restarted():
  assert huge_pages.program(["python", "-"])[0] == "-"
  assert huge_pages.program(["python"])[0] == "-"
  assert huge_pages.program(["python", "-X", "dev", "-u"])[0] == "-"
  assert huge_pages.program(["python", "-m", "mae_jax.main", "--config=x"])[0] != "-"
  assert huge_pages.program(["python", "-X", "dev", "-mmae_jax.main"])[0] != "-"
  assert huge_pages.program(["python", "-c", "print(1)"])[0] != "-"
  assert huge_pages.program(["python", "-W", "ignore", "run.py", "-"])[0] != "-"


def test_the_tunable_joins_those_already_set_and_a_process_restarts_once_at_most():
  env = huge_pages.environment_with_tunable({"A": "1"})
  assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                 "MAE_JAX_HUGE_PAGES_RESTARTED": "1"}
  env = huge_pages.environment_with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # Were the tunable dropped between the two processes (a wrapper that filters GLIBC_TUNABLES),
  # the marker stops a second restart, which would otherwise repeat forever.
  lost = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
  assert "restarted once already" in _reason(lost)


def test_thp_mode_is_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert huge_pages.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert huge_pages.thp_mode(str(path)) == "always"
  assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


def test_jax_platforms_decides_the_backend_when_set():
  assert huge_pages.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
  assert huge_pages.runs_on_cpu({"JAX_PLATFORMS": " CPU , cuda"})
  assert not huge_pages.runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
  assert not huge_pages.runs_on_cpu({"JAX_PLATFORMS": "tpu"})


def test_an_installed_gpu_plugin_or_attached_tpu_keeps_the_process_as_it_is(monkeypatch):
  """With JAX_PLATFORMS unset, jax's own plugin discovery decides: a `jax_plugins` entry point
  (how the CUDA and ROCm plugins register) means an accelerator host."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  real_find_spec = importlib.util.find_spec
  no_tpu = lambda name, *a: None if name in ("libtpu", "jax_plugins") else real_find_spec(name, *a)
  monkeypatch.setattr(importlib.util, "find_spec", no_tpu)
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
  assert huge_pages.runs_on_cpu({})
  plugin = importlib.metadata.EntryPoint("xla_cuda13", "jax_cuda13_plugin", "jax_plugins")
  monkeypatch.setattr(importlib.metadata, "entry_points",
                      lambda group: [plugin] if group == "jax_plugins" else [])
  assert not huge_pages.runs_on_cpu({})
  assert huge_pages.runs_on_cpu({"JAX_PLATFORMS": "cpu"})  # the user's choice wins


_SCRIPT = r"""
import json, os, resource, sys
print(json.dumps({"pid_before": os.getpid()}), flush=True)
from mae_jax import huge_pages
why = huge_pages.restart_with_huge_pages()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)

@jax.jit
def f(x):  # a 64 MiB temporary buffer that XLA allocates at every call
  y = jax.lax.optimization_barrier(jnp.sin(x))
  return jnp.sum(y * y)

f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "why": why, "faults": faults,
                  "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "temp": f.lower(x).compile().memory_analysis().temp_size_in_bytes}))
"""


def _run(tmp_path, **env):
  script = tmp_path / "probe.py"
  script.write_text(_SCRIPT)
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "MAE_JAX_HUGE_PAGES")}
  environ.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env)
  proc = subprocess.run([sys.executable, str(script), "--an-argument"], env=environ,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  return lines


def test_the_restart_keeps_the_process_and_takes_buffers_off_small_pages(tmp_path):
  expected = huge_pages.reason_not_to_restart(
      {"JAX_PLATFORMS": "cpu"}, huge_pages.thp_mode(), huge_pages.glibc_version(), True)
  restarted = _run(tmp_path)
  kept = _run(tmp_path, MAE_JAX_HUGE_PAGES="0")
  assert kept[-1]["why"] == "MAE_JAX_HUGE_PAGES=0" and kept[-1]["tunables"] == ""
  assert len(kept) == 2  # not restarted: the first line printed once
  assert kept[-1]["temp"] >= 64 * 2**20
  if expected is None:  # this machine: glibc >= 2.35, THP in madvise mode (as CI's)
    # The process printed its first line, was replaced by itself (same pid, same arguments),
    # printed it again, then ran with the tunable.
    assert [l["pid_before"] for l in restarted[:2]] == [restarted[-1]["pid"]] * 2
    assert restarted[-1]["argv"] == ["--an-argument"]
    assert restarted[-1]["tunables"] == "glibc.malloc.hugetlb=1"
    assert restarted[-1]["why"] == "GLIBC_TUNABLES already sets glibc.malloc.hugetlb"
    # 64 MiB mapped afresh at every call: ~16,000 faults of 4 KiB pages without the tunable,
    # a few dozen 2 MiB pages with it.
    assert kept[-1]["faults"] > 8000, kept[-1]
    assert restarted[-1]["faults"] < kept[-1]["faults"] / 10, (restarted, kept)
  else:  # a machine where the tunable cannot help: the process runs on as it was
    assert len(restarted) == 2 and restarted[-1]["why"] == expected
    assert restarted[-1]["tunables"] == ""


@pytest.mark.parametrize("module", ["mae_jax.main", "mae_jax.benchmark"])
def test_the_commands_restart_before_loading_jax(module):
  """The restart comes first in the commands' __main__ (a process replaced after jax and
  TensorFlow loaded would load them twice); `import` alone never restarts."""
  source = open(os.path.join(REPO, *module.split(".")) + ".py").read()
  head = source[:re.search(r"^(import|from) ", source, re.M).start()]  # before any import
  assert f'restart_with_huge_pages("{module}")' in head and 'if __name__ == "__main__":' in head


@pytest.fixture
def exec_calls(monkeypatch):
  """os.execve recorded instead of run, on a machine where the tunable would help."""
  calls = []
  monkeypatch.setattr(huge_pages, "_why_not_restarted", None)  # restored after the test
  monkeypatch.setattr(huge_pages, "reason_not_to_restart", lambda *args: None)
  monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
  return calls


@pytest.mark.parametrize("orig_argv", [
    ["python", "-m", "mae_jax.main", "--config=c.py"],
    ["python", "-X", "dev", "-mmae_jax.main"],
    ["python", "-Bm", "mae_jax.main"],
])
def test_the_command_run_as_itself_restarts_with_its_command_line(monkeypatch, exec_calls,
                                                                  orig_argv):
  monkeypatch.setattr(sys, "orig_argv", orig_argv)
  huge_pages.restart_with_huge_pages("mae_jax.main")
  [(path, argv, env)] = exec_calls
  assert path == sys.executable and argv == [sys.executable, *orig_argv[1:]]
  assert huge_pages.TUNABLE in env["GLIBC_TUNABLES"]


@pytest.mark.parametrize("orig_argv", [
    ["python", "my_run.py", "--config=c.py"],  # runpy.run_module("mae_jax.main", ...) inside
    ["python", "-c", "import runpy; runpy.run_module('mae_jax.main', run_name='__main__')"],
    ["python", "-m", "mae_jax.benchmark"],
    ["python", "/usr/bin/ipython"],  # %run -m mae_jax.main: a restart would end the session
])
def test_a_program_that_runs_the_command_is_left_as_it_is(monkeypatch, exec_calls, orig_argv):
  """Restarting a program of the user's would run all of it again, what it did before the
  command included; the log says how to get the pages anyway."""
  monkeypatch.setattr(sys, "orig_argv", orig_argv)
  why = huge_pages.restart_with_huge_pages("mae_jax.main")
  assert not exec_calls
  assert "python -m mae_jax.main" in why and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in why
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  assert why in huge_pages.status()


def test_a_script_that_asks_for_the_restart_itself_is_restarted(monkeypatch, exec_calls):
  monkeypatch.setattr(sys, "orig_argv", ["python", "my_run.py"])
  huge_pages.restart_with_huge_pages()
  assert [argv for _, argv, _ in exec_calls] == [[sys.executable, "my_run.py"]]


def test_a_restart_that_cannot_start_leaves_the_process_running(monkeypatch):
  def fail(*args):
    raise FileNotFoundError(2, "No such file or directory", "")
  monkeypatch.setattr(huge_pages, "_why_not_restarted", None)
  monkeypatch.setattr(huge_pages, "reason_not_to_restart", lambda *args: None)
  monkeypatch.setattr(os, "execve", fail)
  monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "mae_jax.main"])
  why = huge_pages.restart_with_huge_pages("mae_jax.main")
  assert "could not restart" in why and "No such file" in why


def test_a_script_running_the_command_through_runpy_runs_once(tmp_path):
  """End to end: a user's script that prints, then runs `mae_jax.main` as `__main__`."""
  script = tmp_path / "my_run.py"
  script.write_text(
      "import os, runpy, sys\n"
      "print('my script starts', os.getpid(), flush=True)\n"
      "sys.argv = ['mae_jax.main', '--no_such_flag']\n"
      "runpy.run_module('mae_jax.main', run_name='__main__')\n")
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "MAE_JAX_HUGE_PAGES")}
  environ.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, str(script)], env=environ, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stdout.count("my script starts") == 1, proc.stdout
  assert proc.stderr.count("no_such_flag") == 1, proc.stderr


def test_the_log_line_says_where_the_tunable_comes_from_and_how_to_go_without(monkeypatch):
  monkeypatch.setattr(huge_pages, "_why_not_restarted", None)
  tunables = "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  monkeypatch.setenv("GLIBC_TUNABLES", tunables)
  monkeypatch.delenv("MAE_JAX_HUGE_PAGES_RESTARTED", raising=False)
  # The user's own setting is named as such; one that mae_jax's restart set says how to go
  # without.
  assert huge_pages.status() == (
      f"host memory: GLIBC_TUNABLES={tunables} (from this process's environment)")
  monkeypatch.setenv("MAE_JAX_HUGE_PAGES_RESTARTED", "1")
  line = huge_pages.status()
  assert line.startswith(f"host memory: GLIBC_TUNABLES={tunables} (set by mae_jax.huge_pages")
  assert "MAE_JAX_HUGE_PAGES=0" in line
  monkeypatch.setenv("MAE_JAX_HUGE_PAGES", "0")
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert huge_pages.status() == (
      "host memory: glibc's default settings (MAE_JAX_HUGE_PAGES=0)")
