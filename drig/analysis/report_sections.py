"""The report's sections: figures, summaries and host 0's experiments, from the shards.

Each section takes the analysis config, the merged shard arrays (``data``,
from ``drig.analysis.shards.load_shards``) and the images, adds its headings,
tables and figures to the ``Report`` and its numbers to ``metrics``:

* ``fig_a``: the resultant active regions of the most positive and negative
  neurons for the first images; ``fig_b``: one sample's maps for two grades;
  ``group_sums``: summed pixel IG per correctly predicted grade.
* ``localization_summary``: lesion localisation scores (data sets with masks).
* ``randomisation_check``: pixel IG before and after re-initialising weights.
* ``counterfactual_section``: IG and gradient counterfactuals for images of
  the target grade predicted 0; ``linearity_section``: the fully connected
  units' attributions along the gradient.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from drig import grading
from drig import parallel
from drig import preprocess
from drig.analysis import attributor as attributor_lib
from drig.analysis import counterfactuals
from drig.analysis import figures as figures_lib
from drig.analysis import files
from drig.analysis import linearity
from drig.analysis import localization
from drig.analysis import model_source
from drig.analysis import randomisation
from drig.analysis.quantity_specs import QuantitySpec, parse_quantity
from drig.analysis.report_document import Report
from drig.analysis.shards import decode_map


def _first_quantity(config) -> QuantitySpec:
  return parse_quantity(config.quantities[0])


def _save(fig, path: str, figures: list) -> str:
  figures_lib.save_figure(fig, path)
  figures.append(path)
  return path


def fig_a(config, data, images, report: Report, figures: list, folder: str) -> None:
  """Fig (a) for the first ``config.figures.num_images`` images (first quantity)."""
  q = _first_quantity(config)
  count = min(config.figures.num_images, len(data["index"]))
  if count == 0:
    return
  report.heading("Fig (a): resultant active regions of the most positive and negative neurons")
  report.paragraph(f"Quantity: {q.label}; layer {config.layer}, top {config.top_k} "
                   f"{config.neurons}s of each sign. Green: positive attribution, red: negative.")
  positive = decode_map(data, f"positive_resultant.{q.key}")
  negative = decode_map(data, f"negative_resultant.{q.key}")
  for i in range(count):
    example = images.read(int(data["index"][i]))
    if isinstance(example, str):
      continue
    label, pred = int(data["label"][i]), int(data["prediction"][i])
    title = (f"{example.name}: true {grading.grade_name(label) if label >= 0 else 'unknown'}, "
             f"predicted {grading.grade_name(pred)}\nquantity: {q.label}, layer {config.layer}")
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
  """Fig (b): one sample's pixel IG and resultant regions for ``figures.pair_grades``."""
  if len(data["index"]) == 0:
    return
  a, b = (int(g) for g in config.figures.pair_grades)
  keys = {s.key: s for s in map(parse_quantity, config.quantities)}
  report.heading(f"Fig (b): one sample's maps for grade {a} and grade {b}")
  missing = [g for g in (a, b) if f"grade_{g}" not in keys]
  if missing:
    report.paragraph(f"Not drawn: config.quantities lacks grade:{missing[0]}.")
    return
  i = _pair_sample(data)
  example = images.read(int(data["index"][i]))
  if isinstance(example, str):
    return
  title = (f"{example.name}: true {grading.grade_name(int(data['label'][i]))}, predicted "
           f"{grading.grade_name(int(data['prediction'][i]))}")
  # Pixel IG and the resultant regions have different units: one figure each, so that
  # each pair shares one colour scale.
  pixel = {f"pixel IG, grade {g}": decode_map(data, f"pixel_ig.grade_{g}")[i].sum(-1)
           for g in (a, b)}
  resultant = {f"resultant regions, grade {g}":
               decode_map(data, f"positive_resultant.grade_{g}")[i]
               + decode_map(data, f"negative_resultant.grade_{g}")[i] for g in (a, b)}
  for name, maps, what in (("fig_b.png", pixel, "pixel IG"),
                           ("fig_b_resultant.png", resultant,
                            f"resultant active regions at {config.layer}")):
    fig = figures_lib.quantity_pair_figure(example.image, maps, title=title,
                                           percentile=config.figures.percentile)
    path = _save(fig, os.path.join(folder, name), figures)
    report.figure(path, f"{title}: {what} for grade {a} and grade {b}")


