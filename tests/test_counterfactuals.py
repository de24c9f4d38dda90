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
  assert sweep.methods == ("ig", "gradient")
  for name in ("predicted", "probability", "quantity", "l2", "total_variation",
               "image_total_variation", "high_frequency_energy", "flipped"):
    assert getattr(sweep, name).shape == (2, len(cs), 3), name
  gradient = np.broadcast_to(w[:, 1].reshape(SIZE, SIZE, 3) / 127.5, x.shape)
  np.testing.assert_allclose(sweep.gradient, gradient, rtol=1e-5)
  np.testing.assert_allclose(sweep.attributions, (x - 128.0) * gradient, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(sweep.original_predicted, 0)
  for j, c in enumerate(cs):
    images = [np.clip(x + c * np.sign(x - 128) * (x - 128) * gradient, 0, 255),
              np.clip(x + c * gradient, 0, 255)]
    for m, image in enumerate(images):
      logits = _numpy_logits(w, b, image)
      np.testing.assert_array_equal(sweep.predicted[m, j], logits.argmax(axis=1))
      np.testing.assert_allclose(sweep.quantity[m, j], logits[:, 1], rtol=1e-4, atol=1e-4)
      np.testing.assert_array_equal(sweep.flipped[m, j], logits.argmax(axis=1) == 1)
      np.testing.assert_allclose(sweep.l2[m, j], np.sqrt(((image - x) ** 2).sum(axis=(1, 2, 3))),
                                 rtol=1e-4, atol=1e-3)
  # F rises with c for both methods (sum w^2 |x - b| > 0), and the sweep reaches flips.
  assert np.all(np.diff(sweep.quantity, axis=1) >= 0)
  assert np.all(sweep.quantity[:, 1] > sweep.quantity[:, 0])
  assert not sweep.flipped[:, 0].any() and sweep.flipped[:, -1].any()
  rows = cf.flip_rate_table(sweep)
  assert len(rows) == 2 * len(cs)
  assert rows[-1]["method"] == "gradient" and rows[-1]["c"] == cs[-1]
  np.testing.assert_allclose([r["flip_rate"] for r in rows],
                             sweep.flipped.mean(axis=-1).ravel())
  table = cf.flip_rate_markdown(sweep)
  assert table.count("\n| ig |") == len(cs) and "flip rate" in table


def test_equal_l2_scaling_is_exact_and_clipping_shrinks(linear):
  w, _, x, logits_fn = linear
  rng = np.random.default_rng(2)
  attributions = rng.normal(size=x.shape).astype(np.float32)
  gradient = rng.normal(size=x.shape).astype(np.float32) * 1e-3
  budget = np.array([5.0, 20.0, 0.0], np.float32)
  out = cf.at_equal_l2(logits_fn, x, 128.0, attributions, gradient, budget)
  # x lies in [40, 215]: changes of L2 <= 20 never reach the clip.
  for name in ("ig", "gradient"):
    np.testing.assert_allclose(out.statistics[name]["l2"], budget, rtol=1e-5, atol=1e-5)
  direction = np.sign(x - 128) * attributions
  np.testing.assert_allclose(out.coefficients[0], budget / np.sqrt((direction ** 2).sum((1, 2, 3))),
                             rtol=1e-5)
  np.testing.assert_allclose(out.ig, cf.ig_counterfactual(x, 128.0, attributions,
                                                          out.coefficients[0][:, None, None, None]),
                             rtol=1e-6)
  np.testing.assert_array_equal(out.ig[2], x[2])
  assert out.predicted.shape == (2, 3)
  big = cf.at_equal_l2(logits_fn, x, 128.0, attributions, gradient, 5000.0)
  for name in ("ig", "gradient"):
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
                                                                    (2, 2)))
  np.testing.assert_allclose(sweep.l2[:, 1:], np.broadcast_to(
      np.array(budgets[1:])[None, :, None], (2, 2, 2)), rtol=1e-4)
  rise = sweep.quantity[:, 1:] - sweep.quantity[:, :1]
  assert np.all(rise > 0), rise
  # First order: F(x + s d/|d|) - F(x) ~= s (dF/dx . d) / |d| for each direction d.
  g = sweep.gradient.reshape(2, -1).astype(np.float64)
  directions = [np.sign(x - 128.0).reshape(2, -1) * sweep.attributions.reshape(2, -1), g]
  for m, d in enumerate(directions):
    slope = (g * d).sum(axis=1) / np.linalg.norm(d, axis=1)
    np.testing.assert_allclose(rise[m, 0], 0.25 * slope, rtol=0.1)
