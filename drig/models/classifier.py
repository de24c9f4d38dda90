"""The DR grader: Inception-v3 without its top, two fully connected layers, 5 logits.

As the poster builds it (Li et al.): the ImageNet base without its top layer,
global average pooling, two fully connected layers for transfer learning and
a 5-unit softmax output, one unit per DR grade.

Layers, in forward order (for attribution; see ``drig.models.layer_access``):
the base's ``Conv2d_1a_3x3`` ... ``Conv2d_4a_3x3``, ``mixed0`` ... ``mixed10``,
``pooled``, then ``fc1``, ``fc2`` (after their activation, before dropout) and
``logits``. Parameters: ``base/...`` (see ``inception_v3``), ``fc1``, ``fc2``,
``logits``.

Heads (``head``): ``"softmax"``, the poster's 5 free logits; ``"ordinal"``, a
cumulative-link (proportional-odds) head: one score s and increasing
thresholds b_1 < ... < b_4 with P(grade > k) = sigmoid(s - b_{k+1}), so the
grades are ranked consistently. The ordinal head's ``logits`` layer outputs
log P(grade = k): softmax of those is the per-grade probability itself, so
the softmax cross-entropy trains it by maximum likelihood and every
softmax-based quantity (``drig.attribution``'s ``probability_of_grade`` and
friends, the metrics) works unchanged; a "logit" there is a log-probability.
``"regression"``: one real output, the grade y (layer ``score``), trained with
squared error (``drig.training.losses``); thresholds t_1 <= ... <= t_4 fitted
on the validation split (``drig.training.thresholds``) give the grade, the
number of thresholds below y. Its ``logits`` layer maps y to per-grade
log-probabilities by the adjacent-category view around those thresholds,
log P(k) / P(k - 1) = (y - t_k) / s with scale s (``regression_scale``, 0.25
grades by default), so that softmax-based quantities work unchanged and the
most probable grade is exactly the thresholded one (see
``regression_log_probabilities``). The thresholds are the model's non-trained
state: they live in the ``batch_stats`` collection beside BatchNorm's
statistics, so every checkpoint carries the thresholds fitted at its step.
"""

import math

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from drig.models import inception_v3

HEADS = ("softmax", "ordinal", "regression")

# The regression head's output layer (the grade as a real number), before ``logits``.
SCORE_LAYER = "score"
# Grades per unit of log-odds between adjacent grades in the regression head's
# probabilities: half a grade past a threshold makes the higher grade e^2 ~ 7.4
# times as likely as the lower one.
REGRESSION_SCALE = 0.25

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "elu": nn.elu, "tanh": jnp.tanh,
               "sigmoid": nn.sigmoid, "swish": nn.swish, "linear": lambda x: x}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}  # float64 needs jax_enable_x64; for numerical checks


def ordinal_log_probabilities(score: jax.Array, thresholds: jax.Array) -> jax.Array:
  """log P(grade = k) [N, K] of the cumulative-link model P(grade > k) = sigmoid(s - b_{k+1}).

  Args:
    score: float [N, 1] (or [N]), the grade score s.
    thresholds: float [K - 1], strictly increasing.

  Returns:
    float32 [N, K]; the rows' exponentials sum to 1. The differences
    P(grade > k - 1) - P(grade > k) are taken in log space, as
    log sigmoid(a) + log sigmoid(-c) + log(1 - exp(c - a)), stable for any s.
  """
  score = jnp.asarray(score, jnp.float32).reshape(-1, 1)
  thresholds = jnp.asarray(thresholds, jnp.float32)
  z = score - thresholds[None, :]
  log_above = jax.nn.log_sigmoid(z)    # log P(grade > k)
  log_below = jax.nn.log_sigmoid(-z)   # log P(grade <= k)
  gaps = thresholds[1:] - thresholds[:-1]
  middle = log_above[:, :-1] + log_below[:, 1:] + jnp.log(-jnp.expm1(-gaps))
  return jnp.concatenate([log_below[:, :1], middle, log_above[:, -1:]], axis=-1)


