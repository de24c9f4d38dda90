"""The images to analyse: a split of a data set prepared by drig, or photographs on disk.

``load_images(config, loaded)`` picks the source the analysis config names
(``config.data``, falling back to the training run's data section) and
returns an ``ImageSet`` that reads one ``Example`` at a time, or says why an
image is skipped.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Optional

import ml_collections
import numpy as np

from drig import preprocess
from drig.analysis.errors import AnalysisError
from drig.analysis.model_source import DEFAULT_IMAGE_SIZE, LoadedModel
from drig.data import datasets


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
  """A split of a TFDS data set prepared by drig (synthetic_fundus, eyepacs, ...)."""

  def __init__(self, data_config, split: str, num_images: int):
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
  """The ImageSet the analysis config names (config.data.files, else a data set split)."""
  data = data_config(config, loaded)
  if config.data.files:
    return FileImages(config.data.files, int(data.image_size or DEFAULT_IMAGE_SIZE),
                      config.num_images)
  if not data.name:
    raise AnalysisError("no images: set config.data.name (with config.init) or "
                        "config.data.files, or config.checkpoint to a training workdir")
  return DatasetImages(data, config.data.split, config.num_images)
