"""Weight importers for drig's Inception-v3 and DR classifier.

Sources (``SOURCES``):

* ``keras_h5``: Keras' official ImageNet files in the legacy HDF5 layout
  (``inception_v3_weights_tf_dim_ordering_tf_kernels[_notop].h5``), read with
  h5py. Root attribute ``layer_names``; one group per layer with attribute
  ``weight_names`` (``conv2d_1/kernel:0``, ``batch_normalization_1/beta:0``, ...)
  naming its datasets. Group names number layers of a class in creation order,
  which is the canonical order of ``inception_v3.CONV_UNITS``; the reader sorts
  them by their numeric suffix rather than trusting a fixed offset.
* ``keras3``: Keras 3 ``.weights.h5`` files (``layers/<key>/vars/<i>``). Keys
  number layers of a class in the model's topological order, which is not
  creation order, hence the explicit ``KERAS3_CONV_INDEX`` table.
* ``torchvision``: ``torchvision.models.inception_v3``'s state dict, as a
  ``.pth`` file (read with ``torch.load(weights_only=True)``, which runs no
  pickled code; needs torch) or a safetensors file (read here with numpy).
  The auxiliary classifier and ``num_batches_tracked`` are ignored (reported).
* ``drig``: drig's own orbax checkpoints: a directory written by
  ``save_variables``, or a training run's ``CheckpointManager`` directory (a
  step directory or the root, whose latest step is taken), whose item holds a
  state with ``params`` and ``batch_stats``.

Every name map is explicit: each drig variable comes from one named tensor.
Missing, unexpected or shape-mismatched tensors raise ``WeightImportError``
listing them and naming the file; nothing is silently left at its random
initialisation. ``initialise_from`` puts imported ImageNet weights into the
base of a freshly initialised ``DRClassifier`` and returns an ``ImportReport``
saying what was imported, what stays freshly initialised and what in the file
was ignored.
"""

import dataclasses
import functools
import json
import os
import re
import struct
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from drig.models import inception_v3

SOURCES = ("keras_h5", "keras3", "torchvision", "drig")

# Keras 3 .weights.h5 key suffix (``layers/conv2d_<k>``, k = 0 written as
# ``conv2d``) of each conv unit of CONV_UNITS; batch_normalization_<k> goes
# with conv2d_<k>. From shared/reference/inception_v3_layers.md; proven by the
# numerical parity tests (shapes alone cannot tell Mixed_5b's two 1x1 192->64
# convolutions apart).
KERAS3_CONV_INDEX = (
    0, 1, 2, 3, 4, 8, 6, 9, 5, 7, 10, 11, 15, 13, 16, 12, 14, 17, 18, 22, 20, 23, 19, 21, 24, 25,
    28, 26, 27, 29, 36, 32, 34, 37, 30, 31, 33, 35, 38, 39, 46, 42, 44, 47, 40, 41, 43, 45, 48, 49,
    56, 52, 54, 57, 50, 51, 53, 55, 58, 59, 66, 62, 64, 67, 60, 61, 63, 65, 68, 69, 72, 74, 70, 71,
    73, 75, 83, 77, 79, 80, 76, 78, 81, 82, 84, 92, 86, 88, 89, 85, 87, 90, 91, 93)

_MAX_LISTED = 12


class WeightImportError(ValueError):
  """A weight file cannot be imported; the message names the file and the problems."""

  def __init__(self, path: str, problem: str, *, missing=(), unexpected=(), mismatched=()):
    self.path = str(path)
    self.missing = tuple(missing)
    self.unexpected = tuple(unexpected)
    self.mismatched = tuple(mismatched)
    lines = [f"{self.path}: {problem}"]
    for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                         ("shape mismatch", self.mismatched)):
      if items:
        shown = ", ".join(items[:_MAX_LISTED])
        more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
        lines.append(f"  {title} ({len(items)}): {shown}{more}")
    super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class ImportedWeights:
  """Variables read from a file, with what they fit.

  Attributes:
    variables: {"params": ..., "batch_stats": ...} nested dicts of jax arrays.
    source: one of SOURCES.
    path: the file or directory read.
    convention: "keras" or "torchvision" (None for drig checkpoints).
    num_classes: size of the ImageNet top in the file, None without a top.
    ignored: tensors in the file deliberately not imported (auxiliary head...).
  """
  variables: dict
  source: str
  path: str
  convention: Optional[str]
  num_classes: Optional[int]
  ignored: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """What an import did to a model's variables (paths like ``params/base/fc1/kernel``)."""
  source: str
  path: str
  imported: tuple[str, ...]
  initialised: tuple[str, ...]
  ignored: tuple[str, ...]
  imported_values: int = 0
  initialised_values: int = 0

  def __str__(self) -> str:
    def listing(items):
      shown = ", ".join(items[:_MAX_LISTED])
      return shown + (f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED
                      else "")
    lines = [f"imported {len(self.imported)} arrays ({self.imported_values:,} values) from "
             f"{self.source} file {self.path}"]
    if self.imported:
      lines.append(f"  imported under: {', '.join(_common_prefixes(self.imported))}")
    if self.initialised:
      lines.append(f"  freshly initialised ({len(self.initialised)} arrays, "
                   f"{self.initialised_values:,} values): {listing(self.initialised)}")
    else:
      lines.append("  freshly initialised: nothing")
    if self.ignored:
      lines.append(f"  ignored from the file ({len(self.ignored)}): {listing(self.ignored)}")
    return "\n".join(lines)


