"""Retina preprocessing: the poster's five steps as pure functions on numpy arrays.

One concept: the preprocessing recipe, from a photograph file to the network's input.

A fundus photograph (RGB uint8, any size) becomes the network input, a
``size x size x 3`` uint8 image in which the retina fills the square and looks the
same whatever the camera, exposure or resolution:

1. :func:`find_retina`: the retina's diameter from the middle row of pixels (the
   pixels that are not black; Ben Graham's rule, made robust to dark borders and
   specks), or a circle fitted to its visible boundary where the frame cuts it at
   the side.
2. :func:`denoise`: a light Gaussian blur that removes high-frequency noise. Its
   sigma is given in output pixels, so it is also the anti-aliasing filter of step 3
   and makes the result independent of the source resolution.
3. :func:`rescale_to_retina`: scale and translate so that the retina's diameter
   becomes ``size`` and its centre the centre of the output.
4. :func:`subtract_local_average`: ``4 * img - 4 * GaussianBlur(img) + 128``,
   saturated to [0, 255].
5. :func:`mask_outside_retina`: everything outside 90% of the retina's radius
   becomes half gray (128), the integrated-gradients baseline colour.

:func:`preprocess_fundus` composes the steps, :func:`preprocess_file` adds
reduced-resolution JPEG decoding (the retina only needs about ``2 * size`` pixels,
EyePACS photographs have 2000-4000). Bad input raises :class:`FundusImageError`
naming the file and the problem. See docs/preprocessing.md for the defaults and
where drig differs from TFDS's ``btgraham-300`` recipe.
"""

import dataclasses
import functools
import os
import warnings

import cv2
import numpy as np

from drig import grading

# Defaults: the poster's values where it gives them, Ben Graham's otherwise.
DEFAULT_SIZE = 256
DEFAULT_THRESHOLD = 0.1  # Graham: a pixel is retina if its channel sum > 0.1 x the row mean.
DEFAULT_DENOISE_SIGMA = 0.5  # Output pixels; "light": keeps 1-2 px microaneurysms.
LOCAL_AVERAGE_SIGMA_PER_RADIUS = 1.0 / 30.0  # Graham: sigma = retina radius / 30.
DEFAULT_RADIUS_FRACTION = 0.9  # Poster: crop the outer 10% of the retina.
DEFAULT_FILL = grading.HALF_GRAY  # Poster: half gray.
# Decode and work at no less than this x size pixels across the retina: reduced
# decoding at twice the output's resolution keeps lesions within ~40 dB PSNR of full
# decoding (docs/preprocessing.md), at a quarter of the decoding work.
DEFAULT_WORKING_RATIO = 2.0
# Largest output side accepted: far beyond any network input, small enough that a
# typo (an extra digit) fails at once instead of allocating gigabytes.
MAX_SIZE = 8192

# Below this brightest value an image counts as all black (JPEG leaves a black
# image at exactly 0; a dim but real retina is far brighter).
_BLACK_LEVEL = 10
# A retina cut at the side is located by fitting a circle to its boundary points on
# this many rows; the fit is refused if they cover a shorter arc, or lie further
# from the circle (RMS, as a fraction of the radius), than below.
_FIT_ROWS = 64
_MIN_FIT_ARC_DEGREES = 90.0
_MAX_FIT_RMS_FRACTION = 0.02
_JPEG_REDUCTIONS = (8, 4, 2)
_REDUCED_FLAGS = {
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_COLOR_RGB,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4 | cv2.IMREAD_COLOR_RGB,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2 | cv2.IMREAD_COLOR_RGB,
    1: cv2.IMREAD_COLOR_RGB,
}
# dtypes that OpenCV's resize and warpAffine accept (bool is carried as uint8).
_WARPABLE_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


class FundusImageError(ValueError):
  """A fundus image that cannot be preprocessed; names the file and the problem.

  Attributes:
    source: the file path, or "<array>" for in-memory images.
    problem: what is wrong, in words.
  """

  def __init__(self, source, problem):
    super().__init__(source, problem)  # args round-trip through pickle.
    self.source = str(source)
    self.problem = problem

  def __str__(self):
    return f"{self.source}: {self.problem}"


class UpsamplingWarning(UserWarning):
  """The retina is smaller than the target size, so the image is upsampled."""


@dataclasses.dataclass(frozen=True)
class RetinaGeometry:
  """Where the retina is, in pixel units of the image it was measured on.

  Coordinates follow OpenCV: pixel (x, y) has its centre at (x, y), so an image of
  width w spans [-0.5, w - 0.5].

  Attributes:
    center_x: column of the retina's centre.
    center_y: row of the retina's centre.
    radius: half the retina's diameter.
  """
  center_x: float
  center_y: float
  radius: float

  @property
  def diameter(self):
    return 2.0 * self.radius

  def scaled(self, factor):
    """This geometry in an image resized by ``factor`` (pixel centres map as OpenCV's)."""
    return RetinaGeometry(
        center_x=(self.center_x + 0.5) * factor - 0.5,
        center_y=(self.center_y + 0.5) * factor - 0.5,
        radius=self.radius * factor)


