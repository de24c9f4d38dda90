"""Training losses of the grader's heads, chosen by ``config.loss`` and ``config.model.head``.

The poster trains with plain softmax cross-entropy, the default. The options
are what the diabetic-retinopathy literature uses to make a grader see the
rare early grades:

* ``label_smoothing`` ε: the target puts 1 - ε on the true grade and spreads
  ε evenly over all grades (optax's ``smooth_labels``, as Szegedy et al. for
  Inception-v3), so the logits stay finite and the grader less over-confident.
* ``class_weight_power`` k: each example's loss is weighted by
  ``share(grade) ** -k`` of the training batches' grade shares
  (``config.data.class_proportions``), normalised so that the weights average
  1 over a batch; k = 1 is inverse-frequency ("balanced") weighting, 0.5 its
  square root, 0 none. The balanced sampler already raises grade 1 to 1/16 of
  each batch; the weights act on top of it.
* ``name="focal"`` with ``focal_gamma`` γ (Lin et al. 2017, softmax form):
  ``-sum_c q_c (1 - p_c)^γ log p_c`` for the (possibly smoothed) target q,
  which for a one-hot target is ``-(1 - p_y)^γ log p_y``: well-classified
  examples count less, the hard ones (often grade 1) more. γ = 0 is the
  cross-entropy.

The regression head (``config.model.head = "regression"``) outputs the grade
as one real number y [N, 1] and is trained against the grade itself, with
``config.loss.regression``: ``"mse"``, (y - grade)^2, or ``"smooth_l1"`` with
``smooth_l1_beta`` β, 0.5 (y - grade)^2 / β within β of the grade and
|y - grade| - β / 2 beyond (Huber's loss divided by β: a grader that is
grades off on an outlier image is pulled back linearly, not quadratically).
``class_weight_power`` weighs its examples as above; label smoothing and the
focal loss are about class probabilities and are refused with it.

Every loss is the batch mean of per-example losses, a pure function of
(outputs, labels), safe under ``jit``.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

LOSS_NAMES = ("softmax_cross_entropy", "focal")
REGRESSION_LOSS_NAMES = ("mse", "smooth_l1")

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def class_weights(proportions: Sequence[float], power: float) -> jax.Array:
  """Per-grade weights ``share ** -power``, averaging 1 under the grade shares.

  Args:
    proportions: relative frequency of each grade in training batches (any scale).
    power: 0 for none, 1 for inverse frequency.

  Returns:
    float32 [len(proportions)].

  Raises:
    ValueError: a proportion is not positive, or ``power`` is negative.
  """
  shares = jnp.asarray(proportions, jnp.float32)
  if shares.ndim != 1 or not bool(jnp.all(shares > 0)):
    raise ValueError(f"class proportions must be positive numbers, got {tuple(proportions)}")
  if power < 0:
    raise ValueError(f"config.loss.class_weight_power must be >= 0, got {power}")
  shares = shares / shares.sum()
  weights = shares ** -power
  return weights / jnp.sum(shares * weights)


def focal_loss(logits: jax.Array, targets: jax.Array, gamma: float) -> jax.Array:
  """Softmax focal loss per example: ``-sum_c targets_c (1 - p_c)^gamma log p_c``.

  Args:
    logits: float [N, C].
    targets: float [N, C] target distribution (one-hot or smoothed).
    gamma: focusing exponent, >= 0; 0 gives the cross-entropy.

  Returns:
    float [N].
  """
  log_p = jax.nn.log_softmax(logits, axis=-1)
  modulator = (1.0 - jnp.exp(log_p)) ** gamma
  return -jnp.sum(targets * modulator * log_p, axis=-1)


def smooth_l1_loss(predictions: jax.Array, targets: jax.Array, beta: float) -> jax.Array:
  """Elementwise smooth L1: 0.5 d^2 / beta where |d| < beta, else |d| - beta / 2 (d = p - t)."""
  return optax.huber_loss(predictions, targets, delta=beta) / beta


def check_loss_config(loss_config, head: str = "softmax") -> None:
  """Raises ValueError naming the field of ``config.loss`` that is out of range.

  Args:
    loss_config: ``config.loss``.
    head: ``config.model.head``; the regression head takes
      ``loss_config.regression`` and refuses label smoothing and the focal loss.
  """
  if head == "regression":
    regression = loss_config.get("regression", "mse")
    if regression not in REGRESSION_LOSS_NAMES:
      raise ValueError(f"config.loss.regression must be one of {REGRESSION_LOSS_NAMES}, got "
                       f"{regression!r}")
    if not loss_config.get("smooth_l1_beta", 1.0) > 0:
      raise ValueError(f"config.loss.smooth_l1_beta must be positive, got "
                       f"{loss_config.smooth_l1_beta}")
    if loss_config.name == "focal" or loss_config.label_smoothing:
      raise ValueError("config.loss.name='focal' and config.loss.label_smoothing act on class "
                       "probabilities; the regression head (config.model.head='regression') is "
                       "trained with config.loss.regression ('mse' or 'smooth_l1') instead")
  if loss_config.name not in LOSS_NAMES:
    raise ValueError(f"config.loss.name must be one of {LOSS_NAMES}, got {loss_config.name!r}")
  if not 0.0 <= loss_config.label_smoothing < 1.0:
    raise ValueError(f"config.loss.label_smoothing must lie in [0, 1), got "
                     f"{loss_config.label_smoothing}")
  if loss_config.focal_gamma < 0:
    raise ValueError(f"config.loss.focal_gamma must be >= 0, got {loss_config.focal_gamma}")
  if loss_config.class_weight_power < 0:
    raise ValueError(f"config.loss.class_weight_power must be >= 0, got "
                     f"{loss_config.class_weight_power}")


def make_loss(loss_config, class_proportions: Sequence[float], num_classes: int,
              head: str = "softmax") -> LossFn:
  """The batch loss ``loss(outputs, labels int [N]) -> scalar`` of ``config.loss``.

  Args:
    loss_config: ``config.loss``: ``name``, ``label_smoothing``,
      ``class_weight_power``, ``focal_gamma``, and for the regression head
      ``regression`` and ``smooth_l1_beta`` (see the module docstring).
    class_proportions: the training batches' grade shares, for the weights.
    num_classes: grades (logits per example of the classification heads).
    head: ``config.model.head``. The outputs are logits [N, C] for "softmax"
      and "ordinal", the grade estimates [N, 1] (layer ``score``) for
      "regression".

  Raises:
    ValueError: a field is unknown or out of range, or the proportions do not
      give one positive share per class.
  """
  check_loss_config(loss_config, head)
  if len(class_proportions) != num_classes:
    raise ValueError(f"class proportions {tuple(class_proportions)} need one share per each of "
                     f"the {num_classes} classes")
  weights = (class_weights(class_proportions, loss_config.class_weight_power)
             if loss_config.class_weight_power else None)
  smoothing = float(loss_config.label_smoothing)
  name, gamma = loss_config.name, float(loss_config.focal_gamma)
  if head == "regression":
    return _regression_loss(loss_config.get("regression", "mse"),
                            float(loss_config.get("smooth_l1_beta", 1.0)), weights)

  def loss(logits, labels):
    logits = logits.astype(jnp.float32)
    if name == "softmax_cross_entropy" and not smoothing and weights is None:
      # The poster's loss, on integer labels as it has always been computed.
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if smoothing:
      targets = optax.smooth_labels(targets, smoothing)
    if name == "focal":
      per_example = focal_loss(logits, targets, gamma)
    else:
      per_example = optax.softmax_cross_entropy(logits, targets)
    if weights is not None:
      per_example = per_example * weights[labels]
    return per_example.mean()

  return loss


def _regression_loss(name: str, beta: float, weights) -> LossFn:
  """The regression head's batch loss on its grade estimates [N, 1] (or [N])."""

  def loss(scores, labels):
    scores = scores.astype(jnp.float32).reshape(-1)
    targets = labels.astype(jnp.float32)
    if name == "smooth_l1":
      per_example = smooth_l1_loss(scores, targets, beta)
    else:
      per_example = jnp.square(scores - targets)
    if weights is not None:
      per_example = per_example * weights[labels]
    return per_example.mean()

  return loss
