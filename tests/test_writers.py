"""metrics.jsonl, TensorBoard events without TensorFlow, the progress bar."""

import io
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from absl import logging as absl_logging

from mae_jax import writers


def _events(logdir):
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      out.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return out


def test_rows_go_to_metrics_jsonl_and_tensorboard(tmp_path):
  writer = writers.MetricWriter(str(tmp_path))
  writer.write_scalars(10, {"loss": 0.5, "lr": 1e-3, "img_per_s": 12.5})
  writer.write_scalars(20, {"loss": 0.25, "lr": 5e-4, "img_per_s": 13.0})
  writer.write_image(20, "reconstruction", np.zeros((8, 12, 3), np.uint8))
  writer.close()
  assert writers.read_metrics(str(tmp_path)) == [
      {"step": 10, "loss": 0.5, "lr": 1e-3, "img_per_s": 12.5},
      {"step": 20, "loss": 0.25, "lr": 5e-4, "img_per_s": 13.0}]
  events = _events(tmp_path / "tensorboard")
  assert events[0].file_version == "brain.Event:2"
  scalars = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value
             if v.HasField("simple_value")}
  assert scalars == {(10, "loss"): 0.5, (10, "lr"): np.float32(1e-3), (10, "img_per_s"): 12.5,
                     (20, "loss"): 0.25, (20, "lr"): np.float32(5e-4), (20, "img_per_s"): 13.0}
  image = [v.image for e in events for v in e.summary.value if v.HasField("image")][0]
  assert (image.height, image.width) == (8, 12) and image.encoded_image_string[:4] == b"\x89PNG"


def test_disabled_writer_writes_nothing(tmp_path):
  writer = writers.MetricWriter(str(tmp_path / "w"), enabled=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "w").exists()


def test_writing_events_does_not_import_tensorflow(tmp_path):
  code = (f"import sys; from mae_jax import writers; w = writers.MetricWriter({str(tmp_path)!r}); "
          "w.write_scalars(1, {'loss': 1.0}); w.close(); "
          "assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow']")
  subprocess.run([sys.executable, "-c", code], check=True)


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_bar_draws_only_on_a_terminal(monkeypatch):
  terminal = _Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  bar = writers.ProgressBar(10, initial=0)
  bar.update(5)
  bar.set_postfix("loss 0.5")
  bar.close()
  assert "5/10" in terminal.getvalue() and "loss 0.5" in terminal.getvalue()
  piped = io.StringIO()
  monkeypatch.setattr(sys, "stderr", piped)
  bar = writers.ProgressBar(10)
  bar.update(5)
  bar.close()
  assert piped.getvalue() == ""


def test_log_lines_go_above_the_bar_never_into_it(monkeypatch):
  terminal = _Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  monkeypatch.setattr(logging.root, "handlers", [absl_logging.get_absl_handler()])  # as in main
  handler = absl_logging.get_absl_handler().python_handler
  monkeypatch.setattr(handler, "stream", terminal)
  bar = writers.ProgressBar(10)
  bar.update(3)
  absl_logging.warning("a log line")
  bar.update(4)
  bar.close()
  assert handler.stream is terminal  # restored
  out = terminal.getvalue()
  (line,) = [line for line in out.split("\n") if "a log line" in line]
  # What the terminal shows of that line: the bar was erased first ("\r"), the log line alone.
  shown = line.split("\r")[-1]
  assert shown.startswith("W") and shown.endswith("a log line") and "/10" not in shown
  assert "4/10" in out[out.index("a log line"):]  # the bar is drawn again below it


def test_format_duration():
  assert writers.format_duration(59.6) == "0:01:00"
  assert writers.format_duration(3 * 3600 + 62) == "3:01:02"
  assert writers.format_duration(2 * 86400 + 5) == "2d 0:00:05"


# --- object stores (gs://) ------------------------------------------------------------------

