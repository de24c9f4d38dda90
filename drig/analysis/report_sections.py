"""The report's sections: figures, summaries and host 0's experiments, from the shards.

One concept: each function adds one section of the analysis report, heading,
sentence, tables and figures, from the shards and the config.

Each section takes the analysis config, the merged shard arrays (``data``,
from ``drig.analysis.shards.load_shards``) and the images, adds its headings,
tables and figures to the ``Report`` and its numbers to ``metrics``:

* ``fig_a``: the resultant active regions of the most positive and negative
  neurons for the first images; ``fig_b``: one sample's maps for two grades;
  ``group_sums``: summed pixel IG per correctly predicted grade.
* ``method_maps``: each method of ``config.methods`` on the first images.
* ``localization_summary``: lesion localisation scores (data sets with masks).
* ``randomisation_check``: pixel IG before and after re-initialising weights.
* ``counterfactual_section``: IG and gradient counterfactuals for images of
  the target grade predicted 0, and for images of grade 0 predicted 1 or
  higher (towards grade 0); ``linearity_section``: the fully connected units'
  attributions along the gradient, with the measured path.
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
from drig import files
from drig.analysis import linearity
from drig.analysis import localization
from drig.analysis import model_source
from drig.analysis import randomisation
from drig.analysis import report_tables
from drig.analysis.quantity_specs import QuantitySpec, parse_quantity
from drig.analysis.report_document import plural, Report
from drig.analysis.shards import decode_map, method_map_key


def _first_quantity(config) -> QuantitySpec:
  return parse_quantity(config.quantities[0])


def _save(fig, path: str, figures: list, config) -> str:
  """Saves ``fig`` as the PNG ``path`` and the other ``config.figures.formats`` beside it."""
  figures_lib.save_figure(fig, path, formats=config.figures.formats)
  figures.append(path)
  return path


def _show(report: Report, config, path: str, caption: str) -> None:
  """The figure in the report, linked to its vector files."""
  report.figure(path, caption, alternates=figures_lib.vector_paths(path, config.figures.formats))


def palette_words(palette: str) -> str:
  """How the report names a signed heat map's colours."""
  if palette == "colorblind":
    return "Blue: positive attribution (for the quantity), orange: negative (against it)"
  return "Green: positive attribution (for the quantity), red: negative (against it)"


def fig_a(config, data, images, report: Report, figures: list, folder: str) -> None:
  """Fig (a) for the first ``config.figures.num_images`` images (first quantity)."""
  q = _first_quantity(config)
  count = min(config.figures.num_images, len(data["index"]))
  if count == 0:
    return
  report.heading("Where the strongest neurons look (the poster's Fig (a))",
                 about="For each image, the input regions that the layer's most positive and "
                 "most negative neurons draw on (their resultant active regions): what the "
                 "neurons that push the quantity up or down respond to.")
  report.paragraph(f"Quantity: {q.label}; layer {config.layer}, top {config.top_k} "
                   f"{config.neurons}s of each sign. {palette_words(config.palette)}.")
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
                                    percentile=config.figures.percentile,
                                    palette=config.palette)
    path = _save(fig, os.path.join(folder, f"fig_a_{i:03d}.png"), figures, config)
    _show(report, config, path, title)


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
  report.heading(f"One image explained for grade {a} and grade {b} (the poster's Fig (b))",
                 about=f"One image's pixel IG and resultant active regions for the probability "
                 f"of grade {a} and of grade {b}, on one colour scale per pair: regions that "
                 "argue for one grade and against the other show in opposite colours.")
  report.paragraph(f"{palette_words(config.palette)}.")
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
                                           percentile=config.figures.percentile,
                                           palette=config.palette)
    path = _save(fig, os.path.join(folder, name), figures, config)
    _show(report, config, path, f"{title}: {what} for grade {a} and grade {b}")