def ensure_rgb_uint8(image, *, source="<array>"):
  """Returns ``image`` as a C-contiguous RGB uint8 array, converting if needed.

  Args:
    image: array-like, uint8, of shape HxW or HxWx1 (grayscale: replicated to three
      channels), HxWx3 (RGB: returned as is) or HxWx4 (RGBA: alpha dropped, as
      image decoders do).
    source: the file the image came from, for error messages.

  Returns:
    uint8[H, W, 3].

  Raises:
    FundusImageError: wrong dtype, rank, channel count or an empty image.
  """
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise FundusImageError(source, f"expected a uint8 image, got dtype {array.dtype}")
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim != 3:
    raise FundusImageError(
        source, f"expected an HxW or HxWxC image, got shape {array.shape}")
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise FundusImageError(source, f"empty image of shape {array.shape}")
  channels = array.shape[2]
  if channels == 1:
    array = np.repeat(array, 3, axis=2)
  elif channels == 4:
    array = array[:, :, :3]
  elif channels != 3:
    raise FundusImageError(
        source, f"expected 1, 3 or 4 channels, got {channels} (shape {array.shape})")
  return np.ascontiguousarray(array)


def check_size(size):
  """Returns ``size`` as an int if it is a valid output side, else raises ValueError.

  Args:
    size: the output side in pixels, an integer in [1, MAX_SIZE].

  Raises:
    ValueError: naming ``size``: not an integer, or out of range.
  """
  if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
    raise ValueError(f"size must be an integer number of pixels, got {size!r}")
  if not 1 <= size <= MAX_SIZE:
    raise ValueError(f"size must be in [1, {MAX_SIZE}] pixels, got {size}")
  return int(size)


def _runs(on):
  """Start (inclusive) and end (exclusive) indices of the runs of True in ``on``."""
  edges = np.diff(np.concatenate([[0], on.astype(np.int8), [0]]))
  return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _bright_run(row, level, min_run, max_gap):
  """The retina's run on one row: ``(first, last)`` (last exclusive) or None.

  Runs of ``row > level`` shorter than ``min_run`` are dropped, runs separated by
  gaps of at most ``max_gap`` merged, and the merged run with the most bright
  pixels wins.
  """
  starts, ends = _runs(row > level)
  keep = (ends - starts) >= min_run
  starts, ends = starts[keep], ends[keep]
  if starts.size == 0:
    return None
  gaps = starts[1:] - ends[:-1]
  group = np.concatenate([[0], np.cumsum(gaps > max_gap)])
  bright = np.bincount(group, weights=ends - starts)
  best = int(np.argmax(bright))
  return int(starts[group == best][0]), int(ends[group == best][-1])


def _edges(row, level, first, last):
  """Sub-pixel points where ``row`` crosses ``level`` at a run's two ends.

  Linearly interpolated; a run that reaches the image's border ends there.
  """
  width = row.shape[0]
  left = -0.5
  if first > 0:
    left = first - 1 + (level - row[first - 1]) / (row[first] - row[first - 1])
  right = width - 0.5
  if last < width:
    right = last - 1 + (row[last - 1] - level) / (row[last - 1] - row[last])
  return left, right


def _fit_circle(xs, ys):
  """Least-squares circle through points (Kasa's algebraic fit): (cx, cy, r, rms)."""
  x0, y0 = xs.mean(), ys.mean()  # Centred coordinates condition the system.
  u, v = xs - x0, ys - y0
  design = np.stack([u, v, np.ones_like(u)], axis=1)
  (d, e, f), *_ = np.linalg.lstsq(design, -(u * u + v * v), rcond=None)
  cu, cv = -d / 2, -e / 2
  radius = np.sqrt(max(cu * cu + cv * cv - f, 0.0))
  rms = float(np.sqrt(np.mean((np.hypot(u - cu, v - cv) - radius) ** 2)))
  return float(cu + x0), float(cv + y0), float(radius), rms


