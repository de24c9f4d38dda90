"""Linearity of the fully connected units' attributions along the gradient.

One concept: the poster's linearity experiment, from the perturbation along
the gradient through the per-unit fits, the measured path and the summary to
the Hinton diagram that reports it.

The poster pushes an input along the gradient of the outcome, x(c) = x + c *
dF/dx(x), with c growing exponentially, and at each c records the layer
attributions of the fully connected units (activation-path layer IG with the
half-gray image's activations as the layer's baseline, drig's
``layer_integrated_gradients``). It reports that the attributions grow
"tremendously large", linearly in c, because the averaged gradient stays
nearly constant and only the difference term grows; a few "special units" do
not (they change direction or stay constant).

The quantity. The poster's claim needs an unbounded outcome: the softmax
probability's attributions sum to at most 1 and cannot grow with c. So the
experiment integrates the LOGIT of the grade by default (``space="logit"``);
``space="probability"`` stays available.

What is measured, per image and unit j at every c (`LinearityResult`):
  attribution LIG_j(c) = delta_j(c) * g_j(c), with the difference term
  delta_j(c) = a_j(x(c)) - a_j(baseline) and the averaged gradient g_j(c) =
  LIG_j(c) / delta_j(c) (NaN where delta_j = 0); and in input space the
  achieved ||x(c) - x|| and the outcome q(x(c)). So "the averaged gradient
  stays nearly constant" is measured (`average_gradient_drift`), not assumed.

Why it can be linear: if the layers up to the unit are linear along the
perturbation (a ReLU network within one activation pattern) then delta_j(c) is
affine in c, and if q is nearly linear past the unit g_j hardly moves: the
attribution is affine in c. For an entirely linear model both hold exactly. A
ReLU unit that switches on or off along the perturbation breaks the first, a
saturating quantity the second.

Everything here is in the model's input space ([-1, 1]; the half-gray baseline
is ``drig.grading.HALF_GRAY_MODEL`` = 128/127.5 - 1). The poster clips its
perturbed images to the valid range; ``gradient_perturbations(clip=...)`` can,
but clipping itself makes the attributions non-linear in c once pixels
saturate, so the default does not.

Active and inactive units (`fit_linearity`): each unit's attribution series
over c is fit by least squares y = slope * c + intercept; R^2 = 1 - SS_res /
SS_tot. A series that does not vary with c (its spread is at most
``constant_rtol`` times its magnitude, e.g. a dead ReLU unit whose attribution
is 0 at every c) is INACTIVE: a horizontal line fits it trivially, which says
nothing about linearity, so its R^2 is NaN (never 1) and its slope 0. R^2 and
slopes are summarised over active series only; inactive units are counted
separately, and "special units" are the active ones with R^2 below the
threshold.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution.integration import half_gray_baseline, Operands
from drig.attribution import heatmap
from drig.attribution import layer as layer_lib
from drig.attribution import quantities

DEFAULT_LAYERS = ("fc1", "fc2")
DEFAULT_CONSTANT_RTOL = 1e-5  # a few float32 roundings of the attributions: no change
DEFAULT_SPACE = "logit"
DEFAULT_THRESHOLD = 0.9
PIXELS_PER_MODEL_UNIT = 127.5  # model input = pixel / 127.5 - 1
# The poster palette's squares: a darker green and red than the heat maps', which read
# better as solid areas on the diagram's gray; "colorblind" uses heatmap.PALETTES as is.
GREEN = (0.0, 0.7, 0.0)
RED = (0.85, 0.0, 0.0)
SPECIAL_EDGE = (0.1, 0.1, 0.6)


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
    quantity_fn: model-space input [N, ...] -> [N] (e.g. logit_of_grade(
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


def quantity_label(grade: int, space: str) -> str:
  """How a report names the experiment's quantity, e.g. "logit of grade 2"."""
  _grade_quantity(grade, space)
  return f"{'logit' if space == 'logit' else 'softmax probability'} of grade {grade}"


