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
* The config (and the checkpoint it resolved to) is stored in the workdir;
  a rerun with a different one is refused rather than mixing results.
* After a barrier, host 0 alone reads every shard and writes the figures,
  the localisation scores, the sanity and counterfactual experiments,
  report.md / report.html and metrics.json, each file atomically.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution import integration as ig_lib
from drig.attribution import layer as layer_lib
from drig.attribution import quantities as quantities_lib
from drig.attribution import regions as active_regions_lib
from drig.attribution import sharding as sharding_lib

NUM_GRADES = quantities_lib.NUM_GRADES
SHARD_PATTERN = "shard-{:05d}.npz"
CONFIG_FILE = "analysis_config.json"
SHARD_FORMAT_VERSION = 1


class AnalysisError(ValueError):
  """The analysis cannot run with this config, model or workdir; says why."""


class ConfigMismatchError(AnalysisError):
  """The workdir holds results of another config."""


# --------------------------------------------------------------------------- #
# Atomic files.


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file in the same folder and os.replace."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_savez(path: str, arrays: dict) -> None:
  """np.savez_compressed(arrays) to ``path``, atomically."""
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- #
# Quantities.


@dataclasses.dataclass(frozen=True)
class QuantitySpec:
  """A parsed quantity: spec "predicted" | "grade:K" | "diff:A:B"; key names shard arrays."""
  spec: str
  key: str
  kind: str
  grades: tuple[int, ...]

  @property
  def label(self) -> str:
    if self.kind == "predicted":
      return "predicted grade"
    if self.kind == "grade":
      return f"grade {self.grades[0]}"
    return f"grade {self.grades[0]} - grade {self.grades[1]}"


def parse_quantity(spec: str) -> QuantitySpec:
  """Parses a quantity spec; AnalysisError naming the accepted forms otherwise."""
  text = str(spec).strip()
  if text == "predicted":
    return QuantitySpec(text, "predicted", "predicted", ())
  match = re.fullmatch(r"grade:(\d)", text)
  if match and int(match.group(1)) < NUM_GRADES:
    g = int(match.group(1))
    return QuantitySpec(text, f"grade_{g}", "grade", (g,))
  match = re.fullmatch(r"diff:(\d):(\d)", text)
  if match and max(map(int, match.groups())) < NUM_GRADES and match.group(1) != match.group(2):
    a, b = map(int, match.groups())
    return QuantitySpec(text, f"diff_{a}_{b}", "diff", (a, b))
  raise AnalysisError(f"unknown quantity {spec!r}: use 'predicted', 'grade:K' or 'diff:A:B' "
                      f"with grades in 0..{NUM_GRADES - 1}")


@jax.tree_util.register_pytree_node_class
class PerImageGrade:
  """x -> softmax(logits_fn(x))[n, grade_n]: each image's own grade (e.g. its prediction).

  The attribution engine calls a quantity on two layouts of a batch of N
  images: the images themselves (or their baselines: [N]) and path points,
  image-major ([N * c], image n's rows n*c ... n*c+c-1, for any c). The
  per-image read-out follows from the batch size.

  Attributes:
    logits_fn: x -> logits [B, G].
    weights: float32 [N, G], one-hot rows.
  """

  def __init__(self, logits_fn: Callable, weights):
    self.logits_fn = logits_fn
    self.weights = weights

  def __call__(self, x):
    logits = self.logits_fn(x)
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    batch, n = probabilities.shape[0], self.weights.shape[0]
    weights = self.weights.astype(jnp.float32)
    if batch % n:
      raise AnalysisError(f"PerImageGrade: a batch of {batch} rows for {n} images")
    # [N]: the images (or baselines); [N * c]: image-major path points.
    weights = jnp.repeat(weights, batch // n, axis=0)
    return jnp.sum(probabilities * weights, axis=-1)

  def tree_flatten(self):
    return (self.logits_fn, self.weights), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)


def make_quantity(spec: QuantitySpec, logits_fn: Callable, predictions) -> Callable:
  """The quantity's function x -> [N] around ``logits_fn`` (a pytree)."""
  if spec.kind == "grade":
    return quantities_lib.probability_of_grade(logits_fn, spec.grades[0])
  if spec.kind == "diff":
    return quantities_lib.grade_difference(logits_fn, *spec.grades)
  weights = jax.nn.one_hot(jnp.asarray(predictions), NUM_GRADES, dtype=jnp.float32)
  return PerImageGrade(logits_fn, weights)