def _locate_clipped(image, level, *, source, min_run, max_gap, edge_margin,
                    rows=_FIT_ROWS):
  """Fits a circle to the retina's visible boundary, for a disc cut at the side.

  On each of ``rows`` rows spread over the height, the retina's run ends are
  boundary points unless they lie within ``edge_margin`` of the image's border
  (there the frame, not the retina, ends the run).
  """
  height, width = image.shape[:2]
  xs, ys = [], []
  for y in np.unique(np.linspace(0, height - 1, rows).round().astype(int)):
    row = image[y].sum(axis=1, dtype=np.float32)
    run = _bright_run(row, level, min_run, max_gap)
    if run is None:
      continue
    first, last = run
    left, right = _edges(row, level, first, last)
    if first > edge_margin:
      xs.append(float(left))
      ys.append(y)
    if last < width - edge_margin:
      xs.append(float(right))
      ys.append(y)
  problem = ("cannot locate the retina: it is cut by the image's left or right edge and "
             "too little of its boundary is visible")
  if len(xs) < 6:
    raise FundusImageError(source, f"{problem} ({len(xs)} boundary points)")
  xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  # A label or a frame on some rows gives outliers: drop the worst point and fit
  # again, up to a third of the points.
  for _ in range(len(xs) // 3 + 1):
    cx, cy, radius, rms = _fit_circle(xs, ys)
    if rms <= max(1.0, _MAX_FIT_RMS_FRACTION * radius) or len(xs) <= 6:
      break
    worst = np.argmax(np.abs(np.hypot(xs - cx, ys - cy) - radius))
    xs, ys = np.delete(xs, worst), np.delete(ys, worst)
  # The arc the points cover (360 degrees less the largest gap between them): a
  # short arc does not pin the radius down.
  angles = np.sort(np.arctan2(ys - cy, xs - cx))
  largest_gap = np.max(np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi])))
  arc = np.degrees(2 * np.pi - largest_gap)
  if not np.isfinite(radius) or radius <= 0 or arc < _MIN_FIT_ARC_DEGREES:
    raise FundusImageError(source, f"{problem} (the visible arc spans {arc:.0f} degrees)")
  if rms > max(1.0, _MAX_FIT_RMS_FRACTION * radius):
    raise FundusImageError(
        source, f"{problem} (its visible boundary is not a circle: {rms:.1f} px off)")
  return RetinaGeometry(center_x=cx, center_y=cy, radius=radius)


def find_retina(image, *, threshold=DEFAULT_THRESHOLD, source="<array>", band=2,
                min_run_fraction=0.005, max_gap_fraction=0.02,
                min_diameter_fraction=0.1, edge_margin=0):
  """Step 1: locates the retina from the middle row of pixels.

  Ben Graham's rule counts the pixels of the middle row whose channel sum exceeds
  ``threshold`` x the row's mean. drig keeps that rule on a black background and
  makes it robust:

  * the row is the mean of the ``2 * band + 1`` middle rows (sensor noise);
  * the threshold is measured above the row's background level (its 1st
    percentile, if darker than a quarter of the row's 90th percentile; else 0), so a
    dark-gray instead of black background is not counted; on a black background
    this is Graham's threshold;
  * runs of bright pixels shorter than ``min_run_fraction`` of the width (specks,
    noise) are dropped, runs separated by gaps shorter than ``max_gap_fraction``
    (dark vessels, lesions) are merged, and the retina is the merged run holding
    the most bright pixels; its extent is the diameter. A bright frame or label
    separated from the retina by black is therefore ignored.

  The middle row cannot tell the vertical centre, so ``center_y`` is the image's
  centre row (as in Graham's and TFDS's processing).

  Where the middle row's retina reaches the left or right edge (or comes within
  ``edge_margin`` px of it), the camera cut the disc there and the row's extent is not
  its diameter. A circle is then fitted to the retina's boundary points on rows
  spread over the height (a run's end at the image's edge is not a boundary
  point), which gives the centre (both coordinates) and the radius.

  Args:
    image: uint8 image, HxW or HxWxC (see :func:`ensure_rgb_uint8`).
    threshold: fraction of the row's mean (above background) a retina pixel exceeds.
    source: the file the image came from, for error messages.
    band: half-height of the band of middle rows averaged.
    min_run_fraction: runs shorter than this fraction of the width are specks.
    max_gap_fraction: gaps shorter than this fraction of the width are bridged.
    min_diameter_fraction: a retina narrower than this fraction of the width is
      not a retina.
    edge_margin: a run ending within this many pixels of the left or right edge
      is cut by the edge (0: only a run that reaches the edge).

  Returns:
    RetinaGeometry in this image's pixel units.

  Raises:
    FundusImageError: the image is all black, the middle row is uniform (no
      structure at all), no retina is found, or the retina is cut at the side and
      too little of its boundary is visible to fit a circle (e.g. it spans every
      row).
  """
  image = ensure_rgb_uint8(image, source=source)
  height, width = image.shape[:2]
  brightest = int(image.max())
  if brightest < _BLACK_LEVEL:
    raise FundusImageError(source, f"image is all black (brightest value {brightest})")
  middle = height // 2  # Graham's (and TFDS's) middle row.
  rows = image[max(middle - band, 0):middle + band + 1]
  row = rows.sum(axis=2, dtype=np.float32).mean(axis=0)
  low, high = (float(v) for v in np.percentile(row, [1.0, 90.0]))
  if high - low <= 3.0:  # A real retina always has some structure.
    raise FundusImageError(source, "no retina found: the middle row is uniform")
  # A dark but not black background is subtracted; a "background" brighter than a
  # quarter of the retina is retina that spans the whole row (cut left and right).
  background = low if low < 0.25 * high else 0.0
  contrast = float(row.mean()) - background
  level = background + threshold * contrast
  min_run = max(3, int(np.ceil(min_run_fraction * width)))
  max_gap = max(2, max_gap_fraction * width)
  run = _bright_run(row, level, min_run, max_gap)
  if run is None:
    raise FundusImageError(
        source, "no retina found: no bright run on the middle row (only specks)")
  first, last = run  # Last is exclusive.
  if last - first < max(4, min_diameter_fraction * width):
    raise FundusImageError(
        source, f"no retina found: the widest bright run on the middle row is "
        f"{last - first} px of {width}")
  if first <= edge_margin or last >= width - edge_margin:
    return _locate_clipped(image, level, source=source, min_run=min_run, max_gap=max_gap,
                           edge_margin=edge_margin)
  # Sub-pixel edges make the geometry agree across resolutions (reduced and full
  # JPEG decoding) to a fraction of a pixel.
  left, right = _edges(row, level, first, last)
  return RetinaGeometry(
      center_x=float(left + right) / 2.0,
      center_y=(height - 1) / 2.0,
      radius=float(right - left) / 2.0)


