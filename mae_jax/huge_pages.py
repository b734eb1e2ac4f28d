"""Transparent huge pages for XLA:CPU's step buffers: glibc's `glibc.malloc.hugetlb` tunable.

XLA:CPU allocates an executable's temporary buffer afresh at every call (584 MB for the ViT-B/16
batch-4 float32 training step). glibc serves a block that large with a fresh mmap, and the
kernel maps it page by page, 4 KiB at a time, as the step first writes it: about 152,000 page
faults and 0.26-0.32 s of system CPU time every step on the project's 2-core CPU machine, inside
the ops that first write each of its buffers. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc
2.35 or later) malloc asks the kernel (madvise MADV_HUGEPAGE) to back such blocks with 2 MiB
pages wherever transparent huge pages are in `madvise` mode, the default of most
distributions: about 800 faults a step, and the step 6-18% faster (BENCHMARKS.md, "CPU").

glibc reads its tunables once, when a process starts, so the setting needs a new process:
`restart_with_huge_pages()`, called by the command-line entry points (`mae_jax.main`,
`mae_jax.benchmark`) before jax starts, replaces the process with itself (`os.execve`: same
pid, arguments and environment, plus the tunable) when all of this holds:

- the process was started as the command itself, `python [options] -m mae_jax.main ...`: a
  program of the user's that runs the command (`runpy`, `%run -m` in IPython, a notebook)
  would be run again from its start, so it is left as it is and the log says to give it
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment instead;
- Linux with glibc >= 2.35 and transparent huge pages in `madvise` mode (in `always` mode the
  blocks get huge pages without it; in `never` mode they cannot);
- jax will run on the CPU (JAX_PLATFORMS names cpu first, or no GPU plugin is installed and no
  TPU is attached): accelerator hosts are left exactly as they are;
- GLIBC_TUNABLES does not already set `glibc.malloc.hugetlb` (the user's choice stays);
- MAE_JAX_HUGE_PAGES is not `0`: `MAE_JAX_HUGE_PAGES=0 python -m mae_jax.main ...` runs as
  before.

The numbers do not change: only how the kernel maps memory.
"""

import importlib.metadata
import importlib.util
import os
import re
import sys
from typing import Mapping, Optional, Tuple

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "MAE_JAX_HUGE_PAGES"
RESTARTED = "MAE_JAX_HUGE_PAGES_RESTARTED"  # set in the environment of the restarted process
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_ENABLED) -> Optional[str]:
  """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'), the bracketed
  word of `path`; None where the file is missing or unreadable (not Linux, or no THP)."""
  try:
    with open(path, encoding="ascii") as f:
      match = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def glibc_version() -> Optional[Tuple[int, int]]:
  """(major, minor) of the C library this process runs on when it is glibc, else None."""
  try:
    text = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; missing on musl and macOS
  except (AttributeError, ValueError, OSError):
    return None
  match = re.fullmatch(r"glibc (\d+)\.(\d+).*", text or "")
  return (int(match.group(1)), int(match.group(2))) if match else None


