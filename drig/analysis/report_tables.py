"""The report's tables about the model and the images: what was explained, and how well.

* ``model_summary``: which run and checkpoint the analysis explains, why that
  step, its validation kappa, and the test metrics and confusion matrix that
  the run's ``final_metrics.json`` records (or one line for a model from
  ``config.init``).
* ``per_image_table``: each analysed image's name, true and predicted grade,
  grade probabilities and, per quantity, IG's relative completeness gap and
  the steps it used; at most ``config.report_max_rows`` rows.
* ``localization_tables``: the lesion localisation scores per metric, with
  the score a map without information reaches (its chance level) above them,
  and only the lesion types that occur.
"""

from __future__ import annotations

import math
import os

import numpy as np

from drig import files
from drig import grading
from drig.analysis import localization
from drig.analysis.quantity_specs import parse_quantity
from drig.analysis.report_document import plural, Report
from drig.models import runs

FINAL_METRICS_FILE = "final_metrics.json"
# The test metrics the summary shows: (final_metrics.json key, name in the report).
_TEST_METRICS = (("accuracy", "accuracy"), ("quadratic_kappa", "quadratic weighted kappa"),
                 ("grade_1_recall", "grade-1 recall"), ("auc_any_dr", "AUROC, any DR"))
# Localisation metrics: (name, heading, what it measures and its chance level).
_LOCALIZATION_METRICS = {
    "pointing_game": (
        "Pointing game (hit rate)",
        "Share of images whose map peaks inside the lesion; a map without information hits "
        "with the lesion's share of the field of view (the chance row)."),
    "relevance_mass": (
        "Relevance mass inside the lesion",
        "Share of the map's positive mass inside the lesion; a uniform map puts the lesion's "
        "area share of the field of view there (the chance row)."),
    "relevance_rank": (
        "Relevance rank (top-|lesion| pixels on the lesion)",
        "Share of the map's top K pixels (K: the lesion's area) that lie on the lesion; a map "
        "without information scores the lesion's share of the field of view (the chance row)."),
    "pixel_auroc": (
        "Pixel AUROC",
        "How well the map's values rank lesion pixels above the others in the field of view; "
        "0.5 is chance, 1 a perfect ranking."),
}


def _number(value, spec: str = ".4f") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return format(value, spec)


def _training_rows(training: dict) -> list[tuple[str, str]]:
  """The training run's settings a reader needs to place the model, from its config.json."""
  data, model = training.get("data", {}), training.get("model", {})
  schedule, init = training.get("schedule", {}), training.get("init", {})
  steps = schedule.get("steps")
  rows = [
      ("data set", f"{data.get('name', '?')}/{data.get('builder_config', '') or '-'}, "
                   f"{data.get('image_size', '?')} px"),
      ("model", f"{model.get('name', '?')}, width multiplier {model.get('width_multiplier', 1)}, "
                f"fully connected widths {tuple(model.get('fc_widths', ()))}"),
      ("initialisation", f"{init.get('source', '?')}" + (f" ({init['path']})"
                                                         if init.get("path") else "")),
      ("training steps", f"{sum(steps) if isinstance(steps, (list, tuple)) else '?'} of "
                         f"{training.get('batch_size', '?')} images, "
                         f"{training.get('optimizer', {}).get('name', '?')}, "
                         f"seed {training.get('seed', '?')}"),
  ]
  return rows


