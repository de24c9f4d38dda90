"""Lesion localisation scores for heat maps, and the model-randomisation check.

Does a heat map point at the lesions an expert (or the synthetic generator)
marked? Three scores, each restricted to the retina's field of view (FOV; for
drig's preprocessed images ``drig.preprocess.field_of_view(size)``, the 90%
disc) so that the half-gray surround counts neither way:

* ``pointing_game`` (Zhang et al., 2016): is the map's maximum on a lesion?
* ``relevance_mass`` (Arras et al., 2022, "relevance mass accuracy"): the share
  of the map's positive relevance that falls on lesions.
* ``pixel_auroc``: how well the map's values rank lesion pixels above the rest
  (ROC AUC, i.e. the Mann-Whitney U statistic with average ranks for ties).

Chance levels, for a map unrelated to the mask: pointing game and relevance
mass about the lesion's share of the FOV, AUROC 0.5. ``random_map`` is that
control; ``randomise_variables`` gives the weights for Adebayo et al.'s (2018)
model-randomisation sanity check, compared with ``rank_correlation``.

All scoring functions take numpy (or jax) arrays and return Python floats; a
score that is undefined (no lesion pixel in the FOV, say) is ``nan``, and
``summarise`` leaves such images out of that lesion's statistics.

Example::

  fov = preprocess.field_of_view(256)
  maps = {"pixel_ig": saliency(attributions), "random": random_map(0, (256, 256))}
  scores = score_maps(maps, example_masks, field_of_view=fov)   # one image
  table = summary_markdown(summarise([scores, ...]))
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

MODES = ("positive", "absolute", "signed")
METRICS = ("pointing_game", "relevance_mass", "pixel_auroc")
TIES = ("expected", "any", "all")
# A size of at least 75 px runs every Inception-v3 layer; parameter shapes do not
# depend on it (global average pooling), so the smallest is the cheapest init.
DEFAULT_INIT_SHAPE = (1, 75, 75, 3)


class LocalizationInputError(ValueError):
  """A map, mask or field of view has the wrong shape or values."""


# ------------------------------------------------------------------------------
# Maps.


def saliency(attributions, mode: str = "positive") -> np.ndarray:
  """Collapses one image's attributions to a 2-D saliency map.

  Args:
    attributions: [H, W, C] (summed over channels) or [H, W], any real dtype.
    mode: "positive" keeps max(a, 0) (evidence for the quantity), "absolute"
      takes |a|, "signed" keeps a as it is. Channels are summed first, so
      opposite-signed channels of one pixel cancel.

  Returns:
    float32 [H, W].
  """
  if mode not in MODES:
    raise LocalizationInputError(f"saliency: mode must be one of {MODES}, got {mode!r}")
  a = np.asarray(attributions, np.float32)
  if a.ndim == 3:
    a = a.sum(axis=-1)
  elif a.ndim != 2:
    raise LocalizationInputError(
        f"saliency: expects one image's attributions [H, W(, C)], got shape {a.shape}")
  if mode == "positive":
    a = np.maximum(a, 0.0)
  elif mode == "absolute":
    a = np.abs(a)
  return a.astype(np.float32)


def random_map(seed: int, shape: Sequence[int]) -> np.ndarray:
  """The random control map: i.i.d. uniform [0, 1) values, float32 of `shape`.

  Deterministic in (seed, shape); the values are non-negative, so every score
  (relevance mass included) applies to it as to a positive saliency map.
  """
  return np.random.default_rng(seed).random(tuple(int(s) for s in shape), dtype=np.float32)


# ------------------------------------------------------------------------------
# Shared checks.


def _as_map(saliency_map, name: str = "saliency_map") -> np.ndarray:
  values = np.asarray(saliency_map)
  if values.ndim == 3 and values.shape[-1] == 1:
    values = values[..., 0]
  if values.ndim != 2:
    raise LocalizationInputError(f"{name} must be a 2-D map [H, W], got shape {values.shape}"
                                 " (collapse attributions with saliency())")
  if not (values.dtype == bool or np.issubdtype(values.dtype, np.number)) or np.iscomplexobj(
      values):
    raise LocalizationInputError(f"{name} must be real-valued, got dtype {values.dtype}")
  return values.astype(np.float64)


def _as_mask(mask, shape, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.shape != tuple(shape):
    raise LocalizationInputError(f"{name} has shape {mask.shape}; the map has {tuple(shape)}")
  if mask.dtype != bool:
    if not np.isin(mask, (0, 1, 255)).all():
      raise LocalizationInputError(
          f"{name} must be boolean (or 0/1, 0/255), got values like {np.unique(mask)[:5]}")
    mask = mask != 0
  return mask


def _inside(saliency_map, mask, field_of_view):
  """float64 map, bool mask, bool FOV, all [H, W]; checks finiteness in the FOV."""
  values = _as_map(saliency_map)
  mask = _as_mask(mask, values.shape, "mask")
  fov = (np.ones(values.shape, bool) if field_of_view is None
         else _as_mask(field_of_view, values.shape, "field_of_view"))
  if not np.isfinite(values[fov]).all():
    raise LocalizationInputError("saliency_map has non-finite values inside the field of view")
  return values, mask, fov


def _disc_offsets(radius: int) -> np.ndarray:
  r = np.arange(-radius, radius + 1)
  return (r[:, None] ** 2 + r[None, :] ** 2 <= radius ** 2).astype(np.uint8)


def dilate(mask, tolerance: int) -> np.ndarray:
  """bool [H, W]: pixels within Euclidean distance `tolerance` px of the mask."""
  mask = np.asarray(mask, bool)
  if isinstance(tolerance, bool) or not isinstance(tolerance, (int, np.integer)) or tolerance < 0:
    raise LocalizationInputError(f"tolerance must be an int >= 0 (pixels), got {tolerance!r}")
  if tolerance == 0:
    return mask.copy()
  import cv2  # pylint: disable=g-import-not-at-top
  return cv2.dilate(mask.astype(np.uint8), _disc_offsets(int(tolerance))).astype(bool)


# ------------------------------------------------------------------------------
# Scores.


def pointing_game(saliency_map, mask, field_of_view=None, tolerance: int = 0, *,
                  ties: str = "expected") -> float:
  """Whether the map's maximum inside the field of view lies on the lesion.

  Args:
    saliency_map: [H, W] real values (e.g. from `saliency`).
    mask: bool [H, W], the lesion's pixels (0/1 or 0/255 integers accepted).
    field_of_view: bool [H, W] or None (the whole image). Only pixels inside
      it compete for the maximum.
    tolerance: a hit may miss the mask by up to this many pixels (Euclidean;
      the mask is dilated by a disc of this radius; Zhang et al. use 15 px at
      224 px).
    ties: how several pixels sharing the maximum value are scored:
      "expected" (default): the fraction of them that are hits, i.e. the
        expected score when the tie is broken uniformly at random. A map
        without ties scores exactly 0.0 or 1.0, and a constant map scores the
        (dilated) mask's share of the FOV, its chance level, rather than a
        free hit.
      "any": 1.0 if any tied maximum is a hit (lenient).
      "all": 1.0 only if every tied maximum is a hit (strict).

  Returns:
    A float in [0, 1] (0.0 or 1.0 without ties); nan when the mask has no
    pixel inside the field of view (or the field of view is empty).
  """
  if ties not in TIES:
    raise LocalizationInputError(f"pointing_game: ties must be one of {TIES}, got {ties!r}")
  values, mask, fov = _inside(saliency_map, mask, field_of_view)
  if not (mask & fov).any():
    return math.nan
  hits = dilate(mask, tolerance)[fov]
  values = values[fov]
  at_max = values == values.max()
  hit_share = float(hits[at_max].mean())
  if ties == "expected":
    return hit_share
  if ties == "any":
    return float(hit_share > 0)
  return float(hit_share == 1.0)


def relevance_mass(saliency_map, mask, field_of_view=None) -> float:
  """Share of the map's positive relevance inside the FOV that lies on the lesion.

  Arras et al.'s relevance mass accuracy: sum of max(R, 0) over mask & FOV
  divided by the sum of max(R, 0) over the FOV. Negative values count as zero
  (they are evidence against the quantity, not relevance to be located).

  Args:
    saliency_map: [H, W] real values.
    mask: bool [H, W], the lesion's pixels.
    field_of_view: bool [H, W] or None (the whole image).

  Returns:
    A float in [0, 1]; nan when the mask has no pixel in the FOV or the map
    has no positive value there.
  """
  values, mask, fov = _inside(saliency_map, mask, field_of_view)
  if not (mask & fov).any():
    return math.nan
  positive = np.maximum(values, 0.0)
  total = positive[fov].sum()
  if not total > 0:
    return math.nan
  return float(positive[mask & fov].sum() / total)


def average_ranks(values) -> np.ndarray:
  """1-based ranks of a 1-D array, tied values sharing their average rank (float64)."""
  values = np.asarray(values).ravel()
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  last = np.cumsum(counts)  # the highest rank in each group of equal values
  return (last - (counts - 1) / 2.0)[inverse].astype(np.float64)


def pixel_auroc(saliency_map, mask, field_of_view=None) -> float:
  """ROC AUC of the map's values as scores for lesion against non-lesion pixels.

  Computed from ranks (the Mann-Whitney U statistic divided by n_pos * n_neg),
  with tied values sharing their average rank, so a tie between a lesion and a
  background pixel counts one half: equal to
  ``sklearn.metrics.roc_auc_score(mask[fov], saliency_map[fov])``.

  Args:
    saliency_map: [H, W] real values.
    mask: bool [H, W], the lesion's pixels (the positive class).
    field_of_view: bool [H, W] or None (the whole image); only its pixels count.

  Returns:
    A float in [0, 1] (0.5 is chance); nan when the FOV has no lesion pixel
    or no background pixel.
  """
  values, mask, fov = _inside(saliency_map, mask, field_of_view)
  labels = mask[fov]
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return math.nan
  ranks = average_ranks(values[fov])
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def rank_correlation(map_a, map_b, field_of_view=None) -> float:
  """Spearman rank correlation of two maps over the FOV's pixels.

  The Pearson correlation of their average ranks (as scipy.stats.spearmanr).
  Use it on maps of the same mode (e.g. both `saliency(..., "absolute")`, as
  Adebayo et al. do) to compare attributions before and after randomisation.

  Args:
    map_a, map_b: [H, W] real values, the same shape.
    field_of_view: bool [H, W] or None (the whole image).

  Returns:
    A float in [-1, 1]; nan if either map is constant over the FOV or the FOV
    has fewer than two pixels.
  """
  a = _as_map(map_a, "map_a")
  b = _as_map(map_b, "map_b")
  if a.shape != b.shape:
    raise LocalizationInputError(f"map_a {a.shape} and map_b {b.shape} differ in shape")
  fov = (np.ones(a.shape, bool) if field_of_view is None
         else _as_mask(field_of_view, a.shape, "field_of_view"))
  a, b = a[fov], b[fov]
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise LocalizationInputError("rank_correlation: non-finite values inside the field of view")
  if a.size < 2:
    return math.nan
  ra = average_ranks(a) - (a.size + 1) / 2.0
  rb = average_ranks(b) - (b.size + 1) / 2.0
  denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
  if denominator == 0:
    return math.nan
  return float(np.clip(float(ra @ rb) / denominator, -1.0, 1.0))


def score_maps(maps: Mapping[str, Any], masks: Mapping[str, Any], field_of_view=None, *,
               mode: str = "positive", tolerance: int = 0) -> dict[str, dict[str, dict]]:
  """Every localisation score of every map against every mask, for one image.

  Args:
    maps: method name -> [H, W] saliency map, or [H, W, C] attributions
      (collapsed with `saliency(map, mode)`).
    masks: lesion name -> bool [H, W] (e.g. an example's masks, keyed by
      drig.data.datasets.MASK_NAMES).
    field_of_view: bool [H, W] or None (the whole image).
    mode: how 3-D attribution maps are collapsed (see `saliency`); 2-D maps
      are used as they are.
    tolerance: the pointing game's tolerance in pixels.

  Returns:
    {method: {lesion: {"pointing_game": float, "relevance_mass": float,
    "pixel_auroc": float}}}, nan where a score is undefined (e.g. a lesion
    absent from this image). Methods and lesions keep the input order.
  """
  scores = {}
  for method, value in maps.items():
    value = np.asarray(value)
    saliency_map = saliency(value, mode) if value.ndim == 3 and value.shape[-1] != 1 else value
    per_lesion = {}
    for lesion, mask in masks.items():
      try:
        per_lesion[lesion] = {
            "pointing_game": pointing_game(saliency_map, mask, field_of_view, tolerance),
            "relevance_mass": relevance_mass(saliency_map, mask, field_of_view),
            "pixel_auroc": pixel_auroc(saliency_map, mask, field_of_view),
        }
      except LocalizationInputError as e:
        raise LocalizationInputError(f"method {method!r}, lesion {lesion!r}: {e}") from None
    scores[method] = per_lesion
  return scores


def _ordered_union(keys: Iterable[Iterable[str]]) -> list[str]:
  seen = {}
  for group in keys:
    for key in group:
      seen.setdefault(key, None)
  return list(seen)


def summarise(per_image_scores: Sequence[Mapping], *, ddof: int = 1) -> dict:
  """Mean, standard deviation and count of each score over images, ignoring nan.

  Args:
    per_image_scores: one `score_maps` result per image. Methods, lesions and
      metrics may differ between images; the union is summarised.
    ddof: delta degrees of freedom of the standard deviation (1: the sample
      standard deviation).

  Returns:
    {method: {lesion: {metric: {"mean": float, "std": float, "count": int}}}}:
    "count" is the number of images whose score is not nan (images without
    that lesion do not count); "mean" is nan when count is 0, and "std" is nan
    when count <= ddof. Orders follow first appearance.
  """
  summary = {}
  methods = _ordered_union(scores.keys() for scores in per_image_scores)
  for method in methods:
    rows = [scores.get(method, {}) for scores in per_image_scores]
    summary[method] = {}
    for lesion in _ordered_union(row.keys() for row in rows):
      cells = [row.get(lesion, {}) for row in rows]
      summary[method][lesion] = {}
      for metric in _ordered_union(cell.keys() for cell in cells):
        values = np.array([cell.get(metric, math.nan) for cell in cells], np.float64)
        values = values[~np.isnan(values)]
        count = int(values.size)
        summary[method][lesion][metric] = {
            "mean": float(values.mean()) if count else math.nan,
            "std": float(values.std(ddof=ddof)) if count > ddof else math.nan,
            "count": count,
        }
  return summary


def _format_cell(stats: Mapping | None, digits: int) -> str:
  if not stats or not stats.get("count"):
    return "–"
  mean, std = stats["mean"], stats["std"]
  spread = "" if math.isnan(std) else f" ± {std:.{digits}f}"
  return f"{mean:.{digits}f}{spread} (n={stats['count']})"


def summary_markdown(summary: Mapping, *, digits: int = 3,
                     metric_titles: Mapping[str, str] | None = None) -> str:
  """Markdown tables of a `summarise` result: one per metric.

  Rows are lesion types, columns methods; a cell reads "mean ± std (n=count)",
  or "–" where no image had that lesion.

  Args:
    summary: the output of `summarise`.
    digits: decimals shown.
    metric_titles: optional headings per metric name.

  Returns:
    The tables as one string, each under a "### metric" heading.
  """
  titles = {"pointing_game": "Pointing game (hit rate)",
            "relevance_mass": "Relevance mass inside the lesion",
            "pixel_auroc": "Pixel AUROC"}
  titles.update(metric_titles or {})
  methods = list(summary)
  lesions = _ordered_union(summary[m].keys() for m in methods)
  metrics = _ordered_union(summary[m][lesion].keys() for m in methods for lesion in summary[m])
  metrics = [m for m in METRICS if m in metrics] + [m for m in metrics if m not in METRICS]
  blocks = []
  for metric in metrics:
    lines = [f"### {titles.get(metric, metric)}", "",
             "| lesion | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for lesion in lesions:
      cells = [_format_cell(summary[m].get(lesion, {}).get(metric), digits) for m in methods]
      lines.append(f"| {lesion} | " + " | ".join(cells) + " |")
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks) + "\n"


# ------------------------------------------------------------------------------
# Model randomisation (Adebayo et al., 2018).


def head_scope(model) -> tuple[str, ...]:
  """The top-level parameter names of a model's head (layers after pooling)."""
  if hasattr(model, "head_layer_names"):
    return tuple(model.head_layer_names())
  if getattr(model, "num_classes", None):  # a bare InceptionV3 with its ImageNet top
    return ("fc",)
  raise LocalizationInputError(f"{type(model).__name__} has no head to randomise")


