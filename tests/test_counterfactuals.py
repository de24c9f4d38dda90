"""Counterfactuals: closed forms on a linear model, the step direction on the tiny Inception.

The constructed model has logits linear in the model-space input, so in pixel
space F = logit_t has gradient w_t / 127.5 and IG = (x - 128) * w_t / 127.5 for
every quadrature rule: the counterfactuals, predictions and flips have
closed forms computed here with numpy.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import model as model_config
from drig.analysis import counterfactuals as cf
from drig.models import classifier

SIZE = 8


def _linear_logits(params, x):
  w, b = params
  return x.reshape(x.shape[0], -1) @ w + b


@pytest.fixture(scope="module")
def linear():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(SIZE * SIZE * 3, 5)).astype(np.float32) * 0.05
  x = rng.uniform(40, 215, size=(3, SIZE, SIZE, 3)).astype(np.float32)
  z = x.reshape(3, -1) / 127.5 - 1
  # A bias putting grade 0 on top by a margin of 1 for every image.
  logits = z @ w
  b = np.zeros(5, np.float32)
  b[0] = 1.0 + (logits[:, 1:] - logits[:, :1]).max()
  logits_fn = jax.tree_util.Partial(_linear_logits, (jnp.asarray(w), jnp.asarray(b)))
  return w, b, x, logits_fn


def _numpy_logits(w, b, images):
  return (images.reshape(images.shape[0], -1).astype(np.float64) / 127.5 - 1) @ w + b


# ------------------------------------------------------------------------------
# Steps and statistics on constructed arrays.


def test_steps_match_the_formulas_and_clip():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 255, size=(2, 5, 5, 3)).astype(np.float32)
  ig = rng.normal(size=x.shape).astype(np.float32)
  expected = np.clip(x + 3.0 * np.sign(x - 128.0) * ig, 0, 255)
  np.testing.assert_allclose(cf.ig_counterfactual(x, 128.0, ig, 3.0), expected, rtol=1e-6)
  np.testing.assert_allclose(cf.gradient_counterfactual(x, ig, 3.0),
                             np.clip(x + 3.0 * ig, 0, 255), rtol=1e-6)
  for huge in (cf.ig_counterfactual(x, 128.0, ig, 1e6), cf.gradient_counterfactual(x, ig, -1e6)):
    huge = np.asarray(huge)
    assert huge.min() >= 0.0 and huge.max() <= 255.0
    assert set(np.unique(huge)) <= {0.0, 255.0}
  # A pixel at the baseline has sgn 0: the IG step leaves it alone.
  x[0, 0, 0, 0] = 128.0
  assert cf.ig_counterfactual(x, 128.0, ig, 5.0)[0, 0, 0, 0] == 128.0


def test_statistics_on_constructed_changes():
  h = w = 16
  x = np.full((4, h, w, 3), 100.0, np.float32)
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  changes = np.stack([
      np.full((h, w, 3), 7.0),                                           # constant shift
      np.repeat(((-1.0) ** (i + j))[..., None], 3, axis=-1) * 5,        # checkerboard
      np.repeat(np.cos(2 * np.pi * 0.125 * j)[..., None], 3, axis=-1),  # below the cutoff
      np.repeat(np.cos(2 * np.pi * 0.375 * i)[..., None], 3, axis=-1),  # above it
  ]).astype(np.float32)
  stats = cf.perturbation_statistics(x, x + changes, cutoff=0.25)
  assert set(stats) == {"l2", "total_variation", "image_total_variation",
                        "high_frequency_energy"}
  assert all(v.dtype == np.float32 and v.shape == (4,) for v in stats.values())
  np.testing.assert_allclose(stats["l2"], np.sqrt((changes ** 2).sum(axis=(1, 2, 3))),
                             rtol=1e-6)
  assert stats["total_variation"][0] == 0.0 and stats["high_frequency_energy"][0] == 0.0
  np.testing.assert_allclose(stats["high_frequency_energy"][1:], [1.0, 0.0, 1.0], atol=1e-9)
  # Checkerboard: every neighbour differs by 10, (h-1)*w vertical + h*(w-1) horizontal pairs.
  np.testing.assert_allclose(stats["total_variation"][1], 10 * 2 * (h - 1) * w * 3, rtol=1e-6)
  np.testing.assert_allclose(stats["image_total_variation"], stats["total_variation"],
                             rtol=1e-5)  # x is constant
  ramp = np.broadcast_to(i[None, ..., None], (1, h, w, 3)).astype(np.float32)
  np.testing.assert_allclose(cf.total_variation(ramp), (h - 1) * w * 3)
  assert cf.high_frequency_energy(np.zeros((1, 4, 4, 3)))[0] == 0.0


# ------------------------------------------------------------------------------
# The linear model: closed forms.


def test_sweep_on_a_linear_model(linear):
  w, b, x, logits_fn = linear
  cs = [0.0, 10.0, 100.0, 1e3, 1e4, 1e5]
  sweep = cf.counterfactual_sweep(logits_fn, x, cs, target_grade=1, steps=3,
                                  quantity="logit")
  assert sweep.methods == ("ig", "gradient", "gradient_support")
  for name in ("predicted", "probability", "quantity", "l2", "total_variation",
               "image_total_variation", "high_frequency_energy", "flipped", "flipped_any_dr"):
    assert getattr(sweep, name).shape == (3, len(cs), 3), name
  gradient = np.broadcast_to(w[:, 1].reshape(SIZE, SIZE, 3) / 127.5, x.shape)
  np.testing.assert_allclose(sweep.gradient, gradient, rtol=1e-5)
  np.testing.assert_allclose(sweep.attributions, (x - 128.0) * gradient, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(sweep.original_predicted, 0)
  np.testing.assert_allclose(sweep.original_quantity, _numpy_logits(w, b, x)[:, 1], rtol=1e-5)
  for j, c in enumerate(cs):
    # x has no pixel at 128, so the support-restricted gradient is the gradient.
    images = [np.clip(x + c * np.sign(x - 128) * (x - 128) * gradient, 0, 255),
              np.clip(x + c * gradient, 0, 255), np.clip(x + c * gradient, 0, 255)]
    for m, image in enumerate(images):
      logits = _numpy_logits(w, b, image)
      np.testing.assert_array_equal(sweep.predicted[m, j], logits.argmax(axis=1))
      np.testing.assert_allclose(sweep.quantity[m, j], logits[:, 1], rtol=1e-4, atol=1e-4)
      np.testing.assert_array_equal(sweep.flipped[m, j], logits.argmax(axis=1) == 1)
      np.testing.assert_array_equal(sweep.flipped_any_dr[m, j], logits.argmax(axis=1) >= 1)
      np.testing.assert_allclose(sweep.l2[m, j], np.sqrt(((image - x) ** 2).sum(axis=(1, 2, 3))),
                                 rtol=1e-4, atol=1e-3)
  # F rises with c for both methods (sum w^2 |x - b| > 0), and the sweep reaches flips.
  assert np.all(np.diff(sweep.quantity, axis=1) >= 0)
  assert np.all(sweep.quantity[:, 1] > sweep.quantity[:, 0])
  assert not sweep.flipped[:, 0].any() and sweep.flipped[:, -1].any()
  # First flips: the smallest c whose closed-form prediction is the target (NaN: none).
  for m in range(3):
    for i in range(3):
      hits = [c for j, c in enumerate(cs) if sweep.flipped[m, j, i]]
      any_dr = [c for j, c in enumerate(cs) if sweep.flipped_any_dr[m, j, i]]
      np.testing.assert_equal(sweep.first_flip[m, i], min(hits) if hits else np.nan)
      np.testing.assert_equal(sweep.first_flip_any_dr[m, i], min(any_dr) if any_dr else np.nan)
  assert np.all(sweep.first_flip_any_dr <= np.nan_to_num(sweep.first_flip, nan=np.inf))
  rows = cf.flip_rate_table(sweep)
  assert len(rows) == 3 * len(cs)
  assert rows[-1]["method"] == "gradient_support" and rows[-1]["c"] == cs[-1]
  np.testing.assert_allclose([r["flip_rate"] for r in rows],
                             sweep.flipped.mean(axis=-1).ravel())
  np.testing.assert_allclose([r["flip_rate_any_dr"] for r in rows],
                             sweep.flipped_any_dr.mean(axis=-1).ravel())
  np.testing.assert_allclose([r["std_total_variation"] for r in rows],
                             sweep.total_variation.astype(np.float64).std(axis=-1).ravel(),
                             rtol=1e-6)
  np.testing.assert_allclose([r["mean_quantity_change"] for r in rows],
                             (sweep.quantity - sweep.original_quantity).mean(-1).ravel(),
                             rtol=1e-4, atol=1e-6)
  table = cf.flip_rate_markdown(sweep)
  assert table.count("\n| ig |") == len(cs) and "flip rate" in table and "any DR" in table
  per_image = cf.per_image_markdown(sweep, ["a", "b", "c"])
  assert per_image.count("\n| a |") == 3 and f"{sweep.original_quantity[0]:.4g}" in per_image
  with pytest.raises(cf.CounterfactualError, match="names"):
    cf.per_image_markdown(sweep, ["a"])


def test_directions_in_closed_form_and_the_support_restriction(linear):
  """Linear logits: dF/dx = w_t / 127.5 everywhere, IG = (x - 128) dF/dx, so the IG
  direction is |x - 128| w_t / 127.5 and vanishes exactly where x = 128, as the
  support-restricted gradient does, while the plain gradient does not."""
  w, b, x, logits_fn = linear
  x = x.copy()
  x[:, :3] = 128.0  # three rows at the baseline, like the area outside the field of view
  sweep = cf.counterfactual_sweep(logits_fn, x, [5.0], target_grade=1, steps=2, budget="l2",
                                  quantity="logit")
  gradient = np.broadcast_to(w[:, 1].reshape(SIZE, SIZE, 3) / 127.5, x.shape)
  directions = cf.method_directions(x, 128.0, sweep.attributions, sweep.gradient)
  np.testing.assert_allclose(directions["ig"], np.abs(x - 128) * gradient, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(directions["gradient"], gradient, rtol=1e-5)
  np.testing.assert_allclose(directions["gradient_support"], np.where(x != 128, gradient, 0),
                             rtol=1e-5)
  assert np.all(np.asarray(directions["ig"])[:, :3] == 0)
  # Each method's change has L2 exactly 5 (no clipping here) and raises F by 5 (g . d)/|d|.
  np.testing.assert_allclose(sweep.l2[:, 0], 5.0, rtol=1e-4)
  g = gradient.reshape(3, -1).astype(np.float64)
  for m, name in enumerate(sweep.methods):
    d = np.asarray(directions[name], np.float64).reshape(3, -1)
    rise = 5.0 * (g * d).sum(1) / np.linalg.norm(d, axis=1)
    np.testing.assert_allclose(sweep.quantity[m, 0] - sweep.original_quantity, rise, rtol=1e-3)
  # Only the plain gradient changes the baseline-valued rows.
  equal = cf.at_equal_l2(logits_fn, x, 128.0, sweep.attributions, sweep.gradient, 5.0)
  for name in ("ig", "gradient_support"):
    np.testing.assert_array_equal(getattr(equal, name)[:, :3], 128.0)
  assert np.abs(equal.gradient[:, :3] - 128.0).max() > 0


def test_the_other_direction_towards_grade_0(linear):
  """Images graded 2 pushed towards grade 0: F = P(grade 0) rises and the grade reaches 0."""
  w, b, x, _ = linear
  b2 = b.copy()
  b2[2] = b[0] + 2.0  # grade 2 leads grade 0 by 2 for every image
  logits_fn = jax.tree_util.Partial(_linear_logits, (jnp.asarray(w), jnp.asarray(b2)))
  cs = [0.0, 1.0, 100.0, 1000.0]
  sweep = cf.counterfactual_sweep(logits_fn, x, cs, target_grade=0, steps=2, budget="l2")
  assert (sweep.original_predicted >= 1).all()
  np.testing.assert_allclose(sweep.original_probability,
                             _softmax(_numpy_logits(w, b2, x))[:, 0], rtol=1e-4)
  assert np.all(sweep.quantity[:, 1] > sweep.original_quantity)
  assert sweep.flipped[:, -1].all()
  np.testing.assert_array_equal(sweep.flipped, sweep.predicted == 0)
  assert "any DR" not in cf.flip_rate_markdown(sweep)


def _softmax(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def test_equal_l2_scaling_is_exact_and_clipping_shrinks(linear):
  w, _, x, logits_fn = linear
  rng = np.random.default_rng(2)
  attributions = rng.normal(size=x.shape).astype(np.float32)
  gradient = rng.normal(size=x.shape).astype(np.float32) * 1e-3
  budget = np.array([5.0, 20.0, 0.0], np.float32)
  out = cf.at_equal_l2(logits_fn, x, 128.0, attributions, gradient, budget)
  # x lies in [40, 215]: changes of L2 <= 20 never reach the clip.
  for name in cf.METHODS:
    np.testing.assert_allclose(out.statistics[name]["l2"], budget, rtol=1e-5, atol=1e-5)
  direction = np.sign(x - 128) * attributions
  np.testing.assert_allclose(out.coefficients[0], budget / np.sqrt((direction ** 2).sum((1, 2, 3))),
                             rtol=1e-5)
  np.testing.assert_allclose(out.ig, cf.ig_counterfactual(x, 128.0, attributions,
                                                          out.coefficients[0][:, None, None, None]),
                             rtol=1e-6)
  np.testing.assert_array_equal(out.ig[2], x[2])
  assert out.predicted.shape == (3, 3) and out.coefficients.shape == (3, 3)
  big = cf.at_equal_l2(logits_fn, x, 128.0, attributions, gradient, 5000.0)
  for name in cf.METHODS:
    image = getattr(big, name)
    assert image.min() >= 0 and image.max() <= 255
    assert np.all(big.statistics[name]["l2"] < 5000.0)


def test_counterfactual_figure_renders(linear):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  _, _, x, _ = linear
  rng = np.random.default_rng(3)
  ig_image = np.clip(x[0] + rng.normal(size=x[0].shape) * 20, 0, 255)
  grad_image = np.clip(x[0] - 30, 0, 255)
  fig = cf.counterfactual_figure(x[0], ig_image, grad_image,
                                 info={"original_grade": 0, "ig_grade": 1, "gradient_grade": 0,
                                       "true_grade": 1, "title": "image 0"})
  assert len(fig.axes) == 6
  assert "grade 1" in fig.axes[1].get_title() and "L2" in fig.axes[1].get_title()
  buffer = io.BytesIO()
  FigureCanvasAgg(fig).print_png(buffer)
  buffer.seek(0)
  pixels = matplotlib.image.imread(buffer)[..., :3]
  assert pixels.std() > 0.05 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


def _smooth_logits(params, x):
  w1, w2 = params
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def test_small_steps_raise_f_along_every_direction_on_a_smooth_model():
  """A tanh network and softmax F: for a step small enough, F(x + s d/|d|) - F(x) =
  s (dF/dx . d)/|d| + O(s^2). dF/dx . d is |dF/dx|^2 > 0 for the gradient (on its support
  too), and positive here for the IG direction (path-averaged gradient weighted by
  |x - b|), so F rises along each, by the first-order amount."""
  rng = np.random.default_rng(10)
  w1 = jnp.asarray(rng.normal(size=(SIZE * SIZE * 3, 16)) * 0.1, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  logits_fn = jax.tree_util.Partial(_smooth_logits, (w1, w2))
  x = rng.uniform(20, 235, size=(2, SIZE, SIZE, 3)).astype(np.float32)
  x[:, :2] = 128.0
  budgets = [0.0, 0.05]
  sweep = cf.counterfactual_sweep(logits_fn, x, budgets, target_grade=1, steps=32,
                                  method="gausslegendre", budget="l2")
  rise = np.asarray(sweep.quantity[:, 1], np.float64) - sweep.original_quantity
  assert np.all(rise > 0), rise
  g = sweep.gradient.reshape(2, -1).astype(np.float64)
  directions = cf.method_directions(x, 128.0, sweep.attributions, sweep.gradient)
  for m, name in enumerate(sweep.methods):
    d = np.asarray(directions[name], np.float64).reshape(2, -1)
    np.testing.assert_allclose(rise[m], 0.05 * (g * d).sum(1) / np.linalg.norm(d, axis=1),
                               rtol=0.05)


# ------------------------------------------------------------------------------
# The tiny Inception model, randomly initialised.


def _random_variables(model, seed=0):
  """He-normal kernels, small biases, unit BatchNorm statistics (no init compile)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      scale = np.sqrt(2.0 / np.prod(s.shape[:-1]))
    elif "var" in name:
      return jnp.ones(s.shape, s.dtype)
    else:
      scale = 0.1
    return jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_small_steps_raise_f_on_the_tiny_model():
  model = classifier.build_model(model_config.get_model_config("tiny"))
  logits_fn = jax.tree_util.Partial(model.apply, _random_variables(model))
  rng = np.random.default_rng(4)
  x = rng.uniform(20, 235, size=(2, 75, 75, 3)).astype(np.float32)
  budgets = [0.0, 0.25, 1.0]
  # chunk_size=1: IG and the gradient share one compiled program (see pixel_gradient).
  sweep = cf.counterfactual_sweep(logits_fn, x, budgets, target_grade=1, steps=4, budget="l2",
                                  chunk_size=1)
  np.testing.assert_allclose(sweep.quantity[:, 0], np.broadcast_to(sweep.original_quantity,
                                                                    (3, 2)))
  np.testing.assert_allclose(sweep.l2[:, 1:], np.broadcast_to(
      np.array(budgets[1:])[None, :, None], (3, 2, 2)), rtol=1e-4)
  rise = sweep.quantity[:, 1:] - sweep.quantity[:, :1]
  assert np.all(rise > 0), rise
  # First order: F(x + s d/|d|) - F(x) ~= s (dF/dx . d) / |d| for each direction d.
  g = sweep.gradient.reshape(2, -1).astype(np.float64)
  directions = [np.sign(x - 128.0).reshape(2, -1) * sweep.attributions.reshape(2, -1), g,
                np.where(x != 128.0, sweep.gradient, 0).reshape(2, -1)]
  for m, d in enumerate(directions):
    slope = (g * d).sum(axis=1) / np.linalg.norm(d, axis=1)
    np.testing.assert_allclose(rise[m, 0], 0.25 * slope, rtol=0.1)
