"""Adebayo et al.'s data-randomisation check: the maps of a model trained on shuffled labels.

Adebayo et al. (2018) train the same architecture on randomly permuted labels
(``python -m drig.train --config=configs/base.py:runlocal_shuffled_labels``):
such a model can only memorise its training images and learns nothing that
transfers (validation kappa near 0), so an explanation that looks the same
for it as for the properly trained model does not show what the model learnt
from the relation between images and grades.

The check attributes the first ``config.randomisation.num_images`` analysed
images with the shuffled-label model by the job's own per-shard attribution
(``drig.analysis.attributor.ShardAttributor``: pixel IG of the first quantity
and each single-baseline method of ``config.methods``, for the trained model's
predicted grades), and compares each map with the trained model's (from the
shards) by the Spearman rank correlation of their absolute values within the
field of view (``drig.analysis.localization.rank_correlation``), as the
model-randomisation check does.

* ``load_shuffled_model``: the shuffled-label run at its latest checkpoint,
  checked against the trained model's architecture;
* ``validation_kappa``: a training run's validation kappa at a step;
* ``compared_methods``: the maps compared, for an analysis config;
* ``data_randomisation_correlations``: the correlations with any other model;
* ``report_section``: the report's "Data-randomisation check" and
  metrics.json's ``data_randomisation``.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, NamedTuple, Optional

import flax
from flax import traverse_util
import ml_collections
import numpy as np

from drig import files
from drig import parallel
from drig import preprocess
from drig.analysis import attributor as attributor_lib
from drig.analysis import localization
from drig.analysis import model_source
from drig.analysis.errors import AnalysisError
from drig.analysis.model_source import LoadedModel
from drig.analysis.quantity_specs import parse_quantity
from drig.analysis.report_document import Report, plural
from drig.analysis.shards import decode_map, method_map_key
from drig.attribution import methods as methods_lib
from drig.config_diff import config_differences
from drig.models import runs

# The shuffled-label model at the end of its training: the model that memorised
# the permuted labels, whose validation kappa final_metrics.json records.
CHECKPOINT_STEP = "latest"
FIELD = "config.randomisation.data_checkpoint"


class DataRandomisationError(AnalysisError):
  """The shuffled-label model cannot be compared: missing, or of another architecture."""


class DataRandomisationResult(NamedTuple):
  """The check's correlations.

  Attributes:
    quantity: the quantity attributed (the analysis's first), its key.
    maps: the maps' names: "integrated_gradients" (the job's pixel IG) first,
      then the other methods.
    correlations: float64 [maps, images], Spearman rank correlation of |map|
      of the other model with the trained model's (nan where a map is constant).
  """
  quantity: str
  maps: tuple[str, ...]
  correlations: np.ndarray

  def mean(self) -> np.ndarray:
    """[maps]: the mean over images, ignoring undefined correlations (nan if none)."""
    finite = np.isfinite(self.correlations)
    counts = finite.sum(axis=-1)
    sums = np.where(finite, self.correlations, 0.0).sum(axis=-1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _as_dict(section) -> dict:
  """A model or data config section (ConfigDict or mapping) as a plain nested dict."""
  if isinstance(section, ml_collections.ConfigDict):
    return json.loads(section.to_json_best_effort())
  return json.loads(json.dumps(dict(section), default=str))


def _shape_differences(expected, found) -> list[str]:
  """Variable paths missing on either side or of other shapes, "path: shape -> shape"."""
  a = traverse_util.flatten_dict(flax.core.unfreeze(expected), sep="/")
  b = traverse_util.flatten_dict(flax.core.unfreeze(found), sep="/")
  return [f"{path}: {tuple(np.shape(a[path])) if path in a else '<absent>'} -> "
          f"{tuple(np.shape(b[path])) if path in b else '<absent>'}"
          for path in sorted(set(a) | set(b))
          if path not in a or path not in b or np.shape(a[path]) != np.shape(b[path])]


def load_shuffled_model(workdir: str, trained: LoadedModel, image_size: int) -> LoadedModel:
  """The shuffled-label run in ``workdir`` at its latest checkpoint, checked against ``trained``.

  Args:
    workdir: a drig.train workdir (``config.randomisation.data_checkpoint``).
    trained: the analysed model.
    image_size: the analysed images' size; the run must have been trained at it.

  Returns:
    The run's LoadedModel (``model_source.load_model``'s loader).

  Raises:
    DataRandomisationError: the workdir, its config.json or its checkpoints are
      missing or unreadable; or its model section, input size or variables
      differ from the trained model's (naming the file and the fields).
  """
  if not os.path.isdir(workdir):
    raise DataRandomisationError(
        f"{FIELD}={workdir!r}: no such directory; train the shuffled-label model first, e.g. "
        "python -m drig.train --config=configs/base.py:runlocal_shuffled_labels "
        f"--workdir={workdir}")
  source = ml_collections.ConfigDict({"checkpoint": workdir, "checkpoint_step": CHECKPOINT_STEP})
  try:
    other = model_source.load_model(source)
  except AnalysisError as e:
    raise DataRandomisationError(f"{FIELD}={workdir!r}: {e.__cause__ or e}") from e
  config_path = os.path.join(os.path.abspath(workdir), "config.json")
  differences = config_differences(_as_dict(trained.model_config), _as_dict(other.model_config))
  if differences:
    raise DataRandomisationError(
        f"{FIELD}: {config_path} describes another architecture than the analysed model's; "
        f"model section differences (analysed -> shuffled-label run): "
        f"{'; '.join(differences[:12])}. Train the shuffled-label model with the same model "
        "config (configs/base.py:<arg>_shuffled_labels for the <arg> you trained).")
  trained_size = (other.training_config or {}).get("data", {}).get("image_size")
  if trained_size is not None and int(trained_size) != int(image_size):
    raise DataRandomisationError(
        f"{FIELD}: {config_path} trained at data.image_size {trained_size}, but the analysed "
        f"images are {image_size} px; train the shuffled-label model at the same size.")
  shapes = _shape_differences(trained.variables, other.variables)
  if shapes:
    raise DataRandomisationError(
        f"{FIELD}: the checkpoint of {other.description} does not fit the analysed model's "
        f"variables: {'; '.join(shapes[:12])}" + (f"; and {len(shapes) - 12} more"
                                                  if len(shapes) > 12 else ""))
  return other


def validation_kappa(workdir: str, step: int) -> Optional[float]:
  """A training run's validation quadratic kappa at ``step``, or None if not recorded.

  From final_metrics.json's last validation when it is at ``step``, else from the
  run's metrics.jsonl (``drig.models.runs.kappa_by_step``).
  """
  path = os.path.join(workdir, "final_metrics.json")
  if os.path.isfile(path):
    try:
      final = files.read_json(path)
    except (OSError, ValueError):
      final = {}
    validation = final.get("validation") or {}
    if final.get("step") == step and "quadratic_kappa" in validation:
      return float(validation["quadratic_kappa"])
  kappa = runs.kappa_by_step(workdir).get(int(step))
  return None if kappa is None else float(kappa)


def compared_methods(config) -> tuple[str, ...]:
  """The maps compared: pixel IG, then each single-baseline method of ``config.methods``.

  Methods over a distribution of baselines (expected_gradients, gradient_shap) are
  left out: they would need the job's baseline images loaded again.
  """
  others = [name for name in config.methods
            if name != "integrated_gradients" and not methods_lib.METHODS[name].distribution]
  return ("integrated_gradients",) + tuple(dict.fromkeys(others))


def data_randomisation_correlations(config, data: Mapping[str, np.ndarray], pixels: np.ndarray,
                                    other: LoadedModel) -> DataRandomisationResult:
  """The trained model's maps (from ``data``) against ``other``'s, per map and image.

  ``other``'s maps are computed by ``ShardAttributor`` on the images padded to one
  shard (the shapes the job compiled, so no program compiles again), with the same
  random keys as the trained model's first shard and the trained model's grades
  for the "predicted" quantity.

  Args:
    config: the analysis config.
    data: the trained model's shard arrays (``drig.analysis.shards.load_shards``),
      the first images of which are ``pixels``; needs ``index``, ``prediction``
      and the maps of ``compared_methods(config)`` for the first quantity.
    pixels: uint8 [N, S, S, 3], the images compared (N <= config.shard_size).
    other: the model to compare with (same architecture).

  Returns:
    A DataRandomisationResult.

  Raises:
    DataRandomisationError: no image, more images than a shard, or maps missing
      from ``data``.
  """
  count = len(pixels)
  if count == 0 or count > config.shard_size:
    raise DataRandomisationError(
        f"pixels: {count} images; the check compares 1 to config.shard_size "
        f"({config.shard_size})")
  spec = parse_quantity(config.quantities[0])
  names = compared_methods(config)
  keys = {name: method_map_key(name, spec.key) for name in names}
  missing = [key for key in keys.values() if key not in data]
  if missing:
    raise DataRandomisationError(f"the shards hold no {', '.join(missing)}; were they written "
                                 "with these config.methods and config.quantities?")
  pad = config.shard_size - count
  batch = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
  predictions = np.concatenate([np.asarray(data["prediction"][:count]),
                                np.repeat(np.asarray(data["prediction"][count - 1:count]), pad)])
  # The first shard's random keys (attribution_key reads its first real index).
  indices = np.concatenate([np.asarray(data["index"][:count]), np.full((pad,), -1)])
  attributor = attributor_lib.ShardAttributor(config, other, parallel.local_mesh())
  attributor.quantities = [spec]
  attributor.methods = [name for name in names if name != "integrated_gradients"]
  out = attributor(batch, indices, None, None, predictions=predictions)
  fov = preprocess.field_of_view(pixels.shape[1])
  table = np.full((len(names), count), np.nan)
  for m, name in enumerate(names):
    trained = decode_map(data, keys[name])
    others = decode_map(out, keys[name])
    for i in range(count):
      table[m, i] = localization.rank_correlation(
          localization.saliency(trained[i], "absolute"),
          localization.saliency(others[i], "absolute"), fov)
  return DataRandomisationResult(spec.key, names, table)


def report_section(config, data, images, loaded: LoadedModel, report: Report,
                   metrics: dict) -> None:
  """The report's "Data-randomisation check" (``config.randomisation.data_checkpoint``).

  Raises:
    DataRandomisationError: the shuffled-label run is missing or of another
      architecture (the job reports it in place of the section).
  """
  workdir = config.randomisation.get("data_checkpoint", "")
  if not workdir:
    return
  report.heading("Data-randomisation check", about="Whether the maps depend on what the model "
                 "learnt from the labels (Adebayo et al.'s sanity check): the same architecture "
                 "trained on shuffled labels learns nothing that transfers, so maps that stay "
                 "rank-correlated with its maps do not show what the trained model learnt.")
  count = min(config.randomisation.num_images, len(data["index"]), config.shard_size)
  if count == 0:
    report.paragraph("Not run (config.randomisation.num_images = 0, or no image).")
    return
  pixels = np.stack([images.read(int(data["index"][i])).image for i in range(count)])
  other = load_shuffled_model(workdir, loaded, pixels.shape[1])
  other_step = int(other.source["step"])
  other_kappa = validation_kappa(other.source["checkpoint"], other_step)
  trained_kappa = (validation_kappa(loaded.source["checkpoint"], int(loaded.source["step"]))
                   if "checkpoint" in loaded.source else None)
  shuffled = bool(((other.training_config or {}).get("data") or {}).get("shuffle_labels", False))
  result = data_randomisation_correlations(config, data, pixels, other)
  spec = parse_quantity(config.quantities[0])

  def kappa_words(kappa):
    return "not recorded" if kappa is None else f"{kappa:.4f}"

  report.paragraph(
      f"Shuffled-label model: {other.description}; validation quadratic kappa "
      f"{kappa_words(other_kappa)} (the analysed model's: {kappa_words(trained_kappa)}). "
      + ("Its config.json trains on a random permutation of the train split's labels "
         "(data.shuffle_labels); validation kept the true labels, so a kappa near 0 means it "
         "learnt nothing that transfers." if shuffled else
         "Its config.json does not set data.shuffle_labels: it was trained on the true labels, "
         "so this compares two trained models, not Adebayo et al.'s check."))
  means = result.mean()
  rows = [(name, "n/a" if not np.isfinite(means[m]) else f"{means[m]:.3f}",
           ", ".join("n/a" if not np.isfinite(c) else f"{c:.3f}" for c in result.correlations[m]))
          for m, name in enumerate(result.maps)]
  report.paragraph(
      f"Spearman rank correlation of |map| ({spec.label}, the analysed model's predicted "
      f"grades) between the analysed model and the shuffled-label model, within the field of "
      f"view, over {plural(count, 'image')}. Near 0: the map depends on what the model learnt "
      "from the labels; near 1: it does not.")
  report.table(["map", "mean", "per image"], rows)
  metrics["data_randomisation"] = {
      "checkpoint": other.source["checkpoint"], "step": other_step,
      "shuffled_labels": shuffled, "validation_kappa": other_kappa,
      "trained_validation_kappa": trained_kappa, "quantity": result.quantity, "images": count,
      "maps": {name: {"mean": float(means[m]), "per_image": result.correlations[m].tolist()}
               for m, name in enumerate(result.maps)}}
