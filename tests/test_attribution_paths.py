"""Blur IG and Guided IG against PAIR's saliency 0.2.1 and its closed-form oracles.

saliency runs through its framework-agnostic ``call_model_function``, fed the
gradients of the same Flax CNN (tests/test_attribution_captum.py), so the two
differ only in how they build the path and sum along it.

Tolerances (of the largest absolute reference attribution):
- Blur IG: 1e-4 (float32; the forward difference d blur/d sigma divides float32
  rounding by grad_step = 0.01; measured about 7e-6).
- Guided IG, float64 (jax_enable_x64, as saliency computes): 1e-9 (measured
  about 1e-15). float32, bounded path (max_dist = 0.02): 1e-4 (measured about
  7e-7). The unbounded float32 path is not compared element by element: its
  feature order follows |gradient| ranks, which float32 rounding can swap.
- Closed forms: 1e-2 relative (1000 right-Riemann steps on a quadratic).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saliency.core as saliency
import torch
from scipy import ndimage

from drig import attribution
from drig.attribution import paths
from test_attribution_captum import FlaxCNN, TorchCNN, _apply, _flax_variables

BLUR_TOL = 1e-4
GUIDED_TOL_64 = 1e-9
GUIDED_TOL_32 = 1e-4
ORACLE_RTOL = 1e-2


@pytest.fixture(scope="module")
def cnn():
  torch.manual_seed(0)
  variables = _flax_variables(TorchCNN().eval())
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(2, 20, 16, 3)).astype(np.float32)
  return variables, x


def _quantity(variables, grade=3):
  logits = jax.tree_util.Partial(functools.partial(_apply, FlaxCNN.__call__), variables)
  return attribution.probability_of_grade(logits, grade)


def _call_model_function(f, dtype):
  """saliency's model protocol around the gradient of f (one image per row)."""
  grad = jax.jit(jax.grad(lambda p: jnp.sum(f(p))))

  def call(batch, call_model_args=None, expected_keys=None):
    del call_model_args, expected_keys
    return {saliency.INPUT_OUTPUT_GRADIENTS: np.asarray(grad(jnp.asarray(batch, dtype)))}
  return call


@pytest.fixture
def numpy_quantile_shim(monkeypatch):
  """saliency's GuidedIG calls np.quantile(interpolation=...), removed in NumPy 2.4."""
  quantile = np.quantile

  def shimmed(*args, interpolation=None, **kwargs):
    if interpolation is not None:
      kwargs["method"] = interpolation
    return quantile(*args, **kwargs)
  monkeypatch.setattr(np, "quantile", shimmed)


def _assert_close(ours, reference, tol):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  scale = np.abs(reference).max()
  assert scale > 0
  err = np.abs(ours - reference).max()
  assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


def test_gaussian_blur_is_scipys_zero_padded_filter(cnn):
  _, x = cnn
  for sigma in (0.3, 12.5):  # a kernel of radius 1, and one wider than the image
    ours = np.asarray(paths.gaussian_blur(x, sigma))
    reference = np.stack([ndimage.gaussian_filter(image, sigma=[sigma, sigma, 0],
                                                  mode="constant") for image in x])
    np.testing.assert_allclose(ours, reference, atol=1e-6)
  np.testing.assert_array_equal(paths.gaussian_blur(x, 0.0), x)


@pytest.mark.parametrize("sqrt", [False, True])
def test_blur_ig_matches_saliency(cnn, sqrt):
  variables, x = cnn
  f = _quantity(variables)
  max_sigma, steps = 8.0, 12
  ours, gap = paths.blur_integrated_gradients(f, x, max_sigma=max_sigma, steps=steps,
                                              sqrt=sqrt, chunk_size=5)
  call = _call_model_function(f, jnp.float32)
  reference = np.stack([saliency.BlurIG().GetMask(image, call, max_sigma=max_sigma, steps=steps,
                                                  sqrt=sqrt) for image in x])
  _assert_close(ours, reference, BLUR_TOL)
  # The gap is what it says: sum minus the change from the fully blurred image.
  widest = paths.blur_sigmas(max_sigma, steps, sqrt)[-1]  # sqrt(max_sigma) with sqrt
  blurred = paths.gaussian_blur(x, widest)
  change = np.asarray(f(jnp.asarray(x))) - np.asarray(f(blurred))
  np.testing.assert_allclose(gap, reference.reshape(2, -1).sum(1) - change, atol=1e-5)


def test_blur_ig_on_a_linear_model_is_complete():
  # f linear: the blur path's integral telescopes, so with a fine grid the sum
  # equals f(x) - f(blur(x, max_sigma)) up to the forward difference's error.
  rng = np.random.default_rng(1)
  weights = jnp.asarray(rng.normal(size=(12, 10, 2)).astype(np.float32))
  f = jax.tree_util.Partial(lambda w, z: jnp.sum(z * w, axis=(1, 2, 3)), weights)
  x = rng.uniform(-1, 1, size=(3, 12, 10, 2)).astype(np.float32)
  _, gap = paths.blur_integrated_gradients(f, x, max_sigma=2.0, steps=64, grad_step=1e-3,
                                          chunk_size=32)
  change = np.asarray(f(jnp.asarray(x)) - f(paths.gaussian_blur(x, 2.0)))
  assert np.abs(np.asarray(gap)).max() < 2e-2 * np.abs(change).max()


