"""TFDS builder ``synthetic_fundus``: procedural fundus photographs with lesion masks.

drig's embedded default data set and its test data: no download, generated
from a seed by ``drig.data.synthetic_fundus`` (see there for what is drawn and
how grades map to lesions). Prepare it with ``python -m drig.prepare_data`` or
``drig.data.datasets.load_builder("synthetic_fundus", builder_config=...)``.

Features of one example (S = ``image_size``, P = ``photo_size``):

* ``name``: Text, ``"<split>_<index:06d>"``; ``as_data_source(split)[i]`` is
  example ``i`` (generation order is storage order; the grades are shuffled).
* ``label``: ClassLabel(5), the DR grade 0-4.
* ``image``: Image uint8 ``[S, S, 3]``, PNG: the model input, i.e.
  ``drig.preprocess.preprocess_fundus(photo, size=S)`` of the decoded JPEG.
* ``photo``: Image uint8 ``[P, P, 3]``, JPEG (quality 72-95 per example): the
  raw camera-style photograph, for figures. The preprocessed ``image`` was made
  from OpenCV's decoding of these bytes; TensorFlow's JPEG decoder may differ
  by a level or two in some pixels.
* ``masks``: FeaturesDict with one bool ``[S, S]`` Tensor per
  ``drig.data.lesions.MASK_NAMES`` (the seven lesion types and
  ``optic_disc``), stored as zlib-compressed bytes (TFDS's
  ``Tensor(encoding="zlib")``; an empty mask takes ~100 bytes). True marks the
  pixels of ``image`` covered by that type. Each mask went through the same
  geometry as ``image`` (``find_retina`` on the photograph, then
  ``rescale_mask_to_retina``: True where any photograph pixel under the input
  pixel is, so that 1-2 px microaneurysms survive shrinking) and is False outside
  the 90 % field of view (``drig.preprocess.field_of_view``).

Splits ``train``, ``validation`` and ``test``. Each split's grade counts follow
``class_weights`` exactly (largest remainder, at least ``min_per_class`` per
grade); the default weights are Kaggle/EyePACS's training distribution.

Generation renders in worker processes (``num_workers``, default one per CPU);
every example depends only on ``(seed, split, index)``, so the output does not
depend on the number of workers. Prepared data are reused by version: a change
to the renderer or to ``drig.preprocess`` that changes examples must bump
``SyntheticFundus.VERSION``.

Stored as ``array_record`` by ``drig.data.datasets.load_builder``, so that
``builder.as_data_source(split)`` gives random access (numpy; ``name`` comes
back as bytes). Caveats (TFDS 4.9.10):

* ``as_dataset`` and ``tfds.load`` cannot read ``array_record`` (TFDS raises
  NotImplementedError); for tf.data, prepare a copy with
  ``load_builder(..., file_format="tfrecord")`` in another ``data_dir``.
* Reading an example decodes every feature (PNG, JPEG, 8 zlib masks). When
  only some are needed, pass ``decoders=datasets.skip_decoding(builder,
  keep=("image", "label"))``: the rest stay undecoded bytes.
"""

import dataclasses
import multiprocessing
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from drig.data import generation
from drig.data import synthetic_examples
from drig.data import synthetic_fundus

_SPLITS = ("train", "validation", "test")
# With num_workers=None, one worker per this many examples (up to one per CPU).
_EXAMPLES_PER_AUTO_WORKER = 100


@dataclasses.dataclass(eq=False)
class SyntheticFundusConfig(tfds.core.BuilderConfig):
  """Size and make-up of a ``synthetic_fundus`` variant.

  Attributes:
    num_train, num_validation, num_test: examples per split (0 omits a split).
    photo_size: side of the rendered photograph (px).
    image_size: side of the preprocessed model input and the masks (px).
    class_weights: relative frequency of grades 0-4 (normalised).
    min_per_class: least examples of each grade in every split.
    seed: base seed; examples derive theirs from (seed, split, index).
    jpeg_quality: (min, max) JPEG quality of the photographs.
    render_options: ``drig.data.synthetic_fundus.RenderOptions`` overrides, as
      a tuple of (name, value) pairs.
    preprocess_options: keyword arguments of ``drig.preprocess.preprocess_fundus``
      (default: the poster's values), as a tuple of (name, value) pairs.
  """
  num_train: int = 10_000
  num_validation: int = 2_000
  num_test: int = 2_000
  photo_size: int = 512
  image_size: int = 256
  class_weights: tuple[float, ...] = synthetic_fundus.KAGGLE_TRAIN_COUNTS
  min_per_class: int = 3
  seed: int = 0
  jpeg_quality: tuple[int, int] = (72, 95)
  render_options: tuple[tuple[str, Any], ...] = ()
  preprocess_options: tuple[tuple[str, Any], ...] = ()

  def split_sizes(self) -> dict[str, int]:
    sizes = dict(zip(_SPLITS, (self.num_train, self.num_validation, self.num_test)))
    return {split: n for split, n in sizes.items() if n > 0}

  def class_counts(self, split: str) -> np.ndarray:
    """Grade counts [5] of a split."""
    return synthetic_examples.allocate_counts(self.split_sizes()[split], self.class_weights,
                                            self.min_per_class)

  def example_spec(self) -> synthetic_examples.ExampleSpec:
    return synthetic_examples.ExampleSpec(
        seed=self.seed, photo_size=self.photo_size, image_size=self.image_size,
        jpeg_quality=tuple(self.jpeg_quality), render_options=tuple(self.render_options),
        preprocess_options=tuple(self.preprocess_options))


