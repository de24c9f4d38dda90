"""What training shows in TensorBoard beside its scalars, as PNG images and hparams.

* ``config_hparams``: the config flattened to dotted names (the HPARAMS tab).
* ``input_images_png``: a grid of training inputs (after augmentation) with
  their grades, written once at the start of a run.
* ``confusion_matrix_png``: a confusion matrix with the count in each cell,
  written at each evaluation.
* ``predicted_grade_attribution`` and ``attribution_map_png``: Fig (a)-style
  maps of one fixed validation image (model input, pixel IG of the predicted
  grade, and the IG over the image) at each evaluation, so the explanation can
  be watched as training goes on. The IG uses a few steps: it is a preview,
  not a measurement.

``TrainingSummaries`` writes them through a MetricWriter as
``config.tensorboard`` asks (configs/base.py).

Figures use matplotlib's object API (a ``Figure`` on an Agg canvas, no pyplot
state) at ``DPI`` dots per inch, so each PNG's size in pixels is fixed by its
inches: ``PANEL_INCHES`` per panel.
"""

import functools
import io
import math

import jax
import jax.numpy as jnp
import numpy as np

from drig import attribution
from drig import config_diff
from drig import grading
from drig.attribution import heatmap
from drig.attribution.quantities import GradeQuantity
from drig.training import workdir as workdir_lib

DPI = 100
PANEL_INCHES = 2.0          # a panel is 200 px square at DPI
TITLE_INCHES = 0.4          # the band above panels that holds a title
INPUT_COLUMNS = 4           # panels per row of the input-image grid
CONFUSION_INCHES = 4.0      # the confusion matrix figure is 400 x 400 px


def config_hparams(config_record: dict) -> dict:
  """{"data.image_size": 128, ...}: a config (as the nested dict of config.json), flattened."""
  return dict(config_diff.flat_items(config_record))


def _figure(width: float, height: float):
  # matplotlib takes about half a second to import; only the summary figures need it.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _png(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=DPI)
  return buffer.getvalue()


def input_images_png(images, labels) -> bytes:
  """A grid of ``INPUT_COLUMNS`` columns of uint8 images [N, H, W, 3], each titled with its grade.

  Size: ``min(N, INPUT_COLUMNS)`` x ``ceil(N / INPUT_COLUMNS)`` panels of
  ``PANEL_INCHES`` (plus ``TITLE_INCHES`` a row) at ``DPI``.

  Raises:
    ValueError: ``images`` is not [N, H, W, 3] with N >= 1, or ``labels`` is not N long.
  """
  images, labels = np.asarray(images), np.asarray(labels).reshape(-1)
  if images.ndim != 4 or images.shape[0] < 1 or images.shape[-1] != 3:
    raise ValueError(f"images: expected [N, H, W, 3] with N >= 1, got shape {images.shape}")
  if len(labels) != len(images):
    raise ValueError(f"labels: {len(labels)} for {len(images)} images")
  columns = min(len(images), INPUT_COLUMNS)
  rows = math.ceil(len(images) / INPUT_COLUMNS)
  fig = _figure(columns * PANEL_INCHES, rows * (PANEL_INCHES + TITLE_INCHES))
  for i, (image, label) in enumerate(zip(images, labels)):
    ax = fig.add_subplot(rows, columns, i + 1)
    ax.imshow(image)
    ax.set_title(grading.grade_name(int(label)), fontsize=9)
    ax.axis("off")
  return _png(fig)


def confusion_matrix_png(matrix, title: str = "") -> bytes:
  """The confusion matrix (rows true grade, columns predicted) with counts in the cells.

  ``CONFUSION_INCHES`` square at ``DPI``; the colour is the share of each row
  (the recall of that grade), so rare grades read as clearly as common ones.

  Raises:
    ValueError: ``matrix`` is not square.
  """
  matrix = np.asarray(matrix, np.int64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"matrix: expected a square confusion matrix, got shape {matrix.shape}")
  totals = matrix.sum(axis=1, keepdims=True)
  shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
  fig = _figure(CONFUSION_INCHES, CONFUSION_INCHES)
  ax = fig.add_subplot()
  ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  for (row, column), count in np.ndenumerate(matrix):
    ax.text(column, row, str(count), ha="center", va="center", fontsize=10,
            color="white" if shares[row, column] > 0.5 else "black")
  ticks = np.arange(matrix.shape[0])
  ax.set_xticks(ticks)
  ax.set_yticks(ticks)
  ax.set_xlabel("predicted grade")
  ax.set_ylabel("true grade")
  if title:
    ax.set_title(title, fontsize=10)
  return _png(fig)