def default_regression_thresholds(num_classes: int) -> tuple[float, ...]:
  """0.5, 1.5, ..., num_classes - 1.5: rounding to the nearest grade."""
  return tuple(k + 0.5 for k in range(num_classes - 1))


def regression_log_probabilities(score: jax.Array, thresholds: jax.Array,
                                 scale: float = REGRESSION_SCALE) -> jax.Array:
  """log P(grade = k) [N, K] of a regression output y around thresholds t_1..t_{K-1}.

  The adjacent-category logit model: log P(k) / P(k - 1) = (y - t_k) / s, i.e.
  P(k) proportional to exp(sum_{j <= k} (y - t_j) / s). Every row is a
  distribution (non-negative, sums to 1) for any thresholds. For
  non-decreasing thresholds the log-odds of each grade against the one below
  falls with the grade, so the most probable grade is exactly the number of
  thresholds below y (ties only at y = t_k), and raising y moves probability
  to higher grades. (The cumulative-link view, P(grade >= k) =
  sigmoid((y - t_k) / s), does not guarantee that: with unequal gaps between
  thresholds its most probable grade can differ from the thresholded one.)

  Args:
    score: float [N, 1] (or [N]), the predicted grade y.
    thresholds: float [K - 1], non-decreasing.
    scale: s > 0, in grades.

  Returns:
    float32 [N, K] log-probabilities.
  """
  score = jnp.asarray(score, jnp.float32).reshape(-1, 1)
  thresholds = jnp.asarray(thresholds, jnp.float32)
  steps = (score - thresholds[None, :]) / scale
  cumulative = jnp.concatenate([jnp.zeros_like(score), jnp.cumsum(steps, axis=-1)], axis=-1)
  return jax.nn.log_softmax(cumulative, axis=-1)


class RegressionHead(nn.Module):
  """The regression head's ``logits`` layer: y [N, 1] to log P(grade = k) [N, K].

  No parameters; the thresholds are a ``batch_stats`` variable (``thresholds``),
  initialised at 0.5, 1.5, ... and set by the trainer from the validation split
  (``drig.training.evaluation.with_thresholds``), never by gradients.
  """
  num_classes: int = 5
  scale: float = REGRESSION_SCALE

  @nn.compact
  def __call__(self, score):
    if self.num_classes < 2:
      raise ValueError(f"the regression head needs at least 2 grades, got num_classes="
                       f"{self.num_classes}")
    if not self.scale > 0:
      raise ValueError(f"model.regression_scale must be positive, got {self.scale}")
    thresholds = self.variable(
        "batch_stats", "thresholds",
        lambda: jnp.asarray(default_regression_thresholds(self.num_classes), jnp.float32))
    return regression_log_probabilities(score, thresholds.value, self.scale)


class OrdinalHead(nn.Module):
  """The cumulative-link head: log P(grade = k) from a score and ordered thresholds.

  Parameters: ``score`` (a 1-unit Dense layer) and ``thresholds`` (the first
  threshold, then the softplus-parametrised gaps, so they stay increasing;
  initialised at -1.5, -0.5, 0.5, 1.5 for 5 grades).
  """
  num_classes: int = 5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    if self.num_classes < 3:
      raise ValueError(f"the ordinal head needs at least 3 grades, got num_classes="
                       f"{self.num_classes}")
    score = nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name="score")(h)
    gaps = self.num_classes - 2

    def init(key, shape, dtype):
      del key
      unit_gap = math.log(math.e - 1.0)  # softplus of it is 1
      return jnp.concatenate([jnp.array([-gaps / 2.0]), jnp.full((gaps,), unit_gap)]).astype(
          dtype).reshape(shape)

    raw = self.param("thresholds", init, (self.num_classes - 1,), self.param_dtype)
    raw = raw.astype(jnp.float32)
    thresholds = raw[0] + jnp.concatenate([jnp.zeros(1), jnp.cumsum(jax.nn.softplus(raw[1:]))])
    return ordinal_log_probabilities(score.astype(jnp.float32), thresholds)


