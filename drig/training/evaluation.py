"""Evaluating the grader: predictions over a split, test-time augmentation, logging.

``predict_step`` gives grade probabilities (optionally averaged over flipped
and rotated copies of each image); ``predict_all`` runs it over every example
of an evaluation split on every host; ``evaluate`` turns that into
``drig.training.metrics.grading_metrics``; ``log_grading_metrics`` logs the
headline figures (kappa beside grade-1 recall), per-grade recall and the
confusion matrix.
"""

from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from drig import grading
from drig import parallel
from drig.training import metrics as metrics_lib


# (rotations by 90 degrees, flip rows then) pairs; images are [N, H, W, C].
TEST_TIME_AUGMENTATIONS = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),  # identity, vertical, both, horizontal
    "rotations": ((0, False), (1, False), (2, False), (3, False)),
    "dihedral": tuple((k, flip) for k in range(4) for flip in (False, True)),
}


def transform_images(images: jax.Array, quarter_turns: int, flip: bool) -> jax.Array:
  """Flips [N, H, W, C] images upside down if ``flip``, then rotates them by 90 degrees k times."""
  if flip:
    images = images[:, ::-1]
  return jnp.rot90(images, quarter_turns, axes=(1, 2))


def predict_step(variables: dict, images: jax.Array, *, model,
                 test_time_augmentation: str = "none") -> jax.Array:
  """Grade probabilities [N, 5] in float32, inference mode.

  With ``test_time_augmentation`` other than "none", the mean of the
  probabilities of the transformed copies of each image (see
  ``TEST_TIME_AUGMENTATIONS``): a fundus photograph has no preferred
  orientation, so the grader's disagreement between copies is noise to
  average away.

  Raises:
    ValueError: ``test_time_augmentation`` is not a key of ``TEST_TIME_AUGMENTATIONS``.
  """
  check_test_time_augmentation(test_time_augmentation)
  transforms = TEST_TIME_AUGMENTATIONS[test_time_augmentation]
  total = 0.0
  for quarter_turns, flip in transforms:
    logits = model.apply(variables, grading.to_model_input(
        transform_images(images, quarter_turns, flip)), train=False)
    total = total + jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return total / len(transforms)


def check_test_time_augmentation(name: str) -> None:
  """Raises ValueError unless ``name`` is a key of ``TEST_TIME_AUGMENTATIONS``."""
  if name not in TEST_TIME_AUGMENTATIONS:
    raise ValueError(f"config.evaluation.test_time_augmentation must be one of "
                     f"{tuple(TEST_TIME_AUGMENTATIONS)}, got {name!r}")


def evaluate(predict_fn: Callable, variables, eval_batches, mesh) -> dict:
  """Runs ``predict_fn`` over every example of ``eval_batches`` once.

  ``eval_batches`` yields host-local dicts with ``image``, ``label`` and a
  boolean ``mask`` (False for padding). Returns ``metrics.grading_metrics``.
  """
  return metrics_lib.grading_metrics(*predict_all(predict_fn, variables, eval_batches, mesh))


def predict_all(predict_fn: Callable, variables, eval_batches,
                mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels [N], probabilities [N, 5], mask [N]) of every example of ``eval_batches``.

  Every host returns every example (see ``evaluate``); ``mask`` is False for
  the padding of the last batch.
  """
  all_probs, all_labels, all_masks = [], [], []
  for batch in eval_batches:
    images = parallel.host_local_to_global({"image": batch["image"]}, mesh)["image"]
    probs = predict_fn(variables, images)
    # Every host gathers every prediction (the eval set is small) so that the
    # metrics are identical everywhere; only host 0 writes them.
    probs = np.asarray(multihost_utils.process_allgather(probs, tiled=True)
                       if jax.process_count() > 1 else probs)
    labels, mask = batch["label"], batch["mask"]
    if jax.process_count() > 1:
      labels = np.asarray(multihost_utils.process_allgather(labels, tiled=True))
      mask = np.asarray(multihost_utils.process_allgather(mask, tiled=True))
    all_probs.append(probs)
    all_labels.append(np.asarray(labels))
    all_masks.append(np.asarray(mask))
  return np.concatenate(all_labels), np.concatenate(all_probs), np.concatenate(all_masks)


def log_grading_metrics(step: int, split: str, metrics: dict) -> None:
  """Logs the headline figures (kappa beside grade-1 recall), per-grade recall and confusion."""
  logging.info("step %d %s: accuracy %.4f kappa %.4f grade-1 recall %.4f auc(any DR) %.4f",
               step, split, metrics["accuracy"], metrics["quadratic_kappa"],
               metrics["grade_1_recall"], metrics["auc_any_dr"])
  logging.info("step %d %s: recall per grade 0-4 %s; confusion matrix (rows true, columns "
               "predicted) %s", step, split,
               " ".join(f"{r:.3f}" for r in metrics["recall_per_grade"]),
               metrics["confusion_matrix"])
