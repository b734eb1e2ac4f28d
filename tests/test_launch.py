"""launch/ scripts and mae_jax.distributed: shellcheck, the TPU dry run, detection, a real CPU pod."""

import os
import pathlib
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from mae_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def _env(**extra) -> dict[str, str]:
  """This environment without any multi-host settings, plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("MAE_JAX_", "SLURM_", "JAX_COORDINATOR"))}
  env.update(extra)
  return env


def test_every_launcher_is_here():
  assert SCRIPTS == ["local_pod.sh", "slurm_gpu.sbatch", "tpu_pod.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_shellcheck(script):
  shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
  result = subprocess.run([str(shellcheck), "--severity=style", str(LAUNCH / script)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert os.access(LAUNCH / script, os.X_OK), f"{script} is not executable"


# --- launch/tpu_pod.sh --dry_run ------------------------------------------------------------

def _dry_run(*args: str) -> tuple[list[str], list[list[str]]]:
  """The dry run's comment lines and its commands, each split as a shell would."""
  result = subprocess.run([str(LAUNCH / "tpu_pod.sh"), "--dry_run", *args], capture_output=True,
                          text=True, check=True, env=_env())
  lines = result.stdout.splitlines()
  return ([l for l in lines if l.startswith("#")],
          [shlex.split(l) for l in lines if not l.startswith("#")])


def _remote(command: list[str]) -> list[str]:
  """The shell line an `ssh --command=...` runs on the workers, split into words."""
  flag = [w for w in command if w.startswith("--command=")]
  assert len(flag) == 1, command
  return shlex.split(flag[0].removeprefix("--command="))


def _check_install_and_run(install, run, name, zone, extra_flags, branch, repo, main_args):
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}", *extra_flags,
         "--worker=all"]
  assert install[:-1] == ssh and run[:-1] == ssh
  words = _remote(install)
  clone = ["git", "clone", "--depth=1", f"--branch={branch}", repo, "~/mae_jax;"]
  assert any(words[i:i + len(clone)] == clone for i in range(len(words))), words
  # A virtual environment of a Python jax supports (the images ship 3.10), with mae_jax[tpu].
  line = " ".join(words)
  assert "for v in python3.13 python3.12 python3.11" in line
  assert "apt-get install -y -qq python3.11 python3.11-venv" in line
  assert words[-3:] == ["install", "-e", "$HOME/mae_jax[tpu]"]
  assert "git -C ~/mae_jax checkout --force -B " + branch in line
  assert _remote(run) == ["cd", "~/mae_jax", "&&", "~/mae_jax_venv/bin/python", "-m",
                          "mae_jax.main", *main_args]


def test_tpu_dry_run_v4_32():
  notes, commands = _dry_run(
      "--name=mae-v4", "--zone=us-central2-b", "--accelerator_type=v4-32",
      "--repo=https://github.com/someone/mae_jax.git", "--config=configs/vit_l.py",
      "--workdir=gs://bucket/vit_l", "--", "--config.input.batch_size=4096",
      "--config.note=it's a test")
  assert notes[0] == "# v4-32: 16 chips on 4 hosts (4 TPU VM workers, one JAX process each)."
  assert len(commands) == 4
  describe, create, install, run = commands
  assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "mae-v4",
                      "--zone=us-central2-b", "--format=value(state)"]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mae-v4",
                    "--zone=us-central2-b", "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base"]
  _check_install_and_run(
      install, run, "mae-v4", "us-central2-b", [], "main",
      "https://github.com/someone/mae_jax.git",
      ["--config=configs/vit_l.py", "--workdir=gs://bucket/vit_l",
       "--config.input.batch_size=4096", "--config.note=it's a test"])
  assert "gcloud compute tpus tpu-vm delete mae-v4 --zone=us-central2-b" in notes[-1]


