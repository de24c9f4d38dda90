"""Layer access: input -> layer and layer -> output compose to the model bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drig.models import classifier
from drig.models import inception_v3
from drig.models import layer_access

SIZE = 80
STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
MIXED = tuple(f"mixed{i}" for i in range(11))


def random_variables(model, seed=0, size=SIZE):
  """Random variables for ``model``: He-scaled kernels, random BN statistics.

  Built from the traced shapes with numpy: compiling the Flax initialisers of
  94 convolutions costs tens of seconds on a 2-core CPU.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif name == "var":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(0, 0.2, leaf.shape)
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


CLASSIFIER = classifier.DRClassifier(width_multiplier=0.0625, fc_widths=(16, 8))
BASE = inception_v3.InceptionV3(width_multiplier=0.0625)
WITH_TOP = inception_v3.InceptionV3(num_classes=10, width_multiplier=0.0625)


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, SIZE, SIZE, 3)), jnp.float32)


@pytest.fixture(scope="module")
def classifier_variables():
  return random_variables(CLASSIFIER, seed=1)


def test_layer_names():
  assert layer_access.layer_names(CLASSIFIER) == STEM + MIXED + ("pooled", "fc1", "fc2",
                                                                  "logits")
  assert layer_access.layer_names(BASE) == STEM + MIXED + ("pooled",)
  assert layer_access.layer_names(WITH_TOP) == STEM + MIXED + ("pooled", "logits")
  three = classifier.DRClassifier(fc_widths=(8, 8, 8))
  assert layer_access.layer_names(three)[-4:] == ("fc1", "fc2", "fc3", "logits")


# Every layer of the classifier; a few of the bare models (the same code path;
# each eager pass costs most of a second on 2 cores).
@pytest.mark.parametrize("model,layers", [
    (CLASSIFIER, None),
    (BASE, ("Conv2d_1a_3x3", "mixed3", "pooled")),
    (WITH_TOP, ("Conv2d_4a_3x3", "mixed10", "pooled", "logits"))],
                         ids=["classifier", "base", "top"])
def test_composition_is_exact_eagerly(model, layers, images):
  variables = random_variables(model, seed=2)
  full = np.asarray(model.apply(variables, images, train=False))
  every_layer = layer_access.layer_activations(model, variables, images)
  assert tuple(every_layer) == layer_access.layer_names(model)
  for layer in layers or layer_access.layer_names(model):
    activation = layer_access.input_to_layer(model, variables, images, layer)
    assert np.array_equal(every_layer[layer], activation), layer
    output = layer_access.layer_to_output(model, variables, activation, layer)
    assert np.array_equal(np.asarray(output), full), layer


@pytest.fixture(scope="module")
def jitted_full(classifier_variables, images):
  return jax.jit(lambda v, x: CLASSIFIER.apply(v, x, train=False))(classifier_variables, images)


# Separately jitted halves, as the attribution engine compiles them. The stem's
# last convolution is the poster's layer; fc1 is in the head.
@pytest.mark.parametrize("layer", ["Conv2d_4a_3x3", "fc1"])
def test_composition_is_exact_under_jit(classifier_variables, images, jitted_full, layer):
  model, variables = CLASSIFIER, classifier_variables
  to_layer = jax.jit(layer_access.input_to_layer, static_argnums=(0, 3))
  from_layer = jax.jit(layer_access.layer_to_output, static_argnums=(0, 3))
  activation = to_layer(model, variables, images, layer)
  assert np.array_equal(from_layer(model, variables, activation, layer), jitted_full)


def test_composition_is_exact_under_one_jit(classifier_variables, images, jitted_full):
  layer = "mixed5"
  composed = jax.jit(lambda v, x: layer_access.layer_to_output(
      CLASSIFIER, v, layer_access.input_to_layer(CLASSIFIER, v, x, layer), layer))(
          classifier_variables, images)
  assert np.array_equal(composed, jitted_full)


def _conv_bn_relu(variables, unit, x, strides, padding):
  """One conv unit by hand, from its variables: the documented activation."""
  params = variables["params"]["base"][unit]
  stats = variables["batch_stats"]["base"][unit]["bn"]
  y = jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (strides, strides), padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = (y - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-3) + params["bn"]["bias"]
  return jax.nn.relu(y)


