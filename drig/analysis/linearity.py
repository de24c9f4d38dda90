"""Linearity of the fully connected units' attributions along the gradient.

The poster pushes an input along the gradient of the outcome, x(c) = x + c *
dF/dx(x), with c growing exponentially, and at each c records the layer
attributions of the fully connected units (activation-path layer IG with the
half-gray image's activations as the layer's baseline, drig's
``layer_integrated_gradients``). Most units' attributions grow linearly in c;
a few "special units" do not (they change direction or stay constant).

Why linear: LIG_j = (a_j(c) - a'_j) * avg_t dq/da_j(a' + t (a(c) - a')). If the
layers up to the unit are linear along the perturbation (a ReLU network within
one activation pattern) then a_j(c) is affine in c, and if q is nearly linear
past the unit the averaged gradient hardly moves: the attribution is affine in
c. For an entirely linear model both hold exactly. A ReLU unit that switches on
or off along the perturbation breaks the first, and a saturating softmax the
second.

Everything here is in the model's input space ([-1, 1]; the half-gray baseline
is ``drig.grading.HALF_GRAY_MODEL`` = 128/127.5 - 1). Note the poster clips its
perturbed images to the valid range; ``gradient_perturbations(clip=...)`` can,
but clipping itself makes the attributions non-linear in c once pixels
saturate, so the default does not.

R^2 convention (`fit_linearity`): each unit's attribution series over c is fit
by least squares y = slope * c + intercept; R^2 = 1 - SS_res / SS_tot. A
constant series (SS_tot = 0, or below rounding noise: its spread is at most
``constant_rtol`` times its magnitude) is fit exactly by a horizontal line, so
its R^2 is defined as 1: a constant unit is perfectly linear. Such units are
reported separately (`constant_units`), as the poster's "remain constant".
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution.integration import half_gray_baseline, Operands
from drig.attribution import layer as layer_lib
from drig.attribution import quantities

DEFAULT_LAYERS = ("fc1", "fc2")
DEFAULT_CONSTANT_RTOL = 1e-6
GREEN = (0.0, 0.7, 0.0)
RED = (0.85, 0.0, 0.0)


class LinearityError(ValueError):
  """Arguments the linearity experiment cannot use."""


def exponential_cs(start: float = 1e-3, factor: float = 2.0, count: int = 10) -> np.ndarray:
  """start * factor**k for k = 0..count-1: float64 [count]."""
  if start <= 0 or factor <= 0 or count < 1:
    raise LinearityError(f"need start > 0, factor > 0, count >= 1; got {start}, {factor}, "
                         f"{count}")
  return start * factor ** np.arange(count, dtype=np.float64)


@jax.jit
def _gradient(f, x):
  return jax.grad(lambda z: jnp.sum(f.tree(z)))(x)


def gradient_perturbations(quantity_fn: Callable, x, cs, *, clip=None) -> jax.Array:
  """x + c * d quantity / dx at x, for every c: float32 [C, N, ...], model space.

  Args:
    quantity_fn: model-space input [N, ...] -> [N] (e.g. probability_of_grade(
      logits_fn, 1)); a pytree (Partial, GradeQuantity) keeps weights as arguments.
    x: float32 model-space inputs [N, ...].
    cs: C coefficients.
    clip: None, or (low, high) bounds to clip to, e.g. (-1, 1) for the poster's
      clip of pixels to [0, 255] (breaks linearity once pixels saturate).
  """
  x = jnp.asarray(x, jnp.float32)
  grad = _gradient(Operands(quantity_fn), x)
  cs = jnp.asarray(np.asarray(cs, np.float32).reshape(-1, *([1] * x.ndim)))
  out = x[None] + cs * grad[None]
  if clip is not None:
    out = jnp.clip(out, clip[0], clip[1])
  return out


def _grade_quantity(grade: int, space: str):
  if space == "probability":
    return functools.partial(quantities.probability_of_grade, grade=grade)
  if space == "logit":
    return functools.partial(quantities.logit_of_grade, grade=grade)
  raise LinearityError(f"space must be 'probability' or 'logit', got {space!r}")


def unit_attributions(model, variables, x, baseline=None, *,
                      layers: Sequence[str] = DEFAULT_LAYERS, grade: int, steps: int = 50,
                      method: str = "riemann_right", chunk_size: int | None = None,
                      space: str = "probability") -> dict[str, np.ndarray]:
  """Each unit's layer IG (activation path, the poster's convention) of grade's outcome.

  Args:
    model, variables: a drig DRClassifier and its variables.
    x: float32 model-space inputs [N, H, W, 3] in [-1, 1].
    baseline: broadcasts to x; None for half gray (128/127.5 - 1).
    layers: named layers (drig.models.layer_access.layer_names).
    grade: the outcome's grade; space: "probability" (softmax) or "logit".
    steps, method, chunk_size: the quadrature (drig.attribution.integrated_gradients).

  Returns:
    {layer: float32 [N, units]}: units flattened (channel x position for conv layers).
  """
  x = jnp.asarray(x, jnp.float32)
  if baseline is None:
    baseline = half_gray_baseline(x)
  quantity = _grade_quantity(grade, space)
  out = {}
  for layer in layers:
    result = layer_lib.model_layer_integrated_gradients(
        model, variables, layer, quantity, x, baseline, steps=steps, method=method,
        chunk_size=chunk_size)
    out[layer] = np.asarray(result.units, np.float32).reshape(x.shape[0], -1)
  return out


class LinearFit(NamedTuple):
  """Least-squares lines of attributions against c, one per series.

  Attributes:
    slope, intercept, r2: float64 arrays of the series' shape (e.g. [N, U] or [U]).
    constant: bool, the series is constant (r2 defined as 1).
  """
  slope: np.ndarray
  intercept: np.ndarray
  r2: np.ndarray
  constant: np.ndarray


def fit_linearity(cs, attributions, *, constant_rtol: float = DEFAULT_CONSTANT_RTOL) -> LinearFit:
  """Fits each unit's attribution series y(c) = slope * c + intercept by least squares.

  Args:
    cs: C >= 2 distinct coefficients.
    attributions: [C, ..., U]; axis 0 runs over cs.
    constant_rtol: a series whose largest deviation from its mean is at most
      constant_rtol * max|y| counts as constant (r2 = 1; see the module docstring).

  Returns:
    A LinearFit of shape attributions.shape[1:], computed in float64.
  """
  c = np.asarray(cs, np.float64).reshape(-1)
  y = np.asarray(attributions, np.float64)
  if y.ndim < 1 or y.shape[0] != c.size:
    raise LinearityError(f"attributions must be [C, ...] with C = len(cs) = {c.size}, got "
                         f"shape {y.shape}")
  if c.size < 2 or np.ptp(c) == 0:
    raise LinearityError(f"need at least two distinct cs to fit a line, got {c}")
  dc = (c - c.mean()).reshape((-1,) + (1,) * (y.ndim - 1))
  y_mean = y.mean(axis=0)
  dy = y - y_mean
  slope = (dc * dy).sum(axis=0) / (dc ** 2).sum()
  intercept = y_mean - slope * c.mean()
  ss_tot = (dy ** 2).sum(axis=0)
  ss_res = ((dy - slope * dc) ** 2).sum(axis=0)
  constant = np.abs(dy).max(axis=0) <= constant_rtol * np.abs(y).max(axis=0)
  r2 = np.where(constant, 1.0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0))
  return LinearFit(slope, intercept, r2, constant)


def _reduce_units(values: np.ndarray, reduce: str) -> np.ndarray:
  if values.ndim == 1:
    return values
  flat = values.reshape(-1, values.shape[-1])
  if reduce == "min":
    return flat.min(axis=0)
  if reduce == "mean":
    return flat.mean(axis=0)
  if reduce == "median":
    return np.median(flat, axis=0)
  raise LinearityError(f"reduce must be 'min', 'mean' or 'median', got {reduce!r}")


def special_units(fit: LinearFit, threshold: float = 0.9, *, reduce: str = "min") -> np.ndarray:
  """Units whose attribution is not linear in c: R^2 < threshold, least linear first.

  Args:
    fit: a LinearFit with r2 [U] or [..., U] (e.g. [N, U] per image).
    threshold: R^2 below which a unit is special.
    reduce: how per-image R^2 [..., U] becomes one value per unit: "min" (a unit
      is special if it is non-linear for any image), "mean" or "median".

  Returns:
    int64 unit indices, sorted by ascending (reduced) R^2.
  """
  r2 = _reduce_units(np.asarray(fit.r2), reduce)
  below = np.flatnonzero(r2 < threshold)
  return below[np.argsort(r2[below], kind="stable")]


def constant_units(fit: LinearFit) -> np.ndarray:
  """Units whose attribution stays constant over c for every image (int64, ascending)."""
  constant = np.asarray(fit.constant)
  if constant.ndim > 1:
    constant = constant.reshape(-1, constant.shape[-1]).all(axis=0)
  return np.flatnonzero(constant)


class LinearityResult(NamedTuple):
  """The linearity experiment over cs (see `linearity_experiment`).

  Attributes:
    cs: float64 [C].
    layers: the layer names.
    attributions: {layer: float32 [C, N, U]}.
    fits: {layer: LinearFit [N, U]}.
    special: {layer: int64 [K]}, `special_units` of each fit (least linear first).
    constant: {layer: int64 [K']}, units constant over c for every image.
    quantity: float32 [C, N], the outcome q at each perturbed input.
  """
  cs: np.ndarray
  layers: tuple
  attributions: dict
  fits: dict
  special: dict
  constant: dict
  quantity: np.ndarray


@jax.jit
def _quantity(f, x):
  return f.tree(x)


def linearity_experiment(model, variables, x, *, grade: int, cs=None,
                         layers: Sequence[str] = DEFAULT_LAYERS, steps: int = 50,
                         method: str = "riemann_right", baseline=None,
                         space: str = "probability", threshold: float = 0.9,
                         clip=None, chunk_size: int | None = None) -> LinearityResult:
  """Perturbs x along the gradient of grade's outcome and fits each unit's attribution in c.

  Args:
    model, variables: a drig DRClassifier and its variables.
    x: float32 model-space inputs [N, H, W, 3].
    grade: the outcome (probability of grade, or its logit with space="logit"),
      both for the gradient direction and the attributions.
    cs: C coefficients (default exponential_cs()).
    layers: the fully connected layers (any named layers work).
    steps, method, chunk_size: the layer IG's quadrature.
    baseline: None for half gray (model space).
    threshold: R^2 below which a unit is special.
    clip: passed to `gradient_perturbations` (None: no clipping).

  Returns:
    A LinearityResult. Each c is one batch of N images (compiled once).
  """
  cs = exponential_cs() if cs is None else np.asarray(cs, np.float64).reshape(-1)
  x = jnp.asarray(x, jnp.float32)
  logits_fn = jax.tree_util.Partial(model.apply, variables)
  q = _grade_quantity(grade, space)(logits_fn)
  perturbed = gradient_perturbations(q, x, cs, clip=clip)
  per_c = [unit_attributions(model, variables, perturbed[j], baseline, layers=layers,
                             grade=grade, steps=steps, method=method, chunk_size=chunk_size,
                             space=space) for j in range(cs.size)]
  attributions = {layer: np.stack([a[layer] for a in per_c]) for layer in layers}
  fits = {layer: fit_linearity(cs, a) for layer, a in attributions.items()}
  values = np.stack([np.asarray(_quantity(Operands(q), perturbed[j]))
                     for j in range(cs.size)]).astype(np.float32)
  return LinearityResult(
      cs=cs, layers=tuple(layers), attributions=attributions, fits=fits,
      special={layer: special_units(fit, threshold) for layer, fit in fits.items()},
      constant={layer: constant_units(fit) for layer, fit in fits.items()}, quantity=values)


def hinton_figure(matrix, *, title: str = "", row_labels: Sequence[str] | None = None,
                  max_units: int = 64, column_labels: Sequence[str] | None = None):
  """Hinton diagram of attributions: square area ~ |value|, green positive, red negative.

  Args:
    matrix: [C, U], rows are the cs (e.g. one image's attributions, or a mean
      over images), columns the units.
    title: the figure's title.
    row_labels: C labels, e.g. [f"{c:.3g}" for c in cs] (default: row numbers).
    max_units: at most this many columns are drawn: the units with the largest
      peak |value|, in their original order, labelled with their index.
    column_labels: U labels (default the unit indices).

  Returns:
    A matplotlib.figure.Figure (object API, no pyplot state). Areas share one
    scale: the largest |value| fills its cell.
  """
  # matplotlib takes about half a second to import; only the figure needs it.
  from matplotlib.collections import PatchCollection  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
  m = np.asarray(matrix, np.float64)
  if m.ndim != 2:
    raise LinearityError(f"hinton_figure expects a matrix [C, U], got shape {m.shape}")
  rows, units = m.shape
  column_labels = [str(u) for u in range(units)] if column_labels is None else list(column_labels)
  if units > max_units:
    keep = np.sort(np.argsort(-np.abs(m).max(axis=0), kind="stable")[:max_units])
    m = m[:, keep]
    column_labels = [column_labels[k] for k in keep]
  row_labels = [str(r) for r in range(rows)] if row_labels is None else list(row_labels)
  peak = np.abs(m).max() if m.size else 0.0
  sides = np.sqrt(np.abs(m) / peak) if peak > 0 else np.zeros_like(m)
  squares, colors = [], []
  for r in range(m.shape[0]):
    for u in range(m.shape[1]):
      if sides[r, u] > 0:
        s = sides[r, u]
        squares.append(Rectangle((u - s / 2, r - s / 2), s, s))
        colors.append(GREEN if m[r, u] > 0 else RED)
  fig = Figure(figsize=(max(4.0, 0.22 * m.shape[1] + 2.0), max(2.5, 0.3 * m.shape[0] + 1.5)),
               layout="constrained")
  ax = fig.add_subplot()
  ax.set_facecolor((0.93, 0.93, 0.93))
  ax.add_collection(PatchCollection(squares, facecolors=colors, edgecolors="none"))
  ax.set_xlim(-0.5, m.shape[1] - 0.5)
  ax.set_ylim(m.shape[0] - 0.5, -0.5)
  ax.set_aspect("equal")
  ax.set_xticks(range(m.shape[1]))
  ax.set_xticklabels(column_labels, rotation=90, fontsize=6)
  ax.set_yticks(range(m.shape[0]))
  ax.set_yticklabels(row_labels, fontsize=7)
  ax.set_xlabel("unit")
  ax.set_ylabel("c")
  if title:
    ax.set_title(title)
  return fig
