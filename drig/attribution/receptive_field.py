"""Active regions of single units, computed on their receptive fields only.

A unit of a convolutional layer (one channel at one position) depends on a small
window of the input: Inception-v3's Conv2d_4a_3x3 units see 23x23 of a 256x256
photograph, as the poster notes ("the sensitive region is quite small"). Its
active region (pixel IG of its activation) is zero outside that window, and the
activation itself can be computed from the window alone. So each unit's
integration runs on a crop of the image a few receptive fields wide, not on the
whole image: for the stem's last layer about (40/256)^2 = 2.4% of the work.

Nothing here assumes an architecture. `plan_unit_crops` measures what it needs
from ``to_layer`` itself and proves each crop exact before it is used:

1. The cumulative stride s per axis, from the layer sizes of two input sizes
   64 pixels apart (jax.eval_shape).
2. The receptive field's extent, from one forward pass of an image whose
   centre pixel is NaN: the NaN spreads to exactly the units that depend on it.
3. Per unit, a window of about W = s * (extent + 4) pixels around its receptive
   field, its corner on the stride grid (so the crop's layer grid is the
   image's, shifted), clamped inside the image; W is rounded up so that the last
   such window ends at the image's far border.
4. Proof, per unit: the image with NaN everywhere outside the window leaves the
   unit finite (it reads nothing outside the window, zero padding included),
   and the crop's activation at the shifted index equals the image's.

A unit that fails the proof (none on Inception-v3's stem) is integrated on the
whole image instead, so results never depend on the shortcut.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution.arguments import AttributionArgumentError
from drig.attribution.integration import Operands, _call_operands, cached_eval_shape

_SIZE_PROBE = 64  # pixels removed per axis to measure the stride; a multiple of 2^6
_MARGIN_UNITS = 2  # strides of context kept on each side of the receptive field


class UnitCrops(NamedTuple):
  """Where each read-out unit's crop lies (host numpy arrays).

  Attributes:
    size: (h, w) of every crop, in input pixels.
    starts: int [N, K, 2], the crops' top-left corners.
    units: int [N, K, 3], the units (row, column, channel) in the crop's layer grid.
    exact: bool [N, K], whether the crop provably reproduces the unit.
  """
  size: tuple[int, int]
  starts: np.ndarray
  units: np.ndarray
  exact: np.ndarray


def _layer_hw(to_layer, shape, dtype):
  out = cached_eval_shape(_call_operands, Operands(to_layer), jax.ShapeDtypeStruct(shape, dtype))
  if len(out.shape) != 4:
    raise AttributionArgumentError(
        f"unit crops need a spatial layer [N, H, W, C]; to_layer returns {out.shape}")
  return np.array(out.shape[1:3])


def _strides(to_layer, x) -> np.ndarray | None:
  """Cumulative stride per axis, or None when it cannot be measured exactly."""
  n, h, w, c = x.shape
  if min(h, w) <= 2 * _SIZE_PROBE:
    return None
  full = _layer_hw(to_layer, (1, h, w, c), x.dtype)
  smaller = _layer_hw(to_layer, (1, h - _SIZE_PROBE, w - _SIZE_PROBE, c), x.dtype)
  shrink = full - smaller
  if np.any(shrink <= 0) or np.any(_SIZE_PROBE % shrink):
    return None
  return _SIZE_PROBE // shrink


@jax.jit
def _nan_footprint(to_layer, probe):
  return jnp.isnan(to_layer.tree(probe)).any(axis=(0, 3))


def plan_unit_crops(to_layer: Callable, x, baseline, units) -> UnitCrops | None:
  """Crops that reproduce each unit exactly; None when the layer is not strided-local.

  Args:
    to_layer: x [N, H, W, C] -> activations [N, h, w, c].
    x: the inputs; baseline broadcasts to x.
    units: int [N, K, 3], (row, column, channel) of each read-out unit.

  Returns:
    A UnitCrops, or None when the layer's units see most of the image (no saving).
  """
  x = jnp.asarray(x)
  units = np.asarray(units, np.int64)
  n, h, w, c = x.shape
  strides = _strides(to_layer, x)
  if strides is None:
    return None
  probe = jnp.zeros((1, h, w, c), x.dtype).at[0, h // 2, w // 2].set(jnp.nan)
  footprint = np.asarray(_nan_footprint(Operands(to_layer), probe))
  rows, cols = np.nonzero(footprint.any(axis=1))[0], np.nonzero(footprint.any(axis=0))[0]
  if rows.size == 0 or cols.size == 0:
    return None
  extent = np.array([rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1])
  size = strides * (extent + 2 * _MARGIN_UNITS)
  # Let the last stride-aligned crop end exactly at the far border, where the
  # units near it read the image's own zero padding.
  size = size + (np.array([h, w]) - size) % strides
  if np.any(size * 2 > np.array([h, w])):
    return None  # the crop would be most of the image: nothing to gain
  # A unit's receptive field is centred near the probe pixel shifted by stride
  # times its offset from the footprint's centre.
  centre_units = np.array([(rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2])
  field_centre = np.array([h // 2, w // 2]) + strides * (units[..., :2] - centre_units)
  start = np.floor((field_centre - size / 2) / strides).astype(np.int64) * strides
  last = ((np.array([h, w]) - size) // strides) * strides
  start = np.clip(start, 0, last)
  crop_units = units.copy()
  crop_units[..., :2] -= start // strides
  inside = np.all((crop_units[..., :2] >= 0) &
                  (crop_units[..., :2] < _layer_hw(to_layer, (1, *size, c), x.dtype)), axis=-1)
  exact = inside & _verify(to_layer, x, baseline, units, crop_units, start, size)
  return UnitCrops((int(size[0]), int(size[1])), start, crop_units, exact)


def crop_windows(images, starts, size) -> jax.Array:
  """images [N, H, W, C], starts [N, K, 2] -> crops [N * K, h, w, C]."""
  images = jnp.asarray(images)
  n, k = starts.shape[:2]
  starts = jnp.asarray(starts.reshape(n * k, 2), jnp.int32)
  index = jnp.repeat(jnp.arange(n), k)
  take = lambda i, s: jax.lax.dynamic_slice(images[i], (s[0], s[1], 0),
                                            (size[0], size[1], images.shape[-1]))
  return jax.vmap(take)(index, starts)


def paste_windows(crops, starts, image_shape) -> jax.Array:
  """crops [N, K, h, w, C] at starts [N, K, 2] -> zeros elsewhere, [N, K, H, W, C]."""
  n, k = starts.shape[:2]
  canvas = jnp.zeros((n * k,) + tuple(image_shape), crops.dtype)
  flat = crops.reshape((n * k,) + crops.shape[2:])
  put = lambda canvas_i, crop, s: jax.lax.dynamic_update_slice(canvas_i, crop, (s[0], s[1], 0))
  pasted = jax.vmap(put)(canvas, flat, jnp.asarray(starts.reshape(n * k, 2), jnp.int32))
  return pasted.reshape((n, k) + tuple(image_shape))


@jax.jit
def _layer_values(to_layer, images, units):
  """[N, K] activations of units [N, K, 3] (row, column, channel), one forward per image."""
  out = to_layer.tree(images)
  return out[jnp.arange(out.shape[0])[:, None], units[..., 0], units[..., 1], units[..., 2]]


def _verify(to_layer, x, baseline, units, crop_units, starts, size) -> np.ndarray:
  """Per read-out: the unit reads only its window, and the crop reproduces it."""
  n, k = units.shape[:2]
  h, w = x.shape[1:3]
  flat_units = jnp.asarray(units.reshape(n * k, 3), jnp.int32)
  # 1. NaN outside the window must not reach the unit (in the full image's geometry).
  rows = np.arange(h)[None, :, None]
  cols = np.arange(w)[None, None, :]
  s = starts.reshape(n * k, 2)
  outside = ~(((rows >= s[:, :1, None]) & (rows < s[:, :1, None] + size[0])) &
              ((cols >= s[:, 1:, None]) & (cols < s[:, 1:, None] + size[1])))
  images = jnp.repeat(jnp.asarray(x), k, axis=0)
  poisoned = jnp.where(jnp.asarray(outside)[..., None], jnp.nan, images)
  finite = np.isfinite(np.asarray(
      _layer_values(Operands(to_layer), poisoned, flat_units[:, None])))[:, 0]
  # 2. The crop's activation at the shifted unit equals the image's (at x and baseline).
  same = np.ones(n * k, bool)
  for ends in (x, jnp.broadcast_to(baseline, x.shape).astype(x.dtype)):
    full = np.asarray(_layer_values(Operands(to_layer), ends, jnp.asarray(units, jnp.int32)))
    full = full.reshape(n * k)
    crops = crop_windows(ends, starts, size)
    cropped = np.asarray(_layer_values(
        Operands(to_layer), crops, jnp.asarray(crop_units.reshape(n * k, 1, 3), jnp.int32)))[:, 0]
    scale = np.maximum(np.abs(full), 1e-6)
    same &= np.abs(cropped - full) <= 1e-4 * scale + 1e-5
  return (finite & same).reshape(n, k)
