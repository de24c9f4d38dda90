"""Counterfactuals from integrated gradients and from plain gradients.

One concept: the poster's counterfactual experiment, from the ways of moving
the pixels (IG, gradient, gradient on IG's support) through the sweep over c,
the flips and the equal-L2 comparison to the statistics, tables and figure
that report it.

For images of true grade 1 that the model grades 0, the poster moves every
pixel by its attribution to the grade-1 outcome F::

  IG method:        x' = clip(x + c * sgn(x - baseline) * IG(x), 0, 255)
  gradient method:  x' = clip(x + c * dF/dx(x), 0, 255)

and claims the IG counterfactual is closer to reality and smoother. The same
functions serve the other direction the poster implies (true grade 0 graded 1
or higher, F the grade-0 outcome): only ``target_grade`` changes.

A like-for-like comparison. sgn(x - b) * IG is exactly 0 wherever x equals
the baseline (e.g. the half-gray area outside the field of view), while the
gradient is not, so smoothness measured on the whole image confounds the two
directions' supports. A third method, ``gradient_support``, is the gradient
restricted to the IG direction's support (pixels with x != baseline). And the
two directions' scales differ by orders of magnitude (IG in pixels ~1e-5 per
pixel), so equal c means very different changes: ``budget="l2"`` scales every
direction to one L2 norm before clipping; ``budget="coefficient"`` keeps the
poster's literal x + c * direction.

Flips. A sweep records, per method, budget and image, the predicted grade;
``flipped`` is "predicted target_grade" and ``flipped_any_dr`` "predicted 1 or
higher" (any diabetic retinopathy; useful when the model never predicts grade
1), and ``first_flip`` / ``first_flip_any_dr`` the smallest budget of the sweep
at which each image first flips (NaN: never).

A pixel with positive attribution moves away from the half-gray baseline, one
with negative attribution towards it. Since IG_i = (x_i - b_i) * avg_grad_i,
the IG step is ``c * |x_i - b_i| * avg_grad_i``: the path-averaged gradient
weighted by the pixel's distance from the baseline. For a linear F it raises F
by ``c * sum_i w_i^2 |x_i - b_i| >= 0``; the gradient step raises any smooth F
by ``c * |dF/dx|^2 + O(c^2)``.

Spaces. Everything here lives in PIXEL space: float32 images [N, H, W, 3] with
values in [0, 255], so ``c`` and the attributions are in pixel units and the
clip is the poster's. drig's models take MODEL space, ``[-1, 1]``
(``drig.grading.to_model_input``: p / 127.5 - 1). Public functions take
``logits_fn``: model-space input -> logits [N, 5] (e.g.
``jax.tree_util.Partial(model.apply, variables)``) and compose it with that map
internally (``PixelLogits``), so IG and gradients are of the pixel-space
quantity. The half-gray baseline is pixel 128.

Statistics of a change d = x' - x (``perturbation_statistics``), per image:
  l2: sqrt(sum d^2) over H, W and channels, in pixel units.
  total_variation: anisotropic TV, sum |d[i+1, j] - d[i, j]| + sum |d[i, j+1] - d[i, j]|
    over rows, columns and channels; a smooth change has a small TV for its size.
  image_total_variation: the same TV of the counterfactual image x' itself.
  high_frequency_energy: the share of d's spectral energy sum |FFT2(d)|^2 (per
    channel, summed) at radial frequencies sqrt(fy^2 + fx^2) > cutoff cycles per
    pixel (numpy.fft.fftfreq; Nyquist is 0.5 along an axis, 0.707 on the
    diagonal). 0 for a zero change; 0 for a constant shift (all energy at DC);
    1 for a one-pixel checkerboard (all energy at (0.5, 0.5)).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drig import grading
from drig.attribution.integration import HALF_GRAY_PIXEL, integrated_gradients, Operands
from drig.analysis.report_document import plural
from drig.attribution import quantities

METHODS = ("ig", "gradient", "gradient_support")
PIXEL_MIN, PIXEL_MAX = 0.0, 255.0
DEFAULT_HIGH_FREQUENCY_CUTOFF = 0.25  # cycles per pixel: half the axis Nyquist frequency
BUDGETS = ("coefficient", "l2")


class CounterfactualError(ValueError):
  """Arguments a counterfactual function cannot use."""


@jax.tree_util.register_pytree_node_class
class PixelLogits:
  """pixels [N, H, W, 3] in [0, 255] -> logits_fn(to_model_input(pixels)); a pytree.

  Attributes:
    logits_fn: model-space input [N, H, W, 3] in [-1, 1] -> logits [N, G]. As a
      pytree child, its arrays (e.g. a Partial's variables) stay traced arguments.
  """

  def __init__(self, logits_fn: Callable):
    self.logits_fn = logits_fn

  def __call__(self, pixels):
    return self.logits_fn(grading.to_model_input(pixels))

  def tree_flatten(self):
    return (self.logits_fn,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)


def pixel_quantity(logits_fn: Callable, target_grade: int = 1,
                   quantity: str = "probability") -> quantities.GradeQuantity:
  """F: pixels [N, H, W, 3] -> float32 [N], the probability (or logit) of target_grade.

  Args:
    logits_fn: model-space input -> logits [N, G].
    target_grade: the grade whose outcome F is.
    quantity: "probability" (softmax) or "logit".
  """
  if quantity == "probability":
    return quantities.probability_of_grade(PixelLogits(logits_fn), target_grade)
  if quantity == "logit":
    return quantities.logit_of_grade(PixelLogits(logits_fn), target_grade)
  raise CounterfactualError(f"quantity must be 'probability' or 'logit', got {quantity!r}")


# ------------------------------------------------------------------------------
# The two steps.


def _check_images(x, name="x"):
  if np.ndim(x) != 4 or np.shape(x)[-1] != 3:
    raise CounterfactualError(f"{name} must be pixel images [N, H, W, 3], got shape "
                              f"{np.shape(x)}")


def ig_direction(x, baseline, attributions):
  """sgn(x - baseline) * IG: the IG method's direction, float32 [N, H, W, 3] (pixel units)."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.sign(x - jnp.asarray(baseline, jnp.float32)) * jnp.asarray(attributions, jnp.float32)


def support_gradient(x, baseline, gradient):
  """dF/dx where x != baseline, 0 elsewhere: the gradient on the IG direction's support."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.where(x != jnp.asarray(baseline, jnp.float32), jnp.asarray(gradient, jnp.float32),
                   0.0)


def method_directions(x, baseline, attributions, gradient) -> dict[str, jax.Array]:
  """{method: direction [N, H, W, 3]} for METHODS: sgn(x - b) IG, dF/dx, dF/dx on IG's support."""
  return {"ig": ig_direction(x, baseline, attributions),
          "gradient": jnp.asarray(gradient, jnp.float32),
          "gradient_support": support_gradient(x, baseline, gradient)}


def ig_counterfactual(x, baseline, attributions, c):
  """The poster's IG counterfactual: clip(x + c * sgn(x - baseline) * IG, 0, 255).

  Args:
    x: float pixel images [N, H, W, 3] in [0, 255].
    baseline: broadcasts to x (the poster's half gray: 128.0).
    attributions: IG of the pixel-space quantity F, [N, H, W, 3] (pixel units
      of F per pixel; sum = F(x) - F(baseline)).
    c: a non-negative scalar, or an array broadcasting to x (e.g. [N, 1, 1, 1]).

  Returns:
    float32 [N, H, W, 3] in [0, 255] (a jax array; works inside jit).
  """
  x = jnp.asarray(x, jnp.float32)
  return jnp.clip(x + jnp.asarray(c, jnp.float32) * ig_direction(x, baseline, attributions),
                  PIXEL_MIN, PIXEL_MAX)


def gradient_counterfactual(x, gradient, c):
  """The gradient counterfactual: clip(x + c * dF/dx, 0, 255).

  Args:
    x: float pixel images [N, H, W, 3] in [0, 255].
    gradient: dF/dx of the pixel-space quantity at x, [N, H, W, 3].
    c: a non-negative scalar or an array broadcasting to x.

  Returns:
    float32 [N, H, W, 3] in [0, 255].
  """
  x = jnp.asarray(x, jnp.float32)
  return jnp.clip(x + jnp.asarray(c, jnp.float32) * jnp.asarray(gradient, jnp.float32),
                  PIXEL_MIN, PIXEL_MAX)


def pixel_gradient(logits_fn: Callable, x, *, target_grade: int = 1,
                   quantity: str = "probability") -> jax.Array:
  """dF/dx in pixel space, float32 [N, H, W, 3]; F as in `pixel_quantity`.

  Computed as the integrated gradients along the unit path x - 1 -> x with the
  single node alpha = 1 (riemann_right, 1 step): (x - (x - 1)) * dF/dx(x), and
  x - (x - 1) is exactly 1 in float32 for pixel values. So the gradient reuses
  the IG engine's compiled program whenever the IG call has the same shapes
  (a baseline as large as x and chunk_size=1).

  Args:
    logits_fn: model-space input -> logits [N, G].
    x: float pixel images [N, H, W, 3] in [0, 255].
  """
  _check_images(x)
  x = jnp.asarray(x, jnp.float32)
  f = pixel_quantity(logits_fn, target_grade, quantity)
  gradient, _ = integrated_gradients(f, x, x - 1.0, steps=1, method="riemann_right",
                                     chunk_size=1)
  return gradient


def pixel_integrated_gradients(logits_fn: Callable, x, baseline=HALF_GRAY_PIXEL, *,
                               target_grade: int = 1, quantity: str = "probability",
                               steps: int = 50, method: str = "riemann_right",
                               chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """IG of the pixel-space F (drig.attribution.integrated_gradients).

  Args:
    logits_fn: model-space input -> logits [N, G].
    x: float pixel images [N, H, W, 3] in [0, 255].
    baseline: pixel values broadcasting to x (half gray 128 by default).
    target_grade, quantity: F as in `pixel_quantity`.
    steps, method, chunk_size: as for integrated_gradients.

  Returns:
    (attributions float32 [N, H, W, 3] in units of F, gap float32 [N]).
  """
  _check_images(x)
  x = jnp.asarray(x, jnp.float32)
  # A baseline as large as x: `pixel_gradient` then shares the compiled chunk.
  baseline = jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), x.shape)
  f = pixel_quantity(logits_fn, target_grade, quantity)
  return integrated_gradients(f, x, baseline, steps=steps, method=method, chunk_size=chunk_size)