class DRClassifier(nn.Module):
  """Inception-v3 base + fully connected head giving ``num_classes`` logits.

  Attributes:
    num_classes: output units (5 DR grades).
    head: a key of HEADS: "softmax" (logits), "ordinal" (log-probabilities
      of the cumulative-link model) or "regression" (the grade as one real
      output, layer ``score``, then log-probabilities around the fitted
      thresholds); see the module docstring.
    regression_scale: s of ``regression_log_probabilities`` (regression only).
    fc_widths: widths of the fully connected layers, named fc1, fc2, ...
    activation: a key of ACTIVATIONS, applied after each fully connected layer.
    dropout: dropout rate after each fully connected layer (train=True only;
      needs a "dropout" rng).
    convention, width_multiplier: of the Inception base (see InceptionV3).
    dtype: computation dtype; logits are float32.
    param_dtype: parameter dtype.
  """
  num_classes: int = 5
  head: str = "softmax"
  regression_scale: float = REGRESSION_SCALE
  fc_widths: Sequence[int] = (1024, 512)
  activation: str = "relu"
  dropout: float = 0.5
  convention: str = "keras"
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    # A tuple keeps the module hashable, as jit's static arguments must be.
    object.__setattr__(self, "fc_widths", tuple(int(w) for w in self.fc_widths))
    super().__post_init__()

  def head_layer_names(self) -> tuple[str, ...]:
    score = (SCORE_LAYER,) if self.head == "regression" else ()
    return tuple(f"fc{i + 1}" for i in range(len(self.fc_widths))) + score + (
        inception_v3.LOGITS_LAYER,)

  def layer_names(self) -> tuple[str, ...]:
    """The named layers, in forward order."""
    return inception_v3.inception_layer_names(include_top=False) + self.head_layer_names()

  def canonical_layer(self, name: str) -> str:
    return inception_v3.canonical_layer(name, self.layer_names(), inception_v3.layer_aliases())

  @nn.compact
  def __call__(self, x, train: bool = False, *, start_layer: Optional[str] = None,
               stop_layer: Optional[str] = None, capture_layers: bool = False):
    """Runs the classifier (or part of it; see InceptionV3.__call__).

    Args:
      x: float32 [N, H, W, 3] in [-1, 1] (H, W >= 75), or the activation of
        ``start_layer``.
      train: batch statistics for BatchNorm (``mutable=["batch_stats"]``) and
        dropout (``rngs={"dropout": key}``).
      start_layer: run from the layer after this one, ``x`` being its activation.
      stop_layer: return this layer's activation.
      capture_layers: sow every named layer's activation that is computed into
        the "layers" collection (apply with ``mutable=["layers"]``).

    Returns:
      float32 logits [N, num_classes], or the activation of ``stop_layer``.
    """
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; use one of {list(ACTIVATIONS)}")
    if self.head not in HEADS:
      raise ValueError(f"unknown model.head {self.head!r}; use one of {list(HEADS)}")
    start = None if start_layer is None else self.canonical_layer(start_layer)
    stop = None if stop_layer is None else self.canonical_layer(stop_layer)
    names = self.layer_names()
    if start is not None and stop is not None and names.index(stop) < names.index(start):
      raise ValueError(f"stop_layer {stop_layer!r} comes before start_layer {start_layer!r}")
    base_names = inception_v3.inception_layer_names(include_top=False)
    base = inception_v3.InceptionV3(num_classes=None, convention=self.convention,
                                    width_multiplier=self.width_multiplier, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name="base")
    if start is None or start in base_names:
      x = base(x, train, start_layer=start, stop_layer=stop if stop in base_names else None,
               capture_layers=capture_layers)
      if stop in base_names:
        return x
      start = None  # the head runs from its first layer
    act = ACTIVATIONS[self.activation]
    # Dropout acts on the input of each dense layer after the first, so a named
    # layer's activation (fc_k after its activation function) is the same in
    # training and inference; only its consumer sees the dropout mask.
    dropout = nn.Dropout(self.dropout, deterministic=not train)
    stages = []
    for i, width in enumerate(self.fc_widths):
      dense = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"fc{i + 1}")
      if i == 0:
        stages.append((f"fc{i + 1}", lambda h, dense=dense: act(dense(h))))
      else:
        stages.append((f"fc{i + 1}", lambda h, dense=dense: act(dense(dropout(h)))))
    top_input = dropout if self.fc_widths else (lambda h: h)
    if self.head == "regression":
      score = nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name=SCORE_LAYER)
      stages.append((SCORE_LAYER, lambda h: score(top_input(h)).astype(jnp.float32)))
      grades = RegressionHead(self.num_classes, self.regression_scale,
                              name=inception_v3.LOGITS_LAYER)
      stages.append((inception_v3.LOGITS_LAYER, grades))
      return inception_v3.run_stages(stages, x, start, stop,
                                     inception_v3.layer_recorder(self, capture_layers))
    if self.head == "ordinal":
      top = OrdinalHead(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=inception_v3.LOGITS_LAYER)
    else:
      top = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name=inception_v3.LOGITS_LAYER)
    stages.append((inception_v3.LOGITS_LAYER, lambda h: top(top_input(h)).astype(jnp.float32)))
    return inception_v3.run_stages(stages, x, start, stop,
                                   inception_v3.layer_recorder(self, capture_layers))