def _flat(tree) -> dict[tuple[str, ...], Any]:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(_as_dict(tree))


def _as_dict(tree):
  if hasattr(tree, "unfreeze"):
    return tree.unfreeze()
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _prefixes(model, scope) -> list[tuple[str, ...]]:
  if scope == "all":
    return [()]
  if scope == "head":
    return [(name,) for name in head_scope(model)]
  if isinstance(scope, str):
    scope = (scope,)
  prefixes = [tuple(p for p in str(s).split("/") if p) for s in scope]
  if not prefixes or any(not p for p in prefixes):
    raise LocalizationInputError(f"scope must be 'all', 'head' or parameter paths, got {scope!r}")
  return prefixes


def _selected(path: tuple[str, ...], prefixes) -> bool:
  return any(path[:len(p)] == p for p in prefixes)


def _hashable(model) -> bool:
  try:
    hash(model)
    return True
  except TypeError:
    return False


def _init_fn(model, shape):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def init(key):
    return model.init({"params": key, "dropout": key}, jnp.zeros(shape, jnp.float32),
                      train=False)
  # One compiled program (XLA prunes the forward pass, whose output init drops).
  return jax.jit(init)


_cached_init_fn = functools.lru_cache(maxsize=8)(_init_fn)


def initial_variables(model, seed: int, *, input_shape: Sequence[int] | None = None) -> dict:
  """``model.init``'s variables for `seed`, as plain nested dicts.

  The key is ``jax.random.key(seed, impl="unsafe_rbg")``: Flax derives one key
  per parameter by splitting, and with the default threefry keys XLA:CPU took
  about 8x longer to compile Inception-v3's initialisation (184 s against 22 s
  for the tiny model on a loaded 2-core machine, measured once each). The bits
  differ from a threefry key's but have the same distributions, which is all
  a randomisation check needs. The compiled init is cached per (model, shape).

  Args:
    model: a Flax module taking (x, train=...), e.g. a DRClassifier.
    seed: an int; the same seed gives the same variables on the same backend.
    input_shape: the dummy input's shape, default DEFAULT_INIT_SHAPE.

  Returns:
    {"params": ..., "batch_stats": ...} of jax arrays.
  """
  import jax  # pylint: disable=g-import-not-at-top
  shape = tuple(int(d) for d in (input_shape or DEFAULT_INIT_SHAPE))
  init = _cached_init_fn(model, shape) if _hashable(model) else _init_fn(model, shape)
  return _as_dict(init(jax.random.key(int(seed), impl="unsafe_rbg")))


