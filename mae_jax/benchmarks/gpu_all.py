"""Every GPU benchmark of BENCHMARKS.md in one call: mae_jax and the PyTorch reference side by side.

    python3 -m mae_jax.benchmarks.gpu_all --out=$OUT [--only=NAME,...] [--budget_s=540]

Made for one short lease of a GPU, where there may be no second call (BENCHMARKS.md, "GPU", says
how to run it with the device tool). In order:

1. Before anything runs: ml_collections (every config imports it; GPU images lack it) must be
   importable or its wheel in benchmarks/wheels/, else the script says how to fetch it and stops.
2. The environment: a bf16 XLA matmul's TFLOP/s (the measured MFU denominator), the device and
   the package versions.
3. A preflight of cuDNN's fused attention at each model's shapes (encoder at the timed mask
   ratio, decoder at full length; forward and backward, checked against XLA's attention). A size
   whose default kernel is cuDNN and whose preflight failed runs with XLA's attention instead,
   and its row says so (`attention_fallback`); every mae_jax row says which kernel ran.
4. The runs, most valuable first (`plan`): mae_jax and transformers' ViTMAE eager for ViT-L, B
   and H at batch 256 (the ViT-L run also writes a `jax.profiler` trace of three steps); the
   input pipeline with one worker per core beside the official PIL pipeline; torch.compile for
   ViT-L; the official models_mae.py for ViT-L (with --mae_repo); then mae_jax variants (remat,
   XLA's attention, XLA flags, scan, the guard as a branch) and the official B and H.
   Each run is its own process; one that its estimated time would take past --budget_s is
   skipped (and recorded so), one started is cut at the budget's end.

Each result is appended to OUT/results.jsonl as it comes; OUT/results.md gets the table (MFU
against the measured matmul, and against the card's datasheet figure beside it), OUT/gpu_all.log
every run's output tail, OUT/profile_vit_l.xplane.pb and OUT/profile_vit_l_top_ops.txt the ViT-L
profile (open the first with TensorBoard's or XProf's profile viewer).

`--tiny` runs the same plan with a 2-block model on 32x32 images: the check of this script on a
CPU (BENCHMARKS.md says how it was run).
"""

import argparse
import glob
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from mae_jax import official
from mae_jax.benchmarks import runner

# XLA GPU flags tried as one variant: overlap of independent work in the schedule, and cuBLAS
# instead of Triton for the plain matmuls.
XLA_GPU_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
ML_COLLECTIONS_WHEEL = "ml_collections-*.whl"
FETCH_WHEEL = ("python -m pip download ml-collections==1.1.0 --no-deps -d benchmarks/wheels")
PREFLIGHT = "cudnn_attention_preflight"
# The run whose train step is also profiled.
PROFILED = "ours_vit_l"
# Dense bf16 tensor-core TFLOP/s from NVIDIA's datasheets (without sparsity), by a substring of
# jax's device_kind; the first match counts.
DATASHEET_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4),
                         ("A100", 312.0))
# The sizes and shapes of every model the plan runs (config_lib.MODEL_SIZES, decoder 512 x 8 with
# 16 heads); kept here because this module must not import ml_collections before checking it.
SIZES = {"vit_b": dict(patch_size=16, embed_dim=768, num_heads=12),
         "vit_l": dict(patch_size=16, embed_dim=1024, num_heads=16),
         "vit_h": dict(patch_size=14, embed_dim=1280, num_heads=16)}
DECODER = dict(decoder_embed_dim=512, decoder_num_heads=16)
# --tiny: every size becomes this model on 32x32 images (the plan and its code paths unchanged).
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
            decoder_depth=2, decoder_num_heads=4)
MASK_RATIO = 0.75
# Time limit of the environment run and of the preflight.
SETUP_CAP_S = 120.0

ENV_CODE = ("import sys; from mae_jax.benchmarks.gpu_all import environment; "
            "environment(int(sys.argv[1]))")
PREFLIGHT_CODE = ("import sys; from mae_jax.benchmarks.gpu_all import preflight; "
                  "preflight(sys.argv[1])")


