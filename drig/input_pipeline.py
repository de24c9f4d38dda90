"""Input pipeline: class-balanced training batches and sequential evaluation batches.

Data sets are random-access sources: anything with ``__len__`` and
``__getitem__`` returning a dict with at least ``"image"`` (uint8 ``[S, S, 3]``)
and ``"label"`` (int), for example ``builder.as_data_source(split)`` of a TFDS
data set prepared in the ``array_record`` format, or a plain list of dicts.

Training (``train_iterator``): infinite batches whose class composition is
fixed by ``proportions``, a pure function of ``(seed, step)`` so that a
resumed run sees exactly the batches an uninterrupted run sees
(``drig.input.sampling``), each image augmented from ``(seed, step, global
row)`` (``drig.input.augmentation``). ``batch_size`` is always the global
batch; each host receives its rows of it (``sampling.host_rows``).

Evaluation (``eval_batches``): every example exactly once, in order, the last
batch padded, with a boolean ``"mask"`` marking real examples and ``"index"``
giving each row's example index (-1 for padding).

Both are grain pipelines (``grain.MapDataset`` over example positions, read
by grain's threads, or worker processes with ``workers > 0``, a few batches
ahead, in order). Every element is a pure function of its position, so a
resumed run needs no iterator state beyond its step, for any number of hosts;
grain's own iterator checkpoints (which tie a run to its process count) are not
needed. The class composition of every batch is exact because the sampler
builds whole batches (grain's weighted ``mix`` interleaves by blocks, which
does not guarantee 8:1:2:1:4 in each batch of 16). Images stay uint8 by default: a quarter of the
host-to-device traffic of float32. Convert on the device with
``grading.to_model_input`` inside the jitted step.
"""

import dataclasses
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

from absl import flags

import grain
import jax
import numpy as np

from drig import grading
from drig.input import augmentation as augmentation_lib
from drig.input import labels as labels_lib
from drig.input import sampling
from drig.input.errors import InputPipelineError

_log = logging.getLogger(__name__)

# Training reads only the image: the label comes from the labels the sampler balances
# (train_iterator's ``labels``), so a run on permuted labels trains on what it balances.
_TRAIN_KEYS = ("image",)

# grain's random-access datasets have a length; training streams are this many
# steps long, which no run reaches.
_MAX_STEPS = 2**40


def _lean_source(source, keys: Sequence[str]):
  """A TFDS source that decodes only ``keys`` (masks etc. stay undecoded bytes)."""
  if not labels_lib.is_tfds_source(source) or source.decoders:
    return source
  # Lazy: TensorFlow Datasets is heavy, and only TFDS sources need it.
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



