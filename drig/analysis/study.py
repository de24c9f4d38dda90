"""The lesion study's tables: do the explanations find lesions, beyond what controls do?

One concept: per-image study scores (as the shards keep them) to intervals,
paired tests, Markdown and figures.

The job stores, per image, every map's localisation scores against every
mask (``drig.analysis.study_scores``); this module turns those records into

* ``localization_table``: per metric, map and mask, the mean over images with
  its percentile-bootstrap 95% interval and n (images where the score is
  defined, i.e. the mask is present);
* ``paired_table``: per metric, mask and map, the mean paired difference
  against each reference map (pixel IG, the gradient's absolute value, the
  contrast control), its bootstrap interval and a sign-flip permutation p-value
  (``drig.statistics.paired_difference``), over the images where both are defined;
* ``finds_lesions``: the maps whose difference against the contrast control
  has an interval entirely above 0 and a sign-flip p-value below 1 - confidence
  (so a handful of images, whose bootstrap interval can be degenerate, never
  suffices): only those "find lesions" in the study's sense (the input's own
  contrast already localises lesions without a model);
* ``faithfulness_table``: deletion and insertion areas per ranked map, with
  their paired differences against the random-order control (deletion: lower
  is better; insertion: higher is better);
* ``study_markdown`` and ``metric_figure`` (methods x lesion types with CI bars),
  and ``report_section``, the report's "Lesion study" (with config.study.unit_types,
  its subsection on the units' lesion types, ``drig.analysis.unit_types``).

Everything but the figures is numpy and dicts, seeded: the same records and
seed give the same tables.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, NamedTuple, Optional, Sequence

from matplotlib.figure import Figure
import numpy as np

from drig import statistics
from drig.analysis import figures as figures_lib
from drig.analysis import study_scores
from drig.analysis import unit_types

# The study compares every map with these, when they were scored.
DEFAULT_REFERENCES = ("pixel_ig", "gradient (absolute)", "contrast")
DEFAULT_CONTROL = "contrast"
METRIC_TITLES = {"pointing_game": "pointing game", "relevance_mass": "relevance mass",
                 "relevance_rank": "relevance rank", "pixel_auroc": "pixel AUROC"}
# What a score of an unrelated map is, for the figures' reference lines (None: the mask's share).
CHANCE = {"pixel_auroc": 0.5}


class StudyError(ValueError):
  """Study records of inconsistent shapes, or a reference that was not scored."""


class StudyRecords(NamedTuple):
  """Per-image study scores, as the shards keep them.

  Attributes:
    maps: the scored maps' names (methods, their absolute values, controls).
    kinds: per map "method", "method_absolute" or "control".
    masks: the masks' names (lesion types, "any_lesion", the optic disc).
    metrics: the scores' names (drig.analysis.localization.ALL_METRICS).
    scores: float [N, maps, masks, metrics], NaN where undefined.
    ranked: the maps of the faithfulness curves (empty without them).
    deletion: float [N, ranked] deletion areas, or None.
    insertion: float [N, ranked] insertion areas, or None.
  """
  maps: tuple
  kinds: tuple
  masks: tuple
  metrics: tuple
  scores: np.ndarray
  ranked: tuple = ()
  deletion: Optional[np.ndarray] = None
  insertion: Optional[np.ndarray] = None


def make_records(maps, masks, metrics, scores, *, kinds=None, ranked=(), deletion=None,
                 insertion=None) -> StudyRecords:
  """StudyRecords with their shapes checked.

  Raises:
    StudyError: scores not [N, len(maps), len(masks), len(metrics)], or areas not
      [N, len(ranked)].
  """
  scores = np.asarray(scores, np.float64)
  expected = (len(maps), len(masks), len(metrics))
  if scores.ndim != 4 or scores.shape[1:] != expected:
    raise StudyError(f"scores must be [images, {expected[0]} maps, {expected[1]} masks, "
                     f"{expected[2]} metrics], got shape {scores.shape}")
  kinds = tuple(kinds) if kinds is not None else ("method",) * len(maps)
  if len(kinds) != len(maps):
    raise StudyError(f"kinds has {len(kinds)} entries for {len(maps)} maps")
  areas = []
  for name, values in (("deletion", deletion), ("insertion", insertion)):
    if values is not None:
      values = np.asarray(values, np.float64)
      if values.shape != (scores.shape[0], len(ranked)):
        raise StudyError(f"{name} areas must be [{scores.shape[0]} images, {len(ranked)} ranked "
                         f"maps], got shape {values.shape}")
    areas.append(values)
  return StudyRecords(tuple(maps), kinds, tuple(masks), tuple(metrics), scores, tuple(ranked),
                      *areas)


def records_from_shards(data: Mapping) -> Optional[StudyRecords]:
  """The study records of merged shard arrays (``drig.analysis.shards.load_shards``), or None."""
  names = study_scores.read_names(data)
  if names is None or "study.scores" not in data:
    return None
  return make_records(names["maps"], names["masks"], names["metrics"], data["study.scores"],
                      kinds=names["kinds"], ranked=names.get("ranked", ()),
                      deletion=data.get("study.deletion_area"),
                      insertion=data.get("study.insertion_area"))


def _interval_dict(interval) -> dict:
  return {"mean": interval.mean, "low": interval.low, "high": interval.high, "n": interval.n}


def _difference_dict(difference) -> dict:
  return {"mean": difference.mean, "low": difference.low, "high": difference.high,
          "p_value": difference.p_value, "n": difference.n}


def localization_table(records: StudyRecords, *, confidence: float = 0.95,
                       num_resamples: int = statistics.DEFAULT_NUM_RESAMPLES,
                       seed: int = 0) -> dict:
  """Mean and bootstrap interval of every (metric, map, mask) over the images.

  Returns:
    {metric: {map: {mask: {"mean", "low", "high", "n"}}}}; n counts the images
    whose score is defined (NaN: "n" 0).
  """
  table = {}
  for k, metric in enumerate(records.metrics):
    table[metric] = {
        name: {mask: _interval_dict(statistics.mean_interval(
            records.scores[:, a, b, k], confidence=confidence, num_resamples=num_resamples,
            seed=seed)) for b, mask in enumerate(records.masks)}
        for a, name in enumerate(records.maps)}
  return table


def paired_table(records: StudyRecords, references: Sequence[str] = DEFAULT_REFERENCES, *,
                 confidence: float = 0.95,
                 num_resamples: int = statistics.DEFAULT_NUM_RESAMPLES,
                 num_permutations: int = statistics.DEFAULT_NUM_PERMUTATIONS,
                 seed: int = 0) -> dict:
  """Every map against each reference on the same images: mean(map - reference).

  References that were not scored are left out (e.g. "pixel_ig" in a study of
  other methods); a map is not compared with itself.

  Returns:
    {metric: {mask: {map: {reference: {"mean", "low", "high", "p_value", "n"}}}}}.
  """
  present = [r for r in references if r in records.maps]
  table = {}
  for k, metric in enumerate(records.metrics):
    table[metric] = {}
    for b, mask in enumerate(records.masks):
      cells = {}
      for a, name in enumerate(records.maps):
        cells[name] = {}
        for reference in present:
          if reference == name:
            continue
          r = records.maps.index(reference)
          cells[name][reference] = _difference_dict(statistics.paired_difference(
              records.scores[:, a, b, k], records.scores[:, r, b, k], confidence=confidence,
              num_resamples=num_resamples, num_permutations=num_permutations, seed=seed))
      table[metric][mask] = cells
  return table


def _significant(difference: Optional[Mapping], sign: int, alpha: float) -> bool:
  """The interval lies on the ``sign`` side of 0 and the sign-flip p-value is below alpha."""
  if not difference or not difference["n"]:
    return False
  side = difference["low"] > 0 if sign > 0 else difference["high"] < 0
  return bool(side and difference["p_value"] < alpha)


def finds_lesions(paired: Mapping, control: str = DEFAULT_CONTROL, *,
                  alpha: float = 0.05) -> dict:
  """The maps that beat ``control``: mean(map - control) has its interval above 0
  and a sign-flip p-value below ``alpha`` (1 - the intervals' confidence).

  Returns:
    {metric: {mask: [map, ...]}} in the maps' order (empty where none does, or
    where the control was not scored).
  """
  out = {}
  for metric, per_mask in paired.items():
    out[metric] = {}
    for mask, per_map in per_mask.items():
      out[metric][mask] = [name for name, against in per_map.items()
                           if _significant(against.get(control), +1, alpha)]
  return out


def faithfulness_table(records: StudyRecords, control: str = "random", *,
                       confidence: float = 0.95,
                       num_resamples: int = statistics.DEFAULT_NUM_RESAMPLES,
                       num_permutations: int = statistics.DEFAULT_NUM_PERMUTATIONS,
                       seed: int = 0) -> dict:
  """Deletion and insertion areas per ranked map, each against the random-order control.

  A map is faithful in a mode when its paired difference against the control
  has an interval on the good side of 0, below for deletion (the quantity
  falls sooner), above for insertion (it rises sooner), and a sign-flip
  p-value below 1 - confidence.

  Returns:
    {"deletion" | "insertion": {map: {"area": interval dict, "against_control":
    difference dict or None, "beats_control": bool}}}; {} without curves.
  """
  out = {}
  for mode, areas in (("deletion", records.deletion), ("insertion", records.insertion)):
    if areas is None:
      continue
    reference = areas[:, records.ranked.index(control)] if control in records.ranked else None
    out[mode] = {}
    for j, name in enumerate(records.ranked):
      difference = None
      if reference is not None and name != control:
        difference = _difference_dict(statistics.paired_difference(
            areas[:, j], reference, confidence=confidence, num_resamples=num_resamples,
            num_permutations=num_permutations, seed=seed))
      beats = _significant(difference, -1 if mode == "deletion" else +1, 1 - confidence)
      out[mode][name] = {"area": _interval_dict(statistics.mean_interval(
          areas[:, j], confidence=confidence, num_resamples=num_resamples, seed=seed)),
                         "against_control": difference, "beats_control": beats}
  return out


# ------------------------------------------------------------------------------
# Markdown and figures.


def _cell(stats: Optional[Mapping], digits: int = 3) -> str:
  if not stats or not stats["n"] or not math.isfinite(stats["mean"]):
    return "–"
  return (f"{stats['mean']:.{digits}f} [{stats['low']:.{digits}f}, {stats['high']:.{digits}f}] "
          f"(n={stats['n']})")


def _difference_cell(stats: Optional[Mapping], digits: int = 3, alpha: float = 0.05) -> str:
  if not stats or not stats["n"] or not math.isfinite(stats["mean"]):
    return "–"
  mark = (" ↑" if _significant(stats, +1, alpha) else
          " ↓" if _significant(stats, -1, alpha) else "")
  return (f"{stats['mean']:+.{digits}f} [{stats['low']:+.{digits}f}, {stats['high']:+.{digits}f}]"
          f" p={stats['p_value']:.3g}{mark}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def study_markdown(table: Mapping, paired: Mapping, found: Mapping,
                   faithfulness: Optional[Mapping] = None, *,
                   control: str = DEFAULT_CONTROL, alpha: float = 0.05) -> str:
  """The study's tables as Markdown: per metric the scores, the differences against
  the control and the maps that find lesions; then faithfulness.

  Args:
    table, paired, found: ``localization_table``, ``paired_table`` and
      ``finds_lesions`` results.
    faithfulness: a ``faithfulness_table`` result, or None.
    control: the control the "finds lesions" verdict is taken against.
    alpha: the p-value below which a difference is marked (1 - the confidence).

  Returns:
    Markdown: cells read "mean [95% interval] (n=images)"; differences
    "+mean [interval] p=..." with ↑ / ↓ when the interval excludes 0 and p < alpha.
  """
  blocks = []
  for metric, per_map in table.items():
    maps = list(per_map)
    masks = list(next(iter(per_map.values()))) if per_map else []
    title = METRIC_TITLES.get(metric, metric)
    blocks.append(f"### {title.capitalize()}\n\n" + _table(
        ["map"] + masks, [[name] + [_cell(per_map[name][mask]) for mask in masks]
                          for name in maps]))
    if metric in paired:
      rows = [[name] + [_difference_cell(paired[metric][mask][name].get(control), alpha=alpha)
                        for mask in masks] for name in maps if name != control]
      if any(cell != "–" for row in rows for cell in row[1:]):
        blocks.append(f"{title.capitalize()}: map minus the {control} control, paired over "
                      "images\n\n" + _table(["map"] + masks, rows))
      winners = found.get(metric, {})
      lines = [f"- {mask}: " + (", ".join(winners[mask]) if winners.get(mask) else "no map")
               for mask in masks]
      blocks.append(f"Maps that beat the {control} control on {title} (interval above 0, "
                    f"p < {alpha:g}):\n\n"
                    + "\n".join(lines))
  if faithfulness:
    rows = []
    for name in next(iter(faithfulness.values())):
      row = [name]
      for mode in ("deletion", "insertion"):
        entry = faithfulness.get(mode, {}).get(name)
        row += ([_cell(entry["area"]), _difference_cell(entry["against_control"], alpha=alpha)]
                if entry else ["–", "–"])
      rows.append(row)
    blocks.append("### Faithfulness (areas under the deletion and insertion curves)\n\n" + _table(
        ["ranked by", "deletion area (lower: faithful)", "deletion - random",
         "insertion area (higher: faithful)", "insertion - random"], rows))
  return "\n\n".join(blocks) + "\n"


def metric_figure(table: Mapping, metric: str, *, maps: Optional[Sequence[str]] = None,
                  masks: Optional[Sequence[str]] = None) -> Figure:
  """One metric's means with 95% intervals: masks along x, one marker series per map.

  Args:
    table: a ``localization_table`` result.
    metric: one of its metrics.
    maps, masks: subsets and orders (default: all, as in the table).

  Returns:
    A matplotlib Figure (save with ``drig.analysis.figures.save_figure``).
  """
  per_map = table[metric]
  maps = list(maps) if maps is not None else list(per_map)
  masks = list(masks) if masks is not None else list(next(iter(per_map.values())))
  fig = Figure(figsize=(max(6.0, 1.1 * len(masks) + 3.0), 4.5))
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(len(maps), 1)
  for j, name in enumerate(maps):
    positions = np.arange(len(masks)) - 0.4 + (j + 0.5) * width
    cells = [per_map[name][mask] for mask in masks]
    mean = np.array([c["mean"] if c["n"] else np.nan for c in cells])
    low = np.array([c["low"] if c["n"] else np.nan for c in cells])
    high = np.array([c["high"] if c["n"] else np.nan for c in cells])
    ax.errorbar(positions, mean, yerr=np.stack([mean - low, high - mean]), fmt="o",
                markersize=3, capsize=2, label=name)
  if metric in CHANCE:
    ax.axhline(CHANCE[metric], color="gray", linewidth=0.8, linestyle="--")
  ax.set_xticks(np.arange(len(masks)))
  ax.set_xticklabels(masks, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel(f"{METRIC_TITLES.get(metric, metric)} (mean, 95% CI)")
  ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  return fig


def faithfulness_figure(fractions, deletion_curves, insertion_curves,
                        ranked: Sequence[str]) -> Figure:
  """Mean deletion and insertion curves over images, one line per ranked map.

  Args:
    fractions: [K] shares of pixels removed or restored.
    deletion_curves, insertion_curves: [N, len(ranked), K] the quantity per image.
    ranked: the maps' names (the controls "contrast" and "random" drawn dashed).

  Returns:
    A matplotlib Figure with two panels.
  """
  fig = Figure(figsize=(11, 4.2))
  for column, (title, curves) in enumerate((("deletion", deletion_curves),
                                            ("insertion", insertion_curves))):
    ax = fig.add_subplot(1, 2, column + 1)
    mean = np.nanmean(np.asarray(curves, np.float64), axis=0)
    for j, name in enumerate(ranked):
      ax.plot(fractions, mean[j], linestyle="--" if name in ("contrast", "random") else "-",
              linewidth=1.2, label=name)
    ax.set_xlabel(f"share of pixels {'removed' if title == 'deletion' else 'restored'}")
    ax.set_ylabel("quantity (mean over images)")
    ax.set_title(title)
  fig.axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  return fig


def summary(records: StudyRecords, *, references: Sequence[str] = DEFAULT_REFERENCES,
            control: str = DEFAULT_CONTROL, confidence: float = 0.95,
            num_resamples: int = statistics.DEFAULT_NUM_RESAMPLES,
            num_permutations: int = statistics.DEFAULT_NUM_PERMUTATIONS,
            seed: int = 0) -> dict:
  """Every table of the study: {"localization", "paired", "finds_lesions", "faithfulness"}."""
  options = dict(confidence=confidence, num_resamples=num_resamples, seed=seed)
  table = localization_table(records, **options)
  paired = paired_table(records, references, num_permutations=num_permutations, **options)
  return {"localization": table, "paired": paired,
          "finds_lesions": finds_lesions(paired, control, alpha=1 - confidence),
          "faithfulness": faithfulness_table(records, num_permutations=num_permutations,
                                             **options),
          "n_images": int(records.scores.shape[0])}


def report_section(config, data: Mapping, report, figures: list, folder: str,
                   metrics: dict) -> None:
  """The report's "Lesion study" (config.study.enabled): tables, a figure per metric.

  Args:
    config: the analysis config (config.study's references, control and resamples).
    data: merged shard arrays.
    report: a ``drig.analysis.report_document.Report``.
    figures: the job's figure paths (appended to).
    folder: where figures go.
    metrics: metrics.json's dict; gets "study".
  """
  report.heading("Lesion study", about=(
      "Whether each map puts its mass on the lesions more than the controls do, with "
      "intervals over images and paired tests."))
  records = records_from_shards(data)
  if records is None or not len(records.scores):
    report.paragraph("No study scores: the images have no lesion masks.")
    return
  study = config.study
  result = summary(records, references=tuple(study.references), control=study.control,
                   confidence=study.confidence, num_resamples=study.num_resamples,
                   num_permutations=study.num_permutations, seed=config.seed)
  report.paragraph(
      f"{records.scores.shape[0]} images ({config.get('selection', 'first')} selection). Every "
      "map is scored inside the field of view against each lesion type, their union "
      "(any_lesion) and the optic disc: signed methods by their positive part and, as "
      "\"(absolute)\", by their absolute value; controls: a random map, the input's contrast "
      "|x - baseline|, a cone on the optic disc. Cells: mean [bootstrap "
      f"{study.confidence:.0%} interval over images] (n = images with that mask). A map "
      f"finds lesions only where its paired difference against the {study.control} control "
      f"has an interval above 0 and a sign-flip p-value below {1 - study.confidence:.2g}."
      + (" Faithfulness: the areas under the deletion and insertion curves of the quantity, "
         "pixels taken in each map's order (signed maps by their signed value), against a "
         "random order." if records.deletion is not None else ""))
  report.markdown_block(study_markdown(result["localization"], result["paired"],
                                       result["finds_lesions"], result["faithfulness"],
                                       control=study.control, alpha=1 - study.confidence))
  methods = [m for m, kind in zip(records.maps, records.kinds) if kind != "method_absolute"]
  for metric in records.metrics:
    fig = metric_figure(result["localization"], metric, maps=methods)
    path = os.path.join(folder, f"study_{metric}.png")
    figures_lib.save_figure(fig, path, formats=config.figures.formats)
    figures.append(path)
    report.figure(path, f"Lesion study: {METRIC_TITLES.get(metric, metric)} per map and mask "
                        f"(mean, {study.confidence:.0%} interval)")
  if "study.deletion_curve" in data:
    names = study_scores.read_names(data)
    fig = faithfulness_figure(names["fractions"], data["study.deletion_curve"],
                              data["study.insertion_curve"], names["ranked"])
    path = os.path.join(folder, "study_faithfulness.png")
    figures_lib.save_figure(fig, path, formats=config.figures.formats)
    figures.append(path)
    report.figure(path, "Lesion study: mean deletion and insertion curves per map "
                        "(dashed: the contrast and random-order controls)")
  if study.get("unit_types", False):
    units = unit_types.report_subsection(config, data, report, figures, folder)
    if units is not None:
      result["unit_types"] = units
  metrics["study"] = result
