"""Map-accuracy control: each image's path bisected where its map's estimated error is largest.

One concept: integration to a stated error of the whole map (``control="map"``).

The completeness gap that drig.attribution.adaptive controls is the sum of a
map's pixel errors, and pixel errors of opposite sign cancel in it: on the demo's
grader, maps whose gap met 1% were 1.2% (median) to 6% (worst image) from the
integral. Here each image's map A = (e - s) * integral of grad F itself is
controlled, with the trapezoid rule on nodes that are placed where the map still
changes.

Local estimates. Bisecting an interval [a, b] at its middle m changes the map
by the difference of the trapezoid rule on [a, b] and on its two halves,

  d = (b - a) / 4 * (e - s) * (g(a) + g(b) - 2 g(m)),

which costs no evaluation beyond g(m). Each half is given the estimate
CHILD_SHARE * ||d|| of its own error. The map's estimated relative error is
the root sum of squares over the current intervals,

  estimate = sqrt(sum_j est_j^2) / max(||A||, floor),

per read-out (the worst counts): the intervals' errors are taken as
independent in sign, which is what was measured on the demo's grader, where
the differences of successive uniform refinements were nearly uncorrelated
(cosine -0.16 to 0.29). Why CHILD_SHARE = 1/2: if the integrand wanders
like a random walk inside an interval (a ReLU network's gradient along the
path switches at many kinks, each pixel at its own), a half's error has
sqrt(1/6) = 0.41 times the spread of d; with one kink in the interval, the
half holding it has an error spread evenly up to ||d|| (root mean square
0.58 ||d||) and the other none, again 0.41 ||d|| per half; a smooth
integrand leaves a half 1/6 of ||d||. So 1/2 overestimates by about 1.2x
where the error is rough and more where it is smooth. On the demo's grader the
estimate was 1.01 to 1.45 times the map's true error, 8 images at tolerances
0.04 to 0.005 (benchmarks/bench_attribution.py --parts=map_estimate; the table
is in docs/attribution.md). It is a heuristic, as every estimate from
evaluated points is: a feature narrower than the spacing of two successive
levels can hide from it.

Refinement. Each round, every unconverged image bisects its intervals, the
largest estimate first, until the sum of squared estimates would be under the
allowance (each bisection counted as leaving a quarter of its interval's
square, as under the random-walk model) or the estimates left are below the
level at which the final intervals would share the error equally (`_plan`),
at least one. The points cluster
where the map still changes: on the grader, 8 maps within 1% took 3,040
evaluations, where the uniform grid that puts all 8 within 1% needs 16,392
(docs/attribution.md). The round's
points are batched image-major in calls of ``points_per_call`` points, and the
last call's spare rows bisect the next largest intervals instead of repeating
a point. The integration starts from INITIAL_INTERVALS uniform intervals, all
bisected once so that every interval has an estimate (33 evaluations); every
evaluated point stays a node, so no point is evaluated twice.

Stopping rule (per image): converged when every read-out's estimate and its
relative completeness gap (drig.attribution.adaptive's, with its absolute
floor) are within ``tolerance``; the estimate's floor replaces ||A|| where the
map is tiny. An image that would pass ``max_steps`` stops, reported as not
converged; one whose max_steps allows no first estimate reports NaN.

Memory: as drig.attribution.adaptive, the gradient at every node is kept until
the end, float32, on the device the images live on: N x nodes x R x (size of
one input) in all.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution import adaptive
from drig.attribution import point_calls

# 16 uniform intervals, each bisected once, give the first estimate (33
# evaluations): coarser grids can agree by chance while both miss a narrow feature.
INITIAL_INTERVALS = 16
# Each half of a bisected interval is estimated to keep this fraction of ||d||
# (module docstring).
CHILD_SHARE = 0.5
# A bisection is planned as leaving this fraction of its interval's squared
# estimate (two halves at CHILD_SHARE / sqrt(2) each under the random-walk model).
_KEPT_SQUARE = 0.25


def _bucket(size: int) -> int:
  # Array lengths padded to powers of two: a handful of compiled shapes per run.
  return 1 << max(0, size - 1).bit_length()


@functools.partial(jax.jit, donate_argnums=(0,))
def _store(buffer, grads, offset):
  return jax.lax.dynamic_update_slice_in_dim(buffer, grads.astype(buffer.dtype), offset, 0)


def _norms(maps):
  return jnp.sqrt(jnp.sum(jnp.square(maps), axis=tuple(range(2, maps.ndim))))


@functools.partial(jax.jit, donate_argnums=(1,))
def _bisect(buffer, integral, delta, images, slots, widths):
  """Bisections applied to the running integrals [N, R, ...].

  slots [K, 3] are each bisection's (a, m, b) nodes; padding rows have width 0.
  Returns (integral, ||d|| [K, R], ||map|| [N, R]).
  """
  g = buffer[slots]  # [K, 3, R, ...]
  # The trapezoid rule on [a, b] minus the rule on its halves.
  step = point_calls.expand(widths / 4, g.ndim - 1) * (g[:, 0] + g[:, 2] - 2 * g[:, 1])
  integral = integral.at[images].add(-step)
  return integral, _norms(delta[images][:, None] * step), _norms(delta[:, None] * integral)


@functools.partial(jax.jit, static_argnums=(3,))
def _trapezoid(buffer, images, weights, num_images, delta):
  """(integral [N, R, ...], ||map|| [N, R]) of trapezoid weights over the buffer's slots."""
  integral = jnp.zeros((num_images,) + buffer.shape[1:], buffer.dtype)
  integral = integral.at[images].add(point_calls.expand(weights, buffer.ndim) * buffer)
  return integral, _norms(delta[:, None] * integral)


