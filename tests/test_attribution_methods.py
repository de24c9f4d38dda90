"""drig's gradient-family methods and named baselines against Captum and scipy.

The small CNN is test_attribution_captum's, written in torch and in Flax with
the same weights, so the libraries differ only in the method. Random draws are
made once in numpy and given to both: drig takes them as arguments (noise,
indices, alphas); Captum's own draws are replaced (torch.normal patched for
NoiseTunnel, numpy's global seed for GradientShap's baseline indices and
positions).

Tolerances: 1e-4 of the largest absolute attribution on the small CNN (float32
in both; the gradient is one backward pass, so differences are rounding);
1e-3 for noise tunnels of IG (12 steps summed) and on Inception-v3 (float64 in
both libraries, as in test_attribution_captum).
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
from captum import attr as captum_attr

from drig import attribution
from drig import prng
from drig.attribution import baselines as baselines_lib
from drig.attribution import gradcam
from drig.attribution import gradients
from drig.attribution import methods
from drig.attribution import occlusion
from drig.attribution import paths
from drig.attribution import xrai
from drig.models import torch_weights
from drig.models.inception_v3 import InceptionV3
import test_attribution_captum as reference  # tests/: the shared torch/Flax CNN and Inception

TOL_GRADIENT = 1e-4
TOL_PATH = 1e-3
GRADE = 3
SAMPLES = 4


def _assert_close(ours, reference_values, tol):
  ours, reference_values = np.asarray(ours), np.asarray(reference_values)
  assert ours.shape == reference_values.shape, (ours.shape, reference_values.shape)
  scale = np.abs(reference_values).max()
  assert scale > 0
  err = np.abs(ours - reference_values).max()
  assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


@pytest.fixture(scope="module")
def cnn():
  torch.manual_seed(0)
  model = reference.TorchCNN().eval()
  variables = reference._flax_variables(model)  # pylint: disable=protected-access
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  logits = jax.tree_util.Partial(
      functools.partial(reference._apply, reference.FlaxCNN.__call__), variables)  # pylint: disable=protected-access
  f = attribution.probability_of_grade(logits, GRADE)
  forward = lambda inputs: torch.softmax(model(inputs), dim=-1)
  np.testing.assert_allclose(logits(x), model(reference._nchw(x)).detach().numpy(),  # pylint: disable=protected-access
                             rtol=1e-4, atol=1e-5)
  return forward, f, x


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _patched_normal(monkeypatch, noise):
  """Makes Captum's NoiseTunnel add ``noise`` [N, S, H, W, C] (its batch is image-major)."""
  flat = noise.reshape((-1,) + noise.shape[2:]).transpose(0, 3, 1, 2)
  expected = torch.from_numpy(np.ascontiguousarray(flat))

  def normal(mean, std):
    assert mean == 0 and tuple(std.shape) == tuple(expected.shape)
    return expected.to(std.dtype)
  monkeypatch.setattr(torch, "normal", normal)


@pytest.mark.parametrize("absolute", [True, False])
def test_gradient_matches_captum_saliency(cnn, absolute):
  forward, f, x = cnn
  ours = gradients.gradient(f, x, absolute=absolute)
  theirs = captum_attr.Saliency(forward).attribute(_nchw(x), target=GRADE, abs=absolute)
  _assert_close(ours, _nhwc(theirs), TOL_GRADIENT)
  if absolute:
    assert np.all(np.asarray(ours) >= 0)


def test_gradient_x_input_matches_captum(cnn):
  forward, f, x = cnn
  ours = gradients.gradient_x_input(f, x)
  theirs = captum_attr.InputXGradient(forward).attribute(_nchw(x), target=GRADE)
  _assert_close(ours, _nhwc(theirs), TOL_GRADIENT)


@pytest.mark.parametrize("kind", gradients.NOISE_TUNNEL_TYPES)
def test_noise_tunnel_of_gradient_matches_captum(cnn, kind, monkeypatch):
  forward, f, x = cnn
  stdev = 0.2
  noise = (stdev * np.random.default_rng(2).normal(
      size=(x.shape[0], SAMPLES) + x.shape[1:])).astype(np.float32)
  ours = gradients.smoothgrad(f, x, kind=kind, samples=SAMPLES, noise=noise)
  _patched_normal(monkeypatch, noise)
  tunnel = captum_attr.NoiseTunnel(captum_attr.Saliency(forward))
  theirs = tunnel.attribute(_nchw(x), nt_type=kind, nt_samples=SAMPLES, stdevs=stdev,
                            target=GRADE, abs=False)
  _assert_close(ours, _nhwc(theirs), TOL_GRADIENT)


