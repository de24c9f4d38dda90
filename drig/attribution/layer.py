"""Layer attribution: how much each unit of an inner layer contributes.

A model splits at layer L into ``to_layer: x -> a`` and ``from_layer: a -> q``
(q the quantity of interest, [N]). Two attributions are offered, side by side:

``layer_integrated_gradients`` (the poster's method; equal to Captum's
``LayerIntegratedGradients``):
  the baseline image's activations ``a' = to_layer(x')`` are the layer's
  baseline, and IG runs along the straight path from ``a'`` to ``a = to_layer(x)``
  *in activation space*, through ``from_layer`` only::

    LIG_j = (a_j - a'_j) * integral_0^1 dq/da_j(a' + t (a - a')) dt

  ``to_layer`` runs twice in all (instance and baseline), never per step.
  Completeness: sum_j LIG_j = q(x) - q(x'). Captum computes the same integral
  but re-runs the whole model at every step, overwriting the layer's output
  with a forward hook; for a model whose every path crosses L (Inception's stem
  and mixed blocks) the results agree.

``layer_conductance`` (integrates along the *input* path; Captum's
``LayerConductance``):
  the input moves along the straight path x' -> x, the layer's activations
  follow the curve a(t) = to_layer(x' + t (x - x')), and each unit gets the
  part of the change in q that flows through it::

    COND_j = integral_0^1 dq/da_j(a(t)) * da_j/dt dt

  Also complete. It equals the poster's attribution when ``to_layer`` is linear
  (the curve is then the straight activation path) and differs otherwise.
  ``derivative="jvp"`` computes da/dt exactly (forward mode) and uses drig's
  quadrature rules; ``derivative="difference"`` reproduces Captum's
  discretisation: the rule's nodes for steps + 1 points t_0..t_n, and
  sum_k dq/da(a(t_k)) * (a(t_{k+1}) - a(t_k)).

Both return per-unit attributions (channel x position) and per-channel sums.
Activations are channels-last ([N, H, W, C] for convolutions) unless
``channel_axis`` says otherwise.
"""

from __future__ import annotations

import difflib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution import adaptive
from drig.attribution.arguments import (AttributionArgumentError, as_batch, check_baseline,
                                        check_finite, check_positive_int)
from drig.attribution.integration import (Operands, accumulation_dtype, check_scalar_fn,
                                          integrated_gradients, path_sum, quadrature)
from drig.models import layer_access


class UnknownLayerError(AttributionArgumentError):
  """A layer name that the model does not have."""


class LayerAttribution(NamedTuple):
  """Attributions at one layer (a pytree).

  Attributes:
    units: float32 [N, *layer_shape], one value per unit (channel x position).
    channels: float32 [N, C], units summed over every axis but batch and channel.
    gap: float32 [N], sum(units) - (q(x) - q(baseline)).
    activations: the instance's activations [N, *layer_shape].
    baseline_activations: the baseline's activations, [1 or N, *layer_shape].
    steps: with steps="auto", int32 [N] evaluations of from_layer per image
      (else None).
    converged: with steps="auto", bool [N], whether the image met the
      tolerance (else None).
  """
  units: jax.Array
  channels: jax.Array
  gap: jax.Array
  activations: jax.Array
  baseline_activations: jax.Array
  steps: jax.Array | None = None
  converged: jax.Array | None = None


def per_channel(units: jax.Array, channel_axis: int = -1) -> jax.Array:
  """Sums unit attributions [N, ...] over every axis but batch and channel -> [N, C]."""
  axis = channel_axis % units.ndim
  if axis == 0:
    raise AttributionArgumentError("channel_axis cannot be the batch axis")
  return jnp.sum(units, axis=tuple(i for i in range(1, units.ndim) if i != axis))


def _single_baseline(baseline: jax.Array) -> bool:
  return baseline.ndim == 0 or baseline.shape[0] == 1


@jax.jit
def _activations(to_layer, x, baseline):
  to_layer = to_layer.tree
  # One half-gray image serves every instance: run it once, not N times.
  if not _single_baseline(baseline):
    baseline_full = jnp.broadcast_to(baseline, x.shape).astype(x.dtype)
  else:
    baseline_full = jnp.broadcast_to(baseline, (1,) + x.shape[1:]).astype(x.dtype)
  return to_layer(x), to_layer(baseline_full)


