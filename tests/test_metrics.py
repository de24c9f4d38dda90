"""drig's grading metrics against scikit-learn on random predictions."""

import numpy as np
import pytest
from sklearn import metrics as skm

from drig.training import metrics


def _random_case(seed, n=500):
  rng = np.random.default_rng(seed)
  labels = rng.choice(5, size=n, p=[0.5, 0.1, 0.2, 0.1, 0.1])
  logits = rng.normal(size=(n, 5)) + 1.5 * np.eye(5)[labels] * rng.random((n, 1))
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return labels, probabilities


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_scikit_learn(seed):
  labels, probabilities = _random_case(seed)
  predictions = probabilities.argmax(-1)
  result = metrics.grading_metrics(labels, probabilities)
  np.testing.assert_array_equal(result["confusion_matrix"],
                                skm.confusion_matrix(labels, predictions, labels=range(5)))
  assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions))
  assert result["quadratic_kappa"] == pytest.approx(
      skm.cohen_kappa_score(labels, predictions, weights="quadratic"), abs=1e-12)
  assert result["auc_any_dr"] == pytest.approx(
      skm.roc_auc_score(labels >= 1, 1 - probabilities[:, 0]), abs=1e-12)
  assert result["sensitivity_any_dr"] == pytest.approx(skm.recall_score(labels >= 1, predictions >= 1))
  assert result["specificity_any_dr"] == pytest.approx(skm.recall_score(labels < 1, predictions < 1))
  assert result["sensitivity_referable_dr"] == pytest.approx(
      skm.recall_score(labels >= 2, predictions >= 2))
  assert result["specificity_referable_dr"] == pytest.approx(
      skm.recall_score(labels < 2, predictions < 2))
  np.testing.assert_allclose(result["recall_per_grade"],
                             skm.recall_score(labels, predictions, labels=range(5), average=None))
  assert result["grade_1_recall"] == result["recall_per_grade"][1]
  # The poster's convention is the standard pair, swapped.
  assert result["poster_sensitivity"] == pytest.approx(result["specificity_any_dr"])
  assert result["poster_specificity"] == pytest.approx(result["sensitivity_any_dr"])


def test_auc_with_ties_matches_scikit_learn():
  rng = np.random.default_rng(3)
  labels = rng.random(300) < 0.3
  scores = rng.integers(0, 4, size=300).astype(float)  # many ties
  assert metrics.roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))


def test_mask_ignores_padding():
  labels, probabilities = _random_case(4, n=64)
  mask = np.arange(64) < 50
  padded = metrics.grading_metrics(labels, probabilities, mask=mask)
  plain = metrics.grading_metrics(labels[:50], probabilities[:50])
  assert padded == plain
  assert padded["num_examples"] == 50


def test_poster_figures_are_reproduced_by_a_constructed_confusion():
  # A confusion matrix where 96% of grade-0 images are predicted 0 and 31% of
  # the others are predicted >= 1: the poster's "sensitivity" and "specificity".
  labels = np.array([0] * 100 + [2] * 100)
  predictions = np.array([0] * 96 + [1] * 4 + [2] * 31 + [0] * 69)
  probabilities = np.eye(5)[predictions]
  result = metrics.grading_metrics(labels, probabilities)
  assert result["poster_sensitivity"] == pytest.approx(0.96)
  assert result["poster_specificity"] == pytest.approx(0.31)


def test_grade_without_images_has_undefined_recall():
  labels = np.array([0, 0, 2, 3, 4])
  result = metrics.grading_metrics(labels, np.eye(5)[[0, 1, 2, 3, 3]])  # one grade-0 image called 1
  assert np.isnan(result["grade_1_recall"])
  assert result["recall_per_grade"][0] == 0.5 and result["recall_per_grade"][4] == 0.0


def test_bad_inputs():
  with pytest.raises(ValueError, match="range"):
    metrics.confusion_matrix([0, 5], [0, 1])
  with pytest.raises(ValueError, match="shape"):
    metrics.confusion_matrix([0, 1, 2], [0, 1])
  with pytest.raises(ValueError, match="probabilities"):
    metrics.grading_metrics([0, 1], [0.1, 0.9])
