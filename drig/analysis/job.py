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
  report.md / report.html and metrics.json, each file atomically.

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
from drig.analysis import shards as shards_lib
from drig.analysis import validation
from drig.analysis.attributor import ShardAttributor
from drig.analysis.errors import AnalysisError, ConfigMismatchError
from drig.analysis.images import ImageSet, load_images
from drig.analysis.model_source import LoadedModel, load_model
from drig.analysis.quantity_specs import parse_quantity

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
  images = load_images(config, loaded)
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
    attributor = ShardAttributor(config, loaded, mesh)
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
  # The other hosts wait for host 0's report, so that every process leaves together.
  _barrier("drig:analysis_done")
  return result