@pytest.mark.parametrize("accelerator_type", ["v5litepod-256", "v5e-256"])
def test_tpu_dry_run_v5e_256_queued(accelerator_type):
  notes, commands = _dry_run(
      "--name=mae-v5e", "--zone=us-west4-a", "--project=my-project",
      f"--accelerator_type={accelerator_type}", "--queued", "--spot", "--branch=dev",
      "--repo=https://github.com/someone/mae_jax.git", "--config=configs/vit_h.py",
      "--workdir=gs://bucket/vit_h")
  assert notes[0] == ("# v5litepod-256: 256 chips on 32 hosts (64 TPU VM workers, one JAX "
                      "process each).")
  assert len(commands) == 5
  existing, create, describe, install, run = commands
  assert existing == describe
  where = ["--zone=us-west4-a", "--project=my-project"]
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "mae-v5e",
                    "--node-id=mae-v5e", *where, "--accelerator-type=v5litepod-256",
                    "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
  assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", "mae-v5e",
                      *where, "--format=value(state.state)"]
  _check_install_and_run(install, run, "mae-v5e", "us-west4-a", ["--project=my-project"], "dev",
                         "https://github.com/someone/mae_jax.git",
                         ["--config=configs/vit_h.py", "--workdir=gs://bucket/vit_h"])
  assert "gcloud compute tpus queued-resources delete mae-v5e" in notes[-1]


def test_tpu_dry_run_detached_run_step_only():
  _, commands = _dry_run("--name=n", "--zone=z", "--steps=run", "--detach",
                         "--config=configs/vit_b.py", "--workdir=gs://b/w")
  assert len(commands) == 1
  assert _remote(commands[0]) == [
      "cd", "~/mae_jax", "&&", "nohup", "~/mae_jax_venv/bin/python", "-m", "mae_jax.main",
      "--config=configs/vit_b.py", "--workdir=gs://b/w", ">", "~/mae_jax.log", "2>&1", "<",
      "/dev/null", "&"]


@pytest.mark.parametrize("accelerator_type", [
    "v4-8", "v4-16", "v4-32", "v4-64", "v5p-8", "v5p-16", "v5p-64", "v5litepod-1", "v5litepod-4",
    "v5litepod-8", "v5litepod-16", "v5litepod-64", "v5litepod-256", "v6e-8", "v6e-16", "v6e-64"])
def test_tpu_hosts_per_slice_agree_with_the_plan(accelerator_type):
  from mae_jax import plan  # pylint: disable=g-import-not-at-top
  notes, _ = _dry_run("--name=n", "--zone=z", f"--accelerator_type={accelerator_type}",
                      "--steps=create")
  tpu = plan.parse_slice(accelerator_type)
  assert notes[0] == f"# {accelerator_type}: {tpu.chips} chips on {plan.host_text(tpu)}."


# --- launch/tpu_pod.sh against a stand-in gcloud --------------------------------------------

# Records each call; `describe` answers with the next line of $GCLOUD_DESCRIBE (the last one
# repeats): a state, or NOT_FOUND / ERROR as gcloud reports them.
GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$GCLOUD_LOG"
if [[ " $* " == *" describe "* ]]; then
  answer=$(head -n 1 "$GCLOUD_DESCRIBE")
  if [[ $(wc -l < "$GCLOUD_DESCRIBE") -gt 1 ]]; then sed -i 1d "$GCLOUD_DESCRIBE"; fi
  case "$answer" in
    NOT_FOUND) echo "ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: Resource 'n' was not found" >&2; exit 1 ;;
    ERROR) echo "ERROR: (gcloud.compute.tpus.describe) PERMISSION_DENIED: the API is disabled" >&2; exit 1 ;;
    *) echo "$answer" ;;
  esac
