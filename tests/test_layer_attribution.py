"""Layer IG, layer conductance, active regions, top-k and the resultant shortcut.

Checked against definitions and constructed cases: completeness, the explicit
path integral, linearity (the resultant region as one integration equals the
weighted sum of the individual ones), and sorted selections.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drig import attribution

DN = ("NHWC", "HWIO", "NHWC")


def _to_layer(p, x):
  h = jax.lax.conv_general_dilated(x, p["w1"], (1, 1), "SAME", dimension_numbers=DN)
  return jax.nn.relu(h + p["b1"])


def _to_layer_linear(p, x):
  return jax.lax.conv_general_dilated(x, p["w1"], (2, 2), "SAME", dimension_numbers=DN)


def _from_layer(p, a):
  h = jax.lax.conv_general_dilated(a, p["w2"], (2, 2), "SAME", dimension_numbers=DN)
  return jnp.tanh(jax.nn.softplus(h).mean(axis=(1, 2)) @ p["v"])


@pytest.fixture(scope="module")
def net():
  rng = np.random.default_rng(0)
  p = {"w1": rng.normal(size=(3, 3, 3, 6)).astype(np.float32) * 0.4,
       "b1": rng.normal(size=(6,)).astype(np.float32) * 0.1,
       "w2": rng.normal(size=(3, 3, 6, 4)).astype(np.float32) * 0.4,
       "v": rng.normal(size=(4,)).astype(np.float32)}
  x = rng.uniform(-1, 1, size=(3, 10, 10, 3)).astype(np.float32)
  to_layer = jax.tree_util.Partial(_to_layer, p)
  from_layer = jax.tree_util.Partial(_from_layer, p)
  return p, x, attribution.half_gray_baseline(x), to_layer, from_layer


def test_layer_ig_is_ig_in_activation_space(net):
  _, x, b, to_layer, from_layer = net
  result = attribution.layer_integrated_gradients(to_layer, from_layer, x, b, steps=16,
                                                  method="gausslegendre")
  a, a0 = to_layer(x), to_layer(b)
  assert result.baseline_activations.shape == (1, 10, 10, 6)  # the baseline runs once
  np.testing.assert_allclose(result.activations, a, rtol=1e-6)
  np.testing.assert_allclose(result.baseline_activations, a0, rtol=1e-6)
  expected, gap = attribution.integrated_gradients(from_layer, a, a0, steps=16,
                                                   method="gausslegendre")
  np.testing.assert_allclose(result.units, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(result.channels, np.asarray(expected).sum(axis=(1, 2)),
                             rtol=1e-5, atol=1e-7)
  # Completeness in the quantity: sum = q(x) - q(baseline), q = from_layer(to_layer(.)).
  change = from_layer(a) - from_layer(a0)
  np.testing.assert_allclose(np.asarray(result.units).sum(axis=(1, 2, 3)) - result.gap, change,
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(result.gap).max()) < 1e-4 * float(jnp.abs(change).max())


def test_layer_ig_runs_to_layer_twice_not_per_step(net):
  p, x, b, _, from_layer = net
  batches = []

  def counting_to_layer(params, z):
    batches.append(z.shape[0])  # at trace time, once per call
    return _to_layer(params, z)

  attribution.layer_integrated_gradients(jax.tree_util.Partial(counting_to_layer, p),
                                         from_layer, x, b, steps=12, chunk_size=3)
  # eval_shape may trace too; only instance (N) and baseline (1) batches, never N x chunk.
  assert set(batches) <= {x.shape[0], 1} and batches.count(1) >= 1


def test_conductance_equals_layer_ig_when_to_layer_is_linear(net):
  p, x, b, _, from_layer = net
  linear = jax.tree_util.Partial(_to_layer_linear, p)
  head = jax.tree_util.Partial(
      lambda q, a: jnp.tanh(jax.nn.softplus(a).mean(axis=(1, 2)) @ q["v"][:1].repeat(6) / 6), p)
  for method in ("riemann_right", "gausslegendre"):
    lig = attribution.layer_integrated_gradients(linear, head, x, b, steps=8, method=method)
    cond = attribution.layer_conductance(linear, head, x, b, steps=8, method=method)
    np.testing.assert_allclose(cond.units, lig.units, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(lig.units).max()))


def test_conductance_is_complete_and_differs_from_layer_ig_through_relu(net):
  _, x, b, to_layer, from_layer = net
  cond = attribution.layer_conductance(to_layer, from_layer, x, b, steps=64,
                                       method="gausslegendre")
  lig = attribution.layer_integrated_gradients(to_layer, from_layer, x, b, steps=64,
                                               method="gausslegendre")
  total = float(jnp.abs(cond.units).sum())
  assert float(jnp.abs(cond.gap).max()) < 1e-2 * total
  # Same totals (both complete), different distributions over units.
  np.testing.assert_allclose(cond.units.sum(axis=(1, 2, 3)) - cond.gap,
                             lig.units.sum(axis=(1, 2, 3)) - lig.gap, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(cond.units - lig.units).max()) > 1e-3 * float(jnp.abs(lig.units).max())


def test_select_top_k_constructed():
  scores = np.array([[0.5, -2.0, 3.0, 0.0, -0.1, 1.5],
                     [-1.0, -3.0, 2.0, 4.0, -0.5, 0.2]], np.float32)
  top = attribution.select_top_k(scores, 2)
  np.testing.assert_array_equal(top.positive, [[2, 5], [3, 2]])
  np.testing.assert_array_equal(top.positive_scores, [[3.0, 1.5], [4.0, 2.0]])
  np.testing.assert_array_equal(top.negative, [[1, 4], [1, 0]])
  np.testing.assert_array_equal(top.negative_scores, scores[[[0], [1]], [[1, 4], [1, 0]]])
  # Units: flat indices into [H, W, C].
  units = np.zeros((1, 2, 3, 4), np.float32)
  units[0, 1, 2, 3], units[0, 0, 1, 2] = 5.0, -7.0
  top = attribution.select_top_k(units, 1)
  assert np.unravel_index(int(top.positive[0, 0]), (2, 3, 4)) == (1, 2, 3)
  assert np.unravel_index(int(top.negative[0, 0]), (2, 3, 4)) == (0, 1, 2)
  with pytest.raises(ValueError, match="k = 7 exceeds the 6 units"):
    attribution.select_top_k(scores, 7)
  with pytest.raises(ValueError, match="k must be >= 1"):
    attribution.select_top_k(scores, 0)


def test_cotangent_builders():
  cot = attribution.unit_cotangents((2, 2, 3), [[5, 0]])
  assert cot.shape == (1, 2, 2, 2, 3)
  assert float(cot[0, 0, 0, 1, 2]) == 1.0 and float(cot[0, 0].sum()) == 1.0
  chan = attribution.channel_cotangents((2, 2, 3), [[1]])
  np.testing.assert_array_equal(chan[0, 0, ..., 1], np.ones((2, 2)))
  assert float(chan.sum()) == 4.0
  combined = attribution.combine_cotangents(jnp.concatenate([cot[:, :1], chan], axis=1),
                                            [[3.0, 2.0]])
  np.testing.assert_array_equal(combined, 3 * cot[:, :1] + 2 * chan)


def test_active_regions_match_per_neuron_integration(net):
  _, x, b, to_layer, _ = net
  layer_shape = (10, 10, 6)
  flat = np.array([[0, 333, 599], [17, 17, 250], [5, 6, 7]])
  cot = attribution.unit_cotangents(layer_shape, flat)
  regions = attribution.active_regions(to_layer, x, b, cot, steps=10, chunk_size=4)
  assert regions.regions.shape == (3, 3) + x.shape[1:]
  for n in range(3):
    for k in range(3):
      # The definition, one image and one neuron at a time: IG of its activation.
      def neuron(z, unit=flat[n, k]):
        return to_layer(z).reshape(z.shape[0], -1)[:, unit]
      expected, gap = attribution.integrated_gradients(neuron, x[n:n + 1], b, steps=10)
      np.testing.assert_allclose(regions.regions[n, k], expected[0], rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(regions.gap[n, k], gap[0], rtol=1e-4, atol=1e-6)


def test_resultant_region_equals_explicit_weighted_sum(net):
  _, x, b, to_layer, _ = net
  layer_shape = (10, 10, 6)
  cot = attribution.channel_cotangents(layer_shape, [[0, 3, 5], [1, 2, 4], [5, 5, 0]])
  weights = np.array([[0.7, -1.2, 2.0], [1.0, 1.0, 1.0], [0.0, 3.0, -0.5]], np.float32)
  individual = attribution.active_regions(to_layer, x, b, cot, steps=12, method="trapezoid")
  explicit = np.einsum("nk,nk...->n...", weights, np.asarray(individual.regions))
  region, gap = attribution.resultant_active_region(to_layer, x, b, cot, weights, steps=12,
                                                    method="trapezoid")
  np.testing.assert_allclose(region, explicit, rtol=1e-5,
                             atol=1e-6 * float(np.abs(explicit).max()))
  # Gaps are differences of sums over 300 pixels: compare at float32 resolution of those.
  np.testing.assert_allclose(gap, np.einsum("nk,nk->n", weights, individual.gap),
                             atol=1e-5 * float(np.abs(explicit).sum(axis=(1, 2, 3)).max()))


@pytest.mark.parametrize("individual", [True, False])
def test_lesion_detection_matches_its_parts(net, individual):
  _, x, b, to_layer, from_layer = net
  kw = dict(steps=8, method="riemann_right", chunk_size=4)
  out = attribution.lesion_detection(to_layer, from_layer, x, b, k=2,
                                     individual_regions=individual, **kw)
  full = jax.tree_util.Partial(lambda t, f, z: f(t(z)), to_layer, from_layer)
  pixels, gap = attribution.integrated_gradients(full, x, b, **kw)
  np.testing.assert_allclose(out.pixels, pixels, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out.pixel_gap, gap, rtol=1e-4, atol=1e-6)
  layer = attribution.layer_integrated_gradients(to_layer, from_layer, x, b, **kw)
  np.testing.assert_allclose(out.layer.channels, layer.channels, rtol=1e-6)
  top = attribution.select_top_k(layer.channels, 2)
  np.testing.assert_array_equal(out.top.positive, top.positive)
  cot = attribution.channel_cotangents((10, 10, 6), np.concatenate([top.positive, top.negative],
                                                                   axis=1))
  regions = attribution.active_regions(to_layer, x, b, cot, **kw).regions
  w = np.concatenate([np.maximum(top.positive_scores, 0), np.minimum(top.negative_scores, 0)],
                     axis=1)
  scale = float(jnp.abs(regions).max())
  if individual:
    np.testing.assert_allclose(out.positive_regions, regions[:, :2], atol=1e-5 * scale)
    np.testing.assert_allclose(out.negative_regions, regions[:, 2:], atol=1e-5 * scale)
  else:
    assert out.positive_regions is None
  resultant_scale = float(np.abs(np.einsum("nk,nk...->n...", w[:, :2], regions[:, :2])).max())
  np.testing.assert_allclose(out.positive_resultant,
                             np.einsum("nk,nk...->n...", w[:, :2], regions[:, :2]),
                             atol=1e-5 * resultant_scale)
  np.testing.assert_allclose(out.negative_resultant,
                             np.einsum("nk,nk...->n...", w[:, 2:], regions[:, 2:]),
                             atol=1e-5 * resultant_scale)


def test_bad_layer_calls(net):
  _, x, b, to_layer, from_layer = net
  with pytest.raises(ValueError, match=r"cotangents must be \[N, K, \*layer_shape\]"):
    attribution.active_regions(to_layer, x, b, jnp.zeros((3, 2, 10, 10, 5)), steps=2)
  with pytest.raises(ValueError, match="from_layer must map a batch"):
    attribution.layer_integrated_gradients(to_layer, lambda a: a.sum(axis=(1, 2)), x, b,
                                           steps=2)
  with pytest.raises(ValueError, match="baseline of shape"):
    attribution.layer_integrated_gradients(to_layer, from_layer, x, b[:, :5], steps=2)
  with pytest.raises(ValueError, match="derivative must be"):
    attribution.layer_conductance(to_layer, from_layer, x, b, derivative="finite")
  with pytest.raises(ValueError, match="by must be 'channel' or 'unit'"):
    attribution.lesion_detection(to_layer, from_layer, x, b, by="pixel")


def test_batch_groups_equal_the_whole_batch(net):
  p, x, b, to_layer, from_layer = net
  ig_lib = attribution.integration
  for groups in (1, 2, 3, 5):  # 3 images: parts of 2+1, 1+1+1, and never an empty part
    split = ig_lib.BatchGroups(to_layer, groups)
    np.testing.assert_allclose(split(x), to_layer(x), rtol=1e-6, atol=1e-6)
  # Pytree outputs are concatenated leaf by leaf.
  pair = ig_lib.BatchGroups(lambda z: {"a": z.sum(axis=(1, 2, 3)), "b": z[:, 0]}, 2)(x)
  np.testing.assert_allclose(pair["a"], x.sum(axis=(1, 2, 3)), rtol=1e-6)
  np.testing.assert_array_equal(pair["b"], x[:, 0])
  # The weights stay leaves (traced arguments, not constants of the program).
  leaves = jax.tree_util.tree_leaves(ig_lib.BatchGroups(to_layer, 2))
  assert len(leaves) == len(jax.tree_util.tree_leaves(p))
  with pytest.raises(attribution.AttributionArgumentError, match="groups must be >= 1"):
    ig_lib.BatchGroups(to_layer, 0)
  # The whole analysis through split functions equals the unsplit one.
  kw = dict(k=2, individual_regions=False, steps=6, chunk_size=1)
  whole = attribution.lesion_detection(to_layer, from_layer, x, b, **kw)
  parts = attribution.lesion_detection(ig_lib.BatchGroups(to_layer, 2),
                                       ig_lib.BatchGroups(from_layer, 2), x, b, **kw)
  for name in ("pixels", "positive_resultant", "negative_resultant"):
    a, c = np.asarray(getattr(whole, name)), np.asarray(getattr(parts, name))
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
  # Gaps are differences of near-equal sums: float rounding, relative to the quantity.
  np.testing.assert_allclose(parts.pixel_gap, whole.pixel_gap, rtol=0, atol=1e-6)
  np.testing.assert_allclose(parts.layer.channels, whole.layer.channels, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(parts.top.positive, whole.top.positive)
