"""Checks an analysis config before anything is written, loaded or compiled.

``validate_config(config)`` checks every field that has a valid range (the
attribution settings, shards, quantities, layer names, images, figures and
host 0's experiments) and raises an ``AnalysisError`` naming the first bad
field, its value and what is allowed. It reads at most the training run's
``config.json`` and builds the model (a Flax module, no weights), so a typo
costs a second rather than a compilation, and no workdir is touched: the
corrected command then runs in the same workdir.
"""

from __future__ import annotations

import glob
import json
import math
import numbers
import os
import re

import ml_collections

from drig import grading
from drig.analysis import figures as figures_lib
from drig.analysis.errors import AnalysisError
from drig.analysis.quantity_specs import parse_quantity
from drig.analysis import selection as selection_lib
from drig.attribution import adaptive
from drig.attribution import arguments
from drig.attribution import baselines as baselines_lib
from drig.attribution import heatmap
from drig.attribution import integration as ig_lib
from drig.attribution import methods as methods_lib
from drig.attribution import layer as layer_lib
from drig.models import classifier
from drig.models import initialization

STORAGE_DTYPES = ("float16", "float32")
NEURONS = ("unit", "channel")
RANDOMISATION_SCOPES = ("all", "head")
COUNTERFACTUAL_BUDGETS = ("l2", "coefficient")
COUNTERFACTUAL_QUANTITIES = ("probability", "logit")
LINEARITY_QUANTITIES = ("logit", "probability")


def _bad(field: str, value, allowed: str) -> AnalysisError:
  return AnalysisError(f"config.{field}={value!r} is not allowed: {allowed}")


def _get(config, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(float(value)))


def _int_at_least(config, field: str, minimum: int) -> int:
  value = _get(config, field)
  if not _is_int(value) or value < minimum:
    raise _bad(field, value, f"an integer >= {minimum}")
  return int(value)


def _one_of(config, field: str, allowed) -> str:
  value = _get(config, field)
  if value not in allowed:
    raise _bad(field, value, "one of " + ", ".join(map(repr, allowed)))
  return value


def _positive_number(config, field: str) -> float:
  value = _get(config, field)
  if not _is_number(value) or value <= 0:
    raise _bad(field, value, "a finite number > 0")
  return float(value)


def _grade(config, field: str, value) -> int:
  if not _is_int(value) or not 0 <= value < grading.NUM_GRADES:
    raise _bad(field, value, f"a grade, an integer in 0..{grading.NUM_GRADES - 1}")
  return int(value)


def _sequence(config, field: str):
  value = _get(config, field)
  if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
    raise _bad(field, value, "a non-empty list")
  return value


def _check_baseline_distribution(config) -> None:
  """config.baseline_distribution: a split name, count >= 1 baselines and an integer seed."""
  split = config.baseline_distribution.split
  if not isinstance(split, str) or not split.strip():
    raise _bad("baseline_distribution.split", split, "a split name such as 'train'")
  _int_at_least(config, "baseline_distribution.count", 1)
  if not _is_int(config.baseline_distribution.seed):
    raise _bad("baseline_distribution.seed", config.baseline_distribution.seed, "an integer")
  if config.data.files and not config.checkpoint and not config.data.name:
    raise _bad("methods", tuple(config.methods),
               "methods over a distribution of baselines (expected_gradients, gradient_shap) "
               "draw them from a data set split (config.baseline_distribution.split): with "
               "config.data.files set config.checkpoint (its data set) or config.data.name")


def _check_methods(config) -> None:
  """config.methods (registered, each once), config.baseline and, for methods over a
  distribution of baselines, config.baseline_distribution."""
  names = _sequence(config, "methods")
  for name in names:
    if name not in methods_lib.METHOD_NAMES:
      raise _bad("methods", tuple(names),
                 f"names from {methods_lib.METHOD_NAMES}; {name!r} is not one")
  if any(methods_lib.METHODS[name].distribution for name in names):
    _check_baseline_distribution(config)
  if len(set(names)) < len(names):
    raise _bad("methods", tuple(names), "each method once")
  baseline = config.baseline
  if not isinstance(baseline, str):
    raise _bad("baseline", baseline, f"a name: one of {baselines_lib.BASELINE_NAMES}")
  try:
    baselines_lib.parse_baseline_name(baseline)
  except arguments.AttributionArgumentError as e:
    raise _bad("baseline", baseline, str(e)) from e


