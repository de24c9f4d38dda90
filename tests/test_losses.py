"""The training losses and test-time augmentation against torch, scikit-learn and closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import special
from sklearn.utils import class_weight
import torch
import torch.nn.functional as F

from configs import base as base_config
from drig.training import evaluation
from drig.training import losses

PROPORTIONS = (8, 1, 2, 1, 4)


def _loss_config(**fields):
  config = base_config.get_config("tiny").loss
  config.update(fields)
  return config


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  labels = rng.integers(5, size=64)
  logits = (rng.normal(size=(64, 5)) * 2).astype(np.float32)
  return logits, labels


def _torch_ce(logits, labels, **kwargs):
  return F.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels), **kwargs)


def test_default_is_the_posters_softmax_cross_entropy(batch):
  logits, labels = batch
  loss = losses.make_loss(_loss_config(), PROPORTIONS, 5)(logits, labels)
  assert loss == optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  assert float(loss) == pytest.approx(float(_torch_ce(logits, labels)), rel=1e-5)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_matches_torch(batch, smoothing):
  logits, labels = batch
  loss = losses.make_loss(_loss_config(label_smoothing=smoothing), PROPORTIONS, 5)(logits, labels)
  expected = _torch_ce(logits, labels, label_smoothing=smoothing)
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_balanced_weights_are_scikit_learns_up_to_scale():
  # Labels in exactly the batch shares: scikit-learn's "balanced" weights are n / (5 count).
  labels = np.repeat(np.arange(5), PROPORTIONS)
  expected = class_weight.compute_class_weight("balanced", classes=np.arange(5), y=labels)
  weights = np.asarray(losses.class_weights(PROPORTIONS, 1.0))
  np.testing.assert_allclose(weights / weights[0], expected / expected[0], rtol=1e-6)
  shares = np.array(PROPORTIONS) / sum(PROPORTIONS)
  for power in (0.0, 0.5, 1.0):
    weights = np.asarray(losses.class_weights(PROPORTIONS, power))
    assert np.sum(shares * weights) == pytest.approx(1.0)  # the loss keeps its scale
    np.testing.assert_allclose(weights / weights[0], (shares / shares[0]) ** -power, rtol=1e-6)


def test_class_weighted_loss_matches_torch(batch):
  logits, labels = batch
  loss = losses.make_loss(_loss_config(class_weight_power=0.5), PROPORTIONS, 5)(logits, labels)
  weights = torch.from_numpy(np.array(losses.class_weights(PROPORTIONS, 0.5))).double()
  expected = _torch_ce(logits, labels, weight=weights, reduction="none").mean()
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_focal_loss_closed_form(batch, gamma):
  logits, labels = batch
  loss = losses.make_loss(_loss_config(name="focal", focal_gamma=gamma), PROPORTIONS, 5)
  p = special.softmax(logits.astype(np.float64), axis=-1)[np.arange(labels.size), labels]
  expected = np.mean(-(1 - p) ** gamma * np.log(p))
  assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-5)
  if gamma == 0.0:  # no focusing: the cross-entropy
    assert float(loss(logits, labels)) == pytest.approx(float(_torch_ce(logits, labels)), rel=1e-5)


def test_focal_loss_with_smoothing_and_weights_closed_form(batch):
  logits, labels = batch
  config = _loss_config(name="focal", focal_gamma=2.0, label_smoothing=0.2, class_weight_power=1.0)
  loss = losses.make_loss(config, PROPORTIONS, 5)(logits, labels)
  p = special.softmax(logits.astype(np.float64), axis=-1)
  targets = np.eye(5)[labels] * 0.8 + 0.2 / 5
  weights = np.asarray(losses.class_weights(PROPORTIONS, 1.0), np.float64)[labels]
  expected = np.mean(weights * -np.sum(targets * (1 - p) ** 2 * np.log(p), -1))
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_focal_loss_down_weights_easy_examples():
  logits = jnp.array([[6.0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0]])
  targets = jax.nn.one_hot(jnp.array([0, 0]), 5)
  ratio = losses.focal_loss(logits, targets, 2.0) / optax.softmax_cross_entropy(logits, targets)
  assert ratio[0] < 1e-4 and ratio[1] > 0.4


@pytest.mark.parametrize("field, value, message", [
    ("name", "hinge", "config.loss.name"),
    ("label_smoothing", 1.0, "label_smoothing"),
    ("focal_gamma", -1.0, "focal_gamma"),
    ("class_weight_power", -0.5, "class_weight_power"),
])
def test_bad_loss_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    losses.make_loss(_loss_config(**{field: value}), PROPORTIONS, 5)


def test_proportions_must_match_the_classes():
  with pytest.raises(ValueError, match="one share per"):
    losses.make_loss(_loss_config(class_weight_power=1.0), (1, 2), 5)
  with pytest.raises(ValueError, match="positive"):
    losses.class_weights((1, 0, 2, 1, 1), 1.0)


# --------------------------------------------------------------------------- #
# Test-time augmentation.


class _TinyGrader(nn.Module):
  """Small enough to be quick, and not invariant to flips or rotations."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def grader():
  model = _TinyGrader()
  images = np.random.default_rng(1).integers(0, 256, size=(3, 12, 12, 3)).astype(np.uint8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 3)))
  return model, variables, images


def _probabilities(model, variables, images):
  logits = model.apply(variables, jnp.asarray(images, jnp.float32) / 127.5 - 1)
  return np.asarray(jax.nn.softmax(logits, -1))


@pytest.mark.parametrize("name, transforms", [
    ("flips", [lambda a: a, lambda a: a[:, :, ::-1], lambda a: a[:, ::-1],
               lambda a: a[:, ::-1, ::-1]]),
    ("rotations", [lambda a, k=k: np.rot90(a, k, axes=(1, 2)) for k in range(4)]),
    ("dihedral", [lambda a, k=k, f=f: np.rot90(a[:, :, ::-1] if f else a, k, axes=(1, 2))
                  for k in range(4) for f in (False, True)]),
])
def test_tta_averages_the_probabilities_of_the_transformed_images(grader, name, transforms):
  model, variables, images = grader
  predicted = evaluation.predict_step(variables, images, model=model, test_time_augmentation=name)
  expected = np.mean([_probabilities(model, variables, t(images)) for t in transforms], axis=0)
  np.testing.assert_allclose(np.asarray(predicted), expected, rtol=1e-5, atol=1e-6)
  plain = evaluation.predict_step(variables, images, model=model)
  np.testing.assert_allclose(np.asarray(plain), _probabilities(model, variables, images),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(plain), expected, atol=1e-4)  # the copies do differ


def test_unknown_tta_names_the_option(grader):
  model, variables, images = grader
  with pytest.raises(ValueError, match="test_time_augmentation"):
    evaluation.predict_step(variables, images, model=model, test_time_augmentation="crops")


def test_config_defaults_keep_the_poster_recipe():
  config = base_config.get_config()
  assert config.loss.name == "softmax_cross_entropy" and config.loss.label_smoothing == 0.0
  assert config.loss.class_weight_power == 0.0
  assert config.evaluation.test_time_augmentation == "none"
  assert isinstance(config.loss, ml_collections.ConfigDict)