def predicted_grade_attribution(variables, image, *, model, steps: int):
  """Pixel IG of the probability of the predicted grade of one image, from half gray.

  Pure; jit it once with ``model`` and ``steps`` bound (e.g. with
  ``functools.partial``). The grade is chosen inside the program (the read-out
  over grades is data, see GradeQuantity), so one compilation serves every
  evaluation whatever the model predicts.

  Args:
    variables: the model's variables (params and batch_stats).
    image: uint8 [H, W, 3], one preprocessed image.
    model: the flax classifier.
    steps: IG path points (riemann_right).

  Returns:
    (attributions float32 [H, W, 3], probabilities float32 [G]).
  """
  x = grading.to_model_input(jnp.asarray(image)[None])

  def logits_fn(inputs):
    return model.apply(variables, inputs, train=False)

  probabilities = jax.nn.softmax(logits_fn(x).astype(jnp.float32), axis=-1)[0]
  weights = jax.nn.one_hot(jnp.argmax(probabilities), probabilities.shape[-1], dtype=jnp.float32)
  attributions, _ = attribution.integrated_gradients(
      GradeQuantity(logits_fn, weights), x, attribution.half_gray_baseline(x), steps=steps)
  return attributions[0], probabilities


def attribution_map_png(image, attributions, label: int, probabilities) -> bytes:
  """Fig (a)-style panels of one image: model input, IG map, IG over the image.

  Green is attribution towards the predicted grade, red against, full
  intensity at the 99th percentile of |IG| (drig.attribution.heatmap). Three
  ``PANEL_INCHES`` panels side by side under a ``TITLE_INCHES`` title (true
  and predicted grade, the predicted grade's probability).
  """
  probabilities = np.asarray(probabilities)
  predicted = int(np.argmax(probabilities))
  values = heatmap.pixel_map(attributions)
  fig = _figure(3 * PANEL_INCHES, PANEL_INCHES + TITLE_INCHES)
  panels = (("model input", np.asarray(image)), ("IG", heatmap.green_red(values)),
            ("IG over the image", heatmap.overlay(image, values)))
  for i, (name, picture) in enumerate(panels):
    ax = fig.add_subplot(1, 3, i + 1)
    ax.imshow(picture)
    ax.set_title(name, fontsize=9)
    ax.axis("off")
  fig.suptitle(f"true {grading.grade_name(label)}, predicted {predicted} "
               f"(p = {probabilities[predicted]:.2f})", fontsize=9)
  return _png(fig)


def choose_map_example(source, grade: int, limit: int = 256) -> tuple[int, dict]:
  """(index, example) of the image whose maps training shows: fixed for a run.

  The first example of ``grade`` among the first ``limit`` of ``source``, or,
  where none has it, the first of the highest grade seen (a graded image shows
  lesions to attribute).

  Raises:
    ValueError: ``source`` is empty.
  """
  if len(source) == 0:
    raise ValueError("source: the validation split has no examples to draw maps of")
  best_index, best_grade = 0, None
  for index in range(min(len(source), limit)):
    label = int(source[index]["label"])
    if label == grade:
      best_index = index
      break
    if best_grade is None or label > best_grade:
      best_index, best_grade = index, label
  return best_index, source[best_index]


# Scalars the HPARAMS tab shows beside each run's hyperparameters.
HPARAM_METRICS = ("val/quadratic_kappa", "val/accuracy", "val/grade_1_recall",
                  "test/quadratic_kappa")


class TrainingSummaries:
  """Writes ``config.tensorboard``'s images and hparams through a MetricWriter.

  Every host calls the same methods in the same order: the attribution map is
  one program over the (replicated) parameters that all hosts run together;
  only host 0's writer writes and only it draws figures.

  Args:
    config: the training config (its ``tensorboard`` section).
    writer: a drig.training.metric_writer.MetricWriter (disabled off host 0).
    model: the flax classifier.
    validation_source: the validation split's random-access source (the map's
      image is chosen from it).
  """

  def __init__(self, config, writer, model, validation_source):
    self._settings = config.tensorboard
    self._writer = writer
    self._config_record = workdir_lib.config_record(config)
    self._map_fn = None
    self._map_example = None
    if self._settings.map_steps > 0:
      # Jitted once here; called only at evaluations, never inside the train step.
      self._map_fn = jax.jit(functools.partial(predicted_grade_attribution, model=model,
                                               steps=int(self._settings.map_steps)))
      self._map_example = choose_map_example(validation_source, int(self._settings.map_grade))

  def at_start(self, step: int, host_batch: dict) -> None:
    """The hyperparameters and the first rows of this host's first batch (after augmentation)."""
    if not self._writer.enabled:
      return
    if self._settings.hparams:
      self._writer.write_hparams(config_hparams(self._config_record), HPARAM_METRICS)
    count = min(int(self._settings.input_images), len(host_batch["label"]))
    if count > 0:
      self._writer.write_image(step, "train/input_images", input_images_png(
          host_batch["image"][:count], host_batch["label"][:count]))

  def at_evaluation(self, step: int, prefix: str, metrics: dict, variables=None) -> None:
    """The confusion matrix of an evaluation; with ``variables``, the map of the fixed image."""
    if self._settings.confusion_matrix and self._writer.enabled:
      self._writer.write_image(step, f"{prefix}confusion_matrix", confusion_matrix_png(
          metrics["confusion_matrix"], f"{prefix.rstrip('/')} step {step}"))
    if self._map_fn is None or variables is None:
      return
    index, example = self._map_example
    attributions, probabilities = self._map_fn(variables, example["image"])
    if self._writer.enabled:
      self._writer.write_image(step, f"{prefix}attribution_map/image_{index}", attribution_map_png(
          example["image"], np.asarray(attributions), int(example["label"]),
          np.asarray(probabilities)))
