"""metrics.jsonl, TensorBoard events without TensorFlow, the progress bar."""

import io
import json
import subprocess
import sys

import numpy as np

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
  monkeypatch.setattr(sys, "stdout", terminal)
  bar = writers.ProgressBar(10, initial=0, width=10)
  bar.update(5)
  bar.set_postfix("loss 0.5")
  bar.close()
  assert "\r\x1b[K[#####.....] 5/10  loss 0.5" in terminal.getvalue()
  assert terminal.getvalue().endswith("\n")
  piped = io.StringIO()
  monkeypatch.setattr(sys, "stdout", piped)
  bar = writers.ProgressBar(10)
  bar.update(5)
  bar.close()
  assert piped.getvalue() == ""


def test_format_duration():
  assert writers.format_duration(59.6) == "0:01:00"
  assert writers.format_duration(3 * 3600 + 62) == "3:01:02"
  assert writers.format_duration(2 * 86400 + 5) == "2d 0:00:05"
