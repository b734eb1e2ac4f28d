"""`python -m mae_jax.plot`: several runs' curves in one PNG."""

import pathlib
import subprocess
import sys

from absl import logging
import numpy as np
import pytest
from PIL import Image

from mae_jax import plot
from mae_jax import writers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(workdir, steps, knn_every, loss0):
  writer = writers.MetricWriter(str(workdir))
  for step in range(0, steps + 1, knn_every):
    writer.write_scalars(step, {"knn_top1": 10.0 + step})
  for step in range(10, steps + 1, 10):
    writer.write_scalars(step, {"loss": loss0 / step, "lr": 1e-3, "img_per_s": 100.0,
                                "input_wait": 0.1})
  writer.close()


def test_series_keeps_the_last_value_of_a_repeated_step_in_step_order():
  rows = [{"step": 20, "loss": 2.0}, {"step": 10, "loss": 1.0}, {"step": 20, "loss": 3.0},
          {"step": 30, "knn_top1": 5.0}]
  np.testing.assert_array_equal(plot.series(rows, "loss"), [[10, 1.0], [20, 3.0]])
  assert plot.series(rows, "eval_top1").shape == (0, 2)


def test_command_draws_several_runs_into_one_png(tmp_path):
  _run(tmp_path / "a", 100, 25, 5.0)
  _run(tmp_path / "b", 60, 20, 3.0)
  out = tmp_path / "curves" / "both.png"
  result = subprocess.run([sys.executable, "-m", "mae_jax.plot", f"--workdir={tmp_path / 'a'}",
                           str(tmp_path / "b"), f"--output={out}"], cwd=REPO,
                          capture_output=True, text=True, check=True)
  assert result.stdout.strip().splitlines()[-1] == str(out)
  with Image.open(out) as image:
    assert image.size == (1100, 700)
    pixels = np.asarray(image.convert("RGB"))
  # Both runs' colours (matplotlib's first two) are drawn.
  for colour in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):
    assert np.sum(np.all(pixels == colour, axis=-1)) > 100
  # Default output: the first workdir's curves.png.
  assert plot.write([str(tmp_path / "b")]) == str(tmp_path / "b" / plot.CURVES_FILE)


def test_a_workdir_given_twice_is_drawn_once_with_a_warning(tmp_path, monkeypatch):
  _run(tmp_path / "a", 30, 10, 2.0)
  drawn, warnings = [], []
  monkeypatch.setattr(plot, "figure_png", lambda runs: drawn.append(list(runs)) or b"png")
  monkeypatch.setattr(logging, "warning", lambda *args: warnings.append(args[0] % args[1:]))
  plot.write([str(tmp_path / "a"), f"{tmp_path / 'a'}/"])
  assert drawn == [["a"]]  # one run, under its short name
  assert warnings and "more than once" in warnings[0]
  # A bucket path is read as given (os.path.normpath alone would make it gs:/bucket/run).
  read = []
  monkeypatch.setattr(writers, "read_metrics", lambda w: read.append(w) or [{"step": 1}])
  plot.write(["gs://bucket/run", "gs://bucket/run/"], output=str(tmp_path / "c.png"))
  assert read == ["gs://bucket/run"] and drawn[-1] == ["run"]


def test_a_workdir_without_metrics_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no metrics.jsonl rows"):
    plot.write([str(tmp_path)])


def test_a_series_of_one_point_is_drawn_as_a_marker():
  # A short run logs one training row: a line through one point draws nothing at all.
  rows = [{"step": 30, "loss": 1.0, "lr": 1e-3, "img_per_s": 90.0, "input_wait": 0.2},
          {"step": 30, "eval_top1": 20.0}]
  lines = [line for ax in plot.figure({"short": rows}).axes for line in ax.lines]
  assert len(lines) == 5  # loss, lr, eval_top1, img_per_s, input_wait
  for line in lines:
    assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "", " ")
