"""Signed heat maps of attributions: the poster's green/red, or a colour-blind-safe pair.

In the poster's palette green is positive attribution, red negative, black (or
the image, in an overlay) is none. Red and green are the pair that people with
the commonest colour-vision deficiencies (about 1 man in 12) cannot tell apart,
so every function also takes ``palette="colorblind"``: Okabe and Ito's blue for
positive and orange for negative, distinguishable in deuteranopia, protanopia
and tritanopia, through the same black. Intensities are clipped at a high percentile of the absolute
values so that a few extreme pixels do not wash out the rest. Everything is
numpy; matplotlib is imported only by the plotting helpers.

Example::

  rgb = green_red(pixel_map(attributions[0]))          # [H, W, 3] in [0, 1]
  fig, ax = plt.subplots()
  clip = show(ax, attributions[0], image=photo)         # overlay + colour bar
"""

from __future__ import annotations

import numpy as np

DEFAULT_PERCENTILE = 99.0
GREEN = np.array([0.0, 1.0, 0.0])
RED = np.array([1.0, 0.0, 0.0])
# Okabe & Ito (2008), "Color Universal Design": blue and orange.
BLUE = np.array([0.0, 0.447, 0.698])
ORANGE = np.array([0.902, 0.624, 0.0])

# Palette name -> (colour of positive, colour of negative attribution).
PALETTES = {"poster": (GREEN, RED), "colorblind": (BLUE, ORANGE)}
DEFAULT_PALETTE = "poster"


def palette_colors(palette: str = DEFAULT_PALETTE) -> tuple[np.ndarray, np.ndarray]:
  """(positive, negative) RGB colours of a palette name (see PALETTES)."""
  try:
    return PALETTES[palette]
  except (KeyError, TypeError):
    raise ValueError(f"unknown palette {palette!r}; use one of {sorted(PALETTES)}") from None


def pixel_map(attributions, channel_axis: int = -1) -> np.ndarray:
  """Sums one image's attributions over colour channels: [H, W, C] -> [H, W] float32."""
  a = np.asarray(attributions, np.float32)
  if a.ndim == 3:
    return a.sum(axis=channel_axis)
  if a.ndim == 2:
    return a
  raise ValueError(f"pixel_map expects one image's attributions [H, W(, C)], got {a.shape}")


def clip_value(values, percentile: float = DEFAULT_PERCENTILE) -> float:
  """The `percentile` of |values| (over nonzero entries); 1.0 if all are zero."""
  if not 0 < percentile <= 100:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")
  magnitudes = np.abs(np.asarray(values, np.float64)).ravel()
  magnitudes = magnitudes[magnitudes > 0]
  if magnitudes.size == 0:
    return 1.0
  return float(np.percentile(magnitudes, percentile))


def green_red(values, percentile: float = DEFAULT_PERCENTILE,
              clip: float | None = None, palette: str = DEFAULT_PALETTE) -> np.ndarray:
  """Maps [H, W] values to RGB [H, W, 3] in [0, 1]: pure green > 0, pure red < 0.

  Args:
    values: a 2-D attribution map (see pixel_map).
    percentile: |values| at this percentile (of nonzero ones) is full intensity.
    clip: the full-intensity magnitude; overrides percentile (use one clip for
      maps that must be compared, e.g. a positive and a negative resultant map).
    palette: "poster" (green/red) or "colorblind" (blue/orange), see PALETTES.

  Returns:
    float32 [H, W, 3].
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 2:
    raise ValueError(f"green_red expects a 2-D map, got shape {values.shape}")
  clip = clip_value(values, percentile) if clip is None else float(clip)
  if clip <= 0:
    raise ValueError(f"clip must be positive, got {clip}")
  positive, negative = palette_colors(palette)
  intensity = np.clip(np.abs(values) / clip, 0.0, 1.0)[..., None]
  color = np.where((values > 0)[..., None], positive, negative)
  return (intensity * color).astype(np.float32)


def _as_unit_rgb(image) -> np.ndarray:
  image = np.asarray(image)
  if np.issubdtype(image.dtype, np.integer):
    image = image.astype(np.float32) / 255.0
  else:
    image = image.astype(np.float32)
    if image.min() < 0:  # the model's [-1, 1] space
      image = (image + 1.0) / 2.0
    elif image.max() > 1.0:  # pixel values [0, 255] as floats
      image = image / 255.0
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return np.clip(image, 0.0, 1.0)


def overlay(image, values, percentile: float = DEFAULT_PERCENTILE, clip: float | None = None,
            dim: float = 0.5, palette: str = DEFAULT_PALETTE) -> np.ndarray:
  """Paints the signed map over a dimmed grayscale copy of `image`.

  Args:
    image: [H, W, 3] or [H, W]; uint8 [0, 255], or float in [0, 1], [0, 255]
      or the model's [-1, 1].
    values: the [H, W] attribution map.
    percentile, clip, palette: as for green_red.
    dim: the brightness of the background image (0 = black, 1 = unchanged).

  Returns:
    float32 RGB [H, W, 3] in [0, 1].
  """
  rgb = green_red(values, percentile, clip, palette)
  base = _as_unit_rgb(image)
  if base.shape[:2] != rgb.shape[:2]:
    raise ValueError(f"image {base.shape[:2]} and map {rgb.shape[:2]} differ in size")
  gray = base.mean(axis=-1, keepdims=True) * dim
  strength = rgb.max(axis=-1, keepdims=True)
  return np.clip(gray * (1.0 - strength) + rgb, 0.0, 1.0).astype(np.float32)


def colormap(palette: str = DEFAULT_PALETTE):
  """A matplotlib colormap from the negative colour (-clip) through black (0) to the positive."""
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  positive, negative = palette_colors(palette)
  return colors.LinearSegmentedColormap.from_list(f"drig_{palette}",
                                                  [negative, (0, 0, 0), positive])


def add_colorbar(ax, clip: float, label: str = "attribution", palette: str = DEFAULT_PALETTE):
  """Adds a colour bar for [-clip, clip] in the palette's colours beside `ax`; returns it."""
  from matplotlib import cm, colors  # pylint: disable=g-import-not-at-top
  mappable = cm.ScalarMappable(norm=colors.Normalize(-clip, clip), cmap=colormap(palette))
  return ax.figure.colorbar(mappable, ax=ax, label=label)


def show(ax, attributions, image=None, percentile: float = DEFAULT_PERCENTILE,
         clip: float | None = None, colorbar: bool = True, title: str | None = None,
         palette: str = DEFAULT_PALETTE) -> float:
  """Draws one image's attributions (alone, or over `image`) on a matplotlib axis.

  Args:
    ax: a matplotlib Axes.
    attributions: [H, W, C] or [H, W].
    image: optional background image (see overlay).
    percentile, clip: as for green_red.
    colorbar: whether to add a colour bar.
    title: an optional axis title.
    palette: as for green_red.

  Returns:
    The clip value used (full intensity), to reuse for comparable maps.
  """
  values = pixel_map(attributions)
  clip = clip_value(values, percentile) if clip is None else float(clip)
  rgb = (green_red(values, clip=clip, palette=palette) if image is None
         else overlay(image, values, clip=clip, palette=palette))
  ax.imshow(rgb, interpolation="nearest")
  ax.set_axis_off()
  if title:
    ax.set_title(title)
  if colorbar:
    add_colorbar(ax, clip, palette=palette)
  return clip
