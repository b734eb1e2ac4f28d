"""The real pretraining step compiled for a Cloud TPU slice, on any machine (no TPU needed).

    python -m mae_jax.plan --config=configs/vit_h.py --topology=v5p-64 [--config.FIELD=VALUE ...]

libtpu (`pip install -e '.[tpu]'`) compiles for a TPU topology with no TPU present
(`jax.experimental.topologies`). This module checks the config against the slice's chip count
and its TPU VM workers, one JAX process each (`mae_jax.train.validate_config`), builds the
config's mesh over the slice's devices and compiles the trainer's own `jit_train_step` for
them, then reports XLA's memory analysis per chip against the chip's HBM, the compile time, the
collectives in the program and the model FLOPs. When the config does not fit, it compiles
variants that trade time for memory (a larger fsdp axis, remat, scan, gradient accumulation)
and prints the cheapest that fit as `--config.FIELD=VALUE` overrides.

Exit status: 0 fits, 1 does not fit, 2 usage error (bad topology, bad config, no libtpu). With
status 0 or 1 the last line of the output is one JSON object (`topology`, `chips`, `device_kind`,
`hbm_gb_per_chip`, `memory_gb_per_chip`, `fits`, `compile_s`, `collectives`, `suggestions`, ...).
GB here are 10^9 bytes.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import models
from mae_jax import train
from mae_jax.benchmarks.flops import train_flops_per_image

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """Facts of one Cloud TPU generation (Cloud TPU system architecture documentation)."""
  name: str                # libtpu's topology prefix: "v5e" in "v5e:4x4"
  accelerator_prefix: str  # gcloud's: "v5litepod" in "v5litepod-16"
  device_kind: str         # jax's Device.device_kind
  counts_cores: bool       # the accelerator type counts TensorCores (2 a chip), not chips
  hbm_bytes: int           # per chip
  bf16_tflops: float       # peak per chip
  torus_dims: int          # 3: a 3D torus (XxYxZ topologies), 2: a 2D one
  single_vm_chips: int     # the largest slice on one TPU VM; larger ones have 4-chip VMs
  chips_per_host: int      # chips on one physical host (the documentation's "hosts" column)
  chip_config: str         # libtpu's chip_config_name: "megacore" = one JAX device a chip


# v4 and v5p: accelerator types count TensorCores (v4-32 = 16 chips), each chip one JAX device
# (megacore); 4 chips a host, one TPU VM a host. v5e ("v5litepod") and v6e count chips; their
# hosts hold 8 chips (the documentation's tables: v5e 4x4 = 2 hosts, 16x16 = 32), but a slice
# of more than 8 chips runs as 4-chip TPU VMs (ct5lp-hightpu-4t on v5e), two a host: v5e-16 is
# 2 hosts and 4 TPU VM workers, each one JAX process.
GENERATIONS = {
    "v4": Generation("v4", "v4", "TPU v4", True, 32 * GIB, 275.0, 3, 4, 4, "megacore"),
    "v5p": Generation("v5p", "v5p", "TPU v5", True, 95 * GIB, 459.0, 3, 4, 4, "megacore"),
    "v5e": Generation("v5e", "v5litepod", "TPU v5 lite", False, 16 * GIB, 197.0, 2, 8, 8,
                      "default"),
    "v6e": Generation("v6e", "v6e", "TPU v6 lite", False, 32 * GIB, 918.0, 2, 8, 8,
                      "default"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice: its generation, chips, topology, hosts and TPU VM workers."""
  name: str          # as given: "v5litepod-16", "v5e-16" or "v5e:4x4"
  generation: Generation
  shape: Tuple[int, ...]  # chips along each torus axis

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def hosts(self) -> float:
    """Physical hosts, as the Cloud TPU documentation's tables count them: v4/v5p 4 chips a
    host, v5e/v6e 8 (a fraction for smaller slices: v5e 2x2 is 1/2 of a host)."""
    hosts = self.chips / self.generation.chips_per_host
    return int(hosts) if hosts >= 1 else hosts

  @property
  def workers(self) -> int:
    """TPU VM workers (`gcloud ... ssh --worker=all` reaches each), one JAX process each:
    one for a slice of up to `single_vm_chips` chips, otherwise one per 4 chips."""
    g = self.generation
    return 1 if self.chips <= g.single_vm_chips else self.chips // 4

  @property
  def topology(self) -> str:
    """libtpu's name for it: "v5e:4x4", "v5p:2x4x4"."""
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def accelerator_type(self) -> str:
    """gcloud's --accelerator-type: "v5litepod-16", "v5p-64" (cores on v4 and v5p)."""
    g = self.generation
    return f"{g.accelerator_prefix}-{self.chips * (2 if g.counts_cores else 1)}"

  def devices(self) -> List[Any]:
    """The slice's JAX devices from libtpu, no TPU needed (ImportError without libtpu)."""
    _import_libtpu()
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    shape = self.shape + (1,) * (3 - len(self.shape))
    per_host = shape if self.workers == 1 else (2, 2, 1)
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=self.topology,
        chip_config_name=self.generation.chip_config, chips_per_host_bounds=per_host)
    return list(topology.devices)


