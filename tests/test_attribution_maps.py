"""Grad-CAM, occlusion and XRAI against Captum 0.9 and PAIR's saliency 0.2.1.

The small CNN of tests/test_attribution_captum.py runs in torch (Captum) and in
Flax (drig) with the same weights; saliency is fed the Flax model's gradients
through its ``call_model_function``. Grad-CAM is also checked on Inception-v3
with weights imported from a (randomly initialised) torchvision model.

Tolerances (of the largest absolute reference value):
- Grad-CAM: 1e-5 on the small CNN (measured about 2e-7); upsampling 1e-6
  absolute; Inception-v3: 1e-3 (float32 through 94 convolutions).
- Occlusion: 1e-6 with both models in float64 (measured about 3e-8: Captum
  returns its sums in float32 even then); in float32 a drop f(x) - f(occluded)
  of about 1e-4 carries rounding of about 1e-7, so that check allows 2e-3
  (measured about 7e-4).
- XRAI: 1e-5 on the IG map, the XRAI map and identical ranks and segments.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saliency.core as saliency
import torch
from captum import attr as captum_attr
from saliency.core import xrai as saliency_xrai

from drig import attribution
from drig.attribution import gradcam, occlusion, xrai
from test_attribution_captum import (FlaxCNN, TorchCNN, _apply, _flax_variables, _nchw, _nhwc,
                                     _softmax_model)

GRADCAM_TOL = 1e-5
INCEPTION_TOL = 1e-3
OCCLUSION_TOL_64 = 1e-6
OCCLUSION_TOL_32 = 2e-3
XRAI_TOL = 1e-5


@pytest.fixture(scope="module")
def cnn():
  torch.manual_seed(0)
  model = TorchCNN().eval()
  variables = _flax_variables(model)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(2, 20, 18, 3)).astype(np.float32)
  return model, variables, x


def _part(method, variables):
  return jax.tree_util.Partial(functools.partial(_apply, method), variables)


def _assert_close(ours, reference, tol):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  scale = np.abs(reference).max()
  assert scale > 0
  err = np.abs(ours - reference).max()
  assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


# ------------------------------------------------------------------------------
# Grad-CAM.


@pytest.mark.parametrize("relu", [False, True])
def test_grad_cam_matches_captum_layer_grad_cam(cnn, relu):
  model, variables, x = cnn
  grade = 2
  quantity = attribution.probability_of_grade(_part(FlaxCNN.from_layer, variables), grade)
  ours = gradcam.grad_cam(_part(FlaxCNN.to_layer, variables), quantity, x, relu=relu)
  theirs = captum_attr.LayerGradCam(_softmax_model(model), model.block2).attribute(
      _nchw(x), target=grade, relu_attributions=relu)
  _assert_close(ours.layer_map, theirs[:, 0].detach().numpy(), GRADCAM_TOL)
  if not relu:
    assert float(ours.layer_map.min()) < 0  # the signed map really is signed
  # 10 x 9 -> 20 x 18: bilinear and nearest both as Captum's interpolate.
  for method in ("bilinear", "nearest"):
    resized = gradcam.grad_cam(_part(FlaxCNN.to_layer, variables), quantity, x, relu=relu,
                               upsample=method).map
    reference = captum_attr.LayerAttribution.interpolate(theirs, x.shape[1:3],
                                                         interpolate_mode=method)
    _assert_close(resized, reference[:, 0].detach().numpy(), GRADCAM_TOL)


def test_bilinear_resize_is_torchs_at_fractional_scales():
  maps = np.random.default_rng(2).normal(size=(2, 7, 5)).astype(np.float32)
  ours = gradcam.resize_map(maps, (17, 12), "bilinear")
  theirs = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(17, 12),
                                           mode="bilinear", align_corners=False)[:, 0]
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-6)


def _randomise(model, seed):
  """He-scaled kernels and non-trivial BatchNorm statistics, so activations stay of order 1."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                            * (2 / fan_in) ** 0.5)
      elif isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
        module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
        module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
      elif isinstance(module, torch.nn.Linear):
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                            / module.in_features ** 0.5)
        module.bias.copy_(torch.randn(module.out_features, generator=generator) * 0.1)


