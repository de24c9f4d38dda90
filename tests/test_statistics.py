"""Bootstrap intervals and paired sign-flip tests, checked against scipy."""

import numpy as np
import pytest
from scipy import stats

from drig import statistics


def test_interval_holds_the_mean_and_shrinks_with_more_images():
  rng = np.random.default_rng(0)
  small = statistics.mean_interval(rng.normal(1.0, 1.0, 30), seed=1)
  large = statistics.mean_interval(rng.normal(1.0, 1.0, 3000), seed=1)
  for interval in (small, large):
    assert interval.low < interval.mean < interval.high
  assert (large.high - large.low) < (small.high - small.low) / 5
  # The bootstrap interval of a mean is close to the normal one (1.96 standard errors).
  values = rng.normal(0.0, 2.0, 400)
  interval = statistics.mean_interval(values, num_resamples=4000, seed=2)
  half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
  assert interval.high - interval.low == pytest.approx(2 * half, rel=0.1)


def test_interval_agrees_with_scipy_percentile_bootstrap():
  values = np.random.default_rng(3).exponential(1.0, 200)
  ours = statistics.mean_interval(values, num_resamples=5000, seed=0)
  theirs = stats.bootstrap((values,), np.mean, n_resamples=5000, method="percentile",
                           random_state=0).confidence_interval
  assert ours.low == pytest.approx(theirs.low, abs=0.03)
  assert ours.high == pytest.approx(theirs.high, abs=0.03)


def test_nan_scores_are_left_out_and_an_empty_set_is_nan():
  interval = statistics.mean_interval([1.0, np.nan, 3.0], seed=0)
  assert interval.n == 2 and interval.mean == 2.0
  empty = statistics.mean_interval([np.nan, np.nan])
  assert empty.n == 0 and np.isnan(empty.mean)
  assert statistics.format_interval(empty) == "n/a"


def test_exact_sign_flip_p_value_equals_scipy_permutation_test():
  rng = np.random.default_rng(4)
  a, b = rng.normal(0.3, 1, 12), rng.normal(0, 1, 12)
  ours = statistics.paired_difference(a, b, seed=0)
  theirs = stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                  alternative="two-sided", n_resamples=np.inf)
  assert ours.n == 12 and ours.mean == pytest.approx(np.mean(a - b))
  assert ours.p_value == pytest.approx(theirs.pvalue, abs=1e-12)


def test_monte_carlo_p_value_is_close_to_scipy_and_detects_a_shift():
  rng = np.random.default_rng(5)
  a = rng.normal(0, 1, 60)
  b = a - 0.05 + rng.normal(0, 0.5, 60)
  ours = statistics.paired_difference(a, b, num_permutations=20000, seed=1)
  theirs = stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                  alternative="two-sided", n_resamples=20000, random_state=1)
  assert ours.p_value == pytest.approx(theirs.pvalue, abs=0.02)
  shifted = statistics.paired_difference(a + 1.0, a, seed=0)
  assert shifted.p_value < 1e-3 and shifted.low > 0.9
  same = statistics.paired_difference(a, a.copy(), seed=0)
  assert same.mean == 0 and same.p_value == 1.0


def test_bad_arguments_are_named():
  with pytest.raises(statistics.StatisticsError, match="one entry per image"):
    statistics.paired_difference([1.0, 2.0], [1.0])
  with pytest.raises(statistics.StatisticsError, match="confidence"):
    statistics.mean_interval([1.0], confidence=1.5)
  with pytest.raises(statistics.StatisticsError, match="1-D"):
    statistics.mean_interval(np.ones((2, 2)))
  with pytest.raises(statistics.StatisticsError, match="num_resamples"):
    statistics.mean_interval([1.0], num_resamples=0)