def denoise(image, *, sigma=1.0):
  """Step 2: a light Gaussian blur that removes high-frequency noise.

  Args:
    image: HxW or HxWxC array (uint8 or float).
    sigma: standard deviation in pixels of ``image``; 0 returns the image as is.
      :func:`preprocess_fundus` passes ``denoise_sigma * retina_diameter / size``,
      i.e. a sigma fixed in output pixels, so that the blur also anti-aliases step 3.

  Returns:
    The blurred image, same shape and dtype.
  """
  if sigma <= 0:
    return image
  return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)


def _by_channel_groups(fn, array):
  """Applies ``fn`` to <= 4-channel slices (OpenCV's limit for some ops) and joins them."""
  if array.ndim == 2 or array.shape[2] <= 4:
    out = fn(array)
    return out.reshape(out.shape[:2] + array.shape[2:])  # OpenCV drops a single channel.
  parts = [fn(np.ascontiguousarray(array[:, :, i:i + 4]))
           for i in range(0, array.shape[2], 4)]
  parts = [p.reshape(p.shape[:2] + (-1,)) for p in parts]
  return np.concatenate(parts, axis=2)


def rescale_to_retina(image, geometry, *, size=DEFAULT_SIZE, interpolation=None, fill=0,
                      border_mode=cv2.BORDER_CONSTANT, source="<array>", warn=True):
  """Step 3: scales and translates so that the retina fills a ``size x size`` square.

  The retina's diameter becomes ``size`` and its centre lands on the output's centre
  pixel position ``((size - 1) / 2, (size - 1) / 2)``. Areas outside the source are
  ``fill`` (``border_mode=cv2.BORDER_CONSTANT``) or copies of the nearest edge pixel
  (``cv2.BORDER_REPLICATE``, used for images so that step 4's blur does not see a
  black edge where a camera cut the retina).

  Works for images and for masks: any channel count, dtypes uint8, uint16, int16,
  float32, float64 and bool. Lesion masks: :func:`rescale_mask_to_retina`.

  Args:
    image: HxW or HxWxC array.
    geometry: RetinaGeometry measured on ``image``.
    size: output side in pixels.
    interpolation: OpenCV flag. Default: INTER_AREA (exact box filter) when shrinking,
      INTER_LINEAR when enlarging. INTER_AREA crops the retina's square (rounded to
      whole source pixels: at most half a source pixel off) and resizes it; the other
      flags warp exactly with cv2.warpAffine.
    fill: value of pixels outside the source image (BORDER_CONSTANT).
    border_mode: cv2.BORDER_CONSTANT or cv2.BORDER_REPLICATE.
    source: the file the image came from, for messages.
    warn: emit an UpsamplingWarning when the retina is smaller than ``size``.

  Returns:
    size x size (2-D input) or size x size x C array of the input's dtype.

  Raises:
    FundusImageError: an unsupported dtype or shape, or a non-positive radius.
  """
  size = check_size(size)
  array = np.asarray(image)
  if array.ndim not in (2, 3) or array.shape[0] == 0 or array.shape[1] == 0:
    raise FundusImageError(source, f"expected an HxW or HxWxC array, got shape {array.shape}")
  is_bool = array.dtype == np.bool_
  if is_bool:
    array = array.view(np.uint8)
  elif array.dtype.type not in _WARPABLE_DTYPES:
    raise FundusImageError(source, f"cannot resample dtype {array.dtype}")
  diameter = geometry.diameter
  if not np.isfinite(diameter) or diameter <= 0:
    raise FundusImageError(source, f"invalid retina geometry {geometry}")
  scale = size / diameter
  if interpolation is None:
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
  if scale > 1 and warn:
    warnings.warn(
        f"{source}: retina diameter {diameter:.0f} px is smaller than the target "
        f"{size} px; upsampling {scale:.2f}x", UpsamplingWarning, stacklevel=2)
  border_value = (float(fill),) * 4
  height, width = array.shape[:2]

  side = max(1, int(round(diameter)))
  left = int(round(geometry.center_x + 0.5 - side / 2))
  top = int(round(geometry.center_y + 0.5 - side / 2))
  overlaps = left < width and top < height and left + side > 0 and top + side > 0
  if interpolation == cv2.INTER_AREA and scale < 1 and overlaps:
    # Box filtering needs cv2.resize, which cannot translate: crop the retina's
    # square (whole source pixels), pad what lies outside the image, then resize.
    window = array[max(top, 0):top + side, max(left, 0):left + side]
    pads = (max(-top, 0), max(top + side - height, 0),
            max(-left, 0), max(left + side - width, 0))
    if any(pads):
      window = cv2.copyMakeBorder(window, *pads, border_mode, value=border_value)
      window = window.reshape(window.shape[:2] + array.shape[2:])
    out = _by_channel_groups(
        lambda a: cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA), window)
  else:
    center = (size - 1) / 2.0
    matrix = np.array([[scale, 0.0, center - scale * geometry.center_x],
                       [0.0, scale, center - scale * geometry.center_y]])
    if interpolation == cv2.INTER_AREA:
      interpolation = cv2.INTER_LINEAR  # warpAffine has no box filter; enlarging needs none.
    out = _by_channel_groups(
        lambda a: cv2.warpAffine(a, matrix, (size, size), flags=interpolation,
                                 borderMode=border_mode, borderValue=border_value),
        array)
  return out.astype(bool) if is_bool else out