def test_smoothgrad_of_integrated_gradients_matches_captum(cnn, monkeypatch):
  forward, f, x = cnn
  steps, stdev = 12, 0.1
  baseline = np.asarray(attribution.half_gray_baseline(x))
  noise = (stdev * np.random.default_rng(3).normal(
      size=(x.shape[0], SAMPLES) + x.shape[1:])).astype(np.float32)
  ig = lambda z: attribution.integrated_gradients(f, z, baseline, steps=steps)[0]
  ours = gradients.noise_tunnel(ig, x, kind="smoothgrad", samples=SAMPLES, noise=noise)
  _patched_normal(monkeypatch, noise)
  tunnel = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(forward))
  theirs = tunnel.attribute(_nchw(x), nt_type="smoothgrad", nt_samples=SAMPLES, stdevs=stdev,
                            target=GRADE, baselines=_nchw(np.broadcast_to(baseline, x.shape)),
                            n_steps=steps, method="riemann_right")
  _assert_close(ours, _nhwc(theirs), TOL_PATH)


def test_seeded_noise_is_reproducible_and_scaled_by_the_spread(cnn):
  _, f, x = cnn
  key = jax.random.PRNGKey(5)
  a = gradients.smoothgrad(f, x, key=key, samples=3, stdev_spread=0.15)
  b = gradients.smoothgrad(f, x, key=key, samples=3, stdev_spread=0.15)
  np.testing.assert_array_equal(a, b)
  spread = np.asarray(gradients.noise_std(x, stdev_spread=0.15))
  np.testing.assert_allclose(spread, 0.15 * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3))),
                             rtol=1e-6)
  # Zero noise: every sample is x itself, so SmoothGrad is the gradient and VarGrad 0.
  np.testing.assert_allclose(gradients.smoothgrad(f, x, key=key, samples=2, stdev=0.0),
                             gradients.gradient(f, x), rtol=1e-6, atol=1e-9)
  assert np.abs(gradients.smoothgrad(f, x, key=key, samples=2, stdev=0.0,
                                     kind="vargrad")).max() < 1e-12


def test_gradient_shap_matches_captum_with_the_same_draws(cnn):
  forward, f, x = cnn
  k = 3
  distribution = np.random.default_rng(4).uniform(-1, 1, (k,) + x.shape[1:]).astype(np.float32)
  n = x.shape[0]
  # Captum draws the baseline indices (image-major), then the positions, from numpy.
  np.random.seed(11)
  indices = np.random.choice(k, n * SAMPLES).reshape(n, SAMPLES)
  alphas = np.random.uniform(0.0, 1.0, n * SAMPLES).reshape(n, SAMPLES)
  ours = gradients.gradient_shap(f, x, distribution, indices=indices,
                                 alphas=alphas.astype(np.float32), samples=SAMPLES)
  np.random.seed(11)
  theirs = captum_attr.GradientShap(forward).attribute(
      _nchw(x), baselines=_nchw(distribution), n_samples=SAMPLES, stdevs=0.0, target=GRADE)
  _assert_close(ours, _nhwc(theirs), TOL_GRADIENT)


def test_sample_chunks_pad_with_zero_weights():
  chunks = gradients.sample_chunks(5, 2, num_images=1)
  assert [list(n) for n, _ in chunks] == [[0, 1], [2, 3], [4, 4]]
  assert [list(w) for _, w in chunks] == [[1, 1], [1, 1], [1, 0]]
  # None: about the engine's points per call, shared by the images of a call.
  assert len(gradients.sample_chunks(5, None, num_images=1)) == 1
  assert all(len(n) == 1 for n, _ in gradients.sample_chunks(3, None, num_images=64))


