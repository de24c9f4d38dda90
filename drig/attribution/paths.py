"""Path attributions beyond the straight line: Blur IG and Guided IG.

Both integrate the gradient of a quantity ``f: x [N, ...] -> [N]`` along a path
that ends at the image, like integrated gradients, but choose the path
differently:

``blur_integrated_gradients`` (Xu et al., CVPR 2020): the path runs from a
heavily blurred copy of the image to the image, through Gaussian blurs of
decreasing width ``sigma``::

  BlurIG(x) = -sum_i dsigma_i * (d blur(x, s)/ds at sigma_i) * grad f(blur(x, sigma_i))

Conventions are those of PAIR's ``saliency`` 0.2.1 (``BlurIG``): sigma_i =
i max_sigma / steps (``sqrt=True``: the square root of that), i = 0..steps;
gradients at sigma_0..sigma_{steps-1}; d blur/d sigma by a forward difference
of ``grad_step``; the blur is ``scipy.ndimage.gaussian_filter`` over height and
width only, ``mode="constant"`` (zeros beyond the edge), kernel radius
``int(4 sigma + 0.5)``. drig applies the blur as two dense matrices (height,
width) on the device: exact zero padding, and cheap next to a model call.
The attributions sum to about f(x) - f(blur(x, sigma_steps)).

``guided_integrated_gradients`` (Kapishnikov et al., CVPR 2021): an adaptive
path from the baseline. At step s of ``steps`` the L1 distance to the image
shrinks to L1_total (1 - (s+1)/steps); the features with the smallest
|gradient| (the lowest ``fraction``) move towards the image first, and no
feature strays more than ``max_dist`` (as a fraction of the way) from the
straight path. One gradient per step, as in ``saliency`` 0.2.1's ``GuidedIG``;
``max_dist=0`` or ``fraction=1`` gives integrated gradients (right Riemann sum).

Both are batched over images (image-major model batches) and chunked: Blur IG
evaluates ``chunk_size`` blur levels per image per model call; Guided IG runs
its path for ``images_per_call`` images at a time (one path point per image
per call, since each point depends on the previous gradient).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution.arguments import (AttributionArgumentError, as_batch, check_baseline,
                                        check_finite, check_positive_int)
from drig.attribution.integration import (Operands, accumulation_dtype, check_scalar_fn,
                                          default_points_per_call)

# scipy.ndimage.gaussian_filter's default: the kernel reaches 4 sigma each side.
GAUSSIAN_TRUNCATE = 4.0


def _check_positive_float(value, name: str, *, allow_zero: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise AttributionArgumentError(f"{name} must be a number, got {value!r}")
  value = float(value)
  if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
    raise AttributionArgumentError(
        f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")
  return value


def _gradient(f, points):
  # Images are independent, so the gradient of the batch sum is each image's own.
  acc = accumulation_dtype(points)
  return jax.grad(lambda p: jnp.sum(f(p).astype(acc)))(points)


# ------------------------------------------------------------------------------
# Gaussian blur as dense matrices.


def gaussian_blur_matrix(length: int, sigma, radius, max_radius: int) -> jax.Array:
  """The [length, length] matrix of a 1-D Gaussian blur with zero padding.

  Row i holds the weights of pixels i - radius .. i + radius, as
  ``scipy.ndimage.gaussian_filter1d(mode="constant")``: the kernel is
  normalised over its full width, then pixels beyond the edge count as zero.

  Args:
    length: the number of pixels along the axis.
    sigma: the standard deviation in pixels (a scalar, may be traced); 0 gives
      the identity.
    radius: the kernel's half-width int(4 sigma + 0.5), computed on the host
      (a scalar int, may be traced).
    max_radius: a static bound on `radius`, for the normaliser's support.

  Returns:
    float32 [length, length].
  """
  safe_sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-12)
  taps = jnp.arange(-max_radius, max_radius + 1, dtype=jnp.float32)
  inside = jnp.abs(taps) <= radius
  normaliser = jnp.sum(jnp.where(inside, jnp.exp(-0.5 * (taps / safe_sigma) ** 2), 0.0))
  offsets = (jnp.arange(length)[None, :] - jnp.arange(length)[:, None]).astype(jnp.float32)
  weights = jnp.where(jnp.abs(offsets) <= radius,
                      jnp.exp(-0.5 * (offsets / safe_sigma) ** 2) / normaliser, 0.0)
  return jnp.where(sigma > 0, weights, jnp.eye(length, dtype=jnp.float32))


def _blur_radius(sigma: np.ndarray) -> np.ndarray:
  # As scipy: int(truncate * sd + 0.5), in float64 on the host.
  return np.floor(GAUSSIAN_TRUNCATE * np.asarray(sigma, np.float64) + 0.5).astype(np.int32)


def _blur(x, sigmas, radii, max_radius):
  """x [N, H, W, ...] blurred at each of K sigmas -> [N, K, H, W, ...] (height, width only)."""
  height, width = x.shape[1], x.shape[2]
  rows = jax.vmap(lambda s, r: gaussian_blur_matrix(height, s, r, max_radius))(sigmas, radii)
  cols = jax.vmap(lambda s, r: gaussian_blur_matrix(width, s, r, max_radius))(sigmas, radii)
  acc = accumulation_dtype(x)
  hi = jax.lax.Precision.HIGHEST  # no reduced-precision (TF32) matmuls on accelerators
  blurred = jnp.einsum("kab,nbw...->nkaw...", rows.astype(acc), x.astype(acc), precision=hi)
  return jnp.einsum("kcw,nkaw...->nkac...", cols.astype(acc), blurred, precision=hi)


def gaussian_blur(x, sigma: float) -> jax.Array:
  """Images [N, H, W, ...] blurred over height and width (scipy's gaussian_filter, mode constant).

  Args:
    x: a batch of images [N, H, W, ...].
    sigma: the standard deviation in pixels (>= 0; 0 returns x).

  Returns:
    [N, H, W, ...] in float32 (float64 for float64 x).
  """
  x = as_batch(x)
  sigma = _check_positive_float(sigma, "sigma", allow_zero=True)
  if x.ndim < 3:
    raise AttributionArgumentError(f"x must be images [N, H, W, ...], got shape {x.shape}")
  radius = _blur_radius(sigma)
  return _blur(x, jnp.asarray([sigma], jnp.float32), jnp.asarray([radius]), int(radius))[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(7,))
def _blur_chunk(max_radius, grad_step, operands, x, sigmas, radii, dsigmas, total):
  """Adds -sum_k dsigma_k (d blur/d sigma) grad f(blur(x, sigma_k)) over one chunk of sigmas."""
  f = operands.tree
  num_images, size = x.shape[0], sigmas.shape[0]
  acc = accumulation_dtype(x)
  both = _blur(x, jnp.concatenate([sigmas, sigmas + grad_step]),
               jnp.concatenate([radii[0], radii[1]]), max_radius)
  points, shifted = both[:, :size], both[:, size:]
  velocity = (shifted - points) / jnp.asarray(grad_step, acc)
  flat = (num_images * size,) + x.shape[1:]  # image-major: image n's levels are contiguous
  grads = _gradient(f, points.reshape(flat).astype(x.dtype)).astype(acc)
  grads = grads.reshape(points.shape)
  weights = dsigmas.astype(acc).reshape((1, size) + (1,) * (x.ndim - 1))
  return total - jnp.sum(weights * velocity * grads, axis=1)


@jax.jit
def _blur_gap(operands, x, fully_blurred, attributions):
  f = operands.tree
  acc = accumulation_dtype(x)
  change = f(x).astype(acc) - f(fully_blurred.astype(x.dtype)).astype(acc)
  return attributions.reshape(x.shape[0], -1).sum(axis=1) - change


def blur_sigmas(max_sigma: float, steps: int, sqrt: bool) -> np.ndarray:
  """The blur path's sigma_0..sigma_steps (float64), as saliency 0.2.1's BlurIG."""
  sigmas = np.arange(steps + 1, dtype=np.float64) * max_sigma / steps
  return np.sqrt(sigmas) if sqrt else sigmas


def blur_integrated_gradients(f: Callable, x, *, max_sigma: float = 50.0, steps: int = 100,
                              grad_step: float = 0.01, sqrt: bool = False,
                              chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Blur IG: integrated gradients along a path of decreasing Gaussian blur.

  Args:
    f: maps images [N, H, W, C] to [N], the quantity of interest (e.g.
      `drig.attribution.probability_of_grade(logits_fn, 4)`); images independent.
    x: the images, a floating batch [N, H, W, ...] (height and width are blurred,
      trailing axes are not).
    max_sigma: the widest blur in pixels (the path's start), > 0.
    steps: the number of blur levels (gradients) per image, >= 1.
    grad_step: the sigma increment of the forward difference d blur/d sigma, > 0.
    sqrt: space the sigmas as sqrt(i max_sigma / steps) (saliency's option).
    chunk_size: blur levels per image per model call (None: about
      `default_points_per_call()` images per call in all).

  Returns:
    (attributions, gap): float32 [N, H, W, ...], and float32 [N] the gap
    sum(attributions) - (f(x) - f(blur(x, sigma_steps))), sigma_steps the
    path's widest blur (max_sigma, or sqrt(max_sigma) with sqrt as saliency);
    it shrinks as `steps` grows.

  Raises:
    AttributionArgumentError: a non-positive max_sigma or grad_step, steps < 1,
      images without height and width, NaN or infinite values, or an f that
      does not map [N, ...] to [N].
  """
  x = as_batch(x)
  if x.ndim < 3:
    raise AttributionArgumentError(f"x must be images [N, H, W, ...], got shape {x.shape}")
  if x.shape[0] == 0:
    raise AttributionArgumentError(f"x is an empty batch (shape {x.shape})")
  max_sigma = _check_positive_float(max_sigma, "max_sigma")
  grad_step = _check_positive_float(grad_step, "grad_step")
  check_positive_int(steps)
  check_finite(x)
  check_scalar_fn(f, x)
  sigmas = blur_sigmas(max_sigma, steps, bool(sqrt))
  dsigmas = np.diff(sigmas)
  levels = sigmas[:-1]
  if chunk_size is None:
    chunk_size = max(1, default_points_per_call() // x.shape[0])
  check_positive_int(chunk_size, name="chunk_size")
  num_chunks = math.ceil(steps / chunk_size)
  size = math.ceil(steps / num_chunks)
  pad = num_chunks * size - steps
  # Padding levels repeat the last one with weight 0.
  levels = np.concatenate([levels, np.full(pad, levels[-1])])
  dsigmas = np.concatenate([dsigmas, np.zeros(pad)])
  radii = np.stack([_blur_radius(levels), _blur_radius(levels + grad_step)])
  max_radius = int(_blur_radius(max_sigma + grad_step))
  acc = accumulation_dtype(x)
  operands = Operands(f)
  total = jnp.zeros(x.shape, acc)
  for i in range(num_chunks):
    part = slice(i * size, (i + 1) * size)
    total = _blur_chunk(max_radius, grad_step, operands, x,
                        jnp.asarray(levels[part], acc), jnp.asarray(radii[:, part]),
                        jnp.asarray(dsigmas[part], acc), total)
  fully_blurred = _blur(x, jnp.asarray([sigmas[-1]], acc),
                        jnp.asarray([_blur_radius(sigmas[-1])]), max_radius)[:, 0]
  return total, _blur_gap(operands, x, fully_blurred, total)


# ------------------------------------------------------------------------------
# Guided IG.


def _guided_move(grad, x, target, start, alpha, l1_target, tolerance, *, max_dist, rank,
                 max_moves):
  """One step of Guided IG for one image (flat [D] arrays): the new point and its attribution.

  Follows saliency 0.2.1's guided_ig_impl: features that fell behind
  alpha - max_dist catch up; then, until the L1 distance to the image reaches
  l1_target, the features with the smallest |grad| (those not yet at
  alpha + max_dist) move towards alpha + max_dist, all the way or by the
  fraction gamma that closes the gap.
  """
  diff = target - start
  alpha_min = jnp.maximum(alpha - max_dist, 0.0)
  alpha_max = jnp.minimum(alpha + max_dist, 1.0)
  x_min = start + diff * alpha_min
  x_max = start + diff * alpha_max
  safe = jnp.where(diff != 0, diff, 1.0)

  def body(state):
    x, attr, _, moves = state
    x_old = x
    x_alpha = jnp.where(diff != 0, (x - start) / safe, alpha_max)
    x = jnp.where(x_alpha < alpha_min, x_min, x)
    l1_current = jnp.sum(jnp.abs(x - target))
    reached = jnp.abs(l1_current - l1_target) <= tolerance
    magnitude = jnp.where(x == x_max, jnp.inf, jnp.abs(grad))
    # np.quantile(..., method="lower"): the rank-th smallest value.
    threshold = jnp.sort(magnitude)[rank]
    selected = (magnitude <= threshold) & (magnitude != jnp.inf)
    l1_selected = jnp.sum(jnp.abs(x - x_max) * selected)
    gamma = jnp.where(l1_selected > 0,
                      (l1_current - l1_target) / jnp.where(l1_selected > 0, l1_selected, 1.0),
                      jnp.inf)
    moved = jnp.where(gamma > 1, x_max, x + (x_max - x) * gamma)
    x = jnp.where(selected & ~reached, moved, x)
    attr = attr + (x - x_old) * grad
    # Nothing left to move (l1_selected = 0) also ends the step.
    done = reached | (gamma <= 1) | (l1_selected == 0)
    return x, attr, done, moves + 1

  def cond(state):
    return ~state[2] & (state[3] < max_moves)

  x, attr, _, _ = jax.lax.while_loop(
      cond, body, (x, jnp.zeros_like(x), jnp.asarray(False), jnp.asarray(0)))
  return x, attr


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(7, 8))
def _guided_step(steps, max_dist, rank, max_moves, operands, target, start, x, attr,
                 l1_total, step):
  f = operands.tree
  acc = accumulation_dtype(target)
  grad = _gradient(f, x.astype(target.dtype)).astype(acc)
  alpha = (step + 1.0) / steps
  l1_target = l1_total * (1.0 - (step + 1.0) / steps)
  # float32 sums of |x - target| over an image are exact to about 1e-6 relative;
  # saliency's float64 test is 1e-9 absolute and relative.
  rel = 1e-9 if acc == jnp.float64 else 1e-6
  tolerance = jnp.maximum(rel * l1_total, 1e-9)
  flat = (x.shape[0], -1)
  move = jax.vmap(functools.partial(_guided_move, max_dist=max_dist, rank=rank,
                                    max_moves=max_moves),
                  in_axes=(0, 0, 0, 0, None, 0, 0))
  new_x, gained = move(grad.reshape(flat), x.reshape(flat), target.reshape(flat),
                       jnp.broadcast_to(start, target.shape).reshape(flat), alpha,
                       l1_target, tolerance)
  return new_x.reshape(x.shape), attr + gained.reshape(x.shape)


@jax.jit
def _guided_gap(operands, x, baseline, attributions):
  f = operands.tree
  acc = accumulation_dtype(x)
  change = (f(x).astype(acc)
            - f(jnp.broadcast_to(baseline, x.shape).astype(x.dtype)).astype(acc))
  return attributions.reshape(x.shape[0], -1).sum(axis=1) - change


def guided_integrated_gradients(f: Callable, x, baseline, *, steps: int = 200,
                                fraction: float = 0.25, max_dist: float = 0.02,
                                images_per_call: int | None = None
                                ) -> tuple[jax.Array, jax.Array]:
  """Guided IG (Kapishnikov et al. 2021): IG along an adaptive, gradient-guided path.

  Args:
    f: maps a batch [N, ...] to [N], the quantity of interest; images independent.
    x: the inputs, a floating batch [N, ...].
    baseline: broadcasts to x (e.g. `half_gray_baseline(x)`; saliency's default
      is 0).
    steps: path steps, one gradient each, >= 1.
    fraction: the share of features, in (0, 1], moved first at each step (those
      with the smallest |gradient|).
    max_dist: how far, in [0, 1] as a fraction of the path, a feature may lead
      or lag the straight path (0: integrated gradients; 1: unbounded).
    images_per_call: images whose paths run together (the model sees this many
      per call); None: `default_points_per_call()`.

  Returns:
    (attributions, gap): float32 [N, ...] (float64 for float64 inputs), and [N]
    the gap sum(attributions) - (f(x) - f(baseline)).

  Raises:
    AttributionArgumentError: steps < 1, fraction outside (0, 1], max_dist
      outside [0, 1], a baseline that does not broadcast to x, NaN or infinite
      values, or an f that does not map [N, ...] to [N].
  """
  x = as_batch(x)
  baseline = check_baseline(baseline, x)
  check_positive_int(steps)
  fraction = _check_positive_float(fraction, "fraction")
  if fraction > 1:
    raise AttributionArgumentError(f"fraction must be in (0, 1], got {fraction}")
  max_dist = _check_positive_float(max_dist, "max_dist", allow_zero=True)
  if max_dist > 1:
    raise AttributionArgumentError(f"max_dist must be in [0, 1], got {max_dist}")
  check_scalar_fn(f, x)
  if images_per_call is None:
    images_per_call = default_points_per_call()
  check_positive_int(images_per_call, name="images_per_call")
  features = math.prod(x.shape[1:])
  rank = int(math.floor(fraction * (features - 1)))
  # A move that does not finish the step takes at least rank + 1 free features
  # to x_max (or all that are left), so a step ends within this many moves.
  max_moves = math.ceil(features / (rank + 1)) + 4
  acc = accumulation_dtype(x, baseline)
  operands = Operands(f)
  parts = []
  for lo in range(0, x.shape[0], images_per_call):
    target = x[lo:lo + images_per_call].astype(acc)
    start = baseline if baseline.ndim == 0 or baseline.shape[0] == 1 else (
        baseline[lo:lo + images_per_call])
    start = jnp.broadcast_to(start, target.shape).astype(acc)
    l1_total = jnp.abs(target - start).reshape(target.shape[0], -1).sum(axis=1)
    point, attr = jnp.array(start, copy=True), jnp.zeros_like(target)  # both donated
    for step in range(steps):
      point, attr = _guided_step(steps, max_dist, rank, max_moves, operands, target, start,
                                 point, attr, l1_total, jnp.asarray(step, acc))
    parts.append(attr)
  attributions = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
  return attributions, _guided_gap(operands, x, baseline, attributions)


__all__ = ["blur_integrated_gradients", "blur_sigmas", "gaussian_blur",
           "gaussian_blur_matrix", "guided_integrated_gradients"]