def path_chunk(config_chunk: int, steps: int, num_images: int) -> int:
  """Path points per image per call: the config's, or about the backend's default
  points per call with the least padding (`default_chunk_size`)."""
  if config_chunk > 0:
    return min(config_chunk, steps)
  return ig_lib.default_chunk_size(steps, num_images)


def batch_groups(config_groups: int, chunk: int, num_images: int, num_devices: int) -> int:
  """Parts each model call's batch is split into (`drig.attribution.integration.BatchGroups`).

  The config's if positive. Automatic (0): the backend's groups per call (2 on CPUs,
  1 on accelerators) when the engine cannot split along the path (one path point per
  image per call), each part keeps at least 2 images, and the batch is on one device
  (a sharded batch is not split); otherwise 1.
  """
  if config_groups > 0:
    return config_groups
  groups = ig_lib.default_groups_per_call()
  if chunk > 1 or num_devices > 1 or num_images < 2 * groups:
    return 1
  return groups


# --------------------------------------------------------------------------- #
# The model.


@jax.tree_util.register_pytree_node_class
class ModelLogits:
  """x -> model.apply(variables, x) logits, inference mode; a pytree (weights traced)."""

  def __init__(self, model, variables):
    self.model, self.variables = model, variables

  def __call__(self, x):
    return self.model.apply(self.variables, x, train=False)

  def tree_flatten(self):
    return (self.variables,), self.model

  @classmethod
  def tree_unflatten(cls, model, children):
    return cls(model, children[0])