class _Path:
  """One image's nodes (position -> (slot, F [R], h [R])) and intervals ((a, b) -> estimate)."""

  def __init__(self):
    self.nodes: dict[float, tuple[int, np.ndarray, np.ndarray]] = {}
    self.estimates: dict[tuple[float, float], np.ndarray | None] = {}

  def weights(self):
    """(slots, trapezoid weights, slopes [K, R]) in path order."""
    alphas = np.array(sorted(self.nodes))
    w = adaptive.trapezoid_weights(alphas)
    slots = np.array([self.nodes[a][0] for a in alphas])
    slopes = np.stack([self.nodes[a][2] for a in alphas])
    return slots, w, slopes


def _middle(a: float, b: float) -> float | None:
  m = float(np.float32((a + b) / 2))
  return m if b - a > adaptive.SHORTEST_INTERVAL and a < m < b else None


def _plan(path: _Path, allowed: np.ndarray, budget: int):
  """(intervals to bisect, further candidates as (priority, interval)) for one image.

  Largest estimate first, until the planned sum of squared shares is within the
  allowance (1), or the share is below the equidistribution level 1 / (J
  sqrt(S)): J intervals whose squared shares sum to S are, at best, J sqrt(S)
  intervals of equal share once within the allowance (the squared error of an
  interval shrinking as its width cubed), so an interval already below that
  level is not bisected this round. Without that level a round far from the
  tolerance would bisect nearly every interval, as uniform doubling does, and
  spend points where the map no longer changes.
  """
  keys = [k for k in path.estimates if _middle(*k) is not None]
  if not keys or budget <= 0:
    return [], []
  shares = np.square(np.array([np.max(path.estimates[k] / allowed) for k in keys]))
  total = sum(float(np.max(e / allowed)) ** 2 for e in path.estimates.values())
  level = 1.0 / (len(path.estimates) * np.sqrt(max(total, 1.0)))
  remaining, chosen, spare = total, [], []
  for j in np.argsort(-shares, kind="stable"):
    wanted = not chosen or (remaining > 1.0 and shares[j] > level)
    if wanted and len(chosen) < budget:
      chosen.append(keys[j])
      remaining -= (1 - _KEPT_SQUARE) * shares[j]
    elif len(chosen) + len(spare) < budget and shares[j] > 0:
      spare.append((shares[j], keys[j]))
  return chosen, spare


def _trapezoid_of(paths, buffer, delta):
  """Every image's trapezoid integral over its nodes, and its map's norm."""
  images = np.zeros(buffer.shape[0], np.int32)
  weights = np.zeros(buffer.shape[0])
  for i, path in enumerate(paths):
    slots, w, _ = path.weights()
    images[slots], weights[slots] = i, w
  return _trapezoid(buffer, jnp.asarray(images), jnp.asarray(weights, buffer.dtype),
                    len(paths), delta)


