"""Map-accuracy control: a nested trapezoid grid, doubled per image until the map settles.

One concept: integration to a stated error of the whole map (``control="map"``).

The completeness gap that drig.attribution.adaptive controls is the sum of a
map's pixel errors, and pixel errors of opposite sign cancel in it: on the demo's
grader, maps whose gap met 1% were 1.2% (median) to 6% (worst image) from the
integral. Here each image's map itself is controlled. Its trapezoid rule on a
uniform grid of m intervals, T_m, is refined by adding the m midpoints (nested:
no point is evaluated twice), and

  estimate(T_2m) = ||A_2m - A_m||_2 / max(||A_2m||_2, floor),   A = (x - x') * T

is the relative L2 change of the map (per read-out; the worst read-out counts).
An image stops when the estimate and its relative completeness gap are both
within ``tolerance`` (the gap with adaptive's absolute floor, the estimate with
the same floor in place of ||A_2m|| where the map is tiny), or when the next
level would exceed ``max_steps`` (then it is reported as not converged).

Why uniform doubling rather than points placed where the scalar integrand
changes: every pixel's integrand has its own kinks (each ReLU along the path
switches at its own a), so no few places hold the map's error, and a scalar
error per interval does not find them. On the demo's grader a map's error
halved with each doubling, and the successive differences were nearly
uncorrelated (cosine -0.16 to 0.29): the errors of A_m and A_2m are of about
independent sign, so ||A_2m - A_m|| is about sqrt(5) times the error of A_2m
(measured: 1.3 to 2.0 times, 64 to 1024 intervals, 8 images;
benchmarks/bench_attribution.py --parts=doubling), and Richardson extrapolation
(2 A_2m - A_m), which assumes errors of one sign, doubles the error instead of
removing it. The estimate is a heuristic, as every estimate from the evaluated
points is: a feature narrower than the grid's spacing at two successive levels
(a kink in a sliver of the path) can hide from it; the first estimate compares
INITIAL_INTERVALS with twice as many intervals.

Memory and compute: per image, two sums of the size of the map for each
read-out (the running trapezoid sum and the level being added), not a gradient
per node. Points of all unconverged images are batched image-major in calls of
``points_per_call``; a converged image adds no points.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution import adaptive
from drig.attribution import point_calls

# The first estimate compares 16 with 32 intervals (33 evaluations): coarser grids
# can agree by chance while both miss a narrow feature.
INITIAL_INTERVALS = 16


@functools.partial(jax.jit, donate_argnums=(0,))
def _add_level(sums, level, intervals, active, delta):
  """Adds each active image's new midpoints; returns (sums, change norms, map norms) [N, R].

  sums: sum_k w_k g(a_k) over the current nodes with unit spacing (ends halved),
  so T_m = sums / m. The midpoints' sum `level` gives T_2m = (sums + level) / 2m,
  and A_2m - A_m = delta * (level - sums) / 2m.
  """
  scale = 1 / (2 * intervals.astype(sums.dtype))
  scale = point_calls.expand(scale, sums.ndim)
  maps = delta[:, None].astype(sums.dtype)
  axes = tuple(range(2, sums.ndim))
  change = jnp.sqrt(jnp.sum(jnp.square(maps * (level - sums) * scale), axis=axes))
  new = jnp.where(point_calls.expand(active, sums.ndim), sums + level, sums)
  norm = jnp.sqrt(jnp.sum(jnp.square(maps * new * scale), axis=axes))
  return new, change, norm


@jax.jit
def _integral(sums, intervals):
  return sums / point_calls.expand(intervals.astype(sums.dtype), sums.ndim)


def doubling_path_integral(evaluate: Callable, operands: Any, start, end, *,
                           num_readouts: int, tolerance: float, max_steps: int,
                           points_per_call: int, groups: int,
                           initial_intervals: int = INITIAL_INTERVALS
                           ) -> adaptive.AdaptiveIntegral:
  """Integrates grad F_r along start -> end per image until each map is within tolerance.

  Arguments and result as `adaptive.adaptive_path_integral` (the callers check
  them), with ``map_error`` the final estimate per image (worst read-out; NaN
  where max_steps allowed no second level). steps is 2^k * initial_intervals + 1
  per image.
  """
  n = end.shape[0]
  acc = point_calls.accumulation_dtype(end)
  start = adaptive.broadcast_start(start, end)
  delta = end.astype(acc) - jnp.broadcast_to(start, end.shape).astype(acc)
  first = max(1, min(initial_intervals, max_steps - 1))
  intervals = np.zeros(n, np.int64)
  active = np.ones(n, bool)
  converged = np.zeros(n, bool)
  estimate = np.full((n, num_readouts), np.nan)
  f_start, f_end = np.zeros((n, num_readouts)), np.zeros((n, num_readouts))
  slope_sums = np.zeros((n, num_readouts))
  sums = None
  while active.any():
    if sums is None:
      points = [(i, k / first) for i in range(n) for k in range(first + 1)]
    else:
      points = [(i, (2 * k + 1) / (2 * intervals[i]))
                for i in np.flatnonzero(active) for k in range(intervals[i])]
    level = jnp.zeros((n, num_readouts) + end.shape[1:], acc)
    for call in point_calls.evaluate_points(evaluate, operands, start, end, points,
                                            points_per_call=points_per_call, groups=groups):
      # Trapezoid weights with unit spacing: the ends halved, padding rows 0.
      weights = np.where((call.alphas == 0) | (call.alphas == 1), 0.5, 1.0)
      weights[call.count:] = 0.0
      np.add.at(slope_sums, call.rows, weights[:, None] * call.slopes)
      f_start[call.rows[call.alphas == 0]] = call.values[call.alphas == 0]
      f_end[call.rows[call.alphas == 1]] = call.values[call.alphas == 1]
      level = point_calls.accumulate(call.grads, jnp.asarray(call.rows),
                                     jnp.asarray(weights, acc), level)
    if sums is None:
      sums, intervals[:] = level, first
    else:
      sums, change_norm, map_norm = _add_level(sums, level, jnp.asarray(intervals),
                                               jnp.asarray(active), delta)
      intervals[active] *= 2
      floor = adaptive.GAP_FLOOR * np.maximum(1.0, np.maximum(np.abs(f_start), np.abs(f_end)))
      estimate[active] = (np.asarray(change_norm, np.float64)
                          / np.maximum(np.asarray(map_norm, np.float64), floor))[active]
      change = f_end - f_start
      gap = slope_sums / intervals[:, None] - change
      met = np.all(estimate <= tolerance, axis=1) & np.all(
          np.abs(gap) <= tolerance * np.maximum(np.abs(change), floor), axis=1)
      converged |= active & met
      active &= ~met
    active &= 2 * intervals + 1 <= max_steps
  integral = _integral(sums, jnp.asarray(intervals))
  steps = (intervals + 1).astype(np.int32)
  map_error = np.max(estimate, axis=1)
  return adaptive.AdaptiveIntegral(integral, jnp.asarray(f_end - f_start, acc), steps,
                                   converged, map_error)