def test_guided_ig_matches_saliency_in_float64(cnn, numpy_quantile_shim):
  """The unbounded path (the most sensitive to feature order) agrees to rounding."""
  max_dist, fraction = 1.0, 0.1
  variables, x = cnn
  x = x[:1].astype(np.float64)
  baseline, steps = 0.1, 12
  with jax.enable_x64(True):
    f = _quantity(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables))
    ours, _ = paths.guided_integrated_gradients(f, x, baseline, steps=steps, fraction=fraction,
                                                max_dist=max_dist)
    assert ours.dtype == jnp.float64
    call = _call_model_function(f, jnp.float64)
    reference = saliency.GuidedIG().GetMask(x[0], call, x_baseline=np.full_like(x[0], baseline),
                                            x_steps=steps, fraction=fraction,
                                            max_dist=max_dist)
  _assert_close(ours[0], reference, GUIDED_TOL_64)


def test_guided_ig_matches_saliency_in_float32(cnn, numpy_quantile_shim):
  variables, x = cnn
  f = _quantity(variables, grade=1)
  baseline = np.asarray(attribution.half_gray_baseline(x))
  ours, gap = paths.guided_integrated_gradients(f, x, baseline, steps=12, images_per_call=1)
  call = _call_model_function(f, jnp.float32)
  reference = np.stack([saliency.GuidedIG().GetMask(image, call, x_baseline=baseline[0],
                                                    x_steps=12) for image in x])
  _assert_close(ours, reference, GUIDED_TOL_32)
  # Both images' paths in one call: each follows its own path, as alone.
  together, _ = paths.guided_integrated_gradients(f, x, baseline, steps=12, images_per_call=2)
  _assert_close(together, ours, 1e-6)
  change = np.asarray(f(jnp.asarray(x)) - f(jnp.asarray(np.broadcast_to(baseline, x.shape))))
  np.testing.assert_allclose(gap, np.asarray(ours).reshape(2, -1).sum(1) - change, atol=1e-6)


def _square(z):
  return (2 * z[:, 0] + z[:, 1]) ** 2


def _linear(z):
  return 2 * z[:, 0] + z[:, 1]


@pytest.mark.parametrize("fn,x,baseline,max_dist,fraction,expected", [
    (_square, [3.0, 3.0], [0.0, 0.0], 0.0, 0.25, [54.0, 27.0]),   # max_dist 0: IG
    (_square, [3.0, 3.0], [0.0, 0.0], 0.02, 1.0, [54.0, 27.0]),   # fraction 1: IG
    (_square, [3.0, 3.0], [0.0, 0.0], 1.0, 0.1, [72.0, 9.0]),     # unbounded
    (_linear, [10.0, 5.0], [-1.0, -3.0], 0.02, 0.25, [22.0, 8.0]),
])
def test_guided_ig_closed_forms(fn, x, baseline, max_dist, fraction, expected):
  """saliency's oracles: the unbounded path moves x2 (small gradient) first."""
  ours, _ = paths.guided_integrated_gradients(
      fn, np.asarray([x], np.float32), np.asarray([baseline], np.float32), steps=1000,
      fraction=fraction, max_dist=max_dist)
  np.testing.assert_allclose(np.asarray(ours)[0], expected, rtol=ORACLE_RTOL)


def test_bad_calls_name_the_argument(cnn):
  variables, x = cnn
  f = _quantity(variables)
  error = attribution.AttributionArgumentError
  with pytest.raises(error, match="steps"):
    paths.blur_integrated_gradients(f, x, steps=0)
  with pytest.raises(error, match="max_sigma"):
    paths.blur_integrated_gradients(f, x, max_sigma=-1.0)
  with pytest.raises(error, match="grad_step"):
    paths.blur_integrated_gradients(f, x, grad_step=0)
  with pytest.raises(error, match=r"images \[N, H, W"):
    paths.blur_integrated_gradients(f, x[:, 0, 0])
  with pytest.raises(error, match="steps"):
    paths.guided_integrated_gradients(f, x, 0.0, steps=True)
  with pytest.raises(error, match="fraction"):
    paths.guided_integrated_gradients(f, x, 0.0, fraction=0.0)
  with pytest.raises(error, match="max_dist"):
    paths.guided_integrated_gradients(f, x, 0.0, max_dist=1.5)
  with pytest.raises(error, match="baseline"):
    paths.guided_integrated_gradients(f, x, np.zeros((3, 20, 16, 3), np.float32))
  with pytest.raises(error, match="NaN"):
    paths.guided_integrated_gradients(f, np.full_like(x, np.nan), 0.0, steps=2)