def _common_prefixes(paths) -> list[str]:
  """``params/base`` and ``batch_stats/base`` rather than 566 paths."""
  prefixes = []
  for p in paths:
    parts = p.split("/")
    prefix = "/".join(parts[:2] if len(parts) > 2 and parts[1] == "base" else parts[:1])
    if prefix not in prefixes:
      prefixes.append(prefix)
  return prefixes


# --------------------------------------------------------------------------- #
# Templates and assembly.


def _flatten(tree) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _unflatten(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


_TEMPLATES: dict = {}


def inception_template(convention: str, num_classes: Optional[int],
                       width_multiplier: float = 1.0) -> dict[str, tuple[int, ...]]:
  """Flat ``{"params/.../kernel": shape}`` of an InceptionV3's variables (traced, not run)."""
  key = (convention, num_classes, width_multiplier)
  if key not in _TEMPLATES:
    model = inception_v3.InceptionV3(num_classes=num_classes, convention=convention,
                                     width_multiplier=width_multiplier)
    size = inception_v3.MIN_INPUT_SIZE
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    _TEMPLATES[key] = {k: tuple(v.shape) for k, v in _flatten(flax.core.unfreeze(shapes)).items()}
  return _TEMPLATES[key]


# A converter turns the file's array into drig's layout (e.g. OIHW -> HWIO).
_Entry = tuple[str, Callable[[np.ndarray], np.ndarray]]


def _identity(a):
  return a


def _oihw_to_hwio(a):
  if a.ndim != 4:
    raise ValueError(f"expected a 4-D convolution weight, got shape {a.shape}")
  return a.transpose(2, 3, 1, 0)


def _transpose_2d(a):
  if a.ndim != 2:
    raise ValueError(f"expected a 2-D weight, got shape {a.shape}")
  return a.T


def _assemble(path: str, what: str, name_map: Mapping[str, _Entry],
              tensors: Mapping[str, np.ndarray], template: Mapping[str, tuple[int, ...]],
              ignored=()) -> dict:
  """Builds drig variables from ``tensors`` (file name -> array) through ``name_map``.

  Args:
    path: the file, for messages.
    what: a description of the file's contents, for messages.
    name_map: drig variable path -> (file tensor name, converter); must cover
      ``template``.
    tensors: every tensor in the file.
    template: drig variable path -> expected shape.
    ignored: file tensor names deliberately skipped.

  Returns:
    Nested {"params": ..., "batch_stats": ...} of float32 jax arrays.

  Raises:
    WeightImportError: listing missing, unexpected and shape-mismatched tensors.
  """
  if set(name_map) != set(template):  # the map is drig's own: a bug, not a bad file
    raise AssertionError(f"name map and template differ: {set(name_map) ^ set(template)}")
  missing, mismatched, flat = [], [], {}
  for target, expected in template.items():
    source_name, convert = name_map[target]
    if source_name not in tensors:
      missing.append(f"{source_name} (-> {target})")
      continue
    raw = np.asarray(tensors[source_name])
    try:
      value = convert(raw)
    except ValueError:
      value = raw
    if tuple(value.shape) != tuple(expected):
      mismatched.append(f"{source_name} {tuple(raw.shape)} (-> {target}, expected "
                        f"{tuple(expected)})")
      continue
    flat[target] = value
  used = {name_map[t][0] for t in template}
  unexpected = sorted(set(tensors) - used - set(ignored))
  if missing or mismatched or unexpected:
    raise WeightImportError(
        path, f"does not hold the weights of {what}; nothing was imported",
        missing=missing, unexpected=unexpected, mismatched=mismatched)
  return _unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def _unit_key(unit: tuple[str, ...]) -> str:
  return "/".join(unit)


# --------------------------------------------------------------------------- #
# Keras, legacy HDF5.


def _open_h5(path: str):
  import h5py  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise WeightImportError(path, "no such file")
  try:
    return h5py.File(path, "r")
  except OSError as e:
    raise WeightImportError(path, f"cannot be opened as an HDF5 file ({_describe_format(path)}; "
                            f"h5py: {e})") from e


def _describe_format(path: str) -> str:
  """A guess at what a file is, from its first bytes, for error messages."""
  try:
    with open(path, "rb") as f:
      head = f.read(16)
  except OSError as e:
    return f"unreadable: {e}"
  if head.startswith(b"\x89HDF"):
    return "an HDF5 file, possibly truncated"
  if head.startswith(b"PK"):
    return "a zip archive, e.g. a PyTorch .pth file: use source 'torchvision'"
  if head[:1] == b"\x80":
    return "a Python pickle, e.g. a legacy PyTorch file: use source 'torchvision'"
  if len(head) >= 9 and head[8:9] == b"{":
    return "a safetensors file: use source 'torchvision'"
  if not head:
    return "an empty file"
  return f"an unknown format starting with {head[:8]!r}"


def _h5_attr_list(group, name: str) -> Optional[list[str]]:
  """A string-list attribute, also when Keras split it into name0, name1, ..."""
  def decode(values):
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]
  if name in group.attrs:
    return decode(group.attrs[name])
  if f"{name}0" not in group.attrs:
    return None
  values, i = [], 0
  while f"{name}{i}" in group.attrs:
    values += decode(group.attrs[f"{name}{i}"])
    i += 1
  return values