def method_maps(config, data, images, report: Report, figures: list, folder: str) -> None:
  """Each method of config.methods on the first images (first quantity), side by side.

  Pixel IG alone (the default) is drawn by Fig (b) already: no section then.
  """
  q = _first_quantity(config)
  count = min(config.figures.num_images, len(data["index"]))
  if count == 0 or list(config.methods) == ["integrated_gradients"]:
    return
  report.heading("Attribution methods", about="The same images explained by each attribution "
                 "method, side by side, to see where the methods agree.")
  report.paragraph(
      f"Quantity: {q.label}; baseline {config.baseline}. Methods: "
      f"{', '.join(config.methods)} (drig.attribution.methods, default options), "
      f"channels summed, each map on its own colour scale. {palette_words(config.palette)}."
      + (f" Baselines of expected_gradients and gradient_shap: K = "
         f"{config.baseline_distribution.count} images of split "
         f"{config.baseline_distribution.split!r} (seed {config.baseline_distribution.seed})."
         if {"expected_gradients", "gradient_shap"} & set(config.methods) else ""))
  maps = {name: decode_map(data, method_map_key(name, q.key)) for name in config.methods}
  for i in range(count):
    example = images.read(int(data["index"][i]))
    if isinstance(example, str):
      continue
    title = f"{example.name}: {q.label}, baseline {config.baseline}"
    fig = figures_lib.methods_figure(example.image, {name: m[i] for name, m in maps.items()},
                                     title=title, percentile=config.figures.percentile,
                                     palette=config.palette)
    path = _save(fig, os.path.join(folder, f"methods_{i:03d}.png"), figures, config)
    _show(report, config, path, title)


def group_sums(config, data, images, report: Report, figures: list, folder: str,
               metrics: dict) -> None:
  """Summed pixel IG (first quantity) over the correctly predicted images of each grade."""
  labels, predictions = data["label"], data["prediction"]
  correct = (labels == predictions) & (labels >= 0)
  report.heading("Group sums: summed pixel IG over correctly predicted images of each grade",
                 about="Where, summed over the images the model grades correctly, pixel IG "
                 "supports each grade: the places the model relies on for that grade.")
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
    title = f"summed pixel IG, {q.label}\n{plural(members.size, f'correct grade-{grade} image')}"
    fig = figures_lib.group_sum_figure(mean_image, summed, title=title, palette=config.palette)
    path = _save(fig, os.path.join(folder, f"group_sum_grade_{grade}.png"), figures, config)
    _show(report, config, path, title)
  metrics["group_sizes_correct"] = counts


def localization_summary(config, data, images, field_of_view, report: Report,
                         metrics: dict) -> None:
  """Localisation scores per lesion and method over images (data sets with masks only),
  with each score's chance level."""
  q = parse_quantity(config.localization.quantity)
  key = f"localization.{q.key}"
  if key not in data or len(data[key]) == 0:
    return
  summary = report_tables.localization_summary_of(data, key)
  report.heading("Lesion localisation", about="How much of each map falls on the annotated "
                 "lesions, per lesion type and method (mean ± standard deviation over the "
                 "images with that lesion), beside what a map without information scores.")
  others = [m for m in config.methods if m != "integrated_gradients"]
  extra = (f" Methods {', '.join(others)} from baseline {config.baseline}: signed maps by their "
           "positive part and, as \"(absolute)\", by their absolute value; unsigned maps as "
           "they are." if others else "")
  report.paragraph(f"Quantity: {q.label}. Maps: pixel IG (positive part), the resultant active "
                   "region of the most positive neurons, the plain gradient (absolute) and a "
                   "random map (chance), scored inside the field of view against the masks."
                   + extra)
  metrics["localization_chance"] = report_tables.localization_tables(
      summary, data, images, field_of_view, report)
  metrics["localization"] = summary


def randomisation_check(config, data, images, loaded, report: Report, metrics: dict) -> None:
  """Adebayo et al.'s model-randomisation check: pixel IG before and after re-initialising.

  The trained model's maps come from the shards; the randomised model's are computed by
  the same per-shard attribution (same shapes, so no new compilation), with the trained
  model's grades for the "predicted" quantity.
  """
  count = min(config.randomisation.num_images, len(data["index"]), config.shard_size)
  report.heading("Model-randomisation check", about="Whether the maps depend on the trained "
                 "weights (Adebayo et al.'s sanity check): a low rank correlation with a "
                 "re-initialised model's maps means they do.")
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
  attributor.methods = []  # the check compares pixel IG only
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
      f"one with {config.randomisation.scope!r} weights re-initialised, over {plural(count, 'image')}: "
      + ", ".join(f"{c:.3f}" for c in correlations)
      + ". Values near 1 would mean the attributions ignore the weights.")
  metrics["randomisation_rank_correlation"] = correlations


