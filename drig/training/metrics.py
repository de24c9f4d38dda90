"""Evaluation metrics for DR grading, as numpy functions on host arrays.

Two conventions for sensitivity and specificity are reported side by side:

* **Standard** (screening literature): the positive class is "any DR"
  (grade >= 1) or "referable DR" (grade >= 2). Sensitivity is the share of
  positive images predicted positive; specificity the share of negative images
  predicted negative.
* **Poster** (Li et al., and the Pratt et al. figures it quotes): its
  96% / 31% pair is only consistent with "sensitivity" = recall of grade 0 and
  "specificity" = share of grade >= 1 images predicted >= 1. In standard terms
  these are the specificity and the sensitivity for "any DR", swapped. drig
  reports them under the poster's names, prefixed ``poster_``, so results can be
  compared with its table without confusing anyone.
"""

from typing import Optional

import numpy as np

from drig import grading


def select_examples(labels, predictions, mask):
  """Flattened ``labels`` and ``predictions`` (of equal shape) where ``mask`` (None: all).

  Raises:
    ValueError: the shapes differ.
  """
  labels = np.asarray(labels).reshape(-1)
  predictions = np.asarray(predictions).reshape(-1)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
  if mask is not None:
    mask = np.asarray(mask, bool).reshape(-1)
    if mask.shape != labels.shape:
      raise ValueError(f"mask {mask.shape} and labels {labels.shape} differ in shape")
    labels, predictions = labels[mask], predictions[mask]
  return labels, predictions


def confusion_matrix(labels, predictions, num_classes: int = grading.NUM_GRADES,
                     mask=None) -> np.ndarray:
  """Counts [true, predicted] pairs; rows are true grades, columns predictions."""
  labels, predictions = select_examples(labels, predictions, mask)
  labels = labels.astype(np.int64)
  predictions = predictions.astype(np.int64)
  for name, values in (("labels", labels), ("predictions", predictions)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f"{name} must lie in [0, {num_classes}), got range "
                       f"[{values.min()}, {values.max()}]")
  flat = labels * num_classes + predictions
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def quadratic_weighted_kappa(confusion: np.ndarray) -> float:
  """Cohen's kappa with weights (i-j)^2/(N-1)^2, from a confusion matrix.

  Equals scikit-learn's ``cohen_kappa_score(weights="quadratic")``. Returns 0.0
  when the expected disagreement is zero (a single class everywhere), where
  kappa is undefined.
  """
  confusion = np.asarray(confusion, np.float64)
  n = confusion.shape[0]
  total = confusion.sum()
  if total == 0:
    return 0.0
  grades = np.arange(n)
  weights = (grades[:, None] - grades[None, :]) ** 2 / (n - 1) ** 2
  expected = np.outer(confusion.sum(1), confusion.sum(0)) / total
  expected_disagreement = (weights * expected).sum()
  if expected_disagreement == 0:
    return 0.0
  return float(1.0 - (weights * confusion).sum() / expected_disagreement)


def roc_auc(binary_labels, scores, mask=None) -> float:
  """Area under the ROC curve by the rank-sum (Mann-Whitney) statistic.

  Ties in ``scores`` count one half, as in scikit-learn's ``roc_auc_score``.
  Returns NaN when only one class is present.
  """
  binary_labels, scores = select_examples(binary_labels, scores, mask)
  binary_labels = binary_labels.astype(bool)
  num_pos = int(binary_labels.sum())
  num_neg = binary_labels.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = np.asarray(scores, np.float64)[order]
  ranks = np.empty(sorted_scores.size, np.float64)
  # Average ranks within runs of equal scores.
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [sorted_scores.size]])
  for start, end in zip(starts, ends):
    ranks[start:end] = 0.5 * (start + end + 1)
  rank_of = np.empty_like(ranks)
  rank_of[order] = ranks
  rank_sum = rank_of[binary_labels].sum()
  return float((rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def _rate(numerator, denominator) -> float:
  return float(numerator / denominator) if denominator else float("nan")


def grading_metrics(labels, probabilities, mask: Optional[np.ndarray] = None) -> dict:
  """All metrics drig reports for a set of graded images.

  Args:
    labels: int [N] true grades 0-4.
    probabilities: float [N, 5] predicted grade probabilities (softmax).
    mask: optional bool [N]; False marks padding examples to ignore.

  Returns:
    A flat dict of Python floats (and the confusion matrix as nested lists):
    accuracy, quadratic_kappa, auc_any_dr, the recall of each grade
    (``recall_per_grade``, NaN for a grade without images) with grade 1's as the
    headline ``grade_1_recall`` (the early grade a grader most easily never
    predicts), the standard sensitivities and specificities for any DR
    (grade >= 1) and referable DR (grade >= 2), and the poster's convention as
    ``poster_sensitivity`` / ``poster_specificity``.
  """
  probabilities = np.asarray(probabilities, np.float64)
  if probabilities.ndim != 2:
    raise ValueError(f"probabilities must be [N, classes], got shape {probabilities.shape}")
  predictions = probabilities.argmax(-1)
  labels_sel, predictions_sel = select_examples(labels, predictions, mask)
  num_classes = probabilities.shape[1]
  probabilities_sel = probabilities if mask is None else probabilities[np.asarray(mask, bool)]
  confusion = confusion_matrix(labels_sel, predictions_sel, num_classes)
  metrics = {
      "num_examples": int(labels_sel.size),
      "accuracy": _rate(np.trace(confusion), confusion.sum()),
      "quadratic_kappa": quadratic_weighted_kappa(confusion),
      # "Any DR" score: the probability of not being grade 0.
      "auc_any_dr": roc_auc(labels_sel >= 1, 1.0 - probabilities_sel[:, 0]),
      "confusion_matrix": confusion.tolist(),
  }
  recalls = [_rate(confusion[g, g], confusion[g].sum()) for g in range(num_classes)]
  metrics["recall_per_grade"] = recalls
  if num_classes > 1:
    metrics["grade_1_recall"] = recalls[1]
  for name, threshold in (("any_dr", 1), ("referable_dr", 2)):
    positive = labels_sel >= threshold
    predicted_positive = predictions_sel >= threshold
    metrics[f"sensitivity_{name}"] = _rate((positive & predicted_positive).sum(), positive.sum())
    metrics[f"specificity_{name}"] = _rate((~positive & ~predicted_positive).sum(),
                                           (~positive).sum())
  # The poster's convention (see the module docstring).
  grade0 = labels_sel == 0
  metrics["poster_sensitivity"] = _rate((grade0 & (predictions_sel == 0)).sum(), grade0.sum())
  metrics["poster_specificity"] = _rate((~grade0 & (predictions_sel >= 1)).sum(), (~grade0).sum())
  return metrics