def _suffix_number(name: str, base: str) -> Optional[int]:
  match = re.fullmatch(rf"{base}(?:_(\d+))?", name)
  if match is None:
    return None
  return int(match.group(1)) if match.group(1) else 0


def _read_keras_legacy(path: str) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
  """All weights of a legacy Keras HDF5 file: ({"group/weight": array}, {group: names})."""
  path = str(path)
  with _open_h5(path) as f:
    try:
      group = f["model_weights"] if "model_weights" in f else f
      layer_names = _h5_attr_list(group, "layer_names")
      if layer_names is None:
        if "layers" in group and "vars" in group:
          raise WeightImportError(path, "is a Keras 3 .weights.h5 file, not the legacy HDF5 "
                                  "layout: use source 'keras3' (load_keras3_weights)")
        raise WeightImportError(path, "has no 'layer_names' attribute: not a Keras HDF5 "
                                "weights file")
      tensors, groups = {}, {}
      for layer in layer_names:
        if layer not in group:
          raise WeightImportError(path, f"lists layer {layer!r} in 'layer_names' but has no "
                                  "such group (truncated or damaged file?)")
        weight_names = _h5_attr_list(group[layer], "weight_names") or []
        if weight_names:
          groups[layer] = weight_names
        for weight_name in weight_names:
          if weight_name not in group[layer]:
            raise WeightImportError(path, f"layer {layer!r} lists weight {weight_name!r} but "
                                    "has no such dataset (truncated or damaged file?)")
          tensors[f"{layer}/{_weight_field(weight_name)}"] = np.asarray(group[layer][weight_name])
    except (OSError, KeyError, RuntimeError) as e:
      raise WeightImportError(path, f"cannot be read: {e} (truncated or damaged file?)") from e
  return tensors, groups


def _weight_field(weight_name: str) -> str:
  """``conv2d_1/kernel:0`` -> ``kernel``."""
  return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _sorted_groups(groups, base: str) -> list[str]:
  numbered = [(n, g) for g in groups if (n := _suffix_number(g, base)) is not None]
  return [g for _, g in sorted(numbered)]


