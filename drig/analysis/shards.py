"""The shard files: their names, how maps are stored in them, and reading them back.

A shard is one ``.npz`` file of per-image arrays (docs/analysis.md lists the
keys), ``shards/shard-NNNNN.npz`` in the analysis workdir. Maps are stored with
a per-image scale (``encode_map``) and read with ``decode_map``;
``load_shards`` concatenates several shards' images.

A shard file can be damaged after it was written (a full disk, a copy cut
short): ``shard_problem`` says why one cannot be used from its zip index and
``format_version`` alone, without reading the arrays; ``read_shard`` raises a
``ShardReadError`` naming the file; ``drig.files.move_aside`` renames a damaged one
(``shard-NNNNN.npz.damaged-<time>``) so that it is attributed again but kept.
"""

import os
from typing import Iterable, Optional
import zipfile

import numpy as np

from drig.analysis.errors import AnalysisError

SHARD_PATTERN = "shard-{:05d}.npz"
SHARD_FORMAT_VERSION = 2
# Keys every shard has, whatever the config (docs/analysis.md).
BASE_KEYS = ("index", "name", "label", "probabilities", "prediction", "skipped_index",
             "skipped_name", "skipped_reason", "format_version")
# Keys every shard has per quantity key q.
QUANTITY_KEYS = ("pixel_ig.{q}", "pixel_ig.{q}.scale", "pixel_gap.{q}", "layer_channels.{q}",
                 "layer_gap.{q}", "top_positive.{q}", "top_positive_scores.{q}",
                 "top_negative.{q}", "top_negative_scores.{q}", "positive_resultant.{q}",
                 "positive_resultant.{q}.scale", "negative_resultant.{q}",
                 "negative_resultant.{q}.scale", "region_gaps.{q}", "gradient.{q}",
                 "gradient.{q}.scale", "pixel_relative_gap.{q}", "pixel_steps.{q}",
                 "pixel_converged.{q}", "pixel_map_error.{q}", "layer_steps.{q}",
                 "layer_converged.{q}")


class ShardReadError(AnalysisError):
  """A shard file that cannot be read; ``path`` names it."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"shard file {path} cannot be read: {reason}")
    self.path, self.reason = path, reason
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


# Keys every shard has per quantity key q and attribution method m of config.methods
# other than integrated_gradients (whose map is pixel_ig.{q}).
METHOD_KEYS = ("map.{m}.{q}", "map.{m}.{q}.scale")


def method_map_key(method: str, quantity_key: str) -> str:
  """The shard key of method ``method``'s maps for quantity ``quantity_key``."""
  if method == "integrated_gradients":
    return f"pixel_ig.{quantity_key}"
  return METHOD_KEYS[0].format(m=method, q=quantity_key)


def expected_keys(quantity_keys: Iterable[str], methods: Iterable[str] = ()) -> tuple[str, ...]:
  """The keys a shard of quantities ``quantity_keys`` (e.g. "predicted", "grade_4") and
  attribution ``methods`` (config.methods) holds."""
  quantity_keys = tuple(quantity_keys)
  extra = [m for m in methods if m != "integrated_gradients"]
  return (BASE_KEYS + tuple(k.format(q=q) for q in quantity_keys for k in QUANTITY_KEYS)
          + tuple(k.format(m=m, q=q) for q in quantity_keys for m in extra for k in METHOD_KEYS))


def shard_problem(path: str, keys: Iterable[str] = BASE_KEYS) -> Optional[str]:
  """Why the shard file at ``path`` cannot be used, or None if it looks complete.

  Cheap: reads the zip's index (at the end of the file, so a truncated file
  fails) and the ``format_version`` array, not the maps.

  Args:
    path: a shard file.
    keys: the keys it must hold (``expected_keys``).
  """
  try:
    with zipfile.ZipFile(path) as archive:
      names = set(archive.namelist())
      missing = [k for k in keys if f"{k}.npy" not in names]
      if missing:
        return f"missing keys {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
      with archive.open("format_version.npy") as f:
        version = np.lib.format.read_array(f, allow_pickle=False)
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
    return f"{type(e).__name__}: {e}"
  if version.shape != () or int(version) != SHARD_FORMAT_VERSION:
    return f"format_version {version.tolist()!r}, expected {SHARD_FORMAT_VERSION}"
  return None


def read_shard(path: str) -> dict:
  """Every array of a shard file; ShardReadError naming the file if one cannot be read."""
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except Exception as e:  # pylint: disable=broad-except
    # zip, zlib, CRC and npy header errors alike: the file, not the caller, is at fault.
    raise ShardReadError(path, f"{type(e).__name__}: {e}") from e


def load_shards(paths) -> dict:
  """Concatenates the per-image arrays of shard files (in order); metadata from the first.

  Returns:
    {key: array}; per-image keys have one row per analysed image.

  Raises:
    ShardReadError: a file cannot be read (naming it).
  """
  parts = [read_shard(p) for p in paths]
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
