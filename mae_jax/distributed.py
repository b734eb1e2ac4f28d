"""Joining JAX's multi-host runtime: Cloud TPU pod slices, SLURM, Open MPI, Kubernetes, MPI.

`initialize()` must run before anything touches a device. Which job this process belongs to
is read, in this order, from explicit arguments / flags / MAE_JAX_* environment variables (what
launch/local_pod.sh sets), from SLURM's srun environment, from the Cloud TPU VM's metadata, and
then from the other clusters that `jax.distributed.initialize()` detects by itself: Open MPI's
`mpirun` (OMPI_MCA_orte_hnp_uri), a Kubernetes Indexed Job (with the `kubernetes` package:
`pip install "jax[k8s]"`) and any other MPI launch through mpi4py. A lone process (none of
these) is left alone. The log says which cluster was found.
"""

import dataclasses
import importlib.util
import os
from collections.abc import Mapping

import jax
from absl import flags
from absl import logging

ENV_COORDINATOR = "MAE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MAE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MAE_JAX_PROCESS_ID"
ENV_NUM_CPU_DEVICES = "MAE_JAX_NUM_CPU_DEVICES"

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    f"host:port of process 0's coordinator, the same on every process (or ${ENV_COORDINATOR}).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"Processes in the job (or ${ENV_NUM_PROCESSES}).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, f"This process's index in [0, num_processes) (or ${ENV_PROCESS_ID}).")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None,
    f"Simulated CPU devices per process, for CPU runs and pods (or ${ENV_NUM_CPU_DEVICES}).")