@pytest.mark.parametrize("per_call", [2, 3, None])
def test_samples_per_call_does_not_change_the_result(cnn, per_call):
  """A sample's draw depends on its number only: chunking (with zero-weight padding) is exact."""
  _, f, x = cnn
  key = jax.random.PRNGKey(8)
  for kind in gradients.NOISE_TUNNEL_TYPES:
    one = gradients.smoothgrad(f, x, key=key, samples=5, stdev=0.2, kind=kind,
                               samples_per_call=1)
    chunked = gradients.smoothgrad(f, x, key=key, samples=5, stdev=0.2, kind=kind,
                                   samples_per_call=per_call)
    _assert_close(chunked, one, TOL_GRADIENT)
  distribution = np.random.default_rng(9).uniform(-1, 1, (3,) + x.shape[1:]).astype(np.float32)
  one = gradients.gradient_shap(f, x, distribution, key=key, samples=5, samples_per_call=1)
  chunked = gradients.gradient_shap(f, x, distribution, key=key, samples=5,
                                    samples_per_call=per_call)
  _assert_close(chunked, one, TOL_GRADIENT)


def test_noise_tunnel_of_ig_keeps_each_image_with_its_baseline(cnn):
  """Chunked noisy copies of IG from a per-image baseline: each copy meets its own image's."""
  _, f, x = cnn
  baseline = np.stack([np.full(x.shape[1:], v, np.float32) for v in (-0.5, 0.7)])
  options = {"of": "integrated_gradients", "samples": 3, "steps": 6, "stdev": 0.1}
  key = jax.random.PRNGKey(10)
  one = methods.attribute("smoothgrad", quantity=f, x=x, baseline=baseline, key=key,
                          options={**options, "samples_per_call": 1})
  chunked = methods.attribute("smoothgrad", quantity=f, x=x, baseline=baseline, key=key,
                              options={**options, "samples_per_call": 3})
  _assert_close(chunked, one, TOL_PATH)


def test_attribute_fn_of_the_wrong_shape_is_named(cnn):
  _, _, x = cnn
  with pytest.raises(attribution.AttributionArgumentError, match="same shape"):
    gradients.noise_tunnel(lambda z: z[:1], x, key=jax.random.PRNGKey(0), stdev=0.1)


def test_expected_gradients_is_the_mean_of_captum_ig_over_baselines(cnn):
  forward, f, x = cnn
  k, steps = 3, 8
  distribution = np.random.default_rng(6).uniform(-1, 1, (k,) + x.shape[1:]).astype(np.float32)
  ours, gap = gradients.expected_gradients(f, x, distribution, steps=steps)
  ig = captum_attr.IntegratedGradients(forward)
  theirs = np.mean([_nhwc(ig.attribute(_nchw(x), baselines=_nchw(np.broadcast_to(b, x.shape)),
                                       target=GRADE, n_steps=steps, method="riemann_right"))
                    for b in distribution], axis=0)
  _assert_close(ours, theirs, TOL_PATH)
  change = np.asarray(f(x)) - np.mean([np.asarray(f(np.broadcast_to(b, x.shape)))
                                       for b in distribution], axis=0)
  np.testing.assert_allclose(gap, np.asarray(ours).reshape(2, -1).sum(1) - change, atol=1e-5)


def test_registry_matches_the_functions(cnn):
  _, f, x = cnn
  key = jax.random.PRNGKey(0)
  saliency = methods.attribute("saliency", quantity=f, x=x)
  np.testing.assert_allclose(saliency, gradients.gradient(f, x, absolute=True), rtol=1e-6)
  smooth = methods.attribute("smoothgrad", quantity=f, x=x, key=key, options={"samples": 2})
  np.testing.assert_allclose(smooth, gradients.smoothgrad(
      f, x, key=prng.named_key(key, "smoothgrad"), samples=2, stdev_spread=0.15), rtol=1e-6)
  assert smooth.dtype == np.float32 and smooth.shape == x.shape
  assert not methods.is_signed("saliency") and methods.is_signed("saliency", {"abs": False})
  distribution = baselines_lib.BaselineDistribution(np.zeros((2,) + x.shape[1:], np.float32))
  shap = methods.attribute("gradient_shap", quantity=f, x=x, baseline=distribution, key=key,
                           options={"samples": 2})
  assert shap.shape == x.shape and np.isfinite(shap).all()


