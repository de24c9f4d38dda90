"""The analysis job's last stage (host 0): figures, experiments, report.md/.html, metrics.json.

``finish`` reads every shard written by ``drig.analysis.job``, then:
Fig (a) for the first images, Fig (b) for one sample, group sums per true
grade, the localisation summary (when the data set has masks), the
model-randomisation check, counterfactuals for true-grade-1 images predicted
0, and the linearity experiment of the fully connected units. Each output
file is written atomically; each experiment that cannot run says why in the
report instead of ending the job.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import time
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from drig.analysis import job as job_lib

GRADE_NAMES = ("no DR", "mild", "moderate", "severe", "proliferative")


# --------------------------------------------------------------------------- #
# Reading shards.


def load_shards(paths) -> dict:
  """Concatenates the per-image arrays of shard files (in order); metadata from the first.

  Returns:
    {key: array}; per-image keys have one row per analysed image.
  """
  parts = [dict(np.load(p, allow_pickle=False)) for p in paths]
  merged = {}
  per_image = {k for part in parts for k, v in part.items()
               if v.ndim >= 1 and k not in ("localization_methods", "localization_lesions",
                                            "localization_metrics")}
  for key in per_image:
    values = [part[key] for part in parts if key in part]
    merged[key] = np.concatenate(values) if values else np.zeros((0,))
  for part in parts:
    for key, value in part.items():
      if key not in merged:
        merged[key] = value
  return merged


def _json_safe(value):
  if isinstance(value, dict):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.ndarray):
    return _json_safe(value.tolist())
  return value


# --------------------------------------------------------------------------- #
# Sections.


class Report:
  """Markdown and HTML built side by side from headings, paragraphs, tables and figures."""

  def __init__(self, title: str, workdir: str):
    self.workdir = workdir
    self.markdown = [f"# {title}", ""]
    self.html = [f"<h1>{html.escape(title)}</h1>"]

  def heading(self, text: str, level: int = 2):
    self.markdown += ["#" * level + " " + text, ""]
    self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

  def paragraph(self, text: str):
    self.markdown += [text, ""]
    self.html.append(f"<p>{html.escape(text)}</p>")

  def table(self, header, rows):
    self.markdown.append("| " + " | ".join(map(str, header)) + " |")
    self.markdown.append("|" + "---|" * len(header))
    for row in rows:
      self.markdown.append("| " + " | ".join(map(str, row)) + " |")
    self.markdown.append("")
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    self.html.append(f"<table><tr>{cells}</tr>{body}</table>")

  def markdown_block(self, text: str):
    """Markdown produced elsewhere (e.g. a table); shown preformatted in the HTML."""
    self.markdown += [text.rstrip(), ""]
    self.html.append(f"<pre>{html.escape(text)}</pre>")

  def figure(self, path: str, caption: str):
    caption = caption.replace("\n", "; ")
    rel = os.path.relpath(path, self.workdir)
    self.markdown += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    self.html.append(f'<figure><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" '
                     f'width="320"></a><figcaption>{html.escape(caption)}</figcaption></figure>')

  def write(self) -> dict:
    md_path = os.path.join(self.workdir, "report.md")
    html_path = os.path.join(self.workdir, "report.html")
    job_lib.atomic_write_text(md_path, "\n".join(self.markdown) + "\n")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
             "figure{display:inline-block;margin:6px}figcaption{max-width:320px;font-size:small}")
    document = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>drig analysis</title>"
                f"<style>{style}</style></head><body>" + "\n".join(self.html) + "</body></html>\n")
    job_lib.atomic_write_text(html_path, document)
    return {"markdown": md_path, "html": html_path}


def _first_quantity(config) -> job_lib.QuantitySpec:
  return job_lib.parse_quantity(config.quantities[0])


def _save(fig, path: str, figures: list) -> str:
  from drig.analysis import figures as figures_lib  # pylint: disable=g-import-not-at-top
  figures_lib.save_figure(fig, path)
  figures.append(path)
  return path


def _grade_text(grade: int) -> str:
  return f"grade {grade}" if grade < 0 or grade >= len(GRADE_NAMES) else (
      f"grade {grade} ({GRADE_NAMES[grade]})")


def fig_a(config, data, images, report: Report, figures: list, folder: str) -> None:
  from drig.analysis import figures as figures_lib  # pylint: disable=g-import-not-at-top
  q = _first_quantity(config)
  count = min(config.figures.num_images, len(data["index"]))
  if count == 0:
    return
  report.heading("Fig (a): resultant active regions of the most positive and negative neurons")
  report.paragraph(f"Quantity: {q.label}; layer {config.layer}, top {config.top_k} "
                   f"{config.neurons}s of each sign. Green: positive attribution, red: negative.")
  positive = job_lib.decode_map(data, f"positive_resultant.{q.key}")
  negative = job_lib.decode_map(data, f"negative_resultant.{q.key}")
  for i in range(count):
    example = images.read(int(data["index"][i]))
    if isinstance(example, str):
      continue
    label, pred = int(data["label"][i]), int(data["prediction"][i])
    title = (f"{example.name}: true {_grade_text(label) if label >= 0 else 'unknown'}, "
             f"predicted {_grade_text(pred)}\nquantity: {q.label}, layer {config.layer}")
    photo = example.photo if example.photo is not None else example.image
    fig = figures_lib.lesion_figure(photo, example.image, positive[i], negative[i], title=title,
                                    percentile=config.figures.percentile)
    path = _save(fig, os.path.join(folder, f"fig_a_{i:03d}.png"), figures)
    report.figure(path, title)


def _pair_sample(data) -> int:
  """The poster's Fig (b) sample: a correctly predicted grade-2 image if any, else the first."""
  correct = np.flatnonzero((data["label"] == data["prediction"]) & (data["label"] == 2))
  return int(correct[0]) if correct.size else 0