def host_text(tpu: Slice) -> str:
  """"2 hosts (4 TPU VM workers, one JAX process each)": the documentation's host count and the
  TPU VM workers that run the program, one JAX process each (the launcher prints the same)."""
  hosts, workers = tpu.hosts, tpu.workers
  hosts = f"1/{round(1 / hosts)} of a host" if hosts < 1 else f"{hosts} host{'s' * (hosts > 1)}"
  return (f"{hosts} ({workers} TPU VM worker{'s' * (workers > 1)}, "
          f"{'one JAX process each' if workers > 1 else 'one JAX process'})")


def _torus_shape(chips: int, dims: int) -> Tuple[int, ...]:
  """The default shape of a slice of `chips` chips: 2D tori 1x1, 2x2, 2x4, 4x4, 4x8, ...;
  3D ones 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (the documentation's tables)."""
  if dims == 2:
    k = chips.bit_length() - 1
    return (2 ** (k // 2), 2 ** (k - k // 2))
  shape = [2, 2, 1]
  while math.prod(shape) < chips:
    if shape[2] == 1:
      shape[2] = 2
    else:
      smallest = min(shape)
      axis = max(a for a in range(3) if shape[a] == smallest)
      shape[axis] *= 2
  return tuple(shape)


# The slice shapes of Cloud TPU's documentation: v5e and v6e (2D) these alone; v4 and v5p (3D)
# these below a cube of 4x4x4, then any multiple of 4 along each axis.
_SHAPES_2D = ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))
_SMALL_3D = ((1, 2, 2), (2, 2, 2), (2, 2, 4), (2, 4, 4))


def _checked_slice(name: str, g: Generation, shape: Tuple[int, ...]) -> Slice:
  """The slice, or ValueError listing the generation's slices when Cloud TPU offers no such
  shape (v5e:3x4, v5litepod-2, v5p:1x1x1)."""
  ordered = tuple(sorted(shape))
  if ordered in (_SHAPES_2D if len(shape) == 2 else _SMALL_3D) or (
      len(shape) == 3 and all(d % 4 == 0 for d in shape)):
    return Slice(name, g, shape)
  if g.torus_dims == 2:
    shapes = ", ".join(f"{g.accelerator_prefix}-{a * b} ({g.name}:{a}x{b})" for a, b in _SHAPES_2D)
  else:
    shapes = (f"{g.name}:2x2x1, 2x2x2, 2x2x4, 2x4x4, then multiples of 4 (4x4x4, 4x4x8, ...)")
  raise ValueError(f"--topology={name}: not a slice Cloud TPU offers; {g.name} slices are "
                   f"{shapes}.")


