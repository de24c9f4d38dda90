"""torchvision's Inception-v3 weights: a PyTorch state dict as ``.pth`` or safetensors.

``torchvision.models.inception_v3``'s state dict, as a ``.pth`` file (read
with ``torch.load(weights_only=True)``, which runs no pickled code; needs
torch) or a safetensors file (read here with numpy, no torch needed). The
auxiliary classifier and ``num_batches_tracked`` are ignored (reported).
Convolution kernels go from PyTorch's OIHW to drig's HWIO.
"""

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from drig.models import inception_v3
from drig.models.weight_files import (ImportedWeights, WeightImportError, assemble,
                                      describe_format, identity, inception_template,
                                      oihw_to_hwio, transpose_2d, unit_key)

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file into numpy arrays (bfloat16 via ml_dtypes)."""
  path = str(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise WeightImportError(path, "is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
      raise WeightImportError(path, f"is not a safetensors file or is truncated (header of "
                              f"{header_len} bytes announced, file has {size})")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise WeightImportError(path, f"has an unreadable safetensors header: {e}") from e
    data = f.read()
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype_name = info.get("dtype")
    if dtype_name == "BF16":
      dtype = ml_dtypes.bfloat16
    elif dtype_name in _SAFETENSORS_DTYPES:
      dtype = _SAFETENSORS_DTYPES[dtype_name]
    else:
      raise WeightImportError(path, f"tensor {name!r} has unsupported dtype {dtype_name!r}")
    begin, end = info["data_offsets"]
    if end > len(data):
      raise WeightImportError(path, f"is truncated: tensor {name!r} ends at byte {end} of the "
                              f"data, which has {len(data)}")
    tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"])
  return tensors


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict from ``.pth`` (no pickled code runs) or safetensors, as numpy."""
  path = str(path)
  if not os.path.exists(path):
    raise WeightImportError(path, "no such file")
  with open(path, "rb") as f:
    head = f.read(16)
  if len(head) >= 9 and head[8:9] == b"{":
    return read_safetensors(path)
  if not (head.startswith(b"PK") or head[:1] == b"\x80"):
    raise WeightImportError(path, f"is not a PyTorch state dict (.pth) or safetensors file: it "
                            f"looks like {describe_format(path)}")
  try:
    # torch is optional (test-only) and slow to import: only .pth files need it.
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightImportError(path, "reading a .pth file needs PyTorch; install torch or convert "
                            "the file to safetensors") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError...
    raise WeightImportError(path, f"cannot be loaded by torch.load(weights_only=True): {e} "
                            "(truncated or damaged file?)") from e
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"],
                                                                         Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise WeightImportError(path, f"holds a {type(state).__name__}, not a state dict")
  tensors = {}
  for name, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise WeightImportError(path, f"entry {name!r} is a {type(value).__name__}, not a tensor")
    tensors[name] = value.detach().cpu().float().numpy() if value.is_floating_point() else (
        value.detach().cpu().numpy())
  return tensors


def read_torchvision(path: str) -> ImportedWeights:
  """Reads torchvision's ``inception_v3`` state dict (``.pth`` or safetensors)."""
  path = str(path)
  tensors = read_state_dict(path)
  name_map = {}
  for unit in inception_v3.CONV_UNITS:
    u, p = unit_key(unit), ".".join(unit)
    name_map[f"params/{u}/conv/kernel"] = (f"{p}.conv.weight", oihw_to_hwio)
    name_map[f"params/{u}/bn/scale"] = (f"{p}.bn.weight", identity)
    name_map[f"params/{u}/bn/bias"] = (f"{p}.bn.bias", identity)
    name_map[f"batch_stats/{u}/bn/mean"] = (f"{p}.bn.running_mean", identity)
    name_map[f"batch_stats/{u}/bn/var"] = (f"{p}.bn.running_var", identity)
  num_classes = None
  if "fc.weight" in tensors:
    num_classes = int(np.shape(tensors["fc.weight"])[0])
    name_map["params/fc/kernel"] = ("fc.weight", transpose_2d)
    name_map["params/fc/bias"] = ("fc.bias", identity)
  # Deliberately not imported: the auxiliary classifier (training-time only in
  # torchvision, not built here) and BatchNorm's step counters.
  ignored = tuple(sorted(n for n in tensors
                         if n.startswith("AuxLogits.") or n.endswith(".num_batches_tracked")))
  template = inception_template("torchvision", num_classes)
  variables = assemble(path, "torchvision's inception_v3", name_map, tensors, template,
                        ignored=ignored)
  return ImportedWeights(variables, "torchvision", path, "torchvision", num_classes, ignored)


def load_torchvision(path: str) -> dict:
  """Variables of ``InceptionV3(convention="torchvision", num_classes=1000)`` (or without a top
  if the state dict has no ``fc``) from a ``.pth`` or safetensors state dict."""
  return read_torchvision(path).variables

