"""Deletion and insertion curves against closed forms on a linear model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drig.analysis import faithfulness
from drig.attribution import arguments


@jax.tree_util.register_pytree_node_class
class Linear:
  """f(x) = sum(w * x) per image."""

  def __init__(self, w):
    self.w = w

  def __call__(self, x):
    return jnp.sum(x * self.w, axis=(1, 2, 3))

  def tree_flatten(self):
    return (self.w,), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)


@pytest.fixture(scope="module")
def linear_case():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 6, 5, 2)).astype(np.float32)
  w = rng.normal(size=(6, 5, 2)).astype(np.float32)
  baseline = np.full((1, 6, 5, 2), 0.25, np.float32)
  contributions = ((x - baseline) * w).sum(-1)  # per pixel: exact IG of a linear model
  return Linear(jnp.asarray(w)), x, baseline, contributions


def _closed_form(contributions, f_x, f_b, ranks, counts, insertion):
  out = np.zeros((len(f_x), len(counts)))
  for k, count in enumerate(counts):
    taken = (ranks < count)
    moved = (contributions * taken).sum(axis=(1, 2))
    out[:, k] = f_b + moved if insertion else f_x - moved
  return out


@pytest.mark.parametrize("mode", faithfulness.MODES)
def test_curves_match_the_closed_form_of_a_linear_model(linear_case, mode):
  f, x, baseline, contributions = linear_case
  fractions = np.linspace(0, 1, 7)
  result = faithfulness.curves(f, x, baseline, contributions, mode=mode, fractions=fractions,
                               chunk_size=3)
  f_x = np.asarray(f(jnp.asarray(x)))
  f_b = np.asarray(f(jnp.broadcast_to(baseline, x.shape)))
  counts = np.round(fractions * 30).astype(int)
  ranks = faithfulness.pixel_ranks(contributions)
  expected = _closed_form(contributions, f_x, f_b, ranks, counts, mode == "insertion")
  np.testing.assert_allclose(result.values, expected, rtol=1e-5, atol=1e-5)
  # Both ends: nothing moved, everything moved.
  start, end = (f_b, f_x) if mode == "insertion" else (f_x, f_b)
  np.testing.assert_allclose(result.values[:, 0], start, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(result.values[:, -1], end, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(result.area, np.trapezoid(expected, fractions, axis=1), rtol=1e-5,
                             atol=1e-5)


def test_the_exact_attribution_beats_a_random_ranking(linear_case):
  f, x, baseline, contributions = linear_case
  exact = faithfulness.curves(f, x, baseline, contributions, mode="deletion")
  control = faithfulness.curves(f, x, baseline, faithfulness.random_ranking(1, 3, 6, 5),
                                mode="deletion")
  reverse = faithfulness.curves(f, x, baseline, -contributions, mode="deletion")
  # Removing the largest contributions first gives the lowest curve of any ranking.
  assert (exact.area < control.area).all() and (control.area < reverse.area).all()


def test_ranks_are_a_permutation_with_ties_broken_by_position():
  ranks = faithfulness.pixel_ranks(np.array([[[1.0, 3.0], [3.0, 0.0]]]))
  np.testing.assert_array_equal(ranks, [[[2, 0], [1, 3]]])


def test_bad_arguments_are_named(linear_case):
  f, x, baseline, contributions = linear_case
  with pytest.raises(faithfulness.FaithfulnessError, match="mode"):
    faithfulness.curves(f, x, baseline, contributions, mode="erase")
  with pytest.raises(faithfulness.FaithfulnessError, match="increase from 0 to 1"):
    faithfulness.curves(f, x, baseline, contributions, fractions=[0.0, 0.5])
  with pytest.raises(faithfulness.FaithfulnessError, match="do not match"):
    faithfulness.curves(f, x, baseline, contributions[:, :3])
  with pytest.raises(faithfulness.FaithfulnessError, match="NaN"):
    faithfulness.curves(f, x, baseline, np.full_like(contributions, np.nan))
  with pytest.raises(arguments.AttributionArgumentError):
    faithfulness.curves(f, x, np.zeros((1, 2, 2, 2)), contributions)