def parse_slice(name: str) -> Slice:
  """A Cloud TPU accelerator type ("v4-32", "v5p-64", "v5litepod-16", "v5e-16", "v6e-64") or a
  topology ("v5e:2x2", "v5p:2x4x4"). Raises ValueError naming the accepted forms."""
  forms = ("an accelerator type such as v4-32, v5p-64, v5litepod-16 (or v5e-16), v6e-64, or a "
           "topology such as v5e:2x2 or v5p:2x2x4")
  if match := re.fullmatch(r"(v\d[a-z]*)-(\d+)", name):
    prefix, size = match.group(1), int(match.group(2))
    g = GENERATIONS.get(_ALIASES.get(prefix, prefix))
    if g is None:
      raise ValueError(f"--topology={name}: unknown TPU generation {prefix!r}; the plan covers "
                       f"{', '.join(sorted(GENERATIONS))} ({forms}).")
    chips, odd = divmod(size, 2) if g.counts_cores else (size, 0)
    if odd or chips < 1 or chips & (chips - 1) or (g.counts_cores and chips < 4):
      unit = "TensorCores, 2 a chip, at least 8" if g.counts_cores else "chips"
      examples = (8, 16, 32) if g.counts_cores else (4, 8, 16)
      raise ValueError(f"--topology={name}: {g.accelerator_prefix} sizes count {unit} and are "
                       f"powers of two (" + ", ".join(f"{g.accelerator_prefix}-{n}"
                                                      for n in examples) + ", ...).")
    return _checked_slice(name, g, _torus_shape(chips, g.torus_dims))
  if match := re.fullmatch(r"(v\d[a-z]*):(\d+(?:x\d+)+)", name):
    prefix = match.group(1)
    g = GENERATIONS.get(_ALIASES.get(prefix, prefix))
    shape = tuple(int(d) for d in match.group(2).split("x"))
    if g is None or len(shape) not in (g.torus_dims, 3) or min(shape) < 1:
      raise ValueError(f"--topology={name}: not a topology of {', '.join(sorted(GENERATIONS))} "
                       f"({forms}).")
    if len(shape) == 3 and g.torus_dims == 2:
      if shape[2] != 1:
        raise ValueError(f"--topology={name}: {g.name} is a 2D torus (e.g. {g.name}:4x4).")
      shape = shape[:2]
    return _checked_slice(name, g, shape)
  raise ValueError(f"--topology={name!r} is not {forms}.")


def _import_libtpu() -> None:
  """Makes libtpu quiet on a machine without TPUs; ImportError with the fix if it is missing."""
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  if cloud_tpu_init.get_tpu_library_path() is None:
    raise ImportError("The plan compiles with libtpu, which is not installed: pip install -e "
                      "'.[tpu]' (it brings libtpu for the installed jax version).")
  # Without these, libtpu's start-up looks for a TPU VM's metadata and prints warnings; they
  # describe no real slice (the topology passed to the compile does).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  # libtpu holds a machine-wide lock for the TPU it drives; compiling drives none, and several
  # plans (or tests) may run side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