BUILDER_CONFIGS = (
    SyntheticFundusConfig(
        name="default",
        description="10k/2k/2k examples; 512 px photographs, 256 px model inputs.",
    ),
    SyntheticFundusConfig(
        name="runlocal", num_train=5_000, num_validation=1_000, num_test=1_000,
        photo_size=256, image_size=128,
        description="5k/1k/1k examples; 256 px photographs, 128 px inputs (CPU runs).",
    ),
    SyntheticFundusConfig(
        name="tiny", num_train=40, num_validation=15, num_test=15, photo_size=160,
        image_size=80,
        description="40/15/15 examples; 160 px photographs, 80 px inputs (tests; Inception-v3"
                    " needs at least 75 px).",
    ),
)


def make_config(base: str = "default", **overrides: Any) -> SyntheticFundusConfig:
  """A predefined config, or a copy with ``overrides`` named ``f"{base}-{hash}"``.

  Args:
    base: ``default``, ``runlocal`` or ``tiny``.
    **overrides: ``SyntheticFundusConfig`` fields; None values are ignored.

  Returns:
    The config. Equal overrides give equal names, so the data are found again.
  """
  configs = {c.name: c for c in BUILDER_CONFIGS}
  if base not in configs:
    raise ValueError(f"unknown synthetic_fundus config {base!r}; known: {', '.join(configs)}")
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if not overrides:
    return configs[base]
  fields = {f.name for f in dataclasses.fields(SyntheticFundusConfig)}
  unknown = set(overrides) - fields
  if unknown or {"name", "version", "description"} & set(overrides):
    raise ValueError(f"cannot override {sorted(unknown or overrides)} of a synthetic_fundus"
                     f" config; fields: {sorted(fields - {'name', 'version', 'description'})}")
  for key in ("class_weights", "jpeg_quality", "render_options", "preprocess_options"):
    if key in overrides:
      overrides[key] = tuple(tuple(v) if isinstance(v, list) else v for v in overrides[key])
  name = f"{base}-{generation.overrides_hash(overrides)}"
  return dataclasses.replace(configs[base], name=name,
                             description=f"{base} with {overrides}", **overrides)


class SyntheticFundus(generation.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
  """Procedural fundus photographs, DR grades 0-4, with per-lesion masks."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Masks keep every photograph pixel a lesion covers (area "
                            "resampling) instead of nearest-neighbour samples."}
  BUILDER_CONFIGS = list(BUILDER_CONFIGS)
  DEFAULT_CONFIG_NAME = "default"

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """Args: num_workers: generation processes; None: one per CPU for splits of
    at least 200 examples, else in-process; 0 or 1: in-process."""
    super().__init__(**kwargs)
    self._num_workers = num_workers

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=generation.fundus_features(size, config.photo_size),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split)
            for split in self.builder_config.split_sizes()}

  def _generate_examples(self, split: str):
    config = self.builder_config
    labels = synthetic_examples.split_labels(config.seed, split, config.class_counts(split))
    spec = config.example_spec()
    tasks = [(spec, split, index, int(grade)) for index, grade in enumerate(labels)]
    workers = self._num_workers
    if workers is None:
      # Auto: one process per CPU, but only for splits big enough to repay
      # starting them (about a second per pool).
      cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
      workers = min(cpus or 1, len(tasks) // _EXAMPLES_PER_AUTO_WORKER)
    workers = min(workers, len(tasks))
    if workers <= 1:
      for index, task in enumerate(tasks):
        yield index, synthetic_examples.make_example_task(task)
      return
    # "forkserver": the parent runs TensorFlow's threads, which fork would copy
    # half-way. The server process is started once, imports the renderer, and
    # forks the workers of every split's pool from there.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["drig.data.synthetic_examples", "drig.preprocess"])
    with context.Pool(workers, initializer=generation.init_worker) as pool:
      chunk = max(1, min(16, len(tasks) // (4 * workers)))
      for index, example in enumerate(pool.imap(synthetic_examples.make_example_task, tasks,
                                                chunksize=chunk)):
        yield index, example
