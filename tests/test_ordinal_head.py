"""The cumulative-link (ordinal) head against its closed form, and drig's softmax quantities on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from configs import model as model_config
from drig.attribution import quantities
from drig.models import classifier


def _closed_form(score, thresholds):
  """P(grade = k) from P(grade > k) = 1 / (1 + exp(-(s - b_{k+1}))), in float64."""
  above = special.expit(np.asarray(score, np.float64)[:, None] - np.asarray(thresholds)[None])
  cumulative = np.concatenate([np.ones((above.shape[0], 1)), above,
                               np.zeros((above.shape[0], 1))], axis=1)
  return cumulative[:, :-1] - cumulative[:, 1:]


def test_log_probabilities_match_the_closed_form():
  score = np.linspace(-6, 6, 25)
  thresholds = np.array([-2.0, -0.3, 0.1, 2.5])
  log_p = np.asarray(classifier.ordinal_log_probabilities(score, thresholds))
  np.testing.assert_allclose(np.exp(log_p), _closed_form(score, thresholds), atol=1e-6)
  np.testing.assert_allclose(np.exp(log_p).sum(-1), 1.0, atol=1e-6)
  # Far scores stay finite in log space (a plain difference of sigmoids would give log 0).
  extreme = np.asarray(classifier.ordinal_log_probabilities(np.array([-80.0, 80.0]), thresholds))
  assert np.isfinite(extreme).all()
  np.testing.assert_allclose(extreme[0, 0], 0.0, atol=1e-6)
  np.testing.assert_allclose(extreme[1, -1], 0.0, atol=1e-6)


@pytest.fixture(scope="module")
def ordinal_model():
  config = model_config.get_model_config("tiny")
  config.head = "ordinal"
  model = classifier.build_model(config)
  # The head alone, run from fc2's activation [N, 8] (the tiny model's width): the
  # Inception base in front of it adds nothing to these checks but a minute of compilation.
  features = jax.random.normal(jax.random.key(1), (3, 8))
  variables = model.init({"params": jax.random.key(0)}, features, start_layer="fc2")
  return model, variables, features


def test_classifier_logits_layer_gives_rank_consistent_grade_log_probabilities(ordinal_model):
  model, variables, features = ordinal_model
  head = variables["params"]["logits"]
  assert set(head) == {"score", "thresholds"}
  log_p = np.asarray(model.apply(variables, features, start_layer="fc2"))
  assert log_p.shape == (3, 5)
  probabilities = np.asarray(jax.nn.softmax(log_p, -1))
  np.testing.assert_allclose(probabilities, np.exp(log_p), rtol=1e-5, atol=1e-7)
  # Thresholds start at -1.5, -0.5, 0.5, 1.5; fc2's activation gives the score.
  pooled = np.asarray(features)
  score = pooled @ np.asarray(head["score"]["kernel"]) + np.asarray(head["score"]["bias"])
  np.testing.assert_allclose(probabilities, _closed_form(score[:, 0], [-1.5, -0.5, 0.5, 1.5]),
                             atol=1e-5)
  # Rank consistency: P(grade > k) falls with k for every image.
  above = 1.0 - np.cumsum(probabilities, axis=-1)[:, :-1]
  assert (np.diff(above, axis=-1) <= 1e-7).all()


def test_probability_of_grade_works_unchanged(ordinal_model):
  model, variables, features = ordinal_model
  logits_fn = lambda x: model.apply(variables, x, start_layer="fc2")
  read_out = jax.jit(lambda x: (jnp.exp(logits_fn(x)), jnp.stack(
      [quantities.probability_of_grade(logits_fn, g)(x) for g in range(5)], -1)))
  probabilities, values = read_out(features)
  np.testing.assert_allclose(np.asarray(values), np.asarray(probabilities), rtol=1e-5)
  gradient = jax.jit(jax.grad(
      lambda x: quantities.probability_of_grade(logits_fn, 1)(x).sum()))(features)
  assert gradient.shape == features.shape and np.isfinite(np.asarray(gradient)).all()


def test_unknown_head_is_an_error():
  config = model_config.get_model_config("tiny")
  config.head = "cumulative"
  model = classifier.build_model(config)
  with pytest.raises(ValueError, match="model.head"):
    model.init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
