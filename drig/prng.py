"""Named random keys: one root key per run, every use derived from it by name.

Each use of randomness (initialisation, dropout, ...) folds a fixed name, and
where it changes per step the step, into the run's root key. A resumed run
therefore draws exactly the keys an uninterrupted run would, and adding a new
use of randomness never shifts the keys of the existing ones.
"""

import zlib

import jax


def named_key(root_key: jax.Array, name: str, step=None) -> jax.Array:
  """The key for ``name`` (and ``step``), derived from ``root_key`` by ``fold_in``."""
  key = jax.random.fold_in(root_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
  return key if step is None else jax.random.fold_in(key, step)
