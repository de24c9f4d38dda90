"""One shard's attribution: every quantity's maps, top neurons and scores for a batch.

``ShardAttributor(config, loaded, mesh)`` holds the model on the local devices
(images split over ``mesh``, weights replicated); called on a padded batch of
uint8 images it returns the shard's arrays (docs/analysis.md lists the keys),
maps encoded as ``drig.analysis.shards.encode_map`` stores them.
``path_chunk`` and ``batch_groups`` size each model call. Methods over a
distribution of baselines (expected_gradients, gradient_shap) integrate from
the job's baseline images (``drig.analysis.images.load_baseline_distribution``,
loaded once per job and passed in), replicated on the local devices.
"""

from __future__ import annotations

import functools
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from drig import grading
from drig import parallel
from drig import prng
from drig.analysis import localization
from drig.analysis import unit_types as unit_types_lib
from drig.analysis.errors import AnalysisError
from drig.analysis.model_source import LoadedModel, ModelLogits
from drig.analysis.quantity_specs import make_quantity, parse_quantity
from drig.analysis.shards import decode_map, encode_map, method_map_key
from drig.attribution import baselines as baselines_lib
from drig.attribution import gradients as gradients_lib
from drig.attribution import adaptive as adaptive_lib
from drig.attribution import integration as ig_lib
from drig.attribution import methods as methods_lib
from drig.attribution import layer as layer_lib
from drig.attribution import regions as active_regions_lib

# The random control map's seed is seed * this + the image's index: one map per image.
_RANDOM_MAP_SEED_STRIDE = 1_000_003


def path_chunk(config_chunk: int, steps: int, num_images: int) -> int:
  """Path points per image per call: the config's, or about the backend's default
  points per call with the least padding (`default_chunk_size`)."""
  if config_chunk > 0:
    return min(config_chunk, steps)
  return ig_lib.default_chunk_size(steps, num_images)


def batch_groups(config_groups: int, chunk: int, num_images: int, num_devices: int) -> int:
  """Parts each model call's batch is split into (`drig.attribution.integration.BatchGroups`).

  The config's if positive. Automatic (0): the backend's groups per call (2 on CPUs,
  1 on accelerators) when the engine cannot split along the path (one path point per
  image per call), each part keeps at least 2 images, and the batch is on one device
  (a sharded batch is not split); otherwise 1.
  """
  if config_groups > 0:
    return config_groups
  groups = ig_lib.default_groups_per_call()
  if chunk > 1 or num_devices > 1 or num_images < 2 * groups:
    return 1
  return groups


def attribution_key(seed: int, indices: np.ndarray) -> jax.Array:
  """The random key of a batch's attributions: the seed's, folded with its first image's index.

  A batch's random baselines and noise then depend on its images, not on the
  order in which shards (or hosts) are attributed.
  """
  real = np.asarray(indices)[np.asarray(indices) >= 0]
  first = int(real[0]) if real.size else 0
  return prng.named_key(jax.random.PRNGKey(seed), "attribution", first)


def integration_arguments(config, chunk: int) -> dict:
  """lesion_detection's integration keywords: fixed config.steps, or with
  config.tolerance > 0 error-controlled ("auto") to that relative gap (and with
  config.error_control "map" each map's error), at most config.max_steps evaluations
  per image (config.chunk_size > 0: points per call)."""
  if config.tolerance > 0:
    return dict(steps="auto", tolerance=config.tolerance, max_steps=config.max_steps,
                control=config.error_control,
                chunk_size=config.chunk_size if config.chunk_size > 0 else None)
  return dict(steps=config.steps, method=config.method, chunk_size=chunk)


def job_method_options(config, name: str) -> Optional[dict]:
  """The job's options for method ``name``: those built on IG (expected gradients, noise
  tunnels of IG) integrate each path at config.steps with config.method, as the job's
  fixed-step pixel IG does; other methods keep their defaults (None).

  Error control (config.tolerance) applies to the pixel IG and its read-outs only: a
  path average of K baselines or noise draws is not one integral to bound.
  """
  defaults = methods_lib.METHODS[name].defaults
  if "steps" in defaults and "method" in defaults:
    return {"steps": config.steps, "method": config.method}
  return None


