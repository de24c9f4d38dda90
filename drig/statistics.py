"""Intervals and paired tests for per-image scores (localisation, faithfulness, ...).

A score averaged over a few hundred images moves by several points from one
sample of images to the next, so every mean drig reports comes with its
percentile-bootstrap interval (``mean_interval``), and every comparison of two
methods on the same images with the interval of the mean paired difference and
a paired sign-flip permutation test (``paired_difference``): under the null
hypothesis that the two methods are exchangeable on each image, the sign of each
image's difference is a coin flip. With up to ``EXACT_PERMUTATION_LIMIT``
images the test enumerates every sign pattern (an exact p-value); above it,
``num_permutations`` random patterns plus the observed one (a valid Monte Carlo
p-value, never 0).

NaN scores (undefined for an image, e.g. no lesion in its field of view) are
left out; a pair is left out if either score is NaN. Everything is numpy and
seeded: the same scores and seed give the same interval.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import numpy as np

DEFAULT_NUM_RESAMPLES = 2000
DEFAULT_NUM_PERMUTATIONS = 10000
DEFAULT_CONFIDENCE = 0.95
# Up to this many pairs every one of the 2^n sign patterns is enumerated.
EXACT_PERMUTATION_LIMIT = 16


class StatisticsError(ValueError):
  """Scores of the wrong shape, or a bad confidence or resample count."""


class Interval(NamedTuple):
  """A mean and its bootstrap interval over ``n`` finite scores (NaN when n == 0)."""
  mean: float
  low: float
  high: float
  n: int


class Difference(NamedTuple):
  """Mean of paired differences a - b, its bootstrap interval and a two-sided p-value."""
  mean: float
  low: float
  high: float
  p_value: float
  n: int


def _check(confidence: float, count: int, name: str):
  if not 0 < confidence < 1:
    raise StatisticsError(f"confidence must be in (0, 1), got {confidence}")
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
    raise StatisticsError(f"{name} must be an int >= 1, got {count!r}")


def _as_scores(values, name: str) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != 1:
    raise StatisticsError(f"{name} must be a 1-D array of per-image scores, got shape "
                          f"{values.shape}")
  return values


def resample_counts(num_examples: int, num_resamples: int, seed: int) -> np.ndarray:
  """How often each example is drawn in each resample: int [num_resamples, num_examples].

  Row ``b`` is the multiplicity of every example in a sample of
  ``num_examples`` draws with replacement; the indices drawn are
  ``np.random.default_rng(seed).integers(num_examples, size=(num_resamples, num_examples))``.

  Raises:
    StatisticsError: ``num_examples`` or ``num_resamples`` is not positive.
  """
  if num_examples <= 0:
    raise StatisticsError(f"num_examples must be positive to bootstrap, got {num_examples}")
  if num_resamples <= 0:
    raise StatisticsError(f"num_resamples must be positive, got {num_resamples}")
  indices = np.random.default_rng(seed).integers(num_examples,
                                                 size=(num_resamples, num_examples))
  return counts_from_indices(indices, num_examples)


def counts_from_indices(indices: np.ndarray, num_examples: int) -> np.ndarray:
  """Multiplicities [B, num_examples] of resamples given as drawn indices [B, n]."""
  indices = np.asarray(indices, np.int64)
  offsets = np.arange(indices.shape[0])[:, None] * num_examples
  flat = np.bincount((indices + offsets).reshape(-1), minlength=indices.shape[0] * num_examples)
  return flat.reshape(indices.shape[0], num_examples)


@functools.lru_cache(maxsize=8)
def _shared_counts(num_examples: int, num_resamples: int, seed: int) -> np.ndarray:
  # A study scores hundreds of cells over the same images: one draw serves them all.
  counts = resample_counts(num_examples, num_resamples, seed)
  counts.flags.writeable = False
  return counts


@functools.lru_cache(maxsize=8)
def _shared_signs(num_differences: int, num_permutations: int, seed: int) -> np.ndarray:
  signs = np.random.default_rng(seed).choice((1.0, -1.0),
                                             size=(num_permutations, num_differences))
  signs.flags.writeable = False
  return signs


def _bootstrap_means(values: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
  # Each resample as multiplicities: its mean is one matrix-vector product.
  return _shared_counts(len(values), num_resamples, seed) @ values / len(values)


def mean_interval(values, *, confidence: float = DEFAULT_CONFIDENCE,
                  num_resamples: int = DEFAULT_NUM_RESAMPLES, seed: int = 0) -> Interval:
  """The mean of the finite ``values`` and its percentile-bootstrap interval.

  Args:
    values: per-image scores [n]; NaN entries are left out.
    confidence: the interval's coverage (0.95: the 2.5th to 97.5th percentiles).
    num_resamples: bootstrap resamples of the images, with replacement.
    seed: the resampling seed.

  Returns:
    Interval(mean, low, high, n); all NaN and n = 0 if no value is finite.
  """
  _check(confidence, num_resamples, "num_resamples")
  values = _as_scores(values, "values")
  values = values[np.isfinite(values)]
  if not len(values):
    return Interval(float("nan"), float("nan"), float("nan"), 0)
  means = _bootstrap_means(values, num_resamples, seed)
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(means, [tail, 100 - tail])
  return Interval(float(values.mean()), float(low), float(high), len(values))


def sign_flip_p_value(differences, *, num_permutations: int = DEFAULT_NUM_PERMUTATIONS,
                      seed: int = 0) -> float:
  """Two-sided paired permutation test of mean(differences) = 0 by sign flips.

  Exact (every sign pattern) for at most EXACT_PERMUTATION_LIMIT differences;
  otherwise ``(1 + #{random patterns at least as extreme}) / (1 + num_permutations)``.
  """
  _check(0.5, num_permutations, "num_permutations")
  d = _as_scores(differences, "differences")
  d = d[np.isfinite(d)]
  if not len(d):
    return float("nan")
  observed = abs(d.sum())
  # A relative tolerance keeps patterns equal to the observed one up to rounding.
  tolerance = 1e-12 * max(1.0, np.abs(d).sum())
  if len(d) <= EXACT_PERMUTATION_LIMIT:
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float(np.mean(np.abs(signs @ d) >= observed - tolerance))
  signs = _shared_signs(len(d), num_permutations, seed)
  extreme = np.sum(np.abs(signs @ d) >= observed - tolerance)
  return float((1 + extreme) / (1 + num_permutations))


def paired_difference(a, b, *, confidence: float = DEFAULT_CONFIDENCE,
                      num_resamples: int = DEFAULT_NUM_RESAMPLES,
                      num_permutations: int = DEFAULT_NUM_PERMUTATIONS,
                      seed: int = 0) -> Difference:
  """Compares two methods' scores on the same images: mean(a - b), interval, p-value.

  Args:
    a, b: per-image scores [n] of the two methods, image i in both at index i.
    confidence, num_resamples, seed: as for ``mean_interval`` (the images are
      resampled in pairs).
    num_permutations: random sign patterns when n > EXACT_PERMUTATION_LIMIT.

  Returns:
    Difference(mean, low, high, p_value, n) over the pairs where both are finite.

  Raises:
    StatisticsError: a and b differ in shape or are not 1-D.
  """
  a, b = _as_scores(a, "a"), _as_scores(b, "b")
  if a.shape != b.shape:
    raise StatisticsError(f"paired scores must have one entry per image in both; got "
                          f"{a.shape} and {b.shape}")
  d = a - b
  d = d[np.isfinite(d)]
  interval = mean_interval(d, confidence=confidence, num_resamples=num_resamples, seed=seed)
  p = sign_flip_p_value(d, num_permutations=num_permutations, seed=seed)
  return Difference(interval.mean, interval.low, interval.high, p, interval.n)


def format_interval(interval, digits: int = 3) -> str:
  """``"0.512 [0.480, 0.547]"``; ``"n/a"`` when the interval has no data."""
  if interval.n == 0 or not np.isfinite(interval.mean):
    return "n/a"
  return (f"{interval.mean:.{digits}f} [{interval.low:.{digits}f}, "
          f"{interval.high:.{digits}f}]")
