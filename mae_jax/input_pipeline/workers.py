"""Running a BatchMaker: in a thread of this process, or in worker processes (spawned) that
each fill whole batches in shared memory that is reused; step j goes to worker j % W, so the
order never depends on timing."""

import collections
import contextlib
import multiprocessing
from multiprocessing import shared_memory
import queue
import signal
import threading
import traceback
from typing import Any, Iterator, NoReturn

import numpy as np

from mae_jax.input_pipeline.batches import BatchMaker

_END = object()


def thread_batches(maker: BatchMaker, steps: Iterator[int], prefetch: int
                    ) -> Iterator[dict[str, np.ndarray]]:
  """Batches made in this process, by a thread working `prefetch` batches ahead."""
  # OpenCV, PIL and numpy release the GIL: the thread overlaps with training.
  if not prefetch:
    for step in steps:
      batch = maker.arrays()
      maker.fill(step, batch)
      yield batch
    return
  ready: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def offer(item: Any) -> bool:
    """Puts `item` unless the consumer has stopped; False then."""
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for step in steps:
        batch = maker.arrays()
        maker.fill(step, batch)
        if not offer(batch):
          return
      offer(_END)
    except BaseException as e:  # pylint: disable=broad-except  # re-raised by the consumer
      offer(e)

  thread = threading.Thread(target=produce, name="mae_jax-input", daemon=True)
  thread.start()
  try:
    while (item := ready.get()) is not _END:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


def _worker_main(maker: BatchMaker, conn: Any, slot_names: list[str]) -> None:
  """A worker process: fills the batch of each (step, slot) it receives into shared memory."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
  slots = [shared_memory.SharedMemory(name=name) for name in slot_names]
  views = [maker.arrays(slot.buf) for slot in slots]
  while True:
    try:
      message = conn.recv()
    except EOFError:  # the main process went away
      break
    if message is None:
      break
    step, slot = message
    try:
      maker.fill(step, views[slot])
      conn.send(None)
    except Exception:  # pylint: disable=broad-except  # re-raised in the main process
      conn.send(traceback.format_exc())
  del views
  for slot in slots:
    slot.close()


class WorkerPool:
  """Worker processes that fill batches in reused shared memory; batches come out in order.

  Step j goes to worker j % W, so the output does not depend on timing; each worker keeps
  `depth` batches in flight.
  """

  def __init__(self, maker: BatchMaker, steps: Iterator[int], workers: int, depth: int):
    context = multiprocessing.get_context("spawn")  # fork is unsafe with JAX's threads
    self._steps = steps
    self._depth = depth
    self._slots = [shared_memory.SharedMemory(create=True, size=maker.nbytes())
                   for _ in range(workers * depth)]
    self._views = [maker.arrays(slot.buf) for slot in self._slots]
    self._conns, self._processes = [], []
    for w in range(workers):
      conn, child = context.Pipe()
      names = [slot.name for slot in self._slots[w * depth:(w + 1) * depth]]
      process = context.Process(target=_worker_main, args=(maker, child, names),
                                name=f"mae_jax-input-{w}", daemon=True)
      process.start()
      child.close()
      self._conns.append(conn)
      self._processes.append(process)
    self._pending = collections.deque()  # (worker, slot) per batch in flight, in step order
    for j in range(workers * depth):
      if not self._submit(j % workers, j // workers):
        break

  def _submit(self, worker: int, slot: int) -> bool:
    step = next(self._steps, None)
    if step is None:
      return False
    try:
      self._conns[worker].send((step, slot))
    except OSError:
      self._died(worker)
    self._pending.append((worker, slot))
    return True

  def _died(self, worker: int) -> NoReturn:
    process = self._processes[worker]
    process.join(timeout=1)
    raise RuntimeError(f"Input worker {worker} died (exit code {process.exitcode}); see its "
                       "log above. Out of memory? Lower input.num_workers.") from None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._pending:
      raise StopIteration
    worker, slot = self._pending.popleft()
    try:
      error = self._conns[worker].recv()
    except (EOFError, OSError):  # the pipe closed or was reset: the worker is gone
      self._died(worker)
    if error is not None:
      raise RuntimeError(f"Input worker {worker} failed:\n{error}")
    # A copy: the slot is refilled at once, and callers may keep batches (JAX may alias them).
    batch = {k: v.copy() for k, v in self._views[worker * self._depth + slot].items()}
    self._submit(worker, slot)
    return batch

  def close(self) -> None:
    for conn in self._conns:
      with contextlib.suppress(OSError):  # a worker that is gone already needs no message
        conn.send(None)
    for process in self._processes:
      process.join(timeout=5)
      if process.is_alive():
        process.terminate()
        process.join()
    for conn in self._conns:
      conn.close()
    self._views.clear()
    for slot in self._slots:
      slot.close()
      slot.unlink()
    self._slots.clear()


def pooled(pool: WorkerPool) -> Iterator[dict[str, np.ndarray]]:
  # Stops the worker processes as soon as the caller closes or drops the iterator.
  try:
    yield from pool
  finally:
    pool.close()