def rescale_mask_to_retina(mask, geometry, *, size=DEFAULT_SIZE, source="<array>"):
  """:func:`rescale_to_retina` for a boolean mask, keeping every covered pixel.

  Nearest-neighbour sampling reads one source pixel per output pixel, so when
  shrinking it can miss a lesion of one or two source pixels altogether (a
  microaneurysm, the whole evidence of DR grade 1). Here an output pixel is True
  when any source pixel under it is: the mask is box-filtered (``INTER_AREA``,
  the exact overlap-weighted average) as float32 and thresholded above zero, i.e.
  max pooling with the output's pixel footprint. The image itself is shrunk by
  the same box filter, so these are the output pixels whose value the lesion
  changed (before the later blurs): the mask stays the lesion's support. When enlarging, where each
  output pixel lies within one source pixel, nearest-neighbour sampling already
  keeps every lesion and is used.

  Args:
    mask: bool (or 0/1) HxW array.
    geometry: RetinaGeometry measured on the image the mask belongs to.
    size: output side in pixels.
    source: the file the mask came from, for messages.

  Returns:
    bool[size, size].

  Raises:
    FundusImageError: ``mask`` is not 2-D, or the geometry is invalid.
  """
  array = np.asarray(mask)
  if array.ndim != 2:
    raise FundusImageError(source, f"expected an HxW mask, got shape {array.shape}")
  shrinking = size < geometry.diameter
  out = rescale_to_retina(array.astype(np.float32 if shrinking else np.uint8), geometry,
                          size=size, interpolation=cv2.INTER_AREA if shrinking
                          else cv2.INTER_NEAREST, source=source, warn=False)
  return np.asarray(out).reshape(size, size) > 0


def source_footprint(geometry, image_shape, *, size=DEFAULT_SIZE):
  """Output pixels of :func:`rescale_to_retina` whose centres fall inside the source.

  Cameras often cut the retina at the top and bottom; those parts of the output
  square hold no image.

  Args:
    geometry: RetinaGeometry of the source image.
    image_shape: the source image's shape (H, W, ...).
    size: output side.

  Returns:
    bool[size, size], True where the output pixel shows the source image.
  """
  height, width = image_shape[:2]
  offsets = (np.arange(size) - (size - 1) / 2.0) * (geometry.diameter / size)
  xs = geometry.center_x + offsets
  ys = geometry.center_y + offsets
  inside_x = (xs >= -0.5) & (xs <= width - 0.5)
  inside_y = (ys >= -0.5) & (ys <= height - 0.5)
  return inside_y[:, None] & inside_x[None, :]


