"""Bad-file accounting. Conversions are logged the 1st, 2nd, 4th, 8th, ... time in each process
(ImageNet holds many grayscale JPEGs); every unreadable file is logged once."""

import os
import threading

from absl import logging

SKIPPED = "unreadable file skipped"

_counts: dict[str, int] = {}
_skipped: set[str] = set()
_counts_lock = threading.Lock()


def note(kind: str, where: str) -> None:
  with _counts_lock:
    count = _counts[kind] = _counts.get(kind, 0) + 1
  if count & (count - 1) == 0:
    logging.warning("Input: %s (%d so far in process %d): %s", kind, count, os.getpid(), where)


def note_skipped(where: str, error: Exception) -> None:
  with _counts_lock:
    if where in _skipped:
      return
    _skipped.add(where)
    count = _counts[SKIPPED] = len(_skipped)
  logging.warning("Input: %s (%d distinct so far in process %d): %s (%s: %s)", SKIPPED, count,
                  os.getpid(), where, type(error).__name__, " ".join(str(error).split())[:120])


def file_issue_counts() -> dict[str, int]:
  """Conversions of each kind and distinct unreadable files, so far in this process."""
  with _counts_lock:
    return dict(_counts)
