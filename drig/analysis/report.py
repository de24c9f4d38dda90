"""The analysis job's last stage (host 0): figures, experiments, report.md/.html, metrics.json.

``finish`` reads every shard the job wrote (``drig.analysis.shards``), then
writes the model summary and the per-image table (``drig.analysis.report_tables``)
and runs the report's sections (``drig.analysis.report_sections``): Fig (a) for
the first images, Fig (b) for one sample, group sums per true grade, the
localisation summary (when the data set has masks), the model-randomisation
check, counterfactuals for true-grade-1 images predicted 0 (and true-grade-0
images predicted 1 or higher, towards grade 0), and the linearity experiment
of the fully connected units. Each output file is written
atomically; each experiment that cannot run says why in the report instead of
ending the job. ``finished_result`` reads a finished workdir's summary back.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import numpy as np

from drig import files
from drig.analysis import cascade
from drig.analysis import data_randomisation
from drig.analysis import report_sections as sections
from drig.analysis import study as study_lib
from drig.analysis import report_tables
from drig.analysis import figures as figures_lib
from drig.analysis.quantity_specs import parse_quantity
from drig.analysis.report_document import Report
from drig.analysis.shards import load_shards


def _run_section(name: str, fn, report: Report, errors: dict, *args) -> None:
  """Runs one section; a failure is reported (and logged) instead of ending the job."""
  started = time.perf_counter()
  try:
    fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    logging.exception("analysis section %s failed", name)
    errors[name] = f"{type(e).__name__}: {e}"
    report.paragraph(f"Section {name!r} failed: {type(e).__name__}: {e}")
  logging.info("section %s: %.1f s", name, time.perf_counter() - started)


def _integration_words(config) -> str:
  if config.tolerance > 0:
    bound = ("relative completeness gap and estimated relative map error (L2)"
             if config.error_control == "map" else "relative completeness gap")
    return (f"error-controlled to a {bound} of {config.tolerance:g} "
            f"(at most {config.max_steps} evaluations per image and pass)")
  return f"{config.steps} steps ({config.method})"


def _integration_accuracy(config, data, report, metrics) -> None:
  """Per quantity: the distribution of relative pixel gaps and of steps used, and the
  images above tolerance (config.tolerance; 1% with fixed steps)."""
  tolerance = config.tolerance if config.tolerance > 0 else 0.01
  by_map = config.tolerance > 0 and config.error_control == "map"
  rows, above_rows = [], []
  for spec in map(parse_quantity, config.quantities):
    q = spec.key
    relative, steps = data[f"pixel_relative_gap.{q}"], data[f"pixel_steps.{q}"]
    layer_steps = data[f"layer_steps.{q}"]
    above = ~(data[f"pixel_converged.{q}"] & data[f"layer_converged.{q}"])
    rows.append((spec.label, f"{np.median(relative):.2%}", f"{np.percentile(relative, 90):.2%}",
                 f"{relative.max():.2%}", f"{np.median(steps):g} / {steps.max()}",
                 f"{np.median(layer_steps):g} / {layer_steps.max()}", int(above.sum())))
    if by_map:
      # NaN where max_steps allowed no estimate: shown as nan, never hidden.
      map_error = data[f"pixel_map_error.{q}"]
      rows[-1] += (f"{np.median(map_error):.2%} / {np.max(map_error):.2%}",)
      metrics[f"pixel_map_error.{q}"] = {"median": float(np.median(map_error)),
                                         "max": float(np.max(map_error))}
    above_rows += [(spec.label, int(data["index"][i]), f"{relative[i]:.2%}", int(steps[i]),
                    int(layer_steps[i])) for i in np.flatnonzero(above)]
    metrics[f"pixel_relative_gap.{q}"] = {
        "median": float(np.median(relative)), "p90": float(np.percentile(relative, 90)),
        "max": float(relative.max())}
    metrics[f"pixel_steps.{q}"] = {"median": float(np.median(steps)), "max": int(steps.max())}
    metrics[f"images_above_tolerance.{q}"] = [int(data["index"][i]) for i in np.flatnonzero(above)]
  report.heading("Integration accuracy", level=3,
                 about="How far each quantity's pixel IG falls short of completeness, and the "
                 "model evaluations it took per image.")
  report.paragraph(
      f"Relative pixel gap |sum(IG) - (F(x) - F(baseline))| / "
      f"|F(x) - F(baseline)| and model evaluations per image; tolerance {tolerance:g}"
      + ("." if config.tolerance > 0 else " (fixed steps: not controlled, only checked)."))
  report.table(["quantity", "relative gap median", "90th percentile", "max",
                "pixel pass steps median / max", "layer pass steps median / max",
                "images above tolerance"]
               + (["estimated map error median / max"] if by_map else []), rows)
  if above_rows:
    shown = above_rows[:config.report_max_rows]
    report.paragraph("Images above tolerance (pixel or layer pass): their maps miss more "
                     "than the tolerance of F(x) - F(baseline)"
                     + (", or differ from the integral by more than the tolerance (estimated "
                        "relative L2 error)" if by_map else "")
                     + (f"; the first {len(shown)} of {len(above_rows)} (config.report_max_rows, "
                        "all in metrics.json)." if len(shown) < len(above_rows) else "."))
    report.table(["quantity", "image index", "relative pixel gap", "pixel pass steps",
                  "layer pass steps"], shown)


def finish(config, workdir: str, result, loaded, images, field_of_view):
  """Host 0's outputs from every shard; returns ``result`` with the summary filled in."""
  data = load_shards(result.shards)
  folder = os.path.join(workdir, "figures")
  os.makedirs(folder, exist_ok=True)
  skipped = [{"index": int(i), "name": str(n), "reason": str(r)}
             for i, n, r in zip(data["skipped_index"], data["skipped_name"],
                                data["skipped_reason"])]
  files.atomic_write_text(os.path.join(workdir, "skipped.json"),
                          json.dumps(skipped, indent=2) + "\n")
  report = Report("drig analysis", workdir)
  errors = {}
  n = len(data["index"])
  labels, predictions = data["label"], data["prediction"]
  known = labels >= 0
  metrics = {
      "num_images": n, "num_skipped": len(skipped), "model": loaded.description,
      "images": images.description, "layer": config.layer,
      "quantities": list(config.quantities), "steps": config.steps, "method": config.method,
      "tolerance": config.tolerance, "max_steps": config.max_steps,
      "error_control": config.error_control,
      "baseline": config.baseline, "methods": list(config.methods),
      "palette": config.palette, "figure_formats": list(config.figures.formats),
      "accuracy": float(np.mean(labels[known] == predictions[known])) if known.any() else None,
  }
  for spec in map(parse_quantity, config.quantities):
    metrics[f"max_abs_pixel_gap.{spec.key}"] = float(np.max(np.abs(
        data[f"pixel_gap.{spec.key}"]))) if n else None
  _run_section("model_summary", report_tables.model_summary, report, errors, config, loaded,
               report, metrics)
  report.heading("Analysis", about="What was explained, and how.")
  report.paragraph(f"Images: {images.description}; {n} analysed, {len(skipped)} skipped. "
                   f"Pixel IG from the {config.baseline} baseline, {_integration_words(config)}"
                   f"; layer {config.layer}. Attribution methods: "
                   f"{', '.join(config.methods)}.")
  report.paragraph(f"Signed heat maps use the {config.palette!r} palette (config.palette): "
                   f"{sections.palette_words(config.palette).lower()}. Figures are written as "
                   f"{', '.join(figures_lib.check_formats(config.figures.formats))} "
                   "(config.figures.formats); the page shows the PNG.")
  if n:
    _run_section("per_image", report_tables.per_image_table, report, errors, config, data,
                 report)
  if skipped:
    report.heading("Skipped images", about="Images the job could not read or grade, and why.")
    report.table(["index", "name", "reason"],
                 [(s["index"], s["name"], s["reason"]) for s in skipped])
  if n:
    report.heading("Completeness", about="Whether the attributions add up to the change in "
                   "each quantity from the baseline to the image, as IG promises.")
    report.table(["quantity", "max abs pixel gap: sum(IG) - (F(x) - F(baseline))",
                  "max abs layer gap"],
                 [(s.label, f"{np.abs(data[f'pixel_gap.{s.key}']).max():.3g}",
                   f"{np.abs(data[f'layer_gap.{s.key}']).max():.3g}")
                  for s in map(parse_quantity, config.quantities)])
    _integration_accuracy(config, data, report, metrics)
  figures = []
  if n:
    _run_section("fig_a", sections.fig_a, report, errors, config, data, images, report, figures,
                 folder)
    _run_section("fig_b", sections.fig_b, report, errors, config, data, images, report, figures,
                 folder)
    _run_section("method_maps", sections.method_maps, report, errors, config, data, images,
                 report, figures, folder)
    _run_section("group_sums", sections.group_sums, report, errors, config, data, images, report,
                 figures, folder, metrics)
    _run_section("localization", sections.localization_summary, report, errors, config, data,
                 images, field_of_view, report, metrics)
    if config.study.enabled:
      _run_section("study", study_lib.report_section, report, errors, config, data, report,
                   figures, folder, metrics)
    _run_section("randomisation", sections.randomisation_check, report, errors, config, data,
                 images, loaded, report, metrics)
    _run_section("data_randomisation", data_randomisation.report_section, report, errors,
                 config, data, images, loaded, report, metrics)
    _run_section("cascade", cascade.report_section, report, errors, config, data, images,
                 loaded, report, figures, folder, metrics)
    _run_section("counterfactuals", sections.counterfactual_section, report, errors, config,
                 data, images, loaded, report, figures, folder, metrics)
    _run_section("linearity", sections.linearity_section, report, errors, config, data, images,
                 loaded, report, figures, folder, metrics)
  metrics["section_errors"] = errors
  metrics["figures"] = [os.path.relpath(p, workdir) for p in figures]
  paths = report.write()
  metrics_path = os.path.join(workdir, "metrics.json")
  files.atomic_write_text(metrics_path, json.dumps(files.json_safe(metrics), indent=2) + "\n")
  paths["metrics"] = metrics_path
  result.num_images, result.skipped, result.figures = n, skipped, figures
  result.report, result.metrics = paths, metrics
  return result


def finished_result(workdir: str, result):
  """``result`` filled in from a finished workdir's metrics.json and skipped.json."""
  metrics = files.read_json(os.path.join(workdir, "metrics.json"))
  skipped = files.read_json(os.path.join(workdir, "skipped.json"))
  result.num_images, result.skipped, result.metrics = metrics["num_images"], skipped, metrics
  result.figures = [os.path.join(workdir, p) for p in metrics["figures"]]
  result.report = {"markdown": os.path.join(workdir, "report.md"),
                   "html": os.path.join(workdir, "report.html"),
                   "metrics": os.path.join(workdir, "metrics.json")}
  return result
