"""Inception-v3 architecture and the DR classifier, against torchvision and known formulas.

Numerical parity of whole networks with Keras and torchvision weights is in
test_importer.py; here: structure, shapes, sizes, training-mode BatchNorm,
dtypes and the classifier head.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drig.models import classifier
from drig.models import inception_v3
from drig.models import layer_access

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = jnp.zeros((1, 75, 75, 3))
TORCH_BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")


def shapes_of(model, x=IMAGE):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def flat(tree):
  """{"params/Mixed_5b/branch1x1/conv/kernel": leaf, ...}."""
  return {"/".join(p.key for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_variables(model, seed=0, x=IMAGE):
  """He-scaled kernels, random BatchNorm statistics (numpy; no initialiser compilation)."""
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif name in ("var", "scale"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(0, 0.2, leaf.shape)
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes_of(model, x))


@pytest.fixture(scope="module")
def torch_model():
  # Lazy: torch is a slow, test-only import.
  import torchvision  # pylint: disable=g-import-not-at-top
  return torchvision.models.inception_v3(weights=None, aux_logits=False,
                                         init_weights=False).eval()


def test_conv_units_are_torchvisions_in_order(torch_model):
  # Lazy: torch is a slow, test-only import.
  import torchvision  # pylint: disable=g-import-not-at-top
  torch_units = [name for name, m in torch_model.named_modules()
                 if isinstance(m, torchvision.models.inception.BasicConv2d)]
  assert [".".join(u) for u in inception_v3.CONV_UNITS] == torch_units
  variables = flat(shapes_of(inception_v3.InceptionV3(convention="torchvision")))
  state = torch_model.state_dict()
  for unit, prefix in zip(inception_v3.CONV_UNITS, torch_units):
    path = "/".join(unit)
    out_c, in_c, h, w = state[f"{prefix}.conv.weight"].shape
    assert variables[f"params/{path}/conv/kernel"].shape == (h, w, in_c, out_c)
    for name in ("bias", "scale"):
      assert variables[f"params/{path}/bn/{name}"].shape == (out_c,)
    for name in ("mean", "var"):
      assert variables[f"batch_stats/{path}/bn/{name}"].shape == (out_c,)
  assert len(variables) == 94 * 5  # nothing else: no top, no auxiliary head


def test_parameter_counts(torch_model):
  expected = sum(v.numel() for k, v in torch_model.state_dict().items()
                 if not k.endswith("num_batches_tracked"))
  tv_top = inception_v3.InceptionV3(num_classes=1000, convention="torchvision")
  assert inception_v3.count_parameters(shapes_of(tv_top)) == expected
  # Keras' count for the notop base (also checked against Keras in test_importer).
  assert inception_v3.count_parameters(shapes_of(inception_v3.InceptionV3())) == 21_802_784
  head = 2048 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 5 + 5
  assert inception_v3.count_parameters(shapes_of(classifier.DRClassifier())) == (
      21_802_784 + head)


def test_activation_shapes_match_torchvision(torch_model):
  """At the smallest and an odd size (299 and 256 px: the parity tests)."""
  # Lazy: torch is a slow, test-only import.
  import torch  # pylint: disable=g-import-not-at-top
  model = inception_v3.InceptionV3(num_classes=1000)
  variables = shapes_of(model)
  aliases = inception_v3.layer_aliases()
  for size in (75, 107):
    shapes = {}
    hooks = [getattr(torch_model, name).register_forward_hook(
        lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
             for name in ("Conv2d_1a_3x3", "Conv2d_4a_3x3") + TORCH_BLOCKS]
    try:
      with torch.no_grad():
        torch_model(torch.zeros(1, 3, size, size))
    finally:
      for hook in hooks:
        hook.remove()
    ours = layer_access.layer_shapes(model, variables, (1, size, size, 3))
    for name, (n, c, h, w) in shapes.items():
      assert ours[aliases.get(name, name)] == (n, h, w, c), (size, name)
    assert ours["pooled"] == (1, 2048) and ours["logits"] == (1, 1000)


def test_rejects_bad_inputs():
  model = inception_v3.InceptionV3(width_multiplier=0.0625)
  variables = shapes_of(model)
  with pytest.raises(ValueError, match="at least 75x75 pixels, got 74x80"):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 74, 80, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 80, 80, 1)))
  with pytest.raises(ValueError, match="convention"):
    shapes_of(inception_v3.InceptionV3(convention="caffe"))
  with pytest.raises(ValueError, match="unknown activation"):
    shapes_of(classifier.DRClassifier(activation="softsign", width_multiplier=0.0625))


def test_width_multiplier_scales_channels_only():
  full = flat(shapes_of(inception_v3.InceptionV3()))
  small = flat(shapes_of(inception_v3.InceptionV3(width_multiplier=0.25)))
  assert full.keys() == small.keys()
  for key, leaf in full.items():
    expected = max(1, round(leaf.shape[-1] * 0.25))
    assert small[key].shape[-1] == expected, key
    if key.endswith("kernel"):
      assert small[key].shape[:2] == leaf.shape[:2]  # same kernel sizes


@pytest.mark.parametrize("convention", ["keras", "torchvision"])
def test_train_mode_batchnorm(convention):
  """A conv unit in training mode: batch statistics, and the running averages'
  update with Keras' momentum (0.99) or torch's (0.1, i.e. 0.9 in Flax's terms)."""
  # Lazy: torch is a slow, test-only import.
  import torch  # pylint: disable=g-import-not-at-top
  torchvision_convention = convention == "torchvision"
  momentum = 0.9 if torchvision_convention else 0.99
  unit = inception_v3.ConvBN(6, (3, 3), bn_scale=torchvision_convention, bn_momentum=momentum)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(4, 9, 9, 3)), jnp.float32)
  shapes = jax.eval_shape(functools.partial(unit.init, train=False), jax.random.key(0), x)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32),
                           shapes)
  y, updates = unit.apply(variables, x, train=True, mutable=["batch_stats"])

  conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
  bn = torch.nn.BatchNorm2d(6, eps=1e-3, momentum=1 - momentum, affine=True)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["conv"]["kernel"])
                                       .transpose(3, 2, 0, 1).copy()))
    bn.weight.copy_(torch.from_numpy(np.array(variables["params"]["bn"]["scale"]))
                    if torchvision_convention else torch.ones(6))
    bn.bias.copy_(torch.from_numpy(np.array(variables["params"]["bn"]["bias"])))
    bn.running_mean.copy_(torch.from_numpy(np.array(variables["batch_stats"]["bn"]["mean"])))
    bn.running_var.copy_(torch.from_numpy(np.array(variables["batch_stats"]["bn"]["var"])))
    before_var = bn.running_var.clone()
    reference = torch.relu(bn.train()(conv(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2)
                                                             .copy()))))
  np.testing.assert_allclose(np.asarray(y), reference.numpy().transpose(0, 2, 3, 1), rtol=1e-4,
                             atol=1e-5)
  new = updates["batch_stats"]["bn"]
  np.testing.assert_allclose(new["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  # torch updates the running variance with the unbiased batch variance, Keras
  # and Flax with the biased one: undo torch's n/(n-1) to compare.
  n = x.shape[0] * x.shape[1] * x.shape[2]
  batch_unbiased = (bn.running_var.numpy() - momentum * before_var.numpy()) / (1 - momentum)
  expected_var = momentum * before_var.numpy() + (1 - momentum) * batch_unbiased * (n - 1) / n
  np.testing.assert_allclose(new["var"], expected_var, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny():
  model = classifier.DRClassifier(width_multiplier=0.0625, fc_widths=(16, 8), dropout=0.5)
  return model, random_variables(model, seed=1)


def test_classifier_inference_and_training(tiny):
  model, variables = tiny
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (3, 75, 75, 3)), jnp.float32)

  @jax.jit
  def run(variables, x):
    logits = model.apply(variables, x)
    probabilities = classifier.predict_probabilities(model, variables, x)
    train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": jax.random.key(0)})
    return logits, probabilities, train_logits, updates

  logits, probabilities, train_logits, updates = run(variables, x)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  np.testing.assert_allclose(probabilities, jax.nn.softmax(logits), rtol=1e-6)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
  assert not np.allclose(train_logits, logits)  # batch statistics and dropout
  old, new = variables["batch_stats"], updates["batch_stats"]
  assert jax.tree.structure(old) == jax.tree.structure(new)
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))


