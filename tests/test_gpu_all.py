"""The one-call GPU suite's logic, on CPU and without running a model: what runs, in which order,
within which budget, with which attention kernel, and what is refused before anything runs."""

import ast
import glob
import json
import os
import types

import pytest

from mae_jax.benchmarks import gpu_all
from mae_jax.benchmarks import runner

MAIN_SIX = ["ours_vit_l", "torch_eager_vit_l", "ours_vit_b", "torch_eager_vit_b", "ours_vit_h",
            "torch_eager_vit_h"]


class FakeRuns:
  """Stands in for runner.run_python: each run takes its planned estimate on a fake clock."""

  def __init__(self, preflight=None):
    self.now, self.calls = 0.0, []
    self.preflight = preflight or dict(status="ok", attention={})
    self.estimates = {self.key(r["cmd"]): r["est_s"] for r in gpu_all.plan(256, 10, 3)}

  @staticmethod
  def key(cmd):
    """A run's command without the flags that main adds."""
    return " ".join(c for c in cmd if not c.startswith(("--profile_dir", "--peak_tflops")))

  def clock(self):
    return self.now

  def __call__(self, cmd, xla_flags, timeout, log):
    del xla_flags, log
    self.calls.append((cmd, timeout))
    if cmd[:2] == ["-c", gpu_all.ENV_CODE]:
      self.now += 10
      return dict(status="ok", peak_tflops=800.0, device_kind="NVIDIA H200",
                  datasheet_tflops=989.4, versions={})
    if cmd[:2] == ["-c", gpu_all.PREFLIGHT_CODE]:
      self.now += 10
      return self.preflight
    fallback = " --config.model.attention_impl=xla"
    self.now += self.estimates.get(self.key(cmd), self.estimates.get(
        self.key(cmd).replace(fallback, "")))
    return dict(status="ok", img_per_s=1000.0, tflops=100.0, img_per_s_per_core=1.0,
                pil_img_per_s=1.0, pil_img_per_s_per_core=1.0, ratio=1.0)


def _main(monkeypatch, tmp_path, fake, *flags):
  monkeypatch.setattr(gpu_all, "time", types.SimpleNamespace(perf_counter=fake.clock))
  return gpu_all.main(["--out", str(tmp_path), *flags], run_python=fake)


def test_runs_are_ordered_by_value_ours_and_torch_eager_for_l_b_h_first():
  names = [r["name"] for r in gpu_all.plan(256, 10, 3)]
  assert names[:6] == MAIN_SIX
  assert names[6].startswith("input_pipeline_") and names[7] == "torch_compile_vit_l"
  with_official = [r["name"] for r in gpu_all.plan(256, 10, 3, mae_repo="/somewhere/mae")]
  assert with_official[:8] == names[:8] and with_official[8] == "official_eager_vit_l"
  assert with_official[-2:] == ["official_eager_vit_b", "official_eager_vit_h"]
  # The input pipeline runs one worker per core of the host.
  inputs = [r for r in gpu_all.plan(256, 10, 3) if r["impl"] == "input"][0]
  assert f"--workers={len(os.sched_getaffinity(0))}" in inputs["cmd"]


def test_a_run_that_cannot_finish_in_the_budget_is_skipped_and_later_short_ones_still_run(
    monkeypatch, tmp_path):
  fake = FakeRuns()
  rows = _main(monkeypatch, tmp_path, fake, "--budget_s", "300")
  by_name = {r["name"]: r for r in rows}
  # 10 s environment + 10 s preflight + 80 + 45 + 60 + 35 = 240 s: 60 s are left for the rest.
  assert [by_name[n]["status"] for n in MAIN_SIX] == ["ok"] * 4 + [
      "skipped (time budget: 60 s left, estimate 110 s)",
      "skipped (time budget: 60 s left, estimate 70 s)"]
  inputs = next(n for n in by_name if n.startswith("input_pipeline"))
  assert by_name[inputs]["status"] == "ok"  # estimate 45 s: it fits, after two that did not
  assert by_name["ours_vit_l_scan"]["status"] == (
      "skipped (time budget: 15 s left, estimate 60 s)")
  # A run started gets at most what is left of the budget.
  assert all(timeout <= 300 - 20 for cmd, timeout in fake.calls[2:])
  assert fake.now <= 300
  recorded = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert [r["name"] for r in recorded] == [r["name"] for r in rows]
  table = (tmp_path / "results.md").read_text()
  assert "MFU of measured XLA matmul" in table and "MFU of datasheet" in table
  assert "bf16 matmul 800 TFLOP/s measured" in table and "datasheet 989.4 TFLOP/s" in table
  # 100 model TFLOP/s: 12.5% of the measured matmul, 10.1% of the datasheet figure.
  assert "| ours_vit_l | 1,000 | 1.00x | 100 | 12.5% | 10.1% |" in table


def test_only_runs_the_named_runs_and_refuses_unknown_names_before_anything_runs(
    monkeypatch, tmp_path, capsys):
  fake = FakeRuns()
  rows = _main(monkeypatch, tmp_path, fake, "--only=torch_eager_vit_b,ours_vit_h")
  assert [r["name"] for r in rows[2:]] == ["torch_eager_vit_b", "ours_vit_h"]  # plan order
  for only in ("ours_vit_x", "ours_vit_l,official_eager_vit_l"):
    fake = FakeRuns()
    with pytest.raises(SystemExit) as exit_info:
      _main(monkeypatch, tmp_path / "refused", fake, f"--only={only}")
    assert exit_info.value.code == 2 and fake.calls == []
    assert not (tmp_path / "refused").exists()
    err = capsys.readouterr().err
    assert "--only names no run" in err and "torch_compile_vit_l" in err


