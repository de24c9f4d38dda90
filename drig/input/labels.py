"""The label of every example of a data source, read without decoding images.

Training needs every label up front to group examples by class
(``sampling.BalancedSampler``); ``load_labels`` reads them cheaply and caches
them beside a TFDS data set. ``permuted_labels`` shuffles them for the
data-randomisation sanity check (a model trained on labels unrelated to its
inputs).
"""

import logging
import os
import re
import threading
import time

from etils import epath
import jax
import numpy as np

from drig.data import tf_runtime
from drig.input.errors import InputPipelineError

LABEL_CACHE_PREFIX = "drig-labels"

_log = logging.getLogger(__name__)


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
  if is_tfds_source(source):
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


def permuted_labels(labels, key: jax.Array) -> np.ndarray:
  """The labels in a random order drawn from ``key``: Adebayo et al.'s data randomisation.

  Each example gets the label of another; every class keeps its count, so the
  class-balanced sampler fills its batches as with the true labels, but which
  images carry a grade no longer depends on what they show.

  Args:
    labels: int ``[N]``, every example's true label.
    key: a JAX random key (e.g. ``drig.prng.named_key(root, "shuffle_labels")``);
      the same key gives the same permutation on every host and machine.

  Returns:
    int64 ``[N]``: ``labels[permutation]``.

  Raises:
    InputPipelineError: labels that are not a 1-D integer array.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise InputPipelineError(
        f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}")
  order = np.asarray(jax.random.permutation(key, labels.shape[0]))
  return labels[order].astype(np.int64)


def is_tfds_source(source) -> bool:
  """Whether ``source`` is a TFDS ``array_record`` data source."""
  return all(hasattr(source, a) for a in ("dataset_info", "data_source", "split"))


def _tfds_labels(source, key: str) -> np.ndarray:
  """Labels of a TFDS data source from raw records, without decoding images."""
  tf = tf_runtime.import_tensorflow()  # heavy: only TFDS sources need TensorFlow
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
