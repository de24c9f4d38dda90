"""Layer access for attribution: input -> layer and layer -> output, composable bit for bit.

For a model with named layers (``InceptionV3`` or ``DRClassifier``):

* ``layer_names(model)``: the layers in forward order: ``Conv2d_1a_3x3``,
  ``Conv2d_2a_3x3``, ``Conv2d_2b_3x3``, ``Conv2d_3b_1x1``, ``Conv2d_4a_3x3``
  (the stem's conv units; torchvision's names, Keras' ``conv2d_1`` ...
  ``conv2d_5`` with their BN and ReLU), ``mixed0`` ... ``mixed10`` (Keras'
  names; torchvision's ``Mixed_5b`` ... ``Mixed_7c`` are accepted as aliases),
  ``pooled``, then ``fc1``, ``fc2``, ``logits`` for a DRClassifier, or
  ``logits`` for an InceptionV3 with an ImageNet top.
* ``input_to_layer(model, variables, x, layer)``: the activation of ``layer``
  for images ``x``.
* ``layer_to_output(model, variables, activation, layer)``: the model's output
  (logits) from that activation.
* ``layer_activations(model, variables, x)``: every layer's activation in one
  pass; ``layer_shapes(model, variables, input_shape)``: their shapes.

Activations: a conv layer's is its unit's output after BatchNorm and ReLU (the
max pools after ``Conv2d_2b_3x3`` and ``Conv2d_4a_3x3`` belong to the next
layer); a mixed block's is its concatenated output, [N, H, W, C]; ``pooled``
is [N, C] float32; ``fc_k`` is after its activation function (before
dropout); ``logits`` are float32. All in inference mode (BatchNorm with its
running statistics, no dropout).

Both halves run the model's own ``__call__`` (with ``stop_layer`` and
``start_layer``), i.e. exactly the operations of ``model.apply(variables, x,
train=False)`` split at the layer, so
``layer_to_output(m, v, input_to_layer(m, v, x, L), L)`` equals the full
model bit for bit, eagerly and under ``jax.jit``. Both are pure functions of
arrays (``model`` and ``layer`` static), so they compose with ``jit``,
``vmap`` and ``grad``.
"""

from typing import Any

import flax
import flax.linen as nn
import jax

from drig.models import inception_v3


def _check_model(model: nn.Module) -> None:
  if not (hasattr(model, "layer_names") and hasattr(model, "canonical_layer")):
    raise TypeError(f"{type(model).__name__} has no named layers; use drig.models "
                    "InceptionV3 or DRClassifier")


def layer_names(model: nn.Module) -> tuple[str, ...]:
  """The model's named layers, in forward order."""
  _check_model(model)
  return tuple(model.layer_names())


def canonical_layer_name(model: nn.Module, layer: str) -> str:
  """``layer`` or its alias as the canonical name; ValueError listing valid names."""
  _check_model(model)
  return model.canonical_layer(layer)


def input_to_layer(model: nn.Module, variables: Any, x: jax.Array, layer: str) -> jax.Array:
  """Activation of ``layer`` for inputs ``x`` (inference mode).

  Args:
    model: an InceptionV3 or DRClassifier.
    variables: its {"params", "batch_stats"}.
    x: float32 [N, H, W, 3] images in [-1, 1].
    layer: a name from ``layer_names(model)`` (or an alias).

  Returns:
    The activation, e.g. [N, h, w, C] for conv and mixed layers, [N, C] after.

  Raises:
    ValueError: unknown layer (the message lists the valid names).
  """
  layer = canonical_layer_name(model, layer)
  return model.apply(variables, x, train=False, stop_layer=layer)


def layer_to_output(model: nn.Module, variables: Any, activation: jax.Array,
                    layer: str) -> jax.Array:
  """The model's output (float32 logits, or pooled features for a bare base) from
  ``layer``'s activation (inference mode).

  Args:
    model: an InceptionV3 or DRClassifier.
    variables: its {"params", "batch_stats"}.
    activation: the activation of ``layer``, shaped as ``input_to_layer`` returns.
    layer: a name from ``layer_names(model)`` (or an alias).

  Raises:
    ValueError: unknown layer (the message lists the valid names).
  """
  layer = canonical_layer_name(model, layer)
  return model.apply(variables, activation, train=False, start_layer=layer)


def layer_activations(model: nn.Module, variables: Any, x: jax.Array) -> dict[str, jax.Array]:
  """Every named layer's activation in one inference pass: {name: activation}, forward order.

  Each activation equals ``input_to_layer(model, variables, x, name)``.
  """
  _check_model(model)
  _, state = model.apply(variables, x, train=False, capture_layers=True, mutable=["layers"])
  found = {}
  def collect(tree):
    for key, value in tree.items():
      if isinstance(value, tuple):
        found[key.removeprefix(inception_v3.CAPTURE_PREFIX)] = value[0]
      else:
        collect(value)
  collect(flax.core.unfreeze(state["layers"]))
  return {name: found[name] for name in layer_names(model)}


def layer_shapes(model: nn.Module, variables: Any, input_shape) -> dict[str, tuple[int, ...]]:
  """Shape of every named layer's activation for inputs of ``input_shape`` (traced, not run)."""
  x = jax.ShapeDtypeStruct(tuple(input_shape), jax.numpy.float32)
  shapes = jax.eval_shape(lambda v, x: layer_activations(model, v, x), variables, x)
  return {name: tuple(shape.shape) for name, shape in shapes.items()}
