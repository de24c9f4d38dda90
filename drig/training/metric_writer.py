"""Metrics to a JSON-lines file and TensorBoard event files, from host 0 only.

Scalars, images (PNG) and hyperparameters are written as TensorBoard summary
protos by the pure-Python event writer of the ``tensorboard`` package, so no
TensorFlow import is needed: hyperparameters go through the hparams plugin's
``summary_v2.hparams_pb`` and ``hparams_config_pb``, which build the
session-start and experiment summaries from protos alone.
"""

import json
import os
import struct
import time
from typing import Mapping, Sequence

import cv2
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type (IHDR byte 25) -> channels, TensorBoard's "colorspace".
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def png_size(png: bytes) -> tuple[int, int, int]:
  """(height, width, channels) of a PNG, read from its header (nothing is decoded).

  Raises:
    ValueError: ``png`` is not PNG data.
  """
  if len(png) < 26 or not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
    raise ValueError(f"png: not PNG data (starts with {bytes(png[:8])!r})")
  width, height = struct.unpack(">II", png[16:24])
  return height, width, _PNG_CHANNELS.get(png[25], 3)


def encode_png(image) -> bytes:
  """PNG bytes of an RGB(A) or grayscale image: uint8, or float in [0, 1].

  Raises:
    ValueError: ``image`` is not [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise ValueError(f"image: expected [H, W], [H, W, 3] or [H, W, 4], got shape {image.shape}")
  if not np.issubdtype(image.dtype, np.integer):
    image = np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0)
  image = image.astype(np.uint8)
  if image.ndim == 3:  # cv2 encodes BGR(A)
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR if image.shape[-1] == 3 else cv2.COLOR_RGBA2BGRA)
  ok, encoded = cv2.imencode(".png", image)
  if not ok:
    raise ValueError(f"image of shape {image.shape} could not be encoded as PNG")
  return encoded.tobytes()


def hparam_value(value):
  """A config leaf as a value the hparams plugin takes: bool, number or string.

  Lists, tuples and None become their JSON text (the plugin has no other types).
  """
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, (bool, int, float, str)):
    return value
  return json.dumps(value)


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard events in ``workdir``.

  On hosts other than 0 every method is a no-op, so callers need no guards.
  TensorBoard's event writer is the pure-Python one shipped with the
  ``tensorboard`` package, so no TensorFlow import is needed.

  Args:
    workdir: the run directory; events go to ``workdir/tensorboard``.
    enabled: False on hosts other than 0.
    jsonl: whether scalars are also appended to ``workdir/metrics.jsonl``.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, jsonl: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = (open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
                   if jsonl else None)
    self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))

  def _add(self, step: int, summary: summary_pb2.Summary) -> None:
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary))
    self._events.flush()

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
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if values:
      self._add(step, summary_pb2.Summary(value=values))

  def write_image(self, step: int, tag: str, image) -> None:
    """Writes one image summary: PNG bytes as they are, or an array (see ``encode_png``).

    Raises:
      ValueError: ``image`` is neither PNG data nor an image array.
    """
    if not self.enabled:
      return
    png = bytes(image) if isinstance(image, (bytes, bytearray)) else encode_png(image)
    height, width, channels = png_size(png)
    value = summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=png))
    self._add(step, summary_pb2.Summary(value=[value]))

  def write_hparams(self, hparams: Mapping, metric_tags: Sequence[str] = ()) -> None:
    """Writes the run's hyperparameters for TensorBoard's HPARAMS tab.

    Args:
      hparams: {name: value}; values other than bool, number or string are
        written as their JSON text (``hparam_value``).
      metric_tags: scalar tags the HPARAMS tab shows beside the values
        (e.g. "val/quadratic_kappa").
    """
    if not self.enabled:
      return
    values = {name: hparam_value(value) for name, value in hparams.items()}
    # The experiment lists the hparams and metrics; the session start holds this run's values.
    experiment = hparams_summary.hparams_config_pb(
        hparams=[hparams_summary.HParam(name) for name in sorted(values)],
        metrics=[hparams_summary.Metric(tag) for tag in metric_tags],
        time_created_secs=time.time())
    self._add(0, experiment)
    self._add(0, hparams_summary.hparams_pb(values))

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      self._events.close()
