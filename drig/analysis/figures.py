"""The poster's figures: lesion panels, quantity pairs and group sums, as PNG (and SVG/PDF).

Green is positive attribution and red negative (``palette="poster"``; or
``palette="colorblind"``, blue and orange), overlaid on a dimmed grayscale
copy of the image, full intensity at a percentile of |attribution| (see
drig.attribution.heatmap), with a colour bar giving the scale.

Figures use matplotlib's object API only (``matplotlib.figure.Figure`` on a
``FigureCanvasAgg``), never pyplot: no global figure registry, no backend
selection, nothing to close, and it works headless and in threads. Each
function returns the Figure; `save_figure` writes it atomically, as a PNG
and, for each other entry of ``formats`` (``FIGURE_FORMATS``), as a vector file
of the same name beside it.

Example::

  fig = lesion_figure(photo, image, positive, negative, title="image 17, grade 2")
  save_figure(fig, os.path.join(workdir, "figures", "lesions_17.png"))

Panels are ``fig.axes`` in the order each function's docstring lists them,
followed by the colour bars' axes.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping

from matplotlib import cm
from matplotlib import colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from drig import grading
from drig.attribution import heatmap

PANEL_INCHES = 4.0
DEFAULT_DPI = 100
# The file formats save_figure writes; the PNG is always written (reports embed it).
FIGURE_FORMATS = ("png", "svg", "pdf")


class FigureInputError(ValueError):
  """An image or map given to a figure function has the wrong shape or type."""


def new_figure(width: float, height: float, *, dpi: int = DEFAULT_DPI) -> Figure:
  """A Figure of width x height inches on an Agg canvas, with constrained layout."""
  fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _check_image(image, name: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise FigureInputError(f"{name} must be an image [H, W, 3] (or [H, W]), got {image.shape}")
  if np.issubdtype(image.dtype, np.floating):
    # Pixel values as floats, e.g. a group's mean image. The model's [-1, 1]
    # inputs are not accepted: convert them with grading.from_model_input.
    if not np.isfinite(image).all() or image.min() < -0.5 or image.max() > 255.5:
      raise FigureInputError(f"{name}: float images must hold pixel values in [0, 255], got "
                             f"range [{np.nanmin(image):.3g}, {np.nanmax(image):.3g}]")
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
  if image.dtype != np.uint8:
    raise FigureInputError(f"{name} must be uint8 RGB in [0, 255] (or float pixel values), "
                           f"got dtype {image.dtype}")
  return image


def _check_map(values, shape, name: str) -> np.ndarray:
  try:
    values = heatmap.pixel_map(values)
  except ValueError as e:
    raise FigureInputError(f"{name}: {e}") from None
  if shape is not None and values.shape != tuple(shape[:2]):
    raise FigureInputError(f"{name} is {values.shape[:2]} but the image is {tuple(shape[:2])}")
  if not np.isfinite(values).all():
    raise FigureInputError(f"{name} has non-finite values")
  return values


def shared_clip(maps, percentile: float) -> float:
  """One full-intensity value for several [H, W] maps, so their colours compare."""
  return heatmap.clip_value(np.concatenate([np.ravel(m) for m in maps]), percentile)


def _show_image(ax, image, title: str):
  ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
            interpolation="antialiased")
  ax.set_title(title)
  ax.set_axis_off()


def _show_map(ax, image, values, clip: float, title: str, colorbar: bool = True,
              palette: str = heatmap.DEFAULT_PALETTE):
  rgb = (heatmap.green_red(values, clip=clip, palette=palette) if image is None
         else heatmap.overlay(image, values, clip=clip, palette=palette))
  ax.imshow(rgb, interpolation="nearest")
  ax.set_title(title)
  ax.set_axis_off()
  if colorbar:
    heatmap.add_colorbar(ax, clip, palette=palette)


def lesion_figure(photo, image, positive_map, negative_map, *, title: str = "",
                  percentile: float = heatmap.DEFAULT_PERCENTILE,
                  shared_scale: bool = True, dpi: int = DEFAULT_DPI,
                  palette: str = heatmap.DEFAULT_PALETTE) -> Figure:
  """The poster's Fig (a): where the most positive and most negative neurons look.

  Panels (fig.axes[0:4]): the original photograph, the preprocessed input,
  the resultant active region of the most positive neurons and that of the
  most negative neurons, both overlaid on the input, each with a colour bar.

  Args:
    photo: the original photograph, uint8 [h, w, 3] of any size, or None
      (the panel then says so).
    image: the preprocessed model input, uint8 [H, W, 3].
    positive_map, negative_map: float [H, W] or [H, W, C] (summed over C),
      e.g. drig.attribution.resultant_active_region for the top-k positive and
      top-k negative neurons, at the input's resolution.
    title: the figure's title.
    percentile: |value| at this percentile is full intensity.
    shared_scale: one clip value for both maps (their colours compare); False
      clips each map at its own percentile.
    dpi: the figure's resolution (save with the same dpi for 8 x 8 inches at it).
    palette: the signed colours, "poster" (green/red) or "colorblind"
      (blue/orange); see drig.attribution.heatmap.PALETTES.

  Returns:
    A 2 x 2 Figure, 8 x 8 inches.
  """
  image = _check_image(image, "image")
  positive = _check_map(positive_map, image.shape, "positive_map")
  negative = _check_map(negative_map, image.shape, "negative_map")
  if shared_scale:
    clip_positive = clip_negative = shared_clip([positive, negative], percentile)
  else:
    clip_positive = heatmap.clip_value(positive, percentile)
    clip_negative = heatmap.clip_value(negative, percentile)
  fig = new_figure(2 * PANEL_INCHES, 2 * PANEL_INCHES, dpi=dpi)
  axes = [fig.add_subplot(2, 2, i + 1) for i in range(4)]
  if photo is None:
    axes[0].text(0.5, 0.5, "photograph not available", ha="center", va="center")
    axes[0].set_axis_off()
  else:
    _show_image(axes[0], _check_image(photo, "photo"), "original photograph")
  _show_image(axes[1], image, "preprocessed input")
  _show_map(axes[2], image, positive, clip_positive, "most positive neurons", palette=palette)
  _show_map(axes[3], image, negative, clip_negative, "most negative neurons", palette=palette)
  if title:
    fig.suptitle(title)
  return fig


def quantity_pair_figure(image, maps: Mapping[str, np.ndarray], *, title: str = "",
                         percentile: float = heatmap.DEFAULT_PERCENTILE,
                         dpi: int = DEFAULT_DPI,
                         palette: str = heatmap.DEFAULT_PALETTE) -> Figure:
  """The poster's Fig (b): one image's maps for several quantities, side by side.

  All maps share one symmetric colour scale (the percentile of |values| over
  all of them) and one colour bar, so a complementary pattern (green for
  grade 0 where grade 4 is red, say) shows as it is.

  Panels (fig.axes[0:len(maps)]): one per map, in the mapping's order,
  titled by its key.

  Args:
    image: the preprocessed input, uint8 [H, W, 3], or None (maps on black).
    maps: quantity name -> float [H, W] or [H, W, C], e.g.
      {"grade 0": m0, "grade 4": m4}; at least one.
    title: the figure's title.
    percentile: |value| at this percentile (over all maps) is full intensity.
    dpi: the figure's resolution.
    palette: the signed colours (see lesion_figure).

  Returns:
    A 1 x len(maps) Figure, 4 inches per panel plus a colour bar.
  """
  if not maps:
    raise FigureInputError("quantity_pair_figure needs at least one map")
  image = None if image is None else _check_image(image, "image")
  shape = None if image is None else image.shape
  values = {name: _check_map(m, shape, f"maps[{name!r}]") for name, m in maps.items()}
  shapes = {v.shape for v in values.values()}
  if len(shapes) > 1:
    raise FigureInputError(f"quantity_pair_figure: maps differ in shape: {sorted(shapes)}")
  clip = shared_clip(list(values.values()), percentile)
  fig = new_figure(PANEL_INCHES * len(values) + 1.0, PANEL_INCHES + 0.6, dpi=dpi)
  axes = [fig.add_subplot(1, len(values), i + 1) for i in range(len(values))]
  for ax, (name, value) in zip(axes, values.items()):
    _show_map(ax, image, value, clip, str(name), colorbar=False, palette=palette)
  mappable = cm.ScalarMappable(norm=colors.Normalize(-clip, clip),
                               cmap=heatmap.colormap(palette))
  fig.colorbar(mappable, ax=axes, label="attribution", shrink=0.9)
  if title:
    fig.suptitle(title)
  return fig


def methods_figure(image, maps: Mapping[str, np.ndarray], *, title: str = "",
                   percentile: float = heatmap.DEFAULT_PERCENTILE,
                   dpi: int = DEFAULT_DPI,
                   palette: str = heatmap.DEFAULT_PALETTE) -> Figure:
  """One image's maps by several attribution methods, each on its own colour scale.

  Methods have different units (IG sums to a change in the quantity, a
  gradient is per unit of input), so each panel is clipped at its own
  percentile of |values| and has its own colour bar.

  Args:
    image: the preprocessed input, uint8 [H, W, 3], or None (maps on black).
    maps: method name -> float [H, W] or [H, W, C] (channels summed); at least one.
    title: the figure's title.
    percentile: |value| at this percentile (per map) is full intensity.
    dpi: the figure's resolution.
    palette: the signed colours (see lesion_figure).

  Returns:
    A 1 x len(maps) Figure, panels in the mapping's order, titled by the keys.

  Raises:
    FigureInputError: no map, or a map that is not finite or not the image's size.
  """
  if not maps:
    raise FigureInputError("methods_figure needs at least one map")
  image = None if image is None else _check_image(image, "image")
  shape = None if image is None else image.shape
  values = {name: _check_map(m, shape, f"maps[{name!r}]") for name, m in maps.items()}
  fig = new_figure(PANEL_INCHES * len(values) + 0.5 * len(values), PANEL_INCHES + 0.6, dpi=dpi)
  for i, (name, value) in enumerate(values.items()):
    ax = fig.add_subplot(1, len(values), i + 1)
    _show_map(ax, image, value, shared_clip([value], percentile), str(name), palette=palette)
  if title:
    fig.suptitle(title)
  return fig


def group_sum_figure(image, summed_map, *, title: str = "",
                     percentile: float = heatmap.DEFAULT_PERCENTILE,
                     dpi: int = DEFAULT_DPI,
                     palette: str = heatmap.DEFAULT_PALETTE) -> Figure:
  """The summed heat map over a group of images (e.g. all correct grade-2 ones).

  Panels (fig.axes[0]): the map over the image, with a colour bar.

  Args:
    image: the background, uint8 [H, W, 3], or float pixel values in
      [0, 255] (e.g. the group's mean image), or None for a half-gray
      background (pixel 128, the IG baseline).
    summed_map: float [H, W] or [H, W, C], the group's summed attributions.
    title: the figure's title.
    percentile: |value| at this percentile is full intensity.
    dpi: the figure's resolution.
    palette: the signed colours (see lesion_figure).

  Returns:
    A single-panel Figure, about 5 x 4.6 inches.
  """
  if image is None:
    values = _check_map(summed_map, None, "summed_map")
    image = np.full(values.shape + (3,), grading.HALF_GRAY, np.uint8)
  else:
    image = _check_image(image, "image")
    values = _check_map(summed_map, image.shape, "summed_map")
  fig = new_figure(PANEL_INCHES + 1.0, PANEL_INCHES + 0.6, dpi=dpi)
  ax = fig.add_subplot(1, 1, 1)
  _show_map(ax, image, values, heatmap.clip_value(values, percentile), title or "summed map",
            palette=palette)
  return fig


def check_formats(formats) -> tuple[str, ...]:
  """``formats`` as a tuple of FIGURE_FORMATS names, each once.

  Raises:
    ValueError: ``formats`` is a bare string, empty, or names a format that is
      not in FIGURE_FORMATS.
  """
  if isinstance(formats, str) or not isinstance(formats, (list, tuple)) or not formats:
    raise ValueError(f"figure formats must be a non-empty list of names from {FIGURE_FORMATS}, "
                     f"got {formats!r}")
  unknown = [f for f in formats if f not in FIGURE_FORMATS]
  if unknown:
    raise ValueError(f"figure format {unknown[0]!r} is not supported; use names from "
                     f"{FIGURE_FORMATS}")
  return tuple(dict.fromkeys(formats))


def vector_paths(path, formats=("png",)) -> list[str]:
  """The files beside the PNG ``path`` that save_figure writes for ``formats``
  (the same name with each other format's suffix), in the order of ``formats``."""
  stem = os.path.splitext(os.fspath(path))[0]
  return [f"{stem}.{f}" for f in check_formats(formats) if f != "png"]


def _write_atomically(fig: Figure, path: str, file_format: str, dpi: int) -> None:
  """One file of ``fig``: a temporary file in the same folder, flushed, renamed over ``path``."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      fig.savefig(f, format=file_format, dpi=dpi)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide figures from other users
    os.replace(temporary, path)
  except BaseException:
    try:
      os.unlink(temporary)
    except FileNotFoundError:
      pass
    raise


def save_figure(fig: Figure, path, *, dpi: int = DEFAULT_DPI, formats=("png",)) -> str:
  """Writes `fig` as a PNG at `path` atomically, creating its folder, and as
  the other ``formats`` beside it.

  Each file is written to a temporary file in the same folder, flushed to disk
  and renamed over its path (os.replace), so it is either the old file or
  the complete new one, never a partial one; on any error the temporary file
  is removed and the error re-raised.

  Args:
    fig: a matplotlib Figure (pyplot's or `new_figure`'s).
    path: the PNG's path (str or os.PathLike).
    dpi: dots per inch; a figure of w x h inches becomes w*dpi x h*dpi pixels
      (and the resolution of images embedded in vector files).
    formats: names from FIGURE_FORMATS; "svg" and "pdf" are written as
      ``vector_paths(path, formats)``. The PNG is written whatever the list,
      since reports embed it.

  Returns:
    `path` as a string.

  Raises:
    ValueError: ``formats`` names a format not in FIGURE_FORMATS.
  """
  path = os.fspath(path)
  extra = vector_paths(path, formats)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _write_atomically(fig, path, "png", dpi)
  for vector in extra:
    _write_atomically(fig, vector, os.path.splitext(vector)[1][1:], dpi)
  return path