def _default_process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
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
                   augment: augmentation_lib.Augmentation | Mapping[str, Any] | None = None,
                   image_dtype=np.uint8, prefetch: int | None = None,
                   num_threads: int | None = None,
                   workers: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite class-balanced training batches for this host, from ``start_step`` on.

  Batch ``step`` holds the examples ``BalancedSampler(labels, batch_size,
  proportions, seed)(step)`` (``drig.input.sampling``), rows
  ``host_rows(batch_size, process_index, process_count)`` of them, each
  augmented from ``(seed, step, global row)``.

  Args:
    source: random-access source of dicts with ``"image"`` uint8 ``[S, S, 3]``
      and ``"label"``.
    data_config: optional data config (``config.data``): ``class_proportions``,
      ``augment`` and ``prefetch`` are read from it where the keyword argument
      of the same meaning is None.
    batch_size: global batch size over all hosts.
    proportions: per-class share of every batch (see ``sampling.class_counts``);
      default ``sampling.DEFAULT_CLASS_PROPORTIONS``, the poster's 8:1:2:1:4.
    seed: non-negative integer; the same seed gives the same batches.
    start_step: first step to produce (resume a run here).
    labels: the label of every example of ``source``, which the sampler balances and
      the batches carry; default ``labels.load_labels(source)``. A permutation of them
      (``labels.permuted_labels``) trains on shuffled labels.
    process_index: this host; default ``jax.process_index()``.
    process_count: number of hosts; default ``jax.process_count()``.
    augment: ``augmentation.Augmentation``, a mapping of its fields
      (``config.data.augment``), or None for none.
    image_dtype: ``np.uint8`` (default; convert on the device with
      ``grading.to_model_input``) or ``np.float32`` (converted here to ``[-1, 1]``).
    prefetch: batches prepared ahead in the background (default 2).
    num_threads: decoder threads; default ``min(8, cpu_count)``.
    workers: grain worker processes that read and augment batches (each with
      ``num_threads`` threads); 0 (default) reads in this process's threads.
      Workers pay off when decoding and augmentation outrun the threads of one
      process (many cores, heavy augmentation); each holds a copy of the source.

  Yields:
    ``{"image": [B / P, S, S, 3] image_dtype, "label": int32 [B / P]}``.

  Raises:
    InputPipelineError: bad proportions, batch size or host layout (raised at
      the call, before the first batch).
  """
  data_config = data_config if data_config is not None else {}
  if proportions is None:
    proportions = data_config.get("class_proportions", sampling.DEFAULT_CLASS_PROPORTIONS)
  if augment is None:
    augment = data_config.get("augment")
  if prefetch is None:
    prefetch = data_config.get("prefetch", 2)
  if workers is None:
    workers = data_config.get("input_workers", 0)
  workers = _check_workers(workers)
  process_index, process_count = _default_process(process_index, process_count)
  rows = sampling.host_rows(batch_size, process_index, process_count)
  augmentation = augmentation_lib.Augmentation.from_config(augment)
  image_dtype = _check_image_dtype(image_dtype)
  if labels is None:
    labels = labels_lib.load_labels(source)
  sampler = sampling.BalancedSampler(labels, batch_size, proportions, seed)
  if start_step < 0:
    raise InputPipelineError(f"start_step must be >= 0, got {start_step}")
  reader = _lean_source(source, _TRAIN_KEYS)
  return _train_batches(reader, sampler, np.asarray(labels), rows, augmentation, image_dtype,
                        int(start_step), prefetch, _default_threads(num_threads), workers)


class _TrainExample:
  """Element ``i`` of this host's example stream: step ``i // L``, local row ``i % L``.

  A picklable callable (grain's worker processes receive a copy), so every
  element is a pure function of its position: the same in a thread, a worker
  process or a resumed run.
  """

  def __init__(self, reader, sampler, labels: np.ndarray, rows: slice, augmentation):
    self.reader, self.sampler, self.rows, self.augmentation = reader, sampler, rows, augmentation
    self.labels = labels
    self.local = rows.stop - rows.start

  def __call__(self, position: int) -> dict:
    step, local_row = divmod(int(position), self.local)
    row = self.rows.start + local_row
    index = self.sampler(step)[row]
    example = _read_example(self.reader, index, _TRAIN_KEYS)
    example["label"] = np.asarray(self.labels[index])
    example["image"] = augmentation_lib.augment_image(example["image"], self.augmentation,
                                                      seed=self.sampler.seed, step=step, row=row)
    return example


class _FinishBatch:
  """Labels as int32 and, for float32 output, images in the model's [-1, 1]."""

  def __init__(self, image_dtype):
    self.image_dtype = image_dtype

  def __call__(self, batch: dict) -> dict:
    if "label" in batch:
      batch["label"] = batch["label"].astype(np.int32)
    if self.image_dtype == np.float32 and "image" in batch:
      batch["image"] = grading.to_model_input(batch["image"])
    return batch


def _batched(examples, local: int, image_dtype, prefetch_depth: int, num_threads: int,
             workers: int):
  """Batches of ``local`` examples, in order, read ``prefetch_depth`` batches ahead.

  In this process (``workers == 0``) grain's ``num_threads`` threads read single
  examples, so one batch's images decode in parallel. With worker processes each
  element must be a whole batch: grain gives each worker every n-th element of
  the random-access dataset, and batching after that split would mix examples of
  different steps.
  """
  finish = _FinishBatch(image_dtype)
  if workers == 0:
    read = grain.ReadOptions(num_threads=num_threads,
                             prefetch_buffer_size=max(1, prefetch_depth) * local)
    return examples.to_iter_dataset(read).batch(local).map(finish)
  # grain's workers read its absl flags; outside an absl binary (a notebook, a
  # test) they are unparsed, so use their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, prefetch_depth))
  batches = examples.batch(local).map(finish).to_iter_dataset(read)
  return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def _iterate(dataset):
  """Yields from a grain dataset's iterator and closes it (threads, worker processes) at the end."""
  iterator = iter(dataset)
  try:
    yield from iterator
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def _train_batches(reader, sampler, labels, rows, augmentation, image_dtype, start_step,
                   prefetch_depth, num_threads, workers):
  local = rows.stop - rows.start
  examples = grain.MapDataset.range(start_step * local, _MAX_STEPS * local).map(
      _TrainExample(reader, sampler, labels, rows, augmentation))
  return _iterate(_batched(examples, local, image_dtype, prefetch_depth, num_threads, workers))


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Number of (global) evaluation batches: ``ceil(num_examples / batch_size)``."""
  return -(-num_examples // batch_size)


def eval_batches(source, batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None, keys: Sequence[str] = ("image", "label"),
                 image_dtype=np.uint8, prefetch: int = 2, num_threads: int | None = None,
                 workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Sequential evaluation batches: every example exactly once, the last one padded.

  Global batch ``b`` holds examples ``[b * B, (b + 1) * B)``; this host gets
  rows ``sampling.host_rows(B, process_index, process_count)`` of it. All hosts yield
  the same number of batches, ``num_eval_batches(len(source), B)``, even when
  a host's part of the last batch is all padding (collectives stay in step).
  Padding rows are zeros.

  Args:
    source: random-access source of dicts.
    batch_size: global batch size over all hosts.
    process_index: this host; default ``jax.process_index()``.
    process_count: number of hosts; default ``jax.process_count()``.
    keys: features to return (e.g. add mask features for lesion scoring).
    image_dtype: ``np.uint8`` or ``np.float32`` (``grading.to_model_input`` applied).
    prefetch: batches prepared ahead in the background.
    num_threads: decoder threads; default ``min(8, cpu_count)``.
    workers: grain worker processes (see ``train_iterator``); 0 reads in threads.

  Yields:
    dicts with each of ``keys`` (``[B / P, ...]``; ``"label"`` as int32),
    ``"mask"`` bool ``[B / P]`` (True for real examples) and ``"index"`` int32
    ``[B / P]`` (the example's index in ``source``, -1 for padding).
  """
  process_index, process_count = _default_process(process_index, process_count)
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise InputPipelineError(f"batch_size must be a positive integer, got {batch_size!r}")
  rows = sampling.host_rows(batch_size, process_index, process_count)
  image_dtype = _check_image_dtype(image_dtype)
  workers = _check_workers(workers)
  keys = tuple(keys)
  n = len(source)
  if n == 0:
    return iter(())
  reader = _lean_source(source, keys)
  template = _read_example(reader, 0, keys)
  return _eval_batches(reader, n, batch_size, rows, keys, template, image_dtype, prefetch,
                       _default_threads(num_threads), workers)


class _EvalExample:
  """Element ``i`` of this host's evaluation stream: global batch ``i // L``, local row ``i % L``;
  a padding row (zeros, ``mask`` False, ``index`` -1) past the last example."""

  def __init__(self, reader, n: int, batch_size: int, rows: slice, keys, template):
    self.reader, self.n, self.batch_size, self.rows = reader, n, batch_size, rows
    self.keys, self.template = keys, template
    self.local = rows.stop - rows.start

  def __call__(self, position: int) -> dict:
    batch, local_row = divmod(int(position), self.local)
    index = batch * self.batch_size + self.rows.start + local_row
    if index < self.n:
      example = _read_example(self.reader, index, self.keys)
    else:
      example = {k: np.zeros_like(v) for k, v in self.template.items()}
    example["mask"] = np.bool_(index < self.n)
    example["index"] = np.int32(index if index < self.n else -1)
    return example


def _eval_batches(reader, n, batch_size, rows, keys, template, image_dtype, prefetch_depth,
                  num_threads, workers):
  local = rows.stop - rows.start
  examples = grain.MapDataset.range(num_eval_batches(n, batch_size) * local).map(
      _EvalExample(reader, n, batch_size, rows, keys, template))
  return _iterate(_batched(examples, local, image_dtype, prefetch_depth, num_threads, workers))


def _check_image_dtype(image_dtype):
  dtype = np.dtype(image_dtype)
  if dtype not in (np.uint8, np.float32):
    raise InputPipelineError(f"image_dtype must be uint8 or float32, got {dtype}")
  return dtype.type


def _check_workers(workers) -> int:
  if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
    raise InputPipelineError(f"input workers must be an integer >= 0, got {workers!r}")
  return int(workers)