def _budget_mode_text(budget: str) -> str:
  """The report's sentence on the counterfactual budget mode and why it was chosen."""
  if budget == "l2":
    return ("Budget mode 'l2': every direction is scaled to the same L2 norm (in pixel values) "
            "before the clip to [0, 255], because the IG direction (of order 1e-5 per pixel) "
            "and the gradient differ in scale by orders of magnitude, so one coefficient c "
            "would compare changes of very different sizes. The poster's literal x + c * "
            "direction is config.counterfactuals.budget = 'coefficient'.")
  return ("Budget mode 'coefficient': the poster's literal x + c * direction, as on the poster; "
          "the methods' changes then differ in size (see the L2 column), so smoothness is "
          "not compared at equal size here (config.counterfactuals.budget = 'l2' does).")


def _counterfactual_direction(config, data, images, logits_fn, report: Report, figures: list,
                              folder: str, *, true_grade: int, target: int, accept,
                              wanted: str, key: str) -> dict:
  """One direction of the counterfactual experiment: images of true_grade whose prediction
  `accept`s, pushed towards `target`. Returns the direction's metrics."""
  settings = config.counterfactuals
  chosen = [i for i in range(len(data["index"]))
            if int(data["label"][i]) == true_grade and accept(int(data["prediction"][i]))]
  indices = [int(data["index"][i]) for i in chosen[:settings.max_images]]
  searched = len(data["index"])
  if len(indices) < settings.max_images and settings.search_images:
    more, searched = _search_misgraded(config, images, logits_fn, true_grade, accept,
                                       set(int(i) for i in data["index"]),
                                       settings.max_images - len(indices))
    indices += more
  report.heading(f"Counterfactuals: true grade {true_grade}, predicted {wanted}, towards "
                 f"grade {target}", level=3,
                 about=f"Images of grade {true_grade} graded {wanted}, moved along IG and along "
                 f"the gradient towards grade {target}: how large a change each direction "
                 "needs to flip the grade, and how it looks.")
  if not indices:
    report.paragraph(f"None of the {searched} images searched has true grade {true_grade} and "
                     f"prediction {wanted}, so there are no counterfactuals in this direction "
                     "(search more images with config.counterfactuals.search_images, or use a "
                     "model that errs so).")
    return {"num_images": 0, "searched": searched}
  examples = [images.read(i) for i in indices]
  x = np.stack([e.image for e in examples]).astype(np.float32)
  names = [e.name for e in examples]
  sweep = counterfactuals.counterfactual_sweep(
      logits_fn, x, tuple(sorted(settings.cs)), target_grade=target,
      baseline=float(grading.HALF_GRAY), steps=config.steps, method=config.method,
      budget=settings.budget, quantity=settings.quantity)
  f_name = f"{'P' if settings.quantity == 'probability' else 'logit'}(grade {target})"
  report.paragraph(
      f"{plural(len(indices), 'image')}; F = {f_name}. Methods: ig, x' = clip(x + c sgn(x - "
      f"{grading.HALF_GRAY}) IG(x), 0, 255); gradient, x' = clip(x + c dF/dx, 0, 255); "
      "gradient_support, the gradient set to 0 where x equals the baseline (where the IG "
      "direction is 0 by construction), so that the smoothness of ig and gradient_support is "
      "compared on one support.")
  report.markdown_block(counterfactuals.flip_rate_markdown(sweep))
  report.markdown_block(counterfactuals.per_image_markdown(sweep, names))
  # The figure's equal L2 budget: the sweep's middle budget (l2), or the IG change's
  # size at the middle c.
  middle = len(sweep.cs) // 2
  if settings.budget == "l2":
    budget = np.full((x.shape[0],), float(sweep.cs[middle]), np.float32)
  else:
    budget = np.maximum(np.asarray(sweep.l2)[0, middle], 1e-3)
  equal = counterfactuals.at_equal_l2(logits_fn, x, float(grading.HALF_GRAY), sweep.attributions,
                                      sweep.gradient, budget, target_grade=target,
                                      quantity=settings.quantity)
  predicted = np.asarray(equal.predicted)
  rows = []
  for m, method in enumerate(counterfactuals.METHODS):
    stats = equal.statistics[method]
    rows.append((method, f"{np.mean(stats['l2']):.4g}",
                 f"{np.mean(stats['total_variation']):.4g} ± "
                 f"{np.std(stats['total_variation']):.2g}",
                 f"{np.mean(stats['high_frequency_energy']):.3f} ± "
                 f"{np.std(stats['high_frequency_energy']):.3f}",
                 f"{np.mean(equal.quantity[m] - sweep.original_quantity):+.3g}",
                 f"{np.mean(predicted[m] == target):.3f}"))
  report.paragraph(f"At equal L2 budget {float(np.mean(budget)):.4g} before clipping "
                   "(mean ± std over images):")
  report.table(["method", "achieved L2", "TV of the change", "HF share", "mean ΔF",
                f"flip rate to {target}"], rows)
  info = {"title": f"{names[0]}: equal L2 = {budget[0]:.3g}, towards grade {target}",
          "true_grade": true_grade, "original_grade": int(sweep.original_predicted[0]),
          "ig_grade": int(predicted[0, 0]), "gradient_grade": int(predicted[1, 0])}
  fig = counterfactuals.counterfactual_figure(x[0], np.asarray(equal.ig)[0],
                                              np.asarray(equal.gradient)[0], info=info)
  path = _save(fig, os.path.join(folder, f"counterfactuals_{key}.png"), figures, config)
  _show(report, config, path, f"IG and gradient counterfactuals at equal L2 budget, towards "
                              f"grade {target}")
  methods = list(sweep.methods)
  return {
      "num_images": len(indices), "searched": searched, "images": names,
      "target_grade": target, "original_grade": sweep.original_predicted.tolist(),
      "original_quantity": sweep.original_quantity.tolist(),
      "first_flip": {m: sweep.first_flip[i].tolist() for i, m in enumerate(methods)},
      "first_flip_any_dr": {m: sweep.first_flip_any_dr[i].tolist()
                            for i, m in enumerate(methods)},
      "flip_rate": counterfactuals.flip_rate_table(sweep),
      "equal_l2": {m: files.json_safe(dict(v)) for m, v in dict(equal.statistics).items()}}


