"""IDRiD (Indian Diabetic Retinopathy Image Dataset) through TFDS, from a manual download.

One concept: the IDRiD data set (its archives, masks, grades and TFDS builder).

The TFDS builder ``idrid`` reads the official archives, unpacked as they come,
and preprocesses every photograph with ``drig.preprocess`` at generation, like
``drig.data.eyepacs``. Two tasks, each a family of configs ``<task>-<size>``:

* ``segmentation-256`` (default; also ``-512``): part "A. Segmentation", the
  81 photographs with expert lesion masks (train 54, test 27 as published).
  IDRiD publishes no DR grade for these images, so ``label`` and
  ``macular_edema`` are -1 (TFDS's "no label").
* ``grading-256`` (also ``-512``): part "B. Disease Grading", the 516 graded
  photographs (train 413, test 103) with the DR grade and the risk of macular
  edema from the published CSVs. No masks: every mask is empty and marked not
  annotated.

Features (S = ``size``, P = ``photo_size``), the synthetic data set's
conventions so analysis code treats both alike:

* ``name``: Text, IDRiD's image name without extension (``IDRiD_01`` in the
  segmentation part, ``IDRiD_001`` in grading; the grading train and test
  sets reuse names, so a name is unique only within its split).
* ``label``: ClassLabel(5), the DR grade 0-4; -1 where unpublished.
* ``macular_edema``: ClassLabel(3), the risk of macular edema 0-2; -1 where
  unpublished.
* ``image``: PNG uint8 ``[S, S, 3]``, ``drig.preprocess.preprocess_file`` of
  the photograph (bit for bit).
* ``photo``: JPEG uint8 ``[P, P, 3]``: the photograph's retina square, same
  framing as ``image`` (``rescale_to_retina`` with the same geometry) but not
  otherwise processed; for figures.
* ``masks``: FeaturesDict of bool ``[S, S]`` zlib Tensors keyed by
  ``drig.data.lesions.MASK_NAMES``. Each IDRiD mask (full resolution .tif) is
  warped with the same retina geometry as ``image`` by area averaging, and a
  pixel is True when more than ``mask_threshold`` (default 0: any) of it is
  covered, i.e. max-pooling, so that 1-3 px microaneurysms survive the ~14x
  downscaling; then cleared outside the 90% field of view.
* ``annotated``: FeaturesDict of bool scalars keyed by ``MASK_NAMES``: whether
  the mask of that type is ground truth for the image. Scoring must skip types
  that are not annotated (an empty, unannotated mask is no evidence of
  absence). In the segmentation configs microaneurysm, haemorrhage,
  hard_exudate, cotton_wool_spot (IDRiD's "soft exudates") and optic_disc are
  annotated; IDRiD ships a mask file only for images that show the lesion, so a
  missing file means an empty, annotated mask (``missing_mask_means_absent``).
  An unreadable mask file, or one whose size does not match the photograph,
  makes that type not annotated for that image and is reported.

Unusable photographs (missing, unreadable or truncated, all black, no retina)
and CSV rows without a valid grade are left out, counted and listed in
``bad_images.json`` beside the data set, with missing and bad mask files; they
never stop the build. A missing or incomplete manual directory stops it at once
with ``ManualDownloadError`` naming every expected path. See docs/idrid.md.

Usage::

  drig.data.idrid.prepare("segmentation-256", data_dir=..., manual_dir=...)
  # or drig.data.datasets.load_builder("idrid", builder_config="grading-256", ...)

Importing this module imports TFDS (not TensorFlow) and registers the builder.
"""

import csv
import dataclasses
import logging
import os
import re
import warnings
from typing import Any, Iterator, Mapping

import cv2
import numpy as np
import tensorflow_datasets as tfds

from drig import grading
from drig import preprocess
from drig.data import eyepacs
from drig.data import generation
from drig.data import lesions

