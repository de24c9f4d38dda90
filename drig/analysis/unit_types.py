"""Lesion-type specificity of the inspected layer's top units: do they tell lesion types apart?

One concept: per-image masses of each top unit's active region on each lesion type, to
per-unit enrichments with intervals, a specificity rule, tables, a matrix figure and
per-type maps.

The poster claims the inspected layer's units "distinguish different types of lesions".
Per image, for each of the top positive units (``drig.attribution.regions.lesion_detection``
with ``individual_regions=True``), ``shard_unit_arrays`` measures the share of its active
region's positive mass, inside the field of view, that lies on each lesion type's mask and
on their union ("any_lesion"), beside each type's share of the field of view's area. A unit
is grouped by its channel (its feature detector; with ``config.neurons="unit"`` the same
channel at another position is the same detector), so a channel can be a top unit in many
images (several positions of one channel in an image are pooled into one observation,
weighted by their masses: ``channel_shares``). ``unit_type_table`` aggregates over those
images:

* share: the mean of the unit's per-image shares on the type;
* enrichment: sum of shares / sum of area shares over the same images (a ratio of means,
  stable where single images have tiny lesions); 1 is what a unit spread evenly over the
  field of view gets;
* its percentile-bootstrap interval over images (``drig.statistics.resample_counts``) and
  n, the images where the cell is defined.

An image where the type has no pixels in the field of view, or where the unit's region has
no positive mass there, leaves that cell undefined (NaN) and out of n. Masks may overlap,
so one unit's shares over the types need not sum to 1.

``specific_type`` is the rule: a unit is specific to lesion type T when T's cell has at
least ``min_images`` images, the lower end of T's enrichment interval is above 1, and above
the enrichment of every other lesion type with a defined cell ("any_lesion" is not a rival:
it contains T). A tie therefore never makes a unit specific, and a unit is specific to at
most one type (two types' lower ends cannot each exceed the other's estimate).

``type_map_table`` scores the per-type maps: per image, the sum of the positive active
regions of that image's top units specific to T, weighted by their layer attributions,
against T's mask, beside the same sum over all its top units (the pooled map). The score
is the relevance mass (the map's positive mass on the mask over its mass in the field of
view); since every region enters by its positive part, the map's mass on a mask is the
weighted sum of the units' masses, so the shards' per-unit numbers give it exactly, without
storing the regions. The typed map beats the pooled one where the paired difference's
interval is above 0.

Shard keys (S images, k top units, M masks = lesion types + "any_lesion"):
``study.unit_channels`` int32 [S, k] (-1 for padding), ``study.unit_weights`` float32
[S, k] (layer attribution, clipped at 0 as in the resultant map), ``study.unit_mass``
float32 [S, k] (positive region mass in the field of view), ``study.unit_type_share``
float32 [S, k, M], ``study.type_area_share`` float32 [S, M] (NaN where the mask is empty),
and ``study.unit_types``, a 0-d JSON string {"types", "quantity", "layer", "neurons"}.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
import numpy as np

from drig import statistics
from drig.analysis import figures as figures_lib
from drig.analysis import localization
from drig.data import lesions

# The union of the lesion types (the name drig.analysis.study_scores gives it).
ANY_LESION = "any_lesion"
NAMES_KEY = "study.unit_types"
DEFAULT_MIN_IMAGES = 3
# Rows of the matrix figure and of the report's table at most: the most frequent units
# (every specific unit is listed whatever its rank).
MAX_UNITS_SHOWN = 20
# The matrix figure's diverging colours, centred on enrichment 1, per config.palette.
_COLOUR_MAPS = {"poster": "RdYlGn", "colorblind": "PuOr"}


class UnitTypesError(ValueError):
  """Unit arrays of inconsistent shapes, or masks without the study's lesion types."""


def mask_names(masks: Mapping[str, np.ndarray]) -> list[str]:
  """The masks the units are measured against: the lesion types present, then their union."""
  present = [name for name in lesions.LESION_NAMES if name in masks]
  return present + [ANY_LESION] if present else []


