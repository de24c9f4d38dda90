"""Lesion localisation scores for heat maps.

One concept: how well a heat map points at marked pixels (lesion masks).

Does a heat map point at the lesions an expert (or the synthetic generator)
marked? Three scores, each restricted to the retina's field of view (FOV; for
drig's preprocessed images ``drig.preprocess.field_of_view(size)``, the 90%
disc) so that the half-gray surround counts neither way:

* ``pointing_game`` (Zhang et al., 2016): is the map's maximum on a lesion?
* ``relevance_mass`` (Arras et al., 2022, "relevance mass accuracy"): the share
  of the map's positive relevance that falls on lesions.
* ``pixel_auroc``: how well the map's values rank lesion pixels above the rest
  (ROC AUC, i.e. the Mann-Whitney U statistic with average ranks for ties).
* ``relevance_rank`` (Arras et al., 2022, "relevance rank accuracy"): the share
  of the map's top-K pixels that lie on the lesion, K the lesion's pixel count.

Chance levels, for a map unrelated to the mask: pointing game and relevance
mass about the lesion's share of the FOV, AUROC 0.5. ``random_map`` is that
control. ``rank_correlation`` compares two maps (the model-randomisation check,
``drig.analysis.randomisation``, compares maps before and after).

All scoring functions take numpy (or jax) arrays and return Python floats; a
score that is undefined (no lesion pixel in the FOV, say) is ``nan``, and
``summarise`` leaves such images out of that lesion's statistics.
``score_table`` gives ``score_maps``' numbers as one array, each map ranked once
for all masks (the lesion study scores dozens of maps x masks per image).

Example::

  fov = preprocess.field_of_view(256)
  maps = {"pixel_ig": saliency(attributions), "random": random_map(0, (256, 256))}
  scores = score_maps(maps, example_masks, field_of_view=fov)   # one image
  table = summary_markdown(summarise([scores, ...]))
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np

MODES = ("positive", "absolute", "signed")
METRICS = ("pointing_game", "relevance_mass", "pixel_auroc")
# Every score score_maps can compute (the lesion study asks for all of them).
ALL_METRICS = ("pointing_game", "relevance_mass", "relevance_rank", "pixel_auroc")
TIES = ("expected", "any", "all")


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


def method_maps(name: str, attributions, *, signed: bool) -> dict[str, np.ndarray]:
  """One method's attributions for one image as the saliency maps it is scored by.

  Like for like across methods: a signed method's map counts by its positive
  part (evidence for the quantity, as pixel IG) and, as a second entry, by its
  absolute value (as the gradient is usually shown); an unsigned method's map
  (e.g. SmoothGrad-squared, VarGrad, Captum's Saliency), already >= 0, counts
  as it is, which is both its positive part and its absolute value.

  Args:
    name: the method's name (the key of its first map).
    attributions: [H, W, C] (channels summed first) or [H, W].
    signed: whether the method's values carry a sign.

  Returns:
    {name: map} and, for signed methods, {f"{name} (absolute)": |map|}; float32 [H, W].
  """
  if not signed:
    return {name: saliency(attributions, mode="signed")}
  return {name: saliency(attributions, mode="positive"),
          f"{name} (absolute)": saliency(attributions, mode="absolute")}


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


def relevance_rank(saliency_map, mask, field_of_view=None) -> float:
  """Share of the map's top-K pixels inside the FOV that lie on the lesion, K = |mask & FOV|.

  Arras et al.'s relevance rank accuracy. Pixels tied at the K-th largest value
  share the remaining places equally (each counts (places left) / (tied
  pixels)), so the score does not depend on pixel order: a map equal to the
  mask scores 1.0 and a constant map scores K / |FOV|, its chance level.

  Args:
    saliency_map: [H, W] real values.
    mask: bool [H, W], the lesion's pixels.
    field_of_view: bool [H, W] or None (the whole image).

  Returns:
    A float in [0, 1]; nan when the mask has no pixel in the FOV.
  """
  values, mask, fov = _inside(saliency_map, mask, field_of_view)
  labels = mask[fov]
  k = int(labels.sum())
  if k == 0:
    return math.nan
  values = values[fov]
  threshold = np.partition(values, values.size - k)[values.size - k]  # the K-th largest
  above = values > threshold
  tied = values == threshold
  places_left = k - int(above.sum())
  hits = float(labels[above].sum()) + places_left * float(labels[tied].sum()) / int(tied.sum())
  return hits / k


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


_SCORES = {"pointing_game": pointing_game, "relevance_mass": relevance_mass,
           "relevance_rank": relevance_rank, "pixel_auroc": pixel_auroc}


def score_maps(maps: Mapping[str, Any], masks: Mapping[str, Any], field_of_view=None, *,
               mode: str = "positive", tolerance: int = 0,
               metrics: Sequence[str] = METRICS) -> dict[str, dict[str, dict]]:
  """Every localisation score of every map against every mask, for one image.

  Args:
    maps: method name -> [H, W] saliency map, or [H, W, C] attributions
      (collapsed with `saliency(map, mode)`).
    masks: lesion name -> bool [H, W] (e.g. an example's masks, keyed by
      drig.data.lesions.MASK_NAMES).
    field_of_view: bool [H, W] or None (the whole image).
    mode: how 3-D attribution maps are collapsed (see `saliency`); 2-D maps
      are used as they are.
    tolerance: the pointing game's tolerance in pixels.
    metrics: the scores to compute, names from ALL_METRICS, in this order.

  Returns:
    {method: {lesion: {metric: float}}} (by default "pointing_game",
    "relevance_mass" and "pixel_auroc"), nan where a score is undefined (e.g. a
    lesion absent from this image). Methods and lesions keep the input order.

  Raises:
    LocalizationInputError: an unknown metric, or a map or mask of the wrong shape.
  """
  unknown = [m for m in metrics if m not in _SCORES]
  if unknown:
    raise LocalizationInputError(f"score_maps: unknown metrics {unknown}; known: {ALL_METRICS}")
  scores = {}
  for method, value in maps.items():
    value = np.asarray(value)
    saliency_map = saliency(value, mode) if value.ndim == 3 and value.shape[-1] != 1 else value
    per_lesion = {}
    for lesion, mask in masks.items():
      try:
        per_lesion[lesion] = {
            metric: (pointing_game(saliency_map, mask, field_of_view, tolerance)
                     if metric == "pointing_game"
                     else _SCORES[metric](saliency_map, mask, field_of_view))
            for metric in metrics}
      except LocalizationInputError as e:
        raise LocalizationInputError(f"method {method!r}, lesion {lesion!r}: {e}") from None
    scores[method] = per_lesion
  return scores


def score_table(maps: Mapping[str, Any], masks: Mapping[str, Any], field_of_view=None, *,
                tolerance: int = 0, metrics: Sequence[str] = ALL_METRICS) -> np.ndarray:
  """``score_maps`` for many maps and masks at once, as an array: the same numbers, faster.

  Each map's ranks, maximum and positive total are computed once and reused for
  every mask (and each mask's dilation for every map), which makes the lesion
  study's dozens of maps x masks per image affordable at full resolution.

  Args:
    maps: name -> [H, W] saliency map (2-D; collapse attributions with `saliency`).
    masks: name -> bool [H, W].
    field_of_view: bool [H, W] or None (the whole image).
    tolerance: the pointing game's tolerance in pixels.
    metrics: names from ALL_METRICS, in the order of the last axis.

  Returns:
    float64 [len(maps), len(masks), len(metrics)], equal to
    ``score_maps(maps, masks, field_of_view, tolerance=tolerance, metrics=metrics)``
    (nan where a score is undefined).

  Raises:
    LocalizationInputError: an unknown metric, or a map or mask of the wrong shape.
  """
  unknown = [m for m in metrics if m not in _SCORES]
  if unknown:
    raise LocalizationInputError(f"score_table: unknown metrics {unknown}; known: {ALL_METRICS}")
  table = np.full((len(maps), len(masks), len(metrics)), np.nan)
  if not maps or not masks:
    return table
  prepared, shape = [], None
  for name, value in maps.items():
    try:
      values, _, fov = _inside(value, next(iter(masks.values())), field_of_view)
    except LocalizationInputError as e:
      raise LocalizationInputError(f"map {name!r}: {e}") from None
    if shape is not None and values.shape != shape:
      raise LocalizationInputError(f"map {name!r} has shape {values.shape}; the first has {shape}")
    shape = values.shape
    inside = values[fov]
    positive = np.maximum(inside, 0.0)
    prepared.append((inside, inside == inside.max() if inside.size else inside > 0,
                     positive, positive.sum(), average_ranks(inside),
                     np.sort(inside)[::-1]))
  for b, (name, mask) in enumerate(masks.items()):
    labels = _as_mask(mask, shape, f"mask {name!r}")
    inside_labels = labels[fov]
    n_pos = int(inside_labels.sum())
    if n_pos == 0:
      continue
    n_neg = inside_labels.size - n_pos
    hits = dilate(labels, tolerance)[fov] if "pointing_game" in metrics else None
    for a, (inside, at_max, positive, total, ranks, descending) in enumerate(prepared):
      for k, metric in enumerate(metrics):
        if metric == "pointing_game":
          score = float(hits[at_max].mean())
        elif metric == "relevance_mass":
          score = float(positive[inside_labels].sum() / total) if total > 0 else math.nan
        elif metric == "relevance_rank":
          threshold = descending[n_pos - 1]
          above = inside > threshold
          tied = inside == threshold
          score = (float(inside_labels[above].sum()) + (n_pos - int(above.sum()))
                   * float(inside_labels[tied].sum()) / int(tied.sum())) / n_pos
        else:  # pixel_auroc
          score = (math.nan if n_neg == 0 else float(
              (ranks[inside_labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)))
        table[a, b, k] = score
  return table


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
            "relevance_rank": "Relevance rank (top-|lesion| pixels on the lesion)",
            "pixel_auroc": "Pixel AUROC"}
  titles.update(metric_titles or {})
  methods = list(summary)
  lesions = _ordered_union(summary[m].keys() for m in methods)
  metrics = _ordered_union(summary[m][lesion].keys() for m in methods for lesion in summary[m])
  metrics = ([m for m in ALL_METRICS if m in metrics]
             + [m for m in metrics if m not in ALL_METRICS])
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
