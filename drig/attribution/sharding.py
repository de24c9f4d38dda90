"""Attribution over several devices: images split across a mesh, weights replicated.

Every attribution function is vectorised across images and builds its path
points image-major, so it runs data-parallel under XLA's SPMD partitioner as
soon as the images are placed with a ``NamedSharding`` over the batch axis;
each device integrates its own images and no step needs communication.

Example::

  mesh = image_mesh()                                   # all devices, axis "images"
  logits_fn = jax.tree_util.Partial(model.apply, replicate(variables, mesh))
  attributions, gap = sharded_call(
      lambda x, b: integrated_gradients(probability_of_grade(logits_fn, 4), x, b),
      images, half_gray_baseline(images), mesh=mesh)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from drig.attribution.integrated_gradients import AttributionArgumentError

AXIS = "images"


def image_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: all) whose one axis splits the images.

  The axis is of type Auto: XLA propagates the images' sharding through the
  model, so models need no sharding annotations of their own.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (axis_name,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits axis 0 over the mesh's first axis; the other axes stay whole."""
  # A PartitionSpec shorter than the rank leaves the remaining axes unsplit.
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies every array of `tree` (e.g. model variables) to all devices of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def pad_batch(x: jax.Array, multiple: int) -> jax.Array:
  """Pads axis 0 to a multiple of `multiple` by repeating the last image."""
  n = x.shape[0]
  pad = -n % multiple
  if pad == 0:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])


def shard_batch(x, mesh: Mesh) -> jax.Array:
  """Places a batch [N, ...] with axis 0 split over the mesh (N divisible by its size)."""
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[0] % mesh.size:
    raise AttributionArgumentError(
        f"a batch of shape {x.shape} cannot be split over {mesh.size} devices; "
        f"pad it first (pad_batch) or use sharded_call")
  return jax.device_put(x, batch_sharding(mesh))


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