def _check_attribution(config) -> None:
  method = _one_of(config, "method", ig_lib.METHODS)
  _int_at_least(config, "steps", 2 if method == "trapezoid" else 1)
  tolerance = config.tolerance
  if not _is_number(tolerance) or tolerance < 0:
    raise _bad("tolerance", tolerance, "a finite number >= 0 (0: fixed config.steps; > 0: the "
               "relative completeness gap each image's IG must meet)")
  if tolerance >= 1:
    raise _bad("tolerance", tolerance, "below 1 (a relative gap of 100% or more accepts any map)")
  _int_at_least(config, "max_steps", 2)
  _one_of(config, "error_control", adaptive.CONTROLS)
  _int_at_least(config, "chunk_size", 0)
  _int_at_least(config, "batch_groups", 0)
  _int_at_least(config, "top_k", 1)
  _one_of(config, "neurons", NEURONS)
  _int_at_least(config, "shard_size", 1)
  _one_of(config, "storage_dtype", STORAGE_DTYPES)
  _check_methods(config)
  keys = []
  for spec in _sequence(config, "quantities"):
    try:
      keys.append(parse_quantity(spec).key)
    except AnalysisError as e:
      raise _bad("quantities", tuple(config.quantities), str(e)) from e
  if len(set(keys)) < len(keys):
    raise _bad("quantities", tuple(config.quantities), "each quantity once")
  try:
    parse_quantity(config.localization.quantity)
  except AnalysisError as e:
    raise _bad("localization.quantity", config.localization.quantity, str(e)) from e
  if "tolerance" in config.localization:
    tolerance = config.localization.tolerance
    if not _is_number(tolerance) or tolerance < 0:
      raise _bad("localization.tolerance", tolerance, "a finite number >= 0")


def _check_source(config) -> None:
  """The checkpoint step, the initial weights and the images (paths only, nothing read)."""
  if not _is_int(config.seed):
    raise _bad("seed", config.seed, "an integer")
  step = str(config.checkpoint_step)
  if step not in ("best", "latest") and not re.fullmatch(r"\d+", step):
    raise _bad("checkpoint_step", config.checkpoint_step,
               "'best', 'latest' or a step number such as '400'")
  if not config.checkpoint:
    try:
      initialization.check_weight_source(config.init.source, config.init.path)
    except ValueError as e:
      raise _bad("init.source", config.init.source, str(e)) from e
    except FileNotFoundError as e:
      raise _bad("init.path", config.init.path, str(e)) from e
  _int_at_least(config, "num_images", 0)
  _int_at_least(config, "data.image_size", 0)
  if config.data.files:
    pattern = os.path.expanduser(config.data.files)
    if not any(os.path.isfile(p) for p in glob.iglob(pattern, recursive=True)):
      raise _bad("data.files", config.data.files, "a glob that matches files")
  elif not isinstance(config.data.split, str) or not config.data.split.strip():
    raise _bad("data.split", config.data.split, "a split name such as 'test'")
  shuffled = config.randomisation.data_checkpoint
  if shuffled and not os.path.isfile(os.path.join(os.path.expanduser(shuffled), "config.json")):
    raise _bad("randomisation.data_checkpoint", shuffled,
               "a drig training workdir (with config.json) of a run on shuffled labels, e.g. "
               "python -m drig.train --config=configs/base.py:runlocal_shuffled_labels "
               "--workdir=DIR")


def _check_experiments(config) -> None:
  _int_at_least(config, "figures.num_images", 0)
  percentile = config.figures.percentile
  if not _is_number(percentile) or not 0 < percentile <= 100:
    raise _bad("figures.percentile", percentile, "a number in (0, 100]")
  pair = _sequence(config, "figures.pair_grades")
  if len(pair) != 2 or len({_grade(config, "figures.pair_grades", g) for g in pair}) != 2:
    raise _bad("figures.pair_grades", tuple(pair), "two different grades")
  formats = config.figures.formats
  try:
    figures_lib.check_formats(formats)
  except ValueError as e:
    raise _bad("figures.formats", formats, f"a non-empty list of names from "
               f"{figures_lib.FIGURE_FORMATS} ({e})") from None
  _one_of(config, "palette", tuple(heatmap.PALETTES))
  _int_at_least(config, "report_max_rows", 1)
  _int_at_least(config, "randomisation.num_images", 0)
  scope = config.randomisation.scope
  if not isinstance(scope, str) or not scope.strip("/ "):
    raise _bad("randomisation.scope", scope, "'all', 'head' or a parameter path")
  stages = config.randomisation.max_stages
  if not _is_int(stages) or stages < 0 or stages == 1:
    raise _bad("randomisation.max_stages", stages,
               "0 (every layer) or at least 2 (the cascade's first and last stages)")
  for name in _sequence(config, "randomisation.cascade_methods"):
    if name not in methods_lib.METHOD_NAMES or methods_lib.METHODS[name].distribution:
      raise _bad("randomisation.cascade_methods", tuple(config.randomisation.cascade_methods),
                 f"single-baseline method names of drig.attribution.methods; {name!r} is not one")
  _int_at_least(config, "counterfactuals.max_images", 0)
  _int_at_least(config, "counterfactuals.search_images", 0)
  _grade(config, "counterfactuals.target_grade", config.counterfactuals.target_grade)
  _one_of(config, "counterfactuals.budget", COUNTERFACTUAL_BUDGETS)
  cs = _sequence(config, "counterfactuals.cs")
  if not all(_is_number(c) and c > 0 for c in cs):
    raise _bad("counterfactuals.cs", tuple(cs), "finite numbers > 0")
  _one_of(config, "counterfactuals.quantity", COUNTERFACTUAL_QUANTITIES)
  _int_at_least(config, "linearity.num_images", 0)
  _positive_number(config, "linearity.start")
  _positive_number(config, "linearity.factor")
  _int_at_least(config, "linearity.count", 2)
  _one_of(config, "linearity.quantity", LINEARITY_QUANTITIES)
  threshold = config.linearity.threshold
  if not _is_number(threshold) or not 0 < threshold <= 1:
    raise _bad("linearity.threshold", threshold, "a number in (0, 1]")
  _sequence(config, "linearity.layers")


