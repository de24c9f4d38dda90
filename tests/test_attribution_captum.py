"""drig's attributions against Captum's, on the same CNN in torch and in Flax.

The CNN is written twice with the weights copied from torch to Flax, so the two
libraries differ only in how they integrate. Methods and step counts match
Captum's conventions; tolerance is 1e-3 of the largest absolute attribution.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from captum import attr as captum_attr

from drig import attribution

NUM_GRADES = 5
TOL = 1e-3


class TorchCNN(torch.nn.Module):
  """3 -> 8 -> 12 (stride 2; the inspected layer `block2`) -> 16 -> mean -> 5 logits."""

  def __init__(self):
    super().__init__()
    self.block1 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    self.block2 = torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, stride=2, padding=1),
                                      torch.nn.ReLU())
    self.block3 = torch.nn.Sequential(torch.nn.Conv2d(12, 16, 3, padding=1), torch.nn.Softplus())
    self.fc = torch.nn.Linear(16, NUM_GRADES)

  def forward(self, x):
    return self.fc(self.block3(self.block2(self.block1(x))).mean(dim=(2, 3)))


class FlaxCNN(nn.Module):
  """The same network, NHWC, split at block2 for layer attribution."""

  def setup(self):
    pad = ((1, 1), (1, 1))
    self.conv1 = nn.Conv(8, (3, 3), padding=pad)
    self.conv2 = nn.Conv(12, (3, 3), strides=(2, 2), padding=pad)
    self.conv3 = nn.Conv(16, (3, 3), padding=pad)
    self.fc = nn.Dense(NUM_GRADES)

  def to_layer(self, x):
    return nn.relu(self.conv2(nn.relu(self.conv1(x))))

  def from_layer(self, a):
    return self.fc(nn.softplus(self.conv3(a)).mean(axis=(1, 2)))

  def __call__(self, x):
    return self.from_layer(self.to_layer(x))


def _apply(method, variables, x):
  return FlaxCNN().apply(variables, x, method=method)


def _flax_variables(model: TorchCNN):
  def conv(m):
    return {"kernel": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(m.bias.detach().numpy())}
  return {"params": {
      "conv1": conv(model.block1[0]), "conv2": conv(model.block2[0]),
      "conv3": conv(model.block3[0]),
      "fc": {"kernel": jnp.asarray(model.fc.weight.detach().numpy().T),
             "bias": jnp.asarray(model.fc.bias.detach().numpy())}}}


@pytest.fixture(scope="module")
def setup():
  torch.manual_seed(0)
  model = TorchCNN().eval()
  variables = _flax_variables(model)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  baseline = np.asarray(attribution.half_gray_baseline(x))
  logits = jax.tree_util.Partial(functools.partial(_apply, FlaxCNN.__call__), variables)
  to_layer = jax.tree_util.Partial(functools.partial(_apply, FlaxCNN.to_layer), variables)
  layer_logits = jax.tree_util.Partial(functools.partial(_apply, FlaxCNN.from_layer), variables)
  # Same network in both libraries (else nothing below means anything).
  np.testing.assert_allclose(logits(x), model(_nchw(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
  return model, x, baseline, logits, to_layer, layer_logits


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _softmax_model(model):
  return lambda inputs: torch.softmax(model(inputs), dim=-1)


def _assert_close(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  scale = np.abs(reference).max()
  assert scale > 0
  err = np.abs(ours - reference).max()
  assert err <= TOL * scale, f"max error {err:.3g} > {TOL} x {scale:.3g}"


@pytest.mark.parametrize("method,captum_method", [
    ("riemann_left", "riemann_left"), ("riemann_right", "riemann_right"),
    ("riemann_middle", "riemann_middle"), ("gausslegendre", "gausslegendre")])
def test_pixel_ig_matches_captum(setup, method, captum_method):
  model, x, baseline, logits, _, _ = setup
  grade, steps = 3, 12
  ours, gap = attribution.integrated_gradients(
      attribution.probability_of_grade(logits, grade), x, baseline, steps=steps, method=method)
  ig = captum_attr.IntegratedGradients(_softmax_model(model))
  theirs, delta = ig.attribute(_nchw(x), baselines=_nchw(np.broadcast_to(baseline, x.shape)),
                               target=grade, n_steps=steps, method=captum_method,
                               return_convergence_delta=True)
  _assert_close(ours, _nhwc(theirs))
  np.testing.assert_allclose(gap, delta.detach().numpy(), atol=TOL * float(np.abs(gap).max()) +
                             1e-6)


def test_trapezoid_is_captums_rescaled_to_unit_weight(setup):
  model, x, baseline, logits, _, _ = setup
  grade, steps = 1, 10
  ours, _ = attribution.integrated_gradients(
      attribution.probability_of_grade(logits, grade), x, baseline, steps=steps,
      method="trapezoid")
  theirs = captum_attr.IntegratedGradients(_softmax_model(model)).attribute(
      _nchw(x), baselines=_nchw(np.broadcast_to(baseline, x.shape)), target=grade,
      n_steps=steps, method="riemann_trapezoid")
  # Same nodes; Captum's weights sum to (n - 1)/n instead of 1.
  _assert_close(np.asarray(ours) * (steps - 1) / steps, _nhwc(theirs))


@pytest.mark.parametrize("method", ["riemann_right", "gausslegendre"])
def test_layer_ig_matches_captum_layer_integrated_gradients(setup, method):
  model, x, baseline, _, to_layer, layer_logits = setup
  grade, steps = 4, 10
  ours = attribution.layer_integrated_gradients(
      to_layer, attribution.probability_of_grade(layer_logits, grade), x, baseline,
      steps=steps, method=method)
  lig = captum_attr.LayerIntegratedGradients(_softmax_model(model), model.block2)
  theirs = lig.attribute(_nchw(x), baselines=_nchw(np.broadcast_to(baseline, x.shape)),
                         target=grade, n_steps=steps, method=method)
  _assert_close(ours.units, _nhwc(theirs))
  _assert_close(ours.channels, theirs.detach().numpy().sum(axis=(2, 3)))


def test_layer_conductance_matches_captum(setup):
  model, x, baseline, _, to_layer, layer_logits = setup
  grade, steps = 2, 16
  quantity = attribution.probability_of_grade(layer_logits, grade)
  ours = attribution.layer_conductance(to_layer, quantity, x, baseline, steps=steps,
                                       method="trapezoid", derivative="difference")
  lc = captum_attr.LayerConductance(_softmax_model(model), model.block2)
  theirs = lc.attribute(_nchw(x), baselines=_nchw(np.broadcast_to(baseline, x.shape)),
                        target=grade, n_steps=steps, method="riemann_trapezoid")
  _assert_close(ours.units, _nhwc(theirs))
  # The exact-derivative variant converges to the same integral (slowly: the
  # ReLUs before the layer make the integrand piecewise smooth).
  exact = attribution.layer_conductance(to_layer, quantity, x, baseline, steps=64,
                                        method="gausslegendre")
  fine = attribution.layer_conductance(to_layer, quantity, x, baseline, steps=512,
                                       method="trapezoid", derivative="difference")
  err = float(jnp.abs(exact.units - fine.units).max())
  assert err < 2e-2 * float(jnp.abs(fine.units).max())
  assert float(jnp.abs(exact.gap).max()) < 1e-3 * float(jnp.abs(exact.units).sum())


def test_neuron_ig_matches_captum_for_units_and_channels(setup):
  model, x, baseline, _, to_layer, _ = setup
  steps, method = 8, "gausslegendre"
  layer_shape = (8, 8, 12)
  # Three units active in both images (a dead ReLU has an all-zero region).
  active = np.asarray(to_layer(x)).min(axis=0).ravel()
  units = [np.unravel_index(i, layer_shape) for i in np.argsort(active)[-1:-4:-1]]
  channels = [7, 2]
  flat = [np.ravel_multi_index(u, layer_shape) for u in units]
  cot = jnp.concatenate([
      attribution.unit_cotangents(layer_shape, np.tile(flat, (2, 1))),
      attribution.channel_cotangents(layer_shape, np.tile(channels, (2, 1)))], axis=1)
  ours = attribution.active_regions(to_layer, x, baseline, cot, steps=steps, method=method)
  nig = captum_attr.NeuronIntegratedGradients(model, model.block2)
  kwargs = dict(baselines=_nchw(np.broadcast_to(baseline, x.shape)), n_steps=steps,
                method=method)
  references = [nig.attribute(_nchw(x), neuron_selector=(c, h, w), **kwargs)
                for h, w, c in units]
  references += [nig.attribute(_nchw(x), neuron_selector=lambda out, c=c: out[:, c].sum((1, 2)),
                               **kwargs) for c in channels]
  for k, reference in enumerate(references):
    _assert_close(ours.regions[:, k], _nhwc(reference))


# ------------------------------------------------------------------------------
# Inception-v3: torchvision's model with random weights, imported into drig.

INCEPTION_SIZE = 80  # the smallest input Inception takes is 75 px


def smooth_images(n, size, seed):
  """Smooth random images in [-1, 1] (sums of Gaussian blobs), NHWC float32.

  A little noise keeps neighbouring pixels distinct: on flat regions the max
  pools see exact ties, and XLA and torch route the gradient of a tie to
  different (equally valid) elements.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = np.zeros((n, size, size, 3), np.float32)
  for i in range(n):
    for _ in range(12):
      cy, cx, s = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.03, 0.2)]
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
      out[i] += rng.normal(size=3).astype(np.float32) * blob[..., None].astype(np.float32)
  out = 0.95 * np.tanh(out) + rng.normal(0, 0.01, out.shape).astype(np.float32)
  return np.clip(out, -1, 1)


