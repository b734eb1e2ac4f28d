"""Where training reports go: WORKDIR/metrics.jsonl, TensorBoard event files, a progress bar.

TensorBoard events are written with tensorboard's record format and protos over a plain file,
without TensorFlow (tensorboard's own EventFileWriter would import it when it is installed).
Only the writer of process 0 is enabled, so a multi-host job writes each file once.

Object stores (a `gs://` workdir, or any other URI) cannot append to an object or rename one:
`etils.epath` reaches GCS through TensorFlow's GCS file system when TensorFlow is installed
(an append there downloads and uploads the whole object again) and through fsspec's gcsfs
otherwise, or for zonal buckets (which refuses mode "a"). There every file is written whole,
once: metrics.jsonl is rewritten (at most every `object_store_flush_s` seconds, and at close)
from the rows held in memory, and TensorBoard events go into a new event file per flush, which
TensorBoard reads in order as one run.
"""

import io
import itertools
import json
import os
import socket
import sys
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np
from etils import epath

METRICS_FILE = "metrics.jsonl"
_EVENT_FILES = itertools.count()  # tells apart the event files one process starts in a second


def is_object_store(path: Any) -> bool:
  """Whether `path` is a URI (gs://, s3://, ...): a store without appends or renames."""
  return "://" in os.fspath(path)


def check_writable(output: str, *, flag: str = "--output", kind: str = "file") -> None:
  """ValueError, before any work, when `output` cannot be written as a `kind` ("file" or
  "directory"): a file that names a directory, a path below a file, or one under a folder
  this process may not write (a read-only mount). Folders that do not exist yet are fine (they
  are made). Object-store URIs are not checked."""
  if is_object_store(output):
    return
  if kind == "file" and os.path.isdir(output):
    raise ValueError(f"{flag}={output} is a directory: name a file in it, such as "
                     f"{os.path.join(output, 'out')}")
  if kind == "directory" and os.path.exists(output) and not os.path.isdir(output):
    raise ValueError(f"{flag}={output} is a file: name a new or existing directory")
  # The nearest folder that exists: the directory itself, or where the output will be made.
  parent = os.path.abspath(output) if kind == "directory" else os.path.dirname(
      os.path.abspath(output))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{flag}={output} cannot be a {kind}: {parent} is not a directory")
  if not os.access(parent, os.W_OK):
    raise ValueError(f"{flag}={output} cannot be written: {parent} is not writable; name "
                     f"another {flag}")


def write_whole(output: str, write: Callable[[str], None]) -> None:
  """`write(path)` to a temporary file beside `output` (a file-system path), then renamed onto
  it: a crash or a full disk never leaves half a file, nor destroys an earlier `output`.
  Missing folders are made."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  temporary = f"{output}.tmp-{os.getpid()}"
  try:
    write(temporary)
    os.replace(temporary, output)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def move_tree(src: epath.Path, dst: epath.Path) -> None:
  """Moves a folder: a rename on a file system, a copy of each file and then a delete of the
  source on an object store (which has no rename; the source goes only once all is copied)."""
  if not is_object_store(src):
    src.rename(dst)
    return
  def copy(folder: epath.Path, target: epath.Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for child in folder.iterdir():
      if child.is_dir():
        copy(child, target / child.name)
      else:
        child.copy(target / child.name)

  copy(src, dst)
  src.rmtree()


def format_duration(seconds: float) -> str:
  """h:mm:ss (d days h:mm:ss past a day)."""
  seconds = int(round(seconds))
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
  return f"{days}d {text}" if days else text


def read_metrics(workdir: str) -> list:
  """The rows of WORKDIR/metrics.jsonl, in the order written. A last line cut short (a run
  killed mid-write, not yet resumed: resuming drops it) is left out with a warning; a broken
  line elsewhere is a ValueError naming the file and the line."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1)
           if line.strip()]
  rows = []
  for i, (number, line) in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i < len(lines) - 1:
        raise ValueError(f"{path}, line {number}, is not a JSON row ({e}): the file was "
                         f"damaged or edited") from e
      from absl import logging  # pylint: disable=g-import-not-at-top
      logging.warning("%s: its last line (%d) was cut short (a run killed while writing it); "
                      "left out.", path, number)
  return rows


