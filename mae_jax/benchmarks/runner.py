"""Runs one benchmark command in a child process, for the one-call suites (gpu_all, cpu_all).

Each run gets a fresh interpreter (fresh device memory, its own XLA_FLAGS, no state carried from
one run into the next), the repository and any wheels in benchmarks/wheels/ on its PYTHONPATH,
and its own process group, so that a run cut at its time limit takes its worker processes with
it. Its result is the last stdout line that parses as a JSON object.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Set, TextIO

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Pure-Python wheels a GPU image lacks (ml-collections), put on each run's PYTHONPATH as they are.
WHEELS = os.path.join(REPO, "benchmarks", "wheels")


def child_env(xla_flags: str = "") -> Dict[str, str]:
  """This process's environment with the wheels and the repository first on PYTHONPATH and
  `xla_flags` added to XLA_FLAGS."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  paths = sorted(glob.glob(os.path.join(WHEELS, "*.whl"))) + [REPO]
  env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
  flags = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
  if flags:
    env["XLA_FLAGS"] = flags
  return env


def last_json(text: str) -> Optional[Dict[str, Any]]:
  """The last line of `text` that is a JSON object, or None."""
  for line in reversed(text.strip().splitlines()):
    if line.startswith("{"):
      try:
        value = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(value, dict):
        return value
  return None


def run_python(cmd: List[str], xla_flags: str, timeout: float, log: TextIO,
               cpus: Optional[Set[int]] = None) -> Dict[str, Any]:
  """Runs `python cmd...` (on `cpus` only, when given) for at most `timeout` seconds.

  Returns its last JSON line with status "ok" and wall_s, or status "timed out" / "failed (rc
  N)" with the end of its stderr. Its output tail goes to `log`.
  """
  start = time.perf_counter()

  def setup():
    if cpus:
      os.sched_setaffinity(0, cpus)

  proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=child_env(xla_flags),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, preexec_fn=setup)
  try:
    out, err = proc.communicate(timeout=max(timeout, 1.0))
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the run and every worker it started
    out, err = proc.communicate()
    rc = None
  wall = time.perf_counter() - start
  log.write(f"\n=== {' '.join(cmd)} (XLA_FLAGS added: {xla_flags!r}) rc={rc} {wall:.0f} s\n")
  log.write(out[-4000:] + "\n--- stderr ---\n" + err[-4000:] + "\n")
  log.flush()
  result = last_json(out)
  if rc == 0 and result is not None:
    return dict(result, status="ok", wall_s=wall)
  status = "timed out" if rc is None else f"failed (rc {rc})"
  return dict(status=status, wall_s=wall, error=err.strip().splitlines()[-5:])