def _test_section(final: dict, step: int, report: Report) -> dict:
  """The test metrics and confusion matrix of final_metrics.json; returns them for metrics.json."""
  test = final.get("test")
  if not test:
    report.paragraph(f"The run's {FINAL_METRICS_FILE} records no test-split evaluation "
                     "(its config has no test split).")
    return {}
  chosen = final.get("test_checkpoint") or {}
  test_step = chosen.get("step", final.get("step"))
  why = f" ({chosen['why']})" if chosen.get("why") else ""
  other = ("" if test_step == step else
           f" That is not the step explained here ({step}): these numbers describe step "
           f"{test_step}'s weights.")
  intervals = (final.get("test_confidence_intervals") or {})
  bounds = intervals.get("intervals", {})
  level = intervals.get("confidence")
  report.paragraph(f"Test split ({plural(int(test.get('num_examples', 0)), 'image')}), "
                   f"evaluated once by training at step {test_step}{why}.{other}")
  header = ["test metric", "value"]
  if bounds:
    header.append(f"{round(100 * level)}% bootstrap interval" if level else "interval")
  rows = []
  for key, name in _TEST_METRICS:
    row = [name, _number(test.get(key))]
    if bounds:
      low_high = bounds.get(key)
      row.append(f"[{_number(low_high[0])}, {_number(low_high[1])}]" if low_high else "-")
    rows.append(row)
  report.table(header, rows)
  confusion = test.get("confusion_matrix")
  if confusion:
    report.paragraph("Test confusion matrix: rows are the true grades, columns the predicted "
                     "ones; the diagonal counts correct gradings.")
    report.table(["true \\ predicted"] + [str(g) for g in range(len(confusion))],
                 [[grading.grade_name(g)] + [int(c) for c in row]
                  for g, row in enumerate(confusion)])
  return {"test_step": test_step, **{k: test.get(k) for k, _ in _TEST_METRICS},
          "test_intervals": {k: bounds.get(k) for k, _ in _TEST_METRICS if k in bounds}}


def model_summary(config, loaded, report: Report, metrics: dict) -> None:
  """Which model the report explains: the run, its step and why, validation and test metrics.

  Args:
    config: the analysis config (``checkpoint``, ``checkpoint_step``).
    loaded: the ``drig.analysis.model_source.LoadedModel`` explained.
    report: the report the section is added to.
    metrics: metrics.json's dict; gets ``model_summary``.
  """
  report.heading("Model", about="Which trained model these explanations are of, and how well "
                 "it grades the run's held-out images.")
  if "checkpoint" not in loaded.source:
    report.paragraph(f"Not a trained run: the weights come from config.init "
                     f"({loaded.description}); no validation or test metrics exist for them.")
    metrics["model_summary"] = {"init": loaded.source}
    return
  workdir, step = loaded.source["checkpoint"], int(loaded.source["step"])
  try:
    chosen, why = runs.choose_checkpoint_step(workdir, config.checkpoint_step)
  except runs.RunError:
    chosen, why = step, ""
  why = why if chosen == step else ""
  kappa = runs.kappa_by_step(workdir).get(step)
  rows = [("run (config.checkpoint)", f"`{workdir}`"),
          ("restored step", f"{step}, config.checkpoint_step = {config.checkpoint_step!r}"
                            + (f": {why}" if why else "")),
          ("validation kappa at that step",
           _number(kappa) if kappa is not None else "not recorded in metrics.jsonl")]
  rows += _training_rows(loaded.training_config or {})
  report.table(["setting", "value"], rows)
  summary = {"checkpoint": workdir, "step": step, "why": why, "validation_kappa": kappa}
  final_path = os.path.join(workdir, FINAL_METRICS_FILE)
  if os.path.exists(final_path):
    summary.update(_test_section(files.read_json(final_path), step, report))
  else:
    report.paragraph(f"No {FINAL_METRICS_FILE} in the run (training has not finished): no test "
                     "metrics.")
  metrics["model_summary"] = summary


def per_image_table(config, data, report: Report) -> None:
  """One row per analysed image (at most ``config.report_max_rows``): grades, probabilities,
  and per quantity IG's relative completeness gap and pixel-pass steps."""
  n = len(data["index"])
  specs = list(map(parse_quantity, config.quantities))
  report.heading("Images", about="Each analysed image's true and predicted grade, the grade "
                 "probabilities, and how completely IG explains each quantity (relative gap "
                 "|sum(IG) - (F(x) - F(baseline))| / |F(x) - F(baseline)|) with the steps used.")
  header = ["#", "name", "true grade", "predicted"] + [f"P({g})"
                                                      for g in range(grading.NUM_GRADES)]
  for spec in specs:
    header += [f"{spec.label}: gap", f"{spec.label}: steps"]
  shown = min(n, int(config.report_max_rows))
  rows = []
  for i in range(shown):
    label = int(data["label"][i])
    row = [int(data["index"][i]), str(data["name"][i]), label if label >= 0 else "unknown",
           int(data["prediction"][i])]
    row += [f"{p:.3f}" for p in np.asarray(data["probabilities"][i], np.float64)]
    for spec in specs:
      row += [f"{float(data[f'pixel_relative_gap.{spec.key}'][i]):.2%}",
              int(data[f"pixel_steps.{spec.key}"][i])]
    rows.append(row)
  report.table(header, rows)
  if n > shown:
    report.paragraph(f"{plural(n - shown, 'more image')} not shown (config.report_max_rows = "
                     f"{config.report_max_rows}); every image's values are in the shards.")