def test_grad_cam_on_inception_v3_with_torchvision_weights(tmp_path):
  import torchvision  # pylint: disable=g-import-not-at-top  (slow, test-only)
  from drig.models import inception_v3, torch_weights  # pylint: disable=g-import-not-at-top
  model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
  _randomise(model, seed=7)
  model.eval()
  torch.save(model.state_dict(), tmp_path / "tv.pth")
  variables = torch_weights.load_torchvision(str(tmp_path / "tv.pth"))
  flax_model = inception_v3.InceptionV3(num_classes=1000, convention="torchvision")
  x = np.random.default_rng(3).uniform(-1, 1, size=(1, 107, 107, 3)).astype(np.float32)
  target = 5
  quantity = functools.partial(attribution.logit_of_grade, grade=target, num_grades=1000)
  ours = gradcam.model_grad_cam(flax_model, variables, "mixed10", quantity, x, relu=False)
  theirs = captum_attr.LayerGradCam(model, model.Mixed_7c).attribute(_nchw(x), target=target)
  _assert_close(ours.layer_map, theirs[:, 0].detach().numpy(), INCEPTION_TOL)
  assert ours.map.shape == (1, 107, 107)


def test_grad_cam_bad_calls(cnn):
  _, variables, x = cnn
  from configs import base as base_config  # pylint: disable=g-import-not-at-top
  from drig.models import classifier  # pylint: disable=g-import-not-at-top
  model = classifier.build_model(base_config.get_config("tiny").model)
  quantity = functools.partial(attribution.probability_of_grade, grade=1)
  with pytest.raises(attribution.UnknownLayerError, match="no layer 'mixed99'"):
    gradcam.model_grad_cam(model, {}, "mixed99", quantity, x)
  to_layer = _part(FlaxCNN.to_layer, variables)
  q = attribution.probability_of_grade(_part(FlaxCNN.from_layer, variables), 1)
  with pytest.raises(attribution.AttributionArgumentError, match="upsample"):
    gradcam.grad_cam(to_layer, q, x, upsample="cubic")
  with pytest.raises(attribution.AttributionArgumentError, match="spatial activations"):
    gradcam.grad_cam(_part(FlaxCNN.__call__, variables), q, x)


# ------------------------------------------------------------------------------
# Occlusion.


@pytest.mark.parametrize("window,stride", [((5, 5), (2, 3)), ((4, 3), (4, 3))])
def test_occlusion_matches_captum_in_float64(cnn, window, stride):
  model, variables, x = cnn
  grade, value = 3, 0.2
  with jax.enable_x64(True):
    logits = _part(FlaxCNN.__call__, jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64), variables))
    ours = occlusion.occlusion(attribution.probability_of_grade(logits, grade),
                               x.astype(np.float64), window=window, stride=stride, value=value,
                               chunk_size=7)
    assert ours.dtype == jnp.float64
  theirs = captum_attr.Occlusion(_softmax_model(model.double())).attribute(
      _nchw(x).double(), sliding_window_shapes=(3,) + window, strides=(3,) + stride,
      baselines=value, target=grade)
  model.float()
  theirs = _nhwc(theirs)
  np.testing.assert_array_equal(theirs, np.repeat(theirs[..., :1], 3, axis=-1))
  _assert_close(ours, theirs[..., 0], OCCLUSION_TOL_64)


def test_occlusion_matches_captum_in_float32_with_a_baseline_image(cnn):
  model, variables, x = cnn
  grade = 0
  baseline = np.asarray(attribution.half_gray_baseline(x))
  ours = occlusion.occlusion(
      attribution.probability_of_grade(_part(FlaxCNN.__call__, variables), grade), x,
      window=6, stride=3, value=baseline)
  theirs = captum_attr.Occlusion(_softmax_model(model)).attribute(
      _nchw(x), sliding_window_shapes=(3, 6, 6), strides=(3, 3, 3),
      baselines=_nchw(np.broadcast_to(baseline, x.shape)), target=grade)
  _assert_close(ours, _nhwc(theirs)[..., 0], OCCLUSION_TOL_32)


def test_occlusion_windows_cover_every_pixel():
  corners = occlusion.window_positions((20, 18), (5, 4), (3, 4))
  # Captum's count: ceil((D - w) / s) + 1 per axis.
  assert len(corners) == (int(np.ceil(15 / 3)) + 1) * (int(np.ceil(14 / 4)) + 1)
  assert occlusion.window_coverage((20, 18), (5, 4), corners).min() >= 1