def layer_activations(to_layer: Callable, x, baseline) -> tuple[jax.Array, jax.Array]:
  """(to_layer(x), to_layer(baseline)); a single baseline image is run once -> [1, ...]."""
  x = as_batch(x)
  baseline = check_baseline(baseline, x)
  return _activations(Operands(to_layer), x, baseline)


def layer_integrated_gradients(to_layer: Callable, from_layer: Callable, x, baseline, *,
                               steps: int | str = 50, method: str = "riemann_right",
                               chunk_size: int | None = None,
                               channel_axis: int = -1,
                               tolerance: float = adaptive.DEFAULT_TOLERANCE,
                               max_steps: int = adaptive.DEFAULT_MAX_STEPS,
                               control: str = adaptive.DEFAULT_CONTROL) -> LayerAttribution:
  """The poster's layer IG: the straight path in activation space, through from_layer only.

  Args:
    to_layer: x [N, ...] -> activations [N, ...] at layer L.
    from_layer: activations [N, ...] -> quantity [N] (e.g. a quantity helper
      wrapped around the layer-to-logits function).
    x: the inputs [N, ...]; baseline broadcasts to x (e.g. half_gray_baseline(x)).
    steps, method, chunk_size, tolerance, max_steps, control: as for
      `integrated_gradients`; with steps="auto" the error control runs on the
      activation path (F = from_layer; the kept gradients are activation-sized).
    channel_axis: the activations' channel axis (channels-last by default).

  Returns:
    A LayerAttribution; gap is sum(units) - (q(x) - q(baseline)); with
    steps="auto" also steps and converged per image.
  """
  activations, baseline_activations = layer_activations(to_layer, x, baseline)
  # Finite inputs can still give non-finite activations: blame to_layer, not x.
  check_finite(activations, "to_layer(x)")
  check_finite(baseline_activations, "to_layer(baseline)",
               per_image=not _single_baseline(baseline_activations))
  check_scalar_fn(from_layer, activations, name="from_layer")
  result = integrated_gradients(from_layer, activations, baseline_activations, steps=steps,
                                method=method, chunk_size=chunk_size, tolerance=tolerance,
                                max_steps=max_steps, control=control)
  units, gap = result[:2]
  steps_used, converged = (result.steps, result.converged) if adaptive.is_auto(steps) else \
      (None, None)
  return LayerAttribution(units, per_channel(units, channel_axis), gap, activations,
                          baseline_activations, steps_used, converged)


def _conductance_jvp(operands, points, deltas):
  to_layer, from_layer = operands
  acc = accumulation_dtype(points)
  activations, velocity = jax.jvp(to_layer, (points,), (deltas,))
  grads = jax.grad(lambda a: jnp.sum(from_layer(a).astype(acc)))(activations)
  return grads.astype(acc) * velocity.astype(acc)


def _conductance_difference(operands, points, deltas):
  to_layer, from_layer = operands
  acc = accumulation_dtype(points)
  activations = to_layer(points)
  step = to_layer(points + deltas).astype(acc) - activations.astype(acc)
  grads = jax.grad(lambda a: jnp.sum(from_layer(a).astype(acc)))(activations)
  return grads.astype(acc) * step


@jax.jit
def _conductance_gap(operands, x, baseline, units):
  to_layer, from_layer = operands.tree
  acc = accumulation_dtype(x)
  quantity = lambda images: from_layer(to_layer(images)).astype(acc)
  change = quantity(x) - quantity(jnp.broadcast_to(baseline, x.shape).astype(x.dtype))
  return units.reshape(x.shape[0], -1).sum(axis=1) - change


