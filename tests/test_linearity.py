"""The linearity experiment on constructed models with known answers.

A small Flax module with drig's layer protocol (named layers fc1, fc2, logits;
start_layer / stop_layer) stands in for the DR classifier, so the experiment
runs through the same layer-access and layer-IG code as on Inception.
"""

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from drig.analysis import linearity
from drig.attribution.integration import half_gray_baseline

SHAPE = (4, 4, 3)
D = int(np.prod(SHAPE))


class HeadNet(nn.Module):
  """flatten -> fc1 (activation) -> fc2 (linear) -> logits (5); drig's layer protocol."""
  widths: tuple = (6, 4)
  activation: str = "linear"

  def layer_names(self):
    return ("fc1", "fc2", "logits")

  def canonical_layer(self, name):
    if name not in self.layer_names():
      raise ValueError(f"no layer {name!r}")
    return name

  @nn.compact
  def __call__(self, x, train=False, *, start_layer=None, stop_layer=None):
    del train
    act = nn.relu if self.activation == "relu" else (lambda h: h)
    stages = [("fc1", lambda h: act(nn.Dense(self.widths[0], name="fc1")(
                  h.reshape(h.shape[0], -1)))),
              ("fc2", nn.Dense(self.widths[1], name="fc2")),
              ("logits", nn.Dense(5, name="logits"))]
    names = [name for name, _ in stages]
    first = 0 if start_layer is None else names.index(start_layer) + 1
    for name, stage in stages[first:]:
      x = stage(x)
      if name == stop_layer:
        return x
    return x


def _dense(kernel, bias):
  return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def test_exponential_cs():
  np.testing.assert_allclose(linearity.exponential_cs(1e-3, 2.0, 4), [1e-3, 2e-3, 4e-3, 8e-3])
  with pytest.raises(linearity.LinearityError):
    linearity.exponential_cs(0.0)


def test_gradient_perturbations_follow_the_gradient():
  a = jnp.asarray(np.random.default_rng(0).normal(size=(2, D)), jnp.float32)
  q = jax.tree_util.Partial(lambda a, z: jnp.sum(a * z ** 2, axis=-1), a)
  x = np.random.default_rng(1).normal(size=(2, D)).astype(np.float32)
  cs = [0.0, 0.5, 2.0]
  out = linearity.gradient_perturbations(q, x, cs)
  assert out.shape == (3, 2, D)
  for j, c in enumerate(cs):
    np.testing.assert_allclose(out[j], x + c * 2 * np.asarray(a) * x, rtol=1e-5, atol=1e-6)
  clipped = linearity.gradient_perturbations(q, x, cs, clip=(-1.0, 1.0))
  assert float(jnp.abs(clipped).max()) <= 1.0


