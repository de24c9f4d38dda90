"""Argument checks shared by drig's attribution functions.

One concept: what an attribution call accepts, and the error it raises
otherwise (``AttributionArgumentError``, naming the argument and the problem):
the step settings, a batch of floating-point images, a baseline that broadcasts
to it, and finite values (checked where the arrays are concrete).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution import adaptive


class AttributionArgumentError(ValueError):
  """An attribution function got arguments it cannot use."""


def check_integration_arguments(steps, tolerance, max_steps,
                                control=adaptive.DEFAULT_CONTROL) -> None:
  """Validates steps (a positive int or "auto"), tolerance, max_steps and control.

  Raises:
    AttributionArgumentError: steps is neither an int nor "auto", tolerance is
      not a finite number > 0, max_steps is not an int >= 2 (an error-controlled
      integration evaluates both ends of the path), or control is not one of
      adaptive.CONTROLS.
  """
  if not isinstance(control, str) or control not in adaptive.CONTROLS:
    raise AttributionArgumentError(
        f"control must be one of {adaptive.CONTROLS} (what steps='auto' bounds: the "
        f"completeness gap or the map's error), got {control!r}")
  if isinstance(steps, str):
    if not adaptive.is_auto(steps):
      raise AttributionArgumentError(
          f"steps must be a positive int or {adaptive.AUTO!r} (error-controlled), got {steps!r}")
  else:
    check_positive_int(steps)
  if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.number))
      or not math.isfinite(tolerance) or tolerance <= 0):
    raise AttributionArgumentError(
        f"tolerance must be a finite number > 0 (the relative completeness gap), "
        f"got {tolerance!r}")
  if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) \
      or max_steps < 2:
    raise AttributionArgumentError(
        f"max_steps must be an int >= 2 (both ends of the path are evaluated), "
        f"got {max_steps!r}")


def check_positive_int(steps, name="steps", minimum=1):
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
    raise AttributionArgumentError(f"{name} must be an int, got {steps!r}")
  if steps < minimum:
    raise AttributionArgumentError(f"{name} must be >= {minimum}, got {steps}")


def as_batch(x, name: str = "x") -> jax.Array:
  x = x if isinstance(x, jax.Array) else jnp.asarray(x)
  if x.ndim < 1:
    raise AttributionArgumentError(f"{name} must be a batch [N, ...], got a scalar")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise AttributionArgumentError(f"{name} must be floating point, got {x.dtype}")
  return x


def check_baseline(baseline, x: jax.Array, name: str = "baseline",
                   x_name: str = "x") -> jax.Array:
  """Checks the inputs of an attribution: ``x`` and a baseline that broadcasts to it.

  Rejects an empty batch and, where the arrays are concrete, NaN or infinite
  values, which would make every attribution NaN. Inside a ``jax.jit`` trace the
  values are unknown (a check would need a device sync), so the caller must check
  them; see :func:`check_finite`.

  Args:
    baseline: broadcasts to ``x``.
    x: the inputs [N, ...] (see :func:`as_batch`).
    name, x_name: the arguments' names, for messages.

  Returns:
    The baseline as an array of x's dtype.

  Raises:
    AttributionArgumentError: the baseline does not broadcast to x, x holds no
      images, or either holds NaN or infinite values (naming the images).
  """
  baseline = baseline if isinstance(baseline, jax.Array) else jnp.asarray(baseline, x.dtype)
  try:
    shape = np.broadcast_shapes(baseline.shape, x.shape)
  except ValueError:
    shape = None
  if shape != x.shape:
    raise AttributionArgumentError(
        f"{name} of shape {baseline.shape} does not broadcast to the inputs' shape {x.shape}")
  if x.shape[0] == 0:
    raise AttributionArgumentError(
        f"{x_name} is an empty batch (shape {x.shape}): there are no images to attribute")
  check_finite(x, x_name)
  # A baseline per image names its images; a shared one is one array.
  per_image = baseline.ndim == x.ndim and baseline.shape[0] == x.shape[0]
  check_finite(baseline, name, per_image=per_image)
  return baseline


@functools.partial(jax.jit, static_argnums=1)
def _finite_rows(array, rows):
  flags = jnp.all(jnp.isfinite(array.reshape(rows, -1)), axis=1)
  return flags, jnp.all(flags)


def check_finite(array, name: str = "x", *, per_image: bool = True) -> None:
  """Raises if a concrete ``array`` holds NaN or infinite values.

  A traced array (inside ``jax.jit``, ``vmap``, ...) is not checked: its values
  are not known, and checking them would need a device sync. Callers that
  attribute inside a trace must check their inputs themselves, e.g. with
  ``jnp.isfinite(x).all()`` on the result side.

  Args:
    array: a floating array; [N, ...] if ``per_image``.
    name: the argument's name, for the message.
    per_image: name the offending images (axis 0); else the array is one image.

  Raises:
    AttributionArgumentError: naming ``name`` and the images with NaN or inf.
  """
  if isinstance(array, jax.core.Tracer) or not jnp.issubdtype(array.dtype, jnp.inexact):
    return
  rows = array.shape[0] if per_image and array.ndim >= 1 else 1
  flags, all_finite = _finite_rows(array, rows)
  # A concrete array closed over inside a trace still gives a traced result.
  if isinstance(all_finite, jax.core.Tracer) or bool(all_finite):
    return
  try:
    bad = np.flatnonzero(~np.asarray(flags)).tolist()
  except RuntimeError:  # Split over hosts: the count is enough to act on.
    bad = None
  if not per_image:
    where = f"{name} has"
  elif bad is None:
    where = f"some images of {name} have"
  else:
    listed = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
    plural = len(bad) > 1
    where = (f"{name} image{'s' if plural else ''} {listed} (of {rows}) "
             f"{'have' if plural else 'has'}")
  raise AttributionArgumentError(
      f"{where} NaN or infinite values, which make attributions NaN")
