"""Bootstrap confidence intervals of the grading metrics, over test images.

A test split of a thousand images gives a kappa or a sensitivity that moves
by several points from one sample of images to the next; a single figure
without its interval invites reading noise as a difference between models.
The percentile bootstrap resamples the test images with replacement
``num_resamples`` times (seeded) and reports the 2.5th and 97.5th percentiles
of each metric over the resamples.

Every resample is evaluated at once: a resample is a row of multiplicities
(how often each image was drawn), so its confusion matrix is one matrix
product with the one-hot (true, predicted) pairs, and its AUC is a weighted
Mann-Whitney statistic from cumulative sums over the images sorted by score.
"""

from typing import Optional

import numpy as np

from drig import grading
from drig.statistics import resample_counts

DEFAULT_NUM_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95

# The metrics that get intervals; names as in ``metrics.grading_metrics``.
INTERVAL_METRICS = ("accuracy", "quadratic_kappa", "auc_any_dr", "grade_1_recall",
                    "sensitivity_any_dr", "specificity_any_dr", "sensitivity_referable_dr",
                    "specificity_referable_dr", "poster_sensitivity", "poster_specificity")


def _divide(numerator, denominator):
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1),
                    np.nan)


def weighted_auc(binary_labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """ROC AUC of every row of example weights [B, n]; ties count one half.

  With integer weights, row ``b`` equals the AUC of the sample in which
  example ``i`` appears ``weights[b, i]`` times (scikit-learn's
  ``roc_auc_score`` on that sample). NaN where a row has no positive or no
  negative weight.
  """
  binary_labels = np.asarray(binary_labels, bool)
  scores = np.asarray(scores, np.float64)
  weights = np.asarray(weights, np.float64)
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  positive = binary_labels[order]
  w = weights[:, order]
  # Groups of equal scores: the negatives below a positive count 1, those tied with it 1/2.
  starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_scores)) + 1])
  group = np.cumsum(np.isin(np.arange(sorted_scores.size), starts)) - 1
  negative_in_group = np.add.reduceat(w * ~positive, starts, axis=1)
  negative_below = np.cumsum(negative_in_group, axis=1) - negative_in_group
  beaten = negative_below[:, group] + 0.5 * negative_in_group[:, group]
  wins = (w * positive * beaten).sum(axis=1)
  num_pos = (w * positive).sum(axis=1)
  num_neg = (w * ~positive).sum(axis=1)
  return _divide(wins, num_pos * num_neg)


def metrics_of_resamples(labels, probabilities, counts: np.ndarray) -> dict:
  """Each metric of ``INTERVAL_METRICS`` on every resample.

  Args:
    labels: int [n] true grades.
    probabilities: float [n, classes] predicted grade probabilities.
    counts: int [B, n] multiplicities of the examples in each resample.

  Returns:
    {name: float [B]}, with the definitions of ``metrics.grading_metrics``
    (NaN where a rate has an empty denominator in a resample).
  """
  labels = np.asarray(labels, np.int64).reshape(-1)
  probabilities = np.asarray(probabilities, np.float64)
  counts = np.asarray(counts, np.float64)
  num_classes = probabilities.shape[1]
  predictions = probabilities.argmax(-1)
  pairs = np.zeros((labels.size, num_classes * num_classes))
  pairs[np.arange(labels.size), labels * num_classes + predictions] = 1.0
  confusion = (counts @ pairs).reshape(-1, num_classes, num_classes)
  total = confusion.sum(axis=(1, 2))
  grades = np.arange(num_classes)
  result = {"accuracy": _divide(np.trace(confusion, axis1=1, axis2=2), total)}
  weights = (grades[:, None] - grades[None, :]) ** 2 / (num_classes - 1) ** 2
  expected = confusion.sum(2)[:, :, None] * confusion.sum(1)[:, None, :] / total[:, None, None]
  expected_disagreement = (weights * expected).sum(axis=(1, 2))
  kappa = 1.0 - _divide((weights * confusion).sum(axis=(1, 2)), expected_disagreement)
  # As quadratic_weighted_kappa: 0 where the expected disagreement is zero.
  result["quadratic_kappa"] = np.where(expected_disagreement > 0, kappa, 0.0)
  result["auc_any_dr"] = weighted_auc(labels >= 1, 1.0 - probabilities[:, 0], counts)
  result["grade_1_recall"] = _divide(confusion[:, 1, 1], confusion[:, 1, :].sum(1))
  for name, threshold in (("any_dr", 1), ("referable_dr", 2)):
    positive_rows = confusion[:, threshold:, :]
    negative_rows = confusion[:, :threshold, :]
    result[f"sensitivity_{name}"] = _divide(positive_rows[:, :, threshold:].sum(axis=(1, 2)),
                                            positive_rows.sum(axis=(1, 2)))
    result[f"specificity_{name}"] = _divide(negative_rows[:, :, :threshold].sum(axis=(1, 2)),
                                            negative_rows.sum(axis=(1, 2)))
  result["poster_sensitivity"] = result["specificity_any_dr"]
  result["poster_specificity"] = result["sensitivity_any_dr"]
  return result


def bootstrap_intervals(labels, probabilities, *, num_resamples: int = DEFAULT_NUM_RESAMPLES,
                        seed: int = 0, confidence: float = DEFAULT_CONFIDENCE,
                        mask: Optional[np.ndarray] = None) -> dict:
  """Percentile-bootstrap confidence intervals over the examples.

  Args:
    labels: int [N] true grades 0-4.
    probabilities: float [N, 5] predicted grade probabilities.
    num_resamples: resamples of N examples drawn with replacement.
    seed: seeds the resampling (numpy's default_rng), so the intervals reproduce.
    confidence: the interval's nominal coverage, in (0, 1).
    mask: optional bool [N]; False marks padding examples to ignore.

  Returns:
    {"method", "num_resamples", "seed", "confidence", "intervals": {name:
    [low, high]}} for every name of ``INTERVAL_METRICS``; an interval is
    [NaN, NaN] when the metric is undefined on every resample (e.g. no grade-1
    image).

  Raises:
    ValueError: shapes disagree, no example is left, or ``confidence`` is
      outside (0, 1).
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
  labels = np.asarray(labels).reshape(-1)
  probabilities = np.asarray(probabilities, np.float64)
  if probabilities.ndim != 2 or probabilities.shape[0] != labels.size:
    raise ValueError(f"probabilities must be [N, classes] with N = {labels.size} labels, got "
                     f"shape {probabilities.shape}")
  if probabilities.shape[1] != grading.NUM_GRADES:
    raise ValueError(f"probabilities must have {grading.NUM_GRADES} grades, got "
                     f"{probabilities.shape[1]}")
  if mask is not None:
    mask = np.asarray(mask, bool).reshape(-1)
    if mask.shape != labels.shape:
      raise ValueError(f"mask {mask.shape} and labels {labels.shape} differ in shape")
    labels, probabilities = labels[mask], probabilities[mask]
  counts = resample_counts(labels.size, num_resamples, seed)
  replicates = metrics_of_resamples(labels, probabilities, counts)
  tail = 100.0 * (1.0 - confidence) / 2.0
  intervals = {}
  for name, values in replicates.items():
    values = values[np.isfinite(values)]
    low, high = (np.percentile(values, [tail, 100.0 - tail]) if values.size
                 else (float("nan"), float("nan")))
    intervals[name] = [float(low), float(high)]
  return {"method": "percentile bootstrap over test images", "num_resamples": int(num_resamples),
          "seed": int(seed), "confidence": float(confidence), "intervals": intervals}
