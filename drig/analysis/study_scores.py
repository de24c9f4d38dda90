"""The lesion study's per-image scores, computed in the job beside each shard's maps.

``shard_study_arrays`` runs when ``config.study.enabled`` and the images have
masks. From one shard's stored maps (``drig.analysis.attributor``) it scores,
per image, every method's map and every control map (``drig.analysis.controls``)
against every lesion mask and their union ("any_lesion"), with every score of
``drig.analysis.localization.ALL_METRICS``; with ``config.study.faithfulness``
it also runs the deletion and insertion curves (``drig.analysis.faithfulness``)
of each method's map and of the contrast and random controls. The shard keeps
every per-image number, so ``drig.analysis.study`` recomputes every table from
the shards without attributing again.

Shard keys (S images): ``study.scores`` float32 [S, maps, masks, metrics] (NaN
where a score is undefined, e.g. a lesion absent from the image);
``study.deletion_area`` / ``study.insertion_area`` float32 [S, ranked maps];
``study.deletion_curve`` / ``study.insertion_curve`` float32 [S, ranked maps,
points]; ``study.names``, a 0-d JSON string with the axis names ("maps",
"masks", "metrics", "ranked", "fractions") and each map's "kind" (method,
control or method_absolute).
"""

from __future__ import annotations

import json
from typing import Optional

import jax.numpy as jnp
import numpy as np

from drig import grading
from drig import prng
from drig.analysis import controls
from drig.analysis import faithfulness
from drig.analysis import localization
from drig.analysis.attributor import attribution_key
from drig.analysis.quantity_specs import make_quantity, parse_quantity
from drig.analysis.shards import decode_map, method_map_key
from drig.attribution import baselines as baselines_lib
from drig.attribution import methods as methods_lib
from drig.data import lesions

ANY_LESION = "any_lesion"
NAMES_KEY = "study.names"
# The random maps' seeds: seed * stride + the image's index (one map per image), a
# stride apart from the attributor's random map so the two are different draws.
_SEED_STRIDE = 1_000_033
# The maps the job stores for every config besides config.methods: name -> shard key prefix.
_STORED_MAPS = {"pixel_ig": "pixel_ig", "active_regions": "positive_resultant",
                "gradient": "gradient"}


def method_map_names(config) -> list[str]:
  """The study's method names: pixel IG, the active regions, the gradient, config.methods."""
  return list(_STORED_MAPS) + [m for m in config.methods if m != "integrated_gradients"]


def _signed(name: str) -> bool:
  return name in _STORED_MAPS or methods_lib.is_signed(name)


def _decoded_maps(config, arrays: dict, q: str) -> dict[str, np.ndarray]:
  """Each method's stored maps [S, H, W(, C)] of quantity key q, as float32."""
  maps = {name: decode_map(arrays, f"{prefix}.{q}") for name, prefix in _STORED_MAPS.items()}
  for name in method_map_names(config)[len(_STORED_MAPS):]:
    maps[name] = decode_map(arrays, method_map_key(name, q))
  return maps


def score_masks(masks: dict) -> dict[str, np.ndarray]:
  """The masks the study scores: each lesion type, their union "any_lesion", the optic disc."""
  present = {name: np.asarray(masks[name], bool) for name in lesions.LESION_NAMES if name in masks}
  out = dict(present)
  if present:
    out[ANY_LESION] = np.logical_or.reduce(list(present.values()))
  for name in masks:
    if name not in out:
      out[name] = np.asarray(masks[name], bool)
  return out


def _ranking_maps(method_maps: dict[str, np.ndarray], contrast: np.ndarray,
                  random: np.ndarray) -> dict[str, np.ndarray]:
  """[S, H, W] maps whose order the faithfulness curves follow, highest first.

  Signed methods rank by their signed channel sum (the top is their positive part,
  then the rest down to the strongest evidence against), unsigned ones as they are.
  """
  ranked = {name: np.stack([localization.saliency(a, mode="signed") for a in maps])
            for name, maps in method_maps.items()}
  ranked["contrast"] = contrast
  ranked["random"] = random
  return ranked


