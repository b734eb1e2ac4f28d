"""Throughput of the real pretraining step on the local devices (`python -m mae_jax.benchmark`).

    python -m mae_jax.benchmark --config=configs/vit_l.py --batch_size=256 --steps=20 \
        [--config.FIELD=VALUE ...] [--peak_tflops=F] [--mask_ratio=R] [--warmup=N] \
        [--profile_dir=DIR]

Runs `mae_jax.train`'s jitted step (forward, backward, AdamW update, donated state) on random
images placed on the devices with the trainer's batch sharding. Compilation and `--warmup` steps
are excluded from the timing; the timed steps are dispatched back to back and synchronized once
at the end. Prints a few readable lines, then one JSON object as the last line (img_per_s, tflops,
mfu, peak_memory_gb, compile_s, ...). With `--profile_dir`, a few more steps run afterwards under
`jax.profiler.trace` and the JSON names the trace files. Imports no TensorFlow: GPU hosts need
none. `mae_jax/benchmark.py` is the command's entry point; the code lives here, so that the
benchmarks package never imports upwards.
"""

import collections
import glob
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from mae_jax import models
from mae_jax import train
from mae_jax.trainer import peak_memory
from mae_jax.models import vit
from mae_jax.benchmarks.flops import timed_mask_ratio, train_flops_per_image

# Matmul sizes for the measured peak: large enough to saturate an accelerator, small enough to
# take about a second on a laptop CPU.
PEAK_MATMUL_SIZE = {"cpu": 2048}
DEFAULT_PEAK_MATMUL_SIZE = 8192


def matmul_peak_tflops(dtype: Any, size: Optional[int] = None, reps: int = 10) -> float:
  """Measured TFLOP/s of one device on a size^3 matmul in `dtype` (the MFU denominator)."""
  size = size or PEAK_MATMUL_SIZE.get(jax.default_backend(), DEFAULT_PEAK_MATMUL_SIZE)
  device = jax.local_devices()[0]
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(ka, (size, size), dtype), device)
  b = jax.device_put(jax.random.normal(kb, (size, size), dtype), device)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  start = time.perf_counter()
  outs = [matmul(a, b) for _ in range(reps)]
  jax.block_until_ready(outs)
  return 2 * size**3 * reps / (time.perf_counter() - start) / 1e12


def apply_overrides(config: ml_collections.ConfigDict, batch_size: Optional[int],
                    mask_ratio: Optional[float]) -> ml_collections.ConfigDict:
  """The config with the benchmark's --batch_size and --mask_ratio (when given) applied."""
  if config.get("mode", "pretrain") != "pretrain":
    raise ValueError(f"config.mode={config.mode!r}: the benchmark times the pretraining step; "
                     f"use a pretraining config (configs/vit_b.py, vit_l.py, vit_h.py, demo.py).")
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  if batch_size is not None:
    config.input.batch_size = batch_size
  if mask_ratio is not None:
    config.model.mask_ratio = mask_ratio
  m = config.model
  try:
    patches = models.num_patches(m.img_size, m.patch_size) if m.patch_size > 0 else 0
  except ValueError:  # reported by the config checks
    patches = 0
  if patches:
    timed = timed_mask_ratio(m.mask_ratio, patches)
    if timed != m.mask_ratio:
      logging.warning("mask ratio %s masks no patch (the loss would be 0/0): timing %.5f, "
                      "one patch masked.", m.mask_ratio, timed)
      m.mask_ratio = timed
  return config