def test_fit_matches_polyfit_and_linregress():
  rng = np.random.default_rng(2)
  cs = linearity.exponential_cs(1e-2, 1.7, 9)
  y = rng.normal(size=(9, 3, 7)) + 3.0 * cs[:, None, None] * rng.normal(size=(1, 3, 7))
  fit = linearity.fit_linearity(cs, y)
  assert fit.r2.shape == (3, 7)
  for n in range(3):
    for u in range(7):
      slope, intercept = np.polyfit(cs, y[:, n, u], 1)
      reference = scipy.stats.linregress(cs, y[:, n, u])
      np.testing.assert_allclose(fit.slope[n, u], slope, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(fit.intercept[n, u], intercept, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(fit.slope[n, u], reference.slope, rtol=1e-9)
      np.testing.assert_allclose(fit.r2[n, u], reference.rvalue ** 2, rtol=1e-9, atol=1e-12)
  assert not fit.constant.any()


def test_constant_series_is_inactive_not_linear_and_special_units_sorted():
  cs = np.arange(5.0)
  y = np.stack([np.full(5, 2.0), np.zeros(5), 1.5 * cs - 1, np.array([0., 1, 0, 1, 0]),
                np.array([0., 1, 2, 2, 2])], axis=-1)
  fit = linearity.fit_linearity(cs, y)
  # A constant series is inactive: R^2 undefined (NaN), never 1; slope 0.
  assert np.isnan(fit.r2[:2]).all()
  np.testing.assert_array_equal(fit.slope[:2], 0.0)
  np.testing.assert_allclose(fit.r2[2], 1.0)
  np.testing.assert_array_equal(fit.constant, [True, True, False, False, False])
  np.testing.assert_array_equal(linearity.inactive_units(fit), [0, 1])
  assert fit.r2[3] < fit.r2[4] < 0.9
  np.testing.assert_array_equal(linearity.special_units(fit, 0.9), [3, 4])
  # Per image [N, U]: a unit is special if any image's active series is non-linear ("min");
  # unit 3 is inactive for the second image and still special from the first.
  stacked = linearity.LinearFit(*(np.stack([f, f[[3, 1, 2, 0, 4]]]) for f in fit))
  np.testing.assert_array_equal(linearity.special_units(stacked, 0.9), [0, 3, 4])
  np.testing.assert_array_equal(linearity.inactive_units(stacked), [1])
  with pytest.raises(linearity.LinearityError):
    linearity.fit_linearity([1.0, 1.0], np.zeros((2, 3)))


def _linear_variables(rng, widths=(6, 4)):
  return {"params": {
      "fc1": _dense(rng.normal(size=(D, widths[0])) / np.sqrt(D), rng.normal(size=widths[0])),
      "fc2": _dense(rng.normal(size=widths) / np.sqrt(widths[0]), rng.normal(size=widths[1])),
      "logits": _dense(rng.normal(size=(widths[1], 5)) / np.sqrt(widths[1]),
                       rng.normal(size=5))}}


def test_fully_linear_model_is_exactly_linear():
  rng = np.random.default_rng(3)
  model, variables = HeadNet(), _linear_variables(rng)
  x = rng.uniform(-1, 1, size=(2,) + SHAPE).astype(np.float32)
  cs = linearity.exponential_cs(1e-2, 2.0, 8)
  grade = 3
  result = linearity.linearity_experiment(model, variables, x, grade=grade, cs=cs, steps=4)
  assert result.space == "logit"  # the default: an unbounded quantity
  assert result.attributions["fc1"].shape == (8, 2, 6)
  assert result.attributions["fc2"].shape == (8, 2, 4)
  assert result.quantity.shape == (8, 2)
  for layer in ("fc1", "fc2"):
    np.testing.assert_allclose(result.fits[layer].r2, 1.0, atol=1e-6)
    assert result.special[layer].size == 0
  # Independent slope: logit = v . fc1(x) + const, so LIG_j(c) = (a_j(c) - a'_j) v_j with
  # a(c) = W1 (x + c g) + b1 and g = W1^T v: slope_j = (W1 W1^T v)_j v_j.
  p = variables["params"]
  w1 = np.asarray(p["fc1"]["kernel"], np.float64)
  v = np.asarray(p["fc2"]["kernel"], np.float64) @ np.asarray(p["logits"]["kernel"],
                                                               np.float64)[:, grade]
  expected = (w1.T @ (w1 @ v)) * v
  np.testing.assert_allclose(result.fits["fc1"].slope, np.broadcast_to(expected, (2, 6)),
                             rtol=1e-4)
  # The poster's explanation, measured: the averaged gradient g_j = LIG_j / delta_j is v_j at
  # every c (drift 0), the difference term delta_j(c) = (W1^T (x + c g - x'))_j is affine in
  # c, and the input moved exactly c ||g|| (in pixels: times 127.5).
  g = np.asarray(result.average_gradients["fc1"])
  np.testing.assert_allclose(g, np.broadcast_to(v, g.shape), rtol=1e-3)
  np.testing.assert_allclose(linearity.average_gradient_drift(result, "fc1"), 0.0, atol=1e-3)
  w_total = w1 @ v
  x_flat = x.reshape(2, -1).astype(np.float64)
  baseline = np.full(D, 128 / 127.5 - 1)
  delta = (x_flat[None] + cs[:, None, None] * w_total - baseline) @ w1
  np.testing.assert_allclose(result.differences["fc1"], delta, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(result.distance, 127.5 * cs[:, None] * np.linalg.norm(w_total)
                             * np.ones((1, 2)), rtol=1e-5)
  summary = linearity.layer_summary(result, "fc1")
  assert summary["active_series"] == 12 and summary["inactive_series"] == 0
  assert summary["linear_series"] == 12 and summary["special_units"] == []
  np.testing.assert_allclose(summary["median_slope"], np.median(expected), rtol=1e-4)


def test_probability_attributions_stay_bounded_while_logit_ones_grow():
  """Completeness: the units' attributions sum to q(x(c)) - q(baseline) (within quadrature
  error). For the probability that is below 1 at every c; for the logit of a linear model
  it grows linearly in c without bound, the growth the poster describes."""
  rng = np.random.default_rng(9)
  model, variables = HeadNet(), _linear_variables(rng)
  x = rng.uniform(-1, 1, size=(1,) + SHAPE).astype(np.float32)
  cs = linearity.exponential_cs(1.0, 4.0, 5)
  totals = {}
  for space in ("probability", "logit"):
    result = linearity.linearity_experiment(model, variables, x, grade=2, cs=cs, steps=16,
                                            space=space, layers=("fc2",))
    assert result.space == space
    totals[space] = result.attributions["fc2"].sum(axis=-1)[:, 0]
  assert np.all(np.abs(totals["probability"]) < 1.0)
  growth = np.diff(totals["logit"]) / np.diff(cs)
  np.testing.assert_allclose(growth, growth[0], rtol=1e-3)
  assert totals["logit"][-1] > 100 * abs(totals["probability"][-1])
  assert linearity.quantity_label(2, "logit") == "logit of grade 2"
  with pytest.raises(linearity.LinearityError, match="space"):
    linearity.quantity_label(2, "odds")


def test_dead_unit_is_inactive_not_perfectly_linear():
  rng = np.random.default_rng(7)
  # Orthonormal fc1 columns: the gradient moves the live units' pre-activations by c * v_j
  # and the dead unit's by 0, so unit 5 (pre-activation -50) stays off at every c and at
  # the baseline, while units 0-4 (pre-activation 5) stay on: exactly linear.
  w1 = np.linalg.qr(rng.normal(size=(D, 6)))[0]
  v = np.array([1.0, -0.7, 0.5, 0.9, -0.4, 2.0])
  w2 = np.zeros((6, 4))
  w2[:, 0] = v
  w3 = np.zeros((4, 5))
  w3[0, 1] = 1.0
  x = rng.uniform(-0.5, 0.5, size=(2,) + SHAPE).astype(np.float32)
  b1 = np.array([5.0, 5, 5, 5, 5, -50]) - x.reshape(2, -1)[0] @ w1
  x[1] = x[0]  # one bias serves both images
  variables = {"params": {"fc1": _dense(w1, b1), "fc2": _dense(w2, np.zeros(4)),
                          "logits": _dense(w3, np.zeros(5))}}
  cs = linearity.exponential_cs(1e-3, 2.0, 8)
  result = linearity.linearity_experiment(HeadNet(activation="relu"), variables, x, grade=1,
                                          cs=cs, steps=4, layers=("fc1",))
  fit = result.fits["fc1"]
  np.testing.assert_array_equal(result.attributions["fc1"][:, :, 5], 0.0)
  assert fit.constant[:, 5].all() and np.isnan(fit.r2[:, 5]).all()
  np.testing.assert_allclose(fit.r2[:, :5], 1.0, atol=1e-6)
  np.testing.assert_array_equal(result.inactive["fc1"], [5])
  assert result.special["fc1"].size == 0
  summary = linearity.layer_summary(result, "fc1")
  assert summary["active_series"] == 10 and summary["inactive_series"] == 2
  assert summary["inactive_units"] == [5] and summary["linear_series"] == 10
  np.testing.assert_allclose(summary["min_r2"], 1.0, atol=1e-6)
  # The dead unit has no averaged gradient (delta = 0): NaN, not a number made up.
  assert np.isnan(result.average_gradients["fc1"][:, :, 5]).all()


def test_relu_unit_switching_off_is_special():
  rng = np.random.default_rng(4)
  widths = (6, 4)
  # Orthonormal fc1 rows: moving x along the gradient changes unit j's
  # pre-activation by c * v_j (v = fc1 -> logit weights), so each unit's fate is set.
  w1 = np.linalg.qr(rng.normal(size=(D, widths[0])))[0]       # [D, 6], orthonormal columns
  v = np.array([-1.0, 0.8, -0.6, 1.0, 0.5, -0.9])
  w2 = np.zeros(widths)
  w2[:, 0] = v                                                  # fc2 unit 0 carries v . fc1
  w3 = np.zeros((widths[1], 5))
  w3[0, 2] = 1.0                                                # logit 2 = fc2 unit 0
  x = rng.uniform(-0.5, 0.5, size=(1,) + SHAPE).astype(np.float32)
  # Pre-activations at c = 0: unit 0 at 0.1 (off at c = 0.1, mid-sweep); the rest at 5.
  target = np.array([0.1, 5, 5, 5, 5, 5])
  b1 = target - x.reshape(1, -1)[0] @ w1
  variables = {"params": {"fc1": _dense(w1, b1), "fc2": _dense(w2, np.zeros(4)),
                          "logits": _dense(w3, np.zeros(5))}}
  cs = linearity.exponential_cs(1e-3, 2.0, 10)
  result = linearity.linearity_experiment(HeadNet(activation="relu"), variables, x, grade=2,
                                          cs=cs, steps=4, space="logit", layers=("fc1",))
  fit = result.fits["fc1"]
  np.testing.assert_array_equal(result.special["fc1"], [0])
  assert fit.r2[0, 0] < 0.9
  np.testing.assert_allclose(fit.r2[0, 1:], 1.0, atol=1e-6)
  # The switched-off unit's attribution stops changing once z_0 = 0.1 - c < 0.
  a0 = result.attributions["fc1"][:, 0, 0]
  off = cs > 0.1
  np.testing.assert_allclose(a0[off], a0[off][0], rtol=1e-6)
  assert np.all(np.diff(a0[~off]) > 0)


def test_hinton_figure_shows_both_colours():
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  matrix = rng.normal(size=(6, 80)) * np.linspace(0.1, 3, 6)[:, None]
  fig = linearity.hinton_figure(matrix, title="fc1", row_labels=[f"{c:.3g}" for c in range(6)],
                                max_units=32)
  ax = fig.axes[0]
  assert len(ax.get_xticks()) == 32
  # The 32 columns kept are the units with the largest peak |value|.
  kept = sorted(int(t.get_text()) for t in ax.get_xticklabels())
  np.testing.assert_array_equal(kept, np.sort(np.argsort(-np.abs(matrix).max(0))[:32]))
  buffer = io.BytesIO()
  FigureCanvasAgg(fig).print_png(buffer)
  buffer.seek(0)
  pixels = matplotlib.image.imread(buffer)[..., :3]
  assert pixels.std() > 0.05
  green = (pixels[..., 1] > 0.5) & (pixels[..., 0] < 0.2) & (pixels[..., 2] < 0.2)
  red = (pixels[..., 0] > 0.6) & (pixels[..., 1] < 0.2) & (pixels[..., 2] < 0.2)
  assert green.sum() > 100 and red.sum() > 100
  # Square areas are |value| / max|value| (the largest fills its cell).
  boxes = [path.get_extents() for path in ax.collections[0].get_paths()]
  areas = np.sort([box.width * box.height for box in boxes])
  magnitudes = np.abs(matrix[:, np.argsort(-np.abs(matrix).max(0))[:32]])
  np.testing.assert_allclose(areas, np.sort(magnitudes.ravel() / magnitudes.max()), rtol=1e-6)
  with pytest.raises(linearity.LinearityError):
    linearity.hinton_figure(np.zeros(3))
  # The colour-blind palette: blue squares for, orange against, no green or red.
  fig = linearity.hinton_figure(matrix, max_units=32, palette="colorblind")
  buffer = io.BytesIO()
  FigureCanvasAgg(fig).print_png(buffer)
  buffer.seek(0)
  pixels = matplotlib.image.imread(buffer)[..., :3]
  blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.1) & (np.abs(pixels[..., 1] - 0.447) < 0.1)
  orange = (pixels[..., 0] > 0.8) & (np.abs(pixels[..., 1] - 0.624) < 0.1) & (pixels[..., 2] < 0.1)
  green = (pixels[..., 1] > 0.5) & (pixels[..., 0] < 0.2) & (pixels[..., 2] < 0.2)
  assert blue.sum() > 100 and orange.sum() > 100 and green.sum() == 0


def test_hinton_figure_marks_special_units_and_has_a_legend():
  rng = np.random.default_rng(8)
  matrix = rng.normal(size=(5, 60))
  matrix[:, 7] *= 1e-3  # a faint special unit is still drawn when columns are cut
  fig = linearity.hinton_figure(matrix, title="fc2", special=[7, 20], max_units=16,
                                special_label="special unit (R^2 < 0.9)")
  ax = fig.axes[0]
  labels = [t.get_text() for t in ax.get_xticklabels()]
  assert len(labels) == 16 and "7*" in labels and "20*" in labels
  assert sum(label.endswith("*") for label in labels) == 2
  outlines = ax.collections[1].get_paths()
  assert len(outlines) == 2
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert {"positive", "negative", "special unit (R^2 < 0.9)"} <= set(legend)
  sizes = [t for t in legend if t.startswith("|attribution|")]
  peak = np.abs(matrix[:, sorted(int(l.rstrip("*")) for l in labels)]).max()
  assert sizes == [f"|attribution| {peak:.3g}", f"|attribution| {peak / 4:.3g}"]
  # Readable at report size: at most 14 inches wide, labels of 8 points or more.
  assert fig.get_figwidth() <= 14 and min(t.get_fontsize() for t in ax.get_xticklabels()) >= 8
  with pytest.raises(linearity.LinearityError, match="special"):
    linearity.hinton_figure(matrix, special=[60])


def test_unit_attributions_is_layer_ig_per_unit():
  rng = np.random.default_rng(6)
  model, variables = HeadNet(activation="relu"), _linear_variables(rng)
  x = rng.uniform(-1, 1, size=(3,) + SHAPE).astype(np.float32)
  out = linearity.unit_attributions(model, variables, x, layers=("fc1", "fc2"), grade=1,
                                    steps=8)
  logits_fn = jax.tree_util.Partial(model.apply, variables)
  prob = jax.nn.softmax(logits_fn(jnp.asarray(x)))[:, 1]
  prob0 = jax.nn.softmax(logits_fn(half_gray_baseline(jnp.asarray(x))))[0, 1]
  for layer, width in (("fc1", 6), ("fc2", 4)):
    assert out[layer].shape == (3, width) and out[layer].dtype == np.float32
    # Completeness within the quadrature error of 8 steps.
    np.testing.assert_allclose(out[layer].sum(axis=1), prob - prob0, atol=2e-3)
