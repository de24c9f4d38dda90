"""The batch attribution job: ``run_analysis(config, workdir)`` (``python -m drig.analyze``).

Design:
* The images are cut into shards of ``config.shard_size`` in a fixed order;
  shard i belongs to host ``i % jax.process_count()``. Each host attributes
  its own shards on its local devices (a mesh over ``jax.local_devices()``,
  images split, weights replicated), so hosts never wait for one another
  until the end, and a restarted host redoes only its own unfinished shards.
* Each shard is one ``.npz`` file written atomically (a temporary file in the
  same folder, then ``os.replace``); an existing shard file is finished work.
  Every shard is padded to ``shard_size`` images, so one program is compiled
  per shape. docs/analysis.md lists the keys.
* Every config field is checked first (``validation``); only then is the
  config (and the checkpoint it resolved to) stored in the workdir, and a
  rerun with a different one is refused rather than mixing results.
* An existing shard file that looks complete (its zip index, keys and
  format_version) is finished work; a damaged one is moved aside and
  attributed again by its host.
* After a barrier, host 0 alone reads every shard and writes the figures,
  the localisation scores, the sanity and counterfactual experiments,
  report.md / report.html and metrics.json, each file atomically, then the
  summary scalars and figures as TensorBoard events in ``workdir/tensorboard``
  (``tensorboard_export``).

The parts live in their own modules: the model (``model_source``), the images
(``images``), one shard's attribution (``attributor``), the shard files
(``shards``) and host 0's report (``report``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from drig import config_diff
from drig import grading
from drig import parallel
from drig import preprocess
from drig import progress as progress_lib
from drig import files
from drig.analysis import report as report_lib
from drig.analysis import selection as selection_lib
from drig.analysis import shards as shards_lib
from drig.analysis import study_scores
from drig.analysis import tensorboard_export
from drig.analysis import validation
from drig.analysis.attributor import ShardAttributor, probabilities
from drig.analysis.errors import AnalysisError, ConfigMismatchError
from drig.analysis.images import (ImageSet, SelectedImages, load_baseline_distribution,
                                  load_images, read_candidates)
from drig.analysis.model_source import LoadedModel, ModelLogits, load_model
from drig.analysis.quantity_specs import parse_quantity
from drig.attribution import methods as methods_lib

CONFIG_FILE = "analysis_config.json"


@dataclasses.dataclass
class AnalysisResult:
  """What run_analysis produced.

  Attributes:
    workdir: the analysis workdir.
    shards: every shard file of the job (all hosts).
    shards_written: the shards this call (this host) attributed; the rest existed.
    num_images: images analysed (skipped ones excluded; host 0 only, else None).
    skipped: [{"index", "name", "reason"}] (host 0 only).
    figures: paths of the PNG figures (host 0 only).
    report: paths of report.md, report.html and metrics.json (host 0 only).
    metrics: the content of metrics.json (host 0 only).
  """
  workdir: str
  shards: list
  shards_written: list
  num_images: Optional[int] = None
  skipped: list = dataclasses.field(default_factory=list)
  figures: list = dataclasses.field(default_factory=list)
  report: dict = dataclasses.field(default_factory=dict)
  metrics: dict = dataclasses.field(default_factory=dict)


def _config_record(config, loaded: LoadedModel) -> dict:
  """What the workdir stores: the config and what it resolved to (checkpoint and step)."""
  config_dict = json.loads(config.to_json_best_effort(sort_keys=True))
  return {"config": config_dict, "resolved": {"model": loaded.source}}


def check_workdir_config(workdir: str, record: dict, *, write: bool) -> None:
  """Stores the config record, or checks it against the stored one.

  Raises:
    ConfigMismatchError: naming the workdir and each differing field.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    stored = files.read_json(path)
    if stored != record:
      diffs = config_diff.config_differences(stored, record)
      raise ConfigMismatchError(
          f"{workdir} holds the results of another analysis config ({path}); differences: "
          f"{'; '.join(diffs[:12])}. Use a new --workdir, or delete the old one to redo it.")
    return
  if write:
    files.atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _usable_shard(path: str, keys) -> bool:
  """Whether the shard file exists and looks complete; a damaged one is moved aside."""
  if not os.path.exists(path):
    return False
  problem = shards_lib.shard_problem(path, keys)
  if problem is None:
    return True
  moved = files.move_aside(path)
  logging.warning("damaged shard %s (%s): moved to %s, attributing it again", path, problem,
                  moved)
  return False


