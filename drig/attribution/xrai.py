"""XRAI (Kapishnikov et al., ICCV 2019): attribution ranked over image regions.

XRAI turns a pixel attribution into a region ranking. It over-segments the
image (Felzenszwalb's graph segmentation at several scales, with overlapping
segments), then greedily adds the segment whose not-yet-covered pixels have
the highest mean attribution, until the chosen area covers the image. Each
pixel's value is the mean attribution of the region it joined with, so the
map reads "the most important regions first" rather than pixel by pixel.

Conventions follow PAIR's ``saliency`` 0.2.1 (``XRAI``):

* attribution: integrated gradients with ``steps`` points ``linspace(0, 1,
  steps)`` each weighted 1/steps (saliency's rule), from two baselines, the
  image's minimum and its maximum everywhere, averaged; then the maximum over
  channels. Or any map the caller passes.
* segments: the image rescaled to [-1, 1] and resized to 224 x 224 (cubic),
  scikit-image's ``felzenszwalb`` at scales 50, 100, 150, 250, 500, 1200
  (sigma 0.8, min_size 150), labels resized back (nearest), each segment a
  mask dilated by a disk of radius 5.
* ranking "full": drop segments that would add fewer than ``min_pixel_diff``
  pixels, add the one with the highest mean attribution over its new pixels,
  repeat while the covered share is at most ``area_threshold``; pixels never
  covered get their own mean. "fast": one ranking by each segment's mean.

The segmentation and ranking run on the host in numpy (scikit-image); the
attribution runs on the device, batched over images and chunked like
`integrated_gradients`. Cost: 2 x steps gradients per image (none with
``attributions``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution.arguments import (AttributionArgumentError, as_batch, check_finite,
                                        check_positive_int)
from drig.attribution.integration import accumulation_dtype, check_scalar_fn, path_sum

FELZENSZWALB_SCALES = (50, 100, 150, 250, 500, 1200)
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_MIN_SIZE = 150
SEGMENTATION_SIZE = (224, 224)
DILATION_RADIUS = 5
ALGORITHMS = ("full", "fast")


class XraiResult(NamedTuple):
  """XRAI maps (a pytree of arrays).

  Attributes:
    saliency: float32 [N, H, W], each pixel's region's mean attribution.
    ranks: int32 [N, H, W], the region's rank (1 = added first / most
      important; the region of never-covered pixels ranks last).
    attributions: float32 [N, H, W], the pixel attribution that was ranked.
  """
  saliency: np.ndarray
  ranks: np.ndarray
  attributions: np.ndarray


def felzenszwalb_segments(image: np.ndarray) -> np.ndarray:
  """XRAI's overlapping segments of one image, as saliency 0.2.1 computes them.

  Args:
    image: [H, W, C] (any value range; rescaled to [-1, 1] first).

  Returns:
    bool [M, H, W], one dilated mask per segment of each scale.
  """
  # Imported here: scikit-image is large (about 1 s to import) and only XRAI's
  # segmentation needs it.
  from skimage import morphology, segmentation, transform  # pylint: disable=g-import-not-at-top
  image = np.asarray(image, np.float64)
  if image.ndim != 3:
    raise AttributionArgumentError(f"image must be [H, W, C], got shape {image.shape}")
  low, high = image.min(), image.max()
  scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
  scaled = scaled * 2.0 - 1.0
  resized = transform.resize(scaled, SEGMENTATION_SIZE, order=3, mode="constant",
                             preserve_range=True, anti_aliasing=True)
  footprint = morphology.disk(DILATION_RADIUS)
  masks = []
  for scale in FELZENSZWALB_SCALES:
    labels = segmentation.felzenszwalb(resized, scale=scale, sigma=FELZENSZWALB_SIGMA,
                                       min_size=FELZENSZWALB_MIN_SIZE)
    labels = transform.resize(labels, image.shape[:2], order=0, preserve_range=True,
                              mode="constant", anti_aliasing=False).astype(int)
    for label in range(labels.min(), labels.max() + 1):
      masks.append(morphology.dilation(labels == label, footprint=footprint))
  return np.stack(masks)


# Masks per float64 block in _region_gains: 64 masks of a 299 x 299 image are
# 46 MB, where all of them at once (several hundred) would be a few hundred MB.
_MASK_BLOCK = 64


def _region_gains(masks: np.ndarray, attribution: np.ndarray, free: np.ndarray):
  """Per mask (bool [M, P]): the count and mean attribution of its pixels in `free`."""
  counts, sums = np.empty(len(masks)), np.empty(len(masks))
  free_attribution = np.where(free, attribution, 0.0)
  for lo in range(0, len(masks), _MASK_BLOCK):
    block = masks[lo:lo + _MASK_BLOCK].astype(np.float64)
    counts[lo:lo + _MASK_BLOCK] = block @ free.astype(np.float64)
    sums[lo:lo + _MASK_BLOCK] = block @ free_attribution
  return counts, np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)


def rank_regions(attribution: np.ndarray, masks: np.ndarray, *, algorithm: str = "full",
                 area_threshold: float = 1.0,
                 min_pixel_diff: int = 50) -> tuple[np.ndarray, np.ndarray]:
  """XRAI's greedy region ranking of one image's attribution map.

  Args:
    attribution: [H, W] the pixel attribution.
    masks: bool [M, H, W] the candidate regions (e.g. `felzenszwalb_segments`).
    algorithm: "full" (re-rank after each added region) or "fast" (rank once).
    area_threshold: "full" stops once the covered share of the image exceeds it.
    min_pixel_diff: skip regions that would add fewer new pixels than this (>= 1).

  Returns:
    (saliency float64 [H, W], ranks int32 [H, W]), as saliency 0.2.1's XRAI.
  """
  if algorithm not in ALGORITHMS:
    raise AttributionArgumentError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  check_positive_int(min_pixel_diff, name="min_pixel_diff")
  attribution = np.asarray(attribution, np.float64)
  masks = np.asarray(masks, bool)
  if masks.ndim != 3 or masks.shape[1:] != attribution.shape:
    raise AttributionArgumentError(
        f"segments must be masks [M, {attribution.shape[0]}, {attribution.shape[1]}], "
        f"got shape {masks.shape}")
  shape = attribution.shape
  attribution = attribution.ravel()
  flat = masks.reshape(len(masks), -1)
  output = np.full(attribution.shape, -np.inf)
  covered = np.zeros(attribution.shape, bool)
  trace = []  # (new pixels, gain) in the order added
  if algorithm == "full":
    alive = np.ones(len(flat), bool)
    while covered.mean() <= area_threshold:
      counts, gains = _region_gains(flat, attribution, ~covered)
      alive &= counts >= min_pixel_diff
      if not alive.any():
        break
      best = int(np.argmax(np.where(alive, gains, -np.inf)))  # first of equals, as saliency
      new = flat[best] & ~covered
      trace.append((new, gains[best]))
      output[new] = gains[best]
      covered |= flat[best]
      alive[best] = False
  else:
    _, gains = _region_gains(flat, attribution, np.ones(attribution.shape, bool))
    for index in np.argsort(-gains, kind="stable"):
      new = flat[index] & ~covered
      if new.sum() < min_pixel_diff:
        continue
      gain = attribution[new].mean()
      trace.append((new, gain))
      output[new] = gain
      covered |= flat[index]
  uncovered = output == -np.inf
  if uncovered.any():
    output[uncovered] = attribution[uncovered].mean()
  ranks = np.zeros(attribution.shape, np.int32)
  ordered = [new for new, _ in sorted(trace, key=lambda item: -item[1])]
  for rank, new in enumerate(ordered + ([uncovered] if uncovered.any() else []), start=1):
    ranks[new] = rank
  return output.reshape(shape), ranks.reshape(shape)


def _input_gradient(f, points, deltas):
  del deltas
  acc = accumulation_dtype(points)
  return jax.grad(lambda p: jnp.sum(f(p).astype(acc)))(points)


@jax.jit
def _two_baseline_map(x, low_integral, high_integral):
  acc = low_integral.dtype
  x = x.astype(acc)
  axes = tuple(range(1, x.ndim))
  low = jnp.min(x, axis=axes, keepdims=True)
  high = jnp.max(x, axis=axes, keepdims=True)
  mean = 0.5 * ((x - low) * low_integral + (x - high) * high_integral)
  return jnp.max(mean, axis=-1)


def xrai_attributions(f: Callable, x, *, steps: int = 100,
                      chunk_size: int | None = None) -> jax.Array:
  """XRAI's default pixel attribution: IG from the min and max baselines, max over channels.

  Args:
    f: maps images [N, H, W, C] to [N].
    x: the images [N, H, W, C].
    steps: IG points per baseline, on linspace(0, 1, steps), each weighted 1/steps.
    chunk_size: path points per image per model call (None: the engine's default).

  Returns:
    float32 [N, H, W].
  """
  x = as_batch(x)
  if x.ndim != 4:
    raise AttributionArgumentError(f"x must be images [N, H, W, C], got shape {x.shape}")
  check_positive_int(steps)
  check_finite(x)
  check_scalar_fn(f, x)
  alphas, weights = np.linspace(0.0, 1.0, steps), np.full(steps, 1.0 / steps)
  axes = tuple(range(1, x.ndim))
  integrals = [path_sum(_input_gradient, f, jnp.broadcast_to(edge(x, axis=axes, keepdims=True),
                                                             x.shape), x, alphas, weights,
                        chunk_size=chunk_size)
               for edge in (jnp.min, jnp.max)]
  return _two_baseline_map(x, *integrals)


def xrai(f: Callable | None, x, *, attributions=None, segments=None, steps: int = 100,
         algorithm: str = "full", area_threshold: float = 1.0, min_pixel_diff: int = 50,
         chunk_size: int | None = None) -> XraiResult:
  """XRAI maps of a batch of images.

  Args:
    f: maps images [N, H, W, C] to [N], the quantity of interest (unused, may
      be None, when `attributions` is given).
    x: the images [N, H, W, C].
    attributions: optional maps to rank instead of XRAI's IG: [N, H, W], or
      [N, H, W, C] (reduced by the maximum over channels, as saliency does).
    segments: optional regions per image, a sequence of N bool arrays [M_n, H, W]
      (default `felzenszwalb_segments` of each image).
    steps: IG points per baseline when attributions is None.
    algorithm, area_threshold, min_pixel_diff: see `rank_regions`.
    chunk_size: path points per image per model call for the IG.

  Returns:
    An XraiResult of numpy arrays.

  Raises:
    AttributionArgumentError: bad shapes (x, attributions or segments), an
      unknown algorithm, steps or min_pixel_diff < 1, NaN or infinite values,
      or no f and no attributions.
  """
  if algorithm not in ALGORITHMS:
    raise AttributionArgumentError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  check_positive_int(min_pixel_diff, name="min_pixel_diff")
  x = as_batch(x)
  if x.ndim != 4 or x.shape[0] == 0:
    raise AttributionArgumentError(f"x must be a non-empty batch [N, H, W, C], got {x.shape}")
  if attributions is None:
    if f is None:
      raise AttributionArgumentError("xrai needs f (to compute IG) or attributions")
    attributions = xrai_attributions(f, x, steps=steps, chunk_size=chunk_size)
  attributions = np.asarray(attributions, np.float32)
  if attributions.shape == x.shape:
    attributions = attributions.max(axis=-1)
  if attributions.shape != x.shape[:3]:
    raise AttributionArgumentError(
        f"attributions must be [N, H, W] or x's shape {x.shape}, got {attributions.shape}")
  if not np.isfinite(attributions).all():
    raise AttributionArgumentError("attributions hold NaN or infinite values")
  if segments is not None and len(segments) != x.shape[0]:
    raise AttributionArgumentError(
        f"segments must hold one set of masks per image ({x.shape[0]}), got {len(segments)}")
  images = np.asarray(x)
  saliency, ranks = [], []
  for n in range(x.shape[0]):
    masks = felzenszwalb_segments(images[n]) if segments is None else segments[n]
    values, order = rank_regions(attributions[n], masks, algorithm=algorithm,
                                 area_threshold=area_threshold, min_pixel_diff=min_pixel_diff)
    saliency.append(values.astype(np.float32))
    ranks.append(order)
  return XraiResult(np.stack(saliency), np.stack(ranks), attributions)


__all__ = ["ALGORITHMS", "XraiResult", "felzenszwalb_segments", "rank_regions", "xrai",
           "xrai_attributions"]