def accuracy_arrays(config, q: str, analysis, indices: np.ndarray) -> dict:
  """Per image: the pixel IG's relative completeness gap, steps used, converged flags and
  (control="map") its estimated relative map error, else NaN.

  relative gap: |gap| / |F(x) - F(baseline)| (F(x) - F(baseline) = sum(IG) - gap).
  With fixed steps, steps are config.steps and an image counts as converged when
  its relative gap is within 1% (drig.attribution.adaptive.DEFAULT_TOLERANCE).
  Images above tolerance (padding excluded) are logged.
  """
  def relative_gap(attributions, gap):
    gap = np.asarray(gap, np.float64)
    change = np.asarray(attributions, np.float64).reshape(gap.shape[0], -1).sum(axis=1) - gap
    return np.abs(gap) / np.maximum(np.abs(change), 1e-12)

  relative = relative_gap(analysis.pixels, analysis.pixel_gap)
  layer_relative = relative_gap(analysis.layer.units, analysis.layer.gap)
  n = relative.shape[0]
  if analysis.steps is None:
    pixel_steps = layer_steps = np.full((n,), config.steps, np.int32)
    pixel_converged = relative <= adaptive_lib.DEFAULT_TOLERANCE
    layer_converged = layer_relative <= adaptive_lib.DEFAULT_TOLERANCE
  else:
    pixel_steps, pixel_converged = np.asarray(analysis.steps), np.asarray(analysis.converged)
    layer_steps = np.asarray(analysis.layer.steps)
    layer_converged = np.asarray(analysis.layer.converged)
  real = np.asarray(indices) >= 0
  above = real & ~(pixel_converged & layer_converged)
  if above.any():
    # An image is listed when its pixel IG or its layer IG did not converge.
    logging.warning("%s: %d image(s) above the tolerance %g (indices %s; relative gaps of "
                    "pixel IG %s; of layer IG %s)", q, int(above.sum()),
                    config.tolerance if config.tolerance > 0 else adaptive_lib.DEFAULT_TOLERANCE,
                    np.asarray(indices)[above].tolist(),
                    ", ".join(f"{r:.3g}" for r in relative[above]),
                    ", ".join(f"{r:.3g}" for r in layer_relative[above]))
  return {f"pixel_relative_gap.{q}": relative.astype(np.float32),
          f"pixel_steps.{q}": np.asarray(pixel_steps, np.int32),
          f"pixel_converged.{q}": np.asarray(pixel_converged, bool),
          f"pixel_map_error.{q}": (np.full((n,), np.nan, np.float32)
                                   if analysis.map_error is None
                                   else np.asarray(analysis.map_error, np.float32)),
          f"layer_steps.{q}": np.asarray(layer_steps, np.int32),
          f"layer_converged.{q}": np.asarray(layer_converged, bool)}


@functools.partial(jax.jit, static_argnums=2)
def mean_over_baselines(quantity, baselines, num_images: int) -> jax.Array:
  """mean_k F(b_k) for each of ``num_images`` images, float32 [num_images].

  F may depend on the image (the "predicted" quantity reads each image's own
  grade), so each baseline is evaluated as a batch of num_images copies; one
  baseline at a time (lax.map) bounds memory by the batch.
  """
  def values(baseline):
    batch = jnp.broadcast_to(baseline, (num_images,) + baseline.shape)
    return quantity(batch).astype(jnp.float32)
  return jnp.mean(jax.lax.map(values, baselines), axis=0)


@jax.jit
def _evaluate(quantity, x):
  """F(x) in float32, [N]; ``quantity`` a pytree, so one program serves every batch."""
  return quantity(x).astype(jnp.float32)


def distribution_gap(attributions, quantity, x, baselines) -> np.ndarray:
  """Completeness of a method over a baseline distribution, per image, float32 [N].

  sum(attributions) - (F(x) - mean_k F(b_k)): expected gradients' mean of the K
  IG gaps (E[sum IG] = F(x) - E[F(b)]); for gradient_shap also its sampling error.
  """
  change = (np.asarray(_evaluate(quantity, x), np.float64)
            - np.asarray(mean_over_baselines(quantity, baselines, x.shape[0]), np.float64))
  attributions = np.asarray(attributions, np.float64)
  return (attributions.reshape(attributions.shape[0], -1).sum(axis=1) - change).astype(
      np.float32)


@jax.jit
def probabilities(logits_fn, x):
  """softmax(logits_fn(x)) in float32, [N, G]; ``logits_fn`` a pytree (e.g. ModelLogits)."""
  return jax.nn.softmax(logits_fn(x).astype(jnp.float32), axis=-1)


