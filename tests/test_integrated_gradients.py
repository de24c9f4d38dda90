"""Pixel integrated gradients: quadrature rules, exactness, chunking, dtypes, errors.

References are closed forms: a linear model's IG is (x - x') * c exactly, a
quadratic model's gradient is affine along the path, so rules exact for linear
integrands give the exact answer and the Riemann end-point rules are off by a
known amount, and a cubic model is integrated exactly by 2-point Gauss-Legendre.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drig import attribution
from drig.attribution import integration as ig_lib
from drig.attribution import point_calls

ALL_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "trapezoid",
               "gausslegendre")
SHAPE = (3, 4, 5, 2)  # N, H, W, C


def _linear(c, x):
  return jnp.sum(x * c, axis=(1, 2, 3))


def _quadratic(a, c, x):
  z = x.reshape(x.shape[0], -1)
  return 0.5 * jnp.einsum("ni,ij,nj->n", z, a, z, precision="highest") + z @ c


def _cubic(c, x):
  z = x.reshape(x.shape[0], -1)
  return jnp.sum(c * z ** 3, axis=1) + jnp.sum(z, axis=1) ** 2


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=SHAPE).astype(np.float32)
  b = rng.normal(size=(1,) + SHAPE[1:]).astype(np.float32) * 0.1
  d = int(np.prod(SHAPE[1:]))
  a = rng.normal(size=(d, d)).astype(np.float32) / d
  a = (a + a.T) / 2  # F = z'Az/2 has gradient Az for symmetric A.
  c = rng.normal(size=(d,)).astype(np.float32)
  return x, b, a, c


def test_quadrature_rules_match_captum_conventions():
  n = 7
  for method, nodes in [("riemann_left", np.arange(n) / n),
                        ("riemann_right", np.arange(1, n + 1) / n),
                        ("riemann_middle", np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)),
                        ("trapezoid", np.linspace(0, 1, n))]:
    alphas, weights = attribution.quadrature(method, n)
    np.testing.assert_allclose(alphas, nodes, atol=1e-15)
    assert weights.sum() == pytest.approx(1.0, abs=1e-14)
  _, trapezoid = attribution.quadrature("trapezoid", n)
  np.testing.assert_allclose(trapezoid, [1 / 12] + [1 / 6] * 5 + [1 / 12])
  roots, legendre = np.polynomial.legendre.leggauss(n)
  alphas, weights = attribution.quadrature("gausslegendre", n)
  np.testing.assert_allclose(alphas, (1 + roots) / 2)
  np.testing.assert_allclose(weights, legendre / 2)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_linear_model_is_exact_for_every_method(data, method):
  x, b, _, c = data
  f = jax.tree_util.Partial(_linear, c.reshape(SHAPE[1:]))
  attributions, gap = attribution.integrated_gradients(f, x, b, steps=5, method=method)
  np.testing.assert_allclose(attributions, (x - b) * c.reshape(SHAPE[1:]), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(gap, 0, atol=1e-5)
  assert attributions.dtype == jnp.float32 and gap.shape == (SHAPE[0],)


@pytest.mark.parametrize("method,steps", [("riemann_left", 6), ("riemann_right", 6),
                                          ("riemann_middle", 1), ("riemann_middle", 6),
                                          ("trapezoid", 2), ("trapezoid", 6),
                                          ("gausslegendre", 1), ("gausslegendre", 6)])
def test_quadratic_model_exact_or_known_error(data, method, steps):
  x, b, a, c = data
  f = jax.tree_util.Partial(_quadratic, a, c)
  attributions, gap = attribution.integrated_gradients(f, x, b, steps=steps, method=method)
  d = (x - b).reshape(SHAPE[0], -1).astype(np.float64)
  start = np.broadcast_to(b, x.shape).reshape(SHAPE[0], -1).astype(np.float64)
  a64, c64 = a.astype(np.float64), c.astype(np.float64)
  # The gradient along the path is A(b + t d) + c, linear in t: its integral is
  # the value at t = 1/2. Right sums add (1/n) * sum_k k/n - 1/2 = 1/(2n) of A d.
  exact = d * ((start + d / 2) @ a64 + c64)
  error = {"riemann_left": -1, "riemann_right": 1}.get(method, 0) * d * (d @ a64) / (2 * steps)
  np.testing.assert_allclose(attributions.reshape(SHAPE[0], -1), exact + error, rtol=1e-4,
                             atol=1e-5)
  # The completeness gap is the attributions' error summed.
  np.testing.assert_allclose(gap, error.sum(axis=1), rtol=1e-3, atol=1e-5)


def test_gauss_legendre_two_points_exact_for_cubic(data):
  x, b, _, c = data
  f = jax.tree_util.Partial(_cubic, c)
  _, gap = attribution.integrated_gradients(f, x, b, steps=2, method="gausslegendre")
  scale = float(jnp.max(jnp.abs(f(x) - f(jnp.broadcast_to(b, x.shape)))))
  assert float(jnp.max(jnp.abs(gap))) < 1e-5 * scale
  # The midpoint rule is not exact for the quadratic integrand.
  _, gap_mid = attribution.integrated_gradients(f, x, b, steps=2, method="riemann_middle")
  assert float(jnp.max(jnp.abs(gap_mid))) > 1e-3 * scale


def _tiny_cnn(params, x):
  """A small NHWC convolutional net with a scalar output per image."""
  h = jax.lax.conv_general_dilated(x, params["w1"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jnp.tanh(h + params["b1"])
  h = jax.lax.conv_general_dilated(h, params["w2"], (2, 2), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.softplus(h).mean(axis=(1, 2))
  return jnp.sin(h @ params["v"])


@pytest.fixture(scope="module")
def cnn():
  rng = np.random.default_rng(1)
  params = {"w1": rng.normal(size=(3, 3, 2, 6)).astype(np.float32) * 0.5,
            "b1": rng.normal(size=(6,)).astype(np.float32) * 0.1,
            "w2": rng.normal(size=(3, 3, 6, 4)).astype(np.float32) * 0.5,
            "v": rng.normal(size=(4,)).astype(np.float32)}
  x = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
  return jax.tree_util.Partial(_tiny_cnn, params), x


@pytest.mark.parametrize("method", ALL_METHODS)
def test_chunked_equals_unchunked_and_loops_agree(cnn, method):
  f, x = cnn
  b = attribution.half_gray_baseline(x)
  whole, whole_gap = ig_lib._integrated_gradients(f, x, b, steps=10, method=method,
                                                   chunk_size=10, groups=1)
  # groups: 10 nodes in 3 groups is uneven (3, 4, 3); chunks of 3 in 2 groups (2, 1).
  for chunk, loop, groups in [(3, "python", 1), (4, "scan", None), (1, "python", None),
                              (10, "scan", None), (10, "python", 3), (3, "python", 2),
                              (10, "python", None)]:
    parts, parts_gap = ig_lib._integrated_gradients(f, x, b, steps=10, method=method,
                                                     chunk_size=chunk, loop=loop, groups=groups)
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts_gap, whole_gap, rtol=1e-5, atol=1e-6)


def test_groups_split_every_chunk_into_contiguous_ranges():
  assert point_calls.group_bounds(8, 2) == [(0, 4), (4, 8)]
  assert point_calls.group_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
  assert point_calls.group_bounds(2, 4) == [(0, 1), (1, 2)]  # never an empty group
  assert point_calls.group_bounds(5, 1) == [(0, 5)]
  f = lambda p: jnp.sum(p, axis=1)
  with pytest.raises(attribution.AttributionArgumentError, match="groups must be >= 1"):
    ig_lib._integrated_gradients(f, jnp.ones((1, 3)), 0.0, steps=4, method="riemann_right",
                                 chunk_size=None, groups=0)



def test_default_chunks_pad_the_least_within_the_points_budget():
  def computed(steps, size):
    num_chunks, size = ig_lib.chunk_plan(steps, size)
    return num_chunks * size
  # The poster's 50 steps with 8 points per call: 7 chunks of 8 compute 56 points,
  # 10 chunks of 5 compute exactly 50.
  assert ig_lib.chunk_plan(50, 8) == (7, 8)
  assert ig_lib.least_padding_chunk(50, 8) == 5
  assert ig_lib.least_padding_chunk(32, 8) == 8  # divides: the target itself
  assert ig_lib.least_padding_chunk(3, 8) == 3  # never more than the steps
  assert ig_lib.least_padding_chunk(50, 1) == 1
  for steps in range(1, 130):
    for target in (1, 2, 3, 8, 16):
      size = ig_lib.least_padding_chunk(steps, target)
      bound = min(steps, target)
      assert (bound + 1) // 2 <= size <= bound
      # No size within the budget computes fewer points; ties take the larger size.
      best = min(computed(steps, c) for c in range((bound + 1) // 2, bound + 1))
      assert computed(steps, size) == best
      assert all(computed(steps, c) > best for c in range(size + 1, bound + 1))
  # With no chunk_size the engine uses it: 2 images and 4 points each per call on CPU.
  per_call = ig_lib.default_points_per_call()
  assert ig_lib.default_chunk_size(50, 2) == ig_lib.least_padding_chunk(50, per_call // 2)
  assert ig_lib.chunk_plan(50, None, 1) == ig_lib.chunk_plan(
      50, ig_lib.least_padding_chunk(50, per_call))
  with pytest.raises(attribution.AttributionArgumentError, match="steps must be >= 1"):
    ig_lib.least_padding_chunk(0, 8)

def test_images_are_independent(cnn):
  f, x = cnn
  b = attribution.half_gray_baseline(x)
  batch, _ = attribution.integrated_gradients(f, x, b, steps=8)
  single, _ = attribution.integrated_gradients(f, x[1:2], b, steps=8)
  np.testing.assert_allclose(batch[1:2], single, rtol=1e-5, atol=1e-6)


def test_gap_shrinks_with_steps(cnn):
  f, x = cnn
  b = attribution.half_gray_baseline(x)
  for method in ("riemann_right", "trapezoid", "gausslegendre"):
    gaps = [float(jnp.abs(attribution.integrated_gradients(f, x, b, steps=s, method=method)[1])
                  .max()) for s in (2, 8, 32)]
    assert gaps[2] < gaps[1] < gaps[0], (method, gaps)


def _fewest_steps_under(f, x, b, method, tolerance=0.01):
  change = jnp.abs(f(x) - f(jnp.broadcast_to(b, x.shape)))
  for steps in (1, 2, 4, 8, 16, 32, 64, 128, 256):
    _, gap = attribution.integrated_gradients(f, x, b, steps=steps, method=method)
    if float(jnp.max(jnp.abs(gap) / change)) < tolerance:
      return steps
  return None


def test_gauss_legendre_needs_far_fewer_steps_on_a_smooth_model(cnn):
  # The tiny CNN is smooth (tanh, softplus, sin), so Gauss-Legendre's high
  # order pays off. (On ReLU networks the integrand has kinks and the advantage
  # can vanish; see benchmarks/bench_attribution.py --parts=convergence.)
  f, x = cnn
  b = attribution.half_gray_baseline(x)
  right = _fewest_steps_under(f, x, b, "riemann_right")
  gauss = _fewest_steps_under(f, x, b, "gausslegendre")
  assert right is not None and gauss is not None and 4 * gauss <= right, (gauss, right)


def test_bfloat16_model_accumulates_in_float32(cnn):
  f, x = cnn
  params = f.args[0]
  f16 = jax.tree_util.Partial(
      lambda p, z: _tiny_cnn(jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p),
                             z.astype(jnp.bfloat16)), params)
  b = attribution.half_gray_baseline(x)
  ref, _ = attribution.integrated_gradients(f, x, b, steps=16)
  low, gap = attribution.integrated_gradients(f16, x, b, steps=16)
  assert low.dtype == jnp.float32 and gap.dtype == jnp.float32
  scale = float(jnp.abs(ref).max())
  assert float(jnp.abs(low - ref).max()) < 0.05 * scale


def test_compiles_once_per_shape(cnn):
  f, x = cnn
  b = attribution.half_gray_baseline(x)
  attribution.integrated_gradients(f, x, b, steps=6, chunk_size=3)
  before = ig_lib._chunk_step._cache_size(), ig_lib._finish_pixel._cache_size()
  # New weights in a new Partial around the same function: same program.
  other = jax.tree_util.Partial(f.func, jax.tree_util.tree_map(lambda a: a * 2, f.args[0]))
  attribution.integrated_gradients(other, x + 1, b, steps=6, chunk_size=3)
  # Other nodes (method) of the same chunk shape: same program too.
  attribution.integrated_gradients(other, x, b, steps=6, chunk_size=3, method="gausslegendre")
  assert (ig_lib._chunk_step._cache_size(), ig_lib._finish_pixel._cache_size()) == before


def test_works_inside_jit(cnn):
  f, x = cnn
  b = attribution.half_gray_baseline(x)
  eager, _ = attribution.integrated_gradients(f, x, b, steps=6, chunk_size=2)
  jitted = jax.jit(lambda p, z: attribution.integrated_gradients(
      jax.tree_util.Partial(_tiny_cnn, p), z, b, steps=6, chunk_size=2)[0])(f.args[0], x)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


def test_half_gray_baseline_values():
  x = jnp.zeros((2, 4, 4, 3))
  model = attribution.half_gray_baseline(x)
  assert model.shape == (1, 4, 4, 3)
  # 128 in [0, 255] is 128 / 127.5 - 1 = 1/255 in the model's [-1, 1] space.
  np.testing.assert_allclose(model, 1 / 255, rtol=1e-6)
  np.testing.assert_allclose(attribution.half_gray_baseline(x, space="pixel"), 128.0)
  np.testing.assert_allclose(attribution.half_gray_baseline(x, space="unit"), 128 / 255)
  with pytest.raises(ValueError, match="unknown space"):
    attribution.half_gray_baseline(x, space="rgb")


def test_bad_calls_get_clear_errors(cnn):
  f, x = cnn
  b = attribution.half_gray_baseline(x)
  ig = attribution.integrated_gradients
  with pytest.raises(ValueError, match="steps must be >= 1"):
    ig(f, x, b, steps=0)
  with pytest.raises(ValueError, match="steps must be >= 2"):
    ig(f, x, b, steps=1, method="trapezoid")
  with pytest.raises(ValueError, match="unknown method 'simpson'"):
    ig(f, x, b, method="simpson")
  with pytest.raises(ValueError, match="riemann_trapezoid is drig's 'trapezoid'"):
    ig(f, x, b, method="riemann_trapezoid")
  with pytest.raises(ValueError, match=r"baseline of shape \(1, 7, 8, 2\) does not broadcast"):
    ig(f, x, jnp.zeros((1, 7, 8, 2)), steps=2)
  with pytest.raises(ValueError, match=r"f must map a batch \[N, \.\.\.\] to \[N\]"):
    ig(lambda z: z.sum(axis=(2, 3)), x, b, steps=2)
  with pytest.raises(ValueError, match="f cannot be applied to inputs of shape"):
    ig(f, x[..., :1], b[..., :1], steps=2)
  with pytest.raises(ValueError, match="chunk_size must be >= 1"):
    ig(f, x, b, steps=2, chunk_size=0)
  with pytest.raises(ValueError, match="x must be floating point"):
    ig(f, x.astype(np.int32), b, steps=2)


def test_quantity_helpers(cnn):
  rng = np.random.default_rng(3)
  w = rng.normal(size=(2 * 8 * 8, 5)).astype(np.float32)
  logits_fn = jax.tree_util.Partial(lambda w, z: z.reshape(z.shape[0], -1) @ w, w)
  x = cnn[1]
  logits = np.asarray(logits_fn(x), np.float64)
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  np.testing.assert_allclose(attribution.probability_of_grade(logits_fn, 4)(x), probs[:, 4],
                             rtol=1e-5)
  np.testing.assert_allclose(attribution.logit_of_grade(logits_fn, 2)(x), logits[:, 2],
                             rtol=1e-5)
  np.testing.assert_allclose(attribution.grade_difference(logits_fn, 4, 0)(x),
                             probs[:, 4] - probs[:, 0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(attribution.grade_difference(logits_fn, 4, 0, space="logit")(x),
                             logits[:, 4] - logits[:, 0], rtol=1e-5)
  np.testing.assert_allclose(attribution.weighted_grades(logits_fn, range(5))(x),
                             probs @ np.arange(5), rtol=1e-5)
  with pytest.raises(ValueError, match=r"grade must be in \[0, 5\)"):
    attribution.probability_of_grade(logits_fn, 5)
  with pytest.raises(ValueError, match=r"logits \[N, 3\]"):
    attribution.weighted_grades(logits_fn, [1, 2, 3])(x)
  # Quantities are pytrees: grade 0 and grade 4 share one compiled program.
  b = attribution.half_gray_baseline(x)
  attribution.integrated_gradients(attribution.probability_of_grade(logits_fn, 0), x, b,
                                    steps=4, chunk_size=2)
  size = ig_lib._chunk_step._cache_size()
  attribution.integrated_gradients(attribution.probability_of_grade(logits_fn, 4), x, b,
                                   steps=4, chunk_size=2)
  assert ig_lib._chunk_step._cache_size() == size
  # The helpers compose with IG: completeness holds for the softmax quantity.
  _, gap = attribution.integrated_gradients(
      attribution.grade_difference(logits_fn, 4, 0), x, b, steps=64, method="gausslegendre")
  assert float(jnp.abs(gap).max()) < 1e-4


def test_heatmap_colours_and_clipping():
  from drig.attribution import heatmap
  values = np.array([[1.0, -2.0], [0.0, 10.0]])
  rgb = heatmap.green_red(values, clip=2.0)
  np.testing.assert_allclose(rgb[0, 0], [0, 0.5, 0])   # positive: pure green, half
  np.testing.assert_allclose(rgb[0, 1], [1, 0, 0])     # negative: pure red, full
  np.testing.assert_allclose(rgb[1, 0], [0, 0, 0])     # zero: black
  np.testing.assert_allclose(rgb[1, 1], [0, 1, 0])     # clipped at full intensity
  # Zeros are left out: the median of |1..100| is 50.5 (with the 0 it would be 50).
  assert heatmap.clip_value(np.arange(101.0), 50) == pytest.approx(50.5)
  image = np.full((2, 2, 3), 255, np.uint8)
  painted = heatmap.overlay(image, values, clip=2.0, dim=0.5)
  np.testing.assert_allclose(painted[1, 0], [0.5, 0.5, 0.5])  # no attribution: dimmed image
  np.testing.assert_allclose(painted[1, 1], [0, 1, 0])        # full attribution: pure colour
  np.testing.assert_allclose(heatmap.pixel_map(np.ones((2, 2, 3))), np.full((2, 2), 3.0))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots()
  clip = heatmap.show(ax, np.stack([values] * 3, axis=-1), image=image, percentile=100)
  assert clip == pytest.approx(30.0)
  plt.close(fig)

