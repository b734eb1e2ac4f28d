"""Every GPU benchmark of BENCHMARKS.md in one call: mae_jax and the PyTorch reference side by side.

    python3 -m mae_jax.benchmarks.gpu_all --out=$OUT

Made for a short lease of one GPU (BENCHMARKS.md, "GPU" says how to run it with the device
tool). Runs, most important first, each in its own process (fresh device memory, its own
XLA_FLAGS): a bf16 matmul peak; mae_jax ViT-L/B/H at batch 256 beside transformers' ViTMAE
eager (bf16 autocast, fused AdamW), ViT-L also with XLA's attention instead of cuDNN's;
torch.compile for ViT-L; then mae_jax variants (remat for ViT-H, XLA flags, scan). A run that
would not finish inside --budget_s is skipped and recorded as such. Each result is appended to
OUT/results.jsonl as it comes; OUT/results.md gets the table, OUT/gpu_all.log every run's
output tail.

ml_collections (which the configs need) is not on the GPU image: its pure-Python wheel in
benchmarks/wheels/ (`pip download ml-collections==1.1.0 --no-deps -d benchmarks/wheels`) is put
on the runs' PYTHONPATH.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Set

from mae_jax import official

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEELS = os.path.join(REPO, "benchmarks", "wheels")
# XLA GPU flags tried as one variant: overlap of independent work in the schedule, and cuBLAS
# instead of Triton for the plain matmuls.
XLA_GPU_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
# A run is started only with this much of the budget left (a ViT step compiles in tens of s).
MIN_RUN_S = 45.0
ENV_CODE = ("import sys; from mae_jax.benchmarks.gpu_all import environment; "
            "environment(int(sys.argv[1]))")


def environment(peak_size: int) -> None:
  """Prints one JSON line: the bf16 matmul peak of device 0, the device and package versions."""
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mae_jax.benchmark import matmul_peak_tflops  # pylint: disable=g-import-not-at-top

  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "torch",
               "transformers"):
    try:
      versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except ImportError as e:
      versions[name] = f"missing ({e})"
  print(json.dumps(dict(peak_tflops=matmul_peak_tflops(jnp.bfloat16, peak_size, 20),
                        device_kind=jax.devices()[0].device_kind,
                        device_count=jax.device_count(), versions=versions)))


def plan(batch: int, steps: int, warmup: int,
         mae_repo: Optional[str] = None) -> List[Dict[str, Any]]:
  """The runs in priority order: name, implementation, size, extra flags and environment;
  with `mae_repo` (a clone of facebookresearch/mae), the official models_mae.py last."""

  def ours(name, size, *flags, xla_flags=""):
    return dict(name=name, impl="mae_jax", size=size, xla_flags=xla_flags,
                cmd=["-m", "mae_jax.benchmark", f"--config=configs/{size}.py",
                     f"--batch_size={batch}", f"--steps={steps}", f"--warmup={warmup}", *flags])

  def torch(name, size, *flags):
    return dict(name=name, impl="torch", size=size, xla_flags="",
                cmd=["-m", "mae_jax.benchmarks.torch_reference", f"--size={size}",
                     f"--batch_size={batch}", f"--steps={steps}", "--warmup=5", *flags])

  official = [] if not mae_repo else [
      dict(torch(f"official_eager_{size}", size, "--impl=official",
                 f"--mae_repo={os.path.abspath(mae_repo)}"), impl="official")
      for size in ("vit_l", "vit_b", "vit_h")]
  return [
      ours("ours_vit_l", "vit_l"),
      torch("torch_eager_vit_l", "vit_l"),
      # The default takes cuDNN's flash attention on GPU; this is the same step with XLA's.
      ours("ours_vit_l_xla_attention", "vit_l", "--config.model.attention_impl=xla"),
      ours("ours_vit_b", "vit_b"),
      torch("torch_eager_vit_b", "vit_b"),
      ours("ours_vit_h", "vit_h"),
      torch("torch_eager_vit_h", "vit_h"),
      torch("torch_compile_vit_l", "vit_l", "--compile"),
      ours("ours_vit_h_remat", "vit_h", "--config.model.remat=true"),
      ours("ours_vit_l_xla_flags", "vit_l", xla_flags=XLA_GPU_FLAGS),
      ours("ours_vit_l_scan", "vit_l", "--config.model.scan=true"),
      ours("ours_vit_h_scan_remat", "vit_h", "--config.model.scan=true",
           "--config.model.remat=true"),
      # The non-finite guard as a branch (CPU's default) instead of a select.
      ours("ours_vit_l_guard_cond", "vit_l", "--config.nonfinite_guard=cond"),
  ] + official


def _env(xla_flags: str) -> Dict[str, str]:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  paths = sorted(glob.glob(os.path.join(WHEELS, "*.whl"))) + [REPO]
  env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
  flags = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
  if flags:
    env["XLA_FLAGS"] = flags
  return env


def run_python(cmd: List[str], xla_flags: str, timeout: float, log,
               cpus: Optional[Set[int]] = None) -> Dict[str, Any]:
  """Runs one python command (on `cpus` only, when given); its last stdout line parsed as JSON,
  or why it failed."""
  start = time.perf_counter()
  pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
  try:
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=_env(xla_flags),
                          capture_output=True, text=True, timeout=timeout, check=False,
                          preexec_fn=pin)
    out, err, rc = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    out, err, rc = e.stdout or "", e.stderr or "", None
    out, err = (s.decode() if isinstance(s, bytes) else s for s in (out, err))
  wall = time.perf_counter() - start
  log.write(f"\n=== {' '.join(cmd)} (XLA_FLAGS={xla_flags!r}) rc={rc} {wall:.0f} s\n")
  log.write(out[-4000:] + "\n--- stderr ---\n" + err[-4000:] + "\n")
  log.flush()
  lines = out.strip().splitlines()
  if rc == 0 and lines:
    try:
      return dict(json.loads(lines[-1]), status="ok", wall_s=wall)
    except json.JSONDecodeError:
      pass
  status = "timed out" if rc is None else f"failed (rc {rc})"
  return dict(status=status, wall_s=wall, error=err.strip().splitlines()[-5:])


def markdown(rows: List[Dict[str, Any]]) -> str:
  """The results table; each run's images/s also as a ratio to torch eager of the same size."""
  eager = {r["size"]: r["img_per_s"] for r in rows
           if r.get("name", "").startswith("torch_eager") and r["status"] == "ok"}
  head = ("| run | images/s | vs torch eager | model TFLOP/s | MFU | peak memory GB | "
          "compile s | status |\n|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    if "peak_tflops" in r:
      lines.insert(0, f"{r['name']}: {r['peak_tflops']:.4g} TFLOP/s (the MFU denominator)\n")
    if "size" not in r:
      continue
    if r["status"] != "ok":
      lines.append(f"| {r['name']} | | | | | | | {r['status']} |")
      continue
    ratio = f"{r['img_per_s'] / eager[r['size']]:.2f}x" if r["size"] in eager else ""
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    mem = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else ""
    comp = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else ""
    lines.append(f"| {r['name']} | {r['img_per_s']:,.0f} | {ratio} | {r['tflops']:.0f} | {mfu} "
                 f"| {mem} | {comp} | ok |")
  return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
  parser.add_argument("--budget_s", type=float, default=480.0,
                      help="Total wall time; runs that would pass it are skipped.")
  parser.add_argument("--run_cap_s", type=float, default=150.0, help="Limit of one run.")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--only", default="", help="Comma-separated run names (default: all).")
  parser.add_argument("--peak_size", type=int, default=8192, help="n of the n^3 peak matmul.")
  parser.add_argument("--mae_repo", default="",
                      help="A clone of https://github.com/facebookresearch/mae: also time the "
                           "official models_mae.py (needs timm), after everything else.")
  args = parser.parse_args(argv)
  if args.mae_repo and (problem := official.repo_problem(args.mae_repo)):
    parser.error(problem)
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  rows = []
  with open(os.path.join(args.out, "results.jsonl"), "a") as results, \
       open(os.path.join(args.out, "gpu_all.log"), "a") as log:

    def record(row):
      rows.append(row)
      results.write(json.dumps(row) + "\n")
      results.flush()
      print(json.dumps(row), flush=True)

    peak = run_python(["-c", ENV_CODE, str(args.peak_size)], "", args.run_cap_s, log)
    record(dict(peak, name=f"jax_bf16_matmul_{args.peak_size}"))
    peak_flag = ([f"--peak_tflops={peak['peak_tflops']}"] if peak["status"] == "ok" else [])
    only = set(filter(None, args.only.split(",")))
    for run in plan(args.batch_size, args.steps, args.warmup, args.mae_repo or None):
      if only and run["name"] not in only:
        continue
      left = args.budget_s - (time.perf_counter() - start)
      meta = dict(name=run["name"], impl=run["impl"], size=run["size"],
                  xla_flags_added=run["xla_flags"])
      if left < MIN_RUN_S:
        record(dict(meta, status="skipped (time budget)"))
        continue
      cmd = run["cmd"] + (peak_flag if run["impl"] == "mae_jax" else [])
      result = {**run_python(cmd, run["xla_flags"], min(args.run_cap_s, left), log), **meta}
      if run["impl"] != "mae_jax" and result["status"] == "ok" and peak_flag:
        result["mfu"] = result["tflops"] / peak["peak_tflops"]
      record(result)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(markdown(rows))
  print(markdown(rows))


if __name__ == "__main__":
  main()