def _keras_unit_map(conv_names, bn_names) -> dict[str, _Entry]:
  """drig path -> Keras tensor for the 94 conv units, given their conv and BN names."""
  name_map = {}
  for unit, conv, bn in zip(inception_v3.CONV_UNITS, conv_names, bn_names):
    u = _unit_key(unit)
    name_map[f"params/{u}/conv/kernel"] = (f"{conv}/kernel", _identity)
    name_map[f"params/{u}/bn/bias"] = (f"{bn}/beta", _identity)
    name_map[f"batch_stats/{u}/bn/mean"] = (f"{bn}/moving_mean", _identity)
    name_map[f"batch_stats/{u}/bn/var"] = (f"{bn}/moving_variance", _identity)
  return name_map


def _check_unit_count(path, kind, found):
  n = len(inception_v3.CONV_UNITS)
  if len(found) != n:
    raise WeightImportError(path, f"has {len(found)} {kind} layers where Inception-v3 has {n}: "
                            "the weights of another architecture?")


def read_keras_h5(path: str) -> ImportedWeights:
  """Reads a legacy-layout Keras Inception-v3 HDF5 file (official ImageNet layout)."""
  path = str(path)
  tensors, groups = _read_keras_legacy(path)
  convs = _sorted_groups(groups, "conv2d")
  bns = _sorted_groups(groups, "batch_normalization")
  _check_unit_count(path, "conv2d", convs)
  _check_unit_count(path, "batch_normalization", bns)
  name_map = _keras_unit_map(convs, bns)
  num_classes = None
  if "predictions" in groups:
    num_classes = int(np.shape(tensors.get("predictions/kernel", np.zeros((0, 0))))[-1])
    name_map["params/fc/kernel"] = ("predictions/kernel", _identity)
    name_map["params/fc/bias"] = ("predictions/bias", _identity)
  template = inception_template("keras", num_classes)
  variables = _assemble(path, "Keras' InceptionV3", name_map, tensors, template)
  return ImportedWeights(variables, "keras_h5", path, "keras", num_classes)


# --------------------------------------------------------------------------- #
# Keras 3 .weights.h5.


def _read_keras3(path: str) -> dict[str, np.ndarray]:
  path = str(path)
  with _open_h5(path) as f:
    try:
      if "layers" not in f or _h5_attr_list(f, "layer_names") is not None:
        hint = (" It is a legacy Keras HDF5 file: use source 'keras_h5' (load_keras_h5)."
                if _h5_attr_list(f, "layer_names") is not None else "")
        raise WeightImportError(path, "has no 'layers' group: not a Keras 3 .weights.h5 file."
                                + hint)
      tensors = {}
      for key, layer in f["layers"].items():
        variables = layer.get("vars")
        if variables is None:
          continue
        for index, dataset in variables.items():
          tensors[f"layers/{key}/vars/{index}"] = np.asarray(dataset)
    except (OSError, KeyError, RuntimeError) as e:
      raise WeightImportError(path, f"cannot be read: {e} (truncated or damaged file?)") from e
  return tensors


def read_keras3(path: str) -> ImportedWeights:
  """Reads a Keras 3 ``.weights.h5`` file of ``keras.applications.InceptionV3``."""
  path = str(path)
  tensors = _read_keras3(path)
  def key(base, k):
    return f"layers/{base}" + (f"_{k}" if k else "")
  name_map = {}
  for unit, k in zip(inception_v3.CONV_UNITS, KERAS3_CONV_INDEX):
    u, conv, bn = _unit_key(unit), key("conv2d", k), key("batch_normalization", k)
    name_map[f"params/{u}/conv/kernel"] = (f"{conv}/vars/0", _identity)
    # BatchNormalization(scale=False) variables: beta, moving_mean, moving_variance.
    name_map[f"params/{u}/bn/bias"] = (f"{bn}/vars/0", _identity)
    name_map[f"batch_stats/{u}/bn/mean"] = (f"{bn}/vars/1", _identity)
    name_map[f"batch_stats/{u}/bn/var"] = (f"{bn}/vars/2", _identity)
  num_classes = None
  if "layers/dense/vars/0" in tensors:
    num_classes = int(np.shape(tensors["layers/dense/vars/0"])[-1])
    name_map["params/fc/kernel"] = ("layers/dense/vars/0", _identity)
    name_map["params/fc/bias"] = ("layers/dense/vars/1", _identity)
  template = inception_template("keras", num_classes)
  variables = _assemble(path, "Keras' InceptionV3", name_map, tensors, template)
  return ImportedWeights(variables, "keras3", path, "keras", num_classes)


