"""Gradient-family attributions: gradient, gradient x input, noise tunnels, expected gradients.

Every function takes a quantity ``f: x [N, ...] -> [N]`` (e.g.
``probability_of_grade(logits_fn, 4)``; pass models as pytrees, as for
``integrated_gradients``, so their weights are traced arguments) and a batch of
images, and returns float32 attributions shaped like ``x`` (float64 for float64
inputs under ``jax_enable_x64``). Conventions follow Captum 0.9:

===================  ===========================================  ==================
function             computes                                     Captum
===================  ===========================================  ==================
gradient             dF/dx (|dF/dx| with absolute=True)           Saliency(abs=...)
gradient_x_input     x * dF/dx                                    InputXGradient
noise_tunnel         mean over S noisy copies x + e of A(x + e),  NoiseTunnel
                     of A^2 (smoothgrad_sq) or their variance
                     (vargrad); A any attribution
expected_gradients   the mean of IG over K baselines              (the exact average)
gradient_shap        (x - b) * dF/dx(b + a (x - b)), b drawn      GradientShap,
                     from K baselines, a ~ U(0, 1), mean of S     stdevs=0
===================  ===========================================  ==================

Noise: ``stdev`` is an absolute standard deviation in the input's units
(Captum's ``stdevs``); ``stdev_spread`` a fraction of each image's value range,
std = stdev_spread * (max(x_i) - min(x_i)) (PAIR saliency's ``stdev_spread``,
whose default is 0.15). Random draws come from ``key`` folded with the sample's
number, so a sample's noise does not depend on how many samples are drawn, or
they are given explicitly (``noise``, ``indices``, ``alphas``) to reproduce
another library's draws.

Samples are evaluated in chunks, as integration's path points: each model call
sees ``samples_per_call`` noisy copies (or baseline draws) of each of the N
images, stacked image-major into one batch of N * samples_per_call, so memory is
bounded by the chunk whatever the number of samples. The default takes about
the engine's points per call (`integration.default_chunk_size`), padding the last
chunk with zero-weight samples rather than compiling a second shape; a sample's
draw depends only on its number, so the result does not depend on the chunking.
Chunks are dispatched one after another from Python, each a compiled program,
and the sums stay on the images' devices, so a batch sharded over a mesh
(image-major) stays sharded. Noise tunnels of IG take one sample per call by
default: each IG call already sees a chunk of path points per image.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution import arguments
from drig.attribution import baselines as baselines_lib
from drig.attribution import integration as ig_lib
from drig.attribution.arguments import AttributionArgumentError
from drig.attribution.integration import Operands

NOISE_TUNNEL_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _check_fn(f: Callable, x) -> jax.Array:
  x = arguments.as_batch(x)
  if x.shape[0] == 0:
    raise AttributionArgumentError(
        f"x is an empty batch (shape {x.shape}): there are no images to attribute")
  arguments.check_finite(x, "x")
  ig_lib.check_scalar_fn(f, x)
  return x


def _sum_gradient(f, points):
  acc = ig_lib.accumulation_dtype(points)
  # Images are independent, so the gradient of the batch sum is each image's own.
  return jax.grad(lambda p: jnp.sum(f(p).astype(acc)))(points).astype(acc)


# One compiled model program per quantity and shape serves gradient, |gradient|,
# gradient x input and the noise tunnels: the model's gradient is compiled once
# (seconds for Inception) and the elementwise finishing steps (milliseconds) apart.
@jax.jit
def _gradient(operands, x):
  return _sum_gradient(operands.tree, x)


@jax.jit
def _absolute(g):
  return jnp.abs(g)


@jax.jit
def _times_input(x, g):
  return x.astype(g.dtype) * g


def gradient(f: Callable, x, *, absolute: bool = False) -> jax.Array:
  """The gradient of the quantity with respect to each input (saliency).

  Args:
    f: maps a batch [N, ...] to [N]; images independent.
    x: a floating batch [N, ...].
    absolute: return |dF/dx| (Captum's ``Saliency`` default, abs=True).

  Returns:
    float32 [N, ...] (float64 for float64 x).

  Raises:
    AttributionArgumentError: an empty batch, NaN/inf in x, or f not [N, ...] -> [N].
  """
  x = _check_fn(f, x)
  g = _gradient(Operands(f), x)
  return _absolute(g) if absolute else g


def gradient_x_input(f: Callable, x) -> jax.Array:
  """x * dF/dx (Captum's ``InputXGradient``; IG from a zero baseline for a linear F).

  Args, Returns, Raises: as `gradient`.
  """
  x = _check_fn(f, x)
  return _times_input(x, _gradient(Operands(f), x))


# ------------------------------------------------------------------------------
# Noise tunnels: SmoothGrad, SmoothGrad-squared, VarGrad.


def noise_std(x, *, stdev=None, stdev_spread=None) -> jax.Array:
  """Per-image noise standard deviations [N] from an absolute or a relative setting.

  Args:
    x: the inputs [N, ...].
    stdev: absolute std in the input's units (>= 0; Captum's ``stdevs``).
    stdev_spread: std as a fraction of each image's max - min (>= 0; PAIR's).

  Raises:
    AttributionArgumentError: neither or both given, or a negative value.
  """
  if (stdev is None) == (stdev_spread is None):
    raise AttributionArgumentError(
        "give exactly one of stdev (absolute noise std) and stdev_spread (a fraction of each "
        f"image's value range); got stdev={stdev!r}, stdev_spread={stdev_spread!r}")
  name, value = ("stdev", stdev) if stdev is not None else ("stdev_spread", stdev_spread)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
    raise AttributionArgumentError(f"{name} must be a number >= 0, got {value!r}")
  acc = ig_lib.accumulation_dtype(x)
  if stdev is not None:
    return jnp.full((x.shape[0],), stdev, acc)
  flat = x.reshape(x.shape[0], -1).astype(acc)
  return stdev_spread * (flat.max(axis=1) - flat.min(axis=1))


def _stack(per_sample: jax.Array) -> jax.Array:
  """[N, C, ...] -> [N * C, ...]: each image's C samples side by side (image-major)."""
  return per_sample.reshape((-1,) + per_sample.shape[2:])