NAME = "idrid"
BAD_IMAGE_REPORT = generation.BAD_IMAGE_REPORT
NUM_MACULAR_EDEMA_GRADES = 3
TASKS = ("segmentation", "grading")
HOMEPAGE = "https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid"
SPLITS = ("train", "test")

SEGMENTATION_PART = "A. Segmentation"
GRADING_PART = "B. Disease Grading"
IMAGES_DIR = "1. Original Images"
MASKS_DIR = "2. All Segmentation Groundtruths"
GRADES_DIR = "2. Groundtruths"
SET_DIRS = {"train": "a. Training Set", "test": "b. Testing Set"}
GRADES_CSVS = {"train": "a. IDRiD_Disease Grading_Training Labels.csv",
               "test": "b. IDRiD_Disease Grading_Testing Labels.csv"}
# The CSV's columns (the published files end "Risk of macular edema " with a
# space, and the training file has empty trailing columns: names are stripped).
IMAGE_COLUMN = "Image name"
GRADE_COLUMN = "Retinopathy grade"
EDEMA_COLUMN = "Risk of macular edema"

# drig mask name -> (IDRiD's ground-truth folder, file suffix): IDRiD_01_MA.tif.
IDRID_MASKS: dict[str, tuple[str, str]] = {
    "microaneurysm": ("1. Microaneurysms", "MA"),
    "haemorrhage": ("2. Haemorrhages", "HE"),
    "hard_exudate": ("3. Hard Exudates", "EX"),
    "cotton_wool_spot": ("4. Soft Exudates", "SE"),
    "optic_disc": ("5. Optic Disc", "OD"),
}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_MASK_EXTENSIONS = (".tif", ".tiff", ".png")

_log = logging.getLogger(__name__)

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download IDRiD (CC BY 4.0) from IEEE DataPort,
{HOMEPAGE}
(a free IEEE account is needed): the archives of part "{SEGMENTATION_PART}" (for the
segmentation configs) and part "{GRADING_PART}" (for the grading configs). Unpack
them into the manual directory as they come, so that it holds

  <manual_dir>/{SEGMENTATION_PART}/{IMAGES_DIR}/
      {SET_DIRS['train']}/IDRiD_01.jpg ... IDRiD_54.jpg
      {SET_DIRS['test']}/IDRiD_55.jpg ... IDRiD_81.jpg
  <manual_dir>/{SEGMENTATION_PART}/{MASKS_DIR}/{{{SET_DIRS['train']},{SET_DIRS['test']}}}/
      {IDRID_MASKS['microaneurysm'][0]}/IDRiD_01_MA.tif
      {IDRID_MASKS['haemorrhage'][0]}/IDRiD_01_HE.tif
      {IDRID_MASKS['hard_exudate'][0]}/IDRiD_01_EX.tif
      {IDRID_MASKS['cotton_wool_spot'][0]}/IDRiD_01_SE.tif   (only images that show them)
      {IDRID_MASKS['optic_disc'][0]}/IDRiD_01_OD.tif
  <manual_dir>/{GRADING_PART}/{IMAGES_DIR}/
      {SET_DIRS['train']}/IDRiD_001.jpg ... IDRiD_413.jpg
      {SET_DIRS['test']}/IDRiD_001.jpg ... IDRiD_103.jpg
  <manual_dir>/{GRADING_PART}/{GRADES_DIR}/{GRADES_CSVS['train']}
  <manual_dir>/{GRADING_PART}/{GRADES_DIR}/{GRADES_CSVS['test']}
      (columns "{IMAGE_COLUMN}", "{GRADE_COLUMN}", "{EDEMA_COLUMN}")