def torchvision_inception(seed=0):
  """torchvision's inception_v3 (5 classes, no aux head), He-initialised, eval mode.

  torchvision's own init (std 0.1) with BatchNorm's default statistics gives
  logits around 1e8; He-normal convolutions and near-identity BatchNorm keep
  activations at unit scale, closer to a trained network's behaviour.
  """
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                          num_classes=NUM_GRADES)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.8, 1.2)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.8, 1.2)
  return model.eval()


def _apply_model(model, variables, x):
  return model.apply(variables, x)


# Inception runs in float64 in both libraries. In float32 the two agree except
# where a max pool sees two values closer than float32 rounding: XLA and torch
# round differently, route that window's gradient to different elements, and
# one pixel's attribution moves by a few percent of the maximum. Near the
# half-gray baseline (small alphas) the image is almost flat and such near-ties
# occur; float64 removes them, so the comparison tests the integration itself.


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
  from drig.models import torch_weights  # pylint: disable=g-import-not-at-top
  from drig.models.inception_v3 import InceptionV3  # pylint: disable=g-import-not-at-top
  torch_model = torchvision_inception()
  path = tmp_path_factory.mktemp("inception") / "inception_v3.pth"
  torch.save(torch_model.state_dict(), path)
  x = smooth_images(1, INCEPTION_SIZE, 7).astype(np.float64)
  with jax.enable_x64(True):
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                       torch_weights.load_torchvision(str(path)))
    model = InceptionV3(num_classes=NUM_GRADES, convention="torchvision", dtype=jnp.float64,
                        param_dtype=jnp.float64)
  # The models' equality is what every comparison below checks, end to end
  # (drig's importer tests check it layer by layer).
  return torch_model.double(), model, variables, x


