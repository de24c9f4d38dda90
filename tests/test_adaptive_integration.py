"""Error-controlled integration (steps="auto"): tolerance met, points never repeated.

References are closed forms: sum_i c_i sin(z_i) has integrated gradients
c_i (sin x_i - sin b_i) exactly, and a ReLU network is linear between the kinks
of its hidden units along the path, which are found in closed form (ExactLine:
each pre-activation is linear in the path position), so its exact IG is a
finite sum. Inception-v3 (random He weights) checks that error control needs
fewer model evaluations than the poster's fixed rule for the same 1% gap.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drig import attribution
from drig.attribution import adaptive
from drig.attribution import integration as ig_lib

SHAPE = (3, 3, 4)  # N, H, W
HIDDEN = 6


def _sines(c, x):
  return jnp.sum(c * jnp.sin(x), axis=(1, 2))


def _mlp(params, x):
  w1, b1, w2 = params
  z = x.reshape(x.shape[0], -1)
  return jax.nn.relu(z @ w1 + b1) @ w2


def _exact_mlp_ig(params, x, b):
  """ExactLine: IG of _mlp, summing the constant gradient over each linear piece."""
  w1, b1, w2 = (np.asarray(p, np.float64) for p in params)
  out = []
  for xi in np.asarray(x, np.float64):
    z0 = np.asarray(b, np.float64).reshape(-1)
    d = xi.reshape(-1) - z0
    pre0, slope = z0 @ w1 + b1, d @ w1
    with np.errstate(divide="ignore", invalid="ignore"):
      kinks = -pre0 / slope
    cuts = np.sort(np.concatenate([[0.0, 1.0], kinks[(kinks > 0) & (kinks < 1)]]))
    integral = np.zeros_like(d)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      active = (pre0 + (lo + hi) / 2 * slope) > 0
      integral += (hi - lo) * (w1 @ (active * w2))
    out.append((d * integral).reshape(xi.shape))
  return np.stack(out)


@pytest.fixture(scope="module")
def mlp():
  rng = np.random.default_rng(0)
  d = int(np.prod(SHAPE[1:]))
  params = (rng.normal(size=(d, HIDDEN)).astype(np.float32),
            rng.normal(size=HIDDEN).astype(np.float32) * 0.5,
            rng.normal(size=HIDDEN).astype(np.float32))
  x = rng.normal(size=SHAPE).astype(np.float32)
  b = np.zeros((1,) + SHAPE[1:], np.float32)
  return params, x, b


def _relative_gap(gap, change):
  return np.abs(np.asarray(gap)) / np.abs(np.asarray(change))


def test_smooth_function_reaches_the_tolerance_and_the_exact_integral():
  rng = np.random.default_rng(1)
  c = rng.normal(size=SHAPE[1:]).astype(np.float32)
  x = rng.normal(size=SHAPE).astype(np.float32) * 3
  b = rng.normal(size=(1,) + SHAPE[1:]).astype(np.float32)
  f = jax.tree_util.Partial(_sines, c)
  exact = c * (np.sin(x) - np.sin(b))
  change = np.asarray(f(x) - f(b))
  for tolerance in (1e-2, 1e-3):
    result = attribution.integrated_gradients(f, x, b, steps="auto", tolerance=tolerance,
                                              max_steps=512)
    assert isinstance(result, attribution.AdaptiveAttribution)
    assert np.asarray(result.converged).all()
    assert (_relative_gap(result.gap, change) <= tolerance).all()
    # The gap is the signed sum of the coordinates' errors, which may partly
    # cancel: the attributions are accurate to a few times the tolerance.
    error = np.abs(np.asarray(result.attributions) - exact).sum(axis=(1, 2))
    assert (error <= 5 * tolerance * np.abs(exact).sum(axis=(1, 2))).all()
    assert result.steps.dtype == jnp.int32 and result.converged.dtype == jnp.bool_


def test_relu_network_matches_the_exactline_integral(mlp):
  params, x, b = mlp
  f = jax.tree_util.Partial(_mlp, params)
  exact = _exact_mlp_ig(params, x, b)
  change = np.asarray(f(x) - f(b))
  result = attribution.integrated_gradients(f, x, b, steps="auto", tolerance=1e-3,
                                            max_steps=200)
  assert np.asarray(result.converged).all()
  assert (_relative_gap(result.gap, change) <= 1e-3).all()
  np.testing.assert_allclose(np.asarray(result.attributions).sum(axis=(1, 2)),
                             exact.sum(axis=(1, 2)), rtol=2e-3, atol=1e-4)
  scale = np.abs(exact).sum(axis=(1, 2), keepdims=True)
  assert (np.abs(np.asarray(result.attributions) - exact) <= 5e-3 * scale).all()
  # A uniform riemann_right grid of the same cost is far less accurate.
  _, fixed_gap = attribution.integrated_gradients(f, x, b, steps=int(result.steps.max()))
  assert _relative_gap(fixed_gap, change).max() > 1e-3


def _recording(f, log):
  """f, with every batch of points it is called on appended to log (host side)."""
  def recorded(points):
    jax.debug.callback(lambda p: log.append(np.array(p)), points)
    return f(points)
  return recorded


def test_never_evaluates_a_point_twice_and_images_converge_separately():
  rng = np.random.default_rng(2)
  c = rng.normal(size=SHAPE[1:]).astype(np.float32)
  # Image 0 barely leaves its baseline (nearly linear along its path); image 1
  # crosses many periods of the sines. Their paths lie near +10 and -20, so each
  # evaluated point tells its image.
  b = np.stack([np.full(SHAPE[1:], 10.0), np.full(SHAPE[1:], -20.0)]).astype(np.float32)
  x = b + np.stack([rng.normal(size=SHAPE[1:]) * 0.05,
                    rng.normal(size=SHAPE[1:]) * 3]).astype(np.float32)
  log = []
  f = _recording(jax.tree_util.Partial(_sines, c), log)
  result = ig_lib.adaptive_integrated_gradients(f, jnp.asarray(x), jnp.asarray(b),
                                                tolerance=1e-3, max_steps=256, chunk_size=4,
                                                groups=1)
  steps = np.asarray(result.steps)
  assert np.asarray(result.converged).all()
  assert steps[0] < steps[1] // 4
  seen = set()
  for batch in log:
    assert batch.shape[0] == 4  # every call has the chunk's shape
    fresh = {row.tobytes() for row in batch}
    # Rows repeated within one call are padding; a point of an earlier call never recurs.
    assert not fresh & seen
    seen |= fresh
  assert len(seen) == steps.sum()
  # The easy image costs its own points (plus at most one call's padding), and
  # once it has converged the calls hold only the hard image's points.
  image_0 = [int((batch.mean(axis=(1, 2)) > 0).sum()) for batch in log]
  assert sum(image_0) <= steps[0] + 3
  last = max(i for i, count in enumerate(image_0) if count)
  assert last < len(log) // 2


def test_unreachable_tolerance_is_reported(mlp):
  params, x, b = mlp
  f = jax.tree_util.Partial(_mlp, params)
  result = attribution.integrated_gradients(f, x, b, steps="auto", tolerance=1e-9,
                                            max_steps=11)
  assert not np.asarray(result.converged).any()
  np.testing.assert_array_equal(result.steps, 11)


def test_fixed_steps_still_return_the_pair(mlp):
  params, x, b = mlp
  f = jax.tree_util.Partial(_mlp, params)
  result = attribution.integrated_gradients(f, x, b, steps=8)
  assert isinstance(result, tuple) and not isinstance(result, attribution.AdaptiveAttribution)
  assert len(result) == 2


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": "auto", "tolerance": 0.0}, "tolerance must be a finite number > 0"),
    ({"steps": "auto", "tolerance": -0.1}, "tolerance must be a finite number > 0"),
    ({"steps": "auto", "max_steps": 0}, "max_steps must be an int >= 2"),
    ({"steps": "adaptive"}, "steps must be a positive int or 'auto'"),
    ({"steps": 2.5}, "steps must be an int"),
])
def test_bad_calls_get_clear_errors(mlp, kwargs, message):
  params, x, b = mlp
  f = jax.tree_util.Partial(_mlp, params)
  with pytest.raises(attribution.AttributionArgumentError, match=message):
    attribution.integrated_gradients(f, x, b, **kwargs)
  to_layer = jax.tree_util.Partial(_hidden, params)
  with pytest.raises(attribution.AttributionArgumentError, match=message):
    attribution.active_regions(to_layer, x, b, jnp.ones((SHAPE[0], 1, HIDDEN)), **kwargs)


def _hidden(params, x):
  w1, b1, _ = params
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1)


def _head(params, a):
  return jnp.tanh(a) @ params[2]


def test_layer_ig_auto_in_activation_space(mlp):
  params, x, b = mlp
  to_layer = jax.tree_util.Partial(_hidden, params)
  from_layer = jax.tree_util.Partial(_head, params)
  result = attribution.layer_integrated_gradients(to_layer, from_layer, x, b, steps="auto",
                                                  tolerance=1e-3)
  a, a0 = np.asarray(to_layer(x), np.float64), np.asarray(to_layer(b), np.float64)
  w2 = np.asarray(params[2], np.float64)
  exact = w2 * (np.tanh(a) - np.tanh(a0))  # separable: closed form per unit
  np.testing.assert_allclose(result.units, exact, atol=2e-3 * np.abs(exact).sum())
  assert np.asarray(result.converged).all() and result.steps.shape == (SHAPE[0],)
  assert (_relative_gap(result.gap, exact.sum(axis=1)) <= 1e-3).all()
  fixed = attribution.layer_integrated_gradients(to_layer, from_layer, x, b, steps=4)
  assert fixed.steps is None and fixed.converged is None


def test_active_regions_and_lesion_detection_auto(mlp):
  params, x, b = mlp
  to_layer = jax.tree_util.Partial(_hidden, params)
  rng = np.random.default_rng(3)
  cotangents = jnp.asarray(rng.normal(size=(SHAPE[0], 2, HIDDEN)), jnp.float32)
  result = attribution.active_regions(to_layer, x, b, cotangents, steps="auto",
                                      tolerance=1e-3, max_steps=300)
  reference = attribution.active_regions(to_layer, x, b, cotangents, steps=4000,
                                         method="riemann_middle")
  change = np.einsum("nkh,nh->nk", np.asarray(cotangents),
                     np.asarray(to_layer(x) - to_layer(b)))
  assert np.asarray(result.converged).all()
  assert (_relative_gap(result.gap, change) <= 1e-3).all()
  np.testing.assert_allclose(result.regions, reference.regions,
                             atol=3e-3 * np.abs(np.asarray(reference.regions)).max())

  from_layer = jax.tree_util.Partial(_head, params)
  analysis = attribution.lesion_detection(to_layer, from_layer, x, b, k=2, steps="auto",
                                          individual_regions=False, tolerance=1e-2)
  assert np.asarray(analysis.converged).all() and np.asarray(analysis.layer.converged).all()
  q_change = np.asarray(from_layer(to_layer(x)) - from_layer(to_layer(b)))
  assert (_relative_gap(analysis.pixel_gap, q_change) <= 1e-2).all()
  fixed = attribution.lesion_detection(to_layer, from_layer, x, b, k=2, steps=2000,
                                       individual_regions=False, method="riemann_middle")
  np.testing.assert_allclose(analysis.pixels, fixed.pixels,
                             atol=2e-2 * np.abs(np.asarray(fixed.pixels)).max())
  np.testing.assert_allclose(analysis.positive_resultant, fixed.positive_resultant,
                             atol=2e-2 * np.abs(np.asarray(fixed.positive_resultant)).max()
                             + 1e-6)


def test_split_points_find_a_single_kink():
  # h = 1 on [0, 0.3], 3 on [0.3, 1]: F(1) - F(0) = 0.3 + 2.1.
  left, right = np.array([0.0]), np.array([1.0])
  values = np.array([[0.0], [2.4]])
  slopes = np.array([[1.0], [3.0]])
  (split,), = adaptive._split_points(left, right, values, slopes, np.array([0]))
  assert split == pytest.approx(0.3, rel=1e-6)
  # A linear h (smooth quadratic F) is split in the middle.
  values = np.array([[0.0], [2.0]])
  assert adaptive._split_points(left, right, values, slopes, np.array([0])) == [[0.5]]
  # A kink near an end: split there and in the middle, so the interval still halves.
  values = np.array([[0.0], [1.0 * 0.95 + 3.0 * 0.05]])
  near, middle = adaptive._split_points(left, right, values, slopes, np.array([0]))[0]
  assert near == pytest.approx(0.95, rel=1e-6) or middle == pytest.approx(0.95, rel=1e-6)
  assert 0.5 in (near, middle)


def _he_normal(key, leaf):
  if leaf.ndim < 2:
    return leaf
  fan_in = int(np.prod(leaf.shape[:-1]))
  return jax.random.normal(key, leaf.shape, leaf.dtype) * np.sqrt(2.0 / fan_in)


def test_inception_reaches_one_percent_with_fewer_evaluations_than_riemann_right():
  from drig.models.inception_v3 import InceptionV3
  model = InceptionV3(num_classes=5, convention="torchvision")
  x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (1, 96, 96, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(treedef, [_he_normal(k, l) for k, l in zip(keys, leaves)])
  variables = {**variables, "params": params}
  logits = jax.tree_util.Partial(lambda v, images: model.apply(v, images), variables)
  f = attribution.probability_of_grade(logits, 4)
  b = attribution.half_gray_baseline(x)
  change = np.abs(np.asarray(f(x) - f(b)))
  result = attribution.integrated_gradients(f, x, b, steps="auto", tolerance=0.01)
  assert bool(result.converged[0]) and _relative_gap(result.gap, change)[0] <= 0.01
  fixed_steps = 8
  while True:  # the fewest doubled riemann_right steps with the same gap
    _, gap = attribution.integrated_gradients(f, x, b, steps=fixed_steps)
    if _relative_gap(gap, change)[0] <= 0.01 or fixed_steps >= 512:
      break
    fixed_steps *= 2
  assert int(result.steps[0]) < fixed_steps, (int(result.steps[0]), fixed_steps)