def _rows_up_to(text: str, step: int, path: epath.Path) -> str:
  """metrics.jsonl `text` without the rows of steps after `step` and without lines that do not
  parse (a write cut short); rewritten at `path` (whole, through a temporary file and a rename
  on a file system) when anything was dropped."""
  kept, dropped, broken = [], 0, 0
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      row_step = json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
      broken += 1
      continue
    if row_step > step:
      dropped += 1
    else:
      kept.append(line + "\n")
  if not (dropped or broken or not text.endswith("\n")):
    return text
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.info("%s: dropped %d rows after step %d (they are logged again)%s.", path, dropped,
               step, f" and {broken} line(s) cut short by a crash" if broken else "")
  new = "".join(kept)
  if is_object_store(os.fspath(path)):
    path.write_text(new)  # an object is written whole anyway
  else:
    write_whole(os.fspath(path), lambda temporary: epath.Path(temporary).write_text(new))
  return new


class _EventFile:
  """TensorBoard event files (TFRecord framing of `Event` protos) in one log directory.

  On a file system one file, flushed after each write; on an object store the events since the
  last flush go into a new file at each flush (TensorBoard reads the files in name order)."""

  def __init__(self, logdir: epath.Path, *, object_store: bool = False):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    # pylint: enable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._record_writer = RecordWriter
    logdir.mkdir(parents=True, exist_ok=True)
    self._name = logdir / (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                           f"{os.getpid()}.{next(_EVENT_FILES)}")
    self._object_store = object_store
    self._part = 0
    self._file = io.BytesIO() if object_store else self._name.open("wb")
    self._records = RecordWriter(self._file)
    self._write(file_version="brain.Event:2")

  def _write(self, step: int = 0, **fields) -> None:
    event = self._event_pb2.Event(wall_time=time.time(), step=step, **fields)
    self._records.write(event.SerializeToString())

  def restart(self, step: int) -> None:
    """Marks a run restarting at `step`: TensorBoard drops the events of earlier files at this
    step and after (its purge of orphaned data), which the restarted run writes again."""
    self._write(step, session_log=self._event_pb2.SessionLog(
        status=self._event_pb2.SessionLog.START))

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
    if not self._object_store:
      self._records.flush()
      return
    data = self._file.getvalue()
    if data:
      # Zero-padded parts keep the name order the write order.
      self._name.with_name(f"{self._name.name}.{self._part:06d}").write_bytes(data)
      self._part += 1
      self._file = io.BytesIO()
      self._records = self._record_writer(self._file)

  def close(self) -> None:
    self.flush()
    if not self._object_store:
      self._records.close()


