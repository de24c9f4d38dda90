"""Kaggle/EyePACS diabetic retinopathy through TFDS, preprocessed by drig at generation.

The TFDS builder ``eyepacs`` subclasses TFDS's ``diabetic_retinopathy_detection``
(same manual download, same splits, same ``name``/``image``/``label`` features)
and adds drig configs ``drig-<size>`` (``drig-256``, ``drig-512``, or any size
through ``EyepacsConfig``) whose images are ``drig.preprocess.preprocess_file``
of the photograph, stored losslessly as PNG. See docs/data.md for the download,
the manual-directory layout and why preprocessing happens once here rather
than in the input pipeline (decoding a 3-16 Mpx JPEG costs ~10-100x more than
reading a stored 256 px image).

Unusable photographs (missing, unreadable or truncated JPEG, all black, no
retina found) are left out of the data set, counted and listed in
``bad_images.json`` beside the data set and in a logged summary; they never
stop the build. Missing downloads stop it at once with an error that says
what to download and where to put it; nothing is fetched from the network.

Usage::

  builder = drig.data.eyepacs.builder("drig-256", data_dir=..., manual_dir=...)
  builder.download_and_prepare(file_format="array_record", download_config=...)
  # or simply: drig.data.eyepacs.prepare("drig-256", data_dir=..., manual_dir=...)

Importing this module imports TFDS (without TensorFlow) and registers the
builder; TensorFlow is imported only when a builder is created.
"""

import csv
import logging
import os
import warnings
from typing import Any, Iterator, Mapping

import cv2
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import diabetic_retinopathy_detection as tfds_dr

from drig import grading
from drig import preprocess
from drig.data import generation

NAME = "eyepacs"
BAD_IMAGE_REPORT = generation.BAD_IMAGE_REPORT
TEST_LABELS_FILE = "retinopathy_solution.csv"
TEST_LABELS_URL = tfds_dr._URL_TEST_LABELS  # pylint: disable=protected-access
KAGGLE_URL = "https://www.kaggle.com/c/diabetic-retinopathy-detection/data"