# --- the compile ------------------------------------------------------------------------------

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "ragged-all-to-all", "collective-broadcast")
_OP = re.compile(r"=\s+(\S.*?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


def _array_bytes(shape_text: str) -> List[int]:
  """Bytes of each array in an HLO shape such as `(bf16[8,128]{1,0}, f32[4])`: HLO's element
  types carry their width in bits (f32, bf16, s8, u4, f8e4m3fn), `pred` is one byte."""
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    bits = re.search(r"\d+", dtype)
    if dtype != "pred" and bits is None:  # token[] and the like hold no data
      continue
    itemsize = 1 if dtype == "pred" else max(1, int(bits.group()) // 8)
    sizes.append(itemsize * math.prod(int(d) for d in dims.split(",") if d))
  return sizes


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
  """{op kind: {"count", "bytes"}} of the cross-device ops in an optimized HLO module.

  Counts each op once as it appears in the program (one inside a loop body counts once); bytes
  are the op's result per device (for an async `-start`, its last result array, the output).
  """
  found: Dict[str, Dict[str, int]] = {}
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    shape, op, start = match.groups()
    sizes = _array_bytes(shape)
    if start and op in ("all-gather", "collective-permute", "all-to-all") and len(sizes) > 1:
      sizes = sizes[len(sizes) // 2:len(sizes) // 2 + 1] if op == "all-gather" else sizes[1:2]
    entry = found.setdefault(op, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += sum(sizes)
  return found


def _tpu_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with the choices a TPU run makes by itself spelled out: here jax's default
  backend is the CPU, which would pick the CPU's attention and non-finite guard."""
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  if not config.model.get("attention_impl"):
    config.model.attention_impl = "xla"  # models.vit.default_attention_impl off CPU and GPU
  if config.get("nonfinite_guard", "auto") == "auto":
    config.nonfinite_guard = "select"  # train.update_if_finite off CPU
  return config


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
  return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


@dataclasses.dataclass
class Compiled:
  """What one compile of the train step gave."""
  memory: Dict[str, float]     # bytes per chip: state, batch, temporaries, outputs, total, code
  compile_s: float
  collectives: Dict[str, Dict[str, int]]
  error: Optional[str] = None  # XLA's message when the compile itself ran out of memory


# XLA's two ways of refusing a program too large for the chip: "Used 20.5G of 15.75G hbm"
# (everything it holds at once) and "the total memory required for HLO temporaries (16.40G)
# exceeds available HBM (15.75G)" (the temporaries alone; the arguments come on top).
_OOM_USED = re.compile(r"[Uu]sed\s+([\d.]+)([KMGT])i?B?\s+of\s+[\d.]+[KMGT]i?B?\s+hbm")
_OOM_TEMPS = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])i?B?\) exceeds available HBM")
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refused_memory(message: str, arguments: int) -> Dict[str, float]:
  """Per-chip bytes of a program XLA refused for want of HBM, from its message: `total` (and
  `temporaries` where the message gives only those; `arguments`, the state and batch shards,
  are added to them), inf when the message names no figure. XLA's G are 2^30 bytes."""
  if used := _OOM_USED.search(message):
    return dict(total=float(used.group(1)) * _BINARY[used.group(2)], temporaries=math.nan)
  if temps := _OOM_TEMPS.search(message):
    temporaries = float(temps.group(1)) * _BINARY[temps.group(2)]
    return dict(total=arguments + temporaries, temporaries=temporaries)
  return dict(total=math.inf, temporaries=math.nan)


def step_arguments(config: ml_collections.ConfigDict, devices: Sequence[Any]
                   ) -> Tuple[Any, Any, jax.ShapeDtypeStruct]:
  """(the trainer's jitted step `train.jit_train_step`, its abstract train state, the abstract
  image batch) of `config` over `devices`, nothing allocated: the batch is float32
  [batch_size, H, W, in_chans] (H, W from `models.image_hw` of img_size), sharded as the
  trainer shards it."""
  mesh = train.make_mesh(config, devices=devices)
  model = models.from_config(config.model)
  # As in the benchmark: the schedule's values change no shape, one "epoch" a step keeps every
  # config's warmup shorter than its training.
  learning_rate = train.create_learning_rate_fn(config, steps_per_epoch=1)
  tx = train.create_optimizer(config, learning_rate)
  abstract_state = train.abstract_train_state(model, tx, config.seed, mesh,
                                              fsdp_min_bytes=train.fsdp_min_bytes(config))
  m = config.model
  images = jax.ShapeDtypeStruct((config.input.batch_size, *models.image_hw(m.img_size),
                                 m.in_chans), jnp.float32, sharding=train.batch_sharding(mesh))
  step = train.jit_train_step(config, model, tx, learning_rate, abstract_state, mesh)
  return step, abstract_state, images


def compile_step(config: ml_collections.ConfigDict, tpu: Slice) -> Compiled:
  """Compiles the trainer's jitted step (`train.jit_train_step`) of `config` for the slice."""
  step, abstract_state, images = step_arguments(config, tpu.devices())
  state_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(abstract_state))
  memory = {"state": state_bytes, "batch": _shard_bytes(images)}
  start = time.perf_counter()
  # A deviceless compile's executable cannot be serialized into JAX's persistent compilation
  # cache (libtpu: "PjRtCompiler must be constructed with a Client"): skip the cache for it.
  cache_was_on = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    compiled = step.lower(abstract_state, images).compile()
  except Exception as error:  # pylint: disable=broad-except
    # XLA refuses a program that needs more HBM than the chip has, naming what it needed.
    message = str(error)
    if "RESOURCE_EXHAUSTED" not in message and "hbm" not in message.lower():
      raise
    memory.update(refused_memory(message, memory["state"] + memory["batch"]), outputs=math.nan,
                  code=0)
    return Compiled(memory, time.perf_counter() - start, {}, error=message.splitlines()[0])
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_was_on)
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  outputs = analysis.output_size_in_bytes - analysis.alias_size_in_bytes
  memory.update(
      arguments=analysis.argument_size_in_bytes, temporaries=analysis.temp_size_in_bytes,
      outputs=outputs, code=analysis.generated_code_size_in_bytes,
      # What XLA holds at once: arguments + outputs not aliased to (donated) arguments + temps.
      total=analysis.argument_size_in_bytes + outputs + analysis.temp_size_in_bytes)
  return Compiled(memory, compile_s, collectives(compiled.as_text()))