def counterfactual_section(config, data, images, loaded, report: Report, figures: list,
                           folder: str, metrics: dict) -> None:
  """IG and gradient counterfactuals: true target grade predicted 0, towards the target;
  and (``counterfactuals.reverse``) true grade 0 predicted 1 or higher, towards grade 0."""
  settings = config.counterfactuals
  target = int(settings.target_grade)
  report.heading("Counterfactuals", about="Whether moving pixels along IG or the gradient "
                 "raises the outcome F and flips the grade, and how smooth each change is.")
  if settings.max_images <= 0:
    report.paragraph("Disabled (config.counterfactuals.max_images = 0).")
    return
  report.paragraph(_budget_mode_text(settings.budget))
  logits_fn = model_source.ModelLogits(loaded.model, loaded.variables)
  out = {"budget": settings.budget, "quantity": settings.quantity}
  out[f"towards_grade_{target}"] = _counterfactual_direction(
      config, data, images, logits_fn, report, figures, folder, true_grade=target,
      target=target, accept=lambda p: p == 0, wanted="0", key=f"grade_{target}")
  if settings.reverse and target != 0:
    out["towards_grade_0"] = _counterfactual_direction(
        config, data, images, logits_fn, report, figures, folder, true_grade=0, target=0,
        accept=lambda p: p >= 1, wanted="1 or higher", key="grade_0")
  metrics["counterfactuals"] = out


def _search_misgraded(config, images, logits_fn, label: int, accept, exclude, count: int):
  """Up to `count` indices of the split (beyond the analysed images) with true grade
  `label` whose prediction `accept`s, from a forward pass over the first search_images
  examples; and how many examples were searched."""
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
    keep = [j for j, e in enumerate(examples) if int(e["label"]) == label]
    if not keep:
      continue
    pixels = np.stack([np.asarray(examples[j]["image"], np.uint8) for j in keep])
    pad = batch - len(keep)  # one shape, one compilation
    pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
    probabilities = np.asarray(attributor_lib.probabilities(
        logits_fn, jnp.asarray(grading.to_model_input(pixels))))[:len(keep)]
    found += [part[j] for j, p in zip(keep, probabilities.argmax(-1)) if accept(int(p))]
    if len(found) >= count:
      break
  return found[:count], limit


def _number(value, spec: str = ".3g") -> str:
  return "-" if value is None else format(value, spec)


