"""Occlusion (Zeiler and Fergus, 2014): how much the quantity drops when a patch is hidden.

A window of ``window`` pixels (all channels) slides over the image with
``stride``; at each position the window's pixels take the occluding value (half
gray, or a baseline image's pixels there) and the model is run. Each pixel gets
the mean, over the windows covering it, of ``f(x) - f(x occluded)`` (Captum
0.9's ``Occlusion`` convention). Positions per axis: ``ceil((D - w) / s) + 1``;
the last window may overhang the edge and is cut there, as in Captum.

All positions are batched: the occluded images are built on the device from
the window positions, ``chunk_size`` positions per image per model call
(image-major), never one Python call per position. Cost: one model evaluation
per position per image, plus one for the image itself.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution.arguments import (AttributionArgumentError, as_batch, check_baseline,
                                        check_positive_int)
from drig.attribution.integration import (HALF_GRAY_MODEL, Operands, accumulation_dtype,
                                          check_scalar_fn, default_points_per_call)


def _pair(value, name: str) -> tuple[int, int]:
  values = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
  if len(values) != 2:
    raise AttributionArgumentError(f"{name} must be an int or (height, width), got {value!r}")
  for v in values:
    check_positive_int(v, name=name)
  return int(values[0]), int(values[1])


def window_positions(size: tuple[int, int], window: tuple[int, int],
                     stride: tuple[int, int]) -> np.ndarray:
  """Top-left corners [P, 2] of the windows, row-major (Captum's count per axis)."""
  axes = [np.arange(math.ceil((d - w) / s) + 1) * s for d, w, s in zip(size, window, stride)]
  rows, cols = np.meshgrid(*axes, indexing="ij")
  return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.int32)


def _window_masks(corners, size, window):
  """Float masks [K, H, W] of the windows whose top-left corners are corners [K, 2]."""
  rows = jnp.arange(size[0])[None, :]
  cols = jnp.arange(size[1])[None, :]
  in_rows = (rows >= corners[:, :1]) & (rows < corners[:, :1] + window[0])
  in_cols = (cols >= corners[:, 1:]) & (cols < corners[:, 1:] + window[1])
  return (in_rows[:, :, None] & in_cols[:, None, :]).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(6,))
def _occlusion_chunk(window, operands, x, fill, reference, corners, total):
  f = operands.tree
  num_images, size = x.shape[0], corners.shape[0]
  acc = accumulation_dtype(x)
  masks = _window_masks(corners, x.shape[1:3], window).astype(acc)
  masks_b = masks.reshape((1, size) + masks.shape[1:] + (1,) * (x.ndim - 3))
  x_acc = x.astype(acc)[:, None]
  fill_acc = jnp.broadcast_to(fill, x.shape).astype(acc)[:, None]
  occluded = x_acc + masks_b * (fill_acc - x_acc)
  flat = (num_images * size,) + x.shape[1:]  # image-major
  values = f(occluded.reshape(flat).astype(x.dtype)).astype(acc).reshape(num_images, size)
  drops = reference[:, None] - values
  # Elementwise product and sum, not a dot: exact float32 on every backend.
  return total + jnp.sum(drops[:, :, None, None] * masks[None], axis=1)


def window_coverage(size: tuple[int, int], window: tuple[int, int],
                    corners: np.ndarray) -> np.ndarray:
  """How many windows cover each pixel, float64 [H, W] (counted on the host)."""
  coverage = np.zeros(size)
  for row, col in corners:
    coverage[row:row + window[0], col:col + window[1]] += 1
  return coverage


@jax.jit
def _quantity(operands, x):
  return operands.tree(x).astype(accumulation_dtype(x))


def occlusion(f: Callable, x, *, window: int | Sequence[int] = (15, 15),
              stride: int | Sequence[int] = (8, 8), value=HALF_GRAY_MODEL,
              chunk_size: int | None = None) -> jax.Array:
  """Occlusion map: the mean drop of f when a window over each pixel is hidden.

  Args:
    f: maps images [N, H, W, C] to [N], the quantity of interest; images
      independent.
    x: the images, a floating batch [N, H, W, C].
    window: the window's (height, width) in pixels, or one int for both; it
      covers every channel. At most the image's size.
    stride: the step between windows, (rows, cols) or one int; at most the
      window (else some pixels are never occluded), as in Captum.
    value: what hides the window: a number (default half gray in the model's
      [-1, 1] space) or a baseline image broadcasting to x (its pixels fill the
      window).
    chunk_size: window positions per image per model call (None: about
      `default_points_per_call()` images per call in all).

  Returns:
    float32 [N, H, W]: per pixel, the mean over the windows covering it of
    f(x) - f(x with the window hidden). The same for every channel.

  Raises:
    AttributionArgumentError: a window or stride that is not positive, a window
      larger than the image, a stride larger than the window, a value that does
      not broadcast to x, NaN or infinite values, or an f that does not map
      [N, ...] to [N].
  """
  x = as_batch(x)
  if x.ndim != 4:
    raise AttributionArgumentError(f"x must be images [N, H, W, C], got shape {x.shape}")
  fill = check_baseline(value, x, name="value")
  window = _pair(window, "window")
  stride = _pair(stride, "stride")
  size = tuple(x.shape[1:3])
  if any(w > d for w, d in zip(window, size)):
    raise AttributionArgumentError(
        f"window {window} is larger than the images ({size[0]} x {size[1]} pixels)")
  if any(s > w for s, w in zip(stride, window)):
    raise AttributionArgumentError(
        f"stride {stride} must be at most the window {window} on each axis, or some pixels "
        "are never occluded")
  check_scalar_fn(f, x)
  corners = window_positions(size, window, stride)
  if chunk_size is None:
    chunk_size = max(1, default_points_per_call() // x.shape[0])
  check_positive_int(chunk_size, name="chunk_size")
  num_chunks = math.ceil(len(corners) / chunk_size)
  per_chunk = math.ceil(len(corners) / num_chunks)
  # Padding positions lie outside the image: their masks are empty, they add 0.
  pad = num_chunks * per_chunk - len(corners)
  padded = np.concatenate([corners, np.full((pad, 2), max(size), np.int32)])
  operands = Operands(f)
  acc = accumulation_dtype(x)
  reference = _quantity(operands, x)
  total = jnp.zeros(x.shape[:3], acc)
  for i in range(num_chunks):
    total = _occlusion_chunk(window, operands, x, fill, reference,
                             jnp.asarray(padded[i * per_chunk:(i + 1) * per_chunk]), total)
  return total / jnp.asarray(window_coverage(size, window, corners), acc)


__all__ = ["occlusion", "window_coverage", "window_positions"]