def subtract_local_average(image, *, sigma=None, size=DEFAULT_SIZE):
  """Step 4: local average colour subtraction, ``4 * img - 4 * blur(img) + 128``.

  Same OpenCV calls as Ben Graham's and TFDS's: ``cv2.addWeighted`` rounds and
  saturates to [0, 255].

  Args:
    image: uint8 HxW or HxWxC, the retina rescaled to diameter ``size``.
    sigma: the Gaussian's standard deviation in pixels. Default: Graham's retina
      radius / 30, i.e. ``size / 60`` (4.27 px at 256).
    size: the retina's diameter in ``image``, used for the default sigma.

  Returns:
    uint8 array of the input's shape.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise FundusImageError("<array>", f"expected a uint8 image, got dtype {image.dtype}")
  if sigma is None:
    sigma = size / 2.0 * LOCAL_AVERAGE_SIGMA_PER_RADIUS
  blurred = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)
  # Graham's offset is half gray: a flat region becomes the IG baseline colour.
  return cv2.addWeighted(image, 4, blurred, -4, grading.HALF_GRAY)


def _fill_outside(image, keep, fill):
  """Sets ``image`` (HxW or HxWxC, in place) to ``fill`` where ``keep`` (bool HxW) is False."""
  if image.dtype == np.uint8 and image.ndim in (2, 3) and image.flags.c_contiguous:
    # cv2.copyTo with a mask: about 40x faster than boolean indexing at 256x256x3.
    cv2.copyTo(np.full_like(image, fill), (~keep).view(np.uint8), image)
  else:
    image[~keep] = fill


@functools.lru_cache(maxsize=16)
def _disc(height, width, radius_fraction):
  """bool[height, width] (read-only, cached): the centred disc of radius
  radius_fraction * min(height, width) / 2."""
  radius = radius_fraction * min(height, width) / 2.0
  ys = np.arange(height) - (height - 1) / 2.0
  xs = np.arange(width) - (width - 1) / 2.0
  disc = ys[:, None] ** 2 + xs[None, :] ** 2 <= radius ** 2
  disc.flags.writeable = False
  return disc


def field_of_view(size=DEFAULT_SIZE, radius_fraction=DEFAULT_RADIUS_FRACTION):
  """The disc that :func:`mask_outside_retina` keeps.

  Args:
    size: side of the square image.
    radius_fraction: disc radius as a fraction of ``size / 2``.

  Returns:
    bool[size, size]: True inside the disc of radius ``radius_fraction * size / 2``
    centred at ``((size - 1) / 2, (size - 1) / 2)``.
  """
  return _disc(size, size, radius_fraction).copy()


def mask_outside_retina(image, *, radius_fraction=DEFAULT_RADIUS_FRACTION,
                        fill=DEFAULT_FILL):
  """Step 5: fills everything outside ``radius_fraction`` of the retina's radius.

  Args:
    image: HxW or HxWxC array with the retina centred and filling the square.
    radius_fraction: kept fraction of the retina's radius (``min(H, W) / 2``).
    fill: value outside the disc (128, the half-gray IG baseline).

  Returns:
    A copy of ``image`` with ``fill`` outside the disc.
  """
  image = np.asarray(image)
  out = image.copy()
  _fill_outside(out, _disc(image.shape[0], image.shape[1], radius_fraction), fill)
  return out


def _box_reduce(image, geometry, size, working_ratio):
  """Shrinks ``image`` by the largest integer factor keeping the retina >= ratio x size.

  An exact k x k box average (rows and columns that do not fill a box are dropped),
  so that geometry maps exactly, like libjpeg's DCT-scaled decoding in
  :func:`read_fundus`. Returns (image, geometry), unchanged where k < 2.
  """
  if not working_ratio:
    return image, geometry
  k = int(geometry.diameter // (working_ratio * size))
  if k < 2:
    return image, geometry
  height, width = (image.shape[0] // k) * k, (image.shape[1] // k) * k
  reduced = cv2.resize(image[:height, :width], (width // k, height // k),
                       interpolation=cv2.INTER_AREA)
  return reduced, geometry.scaled(1.0 / k)


def _preprocess_located(image, geometry, *, size, working_ratio, denoise_sigma,
                        local_average_sigma, radius_fraction, fill, mask_outside_image,
                        source):
  """Steps 2-5 on an RGB uint8 image whose retina is already located."""
  image, geometry = _box_reduce(image, geometry, size, working_ratio)
  sigma = denoise_sigma * geometry.diameter / size
  # Only the retina's square (and the blur's reach) is resampled: blur just that.
  margin = int(np.ceil(4 * sigma)) + 2
  half = geometry.radius
  left = max(int(np.floor(geometry.center_x - half)) - margin, 0)
  right = min(int(np.ceil(geometry.center_x + half)) + margin + 1, image.shape[1])
  top = max(int(np.floor(geometry.center_y - half)) - margin, 0)
  bottom = min(int(np.ceil(geometry.center_y + half)) + margin + 1, image.shape[0])
  window = image[top:bottom, left:right]
  window_geometry = dataclasses.replace(
      geometry, center_x=geometry.center_x - left, center_y=geometry.center_y - top)
  blurred = denoise(window, sigma=sigma)
  # The blur is the anti-aliasing filter, so warp exactly (sub-pixel) with bilinear
  # sampling; without it, fall back to the box filter (INTER_AREA).
  square = rescale_to_retina(
      blurred, window_geometry, size=size,
      interpolation=cv2.INTER_LINEAR if denoise_sigma > 0 else None,
      border_mode=cv2.BORDER_REPLICATE, source=source)
  out = subtract_local_average(square, sigma=local_average_sigma, size=size)
  keep = _disc(size, size, radius_fraction)
  if mask_outside_image:
    keep = keep & source_footprint(geometry, image.shape, size=size)
  _fill_outside(out, keep, fill)
  return out


def preprocess_fundus_with_geometry(
    image, size=DEFAULT_SIZE, *, threshold=DEFAULT_THRESHOLD,
    working_ratio=DEFAULT_WORKING_RATIO, denoise_sigma=DEFAULT_DENOISE_SIGMA,
    local_average_sigma=None, radius_fraction=DEFAULT_RADIUS_FRACTION, fill=DEFAULT_FILL,
    mask_outside_image=True, source="<array>"):
  """Like :func:`preprocess_fundus`, also returning the retina's geometry.

  Returns:
    (uint8[size, size, 3], RetinaGeometry in the input image's pixel units).
  """
  size = check_size(size)
  image = ensure_rgb_uint8(image, source=source)
  geometry = find_retina(image, threshold=threshold, source=source)
  out = _preprocess_located(
      image, geometry, size=size, working_ratio=working_ratio, denoise_sigma=denoise_sigma,
      local_average_sigma=local_average_sigma, radius_fraction=radius_fraction, fill=fill,
      mask_outside_image=mask_outside_image, source=source)
  return out, geometry


def preprocess_fundus(image, size=DEFAULT_SIZE, **options):
  """The poster's preprocessing: RGB fundus photograph -> network input.

  Deterministic. Pixels outside the kept disc (and outside the source image, where a
  camera cut the retina) are exactly ``fill``.

  Args:
    image: uint8 HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) array, any size.
    size: output side; the retina's diameter becomes ``size``.
    **options: keyword-only, all defaulting to the poster's / Graham's values:
      threshold (0.1): step 1's retina threshold (fraction of the row's mean);
      working_ratio (2.0): a retina wider than working_ratio x size pixels is first
        shrunk by an integer box average to no less than that (a large speed-up;
        step 2's blur makes the difference small, see docs/preprocessing.md); None
        processes at full resolution;
      denoise_sigma (0.5): step 2's blur, in output pixels (0 disables);
      local_average_sigma (None: size / 60): step 4's blur, in output pixels;
      radius_fraction (0.9): step 5's kept fraction of the radius;
      fill (128): value outside the kept disc;
      mask_outside_image (True): also fill output pixels that lie outside the source;
      source ("<array>"): name used in errors and warnings.

  Returns:
    uint8[size, size, 3].

  Raises:
    ValueError: ``size`` is not an integer in [1, MAX_SIZE].
    FundusImageError: bad dtype or shape, an all-black image, no retina found, or
      a retina cut at the side whose disc cannot be fitted.
  """
  return preprocess_fundus_with_geometry(image, size, **options)[0]


def _jpeg_dimensions(data):
  """(height, width) from a JPEG's start-of-frame header, or None if not found."""
  if data[:2] != b"\xff\xd8":
    return None
  pos = 2
  while pos + 4 <= len(data):
    if data[pos] != 0xFF:
      return None
    marker = data[pos + 1]
    if marker == 0xFF:  # Fill byte.
      pos += 1
      continue
    if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # Stand-alone markers.
      pos += 2
      continue
    if marker in (0xD9, 0xDA):  # End of image or start of scan: no frame header seen.
      return None
    length = int.from_bytes(data[pos + 2:pos + 4], "big")
    if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                  0xCF):
      if pos + 9 > len(data):
        return None
      height = int.from_bytes(data[pos + 5:pos + 7], "big")
      width = int.from_bytes(data[pos + 7:pos + 9], "big")
      return (height, width) if height and width else None
    pos += 2 + length
  return None


