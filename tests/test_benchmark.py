"""The benchmark command end to end without TensorFlow, and the FLOP count it divides by."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mae_jax import config_lib
from mae_jax.benchmarks.flops import train_flops_per_image
from mae_jax.models import from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("img_per_s", "tflops", "mfu", "peak_memory_gb", "compile_s")
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
            decoder_depth=2, decoder_num_heads=4)

# Runs in a fresh interpreter where TensorFlow cannot be imported, as on the GPU hosts.
WITHOUT_TF = """
import sys
for name in ("tensorflow", "tensorflow_datasets"):
  sys.modules[name] = None
try:
  import tensorflow
except ImportError:
  pass
else:
  raise SystemExit("the TensorFlow blocker did not work")
"""


def _python(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", WITHOUT_TF + code, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_importing_the_benchmark_needs_no_tensorflow():
  proc = _python("import mae_jax.benchmark\n"
                 "from mae_jax.benchmarks import cpu_all, cpu_ops, gpu_all, input_pipeline\n"
                 "from mae_jax.benchmarks import runner, step, torch_reference\n"
                 "import mae_jax.official\n"
                 "print([m for m, v in sys.modules.items() if m.startswith('tensorflow') and v])")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_benchmark_runs_end_to_end_and_ends_with_one_json_line(tmp_path):
  proc = _python("import runpy\nsys.argv = ['mae_jax.benchmark'] + sys.argv[1:]\n"
                 "runpy.run_module('mae_jax.benchmark', run_name='__main__')",
                 "--config=configs/demo.py", "--batch_size=8", "--steps=2", "--warmup=1",
                 f"--profile_dir={tmp_path}",
                 # A tiny model: the command's work and output are the same at any size.
                 *(f"--config.model.{k}={v}" for k, v in TINY.items()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  # The profile: a trace of the step and its costliest events, one per line with a time.
  assert [os.path.exists(f) for f in result["profile_trace"]] == [True]
  top = open(result["profile_summary"]).read().splitlines()[1:]
  assert len(top) > 5 and all(float(line.split()[0]) >= 0 for line in top)
  assert result["attention"] == dict(encoder="softmax", decoder="softmax")
  for key in REQUIRED:
    assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
  assert result["batch_size"] == 8 and result["steps"] == 2
  assert math.isfinite(result["loss"])
  # The TFLOP/s figure is the FLOP count over the measured step time.
  expected = result["train_gflops_per_image"] * 8 / result["step_s"] / 1e3
  assert result["tflops"] == pytest.approx(expected, rel=1e-6)
  assert result["mfu"] == pytest.approx(result["tflops"] / result["peak_tflops_per_device"])


def test_bad_benchmark_flags_are_refused_with_the_fix():
  proc = _python("import runpy\nsys.argv = ['mae_jax.benchmark'] + sys.argv[1:]\n"
                 "runpy.run_module('mae_jax.benchmark', run_name='__main__')",
                 "--config=configs/demo.py", "--batch_size=0", "--steps=1", timeout=300)
  assert proc.returncode != 0
  assert "config.input.batch_size=0 must be at least 1" in proc.stderr


@pytest.mark.parametrize("which", ["cpu_all", "gpu_all", "torch_reference", "official"])
def test_runs_of_the_official_code_without_a_clone_of_it_are_refused_with_the_fix(
    which, tmp_path, capsys):
  from mae_jax import official  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from mae_jax.benchmarks import cpu_all, gpu_all, torch_reference
  empty = str(tmp_path / "not_a_clone")
  os.makedirs(empty)
  run = {"cpu_all": lambda: cpu_all.main([f"--mae_repo={empty}", f"--out={tmp_path}/out"]),
         "gpu_all": lambda: gpu_all.main([f"--mae_repo={empty}", f"--out={tmp_path}/out"]),
         "torch_reference": lambda: torch_reference.main(["--impl=official", "--size=vit_b"]),
         "official": lambda: official.main([f"--mae_repo={empty}"])}[which]
  with pytest.raises(SystemExit) as exit_info:
    run()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "https://github.com/facebookresearch/mae" in err
  assert ("--mae_repo=PATH" if which == "torch_reference" else "has no models_mae.py") in err
  assert not os.path.exists(f"{tmp_path}/out")  # refused before anything ran
  with pytest.raises(FileNotFoundError, match="has no models_mae.py"):
    official.import_official(empty)


@pytest.mark.parametrize("patches", [16, 196, 256])
def test_mask_ratio_zero_is_timed_with_exactly_one_patch_masked(patches):
  from mae_jax.benchmarks.flops import timed_mask_ratio  # pylint: disable=g-import-not-at-top
  from mae_jax.models.functional import num_kept  # pylint: disable=g-import-not-at-top
  assert num_kept(patches, timed_mask_ratio(0.0, patches)) == patches - 1
  assert timed_mask_ratio(0.75, patches) == 0.75


def test_benchmark_at_mask_ratio_zero_times_a_step_with_a_finite_loss():
  from mae_jax import benchmark, train  # pylint: disable=g-import-not-at-top
  config = config_lib.pretrain_config("vit_b")
  config.model.update(dict(TINY, dtype="float32", mask_ratio=0.0))
  with pytest.raises(ValueError, match="masks none of the 16 patches"):
    train.validate_config(config)
  config = benchmark.apply_overrides(config, 4, 0.0)
  train.validate_config(config)
  # One compiled program rather than the model op by op.
  (loss, _, mask), _ = jax.jit(lambda: from_config(config.model).init_with_output(
      {"params": jax.random.key(0), "mask": jax.random.key(1)}, jnp.ones((4, 32, 32, 3)),
      mask_ratio=config.model.mask_ratio))()
  assert jnp.isfinite(loss) and mask.sum(axis=1).tolist() == [1, 1, 1, 1]


def test_train_flops_match_a_hand_count_for_a_tiny_model():
  m = config_lib.model_config("vit_b", **TINY)
  # L = 16 patches of 8*8*3 = 192 values; 4 kept + cls = 5 encoder tokens, 17 decoder tokens.
  patch_embed = 16 * 192 * 64
  encoder_block = 3 * 5 * 64 * 64 + 2 * 5 * 5 * 64 + 5 * 64 * 64 + 2 * 5 * 64 * 256
  decoder_embed = 5 * 64 * 32
  decoder_block = 3 * 17 * 32 * 32 + 2 * 17 * 17 * 32 + 17 * 32 * 32 + 2 * 17 * 32 * 128
  pred = 17 * 32 * 192
  macs = patch_embed + 2 * encoder_block + decoder_embed + 2 * decoder_block + pred
  assert macs == 1_264_000
  assert train_flops_per_image(m, 0.75) == 3 * 2 * macs


def _dot_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general in a jaxpr, nested jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _dot_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _dot_flops(sub)
  return total


@pytest.mark.parametrize("mask_ratio", [0.75, 0.0])
def test_train_flops_are_three_times_the_matmuls_the_model_runs(mask_ratio):
  m = config_lib.model_config("vit_b", dtype="float32", **TINY)
  model = from_config(m)
  images = jnp.zeros((2, 32, 32, 3))
  params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0),
                                              "mask": jax.random.key(1)}, images)["params"])
  noise = jnp.zeros((2, 16))
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, images, mask_ratio=mask_ratio,
                                               noise=noise))(params)
  assert 3 * _dot_flops(jaxpr.jaxpr) == 2 * train_flops_per_image(m, mask_ratio)


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")  # torch's side copies
def test_cpu_ops_times_every_kind_of_operation_on_both_sides(capsys):
  from mae_jax.benchmarks import cpu_ops  # pylint: disable=g-import-not-at-top
  cpu_ops.main(["--rounds=1", "--reps=1", "--batch_size=2",
                f"--model_overrides={json.dumps(TINY)}"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  ops = [r["op"] for r in result["rows"]]
  assert ops == ["attention core (fwd+bwd)", "heads-major layout copies (fwd+bwd)",
                 "LayerNorm x2 (fwd+bwd)", "GELU (fwd+bwd)", "Linear forward matmuls",
                 "Linear input-gradient matmuls", "Linear weight-gradient matmuls",
                 "AdamW (all params)"]
  assert all(r["mae_jax_ms"] > 0 and r["torch_ms"] > 0 for r in result["rows"])
  assert result["total"]["mae_jax"] == pytest.approx(sum(r["mae_jax_ms"]
                                                         for r in result["rows"]))


def test_cpu_all_times_an_xla_flag_variant_beside_the_default_in_each_round():
  from mae_jax.benchmarks import cpu_all  # pylint: disable=g-import-not-at-top
  runs = {r["name"]: r for r in cpu_all.plan(4, 2, 1, variant_xla_flags="--xla_foo=1")}
  for ratio in cpu_all.RATIOS:
    default, variant = runs[f"ours_vit_b_mask{ratio}"], runs[f"ours_flags_vit_b_mask{ratio}"]
    assert variant["cmd"] == default["cmd"] and variant["xla_flags"] == "--xla_foo=1"
    assert default.get("xla_flags", "") == ""
  assert not any(name.startswith("ours_flags") for name in
                 (r["name"] for r in cpu_all.plan(4, 2, 1)))
  rows = [dict(name=f"{impl}_vit_b_mask{ratio}", status="ok", step_s=step, img_per_s=4 / step,
               tflops=0.1) for impl, ratio, step in
          [("ours", 0.75, 2.0), ("ours_flags", 0.75, 1.0), ("ours", 0.0, 5.0),
           ("ours_flags", 0.0, 2.5)]]
  table = cpu_all.markdown(rows, 4)
  assert "- ours: 2.50" in table and "- ours_flags: 2.50" in table
