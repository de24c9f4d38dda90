"""Path points evaluated in fixed-size model calls, for the error-controlled engines.

One concept: the call layout that drig.attribution.adaptive and
drig.attribution.map_control share. Both choose their path points as they go, per
image, so a call mixes the points of several images in any proportion
(image-major); every call has the same number of points, so one compiled
program serves them all, and the last call of a round is padded by repeating
its last point, which the caller weights 0. Within a call the points are split
into independent groups that XLA:CPU overlaps
(integration.DEFAULT_GROUPS_PER_CALL).

This module imports nothing else from drig, so the engines and
drig.attribution.integration can all use it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def accumulation_dtype(*arrays) -> jnp.dtype:
  """float32, or float64 if an input is float64 (with jax_enable_x64); never lower."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def group_bounds(size: int, groups: int) -> list[tuple[int, int]]:
  """Splits a call's `size` points into `groups` contiguous, near-equal ranges (never empty)."""
  groups = max(1, min(groups, size))
  edges = [round(i * size / groups) for i in range(groups + 1)]
  return list(zip(edges[:-1], edges[1:]))


def expand(values, ndim):
  """`values` with trailing unit axes up to `ndim` axes (per-row scalars against maps)."""
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _evaluate(evaluate, groups, operands, start, end, rows, alphas):
  acc = accumulation_dtype(end)
  e = end[rows].astype(acc)
  s = start[jnp.minimum(rows, start.shape[0] - 1)].astype(acc)
  delta = e - s
  a = expand(alphas.astype(acc), e.ndim)
  # The end points exactly, not s + 1 * (e - s) rounded.
  points = jnp.where(a == 1, e, jnp.where(a == 0, s, s + a * delta)).astype(end.dtype)
  values, grads = [], []
  for lo, hi in group_bounds(points.shape[0], groups):
    v, g = evaluate(operands.tree, points[lo:hi], rows[lo:hi])
    values.append(v.astype(acc))
    grads.append(g.astype(acc))
  values, grads = jnp.concatenate(values), jnp.concatenate(grads)
  slopes = jnp.sum(grads * delta[:, None], axis=tuple(range(2, grads.ndim)))
  return values, slopes, grads


class Call(NamedTuple):
  """One model call's results.

  Attributes:
    count: the points asked for in this call; rows from `count` on are padding.
    rows: int32 [P], the image of each point (padding repeats the last).
    alphas: float64 [P], each point's position on its image's path.
    values: float64 [P, R], F_r at each point.
    slopes: float64 [P, R], grad F_r . (end - start): the integrand along the path.
    grads: [P, R, ...] on the device, the gradients themselves.
  """
  count: int
  rows: np.ndarray
  alphas: np.ndarray
  values: np.ndarray
  slopes: np.ndarray
  grads: jax.Array


def evaluate_points(evaluate: Callable, operands: Any, start, end,
                    points: list[tuple[int, float]], *, points_per_call: int,
                    groups: int) -> Iterator[Call]:
  """Evaluates (image, position) pairs on the paths start -> end, `points_per_call` per call.

  Args:
    evaluate: as adaptive.adaptive_path_integral's.
    operands: evaluate's data (integration.Operands).
    start: [1 or N, ...] (adaptive.broadcast_start).
    end: [N, ...].
    points: (image, position in [0, 1]) in the order they are batched.
    points_per_call: points per call; the last call is padded to it.
    groups: independent groups per call.

  Yields:
    A Call per model call, in order.
  """
  acc = accumulation_dtype(end)
  groups = max(1, min(groups, points_per_call))
  for lo in range(0, len(points), points_per_call):
    part = points[lo:lo + points_per_call]
    padded = part + [part[-1]] * (points_per_call - len(part))
    rows = np.array([i for i, _ in padded], np.int32)
    alphas = np.array([a for _, a in padded], np.float64)
    values, slopes, grads = _evaluate(evaluate, groups, operands, start, end,
                                      jnp.asarray(rows), jnp.asarray(alphas, acc))
    yield Call(len(part), rows, alphas, np.asarray(values, np.float64),
               np.asarray(slopes, np.float64), grads)


@functools.partial(jax.jit, donate_argnums=(3,))
def accumulate(grads, rows, weights, total):
  """total[rows[i]] += weights[i] * grads[i]: a call's weighted gradients into per-image sums."""
  return total.at[rows].add(expand(weights.astype(grads.dtype), grads.ndim) * grads)