def test_blurred_baseline_matches_scipy():
  x = np.random.default_rng(7).uniform(-1, 1, (2, 20, 24, 3)).astype(np.float32)
  ours = baselines_lib.resolve_baseline("blurred:2.5", x)
  theirs = scipy.ndimage.gaussian_filter(x, sigma=(0, 2.5, 2.5, 0), mode="nearest", truncate=4.0)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  assert baselines_lib.resolve_baseline("blurred", x).shape == x.shape


def test_named_baselines():
  x = np.zeros((2, 8, 8, 3), np.float32)
  np.testing.assert_allclose(baselines_lib.resolve_baseline("half_gray", x),
                             attribution.half_gray_baseline(x))
  assert float(baselines_lib.resolve_baseline("black", x).max()) == -1.0
  assert float(baselines_lib.resolve_baseline("black", x, space="pixel").max()) == 0.0
  key = jax.random.PRNGKey(3)
  noise = np.asarray(baselines_lib.resolve_baseline("uniform_noise", x, key=key))
  assert noise.shape == x.shape and noise.min() >= -1 and noise.max() <= 1 and noise.std() > 0.5
  np.testing.assert_array_equal(noise, baselines_lib.resolve_baseline("uniform_noise", x, key=key))


def test_bad_calls_name_the_problem(cnn):
  _, f, x = cnn
  with pytest.raises(attribution.AttributionArgumentError, match="unknown attribution method "
                     "'smoothgrads'.*saliency"):
    methods.attribute("smoothgrads", quantity=f, x=x)
  with pytest.raises(attribution.AttributionArgumentError, match="unknown baseline 'gray'.*"
                     "half_gray"):
    methods.attribute("integrated_gradients", quantity=f, x=x, baseline="gray")
  with pytest.raises(attribution.AttributionArgumentError, match=r"\[K, 16, 16, 3\]"):
    gradients.expected_gradients(f, x, np.zeros((2, 8, 8, 3), np.float32), steps=2)
  with pytest.raises(attribution.AttributionArgumentError, match=r"\[K, 16, 16, 3\]"):
    baselines_lib.resolve_baseline(baselines_lib.BaselineDistribution(np.zeros((16, 16, 3))), x)
  with pytest.raises(attribution.AttributionArgumentError, match="key"):
    baselines_lib.resolve_baseline("uniform_noise", x)
  with pytest.raises(attribution.AttributionArgumentError, match="key"):
    methods.attribute("vargrad", quantity=f, x=x)
  with pytest.raises(attribution.AttributionArgumentError, match="no option 'step'.*steps"):
    methods.attribute("integrated_gradients", quantity=f, x=x, options={"step": 3})
  with pytest.raises(attribution.AttributionArgumentError, match="BaselineDistribution"):
    methods.attribute("expected_gradients", quantity=f, x=x, baseline="half_gray")
  with pytest.raises(attribution.AttributionArgumentError, match="smoothgrad_sq"):
    gradients.noise_tunnel(lambda z: z, x, kind="smooth", key=jax.random.PRNGKey(0), stdev=1.0)
  with pytest.raises(attribution.AttributionArgumentError, match="blur sigma"):
    baselines_lib.resolve_baseline("blurred:-1", x)


def test_inception_smoothgrad_matches_captum(monkeypatch, tmp_path):
  torch_model = reference.torchvision_inception().double()
  path = str(tmp_path / "inception_v3.pth")
  torch.save(torch_model.state_dict(), path)
  x = reference.smooth_images(1, reference.INCEPTION_SIZE, 8).astype(np.float64)
  samples, stdev = 2, 0.05
  noise = stdev * np.random.default_rng(9).normal(size=(1, samples) + x.shape[1:])
  with jax.enable_x64(True):
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                       torch_weights.load_torchvision(path))
    model = InceptionV3(num_classes=reference.NUM_GRADES, convention="torchvision",
                        dtype=jnp.float64, param_dtype=jnp.float64)
    logits = jax.tree_util.Partial(functools.partial(reference._apply_model, model), variables)  # pylint: disable=protected-access
    f = attribution.probability_of_grade(logits, 4)
    ours = np.asarray(gradients.smoothgrad(f, x, samples=samples, noise=noise))
  assert ours.dtype == np.float64
  _patched_normal(monkeypatch, noise)
  forward = lambda z: torch.softmax(torch_model(z), dim=-1)
  tunnel = captum_attr.NoiseTunnel(captum_attr.Saliency(forward))
  theirs = tunnel.attribute(_nchw(x), nt_type="smoothgrad", nt_samples=samples, stdevs=stdev,
                            target=4, abs=False)
  _assert_close(ours, _nhwc(theirs), TOL_PATH)