@dataclasses.dataclass
class LoadedModel:
  model: Any
  variables: dict
  model_config: Any
  training_config: Optional[dict]  # the training run's config.json, if any
  description: str                 # where the weights came from
  source: dict                     # stored with the config (what was resolved)


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _kappa_by_step(workdir: str) -> dict[int, float]:
  """Validation kappa per step from the training run's metrics.jsonl (the last record wins)."""
  path = os.path.join(workdir, "metrics.jsonl")
  kappas = {}
  if not os.path.exists(path):
    return kappas
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a crash
      if "val/quadratic_kappa" in record:
        kappas[int(record["step"])] = float(record["val/quadratic_kappa"])
  return kappas


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """Committed steps of a CheckpointManager directory."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(e) for e in os.listdir(checkpoint_dir)
                if e.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, e)))


def choose_checkpoint_step(workdir: str, which: str) -> tuple[int, str]:
  """The step to restore from a training workdir, and why.

  "best": the kept checkpoint with the highest validation kappa (from
  metrics.jsonl; the trainer keeps the best one by kappa), else the latest;
  "latest"; or a step number.
  """
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  steps = checkpoint_steps(checkpoint_dir)
  if not steps:
    raise AnalysisError(f"config.checkpoint={workdir!r}: no checkpoints in {checkpoint_dir}; "
                        "is it a drig training workdir (python -m drig.train --workdir=...)?")
  which = str(which).strip()
  if which == "latest":
    return steps[-1], "latest"
  if which == "best":
    kappas = _kappa_by_step(workdir)
    scored = [(kappas[s], s) for s in steps if s in kappas]
    if scored:
      kappa, step = max(scored)
      return step, f"best validation kappa {kappa:.4f}"
    return steps[-1], "latest (no validation kappa recorded for the kept checkpoints)"
  if which.isdigit() and int(which) in steps:
    return int(which), "config.checkpoint_step"
  raise AnalysisError(f"config.checkpoint_step={which!r}: use 'best', 'latest' or one of the "
                      f"kept steps {steps} of {checkpoint_dir}")


def load_model(config) -> LoadedModel:
  """The model and variables the config names (see configs/analyze.py)."""
  from drig.models import importer  # pylint: disable=g-import-not-at-top
  from drig.training import trainer  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  if config.checkpoint:
    workdir = os.path.abspath(config.checkpoint)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
      raise AnalysisError(f"config.checkpoint={config.checkpoint!r}: {config_path} not found; "
                          "point it at a drig training workdir (python -m drig.train --workdir)")
    try:
      training = _read_json(config_path)
      model_config = ml_collections.ConfigDict(training["model"])
    except (json.JSONDecodeError, KeyError) as e:
      raise AnalysisError(f"{config_path}: not a drig training config ({e})") from e
    step, why = choose_checkpoint_step(workdir, config.checkpoint_step)
    model = trainer.build_model(model_config)
    try:
      variables = importer.load_drig_checkpoint(os.path.join(workdir, "checkpoints"), step)
    except importer.WeightImportError as e:
      raise AnalysisError(f"config.checkpoint={config.checkpoint!r}: {e}") from e
    description = f"{workdir}, step {step} ({why})"
    return LoadedModel(model, variables, model_config, training, description,
                       {"checkpoint": workdir, "step": step})
  model_config = config.model
  model = trainer.build_model(model_config)
  image_size = config.data.image_size or 256
  init_config = ml_collections.ConfigDict({
      "init": {"source": config.init.source, "path": config.init.path},
      "data": {"image_size": image_size}, "model": model_config.to_dict()})
  try:
    trainer.check_inputs(ml_collections.ConfigDict({
        "init": init_config.init.to_dict(), "data": {"name": "none"}}))
    variables, report = trainer.initial_variables(init_config, model,
                                                  jax.random.key(config.seed))
  except (FileNotFoundError, importer.WeightImportError) as e:
    raise AnalysisError(f"config.init ({config.init.source}, {config.init.path!r}): {e}") from e
  return LoadedModel(model, variables, model_config, None, f"config.init: {report}",
                     {"init": config.init.source, "path": config.init.path})


# --------------------------------------------------------------------------- #
# Images.


@dataclasses.dataclass
class Example:
  index: int
  name: str
  label: int                   # -1: unknown
  image: np.ndarray            # uint8 [H, W, 3], preprocessed
  photo: Optional[np.ndarray]  # uint8, the photograph before preprocessing, if known
  masks: Optional[dict]        # lesion name -> bool [H, W]


class ImageSet:
  """The images to analyse, read on demand: ``len(s)`` and ``s.read(index)``.

  ``read`` returns an Example, or a string saying why the image is skipped.
  """

  has_masks = False
  image_size = 0
  description = ""

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, index: int):
    raise NotImplementedError


class DatasetImages(ImageSet):
  """A split of a TFDS data set prepared by drig (synthetic_fundus, eyepacs, ...)."""

  def __init__(self, data_config, split: str, num_images: int):
    from drig.data import datasets  # pylint: disable=g-import-not-at-top
    try:
      builder = datasets.load_builder_from_config(data_config, prepare=False)
    except datasets.DatasetNotPreparedError as e:
      raise AnalysisError(f"{e}") from e
    if split not in builder.info.splits:
      raise AnalysisError(f"data set {builder.info.full_name} has no split {split!r}; splits: "
                          f"{sorted(builder.info.splits)}")
    self.source = builder.as_data_source(split)
    features = builder.info.features
    self.has_masks = "masks" in features
    self.mask_names = tuple(features["masks"].keys()) if self.has_masks else ()
    self.has_photo = "photo" in features
    self.image_size = int(features["image"].shape[0])
    total = len(self.source)
    self.length = total if num_images <= 0 else min(num_images, total)
    self.description = f"{builder.info.full_name} split {split!r}: {self.length} of {total}"

  def __len__(self):
    return self.length

  def read(self, index: int):
    example = self.source[index]
    name = example.get("name", str(index))
    if isinstance(name, bytes):
      name = name.decode("utf-8", "replace")
    masks = ({k: np.asarray(v).astype(bool) for k, v in example["masks"].items()}
             if self.has_masks else None)
    return Example(index, str(name), int(example.get("label", -1)),
                   np.asarray(example["image"], np.uint8),
                   np.asarray(example["photo"], np.uint8) if self.has_photo else None, masks)


class FileImages(ImageSet):
  """Photographs matching a glob, preprocessed like the training data (drig.preprocess)."""

  def __init__(self, pattern: str, image_size: int, num_images: int):
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not paths:
      raise AnalysisError(f"config.data.files={pattern!r} matches no files")
    self.paths = paths if num_images <= 0 else paths[:num_images]
    self.image_size = image_size
    self.description = f"{len(self.paths)} files matching {pattern!r}"

  def __len__(self):
    return len(self.paths)

  def read(self, index: int):
    from drig import preprocess  # pylint: disable=g-import-not-at-top
    path = self.paths[index]
    try:
      image = preprocess.preprocess_file(path, size=self.image_size)
      photo = preprocess.read_fundus(path)
    except preprocess.FundusImageError as e:
      return str(e.problem)
    except Exception as e:  # pylint: disable=broad-except
      return f"{type(e).__name__}: {e}"  # a bad file must not end the job
    return Example(index, os.path.basename(path), -1, image, photo, None)


def _data_config(config, loaded: LoadedModel):
  """The data section: the training run's, with the analysis config's non-empty fields."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  base = dict((loaded.training_config or {}).get("data", {}))
  data = {"name": base.get("name", ""), "builder_config": base.get("builder_config", ""),
          "data_dir": base.get("data_dir", ""), "manual_dir": base.get("manual_dir", ""),
          "image_size": base.get("image_size", 0), "overrides": base.get("overrides") or {}}
  for key in ("name", "builder_config", "data_dir", "manual_dir", "image_size"):
    value = config.data[key]
    if value:
      data[key] = value
  if config.data.name and config.data.name != base.get("name"):
    data["overrides"] = {}  # the training run's overrides belong to its data set
  return ml_collections.ConfigDict(data)