# --------------------------------------------------------------------------- #
# torchvision.

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
      import ml_dtypes  # pylint: disable=g-import-not-at-top
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
                            f"looks like {_describe_format(path)}")
  try:
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
    u, p = _unit_key(unit), ".".join(unit)
    name_map[f"params/{u}/conv/kernel"] = (f"{p}.conv.weight", _oihw_to_hwio)
    name_map[f"params/{u}/bn/scale"] = (f"{p}.bn.weight", _identity)
    name_map[f"params/{u}/bn/bias"] = (f"{p}.bn.bias", _identity)
    name_map[f"batch_stats/{u}/bn/mean"] = (f"{p}.bn.running_mean", _identity)
    name_map[f"batch_stats/{u}/bn/var"] = (f"{p}.bn.running_var", _identity)
  num_classes = None
  if "fc.weight" in tensors:
    num_classes = int(np.shape(tensors["fc.weight"])[0])
    name_map["params/fc/kernel"] = ("fc.weight", _transpose_2d)
    name_map["params/fc/bias"] = ("fc.bias", _identity)
  # Deliberately not imported: the auxiliary classifier (training-time only in
  # torchvision, not built here) and BatchNorm's step counters.
  ignored = tuple(sorted(n for n in tensors
                         if n.startswith("AuxLogits.") or n.endswith(".num_batches_tracked")))
  template = inception_template("torchvision", num_classes)
  variables = _assemble(path, "torchvision's inception_v3", name_map, tensors, template,
                        ignored=ignored)
  return ImportedWeights(variables, "torchvision", path, "torchvision", num_classes, ignored)


# --------------------------------------------------------------------------- #
# drig checkpoints (orbax).


def save_variables(path: str, variables: Mapping[str, Any], *, overwrite: bool = False) -> None:
  """Writes ``{"params", "batch_stats"}`` as an orbax checkpoint directory at ``path``.

  ``load_drig_checkpoint(path)`` and ``--config ... init.source='drig'`` read it.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; choose another directory or overwrite it")
  tree = {"params": flax.core.unfreeze(variables["params"]),
          "batch_stats": flax.core.unfreeze(variables.get("batch_stats", {}))}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), tree, force=overwrite)
  checkpointer.wait_until_finished()
  checkpointer.close()


def _is_item_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "_METADATA"))


def resolve_checkpoint_dir(path: str, step: Optional[int] = None) -> str:
  """The orbax item directory for ``path``: an item, a step, or a manager root.

  A manager root (numbered step subdirectories) resolves to ``step``, by
  default the latest committed one; a step directory to its item (``state``,
  ``default``, or its only item).
  """
  path = os.path.abspath(str(path))
  if not os.path.isdir(path):
    raise WeightImportError(path, "no such checkpoint directory")
  if _is_item_dir(path):
    return path
  entries = sorted(os.listdir(path))
  steps = sorted(int(e) for e in entries
                 if e.isdigit() and os.path.isdir(os.path.join(path, e))
                 and not e.endswith(".orbax-checkpoint-tmp"))
  if steps:
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
      raise WeightImportError(path, f"has no step {chosen}; steps: {steps}")
    step_dir = os.path.join(path, str(chosen))
    # Steps are named by number, sometimes zero-padded; find the directory.
    for e in entries:
      if e.isdigit() and int(e) == chosen:
        step_dir = os.path.join(path, e)
    return resolve_checkpoint_dir(step_dir)
  items = [e for e in entries if _is_item_dir(os.path.join(path, e))]
  for preferred in ("state", "default"):
    if preferred in items:
      return os.path.join(path, preferred)
  if len(items) == 1:
    return os.path.join(path, items[0])
  raise WeightImportError(path, "is not a drig (orbax) checkpoint: no _METADATA, no numbered "
                          f"steps and no single item directory (found {entries[:10]})")


def read_drig_checkpoint(path: str, step: Optional[int] = None) -> ImportedWeights:
  """Reads params and batch_stats from a drig orbax checkpoint (see the module docstring)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  item = resolve_checkpoint_dir(path, step)
  from etils import epath  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  try:
    # The handler's metadata: the item's tree, without the step-level metadata
    # that a CheckpointManager item directory does not have.
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(item)).tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Restore onto one local device whatever the sharding at save time.
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), metadata)
    if not isinstance(abstract, Mapping) or "params" not in abstract:
      raise WeightImportError(item, "holds no 'params': not a drig checkpoint")
    restored = checkpointer.restore(item, abstract)
  except WeightImportError:
    raise
  except Exception as e:  # orbax/tensorstore raise many types for damaged files.
    raise WeightImportError(item, f"cannot be restored by orbax: {e}") from e
  finally:
    checkpointer.close()
  variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}
  return ImportedWeights(variables, "drig", item, None, None,
                         ignored=tuple(sorted(k for k in restored if k not in variables)))