def fig_b(config, data, images, report: Report, figures: list, folder: str) -> None:
  from drig.analysis import figures as figures_lib  # pylint: disable=g-import-not-at-top
  if len(data["index"]) == 0:
    return
  a, b = (int(g) for g in config.figures.pair_grades)
  keys = {s.key: s for s in map(job_lib.parse_quantity, config.quantities)}
  report.heading(f"Fig (b): one sample's maps for grade {a} and grade {b}")
  missing = [g for g in (a, b) if f"grade_{g}" not in keys]
  if missing:
    report.paragraph(f"Not drawn: config.quantities lacks grade:{missing[0]}.")
    return
  i = _pair_sample(data)
  example = images.read(int(data["index"][i]))
  if isinstance(example, str):
    return
  title = (f"{example.name}: true {_grade_text(int(data['label'][i]))}, predicted "
           f"{_grade_text(int(data['prediction'][i]))}")
  # Pixel IG and the resultant regions have different units: one figure each, so that
  # each pair shares one colour scale.
  pixel = {f"pixel IG, grade {g}": job_lib.decode_map(data, f"pixel_ig.grade_{g}")[i].sum(-1)
           for g in (a, b)}
  resultant = {f"resultant regions, grade {g}":
               job_lib.decode_map(data, f"positive_resultant.grade_{g}")[i]
               + job_lib.decode_map(data, f"negative_resultant.grade_{g}")[i] for g in (a, b)}
  for name, maps, what in (("fig_b.png", pixel, "pixel IG"),
                           ("fig_b_resultant.png", resultant,
                            f"resultant active regions at {config.layer}")):
    fig = figures_lib.quantity_pair_figure(example.image, maps, title=title,
                                           percentile=config.figures.percentile)
    path = _save(fig, os.path.join(folder, name), figures)
    report.figure(path, f"{title}: {what} for grade {a} and grade {b}")


