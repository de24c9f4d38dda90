"""Input pipeline: class-balanced training batches and sequential evaluation batches.

Data sets are random-access sources: anything with ``__len__`` and
``__getitem__`` returning a dict with at least ``"image"`` (uint8 ``[S, S, 3]``)
and ``"label"`` (int), for example ``builder.as_data_source(split)`` of a TFDS
data set prepared in the ``array_record`` format, or a plain list of dicts.

Training (``train_iterator``): infinite batches whose class composition is
fixed by ``proportions``. With the poster's 8:1:2:1:4, every batch of ``16k``
images holds exactly ``8k`` of grade 0, ``k`` of grade 1, ``2k`` of grade 2,
``k`` of grade 3 and ``4k`` of grade 4. Which examples fill a batch is a pure
function of ``(seed, step)`` (``balanced_batch_indices``): each class is read
through its own sequence of random permutations, one per pass over that class
("class epoch"), so a run resumed at step ``s`` sees exactly the batches an
uninterrupted run sees, without replaying steps ``0..s-1``. Rare classes are
revisited often (grade 4 is 2% of Kaggle's train split but 25% of each batch);
every example of a class is seen once before any is seen twice.

Multi-host: ``batch_size`` is always the global batch. Host ``p`` of ``P``
receives rows ``[p * B / P, (p + 1) * B / P)`` of every global batch, which is
what ``jax.make_array_from_process_local_data`` expects when a mesh's batch
axis runs over processes in order. Augmentation is keyed by the global row,
so the global batch is the same for any number of hosts.

Evaluation (``eval_batches``): every example exactly once, in order, the last
batch padded, with a boolean ``"mask"`` marking real examples and ``"index"``
giving each row's example index (-1 for padding).

Reading, decoding and augmentation run in a background thread with a small
pool of decoder threads (OpenCV releases the GIL), a few batches ahead.

Images stay uint8 by default: a quarter of the host-to-device traffic of
float32. Convert on the device with ``to_model_input`` inside the jitted step.
"""

import concurrent.futures
import dataclasses
import fractions
import itertools
import logging
import math
import os
import queue
import re
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

# The poster's per-batch ratio of grades 0..4.
DEFAULT_CLASS_PROPORTIONS = (8, 1, 2, 1, 4)

# Half gray: the value drig's preprocessing puts outside the retina.
FILL_VALUE = 128

# Distinct stream tags so the per-class, shuffle and augmentation random
# streams never coincide for the same (seed, step).
_TAG_CLASS_EPOCH = 0x636c6173
_TAG_SHUFFLE = 0x73687566
_TAG_AUGMENT = 0x61756720

LABEL_CACHE_PREFIX = "drig-labels"

_log = logging.getLogger(__name__)


class InputPipelineError(ValueError):
  """A batch size, class proportion or host layout that cannot work."""


# ---------------------------------------------------------------------------
# Model-input conversion.


