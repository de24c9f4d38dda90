"""Active regions: which pixels drive an inner neuron, as the poster shows lesions.

One concept: pixel integrated gradients of linear read-outs of a layer.

The active region of a neuron (or channel) at layer L is the integrated gradient
of its activation with respect to the input pixels, with the same half-gray
baseline as the pixel attribution (Captum's ``NeuronIntegratedGradients``).

drig phrases every neuron quantity as a linear read-out of the layer,
``q_k(x) = <c_k, to_layer(x)>`` with a cotangent ``c_k`` per image: a one-hot
for a unit, ones over a channel's positions for a channel, or any weighted
combination. This gives two savings:

* K read-outs share each step's forward pass: one ``jax.vjp`` of ``to_layer``
  per chunk of path points, then the K cotangents are pulled back together
  (``jax.vmap`` over the vjp), instead of K separate integrations.
* The resultant active region ``sum_k w_k region_k`` is, by linearity of the
  integral, the active region of ``sum_k w_k q_k``: one read-out, one pull-back
  (`resultant_active_region`).

Layer arrays are channels-last ([N, H, W, C]) unless channel_axis says otherwise.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution import adaptive
from drig.attribution.arguments import (AttributionArgumentError, as_batch, check_baseline,
                                        check_integration_arguments, check_positive_int)
from drig.attribution.integration import (Operands, _call_operands, accumulation_dtype,
                                          cached_eval_shape, controlled_path_integral,
                                          default_groups_per_call,
                                          default_points_per_call, integrated_gradients,
                                          least_padding_chunk, path_sum, quadrature)
from drig.attribution import layer as layer_lib
from drig.attribution import receptive_field

# Pull-backs per call when chunk_size is None, as a multiple of the default
# points per call: the K read-outs multiply the backward batch by K, and on the
# 2-core CPU Inception's stem pulls back 21 cotangents fastest one path point
# at a time (a working set that fits the caches), about 2x faster than 8.
_PULLBACKS_PER_POINT_BUDGET = 4


def _adaptive_points_per_call(chunk_size, num_readouts: int) -> int:
  """Path points per call of an error-controlled read-out integration: the same
  pull-back budget as `_readout_chunk`, shared by all images in the call."""
  if chunk_size is not None:
    check_positive_int(chunk_size, name="chunk_size")
    return int(chunk_size)
  budget = _PULLBACKS_PER_POINT_BUDGET * default_points_per_call()
  return max(1, budget // num_readouts)


def _readout_chunk(chunk_size, steps: int, num_images: int, num_readouts: int) -> int:
  if chunk_size is not None:
    return chunk_size
  budget = _PULLBACKS_PER_POINT_BUDGET * default_points_per_call()
  return least_padding_chunk(steps, budget // (num_readouts * max(num_images, 1)))


class ActiveRegions(NamedTuple):
  """Pixel attributions of K read-outs of a layer (a pytree).

  Attributes:
    regions: float32 [N, K, *x.shape[1:]].
    gap: float32 [N, K], sum(region) - (q_k(x) - q_k(baseline)).
    steps: with steps="auto", int32 [N] evaluations of to_layer per image (else None).
    converged: with steps="auto", bool [N]: every read-out of the image met the
      tolerance (else None).
  """
  regions: jax.Array
  gap: jax.Array
  steps: jax.Array | None = None
  converged: jax.Array | None = None


class TopK(NamedTuple):
  """The k highest and k lowest scores per image, indices flat over the unit axes.

  When fewer than k scores are positive (negative), the positive (negative)
  selection includes non-positive (non-negative) ones: check the scores.
  """
  positive: jax.Array         # int32 [N, k], descending scores
  positive_scores: jax.Array  # [N, k]
  negative: jax.Array         # int32 [N, k], ascending scores
  negative_scores: jax.Array  # [N, k]


@jax.jit
def _top_k(scores, k_array):
  flat = scores.reshape(scores.shape[0], -1)
  k = k_array.shape[0]
  pos_scores, pos = jax.lax.top_k(flat, k)
  neg_scores, neg = jax.lax.top_k(-flat, k)
  return TopK(pos, pos_scores, neg, -neg_scores)


def select_top_k(scores, k: int) -> TopK:
  """The k most positive and k most negative units or channels per image.

  Args:
    scores: attributions [N, ...], e.g. LayerAttribution.channels [N, C] or
      .units [N, H, W, C].
    k: how many of each sign, 1 <= k <= the number of units per image.

  Returns:
    TopK with indices into scores[n].reshape(-1) (use np.unravel_index for units).
  """
  scores = as_batch(scores, "scores")
  size = int(np.prod(scores.shape[1:]))
  check_positive_int(k, name="k")
  if k > size:
    raise AttributionArgumentError(f"k = {k} exceeds the {size} units per image")
  return _top_k(scores, jnp.zeros((k,), jnp.int8))


def unit_cotangents(layer_shape, indices) -> jax.Array:
  """One-hot read-outs of single units: [N, K, *layer_shape] from flat indices [N, K]."""
  indices = jnp.asarray(indices)
  size = int(np.prod(layer_shape))
  return jax.nn.one_hot(indices, size, dtype=jnp.float32).reshape(
      indices.shape + tuple(layer_shape))


def channel_cotangents(layer_shape, channels, channel_axis: int = -1) -> jax.Array:
  """Read-outs of whole channels (activation summed over positions): [N, K, *layer_shape].

  Args:
    layer_shape: one image's activation shape, e.g. (H, W, C).
    channels: int [N, K], a channel index per image and read-out.
    channel_axis: the channel axis of layer_shape.
  """
  channels = jnp.asarray(channels)
  layer_shape = tuple(layer_shape)
  axis = channel_axis % len(layer_shape)
  hot = jax.nn.one_hot(channels, layer_shape[axis], dtype=jnp.float32)  # [N, K, C]
  shape = [1] * len(layer_shape)
  shape[axis] = layer_shape[axis]
  hot = hot.reshape(channels.shape + tuple(shape))
  return jnp.broadcast_to(hot, channels.shape + layer_shape)


def combine_cotangents(cotangents, weights) -> jax.Array:
  """sum_k weights[n, k] * cotangents[n, k] -> [N, 1, *layer_shape] (one read-out)."""
  cotangents = jnp.asarray(cotangents, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != cotangents.shape[:2]:
    raise AttributionArgumentError(
        f"weights of shape {weights.shape} must be [N, K] = {cotangents.shape[:2]}")
  expand = weights.reshape(weights.shape + (1,) * (cotangents.ndim - 2))
  return jnp.sum(cotangents * expand, axis=1, keepdims=True)


def _pull_back(to_layer, points, cotangents):
  """Gradients [B, K, ...x] of the K read-outs, sharing one forward pass."""
  batch, num_images = points.shape[0], cotangents.shape[0]
  repeat = batch // num_images
  activations, vjp = jax.vjp(to_layer, points)
  # Image-major points: image n's path points are rows n*repeat..(n+1)*repeat-1.
  cot = jnp.broadcast_to(cotangents[:, None], (num_images, repeat) + cotangents.shape[1:])
  cot = cot.reshape((batch,) + cotangents.shape[1:]).astype(activations.dtype)
  (grads,) = jax.vmap(vjp, in_axes=1, out_axes=1)(cot)
  return grads


def _readout_values_and_gradients(operands, points, rows):
  """evaluate for drig.attribution.adaptive: the K read-outs [B, K] and their
  gradients [B, K, ...x], one forward pass; rows pick each point's cotangents."""
  to_layer, cotangents = operands
  acc = accumulation_dtype(points)
  activations, vjp = jax.vjp(to_layer, points)
  cot = cotangents[rows].astype(activations.dtype)
  values = jnp.sum(cot.astype(acc) * activations[:, None].astype(acc),
                   axis=tuple(range(2, cot.ndim)))
  (grads,) = jax.vmap(vjp, in_axes=1, out_axes=1)(cot)
  return values, grads


