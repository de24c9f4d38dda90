"""Attribution over several devices: images split across a mesh, weights replicated.

Every attribution function is vectorised across images and builds its path
points image-major, so it runs data-parallel under XLA's SPMD partitioner as
soon as the images are placed with a ``NamedSharding`` over the batch axis;
each device integrates its own images and no step needs communication.

Example::

  mesh = image_mesh()                     # this host's devices, axis "images"
  logits_fn = jax.tree_util.Partial(model.apply, replicate(variables, mesh))
  attributions, gap = sharded_call(
      lambda x, b: integrated_gradients(probability_of_grade(logits_fn, 4), x, b),
      images, half_gray_baseline(images), mesh=mesh)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from drig import parallel
from drig.attribution.integration import AttributionArgumentError

AXIS = "images"


def image_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = AXIS) -> Mesh:
  """A 1-D mesh over `devices` whose one axis splits the images.

  The default is this host's devices (``jax.local_devices()``; all devices on
  one machine): in a multi-host job each host attributes its own images, so no
  step waits for another host. The axis is of type Auto: XLA propagates the
  images' sharding through the model, so models need no sharding annotations.
  """
  return parallel.data_mesh(jax.local_devices() if devices is None else devices, axis_name)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits axis 0 over the mesh's first axis; the other axes stay whole."""
  return parallel.batch_sharding(mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies every array of `tree` (e.g. model variables) to all devices of `mesh`."""
  return parallel.replicate(tree, mesh)


def pad_batch(x: jax.Array, multiple: int) -> jax.Array:
  """Pads axis 0 to a multiple of `multiple` by repeating the last image."""
  return parallel.pad_batch(x, multiple)


def shard_batch(x, mesh: Mesh) -> jax.Array:
  """Places a batch [N, ...] with axis 0 split over the mesh (N divisible by its size).

  Raises:
    AttributionArgumentError: N does not divide by the mesh size.
  """
  try:
    return parallel.shard_batch(x, mesh)
  except parallel.BatchSizeError as error:
    raise AttributionArgumentError(f"{error} or use sharded_call") from None


def sharded_call(fn: Callable, x, baseline, *, mesh: Mesh) -> Any:
  """fn(x, baseline) with the images split over `mesh`, padded as needed.

  Args:
    fn: (x [N, ...], baseline) -> a pytree of arrays; those with a leading axis
      of N are per-image results.
    x: the inputs [N, ...].
    baseline: one image [1, ...] (replicated) or one per image [N, ...] (split).
    mesh: e.g. image_mesh().

  Returns:
    fn's result for the N images, per-image arrays trimmed back to N.
  """
  x = jnp.asarray(x)
  baseline = jnp.asarray(baseline, x.dtype)
  n = x.shape[0]
  padded = shard_batch(pad_batch(x, mesh.size), mesh)
  if baseline.ndim == x.ndim and baseline.shape[0] == n and n > 1:
    baseline = shard_batch(pad_batch(baseline, mesh.size), mesh)
  else:
    baseline = replicate(baseline, mesh)
  result = fn(padded, baseline)
  total = padded.shape[0]
  return jax.tree_util.tree_map(
      lambda a: a[:n] if getattr(a, "ndim", 0) >= 1 and a.shape[0] == total else a, result)