def test_inception_pixel_ig_matches_captum_and_gap_falls(inception):
  torch_model, model, variables, x = inception
  with jax.enable_x64(True):
    logits = jax.tree_util.Partial(functools.partial(_apply_model, model), variables)
    baseline = np.asarray(attribution.half_gray_baseline(x))
    f = attribution.probability_of_grade(logits, 4)
    ours, gap8 = attribution.integrated_gradients(f, x, baseline, steps=8, chunk_size=8)
    change = np.abs(np.asarray(f(x) - f(jnp.broadcast_to(baseline, x.shape))))
    _, gap32 = attribution.integrated_gradients(f, x, baseline, steps=32, chunk_size=8)
  assert ours.dtype == np.float64
  theirs = captum_attr.IntegratedGradients(_softmax_model(torch_model)).attribute(
      _nchw(x), baselines=_nchw(np.broadcast_to(baseline, x.shape)), target=4, n_steps=8,
      method="riemann_right")
  _assert_close(ours, _nhwc(theirs))
  # The relative completeness gap falls with the number of steps. (Not
  # monotonically: with random weights the path crosses many ReLU kinks, and
  # at 80 px there are few enough for the error to fluctuate from n to 2n;
  # here it is 0.40 at 8 steps, 0.17 at 16 and 0.07 at 32.)
  relative8, relative32 = np.abs(gap8) / change, np.abs(gap32) / change
  assert relative32[0] < relative8[0] / 3, (relative8, relative32)


def test_inception_lesion_detection_matches_captum_layer_and_neuron_ig(inception):
  torch_model, model, variables, x = inception
  layer, steps = "Conv2d_4a_3x3", 4
  with jax.enable_x64(True):
    baseline = np.asarray(attribution.half_gray_baseline(x))
    to_layer, layer_logits = attribution.split_model(model, variables, layer)
    out = attribution.lesion_detection(to_layer,
                                       attribution.probability_of_grade(layer_logits, 4),
                                       x, baseline, k=1, steps=steps, chunk_size=steps)
  forward = _softmax_model(torch_model)
  kwargs = dict(baselines=_nchw(np.broadcast_to(baseline, x.shape)), n_steps=steps,
                method="riemann_right")
  module = getattr(torch_model, layer)
  units = captum_attr.LayerIntegratedGradients(forward, module).attribute(
      _nchw(x), target=4, **kwargs)
  _assert_close(out.layer.units, _nhwc(units))
  nig = captum_attr.NeuronIntegratedGradients(torch_model, module)
  for regions, channels in [(out.positive_regions, out.top.positive),
                            (out.negative_regions, out.top.negative)]:
    c = int(channels[0, 0])
    region = nig.attribute(_nchw(x), neuron_selector=lambda a, c=c: a[:, c].sum((1, 2)), **kwargs)
    _assert_close(regions[:, 0], _nhwc(region))


def test_unknown_layer_name(inception):
  _, model, variables, _ = inception
  with pytest.raises(attribution.UnknownLayerError, match="has no layer 'Conv2d_4a'.*Did you"):
    attribution.split_model(model, variables, "Conv2d_4a")
  to_layer, _ = attribution.split_model(model, variables, "Mixed_5b")  # torchvision alias
  assert to_layer.layer == "mixed0"