def _type_masks(masks: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
  """bool [M, H, W]: each named mask, "any_lesion" as the union of the lesion types."""
  types = [np.asarray(masks[n], bool) for n in names if n != ANY_LESION]
  union = np.logical_or.reduce(types) if types else None
  return np.stack([union if n == ANY_LESION else np.asarray(masks[n], bool) for n in names])


def image_unit_shares(regions, masks: Mapping[str, np.ndarray], field_of_view,
                      names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One image's units: positive mass, its share on each mask, each mask's area share.

  Args:
    regions: [k, H, W] or [k, H, W, C] the units' active regions (channels summed, then
      the positive part, as ``localization.saliency(mode="positive")``).
    masks: {name: bool [H, W]} the image's masks (every lesion type of ``names``).
    field_of_view: bool [H, W]; mass and areas are counted inside it.
    names: the masks' order (``mask_names``).

  Returns:
    (mass float64 [k], share float64 [k, M], area_share float64 [M]); a share is NaN
    where the unit has no positive mass in the field of view or the mask no pixel there,
    an area share NaN where the mask has no pixel there.

  Raises:
    UnitTypesError: shapes that do not match, or a named mask missing.
  """
  regions = np.asarray(regions)
  field_of_view = np.asarray(field_of_view, bool)
  if regions.ndim not in (3, 4) or regions.shape[1:3] != field_of_view.shape:
    raise UnitTypesError(f"regions must be [k, H, W(, C)] with H, W = the field of view's "
                         f"{field_of_view.shape}, got {regions.shape}")
  missing = [n for n in names if n != ANY_LESION and n not in masks]
  if missing:
    raise UnitTypesError(f"masks lack {missing} (have {sorted(masks)})")
  positive = np.stack([localization.saliency(r, mode="positive") for r in regions])
  positive = positive.astype(np.float64) * field_of_view
  inside = _type_masks(masks, names) & field_of_view  # [M, H, W]
  mass = positive.reshape(len(positive), -1).sum(axis=1)
  on_type = positive.reshape(len(positive), -1) @ inside.reshape(len(inside), -1).T.astype(
      np.float64)
  area = inside.reshape(len(inside), -1).sum(axis=1).astype(np.float64)
  fov_area = float(field_of_view.sum())
  if fov_area == 0:
    raise UnitTypesError("the field of view has no pixel")
  area_share = np.where(area > 0, area / fov_area, np.nan)
  with np.errstate(invalid="ignore", divide="ignore"):
    share = on_type / mass[:, None]
  share[(mass <= 0)[:, None] | ~(area > 0)[None, :]] = np.nan
  return mass, share, area_share


def shard_unit_arrays(positive_regions, top_positive, top_positive_scores, num_channels: int,
                      masks: list, field_of_view, *, quantity: str, layer: str,
                      neurons: str) -> dict:
  """The unit-type arrays of one padded shard (the module docstring lists the keys).

  Args:
    positive_regions: [S, k, H, W(, C)] the top positive units' active regions.
    top_positive: int [S, k] their indices (flat over the layer's [..., C] units, or channels).
    top_positive_scores: [S, k] their layer attributions.
    num_channels: the layer's channels C (a unit's channel is its flat index mod C).
    masks: per image its masks dict, None for padding.
    field_of_view: bool [H, W].
    quantity, layer, neurons: recorded with the mask names.

  Returns:
    {key: array} to add to the shard.
  """
  regions = np.asarray(positive_regions)
  top = np.asarray(top_positive, np.int64)
  s, k = top.shape
  first = next((m for m in masks if m is not None), None)
  names = mask_names(first) if first is not None else []
  channels = np.full((s, k), -1, np.int32)
  mass = np.full((s, k), np.nan, np.float32)
  share = np.full((s, k, len(names)), np.nan, np.float32)
  area = np.full((s, len(names)), np.nan, np.float32)
  for i, image_masks in enumerate(masks):
    if image_masks is None or not names:
      continue
    channels[i] = top[i] % num_channels
    mass[i], share[i], area[i] = image_unit_shares(regions[i], image_masks, field_of_view, names)
  record = {"types": names, "quantity": quantity, "layer": layer, "neurons": neurons}
  return {"study.unit_channels": channels,
          "study.unit_weights": np.maximum(np.asarray(top_positive_scores, np.float32), 0),
          "study.unit_mass": mass, "study.unit_type_share": share,
          "study.type_area_share": area, NAMES_KEY: np.array(json.dumps(record))}


def _ratio_interval(share: np.ndarray, area: np.ndarray, *, confidence: float,
                    num_resamples: int, seed: int) -> dict:
  """sum(share) / sum(area) over the images, its bootstrap interval and n."""
  n = len(share)
  if n == 0 or area.sum() <= 0:
    return {"enrichment": math.nan, "low": math.nan, "high": math.nan, "n": n}
  counts = statistics.resample_counts(n, num_resamples, seed).astype(np.float64)
  denominators = counts @ area
  with np.errstate(invalid="ignore", divide="ignore"):
    ratios = np.where(denominators > 0, (counts @ share) / denominators, np.nan)
  tail = 100 * (1 - confidence) / 2
  low, high = np.nanpercentile(ratios, [tail, 100 - tail])
  return {"enrichment": float(share.sum() / area.sum()), "low": float(low),
          "high": float(high), "n": n}


def specific_type(cells: Mapping[str, dict], *,
                  min_images: int = DEFAULT_MIN_IMAGES) -> Optional[str]:
  """The lesion type a unit is specific to, by the module docstring's rule, or None.

  Args:
    cells: {mask name: {"enrichment", "low", "high", "n"}} one unit's cells.
    min_images: the fewest images of T's cell.
  """
  rivals = {name: cell for name, cell in cells.items() if name != ANY_LESION}
  for name, cell in rivals.items():
    if cell["n"] < min_images or not cell["low"] > 1:
      continue
    others = [c["enrichment"] for other, c in rivals.items()
              if other != name and np.isfinite(c["enrichment"])]
    if all(cell["low"] > e for e in others):
      return name
  return None


def channel_shares(channels, share, mass=None) -> tuple[np.ndarray, np.ndarray]:
  """Per image, each channel's share on each mask: one observation per image and channel.

  With ``config.neurons="unit"`` one channel can be a top unit at several positions of
  an image; its positions' regions are pooled (shares weighted by their masses), so
  the bootstrap resamples images, not positions of one image.

  Args:
    channels: int [N, k] the top positive units' channels (-1: none).
    share: [N, k, M] each unit's share on each mask (NaN: undefined).
    mass: [N, k] the units' positive masses; None weighs the positions equally.

  Returns:
    (ids int [U], shares float64 [N, U, M]): the channels, by how many images have them
    (most first, ties by id), and their pooled shares (NaN where the channel is not a
    top unit of the image or no position's share is defined).
  """
  channels = np.asarray(channels)
  share = np.asarray(share, np.float64)
  weights = np.ones(channels.shape) if mass is None else np.nan_to_num(
      np.asarray(mass, np.float64))
  ids = np.unique(channels[channels >= 0])
  images = np.array([(channels == unit).any(axis=1).sum() for unit in ids], np.int64)
  ids = ids[np.argsort(-images, kind="stable")]
  out = np.full((channels.shape[0], len(ids), share.shape[-1]), np.nan)
  for u, unit in enumerate(ids):
    here = (channels == unit)[..., None] & np.isfinite(share)  # [N, k, M]
    w = weights[..., None] * here
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
      pooled = (w * np.nan_to_num(share)).sum(axis=1) / total
    out[:, u] = np.where(here.any(axis=1) & (total > 0), pooled, np.nan)
  return ids, out


def unit_type_table(channels, share, area_share, names: Sequence[str], *, mass=None,
                    confidence: float = statistics.DEFAULT_CONFIDENCE,
                    num_resamples: int = statistics.DEFAULT_NUM_RESAMPLES, seed: int = 0,
                    min_images: int = DEFAULT_MIN_IMAGES) -> dict:
  """Per unit (channel) and mask: mean share, enrichment with interval and n; specificity.

  Args:
    channels: int [N, k] the images' top positive units' channels (-1: none).
    share: [N, k, M] each unit's share of positive mass on each mask (NaN: undefined).
    area_share: [N, M] each mask's share of the field of view (NaN: empty mask).
    names: the M mask names.
    mass: [N, k] the units' positive masses, weighing a channel's positions in one image
      (``channel_shares``); None: equal weights.
    confidence, num_resamples, seed: the bootstrap's (``drig.statistics``).
    min_images: see ``specific_type``.

  Returns:
    {"types": names, "units": {channel (str): {"images": images where it is a top unit,
    "cells": {mask: {"share", "area_share", "enrichment", "low", "high", "n"}},
    "specific": type or None}}}, units ordered by images, most first.

  Raises:
    UnitTypesError: shapes that do not match.
  """
  channels = np.asarray(channels)
  share = np.asarray(share, np.float64)
  area_share = np.asarray(area_share, np.float64)
  m = len(names)
  if (share.shape != channels.shape + (m,) or area_share.shape != (channels.shape[0], m)
      or (mass is not None and np.shape(mass) != channels.shape)):
    raise UnitTypesError(f"channels {channels.shape}, share {share.shape}, area_share "
                         f"{area_share.shape} and mass {np.shape(mass)} do not agree on "
                         f"[N, k] and {m} masks")
  ids, pooled = channel_shares(channels, share, mass)
  units = {}
  for u, unit in enumerate(ids):
    cells = {}
    for j, name in enumerate(names):
      s, a = pooled[:, u, j], area_share[:, j]
      defined = np.isfinite(s) & np.isfinite(a)
      cell = _ratio_interval(s[defined], a[defined], confidence=confidence,
                             num_resamples=num_resamples, seed=seed)
      cell["share"] = float(s[defined].mean()) if defined.any() else math.nan
      cell["area_share"] = float(a[defined].mean()) if defined.any() else math.nan
      cells[name] = cell
    units[str(int(unit))] = {"images": int((channels == unit).any(axis=1).sum()),
                             "cells": cells,
                             "specific": specific_type(cells, min_images=min_images)}
  return {"types": list(names), "units": units}


def relevance_mass_of_units(weights, mass, share, selected) -> np.ndarray:
  """Per image and mask, the relevance mass of sum_u w_u pos(region_u) over selected units.

  Args:
    weights, mass: [N, k] the units' layer attributions (>= 0) and positive masses.
    share: [N, k, M] the units' shares on each mask (NaN where undefined).
    selected: bool [N, k] (or [N, k, M], per mask) the units summed.

  Returns:
    float64 [N, M]: mass on the mask / mass in the field of view; NaN where no selected
    unit has mass or the mask is empty (every share of the image NaN).
  """
  weights = np.asarray(weights, np.float64)
  mass = np.nan_to_num(np.asarray(mass, np.float64))
  share = np.asarray(share, np.float64)
  selected = np.asarray(selected, bool)
  if selected.ndim == 2:
    selected = np.broadcast_to(selected[..., None], share.shape)
  weighted = (weights * mass)[..., None] * selected  # [N, k, M]
  total = weighted.sum(axis=1)
  on_mask = (weighted * np.nan_to_num(share)).sum(axis=1)
  # A mask empty in the image leaves every unit's share NaN there.
  empty = np.all(~np.isfinite(share), axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    out = np.where((total > 0) & ~empty, on_mask / total, np.nan)
  return out


def type_map_table(table: dict, channels, weights, mass, share, *,
                   confidence: float = statistics.DEFAULT_CONFIDENCE,
                   num_resamples: int = statistics.DEFAULT_NUM_RESAMPLES,
                   num_permutations: int = statistics.DEFAULT_NUM_PERMUTATIONS,
                   seed: int = 0) -> dict:
  """Relevance mass of each type's map (its specific units) against the pooled map's.

  Args:
    table: ``unit_type_table``'s result.
    channels, weights, mass, share: the shards' unit arrays ([N, k], [N, k], [N, k],
      [N, k, M]).

  Returns:
    {type: {"units": [channel ids], "typed": interval dict, "pooled": interval dict,
    "difference": {"mean", "low", "high", "p_value", "n"}}} for each lesion type with at
    least one specific unit (an image counts where one of its top units is specific to
    the type and the type's mask is not empty).
  """
  names = table["types"]
  channels = np.asarray(channels)
  pooled = relevance_mass_of_units(weights, mass, share, channels >= 0)
  options = dict(confidence=confidence, num_resamples=num_resamples, seed=seed)
  out = {}
  for j, name in enumerate(names):
    units = [int(u) for u, row in table["units"].items() if row["specific"] == name]
    if not units:
      continue
    typed = relevance_mass_of_units(weights, mass, share, np.isin(channels, units))[:, j]
    both = np.where(np.isfinite(typed), pooled[:, j], np.nan)
    difference = statistics.paired_difference(typed, both, num_permutations=num_permutations,
                                              **options)
    out[name] = {"units": units,
                 "typed": _interval(statistics.mean_interval(typed, **options)),
                 "pooled": _interval(statistics.mean_interval(both, **options)),
                 "difference": {"mean": difference.mean, "low": difference.low,
                                "high": difference.high, "p_value": difference.p_value,
                                "n": difference.n}}
  return out


def _interval(interval) -> dict:
  return {"mean": interval.mean, "low": interval.low, "high": interval.high, "n": interval.n}


def _shown_units(table: dict, max_units: int) -> list[str]:
  """The most frequent units, then any specific unit beyond them."""
  ordered = list(table["units"])
  shown = ordered[:max_units]
  return shown + [u for u in ordered[max_units:] if table["units"][u]["specific"]]


def _format_cell(cell: dict) -> str:
  if cell["n"] == 0 or not np.isfinite(cell["enrichment"]):
    return "n/a"
  return (f"{cell['enrichment']:.2f} [{cell['low']:.2f}, {cell['high']:.2f}] "
          f"(n={cell['n']})")


def unit_types_markdown(table: dict, type_maps: dict, *, max_units: int = MAX_UNITS_SHOWN,
                        min_images: int = DEFAULT_MIN_IMAGES) -> str:
  """The unit-by-type enrichment table, the per-type map table and a plain verdict."""
  names = table["types"]
  lines = ["| unit (channel) | images | " + " | ".join(names) + " | specific to |",
           "|---" * (len(names) + 3) + "|"]
  for unit in _shown_units(table, max_units):
    row = table["units"][unit]
    lines.append(f"| {unit} | {row['images']} | "
                 + " | ".join(_format_cell(row["cells"][n]) for n in names)
                 + f" | {row['specific'] or '-'} |")
  specific = {u: r["specific"] for u, r in table["units"].items() if r["specific"]}
  lines.append("")
  if not specific:
    lines.append(f"**No unit is specific to a lesion type**: among the {len(table['units'])} "
                 "units that were top units in some image, none has an enrichment interval "
                 "above 1 for one type and above the other types' enrichments (at least "
                 f"{min_images} images). At this layer, on these images, the units do not "
                 "specialise by lesion type.")
    return "\n".join(lines)
  by_type = {}
  for unit, name in specific.items():
    by_type.setdefault(name, []).append(unit)
  lines.append("Specific units: " + "; ".join(f"{name}: {', '.join(units)}"
                                             for name, units in by_type.items()) + ".")
  lines += ["", "| type | units | typed map | pooled map | typed - pooled | p |",
            "|---|---|---|---|---|---|"]
  for name, row in type_maps.items():
    d = row["difference"]
    typed, pooled, difference = (statistics.format_interval(statistics.Interval(
        c["mean"], c["low"], c["high"], c["n"])) for c in (row["typed"], row["pooled"], d))
    lines.append(f"| {name} | {', '.join(map(str, row['units']))} | {typed} | {pooled} | "
                 f"{difference} | {d['p_value']:.3g} |")
  return "\n".join(lines)


def unit_type_figure(table: dict, *, palette: str = "poster",
                     max_units: int = MAX_UNITS_SHOWN) -> Figure:
  """The unit-by-type matrix: log2 enrichment per unit (rows) and mask (columns).

  Cells are annotated with the enrichment and n; a specific unit's cell is boxed. Grey:
  undefined (n = 0); an enrichment of 0 takes the scale's lowest colour.

  Args:
    table: ``unit_type_table``'s result.
    palette: "poster" (green: enriched) or "colorblind" (purple: enriched).
    max_units: rows at most (the most frequent units, plus every specific one).

  Returns:
    A matplotlib Figure (one panel and its colour bar).
  """
  names = table["types"]
  units = _shown_units(table, max_units)
  values = np.array([[table["units"][u]["cells"][n]["enrichment"] for n in names]
                     for u in units], np.float64).reshape(len(units), len(names))
  with np.errstate(divide="ignore", invalid="ignore"):
    logs = np.log2(values)
  finite = logs[np.isfinite(logs)]
  limit = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
  logs[values == 0] = -limit  # none of the unit's mass on the type: the colour scale's end
  fig = Figure(figsize=(1.2 * len(names) + 3.0, 0.35 * max(len(units), 4) + 1.8))
  ax = fig.add_subplot(1, 1, 1)
  ax.set_facecolor("0.85")
  image = ax.imshow(np.ma.masked_invalid(logs), cmap=_COLOUR_MAPS.get(palette, "RdYlGn"),
                    vmin=-limit, vmax=limit, aspect="auto")
  for r, unit in enumerate(units):
    row = table["units"][unit]
    for c, name in enumerate(names):
      cell = row["cells"][name]
      if cell["n"] and np.isfinite(cell["enrichment"]):
        dark = abs(logs[r, c]) > 0.6 * limit  # the scale's ends are dark in both palettes
        ax.text(c, r, f"{cell['enrichment']:.1f}\nn={cell['n']}", ha="center", va="center",
                fontsize=6, color="white" if dark else "black")
      if row["specific"] == name:
        ax.add_patch(_box(c, r))
  ax.set_xticks(np.arange(len(names)))
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
  ax.set_yticks(np.arange(len(units)))
  ax.set_yticklabels(units, fontsize=7)
  ax.set_ylabel("unit (channel)")
  ax.set_title("enrichment of each unit's active region on each lesion type", fontsize=9)
  bar = fig.colorbar(image, ax=ax)
  bar.set_label("log2 enrichment (0: as the type's area)", fontsize=8)
  fig.tight_layout()
  return fig


def _box(column: int, row: int) -> Rectangle:
  return Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2)


def read_names(data: Mapping) -> Optional[dict]:
  """The unit-type record of merged shard arrays, or None when the shards have no unit arrays."""
  if NAMES_KEY not in data or "study.unit_type_share" not in data:
    return None
  return json.loads(str(np.asarray(data[NAMES_KEY])))


def summary(data: Mapping, *, confidence: float = statistics.DEFAULT_CONFIDENCE,
            num_resamples: int = statistics.DEFAULT_NUM_RESAMPLES,
            num_permutations: int = statistics.DEFAULT_NUM_PERMUTATIONS, seed: int = 0,
            min_images: int = DEFAULT_MIN_IMAGES) -> Optional[dict]:
  """The unit-type tables of merged shard arrays, or None when the shards have none.

  Returns:
    {"record", "table" (``unit_type_table``), "type_maps" (``type_map_table``),
    "specific": {unit: type}, "min_images"}.
  """
  record = read_names(data)
  if record is None:
    return None
  options = dict(confidence=confidence, num_resamples=num_resamples, seed=seed)
  table = unit_type_table(data["study.unit_channels"], data["study.unit_type_share"],
                          data["study.type_area_share"], record["types"],
                          mass=data["study.unit_mass"], min_images=min_images, **options)
  type_maps = type_map_table(table, data["study.unit_channels"], data["study.unit_weights"],
                             data["study.unit_mass"], data["study.unit_type_share"],
                             num_permutations=num_permutations, **options)
  return {"record": record, "table": table, "type_maps": type_maps,
          "specific": {u: r["specific"] for u, r in table["units"].items() if r["specific"]},
          "min_images": min_images}


def report_subsection(config, data: Mapping, report, figures: list, folder: str) -> Optional[dict]:
  """The study section's "Lesion types of the units" (config.study.unit_types).

  Args:
    config: the analysis config (config.study's confidence and resamples, palette).
    data: merged shard arrays.
    report: a ``drig.analysis.report_document.Report``.
    figures: the job's figure paths (appended to).
    folder: where the figure goes.

  Returns:
    ``summary``'s dict for metrics.json, or None when the shards have no unit arrays.
  """
  study = config.study
  result = summary(data, confidence=study.confidence, num_resamples=study.num_resamples,
                   num_permutations=study.num_permutations, seed=config.seed)
  if result is None:
    return None
  record = result["record"]
  report.heading("Lesion types of the units", level=3, about=(
      "Whether the inspected layer's top units put their active regions on one lesion type "
      "more than on the others."))
  report.paragraph(
      f"Top positive units at {record['layer']} ({record['neurons']}s, grouped by channel) "
      f"for the quantity {record['quantity']}. Per unit and mask: enrichment = the unit's "
      "share of positive active-region mass on the mask over the mask's share of the field "
      f"of view, summed over the images where the unit is a top unit [bootstrap "
      f"{study.confidence:.0%} interval over images] (n = images where the mask and the "
      "unit's mass are not empty; 1: no preference). A unit is specific to a type when the "
      f"type has n >= {result['min_images']}, its interval's lower end is above 1 and above "
      "every other type's enrichment. Typed map: per image, the specific units' regions "
      "weighted by their layer attributions, scored by relevance mass on the type's mask "
      "against the same sum over all the image's top units (pooled).")
  report.markdown_block(unit_types_markdown(result["table"], result["type_maps"],
                                            min_images=result["min_images"]))
  fig = unit_type_figure(result["table"], palette=config.get("palette", "poster"))
  path = os.path.join(folder, "study_unit_types.png")
  figures_lib.save_figure(fig, path, formats=config.figures.formats)
  figures.append(path)
  report.figure(path, "Lesion types of the units: log2 enrichment per unit and mask "
                      "(boxed: the type a unit is specific to)")
  return result