A part may also sit one folder deeper (e.g. <manual_dir>/B.%20Disease%20Grading/
{GRADING_PART}/...), and names are matched ignoring case, the "a. "/"1. "
prefixes and "_" versus " ". docs/idrid.md has the details.
"""


ManualDownloadError = generation.ManualDownloadError


# ---------------------------------------------------------------------------
# Finding the files.


def _normalise(name: str) -> str:
  """Folder/file name for tolerant matching: case, "a. " prefixes, "_" vs " "."""
  name = name.strip().lower()
  name = re.sub(r"^[a-z0-9]{1,2}\.\s*", "", name)
  return re.sub(r"[\s_]+", " ", name)


def _child(parent: str, official: str, kind: str) -> str | None:
  """Path of ``official`` in ``parent`` (exact name first, then tolerant), or None."""
  exact = os.path.join(parent, official)
  if (os.path.isdir if kind == "dir" else os.path.isfile)(exact):
    return exact
  if not os.path.isdir(parent):
    return None
  wanted = _normalise(official)
  for entry in sorted(os.listdir(parent)):
    path = os.path.join(parent, entry)
    if _normalise(entry) == wanted and (os.path.isdir if kind == "dir" else os.path.isfile)(path):
      return path
  return None


def _find_part(manual_dir: str, part: str) -> str | None:
  """The folder of an IDRiD part: ``manual_dir/part`` or one level deeper."""
  candidates = [_child(manual_dir, part, "dir")]
  if candidates[0]:
    candidates.append(_child(candidates[0], part, "dir"))  # part.zip unpacked into part/
  candidates += [_child(os.path.join(manual_dir, d), part, "dir")
                 for d in sorted(os.listdir(manual_dir))
                 if os.path.isdir(os.path.join(manual_dir, d))]
  for candidate in candidates:
    if candidate and _child(candidate, IMAGES_DIR, "dir"):
      return candidate
  return None


@dataclasses.dataclass(frozen=True)
class Layout:
  """The resolved files of one task.

  Attributes:
    task: ``segmentation`` or ``grading``.
    images: split -> folder of photographs.
    masks: split -> drig mask name -> folder of IDRiD masks (segmentation).
    grades: split -> grades CSV (grading).
  """
  task: str
  images: Mapping[str, str]
  masks: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
  grades: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _image_files(folder: str) -> dict[str, str]:
  """Image name (file stem) -> path of every photograph in a folder."""
  files = {}
  for entry in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(entry)
    if ext.lower() in _IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, entry)):
      files.setdefault(stem, os.path.join(folder, entry))
  return files


def check_manual_dir(manual_dir: str | os.PathLike | None, task: str = "segmentation") -> Layout:
  """Checks that a manual directory holds everything a task reads; resolves the paths.

  Args:
    manual_dir: where the IDRiD archives were unpacked.
    task: ``segmentation`` or ``grading``.

  Returns:
    The Layout of the task's files.

  Raises:
    ManualDownloadError: listing every missing (or empty) folder and file by
      its expected path, with the download instructions.
    ValueError: an unknown task.
  """
  if task not in TASKS:
    raise ValueError(f"unknown IDRiD task {task!r}; known: {', '.join(TASKS)}")
  manual_dir = generation.check_manual_dir_exists(manual_dir, "IDRiD",
                                                  MANUAL_DOWNLOAD_INSTRUCTIONS)
  part_name = SEGMENTATION_PART if task == "segmentation" else GRADING_PART
  part = _find_part(manual_dir, part_name)
  missing = []

  def need(parent: str | None, official: str, kind: str, what: str,
           holds_images: bool = False) -> str | None:
    path = _child(parent, official, kind) if parent else None
    if path is None:
      expected = os.path.join(parent or os.path.join(manual_dir, part_name), official)
      missing.append(f"  {expected}{'/' if kind == 'dir' else ''}: {what}")
    elif holds_images and not _image_files(path):
      missing.append(f"  {path}/: {what}; the folder holds no .jpg images")
    return path

  if part is None:
    missing.append(f"  {os.path.join(manual_dir, part_name, IMAGES_DIR)}/: part \"{part_name}\""
                   " of the download (not found here or one folder deeper)")
    raise ManualDownloadError(
        f"IDRiD manual directory {manual_dir} is incomplete; missing:\n" + "\n".join(missing)
        + "\n\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
  images_root = _child(part, IMAGES_DIR, "dir")
  images, masks, grades = {}, {}, {}
  for split, set_dir in SET_DIRS.items():
    images[split] = need(images_root, set_dir, "dir", f"photographs of the {split} set",
                         holds_images=True)
  if task == "segmentation":
    masks_root = need(part, MASKS_DIR, "dir", "the lesion and optic-disc masks")
    for split, set_dir in SET_DIRS.items():
      set_path = need(masks_root, set_dir, "dir", f"masks of the {split} set") if masks_root \
          else None
      masks[split] = {}
      for mask_name, (folder, suffix) in IDRID_MASKS.items():
        if set_path:
          masks[split][mask_name] = need(set_path, folder, "dir",
                                         f"*_{suffix}.tif masks of the {split} set")
  else:
    grades_root = need(part, GRADES_DIR, "dir", "the grade CSVs")
    for split, file in GRADES_CSVS.items():
      if grades_root:
        grades[split] = need(grades_root, file, "file", f"the {split} set's grades")
  if missing:
    raise ManualDownloadError(
        f"IDRiD manual directory {manual_dir} is incomplete for the {task} configs; missing:\n"
        + "\n".join(missing) + "\n\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
  return Layout(task=task, images=images, masks=masks, grades=grades)


# ---------------------------------------------------------------------------
# What each split contains.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One photograph to preprocess (picklable, for worker processes).

  Attributes:
    name: IDRiD's image name.
    image_path: the photograph (may be missing: reported).
    label, macular_edema: grades, -1 where unpublished.
    mask_paths: drig mask name -> mask file, or None where IDRiD has none.
  """
  name: str
  image_path: str
  label: int = -1
  macular_edema: int = -1
  mask_paths: tuple[tuple[str, str | None], ...] = ()