def _diagnose_undecodable(data):
  """Why OpenCV could not decode ``data``, in words."""
  if data[:2] == b"\xff\xd8":
    if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
      return "truncated JPEG (no end-of-image marker): cannot decode"
    return "corrupt JPEG data: cannot decode"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "corrupt or truncated PNG: cannot decode"
  if data[:4] in (b"II*\x00", b"MM\x00*"):
    return "corrupt or truncated TIFF: cannot decode"
  return "not a readable image (unknown format or corrupt data)"


def _read_bytes(path):
  source = os.fspath(path)
  if not os.path.exists(source):
    raise FundusImageError(source, "no such file")
  if os.path.isdir(source):
    raise FundusImageError(source, "is a directory, not an image file")
  try:
    with open(source, "rb") as f:
      data = f.read()
  except OSError as e:
    raise FundusImageError(source, f"cannot read file: {e}") from e
  if not data:
    raise FundusImageError(source, "empty file")
  return data


def _decode(data, reduction, source):
  try:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_FLAGS[reduction])
  except cv2.error as e:
    raise FundusImageError(source, f"cannot decode image: {e}") from e
  if image is None or image.size == 0:
    raise FundusImageError(source, _diagnose_undecodable(data))
  return ensure_rgb_uint8(image, source=source)