def _adaptive_readouts(evaluate, operands, x, baseline, num_readouts, *, tolerance,
                       max_steps, chunk_size, control):
  """(attributions [N, R, ...x], gaps [N, R], steps, converged, map_error) of R read-outs
  (map_error: float32 [N], worst read-out, with control="map"; else None)."""
  result = controlled_path_integral(
      control, evaluate, Operands(operands), baseline, x, num_readouts=num_readouts,
      tolerance=tolerance, max_steps=max_steps,
      points_per_call=_adaptive_points_per_call(chunk_size, num_readouts),
      groups=default_groups_per_call())
  attributions, gaps = adaptive.finish(x, baseline, result.integral, result.change)
  map_error = None if result.map_error is None else jnp.asarray(result.map_error, jnp.float32)
  return (attributions, gaps, jnp.asarray(result.steps), jnp.asarray(result.converged),
          map_error)


def _readout_gradients(operands, points, deltas):
  del deltas
  to_layer, cotangents = operands
  return _pull_back(to_layer, points, cotangents)


@jax.jit
def _finish_regions(operands, x, baseline, integral):
  to_layer, cotangents = operands.tree
  acc = accumulation_dtype(x)
  delta = x.astype(acc) - jnp.broadcast_to(baseline, x.shape).astype(acc)
  regions = delta[:, None] * integral
  ends = to_layer(jnp.concatenate([x, jnp.broadcast_to(baseline, x.shape).astype(x.dtype)]))
  n = x.shape[0]
  change = ends[:n].astype(acc) - ends[n:].astype(acc)  # [N, ...layer]
  readout = jnp.sum(cotangents * change[:, None], axis=tuple(range(2, cotangents.ndim)))
  gap = regions.reshape(regions.shape[:2] + (-1,)).sum(axis=-1) - readout
  return ActiveRegions(regions, gap)