def _mask_file(folder: str, image_name: str, suffix: str) -> str | None:
  for ext in _MASK_EXTENSIONS:
    for candidate in (f"{image_name}_{suffix}{ext}", f"{image_name}_{suffix}{ext.upper()}"):
      path = os.path.join(folder, candidate)
      if os.path.isfile(path):
        return path
  return None


def segmentation_entries(layout: Layout, split: str) -> list[Entry]:
  """Every photograph of a segmentation split, sorted by name, with its mask files."""
  entries = []
  for name, path in sorted(_image_files(layout.images[split]).items()):
    mask_paths = tuple(
        (mask_name, _mask_file(layout.masks[split][mask_name], name, suffix))
        for mask_name, (_, suffix) in IDRID_MASKS.items())
    entries.append(Entry(name=name, image_path=path, mask_paths=mask_paths))
  return entries


def _column(fieldnames: list[str], wanted: str, csv_path: str) -> int:
  for i, field in enumerate(fieldnames):
    if _normalise(field) == _normalise(wanted):
      return i
  raise ValueError(f"{csv_path}: no column {wanted!r}; the columns are {fieldnames}")


def read_grades(csv_path: str) -> tuple[list[tuple[str, int, int]], list[dict[str, Any]]]:
  """Reads an IDRiD grading CSV.

  Args:
    csv_path: ``a. IDRiD_Disease Grading_Training Labels.csv`` or the testing one.

  Returns:
    (rows, problems): rows are ``(image name, DR grade, macular-edema grade)``
    in file order; problems are ``{"name", "line", "problem"}`` for rows
    without a valid grade or repeating a name (left out, to be reported).

  Raises:
    ValueError: a required column is missing.
  """
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = next(reader, None) or []
    image_col = _column(header, IMAGE_COLUMN, csv_path)
    grade_col = _column(header, GRADE_COLUMN, csv_path)
    edema_col = _column(header, EDEMA_COLUMN, csv_path)
    rows, problems, seen = [], [], set()
    for line, row in enumerate(reader, start=2):
      if not any(cell.strip() for cell in row):
        continue  # Blank lines (the published files end with some).
      cells = row + [""] * (max(image_col, grade_col, edema_col) + 1 - len(row))
      name = os.path.splitext(cells[image_col].strip())[0]
      if not name:
        problems.append({"name": "", "line": line, "problem": f"{csv_path}:{line}: no image name"})
        continue
      grades = []
      for col, column, count in ((grade_col, GRADE_COLUMN, grading.NUM_GRADES),
                                 (edema_col, EDEMA_COLUMN, NUM_MACULAR_EDEMA_GRADES)):
        text = cells[col].strip()
        grades.append(int(text) if re.fullmatch(r"\d+", text) and int(text) < count else None)
        if grades[-1] is None:
          problems.append({"name": name, "line": line, "problem":
                           f"ungradable: {csv_path}:{line}: {column} {text!r} is not a grade"
                           f" 0-{count - 1}"})
          break
      else:
        if name in seen:
          problems.append({"name": name, "line": line,
                           "problem": f"{csv_path}:{line}: repeats {name}; first row kept"})
          continue
        seen.add(name)
        rows.append((name, grades[0], grades[1]))
  return rows, problems


