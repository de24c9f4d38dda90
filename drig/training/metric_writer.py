"""Metrics to a JSON-lines file and TensorBoard event files, from host 0 only."""

import json
import os
import time

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard events in ``workdir``.

  On hosts other than 0 every method is a no-op, so callers need no guards.
  TensorBoard's event writer is the pure-Python one shipped with the
  ``tensorboard`` package, so no TensorFlow import is needed.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, *, prefix: str = "") -> None:
    """Writes the numeric scalars of ``metrics`` (others go to JSON only)."""
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    values = []
    for key, value in metrics.items():
      name = f"{prefix}{key}"
      if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
      record[name] = value
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        values.append(summary_pb2.Summary.Value(tag=name, simple_value=float(value)))
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if values:
      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary_pb2.Summary(value=values)))
      self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()
