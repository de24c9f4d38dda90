"""Model randomisation (Adebayo et al., 2018): the same model with re-initialised weights.

An explanation that does not change when the model's weights are replaced by
random ones cannot be explaining the model. ``randomise_variables`` gives
those weights (all of them, the head, or named layers), keeping the tree's
structure, shapes and dtypes; ``calibrated_batch_stats`` re-estimates the
batch statistics of re-initialised BatchNorm layers. Compare maps before and
after with ``drig.analysis.localization.rank_correlation``.

Example::

  randomised = randomise_variables(model, variables, seed=1, scope="head")
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from drig.models import initialization


class RandomisationError(ValueError):
  """A scope or variables tree that the model cannot be randomised with."""


def head_scope(model) -> tuple[str, ...]:
  """The top-level parameter names of a model's head (layers after pooling)."""
  if hasattr(model, "head_layer_names"):
    return tuple(model.head_layer_names())
  if getattr(model, "num_classes", None):  # a bare InceptionV3 with its ImageNet top
    return ("fc",)
  raise RandomisationError(f"{type(model).__name__} has no head to randomise")


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _prefixes(model, scope) -> list[tuple[str, ...]]:
  if scope == "all":
    return [()]
  if scope == "head":
    return [(name,) for name in head_scope(model)]
  if isinstance(scope, str):
    scope = (scope,)
  prefixes = [tuple(p for p in str(s).split("/") if p) for s in scope]
  if not prefixes or any(not p for p in prefixes):
    raise RandomisationError(f"scope must be 'all', 'head' or parameter paths, got {scope!r}")
  return prefixes


def _selected(path: tuple[str, ...], prefixes) -> bool:
  return any(path[:len(p)] == p for p in prefixes)


@initialization.compiled_per_model
def _compiled_batch_stats(model):
  """jit(variables, images, key -> every BatchNorm's batch statistics over images).

  A training-mode apply returns m * old + (1 - m) * batch for every running
  average; applies from old = 0 and old = 1 give (1 - m) * batch and, by their
  difference, m, whatever each layer's momentum m is.
  """

  def batch_stats(variables, images, key):
    def run(fill):
      stats = jax.tree.map(lambda a: jnp.full_like(a, fill), variables["batch_stats"])
      _, updates = model.apply({**variables, "batch_stats": stats}, images, train=True,
                               mutable=["batch_stats"], rngs={"dropout": key})
      return updates["batch_stats"]
    from_zero, from_one = run(0.0), run(1.0)
    return jax.tree.map(lambda z, o: z / (1.0 - (o - z)), from_zero, from_one)
  return jax.jit(batch_stats)



def calibrated_batch_stats(model, variables, images, seed: int = 0) -> dict:
  """Each BatchNorm layer's batch statistics over `images` in training mode.

  Args:
    model: a Flax module with BatchNorm layers.
    variables: {"params": ..., "batch_stats": ...} (the old statistics are not used).
    images: float32 [N, H, W, 3] model inputs.
    seed: for dropout, which training mode switches on (it does not affect
      the statistics of drig's models, whose BatchNorm layers precede it).

  Returns:
    A tree like variables["batch_stats"] holding the batch means and (biased)
    variances, as Flax's BatchNorm computes them in training mode.
  """
  fn = _compiled_batch_stats(model)
  return flax.core.unfreeze(fn(variables, jnp.asarray(images, jnp.float32), jax.random.key(int(seed))))