def test_occlusion_bad_calls(cnn):
  _, variables, x = cnn
  f = attribution.probability_of_grade(_part(FlaxCNN.__call__, variables), 1)
  error = attribution.AttributionArgumentError
  with pytest.raises(error, match="window"):
    occlusion.occlusion(f, x, window=0)
  with pytest.raises(error, match="larger than the images"):
    occlusion.occlusion(f, x, window=(21, 5))
  with pytest.raises(error, match="stride"):
    occlusion.occlusion(f, x, window=4, stride=5)
  with pytest.raises(error, match="window"):
    occlusion.occlusion(f, x, window=(3, 3, 3))
  with pytest.raises(error, match="value"):
    occlusion.occlusion(f, x, window=4, value=np.zeros((5, 5), np.float32))


# ------------------------------------------------------------------------------
# XRAI.


def _call_model_function(f):
  grad = jax.jit(jax.grad(lambda p: jnp.sum(f(p))))

  def call(batch, call_model_args=None, expected_keys=None):
    del call_model_args, expected_keys
    return {saliency.INPUT_OUTPUT_GRADIENTS: np.asarray(grad(jnp.asarray(batch, jnp.float32)))}
  return call


@pytest.fixture(scope="module")
def xrai_case():
  """One 40 x 32 image of smooth blobs (segments of several sizes) and the CNN."""
  torch.manual_seed(1)
  variables = _flax_variables(TorchCNN().eval())
  rows, cols = np.mgrid[:40, :32] / 8.0
  image = np.stack([np.sin(rows + c) * np.cos(cols * (c + 1)) for c in range(3)], axis=-1)
  x = image[None].astype(np.float32)
  segments = xrai.felzenszwalb_segments(x[0])
  return attribution.probability_of_grade(_part(FlaxCNN.__call__, variables), 4), x, segments


def test_xrai_segments_are_salienciys(xrai_case):
  _, x, ours = xrai_case
  theirs = np.stack(saliency_xrai._get_segments_felzenszwalb(x[0]))  # pylint: disable=protected-access
  np.testing.assert_array_equal(ours, theirs)
  assert len(ours) > 20  # several scales, several segments each
  # xrai segments the images itself when given none.
  attributions = np.random.default_rng(5).normal(size=x.shape[:3]).astype(np.float32)
  by_default = xrai.xrai(None, x, attributions=attributions)
  given = xrai.xrai(None, x, attributions=attributions, segments=[ours])
  np.testing.assert_array_equal(by_default.ranks, given.ranks)


@pytest.mark.parametrize("algorithm", ["full", "fast"])
def test_xrai_matches_saliency(xrai_case, algorithm):
  f, x, segments = xrai_case  # the segmentation itself is compared above
  steps = 10
  ours = xrai.xrai(f, x, steps=steps, algorithm=algorithm, segments=[segments])
  parameters = saliency.XRAIParameters(steps=steps, algorithm=algorithm,
                                       return_ig_attributions=True, return_xrai_segments=True)
  theirs = saliency.XRAI().GetMaskWithDetails(x[0], _call_model_function(f),
                                              segments=list(segments),
                                              extra_parameters=parameters)
  _assert_close(ours.attributions[0], np.mean(theirs.ig_attribution, axis=0).max(-1), XRAI_TOL)
  _assert_close(ours.saliency[0], theirs.attribution_mask, XRAI_TOL)
  np.testing.assert_array_equal(ours.ranks[0], theirs.segments)


def test_xrai_ranks_given_attributions_and_segments():
  # Two regions: the right half (high attribution) must rank first.
  attributions = np.zeros((1, 20, 20), np.float32)
  attributions[0, :, 10:] = 1.0
  masks = np.zeros((2, 20, 20), bool)
  masks[0, :, :10] = True
  masks[1, :, 10:] = True
  result = xrai.xrai(None, np.zeros((1, 20, 20, 3), np.float32), attributions=attributions,
                     segments=[masks])
  np.testing.assert_array_equal(result.ranks[0], np.where(masks[1], 1, 2))
  np.testing.assert_array_equal(result.saliency[0], attributions[0])


def test_xrai_bad_calls(xrai_case):
  f, x, _ = xrai_case
  error = attribution.AttributionArgumentError
  with pytest.raises(error, match="algorithm"):
    xrai.xrai(f, x, algorithm="greedy")
  with pytest.raises(error, match="attributions must be"):
    xrai.xrai(f, x, attributions=np.zeros((1, 5, 5), np.float32))
  with pytest.raises(error, match="needs f"):
    xrai.xrai(None, x)
  with pytest.raises(error, match="segments must hold one"):
    xrai.xrai(f, x, attributions=np.zeros(x.shape[:3], np.float32), segments=[])
  with pytest.raises(error, match="min_pixel_diff"):
    xrai.xrai(f, x, min_pixel_diff=0)