# --------------------------------------------------------------------------- #
# Public entry points.


_READERS = {"keras_h5": read_keras_h5, "keras3": read_keras3, "torchvision": read_torchvision,
            "drig": read_drig_checkpoint}


def read_weights(source: str, path: str) -> ImportedWeights:
  """Reads weights of ``source`` (one of SOURCES) from ``path``."""
  if source not in _READERS:
    raise ValueError(f"unknown weight source {source!r}; use one of {SOURCES}")
  return _READERS[source](path)


def load_keras_h5(path: str) -> dict:
  """Variables of ``InceptionV3()`` (notop file) or ``InceptionV3(num_classes=1000)`` (with top)
  from a Keras legacy-HDF5 file, e.g. the official ImageNet weights."""
  return read_keras_h5(path).variables


def load_keras3_weights(path: str) -> dict:
  """Variables of the Keras-convention InceptionV3 from a Keras 3 ``.weights.h5`` file."""
  return read_keras3(path).variables


def load_torchvision(path: str) -> dict:
  """Variables of ``InceptionV3(convention="torchvision", num_classes=1000)`` (or without a top
  if the state dict has no ``fc``) from a ``.pth`` or safetensors state dict."""
  return read_torchvision(path).variables


def load_drig_checkpoint(path: str, step: Optional[int] = None) -> dict:
  """``{"params", "batch_stats"}`` from a drig orbax checkpoint directory."""
  return read_drig_checkpoint(path, step).variables


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _count(tree_flat: Mapping[str, Any], keys) -> int:
  return int(sum(np.prod(_shape(tree_flat[k]), dtype=np.int64) for k in keys))


def import_into(variables: Mapping[str, Any], weights: ImportedWeights, *,
                convention: Optional[str] = None) -> tuple[dict, ImportReport]:
  """Overwrites ``variables`` (a fresh init) with ``weights``; returns them and a report.

  ImageNet weights (keras_h5, keras3, torchvision) go into the Inception base:
  the whole model for a bare InceptionV3, ``base`` for a DRClassifier. Every
  base variable must come from the file (shapes checked; a width-scaled model
  does not fit full-size weights); a top in the file that the model lacks is
  ignored and reported; model variables outside the base stay freshly
  initialised and are reported. drig checkpoints must match ``variables``
  exactly.

  Args:
    variables: the model's freshly initialised {"params", "batch_stats"}.
    weights: from ``read_weights``.
    convention: the model's convention, checked against the file's if given.

  Returns:
    (new variables, ImportReport).

  Raises:
    WeightImportError: the file does not fit the model.
  """
  target = _flatten(flax.core.unfreeze(dict(variables)))
  source = _flatten(flax.core.unfreeze(weights.variables))
  ignored = list(weights.ignored)
  if weights.convention is not None and convention is not None and (
      weights.convention != convention):
    raise WeightImportError(weights.path, f"holds {weights.convention}-convention weights but the "
                            f"model uses convention={convention!r}; set the model's convention "
                            f"to {weights.convention!r}")
  if weights.source == "drig":
    prefix = ""
  else:
    prefix = "base/" if any(k.split("/")[1] == "base" for k in target) else ""
    for key in [k for k in source if k.split("/")[1] == "fc"]:
      if _with_prefix(key, prefix) not in target:
        ignored.append(key)  # the ImageNet top; the model has its own head
        del source[key]
  placed = {_with_prefix(k, prefix): v for k, v in source.items()}
  expected = {k: _shape(v) for k, v in target.items()
              if prefix == "" or k.split("/")[1] == prefix.rstrip("/")}
  missing = sorted(set(expected) - set(placed))
  unexpected = sorted(set(placed) - set(target))
  mismatched = sorted(f"{k} {_shape(placed[k])} (expected {expected[k]})"
                      for k in set(placed) & set(expected) if _shape(placed[k]) != expected[k])
  if missing or unexpected or mismatched:
    raise WeightImportError(weights.path, f"does not fit the model ({weights.source} weights; "
                            "a width-scaled model or another architecture?); nothing was imported",
                            missing=missing, unexpected=unexpected, mismatched=mismatched)
  new = dict(target)
  for k, v in placed.items():
    new[k] = jnp.asarray(v, dtype=target[k].dtype)
  imported = tuple(sorted(placed))
  initialised = tuple(sorted(set(target) - set(placed)))
  abstract = [k for k in initialised if isinstance(target[k], jax.ShapeDtypeStruct)]
  if abstract:  # a caller bug: those variables were expected to come from the file
    raise ValueError(f"variables neither initialised nor imported: {abstract[:_MAX_LISTED]}")
  report = ImportReport(source=weights.source, path=weights.path, imported=imported,
                        initialised=initialised, ignored=tuple(ignored),
                        imported_values=_count(target, imported),
                        initialised_values=_count(target, initialised))
  return _unflatten(new), report


