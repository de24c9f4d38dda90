"""Control maps for the lesion study: what a map scores without explaining the model.

A method "finds lesions" only if it beats maps that need no model at all, or
only a trivial one:

* ``random``: i.i.d. uniform values (``drig.analysis.localization.random_map``),
  the chance level of every score;
* ``contrast``: ``|x - baseline|`` summed over channels, the input's own
  contrast against the attribution's baseline. Lesions (dark haemorrhages,
  bright exudates) and the optic disc differ from a half-gray baseline, so
  this map localises them without any model; path methods multiply their
  gradients by exactly this difference, which makes it the control an IG map
  must beat;
* ``optic_disc``: a cone centred on the optic disc (its mask's centroid,
  radius twice the disc's equivalent radius), the map of a model that only
  looked at the disc (where resultant maps tend to land);
* gradient x input is a method of the registry (``input_x_gradient``,
  ``CONTROL_METHODS``), computed and scored like every method.

Everything is numpy, one image or a batch at a time; the maps are [H, W] and
non-negative, so every localisation score applies to them as to a positive
saliency map.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from drig.analysis import localization

# Registry methods the study adds to config.methods as controls.
CONTROL_METHODS = ("input_x_gradient",)
# The model-free control maps, in report order.
CONTROL_MAPS = ("random", "contrast", "optic_disc")
OPTIC_DISC = "optic_disc"


class ControlError(ValueError):
  """Images, baselines or masks of the wrong shape for a control map."""


def contrast_map(x, baseline) -> np.ndarray:
  """|x - baseline| summed over channels: float32 [N, H, W] for x [N, H, W, C].

  Args:
    x: images [N, H, W, C] in the model's input space.
    baseline: broadcastable to x (e.g. [1, H, W, C], the half-gray baseline).

  Raises:
    ControlError: x is not [N, H, W, C] or the baseline does not broadcast.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 4:
    raise ControlError(f"contrast_map: x must be [N, H, W, C], got shape {x.shape}")
  try:
    difference = np.abs(x - np.asarray(baseline, np.float32))
  except ValueError as e:
    raise ControlError(f"contrast_map: baseline of shape {np.shape(baseline)} does not "
                       f"broadcast to x {x.shape}") from e
  if difference.shape != x.shape:
    raise ControlError(f"contrast_map: baseline of shape {np.shape(baseline)} does not "
                       f"broadcast to x {x.shape}")
  return difference.sum(axis=-1)


def disc_geometry(mask) -> Optional[tuple[float, float, float]]:
  """(row, column, radius) of a disc mask: its centroid and equivalent radius sqrt(area / pi).

  Returns None for an empty mask (the optic disc outside the image or not known).
  """
  mask = np.asarray(mask, bool)
  if mask.ndim != 2:
    raise ControlError(f"disc_geometry: mask must be [H, W], got shape {mask.shape}")
  rows, columns = np.nonzero(mask)
  if rows.size == 0:
    return None
  return float(rows.mean()), float(columns.mean()), math.sqrt(rows.size / math.pi)


def optic_disc_map(disc_mask, *, reach: float = 2.0) -> Optional[np.ndarray]:
  """A cone on the optic disc: 1 at its centre, falling linearly to 0 at reach x its radius.

  Args:
    disc_mask: bool [H, W], the optic disc's pixels.
    reach: the cone's radius in disc radii (2: the disc and a rim as wide).

  Returns:
    float32 [H, W] in [0, 1], or None when the mask is empty.
  """
  geometry = disc_geometry(disc_mask)
  if geometry is None:
    return None
  row, column, radius = geometry
  height, width = np.asarray(disc_mask).shape
  r = np.arange(height, dtype=np.float32)[:, None] - row
  c = np.arange(width, dtype=np.float32)[None, :] - column
  distance = np.sqrt(r * r + c * c)
  return np.clip(1.0 - distance / (reach * max(radius, 0.5)), 0.0, 1.0).astype(np.float32)


def control_maps(contrast, masks: Optional[Mapping[str, np.ndarray]], seed: int
                 ) -> dict[str, np.ndarray]:
  """One image's control maps, keyed by CONTROL_MAPS (optic_disc only when its mask is known).

  Args:
    contrast: [H, W], the image's ``contrast_map``.
    masks: the image's masks (an "optic_disc" entry gives the disc), or None.
    seed: the random map's seed (one per image).

  Returns:
    {"random": ..., "contrast": ..., "optic_disc": ...}, float32 [H, W] each.
  """
  contrast = np.asarray(contrast, np.float32)
  if contrast.ndim != 2:
    raise ControlError(f"control_maps: contrast must be [H, W], got shape {contrast.shape}")
  maps = {"random": localization.random_map(seed, contrast.shape), "contrast": contrast}
  if masks is not None and OPTIC_DISC in masks:
    disc = optic_disc_map(masks[OPTIC_DISC])
    if disc is not None:
      maps["optic_disc"] = disc
  return maps