fi
"""
# A stand-in for `python -m mae_jax.plan`: records its arguments, exits with $PLAN_STATUS.
PLAN = """#!/usr/bin/env bash
printf 'plan %s\n' "$*" >> "$GCLOUD_LOG"
exit "$PLAN_STATUS"
"""


def _launch(tmp_path, describe, *args, plan_status=0):
  """Runs tpu_pod.sh with gcloud (and the plan's python) stood in; (process, calls)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, text in (("gcloud", GCLOUD), ("python_stub", PLAN)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  (tmp_path / "describe").write_text("\n".join(describe) + "\n")
  log = tmp_path / "calls"
  log.write_text("")
  env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(log),
             GCLOUD_DESCRIBE=str(tmp_path / "describe"), TPU_POD_POLL_S="0",
             PYTHON=str(bin_dir / "python_stub"), PLAN_STATUS=str(plan_status))
  result = subprocess.run(
      [str(LAUNCH / "tpu_pod.sh"), "--name=n", "--zone=z", "--accelerator_type=v5litepod-16",
       "--repo=https://example.com/mae_jax.git", "--config=configs/vit_b.py",
       "--workdir=gs://b/w", *args], capture_output=True, text=True, check=False, env=env,
      timeout=60)
  return result, [line.split()[:5] for line in log.read_text().splitlines()]


DESCRIBE = ["compute", "tpus", "tpu-vm", "describe", "n"]
CREATE = ["compute", "tpus", "tpu-vm", "create", "n"]
DELETE = ["compute", "tpus", "tpu-vm", "delete", "n"]
SSH = ["compute", "tpus", "tpu-vm", "ssh", "n"]
QR = ["compute", "tpus", "queued-resources"]


def test_new_slice_is_created_then_installed_and_run(tmp_path):
  result, calls = _launch(tmp_path, ["NOT_FOUND"])
  assert result.returncode == 0, result.stderr
  assert calls == [DESCRIBE, CREATE, SSH, SSH]


def test_preempted_spot_slice_is_deleted_before_it_is_created_again(tmp_path):
  result, calls = _launch(tmp_path, ["PREEMPTED"], "--spot")
  assert result.returncode == 0, result.stderr
  assert calls == [DESCRIBE, DELETE, CREATE, SSH, SSH]
  assert "n is PREEMPTED" in result.stderr


def test_running_slice_is_reused(tmp_path):
  result, calls = _launch(tmp_path, ["READY"])
  assert result.returncode == 0, result.stderr
  assert calls == [DESCRIBE, SSH, SSH]


def test_a_describe_that_fails_stops_before_anything_else(tmp_path):
  result, calls = _launch(tmp_path, ["ERROR"])
  assert result.returncode != 0
  assert calls == [DESCRIBE]
  assert "PERMISSION_DENIED" in result.stderr


def test_queued_resource_is_waited_for_and_a_failing_describe_stops_the_wait(tmp_path):
  result, calls = _launch(tmp_path, ["NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE"], "--queued")
  assert result.returncode == 0, result.stderr
  assert calls == [QR + ["describe", "n"], QR + ["create", "n"], QR + ["describe", "n"],
                   QR + ["describe", "n"], SSH, SSH]
  # The API fails while waiting: stop with its error, never go on to install over ssh.
  result, calls = _launch(tmp_path, ["NOT_FOUND", "PROVISIONING", "ERROR"], "--queued")
  assert result.returncode != 0
  assert SSH not in calls and calls[-1] == QR + ["describe", "n"]
  assert "PERMISSION_DENIED" in result.stderr


def test_suspended_queued_spot_resource_is_deleted_and_requested_again(tmp_path):
  result, calls = _launch(tmp_path, ["SUSPENDED", "ACTIVE"], "--queued", "--spot")
  assert result.returncode == 0, result.stderr
  assert calls == [QR + ["describe", "n"], QR + ["delete", "n"], QR + ["create", "n"],
                   QR + ["describe", "n"], SSH, SSH]


@pytest.mark.parametrize("plan_status, extra, created", [
    (0, [], True), (1, [], False), (1, ["--create_even_if_it_does_not_fit"], True),
    (2, [], False)])
