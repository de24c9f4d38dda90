"""Grade thresholds of the regression head, fitted to maximise quadratic kappa.

The regression head predicts the grade as a real number y; the grade is the
number of thresholds below it, ``sum_k [y > t_k]``. The thresholds that make
those grades agree best with the truth are not 0.5, 1.5, 2.5, 3.5: a grader
trained with squared error pulls rare grades towards the mean, so the top
Kaggle EyePACS solutions fitted them on held-out data to maximise quadratic
kappa, the competition's metric. ``fit_thresholds`` does that on the
validation split at each evaluation:

* start at 0.5, 1.5, 2.5, 3.5;
* coordinate search: for each threshold in turn, try every value between its
  neighbours at which a prediction changes (the midpoints between consecutive
  distinct scores), keep the one of highest kappa (on a tie, the one nearest
  the current value, so an uninformative threshold stays where it is);
* sweep until a whole sweep changes nothing (at most ``max_sweeps``).

The result is a coordinate-wise optimum (no single threshold can move to
raise kappa), deterministic, and non-decreasing, so the grade is monotone in
y. Pure numpy on host arrays; a fit over 1,000 validation images takes
milliseconds.
"""

from typing import Sequence

import numpy as np

from drig import grading
from drig.training import metrics

DEFAULT_THRESHOLDS = (0.5, 1.5, 2.5, 3.5)


def grades_from_scores(scores, thresholds: Sequence[float]) -> np.ndarray:
  """The grade of each score: how many thresholds lie strictly below it.

  Args:
    scores: float [N] (any shape) grade estimates.
    thresholds: non-decreasing [K - 1].

  Returns:
    int64 array of the shape of ``scores``, values in [0, K - 1].
  """
  scores = np.asarray(scores, np.float64)
  thresholds = np.asarray(thresholds, np.float64)
  return (scores[..., None] > thresholds).sum(-1).astype(np.int64)


def quadratic_kappas(labels, predictions, num_classes: int = grading.NUM_GRADES) -> np.ndarray:
  """Quadratic weighted kappa of each row of ``predictions`` against ``labels``.

  Args:
    labels: int [N] true grades in [0, num_classes).
    predictions: int [M, N], M candidate predictions of the same N examples.
    num_classes: grades.

  Returns:
    float64 [M]; 0 where kappa is undefined (no expected disagreement), as
    ``drig.training.metrics.quadratic_weighted_kappa``.
  """
  labels = np.asarray(labels, np.int64)
  predictions = np.atleast_2d(np.asarray(predictions, np.int64))
  m, n = predictions.shape
  if n == 0:
    return np.zeros(m)
  flat = (np.arange(m)[:, None] * num_classes * num_classes + labels[None, :] * num_classes
          + predictions)
  confusion = np.bincount(flat.reshape(-1), minlength=m * num_classes * num_classes).reshape(
      m, num_classes, num_classes).astype(np.float64)
  grades = np.arange(num_classes)
  weights = (grades[:, None] - grades[None, :]) ** 2 / (num_classes - 1) ** 2
  expected = confusion.sum(2)[:, :, None] * confusion.sum(1)[:, None, :] / n
  expected_disagreement = (weights * expected).sum((1, 2))
  observed = (weights * confusion).sum((1, 2))
  with np.errstate(divide="ignore", invalid="ignore"):
    kappas = 1.0 - observed / expected_disagreement
  return np.where(expected_disagreement > 0, kappas, 0.0)


def fit_thresholds(scores, labels, mask=None, *,
                   initial: Sequence[float] = DEFAULT_THRESHOLDS,
                   max_sweeps: int = 50) -> np.ndarray:
  """Thresholds t_1 <= ... <= t_{K-1} that maximise quadratic kappa (module docstring).

  Args:
    scores: float [N] regression outputs of the fitting split.
    labels: int [N] their true grades 0..K-1.
    mask: optional bool [N]; False marks padding examples to ignore.
    initial: the starting thresholds, non-decreasing; K - 1 of them.
    max_sweeps: bound on the sweeps over all thresholds.

  Returns:
    float64 [K - 1], non-decreasing. With no examples, ``initial``.

  Raises:
    ValueError: shapes differ, ``initial`` is not non-decreasing, a label is
      outside 0..K-1, or a score is not finite.
  """
  labels, scores = metrics.select_examples(labels, np.asarray(scores, np.float64), mask)
  thresholds = np.asarray(initial, np.float64).copy()
  num_classes = thresholds.size + 1
  if thresholds.ndim != 1 or np.any(np.diff(thresholds) < 0):
    raise ValueError(f"initial thresholds must be a non-decreasing list, got {tuple(initial)}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores must be finite to fit thresholds (the regression head diverged?)")
  if scores.size == 0:
    return thresholds
  labels = labels.astype(np.int64)
  distinct = np.unique(scores)
  # Rounded to float32, as the model stores them, so that the grades a fit scores
  # are the grades the stored thresholds give.
  midpoints = ((distinct[1:] + distinct[:-1]) / 2.0).astype(np.float32).astype(np.float64)
  for _ in range(max_sweeps):
    changed = False
    for k in range(thresholds.size):
      low = thresholds[k - 1] if k > 0 else -np.inf
      high = thresholds[k + 1] if k + 1 < thresholds.size else np.inf
      candidates = midpoints[(midpoints >= low) & (midpoints <= high)]
      candidates = np.concatenate([[thresholds[k]], candidates])
      trial = np.repeat(thresholds[None, :], candidates.size, axis=0)
      trial[:, k] = candidates
      predictions = (scores[None, :, None] > trial[:, None, :]).sum(-1)
      kappas = quadratic_kappas(labels, predictions, num_classes)
      best = kappas.max()
      # Ties (equal kappa): the candidate nearest the current value, then the lower one.
      tied = np.flatnonzero(kappas >= best)
      distance = np.abs(candidates[tied] - thresholds[k])
      choice = tied[np.lexsort((candidates[tied], distance))[0]]
      if candidates[choice] != thresholds[k] and kappas[choice] > kappas[0]:
        thresholds[k] = candidates[choice]
        changed = True
    if not changed:
      break
  return thresholds