def ml_collections_problem(wheels: Optional[str] = None) -> Optional[str]:
  """What to do when the runs could not import ml_collections (an error message), or None."""
  wheels = wheels or runner.WHEELS
  if glob.glob(os.path.join(wheels, ML_COLLECTIONS_WHEEL)):
    return None
  if importlib.util.find_spec("ml_collections") is not None:
    return None
  return ("ml_collections is not installed here and benchmarks/wheels/ holds no "
          f"{ML_COLLECTIONS_WHEEL}; every run imports it (the configs), so nothing would run. "
          "On the machine that makes the device call, in the repository root, run\n"
          f"    {FETCH_WHEEL}\n"
          "and call the device tool again with carry [\"benchmarks/wheels\"] "
          "(BENCHMARKS.md, \"GPU\").")


def datasheet_tflops(device_kind: str) -> Optional[float]:
  """The card's dense bf16 datasheet TFLOP/s, or None for a card not in the table."""
  for key, tflops in DATASHEET_BF16_TFLOPS:
    if key.lower() in device_kind.lower():
      return tflops
  return None


def environment(peak_size: int) -> None:
  """Prints one JSON line: the bf16 matmul peak of device 0, the device and package versions."""
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mae_jax.benchmarks.step import matmul_peak_tflops  # pylint: disable=g-import-not-at-top

  versions = {"python": sys.version.split()[0]}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "torch",
               "transformers", "timm", "cv2", "PIL"):
    try:
      versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except ImportError as e:
      versions[name] = f"missing ({e})"
  kind = jax.devices()[0].device_kind
  print(json.dumps(dict(peak_tflops=matmul_peak_tflops(jnp.bfloat16, peak_size, 20),
                        device_kind=kind, datasheet_tflops=datasheet_tflops(kind),
                        backend=jax.default_backend(), device_count=jax.device_count(),
                        versions=versions)))


