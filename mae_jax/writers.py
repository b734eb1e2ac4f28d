"""Where training reports go: WORKDIR/metrics.jsonl, TensorBoard event files, a progress bar.

TensorBoard events are written with tensorboard's record format and protos over a plain file,
without TensorFlow (tensorboard's own EventFileWriter would import it when it is installed).
Only the writer of process 0 is enabled, so a multi-host job writes each file once.
"""

import io
import json
import os
import socket
import sys
import time
from typing import Any, Mapping, Optional

import numpy as np
from etils import epath

METRICS_FILE = "metrics.jsonl"


def format_duration(seconds: float) -> str:
  """h:mm:ss (d days h:mm:ss past a day)."""
  seconds = int(round(seconds))
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
  return f"{days}d {text}" if days else text


def read_metrics(workdir: str) -> list:
  """The rows of WORKDIR/metrics.jsonl, in the order written."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _EventFile:
  """One TensorBoard event file (TFRecord framing of `Event` protos)."""

  def __init__(self, logdir: epath.Path):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    # pylint: enable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    logdir.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._file = (logdir / name).open("wb")
    self._records = RecordWriter(self._file)
    self._write(file_version="brain.Event:2")

  def _write(self, step: int = 0, **fields) -> None:
    event = self._event_pb2.Event(wall_time=time.time(), step=step, **fields)
    self._records.write(event.SerializeToString())

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
        for tag, v in values.items()])
    self._write(step, summary=summary)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    encoded = self._summary_pb2.Summary.Image(
        height=image.shape[0], width=image.shape[1], colorspace=image.shape[2],
        encoded_image_string=png.getvalue())
    summary = self._summary_pb2.Summary(
        value=[self._summary_pb2.Summary.Value(tag=tag, image=encoded)])
    self._write(step, summary=summary)

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    self._records.close()


class MetricWriter:
  """Rows of scalars to WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tensorboard); images to
  TensorBoard. Disabled (a no-op) on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._enabled = enabled
    self._workdir = epath.Path(workdir)
    self._events: Optional[_EventFile] = None
    if enabled:
      self._workdir.mkdir(parents=True, exist_ok=True)
      self._events = _EventFile(self._workdir / "tensorboard")

  def write_scalars(self, step: int, row: Mapping[str, Any]) -> None:
    """Appends `row` (which holds `step`) to metrics.jsonl and its numbers to TensorBoard."""
    if not self._enabled:
      return
    with (self._workdir / METRICS_FILE).open("a") as f:
      f.write(json.dumps({"step": step, **row}) + "\n")
    self._events.scalars(step, {k: v for k, v in row.items() if k != "step"})
    self._events.flush()

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """An HxWx3 uint8 image to TensorBoard."""
    if self._enabled:
      self._events.image(step, tag, image)
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


class ProgressBar:
  """A one-line progress bar on stdout, drawn only when stdout is a terminal."""

  def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, width: int = 30):
    self._total, self._step, self._width = total, initial, width
    self._postfix = ""
    self._enabled = enabled and sys.stdout.isatty()

  def update(self, step: int) -> None:
    self._step = step
    self._draw()

  def set_postfix(self, text: str) -> None:
    self._postfix = text
    self._draw()

  def _draw(self) -> None:
    if not self._enabled:
      return
    done = int(self._width * self._step / max(self._total, 1))
    bar = "#" * done + "." * (self._width - done)
    sys.stdout.write(f"\r\x1b[K[{bar}] {self._step}/{self._total}  {self._postfix}")
    sys.stdout.flush()

  def clear(self) -> None:
    """Erases the bar so that a log line can take its place (it is redrawn on update)."""
    if self._enabled:
      sys.stdout.write("\r\x1b[K")
      sys.stdout.flush()

  def close(self) -> None:
    if self._enabled:
      self._draw()
      sys.stdout.write("\n")
      sys.stdout.flush()
      self._enabled = False
