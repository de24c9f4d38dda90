"""The images to analyse: a split of a data set prepared by drig, or photographs on disk.

``load_images(config, loaded)`` picks the source the analysis config names
(``config.data``, falling back to the training run's data section) and
returns an ``ImageSet`` that reads one ``Example`` at a time, or says why an
image is skipped. ``load_baseline_distribution(config, loaded)`` reads the
baselines of the methods that average over a distribution of them
(expected_gradients, gradient_shap): ``config.baseline_distribution.count``
images of a split of the same data set, drawn by a named key.

With a ``config.selection`` other than "first" the ImageSet is the candidate
pool: ``read_candidates`` reads its grades, lesion presence and images, and
``SelectedImages`` is the subset chosen (``drig.analysis.selection``).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from drig import preprocess
from drig import prng
from drig.analysis.errors import AnalysisError
from drig.analysis.model_source import DEFAULT_IMAGE_SIZE, LoadedModel
from drig.data import datasets
from drig.data import lesions


@dataclasses.dataclass
class Example:
  """One image to analyse, with what is known about it."""
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

  def name(self, index: int) -> str:
    """The image's name when it cannot be read (for the skipped list)."""
    return str(index)


class DatasetImages(ImageSet):
  """A split of a TFDS data set prepared by drig (synthetic_fundus, eyepacs, ...).

  ``split`` may join splits with "+" ("train+test": IDRiD's 54 + 27 annotated
  images); indices then run through the splits in that order.
  """

  def __init__(self, data_config, split: str, num_images: int):
    try:
      builder = datasets.load_builder_from_config(data_config, prepare=False)
    except datasets.DatasetNotPreparedError as e:
      raise AnalysisError(f"{e}") from e
    names = [part.strip() for part in split.split("+")]
    for name in names:
      if name not in builder.info.splits:
        raise AnalysisError(f"data set {builder.info.full_name} has no split {name!r}; "
                            f"splits: {sorted(builder.info.splits)}")
    if len(set(names)) != len(names):
      raise AnalysisError(f"config.data.split {split!r} names a split twice")
    self.sources = [builder.as_data_source(name) for name in names]
    # Where each split's indices start in the joined index.
    self.offsets = np.cumsum([0] + [len(source) for source in self.sources])
    features = builder.info.features
    self.has_masks = "masks" in features
    self.mask_names = tuple(features["masks"].keys()) if self.has_masks else ()
    self.has_photo = "photo" in features
    self.image_size = int(features["image"].shape[0])
    total = int(self.offsets[-1])
    self.length = total if num_images <= 0 else min(num_images, total)
    self.description = f"{builder.info.full_name} split {split!r}: {self.length} of {total}"

  def __len__(self):
    return self.length

  def read(self, index: int):
    part = int(np.searchsorted(self.offsets, index, side="right")) - 1
    example = self.sources[part][index - int(self.offsets[part])]
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
    path = self.paths[index]
    try:
      image = preprocess.preprocess_file(path, size=self.image_size)
      photo = preprocess.read_fundus(path)
    except preprocess.FundusImageError as e:
      return str(e.problem)
    except Exception as e:  # pylint: disable=broad-except
      return f"{type(e).__name__}: {e}"  # a bad file must not end the job
    return Example(index, os.path.basename(path), -1, image, photo, None)

  def name(self, index: int) -> str:
    return os.path.basename(self.paths[index])


class SelectedImages(ImageSet):
  """The images of ``base`` at ``source_indices``, renumbered 0..n-1 (their names kept).

  Examples are numbered by their position here, so the shards, the report and
  the random maps index this set; ``source_indices`` maps back to ``base``.
  """

  def __init__(self, base: ImageSet, source_indices, description: str):
    self.base = base
    self.source_indices = np.asarray(source_indices, np.int64)
    self.has_masks = base.has_masks
    self.mask_names = getattr(base, "mask_names", ())
    self.image_size = base.image_size
    self.description = f"{base.description}; {description}"

  def __len__(self):
    return len(self.source_indices)

  def read(self, index: int):
    example = self.base.read(int(self.source_indices[index]))
    if isinstance(example, str):
      return example
    return dataclasses.replace(example, index=int(index))

  def name(self, index: int) -> str:
    return self.base.name(int(self.source_indices[index]))


@dataclasses.dataclass
class Candidates:
  """What selection rules need of the candidate pool, one row per readable candidate.

  Attributes:
    indices: int64 [N], the candidates' indices in the pool (unreadable ones left out).
    labels: int64 [N], true grades (-1: unknown).
    presence: bool [N, T] lesion presence per ``lesion_names`` entry, or None.
    lesion_names: the T lesion types (``drig.data.lesions.LESION_NAMES`` the data set has).
    images: uint8 [N, S, S, 3] when asked for (a forward pass), else None.
  """
  indices: np.ndarray
  labels: np.ndarray
  presence: Optional[np.ndarray]
  lesion_names: tuple
  images: Optional[np.ndarray]