def test_without_ml_collections_the_script_says_how_to_carry_it_and_runs_nothing(
    monkeypatch, tmp_path, capsys):
  empty = tmp_path / "wheels"
  empty.mkdir()
  monkeypatch.setattr(runner, "WHEELS", str(empty))
  real_find_spec = gpu_all.importlib.util.find_spec
  monkeypatch.setattr(gpu_all.importlib.util, "find_spec",
                      lambda name: None if name == "ml_collections" else real_find_spec(name))
  fake = FakeRuns()
  with pytest.raises(SystemExit) as exit_info:
    _main(monkeypatch, tmp_path / "out", fake)
  assert exit_info.value.code == 2 and fake.calls == []
  err = capsys.readouterr().err
  assert gpu_all.FETCH_WHEEL in err and 'carry ["benchmarks/wheels"]' in err
  (empty / "ml_collections-1.1.0-py3-none-any.whl").write_bytes(b"")
  assert gpu_all.ml_collections_problem() is None


def _preflight(**errors):
  attention = {}
  for size in ("vit_b", "vit_h", "vit_l"):
    for part in ("encoder", "decoder"):
      attention[f"{size}/{part}"] = dict(default="cudnn", cudnn_error=errors.get(f"{size}_{part}"))
  return dict(status="ok", attention=attention)


def test_a_size_whose_cudnn_attention_fails_the_preflight_runs_xla_attention_and_says_so(
    monkeypatch, tmp_path):
  fake = FakeRuns(_preflight(vit_h_decoder="XlaRuntimeError: cuDNN"))
  rows = {r["name"]: r for r in _main(monkeypatch, tmp_path, fake, "--budget_s", "10000")}
  commands = {" ".join(cmd): cmd for cmd, _ in fake.calls}
  xla = "--config.model.attention_impl=xla"
  for name in ("ours_vit_h", "ours_vit_h_remat", "ours_vit_h_scan_remat"):
    assert "cuDNN attention failed the preflight (decoder)" in rows[name]["attention_fallback"]
  for name in ("ours_vit_l", "ours_vit_b", "ours_vit_l_xla_attention"):
    assert "attention_fallback" not in rows[name]
  runs = [cmd for cmd in commands.values() if "mae_jax.benchmark" in cmd]
  assert sum(xla in cmd for cmd in runs) == 4  # the three ViT-H runs and the explicit one
  assert all(cmd.count(xla) <= 1 for cmd in runs)
  assert "(fallback)" in (tmp_path / "results.md").read_text()
  # A preflight that itself failed sends every size to XLA's attention.
  failed = dict(status="failed (rc -11)", error=["Segmentation fault"])
  assert set(gpu_all.attention_fallbacks(failed, ["vit_b", "vit_l"])) == {"vit_b", "vit_l"}
  assert gpu_all.attention_fallbacks(_preflight(), ["vit_b"]) == {}


def test_the_preflight_reports_a_kernel_that_fails_and_passes_one_that_works():
  # No GPU here: cuDNN's kernel cannot run, which is what the preflight must report.
  assert gpu_all.check_attention([2, 5, 2, 8], "cudnn") is not None
  assert gpu_all.check_attention([2, 5, 2, 8], "xla") is None
  shapes = gpu_all.attention_shapes("vit_h", 256, {})
  assert shapes == dict(encoder=[256, 65, 16, 80], decoder=[256, 257, 16, 32])
  assert gpu_all.attention_shapes("vit_l", 4, gpu_all.TINY)["encoder"] == [4, 5, 4, 16]


def test_the_profile_is_moved_to_where_the_device_tool_brings_files_back(tmp_path):
  nested = tmp_path / "trace_vit_l" / "plugins" / "profile" / "2026_11_30"
  nested.mkdir(parents=True)
  (nested / "host.xplane.pb").write_bytes(b"trace")
  (tmp_path / "trace_vit_l" / "profile_top_ops.txt").write_text("ops")
  kept = gpu_all.keep_profile(str(tmp_path / "trace_vit_l"), str(tmp_path), "vit_l")
  assert open(kept["trace"], "rb").read() == b"trace" and open(kept["top_ops"]).read() == "ops"
  assert sorted(os.listdir(tmp_path)) == ["profile_vit_l.xplane.pb",
                                          "profile_vit_l_top_ops.txt"]


def test_the_benchmarks_package_never_imports_the_command_module_above_it():
  package = os.path.dirname(gpu_all.__file__)
  for path in glob.glob(os.path.join(package, "*.py")):
    for node in ast.walk(ast.parse(open(path).read())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      assert "mae_jax.benchmark" not in names, path
    assert "mae_jax.benchmark import" not in open(path).read(), path


def test_gpu_all_table_gives_each_run_its_ratio_to_torch_eager_of_the_same_size():
  rows = [dict(name="torch_eager_vit_l", impl="torch", size="vit_l", status="ok",
               img_per_s=2000.0, tflops=249.0, peak_memory_gb=24.0),
          dict(name="ours_vit_l", impl="mae_jax", size="vit_l", status="ok", img_per_s=3000.0,
               tflops=373.6, peak_memory_gb=20.0, compile_s=41.0,
               attention=dict(encoder="cudnn", decoder="cudnn")),
          dict(name="ours_vit_h", impl="mae_jax", size="vit_h", status="failed (rc 1)")]
  table = gpu_all.markdown(rows)
  assert "| ours_vit_l | 3,000 | 1.50x | 374 |  |  | 20.0 | 41 | cudnn/cudnn | ok |" in table
  assert "| ours_vit_h | | | | | | | | | failed (rc 1) |" in table
