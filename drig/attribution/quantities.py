"""Quantities of interest over a grader's five logits.

Each helper wraps any ``logits_fn: x [N, ...] -> logits [N, G]`` (a whole model,
or the layer-to-output part of one) into ``f: x -> [N]`` for
`integrated_gradients`. All of them are one linear read-out
``sum_g v_g h_g(x)`` with ``h`` the softmax probabilities or the raw logits,
so the grade(s) are data, not code: the quantity for grade 0 and for grade 4
share one compiled program.

The quantities are pytrees: pass ``logits_fn`` as a pytree too, e.g.
``jax.tree_util.Partial(model.apply, variables)``, and the model's weights are
traced arguments rather than constants baked into the program.

Example::

  logits_fn = jax.tree_util.Partial(model.apply, variables)
  f = probability_of_grade(logits_fn, 4)         # the poster's "stage 4 outcome"
  g = grade_difference(logits_fn, 4, 0, space="logit")
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drig import grading
from drig.attribution.arguments import AttributionArgumentError

SPACES = ("probability", "logit")


@jax.tree_util.register_pytree_node_class
class GradeQuantity:
  """x -> sum_g weights[g] * h_g(logits_fn(x)), h = softmax or identity, float32 [N].

  Attributes:
    logits_fn: x [N, ...] -> logits [N, G], any dtype (read out in float32, or
      float64 for float64 logits).
    weights: float32 [G], the read-out over grades.
    space: "probability" (softmax of the logits) or "logit".
  """

  def __init__(self, logits_fn: Callable, weights, space: str = "probability"):
    if space not in SPACES:
      raise AttributionArgumentError(f"space must be one of {SPACES}, got {space!r}")
    self.logits_fn = logits_fn
    self.weights = weights
    self.space = space

  def __call__(self, x):
    logits = self.logits_fn(x)
    dtype = jnp.result_type(jnp.float32, logits.dtype)
    weights = jnp.asarray(self.weights).astype(dtype)
    if logits.ndim != 2 or logits.shape[-1] != weights.shape[0]:
      raise AttributionArgumentError(
          f"logits_fn must return logits [N, {weights.shape[0]}] for a read-out over "
          f"{weights.shape[0]} grades; it returned shape {logits.shape}")
    values = logits.astype(dtype)
    if self.space == "probability":
      values = jax.nn.softmax(values, axis=-1)
    # Elementwise product and sum: exact float32 on every backend (no TF32 dot).
    return jnp.sum(values * weights, axis=-1)

  def tree_flatten(self):
    return (self.logits_fn, self.weights), self.space

  @classmethod
  def tree_unflatten(cls, space, children):
    return cls(*children, space=space)

  def __repr__(self):
    return f"GradeQuantity({self.logits_fn!r}, weights={np.asarray(self.weights)}, {self.space})"


def _one_hot(grade: int, num_grades: int, name: str = "grade") -> np.ndarray:
  if isinstance(grade, bool) or not isinstance(grade, (int, np.integer)):
    raise AttributionArgumentError(f"{name} must be an int, got {grade!r}")
  if not 0 <= grade < num_grades:
    raise AttributionArgumentError(f"{name} must be in [0, {num_grades}), got {grade}")
  return np.eye(num_grades, dtype=np.float32)[grade]


def probability_of_grade(logits_fn: Callable, grade: int, *,
                         num_grades: int = grading.NUM_GRADES) -> GradeQuantity:
  """x -> softmax(logits_fn(x))[:, grade]: the poster's "predict outcome for stage k"."""
  return GradeQuantity(logits_fn, _one_hot(grade, num_grades), "probability")


def logit_of_grade(logits_fn: Callable, grade: int, *,
                   num_grades: int = grading.NUM_GRADES) -> GradeQuantity:
  """x -> logits_fn(x)[:, grade]."""
  return GradeQuantity(logits_fn, _one_hot(grade, num_grades), "logit")


def grade_difference(logits_fn: Callable, grade_a: int, grade_b: int, *,
                     space: str = "probability", num_grades: int = grading.NUM_GRADES) -> GradeQuantity:
  """x -> h_a(x) - h_b(x), h the probabilities (default) or logits."""
  weights = _one_hot(grade_a, num_grades, "grade_a") - _one_hot(grade_b, num_grades, "grade_b")
  return GradeQuantity(logits_fn, weights, space)


def weighted_grades(logits_fn: Callable, weights: Sequence[float], *,
                    space: str = "probability") -> GradeQuantity:
  """x -> sum_g weights[g] h_g(x), e.g. weights = range(5) gives the expected grade."""
  weights = np.asarray(weights, np.float32)
  if weights.ndim != 1 or weights.size == 0:
    raise AttributionArgumentError(
        f"weights must be a non-empty vector over grades, got shape {weights.shape}")
  return GradeQuantity(logits_fn, weights, space)