# ------------------------------------------------------------------------------
# Statistics of a change.


def total_variation(images) -> np.ndarray:
  """Anisotropic total variation per image: float32 [N] of images [N, H, W(, C)].

  sum over rows, columns and channels of |v[i+1, j] - v[i, j]| + |v[i, j+1] - v[i, j]|.
  """
  v = np.asarray(images, np.float64)
  if v.ndim == 3:
    v = v[..., None]
  rows = np.abs(np.diff(v, axis=1)).reshape(v.shape[0], -1).sum(axis=1)
  cols = np.abs(np.diff(v, axis=2)).reshape(v.shape[0], -1).sum(axis=1)
  return (rows + cols).astype(np.float32)


def high_frequency_energy(change, cutoff: float = DEFAULT_HIGH_FREQUENCY_CUTOFF) -> np.ndarray:
  """Share of each change's spectral energy above a radial frequency: float32 [N] in [0, 1].

  Args:
    change: [N, H, W(, C)]; the 2-D FFT runs over H and W for each channel and
      the energies |FFT|^2 are summed over channels.
    cutoff: radial frequency in cycles per pixel; energy at
      sqrt(fy^2 + fx^2) > cutoff counts as high frequency.

  Returns:
    high / total energy per image; 0 where the change is zero.
  """
  d = np.asarray(change, np.float64)
  if d.ndim == 3:
    d = d[..., None]
  if d.ndim != 4:
    raise CounterfactualError(f"change must be [N, H, W(, C)], got shape {d.shape}")
  energy = (np.abs(np.fft.fft2(d, axes=(1, 2))) ** 2).sum(axis=-1)  # [N, H, W]
  fy = np.fft.fftfreq(d.shape[1])[:, None]
  fx = np.fft.fftfreq(d.shape[2])[None, :]
  high = np.sqrt(fy ** 2 + fx ** 2) > cutoff
  total = energy.reshape(d.shape[0], -1).sum(axis=1)
  above = (energy * high).reshape(d.shape[0], -1).sum(axis=1)
  # A change of relative size ~1e-16 is rounding noise, not a change: call it zero.
  scale = np.abs(d).reshape(d.shape[0], -1).max(axis=1, initial=0.0)
  positive = total > 0
  share = np.where(positive, above / np.where(positive, total, 1.0), 0.0)
  return np.where(scale > 0, share, 0.0).astype(np.float32)


