"""The lesion vocabulary: the kinds of mask drig knows, their names and display colours.

``LESION_TYPES`` lists the lesions in a fixed order, with a display colour for
overlays and the matching IDRiD segmentation class where one exists.
``MASK_NAMES`` adds the anatomy drig scores like IDRiD does (the optic disc).
The synthetic data set stores one mask per entry of ``MASK_NAMES``, the IDRiD
builder maps its classes onto them, and the analysis iterates over the same
names. Imports nothing else from drig, so every builder can use it.
"""

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class LesionType:
  """One kind of mask.

  Attributes:
    name: identifier used as the mask's feature key, e.g. ``"microaneurysm"``.
    display_name: human-readable name for figures and reports.
    colour: RGB display colour (uint8 triple) for overlays.
    idrid_name: IDRiD's segmentation class for the same thing, or ``None``.
    is_lesion: False for anatomy (the optic disc), which is scored like IDRiD
      but is not evidence of retinopathy.
  """
  name: str
  display_name: str
  colour: tuple[int, int, int]
  idrid_name: str | None = None
  is_lesion: bool = True


LESION_TYPES: tuple[LesionType, ...] = (
    LesionType("microaneurysm", "microaneurysms", (255, 0, 255), "Microaneurysms"),
    LesionType("haemorrhage", "haemorrhages", (230, 25, 75), "Haemorrhages"),
    LesionType("hard_exudate", "hard exudates", (255, 225, 25), "Hard Exudates"),
    LesionType("cotton_wool_spot", "cotton-wool spots (soft exudates)", (70, 240, 240),
               "Soft Exudates"),
    LesionType("venous_beading", "venous beading", (0, 130, 200)),
    LesionType("neovascularisation", "neovascularisation", (60, 180, 75)),
    LesionType("preretinal_haemorrhage", "preretinal haemorrhage", (245, 130, 48)),
)
ANATOMY_TYPES: tuple[LesionType, ...] = (
    LesionType("optic_disc", "optic disc", (255, 255, 255), "Optic Disc", is_lesion=False),
)
LESION_NAMES: tuple[str, ...] = tuple(t.name for t in LESION_TYPES)
MASK_TYPES: tuple[LesionType, ...] = LESION_TYPES + ANATOMY_TYPES
MASK_NAMES: tuple[str, ...] = tuple(t.name for t in MASK_TYPES)
MASK_COLOURS: dict[str, tuple[int, int, int]] = {t.name: t.colour for t in MASK_TYPES}
_MASK_TYPES_BY_NAME = {t.name: t for t in MASK_TYPES}


def mask_type(name: str) -> LesionType:
  """Returns the registry entry of a lesion or anatomy mask by name."""
  try:
    return _MASK_TYPES_BY_NAME[name]
  except KeyError:
    raise KeyError(f"unknown mask type {name!r}; known: {', '.join(MASK_NAMES)}") from None


def overlay_masks(image: np.ndarray, masks: Mapping[str, np.ndarray], *,
                  alpha: float = 0.6, outline_only: bool = False) -> np.ndarray:
  """Paints masks over an image in their registry colours.

  Args:
    image: uint8 ``[H, W, 3]`` RGB.
    masks: name -> ``[H, W]`` or ``[H, W, 1]`` array; nonzero marks the type.
      Names must be in ``MASK_NAMES``; later entries paint over earlier ones.
    alpha: opacity of the paint.
    outline_only: paint only each mask's one-pixel boundary (keeps the image
      readable under large masks).

  Returns:
    uint8 ``[H, W, 3]``; the input is not modified.
  """
  out = image.astype(np.float32)
  for name, mask in masks.items():
    mask = np.asarray(mask).reshape(image.shape[:2]) > 0
    if outline_only:
      # A pixel is on the outline when it is in the mask but a 4-neighbour is not.
      padded = np.pad(mask, 1)
      interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
      mask = mask & ~interior
    colour = np.asarray(mask_type(name).colour, np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)
