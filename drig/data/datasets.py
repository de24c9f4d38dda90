"""Data sets by name: the registry of drig's TFDS builders, and preparing them.

The lesion vocabulary the builders share lives in ``drig.data.lesions``; only
this registry imports the builder modules (when a data set is asked for).

Builders. ``load_builder(name, data_dir=..., builder_config=...)`` returns a
prepared ``tfds.core.DatasetBuilder`` in the ``array_record`` file format, so
``builder.as_data_source(split)`` gives deterministic random access. The
synthetic data set is generated on first use; data sets from a manual download
are generated from ``manual_dir``. ``load_builder_from_config(config.data)``
does the same from a data config (``configs/data.py``, ``configs/base.py``).

Importing this module is cheap: TensorFlow and TFDS are imported only inside
the functions that need them, after ``drig.data.tf_runtime.import_tensorflow``
has hidden the GPUs from TensorFlow.
"""

import dataclasses
import importlib
import os
import time
from typing import Any

from absl import logging
import cv2
import ml_collections
import numpy as np

from drig import grading
from drig.data import lesions
from drig.data import tf_runtime

# ---------------------------------------------------------------------------
# Builders.

DEFAULT_DATA_DIR = os.path.join("data", "tensorflow_datasets")

# drig data-set name -> (module that registers the TFDS builder, TFDS name).
# The module is imported before ``tfds.builder`` is called; None: TFDS ships it.
BUILDER_MODULES: dict[str, tuple[str | None, str]] = {
    "synthetic_fundus": ("drig.data.synthetic_fundus_builder", "synthetic_fundus"),
    "eyepacs": ("drig.data.eyepacs", "eyepacs"),
    "idrid": ("drig.data.idrid", "idrid"),
}

# Data sets that ``load_builder`` may generate without any downloaded files.
_GENERATED_LOCALLY = frozenset({"synthetic_fundus"})
# Builders whose constructor takes ``num_workers`` (generation processes).
_TAKES_NUM_WORKERS = frozenset({"synthetic_fundus", "eyepacs", "idrid"})


class DatasetNotPreparedError(RuntimeError):
  """A data set needs files that are not there, or generation was not allowed."""


def _resolve(name: str) -> str:
  """Imports the module registering ``name``'s builder; returns its TFDS name."""
  module, tfds_name = BUILDER_MODULES.get(name, (None, name))
  if module is not None:
    importlib.import_module(module)
  return tfds_name


def synthetic_builder_config(base: str = "default", **overrides: Any):
  """A ``SyntheticFundusConfig``: the named one, or a custom copy with overrides.

  A custom config is named ``f"{base}-{hash}"`` where the hash covers the
  overrides, so equal overrides find the same prepared data and different ones
  never collide.

  Args:
    base: name of a predefined config (``default``, ``runlocal``, ``tiny``).
    **overrides: fields of ``SyntheticFundusConfig`` to change (for example
      ``num_train=500, seed=3``). None values are ignored.

  Returns:
    A ``drig.data.synthetic_fundus_builder.SyntheticFundusConfig``.
  """
  tf_runtime.import_tensorflow()
  # The builder module imports TFDS: only when a synthetic config is asked for.
  from drig.data import synthetic_fundus_builder as sfb  # pylint: disable=g-import-not-at-top
  return sfb.make_config(base, **overrides)


