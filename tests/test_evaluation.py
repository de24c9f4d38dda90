"""Bootstrap intervals of the grading metrics against scikit-learn on each resample."""

import numpy as np
import pytest
from sklearn import metrics as skm

from drig import statistics
from drig.training import bootstrap
from drig.training import metrics


def _random_case(seed, n):
  rng = np.random.default_rng(seed)
  labels = rng.choice(5, size=n, p=[0.5, 0.1, 0.2, 0.1, 0.1])
  logits = rng.normal(size=(n, 5)) + 1.5 * np.eye(5)[labels] * rng.random((n, 1))
  # Rounded so that the any-DR scores tie often, as a low-precision model's do.
  probabilities = np.round(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), 2)
  return labels, probabilities


def _sklearn_metrics(labels, probabilities):
  predictions = probabilities.argmax(-1)
  recall = lambda positive, predicted: (skm.recall_score(positive, predicted)
                                        if positive.any() else np.nan)
  return {
      "accuracy": skm.accuracy_score(labels, predictions),
      "quadratic_kappa": skm.cohen_kappa_score(labels, predictions, weights="quadratic"),
      "auc_any_dr": skm.roc_auc_score(labels >= 1, 1 - probabilities[:, 0]),
      "grade_1_recall": recall(labels == 1, predictions == 1),
      "sensitivity_any_dr": recall(labels >= 1, predictions >= 1),
      "specificity_any_dr": recall(labels < 1, predictions < 1),
      "sensitivity_referable_dr": recall(labels >= 2, predictions >= 2),
      "specificity_referable_dr": recall(labels < 2, predictions < 2),
      "poster_sensitivity": recall(labels == 0, predictions == 0),
      "poster_specificity": recall(labels >= 1, predictions >= 1),
  }


def test_every_resample_matches_scikit_learn():
  labels, probabilities = _random_case(0, n=120)
  indices = np.random.default_rng(1).integers(labels.size, size=(25, labels.size))
  counts = statistics.counts_from_indices(indices, labels.size)
  replicates = bootstrap.metrics_of_resamples(labels, probabilities, counts)
  assert set(replicates) == set(bootstrap.INTERVAL_METRICS)
  for b, drawn in enumerate(indices):
    expected = _sklearn_metrics(labels[drawn], probabilities[drawn])
    for name, value in expected.items():
      np.testing.assert_allclose(replicates[name][b], value, atol=1e-12, err_msg=name)


def test_resample_counts_are_the_seeded_draws():
  counts = statistics.resample_counts(7, 4, seed=3)
  drawn = np.random.default_rng(3).integers(7, size=(4, 7))
  np.testing.assert_array_equal(counts, [np.bincount(row, minlength=7) for row in drawn])
  np.testing.assert_array_equal(counts.sum(1), 7)


def test_intervals_contain_the_estimate_reproduce_and_shrink_with_n():
  labels, probabilities = _random_case(2, n=200)
  point = metrics.grading_metrics(labels, probabilities)
  small = bootstrap.bootstrap_intervals(labels, probabilities, num_resamples=500, seed=0)
  assert small == bootstrap.bootstrap_intervals(labels, probabilities, num_resamples=500, seed=0)
  assert small["num_resamples"] == 500 and small["confidence"] == 0.95
  # The same images, 9 times over: the interval narrows by about sqrt(9) = 3.
  large = bootstrap.bootstrap_intervals(np.tile(labels, 9), np.tile(probabilities, (9, 1)),
                                        num_resamples=500, seed=0)
  for name in bootstrap.INTERVAL_METRICS:
    low, high = small["intervals"][name]
    assert low <= point[name] <= high, name
    large_low, large_high = large["intervals"][name]
    assert large_low <= point[name] <= large_high, name
    assert 2.0 < (high - low) / (large_high - large_low) < 4.5, name


def test_accuracy_interval_covers_the_true_rate_about_95_percent_of_the_time():
  # Test sets of 150 images from a grader right with probability 0.8: the
  # nominal 95% interval should contain 0.8 in roughly 95% of them.
  rng = np.random.default_rng(5)
  true_accuracy, hits, trials = 0.8, 0, 150
  for trial in range(trials):
    labels = rng.integers(5, size=150)
    right = rng.random(150) < true_accuracy
    predictions = np.where(right, labels, (labels + 1 + rng.integers(4, size=150)) % 5)
    result = bootstrap.bootstrap_intervals(labels, np.eye(5)[predictions], num_resamples=300,
                                           seed=trial)
    low, high = result["intervals"]["accuracy"]
    hits += low <= true_accuracy <= high
  # Binomial spread of 150 trials at 0.95 is about 0.018; the percentile interval is slightly short.
  assert 0.87 <= hits / trials <= 0.99


def test_mask_and_missing_grade():
  labels, probabilities = _random_case(4, n=60)
  labels = np.where(labels == 1, 0, labels)  # no grade-1 image
  mask = np.arange(60) < 50
  masked = bootstrap.bootstrap_intervals(labels, probabilities, num_resamples=50, mask=mask)
  plain = bootstrap.bootstrap_intervals(labels[:50], probabilities[:50], num_resamples=50)
  np.testing.assert_equal(masked, plain)
  assert np.isnan(plain["intervals"]["grade_1_recall"]).all()


def test_bad_inputs_name_the_argument():
  labels, probabilities = _random_case(0, n=10)
  with pytest.raises(ValueError, match="confidence"):
    bootstrap.bootstrap_intervals(labels, probabilities, confidence=95)
  with pytest.raises(ValueError, match="probabilities"):
    bootstrap.bootstrap_intervals(labels, probabilities[:5])
  with pytest.raises(ValueError, match="num_resamples"):
    bootstrap.bootstrap_intervals(labels, probabilities, num_resamples=0)
  with pytest.raises(ValueError, match="num_examples"):
    bootstrap.bootstrap_intervals(labels, probabilities, mask=np.zeros(10, bool))