def _check_cotangents(to_layer, x, cotangents):
  layer = cached_eval_shape(_call_operands, Operands(to_layer), x)
  cotangents = jnp.asarray(cotangents, jnp.float32)
  if cotangents.ndim != layer.ndim + 1 or cotangents.shape[0] != x.shape[0] or \
      cotangents.shape[2:] != layer.shape[1:]:
    raise AttributionArgumentError(
        f"cotangents must be [N, K, *layer_shape] = [{x.shape[0]}, K, "
        f"{', '.join(map(str, layer.shape[1:]))}], got {cotangents.shape}")
  return cotangents


def active_regions(to_layer: Callable, x, baseline, cotangents, *, steps: int | str = 50,
                   method: str = "riemann_right", chunk_size: int | None = None,
                   tolerance: float = adaptive.DEFAULT_TOLERANCE,
                   max_steps: int = adaptive.DEFAULT_MAX_STEPS,
                   control: str = adaptive.DEFAULT_CONTROL) -> ActiveRegions:
  """Pixel IG of K linear read-outs of a layer, sharing the forward pass per step.

  Args:
    to_layer: x [N, ...] -> activations [N, *layer_shape].
    x: the inputs [N, ...]; baseline broadcasts to x (the half-gray image).
    cotangents: [N, K, *layer_shape]; read-out k of image n is
      q_k(x_n) = sum(cotangents[n, k] * to_layer(x)[n]). See unit_cotangents,
      channel_cotangents and combine_cotangents.
    steps, method, chunk_size: as for `integrated_gradients`; memory grows with
      K * chunk_size. None picks chunks of about 32 / K path points on CPU.
      steps="auto": error-controlled (drig.attribution.adaptive), F_k = the
      read-outs; an image converges when all K do; chunk_size is then path
      points per call across images (None: about 32 / K). The gradients at
      every node are kept: N x nodes x K x (one image) float32.
    tolerance, max_steps, control: with steps="auto", as for `integrated_gradients`.

  Returns:
    ActiveRegions: regions [N, K, ...x] and the completeness gap [N, K]; with
    steps="auto" also steps and converged per image.
  """
  check_integration_arguments(steps, tolerance, max_steps, control)
  x = as_batch(x)
  baseline = check_baseline(baseline, x)
  cotangents = _check_cotangents(to_layer, x, cotangents)
  if adaptive.is_auto(steps):
    quadrature(method, 2)  # a known method name, though "auto" does not use it
    return ActiveRegions(*_adaptive_readouts(
        _readout_values_and_gradients, (to_layer, cotangents), x, baseline,
        cotangents.shape[1], tolerance=tolerance, max_steps=max_steps,
        chunk_size=chunk_size, control=control)[:4])
  alphas, weights = quadrature(method, steps)
  operands = (to_layer, cotangents)
  chunk_size = _readout_chunk(chunk_size, steps, x.shape[0], cotangents.shape[1])
  integral = path_sum(_readout_gradients, operands, baseline, x, alphas, weights,
                      chunk_size=chunk_size)
  return _finish_regions(Operands(operands), x, baseline, integral)