def perturbation_statistics(x, x_new, *,
                            cutoff: float = DEFAULT_HIGH_FREQUENCY_CUTOFF) -> dict[str, np.ndarray]:
  """How large and how smooth the change x_new - x is (definitions: module docstring).

  Args:
    x, x_new: pixel images [N, H, W, 3] (any float; computed in float64).
    cutoff: the high-frequency cutoff in cycles per pixel.

  Returns:
    {"l2", "total_variation", "image_total_variation", "high_frequency_energy"}:
    float32 [N] each.
  """
  x = np.asarray(x, np.float64)
  x_new = np.asarray(x_new, np.float64)
  if x.shape != x_new.shape or x.ndim != 4:
    raise CounterfactualError(
        f"x and x_new must be image batches [N, H, W, C] of one shape, got {x.shape} and "
        f"{x_new.shape}")
  d = x_new - x
  return {
      "l2": np.sqrt((d ** 2).reshape(d.shape[0], -1).sum(axis=1)).astype(np.float32),
      "total_variation": total_variation(d),
      "image_total_variation": total_variation(x_new),
      "high_frequency_energy": high_frequency_energy(d, cutoff),
  }


# ------------------------------------------------------------------------------
# The sweep over c.


class CounterfactualSweep(NamedTuple):
  """Every method over a sweep of c; arrays [method, c, image] = [M, C, N] unless noted.

  Attributes:
    cs: float64 [C], the coefficients (or L2 budgets when budget == "l2").
    methods: METHODS ("ig", "gradient", "gradient_support"), the first axis.
    target_grade: the grade F is the outcome of; flipped means it is now predicted.
    budget: "coefficient" (x + c * direction) or "l2" (each change scaled to L2 = c
      before clipping).
    predicted: int32, the argmax grade of the counterfactual.
    probability: float32, softmax probability of target_grade.
    quantity: float32, F (probability or logit of target_grade, per `quantity`).
    l2, total_variation, image_total_variation, high_frequency_energy: float32,
      `perturbation_statistics` of each counterfactual.
    flipped: bool, predicted == target_grade.
    flipped_any_dr: bool, predicted >= 1 (any diabetic retinopathy).
    first_flip, first_flip_any_dr: float64 [M, N], the smallest c of the sweep at
      which the image is flipped (NaN: at none).
    quantity_name: "probability" or "logit".
    original_predicted: int32 [N], the grade predicted for x.
    original_probability: float32 [N], P(target_grade | x).
    original_quantity: float32 [N], F(x).
    attributions: float32 [N, H, W, 3], IG of F in pixel space.
    gradient: float32 [N, H, W, 3], dF/dx in pixel space.
    gap: float32 [N], IG's completeness gap.
  """
  cs: np.ndarray
  methods: tuple
  target_grade: int
  budget: str
  predicted: np.ndarray
  probability: np.ndarray
  quantity: np.ndarray
  l2: np.ndarray
  total_variation: np.ndarray
  image_total_variation: np.ndarray
  high_frequency_energy: np.ndarray
  flipped: np.ndarray
  flipped_any_dr: np.ndarray
  first_flip: np.ndarray
  first_flip_any_dr: np.ndarray
  quantity_name: str
  original_predicted: np.ndarray
  original_probability: np.ndarray
  original_quantity: np.ndarray
  attributions: np.ndarray
  gradient: np.ndarray
  gap: np.ndarray