def randomise_variables(model, variables, seed: int, *, scope: Any = "all",
                        input_shape: Sequence[int] | None = None,
                        calibration_images=None) -> dict:
  """Re-initialised weights of the same structure, for the model-randomisation check.

  The new weights come from ``model.init`` with a fresh key
  (``drig.models.initialization.random_variables``: the model's own
  initialisers, He-scaled convolutions and LeCun dense layers), so they have
  the scale a network starts training with.

  Batch statistics: those of BatchNorm layers whose weights are kept stay as
  they are. Those of re-initialised layers would not fit the new weights, so
  they become the initial ones (mean 0, variance 1) or, with
  `calibration_images`, the layers' batch statistics over those images in
  training mode with the new weights (then inference on those images equals a
  training-mode pass over them).

  Args:
    model: a Flax module (e.g. drig.models.classifier.build_model(config)).
    variables: its variables {"params": ..., "batch_stats": ...}.
    seed: the new weights are a pure function of (model, seed) on a backend.
    scope: what to re-initialise: "all"; "head" (the fully connected layers
      and logits, keeping the Inception base); or parameter paths such as
      ("logits", "fc2") or "base/Mixed_7c", for Adebayo's cascading
      randomisation from the top down.
    input_shape: the dummy input for model.init; default
      ``initialization.DEFAULT_INIT_SHAPE``. The parameter shapes must not
      depend on it (true for drig's models).
    calibration_images: optional float32 [N, H, W, 3] model inputs in [-1, 1]
      to re-estimate the batch statistics of re-initialised BatchNorm layers.

  Returns:
    Variables with the same tree structure, shapes and dtypes as `variables`
    (plain nested dicts), with the selected parameters re-initialised.

  Raises:
    RandomisationError: the scope names no parameters, or the variables do
      not match the model's.
  """
  variables = flax.core.unfreeze(variables)
  if "params" not in variables:
    raise RandomisationError(
        f"variables must hold 'params'; got collections {sorted(variables)}")
  prefixes = _prefixes(model, scope)
  param_paths = list(_flat(variables["params"]))
  unknown = ["/".join(p) for p in prefixes if not any(_selected(k, [p]) for k in param_paths)]
  if unknown:
    raise RandomisationError(f"randomise_variables: scope names no parameters: {unknown}")
  fresh = flax.core.unfreeze(initialization.random_variables(model, seed, input_shape=input_shape))

  result = {}
  for collection, tree in variables.items():
    if collection not in ("params", "batch_stats"):
      result[collection] = tree
      continue
    old, new = _flat(tree), _flat(fresh.get(collection, {}))
    if set(old) != set(new):
      missing = sorted("/".join(k) for k in set(new) - set(old))[:5]
      extra = sorted("/".join(k) for k in set(old) - set(new))[:5]
      raise RandomisationError(
          f"randomise_variables: the {collection} do not match {type(model).__name__}'s; "
          f"missing {missing}, unexpected {extra}")
    flat = {}
    for path, value in old.items():
      if not _selected(path, prefixes):
        flat[path] = value
        continue
      replacement = new[path]
      if replacement.shape != np.shape(value):
        raise RandomisationError(
            f"randomise_variables: {collection}/{'/'.join(path)} has shape {np.shape(value)} but "
            f"the model initialises {replacement.shape}; pass input_shape if it depends on it")
      flat[path] = jnp.asarray(replacement, getattr(value, "dtype", replacement.dtype))
    result[collection] = traverse_util.unflatten_dict(flat)

  if calibration_images is not None and result.get("batch_stats"):
    calibrated = _flat(calibrated_batch_stats(model, result, calibration_images, seed))
    flat = _flat(result["batch_stats"])
    for path in flat:
      if _selected(path, prefixes):
        flat[path] = calibrated[path].astype(flat[path].dtype)
    result["batch_stats"] = traverse_util.unflatten_dict(flat)
  return result


def cascade_scopes(model, variables) -> list[tuple[str, tuple[str, ...]]]:
  """Adebayo et al.'s cascading randomisation, from the logits down to the stem.

  Stage ``k`` re-initialises the top ``k + 1`` layers: the head's layers in
  reverse order (logits, fc2, fc1), then the Inception base's blocks from the
  last (Mixed_7c) to the stem (Conv2d_1a_3x3). Pass each stage's scope to
  ``randomise_variables``; a map that stays the same while ever more of the
  network becomes random is not explaining the model.

  Args:
    model: a drig classifier (or any module with ``head_layer_names``).
    variables: its variables; the base's blocks are read in the order the model
      created them.

  Returns:
    [(name of the layer added at this stage, cumulative scope of parameter paths)].
  """
  params = flax.core.unfreeze(variables)["params"]
  layers = list(reversed(head_scope(model)))
  if "base" in params:
    layers += [f"base/{name}" for name in reversed(list(params["base"]))]
  stages, scope = [], ()
  for layer in layers:
    scope = scope + (layer,)
    stages.append((layer, scope))
  return stages