def build_classifier(model_config) -> DRClassifier:
  """A DRClassifier from a config section (see ``configs/model.py``).

  Reads ``num_classes``, ``head``, ``regression_scale``, ``fc_widths``, ``activation``, ``dropout``,
  ``convention``, ``width_multiplier``, ``dtype`` and ``param_dtype`` (dtype
  names such as "bfloat16"); missing keys take DRClassifier's defaults.
  """
  fields = {}
  for key in ("num_classes", "head", "regression_scale", "activation", "dropout", "convention",
              "width_multiplier"):
    if key in model_config:
      fields[key] = model_config[key]
  if "fc_widths" in model_config:
    fields["fc_widths"] = tuple(int(w) for w in model_config["fc_widths"])
  for key in ("dtype", "param_dtype"):
    if key in model_config:
      name = model_config[key]
      if name not in DTYPES:
        raise ValueError(f"model.{key} must be one of {list(DTYPES)}, got {name!r}")
      fields[key] = DTYPES[name]
  return DRClassifier(**fields)


def predict_probabilities(model: nn.Module, variables, x) -> jax.Array:
  """Softmax class probabilities [N, num_classes] in float32, inference mode."""
  logits = model.apply(variables, x, train=False)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def build_model(model_config) -> nn.Module:
  """The model a config section describes: ``name`` "dr_classifier" (default) or
  "inception_v3" (a bare InceptionV3; ``num_classes`` None or 0 for no top)."""
  name = model_config.get("name", "dr_classifier") if hasattr(model_config, "get") else (
      "dr_classifier")
  if name == "dr_classifier":
    return build_classifier(model_config)
  if name == "inception_v3":
    dtypes = {}
    for key in ("dtype", "param_dtype"):
      if key in model_config:
        dtypes[key] = DTYPES[model_config[key]]
    return inception_v3.InceptionV3(
        num_classes=model_config.get("num_classes") or None,
        convention=model_config.get("convention", "keras"),
        width_multiplier=model_config.get("width_multiplier", 1.0), **dtypes)
  raise ValueError(f"model.name must be 'dr_classifier' or 'inception_v3', got {name!r}")