def map_path_integral(evaluate: Callable, operands: Any, start, end, *,
                      num_readouts: int, tolerance: float, max_steps: int,
                      points_per_call: int, groups: int,
                      initial_intervals: int = INITIAL_INTERVALS) -> adaptive.AdaptiveIntegral:
  """Integrates grad F_r along start -> end per image until each map is within tolerance.

  Arguments and result as `adaptive.adaptive_path_integral` (the callers check
  them), with ``map_error`` the final estimate per image (worst read-out; NaN
  where max_steps allowed no first estimate).
  """
  n = end.shape[0]
  acc = point_calls.accumulation_dtype(end)
  start = adaptive.broadcast_start(start, end)
  delta = end.astype(acc) - jnp.broadcast_to(start, end.shape).astype(acc)
  first = max(1, min(initial_intervals, max_steps - 1))
  paths = [_Path() for _ in range(n)]
  converged = np.zeros(n, bool)
  estimate = np.full((n, num_readouts), np.nan)
  buffer = jnp.zeros((_bucket(n * (2 * first + 1)), num_readouts) + end.shape[1:], acc)
  used = 0
  integral = None  # the running trapezoid integrals [N, R, ...]
  grid = [k / first for k in range(first + 1)]
  pending = [(i, a) for i in range(n) for a in grid]
  for path in paths:
    path.estimates = {(a, b): None for a, b in zip(grid[:-1], grid[1:])}
  while pending:
    pending.sort()
    for call in point_calls.evaluate_points(evaluate, operands, start, end, pending,
                                            points_per_call=points_per_call, groups=groups):
      if used + points_per_call > buffer.shape[0]:
        grown = _bucket(2 * buffer.shape[0])
        buffer = jnp.concatenate(
            [buffer, jnp.zeros((grown - buffer.shape[0],) + buffer.shape[1:], acc)])
      buffer = _store(buffer, call.grads, used)
      for row in range(call.count):
        paths[call.rows[row]].nodes[float(call.alphas[row])] = (
            used + row, call.values[row], call.slopes[row])
      used += points_per_call
    if integral is None:
      integral, map_norm = _trapezoid_of(paths, buffer, delta)
    else:
      # The intervals just bisected: the ones whose middle is now a node.
      bisected = [(i, a, b, m) for i, path in enumerate(paths)
                  for (a, b) in list(path.estimates)
                  if (m := _middle(a, b)) is not None and m in path.nodes]
      size = _bucket(len(bisected))
      images = np.zeros(size, np.int32)
      slots = np.zeros((size, 3), np.int32)
      widths = np.zeros(size)
      for j, (i, a, b, m) in enumerate(bisected):
        images[j], widths[j] = i, b - a
        slots[j] = [paths[i].nodes[p][0] for p in (a, m, b)]
      integral, changes, map_norm = _bisect(buffer, integral, delta, jnp.asarray(images),
                                            jnp.asarray(slots), jnp.asarray(widths, acc))
      for (i, a, b, m), change in zip(bisected, np.asarray(changes, np.float64)):
        estimates = paths[i].estimates
        del estimates[(a, b)]
        estimates[(a, m)] = estimates[(m, b)] = CHILD_SHARE * change
    map_norm = np.asarray(map_norm, np.float64)
    pending, spare = [], []
    for i, path in enumerate(paths):
      if converged[i]:
        continue
      f_start, f_end = path.nodes[0.0][1], path.nodes[1.0][1]
      floor = adaptive.gap_floor(f_start, f_end)
      budget = max_steps - len(path.nodes)
      if any(e is None for e in path.estimates.values()):
        # The first bisection of every initial interval, or none if it does not fit.
        wanted = [k for k in path.estimates if _middle(*k) is not None]
        if len(wanted) <= budget:
          pending += [(i, _middle(*k)) for k in wanted]
        continue
      squares = np.sum(np.square(np.stack(list(path.estimates.values()))), axis=0)
      allowed = tolerance * np.maximum(map_norm[i], floor)
      estimate[i] = np.sqrt(squares) / np.maximum(map_norm[i], floor)
      _, w, slopes = path.weights()
      gap = w @ slopes - (f_end - f_start)
      if np.all(estimate[i] <= tolerance) and np.all(
          np.abs(gap) <= tolerance * np.maximum(np.abs(f_end - f_start), floor)):
        converged[i] = True
        continue
      chosen, extra = _plan(path, allowed, budget)
      pending += [(i, _middle(*k)) for k in chosen]
      spare += [(-share, i, k) for share, k in extra]
    # Fill the last call of the round with the next largest intervals: its rows are
    # computed anyway.
    fill = -len(pending) % points_per_call if pending else 0
    pending += [(i, _middle(*k)) for _, i, k in sorted(spare)[:fill]]
  # The final integrals from the nodes' weights, free of the running sums' rounding.
  integral, _ = _trapezoid_of(paths, buffer, delta)
  steps = np.array([len(path.nodes) for path in paths], np.int32)
  change = np.stack([path.nodes[1.0][1] - path.nodes[0.0][1] for path in paths])
  return adaptive.AdaptiveIntegral(integral, jnp.asarray(change, acc), steps, converged,
                                   np.max(estimate, axis=1))