def test_plan_decides_whether_the_slice_is_created(tmp_path, plan_status, extra, created):
  result, calls = _launch(tmp_path, ["NOT_FOUND"], "--plan", *extra, "--",
                          "--config.mesh.fsdp=16", plan_status=plan_status)
  assert calls[0] == ["plan", "-m", "mae_jax.plan", "--config=configs/vit_b.py",
                      "--topology=v5litepod-16"]
  assert (CREATE in calls) == created
  assert (result.returncode == 0) == created, result.stderr
  if plan_status == 1 and not created:
    assert "does not fit on v5litepod-16" in result.stderr
    assert "--create_even_if_it_does_not_fit" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--accelerator_type=v4-8"], "--name is required"),
    (["--name=n", "--zone=z", "--accelerator_type=v4"], "is not a TPU type"),
    (["--name=n", "--zone=z", "--accelerator_type=v4-4"], "TensorCores (2 a chip): 8, 16"),
    (["--name=n", "--zone=z", "--accelerator_type=v5litepod-2"], "1, 4, 8, 16, 32, 64, 128 or"),
    (["--name=n", "--zone=z", "--accelerator_type=v6e-512"], "1, 4, 8, 16, 32, 64, 128 or"),
    (["--name=n", "--zone=z", "--accelerator_type=v3-32", "--plan", "--config=c.py"],
     "--plan compiles for v4, v5p, v5e (v5litepod) and v6e slices, not v3"),
    (["--name=n", "--zone=z", "--steps=create,train"], "'train' is not one of"),
    (["--name=n", "--zone=z", "--steps=install"], "--repo is required"),
    (["--name=n", "--zone=z", "--steps=run", "--config=c.py"], "--workdir is required"),
    (["--name=n", "--zone=z", "--bogus"], "unknown argument '--bogus'"),
])
def test_tpu_script_explains_bad_arguments(args, message):
  result = subprocess.run([str(LAUNCH / "tpu_pod.sh"), "--dry_run", *args], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 2
  assert message in result.stderr
  assert "gcloud" not in result.stdout


# --- mae_jax.distributed.plan ---------------------------------------------------------------

EXPLICIT = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "2",
            distributed.ENV_PROCESS_ID: "1"}
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "16",
         "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2",
         "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}


def test_lone_process_is_left_alone():
  assert distributed.plan({}) == distributed.Plan("single")
  assert distributed.plan({distributed.ENV_NUM_CPU_DEVICES: "8"}) == distributed.Plan(
      "single", num_cpu_devices=8)
  assert distributed.plan({distributed.ENV_NUM_PROCESSES: "1"}).source == "single"


def test_explicit_coordinates_from_env_and_arguments():
  assert distributed.plan(EXPLICIT) == distributed.Plan("explicit", "10.0.0.1:1234", 2, 1)
  cpu_pod = distributed.plan({**EXPLICIT, distributed.ENV_NUM_CPU_DEVICES: "4"})
  assert (cpu_pod.num_cpu_devices, cpu_pod.cpu_collectives) == (4, True)
  assert distributed.plan({**EXPLICIT, "JAX_PLATFORMS": "cpu"}).cpu_collectives
  # Arguments (flags) win over the environment.
  assert distributed.plan(EXPLICIT, process_id=0, num_processes=3) == distributed.Plan(
      "explicit", "10.0.0.1:1234", 3, 0)
  assert distributed.plan({}, coordinator_address="h:1", num_processes=2,
                          process_id=0).coordinator_address == "h:1"


def test_explicit_beats_slurm_and_cloud_tpu():
  assert distributed.plan({**SLURM, **EXPLICIT}, on_cloud_tpu=True).source == "explicit"
  assert distributed.plan(SLURM, on_cloud_tpu=True).source == "slurm"


@pytest.mark.parametrize("env, message", [
    ({distributed.ENV_COORDINATOR: "h:1"},
     "missing --num_processes ($MAE_JAX_NUM_PROCESSES), --process_id ($MAE_JAX_PROCESS_ID)"),
    ({**EXPLICIT, distributed.ENV_PROCESS_ID: "2"}, "process_id=2 must lie in [0, num_processes=2)"),
    ({**EXPLICIT, distributed.ENV_NUM_PROCESSES: "two"}, "MAE_JAX_NUM_PROCESSES='two' is not an"),
    ({distributed.ENV_NUM_CPU_DEVICES: "0"}, "to at least 1"),
])
def test_bad_explicit_settings_say_what_to_fix(env, message):
  with pytest.raises(ValueError) as error:
    distributed.plan(env)
  assert message in str(error.value)