def test_activations_are_what_the_names_say(classifier_variables, images):
  v, m = classifier_variables, CLASSIFIER
  def at(layer):
    return np.asarray(layer_access.input_to_layer(m, v, images, layer))
  conv1 = _conv_bn_relu(v, "Conv2d_1a_3x3", images, 2, "VALID")
  np.testing.assert_allclose(at("Conv2d_1a_3x3"), conv1, rtol=1e-5, atol=1e-5)
  # Conv2d_3b_1x1's input is the max pool of Conv2d_2b_3x3's activation.
  pooled_2b = jax.lax.reduce_window(at("Conv2d_2b_3x3"), -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                    (1, 2, 2, 1), "VALID")
  np.testing.assert_allclose(at("Conv2d_3b_1x1"),
                             _conv_bn_relu(v, "Conv2d_3b_1x1", pooled_2b, 1, "VALID"),
                             rtol=1e-5, atol=1e-5)
  _, state = m.apply(v, images, capture_intermediates=True)
  np.testing.assert_array_equal(at("mixed0"), state["intermediates"]["base"]["Mixed_5b"]
                                ["__call__"][0])
  np.testing.assert_allclose(at("pooled"), at("mixed10").mean(axis=(1, 2)), rtol=1e-6)
  fc1 = jax.nn.relu(at("pooled") @ v["params"]["fc1"]["kernel"] + v["params"]["fc1"]["bias"])
  np.testing.assert_allclose(at("fc1"), fc1, rtol=1e-5, atol=1e-6)
  assert at("pooled").dtype == np.float32 and at("logits").dtype == np.float32


def test_aliases_and_unknown_layers(classifier_variables, images):
  v, m = classifier_variables, CLASSIFIER
  assert layer_access.canonical_layer_name(m, "Mixed_5b") == "mixed0"
  np.testing.assert_array_equal(layer_access.input_to_layer(m, v, images, "Mixed_7c"),
                                layer_access.input_to_layer(m, v, images, "mixed10"))
  for function, arg in ((layer_access.input_to_layer, images),
                        (layer_access.layer_to_output, images)):
    with pytest.raises(ValueError, match=r"unknown layer 'conv2d_99'.*Conv2d_4a_3x3.*mixed0"):
      function(m, v, arg, "conv2d_99")
  with pytest.raises(ValueError, match="unknown layer 'fc1'"):
    layer_access.input_to_layer(BASE, random_variables(BASE), images, "fc1")
  with pytest.raises(ValueError, match="comes before"):
    m.apply(v, images, start_layer="mixed3", stop_layer="mixed1")
  with pytest.raises(TypeError, match="no named layers"):
    layer_access.layer_names(object())


def test_layer_to_output_differentiates_and_vectorises(classifier_variables, images):
  v, m, layer = classifier_variables, CLASSIFIER, "mixed9"
  activation = layer_access.input_to_layer(m, v, images, layer)
  def grade4(a):
    return layer_access.layer_to_output(m, v, a, layer)[:, 4].sum()
  grad = jax.jit(jax.grad(grade4))(activation)
  assert grad.shape == activation.shape and np.isfinite(grad).all() and np.any(grad != 0)
  # The head is linear in its input away from ReLU kinks: a tiny step along
  # the gradient changes the quantity by |grad| * step, to first order.
  step = 1e-2 * grad / jnp.linalg.norm(grad)
  change = grade4(activation + step) - grade4(activation)
  np.testing.assert_allclose(change, 1e-2 * jnp.linalg.norm(grad), rtol=0.1)
  per_image = jax.vmap(lambda a: layer_access.layer_to_output(m, v, a[None], layer)[0])
  np.testing.assert_allclose(per_image(activation), m.apply(v, images), rtol=1e-5, atol=1e-6)


def test_layer_shapes(classifier_variables):
  shapes = layer_access.layer_shapes(CLASSIFIER, classifier_variables, (3, 299, 299, 3))
  assert shapes["Conv2d_1a_3x3"] == (3, 149, 149, 2)
  assert shapes["Conv2d_4a_3x3"] == (3, 71, 71, 12)
  assert shapes["mixed2"][:3] == (3, 35, 35) and shapes["mixed7"][:3] == (3, 17, 17)
  assert shapes["mixed10"][:3] == (3, 8, 8)
  assert shapes["pooled"] == (3, shapes["mixed10"][-1])
  assert shapes["fc1"] == (3, 16) and shapes["fc2"] == (3, 8) and shapes["logits"] == (3, 5)