def test_dropout_acts_between_named_layers(tiny):
  model, variables = tiny
  pooled = jnp.asarray(np.random.default_rng(3).normal(size=(64, 128)), jnp.float32)
  head = functools.partial(model.apply, variables, pooled, start_layer="pooled")
  inference = head()
  first, second = (head(train=True, rngs={"dropout": jax.random.key(k)}) for k in (1, 2))
  assert not np.allclose(first, second) and not np.allclose(first, inference)
  # fc1's activation does not see dropout; it acts on fc2's and the logits' inputs.
  np.testing.assert_array_equal(
      head(stop_layer="fc1", train=True, rngs={"dropout": jax.random.key(1)}),
      head(stop_layer="fc1"))
  with pytest.raises(Exception, match="dropout"):
    head(train=True)  # no rng: an error, not silent determinism


def test_bfloat16_computation():
  f32 = inception_v3.InceptionV3(width_multiplier=0.125)
  bf16 = inception_v3.InceptionV3(width_multiplier=0.125, dtype=jnp.bfloat16)
  variables = random_variables(f32, seed=3)
  x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 75, 75, 3)), jnp.float32)
  reference = f32.apply(variables, x, stop_layer="Conv2d_4a_3x3")
  low = bf16.apply(variables, x, stop_layer="Conv2d_4a_3x3")
  assert low.dtype == jnp.bfloat16
  error = np.abs(np.asarray(low, np.float32) - reference).max() / np.abs(reference).max()
  assert 1e-4 < error < 5e-2, error  # bfloat16 rounding, nothing worse
  top = classifier.DRClassifier(dtype=jnp.bfloat16, width_multiplier=0.125)
  top_variables = shapes_of(top)
  assert jax.eval_shape(top.apply, top_variables, x).dtype == jnp.float32  # logits
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(top_variables))