def shard_study_arrays(config, logits_fn, batch: np.ndarray, indices: np.ndarray,
                       field_of_view: np.ndarray, masks: list, arrays: dict) -> dict:
  """The study's arrays for one padded shard (see the module docstring for the keys).

  Args:
    config: the analysis config (config.study, config.localization, config.baseline).
    logits_fn: the model's logits, a pytree (the attributor's ``logits_fn``).
    batch: uint8 [S, H, W, 3], the shard's padded images.
    indices: int [S], the images' indices (-1 for padding).
    field_of_view: bool [H, W].
    masks: per image its masks dict, None for padding.
    arrays: the attributor's arrays for the batch (its maps and "prediction").

  Returns:
    {key: array} to add to the shard.
  """
  q = parse_quantity(config.localization.quantity)
  x = grading.to_model_input(batch)
  key = attribution_key(config.seed, indices)
  baseline = np.asarray(baselines_lib.resolve_baseline(
      config.baseline, jnp.asarray(x), key=prng.named_key(key, "baseline")))
  contrast = controls.contrast_map(x, baseline)
  method_maps = _decoded_maps(config, arrays, q.key)
  tolerance = int(config.localization.get("tolerance", 0))
  # The axes are the data set's (every image has the same mask keys); an image whose
  # optic disc mask is empty scores NaN for that control.
  first = next((m for m in masks if m is not None), None)
  map_names, kinds = [], {}
  for name in method_maps:
    entries = list(localization.method_maps(name, np.zeros((1, 1)), signed=_signed(name)))
    map_names += entries
    kinds.update({n: ("method" if n == name else "method_absolute") for n in entries})
  for name in controls.CONTROL_MAPS:
    if name != controls.OPTIC_DISC or (first is not None and controls.OPTIC_DISC in first):
      map_names.append(name)
      kinds[name] = "control"
  mask_names = list(score_masks(first)) if first is not None else []
  metric_names = list(localization.ALL_METRICS)
  table = np.full((len(masks), len(map_names), len(mask_names), len(metric_names)), np.nan,
                  np.float32)
  for i, image_masks in enumerate(masks):
    if image_masks is None:
      continue
    maps = {}
    for name, values in method_maps.items():
      maps.update(localization.method_maps(name, values[i], signed=_signed(name)))
    seed = config.seed * _SEED_STRIDE + int(indices[i])
    maps.update(controls.control_maps(contrast[i], image_masks, seed))
    present = [m for m in map_names if m in maps]  # the disc control needs a disc
    scores = localization.score_table({m: maps[m] for m in present}, score_masks(image_masks),
                                      field_of_view, tolerance=tolerance, metrics=metric_names)
    table[i, [map_names.index(m) for m in present]] = scores
  out = {"study.scores": table}
  record = {"maps": map_names, "masks": mask_names, "metrics": metric_names,
            "kinds": [kinds[m] for m in map_names], "quantity": q.key}
  if config.study.faithfulness:
    out.update(_faithfulness_arrays(config, logits_fn, x, baseline, indices, method_maps,
                                    contrast, arrays["prediction"], q, record))
  out[NAMES_KEY] = np.array(json.dumps(record))
  return out


def _faithfulness_arrays(config, logits_fn, x, baseline, indices, method_maps, contrast,
                         predictions, q, record: dict) -> dict:
  """Deletion and insertion curves of every ranked map (methods, contrast, random)."""
  real = np.asarray(indices)[np.asarray(indices) >= 0]
  seed = config.seed * _SEED_STRIDE + (int(real[0]) if real.size else 0) + 1
  random = faithfulness.random_ranking(seed, *contrast.shape)
  ranked = _ranking_maps(method_maps, contrast, random)
  quantity = make_quantity(q, logits_fn, jnp.asarray(predictions))
  fractions = faithfulness.default_fractions(config.study.faithfulness_points)
  out = {}
  for mode in faithfulness.MODES:
    curves = [faithfulness.curves(quantity, jnp.asarray(x), jnp.asarray(baseline), maps,
                                  mode=mode, fractions=fractions,
                                  chunk_size=config.study.faithfulness_chunk)
              for maps in ranked.values()]
    out[f"study.{mode}_area"] = np.stack([c.area for c in curves], axis=1).astype(np.float32)
    out[f"study.{mode}_curve"] = np.stack([c.values for c in curves], axis=1).astype(np.float32)
  record["ranked"] = list(ranked)
  record["fractions"] = fractions.tolist()
  return out


def read_names(data: dict) -> Optional[dict]:
  """The study's axis names from merged shard arrays, or None without study scores."""
  if NAMES_KEY not in data:
    return None
  return json.loads(str(np.asarray(data[NAMES_KEY])))
