"""A run's curves in one figure: loss, learning rate, kNN top-1 and images/s against step.

    python -m mae_jax.plot --workdir=DIR [DIR ...] [--output=FILE.png]

Reads each DIR/metrics.jsonl; several workdirs are drawn side by side in each panel, one
colour per run, named by the workdir. A fine-tuning or linear probing run's `eval_top1` goes
in the accuracy panel as well (dashed), and `input_wait` (the fraction of step time spent
waiting for input) as a dotted line on the images/s panel's right axis, when the rows have
them. The PNG goes to DIR/curves.png of the first workdir unless --output says otherwise;
every training run (pretraining, fine-tuning, linear probing) writes it there at the end.
"""

import io
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from mae_jax import config_lib
from mae_jax import writers

CURVES_FILE = "curves.png"
# (panel title, metrics.jsonl keys drawn in it: solid first, then dashed).
PANELS = (("training loss", ("loss",)), ("learning rate", ("lr",)),
          ("top-1 (%): kNN (solid), evaluation (dashed)", ("knn_top1", "eval_top1")),
          ("images / s", ("img_per_s",)))


def series(rows: List[Dict[str, float]], key: str) -> np.ndarray:
  """[n, 2] (step, value) of the rows that hold `key`, in step order; a resumed run's repeated
  steps keep their last value."""
  points = {int(r["step"]): float(r[key]) for r in rows if key in r and r[key] is not None}
  return np.array(sorted(points.items()), np.float64).reshape(-1, 2)


def _marker(points: np.ndarray, key: str) -> Optional[str]:
  """A dot per point where a line alone shows too little: a series of one point (a line through
  it draws nothing) and a top-1 of few evaluations."""
  return "o" if len(points) == 1 or (key.endswith("top1") and len(points) < 30) else None


def figure_png(runs: Dict[str, List[Dict[str, float]]], *, dpi: int = 100) -> bytes:
  """The 2x2 figure of PANELS for `runs` (name -> metrics rows) as PNG bytes."""
  fig = figure(runs)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  return buffer.getvalue()


def figure(runs: Dict[str, List[Dict[str, float]]]):
  """The 2x2 matplotlib Figure of PANELS for `runs` (name -> metrics rows)."""
  # A Figure drawn without pyplot: no GUI backend or global figure state is loaded, only what a
  # PNG needs (matplotlib's way for non-interactive use; saves about a second per run).
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(11, 7))
  axes = fig.subplots(2, 2, sharex=False)
  colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, (title, keys) in zip(axes.flat, PANELS):
    twin = None
    for i, (name, rows) in enumerate(runs.items()):
      colour = colours[i % len(colours)]
      for key, style in zip(keys, ("-", "--")):
        points = series(rows, key)
        if len(points):
          ax.plot(points[:, 0], points[:, 1], style, color=colour, label=name,
                  marker=_marker(points, key), markersize=3)
      if keys == ("img_per_s",):
        wait = series(rows, "input_wait")
        if len(wait):
          twin = twin or ax.twinx()
          twin.plot(wait[:, 0], wait[:, 1], ":", color=colour,
                    marker=_marker(wait, "input_wait"), markersize=3)
    if twin is not None:
      twin.set_ylabel("waiting for input (dotted)")
      twin.set_ylim(0, 1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if not ax.lines:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
              color="grey")
  handles, labels = [], []
  for ax in axes.flat:  # one legend entry per run
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  if handles:
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), frameon=False)
  # Fixed margins rather than fig.tight_layout, which measures every tick label (half the
  # figure's time, at the end of every run); they leave room for the twin axis's label.
  fig.subplots_adjust(left=0.07, right=0.93, bottom=0.07, top=0.9, wspace=0.28, hspace=0.32)
  return fig


def run_names(workdirs: Sequence[str]) -> List[str]:
  """Short distinct names: the workdirs' last path components (whole paths if those clash)."""
  names = [os.path.basename(os.path.normpath(str(w))) or str(w) for w in workdirs]
  return names if len(set(names)) == len(names) else [str(w) for w in workdirs]


def write(workdirs: Sequence[str], output: Optional[str] = None) -> str:
  """Draws the runs of `workdirs` into `output` (default FIRST_WORKDIR/curves.png) and returns
  its path; a workdir listed twice is drawn once, with a warning. FileNotFoundError when a
  workdir does not exist or has no metrics.jsonl rows."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  # normpath only compares: it would turn gs://bucket/run into gs:/bucket/run.
  unique = {}
  for workdir in workdirs:
    unique.setdefault(os.path.normpath(str(workdir)), str(workdir))
  if len(unique) < len(workdirs):
    workdirs = list(unique.values())
    logging.warning("A workdir was given more than once; each is drawn once: %s",
                    " ".join(workdirs))
  output = output or os.path.join(str(workdirs[0]), CURVES_FILE)
  writers.check_writable(output)
  runs = {}
  for name, workdir in zip(run_names(workdirs), workdirs):
    rows = writers.read_metrics(str(workdir))
    if not rows and not epath.Path(workdir).exists():
      raise FileNotFoundError(f"{workdir} does not exist: give the --workdir of a run of "
                              f"mae_jax.main.")
    if not rows:
      raise FileNotFoundError(f"{workdir} has no {writers.METRICS_FILE} rows; give a workdir "
                              f"of mae_jax.main that has logged at least one step.")
    runs[name] = rows
  path = epath.Path(output)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(figure_png(runs))
  return os.fspath(path)


def main(argv: Sequence[str]) -> None:
  """`python -m mae_jax.plot`: curves of one or more runs as a PNG."""
  workdirs = list(_WORKDIR.value) + list(argv[1:])  # `--workdir=A B C` also works
  with config_lib.input_errors_end_the_command():
    print(write(workdirs, _OUTPUT.value))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import

  _WORKDIR = flags.DEFINE_multi_string("workdir", None, "Workdirs of mae_jax.main (repeat the "
                                       "flag or list them after it).", required=True)
  _OUTPUT = flags.DEFINE_string("output", None, f"The PNG to write (default: the first "
                                f"workdir's {CURVES_FILE}).")
  app.run(main, flags_parser=config_lib.parse_flags)