class ShardAttributor:
  """Attributes one padded batch of images on the local devices."""

  def __init__(self, config, loaded: LoadedModel, mesh,
               baseline_images: Optional[np.ndarray] = None):
    """Places the model (and any baseline distribution) on the mesh's devices.

    Args:
      config: the analysis config.
      loaded: the model and its weights.
      mesh: the local devices (images split over it, weights replicated).
      baseline_images: uint8 [K, H, W, 3], the baseline distribution of
        expected_gradients and gradient_shap (required when config.methods
        names one of them).
    """
    self.config = config
    self.mesh = mesh
    variables = parallel.replicate(loaded.variables, mesh)
    self.model = loaded.model
    self.variables = variables
    self.logits_fn = ModelLogits(loaded.model, variables)
    self.to_layer, self.from_layer = layer_lib.split_model(loaded.model, variables, config.layer)
    self.quantities = [parse_quantity(q) for q in config.quantities]
    # Pixel IG comes from the lesion analysis; the other methods are computed beside it.
    self.methods = [m for m in config.methods if m != "integrated_gradients"]
    self.baseline_distribution = None
    if baseline_images is not None:
      self.baseline_distribution = parallel.replicate(
          grading.to_model_input(np.asarray(baseline_images, np.uint8)), mesh)
    self.k = None

  def __call__(self, images: np.ndarray, indices: np.ndarray, field_of_view: np.ndarray,
               masks: Optional[list], predictions: Optional[np.ndarray] = None) -> dict:
    """Arrays for the batch (see docs/analysis.md); images uint8 [S, H, W, 3], padded.

    ``predictions`` (int [S]) replaces the model's own for the "predicted" quantity
    (the randomisation check attributes the trained model's grades).
    """
    config = self.config
    distributions = {name: self._distribution(name) for name in self.methods
                     if methods_lib.METHODS[name].distribution}
    x = parallel.shard_batch(grading.to_model_input(images), self.mesh)
    key = attribution_key(config.seed, indices)
    baseline = self._baseline(x, key)
    n = x.shape[0]
    chunk = path_chunk(config.chunk_size, config.steps, n)
    logits_fn, to_layer, from_layer = self.logits_fn, self.to_layer, self.from_layer
    groups = batch_groups(config.batch_groups, chunk, n, self.mesh.size)
    if groups > 1:  # Rows are independent: the parts give the same maps, sooner.
      logits_fn, to_layer, from_layer = (ig_lib.BatchGroups(fn, groups)
                                         for fn in (logits_fn, to_layer, from_layer))
    batch_probabilities = np.asarray(probabilities(logits_fn, x))
    if predictions is None:
      predictions = batch_probabilities.argmax(axis=-1).astype(np.int32)
    predictions = np.asarray(predictions, np.int32)
    out = {"probabilities": batch_probabilities, "prediction": predictions}
    if self.k is None:
      layer_shape = jax.eval_shape(to_layer, x).shape[1:]
      neurons = layer_shape[-1] if config.neurons == "channel" else int(np.prod(layer_shape))
      self.k = min(config.top_k, neurons)
      if self.k < config.top_k:
        logging.warning("layer %s has %d %ss: top_k %d -> %d", config.layer, neurons,
                        config.neurons, config.top_k, self.k)
    for spec in self.quantities:
      preds = parallel.replicate(jnp.asarray(predictions), self.mesh)
      layer_quantity = make_quantity(spec, from_layer, preds)
      # The individual regions only where the study's unit-type measure needs them.
      unit_types = (masks is not None and config.study.enabled
                    and config.study.get("unit_types", False)
                    and spec.key == parse_quantity(config.localization.quantity).key)
      analysis = active_regions_lib.lesion_detection(
          to_layer, layer_quantity, x, baseline, k=self.k, by=config.neurons,
          individual_regions=unit_types, **integration_arguments(config, chunk))
      if unit_types:
        out.update(unit_types_lib.shard_unit_arrays(
            np.asarray(analysis.positive_regions), analysis.top.positive,
            analysis.top.positive_scores, analysis.layer.channels.shape[-1], masks,
            field_of_view, quantity=spec.key, layer=config.layer, neurons=config.neurons))
      quantity = make_quantity(spec, logits_fn, preds)
      # drig.attribution.gradients' program: shared with the gradient methods below.
      gradient = gradients_lib.gradient(quantity, x)
      q = spec.key
      stored = {
          f"pixel_ig.{q}": analysis.pixels,
          f"positive_resultant.{q}": jnp.sum(analysis.positive_resultant, axis=-1),
          f"negative_resultant.{q}": jnp.sum(analysis.negative_resultant, axis=-1),
          f"gradient.{q}": gradient,
      }
      gaps = {}
      for name in self.methods:
        stored[method_map_key(name, q)] = methods_lib.attribute(
            name, quantity=quantity, x=x, baseline=distributions.get(name, baseline), key=key,
            split_model=(to_layer, layer_quantity), options=job_method_options(config, name))
        if name in distributions:
          gaps[f"map_gap.{name}.{q}"] = distribution_gap(
              stored[method_map_key(name, q)], quantity, x, self.baseline_distribution)
      for key_name, value in stored.items():
        out[key_name], out[f"{key_name}.scale"] = encode_map(np.asarray(value),
                                                             config.storage_dtype)
      out[f"pixel_gap.{q}"] = np.asarray(analysis.pixel_gap, np.float32)
      out.update(gaps)
      out.update(accuracy_arrays(config, q, analysis, indices))
      out[f"layer_channels.{q}"] = np.asarray(analysis.layer.channels, np.float32)
      out[f"layer_gap.{q}"] = np.asarray(analysis.layer.gap, np.float32)
      out[f"top_positive.{q}"] = np.asarray(analysis.top.positive, np.int32)
      out[f"top_positive_scores.{q}"] = np.asarray(analysis.top.positive_scores, np.float32)
      out[f"top_negative.{q}"] = np.asarray(analysis.top.negative, np.int32)
      out[f"top_negative_scores.{q}"] = np.asarray(analysis.top.negative_scores, np.float32)
      out[f"region_gaps.{q}"] = np.asarray(analysis.region_gaps, np.float32)
      if masks is not None and q == parse_quantity(config.localization.quantity).key:
        out.update(self._localization(out, q, indices, field_of_view, masks))
    return out

  def _distribution(self, name: str) -> baselines_lib.BaselineDistribution:
    """The job's baseline distribution for method ``name``; AnalysisError if none was given."""
    if self.baseline_distribution is None:
      raise AnalysisError(
          f"method {name!r} averages over a distribution of baselines: pass baseline_images "
          "(drig.analysis.images.load_baseline_distribution) to ShardAttributor")
    return baselines_lib.BaselineDistribution(self.baseline_distribution)

  def _baseline(self, x, key):
    """config.baseline for the batch: replicated if shared, split like x if per image."""
    baseline = baselines_lib.resolve_baseline(self.config.baseline, x,
                                              key=prng.named_key(key, "baseline"))
    if baseline.shape[0] == 1:
      return parallel.replicate(baseline, self.mesh)
    return jax.device_put(baseline, parallel.batch_sharding(self.mesh))

  def _localization(self, out, q, indices, field_of_view, masks) -> dict:
    """Per image: method x lesion x metric scores (NaN where a mask is empty)."""
    pixel = decode_map(out, f"pixel_ig.{q}")
    positive = decode_map(out, f"positive_resultant.{q}")
    gradient = decode_map(out, f"gradient.{q}")
    method_maps = {name: decode_map(out, method_map_key(name, q)) for name in self.methods}
    rows = []
    names = None
    for i, image_masks in enumerate(masks):
      if image_masks is None:  # padding
        rows.append(None)
        continue
      shape = pixel.shape[1:3]
      seed = self.config.seed * _RANDOM_MAP_SEED_STRIDE + int(indices[i])
      maps = {
          "pixel_ig": localization.saliency(pixel[i], mode="positive"),
          "active_regions": localization.saliency(positive[i], mode="positive"),
          "gradient": localization.saliency(gradient[i], mode="absolute"),
      }
      for name in self.methods:
        maps.update(localization.method_maps(
            name, method_maps[name][i], signed=methods_lib.is_signed(name)))
      maps["random"] = localization.random_map(seed, shape)
      scores = localization.score_maps(maps, image_masks, field_of_view)
      if names is None:
        methods = list(scores)
        lesions = list(scores[methods[0]])
        metrics = list(scores[methods[0]][lesions[0]])
        names = (methods, lesions, metrics)
      methods, lesions, metrics = names
      rows.append(np.array([[[scores[m][l][k] for k in metrics] for l in lesions]
                            for m in methods], np.float32))
    methods, lesions, metrics = names
    filled = [r if r is not None else np.full_like(rows[0] if rows[0] is not None else
                                                   np.zeros((len(methods), len(lesions),
                                                             len(metrics)), np.float32), np.nan)
              for r in rows]
    return {f"localization.{q}": np.stack(filled),
            "localization_methods": np.array(methods),
            "localization_lesions": np.array(lesions),
            "localization_metrics": np.array(metrics)}
