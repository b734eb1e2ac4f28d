"""mae_jax.plan: Cloud TPU slices by name, and the real train step compiled for one with libtpu
(installed by the test extras; no TPU needed)."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mae_jax import config_lib, plan

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30


@pytest.mark.parametrize("name, chips, hosts, workers, topology, accelerator_type, hbm_gib, kind", [
    # v4 and v5p count TensorCores (two a chip, one JAX device a chip); 4 chips a host, one TPU
    # VM a host.
    ("v4-8", 4, 1, 1, "v4:2x2x1", "v4-8", 32, "TPU v4"),
    ("v4-16", 8, 2, 2, "v4:2x2x2", "v4-16", 32, "TPU v4"),
    ("v4-32", 16, 4, 4, "v4:2x2x4", "v4-32", 32, "TPU v4"),
    ("v4-64", 32, 8, 8, "v4:2x4x4", "v4-64", 32, "TPU v4"),
    ("v4-128", 64, 16, 16, "v4:4x4x4", "v4-128", 32, "TPU v4"),
    ("v5p-8", 4, 1, 1, "v5p:2x2x1", "v5p-8", 95, "TPU v5"),
    ("v5p-64", 32, 8, 8, "v5p:2x4x4", "v5p-64", 95, "TPU v5"),
    ("v5p-256", 128, 32, 32, "v5p:4x4x8", "v5p-256", 95, "TPU v5"),
    # v5e (gcloud: v5litepod) and v6e count chips; 8 chips a host, as the documentation's
    # tables count hosts (v5e: 1x1 = 1/8, 2x2 = 1/2, 4x4 = 2, 8x8 = 8, 16x16 = 32); up to 8
    # chips run as one TPU VM, more as 4-chip VMs.
    ("v5litepod-1", 1, 1 / 8, 1, "v5e:1x1", "v5litepod-1", 16, "TPU v5 lite"),
    ("v5litepod-4", 4, 1 / 2, 1, "v5e:2x2", "v5litepod-4", 16, "TPU v5 lite"),
    ("v5litepod-8", 8, 1, 1, "v5e:2x4", "v5litepod-8", 16, "TPU v5 lite"),
    ("v5litepod-16", 16, 2, 4, "v5e:4x4", "v5litepod-16", 16, "TPU v5 lite"),
    ("v5litepod-32", 32, 4, 8, "v5e:4x8", "v5litepod-32", 16, "TPU v5 lite"),
    ("v5e-64", 64, 8, 16, "v5e:8x8", "v5litepod-64", 16, "TPU v5 lite"),
    ("v5litepod-128", 128, 16, 32, "v5e:8x16", "v5litepod-128", 16, "TPU v5 lite"),
    ("v5litepod-256", 256, 32, 64, "v5e:16x16", "v5litepod-256", 16, "TPU v5 lite"),
    ("v6e-8", 8, 1, 1, "v6e:2x4", "v6e-8", 32, "TPU v6 lite"),
    ("v6e-16", 16, 2, 4, "v6e:4x4", "v6e-16", 32, "TPU v6 lite"),
    ("v6e-64", 64, 8, 16, "v6e:8x8", "v6e-64", 32, "TPU v6 lite"),
    # Topologies as libtpu names them.
    ("v5e:2x2", 4, 1 / 2, 1, "v5e:2x2", "v5litepod-4", 16, "TPU v5 lite"),
    ("v5p:2x2x4", 16, 4, 4, "v5p:2x2x4", "v5p-32", 95, "TPU v5"),
])
def test_accelerator_names_give_chips_hosts_and_hbm(name, chips, hosts, workers, topology,
                                                     accelerator_type, hbm_gib, kind):
  tpu = plan.parse_slice(name)
  assert (tpu.chips, tpu.hosts, tpu.workers, tpu.topology, tpu.accelerator_type) == (
      chips, hosts, workers, topology, accelerator_type)
  assert tpu.generation.hbm_bytes == hbm_gib * GIB
  assert tpu.generation.device_kind == kind


@pytest.mark.parametrize("name, message", [
    ("v4-6", "powers of two"), ("v4-4", "at least 8"), ("v5litepod-12", "powers of two"),
    ("v7x-8", "unknown TPU generation"), ("v5e:2x2x2", "2D torus"), ("tpu", "is not an"),
    # Shapes Cloud TPU does not offer (its tables: v5e 1x1, 2x2, 2x4, 4x4, ... 16x16).
    ("v5litepod-2", "not a slice"), ("v5litepod-512", "not a slice"), ("v5e:3x4", "not a slice"),
    ("v5e:1x8", "not a slice"), ("v5p:1x1x1", "not a slice"), ("v4:2x2x3", "not a slice"),
])
def test_bad_accelerator_names_say_what_is_accepted(name, message):
  with pytest.raises(ValueError, match=message):
    plan.parse_slice(name)


@pytest.mark.parametrize("message, total_gib, temporaries_gib", [
    # Everything held at once.
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
     "hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.", 20.5, None),
    # The temporaries alone (libtpu 0.0.42, ViT-H/14 on v5litepod-32): the arguments add on.
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (16.40G) exceeds available HBM (15.75G).", 16.40 + 8.0, 16.40),
    ("RESOURCE_EXHAUSTED: something else entirely", float("inf"), None),
])
def test_a_refused_program_s_memory_is_read_from_xla_s_message(message, total_gib,
                                                               temporaries_gib):
  memory = plan.refused_memory(message, arguments=8 * GIB)
  assert memory["total"] == pytest.approx(total_gib * GIB)
  if temporaries_gib is None:
    assert np.isnan(memory["temporaries"])
  else:
    assert memory["temporaries"] == pytest.approx(temporaries_gib * GIB)


def test_heartbeat_logs_while_the_body_runs_and_stops_with_it():
  lines = []
  with plan.heartbeat(lines.append, 0.05, "compiling for v4-8"):
    time.sleep(0.4)
  count = len(lines)
  assert count >= 3 and all(re.fullmatch(r"  still compiling for v4-8: \d+ s", l) for l in lines)
  time.sleep(0.2)
  assert len(lines) == count  # nothing after the body ended
  with plan.heartbeat(lines.append, 0, "compiling"):
    time.sleep(0.1)
  assert len(lines) == count  # 0: silent


def test_collectives_are_counted_with_their_bytes():
  hlo = """
  %all-gather-start.1 = (f32[128]{0}, f32[512]{0}) all-gather-start(f32[128]{0} %p), dimensions={0}
  %all-gather-done.1 = f32[512]{0} all-gather-done((f32[128]{0}, f32[512]{0}) %all-gather-start.1)
  %all-reduce.2 = (bf16[64,64]{1,0}, f32[]) all-reduce(bf16[64,64]{1,0} %a, f32[] %b), to_apply=%add
  %reduce-scatter.3 = f32[16]{0} reduce-scatter(f32[64]{0} %c), dimensions={0}
  %fusion = f32[8]{0} fusion(f32[8]{0} %d), kind=kLoop, calls=%all-gather-like
  """
  assert plan.collectives(hlo) == {"all-gather": {"count": 1, "bytes": 2048},
                                   "all-reduce": {"count": 1, "bytes": 64 * 64 * 2 + 4},
                                   "reduce-scatter": {"count": 1, "bytes": 64}}


def test_the_step_s_batch_of_a_non_square_config_is_b_h_w_c_and_the_step_takes_it():
  # The abstract arguments the plan compiles, here over the CPU (no libtpu): a (H, W) img_size
  # gives a [B, H, W, C] batch, which the trainer's step traces with (lowered, not compiled).
  config = config_lib.pretrain_config("vit_b")
  config.model = config_lib.model_config(
      "vit_b", img_size=(16, 32), patch_size=8, in_chans=1, embed_dim=32, depth=1, num_heads=2,
      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
  config.input.update(batch_size=4, mean=(0.5,), std=(0.25,))
  config = plan._tpu_config(config)  # pylint: disable=protected-access
  plan.train.validate_config(config, device_count=4, process_count=1)
  step, state, images = plan.step_arguments(config, jax.devices()[:1])
  assert images.shape == (4, 16, 32, 1) and images.dtype == np.float32
  assert state.params["embedding"]["kernel"].shape == (8, 8, 1, 32)
  lowered = step.lower(state, images)
  assert "4x16x32x1xf32" in lowered.as_text()


# --- compiled with libtpu -------------------------------------------------------------------

def _needs_libtpu():
  assert importlib.util.find_spec("libtpu") is not None, (
      "libtpu is missing: pip install -e '.[test]' (or '.[tpu]') installs it")


def _start(*args, **env_overrides):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(env_overrides)
  return subprocess.Popen([sys.executable, "-m", "mae_jax.plan", "--config=configs/demo.py",
                           *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)


def _plans(*arg_lists, env=None):
  """Runs a plan for each list of flags, side by side (the first with `env` added to its
  environment); (the finished process, its JSON report or None) for each."""
  processes = [_start(*args, **((env or {}) if i == 0 else {}))
               for i, args in enumerate(arg_lists)]
  results = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=1800)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    report = json.loads(stdout.splitlines()[-1]) if result.returncode in (0, 1) else None
    results.append((result, report))
  return results


def _plan(*args):
  return _plans(args)[0]


# A small model whose params and optimizer state outweigh its activations, so that sharding
# the state over the chips is what makes it fit (the demo stays the demo above; this one
# compiles in a fraction of its time).
_SMALL = ["--topology=v5e:2x2", "--config.model.embed_dim=384", "--config.model.depth=1",
          "--config.model.num_heads=2", "--config.model.decoder_embed_dim=32",
          "--config.model.decoder_depth=1", "--config.model.decoder_num_heads=2",
          "--config.model.img_size=16", "--config.input.batch_size=4",
          "--config.mesh.fsdp_min_mb=0"]


@pytest.fixture(scope="module")
def first_plans(tmp_path_factory):
  """The plans that need no other's result, side by side: the demo on v5e:2x2 (with a
  persistent compilation cache of its own), and the small model there with its state on every
  chip and sharded over the 4 chips."""
  _needs_libtpu()
  cache = tmp_path_factory.mktemp("xla_cache")
  demo, replicated, sharded = _plans(["--topology=v5e:2x2", "--heartbeat_s=2"], _SMALL,
                                     [*_SMALL, "--config.mesh.fsdp=4"],
                                     env={"JAX_COMPILATION_CACHE_DIR": str(cache)})
  return {"demo": demo, "replicated": replicated, "sharded": sharded, "cache": cache}


@pytest.fixture(scope="module")
def demo_plan(first_plans):
  return first_plans["demo"]


def test_demo_compiles_for_v5e_2x2_and_fits(demo_plan):
  result, report = demo_plan
  assert result.returncode == 0, result.stdout + result.stderr
  assert {"topology", "chips", "device_kind", "hbm_gb_per_chip", "memory_gb_per_chip", "fits",
          "compile_s", "collectives", "suggestions"} <= set(report)
  assert (report["topology"], report["chips"], report["device_kind"]) == (
      "v5e:2x2", 4, "TPU v5 lite")
  assert report["fits"] and report["suggestions"] == []
  assert 0.01 < report["memory_gb_per_chip"] < report["hbm_gb_per_chip"]
  # Data parallel over 4 chips: the gradients are all-reduced, nothing is gathered.
  assert report["collectives"].get("all-reduce", 0) >= 1
  assert "all-gather" not in report["collectives"]
  memory = report["memory_gb"]
  assert memory["state"] == pytest.approx(3 * 4 * 3.2e6 / 1e9, rel=0.25)  # params + 2 moments
  assert memory["total"] == report["memory_gb_per_chip"] == pytest.approx(
      memory["arguments"] + memory["outputs"] + memory["temporaries"], abs=0.002)
  assert "params + optimizer state" in result.stdout and "images/s" in result.stdout
  # A line every --heartbeat_s seconds while XLA compiles (the demo takes 20-70 s here).
  beats = re.findall(r"^  still compiling for v5litepod-4: (\d+) s$", result.stdout, re.M)
  assert beats and [int(b) for b in beats] == sorted(int(b) for b in beats), result.stdout
  assert result.stdout.index("still compiling") < result.stdout.index("compiled in")
  assert "TPU" not in result.stderr.replace("TPU v5 lite", "")  # libtpu stays quiet


def test_the_plan_writes_no_tpu_executable_into_the_compilation_cache(first_plans):
  # A deviceless TPU executable in JAX's persistent cache could never be read back (libtpu:
  # "PjRtCompiler must be constructed with a Client"); the plan compiles past the cache.
  result, _ = first_plans["demo"]
  assert result.returncode == 0, result.stderr
  assert not [p.name for p in first_plans["cache"].iterdir() if "train_step" in p.name]


def test_a_config_that_does_not_fit_exits_1_and_its_first_suggestion_fits(first_plans):
  # A chip with too little HBM for the model with its state on every chip, but enough once the
  # state (and so the gradients) is sharded over the 4 chips: halfway between what the two
  # need (program code included, which sharding makes larger at this tiny size).
  runs = [first_plans["replicated"], first_plans["sharded"]]
  for result, _ in runs:
    assert result.returncode == 0, result.stdout + result.stderr
  (_, replicated), (_, sharded) = runs
  need = lambda report: report["memory_gb"]["total"] + report["memory_gb"]["code"]
  assert need(sharded) < need(replicated)
  hbm = (need(sharded) + need(replicated)) / 2
  args = [*_SMALL, f"--hbm_gb={hbm:.4f}", "--max_suggestions=1", "--max_compiles=1"]
  # The suggestion is asserted below to be exactly these flags, so the run with it applied
  # starts alongside the run that suggests it.
  expected = ["--config.mesh.fsdp=4"]
  (result, report), (again, applied) = _plans(args, [*args, *expected])
  assert result.returncode == 1, result.stdout + result.stderr
  assert not report["fits"] and report["suggestions"], result.stdout
  first = report["suggestions"][0]
  assert first == expected
  assert "overrides that fit" in result.stdout and " ".join(first) in result.stdout
  assert again.returncode == 0, again.stdout + again.stderr
  assert applied["fits"] and applied["memory_gb"]["state"] < replicated["memory_gb"]["state"] / 2
  assert applied["collectives"]["all-gather"] >= 1  # the sharded params are gathered


@pytest.mark.parametrize("args, message", [
    (["--topology=v9-8"], "unknown TPU generation"),
    (["--topology=v5e:2x2", "--config.input.batch_size=6"], "not divisible by the 4 devices"),
    (["--topology=v5litepod-16", "--config.input.batch_size=8"],
     "config.input.batch_size=8 is not divisible by the 16 devices"),
    ([], "--config and --topology are required"),
])
def test_usage_errors_exit_2_before_compiling(args, message):
  result, _ = _plan(*args)
  assert result.returncode == 2, result.stdout + result.stderr
  assert message in result.stderr
  assert "compiling" not in result.stdout


@pytest.mark.parametrize("flag, message", [
    ("--hbm_gb=0", "--hbm_gb=0: give the HBM per chip in GB, more than 0"),
    ("--hbm_gb=-16", "--hbm_gb=-16: give the HBM per chip in GB, more than 0"),
    ("--heartbeat_s=-1", "--heartbeat_s=-1: give the seconds between"),
    ("--heartbeat_s=0.001", "at least 1, or 0 for none"),
])
@pytest.mark.filterwarnings("ignore:the load_module")  # ml_collections loading the config file
def test_flag_values_that_make_no_sense_exit_2_before_compiling(flag, message, capsys):
  status = plan.main(["mae_jax.plan", f"--config={REPO}/configs/demo.py", "--topology=v5e:2x2",
                      flag])
  out, err = capsys.readouterr()
  assert status == 2 and message in err and "--heartbeat_s=S" in err, err
  assert "compiling" not in out


def test_with_libtpu_installed_cpu_runs_start_quietly_on_the_cpu():
  _needs_libtpu()
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY")}
  code = "import mae_jax.train, jax; print(jax.default_backend(), jax.device_count())"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env, cwd=REPO)
  assert result.stdout.split() == ["cpu", "1"]
  assert "TPU" not in result.stderr and "libtpu" not in result.stderr, result.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_describes_the_command_and_its_flags_and_exits_0(flag):
  result = subprocess.run([sys.executable, "-m", "mae_jax.plan", flag], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr
  for text in ("--topology", "--hbm_gb", "Exit status", "docs/configs.md"):
    assert text in result.stdout