def _report_is_current(metrics_path: str, shards: list) -> bool:
  """metrics.json exists and no shard is newer (another host may have redone one)."""
  if not os.path.exists(metrics_path):
    return False
  written = os.stat(metrics_path).st_mtime_ns
  return all(os.stat(p).st_mtime_ns <= written for p in shards)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def attribute_shard(attributor: ShardAttributor, images: ImageSet, shard: int,
                    shard_size: int, field_of_view: np.ndarray) -> dict:
  """Reads, attributes and collects shard ``shard``'s images (padded to shard_size)."""
  start = shard * shard_size
  indices = list(range(start, min(start + shard_size, len(images))))
  examples, skipped = [], []
  for index in indices:
    example = images.read(index)
    if isinstance(example, str):
      name = images.name(index)
      skipped.append((index, name, example))
      logging.warning("skipping image %d (%s): %s", index, name, example)
    else:
      examples.append(example)
  size = images.image_size
  padding = np.full((size, size, 3), grading.HALF_GRAY, np.uint8)
  batch = np.stack([e.image for e in examples] + [padding] * (shard_size - len(examples)))
  if batch.shape[1:3] != (size, size):
    raise AnalysisError(f"shard {shard}: images of shape {batch.shape[1:]}, expected {size}")
  padded_indices = np.array([e.index for e in examples] + [-1] * (shard_size - len(examples)))
  masks = None
  if images.has_masks:
    masks = [e.masks for e in examples] + [None] * (shard_size - len(examples))
  arrays = attributor(batch, padded_indices, field_of_view, masks)
  if attributor.config.study.enabled and masks is not None:
    arrays.update(study_scores.shard_study_arrays(attributor.config, attributor.logits_fn, batch,
                                                  padded_indices, field_of_view, masks, arrays))
  n = len(examples)
  out = {key: value[:n] for key, value in arrays.items()
         if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == shard_size}
  out.update({key: value for key, value in arrays.items() if key not in out})
  out["index"] = np.array([e.index for e in examples], np.int64)
  out["name"] = np.array([e.name for e in examples], dtype=np.str_)
  out["label"] = np.array([e.label for e in examples], np.int32)
  out["skipped_index"] = np.array([s[0] for s in skipped], np.int64)
  out["skipped_name"] = np.array([s[1] for s in skipped], dtype=np.str_)
  out["skipped_reason"] = np.array([s[2] for s in skipped], dtype=np.str_)
  out["format_version"] = np.array(shards_lib.SHARD_FORMAT_VERSION)
  return out


def predicted_grades(loaded: LoadedModel, images: np.ndarray, batch_size: int) -> np.ndarray:
  """The model's grades for uint8 images [N, S, S, 3], in batches of one shape (one program)."""
  logits_fn = ModelLogits(loaded.model, loaded.variables)
  grades = []
  for start in range(0, len(images), batch_size):
    part = images[start:start + batch_size]
    padded = np.concatenate([part, np.repeat(part[-1:], batch_size - len(part), axis=0)])
    grades.append(np.asarray(probabilities(logits_fn, grading.to_model_input(padded)))
                  .argmax(axis=-1)[:len(part)])
  return np.concatenate(grades).astype(np.int64)


def select_images(config, loaded: LoadedModel, pool: ImageSet) -> ImageSet:
  """``config.num_images`` of ``pool`` by ``config.selection`` (``drig.analysis.selection``).

  "first" returns the pool (already cut to num_images); any other rule reads
  every candidate once (and runs the model on them for rules on predictions).
  Every process computes the same choice (a pure function of the candidates and
  config.seed).

  Raises:
    AnalysisError: the rule needs masks or grades the images lack, or no candidate fits.
  """
  rule = selection_lib.parse_selection(config.selection)
  if not rule.reads_candidates:
    return pool
  started = time.perf_counter()
  candidates = read_candidates(pool, with_images=rule.needs_predictions)
  predictions = (predicted_grades(loaded, candidates.images, config.shard_size)
                 if rule.needs_predictions else None)
  try:
    if rule.kind == "lesion":
      selection_lib.parse_selection(config.selection, candidates.lesion_names)
    chosen = selection_lib.select(rule, config.num_images, labels=candidates.labels,
                                  predictions=predictions, presence=candidates.presence,
                                  lesion_names=candidates.lesion_names, seed=config.seed)
  except selection_lib.SelectionError as e:
    raise AnalysisError(f"config.selection={config.selection!r}: {e} ({pool.description})") from e
  if not len(chosen):
    raise AnalysisError(f"config.selection={config.selection!r}: no image among the "
                        f"{len(candidates.indices)} candidates fits ({pool.description}); "
                        "raise config.selection_pool or choose another rule")
  if len(chosen) < config.num_images:
    logging.warning("selection %r: only %d of the %d images asked for fit among %d candidates",
                    config.selection, len(chosen), config.num_images, len(candidates.indices))
  logging.info("selection %r: %d images from %d candidates in %.1f s", config.selection,
               len(chosen), len(candidates.indices), time.perf_counter() - started)
  return SelectedImages(pool, candidates.indices[chosen],
                        selection_lib.describe(rule, len(chosen), len(candidates.indices)))


