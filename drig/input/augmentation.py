"""Random geometric augmentation of preprocessed retinas, keyed by (seed, step, row).

Each image's augmentation is drawn from ``(seed, step, global row)``: the row
in the global batch, not in this host's part of it, so the global batch is the
same for any number of hosts.
"""

import dataclasses
from typing import Any, Mapping

import cv2
import numpy as np

from drig import grading
from drig.input.errors import InputPipelineError

# Augmentation's random stream tag (see ``sampling``'s tags).
_TAG_AUGMENT = 0x61756720


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Random geometric augmentation of preprocessed (centred, circular) retinas.

  Attributes:
    flip: random left-right and up-down flips (left and right eyes are mirror
      images of each other).
    rotate: ``False`` for none; ``"90"`` for random multiples of 90 degrees
      (exact, no interpolation); ``True`` or ``"any"`` for a uniform angle in
      ``[0, 360)`` with bilinear interpolation. The retina is a centred circle
      with half gray outside, so rotation about the centre keeps it intact and
      the corners are filled with ``fill_value``.
    fill_value: value of pixels rotated in from outside the image.
  """
  flip: bool = False
  rotate: bool | str = False
  fill_value: int = grading.HALF_GRAY

  def __post_init__(self):
    if self.rotate not in (False, True, None, "90", 90, "any"):
      raise InputPipelineError(
          f"augment.rotate must be False, '90', True or 'any'; got {self.rotate!r}")

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | "Augmentation" | None) -> "Augmentation":
    """From a mapping (e.g. ``config.data.augment``), an ``Augmentation`` or None."""
    if config is None:
      return cls()
    if isinstance(config, cls):
      return config
    items = dict(config.items()) if hasattr(config, "items") else dict(config)
    unknown = set(items) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise InputPipelineError(
          f"unknown augmentation options {sorted(unknown)}; known: flip, rotate, fill_value")
    return cls(**items)

  @property
  def active(self) -> bool:
    return bool(self.flip or self.rotate)


def augment_image(image: np.ndarray, augmentation: Augmentation, *, seed: int, step: int,
                  row: int) -> np.ndarray:
  """Augments one image, deterministically from ``(seed, step, row)``.

  Args:
    image: uint8 ``[S, S, C]``.
    augmentation: what to apply.
    seed: non-negative integer.
    step: training step.
    row: row of the image in the global batch (so the result does not depend
      on how the batch is split over hosts).

  Returns:
    uint8 array of the same shape (a new array, or the input when nothing
    applies).
  """
  if not augmentation.active:
    return image
  rng = np.random.default_rng([seed, _TAG_AUGMENT, step, row])
  # Always draw every parameter so that enabling one option does not change
  # the others' draws.
  flip_lr, flip_ud = rng.random(2) < 0.5
  quarter_turns = int(rng.integers(4))
  angle = float(rng.uniform(0.0, 360.0))
  out = image
  if augmentation.flip:
    if flip_lr:
      out = out[:, ::-1]
    if flip_ud:
      out = out[::-1]
  if augmentation.rotate in ("90", 90):
    out = np.rot90(out, quarter_turns)
  elif augmentation.rotate in (True, "any"):
    out = rotate_image(out, angle, fill_value=augmentation.fill_value)
  return np.ascontiguousarray(out)


def rotate_image(image: np.ndarray, degrees: float, *,
                 fill_value: int = grading.HALF_GRAY) -> np.ndarray:
  """Rotates an image about its centre, counter-clockwise, filling with ``fill_value``.

  Args:
    image: uint8 ``[H, W, C]``.
    degrees: angle, counter-clockwise (the direction of ``np.rot90``).
    fill_value: value of pixels that come from outside the image.

  Returns:
    uint8 ``[H, W, C]``, bilinear interpolation.
  """
  h, w = image.shape[:2]
  matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
  channels = image.shape[2] if image.ndim == 3 else 1
  out = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT,
                       borderValue=(fill_value,) * min(channels, 4))
  return out.reshape(image.shape)