def read_candidates(images: ImageSet, *, with_images: bool) -> Candidates:
  """Reads every image of ``images`` once: grades, lesion presence and (optionally) pixels.

  Lesion presence counts the lesion masks only (``drig.data.lesions.LESION_NAMES``;
  the optic disc is anatomy, present in every image).
  """
  lesion_names = tuple(n for n in getattr(images, "mask_names", ()) if n in lesions.LESION_NAMES)
  indices, labels, presence, pixels = [], [], [], []
  for index in range(len(images)):
    example = images.read(index)
    if isinstance(example, str):
      continue
    indices.append(index)
    labels.append(example.label)
    if example.masks is not None:
      presence.append([bool(np.any(example.masks[n])) for n in lesion_names])
    if with_images:
      pixels.append(example.image)
  if not indices:
    raise AnalysisError(f"no readable image among the candidates ({images.description})")
  return Candidates(np.array(indices, np.int64), np.array(labels, np.int64),
                    np.array(presence, bool).reshape(len(indices), len(lesion_names))
                    if images.has_masks else None,
                    lesion_names, np.stack(pixels) if with_images else None)


def data_config(config, loaded: LoadedModel) -> ml_collections.ConfigDict:
  """The data section: the training run's, with the analysis config's non-empty fields."""
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
  """The ImageSet the analysis config names (config.data.files, else a data set split).

  With ``config.selection`` other than "first" this is the candidate pool: the
  first ``config.selection_pool`` images (0: all), from which
  ``drig.analysis.job`` chooses ``config.num_images``.
  """
  data = data_config(config, loaded)
  count = config.num_images
  if config.get("selection", "first") != "first":
    count = config.selection_pool
  if config.data.files:
    return FileImages(config.data.files, int(data.image_size or DEFAULT_IMAGE_SIZE), count)
  if not data.name:
    raise AnalysisError("no images: set config.data.name (with config.init) or "
                        "config.data.files, or config.checkpoint to a training workdir")
  return DatasetImages(data, config.data.split, count)


@dataclasses.dataclass
class BaselineImages:
  """The baseline distribution of an analysis job, as drawn from a data split.

  Attributes:
    images: uint8 [K, H, W, 3], preprocessed like the analysed images.
    indices: int64 [K], their indices in the split (in drawing order).
    split: the split's name.
    description: where they came from, for the log and the report.
  """
  images: np.ndarray
  indices: np.ndarray
  split: str
  description: str


def baseline_distribution_indices(seed: int, split_size: int, count: int) -> np.ndarray:
  """``count`` distinct indices into a split of ``split_size`` examples, int64 [count].

  Drawn from ``named_key(PRNGKey(seed), "baseline_distribution")`` (a permutation
  of the split, its first ``count``), so they depend only on the seed, the split's
  size and the count: every process of a job draws the same.
  """
  key = prng.named_key(jax.random.PRNGKey(seed), "baseline_distribution")
  return np.asarray(jax.random.permutation(key, split_size)[:count], np.int64)


def load_baseline_distribution(config, loaded: LoadedModel, image_size: int) -> BaselineImages:
  """The K baselines of expected_gradients and gradient_shap (config.baseline_distribution).

  ``count`` images of split ``split`` of the analysed data set (config.data,
  falling back to the training run's data set), drawn by
  `baseline_distribution_indices`. They are the data set's preprocessed
  ``image`` feature, as the analysed images of a data set split are (and as
  ``config.data.files`` photographs are preprocessed to).

  Args:
    config: an analysis config.
    loaded: the model (its training config names the data set).
    image_size: the analysed images' size; the split's must equal it.

  Raises:
    AnalysisError: naming config.baseline_distribution's field: no data set, a
      split that does not exist, fewer images than ``count``, or another size.
  """
  settings = config.baseline_distribution
  data = data_config(config, loaded)
  if not data.name:
    raise AnalysisError("config.baseline_distribution: no data set to draw baselines from; set "
                        "config.checkpoint to a training workdir or config.data.name")
  try:
    builder = datasets.load_builder_from_config(data, prepare=False)
  except (datasets.DatasetNotPreparedError, ValueError) as e:
    raise AnalysisError(f"config.baseline_distribution.split={settings.split!r}: {e}") from e
  if settings.split not in builder.info.splits:
    raise AnalysisError(
        f"config.baseline_distribution.split={settings.split!r}: data set "
        f"{builder.info.full_name} has no such split; splits: {sorted(builder.info.splits)}")
  source = builder.as_data_source(settings.split)
  if settings.count > len(source):
    raise AnalysisError(
        f"config.baseline_distribution.count={settings.count} is more than the "
        f"{len(source)} images of split {settings.split!r} of {builder.info.full_name}")
  size = int(builder.info.features["image"].shape[0])
  if size != image_size:
    raise AnalysisError(
        f"config.baseline_distribution.split={settings.split!r}: {builder.info.full_name} "
        f"images are {size} px, the analysed images {image_size} px")
  indices = baseline_distribution_indices(int(settings.seed), len(source), int(settings.count))
  images = np.stack([np.asarray(source[int(i)]["image"], np.uint8) for i in indices])
  description = (f"{len(indices)} images of {builder.info.full_name} split {settings.split!r} "
                 f"(seed {settings.seed})")
  return BaselineImages(images, indices, settings.split, description)