def grading_entries(layout: Layout, split: str
                    ) -> tuple[list[Entry], list[dict[str, Any]], list[dict[str, Any]]]:
  """(entries in CSV order, bad rows, photographs not in the CSV) of a grading split."""
  csv_path = layout.grades[split]
  rows, problems = read_grades(csv_path)
  files = _image_files(layout.images[split])
  bad = [{"name": p["name"], "file": files.get(p["name"], csv_path), "problem": p["problem"]}
         for p in problems]
  entries = [Entry(name=name, label=grade, macular_edema=edema,
                   image_path=files.get(name, os.path.join(layout.images[split], f"{name}.jpg")))
             for name, grade, edema in rows]
  listed = {p["name"] for p in problems} | {e.name for e in entries}
  unlisted = [{"name": name, "file": path, "warning": f"not listed in {csv_path}; left out"}
              for name, path in files.items() if name not in listed]
  return entries, bad, unlisted


# ---------------------------------------------------------------------------
# Processing one photograph (runs in worker processes).


def _reduction_factor(full_shape, reduced_shape) -> int | None:
  """k such that libjpeg's 1/k decoding of ``full_shape`` gives ``reduced_shape``."""
  for k in (1, 2, 4, 8):
    if (-(-full_shape[0] // k), -(-full_shape[1] // k)) == tuple(reduced_shape[:2]):
      return k
  return None


def warp_mask(mask: np.ndarray, geometry, *, size: int, threshold: float = 0.0,
              radius_fraction: float | None = None) -> np.ndarray:
  """A full-resolution mask in the preprocessed image's frame.

  Args:
    mask: bool ``[H, W]`` on the photograph's pixels.
    geometry: ``drig.preprocess.RetinaGeometry`` of the retina on those pixels.
    size: output side.
    threshold: a pixel is True when more than this fraction of it is covered
      (0: any coverage, i.e. max-pooling).
    radius_fraction: the field of view kept by preprocessing (default the
      poster's 0.9); False outside.

  Returns:
    bool ``[size, size]``.
  """
  if radius_fraction is None:
    radius_fraction = preprocess.DEFAULT_RADIUS_FRACTION
  coverage = preprocess.rescale_to_retina(
      np.asarray(mask, np.float32), geometry, size=size, interpolation=cv2.INTER_AREA, fill=0,
      warn=False)
  return (coverage.reshape(size, size) > threshold) & preprocess.field_of_view(size,
                                                                               radius_fraction)


def _read_mask(path: str) -> np.ndarray:
  if not os.path.getsize(path):
    raise ValueError("empty file")
  mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if mask is None or mask.size == 0:
    raise ValueError("not a readable image")
  # IDRiD's masks are RGB with the lesion in red (gray value 76): any nonzero channel.
  return mask.any(axis=2) if mask.ndim == 3 else mask > 0


def process_entry(job: tuple[Entry, "IdridConfig"]) -> dict[str, Any]:
  """Preprocesses one photograph and its masks; never raises.

  Args:
    job: (entry, config).

  Returns:
    dict with ``example`` (the TFDS example, None when the photograph is
    unusable), ``problem`` (why, or None), ``warnings`` (list of str) and
    ``masks`` (mask name -> ``"ok"``, ``"missing"`` or a problem).
  """
  entry, config = job
  result = {"example": None, "problem": None, "warnings": [], "masks": {}}
  options = dict(config.preprocess_options)
  size = config.size
  path = entry.image_path
  try:
    if not os.path.isfile(path):
      result["problem"] = "missing file (listed but not in the image folder)"
      return result
    with open(path, "rb") as f:
      problem = eyepacs.jpeg_problem(f.read())
    if problem:
      result["problem"] = problem
      return result
    ratio = options.get("working_ratio", preprocess.DEFAULT_WORKING_RATIO)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      # read_fundus + preprocess_fundus_with_geometry is preprocess_file, plus
      # the geometry the masks need.
      decoded = preprocess.read_fundus(path, min_retina_diameter=ratio * size if ratio else None)
      image, geometry = preprocess.preprocess_fundus_with_geometry(
          decoded, size, source=path, **options)
    result["warnings"] = [str(w.message) for w in caught]
  except preprocess.FundusImageError as e:
    result["problem"] = e.problem
    return result
  except Exception as e:  # pylint: disable=broad-except
    result["problem"] = f"{type(e).__name__}: {e}"
    return result

  photo = preprocess.rescale_to_retina(decoded, geometry, size=config.photo_size, fill=0,
                                       warn=False)
  masks = {name: np.zeros((size, size), bool) for name in lesions.MASK_NAMES}
  annotated = {name: False for name in lesions.MASK_NAMES}
  for mask_name, mask_path in entry.mask_paths:
    if mask_path is None:
      result["masks"][mask_name] = "missing"
      annotated[mask_name] = config.missing_mask_means_absent
      continue
    try:
      full = _read_mask(mask_path)
      k = _reduction_factor(full.shape, decoded.shape)
      if k is None:
        raise ValueError(f"mask is {full.shape[1]}x{full.shape[0]} px but the photograph is"
                         f" not (decoded at {decoded.shape[1]}x{decoded.shape[0]} px)")
      masks[mask_name] = warp_mask(full, geometry.scaled(k), size=size,
                                   threshold=config.mask_threshold,
                                   radius_fraction=options.get("radius_fraction"))
      annotated[mask_name] = True
      result["masks"][mask_name] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      result["masks"][mask_name] = f"{mask_path}: {e}"
  ok_png, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  ok_jpeg, jpeg = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 90])
  if not (ok_png and ok_jpeg):
    result["problem"] = "PNG/JPEG encoding failed"
    return result
  result["example"] = {
      "name": entry.name, "label": entry.label, "macular_edema": entry.macular_edema,
      "image": png.tobytes(), "photo": jpeg.tobytes(), "masks": masks, "annotated": annotated}
  return result