class MetricWriter:
  """Rows of scalars to WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tensorboard); images to
  TensorBoard. Disabled (a no-op) on processes other than 0. On an object store (gs://...) the
  files are written whole, at most every `object_store_flush_s` seconds and at `close` (see the
  module docstring): a crash there loses at most that many seconds of rows."""

  def __init__(self, workdir: str, *, enabled: bool = True,
               object_store_flush_s: float = 30.0, resume_step: Optional[int] = None):
    """`resume_step`: the step of the checkpoint a run resumes from. The rows an earlier run
    wrote after it (their steps run again) are dropped, with a line cut short by a crash, so
    that metrics.jsonl keeps one row per logged step; TensorBoard is told the same (a
    SessionLog START event at resume_step + 1, from which it purges the earlier events)."""
    self._enabled = enabled
    self._workdir = epath.Path(workdir)
    self._events: Optional[_EventFile] = None
    self._object_store = is_object_store(workdir)
    self._flush_s = object_store_flush_s
    self._flushed_at = time.monotonic()
    self._text = ""  # metrics.jsonl as it is to be written, on an object store
    self._dirty = False
    if enabled:
      self._workdir.mkdir(parents=True, exist_ok=True)
      self._events = _EventFile(self._workdir / "tensorboard", object_store=self._object_store)
      metrics = self._workdir / METRICS_FILE
      # A resumed run keeps the earlier rows: appended to on a file system, held in memory and
      # rewritten whole on an object store.
      if metrics.exists() and (self._object_store or resume_step is not None):
        text = metrics.read_text()
        if resume_step is not None:
          text = _rows_up_to(text, resume_step, metrics)
        if self._object_store:
          self._text = text
      if resume_step is not None:
        self._events.restart(resume_step + 1)

  def write_scalars(self, step: int, row: Mapping[str, Any]) -> None:
    """Adds `row` (which holds `step`) to metrics.jsonl and its numbers to TensorBoard."""
    if not self._enabled:
      return
    line = json.dumps({"step": step, **row}) + "\n"
    self._events.scalars(step, {k: v for k, v in row.items() if k != "step"})
    if self._object_store:
      self._text += line
      self._dirty = True
      self._flush(force=False)
      return
    with (self._workdir / METRICS_FILE).open("a") as f:
      f.write(line)
    self._events.flush()

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """An HxWx3 uint8 image to TensorBoard."""
    if self._enabled:
      self._events.image(step, tag, image)
      self._dirty = True
      self._flush(force=not self._object_store)

  def _flush(self, *, force: bool) -> None:
    if not (force or time.monotonic() - self._flushed_at >= self._flush_s):
      return
    if self._object_store and self._dirty:
      (self._workdir / METRICS_FILE).write_text(self._text)
    self._events.flush()
    self._dirty = False
    self._flushed_at = time.monotonic()

  def flush(self) -> None:
    """Writes out everything held (on an object store; elsewhere it is written already)."""
    if self._events is not None:
      self._flush(force=True)

  def close(self) -> None:
    if self._events is not None:
      self.flush()
      self._events.close()
      self._events = None


class ProgressBar:
  """tqdm's progress bar on stderr, drawn only when stderr is a terminal. While it is drawn,
  whatever else goes to stderr (absl's log lines, warnings) is written above it with
  tqdm.write, so a log line never lands inside the bar. The API (`update` to a step,
  `set_postfix`, `clear`, `close`) is what the trainer and extract use."""

  def __init__(self, total: int, *, initial: int = 0, enabled: bool = True):
    import tqdm  # pylint: disable=g-import-not-at-top  # only where a bar is made
    self._enabled = enabled and sys.stderr.isatty()
    self._stderr = sys.stderr
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=not self._enabled,
                          file=self._stderr, unit="step", dynamic_ncols=True)
    self._handler = None
    if self._enabled:
      from absl import logging  # pylint: disable=g-import-not-at-top
      above = _AboveBar(self._stderr)
      sys.stderr = above
      # absl's handler holds its own reference to stderr; it must write through the same
      # object, or it would also write each line to sys.stderr a second time.
      handler = logging.get_absl_handler().python_handler
      if handler.stream is self._stderr:
        self._handler, handler.stream = handler, above

  def update(self, step: int) -> None:
    """Moves the bar to `step`."""
    self._bar.update(step - self._bar.n)

  def set_postfix(self, text: str) -> None:
    self._bar.set_postfix_str(text)

  def clear(self) -> None:
    """Erases the bar until its next update."""
    self._bar.clear()

  def close(self) -> None:
    self._bar.close()
    if self._enabled:
      sys.stderr = self._stderr
      if self._handler is not None:
        self._handler.stream = self._stderr
        self._handler = None
      self._enabled = False


class _AboveBar:
  """stderr, with every write put above tqdm's bars (tqdm.write)."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    import tqdm  # pylint: disable=g-import-not-at-top
    tqdm.tqdm.write(text, file=self._stream, end="")

  def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
    return getattr(self._stream, name)


def show_own_info_logs() -> None:
  """The logging of mae_jax's command lines: mae_jax's INFO lines on stderr, other libraries'
  from WARNING up (Orbax alone logs every file it reads or writes at INFO, TFDS every dataset
  it opens). Left alone when --verbosity or --stderrthreshold is given."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import
  if flags.FLAGS["verbosity"].present or flags.FLAGS["stderrthreshold"].present:
    return
  logging.set_verbosity(logging.INFO)
  logging.set_stderrthreshold(logging.INFO)
  package = os.path.dirname(os.path.abspath(__file__)) + os.sep
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or record.pathname.startswith(package))