def _with_prefix(key: str, prefix: str) -> str:
  collection, rest = key.split("/", 1)
  return f"{collection}/{prefix}{rest}"


def initialise_from(variables: Mapping[str, Any], *, source: str, path: str,
                    model_config=None) -> tuple[dict, ImportReport]:
  """The training entry point: ``import_into(variables, read_weights(source, path))``.

  Args:
    variables: the model's freshly initialised variables.
    source: one of SOURCES.
    path: the weight file or checkpoint directory.
    model_config: the model's config section (its ``convention`` is checked).

  Returns:
    (variables, ImportReport); ``str(report)`` says what was imported and what
    was freshly initialised.
  """
  if not path:
    raise WeightImportError("(no path)", f"init source {source!r} needs a weight file: set "
                            "config.init.path")
  convention = None if model_config is None else model_config.get("convention", None)
  return import_into(variables, read_weights(source, path), convention=convention)


# --------------------------------------------------------------------------- #
# Conversion (the import_weights binary).


def init_for_import(model, rng: jax.Array) -> dict:
  """Variables to pass to ``import_into``: abstract (shapes only) in the Inception
  base, which the import fills, and freshly initialised elsewhere (the head).

  Initialising the head alone (``start_layer="pooled"``) avoids compiling the
  random initialisers of the 94 base convolutions (tens of seconds on a 2-core
  CPU), which the import would overwrite anyway.
  """
  size = inception_v3.MIN_INPUT_SIZE
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  abstract = flax.core.unfreeze(jax.eval_shape(functools.partial(model.init, train=False),
                                               rng, images))
  if not any(k == "base" for k in abstract.get("params", {})):
    return abstract
  pooled_width = jax.eval_shape(
      functools.partial(model.apply, train=False, stop_layer=inception_v3.POOLED_LAYER),
      abstract, images).shape[-1]
  head = flax.core.unfreeze(jax.jit(functools.partial(
      model.init, train=False, start_layer=inception_v3.POOLED_LAYER))(
          rng, jnp.zeros((1, pooled_width), jnp.float32)))
  flat = _flatten(abstract)
  flat.update(_flatten(head))
  return _unflatten(flat)


def convert_weights(source: str, input_path: str, output_dir: str, *, model=None,
                    convention: Optional[str] = None, seed: int = 0,
                    overwrite: bool = False) -> ImportReport:
  """Reads weights and writes them as a drig checkpoint that training can start from.

  Args:
    source: one of SOURCES.
    input_path: the weight file (or checkpoint directory for "drig").
    output_dir: the orbax checkpoint directory to write (``save_variables``).
    model: None to write the file's own InceptionV3 variables; or a model
      (e.g. a DRClassifier) whose base takes the weights and whose other
      variables are freshly initialised from ``seed``.
    convention: the model's convention, checked against the file's.
    seed: PRNG seed of the fresh variables.
    overwrite: replace an existing ``output_dir``.

  Returns:
    The ImportReport.
  """
  weights = read_weights(source, input_path)
  if model is None:
    flat = _flatten(weights.variables)
    variables = weights.variables
    report = ImportReport(source=weights.source, path=weights.path, imported=tuple(sorted(flat)),
                          initialised=(), ignored=weights.ignored,
                          imported_values=_count(flat, flat))
  else:
    fresh = init_for_import(model, jax.random.key(seed))
    variables, report = import_into(fresh, weights, convention=convention)
  save_variables(output_dir, variables, overwrite=overwrite)
  return report