def layer_conductance(to_layer: Callable, from_layer: Callable, x, baseline, *,
                      steps: int = 50, method: str = "riemann_right",
                      chunk_size: int | None = None, derivative: str = "jvp",
                      channel_axis: int = -1) -> LayerAttribution:
  """Layer attribution along the input path (Captum's LayerConductance).

  Args:
    to_layer, from_layer, x, baseline, steps, method, chunk_size, channel_axis:
      as for `layer_integrated_gradients`.
    derivative: "jvp" (exact da/dt by forward mode, weighted by the rule's
      weights) or "difference" (Captum's discretisation: the rule's nodes for
      steps + 1 points and activation differences between neighbours).

  Returns:
    A LayerAttribution; gap is sum(units) - (q(x) - q(baseline)), with
    q = from_layer(to_layer(.)).
  """
  if adaptive.is_auto(steps):
    # Its integrand is not the gradient of one scalar along the path per unit
    # read-out, so the interval errors of drig.attribution.adaptive do not apply.
    raise AttributionArgumentError(
        "layer_conductance takes a fixed int steps, not 'auto'; use "
        "layer_integrated_gradients for error-controlled layer attribution")
  if derivative not in ("jvp", "difference"):
    raise AttributionArgumentError(
        f"derivative must be 'jvp' or 'difference', got {derivative!r}")
  activations, baseline_activations = layer_activations(to_layer, x, baseline)
  check_scalar_fn(from_layer, activations, name="from_layer")
  x = as_batch(x)
  baseline = check_baseline(baseline, x)
  if derivative == "jvp":
    alphas, weights = quadrature(method, steps)
    units = path_sum(_conductance_jvp, (to_layer, from_layer), baseline, x, alphas, weights,
                        chunk_size=chunk_size)
  else:
    check_positive_int(steps)
    nodes, _ = quadrature(method, steps + 1)
    units = path_sum(_conductance_difference, (to_layer, from_layer), baseline, x,
                        nodes[:-1], np.ones(steps), scales=np.diff(nodes),
                        chunk_size=chunk_size)
  gap = _conductance_gap(Operands((to_layer, from_layer)), x, baseline, units)
  return LayerAttribution(units, per_channel(units, channel_axis), gap, activations,
                          baseline_activations)


# ------------------------------------------------------------------------------
# Models with named layers (drig.models.layer_access).


@jax.tree_util.register_pytree_node_class
class ToLayer:
  """x -> the activations at `layer` (drig.models.layer_access.input_to_layer); a pytree."""

  def __init__(self, model, variables, layer: str):
    self.model, self.variables, self.layer = model, variables, layer

  def __call__(self, x):
    return layer_access.input_to_layer(self.model, self.variables, x, self.layer)

  def tree_flatten(self):
    return (self.variables,), (self.model, self.layer)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(aux[0], children[0], aux[1])


@jax.tree_util.register_pytree_node_class
class FromLayer(ToLayer):
  """activations at `layer` -> logits (drig.models.layer_access.layer_to_output); a pytree."""

  def __call__(self, activations):
    return layer_access.layer_to_output(self.model, self.variables, activations, self.layer)


def check_layer_name(model, layer: str) -> str:
  """The canonical name of `layer` (aliases allowed); UnknownLayerError if there is none."""
  names = list(layer_access.layer_names(model))
  try:
    return layer_access.canonical_layer_name(model, layer)
  except (ValueError, KeyError) as e:
    close = difflib.get_close_matches(str(layer), names, n=4, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise UnknownLayerError(
        f"{type(model).__name__} has no layer {layer!r}.{hint} Its layers: "
        f"{', '.join(names)}.") from e


def split_model(model, variables, layer: str) -> tuple[ToLayer, FromLayer]:
  """(to_layer, layer_to_logits) for a drig model split at `layer`.

  Both are pytrees carrying `variables`, so they are traced arguments of the
  compiled programs, and the pair composes to the full model bit for bit.
  """
  layer = check_layer_name(model, layer)
  return ToLayer(model, variables, layer), FromLayer(model, variables, layer)


def model_layer_integrated_gradients(model, variables, layer: str, quantity: Callable, x,
                                     baseline, *, conductance: bool = False,
                                     **kwargs) -> LayerAttribution:
  """Layer attribution for a drig model at a named layer.

  Args:
    model, variables: a drig model (e.g. InceptionV3 + head) and its variables.
    layer: a name from drig.models.layer_access.layer_names(model) (or an alias).
    quantity: logits_fn -> f, e.g. functools.partial(probability_of_grade, grade=4).
    x, baseline: the inputs [N, ...] and a baseline broadcasting to them.
    conductance: False for the poster's activation-path IG, True for the
      input-path `layer_conductance`.
    **kwargs: steps, method, chunk_size (and derivative for conductance;
      tolerance and max_steps with steps="auto", activation-path IG only).

  Returns:
    A LayerAttribution.
  """
  to_layer, layer_logits = split_model(model, variables, layer)
  attribute = layer_conductance if conductance else layer_integrated_gradients
  return attribute(to_layer, quantity(layer_logits), x, baseline, **kwargs)


__all__ = [
    "FromLayer", "LayerAttribution", "ToLayer", "UnknownLayerError", "check_layer_name",
    "layer_activations", "layer_conductance", "layer_integrated_gradients",
    "model_layer_integrated_gradients", "per_channel", "split_model",
]