def load_builder(name: str, *, data_dir: str | os.PathLike | None = None,
                 builder_config: Any = None, manual_dir: str | os.PathLike | None = None,
                 prepare: bool = True, file_format: str = "array_record",
                 num_workers: int | None = None):
  """Returns the prepared TFDS builder of a data set, generating it if needed.

  Args:
    name: drig data-set name (``"synthetic_fundus"``, or any TFDS name).
    data_dir: TFDS data directory; default ``data/tensorflow_datasets`` under
      the current directory.
    builder_config: TFDS builder config name or object; None for the builder's
      default.
    manual_dir: where a manual download lies (real data sets only).
    prepare: generate the data set when it is not there yet. When False, a
      missing data set raises ``DatasetNotPreparedError``.
    file_format: record format written on generation. ``array_record`` makes
      ``builder.as_data_source`` work.
    num_workers: generation processes of drig's builders (None: the builder's
      default, one per CPU). The data do not depend on it.

  Returns:
    A ``tfds.core.DatasetBuilder`` whose data exist on disk.

  Raises:
    DatasetNotPreparedError: the data are missing and cannot or may not be
      generated here.
  """
  tf_runtime.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds_name = _resolve(name)
  data_dir = os.fspath(data_dir or DEFAULT_DATA_DIR)
  kwargs = {"num_workers": num_workers} if name in _TAKES_NUM_WORKERS else {}
  builder = tfds.builder(tfds_name, config=builder_config, data_dir=data_dir, **kwargs)
  if builder.is_prepared():
    return builder
  if not prepare:
    config_name = builder.builder_config.name if builder.builder_config else None
    raise DatasetNotPreparedError(
        f"data set {name!r} (config {config_name}) is not prepared in {builder.data_dir};"
        " run python -m drig.prepare_data")
  download_config = None
  if name not in _GENERATED_LOCALLY:
    if not manual_dir:
      raise DatasetNotPreparedError(
          f"data set {name!r} is not prepared in {builder.data_dir} and needs a manual download;"
          " pass manual_dir (config.data.manual_dir) pointing at the downloaded files")
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  # TFDS announces every preparation as "Downloading and preparing" and warns that a
  # fresh folder has no dataset_info.json; say once what actually happens.
  source = ("generated on this machine" if name in _GENERATED_LOCALLY
            else f"built from the files in {manual_dir}")
  logging.info("Preparing %s in %s: %s, nothing is downloaded (TFDS's 'Downloading and "
               "preparing' and 'no dataset_info.json' messages refer to this).", name,
               builder.data_dir, source)
  builder.download_and_prepare(file_format=file_format, download_config=download_config)
  return builder


def load_builder_from_config(data_config, *, prepare: bool = True,
                             num_workers: int | None = None):
  """``load_builder`` from a data config (the ``data`` field of drig's configs).

  Reads ``name``, ``builder_config``, ``data_dir``, optionally ``manual_dir``
  and, for the synthetic data set, optional ``overrides`` (a dict of
  ``SyntheticFundusConfig`` fields; None values are ignored). When the config
  has ``image_size``, checks that the data set's ``image`` feature has it.

  Args:
    data_config: ``ml_collections.ConfigDict`` or any object with those fields.
    prepare, num_workers: as in ``load_builder``.

  Returns:
    A prepared ``tfds.core.DatasetBuilder``.

  Raises:
    ValueError: the prepared images do not have ``data_config.image_size``.
  """
  name = data_config.name
  builder_config = data_config.get("builder_config") or None
  overrides = {k: v for k, v in dict(data_config.get("overrides") or {}).items()
               if v is not None}
  if overrides:
    if name != "synthetic_fundus":
      raise ValueError(f"config overrides are only supported for synthetic_fundus, not {name!r}")
    builder_config = synthetic_builder_config(builder_config or "default", **overrides)
  builder = load_builder(
      name, data_dir=data_config.get("data_dir") or None, builder_config=builder_config,
      manual_dir=data_config.get("manual_dir") or None, prepare=prepare,
      num_workers=num_workers)
  image_size = data_config.get("image_size")
  if image_size:
    shape = builder.info.features["image"].shape
    if tuple(shape[:2]) != (image_size, image_size):
      raise ValueError(
          f"data set {builder.info.full_name} has {shape[0]}x{shape[1]} images but the config asks"
          f" for image_size={image_size}; choose the builder config that matches")
  return builder


