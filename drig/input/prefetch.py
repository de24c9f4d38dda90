"""A background thread that prepares batches a few ahead of the consumer.

Reading, decoding and augmentation run in this thread and its small pool of
decoder threads (OpenCV releases the GIL), so the accelerator does not wait
for the host.
"""

import itertools
import queue
import threading
from typing import Any, Callable


class Prefetcher:
  """Runs ``produce(i)`` for i = 0, 1, ... in a background thread, a few ahead.

  Iterating yields the results in order; exceptions raised by ``produce`` are
  re-raised in the consumer. ``close()`` stops the thread.
  """

  _DONE = object()

  def __init__(self, produce: Callable[[int], Any], num_items: int | None, depth: int):
    self._produce = produce
    self._num_items = num_items
    self._queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="drig-input", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      counter = range(self._num_items) if self._num_items is not None else itertools.count()
      for i in counter:
        if self._stop.is_set() or not self._put(("ok", self._produce(i))):
          return
      self._put(("done", None))
    except BaseException as e:  # pylint: disable=broad-except
      self._put(("error", e))

  def __iter__(self):
    try:
      while True:
        kind, value = self._queue.get()
        if kind == "done":
          return
        if kind == "error":
          raise value
        yield value
    finally:
      self.close()

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)