def load_images(config, loaded: LoadedModel) -> ImageSet:
  data = _data_config(config, loaded)
  if config.data.files:
    return FileImages(config.data.files, int(data.image_size or 256), config.num_images)
  if not data.name:
    raise AnalysisError("no images: set config.data.name (with config.init) or "
                        "config.data.files, or config.checkpoint to a training workdir")
  return DatasetImages(data, config.data.split, config.num_images)


# --------------------------------------------------------------------------- #
# One shard.


def _encode_map(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
  """(stored, scale) per image: float16 maps are divided by max|.| per image first,
  since IG values (~1e-6) are float16 subnormals; float32 maps keep scale 1."""
  values = np.asarray(values, np.float32)
  n = values.shape[0]
  if dtype == "float32":
    return values, np.ones((n,), np.float32)
  scale = np.abs(values.reshape(n, -1)).max(axis=1) if values.size else np.ones((n,))
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  stored = values / scale.reshape((n,) + (1,) * (values.ndim - 1))
  return stored.astype(np.float16), scale


def decode_map(shard: dict, key: str) -> np.ndarray:
  """A map from a shard as float32: stored value times its per-image scale."""
  values = np.asarray(shard[key], np.float32)
  scale = np.asarray(shard[f"{key}.scale"], np.float32)
  return values * scale.reshape((-1,) + (1,) * (values.ndim - 1))


@jax.jit
def _probabilities(logits_fn, x):
  return jax.nn.softmax(logits_fn(x).astype(jnp.float32), axis=-1)


@jax.jit
def _gradient(quantity, x):
  return jax.grad(lambda p: jnp.sum(quantity(p)))(x)


class ShardAttributor:
  """Attributes one padded batch of images on the local devices."""

  def __init__(self, config, loaded: LoadedModel, mesh):
    self.config = config
    self.mesh = mesh
    variables = sharding_lib.replicate(loaded.variables, mesh)
    self.model = loaded.model
    self.variables = variables
    self.logits_fn = ModelLogits(loaded.model, variables)
    self.to_layer, self.from_layer = layer_lib.split_model(loaded.model, variables, config.layer)
    self.quantities = [parse_quantity(q) for q in config.quantities]
    self.k = None

  def __call__(self, images: np.ndarray, indices: np.ndarray, field_of_view: np.ndarray,
               masks: Optional[list], predictions: Optional[np.ndarray] = None) -> dict:
    """Arrays for the batch (see docs/analysis.md); images uint8 [S, H, W, 3], padded.

    ``predictions`` (int [S]) replaces the model's own for the "predicted" quantity
    (the randomisation check attributes the trained model's grades).
    """
    from drig import input_pipeline  # pylint: disable=g-import-not-at-top
    config = self.config
    x = sharding_lib.shard_batch(input_pipeline.to_model_input(images), self.mesh)
    baseline = sharding_lib.replicate(ig_lib.half_gray_baseline(x), self.mesh)
    n = x.shape[0]
    chunk = path_chunk(config.chunk_size, config.steps, n)
    logits_fn, to_layer, from_layer = self.logits_fn, self.to_layer, self.from_layer
    groups = batch_groups(config.batch_groups, chunk, n, self.mesh.size)
    if groups > 1:  # Rows are independent: the parts give the same maps, sooner.
      logits_fn, to_layer, from_layer = (ig_lib.BatchGroups(fn, groups)
                                         for fn in (logits_fn, to_layer, from_layer))
    probabilities = np.asarray(_probabilities(logits_fn, x))
    if predictions is None:
      predictions = probabilities.argmax(axis=-1).astype(np.int32)
    predictions = np.asarray(predictions, np.int32)
    out = {"probabilities": probabilities, "prediction": predictions}
    if self.k is None:
      layer_shape = jax.eval_shape(to_layer, x).shape[1:]
      neurons = layer_shape[-1] if config.neurons == "channel" else int(np.prod(layer_shape))
      self.k = min(config.top_k, neurons)
      if self.k < config.top_k:
        logging.warning("layer %s has %d %ss: top_k %d -> %d", config.layer, neurons,
                        config.neurons, config.top_k, self.k)
    for spec in self.quantities:
      preds = sharding_lib.replicate(jnp.asarray(predictions), self.mesh)
      layer_quantity = make_quantity(spec, from_layer, preds)
      analysis = active_regions_lib.lesion_detection(
          to_layer, layer_quantity, x, baseline, k=self.k, by=config.neurons,
          individual_regions=False, steps=config.steps, method=config.method, chunk_size=chunk)
      quantity = make_quantity(spec, logits_fn, preds)
      gradient = _gradient(quantity, x)
      q = spec.key
      stored = {
          f"pixel_ig.{q}": analysis.pixels,
          f"positive_resultant.{q}": jnp.sum(analysis.positive_resultant, axis=-1),
          f"negative_resultant.{q}": jnp.sum(analysis.negative_resultant, axis=-1),
          f"gradient.{q}": gradient,
      }
      for key, value in stored.items():
        out[key], out[f"{key}.scale"] = _encode_map(np.asarray(value), config.storage_dtype)
      out[f"pixel_gap.{q}"] = np.asarray(analysis.pixel_gap, np.float32)
      out[f"layer_channels.{q}"] = np.asarray(analysis.layer.channels, np.float32)
      out[f"layer_gap.{q}"] = np.asarray(analysis.layer.gap, np.float32)
      out[f"top_positive.{q}"] = np.asarray(analysis.top.positive, np.int32)
      out[f"top_positive_scores.{q}"] = np.asarray(analysis.top.positive_scores, np.float32)
      out[f"top_negative.{q}"] = np.asarray(analysis.top.negative, np.int32)
      out[f"top_negative_scores.{q}"] = np.asarray(analysis.top.negative_scores, np.float32)
      out[f"region_gaps.{q}"] = np.asarray(analysis.region_gaps, np.float32)
      if masks is not None and q == parse_quantity(config.localization.quantity).key:
        out.update(self._localization(out, q, indices, field_of_view, masks))
    return out

  def _localization(self, out, q, indices, field_of_view, masks) -> dict:
    """Per image: method x lesion x metric scores (NaN where a mask is empty)."""
    from drig.analysis import localization  # pylint: disable=g-import-not-at-top
    pixel = decode_map(out, f"pixel_ig.{q}")
    positive = decode_map(out, f"positive_resultant.{q}")
    gradient = decode_map(out, f"gradient.{q}")
    rows = []
    names = None
    for i, image_masks in enumerate(masks):
      if image_masks is None:  # padding
        rows.append(None)
        continue
      shape = pixel.shape[1:3]
      maps = {
          "pixel_ig": localization.saliency(pixel[i], mode="positive"),
          "active_regions": localization.saliency(positive[i], mode="positive"),
          "gradient": localization.saliency(gradient[i], mode="absolute"),
          "random": localization.random_map(self.config.seed * 1_000_003 + int(indices[i]),
                                           shape),
      }
      scores = localization.score_maps(maps, image_masks, field_of_view)
      if names is None:
        methods = list(scores)
        lesions = list(scores[methods[0]])
        metrics = list(scores[methods[0]][lesions[0]])
        names = (methods, lesions, metrics)
      methods, lesions, metrics = names
      rows.append(np.array([[[scores[m][l][k] for k in metrics] for l in lesions]
                            for m in methods], np.float32))
    methods, lesions, metrics = names
    filled = [r if r is not None else np.full_like(rows[0] if rows[0] is not None else
                                                   np.zeros((len(methods), len(lesions),
                                                             len(metrics)), np.float32), np.nan)
              for r in rows]
    return {f"localization.{q}": np.stack(filled),
            "localization_methods": np.array(methods),
            "localization_lesions": np.array(lesions),
            "localization_metrics": np.array(metrics)}


# --------------------------------------------------------------------------- #
# The job.


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
  config_dict = json.loads(config.to_json_best_effort(sort_keys=True))
  return {"config": config_dict, "resolved": {"model": loaded.source}}


def _flat_items(tree, prefix=""):
  if isinstance(tree, dict):
    for key in sorted(tree):
      yield from _flat_items(tree[key], f"{prefix}{key}.")
  else:
    yield prefix.rstrip("."), tree


def check_workdir_config(workdir: str, record: dict, *, write: bool) -> None:
  """Stores the config record, or checks it against the stored one.

  Raises:
    ConfigMismatchError: naming the workdir and each differing field.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    stored = _read_json(path)
    if stored != record:
      old, new = dict(_flat_items(stored)), dict(_flat_items(record))
      diffs = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
      raise ConfigMismatchError(
          f"{workdir} holds the results of another analysis config ({path}); differences: "
          f"{'; '.join(diffs[:12])}. Use a new --workdir, or delete the old one to redo it.")
    return
  if write:
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _shard_path(workdir: str, shard: int) -> str:
  return os.path.join(workdir, "shards", SHARD_PATTERN.format(shard))


def _format_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
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
      name = os.path.basename(getattr(images, "paths", [str(index)] * (index + 1))[index])
      skipped.append((index, name, example))
      logging.warning("skipping image %d (%s): %s", index, name, example)
    else:
      examples.append(example)
  size = images.image_size
  padding = np.full((size, size, 3), 128, np.uint8)
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
  out["format_version"] = np.array(SHARD_FORMAT_VERSION)
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
  from drig import preprocess  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  os.makedirs(os.path.join(workdir, "shards"), exist_ok=True)
  if config.shard_size <= 0:
    raise AnalysisError(f"config.shard_size must be positive, got {config.shard_size}")
  if config.storage_dtype not in ("float16", "float32"):
    raise AnalysisError(f"config.storage_dtype must be float16 or float32, "
                        f"got {config.storage_dtype!r}")
  for spec in list(config.quantities) + [config.localization.quantity]:
    parse_quantity(spec)
  ig_lib.quadrature(config.method, config.steps)  # checks method and steps
  if config.neurons not in ("channel", "unit"):
    raise ValueError(f"config.neurons must be 'channel' or 'unit', got {config.neurons!r}")
  is_host0 = jax.process_index() == 0

  loaded = load_model(config)
  layer_lib.check_layer_name(loaded.model, config.layer)
  record = _config_record(config, loaded)
  check_workdir_config(workdir, record, write=is_host0)
  _barrier("drig:analysis_config")
  images = load_images(config, loaded)
  logging.info("model: %s", loaded.description)
  logging.info("images: %s", images.description)

  local = jax.local_devices()
  if config.shard_size % len(local):
    raise AnalysisError(f"config.shard_size={config.shard_size} does not divide by the "
                        f"{len(local)} local devices; choose a multiple of {len(local)}")
  mesh = sharding_lib.image_mesh(local)
  num_shards = -(-len(images) // config.shard_size)
  hosts = jax.process_count()
  mine = [s for s in range(num_shards) if s % hosts == jax.process_index()]
  todo = [s for s in mine if not os.path.exists(_shard_path(workdir, s))]
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
      path = _shard_path(workdir, shard)
      atomic_savez(path, arrays)
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
                   _format_eta((remaining - done_images) / rate if rate > 0 else float("nan")))
  _barrier("drig:analysis_shards")
  shards = [_shard_path(workdir, s) for s in range(num_shards)]
  result = AnalysisResult(workdir, shards, written)
  if is_host0:
    missing = [p for p in shards if not os.path.exists(p)]
    if missing:
      raise AnalysisError(f"{len(missing)} shard files are missing after every host finished "
                          f"(e.g. {missing[0]}); is {workdir} on a file system all hosts share?")
    from drig.analysis import report as report_lib  # pylint: disable=g-import-not-at-top
    metrics_path = os.path.join(workdir, "metrics.json")
    if not written and os.path.exists(metrics_path):
      # Nothing new and host 0's outputs complete (metrics.json is written last).
      logging.info("every shard and the report exist already: nothing to do")
      result = report_lib.finished_result(workdir, result)
    else:
      result = report_lib.finish(config, workdir, result, loaded, images, field_of_view)
  # The other hosts wait for host 0's report, so that every process leaves together.
  _barrier("drig:analysis_done")
  return result