def runs_on_cpu(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether jax will pick the CPU in this environment, decided without starting jax:
  JAX_PLATFORMS's first platform when it is set; otherwise True unless a PJRT plugin (jax's
  `jax_plugins` entry points, e.g. the CUDA plugins) is installed or libtpu is installed on a
  machine with a TPU attached (jax's own check)."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  if importlib.util.find_spec("jax_plugins") is not None:  # plugins found by namespace package
    return False
  if importlib.util.find_spec("libtpu") is not None:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    return not cloud_tpu_init.running_in_cloud_tpu_vm
  return True


def reason_not_to_restart(environ: Mapping[str, str], thp: Optional[str],
                          glibc: Optional[Tuple[int, int]], on_cpu: bool) -> Optional[str]:
  """Why the process should stay as it is (a short phrase), or None to restart it with the
  tunable; `thp`, `glibc` and `on_cpu` as `thp_mode()`, `glibc_version()`, `runs_on_cpu()`."""
  if environ.get(OPT_OUT, "") == "0":
    return f"{OPT_OUT}=0"
  if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return f"GLIBC_TUNABLES already sets {TUNABLE}"
  if environ.get(RESTARTED):  # the tunable did not reach the new process: never loop
    return f"restarted once already, and GLIBC_TUNABLES lost {TUNABLE} on the way"
  if glibc is None or glibc < MIN_GLIBC:
    return "not glibc 2.35 or later"
  if thp == "always":
    return "transparent huge pages are in `always` mode: large blocks get them without the tunable"
  if thp != "madvise":
    return f"transparent huge pages are {thp or 'unavailable'}, not madvise"
  if not on_cpu:
    return "jax runs on an accelerator"
  return None


def environment_with_tunable(environ: Mapping[str, str]) -> dict:
  """`environ` with `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES (kept otherwise), and the
  RESTARTED marker, which keeps a process from restarting twice (were a wrapper between the
  interpreter and its executable to drop GLIBC_TUNABLES, it would otherwise restart forever)."""
  env = dict(environ)
  env[RESTARTED] = "1"
  env["GLIBC_TUNABLES"] = ":".join(
      t for t in (environ.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1") if t)
  return env


def program(orig_argv) -> Tuple[str, str]:
  """What the interpreter command line `orig_argv` (sys.orig_argv) runs: ("-m", module),
  ("-c", code), ("script", path), or ("-", "") for a program read from standard input
  (`python -` or `python < file`). Options are read as CPython reads them: grouped ones
  (`-Bm mae_jax.main`), and -X / -W / --check-hash-based-pycs with their values."""
  args = list(orig_argv[1:])
  while args:
    arg = args.pop(0)
    if arg == "-":
      return ("-", "")
    if arg == "--":
      return ("script", args[0]) if args else ("-", "")
    if not arg.startswith("-"):
      return ("script", arg)
    if arg.startswith("--"):
      args = args[1:] if arg == "--check-hash-based-pycs" else args
      continue
    for i, flag in enumerate(arg[1:], start=2):
      if flag in "cm":  # the rest of the argument, or the next one, is the program
        return ("-" + flag, arg[i:] or (args[0] if args else ""))
      if flag in "XW":  # the rest of the argument, or the next one, is the option's value
        args = args if arg[i:] else args[1:]
        break
  return ("-", "")


_why_not_restarted: Optional[str] = None  # what restart_with_huge_pages() last answered


def restart_with_huge_pages(module: Optional[str] = None) -> Optional[str]:
  """Replaces this process with itself under `glibc.malloc.hugetlb=1` where the module's
  conditions hold (then it does not return); otherwise returns why not (a short phrase, for
  logs, which `status()` repeats). Call it first thing in a command's `__main__`, before jax
  has started: the new process runs the same command line (`sys.orig_argv`) with the same pid,
  open files and environment. With `module` ("mae_jax.main"), only a process started as
  `python -m module` restarts: any other program that runs the module is left as it is, since
  the restart would run all of it again. An `os.execve` that fails leaves the process running.
  """
  global _why_not_restarted
  _why_not_restarted = _reason_not_to_restart_this_process(module)
  if _why_not_restarted is not None:
    return _why_not_restarted
  sys.stdout.flush()
  sys.stderr.flush()
  argv = [sys.executable, *sys.orig_argv[1:]]
  try:
    os.execve(sys.executable, argv, environment_with_tunable(os.environ))
  except OSError as e:  # e.g. no usable sys.executable in an embedded interpreter
    _why_not_restarted = f"could not restart {sys.executable!r}: {e}"
  return _why_not_restarted


def _reason_not_to_restart_this_process(module: Optional[str]) -> Optional[str]:
  why = reason_not_to_restart(os.environ, thp_mode(), glibc_version(), runs_on_cpu())
  if why is not None:
    return why
  started_as = program(sys.orig_argv)
  if started_as[0] == "-" or sys.flags.interactive:
    return "the program came from standard input or runs interactively"  # cannot run twice
  if module is not None and started_as != ("-m", module):
    return (f"started by another program than `python -m {module}`, which a restart would run "
            f"again; GLIBC_TUNABLES={TUNABLE}=1 in its environment gives the 2 MiB pages")
  return None


def status() -> str:
  """One line for a run's log: whether this process runs with huge pages for its buffers."""
  if TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
    source = (f"set by mae_jax.huge_pages; {OPT_OUT}=0 keeps mae_jax from setting it"
              if os.environ.get(RESTARTED) else "from this process's environment")
    return f"host memory: GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']} ({source})"
  why = _why_not_restarted or reason_not_to_restart(os.environ, thp_mode(), glibc_version(),
                                                    runs_on_cpu())
  return f"host memory: glibc's default settings ({why or 'not restarted'})"