# ---------------------------------------------------------------------------
# The builder.


@dataclasses.dataclass(eq=False)
class IdridConfig(tfds.core.BuilderConfig):
  """One IDRiD variant; make them with ``make_config``.

  Attributes:
    task: ``segmentation`` (part A, 81 images with masks) or ``grading``
      (part B, 516 graded images).
    size: side of the preprocessed ``image`` and of the masks.
    photo_size: side of the ``photo`` feature.
    mask_threshold: coverage fraction above which a mask pixel is True.
    missing_mask_means_absent: a missing IDRiD mask file is an empty annotated
      mask (True: IDRiD ships masks only for lesions present) or an
      unannotated one (False).
    preprocess_options: ``drig.preprocess.preprocess_fundus`` keyword
      arguments other than ``size``, as (name, value) pairs.
  """
  task: str = "segmentation"
  size: int = 256
  photo_size: int = 512
  mask_threshold: float = 0.0
  missing_mask_means_absent: bool = True
  preprocess_options: tuple[tuple[str, Any], ...] = ()


def make_config(task: str = "segmentation", size: int = 256, *, photo_size: int | None = None,
                mask_threshold: float = 0.0, missing_mask_means_absent: bool = True,
                preprocess_options: Mapping[str, Any] | None = None) -> IdridConfig:
  """An ``IdridConfig`` named ``<task>-<size>``, plus a hash of any non-default option.

  Args:
    task: ``segmentation`` or ``grading``.
    size: preprocessed image side.
    photo_size: ``photo`` side; default ``2 * size``.
    mask_threshold, missing_mask_means_absent: see ``IdridConfig``.
    preprocess_options: keyword arguments of ``preprocess_fundus`` (not size).

  Returns:
    The config; equal arguments give equal names (the data are found again).
  """
  if task not in TASKS:
    raise ValueError(f"unknown IDRiD task {task!r}; known: {', '.join(TASKS)}")
  options = dict(preprocess_options or {})
  if "size" in options:
    raise ValueError("give the size as make_config(size=...), not in preprocess_options")
  photo_size = int(photo_size or 2 * size)
  defaults = {"photo_size": 2 * size, "mask_threshold": 0.0, "missing_mask_means_absent": True}
  chosen = {"photo_size": photo_size, "mask_threshold": mask_threshold,
            "missing_mask_means_absent": missing_mask_means_absent}
  extra = {k: v for k, v in chosen.items() if v != defaults[k]}
  extra.update(options)
  name = f"{task}-{size}" + (f"-{generation.overrides_hash(extra)}" if extra else "")
  part = SEGMENTATION_PART if task == "segmentation" else GRADING_PART
  description = (f"IDRiD part \"{part}\", drig preprocessing at {size} px"
                 + (f" with {extra}" if extra else "") + ".")
  return IdridConfig(
      name=name, description=description, task=task, size=int(size), photo_size=photo_size,
      mask_threshold=float(mask_threshold), missing_mask_means_absent=missing_mask_means_absent,
      preprocess_options=tuple(sorted(options.items())))