def resultant_active_region(to_layer: Callable, x, baseline, cotangents, weights,
                            **kwargs) -> tuple[jax.Array, jax.Array]:
  """The poster's resultant active region sum_k w_k region_k, as ONE integration.

  By linearity it is the active region of the single read-out sum_k w_k q_k,
  so it costs one pull-back per step, not K.

  Args:
    to_layer, x, baseline: as for `active_regions`.
    cotangents: [N, K, *layer_shape], the K neurons' read-outs.
    weights: [N, K], e.g. the neurons' layer attributions.
    **kwargs: steps, method, chunk_size.

  Returns:
    (region float32 [N, ...x], gap float32 [N]).
  """
  combined = combine_cotangents(cotangents, weights)
  result = active_regions(to_layer, x, baseline, combined, **kwargs)
  return result.regions[:, 0], result.gap[:, 0]


def _units_as_indices(units, layer_shape) -> np.ndarray:
  units = np.asarray(units, np.int64)
  if units.ndim != 3 or units.shape[-1] != len(layer_shape):
    raise AttributionArgumentError(
        f"units must be [N, K, {len(layer_shape)}] positions in the layer "
        f"{tuple(layer_shape)}, got shape {units.shape}")
  if np.any(units < 0) or np.any(units >= np.array(layer_shape)):
    raise AttributionArgumentError(f"units outside the layer {tuple(layer_shape)}")
  return np.ravel_multi_index(tuple(np.moveaxis(units, -1, 0)), tuple(layer_shape))


def unit_active_regions(to_layer: Callable, x, baseline, units, *, steps: int | str = 50,
                        method: str = "riemann_right", chunk_size: int | None = None,
                        crop: bool = True, tolerance: float = adaptive.DEFAULT_TOLERANCE,
                        max_steps: int = adaptive.DEFAULT_MAX_STEPS,
                        control: str = adaptive.DEFAULT_CONTROL) -> ActiveRegions:
  """Active regions of single units, each integrated on its receptive field only.

  Equal to `active_regions` with `unit_cotangents`, but every unit's
  integration runs on a crop a few receptive fields wide around it, proven
  exact first (see drig.attribution.receptive_field). For Inception-v3's
  Conv2d_4a_3x3 at 256 px a crop is 40x40 pixels. When the layer's units see
  most of the image, or a crop cannot be proven exact, the whole image is used.

  Args:
    to_layer: x [N, H, W, C] -> activations [N, h, w, c] (channels last).
    x, baseline: the inputs and the baseline (broadcasting to x).
    units: int [N, K, 3], (row, column, channel) of each unit per image; e.g.
      np.unravel_index of `select_top_k(layer.units, k)` indices.
    steps, method, chunk_size, tolerance, max_steps, control: as for `active_regions`
      (with "auto" on crops, each unit's crop converges separately; steps is
      then the sum over the image's K crops, converged whether all K did).
    crop: False forces whole-image integration (the reference).

  Returns:
    ActiveRegions: regions [N, K, H, W, C] (zero outside each crop) and gaps [N, K].
  """
  check_integration_arguments(steps, tolerance, max_steps, control)
  x = as_batch(x)
  baseline = check_baseline(baseline, x)
  layer_shape = cached_eval_shape(_call_operands, Operands(to_layer), x).shape[1:]
  flat = _units_as_indices(units, layer_shape)
  if x.ndim != 4 or len(layer_shape) != 3:
    crop = False
  plan = receptive_field.plan_unit_crops(to_layer, x, baseline, units) if crop else None
  if plan is None or not plan.exact.all():
    return active_regions(to_layer, x, baseline, unit_cotangents(layer_shape, flat),
                          steps=steps, method=method, chunk_size=chunk_size,
                          tolerance=tolerance, max_steps=max_steps, control=control)
  return _regions_on_crops(to_layer, x, baseline, plan, steps=steps, method=method,
                           chunk_size=chunk_size, tolerance=tolerance, max_steps=max_steps,
                           control=control)