@functools.partial(jax.jit, static_argnames=("target_grade", "space"))
def _evaluate(logits_fn, images, *, target_grade, space):
  logits = PixelLogits(logits_fn.tree)(images).astype(jnp.float32)
  probabilities = jax.nn.softmax(logits, axis=-1)
  value = probabilities if space == "probability" else logits
  return (jnp.argmax(logits, axis=-1).astype(jnp.int32), probabilities[:, target_grade],
          value[:, target_grade])


def evaluate(logits_fn: Callable, images, *, target_grade: int = 1,
             quantity: str = "probability") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(predicted int32 [N], probability of target float32 [N], F float32 [N]) of pixel images."""
  if quantity not in quantities.SPACES:
    raise CounterfactualError(f"quantity must be one of {quantities.SPACES}, got {quantity!r}")
  out = _evaluate(Operands(logits_fn), jnp.asarray(images, jnp.float32),
                  target_grade=int(target_grade), space=quantity)
  return tuple(np.asarray(v) for v in out)


def _scale_to_l2(direction, budget):
  """Per-image coefficients [N, 1, 1, 1] scaling each direction to L2 `budget` (0 if zero)."""
  norms = jnp.sqrt(jnp.sum(jnp.square(direction), axis=(1, 2, 3)))
  budget = jnp.broadcast_to(jnp.asarray(budget, jnp.float32), norms.shape)
  c = jnp.where(norms > 0, budget / jnp.where(norms > 0, norms, 1.0), 0.0)
  return c[:, None, None, None]


def counterfactual_sweep(logits_fn: Callable, x, cs: Sequence[float], *, target_grade: int = 1,
                         baseline=HALF_GRAY_PIXEL, steps: int = 50,
                         method: str = "riemann_right", quantity: str = "probability",
                         budget: str = "coefficient", chunk_size: int | None = None,
                         cutoff: float = DEFAULT_HIGH_FREQUENCY_CUTOFF) -> CounterfactualSweep:
  """IG, gradient and support-restricted gradient counterfactuals of every image for every c.

  F is the probability (or logit) of `target_grade` of the pixel-space model.
  IG (steps, method) and dF/dx are computed once per image; each c then costs
  one forward pass per method (compiled once).

  Args:
    logits_fn: model-space input [N, H, W, 3] in [-1, 1] -> logits [N, G]
      (e.g. jax.tree_util.Partial(model.apply, variables)).
    x: float pixel images [N, H, W, 3] in [0, 255].
    cs: the coefficients, C non-negative numbers. With budget="l2" each is an L2
      norm in pixel units: every direction is scaled to it before clipping (so
      the methods are compared at equal size; clipping can only shrink a change).
    target_grade: the grade whose outcome F is raised (1 in the poster).
    baseline: IG baseline in pixel values, broadcasting to x (128: half gray).
    steps, method, chunk_size: IG's quadrature (drig.attribution.integrated_gradients).
    quantity: "probability" or "logit".
    budget: "coefficient" or "l2" (see cs).
    cutoff: the high-frequency cutoff (cycles per pixel) for the statistics.

  Returns:
    A CounterfactualSweep.

  Raises:
    CounterfactualError: x is not a batch of images, budget is unknown, or cs
      holds a negative or non-finite number.
  """
  _check_images(x)
  if budget not in BUDGETS:
    raise CounterfactualError(f"budget must be one of {BUDGETS}, got {budget!r}")
  cs = np.asarray(cs, np.float64).reshape(-1)
  if cs.size == 0 or np.any(cs < 0) or not np.all(np.isfinite(cs)):
    raise CounterfactualError(f"cs must be finite non-negative numbers, got {cs}")
  x = jnp.asarray(x, jnp.float32)
  baseline = jnp.asarray(baseline, jnp.float32)
  attributions, gap = pixel_integrated_gradients(
      logits_fn, x, baseline, target_grade=target_grade, quantity=quantity, steps=steps,
      method=method, chunk_size=chunk_size)
  gradient = pixel_gradient(logits_fn, x, target_grade=target_grade, quantity=quantity)
  directions = method_directions(x, baseline, attributions, gradient)
  unit = {name: (_scale_to_l2(d, 1.0) if budget == "l2" else jnp.ones((), jnp.float32))
          for name, d in directions.items()}
  original_predicted, original_probability, original_quantity = evaluate(
      logits_fn, x, target_grade=target_grade, quantity=quantity)
  fields = {k: np.zeros((len(METHODS), cs.size, x.shape[0]), np.float32) for k in (
      "probability", "quantity", "l2", "total_variation", "image_total_variation",
      "high_frequency_energy")}
  predicted = np.zeros((len(METHODS), cs.size, x.shape[0]), np.int32)
  x_host = np.asarray(x)
  for j, c in enumerate(cs):
    for m, name in enumerate(METHODS):
      x_new = jnp.clip(x + (c * unit[name]) * directions[name], PIXEL_MIN, PIXEL_MAX)
      predicted[m, j], fields["probability"][m, j], fields["quantity"][m, j] = evaluate(
          logits_fn, x_new, target_grade=target_grade, quantity=quantity)
      for key, value in perturbation_statistics(x_host, np.asarray(x_new), cutoff=cutoff).items():
        fields[key][m, j] = value
  flipped, flipped_any_dr = predicted == int(target_grade), predicted >= 1
  return CounterfactualSweep(
      cs=cs, methods=METHODS, target_grade=int(target_grade), budget=budget,
      predicted=predicted, flipped=flipped, flipped_any_dr=flipped_any_dr,
      first_flip=first_flip_budgets(cs, flipped),
      first_flip_any_dr=first_flip_budgets(cs, flipped_any_dr), quantity_name=quantity,
      original_predicted=original_predicted, original_probability=original_probability,
      original_quantity=original_quantity,
      attributions=np.asarray(attributions), gradient=np.asarray(gradient), gap=np.asarray(gap),
      **fields)


def first_flip_budgets(cs, flipped) -> np.ndarray:
  """The smallest c at which each image is flipped: float64 [M, N], NaN where never.

  Args:
    cs: the sweep's C budgets.
    flipped: bool [M, C, N].
  """
  cs = np.asarray(cs, np.float64).reshape(-1)
  flipped = np.asarray(flipped, bool)
  budgets = np.where(flipped, cs[None, :, None], np.inf).min(axis=1)
  return np.where(np.isfinite(budgets), budgets, np.nan)


def _spread(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(np.mean(values)), float(np.std(values))


def flip_rate_table(sweep: CounterfactualSweep) -> list[dict[str, Any]]:
  """One row per (method, c): flip rates, F, and the change's size and smoothness with spread.

  Returns:
    [{"method", "c", "flip_rate" (predicted target_grade), "flip_rate_any_dr"
      (predicted >= 1), "mean_probability", "mean_quantity", "mean_quantity_change"
      (F after - F before), "mean_l2", "mean_total_variation", "std_total_variation",
      "mean_high_frequency_energy", "std_high_frequency_energy"}], python floats,
    methods outer, c inner; std is over images.
  """
  rows = []
  for m, name in enumerate(sweep.methods):
    for j, c in enumerate(np.asarray(sweep.cs)):
      tv, tv_std = _spread(sweep.total_variation[m, j])
      hf, hf_std = _spread(sweep.high_frequency_energy[m, j])
      rows.append({
          "method": name, "c": float(c),
          "flip_rate": float(np.mean(sweep.flipped[m, j])),
          "flip_rate_any_dr": float(np.mean(sweep.flipped_any_dr[m, j])),
          "mean_probability": float(np.mean(sweep.probability[m, j])),
          "mean_quantity": float(np.mean(sweep.quantity[m, j])),
          "mean_quantity_change": float(np.mean(np.asarray(sweep.quantity[m, j], np.float64)
                                                - sweep.original_quantity)),
          "mean_l2": float(np.mean(sweep.l2[m, j])),
          "mean_total_variation": tv, "std_total_variation": tv_std,
          "mean_high_frequency_energy": hf, "std_high_frequency_energy": hf_std,
      })
  return rows


def _f_name(sweep: CounterfactualSweep) -> str:
  return f"{'P' if sweep.quantity_name == 'probability' else 'logit'}(grade {sweep.target_grade})"


def flip_rate_markdown(sweep: CounterfactualSweep) -> str:
  """The flip-rate table as Markdown (one row per method and c), spreads as mean ± std."""
  c_name = "L2 budget" if sweep.budget == "l2" else "c"
  any_dr = sweep.target_grade >= 1
  f = _f_name(sweep)
  n = sweep.flipped.shape[-1]
  lines = [
      f"Flip rate: share of the {plural(n, 'image')} predicted grade {sweep.target_grade} "
      "after the change" + ("; any DR: predicted grade 1 or higher" if any_dr else "")
      + f". Mean F = {f} before any change: {float(np.mean(sweep.original_quantity)):.4g}. "
      "TV and HF share (the change's high-frequency energy share) are mean ± std over the "
      f"{plural(n, 'image')}.",
      "",
      f"| method | {c_name} | flip rate to {sweep.target_grade}"
      + (" | any DR" if any_dr else "")
      + f" | mean {f} | mean ΔF | mean L2 | TV | HF share |",
      "|---|---:|---:|" + ("---:|" if any_dr else "") + "---:|---:|---:|---:|---:|",
  ]
  for row in flip_rate_table(sweep):
    lines.append(
        f"| {row['method']} | {row['c']:.4g} | {row['flip_rate']:.3f} | "
        + (f"{row['flip_rate_any_dr']:.3f} | " if any_dr else "")
        + f"{row['mean_quantity']:.4g} | {row['mean_quantity_change']:+.3g} | "
        f"{row['mean_l2']:.4g} | {row['mean_total_variation']:.3g} ± "
        f"{row['std_total_variation']:.2g} | {row['mean_high_frequency_energy']:.3f} ± "
        f"{row['std_high_frequency_energy']:.3f} |")
  return "\n".join(lines) + "\n"


def per_image_markdown(sweep: CounterfactualSweep, names: Sequence[str] | None = None) -> str:
  """Per image and method: the original grade and F, F (grade) after each change, first flips.

  Args:
    sweep: a CounterfactualSweep.
    names: N image names (default their positions).

  Returns:
    A Markdown table, one row per (image, method).
  """
  n = sweep.flipped.shape[-1]
  names = [str(i) for i in range(n)] if names is None else [str(v) for v in names]
  if len(names) != n:
    raise CounterfactualError(f"names must give the sweep's {n} images, got {len(names)}")
  any_dr = sweep.target_grade >= 1
  c_name = "L2" if sweep.budget == "l2" else "c"
  header = (["image", "grade", "F", "method"] + [f"{c_name} {c:.3g}" for c in sweep.cs]
            + [f"first flip to {sweep.target_grade}"] + (["first any DR"] if any_dr else []))
  lines = [f"F = {_f_name(sweep)}; each cell is F (predicted grade) after the change; first "
           f"flip: the smallest {c_name} of the sweep that flips the image (- if none).", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

  def budget(value):
    return "-" if np.isnan(value) else f"{value:.3g}"

  for i in range(n):
    for m, method in enumerate(sweep.methods):
      cells = [names[i], str(int(sweep.original_predicted[i])),
               f"{float(sweep.original_quantity[i]):.4g}", method]
      cells += [f"{float(sweep.quantity[m, j, i]):.4g} ({int(sweep.predicted[m, j, i])})"
                for j in range(len(sweep.cs))]
      cells.append(budget(sweep.first_flip[m, i]))
      if any_dr:
        cells.append(budget(sweep.first_flip_any_dr[m, i]))
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------
# Equal L2 budget.


class EqualL2Counterfactuals(NamedTuple):
  """The counterfactuals of METHODS with changes of one L2 norm (before clipping).

  Attributes:
    ig, gradient, gradient_support: float32 [N, H, W, 3] pixel images in [0, 255].
    coefficients: float32 [M, N], the c that gave each method's change L2 = budget
      before clipping (METHODS order); 0 where the direction is zero.
    budget: float32 [N], the requested L2 norm.
    statistics: {method: {...}} of `perturbation_statistics`; their "l2" is the
      achieved norm after clipping (<= budget).
    predicted, probability, quantity: [M, N] (int32, float32, float32), as in the sweep.
  """
  ig: np.ndarray
  gradient: np.ndarray
  gradient_support: np.ndarray
  coefficients: np.ndarray
  budget: np.ndarray
  statistics: dict
  predicted: np.ndarray
  probability: np.ndarray
  quantity: np.ndarray


def at_equal_l2(logits_fn: Callable, x, baseline, attributions, gradient, l2_budget, *,
                target_grade: int = 1, quantity: str = "probability",
                cutoff: float = DEFAULT_HIGH_FREQUENCY_CUTOFF) -> EqualL2Counterfactuals:
  """Counterfactuals of every method whose unclipped changes all have L2 norm l2_budget.

  Each method's c is l2_budget / ||direction|| per image (direction sgn(x - b) * IG,
  dF/dx, or dF/dx where x != b), so x + c * direction lies exactly l2_budget from x. The clip to
  [0, 255] then can only shrink the change: the achieved norm is statistics[m]["l2"].

  Args:
    logits_fn: model-space input -> logits [N, G] (for the predictions).
    x: float pixel images [N, H, W, 3] in [0, 255].
    baseline: IG's baseline in pixels, broadcasting to x.
    attributions, gradient: [N, H, W, 3] IG and dF/dx of the pixel-space F
      (e.g. a CounterfactualSweep's attributions and gradient).
    l2_budget: a scalar or [N], in pixel units.
    target_grade, quantity: F, for the reported predictions and values.
    cutoff: high-frequency cutoff for the statistics.

  Returns:
    An EqualL2Counterfactuals.
  """
  _check_images(x)
  x = jnp.asarray(x, jnp.float32)
  budget = np.broadcast_to(np.asarray(l2_budget, np.float32), (x.shape[0],)).copy()
  if np.any(budget < 0):
    raise CounterfactualError(f"l2_budget must be non-negative, got {l2_budget}")
  directions = method_directions(x, baseline, attributions, gradient)
  images, coefficients, statistics = {}, [], {}
  preds, probs, values = [], [], []
  for name in METHODS:
    c = _scale_to_l2(directions[name], budget)
    images[name] = np.asarray(jnp.clip(x + c * directions[name], PIXEL_MIN, PIXEL_MAX))
    coefficients.append(np.asarray(c).reshape(-1))
    statistics[name] = perturbation_statistics(np.asarray(x), images[name], cutoff=cutoff)
    p, prob, v = evaluate(logits_fn, images[name], target_grade=target_grade, quantity=quantity)
    preds.append(p), probs.append(prob), values.append(v)
  return EqualL2Counterfactuals(
      ig=images["ig"], gradient=images["gradient"], gradient_support=images["gradient_support"],
      coefficients=np.stack(coefficients).astype(np.float32), budget=budget,
      statistics=statistics, predicted=np.stack(preds), probability=np.stack(probs),
      quantity=np.stack(values))


# ------------------------------------------------------------------------------
# Figure.


def _unit_rgb(image) -> np.ndarray:
  return np.clip(np.asarray(image, np.float32) / 255.0, 0.0, 1.0)


def counterfactual_figure(x, ig_counterfactual, gradient_counterfactual, *,
                          info: dict | None = None):
  """Original, both counterfactuals, and their changes (amplified, centred on gray).

  Args:
    x, ig_counterfactual, gradient_counterfactual: one image each, pixel values
      [H, W, 3] in [0, 255] (a leading batch axis of 1 is dropped).
    info: optional titles' data: "original_grade", "ig_grade", "gradient_grade"
      (predicted grades), "title" (the figure's title), "true_grade".

  Returns:
    A matplotlib.figure.Figure (object API, no pyplot state): top row the three
    images, bottom row the two changes on one common scale, 0.5 gray + d /
    (2 max|d|) so both are amplified alike; titles give L2 and TV of each change.
  """
  # matplotlib takes about half a second to import; only the figure needs it.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  info = dict(info or {})
  arrays = []
  for name, image in (("x", x), ("ig_counterfactual", ig_counterfactual),
                      ("gradient_counterfactual", gradient_counterfactual)):
    image = np.asarray(image, np.float32)
    if image.ndim == 4 and image.shape[0] == 1:
      image = image[0]
    if image.ndim != 3 or image.shape[-1] != 3:
      raise CounterfactualError(f"{name} must be one image [H, W, 3], got shape {image.shape}")
    arrays.append(image)
  x, ig_image, grad_image = arrays
  if not ig_image.shape == grad_image.shape == x.shape:
    raise CounterfactualError("x and the counterfactuals must have one shape")
  stats = perturbation_statistics(np.stack([x, x]), np.stack([ig_image, grad_image]))
  changes = [ig_image - x, grad_image - x]
  peak = max(float(np.abs(d).max()) for d in changes)
  gain = 0.5 / peak if peak > 0 else 0.0

  def grade(key):
    return f", grade {info[key]}" if info.get(key) is not None else ""

  fig = Figure(figsize=(9.6, 6.6), layout="constrained")
  axes = fig.subplots(2, 3)
  true = f" (true {info['true_grade']})" if info.get("true_grade") is not None else ""
  titles = [f"original{grade('original_grade')}{true}"]
  for m, name in enumerate(("IG", "gradient")):
    key = "ig_grade" if m == 0 else "gradient_grade"
    titles.append(f"{name} counterfactual{grade(key)}\n"
                  f"L2 {stats['l2'][m]:.4g}, TV {stats['total_variation'][m]:.4g}")
  for ax, image, title in zip(axes[0], (x, ig_image, grad_image), titles):
    ax.imshow(_unit_rgb(image))
    ax.set_title(title, fontsize=9)
  axes[1, 0].axis("off")
  axes[1, 0].text(0.0, 0.5, f"changes d drawn as\ngray + d / {2 * peak:.3g}\n(gray = no change)"
                  if peak else "no change", fontsize=9, va="center")
  for ax, d, name, m in zip(axes[1, 1:], changes, ("IG", "gradient"), (0, 1)):
    ax.imshow(np.clip(0.5 + gain * d, 0.0, 1.0))
    ax.set_title(f"{name} change, HF share {stats['high_frequency_energy'][m]:.3f}", fontsize=9)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if info.get("title"):
    fig.suptitle(str(info["title"]))
  return fig
