"""Meshes and shardings: the one home of drig's data-parallel plumbing.

drig is data-parallel only: a 1-D mesh whose one axis splits the batch, every
parameter replicated. The same code runs on one CPU, one GPU node, a TPU pod
slice and a Slurm cluster, because JAX's multi-controller runtime makes every
host run the same program over the global mesh (``jax.distributed.initialize``
is called by ``drig.runtime.setup_process``, never here).

Two ways to place a batch, for the two kinds of job:

* Training (global mesh over every device of every host): each host reads its
  own rows of the global batch and ``host_local_to_global`` assembles the
  global array with ``jax.make_array_from_process_local_data``.
* Batch attribution (``local_mesh``: this host's devices only): each host owns
  whole shards of the data set, so no step needs another host;
  ``shard_batch`` splits a batch held by this host over its own devices, and
  ``sharded_call`` runs an attribution function on a batch of any size that way.

Every attribution function of ``drig.attribution`` is vectorised across images
and builds its path points image-major, so it runs data-parallel under XLA's SPMD
partitioner as soon as the images are placed with a ``NamedSharding`` over the
batch axis; each device integrates its own images and no step needs
communication. Example::

  mesh = local_mesh()
  logits_fn = jax.tree_util.Partial(model.apply, replicate(variables, mesh))
  attributions, gap = sharded_call(
      lambda x, b: integrated_gradients(probability_of_grade(logits_fn, 4), x, b),
      images, half_gray_baseline(images), mesh=mesh)

Importing this module has no side effects.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

BATCH_AXIS = "data"


class BatchSizeError(ValueError):
  """A batch does not divide evenly over the devices (or hosts) that share it."""


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = BATCH_AXIS) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every host).

  The axis is of type Auto: XLA propagates the batch sharding through the
  model, so models need no sharding annotations of their own (explicit
  sharding-in-types would need every op, e.g. dropout's mask, annotated).

  Args:
    devices: the devices, in mesh order; default ``jax.devices()``, which lists
      each host's devices together, so each host's rows land on its own devices.
    axis_name: the name of the batch axis.

  Returns:
    A ``jax.sharding.Mesh`` of shape ``{axis_name: len(devices)}``.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (axis_name,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def local_mesh(axis_name: str = BATCH_AXIS) -> Mesh:
  """A 1-D mesh over this host's devices only (``jax.local_devices()``)."""
  return data_mesh(jax.local_devices(), axis_name)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits axis 0 over the mesh's first axis; the other axes stay whole."""
  # A PartitionSpec shorter than the rank leaves the remaining axes unsplit.
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Every device of ``mesh`` holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def _mesh_process_count(mesh: Mesh) -> int:
  return len({d.process_index for d in mesh.devices.flat})


def check_global_batch(global_batch: int, mesh: Mesh, *, multiple_of: int = 1) -> None:
  """Rejects a global batch that does not split evenly over ``mesh``.

  Args:
    global_batch: the batch size summed over all devices and hosts.
    mesh: the data mesh the batch is split over.
    multiple_of: a further unit the batch must be a multiple of, e.g. the input
      pipeline's class-balance period (``(8, 1, 2, 1, 4)`` proportions need a
      multiple of 16).

  Raises:
    BatchSizeError: ``global_batch`` is not a positive multiple of the device
      count, the number of hosts in the mesh and ``multiple_of``; the message names
      the nearest valid sizes, which satisfy all three.
  """
  if not isinstance(multiple_of, (int, np.integer)) or multiple_of < 1:
    raise BatchSizeError(f"multiple_of must be a positive integer, got {multiple_of!r}")
  devices = mesh.size
  hosts = _mesh_process_count(mesh)
  # Devices of one host share its rows, so hosts divide devices; lcm covers any mesh.
  unit = math.lcm(devices, hosts, int(multiple_of))
  is_int = isinstance(global_batch, (int, np.integer))
  if is_int and global_batch >= 1 and global_batch % unit == 0:
    return
  parts = [f"the {devices} devices of the mesh {dict(mesh.shape)}"]
  if hosts > 1:
    parts.append(f"its {hosts} hosts")
  if multiple_of > 1:
    parts.append(f"the required multiple {multiple_of}")
  lower = global_batch // unit * unit if is_int else 0
  suggestions = [lower, lower + unit] if lower >= unit else [unit, 2 * unit]
  raise BatchSizeError(
      f"the global batch size {global_batch!r} does not divide by {unit} "
      f"({', '.join(parts)}); choose a positive multiple of {unit}, e.g. {suggestions[0]} or "
      f"{suggestions[1]}")