def test_slurm_one_process_per_gpu_lets_jax_pick_the_gpu():
  assert distributed.plan(SLURM) == distributed.Plan("slurm")


def test_slurm_one_process_per_node_gets_every_gpu():
  per_node = {**SLURM, "SLURM_NTASKS": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  assert distributed.plan(per_node).local_device_ids == (0, 1, 2, 3)
  del per_node["CUDA_VISIBLE_DEVICES"]
  assert distributed.plan({**per_node, "SLURM_GPUS_ON_NODE": "8"}).local_device_ids == tuple(
      range(8))


@pytest.mark.parametrize("env", [
    {**SLURM, "SLURM_NTASKS": "1"},                                 # a one-task job
    {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"},  # the batch shell, not srun
])
def test_slurm_without_several_srun_tasks_is_a_lone_process(env):
  assert distributed.plan(env).source == "single"


def test_slurm_detection_agrees_with_jax(monkeypatch):
  # Our "slurm" plan hands over to jax's own detection, so jax must recognise the same env.
  from jax._src.clusters import slurm_cluster  # pylint: disable=g-import-not-at-top
  for key in [k for k in os.environ if k.startswith("SLURM_")]:
    monkeypatch.delenv(key)
  for key, value in SLURM.items():
    monkeypatch.setenv(key, value)
  assert slurm_cluster.SlurmCluster.is_env_present()
  assert slurm_cluster.SlurmCluster.get_process_count() == 16
  assert slurm_cluster.SlurmCluster.get_coordinator_address(None, None).startswith("gpu001:")
  monkeypatch.delenv("SLURM_STEP_NODELIST")
  assert not slurm_cluster.SlurmCluster.is_env_present()


def test_cloud_tpu_vm_hands_over_to_jax():
  assert distributed.plan({}, on_cloud_tpu=True) == distributed.Plan("cloud_tpu")


# What `mpirun -np 4` (Open MPI 4) sets in each process; a Kubernetes Indexed Job's pod.
OPEN_MPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
            "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
KUBERNETES = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}


def test_open_mpi_launch_is_found_and_handed_to_jax(monkeypatch):
  assert distributed.plan(OPEN_MPI) == distributed.Plan("open_mpi",
                                                        cluster_detection_method="ompi")
  assert distributed.plan({**OPEN_MPI, "OMPI_COMM_WORLD_SIZE": "1"}).source == "single"
  assert distributed.plan({**SLURM, **OPEN_MPI}).source == "slurm"
  # jax's own Open MPI detection reads the same environment.
  from jax._src.clusters import ompi_cluster  # pylint: disable=g-import-not-at-top
  for key, value in OPEN_MPI.items():
    monkeypatch.setenv(key, value)
  assert ompi_cluster.OmpiCluster.is_env_present()
  assert ompi_cluster.OmpiCluster.get_process_count() == 4
  assert ompi_cluster.OmpiCluster.get_process_id() == 2
  assert ompi_cluster.OmpiCluster.get_coordinator_address(None, None).startswith("10.96.0.1:")


def test_other_mpi_launches_go_through_mpi4py_or_say_what_is_missing():
  # Open MPI 5 (PMIx) and MPICH set no orte URI: jax joins them through mpi4py.
  for env in ({"OMPI_COMM_WORLD_SIZE": "2", "PMIX_RANK": "0"}, {"PMI_SIZE": "8", "PMI_RANK": "1"}):
    assert distributed.plan(env, installed=lambda m: m == "mpi4py") == distributed.Plan(
        "mpi4py", cluster_detection_method="mpi4py")
    with pytest.raises(ValueError, match="one of .* processes.*pip install mpi4py"):
      distributed.plan(env, installed=lambda m: False)


def test_kubernetes_indexed_job_is_found_or_says_what_is_missing():
  assert distributed.plan(KUBERNETES, installed=lambda m: m == "kubernetes") == distributed.Plan(
      "kubernetes")
  with pytest.raises(ValueError, match=r'pip install "jax\[k8s\]"'):
    distributed.plan(KUBERNETES, installed=lambda m: False)
  # A lone pod (no Indexed Job) runs alone.
  assert distributed.plan({"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
                          installed=lambda m: True).source == "single"


def test_kubernetes_detection_agrees_with_jax(monkeypatch, tmp_path):
  # jax's detection needs the `kubernetes` package; a stand-in that only loads its config.
  (tmp_path / "kubernetes").mkdir()
  (tmp_path / "kubernetes" / "__init__.py").write_text(textwrap.dedent("""
      import types
      config = types.SimpleNamespace(load_incluster_config=lambda: None)
      client = types.SimpleNamespace(CoreV1Api=object, BatchV1Api=object,
                                     exceptions=types.SimpleNamespace(ApiException=Exception))
      """))
  monkeypatch.syspath_prepend(str(tmp_path))
  from jax._src.clusters import k8s_cluster  # pylint: disable=g-import-not-at-top
  for key, value in KUBERNETES.items():
    monkeypatch.setenv(key, value)
  assert k8s_cluster.K8sCluster.is_env_present()
  assert distributed.plan(os.environ).source == "kubernetes"
  monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
  assert not k8s_cluster.K8sCluster.is_env_present()


def test_mpirun_environment_starts_a_real_job(tmp_path):
  # What Open MPI's mpirun sets for 2 processes, here both on localhost with 2 CPU devices each:
  # before, each of them trained alone.
  results = _two_process_job(tmp_path, lambda i: dict(
      OMPI_MCA_orte_hnp_uri="4096.0;tcp://127.0.0.1:1", OMPI_COMM_WORLD_SIZE="2",
      OMPI_COMM_WORLD_RANK=str(i), OMPI_COMM_WORLD_LOCAL_RANK=str(i)))
  assert results == ["RESULT open_mpi 0 2 2 4 6.0", "RESULT open_mpi 1 2 2 4 6.0"]


def test_initialize_is_a_no_op_for_a_lone_process(monkeypatch):
  for key in [k for k in os.environ if k.startswith(("MAE_JAX_", "SLURM_"))]:
    monkeypatch.delenv(key)
  assert distributed.initialize() == distributed.Plan("single")
  assert not jax.distributed.is_initialized()


def test_initialize_reads_its_flags():
  # Flags count once parsed (by main.py's app.run); an incomplete set names what is missing.
  program = ("from absl import app; from mae_jax import distributed; "
             "app.run(lambda argv: distributed.initialize())")
  result = subprocess.run([sys.executable, "-c", program, "--num_processes=2", "--process_id=1"],
                          capture_output=True, text=True, check=False, env=_env())
  assert result.returncode != 0
  assert "missing --coordinator_address ($MAE_JAX_COORDINATOR)" in result.stderr


# --- launch/local_pod.sh --------------------------------------------------------------------

def _local_pod(tmp_path, module_source: str, *args: str, timeout: float = 120):
  """Runs local_pod.sh with a module written to tmp_path; returns the finished process."""
  (tmp_path / "pod_probe.py").write_text(textwrap.dedent(module_source))
  env = _env(PYTHON=sys.executable, PYTHONPATH=str(tmp_path))
  return subprocess.run([str(LAUNCH / "local_pod.sh"), *args, "--module=pod_probe", "--"],
                        capture_output=True, text=True, check=False, env=env, timeout=timeout)


# Prints, per process, how it joined and a sum over every device of the job.
JOB_PROBE = """
    import jax, numpy as np
    from mae_jax import distributed
    plan = distributed.initialize()
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    # Process i contributes i + 1 on each of its devices; the sum needs every process.
    local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
    total = jax.jit(lambda x: x.sum())(jax.make_array_from_process_local_data(sharding, local))
    print("RESULT", plan.source, jax.process_index(), jax.process_count(),
          jax.local_device_count(), jax.device_count(), float(total))
    """


def test_local_pod_joins_processes_into_one_jax_job(tmp_path):
  result = _local_pod(tmp_path, JOB_PROBE, "2", "--devices_per_process=3")
  assert result.returncode == 0, result.stdout + result.stderr
  results = sorted(l for l in result.stdout.splitlines() if "RESULT" in l)
  assert results == ["[0/2] RESULT explicit 0 2 3 6 9.0", "[1/2] RESULT explicit 1 2 3 6 9.0"]


def _two_process_job(tmp_path, launcher_env) -> list[str]:
  """Starts JOB_PROBE as 2 processes on localhost (2 CPU devices each) with the environment a
  launcher gives process i (`launcher_env(i)`); their RESULT lines."""
  (tmp_path / "pod_probe.py").write_text(textwrap.dedent(JOB_PROBE))
  port = subprocess.run(
      [sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
       "print(s.getsockname()[1])"], capture_output=True, text=True, check=True).stdout.strip()
  processes = [subprocess.Popen(
      [sys.executable, "-m", "pod_probe"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env=_env(PYTHONPATH=str(tmp_path), JAX_PLATFORMS="cpu",
                          MAE_JAX_NUM_CPU_DEVICES="2", JAX_COORDINATOR_PORT=port,
                          **launcher_env(i)))
      for i in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  return [l for out in outputs for l in out.splitlines() if l.startswith("RESULT")]


@pytest.mark.parametrize("tasks_per_node", [2, 1])
def test_srun_environment_starts_a_real_job(tmp_path, tasks_per_node):
  # What srun sets for 2 tasks, on 1 node (a task per GPU) or on 2 "nodes" (a task per node),
  # here all on localhost with 2 CPU devices a task.
  results = _two_process_job(tmp_path, lambda i: dict(
      SLURM_JOB_ID="77", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
      SLURM_PROCID=str(i), SLURM_LOCALID=str(i % tasks_per_node),
      SLURM_STEP_NUM_NODES=str(2 // tasks_per_node), CUDA_VISIBLE_DEVICES="0,1"))
  assert results == ["RESULT slurm 0 2 2 4 6.0", "RESULT slurm 1 2 2 4 6.0"]


def test_local_pod_stops_everything_when_one_process_fails(tmp_path):
  start = time.monotonic()
  result = _local_pod(tmp_path, """
      import os, sys, time
      if os.environ["MAE_JAX_PROCESS_ID"] == "1":
        sys.exit(3)
      time.sleep(100)
      """, "3")
  assert result.returncode == 3
  assert time.monotonic() - start < 30
  assert "process 1/3" in result.stderr and "failed with exit status 3" in result.stderr


def test_local_pod_passes_sigterm_to_every_process(tmp_path):
  (tmp_path / "pod_probe.py").write_text(textwrap.dedent("""
      import os, signal, sys, time
      signal.signal(signal.SIGTERM, lambda *_: (print("preempted", flush=True), sys.exit(0)))
      print("ready", flush=True)
      time.sleep(100)
      """))
  env = _env(PYTHON=sys.executable, PYTHONPATH=str(tmp_path))
  pod = subprocess.Popen([str(LAUNCH / "local_pod.sh"), "2", "--module=pod_probe"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  ready = [pod.stdout.readline() for _ in range(2)]
  assert sorted(ready) == ["[0/2] ready\n", "[1/2] ready\n"]
  pod.send_signal(signal.SIGTERM)
  stdout, _ = pod.communicate(timeout=30)
  assert pod.returncode == 0
  assert sorted(stdout.splitlines()) == ["[0/2] preempted", "[1/2] preempted"]


@pytest.mark.parametrize("args", [[], ["x"], ["2", "3"], ["0"], ["2", "--devices_per_process=0"]])
def test_local_pod_rejects_bad_arguments(args):
  result = subprocess.run([str(LAUNCH / "local_pod.sh"), *args, "--", "--config=c.py"],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert "local_pod.sh:" in result.stderr
