"""The quantities the job attributes, named in the config: "predicted", "grade:K", "diff:A:B".

``parse_quantity`` turns a config string into a ``QuantitySpec`` (whose key
names the shard arrays); ``make_quantity`` builds the function of the model's
input that integrated gradients attributes. All are softmax probabilities.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp

from drig import grading
from drig.analysis.errors import AnalysisError
from drig.attribution import quantities as quantities_lib


@dataclasses.dataclass(frozen=True)
class QuantitySpec:
  """A parsed quantity: spec "predicted" | "grade:K" | "diff:A:B"; key names shard arrays."""
  spec: str
  key: str
  kind: str
  grades: tuple[int, ...]

  @property
  def label(self) -> str:
    """The quantity in words, for titles and the report."""
    if self.kind == "predicted":
      return "predicted grade"
    if self.kind == "grade":
      return f"grade {self.grades[0]}"
    return f"grade {self.grades[0]} - grade {self.grades[1]}"


def parse_quantity(spec: str) -> QuantitySpec:
  """Parses a quantity spec; AnalysisError naming the accepted forms otherwise."""
  text = str(spec).strip()
  if text == "predicted":
    return QuantitySpec(text, "predicted", "predicted", ())
  match = re.fullmatch(r"grade:(\d)", text)
  if match and int(match.group(1)) < grading.NUM_GRADES:
    g = int(match.group(1))
    return QuantitySpec(text, f"grade_{g}", "grade", (g,))
  match = re.fullmatch(r"diff:(\d):(\d)", text)
  if (match and max(map(int, match.groups())) < grading.NUM_GRADES
      and match.group(1) != match.group(2)):
    a, b = map(int, match.groups())
    return QuantitySpec(text, f"diff_{a}_{b}", "diff", (a, b))
  raise AnalysisError(f"unknown quantity {spec!r}: use 'predicted', 'grade:K' or 'diff:A:B' "
                      f"with grades in 0..{grading.NUM_GRADES - 1}")


@jax.tree_util.register_pytree_node_class
class PerImageGrade:
  """x -> softmax(logits_fn(x))[n, grade_n]: each image's own grade (e.g. its prediction).

  The attribution engine calls a quantity on two layouts of a batch of N
  images: the images themselves (or their baselines: [N]) and path points,
  image-major ([N * c], image n's rows n*c ... n*c+c-1, for any c). The
  per-image read-out follows from the batch size.

  Attributes:
    logits_fn: x -> logits [B, G].
    weights: float32 [N, G], one-hot rows.
  """

  def __init__(self, logits_fn: Callable, weights):
    self.logits_fn = logits_fn
    self.weights = weights

  def __call__(self, x):
    logits = self.logits_fn(x)
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    batch, n = probabilities.shape[0], self.weights.shape[0]
    weights = self.weights.astype(jnp.float32)
    if batch % n:
      raise AnalysisError(f"PerImageGrade: a batch of {batch} rows for {n} images")
    # [N]: the images (or baselines); [N * c]: image-major path points.
    weights = jnp.repeat(weights, batch // n, axis=0)
    return jnp.sum(probabilities * weights, axis=-1)

  def at_rows(self, rows) -> "PerImageGrade":
    """The quantity of a batch whose row i is a point of image rows[i] (the adaptive
    engine's calls mix images: drig.attribution.adaptive.for_rows)."""
    return PerImageGrade(self.logits_fn, jnp.take(jnp.asarray(self.weights), rows, axis=0))

  def tree_flatten(self):
    return (self.logits_fn, self.weights), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)


def make_quantity(spec: QuantitySpec, logits_fn: Callable, predictions) -> Callable:
  """The quantity's function x -> [N] around ``logits_fn`` (a pytree)."""
  if spec.kind == "grade":
    return quantities_lib.probability_of_grade(logits_fn, spec.grades[0])
  if spec.kind == "diff":
    return quantities_lib.grade_difference(logits_fn, *spec.grades)
  weights = jax.nn.one_hot(jnp.asarray(predictions), grading.NUM_GRADES, dtype=jnp.float32)
  return PerImageGrade(logits_fn, weights)