def to_model_input(images):
  """Maps uint8 pixels ``[0, 255]`` to float32 ``[-1, 1]`` as ``x / 127.5 - 1``.

  The Keras ``inception_v3.preprocess_input`` convention. Works on numpy and
  jax arrays alike (uses only array methods), so it can run inside ``jit``.

  Args:
    images: uint8 (or any real dtype) array of pixel values, any shape.

  Returns:
    float32 array of the same shape.
  """
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_model_input(x):
  """Inverse of ``to_model_input``: float ``[-1, 1]`` to uint8 ``[0, 255]``.

  Values are rounded to the nearest integer and clipped to ``[0, 255]``.

  Args:
    x: float array, any shape.

  Returns:
    uint8 array of the same shape.
  """
  return ((x + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Class-balanced index sampler.


def class_counts(batch_size: int, proportions: Sequence[float]) -> np.ndarray:
  """Number of examples of each class in one balanced batch.

  Args:
    batch_size: global batch size, positive.
    proportions: per-class share of each batch, one entry per class. Either
      integer ratios such as ``(8, 1, 2, 1, 4)`` (normalised by their sum) or
      fractions that sum to 1 such as ``(0.5, 0.0625, 0.125, 0.0625, 0.25)``.

  Returns:
    int64 ``[num_classes]`` counts that sum to ``batch_size``.

  Raises:
    InputPipelineError: negative or all-zero proportions, fractions that do not
      sum to 1, or a batch size that gives a non-integral count for a class.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise InputPipelineError(f"batch_size must be a positive integer, got {batch_size!r}")
  shares = _normalised_shares(proportions)
  counts = [batch_size * s for s in shares]
  if any(c.denominator != 1 for c in counts):
    period = math.lcm(*(s.denominator for s in shares))
    raise InputPipelineError(
        f"batch_size {batch_size} with class proportions {tuple(proportions)} gives per-class"
        f" counts {tuple(float(c) for c in counts)}, which are not all integers; use a multiple"
        f" of {period}")
  return np.asarray([int(c) for c in counts], np.int64)


def _normalised_shares(proportions: Sequence[float]) -> list[fractions.Fraction]:
  """Proportions as exact fractions summing to 1 (see ``class_counts``)."""
  try:
    values = [float(p) for p in proportions]
  except (TypeError, ValueError):
    raise InputPipelineError(
        f"class proportions must be a sequence of numbers, got {proportions!r}") from None
  if not values:
    raise InputPipelineError("class proportions are empty")
  if any(not math.isfinite(v) or v < 0 for v in values):
    raise InputPipelineError(f"class proportions must be finite and >= 0, got {tuple(proportions)}")
  total = sum(values)
  if total <= 0:
    raise InputPipelineError(f"class proportions are all zero: {tuple(proportions)}")
  if all(v == int(v) for v in values):
    # Integer ratios, e.g. the poster's 8:1:2:1:4.
    return [fractions.Fraction(int(v), int(total)) for v in values]
  shares = [fractions.Fraction(v).limit_denominator(1_000_000) for v in values]
  if abs(float(sum(shares)) - 1.0) > 1e-6:
    raise InputPipelineError(
        f"class proportions {tuple(proportions)} sum to {total:g}; give fractions that sum to 1"
        " or integer ratios such as (8, 1, 2, 1, 4)")
  return shares


def host_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """Rows of each global batch that belong to one host.

  Args:
    global_batch_size: rows in the global batch.
    process_index: this host's index, ``0 <= process_index < process_count``.
    process_count: number of hosts.

  Returns:
    ``slice(p * B // P, (p + 1) * B // P)``.

  Raises:
    InputPipelineError: the batch does not divide by ``process_count`` or the
      index is out of range.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise InputPipelineError(
        f"process_index {process_index} is not in [0, process_count={process_count})")
  if global_batch_size % process_count:
    raise InputPipelineError(
        f"global batch size {global_batch_size} does not divide by the number of hosts"
        f" ({process_count}); choose a multiple of {process_count}")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


class BalancedSampler:
  """Class-balanced global batches of example indices, a pure function of (seed, step).

  Class ``c`` contributes ``n_c = class_counts(batch_size, proportions)[c]``
  examples to every batch. Its examples are read as an endless stream made of
  one random permutation per class epoch; batch ``step`` takes stream
  positions ``[step * n_c, (step + 1) * n_c)``. The permutation of class epoch
  ``e`` is drawn from ``(seed, c, e)`` and the order of rows within a batch
  from ``(seed, step)``, so any batch is computed directly from its step.

  The object only caches permutations; calling it is deterministic.
  """

  def __init__(self, labels: np.ndarray, batch_size: int,
               proportions: Sequence[float] = DEFAULT_CLASS_PROPORTIONS, seed: int = 0):
    """Groups examples by class.

    Args:
      labels: int ``[num_examples]``, the class of every example of the source,
        each in ``[0, len(proportions))``.
      batch_size: global batch size.
      proportions: see ``class_counts``.
      seed: non-negative integer.

    Raises:
      InputPipelineError: bad proportions or batch size, labels outside the
        classes, or a class with a positive share but no examples.
    """
    self.counts = class_counts(batch_size, proportions)
    self.batch_size = int(batch_size)
    self.seed = _check_seed(seed)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise InputPipelineError(
          f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}")
    num_classes = len(self.counts)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
      raise InputPipelineError(
          f"{int(bad.sum())} labels are outside [0, {num_classes}) (values"
          f" {sorted(set(labels[bad].tolist()))[:10]}); the proportions name {num_classes} classes")
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    self.class_indices = [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]
    empty = [c for c in range(num_classes) if self.counts[c] and not len(self.class_indices[c])]
    if empty:
      raise InputPipelineError(
          f"classes {empty} have a positive share of every batch but no examples in the data")
    self._permutations: dict[tuple[int, int], np.ndarray] = {}
    self._lock = threading.Lock()

  def _class_epoch(self, c: int, epoch: int) -> np.ndarray:
    """Example indices of class ``c`` in the order of its class epoch ``epoch``."""
    key = (c, epoch)
    with self._lock:
      perm = self._permutations.get(key)
    if perm is None:
      rng = np.random.default_rng([self.seed, _TAG_CLASS_EPOCH, c, epoch])
      perm = self.class_indices[c][rng.permutation(len(self.class_indices[c]))]
      with self._lock:
        # Keep only the two most recent epochs of each class: batches move forward.
        for old in [k for k in self._permutations if k[0] == c and k[1] < epoch - 1]:
          del self._permutations[old]
        self._permutations[key] = perm
    return perm

  def _class_slice(self, c: int, start: int, stop: int) -> np.ndarray:
    """Stream positions ``[start, stop)`` of class ``c``."""
    size = len(self.class_indices[c])
    parts = []
    pos = start
    while pos < stop:
      epoch, offset = divmod(pos, size)
      take = min(stop - pos, size - offset)
      parts.append(self._class_epoch(c, epoch)[offset:offset + take])
      pos += take
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)

  def __call__(self, step: int) -> np.ndarray:
    """Returns the global batch of example indices for ``step``.

    Args:
      step: non-negative training step.

    Returns:
      int64 ``[batch_size]`` example indices, classes mixed in random order.
    """
    if step < 0:
      raise InputPipelineError(f"step must be >= 0, got {step}")
    parts = [self._class_slice(c, step * n, (step + 1) * n)
             for c, n in enumerate(self.counts) if n]
    batch = np.concatenate(parts).astype(np.int64)
    rng = np.random.default_rng([self.seed, _TAG_SHUFFLE, step])
    return batch[rng.permutation(self.batch_size)]


def balanced_batch_indices(labels: np.ndarray, batch_size: int,
                           proportions: Sequence[float] = DEFAULT_CLASS_PROPORTIONS,
                           seed: int = 0, step: int = 0) -> np.ndarray:
  """Global batch of example indices for one training step (see ``BalancedSampler``).

  A convenience for one-off calls; iterate with a ``BalancedSampler`` to reuse
  its class grouping and permutation cache.

  Args:
    labels: int ``[num_examples]`` class of every example.
    batch_size: global batch size.
    proportions: per-class share of a batch (see ``class_counts``).
    seed: non-negative integer.
    step: non-negative training step.

  Returns:
    int64 ``[batch_size]`` example indices.
  """
  return BalancedSampler(labels, batch_size, proportions, seed)(step)


def _check_seed(seed) -> int:
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise InputPipelineError(f"seed must be a non-negative integer, got {seed!r}")
  return int(seed)


# ---------------------------------------------------------------------------
# Label index.


def load_labels(source, *, key: str = "label", cache: bool = True) -> np.ndarray:
  """Returns the label of every example of a source, as int64 ``[len(source)]``.

  Decoding whole records only to read their labels is slow (tens of seconds
  for Kaggle's 35k training images), so:
    * a source with a ``labels`` attribute (an array) is trusted as is;
    * a TFDS array_record data source is read as raw records whose labels are
      parsed from the ``tf.train.Example`` protos without decoding images, and
      the result is cached as ``drig-labels-<split>.npy`` beside the data set
      (when the directory is writable) and reused while its length matches;
    * any other source is read example by example.

  Args:
    source: random-access source of dicts.
    key: the label feature.
    cache: read and write the ``.npy`` cache of TFDS sources.

  Returns:
    int64 ``[len(source)]``.
  """
  if getattr(source, "labels", None) is not None:
    labels = np.asarray(source.labels, np.int64)
    if labels.shape != (len(source),):
      raise InputPipelineError(
          f"source.labels has shape {labels.shape}, expected ({len(source)},)")
    return labels
  if _is_tfds_source(source):
    path = _label_cache_path(source, key) if cache else None
    if path is not None:
      labels = _read_label_cache(path, len(source))
      if labels is not None:
        return labels
    start = time.perf_counter()
    labels = _tfds_labels(source, key)
    _log.info("Read %d labels of %s in %.1f s.", len(labels), source, time.perf_counter() - start)
    if path is not None:
      _write_label_cache(path, labels)
    return labels
  return np.asarray([int(source[i][key]) for i in range(len(source))], np.int64)


def _is_tfds_source(source) -> bool:
  return all(hasattr(source, a) for a in ("dataset_info", "data_source", "split"))


def _tfds_labels(source, key: str) -> np.ndarray:
  """Labels of a TFDS data source from raw records, without decoding images."""
  from drig.data import tf_runtime  # pylint: disable=g-import-not-at-top
  tf = tf_runtime.import_tensorflow()
  raw = source.data_source
  n = len(source)
  labels = np.empty((n,), np.int64)
  chunk = 512
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    records = raw.__getitems__(list(range(start, stop)))
    for i, record in enumerate(records):
      feature = tf.train.Example.FromString(record).features.feature.get(key)
      if feature is None or len(feature.int64_list.value) != 1:
        raise InputPipelineError(
            f"record {start + i} of {source} has no scalar int64 feature {key!r}")
      labels[start + i] = feature.int64_list.value[0]
  return labels


def _label_cache_path(source, key: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  data_dir = getattr(source.dataset_info, "data_dir", None)
  if not data_dir:
    return None
  split = re.sub(r"[^A-Za-z0-9_.%-]+", "_", str(source.split))
  return epath.Path(data_dir) / f"{LABEL_CACHE_PREFIX}-{key}-{split}.npy"


def _read_label_cache(path, length: int) -> np.ndarray | None:
  try:
    if not path.exists():
      return None
    with path.open("rb") as f:
      labels = np.load(f, allow_pickle=False)
  except (OSError, ValueError) as e:
    _log.warning("Ignoring unreadable label cache %s: %s", path, e)
    return None
  if labels.shape != (length,):
    _log.warning("Ignoring label cache %s: %s labels for %d examples", path, labels.shape, length)
    return None
  return labels.astype(np.int64, copy=False)


def _write_label_cache(path, labels: np.ndarray) -> None:
  # Write then rename, so a concurrent reader (another host) never sees half a file.
  tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
  try:
    with tmp.open("wb") as f:
      np.save(f, labels)
    tmp.rename(path)
  except OSError as e:
    _log.warning("Could not cache labels at %s (%s); they will be read again next time.", path, e)


# ---------------------------------------------------------------------------
# Augmentation.


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Random geometric augmentation of preprocessed (centred, circular) retinas.

  Attributes:
    flip: random left-right and up-down flips (left and right eyes are mirror
      images of each other).
    rotate: ``False`` for none; ``"90"`` for random multiples of 90 degrees
      (exact, no interpolation); ``True`` or ``"any"`` for a uniform angle in
      ``[0, 360)`` with bilinear interpolation. The retina is a centred circle
      with half gray outside, so rotation about the centre keeps it intact and
      the corners are filled with ``fill_value``.
    fill_value: value of pixels rotated in from outside the image.
  """
  flip: bool = False
  rotate: bool | str = False
  fill_value: int = FILL_VALUE

  def __post_init__(self):
    if self.rotate not in (False, True, None, "90", 90, "any"):
      raise InputPipelineError(
          f"augment.rotate must be False, '90', True or 'any'; got {self.rotate!r}")

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | "Augmentation" | None) -> "Augmentation":
    """From a mapping (e.g. ``config.data.augment``), an ``Augmentation`` or None."""
    if config is None:
      return cls()
    if isinstance(config, cls):
      return config
    items = dict(config.items()) if hasattr(config, "items") else dict(config)
    unknown = set(items) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise InputPipelineError(
          f"unknown augmentation options {sorted(unknown)}; known: flip, rotate, fill_value")
    return cls(**items)

  @property
  def active(self) -> bool:
    return bool(self.flip or self.rotate)


def augment_image(image: np.ndarray, augmentation: Augmentation, *, seed: int, step: int,
                  row: int) -> np.ndarray:
  """Augments one image, deterministically from ``(seed, step, row)``.

  Args:
    image: uint8 ``[S, S, C]``.
    augmentation: what to apply.
    seed: non-negative integer.
    step: training step.
    row: row of the image in the global batch (so the result does not depend
      on how the batch is split over hosts).

  Returns:
    uint8 array of the same shape (a new array, or the input when nothing
    applies).
  """
  if not augmentation.active:
    return image
  rng = np.random.default_rng([seed, _TAG_AUGMENT, step, row])
  # Always draw every parameter so that enabling one option does not change
  # the others' draws.
  flip_lr, flip_ud = rng.random(2) < 0.5
  quarter_turns = int(rng.integers(4))
  angle = float(rng.uniform(0.0, 360.0))
  out = image
  if augmentation.flip:
    if flip_lr:
      out = out[:, ::-1]
    if flip_ud:
      out = out[::-1]
  if augmentation.rotate in ("90", 90):
    out = np.rot90(out, quarter_turns)
  elif augmentation.rotate in (True, "any"):
    out = rotate_image(out, angle, fill_value=augmentation.fill_value)
  return np.ascontiguousarray(out)


def rotate_image(image: np.ndarray, degrees: float, *, fill_value: int = FILL_VALUE) -> np.ndarray:
  """Rotates an image about its centre, counter-clockwise, filling with ``fill_value``.

  Args:
    image: uint8 ``[H, W, C]``.
    degrees: angle, counter-clockwise (the direction of ``np.rot90``).
    fill_value: value of pixels that come from outside the image.

  Returns:
    uint8 ``[H, W, C]``, bilinear interpolation.
  """
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
  channels = image.shape[2] if image.ndim == 3 else 1
  out = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT,
                       borderValue=(fill_value,) * min(channels, 4))
  return out.reshape(image.shape)


# ---------------------------------------------------------------------------
# Reading.


def _lean_source(source, keys: Sequence[str]):
  """A TFDS source that decodes only ``keys`` (masks etc. stay undecoded bytes)."""
  if not _is_tfds_source(source) or source.decoders:
    return source
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = source.dataset_info.features

  def skip(feature):
    if isinstance(feature, tfds.features.FeaturesDict):
      return {k: skip(f) for k, f in feature.items()}
    return tfds.decode.SkipDecoding()

  decoders = {k: skip(f) for k, f in features.items() if k not in keys}
  if not decoders:
    return source
  try:
    lean = dataclasses.replace(source, decoders=decoders)
    lean[0]
  except Exception as e:  # pylint: disable=broad-except
    # Exotic feature nesting: fall back to full decoding, which is only slower.
    _log.info("Decoding all features of %s (partial decoding failed: %s).", source, e)
    return source
  return lean


def _read_example(source, index: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
  record = source[int(index)]
  try:
    return {k: np.asarray(record[k]) for k in keys}
  except KeyError as e:
    raise KeyError(f"example {index} of {source!r} has no feature {e}; it has "
                   f"{sorted(record)}") from None


def _stack(examples: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str]) -> dict:
  return {k: np.stack([ex[k] for ex in examples]) for k in keys}


class _Prefetcher:
  """Runs ``produce(i)`` for i = 0, 1, ... in a background thread, a few ahead.

  Iterating yields the results in order; exceptions raised by ``produce`` are
  re-raised in the consumer. ``close()`` stops the thread.
  """

  _DONE = object()

  def __init__(self, produce: Callable[[int], Any], num_items: int | None, depth: int):
    self._produce = produce
    self._num_items = num_items
    self._queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="drig-input", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      counter = range(self._num_items) if self._num_items is not None else itertools.count()
      for i in counter:
        if self._stop.is_set() or not self._put(("ok", self._produce(i))):
          return
      self._put(("done", None))
    except BaseException as e:  # pylint: disable=broad-except
      self._put(("error", e))

  def __iter__(self):
    try:
      while True:
        kind, value = self._queue.get()
        if kind == "done":
          return
        if kind == "error":
          raise value
        yield value
    finally:
      self.close()

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)


def _default_process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  return int(process_index), int(process_count)


def _default_threads(num_threads: int | None) -> int:
  return max(1, num_threads if num_threads else min(8, os.cpu_count() or 1))


def train_iterator(source, data_config: Mapping[str, Any] | None = None, *, batch_size: int,
                   proportions: Sequence[float] | None = None, seed: int = 0,
                   start_step: int = 0, labels: np.ndarray | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   augment: Augmentation | Mapping[str, Any] | None = None,
                   image_dtype=np.uint8, prefetch: int | None = None,
                   num_threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite class-balanced training batches for this host, from ``start_step`` on.

  Batch ``step`` holds the examples ``BalancedSampler(labels, batch_size,
  proportions, seed)(step)``, rows ``host_rows(batch_size, process_index,
  process_count)`` of them, each augmented from ``(seed, step, global row)``.

  Args:
    source: random-access source of dicts with ``"image"`` uint8 ``[S, S, 3]``
      and ``"label"``.
    data_config: optional data config (``config.data``): ``class_proportions``,
      ``augment`` and ``prefetch`` are read from it where the keyword argument
      of the same meaning is None.
    batch_size: global batch size over all hosts.
    proportions: per-class share of every batch (see ``class_counts``);
      default ``DEFAULT_CLASS_PROPORTIONS``, the poster's 8:1:2:1:4.
    seed: non-negative integer; the same seed gives the same batches.
    start_step: first step to produce (resume a run here).
    labels: the labels of ``source``; default ``load_labels(source)``.
    process_index: this host; default ``jax.process_index()``.
    process_count: number of hosts; default ``jax.process_count()``.
    augment: ``Augmentation``, a mapping of its fields (``config.data.augment``),
      or None for none.
    image_dtype: ``np.uint8`` (default; convert on the device with
      ``to_model_input``) or ``np.float32`` (converted here to ``[-1, 1]``).
    prefetch: batches prepared ahead in the background (default 2).
    num_threads: decoder threads; default ``min(8, cpu_count)``.

  Yields:
    ``{"image": [B / P, S, S, 3] image_dtype, "label": int32 [B / P]}``.

  Raises:
    InputPipelineError: bad proportions, batch size or host layout (raised at
      the call, before the first batch).
  """
  data_config = data_config if data_config is not None else {}
  if proportions is None:
    proportions = data_config.get("class_proportions", DEFAULT_CLASS_PROPORTIONS)
  if augment is None:
    augment = data_config.get("augment")
  if prefetch is None:
    prefetch = data_config.get("prefetch", 2)
  process_index, process_count = _default_process(process_index, process_count)
  rows = host_rows(batch_size, process_index, process_count)
  augmentation = Augmentation.from_config(augment)
  image_dtype = _check_image_dtype(image_dtype)
  if labels is None:
    labels = load_labels(source)
  sampler = BalancedSampler(labels, batch_size, proportions, seed)
  if start_step < 0:
    raise InputPipelineError(f"start_step must be >= 0, got {start_step}")
  reader = _lean_source(source, ("image", "label"))
  return _train_batches(reader, sampler, rows, augmentation, image_dtype, int(start_step),
                        prefetch, _default_threads(num_threads))


def _train_batches(reader, sampler, rows, augmentation, image_dtype, start_step, prefetch,
                   num_threads):
  pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="drig-decode")
  keys = ("image", "label")

  def load(step, row, index):
    example = _read_example(reader, index, keys)
    example["image"] = augment_image(example["image"], augmentation, seed=sampler.seed,
                                     step=step, row=row)
    return example

  def produce(i):
    step = start_step + i
    indices = sampler(step)[rows]
    global_rows = range(rows.start, rows.stop)
    examples = list(pool.map(load, itertools.repeat(step), global_rows, indices))
    batch = _stack(examples, keys)
    batch["label"] = batch["label"].astype(np.int32)
    if image_dtype == np.float32:
      batch["image"] = to_model_input(batch["image"])
    return batch

  prefetcher = _Prefetcher(produce, None, prefetch)
  try:
    yield from prefetcher
  finally:
    prefetcher.close()
    pool.shutdown(wait=False, cancel_futures=True)


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Number of (global) evaluation batches: ``ceil(num_examples / batch_size)``."""
  return -(-num_examples // batch_size)


def eval_batches(source, batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None, keys: Sequence[str] = ("image", "label"),
                 image_dtype=np.uint8, prefetch: int = 2,
                 num_threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Sequential evaluation batches: every example exactly once, the last one padded.

  Global batch ``b`` holds examples ``[b * B, (b + 1) * B)``; this host gets
  rows ``host_rows(B, process_index, process_count)`` of it. All hosts yield
  the same number of batches, ``num_eval_batches(len(source), B)``, even when
  a host's part of the last batch is all padding (collectives stay in step).
  Padding rows are zeros.

  Args:
    source: random-access source of dicts.
    batch_size: global batch size over all hosts.
    process_index: this host; default ``jax.process_index()``.
    process_count: number of hosts; default ``jax.process_count()``.
    keys: features to return (e.g. add mask features for lesion scoring).
    image_dtype: ``np.uint8`` or ``np.float32`` (``to_model_input`` applied).
    prefetch: batches prepared ahead in the background.
    num_threads: decoder threads; default ``min(8, cpu_count)``.

  Yields:
    dicts with each of ``keys`` (``[B / P, ...]``; ``"label"`` as int32),
    ``"mask"`` bool ``[B / P]`` (True for real examples) and ``"index"`` int32
    ``[B / P]`` (the example's index in ``source``, -1 for padding).
  """
  process_index, process_count = _default_process(process_index, process_count)
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise InputPipelineError(f"batch_size must be a positive integer, got {batch_size!r}")
  rows = host_rows(batch_size, process_index, process_count)
  image_dtype = _check_image_dtype(image_dtype)
  keys = tuple(keys)
  n = len(source)
  if n == 0:
    return iter(())
  reader = _lean_source(source, keys)
  template = _read_example(reader, 0, keys)
  return _eval_batches(reader, n, batch_size, rows, keys, template, image_dtype, prefetch,
                       _default_threads(num_threads))


def _eval_batches(reader, n, batch_size, rows, keys, template, image_dtype, prefetch,
                  num_threads):
  pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="drig-decode")
  local = rows.stop - rows.start

  def produce(b):
    indices = np.arange(b * batch_size + rows.start, b * batch_size + rows.stop)
    real = indices < n
    examples = list(pool.map(lambda i: _read_example(reader, i, keys), indices[real]))
    batch = {}
    for k in keys:
      out = np.zeros((local,) + template[k].shape, template[k].dtype)
      if examples:
        out[:len(examples)] = np.stack([ex[k] for ex in examples])
      batch[k] = out
    if "label" in batch:
      batch["label"] = batch["label"].astype(np.int32)
    if image_dtype == np.float32 and "image" in batch:
      batch["image"] = to_model_input(batch["image"])
    batch["mask"] = real
    batch["index"] = np.where(real, indices, -1).astype(np.int32)
    return batch

  prefetcher = _Prefetcher(produce, num_eval_batches(n, batch_size), prefetch)
  try:
    yield from prefetcher
  finally:
    prefetcher.close()
    pool.shutdown(wait=False, cancel_futures=True)


def _check_image_dtype(image_dtype):
  dtype = np.dtype(image_dtype)
  if dtype not in (np.uint8, np.float32):
    raise InputPipelineError(f"image_dtype must be uint8 or float32, got {dtype}")
  return dtype.type