def linearity_section(config, data, images, loaded, report: Report, figures: list,
                      folder: str, metrics: dict) -> None:
  """Fully connected units' attributions along the gradient: the path, R^2 over active
  units, special units and Hinton diagrams, stated as measured."""
  settings = config.linearity
  count = min(settings.num_images, len(data["index"]))
  report.heading("Linearity of the fully connected units", about="Whether the units' "
                 "attributions grow linearly in c as the input moves along the gradient, and "
                 "whether the averaged gradient stays constant, as the poster explains it.")
  if count == 0:
    report.paragraph("Not run (config.linearity.num_images = 0, or no image).")
    return
  cs = linearity.exponential_cs(settings.start, settings.factor, settings.count)
  x = np.stack([images.read(int(data["index"][i])).image for i in range(count)])
  x = jnp.asarray(grading.to_model_input(x))
  grade = int(data["prediction"][0])  # the first image's predicted outcome, for all
  result = linearity.linearity_experiment(
      loaded.model, loaded.variables, x, grade=grade, cs=cs,
      layers=tuple(settings.layers), steps=config.steps, method=config.method,
      space=settings.quantity, threshold=settings.threshold,
      clip=(-1.0, 1.0) if settings.clip else None)
  label = linearity.quantity_label(grade, settings.quantity)
  why = ("unbounded, as the poster's growing attributions need"
         if settings.quantity == "logit" else
         "bounded: its attributions sum to at most 1 and cannot grow with c")
  clipped = " clipped to the valid range" if settings.clip else ""
  report.paragraph(
      f"Quantity: the {label} ({why}; config.linearity.quantity). {plural(count, 'image')}, "
      f"moved along its gradient, x(c) = x + c dq/dx{clipped}, c = "
      + ", ".join(f"{c:.3g}" for c in cs) + "; layer IG of each unit at every c. "
      "R^2 and slopes are over active series (image, unit) only: a unit whose attribution "
      "does not change with c (e.g. a dead ReLU unit) is inactive and counted separately, "
      f"never scored. Special units: active units with R^2 < {settings.threshold:g} for some "
      "image.")
  summaries = {layer: linearity.layer_summary(result, layer) for layer in result.layers}
  header = ["c", "||x(c) - x|| (pixels)", "mean q(x(c))"]
  for layer in result.layers:
    header += [f"{layer} median |a(c) - a'|", f"{layer} averaged-gradient drift"]
  rows = []
  for j, c in enumerate(cs):
    row = [f"{c:.3g}", f"{np.mean(result.distance[j]):.4g}",
           f"{np.mean(result.quantity[j]):.4g}"]
    for layer in result.layers:
      row += [_number(summaries[layer]["median_abs_difference"][j]),
              _number(summaries[layer]["average_gradient_drift"][j], ".2%")]
    rows.append(row)
  report.paragraph("The path: the achieved distance moved, the quantity, and per layer the "
                   "median difference term |a_j(x(c)) - a_j(baseline)| and the median "
                   "|g_j(c) / g_j(first c) - 1| of the averaged gradient g_j = attribution / "
                   "difference over active units (0 if it stays constant).")
  report.table(header, rows)
  table = []
  for layer in result.layers:
    s = summaries[layer]
    table.append((layer, s["units"], s["active_series"], s["inactive_series"],
                  s["linear_series"], len(s["special_units"]), _number(s["median_r2"], ".4f"),
                  _number(s["min_r2"], ".4f"), _number(s["median_slope"]),
                  _number(s["positive_slope_share"], ".2f")))
    drift = s["average_gradient_drift"][-1]
    report.paragraph(
        f"{layer}, as measured: {s['linear_series']} of {s['active_series']} active series "
        f"are linear in c (R^2 >= {settings.threshold:g}); "
        f"{plural(len(s['special_units']), 'unit')} special; "
        f"{plural(s['inactive_series'], 'series', 'series')} inactive. Between c = {cs[0]:.3g} "
        f"and c = {cs[-1]:.3g} the averaged gradient moved by a median of "
        f"{_number(drift, '.1%')}.")
    matrix = np.asarray(result.attributions[layer])[:, 0]
    title = f"{layer}: unit attributions against c (image 0, {label})"
    fig = linearity.hinton_figure(matrix, title=title, row_labels=[f"{c:.3g}" for c in cs],
                                  special=result.special[layer],
                                  special_label=f"special (R^2 < {settings.threshold:g})",
                                  palette=config.palette)
    path = _save(fig, os.path.join(folder, f"linearity_{layer}.png"), figures, config)
    _show(report, config, path, title)
  report.table(["layer", "units", "active series", "inactive series",
                f"linear (R^2 >= {settings.threshold:g})", "special units",
                "median R^2 (active)", "min R^2 (active)", "median slope (active)",
                "share of positive slopes"], table)
  metrics["linearity"] = {
      "grade": grade, "quantity": settings.quantity, "threshold": settings.threshold,
      "cs": [float(c) for c in cs],
      "distance": [float(np.mean(d)) for d in result.distance],
      "mean_quantity": [float(np.mean(q)) for q in result.quantity], "layers": summaries}