def _regions_on_crops(to_layer, x, baseline, plan, *, steps, method, chunk_size,
                      tolerance=adaptive.DEFAULT_TOLERANCE,
                      max_steps=adaptive.DEFAULT_MAX_STEPS,
                      control=adaptive.DEFAULT_CONTROL):
  n, k = plan.starts.shape[:2]
  crops = receptive_field.crop_windows(x, plan.starts, plan.size)
  full_baseline = jnp.broadcast_to(baseline, x.shape).astype(x.dtype)
  baseline_crops = receptive_field.crop_windows(full_baseline, plan.starts, plan.size)
  crop_layer = cached_eval_shape(_call_operands, Operands(to_layer), crops).shape[1:]
  crop_flat = _units_as_indices(plan.units.reshape(n * k, 1, 3), crop_layer)
  result = active_regions(to_layer, crops, baseline_crops,
                          unit_cotangents(crop_layer, crop_flat), steps=steps, method=method,
                          chunk_size=chunk_size, tolerance=tolerance, max_steps=max_steps,
                          control=control)
  regions = result.regions.reshape((n, k) + result.regions.shape[2:])
  regions = receptive_field.paste_windows(regions, plan.starts, x.shape[1:])
  if result.steps is None:
    return ActiveRegions(regions, result.gap.reshape(n, k))
  return ActiveRegions(regions, result.gap.reshape(n, k),
                       jnp.sum(result.steps.reshape(n, k), axis=1, dtype=jnp.int32),
                       jnp.all(result.converged.reshape(n, k), axis=1))


# ------------------------------------------------------------------------------
# The poster's whole per-image analysis.


class LesionAnalysis(NamedTuple):
  """Everything the poster's lesion-detection figure needs (a pytree).

  Attributes:
    pixels: float32 [N, ...x], pixel IG of the quantity.
    pixel_gap: float32 [N].
    layer: LayerAttribution at the inspected layer (activation-path IG).
    top: TopK over the layer's channels (or units) by attribution.
    positive_regions, negative_regions: float32 [N, k, ...x], or None when
      only the resultant maps were asked for.
    positive_resultant, negative_resultant: float32 [N, ...x], the weighted sums
      of the positive (negative) selection's regions, weights = their layer
      attributions where of the right sign, else 0.
    region_gaps: float32 [N, R], the completeness gap of every read-out.
    steps: with steps="auto", int32 [N] evaluations of the pixel and read-out
      pass per image (the layer pass's are layer.steps); else None.
    converged: with steps="auto", bool [N]: the pixel quantity and every
      read-out met the tolerance (the layer pass's flag is layer.converged).
    map_error: with control="map", float32 [N]: the pixel and read-out pass's
      estimated relative map error (worst of them); else None.
  """
  pixels: jax.Array
  pixel_gap: jax.Array
  layer: layer_lib.LayerAttribution
  top: TopK
  positive_regions: jax.Array | None
  negative_regions: jax.Array | None
  positive_resultant: jax.Array
  negative_resultant: jax.Array
  region_gaps: jax.Array
  steps: jax.Array | None = None
  converged: jax.Array | None = None
  map_error: jax.Array | None = None


def _pixels_and_readouts_values(operands, points, rows):
  """evaluate for drig.attribution.adaptive: q and the read-outs [B, 1 + K] and
  their pixel gradients [B, 1 + K, ...x], from one forward pass of to_layer."""
  to_layer, from_layer, cotangents = operands
  from_layer = adaptive.for_rows(from_layer, rows)
  acc = accumulation_dtype(points)
  activations, vjp = jax.vjp(to_layer, points)
  quantity, quantity_vjp = jax.vjp(lambda a: from_layer(a).astype(acc), activations)
  (quantity_cot,) = quantity_vjp(jnp.ones_like(quantity))
  cot = cotangents[rows].astype(activations.dtype)
  readouts = jnp.sum(cot.astype(acc) * activations[:, None].astype(acc),
                     axis=tuple(range(2, cot.ndim)))
  cot = jnp.concatenate([quantity_cot[:, None].astype(activations.dtype), cot], axis=1)
  (grads,) = jax.vmap(vjp, in_axes=1, out_axes=1)(cot)
  return jnp.concatenate([quantity[:, None], readouts], axis=1), grads