@pytest.fixture
def object_store(monkeypatch):
  """gs:// served by an in-memory stand-in that, as GCS, refuses appends and renames, reached
  the way etils.epath reaches GCS without TensorFlow (fsspec)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from etils.epath import backend, gpath  # pylint: disable=g-import-not-at-top
  from fsspec.implementations.memory import MemoryFileSystem  # pylint: disable=g-import-not-at-top

  class ObjectStore(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store = {}  # its own objects, not MemoryFileSystem's shared ones
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
      return super()._strip_protocol(str(path).removeprefix("gs://").removeprefix("gcs://"))

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode or "+" in mode:
        raise ValueError(f"mode {mode!r}: objects cannot be appended to or updated")
      return super()._open(path, mode, **kwargs)

    def mv(self, *args, **kwargs):
      raise OSError("an object store has no rename")

    rename = mv

  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  for name in ("gs", "gcs"):
    # fsspec's registry of implementations (`fsspec.registry` is a read-only view of it).
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, name,  # pylint: disable=protected-access
                        ObjectStore)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield ObjectStore
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_the_stand_in_refuses_what_gcs_refuses(object_store):
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path("gs://bucket/x.txt")
  path.write_text("a\n")
  with pytest.raises(ValueError, match="appended"):
    path.open("a")
  with pytest.raises(OSError, match="no rename"):
    path.rename(epath.Path("gs://bucket/y.txt"))


def test_gs_workdir_writes_whole_files_and_keeps_earlier_rows(object_store):
  from etils import epath  # pylint: disable=g-import-not-at-top
  workdir = "gs://bucket/run"
  writer = writers.MetricWriter(workdir, object_store_flush_s=0)
  writer.write_scalars(10, {"loss": 0.5})
  writer.write_image(10, "reconstruction", np.zeros((8, 12, 3), np.uint8))
  writer.write_scalars(20, {"loss": 0.25})
  writer.close()
  # A resumed run adds its rows after the earlier ones.
  writer = writers.MetricWriter(workdir, object_store_flush_s=0)
  writer.write_scalars(30, {"loss": 0.125})
  writer.close()
  assert writers.read_metrics(workdir) == [
      {"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25}, {"step": 30, "loss": 0.125}]
  logdir = epath.Path(workdir) / "tensorboard"
  events = _events(logdir)
  assert sum(e.file_version == "brain.Event:2" for e in events) == 2  # one per run
  assert [(e.step, v.simple_value) for e in events for v in e.summary.value
          if v.HasField("simple_value")] == [(10, 0.5), (20, 0.25), (30, 0.125)]
  assert sum(v.HasField("image") for e in events for v in e.summary.value) == 1


def test_gs_workdir_writes_at_most_every_flush_interval_and_at_close(object_store):
  from etils import epath  # pylint: disable=g-import-not-at-top
  writer = writers.MetricWriter("gs://bucket/slow", object_store_flush_s=3600)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_scalars(2, {"loss": 0.5})
  assert not (epath.Path("gs://bucket/slow") / writers.METRICS_FILE).exists()
  writer.flush()
  assert [r["step"] for r in writers.read_metrics("gs://bucket/slow")] == [1, 2]
  writer.write_scalars(3, {"loss": 0.25})
  writer.close()
  assert [r["step"] for r in writers.read_metrics("gs://bucket/slow")] == [1, 2, 3]


def test_every_other_run_file_goes_to_gs(object_store, tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from mae_jax import checkpoint, visualize  # pylint: disable=g-import-not-at-top
  workdir = "gs://bucket/files"
  checkpoint.write_config(workdir, ml_collections.ConfigDict({"seed": 3}))
  assert '"seed": 3' in (epath.Path(workdir) / checkpoint.CONFIG_JSON).read_text()
  visualize.save_png(np.zeros((4, 4, 3), np.uint8), f"{workdir}/reconstruction_00000001.png")
  assert (epath.Path(workdir) / "reconstruction_00000001.png").read_bytes()[:4] == b"\x89PNG"
  checkpoint.check_workdir(workdir, checkpoint_bytes=1, keep=1)
  # A damaged checkpoint set aside: copied file by file, then the source deleted.
  src = epath.Path(workdir) / "checkpoints" / "7"
  (src / "state").mkdir(parents=True)
  (src / "state" / "a.bin").write_bytes(b"123")
  (src / "_METADATA").write_text("{}")
  dst = epath.Path(workdir) / checkpoint.DAMAGED / "7"
  writers.move_tree(src, dst)
  assert not src.exists()
  assert (dst / "state" / "a.bin").read_bytes() == b"123"
  assert (dst / "_METADATA").read_text() == "{}"
  # On a file system it stays one rename.
  (tmp_path / "a" / "b").mkdir(parents=True)
  writers.move_tree(epath.Path(tmp_path / "a"), epath.Path(tmp_path / "c"))
  assert (tmp_path / "c" / "b").is_dir() and not (tmp_path / "a").exists()


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, monkeypatch):
  """visualize, plot and extract once did all their work (compiling, a pass over a whole split)
  and then failed on a read-only workdir or an --output below a file with a bare OSError."""
  import os  # pylint: disable=g-import-not-at-top
  from mae_jax import checkpoint, plot, visualize  # pylint: disable=g-import-not-at-top
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode: False if (
      os.path.abspath(path) == str(read_only) and mode == os.W_OK) else real_access(path, mode))
  (tmp_path / "a_file").write_text("")

  def never(*args, **kwargs):
    raise AssertionError("read before the output was checked")

  monkeypatch.setattr(checkpoint, "load_params", never)
  monkeypatch.setattr(writers, "read_metrics", never)
  cases = [(lambda: visualize.render(str(read_only)),
            rf"--output={read_only}/visualize.png cannot be written: {read_only} is not "
            r"writable; name another --output"),
           (lambda: visualize.render(str(read_only), output=str(tmp_path / "a_file" / "x.png")),
            r"a_file/x.png cannot be a file: .*a_file is not a directory"),
           (lambda: plot.write([str(read_only)]), r"curves.png cannot be written"),
           (lambda: plot.write([str(tmp_path)], output=str(tmp_path)), r"is a directory")]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
  assert writers.check_writable("gs://bucket/out.png") is None  # object stores: not checked
  result = subprocess.run(
      [sys.executable, "-m", "mae_jax.extract", f"--workdir={tmp_path / 'no_such_workdir'}",
       f"--output={tmp_path / 'a_file' / 'f.npz'}"], capture_output=True, text=True)
  assert result.returncode != 0
  assert "f.npz cannot be a file" in result.stderr and "No params" not in result.stderr


@pytest.mark.parametrize("where", ["file system", "object store"])
def test_a_resumed_run_keeps_one_row_per_step(tmp_path, where, request):
  """A run killed after its checkpoint of step 4 had logged steps 5-6 and half a line; the run
  resumed from step 4 logs 5-6 again. metrics.jsonl once held 5 and 6 twice and the broken line
  (which stopped every reader); TensorBoard showed both runs' points."""
  workdir = str(tmp_path / "run")
  if where == "object store":
    request.getfixturevalue("object_store")
    workdir = "gs://bucket/run"
  from etils import epath  # pylint: disable=g-import-not-at-top
  writer = writers.MetricWriter(workdir, object_store_flush_s=0, resume_step=0)
  for step in range(1, 7):
    writer.write_scalars(step, {"loss": 1.0 / step})
  writer.write_scalars(4, {"knn_top1": 12.5})
  writer.close()
  metrics = epath.Path(workdir) / writers.METRICS_FILE
  metrics.write_text(metrics.read_text() + '{"step": 7, "lo')  # the kill, mid-line

  writer = writers.MetricWriter(workdir, object_store_flush_s=0, resume_step=4)
  for step in (5, 6):
    writer.write_scalars(step, {"loss": 2.0 / step})
  writer.close()
  rows = writers.read_metrics(workdir)
  assert [(r["step"], r.get("loss")) for r in rows] == [
      (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25), (4, None), (5, 0.4), (6, 1 / 3)]

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  logdir = tmp_path / "tb"
  logdir.mkdir()  # TensorBoard's reader needs a local directory
  for path in sorted((epath.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
    (logdir / path.name).write_bytes(path.read_bytes())
  accumulator = event_accumulator.EventAccumulator(str(logdir))
  accumulator.Reload()
  assert [(e.step, round(e.value, 6)) for e in accumulator.Scalars("loss")] == [
      (1, 1.0), (2, 0.5), (3, 0.333333), (4, 0.25), (5, 0.4), (6, 0.333333)]


def test_a_last_line_cut_short_is_left_out_and_a_broken_one_elsewhere_named(tmp_path):
  """A run killed mid-write and not yet resumed leaves half a row; mae_jax.plot (which reads
  through read_metrics) once failed on it with a bare JSON error."""
  path = tmp_path / writers.METRICS_FILE
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
  assert writers.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0},
                                                 {"step": 2, "loss": 0.5}]
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a JSON row"):
    writers.read_metrics(str(tmp_path))
  from mae_jax import plot  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
    plot.write([str(tmp_path / "nowhere")])
