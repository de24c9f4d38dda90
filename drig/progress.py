"""Progress of long work (training steps, analysis shards): rate and ETA in one format.

The first unit of work includes compiling its programs (tens of seconds on a
CPU, for a step that then takes a second), so a rate measured from the start
predicts a finish far too late. ``Progress`` measures the rate from the end of
the first unit on, and shows no ETA until a second unit has finished.
"""

from __future__ import annotations

import math
import time
from typing import Callable


def format_eta(seconds: float) -> str:
  """``"1h02m03s"``, ``"04m05s"``; ``"?"`` when unknown (NaN, infinite)."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return (f"{hours}h" if hours else "") + f"{rest // 60:02d}m{rest % 60:02d}s"


class Progress:
  """Units of work done out of ``total``: the rate after the first unit, and the ETA.

  Example::

    progress = Progress(total=steps)
    for step in range(steps):
      ...
      progress.update(step + 1)
      logging.info("... %.2f steps/s | ETA %s", progress.rate(), progress.eta())
  """

  def __init__(self, total: float, done: float = 0, clock: Callable[[], float] = time.perf_counter):
    self.total = total
    self._clock = clock
    self._start_done = done
    self._first: tuple[float, float] | None = None  # (time, done) at the end of the first update
    self._last: tuple[float, float] | None = None

  def update(self, done: float) -> None:
    """Records that ``done`` units are finished (cumulative, including earlier ones)."""
    now = self._clock()
    if self._first is None:
      self._first = (now, done)
    self._last = (now, done)

  def rate(self) -> float:
    """Units per second since the end of the first update; NaN before a second one."""
    if self._first is None or self._last is None or self._last[1] <= self._first[1]:
      return float("nan")
    seconds = self._last[0] - self._first[0]
    return (self._last[1] - self._first[1]) / seconds if seconds > 0 else float("nan")

  def eta(self) -> str:
    """The remaining time at ``rate()``, formatted (``"?"`` while unknown)."""
    rate = self.rate()
    if self._last is None or not math.isfinite(rate) or rate <= 0:
      return "?"
    return format_eta((self.total - self._last[1]) / rate)