def _model_configs():
  # Lazy: configs/ is importable only with the repository root on sys.path.
  sys.path.insert(0, ROOT)
  try:
    from configs import model as model_config  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(ROOT)
  return model_config


def test_models_from_configs():
  configs = _model_configs()
  model = classifier.build_model(configs.get_model_config())
  assert model == classifier.DRClassifier(fc_widths=(1024, 512))
  tiny = classifier.build_classifier(configs.get_model_config("tiny"))
  assert tiny.width_multiplier == 0.0625 and tiny.fc_widths == (16, 8)
  hash(classifier.DRClassifier(fc_widths=[16, 8]))  # usable as a static jit argument
  assert classifier.build_model(configs.get_model_config("torchvision")).convention == (
      "torchvision")
  bare = classifier.build_model(configs.get_model_config("inception"))
  assert isinstance(bare, inception_v3.InceptionV3) and bare.num_classes == 1000
  config = configs.get_model_config()
  config.dtype = "bfloat16"
  assert classifier.build_classifier(config).dtype == jnp.bfloat16
  config.dtype = "float128"
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    classifier.build_classifier(config)
  with pytest.raises(ValueError, match="unknown configs/model.py argument"):
    configs.get_model_config("huge")


@pytest.mark.parametrize("kernel,strides,padding,size", [
    ((1, 1), 1, "VALID", 9), ((1, 1), 1, "SAME", 8), ((3, 3), 1, "VALID", 11),
    ((3, 3), 1, "VALID", 10), ((3, 3), 2, "VALID", 11), ((3, 3), 2, "VALID", 12),
    ((3, 3), 1, "SAME", 9), ((1, 7), 1, "SAME", 9), ((7, 1), 1, "SAME", 10),
    ((5, 5), 1, "SAME", 9), ((3, 3), 2, "SAME", 11)])
def test_conv_equals_flax_conv(kernel, strides, padding, size):
  """drig's Conv (fast paths for 1x1 and VALID) == nn.Conv: parameters, values, input gradients."""
  ours = inception_v3.Conv(6, kernel, strides=strides, padding=padding)
  theirs = __import__("flax").linen.Conv(6, kernel, strides=strides, padding=padding,
                                         use_bias=False)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size + 1, 5)), jnp.float32)
  params = ours.init(jax.random.key(0), x)
  reference_params = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference_params)
  y, y_ref = ours.apply(params, x), theirs.apply(params, x)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=y.shape), jnp.float32)
  grad = jax.grad(lambda z: jnp.sum(ours.apply(params, z) * cotangent))(x)
  grad_ref = jax.grad(lambda z: jnp.sum(theirs.apply(params, z) * cotangent))(x)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-5)


def test_conv_computes_in_the_requested_dtype():
  conv = inception_v3.Conv(4, (1, 1), dtype=jnp.bfloat16)
  x = jnp.ones((1, 3, 3, 2), jnp.float32)
  params = conv.init(jax.random.key(0), x)
  assert params["params"]["kernel"].dtype == jnp.float32
  assert conv.apply(params, x).dtype == jnp.bfloat16