def model_for_validation(config):
  """The model the config names, built without weights (a Flax module).

  Raises:
    AnalysisError: ``config.checkpoint`` has no readable ``config.json``, or
      the model section does not describe a model.
  """
  if config.checkpoint:
    path = os.path.join(os.path.abspath(config.checkpoint), "config.json")
    if not os.path.isfile(path):
      raise AnalysisError(f"config.checkpoint={config.checkpoint!r}: {path} not found; point it "
                          "at a drig training workdir (python -m drig.train --workdir)")
    try:
      with open(path, encoding="utf-8") as f:
        model_config = ml_collections.ConfigDict(json.load(f)["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise AnalysisError(f"config.checkpoint={config.checkpoint!r}: {path} is not a drig "
                          f"training config ({type(e).__name__}: {e})") from e
    field = f"the model section of {path}"
  else:
    model_config, field = config.model, "config.model"
  try:
    return classifier.build_model(model_config)
  except Exception as e:  # pylint: disable=broad-except
    raise AnalysisError(f"{field} does not describe a drig model: {type(e).__name__}: {e}") from e


def _check_layers(config, model) -> None:
  try:
    layer_lib.check_layer_name(model, config.layer)
  except ValueError as e:
    raise _bad("layer", config.layer, str(e)) from e
  if config.linearity.num_images > 0:
    for layer in config.linearity.layers:
      try:
        layer_lib.check_layer_name(model, layer)
      except ValueError as e:
        raise _bad("linearity.layers", tuple(config.linearity.layers), str(e)) from e


def _check_selection_and_study(config) -> None:
  """config.selection (a rule, num_images > 0 unless "first"), its pool, and config.study."""
  try:
    rule = selection_lib.parse_selection(config.selection)
  except selection_lib.SelectionError as e:
    raise _bad("selection", config.selection, str(e)) from e
  pool = _int_at_least(config, "selection_pool", 0)
  if rule.reads_candidates:
    if config.num_images <= 0:
      raise _bad("num_images", config.num_images, f"an integer >= 1 with config.selection="
                 f"{config.selection!r} (how many of the candidates to choose)")
    if pool and pool < config.num_images:
      raise _bad("selection_pool", pool, f"0 (the whole split) or at least config.num_images="
                 f"{config.num_images}")
  study = config.study
  if not isinstance(study.enabled, bool) or not isinstance(study.faithfulness, bool):
    raise _bad("study.enabled", (study.enabled, study.faithfulness),
               "study.enabled and study.faithfulness are True or False")
  _int_at_least(config, "study.faithfulness_points", 2)
  _int_at_least(config, "study.faithfulness_chunk", 1)
  _int_at_least(config, "study.num_resamples", 1)
  _int_at_least(config, "study.num_permutations", 1)
  confidence = study.confidence
  if not _is_number(confidence) or not 0 < confidence < 1:
    raise _bad("study.confidence", confidence, "a number in (0, 1), e.g. 0.95")
  references = _sequence(config, "study.references")
  if not all(isinstance(r, str) and r for r in references):
    raise _bad("study.references", tuple(references), "map names such as 'pixel_ig'")
  if not isinstance(study.control, str) or not study.control:
    raise _bad("study.control", study.control, "a map name such as 'contrast'")


def validate_config(config) -> None:
  """Checks every field of an analysis config (configs/analyze.py) that has a valid range.

  Reads nothing but the training run's config.json (for the layer names);
  writes and compiles nothing.

  Args:
    config: an analysis config.

  Raises:
    AnalysisError: naming the first bad field, its value and what is allowed.
  """
  _check_attribution(config)
  _check_source(config)
  _check_experiments(config)
  _check_selection_and_study(config)
  _check_layers(config, model_for_validation(config))