@contextlib.contextmanager
def heartbeat(log: Callable[[str], None], every_s: float, what: str) -> Iterator[None]:
  """Logs `  still WHAT: N s` every `every_s` seconds while the body runs (a TPU compile of
  ViT-H takes minutes with nothing else to show); `every_s` <= 0: silent."""
  if every_s <= 0:
    yield
    return
  done, start = threading.Event(), time.monotonic()

  def beat():
    while not done.wait(every_s):
      log(f"  still {what}: {time.monotonic() - start:.0f} s")

  thread = threading.Thread(target=beat, name="plan-heartbeat", daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


# --- variants that fit ----------------------------------------------------------------------

def candidates(config: ml_collections.ConfigDict, tpu: Slice) -> Iterator[Dict[str, Any]]:
  """Overrides that trade time for memory, cheapest first: the state sharded over more chips
  (fsdp), then recomputed activations (remat, scan), then micro-batches (grad accumulation)."""
  chips = tpu.chips
  fsdp = config.mesh.fsdp
  larger_fsdp = [f for f in (2 ** k for k in range(1, 16)) if fsdp < f <= chips]
  seen = []

  def emit(overrides):
    overrides = {k: v for k, v in overrides.items() if _get(config, k) != v}
    if overrides and overrides not in seen:
      seen.append(overrides)
      return [overrides]
    return []

  top = {"mesh.fsdp": larger_fsdp[-1], "mesh.data": -1} if larger_fsdp else {}
  yield from emit(top)
  yield from emit({"model.remat": True})
  yield from emit({**top, "model.remat": True})
  yield from emit({**top, "model.remat": True, "model.scan": True})
  batch = config.input.batch_size
  for accum in (2, 4, 8, 16, 32, 64):
    if (batch // accum) % chips or batch % accum or accum <= config.optimizer.grad_accum_steps:
      continue
    yield from emit({**top, "model.remat": True, "model.scan": True,
                     "optimizer.grad_accum_steps": accum})


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for part in field.split("."):
    value = value.get(part) if hasattr(value, "get") else None
  return value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Dict[str, Any]) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.update_from_flattened_dict(overrides)
  return config


def as_flags(overrides: Dict[str, Any]) -> List[str]:
  return [f"--config.{field}={value}" for field, value in overrides.items()]


# --- the report -------------------------------------------------------------------------------

def plan(config: ml_collections.ConfigDict, tpu: Slice, *, hbm_bytes: Optional[int] = None,
         max_suggestions: int = 2, max_compiles: int = 6, heartbeat_s: float = 30.0,
         log=lambda line: print(line, flush=True)) -> Dict[str, Any]:
  """Checks and compiles `config` for `tpu`; the JSON-ready report (see the module docstring).
  Every compile logs a `still compiling` line each `heartbeat_s` seconds (0: none).

  Raises ValueError (from `train.validate_config`) when the config is wrong for the slice.
  """
  hbm = hbm_bytes or tpu.generation.hbm_bytes
  if config.get("mode", "pretrain") != "pretrain":
    raise ValueError(f"config.mode={config.mode!r}: the plan compiles the pretraining step; "
                     f"use a pretraining config (configs/vit_b.py, vit_l.py, vit_h.py, demo.py).")
  config = _tpu_config(config)
  train.validate_config(config, device_count=tpu.chips, process_count=tpu.workers)
  _import_libtpu()
  log(f"slice: {tpu.accelerator_type} = topology {tpu.topology}: {tpu.chips} chips "
      f"({tpu.generation.device_kind}) on {host_text(tpu)}; "
      f"{hbm / GB:.4g} GB HBM and {tpu.generation.bf16_tflops:g} bf16 TFLOP/s per chip")
  m = config.model
  height, width = models.image_hw(m.img_size)
  log(f"compiling mae_jax.train.jit_train_step: ViT {m.embed_dim}x{m.depth} /{m.patch_size} "
      f"at {height}x{width} px, batch {config.input.batch_size}, dtype {m.dtype}, mesh data="
      f"{config.mesh.data} fsdp={config.mesh.fsdp}, remat={m.remat} scan={m.scan}, "
      f"grad_accum_steps={config.optimizer.grad_accum_steps} ...")
  with heartbeat(log, heartbeat_s, f"compiling for {tpu.accelerator_type}"):
    result = compile_step(config, tpu)
  fits = _fits(result, hbm)
  mem = result.memory
  if result.error:
    log(f"XLA refused the program: {result.error}")
  else:
    log(f"compiled in {result.compile_s:.1f} s")
  log("memory per chip (XLA's memory analysis):")
  log(f"  params + optimizer state   {mem['state'] / GB:9.3f} GB")
  log(f"  batch                      {mem['batch'] / GB:9.3f} GB")
  log(f"  temporaries                {mem['temporaries'] / GB:9.3f} GB")
  log(f"  outputs not donated        {mem['outputs'] / GB:9.3f} GB")
  log(f"  total                      {mem['total'] / GB:9.3f} GB")
  log(f"  + program code             {mem['code'] / GB:9.3f} GB: "
      f"{(mem['total'] + mem['code']) / GB:.3f} GB of {hbm / GB:.4g} GB HBM: "
      f"{'fits' if fits else 'DOES NOT FIT'}")
  log("collectives in the program (each counted once where it appears):")
  for op, c in sorted(result.collectives.items()):
    log(f"  {op:20s} {c['count']:6d} ops  {c['bytes'] / GB:9.3f} GB")
  flops_per_image = train_flops_per_image(m, m.mask_ratio)
  tflop_per_chip = flops_per_image * config.input.batch_size / tpu.chips / 1e12
  img_per_s = tpu.chips * tpu.generation.bf16_tflops * 1e12 / flops_per_image
  log(f"model FLOPs: {tflop_per_chip:.3g} TFLOP per chip per step; at the chips' bf16 peak at "
      f"most {img_per_s:,.0f} images/s ({img_per_s / tpu.chips:,.0f} per chip)")

  suggestions = []
  tried = []
  if not fits:
    for overrides in candidates(config, tpu):
      if len(suggestions) >= max_suggestions or len(tried) >= max_compiles:
        break
      variant = apply_overrides(config, overrides)
      try:
        train.validate_config(variant, device_count=tpu.chips, process_count=tpu.workers)
      except ValueError:
        continue
      if set(overrides) <= {"mesh.fsdp", "mesh.data"} and not result.error:
        # Sharding more only shrinks the state and the gradients (about 4/3 of the state): skip
        # the compile when even that cannot bring the total under the HBM.
        shrink = 1 - config.mesh.fsdp / overrides["mesh.fsdp"]
        if mem["total"] + mem["code"] - 4 / 3 * mem["state"] * shrink > hbm:
          log(f"skipping {' '.join(as_flags(overrides))}: sharding the state cannot save enough")
          continue
      log(f"trying {' '.join(as_flags(overrides))} ...")
      with heartbeat(log, heartbeat_s, f"compiling {' '.join(as_flags(overrides))}"):
        other = compile_step(variant, tpu)
      ok = _fits(other, hbm)
      tried.append({"overrides": as_flags(overrides), "memory_gb_per_chip":
                    _gb(other.memory["total"]), "fits": ok, "compile_s": other.compile_s})
      log(f"  {_gb(other.memory['total'])} GB per chip: {'fits' if ok else 'does not fit'}")
      if ok:
        suggestions.append(as_flags(overrides))
    if suggestions:
      log("overrides that fit, cheapest first:")
      for s in suggestions:
        log("  " + " ".join(s))
    else:
      log("no variant tried fits: use a larger slice or a smaller batch.")

  return {
      "topology": tpu.topology, "accelerator_type": tpu.accelerator_type, "chips": tpu.chips,
      "hosts": tpu.hosts, "workers": tpu.workers, "device_kind": tpu.generation.device_kind,
      "hbm_gb_per_chip": _gb(hbm), "memory_gb_per_chip": _gb(mem["total"]), "fits": fits,
      "compile_s": round(result.compile_s, 1),
      "collectives": {op: c["count"] for op, c in sorted(result.collectives.items())},
      "collective_gb": {op: _gb(c["bytes"]) for op, c in sorted(result.collectives.items())},
      "memory_gb": {k: _gb(v) for k, v in mem.items()},
      "tflop_per_chip_per_step": round(tflop_per_chip, 3),
      "img_per_s_bound": round(img_per_s, 1), "suggestions": suggestions, "tried": tried,
      "compile_error": result.error,
  }


def _gb(value: float) -> Optional[float]:
  return None if value is None or not math.isfinite(value) else round(value / GB, 3)


def _fits(result: Compiled, hbm: int) -> bool:
  return result.error is None and result.memory["total"] + result.memory["code"] <= hbm


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status."""
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  fv = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file("config", None, "A pretraining config file.",
                                                lock_config=True, flag_values=fv)
  topology = flags.DEFINE_string(
      "topology", None, "Cloud TPU accelerator type (v4-32, v5p-64: TensorCores, 2 a chip; "
      "v5litepod-16 or v5e-16, v6e-64: chips) or topology (v5e:2x2, v5p:2x2x4).",
      flag_values=fv)
  hbm_gb = flags.DEFINE_float("hbm_gb", None, "HBM per chip in GB (default: the chip's).",
                              flag_values=fv)
  max_suggestions = flags.DEFINE_integer("max_suggestions", 2, "Fitting variants to find.",
                                         flag_values=fv)
  max_compiles = flags.DEFINE_integer("max_compiles", 6, "Variants to compile at most.",
                                      flag_values=fv)
  heartbeat_s = flags.DEFINE_float("heartbeat_s", 30.0, "Seconds between the 'still "
                                   "compiling' lines printed during each compile (0: none).",
                                   flag_values=fv)
  argv = list(sys.argv if argv is None else argv)
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull", "-?") for arg in argv[1:]):
    print(__doc__.strip() + "\n\nFlags:\n" + fv.get_help())
    print("\nConfig fields (--config.FIELD=VALUE): docs/configs.md")
    return 0
  try:
    rest = fv(argv)
    if len(rest) > 1:
      raise flags.Error(f"unexpected arguments: {' '.join(rest[1:])}")
    if config_flag.value is None or topology.value is None:
      raise flags.Error("--config and --topology are required.")
    if hbm_gb.value is not None and hbm_gb.value <= 0:
      raise flags.Error(f"--hbm_gb={hbm_gb.value:g}: give the HBM per chip in GB, more than 0 "
                        f"(or leave the flag out for the chip's own).")
    if heartbeat_s.value != 0 and heartbeat_s.value < 1:
      raise flags.Error(f"--heartbeat_s={heartbeat_s.value:g}: give the seconds between the "
                        f"'still compiling' lines, at least 1, or 0 for none.")
    tpu = parse_slice(topology.value)
    result = plan(config_flag.value, tpu,
                  hbm_bytes=None if hbm_gb.value is None else int(hbm_gb.value * GB),
                  max_suggestions=max_suggestions.value, max_compiles=max_compiles.value,
                  heartbeat_s=heartbeat_s.value)
  except (flags.Error, ValueError, ImportError) as error:
    print(f"mae_jax.plan: {error}", file=sys.stderr)
    print("usage: python -m mae_jax.plan --config=configs/X.py --topology=NAME "
          "[--config.FIELD=VALUE ...] [--hbm_gb=GB] [--heartbeat_s=S] [--max_suggestions=N] "
          "[--max_compiles=N] (--help describes them)", file=sys.stderr)
    return 2
  print(json.dumps(result), flush=True)
  return 0 if result["fits"] else 1


if __name__ == "__main__":
  sys.exit(main())