def run_analysis(config, workdir: str) -> AnalysisResult:
  """Runs the batch attribution job that ``config`` describes; resumes in ``workdir``.

  Args:
    config: an analysis config (configs/analyze.py).
    workdir: where shards, figures and the report go.

  Returns:
    An AnalysisResult (the summary fields on host 0 only).

  Raises:
    AnalysisError: a missing or wrong checkpoint, data set or setting, naming it.
    ConfigMismatchError: ``workdir`` holds results of another config.
  """
  # Every field first: a bad value costs no compilation and leaves the workdir untouched.
  validation.validate_config(config)
  workdir = os.path.abspath(workdir)
  is_host0 = jax.process_index() == 0
  local = jax.local_devices()
  if config.shard_size % len(local):
    raise AnalysisError(f"config.shard_size={config.shard_size} does not divide by the "
                        f"{len(local)} local devices; choose a multiple of {len(local)}")

  loaded = load_model(config)
  images = select_images(config, loaded, load_images(config, loaded))
  baseline_images = None
  if any(methods_lib.METHODS[m].distribution for m in config.methods):
    # Once per job, before the workdir is touched; every process draws the same
    # images (a named key, the same split).
    distribution = load_baseline_distribution(config, loaded, images.image_size)
    logging.info("baseline distribution: %s", distribution.description)
    baseline_images = distribution.images
  record = _config_record(config, loaded)
  os.makedirs(os.path.join(workdir, "shards"), exist_ok=True)
  check_workdir_config(workdir, record, write=is_host0)
  _barrier("drig:analysis_config")
  logging.info("model: %s", loaded.description)
  logging.info("images: %s", images.description)

  mesh = parallel.local_mesh()
  num_shards = -(-len(images) // config.shard_size)
  hosts = jax.process_count()
  mine = [s for s in range(num_shards) if s % hosts == jax.process_index()]
  keys = shards_lib.expected_keys((parse_quantity(q).key for q in config.quantities),
                                  config.methods)
  todo = [s for s in mine if not _usable_shard(shards_lib.shard_path(workdir, s), keys)]
  logging.info("%d images in %d shards of %d; host %d of %d owns %d, %d to do; mesh %s",
               len(images), num_shards, config.shard_size, jax.process_index(), hosts,
               len(mine), len(todo), dict(mesh.shape))
  field_of_view = preprocess.field_of_view(images.image_size)
  written = []
  if todo:
    attributor = ShardAttributor(config, loaded, mesh, baseline_images)
    started, done_images = time.perf_counter(), 0
    first_done, first_images = None, 0
    remaining = sum(min(config.shard_size, len(images) - s * config.shard_size) for s in todo)
    for shard in todo:
      arrays = attribute_shard(attributor, images, shard, config.shard_size, field_of_view)
      path = shards_lib.shard_path(workdir, shard)
      files.atomic_savez(path, arrays)
      written.append(path)
      done_images += len(arrays["index"]) + len(arrays["skipped_index"])
      now = time.perf_counter()
      if first_done is None:  # the first shard includes the compilation: rate from the rest
        first_done, first_images = now, done_images
        rate = done_images / (now - started)
      else:
        rate = (done_images - first_images) / (now - first_done)
      logging.info("shard %d done (%d/%d images of this host) | %.2f images/s | ETA %s",
                   shard, done_images, remaining, rate,
                   progress_lib.format_eta((remaining - done_images) / rate
                                           if rate > 0 else float("nan")))
  _barrier("drig:analysis_shards")
  shards = [shards_lib.shard_path(workdir, s) for s in range(num_shards)]
  result = AnalysisResult(workdir, shards, written)
  if is_host0:
    missing = [p for p in shards if not os.path.exists(p)]
    if missing:
      raise AnalysisError(f"{len(missing)} shard files are missing after every host finished "
                          f"(e.g. {missing[0]}); is {workdir} on a file system all hosts share?")
    metrics_path = os.path.join(workdir, "metrics.json")
    if not written and _report_is_current(metrics_path, shards):
      # Nothing new and host 0's outputs complete (metrics.json is written last).
      logging.info("every shard and the report exist already: nothing to do")
      result = report_lib.finished_result(workdir, result)
    else:
      try:
        result = report_lib.finish(config, workdir, result, loaded, images, field_of_view)
      except shards_lib.ShardReadError as e:
        # Damaged after its host checked it: keep it aside so a rerun redoes it.
        moved = files.move_aside(e.path)
        raise AnalysisError(f"{e}; moved to {moved}. Rerun the same command: the shard's "
                            f"host attributes it again.") from e
      tensorboard_export.write_analysis(workdir, result.metrics, result.figures,
                                        step=int(loaded.source.get("step", 0)))
  # The other hosts wait for host 0's report, so that every process leaves together.
  _barrier("drig:analysis_done")
  return result