def _lesion_shares(data, images, lesions, field_of_view) -> dict:
  """Per lesion: the mean share of the field of view its mask covers, over the analysed
  images that have it, and how many those are."""
  fov = np.asarray(field_of_view, bool)
  shares = {lesion: [] for lesion in lesions}
  for index in data["index"]:
    example = images.read(int(index))
    masks = getattr(example, "masks", None) or {}
    for lesion in lesions:
      mask = masks.get(lesion)
      if mask is not None and mask.shape == fov.shape and (mask & fov).any():
        shares[lesion].append((mask & fov).sum() / fov.sum())
  return {lesion: (float(np.mean(v)) if v else math.nan, len(v)) for lesion, v in shares.items()}


def localization_tables(summary: dict, data, images, field_of_view, report: Report) -> dict:
  """One table per localisation metric: columns the lesion types that occur, rows the
  number of images with each, the chance level, then one row per method (methods are many,
  lesion types few: the table stays narrow). Returns the chance levels per metric and
  lesion (for metrics.json).

  Args:
    summary: ``localization.summarise`` of the per-image scores.
    data: the merged shards (image indices).
    images: the analysed images (their masks give the chance levels).
    field_of_view: bool [H, W], the pixels the scores count.
    report: the report the tables are added to.
  """
  methods = list(summary)
  lesions = [l for l in dict.fromkeys(l for m in methods for l in summary[m])
             if any(c.get("count") for m in methods
                    for c in summary[m].get(l, {}).values())]
  absent = [l for m in methods for l in summary[m] if l not in lesions]
  if absent:
    report.paragraph(f"No analysed image has {', '.join(dict.fromkeys(absent))}: "
                     "not scored.")
  if not lesions:
    return {}
  shares = _lesion_shares(data, images, lesions, field_of_view)
  chance = {}
  present = list(dict.fromkeys(k for m in methods for l in lesions for k in summary[m].get(l, {})))
  for metric in ([k for k in _LOCALIZATION_METRICS if k in present]
                 + [k for k in present if k not in _LOCALIZATION_METRICS]):
    # A metric without a known chance level is shown without one ("-").
    title, about = _LOCALIZATION_METRICS.get(metric, (metric, f"The {metric} score per lesion."))
    report.heading(title, level=3, about=about)
    chance[metric] = {lesion: 0.5 if metric == "pixel_auroc" else
                      shares[lesion][0] if metric in _LOCALIZATION_METRICS else None
                      for lesion in lesions}
    rows = [["images with the lesion"] + [shares[lesion][1] for lesion in lesions],
            ["chance"] + [_number(chance[metric][lesion], ".3f") for lesion in lesions]]
    for m in methods:
      cells = []
      for lesion in lesions:
        stats = summary[m].get(lesion, {}).get(metric)
        if not stats or not stats.get("count"):
          cells.append("-")
          continue
        spread = "" if math.isnan(stats["std"]) else f" ± {stats['std']:.3f}"
        cells.append(f"{stats['mean']:.3f}{spread}")
      rows.append([m] + cells)
    report.table(["method"] + lesions, rows)
  return chance


def localization_summary_of(data, key: str) -> dict:
  """``localization.summarise`` of shard key ``key`` ([N, methods, lesions, metrics])."""
  methods = [str(m) for m in data["localization_methods"]]
  lesions = [str(l) for l in data["localization_lesions"]]
  names = [str(m) for m in data["localization_metrics"]]
  per_image = [{m: {l: {k: float(scores[a, b, c]) for c, k in enumerate(names)}
                    for b, l in enumerate(lesions)} for a, m in enumerate(methods)}
               for scores in data[key]]
  return localization.summarise(per_image)