def skip_decoding(builder, keep: tuple[str, ...] = ("label",)):
  """Decoders that leave every top-level feature except ``keep`` as raw bytes.

  Pass to ``builder.as_data_source(split, decoders=...)`` (or ``as_dataset``)
  to read, say, labels alone without decoding images.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def skip(feature):
    if isinstance(feature, tfds.features.FeaturesDict):
      return {k: skip(v) for k, v in feature.items()}
    return tfds.decode.SkipDecoding()

  return {k: skip(v) for k, v in builder.info.features.items() if k not in keep}


# ---------------------------------------------------------------------------
# Preparing a data set (the library side of ``python -m drig.prepare_data``).


@dataclasses.dataclass
class PrepareSummary:
  """What ``prepare_data`` did.

  Attributes:
    name: TFDS full name (``name/config/version``).
    path: directory of the prepared data.
    generated: False when the data were already there.
    seconds: wall time of generation (0 when reused).
    counts: split -> examples per grade, read back from the data.
    ungraded: split -> examples without a grade (label -1, e.g. IDRiD's
      segmentation images); absent when every example is graded.
    num_bytes: bytes of all files in ``path``.
    previews: paths of the preview PNGs.
  """
  name: str
  path: str
  generated: bool
  seconds: float
  counts: dict[str, list[int]]
  num_bytes: int
  previews: list[str]
  ungraded: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_examples(self) -> int:
    return sum(sum(c) for c in self.counts.values()) + sum(self.ungraded.values())

  def format(self) -> str:
    """A human-readable multi-line report."""
    lines = [f"data set {self.name}",
             f"  path: {self.path}",
             ("  generated in %.1f s (%.1f examples/s)" % (
                 self.seconds, self.num_examples / max(self.seconds, 1e-9)))
             if self.generated else "  already prepared; reused"]
    width = max(len(s) for s in self.counts) if self.counts else 5
    lines.append(f"  {'split':<{width}}  " + "  ".join(f"grade {g}" for g in range(5))
                 + ("  ungraded" if self.ungraded else "") + "    total")
    for split, counts in self.counts.items():
      ungraded = self.ungraded.get(split, 0)
      lines.append(f"  {split:<{width}}  " + "  ".join(f"{c:7d}" for c in counts)
                   + (f"  {ungraded:8d}" if self.ungraded else "")
                   + f"  {sum(counts) + ungraded:7d}")
    per_1000 = self.num_bytes / max(self.num_examples, 1) * 1000
    lines.append(f"  on disk: {self.num_bytes / 2**20:.1f} MiB "
                 f"({per_1000 / 2**20:.1f} MiB per 1000 examples)")
    lines += [f"  preview: {p}" for p in self.previews]
    return "\n".join(lines)


def _directory_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def preview_grid(examples, *, cell: int = 256) -> np.ndarray:
  """A figure of examples: photograph | model input | input with mask outlines.

  Args:
    examples: sequence of decoded examples (dicts with ``image``, ``label`` and
      optionally ``photo``, ``masks`` and ``name``).
    cell: side of each panel in pixels (images are resized to it).

  Returns:
    uint8 RGB ``[rows * (cell + header), columns * cell, 3]``.
  """
  def fit(image, interpolation):
    image = np.asarray(image)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=2)
    return cv2.resize(image, (cell, cell), interpolation=interpolation)

  header = 22
  rows = []
  for example in examples:
    panels = []
    if "photo" in example:
      panels.append(fit(example["photo"], cv2.INTER_AREA))
    image = np.asarray(example["image"])
    panels.append(fit(image, cv2.INTER_NEAREST))
    masks = {k: np.asarray(v).reshape(image.shape[:2]) for k, v in example.get("masks", {}).items()}
    if masks:
      big = {k: cv2.resize(v.astype(np.uint8), (cell, cell), interpolation=cv2.INTER_NEAREST)
             for k, v in masks.items()}
      panels.append(lesions.overlay_masks(panels[-1], big, alpha=0.9, outline_only=True))
    row = np.concatenate(panels, axis=1)
    bar = np.zeros((header, row.shape[1], 3), np.uint8)
    name = example.get("name", "")
    name = name.decode() if isinstance(name, bytes) else str(name)
    present = [k for k, v in masks.items() if v.any() and lesions.mask_type(k).is_lesion]
    text = f"{name}  grade {int(example['label'])}  " + ", ".join(present)
    cv2.putText(bar, text[:120], (4, header - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (255, 255, 255), 1, cv2.LINE_AA)
    rows.append(np.concatenate([bar, row], axis=0))
  if not rows:
    raise ValueError("no examples to preview")
  # Legend: the mask colours, wrapped to the figure's width.
  width = rows[0].shape[1]
  lines, x = [[]], 4
  for t in lesions.MASK_TYPES:
    (text_width, _), _ = cv2.getTextSize(t.name, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    if x + text_width > width - 4 and lines[-1]:
      lines.append([])
      x = 4
    lines[-1].append((t, x))
    x += text_width + 14
  legend = np.zeros((header * len(lines), width, 3), np.uint8)
  for i, line in enumerate(lines):
    for t, x in line:
      cv2.putText(legend, t.name, (x, header * (i + 1) - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                  t.colour, 1, cv2.LINE_AA)
  return np.concatenate([legend] + rows, axis=0)


def _preview_indices(grades: np.ndarray, count: int) -> np.ndarray:
  """``count`` example indices covering every grade present, ordered by grade."""
  chosen = []
  while len(chosen) < min(count, len(grades)):
    # Round robin over grades: the next unused example of each grade in turn.
    before = len(chosen)
    for grade in np.unique(grades):
      unused = [i for i in np.flatnonzero(grades == grade) if i not in chosen]
      if unused and len(chosen) < count:
        chosen.append(int(unused[0]))
    if len(chosen) == before:
      break
  return np.array(sorted(chosen, key=lambda i: (grades[i], i)), np.int64)


def prepare_data(config, *, workdir: str | os.PathLike, data_dir: str | None = None,
                 num_workers: int | None = None,
                 num_preview: int | None = None) -> PrepareSummary:
  """Generates (or finds) the data set of a config, summarises it, writes previews.

  Args:
    config: a config with a ``data`` field (``configs/data.py``,
      ``configs/base.py``), or the data config itself. Optional top-level
      ``num_workers`` (-1: one per CPU) and ``num_preview``.
    workdir: where the ``preview_<split>.png`` files go (created if missing).
    data_dir: overrides ``config.data.data_dir``.
    num_workers: overrides ``config.num_workers``.
    num_preview: overrides ``config.num_preview``; examples per preview PNG (one
      per split, covering every grade); 0 writes none.

  Returns:
    PrepareSummary.
  """

  data_config = config.data if "data" in config else config
  if data_dir:
    data_config = ml_collections.ConfigDict(data_config.to_dict())
    data_config.data_dir = data_dir
  if num_workers is None:
    num_workers = config.get("num_workers", -1)
  if num_workers is not None and num_workers < 0:
    num_workers = None
  if num_preview is None:
    num_preview = config.get("num_preview", 8)

  seconds = 0.0
  try:
    builder = load_builder_from_config(data_config, prepare=False)
    generated = False
  except DatasetNotPreparedError:
    start = time.perf_counter()  # TensorFlow is imported by now: time generation alone.
    builder = load_builder_from_config(data_config, prepare=True, num_workers=num_workers)
    seconds = time.perf_counter() - start
    generated = True

  counts, grades, ungraded = {}, {}, {}
  for split in builder.info.splits:
    labels = builder.as_data_source(split, decoders=skip_decoding(builder))
    grades[split] = np.fromiter((labels[i]["label"] for i in range(len(labels))), np.int64,
                                len(labels))
    graded = grades[split][grades[split] >= 0]
    counts[split] = np.bincount(graded, minlength=grading.NUM_GRADES).tolist()
    if len(graded) < len(grades[split]):
      ungraded[split] = int(len(grades[split]) - len(graded))

  previews = []
  if num_preview:
    os.makedirs(workdir, exist_ok=True)
    for split in builder.info.splits:
      source = builder.as_data_source(split)
      indices = _preview_indices(grades[split], num_preview)
      path = os.path.join(os.fspath(workdir), f"preview_{split}.png")
      grid = preview_grid([source[int(i)] for i in indices])
      cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
      previews.append(path)
  return PrepareSummary(
      name=builder.info.full_name, path=os.fspath(builder.data_dir), generated=generated,
      seconds=seconds, counts=counts, ungraded=ungraded,
      num_bytes=_directory_bytes(os.fspath(builder.data_dir)),
      previews=previews)
