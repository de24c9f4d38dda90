"""Class-balanced training batches of example indices, a pure function of (seed, step).

Every batch's class composition is fixed by ``proportions``. With the poster's
8:1:2:1:4, every batch of ``16k`` images holds exactly ``8k`` of grade 0, ``k``
of grade 1, ``2k`` of grade 2, ``k`` of grade 3 and ``4k`` of grade 4. Which
examples fill a batch is a pure function of ``(seed, step)``
(``balanced_batch_indices``): each class is read through its own sequence of
random permutations, one per pass over that class ("class epoch"), so a run
resumed at step ``s`` sees exactly the batches an uninterrupted run sees,
without replaying steps ``0..s-1``. Rare classes are revisited often (grade 4
is 2% of Kaggle's train split but 25% of each batch); every example of a class
is seen once before any is seen twice.

Multi-host: ``batch_size`` is always the global batch. Host ``p`` of ``P``
receives rows ``[p * B / P, (p + 1) * B / P)`` of every global batch
(``host_rows``), which is what ``jax.make_array_from_process_local_data``
expects when a mesh's batch axis runs over processes in order.
"""

import fractions
import math
import threading
from typing import Sequence

import numpy as np

from drig.input.errors import InputPipelineError

# The poster's per-batch ratio of grades 0..4.
DEFAULT_CLASS_PROPORTIONS = (8, 1, 2, 1, 4)

# Distinct stream tags so the per-class and shuffle random streams (and
# augmentation's, see ``augmentation``) never coincide for the same (seed, step).
_TAG_CLASS_EPOCH = 0x636c6173
_TAG_SHUFFLE = 0x73687566


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
    period = batch_unit(proportions)
    raise InputPipelineError(
        f"batch_size {batch_size} with class proportions {tuple(proportions)} gives per-class"
        f" counts {tuple(float(c) for c in counts)}, which are not all integers; use a multiple"
        f" of {period}")
  return np.asarray([int(c) for c in counts], np.int64)


def batch_unit(proportions: Sequence[float]) -> int:
  """The smallest batch size whose per-class counts are all integers (16 for 8:1:2:1:4)."""
  return math.lcm(*(s.denominator for s in _normalised_shares(proportions)))


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
    self.seed = check_seed(seed)
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

  def __getstate__(self):
    # grain's worker processes receive a pickled copy; the lock and cache stay here.
    state = dict(self.__dict__)
    del state["_lock"]
    state["_permutations"] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
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


def check_seed(seed) -> int:
  """``seed`` as an int; raises unless it is a non-negative integer."""
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise InputPipelineError(f"seed must be a non-negative integer, got {seed!r}")
  return int(seed)

