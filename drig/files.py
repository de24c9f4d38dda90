"""Workdir files: atomic writes, JSON values, and damaged files moved aside.

Used by the training and analysis workdirs alike. A reader sees the old file or the complete new one, never a part: each write
goes to a temporary file in the destination's folder, is flushed to disk and
renamed over the destination with ``os.replace``, so a job killed mid-write
leaves no truncated shard, report or metrics file behind.
"""

import io
import json
import math
import os
import time
from typing import Any

import numpy as np


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file in the same folder and os.replace."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_savez(path: str, arrays: dict) -> None:
  """np.savez_compressed(arrays) to ``path``, atomically."""
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str) -> Any:
  """The JSON value stored in ``path`` (UTF-8)."""
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def json_safe(value):
  """``value`` with numpy scalars and arrays as Python values, NaN and infinities as None."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  return value


def move_aside(path: str) -> str:
  """Renames a damaged file or folder to ``<path>.damaged-<time>`` (kept for inspection).

  Returns the new path; a suffix keeps two damaged copies of one second apart.
  """
  stamp = time.strftime("%Y%m%dT%H%M%S")
  target, suffix = f"{path}.damaged-{stamp}", 1
  while os.path.exists(target):
    target, suffix = f"{path}.damaged-{stamp}-{suffix}", suffix + 1
  os.replace(path, target)
  return target