def attention_kernels(m: ml_collections.ConfigDict) -> Dict[str, str]:
  """The attention implementation the encoder and the decoder of `config.model` m run here."""
  if m.attention_impl:
    return dict(encoder=m.attention_impl, decoder=m.attention_impl)
  return dict(encoder=vit.default_attention_impl(m.dtype, m.embed_dim // m.num_heads),
              decoder=vit.default_attention_impl(m.dtype,
                                                 m.decoder_embed_dim // m.decoder_num_heads))


def profile_summary(trace_dir: str, top: int = 40) -> List[Tuple[str, float, int]]:
  """(event name, total ms, count) of the `top` costliest events of the newest trace in
  `trace_dir`: the device planes' events where a device plane exists (GPU, TPU: one event per
  kernel or XLA op), else the host's."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(files[-1])
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  planes = planes or [p for p in data.planes if p.name.startswith("/host:")]
  totals, counts = collections.Counter(), collections.Counter()
  for plane in planes:
    lines = list(plane.lines)
    # A device plane may hold derived lines (modules, steps, ops) beside the per-stream kernel
    # lines: the "XLA Ops" line alone where there is one, else every line but modules and steps.
    ops = [line for line in lines if line.name == "XLA Ops"]
    for line in ops or [l for l in lines if "Modules" not in l.name and "Steps" not in l.name]:
      for event in line.events:
        totals[event.name] += event.duration_ns / 1e6
        counts[event.name] += 1
  return [(name, ms, counts[name]) for name, ms in totals.most_common(top)]


def profile_steps(compiled, state, images, trace_dir: str, steps: int = 3):
  """Runs `steps` more steps under `jax.profiler.trace(trace_dir)`; (state, trace files, the
  summary's path)."""
  os.makedirs(trace_dir, exist_ok=True)
  with jax.profiler.trace(trace_dir):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("train_step", step_num=i):
        state, _ = compiled(state, images)
    jax.block_until_ready(state)
  summary_path = os.path.join(trace_dir, "profile_top_ops.txt")
  with open(summary_path, "w") as f:
    f.write(f"{'total ms':>10} {'count':>6}  event ({steps} profiled steps)\n")
    for name, ms, count in profile_summary(trace_dir):
      f.write(f"{ms:10.3f} {count:6d}  {name}\n")
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  return state, files, summary_path


def run(config: ml_collections.ConfigDict, *, steps: int, warmup: int,
        peak_tflops: Optional[float] = None,
        profile_dir: Optional[str] = None) -> Dict[str, Any]:
  """Compiles the train step of `config`, times `steps` steps after `warmup`; the figures.

  With `profile_dir`, three more steps run under `jax.profiler.trace(profile_dir)` after the
  timing (outside it); the result names the trace and a text summary of its costliest ops.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0.")
  train.validate_config(config)
  m = config.model
  batch = config.input.batch_size
  mesh = train.make_mesh(config)
  model = models.from_config(m)
  # The schedule's values do not change the work done; one "epoch" per step keeps any config's
  # warmup shorter than its training.
  learning_rate = train.create_learning_rate_fn(config, steps_per_epoch=1)
  tx = train.create_optimizer(config, learning_rate)
  abstract_state = train.abstract_train_state(model, tx, config.seed, mesh,
                                              fsdp_min_bytes=train.fsdp_min_bytes(config))
  state = train.create_train_state(model, tx, config.seed, abstract_state)
  step_fn = train.jit_train_step(config, model, tx, learning_rate, abstract_state, mesh)
  shape = (batch, *models.image_hw(m.img_size), m.in_chans)
  images = jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32),
                   out_shardings=train.batch_sharding(mesh))(jax.random.key(1))
  jax.block_until_ready((state, images))

  start = time.perf_counter()
  compiled = step_fn.lower(state, images).compile()
  compile_s = time.perf_counter() - start

  start = time.perf_counter()
  for _ in range(warmup):
    state, metrics = compiled(state, images)
  jax.block_until_ready(state)
  warmup_s = time.perf_counter() - start

  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, images)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / steps

  profile = {}
  if profile_dir:
    # After the timing, so that a profiler that cannot start on a host costs only the profile.
    try:
      state, trace_files, summary_path = profile_steps(compiled, state, images, profile_dir)
      profile = dict(profile_trace=trace_files, profile_summary=summary_path)
    except (RuntimeError, OSError) as e:  # FileNotFoundError too: no trace was written
      logging.error("The profile failed (the timing stands): %s", e)
      profile = dict(profile_error=f"{type(e).__name__}: {e}")

  peak_source = "--peak_tflops"
  if peak_tflops is None:
    peak_tflops = matmul_peak_tflops(jnp.dtype(m.dtype))
    peak_source = f"measured {m.dtype} matmul"
  memory_gb, memory_source = peak_memory()
  flops_per_image = train_flops_per_image(m, m.mask_ratio)
  tflops = flops_per_image * batch / step_s / 1e12
  devices = jax.devices()
  return dict(
      img_per_s=batch / step_s, tflops=tflops, mfu=tflops / (peak_tflops * len(devices)),
      peak_memory_gb=memory_gb, compile_s=compile_s, step_s=step_s, warmup_s=warmup_s,
      loss=float(metrics["loss"]), batch_size=batch, steps=steps, warmup=warmup,
      mask_ratio=m.mask_ratio, train_gflops_per_image=flops_per_image / 1e9,
      params=sum(x.size for x in jax.tree.leaves(abstract_state.params)),
      peak_tflops_per_device=peak_tflops, peak_source=peak_source,
      memory_source=memory_source,
      model=dict(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
                 depth=m.depth, dtype=m.dtype, scan=m.scan, remat=m.remat,
                 attention_impl=m.attention_impl),
      attention=attention_kernels(m), **profile,
      backend=jax.default_backend(), device_kind=devices[0].device_kind,
      device_count=len(devices), jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
      glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))


def summary(r: Dict[str, Any]) -> str:
  """Readable lines of a `run` result."""
  m = r["model"]
  return "\n".join([
      f"model: ViT {m['embed_dim']}x{m['depth']} /{m['patch_size']} at {m['img_size']}px, "
      f"{r['params']:,} params, {m['dtype']}, scan={m['scan']} remat={m['remat']} "
      f"attention {r['attention']['encoder']} (encoder), {r['attention']['decoder']} "
      f"(decoder); mask ratio {r['mask_ratio']}",
      f"devices: {r['device_count']} x {r['device_kind']} ({r['backend']}), jax {r['jax']}",
      f"compile {r['compile_s']:.1f} s; {r['warmup']} warm-up steps {r['warmup_s']:.1f} s",
      f"step {r['step_s'] * 1e3:.1f} ms at batch {r['batch_size']}: {r['img_per_s']:.2f} img/s",
      f"model {r['tflops']:.3f} TFLOP/s ({r['train_gflops_per_image']:.1f} GFLOP per image), "
      f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops_per_device']:.3f} TFLOP/s per device "
      f"({r['peak_source']})",
      f"peak memory {r['peak_memory_gb']:.2f} GB ({r['memory_source']})",
  ])


def main() -> None:
  """The command line: flags, one run, the readable lines and the JSON line."""
  # absl and config_flags are imported here so that importing this module defines no flags.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file("config", None, "A pretraining config file.",
                                                lock_config=True)
  batch_size = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
  steps = flags.DEFINE_integer("steps", 20, "Timed steps.")
  warmup = flags.DEFINE_integer("warmup", 5, "Steps run after compiling, before the timing.")
  peak = flags.DEFINE_float("peak_tflops", None, "Per-device peak TFLOP/s for the MFU "
                            "(default: a measured matmul in the model's dtype).")
  mask_ratio = flags.DEFINE_float("mask_ratio", None, "Overrides config.model.mask_ratio.")
  profile_dir = flags.DEFINE_string("profile_dir", None, "Also trace 3 steps (after the timed "
                                    "ones) with jax.profiler into this folder.")
  flags.mark_flags_as_required(["config"])

  def run_command(argv) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = apply_overrides(config_flag.value, batch_size.value, mask_ratio.value)
    result = run(config, steps=steps.value, warmup=warmup.value, peak_tflops=peak.value,
                 profile_dir=profile_dir.value)
    print(summary(result))
    print(json.dumps(result), flush=True)

  app.run(run_command)


if __name__ == "__main__":
  main()