def group_sums(config, data, images, report: Report, figures: list, folder: str,
               metrics: dict) -> None:
  from drig.analysis import figures as figures_lib  # pylint: disable=g-import-not-at-top
  labels, predictions = data["label"], data["prediction"]
  correct = (labels == predictions) & (labels >= 0)
  report.heading("Group sums: summed pixel IG over correctly predicted images of each grade")
  if not correct.any():
    report.paragraph("No correctly predicted image with a known grade: nothing to sum.")
    return
  q = _first_quantity(config)
  pixel = job_lib.decode_map(data, f"pixel_ig.{q.key}").sum(-1)
  counts = {}
  for grade in range(job_lib.NUM_GRADES):
    members = np.flatnonzero(correct & (labels == grade))
    counts[grade] = int(members.size)
    if not members.size:
      continue
    summed = pixel[members].sum(axis=0)
    mean_image = np.mean([images.read(int(data["index"][m])).image for m in members[:16]],
                         axis=0).astype(np.uint8)
    title = f"summed pixel IG, {q.label}\n{members.size} correct grade-{grade} images"
    fig = figures_lib.group_sum_figure(mean_image, summed, title=title)
    path = _save(fig, os.path.join(folder, f"group_sum_grade_{grade}.png"), figures)
    report.figure(path, title)
  metrics["group_sizes_correct"] = counts


def localization_summary(config, data, report: Report, metrics: dict) -> None:
  from drig.analysis import localization  # pylint: disable=g-import-not-at-top
  q = job_lib.parse_quantity(config.localization.quantity)
  key = f"localization.{q.key}"
  if key not in data or len(data[key]) == 0:
    return
  methods = [str(m) for m in data["localization_methods"]]
  lesions = [str(l) for l in data["localization_lesions"]]
  names = [str(m) for m in data["localization_metrics"]]
  per_image = [{m: {l: {k: float(scores[a, b, c]) for c, k in enumerate(names)}
                    for b, l in enumerate(lesions)} for a, m in enumerate(methods)}
               for scores in data[key]]
  summary = localization.summarise(per_image)
  report.heading("Lesion localisation")
  report.paragraph(f"Quantity: {q.label}. Maps: pixel IG (positive part), the resultant active "
                   "region of the most positive neurons, the plain gradient (absolute) and a "
                   "random map (chance), scored inside the field of view against the masks.")
  report.markdown_block(localization.summary_markdown(summary))
  metrics["localization"] = summary