def _batch_stats_fn(model):
  """jit(variables, images, key -> every BatchNorm's batch statistics over images).

  A training-mode apply returns m * old + (1 - m) * batch for every running
  average; applies from old = 0 and old = 1 give (1 - m) * batch and, by their
  difference, m, whatever each layer's momentum m is.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def batch_stats(variables, images, key):
    def run(fill):
      stats = jax.tree.map(lambda a: jnp.full_like(a, fill), variables["batch_stats"])
      _, updates = model.apply({**variables, "batch_stats": stats}, images, train=True,
                               mutable=["batch_stats"], rngs={"dropout": key})
      return updates["batch_stats"]
    from_zero, from_one = run(0.0), run(1.0)
    return jax.tree.map(lambda z, o: z / (1.0 - (o - z)), from_zero, from_one)
  return jax.jit(batch_stats)


_cached_batch_stats_fn = functools.lru_cache(maxsize=8)(_batch_stats_fn)


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
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  fn = _cached_batch_stats_fn(model) if _hashable(model) else _batch_stats_fn(model)
  return _as_dict(fn(variables, jnp.asarray(images, jnp.float32), jax.random.key(int(seed))))


def randomise_variables(model, variables, seed: int, *, scope: Any = "all",
                        input_shape: Sequence[int] | None = None,
                        calibration_images=None) -> dict:
  """Re-initialised weights of the same structure, for the model-randomisation check.

  Adebayo et al. (2018): an explanation that does not change when the model's
  weights are replaced by random ones cannot be explaining the model. The new
  weights come from ``model.init`` with a fresh key (`initial_variables`: the
  model's own initialisers, He-scaled convolutions and LeCun dense layers), so
  they have the scale a network starts training with.

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
    input_shape: the dummy input for model.init; default (1, 75, 75, 3). The
      parameter shapes must not depend on it (true for drig's models).
    calibration_images: optional float32 [N, H, W, 3] model inputs in [-1, 1]
      to re-estimate the batch statistics of re-initialised BatchNorm layers.

  Returns:
    Variables with the same tree structure, shapes and dtypes as `variables`
    (plain nested dicts), with the selected parameters re-initialised.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  variables = _as_dict(variables)
  if "params" not in variables:
    raise LocalizationInputError(
        f"variables must hold 'params'; got collections {sorted(variables)}")
  prefixes = _prefixes(model, scope)
  param_paths = list(_flat(variables["params"]))
  unknown = ["/".join(p) for p in prefixes if not any(_selected(k, [p]) for k in param_paths)]
  if unknown:
    raise LocalizationInputError(f"randomise_variables: scope names no parameters: {unknown}")
  fresh = initial_variables(model, seed, input_shape=input_shape)

  result = {}
  for collection, tree in variables.items():
    if collection not in ("params", "batch_stats"):
      result[collection] = tree
      continue
    old, new = _flat(tree), _flat(fresh.get(collection, {}))
    if set(old) != set(new):
      missing = sorted("/".join(k) for k in set(new) - set(old))[:5]
      extra = sorted("/".join(k) for k in set(old) - set(new))[:5]
      raise LocalizationInputError(
          f"randomise_variables: the {collection} do not match {type(model).__name__}'s; "
          f"missing {missing}, unexpected {extra}")
    flat = {}
    for path, value in old.items():
      if not _selected(path, prefixes):
        flat[path] = value
        continue
      replacement = new[path]
      if replacement.shape != np.shape(value):
        raise LocalizationInputError(
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
