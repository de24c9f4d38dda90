"""Map-accuracy control (steps="auto", control="map"): each map within tolerance of the integral.

The reference is a closed form with a kink in every pixel: F(x) = sum_i
s_i relu(x_i - t_i) is separable, so its integrated gradients are exactly
s_i (relu(x_i - t_i) - relu(b_i - t_i)), and along a path each pixel's
integrand switches at its own position, as a ReLU network's pixels do.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drig import attribution
from drig.attribution import map_control
from drig.attribution import integration as ig_lib

SHAPE = (3, 16, 16)


def _hinges(s, t, x):
  return jnp.sum(s * jax.nn.relu(x - t), axis=(1, 2))


@pytest.fixture(scope="module")
def hinges():
  rng = np.random.default_rng(0)
  s = rng.normal(size=SHAPE[1:]).astype(np.float32)
  t = rng.normal(size=SHAPE[1:]).astype(np.float32)
  x = (rng.normal(size=SHAPE) * 2).astype(np.float32)
  b = (rng.normal(size=(1,) + SHAPE[1:]) * 2).astype(np.float32)
  relu = lambda v: np.maximum(v, 0.0)
  exact = s * (relu(x.astype(np.float64) - t) - relu(b.astype(np.float64) - t))
  return jax.tree_util.Partial(_hinges, s, t), x, b, exact


def _map_errors(attributions, exact):
  n = exact.shape[0]
  difference = (np.asarray(attributions, np.float64) - exact).reshape(n, -1)
  return np.linalg.norm(difference, axis=1) / np.linalg.norm(exact.reshape(n, -1), axis=1)


@pytest.mark.parametrize("tolerance", [1e-2, 1e-3])
def test_every_map_is_within_the_tolerance_of_the_exact_integral(hinges, tolerance):
  f, x, b, exact = hinges
  # Image 1's map nearly cancels (F changes by 0.9, its attributions sum to 234
  # in absolute value): its relative gap is the harder condition.
  result = attribution.integrated_gradients(f, x, b, steps="auto", tolerance=tolerance,
                                            max_steps=16385, control="map")
  assert np.asarray(result.converged).all()
  errors = _map_errors(result.attributions, exact)
  assert (errors <= tolerance).all(), errors
  # The estimate is what the result reports: here it bounds the true error.
  estimate = np.asarray(result.map_error)
  assert (estimate <= tolerance).all() and (errors <= estimate).all(), (errors, estimate)
  # The completeness gap is met too.
  change = exact.reshape(SHAPE[0], -1).sum(axis=1)
  assert (np.abs(np.asarray(result.gap)) <= tolerance * np.abs(change)).all()
  # Bisection where the map changes: far fewer points than uniform grids (doubled
  # until successive grids' maps differ by the tolerance, these images took 129
  # to 513 evaluations at 1% and 1025 to 8193 at 0.1%).
  assert (np.asarray(result.steps) <= {1e-2: 128, 1e-3: 768}[tolerance]).all(), result.steps


def test_gap_control_reports_no_map_error(hinges):
  f, x, b, _ = hinges
  result = attribution.integrated_gradients(f, x, b, steps="auto", tolerance=1e-2)
  assert result.map_error is None


def _recording(f, log):
  def recorded(points):
    jax.debug.callback(lambda p: log.append(np.array(p)), points)
    return f(points)
  return recorded


def test_never_evaluates_a_point_twice_and_images_stop_separately(hinges):
  f, _, _, _ = hinges
  # Image 0 stays on one side of every kink (linear along its path: the first
  # estimate is exact); image 1 crosses many. Only image 0's path lies above +5.
  b = np.stack([np.full(SHAPE[1:], 10.0), np.full(SHAPE[1:], -3.0)]).astype(np.float32)
  x = np.stack([b[0] + 0.5, np.full(SHAPE[1:], 3.0)]).astype(np.float32)
  log = []
  result = ig_lib.adaptive_integrated_gradients(
      _recording(f, log), jnp.asarray(x), jnp.asarray(b), tolerance=1e-3, max_steps=4097,
      chunk_size=8, groups=1, control="map")
  steps = np.asarray(result.steps)
  assert np.asarray(result.converged).all()
  assert steps[0] == 2 * map_control.INITIAL_INTERVALS + 1 and steps[1] > 4 * steps[0]
  seen = set()
  for batch in log:
    assert batch.shape[0] == 8
    fresh = {row.tobytes() for row in batch}
    assert not fresh & seen  # repeats within a call are padding
    seen |= fresh
  assert len(seen) == steps.sum()
  # Once image 0 has stopped, the calls hold only image 1's points.
  image_0 = [int((batch.mean(axis=(1, 2)) > 5).sum()) for batch in log]
  assert sum(image_0) <= steps[0] + 7
  assert max(i for i, count in enumerate(image_0) if count) < len(log) // 4


def test_unreachable_tolerance_is_reported(hinges):
  f, x, b, _ = hinges
  result = attribution.integrated_gradients(f, x, b, steps="auto", tolerance=1e-9,
                                            max_steps=100, control="map")
  assert not np.asarray(result.converged).any()
  # Bisection goes on until the budget is spent.
  np.testing.assert_array_equal(result.steps, 100)
  assert np.isfinite(np.asarray(result.map_error)).all()
  assert (np.asarray(result.map_error) > 1e-9).all()


def test_too_few_steps_for_an_estimate_is_reported(hinges):
  f, x, b, _ = hinges
  result = attribution.integrated_gradients(f, x, b, steps="auto", max_steps=20, control="map")
  assert not np.asarray(result.converged).any()
  np.testing.assert_array_equal(result.steps, 17)
  assert np.isnan(np.asarray(result.map_error)).all()


def test_unknown_control_is_a_clear_error(hinges):
  f, x, b, _ = hinges
  with pytest.raises(attribution.AttributionArgumentError, match="control must be one of"):
    attribution.integrated_gradients(f, x, b, steps="auto", control="pixels")
  with pytest.raises(attribution.AttributionArgumentError, match="control must be one of"):
    attribution.active_regions(lambda v: v, x, b, jnp.ones((SHAPE[0], 1) + SHAPE[1:]),
                               steps="auto", control=None)


def test_read_outs_and_layer_ig_are_controlled_per_map(hinges):
  _, x, b, _ = hinges
  rng = np.random.default_rng(2)
  t = rng.normal(size=SHAPE[1:]).astype(np.float32)
  to_layer = jax.tree_util.Partial(lambda t, v: jax.nn.relu(v - t), t)
  # Read-out k of image n: sum(c[n, k] * relu(x - t)): separable, exact per pixel.
  cotangents = rng.normal(size=(SHAPE[0], 2) + SHAPE[1:]).astype(np.float32)
  result = attribution.active_regions(to_layer, x, b, cotangents, steps="auto",
                                      tolerance=1e-2, max_steps=4097, control="map")
  relu = lambda v: np.maximum(v, 0.0)
  change = relu(x.astype(np.float64) - t) - relu(b.astype(np.float64) - t)
  exact = cotangents * change[:, None]
  assert np.asarray(result.converged).all()
  for k in range(2):
    assert (_map_errors(np.asarray(result.regions)[:, k], exact[:, k]) <= 1e-2).all()

  from_layer = jax.tree_util.Partial(lambda c, a: jnp.sum(c * jnp.tanh(a), axis=(1, 2)),
                                     cotangents[0, 0])
  layer = attribution.layer_integrated_gradients(to_layer, from_layer, x, b, steps="auto",
                                                 tolerance=1e-2, max_steps=4097,
                                                 control="map")
  a, a0 = relu(x.astype(np.float64) - t), relu(b.astype(np.float64) - t)
  exact_units = cotangents[0, 0] * (np.tanh(a) - np.tanh(a0))
  assert np.asarray(layer.converged).all()
  assert (_map_errors(layer.units, exact_units) <= 1e-2).all()


def test_points_go_where_the_map_changes():
  # Every pixel's kink lies in a <0.68, 0.72> band of the path: outside it the
  # integrand is constant, so every bisection changes the map there by nothing.
  rng = np.random.default_rng(3)
  s = rng.normal(size=SHAPE[1:]).astype(np.float32)
  t = rng.uniform(0.68, 0.72, size=SHAPE[1:]).astype(np.float32)
  f = jax.tree_util.Partial(_hinges, s, t)
  x, b = np.ones((1,) + SHAPE[1:], np.float32), np.zeros((1,) + SHAPE[1:], np.float32)
  log = []
  result = ig_lib.adaptive_integrated_gradients(
      _recording(f, log), jnp.asarray(x), jnp.asarray(b), tolerance=1e-3, max_steps=4097,
      chunk_size=8, groups=1, control="map")
  assert bool(result.converged[0])
  exact = (s * (1.0 - t))[None].astype(np.float64)
  assert _map_errors(result.attributions, exact)[0] <= 1e-3
  # The path point is a * x: its position a is any pixel's value.
  positions = sorted({float(p) for batch in log for p in batch[:, 0, 0]})
  assert len(positions) == int(result.steps[0]) > 2 * map_control.INITIAL_INTERVALS + 1
  refined = [a for a in positions if a * 32 != round(a * 32)]  # after the first estimate
  # The initial intervals that hold the band are [0.625, 0.6875] and [0.6875, 0.75]
  # (both halves of a bisected interval share its estimate): no point is placed
  # outside them.
  assert refined and all(0.625 < a < 0.75 for a in refined), refined