def _largest_reduction(retina_diameter, min_retina_diameter):
  for reduction in _JPEG_REDUCTIONS:
    if retina_diameter / reduction >= min_retina_diameter:
      return reduction
  return 1


def _read_and_locate(path, *, min_retina_diameter, threshold):
  """Decodes ``path`` (reduced where possible) and locates the retina.

  Returns:
    (RGB uint8 image, RetinaGeometry or the FundusImageError find_retina raised).
  """
  source = os.fspath(path)
  data = _read_bytes(path)
  reduction = 1
  dims = _jpeg_dimensions(data) if min_retina_diameter else None
  if dims is not None:
    # Guess the retina spans the shorter side (EyePACS: it spans the height or more).
    reduction = _largest_reduction(min(dims), min_retina_diameter)
  image = _decode(data, reduction, source)
  try:
    geometry = find_retina(image, threshold=threshold, source=source)
  except FundusImageError as e:
    return image, e
  if reduction > 1 and geometry.diameter < min_retina_diameter:
    # A retina smaller than the guess: decode again at a finer resolution.
    finer = _largest_reduction(geometry.diameter * reduction, min_retina_diameter)
    image = _decode(data, finer, source)
    try:
      geometry = find_retina(image, threshold=threshold, source=source)
    except FundusImageError as e:
      return image, e
  return image, geometry


def read_fundus(path, *, min_retina_diameter=None):
  """Reads a fundus photograph (JPEG, PNG, TIFF, ...) as RGB uint8.

  JPEGs are decoded at 1/8, 1/4 or 1/2 resolution (libjpeg's DCT scaling: about 3x
  less work than decoding everything at 1/4) when the retina keeps at least
  ``min_retina_diameter`` pixels: the factor is chosen from the header's size
  (assuming the retina spans the shorter side) and checked by locating the retina; a
  smaller retina is decoded again, finer. Other formats are decoded in full.

  Args:
    path: the image file.
    min_retina_diameter: smallest retina diameter in pixels the returned image must
      keep; None decodes at full resolution.

  Returns:
    uint8[H, W, 3] RGB.

  Raises:
    FundusImageError: missing, empty, unreadable, truncated or undecodable file.
  """
  return _read_and_locate(path, min_retina_diameter=min_retina_diameter,
                          threshold=DEFAULT_THRESHOLD)[0]


def preprocess_file(path, size=DEFAULT_SIZE, *, threshold=DEFAULT_THRESHOLD,
                    working_ratio=DEFAULT_WORKING_RATIO, denoise_sigma=DEFAULT_DENOISE_SIGMA,
                    local_average_sigma=None, radius_fraction=DEFAULT_RADIUS_FRACTION,
                    fill=DEFAULT_FILL, mask_outside_image=True):
  """:func:`preprocess_fundus` on an image file, decoding at reduced resolution.

  Args:
    path: JPEG, PNG or TIFF file.
    size: output side.
    threshold: as :func:`preprocess_fundus`.
    working_ratio: JPEGs are decoded at the coarsest of 1/8, 1/4, 1/2 resolution that
      keeps the retina at least ``working_ratio * size`` pixels wide (and larger
      images box-reduced to that, as in :func:`preprocess_fundus`); None decodes and
      processes at full resolution.
    denoise_sigma, local_average_sigma, radius_fraction, fill, mask_outside_image:
      as :func:`preprocess_fundus`.

  Returns:
    uint8[size, size, 3].

  Raises:
    ValueError: ``size`` is not an integer in [1, MAX_SIZE] (checked before the
      file is read).
    FundusImageError: naming ``path``: missing, unreadable, truncated or corrupt
      file, all-black image, no retina found.
  """
  size = check_size(size)
  image, geometry = _read_and_locate(
      path, min_retina_diameter=working_ratio * size if working_ratio else None,
      threshold=threshold)
  if isinstance(geometry, FundusImageError):
    raise geometry
  return _preprocess_located(
      image, geometry, size=size, working_ratio=working_ratio, denoise_sigma=denoise_sigma,
      local_average_sigma=local_average_sigma, radius_fraction=radius_fraction, fill=fill,
      mask_outside_image=mask_outside_image, source=os.fspath(path))