def log_mesh(mesh: Mesh, what: str = "data-parallel") -> str:
  """Logs (and returns) the mesh shape, device count and this process's place."""
  message = (f"{what} mesh {dict(mesh.shape)}: {mesh.size} devices "
             f"({jax.local_device_count()} local, {mesh.devices.flat[0].platform}), "
             f"process {jax.process_index()} of {jax.process_count()}")
  logging.info("%s", message)
  return message


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies every array of ``tree`` (e.g. model variables) to all devices of ``mesh``.

  On a mesh spanning several hosts, every host must pass the same values (drig
  derives them from the same seed or checkpoint); each host then places its
  copy on its own devices, with no cross-host transfer.
  """
  sharding = replicated_sharding(mesh)
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def to_global(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)  # already global: a same-devices reshard.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(to_global, tree)


def host_local_to_global(local_tree: Any, mesh: Mesh) -> Any:
  """Assembles global batches from each host's rows, split over ``mesh`` on axis 0.

  Every host calls this with its own rows (the same count on every host, in
  host order: ``drig.input.sampling.host_rows``); the global batch is their
  concatenation over hosts.

  Args:
    local_tree: a pytree of host arrays ``[B / hosts, ...]``.
    mesh: the global data mesh.

  Returns:
    The same pytree of global ``jax.Array`` ``[B, ...]``, sharded on axis 0.
  """
  sharding = batch_sharding(mesh)
  hosts = _mesh_process_count(mesh)

  def to_global(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * hosts,) + x.shape[1:]
    check_global_batch(global_shape[0], mesh)
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(to_global, local_tree)


def pad_batch(x: jax.Array, multiple: int) -> jax.Array:
  """Pads axis 0 to a multiple of ``multiple`` by repeating the last row."""
  n = x.shape[0]
  pad = -n % multiple
  if pad == 0:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])


def shard_batch(x, mesh: Mesh) -> jax.Array:
  """Places a whole batch held by this host, ``[N, ...]``, with axis 0 split over ``mesh``.

  For a mesh of this host's devices (``local_mesh``). On a multi-host mesh use
  ``host_local_to_global``.

  Raises:
    BatchSizeError: N does not divide by the mesh size.
  """
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[0] % mesh.size:
    raise BatchSizeError(
        f"a batch of shape {x.shape} cannot be split over {mesh.size} devices; "
        f"pad it first (pad_batch) to a multiple of {mesh.size}")
  return jax.device_put(x, batch_sharding(mesh))


def sharded_call(fn: Callable, x, baseline, *, mesh: Mesh) -> Any:
  """fn(x, baseline) with the images split over ``mesh``, padded as needed.

  Args:
    fn: (x [N, ...], baseline) -> a pytree of arrays; those with a leading axis
      of N are per-image results.
    x: the inputs [N, ...].
    baseline: one image [1, ...] (replicated) or one per image [N, ...] (split).
    mesh: e.g. ``local_mesh()``.

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


def to_host(tree: Any) -> Any:
  """Copies a pytree of (possibly multi-host) arrays to numpy on every host.

  Replicated arrays are read from a local copy; arrays split across hosts are
  gathered (a collective: every host must call this).
  """
  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(fetch, tree)
