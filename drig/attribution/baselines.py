"""Named baselines for path attributions: what "absence of signal" means.

``resolve_baseline(baseline, x, key=..., space=...)`` turns an array or a name
into the array an attribution integrates from:

==================  ============================================================
name                baseline
==================  ============================================================
``half_gray``       the poster's: a uniformly half-gray image (128 of 255)
``black``           a black image (0 of 255: -1 in the model's space)
``blurred``         each image blurred by a Gaussian of ``sigma`` pixels
                    (``"blurred"``: DEFAULT_BLUR_SIGMA; ``"blurred:4"`` or
                    ``Blurred(4.0)`` for another sigma)
``uniform_noise``   i.i.d. uniform noise over the space's value range, one image
                    per input image, drawn from ``key`` (required)
==================  ============================================================

A ``BaselineDistribution(images [K, ...])`` is a set of K baselines for
expected gradients (``drig.attribution.gradients``): ``resolve_baseline``
checks its shape against the inputs and returns the [K, ...] array.

Spaces follow ``half_gray_baseline``: "model" ([-1, 1], drig's models),
"pixel" ([0, 255]) or "unit" ([0, 1]).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution.arguments import AttributionArgumentError
from drig.attribution.arguments import check_finite
from drig.attribution.integration import half_gray_baseline

BASELINE_NAMES = ("half_gray", "black", "blurred", "uniform_noise")
# Value range (black, white) of each input space.
SPACE_RANGES = {"model": (-1.0, 1.0), "pixel": (0.0, 255.0), "unit": (0.0, 1.0)}
# Gaussian sigma in pixels of "blurred" without one: at the 128-256 px of drig's
# images it removes lesions a few pixels wide but keeps the disc's shape.
DEFAULT_BLUR_SIGMA = 10.0
# Kernel radius in sigmas, as scipy.ndimage.gaussian_filter's default truncate.
BLUR_TRUNCATE = 4.0


@dataclasses.dataclass(frozen=True)
class Blurred:
  """The "blurred" baseline with a given Gaussian sigma in pixels (> 0)."""
  sigma: float = DEFAULT_BLUR_SIGMA


@dataclasses.dataclass(frozen=True)
class BaselineDistribution:
  """K baselines [K, ...x.shape[1:]] to average over (expected gradients)."""
  images: object


def _check_space(space: str) -> tuple[float, float]:
  if space not in SPACE_RANGES:
    raise AttributionArgumentError(
        f"space must be one of {tuple(SPACE_RANGES)}, got {space!r}")
  return SPACE_RANGES[space]


def parse_baseline_name(name: str):
  """A baseline name as ("half_gray" | "black" | "uniform_noise") or a Blurred spec.

  Args:
    name: one of BASELINE_NAMES, or "blurred:SIGMA" (SIGMA in pixels, > 0).

  Raises:
    AttributionArgumentError: an unknown name (listing the names) or a bad sigma.
  """
  if name.startswith("blurred:"):
    text = name.split(":", 1)[1]
    try:
      sigma = float(text)
    except ValueError:
      sigma = math.nan
    if not math.isfinite(sigma) or sigma <= 0:
      raise AttributionArgumentError(
          f"baseline {name!r}: the blur sigma must be a number of pixels > 0, got {text!r}")
    return Blurred(sigma)
  if name == "blurred":
    return Blurred()
  if name not in BASELINE_NAMES:
    raise AttributionArgumentError(
        f"unknown baseline {name!r}; use an array or one of {BASELINE_NAMES} "
        "(\"blurred:SIGMA\" for a blur of SIGMA pixels)")
  return name


def _gaussian_kernel(sigma: float) -> np.ndarray:
  radius = max(1, int(BLUR_TRUNCATE * sigma + 0.5))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  return (taps / taps.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnums=1)
def _blur(x, sigma):
  kernel = jnp.asarray(_gaussian_kernel(sigma), jnp.result_type(jnp.float32, x.dtype))
  radius = (kernel.shape[0] - 1) // 2
  channels = x.shape[-1]
  acc = kernel.dtype
  out = x.astype(acc)
  # Separable: one depthwise 1-D convolution along H, one along W. Edge padding
  # keeps a constant image constant (zero padding would darken the borders).
  for axis, shape in ((1, (-1, 1)), (2, (1, -1))):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(out, pad, mode="edge")
    weights = jnp.tile(kernel.reshape(shape + (1, 1)), (1, 1, 1, channels))
    out = jax.lax.conv_general_dilated(
        padded, weights, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)
  return out.astype(x.dtype)


def gaussian_blur(x, sigma: float) -> jax.Array:
  """Images [N, H, W, C] blurred by a Gaussian of ``sigma`` pixels (edges replicated).

  Args:
    x: a floating batch [N, H, W, C].
    sigma: the standard deviation in pixels (> 0); the kernel reaches
      BLUR_TRUNCATE sigmas.

  Returns:
    [N, H, W, C] of x's dtype.

  Raises:
    AttributionArgumentError: x is not [N, H, W, C] or sigma is not > 0.
  """
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise AttributionArgumentError(
        f"the blurred baseline needs images [N, H, W, C], got shape {x.shape}")
  if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
    raise AttributionArgumentError(f"blur sigma must be a number of pixels > 0, got {sigma!r}")
  return _blur(x, float(sigma))


def check_distribution(images, x, name: str = "baseline distribution") -> jax.Array:
  """K baselines [K, ...x.shape[1:]] as x's dtype.

  Raises:
    AttributionArgumentError: naming ``name``, for another shape, no baseline,
      or (concrete arrays) NaN or infinite values.
  """
  images = jnp.asarray(images, x.dtype)
  if images.ndim != x.ndim or images.shape[1:] != x.shape[1:] or images.shape[0] < 1:
    raise AttributionArgumentError(
        f"{name} must be [K, {', '.join(map(str, x.shape[1:]))}] (K >= 1 baselines shaped "
        f"like one input image), got shape {images.shape}")
  check_finite(images, name)
  return images


def resolve_baseline(baseline, x, *, key=None, space: str = "model") -> jax.Array:
  """The baseline array that ``baseline`` names for the inputs ``x``.

  Args:
    baseline: an array broadcastable to x (returned as x's dtype), a name (see
      the module docstring: "half_gray", "black", "blurred", "blurred:SIGMA",
      "uniform_noise"), a ``Blurred`` spec, or a ``BaselineDistribution``.
    x: the inputs [N, ...] (images [N, H, W, C] for "blurred").
    key: a jax random key; required by "uniform_noise".
    space: the inputs' value range: "model" ([-1, 1]), "pixel" or "unit".

  Returns:
    [1, ...] for half_gray and black, [N, ...] for blurred and uniform_noise,
    [K, ...] for a distribution, the array itself otherwise; x's dtype.

  Raises:
    AttributionArgumentError: an unknown name (listing the names), a random
      baseline without ``key``, a distribution of the wrong shape, an unknown
      space, or an array that does not broadcast to x.
  """
  low, high = _check_space(space)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise AttributionArgumentError(f"x must be floating point, got {x.dtype}")
  if isinstance(baseline, BaselineDistribution):
    return check_distribution(baseline.images, x)
  if isinstance(baseline, str):
    baseline = parse_baseline_name(baseline)
  if isinstance(baseline, Blurred):
    return gaussian_blur(x, baseline.sigma)
  if isinstance(baseline, str):
    if baseline == "half_gray":
      return half_gray_baseline(x, space)
    if baseline == "black":
      return jnp.full((1,) + x.shape[1:], low, x.dtype)
    if key is None:  # uniform_noise
      raise AttributionArgumentError(
          "baseline 'uniform_noise' is random: pass key= (a jax random key) to draw it")
    return jax.random.uniform(key, x.shape, x.dtype, low, high)
  array = jnp.asarray(baseline, x.dtype)
  try:
    shape = np.broadcast_shapes(array.shape, x.shape)
  except ValueError:
    shape = None
  if shape != x.shape:
    raise AttributionArgumentError(
        f"baseline of shape {array.shape} does not broadcast to the inputs' shape {x.shape}; "
        "for a distribution of baselines use BaselineDistribution([K, ...])")
  return array