@jax.jit
def _noisy_inputs(x, key, samples, std):
  acc = ig_lib.accumulation_dtype(x)
  noise = jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(key, s), x.shape, acc),
                   out_axes=1)(samples)
  std = std.reshape((-1, 1) + (1,) * (x.ndim - 1))
  return _stack((x.astype(acc)[:, None] + std * noise).astype(x.dtype))


@jax.jit
def _given_noise(x, noise):
  return _stack(x[:, None] + noise.astype(x.dtype))


@jax.jit
def _accumulate(totals, attributions, weights):
  total, total_sq = totals
  a = attributions.reshape(total.shape[:1] + weights.shape + total.shape[1:]).astype(total.dtype)
  w = weights.astype(total.dtype).reshape((1, -1) + (1,) * (total.ndim - 1))
  return total + jnp.sum(w * a, axis=1), total_sq + jnp.sum(w * a * a, axis=1)


def sample_chunks(samples: int, samples_per_call: int | None,
                  num_images: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """The samples' numbers per call and their weights (1, or 0 for padding).

  Args:
    samples: S >= 1 samples per image.
    samples_per_call: the most samples per call; None: about the engine's points
      per call (`integration.default_chunk_size`).
    num_images: N, images per call.

  Returns:
    One (numbers int32 [C], weights float32 [C]) per call, every call of one size
    C; the last call's missing samples repeat sample S - 1 with weight 0.
  """
  num_chunks, size = ig_lib.chunk_plan(samples, samples_per_call, num_images)
  chunks = []
  for start in range(0, num_chunks * size, size):
    numbers = np.arange(start, start + size)
    weights = (numbers < samples).astype(np.float32)
    chunks.append((np.minimum(numbers, samples - 1).astype(np.int32), weights))
  return chunks


@functools.partial(jax.jit, static_argnums=(1, 2))
def _smoothing(totals, samples, kind):
  mean, mean_sq = (t / samples for t in totals)
  if kind == "smoothgrad":
    return mean
  if kind == "smoothgrad_sq":
    return mean_sq
  return mean_sq - mean * mean


def noise_tunnel(attribute_fn: Callable, x, *, kind: str = "smoothgrad", samples: int = 5,
                 key=None, stdev=None, stdev_spread=None, noise=None,
                 samples_per_call: int | None = 1) -> jax.Array:
  """SmoothGrad, SmoothGrad-squared or VarGrad of any attribution (Captum's NoiseTunnel).

  With A = attribute_fn and e_s Gaussian noise, over s = 1..S:
  smoothgrad = mean_s A(x + e_s), smoothgrad_sq = mean_s A(x + e_s)^2,
  vargrad = mean_s A^2 - (mean_s A)^2 (Captum's population variance).

  Args:
    attribute_fn: noisy images [M, ...] -> attributions [M, ...], where M = N *
      samples_per_call (each image's noisy copies side by side, image-major), e.g.
      ``functools.partial(gradient, f)`` or ``lambda z: integrated_gradients(f, z,
      baseline, steps=16)[0]`` (a per-image baseline [N, ...] must then be
      repeated samples_per_call times along axis 0 to stay with its image).
    x: a floating batch [N, ...].
    kind: one of NOISE_TUNNEL_TYPES.
    samples: S >= 1, noisy copies per image.
    key: a jax random key; sample s draws from fold_in(key, s). Required
      unless ``noise`` is given.
    stdev, stdev_spread: exactly one (see `noise_std`), unless ``noise`` is given.
    noise: explicit noise [N, S, ...] (image-major, as Captum's expanded batch)
      replacing the draws, e.g. to reproduce another library's.
    samples_per_call: noisy copies of each image per call of attribute_fn
      (see `sample_chunks`; None: about the engine's points per call). The
      default, 1, calls attribute_fn on N images at a time.

  Returns:
    [N, ...] in float32 (float64 for float64 x).

  Raises:
    AttributionArgumentError: an unknown kind (listing them), samples < 1, no
      key, bad noise settings, or noise of the wrong shape.
  """
  if kind not in NOISE_TUNNEL_TYPES:
    raise AttributionArgumentError(
        f"unknown noise tunnel kind {kind!r}; use one of {NOISE_TUNNEL_TYPES}")
  arguments.check_positive_int(samples, name="samples")
  x = arguments.as_batch(x)
  arguments.check_finite(x, "x")
  if noise is not None:
    noise = jnp.asarray(noise)
    if noise.shape != (x.shape[0], samples) + x.shape[1:]:
      raise AttributionArgumentError(
          f"noise must be [N, samples, ...] = {(x.shape[0], samples) + x.shape[1:]}, "
          f"got {noise.shape}")
  else:
    if key is None:
      raise AttributionArgumentError(
          f"{kind} draws random noise: pass key= (a jax random key) or noise=")
    std = noise_std(x, stdev=stdev, stdev_spread=stdev_spread)
  totals = None
  for numbers, weights in sample_chunks(samples, samples_per_call, x.shape[0]):
    noisy = (_given_noise(x, noise[:, numbers]) if noise is not None
             else _noisy_inputs(x, key, jnp.asarray(numbers), std))
    attributions = attribute_fn(noisy)
    if attributions.shape != noisy.shape:
      raise AttributionArgumentError(
          f"{kind}: attribute_fn must map the noisy batch {noisy.shape} to attributions of "
          f"the same shape, got {attributions.shape}")
    if totals is None:
      acc = ig_lib.accumulation_dtype(x, attributions)
      zeros = jnp.zeros_like(x, dtype=acc)  # keeps x's sharding
      totals = (zeros, zeros)
    totals = _accumulate(totals, attributions, jnp.asarray(weights))
  return _smoothing(totals, samples, kind)


def smoothgrad(f: Callable, x, *, key=None, samples: int = 5, stdev=None, stdev_spread=None,
               kind: str = "smoothgrad", noise=None,
               samples_per_call: int | None = None) -> jax.Array:
  """`noise_tunnel` of the plain (signed) gradient; Captum's NoiseTunnel(Saliency(abs=False)).

  Several noisy copies per model call by default (``samples_per_call=None``).
  """
  return noise_tunnel(lambda z: gradient(f, z), x, kind=kind, samples=samples, key=key,
                      stdev=stdev, stdev_spread=stdev_spread, noise=noise,
                      samples_per_call=samples_per_call)


# ------------------------------------------------------------------------------
# Expected gradients.


def expected_gradients(f: Callable, x, baselines, *, steps: int = 50,
                       method: str = "riemann_right",
                       chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The average of integrated gradients over K baselines (Erion et al., the exact mean).

  Args:
    f: maps a batch [N, ...] to [N].
    x: a floating batch [N, ...].
    baselines: the distribution [K, ...x.shape[1:]], e.g. K images of a data split.
    steps, method, chunk_size: each IG's (see `integrated_gradients`).

  Returns:
    (attributions [N, ...], gap [N]): the mean over baselines of IG, and
    sum(attributions) - (f(x) - mean_k f(b_k)), the mean of the K gaps.
    Cost: K * steps gradient evaluations per image.

  Raises:
    AttributionArgumentError: baselines of the wrong shape, or bad IG arguments.
  """
  x = _check_fn(f, x)
  baselines = baselines_lib.check_distribution(baselines, x, "baselines")
  total = gap_total = None
  for k in range(baselines.shape[0]):
    attributions, gap = ig_lib.integrated_gradients(
        f, x, baselines[k:k + 1], steps=steps, method=method, chunk_size=chunk_size)
    total = attributions if total is None else total + attributions
    gap_total = gap if gap_total is None else gap_total + gap
  k = baselines.shape[0]
  return total / k, gap_total / k


def gradient_shap_draws(key, num_images: int, samples: int,
                        num_baselines: int) -> tuple[jax.Array, jax.Array]:
  """Baseline indices int32 [N, S] and path positions float32 [N, S] in [0, 1).

  Drawn from ``fold_in(key, 0)`` and ``fold_in(key, 1)``.
  """
  indices = jax.random.randint(jax.random.fold_in(key, 0), (num_images, samples), 0,
                               num_baselines, jnp.int32)
  alphas = jax.random.uniform(jax.random.fold_in(key, 1), (num_images, samples), jnp.float32)
  return indices, alphas


@jax.jit
def _shap_step(operands, x, baselines, indices, alphas, weights, total):
  """Adds the chunk's draws: indices, alphas [N, C], weights [C] (0 for padding)."""
  acc = total.dtype
  b = baselines[indices].astype(acc)                      # [N, C, ...]
  delta = x.astype(acc)[:, None] - b
  expand = (1,) * (x.ndim - 1)
  points = b + alphas.astype(acc).reshape(alphas.shape + expand) * delta
  grads = _sum_gradient(operands.tree, _stack(points.astype(x.dtype)))
  w = weights.astype(acc).reshape((1, -1) + expand)
  return total + jnp.sum(w * delta * grads.reshape(points.shape), axis=1)


def gradient_shap(f: Callable, x, baselines, *, key=None, samples: int = 5, indices=None,
                  alphas=None, samples_per_call: int | None = None) -> jax.Array:
  """The single-sample expected-gradients estimator (Captum's GradientShap, stdevs=0).

  For each image and sample s: a baseline b = baselines[j_s] and a position
  a_s ~ U(0, 1); the attribution is mean_s (x - b) * dF/dx(b + a_s (x - b)),
  an unbiased estimate of the mean of IG over the baselines.

  Args:
    f: maps a batch [N, ...] to [N].
    x: a floating batch [N, ...].
    baselines: the distribution [K, ...x.shape[1:]].
    key: a jax random key for the draws (`gradient_shap_draws`); required
      unless indices and alphas are given.
    samples: S >= 1 draws per image (S gradient evaluations per image).
    indices, alphas: explicit draws [N, S] (int baseline indices, positions in
      [0, 1]), e.g. to reproduce Captum's.
    samples_per_call: draws of each image per model call (see `sample_chunks`;
      None: about the engine's points per call).

  Returns:
    [N, ...] float32 (float64 for float64 x).

  Raises:
    AttributionArgumentError: baselines of the wrong shape, no key, samples < 1,
      or draws of the wrong shape or range.
  """
  arguments.check_positive_int(samples, name="samples")
  x = _check_fn(f, x)
  baselines = baselines_lib.check_distribution(baselines, x, "baselines")
  n, k = x.shape[0], baselines.shape[0]
  if indices is None and alphas is None:
    if key is None:
      raise AttributionArgumentError(
          "gradient_shap draws baselines and path positions: pass key= or indices= and alphas=")
    indices, alphas = gradient_shap_draws(key, n, samples, k)
  elif indices is None or alphas is None:
    raise AttributionArgumentError("give both indices and alphas (or neither, with key)")
  indices = np.asarray(indices)
  alphas = jnp.asarray(alphas)
  if indices.shape != (n, samples) or alphas.shape != (n, samples):
    raise AttributionArgumentError(
        f"indices and alphas must be [N, samples] = {(n, samples)}, got {indices.shape} "
        f"and {alphas.shape}")
  if indices.min() < 0 or indices.max() >= k:
    raise AttributionArgumentError(f"indices must be in [0, {k}) (K = {k} baselines)")
  indices = jnp.asarray(indices, jnp.int32)
  operands = Operands(f)
  # zeros_like keeps x's sharding: every step then sees the same input layout (one compile).
  total = jnp.zeros_like(x, dtype=ig_lib.accumulation_dtype(x))
  for numbers, weights in sample_chunks(samples, samples_per_call, n):
    total = _shap_step(operands, x, baselines, indices[:, numbers], alphas[:, numbers],
                       jnp.asarray(weights), total)
  return total / samples