BUILDER_CONFIGS = tuple(make_config(task, size) for size in (256, 512) for task in TASKS)


class Idrid(generation.PhotographBuilder):
  """IDRiD segmentation and grading parts, preprocessed by drig at generation.

  ``Idrid(num_workers=...)``: see ``generation.PhotographBuilder``.
  """

  name = NAME
  DISPLAY_NAME = "IDRiD"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: segmentation and grading parts."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = list(BUILDER_CONFIGS)
  DEFAULT_CONFIG_NAME = "segmentation-256"

  def _create_builder_config(self, builder_config, version):
    # Any "<task>-<size>" name works, not only the predefined sizes, so that a
    # data config can say builder_config=f"segmentation-{image_size}".
    if isinstance(builder_config, str):
      name, _, pinned = builder_config.partition(":")
      match = re.fullmatch(r"(segmentation|grading)-(\d+)", name)
      if match and name not in self.builder_configs:
        builder_config = make_config(match[1], int(match[2]))
        version = version or pinned or None
    return super()._create_builder_config(builder_config, version)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.size
    return tfds.core.DatasetInfo(
        builder=self,
        description=("IDRiD retina photographs (Porwal et al. 2018), preprocessed by drig. "
                     + config.description),
        # label: DR grade 0-4, -1 where IDRiD publishes none (the segmentation part).
        features=generation.fundus_features(
            size, config.photo_size,
            # Risk of macular edema 0-2; -1 where unpublished.
            macular_edema=tfds.features.ClassLabel(num_classes=NUM_MACULAR_EDEMA_GRADES),
            annotated=tfds.features.FeaturesDict({
                name: tfds.features.Tensor(shape=(), dtype=np.bool_)
                for name in lesions.MASK_NAMES})),
        supervised_keys=("image", "label"),
        homepage=HOMEPAGE,
        citation=_CITATION,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    try:
      path = dl_manager.manual_dir
    except AssertionError as e:
      raise ManualDownloadError(f"{e}") from None
    layout = check_manual_dir(path, self.builder_config.task)
    return {split: self._generate_split(split, layout) for split in SPLITS}

  def _generate_examples(self, split, layout):
    # GeneratorBasedBuilder's abstract entry point; the splits use _generate_split.
    yield from self._generate_split(split, layout)

  def _generate_split(self, split: str, layout: Layout) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ``(name, example)`` for one split, recording what was left out."""
    config = self.builder_config
    if layout.task == "segmentation":
      entries, bad, unlisted = segmentation_entries(layout, split), [], []
    else:
      entries, bad, unlisted = grading_entries(layout, split)
    report = self._start_report(
        split, listed=len(entries) + len(bad), bad=list(bad), warnings=list(unlisted),
        missing_masks=[], bad_masks=[],
        mask_files={name: 0 for name in IDRID_MASKS} if layout.task == "segmentation" else {})
    jobs = [(entry, config) for entry in entries]
    results = self._map(process_entry, jobs, chunksize=4)
    for entry, result in zip(entries, results):
      for message in result["warnings"]:
        report["warnings"].append({"name": entry.name, "file": entry.image_path,
                                   "warning": message})
      if result["example"] is None:
        self._leave_out(report, split, entry.name, entry.image_path, result["problem"])
        continue
      mask_folders = layout.masks.get(split, {})
      for mask_name, status in result["masks"].items():
        if status == "missing":
          _, suffix = IDRID_MASKS[mask_name]
          report["missing_masks"].append({
              "name": entry.name, "mask": mask_name,
              "file": os.path.join(mask_folders[mask_name], f"{entry.name}_{suffix}.tif")})
        elif status == "ok":
          report["mask_files"][mask_name] += 1
        else:
          report["bad_masks"].append({"name": entry.name, "mask": mask_name, "problem": status})
          _log.warning("IDRiD %s: %s mask of %s not used: %s", split, mask_name, entry.name,
                       status)
      report["written"] += 1
      yield entry.name, result["example"]

  def _report_fields(self):
    return {"annotated_types": sorted(IDRID_MASKS) if self.builder_config.task == "segmentation"
                               else []}

  def _split_summary(self, report):
    return (f"{len(report['missing_masks'])} missing and {len(report['bad_masks'])} bad mask "
            f"files, {len(report['warnings'])} warnings")


_CITATION = """\
@article{porwal2018idrid,
  title={Indian Diabetic Retinopathy Image Dataset (IDRiD): A Database for Diabetic
         Retinopathy Screening Research},
  author={Porwal, Prasanna and Pachade, Samiksha and Kamble, Ravi and Kokare, Manesh and
          Deshmukh, Girish and Sahasrabuddhe, Vivek and Meriaudeau, Fabrice},
  journal={Data},
  volume={3},
  number={3},
  pages={25},
  year={2018},
  doi={10.3390/data3030025}
}
"""


def builder(config: str | IdridConfig = "segmentation-256", *,
            data_dir: str | os.PathLike | None = None, num_workers: int | None = None) -> Idrid:
  """Returns the IDRiD builder for a config name or ``IdridConfig``.

  Args:
    config: ``segmentation-256``, ``grading-256``, ``-512`` variants, or
      ``make_config(...)``.
    data_dir: TFDS data directory.
    num_workers: generation processes (see ``Idrid``).
  """
  return Idrid(config=config, data_dir=None if data_dir is None else os.fspath(data_dir),
               num_workers=num_workers)


def prepare(config: str | IdridConfig = "segmentation-256", *,
            data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None,
            num_workers: int | None = None) -> Idrid:
  """Generates the data set (array_record) if it is not there yet; returns the builder.

  Raises:
    ManualDownloadError: not prepared and the manual download is missing or
      incomplete for the config's task.
  """
  b = builder(config, data_dir=data_dir, num_workers=num_workers)
  if not b.is_prepared():
    check_manual_dir(manual_dir, b.builder_config.task)
    b.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return b


# The report written beside a prepared data set (see the module docstring).
read_bad_image_report = generation.read_bad_image_report