def _layer_terms(model, variables, x, baseline, *, layers, grade, steps, method, chunk_size,
                 space):
  """{layer: (attributions [N, U], difference terms a(x) - a(baseline) [N, U])}, float32."""
  x = jnp.asarray(x, jnp.float32)
  if baseline is None:
    baseline = half_gray_baseline(x)
  quantity = _grade_quantity(grade, space)
  out = {}
  for layer in layers:
    result = layer_lib.model_layer_integrated_gradients(
        model, variables, layer, quantity, x, baseline, steps=steps, method=method,
        chunk_size=chunk_size)
    difference = jnp.asarray(result.activations) - jnp.asarray(result.baseline_activations)
    out[layer] = (np.asarray(result.units, np.float32).reshape(x.shape[0], -1),
                  np.asarray(jnp.broadcast_to(difference, result.units.shape),
                             np.float32).reshape(x.shape[0], -1))
  return out


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
  terms = _layer_terms(model, variables, x, baseline, layers=layers, grade=grade, steps=steps,
                       method=method, chunk_size=chunk_size, space=space)
  return {layer: units for layer, (units, _) in terms.items()}


class LinearFit(NamedTuple):
  """Least-squares lines of attributions against c, one per series.

  Attributes:
    slope, intercept, r2: float64 arrays of the series' shape (e.g. [N, U] or [U]);
      r2 is NaN and slope 0 for an inactive series.
    constant: bool, the series does not vary with c (inactive; module docstring).
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
      constant_rtol * max|y| is inactive (r2 NaN: see the module docstring).

  Returns:
    A LinearFit of shape attributions.shape[1:], computed in float64.

  Raises:
    LinearityError: the shapes disagree or the cs are not two distinct values.
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
  constant = np.abs(dy).max(axis=0) <= constant_rtol * np.abs(y).max(axis=0)
  slope = np.where(constant, 0.0, (dc * dy).sum(axis=0) / (dc ** 2).sum())
  intercept = y_mean - slope * c.mean()
  ss_tot = (dy ** 2).sum(axis=0)
  ss_res = ((dy - slope * dc) ** 2).sum(axis=0)
  r2 = np.where(constant, np.nan, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0))
  return LinearFit(slope, intercept, r2, constant)


def _reduce_units(values: np.ndarray, reduce: str) -> np.ndarray:
  """[..., U] -> [U], ignoring NaN (inactive series); NaN where a unit is never active."""
  if values.ndim == 1:
    return values
  flat = values.reshape(-1, values.shape[-1])
  active = ~np.isnan(flat)
  if reduce not in ("min", "mean", "median"):
    raise LinearityError(f"reduce must be 'min', 'mean' or 'median', got {reduce!r}")
  out = np.full(flat.shape[-1], np.nan)
  for u in np.flatnonzero(active.any(axis=0)):
    column = flat[active[:, u], u]
    out[u] = {"min": np.min, "mean": np.mean, "median": np.median}[reduce](column)
  return out


def special_units(fit: LinearFit, threshold: float = DEFAULT_THRESHOLD, *,
                  reduce: str = "min") -> np.ndarray:
  """Active units whose attribution is not linear in c: R^2 < threshold, least linear first.

  Args:
    fit: a LinearFit with r2 [U] or [..., U] (e.g. [N, U] per image).
    threshold: R^2 below which an active unit is special.
    reduce: how per-image R^2 [..., U] becomes one value per unit, over the
      images where the unit is active: "min" (special if non-linear for any
      image), "mean" or "median". Inactive units (NaN) are never special.

  Returns:
    int64 unit indices, sorted by ascending (reduced) R^2.
  """
  r2 = _reduce_units(np.asarray(fit.r2, np.float64), reduce)
  below = np.flatnonzero(np.nan_to_num(r2, nan=np.inf) < threshold)
  return below[np.argsort(r2[below], kind="stable")]


def inactive_units(fit: LinearFit) -> np.ndarray:
  """Units whose attribution does not vary with c for any image (int64, ascending)."""
  constant = np.asarray(fit.constant)
  if constant.ndim > 1:
    constant = constant.reshape(-1, constant.shape[-1]).all(axis=0)
  return np.flatnonzero(constant)


class LinearityResult(NamedTuple):
  """The linearity experiment over cs (see `linearity_experiment`).

  Attributes:
    cs: float64 [C].
    layers: the layer names.
    grade, space: the quantity (space "logit" or "probability" of grade).
    threshold: R^2 below which an active unit is special.
    attributions: {layer: float32 [C, N, U]}, LIG_j(c).
    differences: {layer: float32 [C, N, U]}, delta_j(c) = a_j(x(c)) - a_j(baseline).
    average_gradients: {layer: float64 [C, N, U]}, LIG_j / delta_j (NaN where delta_j = 0).
    fits: {layer: LinearFit [N, U]}.
    special: {layer: int64 [K]}, `special_units` of each fit (least linear first).
    inactive: {layer: int64 [K']}, units inactive for every image.
    quantity: float32 [C, N], the outcome q at each perturbed input.
    distance: float32 [C, N], the achieved ||x(c) - x|| in pixel units (after any clip).
  """
  cs: np.ndarray
  layers: tuple
  grade: int
  space: str
  threshold: float
  attributions: dict
  differences: dict
  average_gradients: dict
  fits: dict
  special: dict
  inactive: dict
  quantity: np.ndarray
  distance: np.ndarray


@jax.jit
def _quantity(f, x):
  return f.tree(x)


def linearity_experiment(model, variables, x, *, grade: int, cs=None,
                         layers: Sequence[str] = DEFAULT_LAYERS, steps: int = 50,
                         method: str = "riemann_right", baseline=None,
                         space: str = DEFAULT_SPACE, threshold: float = DEFAULT_THRESHOLD,
                         clip=None, chunk_size: int | None = None) -> LinearityResult:
  """Perturbs x along the gradient of grade's outcome and fits each unit's attribution in c.

  Args:
    model, variables: a drig DRClassifier and its variables.
    x: float32 model-space inputs [N, H, W, 3].
    grade: the outcome's grade, both for the gradient direction and the attributions.
    cs: C coefficients (default exponential_cs()).
    layers: the fully connected layers (any named layers work).
    steps, method, chunk_size: the layer IG's quadrature.
    baseline: None for half gray (model space).
    space: "logit" (default: unbounded, as the poster's claim needs) or "probability".
    threshold: R^2 below which an active unit is special.
    clip: passed to `gradient_perturbations` (None: no clipping).

  Returns:
    A LinearityResult. Each c is one batch of N images (compiled once).
  """
  cs = exponential_cs() if cs is None else np.asarray(cs, np.float64).reshape(-1)
  x = jnp.asarray(x, jnp.float32)
  logits_fn = jax.tree_util.Partial(model.apply, variables)
  q = _grade_quantity(grade, space)(logits_fn)
  perturbed = gradient_perturbations(q, x, cs, clip=clip)
  per_c = [_layer_terms(model, variables, perturbed[j], baseline, layers=layers, grade=grade,
                        steps=steps, method=method, chunk_size=chunk_size, space=space)
           for j in range(cs.size)]
  attributions = {layer: np.stack([t[layer][0] for t in per_c]) for layer in layers}
  differences = {layer: np.stack([t[layer][1] for t in per_c]) for layer in layers}
  average_gradients = {}
  for layer in layers:
    delta = differences[layer].astype(np.float64)
    nonzero = delta != 0
    average_gradients[layer] = np.where(
        nonzero, attributions[layer] / np.where(nonzero, delta, 1.0), np.nan)
  fits = {layer: fit_linearity(cs, a) for layer, a in attributions.items()}
  values = np.stack([np.asarray(_quantity(Operands(q), perturbed[j]))
                     for j in range(cs.size)]).astype(np.float32)
  moved = np.asarray(perturbed, np.float64) - np.asarray(x, np.float64)[None]
  distance = PIXELS_PER_MODEL_UNIT * np.sqrt(
      (moved ** 2).reshape(cs.size, x.shape[0], -1).sum(axis=-1))
  return LinearityResult(
      cs=cs, layers=tuple(layers), grade=int(grade), space=space, threshold=float(threshold),
      attributions=attributions, differences=differences, average_gradients=average_gradients,
      fits=fits,
      special={layer: special_units(fit, threshold) for layer, fit in fits.items()},
      inactive={layer: inactive_units(fit) for layer, fit in fits.items()}, quantity=values,
      distance=distance.astype(np.float32))


def average_gradient_drift(result: LinearityResult, layer: str) -> np.ndarray:
  """How far each c's averaged gradient g_j(c) is from the first c's: float64 [C].

  The median over active series (image, unit) with delta_j(c_0) != 0 of
  |g_j(c) / g_j(c_0) - 1|: 0 at c_0, and near 0 at every c if "the average of
  the gradients remains almost unchanged" as the poster says. NaN where no
  series qualifies.
  """
  g = np.asarray(result.average_gradients[layer], np.float64)
  active = ~np.asarray(result.fits[layer].constant)
  reference = g[0]
  usable = active & np.isfinite(reference) & (reference != 0)
  out = np.full(g.shape[0], np.nan)
  for j in range(g.shape[0]):
    ratio = np.abs(g[j][usable] / reference[usable] - 1.0)
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size:
      out[j] = np.median(ratio)
  return out


def layer_summary(result: LinearityResult, layer: str) -> dict:
  """One layer's result as measured, over active series only (python numbers).

  Returns:
    {"units", "series", "active_series", "inactive_series", "inactive_units",
     "linear_series" (active, R^2 >= threshold), "special_units",
     "median_r2", "min_r2" (over active series; None if none), "median_slope",
     "positive_slope_share" (of active series), "median_abs_difference" [C] and
     "average_gradient_drift" [C] (median over active series)}.
  """
  fit = result.fits[layer]
  r2 = np.asarray(fit.r2, np.float64)
  active = ~np.asarray(fit.constant)
  active_r2 = r2[active]
  slopes = np.asarray(fit.slope, np.float64)[active]
  delta = np.abs(np.asarray(result.differences[layer], np.float64))

  def median(values):
    return float(np.median(values)) if np.size(values) else None

  return {
      "units": int(r2.shape[-1]), "series": int(r2.size),
      "active_series": int(active.sum()), "inactive_series": int((~active).sum()),
      "inactive_units": [int(u) for u in result.inactive[layer]],
      "linear_series": int((active_r2 >= result.threshold).sum()),
      "special_units": [int(u) for u in result.special[layer]],
      "median_r2": median(active_r2),
      "min_r2": float(active_r2.min()) if active_r2.size else None,
      "median_slope": median(slopes),
      "positive_slope_share": float(np.mean(slopes > 0)) if slopes.size else None,
      "median_abs_difference": [median(delta[j][active]) for j in range(delta.shape[0])],
      "average_gradient_drift": [None if np.isnan(v) else float(v)
                                 for v in average_gradient_drift(result, layer)],
  }


def hinton_figure(matrix, *, title: str = "", row_labels: Sequence[str] | None = None,
                  max_units: int = 48, column_labels: Sequence[str] | None = None,
                  special: Sequence[int] = (), special_label: str = "special unit",
                  palette: str = heatmap.DEFAULT_PALETTE):
  """Hinton diagram of attributions: square area ~ |value|, green positive, red negative
  (blue and orange with palette="colorblind").

  Args:
    matrix: [C, U], rows are the cs (e.g. one image's attributions, or a mean
      over images), columns the units.
    title: the figure's title.
    row_labels: C labels, e.g. [f"{c:.3g}" for c in cs] (default: row numbers).
    max_units: at most this many columns are drawn: the special units first, then
      those with the largest peak |value|, in their original order, labelled with
      their index.
    column_labels: U labels (default the unit indices).
    special: unit indices (columns of matrix) to mark: an outlined column and a
      bold "*" label.
    special_label: the legend's name for the marked units.
    palette: "poster" or "colorblind" (``drig.attribution.heatmap.PALETTES``).

  Returns:
    A matplotlib.figure.Figure (object API, no pyplot state). Areas share one
    scale: the largest |value| fills its cell. fig.axes[0] is the diagram; its
    first collection holds the squares. A legend gives the colours, the marking
    and the |value| of two square sizes.

  Raises:
    LinearityError: matrix is not 2-D, or a special index is out of range.
  """
  # matplotlib takes about half a second to import; only the figure needs it.
  from matplotlib.collections import PatchCollection  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch, Rectangle  # pylint: disable=g-import-not-at-top
  if palette == heatmap.DEFAULT_PALETTE:
    positive, negative = GREEN, RED
  else:
    positive, negative = (tuple(float(v) for v in c) for c in heatmap.palette_colors(palette))
  m = np.asarray(matrix, np.float64)
  if m.ndim != 2:
    raise LinearityError(f"hinton_figure expects a matrix [C, U], got shape {m.shape}")
  rows, units = m.shape
  special = [int(u) for u in special]
  if any(not 0 <= u < units for u in special):
    raise LinearityError(f"special units must index the {units} columns, got {special}")
  column_labels = [str(u) for u in range(units)] if column_labels is None else list(column_labels)
  keep = np.arange(units)
  if units > max_units:
    marked = list(dict.fromkeys(special))[:max_units]
    rest = [u for u in np.argsort(-np.abs(m).max(axis=0), kind="stable") if u not in marked]
    keep = np.sort(np.asarray(marked + rest[:max_units - len(marked)], np.int64))
  m = m[:, keep]
  column_labels = [column_labels[k] for k in keep]
  marked_columns = [i for i, k in enumerate(keep) if int(k) in set(special)]
  row_labels = [str(r) for r in range(rows)] if row_labels is None else list(row_labels)
  peak = np.abs(m).max() if m.size else 0.0
  sides = np.sqrt(np.abs(m) / peak) if peak > 0 else np.zeros_like(m)
  squares, colors = [], []
  for r in range(m.shape[0]):
    for u in range(m.shape[1]):
      if sides[r, u] > 0:
        s = sides[r, u]
        squares.append(Rectangle((u - s / 2, r - s / 2), s, s))
        colors.append(positive if m[r, u] > 0 else negative)
  width = min(14.0, max(6.0, 0.26 * m.shape[1] + 3.5))
  fig = Figure(figsize=(width, max(3.0, 0.34 * m.shape[0] + 2.2)), layout="constrained")
  ax = fig.add_subplot()
  ax.set_facecolor((0.93, 0.93, 0.93))
  ax.add_collection(PatchCollection(squares, facecolors=colors, edgecolors="none"))
  ax.add_collection(PatchCollection(
      [Rectangle((u - 0.5, -0.5), 1.0, m.shape[0]) for u in marked_columns],
      facecolors="none", edgecolors=[SPECIAL_EDGE], linewidths=1.5))
  ax.set_xlim(-0.5, m.shape[1] - 0.5)
  ax.set_ylim(m.shape[0] - 0.5, -0.5)
  ax.set_aspect("equal")
  ax.set_xticks(range(m.shape[1]))
  ax.set_xticklabels([label + ("*" if i in marked_columns else "")
                      for i, label in enumerate(column_labels)], rotation=90, fontsize=8)
  for i in marked_columns:
    ax.get_xticklabels()[i].set_fontweight("bold")
    ax.get_xticklabels()[i].set_color(SPECIAL_EDGE)
  ax.set_yticks(range(m.shape[0]))
  ax.set_yticklabels(row_labels, fontsize=9)
  ax.set_xlabel("unit" + (f" (* = {special_label})" if marked_columns else ""), fontsize=10)
  ax.set_ylabel("c", fontsize=10)
  handles = [Patch(color=positive, label="positive"), Patch(color=negative, label="negative")]
  if marked_columns:
    handles.append(Patch(facecolor="none", edgecolor=SPECIAL_EDGE, linewidth=1.5,
                         label=special_label))
  if peak > 0:
    # Marker size is a side length: half the side is a quarter of the area.
    handles += [Line2D([], [], linestyle="none", marker="s", markersize=size, color="0.35",
                       label=f"|attribution| {value:.3g}")
                for size, value in ((12, peak), (6, peak / 4))]
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
            title="area ~ |attribution|", title_fontsize=8, frameon=False)
  if title:
    ax.set_title(title, fontsize=10)
  return fig