# What jax's own SLURM detection needs; these are set inside an srun step, not in the batch
# script itself (a single process there).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
# Open MPI's mpirun up to version 4 (what jax's own Open MPI detection reads).
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"
# World sizes that MPI launchers set (Open MPI of any version, PMIx, MPICH / Intel MPI's PMI,
# MVAPICH): a launch that jax's Open MPI detection does not read goes through mpi4py.
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins its job; `initialize` carries it out."""
  # "single", "explicit", "slurm", "cloud_tpu", "open_mpi", "kubernetes" or "mpi4py"
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  # None lets jax choose: one GPU per process under SLURM, all local devices otherwise.
  local_device_ids: tuple[int, ...] | None = None
  num_cpu_devices: int | None = None
  # Cross-process collectives for CPU devices (gloo), needed by CPU-only pods.
  cpu_collectives: bool = False
  # jax.distributed.initialize's cluster_detection_method (None: its own detection).
  cluster_detection_method: str | None = None


def _int(value: str | int | None, name: str) -> int | None:
  if value is None or isinstance(value, int):
    return value
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer; set it to a whole number.") from None


def _visible_gpu_count(env: Mapping[str, str]) -> int | None:
  """GPUs SLURM gave this node, read without starting a backend (None if unknown)."""
  if env.get("CUDA_VISIBLE_DEVICES"):
    return len(env["CUDA_VISIBLE_DEVICES"].split(","))
  return _int(env.get("SLURM_GPUS_ON_NODE"), "SLURM_GPUS_ON_NODE")


def _installed(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


def plan(env: Mapping[str, str], *, coordinator_address: str | None = None,
         num_processes: int | None = None, process_id: int | None = None,
         num_cpu_devices: int | None = None, on_cloud_tpu: bool = False,
         installed=_installed) -> Plan:
  """Decides how this process joins its job from arguments, then `env`, then the platform."""
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  num_processes = _int(num_processes if num_processes is not None
                       else env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  process_id = _int(process_id if process_id is not None else env.get(ENV_PROCESS_ID),
                    ENV_PROCESS_ID)
  num_cpu_devices = _int(num_cpu_devices if num_cpu_devices is not None
                         else env.get(ENV_NUM_CPU_DEVICES), ENV_NUM_CPU_DEVICES)
  if num_cpu_devices is not None and num_cpu_devices < 1:
    raise ValueError(f"num_cpu_devices={num_cpu_devices}: set --num_cpu_devices / "
                     f"${ENV_NUM_CPU_DEVICES} to at least 1, or leave it unset.")
  cpu_only = num_cpu_devices is not None or env.get("JAX_PLATFORMS", "").lower() == "cpu"

  explicit = (("--coordinator_address", ENV_COORDINATOR, coordinator_address),
              ("--num_processes", ENV_NUM_PROCESSES, num_processes),
              ("--process_id", ENV_PROCESS_ID, process_id))
  if any(value is not None for _, _, value in explicit):
    missing = [f"{flag} (${env_name})" for flag, env_name, value in explicit if value is None]
    if num_processes == 1 and process_id in (None, 0):
      return Plan("single", num_cpu_devices=num_cpu_devices)
    if missing:
      raise ValueError(f"An explicit multi-process start needs all three of --coordinator_address, "
                       f"--num_processes and --process_id; missing {', '.join(missing)}.")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes}); "
                       f"fix --process_id (${ENV_PROCESS_ID}) or --num_processes "
                       f"(${ENV_NUM_PROCESSES}).")
    return Plan("explicit", coordinator_address, num_processes, process_id,
                num_cpu_devices=num_cpu_devices, cpu_collectives=cpu_only)

  if all(name in env for name in _SLURM_VARS) and _int(env["SLURM_NTASKS"], "SLURM_NTASKS") > 1:
    # jax's SLURM detection finds the coordinator, process count and id. It also restricts each
    # process to the one GPU numbered SLURM_LOCALID, right for one task per GPU; with one task
    # per node, hand that task every GPU of its node instead.
    tasks = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
    nodes = _int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES")), "SLURM_STEP_NUM_NODES")
    gpus = _visible_gpu_count(env)
    local_device_ids = tuple(range(gpus)) if tasks == nodes and gpus else None
    return Plan("slurm", local_device_ids=local_device_ids, num_cpu_devices=num_cpu_devices,
                cpu_collectives=cpu_only)

  if on_cloud_tpu:
    # jax reads the coordinator and the worker number from the TPU VM's metadata server; on a
    # single-host slice this makes a job of one, which costs nothing.
    return Plan("cloud_tpu", num_cpu_devices=num_cpu_devices)

  # The clusters jax.distributed.initialize() knows itself. Each is taken only when it is a job
  # of several processes, and a launch that cannot be joined stops with the fix: each process
  # training alone, unaware of the others, would be worse.
  mpi_sizes = [_int(env[name], name) for name in _MPI_SIZE_VARS if name in env]
  if mpi_sizes and max(mpi_sizes) > 1:
    if _OMPI_URI in env:
      return Plan("open_mpi", num_cpu_devices=num_cpu_devices, cpu_collectives=cpu_only,
                  cluster_detection_method="ompi")
    if installed("mpi4py"):
      return Plan("mpi4py", num_cpu_devices=num_cpu_devices, cpu_collectives=cpu_only,
                  cluster_detection_method="mpi4py")
    raise ValueError(f"This process was started by MPI as one of {max(mpi_sizes)} processes, "
                     f"but jax can join that job only through Open MPI's {_OMPI_URI} (not set) "
                     f"or mpi4py (not installed): pip install mpi4py, or start the processes "
                     f"with --coordinator_address, --num_processes and --process_id.")
  if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
    # An Indexed Job: jax reads the process count from the Job and the coordinator from its
    # pods through the Kubernetes API.
    if not installed("kubernetes"):
      raise ValueError("This process is one pod of a Kubernetes Indexed Job (JOB_COMPLETION_INDEX"
                       f"={env['JOB_COMPLETION_INDEX']}), and jax finds the other pods through "
                       "the `kubernetes` package, which is not installed: pip install "
                       "\"jax[k8s]\" (or pass --coordinator_address, --num_processes and "
                       "--process_id).")
    return Plan("kubernetes", num_cpu_devices=num_cpu_devices, cpu_collectives=cpu_only)

  return Plan("single", num_cpu_devices=num_cpu_devices)


def _on_cloud_tpu_vm() -> bool:
  # jax decides this at import from the PCI bus and libtpu, before any backend starts; there is
  # no public name for it, and the public ways to ask (jax.devices()) would start the backend.
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def _from_flag(value, flag: flags.FlagHolder):
  """`value`, else the flag's value once flags are parsed (main.py), else None."""
  if value is None and flags.FLAGS.is_parsed():
    return flag.value
  return value


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, num_cpu_devices: int | None = None) -> Plan:
  """Joins the multi-host job this process belongs to (nothing for a lone process)."""
  p = plan(os.environ,
           coordinator_address=_from_flag(coordinator_address, _COORDINATOR),
           num_processes=_from_flag(num_processes, _NUM_PROCESSES),
           process_id=_from_flag(process_id, _PROCESS_ID),
           num_cpu_devices=_from_flag(num_cpu_devices, _NUM_CPU_DEVICES),
           on_cloud_tpu=_on_cloud_tpu_vm())
  if p.num_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", p.num_cpu_devices)
  if p.source == "single":
    logging.info("No multi-process job found (explicit settings, SLURM, Cloud TPU, Open MPI, "
                 "Kubernetes, MPI): running as a single process.")
    return p
  if jax.distributed.is_initialized():
    raise RuntimeError("jax.distributed is already initialized; call "
                       "mae_jax.distributed.initialize() once, before any device use.")
  if p.cpu_collectives:
    # Spelled out because jax's default for CPU collectives has changed between releases, and
    # without one a CPU pod's processes cannot exchange data.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=p.coordinator_address,
                             num_processes=p.num_processes, process_id=p.process_id,
                             local_device_ids=p.local_device_ids,
                             cluster_detection_method=p.cluster_detection_method)
  logging.info("Joined a %s job as process %d of %d: %d local of %d devices.", p.source,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return p