def group_sums(config, data, images, report: Report, figures: list, folder: str,
               metrics: dict) -> None:
  """Summed pixel IG (first quantity) over the correctly predicted images of each grade."""
  labels, predictions = data["label"], data["prediction"]
  correct = (labels == predictions) & (labels >= 0)
  report.heading("Group sums: summed pixel IG over correctly predicted images of each grade")
  if not correct.any():
    report.paragraph("No correctly predicted image with a known grade: nothing to sum.")
    return
  q = _first_quantity(config)
  pixel = decode_map(data, f"pixel_ig.{q.key}").sum(-1)
  counts = {}
  for grade in range(grading.NUM_GRADES):
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
  """Localisation scores per lesion and method over images (data sets with masks only)."""
  q = parse_quantity(config.localization.quantity)
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
  count = min(config.randomisation.num_images, len(data["index"]), config.shard_size)
  report.heading("Model-randomisation check")
  if count == 0:
    report.paragraph("Not run (config.randomisation.num_images = 0, or no image).")
    return
  q = _first_quantity(config)
  pixels = np.stack([images.read(int(data["index"][i])).image for i in range(count)])
  x = jnp.asarray(grading.to_model_input(pixels))

  def randomise(variables):
    return randomisation.randomise_variables(
        loaded.model, variables, config.seed + 1, scope=config.randomisation.scope,
        input_shape=(1,) + tuple(x.shape[1:]))

  # One compiled program (eager init runs Inception's ~100 initialisers op by op);
  # it runs once, so XLA's optimisation passes are not worth their compile time.
  randomised = jax.jit(randomise).lower(loaded.variables).compile(
      compiler_options={"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True})(loaded.variables)
  mesh = parallel.local_mesh()
  attributor = attributor_lib.ShardAttributor(
      config, dataclasses.replace(loaded, variables=randomised), mesh)
  attributor.quantities = [q]
  pad = config.shard_size - count
  batch = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
  predictions = np.concatenate([data["prediction"][:count],
                                np.repeat(data["prediction"][count - 1:count], pad)])
  out = attributor(batch, np.arange(config.shard_size), None, None, predictions=predictions)
  random_maps = decode_map(out, f"pixel_ig.{q.key}")
  trained_maps = decode_map(data, f"pixel_ig.{q.key}")
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
  """IG and gradient counterfactuals of images of the target grade that are predicted 0."""
  target = int(config.counterfactuals.target_grade)
  report.heading(f"Counterfactuals: true grade {target}, predicted 0")
  if config.counterfactuals.max_images <= 0:
    report.paragraph("Disabled (config.counterfactuals.max_images = 0).")
    return
  logits_fn = model_source.ModelLogits(loaded.model, loaded.variables)
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
      logits_fn, x, tuple(config.counterfactuals.cs), target_grade=target,
      baseline=float(grading.HALF_GRAY), steps=config.steps, method=config.method,
      budget=config.counterfactuals.budget)
  report.paragraph(f"{chosen.size} images; F = the probability of grade {target}. IG: "
                   f"x' = clip(x + c sgn(x - {grading.HALF_GRAY}) IG(x), 0, 255); gradient: "
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
  equal = counterfactuals.at_equal_l2(logits_fn, x, float(grading.HALF_GRAY), sweep.attributions,
                                      sweep.gradient, budget, target_grade=target)
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
      "equal_l2": {m: files.json_safe(dict(v)) for m, v in dict(equal.statistics).items()}}


def _search_misgraded(config, images, logits_fn, target: int, exclude, count: int):
  """Up to `count` indices of the split (beyond the analysed images) with true grade
  `target` predicted 0, from a forward pass over the first search_images examples."""
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
    probabilities = np.asarray(attributor_lib.probabilities(
        logits_fn, jnp.asarray(grading.to_model_input(pixels))))[:len(keep)]
    found += [part[j] for j, p in zip(keep, probabilities.argmax(-1)) if p == 0]
    if len(found) >= count:
      break
  return found[:count], limit


def linearity_section(config, data, images, loaded, report: Report, figures: list,
                      folder: str, metrics: dict) -> None:
  """Fully connected units' attributions along the gradient: Hinton diagrams and R^2."""
  count = min(config.linearity.num_images, len(data["index"]))
  report.heading("Linearity of the fully connected units")
  if count == 0:
    report.paragraph("Not run (config.linearity.num_images = 0, or no image).")
    return
  cs = linearity.exponential_cs(config.linearity.start, config.linearity.factor,
                                config.linearity.count)
  x = np.stack([images.read(int(data["index"][i])).image for i in range(count)])
  x = jnp.asarray(grading.to_model_input(x))
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
