"""Unit active regions on receptive-field crops equal whole-image integration."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drig import attribution
from drig.attribution import receptive_field
from drig.models.inception_v3 import InceptionV3


def _conv(x, w, stride, padding):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _small_to_layer(params, x):
  """VALID strided conv, SAME conv (zero padding at the image border), max pool, conv."""
  h = jax.nn.relu(_conv(x, params["w1"], 2, "VALID"))
  h = jax.nn.relu(_conv(h, params["w2"], 1, "SAME"))
  h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
  return jnp.tanh(_conv(h, params["w3"], 1, "SAME"))


@pytest.fixture(scope="module")
def small():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(0, 0.5, (3, 3, 3, 4)), "w2": rng.normal(0, 0.3, (3, 3, 4, 6)),
            "w3": rng.normal(0, 0.3, (3, 3, 6, 5))}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  to_layer = jax.tree_util.Partial(_small_to_layer, params)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 150, 150, 3)), jnp.float32)
  return to_layer, x, attribution.half_gray_baseline(x)


def _border_units(layer_shape, k, seed):
  """Units at all four corners and edges, the centre, and random ones."""
  h, w, c = layer_shape
  rng = np.random.default_rng(seed)
  fixed = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (0, w // 2), (h // 2, 0),
           (h - 1, w // 2), (h // 2, w - 1), (h // 2, w // 2), (1, 1), (h - 2, w - 2)]
  rows = [(r, q, int(rng.integers(c))) for r, q in fixed]
  while len(rows) < k:
    rows.append((int(rng.integers(h)), int(rng.integers(w)), int(rng.integers(c))))
  return np.array(rows[:k])


def test_crops_are_exact_and_equal_whole_image_integration(small):
  to_layer, x, baseline = small
  layer_shape = jax.eval_shape(to_layer, x).shape[1:]
  units = np.stack([_border_units(layer_shape, 14, seed) for seed in (1, 2)])
  plan = receptive_field.plan_unit_crops(to_layer, x, baseline, units)
  assert plan is not None and plan.exact.all()
  assert max(plan.size) < x.shape[1] // 2  # a real saving
  fast = attribution.unit_active_regions(to_layer, x, baseline, units, steps=6)
  reference = attribution.unit_active_regions(to_layer, x, baseline, units, steps=6, crop=False)
  scale = float(np.abs(np.asarray(reference.regions)).max())
  assert scale > 0
  np.testing.assert_allclose(fast.regions, reference.regions, atol=1e-5 * scale)
  np.testing.assert_allclose(fast.gap, reference.gap, atol=1e-5)
  # Each region is zero outside its crop and not zero inside.
  regions = np.asarray(fast.regions)
  for n in range(2):
    for k in range(units.shape[1]):
      r, q = plan.starts[n, k]
      inside = regions[n, k, r:r + plan.size[0], q:q + plan.size[1]]
      assert np.abs(regions[n, k]).sum() == pytest.approx(np.abs(inside).sum())


def test_crop_that_misses_the_padding_is_refused(small):
  """A window one stride away from the image border reads none of its zero
  padding: the NaN proof must reject it for a unit on the border."""
  to_layer, x, baseline = small
  units = np.array([[[0, 0, 0]]] * 2)
  plan = receptive_field.plan_unit_crops(to_layer, x, baseline, units)
  assert plan.exact.all()
  strides = 4
  verify = receptive_field._verify(  # pylint: disable=protected-access
      to_layer, x, baseline, units, units - np.array([1, 1, 0]),
      plan.starts + strides, plan.size)
  assert not verify.any()


def test_layers_that_see_the_whole_image_fall_back(small):
  to_layer, x, baseline = small
  pooled = jax.tree_util.Partial(
      lambda p, z: jnp.mean(_small_to_layer(p, z), axis=(1, 2), keepdims=True), to_layer.args[0])
  units = np.zeros((2, 1, 3), np.int64)
  assert receptive_field.plan_unit_crops(pooled, x, baseline, units) is None
  out = attribution.unit_active_regions(pooled, x, baseline, units, steps=2)
  assert out.regions.shape == (2, 1) + x.shape[1:]


def test_bad_units_are_refused(small):
  to_layer, x, baseline = small
  with pytest.raises(attribution.AttributionArgumentError, match="outside the layer"):
    attribution.unit_active_regions(to_layer, x, baseline, np.full((2, 1, 3), 999), steps=2)
  with pytest.raises(attribution.AttributionArgumentError, match=r"\[N, K, 3\]"):
    attribution.unit_active_regions(to_layer, x, baseline, np.zeros((2, 3)), steps=2)


def _apply(model, variables, x):
  return model.apply(variables, x)


def test_inception_stem_units_and_lesion_detection():
  """Conv2d_4a_3x3 of Inception-v3 at 160 px: crops proven exact, results equal."""
  model = InceptionV3(num_classes=5, convention="torchvision")
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (1, 160, 160, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  to_layer, layer_logits = attribution.split_model(model, variables, "Conv2d_4a_3x3")
  baseline = attribution.half_gray_baseline(x)
  quantity = attribution.probability_of_grade(layer_logits, 4)
  analysis = attribution.lesion_detection(to_layer, quantity, x, baseline, k=3, by="unit",
                                          steps=4)
  layer_shape = analysis.layer.units.shape[1:]
  units = np.stack(np.unravel_index(np.concatenate(
      [np.asarray(analysis.top.positive), np.asarray(analysis.top.negative)], axis=1),
      layer_shape), -1)
  reference = attribution.unit_active_regions(to_layer, x, baseline, units, steps=4, crop=False)
  regions = np.concatenate([analysis.positive_regions, analysis.negative_regions], axis=1)
  scale = float(np.abs(np.asarray(reference.regions)).max())
  np.testing.assert_allclose(regions, reference.regions, atol=1e-4 * scale)
  logits = jax.tree_util.Partial(functools.partial(_apply, model), variables)
  pixels, gap = attribution.integrated_gradients(
      attribution.probability_of_grade(logits, 4), x, baseline, steps=4)
  np.testing.assert_allclose(analysis.pixels, pixels, atol=1e-4 * float(np.abs(pixels).max()))
  weights = np.asarray(analysis.top.positive_scores).clip(0)[..., None, None, None]
  np.testing.assert_allclose(analysis.positive_resultant,
                             (np.asarray(analysis.positive_regions) * weights).sum(1),
                             atol=1e-6 * scale)
