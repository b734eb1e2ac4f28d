"""The CPU figures of BENCHMARKS.md in one call: mae_jax beside the PyTorch reference.

    python -m mae_jax.benchmarks.cpu_all --out=benchmarks/out_cpu [--rounds=2] \
        [--mae_repo=/path/to/facebookresearch/mae]

ViT-B/16 at batch 4 in float32 (optimizer included) at mask ratio 0.75 and 0.0, for mae_jax and
for transformers' ViTMAE (mae_jax.benchmarks.torch_reference), and the demo config; with
`--mae_repo` (a clone of the official code, and timm installed), for the official models_mae.py
too. The runs go
round-robin, `--rounds` times, each in its own process, and each run keeps its fastest round: on
a machine that others load too, every implementation then gets the same chances. Results go to
OUT/results.jsonl (every round) and OUT/results.md (the table and the 0.0 / 0.75 step-time
ratios beside the FLOP ratio).
"""

import argparse
import json
import os
from typing import Any, Dict, List, Optional

from mae_jax import config_lib
from mae_jax import official
from mae_jax.benchmarks import runner
from mae_jax.benchmarks.flops import timed_mask_ratio, train_flops_per_image

RATIOS = (0.75, 0.0)


def plan(batch: int, steps: int, warmup: int, mae_repo: Optional[str] = None,
         variant_xla_flags: str = "") -> List[Dict[str, Any]]:
  """The runs of one round: name, implementation, mask ratio, command and the XLA_FLAGS added.

  With `variant_xla_flags`, mae_jax's ViT-B runs are repeated with those flags added (runs
  named ours_flags_...), so that a compiler setting is timed beside the default in one round.
  """
  runs = []
  for ratio in RATIOS:
    ours = ["-m", "mae_jax.benchmark", "--config=configs/vit_b.py", f"--batch_size={batch}",
            f"--steps={steps}", f"--warmup={warmup}", f"--mask_ratio={ratio}",
            "--config.model.dtype=float32"]
    runs.append(dict(name=f"ours_vit_b_mask{ratio}", impl="mae_jax", mask_ratio=ratio, cmd=ours))
    if variant_xla_flags:
      runs.append(dict(name=f"ours_flags_vit_b_mask{ratio}", impl="mae_jax", mask_ratio=ratio,
                       cmd=ours, xla_flags=variant_xla_flags))
    runs.append(dict(name=f"torch_vit_b_mask{ratio}", impl="torch", mask_ratio=ratio,
                     cmd=["-m", "mae_jax.benchmarks.torch_reference", "--size=vit_b",
                          f"--batch_size={batch}", f"--steps={steps}", f"--warmup={warmup}",
                          f"--mask_ratio={ratio}"]))
    if mae_repo:
      runs.append(dict(name=f"official_vit_b_mask{ratio}", impl="official", mask_ratio=ratio,
                       cmd=["-m", "mae_jax.benchmarks.torch_reference", "--size=vit_b",
                            "--impl=official", f"--mae_repo={os.path.abspath(mae_repo)}",
                            f"--batch_size={batch}", f"--steps={steps}", f"--warmup={warmup}",
                            f"--mask_ratio={ratio}"]))
  runs.append(dict(name="ours_demo", impl="mae_jax", mask_ratio=0.75,
                   cmd=["-m", "mae_jax.benchmark", "--config=configs/demo.py",
                        f"--steps={steps}", f"--warmup={warmup}"]))
  return runs