def _pixels_and_readouts(operands, points, deltas):
  """Pixel gradient of q = from_layer(to_layer(.)) and the read-outs', one forward pass."""
  del deltas
  to_layer, from_layer, cotangents = operands
  batch, num_images = points.shape[0], cotangents.shape[0]
  repeat = batch // num_images
  activations, vjp = jax.vjp(to_layer, points)
  acc = accumulation_dtype(points)
  quantity_cot = jax.grad(lambda a: jnp.sum(from_layer(a).astype(acc)))(activations)
  cot = jnp.broadcast_to(cotangents[:, None], (num_images, repeat) + cotangents.shape[1:])
  cot = cot.reshape((batch,) + cotangents.shape[1:]).astype(activations.dtype)
  cot = jnp.concatenate([quantity_cot[:, None].astype(activations.dtype), cot], axis=1)
  (grads,) = jax.vmap(vjp, in_axes=1, out_axes=1)(cot)
  return grads


@jax.jit
def _finish_analysis(operands, x, baseline, integral):
  to_layer, from_layer, cotangents = operands.tree
  baseline_full = jnp.broadcast_to(baseline, x.shape).astype(x.dtype)
  acc = accumulation_dtype(x)
  delta = x.astype(acc) - baseline_full.astype(acc)
  attributions = delta[:, None] * integral  # [N, 1 + K, ...x]
  # The quantity sees [N] twice, never [2N] (see integration._finish_pixel).
  layer_x, layer_baseline = to_layer(x), to_layer(baseline_full)
  q_change = from_layer(layer_x).astype(acc) - from_layer(layer_baseline).astype(acc)
  change = layer_x.astype(acc) - layer_baseline.astype(acc)
  readout = jnp.sum(cotangents * change[:, None], axis=tuple(range(2, cotangents.ndim)))
  totals = attributions.reshape(attributions.shape[:2] + (-1,)).sum(axis=-1)
  gaps = totals - jnp.concatenate([q_change[:, None], readout], axis=1)
  return attributions, gaps


