"""Grad-CAM (Selvaraju et al., 2017): a layer's activations weighted by their mean gradient.

For activations ``A = to_layer(x)`` [N, h, w, C] and a quantity
``q = from_layer(A)`` [N]::

  weights_c = mean over (h, w) of dq/dA_c
  map       = sum_c weights_c A_c            (ReLU of it with relu=True)

then resized to the input's height and width. This is Captum 0.9's
``LayerGradCam`` (``relu_attributions`` is drig's ``relu``; Captum's default
is no ReLU, the paper's and saliency's is ReLU, drig's too), followed by
``LayerAttribution.interpolate``. Unlike saliency's ``GradCam`` the map is
not divided by its maximum, so maps of different images stay comparable.

One forward pass to the layer and one forward and backward pass above it per
image: the cost of a single gradient.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from drig.attribution.arguments import AttributionArgumentError, as_batch, check_finite
from drig.attribution.integration import Operands, accumulation_dtype, check_scalar_fn
from drig.attribution.layer import split_model

UPSAMPLING = ("bilinear", "nearest")


class GradCam(NamedTuple):
  """A Grad-CAM map (a pytree).

  Attributes:
    map: float32 [N, H, W], the map resized to the input's height and width.
    layer_map: float32 [N, h, w], the map at the layer's resolution.
    weights: float32 [N, C], each channel's mean gradient.
  """
  map: jax.Array
  layer_map: jax.Array
  weights: jax.Array


def resize_map(maps, size: tuple[int, int], method: str = "bilinear") -> jax.Array:
  """Resizes maps [N, h, w] to [N, *size].

  "bilinear" interpolates between pixel centres, clamping at the edges (torch's
  ``interpolate(mode="bilinear", align_corners=False)``, scikit-image's order 1);
  "nearest" takes the pixel whose centre is nearest (the same as torch's
  "nearest" when size is a multiple of the map's).
  """
  if method not in UPSAMPLING:
    raise AttributionArgumentError(f"method must be one of {UPSAMPLING}, got {method!r}")
  maps = jnp.asarray(maps)
  return jax.image.resize(maps, (maps.shape[0],) + tuple(size),
                          "linear" if method == "bilinear" else "nearest", antialias=False)


@jax.jit
def _to_layer(to_layer, x):
  return to_layer.tree(x)


@jax.jit
def _grad_cam(from_layer, activations, relu):
  from_layer = from_layer.tree
  acc = accumulation_dtype(activations)
  grads = jax.grad(lambda a: jnp.sum(from_layer(a).astype(acc)))(activations).astype(acc)
  spatial = tuple(range(1, activations.ndim - 1))
  weights = jnp.mean(grads, axis=spatial)
  # Elementwise product and sum, not a dot: exact float32 on every backend.
  expand = (slice(None),) + (None,) * len(spatial) + (slice(None),)
  layer_map = jnp.sum(weights[expand] * activations.astype(acc), axis=-1)
  layer_map = jnp.where(relu, jnp.maximum(layer_map, 0.0), layer_map)
  return layer_map, weights


def grad_cam(to_layer: Callable, from_layer: Callable, x, *, relu: bool = True,
             upsample: str = "bilinear") -> GradCam:
  """Grad-CAM of a quantity at one layer, resized to the input.

  Args:
    to_layer: images [N, H, W, C] -> activations [N, h, w, C'] (channels last),
      e.g. the first half of `drig.attribution.split_model`.
    from_layer: activations -> the quantity [N], e.g.
      `probability_of_grade(layer_logits, 4)` on the second half.
    x: the images, a floating batch [N, H, W, C].
    relu: keep only positive evidence (the paper's Grad-CAM); False gives
      Captum's default signed map.
    upsample: "bilinear" or "nearest" (see `resize_map`).

  Returns:
    A GradCam: the map at the input's and at the layer's resolution, and the
    channel weights.

  Raises:
    AttributionArgumentError: an unknown upsample method, x without height and
      width, activations that are not [N, h, w, C], NaN or infinite values, or a
      from_layer that does not map the activations to [N].
  """
  if upsample not in UPSAMPLING:
    raise AttributionArgumentError(f"upsample must be one of {UPSAMPLING}, got {upsample!r}")
  x = as_batch(x)
  if x.ndim != 4:
    raise AttributionArgumentError(f"x must be images [N, H, W, C], got shape {x.shape}")
  if x.shape[0] == 0:
    raise AttributionArgumentError(f"x is an empty batch (shape {x.shape})")
  check_finite(x)
  activations = _to_layer(Operands(to_layer), x)
  if activations.ndim != 4:
    raise AttributionArgumentError(
        f"to_layer must return spatial activations [N, h, w, C], got shape "
        f"{activations.shape}")
  check_finite(activations, "to_layer(x)")
  check_scalar_fn(from_layer, activations, name="from_layer")
  layer_map, weights = _grad_cam(Operands(from_layer), activations, bool(relu))
  return GradCam(resize_map(layer_map, x.shape[1:3], upsample), layer_map, weights)


def model_grad_cam(model, variables, layer: str, quantity: Callable, x,
                   **kwargs) -> GradCam:
  """Grad-CAM for a drig model at a named layer.

  Args:
    model, variables: a drig model with named layers and its variables.
    layer: a name from drig.models.layer_access.layer_names(model) (or an alias).
    quantity: logits_fn -> f, e.g. functools.partial(probability_of_grade, grade=4).
    x: the images [N, H, W, C].
    **kwargs: relu, upsample.

  Returns:
    A GradCam.

  Raises:
    UnknownLayerError: the model has no layer of that name (the message lists them).
  """
  to_layer, layer_logits = split_model(model, variables, layer)
  return grad_cam(to_layer, quantity(layer_logits), x, **kwargs)


__all__ = ["GradCam", "UPSAMPLING", "grad_cam", "model_grad_cam", "resize_map"]