def best(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
  """Each run's fastest successful round, by name."""
  out = {}
  for r in rows:
    if r["status"] == "ok" and (r["name"] not in out or r["step_s"] < out[r["name"]]["step_s"]):
      out[r["name"]] = r
  return out


def markdown(rows: List[Dict[str, Any]], batch: int) -> str:
  """The table of best rounds and the mask-ratio step-time ratios."""
  top = best(rows)
  lines = ["| run | images/s | step s | model GFLOP/s | rounds ok |", "|---|---|---|---|---|"]
  for name in dict.fromkeys(r["name"] for r in rows):
    ok = sum(r["name"] == name and r["status"] == "ok" for r in rows)
    total = sum(r["name"] == name for r in rows)
    if name in top:
      r = top[name]
      lines.append(f"| {name} | {r['img_per_s']:.3f} | {r['step_s']:.3f} | "
                   f"{1e3 * r['tflops']:.1f} | {ok}/{total} |")
    else:
      lines.append(f"| {name} | | | | {ok}/{total} |")
  m = config_lib.model_config("vit_b")
  zero = timed_mask_ratio(0.0, (m.img_size // m.patch_size) ** 2)
  flop_ratio = train_flops_per_image(m, zero) / train_flops_per_image(m, 0.75)
  lines.append("")
  lines.append(f"ViT-B/16 batch {batch}, step time at mask ratio 0.0 (timed with one patch "
               f"masked, so that the loss is defined) over 0.75 (FLOP ratio {flop_ratio:.2f}):")
  for impl in ("ours", "ours_flags", "torch", "official"):
    a, b = top.get(f"{impl}_vit_b_mask0.0"), top.get(f"{impl}_vit_b_mask0.75")
    if a and b:
      lines.append(f"- {impl}: {a['step_s'] / b['step_s']:.2f}")
  for ratio in RATIOS:
    for ours in ("ours", "ours_flags"):
      for other in ("torch", "official"):
        a, b = top.get(f"{ours}_vit_b_mask{ratio}"), top.get(f"{other}_vit_b_mask{ratio}")
        if a and b:
          lines.append(f"- {ours} / {other} images/s at {ratio}: "
                       f"{a['img_per_s'] / b['img_per_s']:.2f}")
  return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="benchmarks/out_cpu")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--run_cap_s", type=float, default=900.0, help="Limit of one run.")
  parser.add_argument("--only", default="", help="Comma-separated run names (default: all).")
  parser.add_argument("--mae_repo", default="",
                      help="A clone of https://github.com/facebookresearch/mae: also time the "
                           "official models_mae.py (needs timm).")
  parser.add_argument("--cpus", default="",
                      help="Comma-separated CPU ids every run is pinned to (default: all). One "
                           "core each keeps a comparison fair on a machine that others load: "
                           "no thread of either side then waits on a descheduled sibling.")
  parser.add_argument("--variant_xla_flags", default="",
                      help="XLA_FLAGS for a second set of mae_jax ViT-B runs (ours_flags_...), "
                           "timed in the same rounds as the default.")
  args = parser.parse_args(argv)
  if args.mae_repo and (problem := official.repo_problem(args.mae_repo)):
    parser.error(problem)
  os.makedirs(args.out, exist_ok=True)
  only = set(filter(None, args.only.split(",")))
  cpus = {int(c) for c in args.cpus.split(",") if c}
  rows = []
  with open(os.path.join(args.out, "results.jsonl"), "a") as results, \
       open(os.path.join(args.out, "cpu_all.log"), "a") as log:
    for round_index in range(args.rounds):
      for run in plan(args.batch_size, args.steps, args.warmup, args.mae_repo or None,
                      args.variant_xla_flags):
        if only and run["name"] not in only:
          continue
        load = os.getloadavg()[0]
        flags = run.get("xla_flags", "")
        result = runner.run_python(run["cmd"], flags, args.run_cap_s, log, cpus)
        row = {**result, "name": run["name"], "impl": run["impl"], "xla_flags_added": flags,
               "mask_ratio": run["mask_ratio"], "round": round_index,
               "load_avg_1min_before": load, "cpus": sorted(cpus) or "all"}
        rows.append(row)
        results.write(json.dumps(row) + "\n")
        results.flush()
        print(json.dumps(row), flush=True)
  table = markdown(rows, args.batch_size)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
