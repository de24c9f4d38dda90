"""Faithfulness of attribution maps: deletion and insertion curves.

Does the model's output depend on the pixels a map ranks highest? Following
RISE (Petsiuk et al., 2018), pixels are ranked by a 2-D map (highest first) and

* deletion: the top-ranked pixels are replaced by the baseline, a growing share
  at a time, and the quantity of interest is recorded: a faithful map makes it
  fall fast (small area under the curve);
* insertion: starting from the baseline, the top-ranked pixels are restored: a
  faithful map makes the quantity rise fast (large area).

The control is the same curve for a random ranking (``random_ranking``): a map
says something about the model only where its curves beat the random ones.
Unlike RISE's zeros and blurred start, the replacement is whatever baseline the
attribution used (drig's half gray by default), so removed pixels look like the
surround the model sees outside the retina.

``curves`` evaluates every (image, fraction) pair on the device in chunks of
fractions, one compiled program per shape. Areas use the trapezoid rule over
the fractions, which run from 0 to 1, so an area is the curve's mean height.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drig.attribution import arguments
from drig.attribution import integration

MODES = ("deletion", "insertion")


class FaithfulnessError(ValueError):
  """Bad maps, fractions or modes for a deletion or insertion curve."""


class Curves(NamedTuple):
  """Deletion or insertion curves of a batch of images.

  Attributes:
    fractions: float64 [K], the share of pixels removed (deletion) or restored
      (insertion) at each point, from 0 to 1.
    values: float32 [N, K], the quantity of interest at each point.
    area: float64 [N], the area under each curve (trapezoid rule).
  """
  fractions: np.ndarray
  values: np.ndarray
  area: np.ndarray


def default_fractions(points: int = 21) -> np.ndarray:
  """``points`` evenly spaced shares of pixels from 0 to 1 (21: steps of 5%)."""
  if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
    raise FaithfulnessError(f"points must be an int >= 2, got {points!r}")
  return np.linspace(0.0, 1.0, int(points))


def random_ranking(seed: int, num_images: int, height: int, width: int) -> np.ndarray:
  """The control: i.i.d. uniform maps float32 [N, H, W], deterministic in the seed."""
  return np.random.default_rng(seed).random((num_images, height, width), dtype=np.float32)


def pixel_ranks(maps) -> np.ndarray:
  """Each pixel's rank in its map, 0 = highest value; int32 [N, H, W].

  Ties are broken by position (row-major), so the ranking is deterministic.
  """
  maps = np.asarray(maps, np.float64)
  if maps.ndim != 3:
    raise FaithfulnessError(f"maps must be [N, H, W], got shape {maps.shape}")
  if not np.isfinite(maps).all():
    raise FaithfulnessError("maps hold NaN or infinite values")
  flat = maps.reshape(maps.shape[0], -1)
  order = np.argsort(-flat, axis=1, kind="stable")
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None, :], axis=1)
  return ranks.reshape(maps.shape).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(5,))
def _chunk_values(f, x, baseline, ranks, counts, insertion):
  # counts: [k] pixels taken at each point; the images are repeated image-major.
  n, k = x.shape[0], counts.shape[0]
  taken = ranks[:, None] < counts[None, :, None, None]            # [N, k, H, W]
  taken = taken[..., None]
  start, end = (baseline, x) if insertion else (x, baseline)
  start = jnp.broadcast_to(start, x.shape)[:, None]
  end = jnp.broadcast_to(end, x.shape)[:, None]
  images = jnp.where(taken, end, start).reshape((n * k,) + x.shape[1:])
  return f.tree(images).astype(jnp.float32).reshape(n, k)


def curves(f: Callable, x, baseline, maps, *, mode: str = "deletion",
           fractions: Sequence[float] | None = None, chunk_size: int = 4) -> Curves:
  """Deletion or insertion curves of ``f`` for maps of a batch of images.

  Args:
    f: the quantity of interest, x [N, H, W, C] -> [N] (a drig quantity helper,
      e.g. ``probability_of_grade(logits_fn, 4)``; a pytree, so its weights are
      arguments of the compiled program).
    x: the images [N, H, W, C] in the model's input space.
    baseline: what removed pixels become, broadcastable to x (e.g.
      ``half_gray_baseline(x)``).
    maps: [N, H, W] maps ranking the pixels, highest first (collapse
      attributions with ``drig.analysis.localization.saliency``).
    mode: "deletion" or "insertion".
    fractions: increasing shares of pixels in [0, 1], starting at 0 and ending
      at 1 (default ``default_fractions()``).
    chunk_size: fractions per model call; the model sees N * chunk_size images.

  Returns:
    ``Curves`` (fractions, values [N, K], area [N]).

  Raises:
    FaithfulnessError: an unknown mode, maps of another size than the images,
      fractions that are not increasing from 0 to 1.
    AttributionArgumentError: bad images or baseline (see
      ``drig.attribution.arguments.check_baseline``).
  """
  if mode not in MODES:
    raise FaithfulnessError(f"mode must be one of {MODES}, got {mode!r}")
  x = arguments.as_batch(x)
  baseline = arguments.check_baseline(baseline, x)
  fractions = default_fractions() if fractions is None else np.asarray(fractions, np.float64)
  if (fractions.ndim != 1 or len(fractions) < 2 or fractions[0] != 0 or fractions[-1] != 1
      or np.any(np.diff(fractions) <= 0)):
    raise FaithfulnessError(
        f"fractions must increase from 0 to 1, got {np.round(fractions, 4).tolist()}")
  maps = np.asarray(maps)
  if x.ndim != 4 or maps.shape != x.shape[:3]:
    raise FaithfulnessError(f"maps of shape {maps.shape} do not match images {x.shape} "
                            "(expected maps [N, H, W] for images [N, H, W, C])")
  arguments.check_positive_int(chunk_size, name="chunk_size")
  ranks = jnp.asarray(pixel_ranks(maps))
  num_pixels = maps.shape[1] * maps.shape[2]
  counts = np.round(fractions * num_pixels).astype(np.int32)
  num_chunks = -(-len(counts) // chunk_size)
  # Pad with the last count so every call has one shape (one compilation).
  padded = np.concatenate([counts, np.full(num_chunks * chunk_size - len(counts), counts[-1])])
  operands = integration.Operands(f)
  parts = [_chunk_values(operands, x, baseline, ranks, jnp.asarray(chunk), mode == "insertion")
           for chunk in padded.reshape(num_chunks, chunk_size)]
  values = np.concatenate([np.asarray(p) for p in parts], axis=1)[:, :len(counts)]
  area = np.trapezoid(values.astype(np.float64), fractions, axis=1)
  return Curves(fractions, values, area)