def randomisation_check(config, data, images, loaded, report: Report, metrics: dict) -> None:
  """Adebayo et al.'s model-randomisation check: pixel IG before and after re-initialising.

  The trained model's maps come from the shards; the randomised model's are computed by
  the same per-shard attribution (same shapes, so no new compilation), with the trained
  model's grades for the "predicted" quantity.
  """
  from drig import input_pipeline  # pylint: disable=g-import-not-at-top
  from drig import preprocess  # pylint: disable=g-import-not-at-top
  from drig.analysis import localization  # pylint: disable=g-import-not-at-top
  count = min(config.randomisation.num_images, len(data["index"]), config.shard_size)
  report.heading("Model-randomisation check")
  if count == 0:
    report.paragraph("Not run (config.randomisation.num_images = 0, or no image).")
    return
  q = _first_quantity(config)
  pixels = np.stack([images.read(int(data["index"][i])).image for i in range(count)])
  x = jnp.asarray(input_pipeline.to_model_input(pixels))

  def randomise(variables):
    return localization.randomise_variables(
        loaded.model, variables, config.seed + 1, scope=config.randomisation.scope,
        input_shape=(1,) + tuple(x.shape[1:]))

  # One compiled program (eager init runs Inception's ~100 initialisers op by op);
  # it runs once, so XLA's optimisation passes are not worth their compile time.
  randomised = jax.jit(randomise).lower(loaded.variables).compile(
      compiler_options={"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True})(loaded.variables)
  mesh = job_lib.sharding_lib.image_mesh(jax.local_devices())
  attributor = job_lib.ShardAttributor(
      config, dataclasses.replace(loaded, variables=randomised), mesh)
  attributor.quantities = [q]
  pad = config.shard_size - count
  batch = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
  predictions = np.concatenate([data["prediction"][:count],
                                np.repeat(data["prediction"][count - 1:count], pad)])
  out = attributor(batch, np.arange(config.shard_size), None, None, predictions=predictions)
  random_maps = job_lib.decode_map(out, f"pixel_ig.{q.key}")
  trained_maps = job_lib.decode_map(data, f"pixel_ig.{q.key}")
  fov = preprocess.field_of_view(x.shape[1])
  correlations = [localization.rank_correlation(
      localization.saliency(trained_maps[i], "absolute"),
      localization.saliency(random_maps[i], "absolute"), fov) for i in range(count)]
  report.paragraph(
      f"Spearman rank correlation of |pixel IG| ({q.label}) between the trained model and "
      f"one with {config.randomisation.scope!r} weights re-initialised, over {count} images: "
      + ", ".join(f"{c:.3f}" for c in correlations)
      + ". Values near 1 would mean the attributions ignore the weights.")
  metrics["randomisation_rank_correlation"] = correlations


def counterfactual_section(config, data, images, loaded, report: Report, figures: list,
                           folder: str, metrics: dict) -> None:
  from drig.analysis import counterfactuals  # pylint: disable=g-import-not-at-top
  target = int(config.counterfactuals.target_grade)
  report.heading(f"Counterfactuals: true grade {target}, predicted 0")
  if config.counterfactuals.max_images <= 0:
    report.paragraph("Disabled (config.counterfactuals.max_images = 0).")
    return
  logits_fn = job_lib.ModelLogits(loaded.model, loaded.variables)
  chosen = np.flatnonzero((data["label"] == target) & (data["prediction"] == 0))
  indices = [int(data["index"][i]) for i in chosen[:config.counterfactuals.max_images]]
  searched = len(data["index"])
  wanted = config.counterfactuals.max_images
  if len(indices) < wanted and config.counterfactuals.search_images:
    more, searched = _search_misgraded(config, images, logits_fn, target, set(data["index"]),
                                       wanted - len(indices))
    indices += more
  if not indices:
    report.paragraph(f"None of the {searched} images searched has true grade {target} and "
                     "prediction 0, so there are no counterfactuals (search more images with "
                     "config.counterfactuals.search_images, or use a model that errs so).")
    metrics["counterfactuals"] = {"num_images": 0, "searched": searched}
    return
  x = np.stack([images.read(i).image for i in indices]).astype(np.float32)
  chosen = np.asarray(indices)
  sweep = counterfactuals.counterfactual_sweep(
      logits_fn, x, tuple(config.counterfactuals.cs), target_grade=target, baseline=128.0,
      steps=config.steps, method=config.method, budget=config.counterfactuals.budget)
  report.paragraph(f"{chosen.size} images; F = the probability of grade {target}. IG: "
                   "x' = clip(x + c sgn(x - 128) IG(x), 0, 255); gradient: "
                   "x' = clip(x + c dF/dx, 0, 255)"
                   + ("; each c is the change's L2 norm in pixel values (before clipping)."
                      if config.counterfactuals.budget == "l2" else "."))
  report.markdown_block(counterfactuals.flip_rate_markdown(sweep))
  # The figure's equal L2 budget: the sweep's middle budget (l2), or the IG change's
  # size at the middle c.
  middle = len(sweep.cs) // 2
  if config.counterfactuals.budget == "l2":
    budget = np.full((x.shape[0],), float(sweep.cs[middle]), np.float32)
  else:
    budget = np.maximum(np.asarray(sweep.l2)[0, middle], 1e-3)
  equal = counterfactuals.at_equal_l2(logits_fn, x, 128.0, sweep.attributions, sweep.gradient,
                                      budget, target_grade=target)
  predicted = np.asarray(equal.predicted)
  info = {"title": f"{images.read(indices[0]).name}: equal L2 = "
                   f"{budget[0]:.3g}",
          "true_grade": target, "original_grade": int(sweep.original_predicted[0]),
          "ig_grade": int(predicted[0, 0]), "gradient_grade": int(predicted[1, 0])}
  fig = counterfactuals.counterfactual_figure(x[0], np.asarray(equal.ig)[0],
                                              np.asarray(equal.gradient)[0], info=info)
  path = _save(fig, os.path.join(folder, "counterfactuals.png"), figures)
  report.figure(path, "IG and gradient counterfactuals at equal L2 budget")
  metrics["counterfactuals"] = {
      "num_images": int(chosen.size), "flip_rate": counterfactuals.flip_rate_table(sweep),
      "equal_l2": {m: _json_safe(dict(v)) for m, v in dict(equal.statistics).items()}}


def _search_misgraded(config, images, logits_fn, target: int, exclude, count: int):
  """Up to `count` indices of the split (beyond the analysed images) with true grade
  `target` predicted 0, from a forward pass over the first search_images examples."""
  from drig import input_pipeline  # pylint: disable=g-import-not-at-top
  source = getattr(images, "source", None)
  if source is None:  # files: no grades
    return [], 0
  limit = min(len(source), int(config.counterfactuals.search_images))
  batch = max(1, int(config.shard_size))
  found = []
  candidates = [i for i in range(limit) if i not in exclude]
  for start in range(0, len(candidates), batch):
    part = candidates[start:start + batch]
    examples = [source[i] for i in part]
    keep = [j for j, e in enumerate(examples) if int(e["label"]) == target]
    if not keep:
      continue
    pixels = np.stack([np.asarray(examples[j]["image"], np.uint8) for j in keep])
    pad = batch - len(keep)  # one shape, one compilation
    pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
    probabilities = np.asarray(job_lib._probabilities(  # pylint: disable=protected-access
        logits_fn, jnp.asarray(input_pipeline.to_model_input(pixels))))[:len(keep)]
    found += [part[j] for j, p in zip(keep, probabilities.argmax(-1)) if p == 0]
    if len(found) >= count:
      break
  return found[:count], limit


def linearity_section(config, data, images, loaded, report: Report, figures: list,
                      folder: str, metrics: dict) -> None:
  from drig import input_pipeline  # pylint: disable=g-import-not-at-top
  from drig.analysis import linearity  # pylint: disable=g-import-not-at-top
  count = min(config.linearity.num_images, len(data["index"]))
  report.heading("Linearity of the fully connected units")
  if count == 0:
    report.paragraph("Not run (config.linearity.num_images = 0, or no image).")
    return
  cs = linearity.exponential_cs(config.linearity.start, config.linearity.factor,
                                config.linearity.count)
  x = np.stack([images.read(int(data["index"][i])).image for i in range(count)])
  x = jnp.asarray(input_pipeline.to_model_input(x))
  grade = int(data["prediction"][0])  # the first image's predicted outcome, for all
  result = linearity.linearity_experiment(
      loaded.model, loaded.variables, x, grade=grade, cs=cs,
      layers=tuple(config.linearity.layers), steps=config.steps, method=config.method,
      clip=(-1.0, 1.0) if config.linearity.clip else None)
  report.paragraph(f"{count} images, perturbed along the gradient of P(grade {grade}) with c = "
                   + ", ".join(f"{c:.3g}" for c in cs) + "; layer IG of each unit at every c.")
  rows, summary = [], {}
  for layer in result.layers:
    matrix = np.asarray(result.attributions[layer])[:, 0]
    title = f"{layer}: unit attributions against c (image 0, grade {grade})"
    fig = linearity.hinton_figure(matrix, title=title,
                                  row_labels=[f"{c:.3g}" for c in cs])
    path = _save(fig, os.path.join(folder, f"linearity_{layer}.png"), figures)
    report.figure(path, title)
    r2 = np.asarray(result.fits[layer].r2)
    special = [int(u) for u in result.special[layer]]
    constant = [int(u) for u in result.constant[layer]]
    rows.append((layer, r2.shape[-1], f"{np.nanmedian(r2):.4f}", f"{np.nanmin(r2):.4f}",
                 ", ".join(map(str, special[:12])) or "none", len(constant)))
    summary[layer] = {"median_r2": float(np.nanmedian(r2)), "min_r2": float(np.nanmin(r2)),
                      "special_units": special, "constant_units": constant}
  report.table(["layer", "units", "median R^2", "min R^2", "special units (R^2 < 0.9)",
                "constant units"], rows)
  metrics["linearity"] = {"grade": grade, "cs": [float(c) for c in cs], "layers": summary}


# --------------------------------------------------------------------------- #
# Everything.


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


def finish(config, workdir: str, result, loaded, images, field_of_view):
  """Host 0's outputs from every shard; returns ``result`` with the summary filled in."""
  data = load_shards(result.shards)
  folder = os.path.join(workdir, "figures")
  os.makedirs(folder, exist_ok=True)
  skipped = [{"index": int(i), "name": str(n), "reason": str(r)}
             for i, n, r in zip(data["skipped_index"], data["skipped_name"],
                                data["skipped_reason"])]
  job_lib.atomic_write_text(os.path.join(workdir, "skipped.json"),
                            json.dumps(skipped, indent=2) + "\n")
  report = Report("drig analysis", workdir)
  n = len(data["index"])
  labels, predictions = data["label"], data["prediction"]
  known = labels >= 0
  metrics = {
      "num_images": n, "num_skipped": len(skipped), "model": loaded.description,
      "images": images.description, "layer": config.layer,
      "quantities": list(config.quantities), "steps": config.steps, "method": config.method,
      "accuracy": float(np.mean(labels[known] == predictions[known])) if known.any() else None,
  }
  for spec in map(job_lib.parse_quantity, config.quantities):
    metrics[f"max_abs_pixel_gap.{spec.key}"] = float(np.max(np.abs(
        data[f"pixel_gap.{spec.key}"]))) if n else None
  report.paragraph(f"Model: {loaded.description}.")
  report.paragraph(f"Images: {images.description}; {n} analysed, {len(skipped)} skipped. "
                   f"Pixel IG from the half-gray baseline, {config.steps} steps "
                   f"({config.method}); layer {config.layer}.")
  if skipped:
    report.heading("Skipped images")
    report.table(["index", "name", "reason"],
                 [(s["index"], s["name"], s["reason"]) for s in skipped])
  if n:
    report.heading("Completeness")
    report.table(["quantity", "max abs pixel gap: sum(IG) - (F(x) - F(baseline))",
                  "max abs layer gap"],
                 [(s.label, f"{np.abs(data[f'pixel_gap.{s.key}']).max():.3g}",
                   f"{np.abs(data[f'layer_gap.{s.key}']).max():.3g}")
                  for s in map(job_lib.parse_quantity, config.quantities)])
  figures, errors = [], {}
  if n:
    _run_section("fig_a", fig_a, report, errors, config, data, images, report, figures, folder)
    _run_section("fig_b", fig_b, report, errors, config, data, images, report, figures, folder)
    _run_section("group_sums", group_sums, report, errors, config, data, images, report,
                 figures, folder, metrics)
    _run_section("localization", localization_summary, report, errors, config, data, report,
                 metrics)
    _run_section("randomisation", randomisation_check, report, errors, config, data, images,
                 loaded, report, metrics)
    _run_section("counterfactuals", counterfactual_section, report, errors, config, data,
                 images, loaded, report, figures, folder, metrics)
    _run_section("linearity", linearity_section, report, errors, config, data, images, loaded,
                 report, figures, folder, metrics)
  metrics["section_errors"] = errors
  metrics["figures"] = [os.path.relpath(p, workdir) for p in figures]
  paths = report.write()
  metrics_path = os.path.join(workdir, "metrics.json")
  job_lib.atomic_write_text(metrics_path, json.dumps(_json_safe(metrics), indent=2) + "\n")
  paths["metrics"] = metrics_path
  result.num_images, result.skipped, result.figures = n, skipped, figures
  result.report, result.metrics = paths, metrics
  return result


def finished_result(workdir: str, result):
  """``result`` filled in from a finished workdir's metrics.json and skipped.json."""
  with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
    metrics = json.load(f)
  with open(os.path.join(workdir, "skipped.json"), encoding="utf-8") as f:
    skipped = json.load(f)
  result.num_images, result.skipped, result.metrics = metrics["num_images"], skipped, metrics
  result.figures = [os.path.join(workdir, p) for p in metrics["figures"]]
  result.report = {"markdown": os.path.join(workdir, "report.md"),
                   "html": os.path.join(workdir, "report.html"),
                   "metrics": os.path.join(workdir, "metrics.json")}
  return result
