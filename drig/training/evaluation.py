"""Evaluating the grader: predictions over a split, test-time augmentation, logging.

``predict_step`` gives grade probabilities (optionally averaged over flipped
and rotated copies of each image), or the regression head's grade estimates;
``predict_all`` runs it over every example of an evaluation split on every
host; ``grade_probabilities`` turns a regression head's estimates into grade
probabilities around its thresholds, fitting them first on the validation
split (``drig.training.thresholds``); ``evaluate`` turns predictions into
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
from drig.models import classifier
from drig.training import metrics as metrics_lib
from drig.training import thresholds as thresholds_lib


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


def is_regression(model) -> bool:
  """Whether ``model`` is a DRClassifier with the regression head."""
  return getattr(model, "head", None) == "regression"


def output_kwargs(model) -> dict:
  """``model.apply`` keywords for the output a head is trained and evaluated on.

  ``stop_layer="score"`` (the grade estimate) for the regression head; none
  (the logits) otherwise, so that any module taking ``(x, train)`` works.
  """
  return {"stop_layer": classifier.SCORE_LAYER} if is_regression(model) else {}


def predicted_grades(model, outputs: jax.Array, batch_stats) -> jax.Array:
  """Grades [N] from the outputs of ``output_kwargs(model)``; traceable under ``jit``.

  The argmax of the logits, or for the regression head the number of the
  thresholds in ``batch_stats`` below each grade estimate.
  """
  if is_regression(model):
    thresholds = batch_stats[classifier.inception_v3.LOGITS_LAYER]["thresholds"]
    return jnp.sum(outputs.reshape(-1, 1) > thresholds[None, :], axis=-1)
  return jnp.argmax(outputs, -1)


def predict_step(variables: dict, images: jax.Array, *, model,
                 test_time_augmentation: str = "none") -> jax.Array:
  """Grade probabilities [N, 5] in float32, inference mode; for the regression head, y [N].

  The regression head's output is its grade estimate y (layer ``score``),
  because its probabilities depend on thresholds that are fitted on these
  very predictions (``grade_probabilities``).

  With ``test_time_augmentation`` other than "none", the mean of the
  probabilities (or grade estimates) of the transformed copies of each image
  (see ``TEST_TIME_AUGMENTATIONS``): a fundus photograph has no preferred
  orientation, so the grader's disagreement between copies is noise to
  average away.

  Raises:
    ValueError: ``test_time_augmentation`` is not a key of ``TEST_TIME_AUGMENTATIONS``.
  """
  check_test_time_augmentation(test_time_augmentation)
  transforms = TEST_TIME_AUGMENTATIONS[test_time_augmentation]
  regression = is_regression(model)
  total = 0.0
  for quarter_turns, flip in transforms:
    x = grading.to_model_input(transform_images(images, quarter_turns, flip))
    outputs = model.apply(variables, x, train=False, **output_kwargs(model)).astype(jnp.float32)
    total = total + (outputs[:, 0] if regression else jax.nn.softmax(outputs, axis=-1))
  return total / len(transforms)


def thresholds_of(variables) -> np.ndarray:
  """The regression head's thresholds [K - 1] held in ``variables`` (float64, on the host)."""
  return np.asarray(variables["batch_stats"][classifier.inception_v3.LOGITS_LAYER]["thresholds"],
                    np.float64)


def with_thresholds(variables, thresholds) -> dict:
  """``variables`` with the regression head's thresholds replaced (the rest shared, not copied)."""
  batch_stats = dict(variables["batch_stats"])
  head = dict(batch_stats[classifier.inception_v3.LOGITS_LAYER])
  old = head["thresholds"]
  head["thresholds"] = jnp.asarray(np.asarray(thresholds), old.dtype)
  batch_stats[classifier.inception_v3.LOGITS_LAYER] = head
  return {**variables, "batch_stats": batch_stats}


def grade_probabilities(model, variables, outputs, labels, mask=None, *,
                        fit_thresholds: bool = False) -> tuple[np.ndarray, dict, dict]:
  """Per-grade probabilities of ``predict_step`` outputs, fitting thresholds if asked.

  For the softmax and ordinal heads the outputs are already probabilities.
  For the regression head they are grade estimates y [N]: with
  ``fit_thresholds`` (the validation split) the thresholds are first fitted
  to maximise quadratic kappa on (y, labels) and put into the returned
  variables; otherwise (the test split) the thresholds in ``variables`` (the
  checkpoint's) are used as they are. The probabilities are those of the
  model's ``logits`` layer (``classifier.regression_log_probabilities``), so
  their argmax is the thresholded grade.

  Args:
    model: the DRClassifier.
    variables: its {"params", "batch_stats"}.
    outputs: ``predict_all``'s predictions: [N, K] probabilities or y [N].
    labels: int [N] true grades.
    mask: optional bool [N]; False marks padding.
    fit_thresholds: fit the regression head's thresholds on these outputs.

  Returns:
    (probabilities float64 [N, K], variables (with the fitted thresholds),
    metrics of the head to report beside the grading metrics:
    ``{"thresholds": [...]}`` for regression, else {}).
  """
  outputs = np.asarray(outputs)
  if not is_regression(model):
    return outputs, variables, {}
  if fit_thresholds:
    fitted = thresholds_lib.fit_thresholds(
        outputs, labels, mask, initial=classifier.default_regression_thresholds(model.num_classes))
    variables = with_thresholds(variables, fitted)
  thresholds = thresholds_of(variables)
  log_p = classifier.regression_log_probabilities(outputs, thresholds, model.regression_scale)
  probabilities = np.exp(np.asarray(log_p, np.float64))
  return probabilities, variables, {"thresholds": [float(t) for t in thresholds]}


def check_test_time_augmentation(name: str) -> None:
  """Raises ValueError unless ``name`` is a key of ``TEST_TIME_AUGMENTATIONS``."""
  if name not in TEST_TIME_AUGMENTATIONS:
    raise ValueError(f"config.evaluation.test_time_augmentation must be one of "
                     f"{tuple(TEST_TIME_AUGMENTATIONS)}, got {name!r}")


def evaluate(predict_fn: Callable, variables, eval_batches, mesh, model=None) -> dict:
  """Runs ``predict_fn`` over every example of ``eval_batches`` once.

  ``eval_batches`` yields host-local dicts with ``image``, ``label`` and a
  boolean ``mask`` (False for padding). Returns ``metrics.grading_metrics``.
  A regression head's grade estimates need ``model``: they are graded with
  the thresholds held in ``variables`` (``grade_probabilities``).
  """
  labels, outputs, mask = predict_all(predict_fn, variables, eval_batches, mesh)
  if model is not None:
    outputs, _, _ = grade_probabilities(model, variables, outputs, labels, mask)
  return metrics_lib.grading_metrics(labels, outputs, mask=mask)


def predict_all(predict_fn: Callable, variables, eval_batches,
                mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels [N], predictions, mask [N]) of every example of ``eval_batches``.

  The predictions are ``predict_fn``'s: probabilities [N, 5], or a
  regression head's grade estimates [N] (``predict_step``).

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
