"""The shard files: their names, how maps are stored in them, and reading them back.

A shard is one ``.npz`` file of per-image arrays (docs/analysis.md lists the
keys), ``shards/shard-NNNNN.npz`` in the analysis workdir. Maps are stored with
a per-image scale (``encode_map``) and read with ``decode_map``;
``load_shards`` concatenates several shards' images.
"""

import os

import numpy as np

SHARD_PATTERN = "shard-{:05d}.npz"
SHARD_FORMAT_VERSION = 1
# Per-shard names rather than per-image rows: taken from the first shard.
_NAME_KEYS = ("localization_methods", "localization_lesions", "localization_metrics")


def shard_path(workdir: str, shard: int) -> str:
  """The file of shard number ``shard`` in an analysis workdir."""
  return os.path.join(workdir, "shards", SHARD_PATTERN.format(shard))


def encode_map(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
  """A batch of maps as stored in a shard: (stored [N, ...], scale float32 [N]).

  float16 maps are divided by max|.| per image first, since IG values (~1e-6)
  are float16 subnormals; float32 maps keep scale 1.

  Args:
    values: [N, ...] maps, any real dtype.
    dtype: "float16" or "float32", the stored dtype.
  """
  values = np.asarray(values, np.float32)
  n = values.shape[0]
  if dtype == "float32":
    return values, np.ones((n,), np.float32)
  scale = np.abs(values.reshape(n, -1)).max(axis=1) if values.size else np.ones((n,))
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  stored = values / scale.reshape((n,) + (1,) * (values.ndim - 1))
  return stored.astype(np.float16), scale


def decode_map(shard: dict, key: str) -> np.ndarray:
  """A map from a shard as float32: stored value times its per-image scale."""
  values = np.asarray(shard[key], np.float32)
  scale = np.asarray(shard[f"{key}.scale"], np.float32)
  return values * scale.reshape((-1,) + (1,) * (values.ndim - 1))


def load_shards(paths) -> dict:
  """Concatenates the per-image arrays of shard files (in order); metadata from the first.

  Returns:
    {key: array}; per-image keys have one row per analysed image.
  """
  parts = [dict(np.load(p, allow_pickle=False)) for p in paths]
  merged = {}
  per_image = {k for part in parts for k, v in part.items()
               if v.ndim >= 1 and k not in _NAME_KEYS}
  for key in per_image:
    values = [part[key] for part in parts if key in part]
    merged[key] = np.concatenate(values) if values else np.zeros((0,))
  for part in parts:
    for key, value in part.items():
      if key not in merged:
        merged[key] = value
  return merged