_log = logging.getLogger(__name__)

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the Kaggle "Diabetic Retinopathy Detection" data from {KAGGLE_URL}
(accept the competition rules, then e.g. `kaggle competitions download -c
diabetic-retinopathy-detection`), extract it and arrange the manual directory as

  <manual_dir>/train/<id>_left.jpeg, <id>_right.jpeg   (35,126 images, train.zip.*)
  <manual_dir>/trainLabels.csv                          (columns image,level)
  <manual_dir>/test/<id>_left.jpeg, <id>_right.jpeg    (53,576 images, test.zip.*)
  <manual_dir>/sample/*.jpeg                            (10 images, sample.zip)
  <manual_dir>/{TEST_LABELS_FILE}                 (columns image,level,Usage)

The test labels are not part of the Kaggle download: fetch {TEST_LABELS_FILE} from
{TEST_LABELS_URL}
on a machine with internet access and copy it into the manual directory (drig
never downloads it). docs/data.md has the details.
"""

# What each required entry of the manual directory is, for error messages.
_REQUIRED_ENTRIES = (
    ("train", "dir", "the training photographs (extract train.zip.* from Kaggle)"),
    ("trainLabels.csv", "file", "the training labels (trainLabels.csv.zip from Kaggle)"),
    ("test", "dir", "the test photographs (extract test.zip.* from Kaggle)"),
    ("sample", "dir", "the 10 sample photographs (sample.zip from Kaggle)"),
    (TEST_LABELS_FILE, "file",
     f"the test labels, not in the Kaggle download: fetch {TEST_LABELS_URL}"),
)


ManualDownloadError = generation.ManualDownloadError


def check_manual_dir(manual_dir: str | os.PathLike | None) -> None:
  """Checks that a manual directory holds everything the builder reads.

  Args:
    manual_dir: the directory with the Kaggle files.

  Raises:
    ManualDownloadError: listing every missing entry, what it is, where to put
      it, and the full download instructions.
  """
  manual_dir = generation.check_manual_dir_exists(manual_dir, "EyePACS",
                                                  MANUAL_DOWNLOAD_INSTRUCTIONS)
  missing = []
  for entry, kind, what in _REQUIRED_ENTRIES:
    path = os.path.join(manual_dir, entry)
    present = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
    if not present:
      missing.append(f"  {path}{'/' if kind == 'dir' else ''}: {what}")
  if missing:
    raise ManualDownloadError(
        f"EyePACS manual directory {manual_dir} is incomplete; missing:\n" + "\n".join(missing)
        + "\n\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)


class EyepacsConfig(tfds_dr.DiabeticRetinopathyDetectionConfig):
  """A drig config: images preprocessed by ``drig.preprocess.preprocess_file``.

  Attributes:
    size: side of the stored square images (the retina's diameter).
    preprocess_options: keyword arguments of ``preprocess_file`` other than
      ``size`` (e.g. ``denoise_sigma``); empty for the poster's defaults.
  """

  def __init__(self, *, size: int = 256, preprocess_options: Mapping[str, Any] | None = None,
               name: str | None = None, description: str | None = None):
    options = dict(preprocess_options or {})
    if "size" in options:
      raise ValueError("give the size as EyepacsConfig(size=...), not in preprocess_options")
    name = name or f"drig-{size}"
    if description is None:
      description = (
          f"drig preprocessing (drig.preprocess.preprocess_file, size={size}"
          + "".join(f", {k}={v!r}" for k, v in sorted(options.items()))
          + "): the retina's diameter scaled to the image side, local average colour"
          " subtracted, outside 90% of the radius half gray; stored as lossless PNG.")
    # The parent's config pins version 3.0.0 (TFDS's own builder); this builder
    # versions independently.
    tfds.core.BuilderConfig.__init__(
        self, name=name, description=description, version=tfds.core.Version("1.0.0"),
        release_notes={"1.0.0": "drig preprocessing of the TFDS 3.0.0 layout."})
    self._target_pixels = None
    self.size = int(size)
    self.preprocess_options = options


class Eyepacs(generation.PhotographBuilder, tfds_dr.DiabeticRetinopathyDetection):
  """EyePACS (Kaggle 2015) with drig's preprocessing applied at generation.

  ``Eyepacs(num_workers=...)``: see ``generation.PhotographBuilder``.
  """

  name = NAME
  DISPLAY_NAME = "EyePACS"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "drig preprocessing of the TFDS 3.0.0 layout."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [EyepacsConfig(size=256), EyepacsConfig(size=512)]
  DEFAULT_BUILDER_CONFIG_NAME = "drig-256"

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Kaggle/EyePACS retina photographs graded 0-4 for diabetic retinopathy, "
            "preprocessed by drig. " + self.builder_config.description),
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),  # Patient id and eye, e.g. "4_left".
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            # 0 (no DR) to 4 (proliferative DR); -1 for the unlabelled sample split.
            "label": tfds.features.ClassLabel(num_classes=grading.NUM_GRADES),
        }),
        supervised_keys=("image", "label"),
        homepage=KAGGLE_URL,
        citation=tfds_dr._CITATION,  # pylint: disable=protected-access
    )

  def _split_generators(self, dl_manager):
    try:
      path = dl_manager.manual_dir
    except AssertionError as e:
      raise ManualDownloadError(f"{e}") from None
    check_manual_dir(path)
    path = os.fspath(path)
    test_labels = os.path.join(path, TEST_LABELS_FILE)
    return {
        "sample": self._generate_split(
            "sample", images_dir_path=os.path.join(path, "sample")),
        "train": self._generate_split(
            "train", images_dir_path=os.path.join(path, "train"),
            csv_path=os.path.join(path, "trainLabels.csv")),
        # Kaggle's public leaderboard (10,906 images).
        "validation": self._generate_split(
            "validation", images_dir_path=os.path.join(path, "test"), csv_path=test_labels,
            csv_usage="Public"),
        # Kaggle's private leaderboard (42,670 images).
        "test": self._generate_split(
            "test", images_dir_path=os.path.join(path, "test"), csv_path=test_labels,
            csv_usage="Private"),
    }

  def _generate_examples(self, images_dir_path, csv_path=None, csv_usage=None):
    # TFDS's legacy entry point; this builder's splits use ``_generate_split``.
    yield from self._generate_split("unknown", images_dir_path, csv_path, csv_usage)

  def _generate_split(self, split: str, images_dir_path: str, csv_path: str | None = None,
                      csv_usage: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ``(name, example)`` for one split, recording the images left out."""
    entries = _read_split_entries(images_dir_path, csv_path, csv_usage)
    report = self._start_report(split, listed=len(entries))
    jobs = [(os.path.join(images_dir_path, f"{name}.jpeg"), self.builder_config.size,
             self.builder_config.preprocess_options) for name, _ in entries]
    results = self._map(_process_photograph, jobs, chunksize=8)
    for (name, label), (filepath, _, _), (png, problem, messages) in zip(entries, jobs, results):
      for message in messages:
        report["warnings"].append({"name": name, "file": filepath, "warning": message})
      if problem is not None:
        self._leave_out(report, split, name, filepath, problem)
        continue
      report["written"] += 1
      yield name, {"name": name, "image": png, "label": label}


def _read_split_entries(images_dir_path, csv_path, csv_usage) -> list[tuple[str, int]]:
  """(name, label) of every photograph of a split, in CSV (or sorted file) order."""
  if not csv_path:
    names = sorted(f[:-len(".jpeg")] for f in os.listdir(images_dir_path) if f.endswith(".jpeg"))
    return [(name, -1) for name in names]
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    columns = {"image", "level"} | ({"Usage"} if csv_usage else set())
    if not reader.fieldnames or not columns <= set(reader.fieldnames):
      raise ValueError(
          f"{csv_path}: expected the columns {sorted(columns)}, found {reader.fieldnames}")
    entries = []
    for line, row in enumerate(reader, start=2):
      if csv_usage and row["Usage"] != csv_usage:
        continue
      try:
        level = int(row["level"])
      except ValueError:
        raise ValueError(f"{csv_path}:{line}: level {row['level']!r} is not an integer") from None
      if not 0 <= level < grading.NUM_GRADES:
        raise ValueError(f"{csv_path}:{line}: level {level} is not a grade 0-{grading.NUM_GRADES - 1}")
      entries.append((row["image"], level))
  if csv_usage and not entries:
    raise ValueError(f"{csv_path}: no rows with Usage == {csv_usage!r}")
  return entries


def jpeg_problem(data: bytes) -> str | None:
  """Names what is wrong with a JPEG's bytes that decoders silently accept, or None.

  OpenCV decodes a truncated JPEG without error, filling the missing rows with
  gray; such images must not enter the data set. A complete JPEG ends with the
  end-of-image marker FF D9 (possibly followed by padding).

  Args:
    data: the file's bytes.

  Returns:
    A problem description, or None when the data look like a complete JPEG or
    are not a JPEG at all (other formats are left to the decoder).
  """
  if data[:2] != b"\xff\xd8":
    return None
  if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
    return "truncated JPEG (no end-of-image marker)"
  return None


def _process_photograph(job) -> tuple[bytes | None, str | None, list[str]]:
  """Preprocesses one photograph: (PNG bytes, None, warnings) or (None, problem, warnings).

  Runs in worker processes: every error is returned, never raised.
  """
  path, size, options = job
  messages = []
  try:
    if not os.path.isfile(path):
      return None, "missing file (listed in the CSV but not in the image directory)", messages
    with open(path, "rb") as f:
      problem = jpeg_problem(f.read())
    if problem:
      return None, problem, messages
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      image = preprocess.preprocess_file(path, size, **options)
    messages = [str(w.message) for w in caught]
  except preprocess.FundusImageError as e:
    return None, e.problem, messages
  except Exception as e:  # pylint: disable=broad-except
    # Anything else an odd file provokes deep in a decoder: report it, keep going.
    return None, f"{type(e).__name__}: {e}", messages
  ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  if not ok:
    return None, "PNG encoding failed", messages
  return png.tobytes(), None, messages


def builder(config: str | EyepacsConfig = "drig-256", *, data_dir: str | os.PathLike | None = None,
            num_workers: int | None = None) -> Eyepacs:
  """Returns the EyePACS builder for a config name or ``EyepacsConfig``.

  Args:
    config: ``"drig-256"``, ``"drig-512"`` or an ``EyepacsConfig``.
    data_dir: TFDS data directory.
    num_workers: generation processes (see ``Eyepacs``).
  """
  return Eyepacs(config=config, data_dir=None if data_dir is None else os.fspath(data_dir),
                 num_workers=num_workers)


def prepare(config: str | EyepacsConfig = "drig-256", *, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None,
            num_workers: int | None = None) -> Eyepacs:
  """Generates the data set (array_record) if it is not there yet; returns the builder.

  Args:
    config: see ``builder``.
    data_dir: TFDS data directory.
    manual_dir: the Kaggle files (see ``MANUAL_DOWNLOAD_INSTRUCTIONS``).
    num_workers: generation processes.

  Raises:
    ManualDownloadError: the data set is not prepared and the manual download
      is missing or incomplete.
  """
  b = builder(config, data_dir=data_dir, num_workers=num_workers)
  if not b.is_prepared():
    check_manual_dir(manual_dir)
    b.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return b


# The report written beside a prepared data set (see the module docstring).
read_bad_image_report = generation.read_bad_image_report