def attention_shapes(size: str, batch: int, model: Dict[str, Any]) -> Dict[str, List[int]]:
  """[batch, tokens, heads, head_dim] of the encoder's (at MASK_RATIO) and decoder's attention."""
  from mae_jax.models.functional import num_kept  # pylint: disable=g-import-not-at-top
  m = {**SIZES[size], **DECODER, "img_size": 224, **model}
  patches = (m["img_size"] // m["patch_size"]) ** 2
  return dict(
      encoder=[batch, 1 + num_kept(patches, MASK_RATIO), m["num_heads"],
               m["embed_dim"] // m["num_heads"]],
      decoder=[batch, 1 + patches, m["decoder_num_heads"],
               m["decoder_embed_dim"] // m["decoder_num_heads"]])


def check_attention(shape: List[int], impl: str, dtype: str = "bfloat16") -> Optional[str]:
  """Why `jax.nn.dot_product_attention(implementation=impl)` at `shape` fails its forward and
  backward pass, or is further than bf16 rounding from XLA's; None when it passes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  q, k, v, g = (jax.random.normal(key, shape, dtype)
                for key in jax.random.split(jax.random.key(0), 4))

  def forward_backward(implementation):
    def loss(q, k, v):
      out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
      return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return jax.device_get((out,) + grads)

  try:
    got = forward_backward(impl)
  except Exception as e:  # pylint: disable=broad-except  # any failure means: do not use it
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
  want = forward_backward("xla")
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    a, b = a.astype("float32"), b.astype("float32")
    err = float(abs(a - b).max() / max(float(abs(b).max()), 1e-6))
    if not math.isfinite(err) or err > 0.05:
      return f"{name} differs from XLA's by {err:.3g} (relative to its largest value)"
  return None


def preflight(spec_json: str) -> None:
  """Prints one JSON line: per size and part, the default kernel, and whether cuDNN's fused
  attention passed `check_attention` where it is the default."""
  from mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  spec = json.loads(spec_json)
  report = {}
  for size in spec["sizes"]:
    for part, shape in attention_shapes(size, spec["batch"], spec["model"]).items():
      default = vit.default_attention_impl("bfloat16", shape[-1])
      entry = dict(shape=shape, default=default)
      if default == "cudnn":
        start = time.perf_counter()
        entry["cudnn_error"] = check_attention(shape, "cudnn")
        entry["check_s"] = round(time.perf_counter() - start, 2)
      report[f"{size}/{part}"] = entry
      print(json.dumps({f"{size}/{part}": entry}), file=sys.stderr, flush=True)
  print(json.dumps(dict(attention=report)))


def attention_fallbacks(preflight_row: Dict[str, Any], sizes: List[str]) -> Dict[str, str]:
  """Sizes that must run XLA's attention, with why: those whose default kernel (for the encoder
  or the decoder) is cuDNN and failed the preflight, or every size if the preflight itself
  failed."""
  if preflight_row.get("status") != "ok":
    return {s: f"preflight {preflight_row.get('status')}: {preflight_row.get('error')}"
            for s in sizes}
  out = {}
  for key, entry in preflight_row["attention"].items():
    size, part = key.split("/")
    if entry["default"] == "cudnn" and entry.get("cudnn_error"):
      out[size] = f"cuDNN attention failed the preflight ({part}): {entry['cudnn_error']}"
  return out


def plan(batch: int, steps: int, warmup: int, mae_repo: Optional[str] = None,
         model: Optional[Dict[str, Any]] = None, profile_dir: Optional[str] = None,
         input_args: Optional[List[str]] = None) -> List[Dict[str, Any]]:
  """The runs, most valuable first: name, impl, size, est_s (a generous estimate of its wall
  time on one H100/H200, compilation included), cmd and xla_flags. `model` overrides fields of
  every model (--tiny); with `mae_repo` (a clone of facebookresearch/mae), the official
  models_mae.py too."""
  model = model or {}
  model_flags = [f"--config.model.{k}={v}" for k, v in model.items()]

  def ours(name, size, est_s, *flags, xla_flags=""):
    if name == PROFILED and profile_dir:
      flags += (f"--profile_dir={profile_dir}",)
    return dict(name=name, impl="mae_jax", size=size, est_s=est_s, xla_flags=xla_flags,
                cmd=["-m", "mae_jax.benchmark", f"--config=configs/{size}.py",
                     f"--batch_size={batch}", f"--steps={steps}", f"--warmup={warmup}",
                     *model_flags, *flags])

  def torch(name, size, est_s, *flags, impl="torch"):
    overrides = [f"--model_overrides={json.dumps(model)}"] if model else []
    return dict(name=name, impl=impl, size=size, est_s=est_s, xla_flags="",
                cmd=["-m", "mae_jax.benchmarks.torch_reference", f"--size={size}",
                     f"--batch_size={batch}", f"--steps={steps}", f"--warmup={warmup}",
                     *overrides, *flags])

  def official_eager(size, est_s):
    return torch(f"official_eager_{size}", size, est_s, "--impl=official",
                 f"--mae_repo={os.path.abspath(mae_repo)}", impl="official")

  cores = len(os.sched_getaffinity(0))
  runs = [
      ours(PROFILED, "vit_l", 80),
      torch("torch_eager_vit_l", "vit_l", 45),
      ours("ours_vit_b", "vit_b", 60),
      torch("torch_eager_vit_b", "vit_b", 35),
      ours("ours_vit_h", "vit_h", 110),
      torch("torch_eager_vit_h", "vit_h", 70),
      dict(name=f"input_pipeline_{cores}_workers", impl="input", size=None, est_s=45,
           xla_flags="", cmd=["-m", "mae_jax.benchmarks.input_pipeline", f"--workers={cores}",
                              *(input_args or ["--rounds=3"])]),
      torch("torch_compile_vit_l", "vit_l", 150, "--compile"),
  ]
  if mae_repo:
    runs.append(official_eager("vit_l", 50))
  runs += [
      ours("ours_vit_h_remat", "vit_h", 120, "--config.model.remat=true"),
      # The default takes cuDNN's flash attention on GPU; this is the same step with XLA's.
      ours("ours_vit_l_xla_attention", "vit_l", 80, "--config.model.attention_impl=xla"),
      ours("ours_vit_l_xla_flags", "vit_l", 80, xla_flags=XLA_GPU_FLAGS),
      ours("ours_vit_l_scan", "vit_l", 60, "--config.model.scan=true"),
      ours("ours_vit_h_scan_remat", "vit_h", 80, "--config.model.scan=true",
           "--config.model.remat=true"),
      # The non-finite guard as a branch (CPU's default) instead of a select.
      ours("ours_vit_l_guard_cond", "vit_l", 80, "--config.nonfinite_guard=cond"),
  ]
  if mae_repo:
    runs += [official_eager("vit_b", 40), official_eager("vit_h", 75)]
  return runs


def keep_profile(profile_dir: str, out: str, tag: str) -> Dict[str, str]:
  """Copies the trace (*.xplane.pb) and its top-ops summary from the nested folders that
  jax.profiler writes to `out` itself (the device tool returns files two folders deep at most),
  then removes the nested folder; the paths kept."""
  kept = {}
  traces = sorted(glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True),
                  key=os.path.getmtime)
  if traces:
    kept["trace"] = shutil.copy(traces[-1], os.path.join(out, f"profile_{tag}.xplane.pb"))
  summary = os.path.join(profile_dir, "profile_top_ops.txt")
  if os.path.exists(summary):
    kept["top_ops"] = shutil.copy(summary, os.path.join(out, f"profile_{tag}_top_ops.txt"))
  shutil.rmtree(profile_dir, ignore_errors=True)
  return kept


def _fmt(value: Optional[float], spec: str) -> str:
  return "" if value is None else format(value, spec)


def markdown(rows: List[Dict[str, Any]]) -> str:
  """The results table; each run's images/s also as a ratio to torch eager of the same size, its
  MFU against the measured bf16 XLA matmul and against the datasheet figure."""
  env = next((r for r in rows if "peak_tflops" in r and r.get("status") == "ok"), {})
  measured, sheet = env.get("peak_tflops"), env.get("datasheet_tflops")
  eager = {r["size"]: r["img_per_s"] for r in rows
           if r.get("name", "").startswith("torch_eager") and r["status"] == "ok"}
  lines = []
  if env:
    lines += [f"{env.get('device_kind')}: bf16 matmul {env['peak_tflops']:.4g} TFLOP/s measured "
              f"(XLA, {env['name']}); datasheet {_fmt(sheet, '.4g') or 'unknown'} TFLOP/s dense "
              f"bf16. Versions: {json.dumps(env.get('versions', {}))}", ""]
  for r in rows:
    if r.get("name") == PREFLIGHT:
      lines.append(f"cuDNN attention preflight ({r['status']}): "
                   f"{json.dumps(r.get('attention', r.get('error')))}\n")
  lines += ["| run | images/s | vs torch eager | model TFLOP/s | MFU of measured XLA matmul | "
            "MFU of datasheet | peak memory GB | compile s | attention | status |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "impl" not in r:
      continue
    if r["status"] != "ok":
      lines.append(f"| {r['name']} | | | | | | | | | {r['status']} |")
      continue
    if r["impl"] == "input":
      lines.append(f"| {r['name']} | {r['img_per_s']:,.0f} (PIL: {r['pil_img_per_s']:,.0f}); "
                   f"per core {r['img_per_s_per_core']:.0f} vs {r['pil_img_per_s_per_core']:.0f}"
                   f" ({r['ratio']:.2f}x) | | | | | | | | ok |")
      continue
    ratio = f"{r['img_per_s'] / eager[r['size']]:.2f}x" if r["size"] in eager else ""
    tflops = r.get("tflops")
    mfu = f"{100 * tflops / measured:.1f}%" if tflops and measured else ""
    mfu_sheet = f"{100 * tflops / sheet:.1f}%" if tflops and sheet else ""
    attention = r.get("attention") or {}
    attention = (f"{attention.get('encoder')}/{attention.get('decoder')}" if attention else "")
    if r.get("attention_fallback"):
      attention += " (fallback)"
    lines.append(f"| {r['name']} | {r['img_per_s']:,.0f} | {ratio} | {_fmt(tflops, '.0f')} | "
                 f"{mfu} | {mfu_sheet} | {_fmt(r.get('peak_memory_gb'), '.1f')} | "
                 f"{_fmt(r.get('compile_s'), '.0f')} | {attention} | ok |")
  return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
  """The flags, every problem refused before anything runs."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
  parser.add_argument("--budget_s", type=float, default=540.0,
                      help="Wall time of the whole call; a run whose estimate does not fit in "
                           "what is left is skipped, a run started is cut at the end.")
  parser.add_argument("--run_cap_s", type=float, default=200.0, help="Limit of one run.")
  parser.add_argument("--batch_size", type=int, default=None, help="Default 256 (4 with --tiny).")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--only", default="", help="Comma-separated run names (default: all).")
  parser.add_argument("--peak_size", type=int, default=None,
                      help="n of the n^3 peak matmul (default 8192; 256 with --tiny).")
  parser.add_argument("--mae_repo", default="",
                      help="A clone of https://github.com/facebookresearch/mae: also time the "
                           "official models_mae.py (needs timm).")
  parser.add_argument("--tiny", action="store_true",
                      help="A 2-block model on 32x32 images for every size: checks this script "
                           "end to end on a CPU in a few minutes.")
  args = parser.parse_args(argv)
  if args.mae_repo and (problem := official.repo_problem(args.mae_repo)):
    parser.error(problem)
  if args.batch_size is None:
    args.batch_size = 4 if args.tiny else 256
  if args.peak_size is None:
    args.peak_size = 256 if args.tiny else 8192
  names = [r["name"] for r in plan(1, 1, 0, args.mae_repo or None)]
  args.only = [n for n in args.only.split(",") if n]
  if unknown := [n for n in args.only if n not in names]:
    parser.error(f"--only names no run {unknown}; the runs are: {', '.join(names)}"
                 + ("" if args.mae_repo else " (and official_eager_vit_{l,b,h} with --mae_repo)"))
  if problem := ml_collections_problem():
    parser.error(problem)
  return args


def main(argv: Optional[List[str]] = None,
         run_python: Callable[..., Dict[str, Any]] = runner.run_python) -> List[Dict[str, Any]]:
  """Runs the plan (`run_python` runs one child; tests replace it); the rows recorded."""
  args = parse_args(argv)
  start = time.perf_counter()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  left = lambda: args.budget_s - (time.perf_counter() - start)
  model = TINY if args.tiny else None
  input_args = (["--num_files=16", "--rounds=1", "--batches=2", "--warmup=1", "--batch_size=8",
                 "--image_size=32"] if args.tiny else None)
  runs = plan(args.batch_size, args.steps, args.warmup, args.mae_repo or None, model,
              os.path.join(out, "trace_vit_l"), input_args)
  if args.only:
    runs = [r for r in runs if r["name"] in args.only]
  rows = []
  with open(os.path.join(out, "results.jsonl"), "a") as results, \
       open(os.path.join(out, "gpu_all.log"), "a") as log:

    def record(row):
      rows.append(row)
      results.write(json.dumps(row) + "\n")
      results.flush()
      print(json.dumps(row), flush=True)

    # The environment and the preflight come first and take seconds: they run whatever the budget.
    env = run_python(["-c", ENV_CODE, str(args.peak_size)], "", SETUP_CAP_S, log)
    record(dict(env, name=f"jax_bf16_matmul_{args.peak_size}"))
    peak_flag = [f"--peak_tflops={env['peak_tflops']}"] if env["status"] == "ok" else []
    sizes = sorted({r["size"] for r in runs if r["impl"] == "mae_jax"})
    fallbacks = {}
    if sizes:
      spec = json.dumps(dict(sizes=sizes, batch=args.batch_size, model=model or {}))
      check = run_python(["-c", PREFLIGHT_CODE, spec], "", SETUP_CAP_S, log)
      record(dict(check, name=PREFLIGHT))
      fallbacks = attention_fallbacks(check, sizes)
    for run in runs:
      meta = dict(name=run["name"], impl=run["impl"], size=run["size"], est_s=run["est_s"],
                  xla_flags_added=run["xla_flags"])
      cmd = list(run["cmd"])
      if run["impl"] == "mae_jax":
        cmd += peak_flag
        explicit = any(c.startswith("--config.model.attention_impl=") for c in cmd)
        if run["size"] in fallbacks and not explicit:
          cmd.append("--config.model.attention_impl=xla")
          meta["attention_fallback"] = fallbacks[run["size"]]
      if left() < run["est_s"]:
        record(dict(meta, status=f"skipped (time budget: {left():.0f} s left, estimate "
                                 f"{run['est_s']} s)"))
        continue
      result = {**run_python(cmd, run["xla_flags"], min(args.run_cap_s, left()), log), **meta}
      if run["impl"] in ("torch", "official") and result["status"] == "ok" and peak_flag:
        result["mfu"] = result["tflops"] / env["peak_tflops"]
      if run["name"] == PROFILED:
        result["profile_kept"] = keep_profile(os.path.join(out, "trace_vit_l"), out, "vit_l")
      record(result)
  table = markdown(rows)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  print(table)
  return rows


if __name__ == "__main__":
  main()