def test_registry_runs_the_path_and_region_methods(cnn):
  """Each registered method through `attribute`: the direct call's values, the documented shape."""
  _, f, x = cnn
  variables = f.logits_fn.args[0]
  to_layer = jax.tree_util.Partial(
      functools.partial(reference._apply, reference.FlaxCNN.to_layer), variables)  # pylint: disable=protected-access
  from_layer = jax.tree_util.Partial(
      functools.partial(reference._apply, reference.FlaxCNN.from_layer), variables)  # pylint: disable=protected-access
  layer_quantity = attribution.probability_of_grade(from_layer, GRADE)
  baseline = attribution.half_gray_baseline(x)
  direct = {
      "blur_ig": lambda: paths.blur_integrated_gradients(f, x, max_sigma=4.0, steps=4)[0],
      "guided_ig": lambda: paths.guided_integrated_gradients(f, x, baseline, steps=4)[0],
      "grad_cam": lambda: gradcam.grad_cam(to_layer, layer_quantity, x).map,
      "occlusion": lambda: occlusion.occlusion(f, x, window=4, stride=4, value=baseline),
      "xrai": lambda: xrai.xrai(f, x, steps=4).saliency,
  }
  options = {"blur_ig": {"max_sigma": 4.0, "steps": 4}, "guided_ig": {"steps": 4},
             "grad_cam": {}, "occlusion": {"window": 4, "stride": 4}, "xrai": {"steps": 4}}
  for name, expected in direct.items():
    ours = methods.attribute(name, quantity=f, x=x, split_model=(to_layer, layer_quantity),
                             options=options[name])
    shape = x.shape if methods.METHODS[name].channels else x.shape[:3]
    assert ours.shape == shape and ours.dtype == np.float32, name
    np.testing.assert_allclose(ours, expected(), rtol=1e-5, atol=1e-7, err_msg=name)
  with pytest.raises(attribution.AttributionArgumentError, match="split_model"):
    methods.attribute("grad_cam", quantity=f, x=x)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from drig import attribution, parallel
    from drig.attribution import methods
    assert jax.device_count() == 8, jax.devices()

    def full(p, x):
      h = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jnp.tanh(jax.nn.softplus(h).mean(axis=(1, 2)) @ p["v"])

    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=(3, 3, 3, 4)).astype(np.float32) * 0.5,
         "v": rng.normal(size=(4,)).astype(np.float32)}
    x = rng.uniform(-1, 1, size=(8, 8, 8, 3)).astype(np.float32)
    mesh = parallel.local_mesh()
    f = jax.tree_util.Partial(full, p)
    f_multi = jax.tree_util.Partial(full, parallel.replicate(p, mesh))
    xs = parallel.shard_batch(x, mesh)
    key = jax.random.PRNGKey(0)
    distribution = rng.uniform(-1, 1, size=(3, 8, 8, 3)).astype(np.float32)
    for name, baseline in (("smoothgrad", "uniform_noise"),
                           ("gradient_shap", attribution.BaselineDistribution(distribution))):
      options = {"samples": 3}
      one = methods.attribute(name, quantity=f, x=x, baseline=baseline, key=key,
                              options=options)
      multi = methods.attribute(name, quantity=f_multi, x=xs, baseline=baseline, key=key,
                                options=options)
      err = float(np.abs(np.asarray(multi) - np.asarray(one)).max())
      assert err <= 1e-5 * float(np.abs(one).max()), (name, err)
      shapes = {s.data.shape for s in multi.addressable_shards}
      assert len(multi.addressable_shards) == 8 and shapes == {(1, 8, 8, 3)}, (name, shapes)
      print("ok", name)
    print("ALL OK")
""")


@pytest.mark.multiprocess
def test_methods_on_eight_fake_devices_equal_one_device_and_stay_split():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "ALL OK" in result.stdout