def lesion_detection(to_layer: Callable, from_layer: Callable, x, baseline, *, k: int = 10,
                     by: str = "channel", individual_regions: bool = True,
                     steps: int | str = 50, method: str = "riemann_right",
                     chunk_size: int | None = None, channel_axis: int = -1,
                     tolerance: float = adaptive.DEFAULT_TOLERANCE,
                     max_steps: int = adaptive.DEFAULT_MAX_STEPS,
                     control: str = adaptive.DEFAULT_CONTROL) -> LesionAnalysis:
  """The poster's analysis of one batch: pixel IG, layer IG, top-k active regions.

  1. Layer IG at L along the activation path (`layer_integrated_gradients`).
  2. Select the k most positive and k most negative channels (or units).
  3. One pass along the input path computes, per step and from one forward
     pass of to_layer, the pixel gradient of q and the gradients of the 2k
     read-outs (the individual active regions).
  4. The resultant maps are sum_k w_k region_k. With individual_regions=False,
     the 2k read-outs are first combined into two (`combine_cotangents`), so
     each step pulls back 3 cotangents instead of 2k + 1.

  Args:
    to_layer, from_layer: the model split at L; from_layer returns the quantity [N].
    x, baseline: the inputs [N, ...] and the baseline (half gray).
    k: neurons of each sign.
    by: "channel" (activation summed over positions) or "unit".
    individual_regions: whether to return the 2k individual regions.
    steps, method, chunk_size: as for `integrated_gradients` (both integrations;
      None picks each pass's default, see `active_regions`).
    channel_axis: the channel axis of the activations.
    tolerance, max_steps, control: with steps="auto" (both passes error-controlled): the
      layer pass as `layer_integrated_gradients`; in the pixel pass an image
      converges when q's pixel IG and every read-out meet the tolerance, the
      read-outs' completeness being cotangent . (to_layer(x) - to_layer(b)).
      Units are then integrated on the whole image, not on crops.

  Returns:
    A LesionAnalysis.
  """
  if by not in ("channel", "unit"):
    raise AttributionArgumentError(f"by must be 'channel' or 'unit', got {by!r}")
  check_integration_arguments(steps, tolerance, max_steps, control)
  auto = adaptive.is_auto(steps)
  x = as_batch(x)
  baseline = check_baseline(baseline, x)
  layer = layer_lib.layer_integrated_gradients(
      to_layer, from_layer, x, baseline, steps=steps, method=method, chunk_size=chunk_size,
      channel_axis=channel_axis, tolerance=tolerance, max_steps=max_steps, control=control)
  layer_shape = layer.activations.shape[1:]
  if by == "channel":
    top = select_top_k(layer.channels, k)
    make = lambda idx: channel_cotangents(layer_shape, idx, channel_axis)
  else:
    top = select_top_k(layer.units, k)
    make = lambda idx: unit_cotangents(layer_shape, idx)
  weights = jnp.concatenate([jnp.maximum(top.positive_scores, 0),
                             jnp.minimum(top.negative_scores, 0)], axis=1)
  if by == "unit" and x.ndim == 4 and len(layer_shape) == 3 and not auto:
    units = np.stack(np.unravel_index(np.asarray(jnp.concatenate([top.positive, top.negative],
                                                                 axis=1)), layer_shape), -1)
    plan = receptive_field.plan_unit_crops(to_layer, x, baseline, units)
    if plan is not None and plan.exact.all():
      return _unit_lesion_detection(to_layer, from_layer, x, baseline, layer, top, weights,
                                    plan, k=k, individual_regions=individual_regions,
                                    steps=steps, method=method, chunk_size=chunk_size)
  cotangents = jnp.concatenate([make(top.positive), make(top.negative)], axis=1)
  if not individual_regions:
    cotangents = jnp.concatenate([combine_cotangents(cotangents[:, :k], weights[:, :k]),
                                  combine_cotangents(cotangents[:, k:], weights[:, k:])], axis=1)
  operands = (to_layer, from_layer, cotangents)
  steps_used = converged = map_error = None
  if auto:
    attributions, gaps, steps_used, converged, map_error = _adaptive_readouts(
        _pixels_and_readouts_values, operands, x, baseline, cotangents.shape[1] + 1,
        tolerance=tolerance, max_steps=max_steps, chunk_size=chunk_size, control=control)
  else:
    alphas, rule_weights = quadrature(method, steps)
    integral = path_sum(_pixels_and_readouts, operands, baseline, x, alphas, rule_weights,
                        chunk_size=_readout_chunk(chunk_size, steps, x.shape[0],
                                                  cotangents.shape[1] + 1))
    attributions, gaps = _finish_analysis(Operands(operands), x, baseline, integral)
  pixels, regions = attributions[:, 0], attributions[:, 1:]
  if individual_regions:
    positive, negative = regions[:, :k], regions[:, k:]
    w = weights.reshape(weights.shape + (1,) * (regions.ndim - 2))
    positive_resultant = jnp.sum(positive * w[:, :k], axis=1)
    negative_resultant = jnp.sum(negative * w[:, k:], axis=1)
  else:
    positive = negative = None
    positive_resultant, negative_resultant = regions[:, 0], regions[:, 1]
  return LesionAnalysis(pixels, gaps[:, 0], layer, top, positive, negative, positive_resultant,
                        negative_resultant, gaps[:, 1:], steps_used, converged, map_error)


def _compose(to_layer, from_layer, x):
  return from_layer(to_layer(x))


def _unit_lesion_detection(to_layer, from_layer, x, baseline, layer, top, weights, plan, *, k,
                           individual_regions, steps, method, chunk_size) -> LesionAnalysis:
  """lesion_detection for units whose crops are exact: pixel IG on the whole image,
  the 2k active regions on their crops, the resultants as weighted sums of them."""
  quantity = jax.tree_util.Partial(_compose, to_layer, from_layer)
  pixels, pixel_gap = integrated_gradients(quantity, x, baseline, steps=steps, method=method,
                                           chunk_size=chunk_size)
  regions = _regions_on_crops(to_layer, x, baseline, plan, steps=steps, method=method,
                              chunk_size=None)
  w = weights.reshape(weights.shape + (1,) * (regions.regions.ndim - 2))
  positive_resultant = jnp.sum(regions.regions[:, :k] * w[:, :k], axis=1)
  negative_resultant = jnp.sum(regions.regions[:, k:] * w[:, k:], axis=1)
  positive = regions.regions[:, :k] if individual_regions else None
  negative = regions.regions[:, k:] if individual_regions else None
  return LesionAnalysis(pixels, pixel_gap, layer, top, positive, negative, positive_resultant,
                        negative_resultant, regions.gap)
