"""Keras' Inception-v3 weight files: the legacy HDF5 layout and Keras 3 ``.weights.h5``.

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

Both give the variables of a Keras-convention ``InceptionV3`` (with the
ImageNet top when the file has one).
"""

import os
import re
from typing import Optional

import h5py
import numpy as np

from drig.models import inception_v3
from drig.models.weight_files import (Entry, ImportedWeights, WeightImportError, assemble,
                                      describe_format, identity, inception_template, unit_key)

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


# --------------------------------------------------------------------------- #
# Keras, legacy HDF5.


def _open_h5(path: str):
  if not os.path.exists(path):
    raise WeightImportError(path, "no such file")
  try:
    return h5py.File(path, "r")
  except OSError as e:
    raise WeightImportError(path, f"cannot be opened as an HDF5 file ({describe_format(path)}; "
                            f"h5py: {e})") from e


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


def _keras_unit_map(conv_names, bn_names) -> dict[str, Entry]:
  """drig path -> Keras tensor for the 94 conv units, given their conv and BN names."""
  name_map = {}
  for unit, conv, bn in zip(inception_v3.CONV_UNITS, conv_names, bn_names):
    u = unit_key(unit)
    name_map[f"params/{u}/conv/kernel"] = (f"{conv}/kernel", identity)
    name_map[f"params/{u}/bn/bias"] = (f"{bn}/beta", identity)
    name_map[f"batch_stats/{u}/bn/mean"] = (f"{bn}/moving_mean", identity)
    name_map[f"batch_stats/{u}/bn/var"] = (f"{bn}/moving_variance", identity)
  return name_map


def _check_unit_count(path, kind, found):
  n = len(inception_v3.CONV_UNITS)
  if len(found) != n:
    raise WeightImportError(path, f"has {len(found)} {kind} layers where Inception-v3 has {n}: "
                            "the weights of another architecture?")


def _stem_width_multiplier(tensors, convs) -> float:
  """The width multiplier of a file's network, from its first convolution's filters.

  1.0 for Keras' own files; a file of a width-scaled drig model (e.g. the tiny
  one that the transfer tests write) has round(32 x multiplier) stem filters.
  The other layers' shapes are then checked against that width's template.
  """
  filters = 32  # Conv2d_1a_3x3's, in the full-width network
  kernel = tensors.get(f"{convs[0]}/kernel")
  if kernel is None or np.ndim(kernel) != 4 or np.shape(kernel)[-1] == filters:
    return 1.0
  return np.shape(kernel)[-1] / filters


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
    name_map["params/fc/kernel"] = ("predictions/kernel", identity)
    name_map["params/fc/bias"] = ("predictions/bias", identity)
  template = inception_template("keras", num_classes, _stem_width_multiplier(tensors, convs))
  variables = assemble(path, "Keras' InceptionV3", name_map, tensors, template)
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
    u, conv, bn = unit_key(unit), key("conv2d", k), key("batch_normalization", k)
    name_map[f"params/{u}/conv/kernel"] = (f"{conv}/vars/0", identity)
    # BatchNormalization(scale=False) variables: beta, moving_mean, moving_variance.
    name_map[f"params/{u}/bn/bias"] = (f"{bn}/vars/0", identity)
    name_map[f"batch_stats/{u}/bn/mean"] = (f"{bn}/vars/1", identity)
    name_map[f"batch_stats/{u}/bn/var"] = (f"{bn}/vars/2", identity)
  num_classes = None
  if "layers/dense/vars/0" in tensors:
    num_classes = int(np.shape(tensors["layers/dense/vars/0"])[-1])
    name_map["params/fc/kernel"] = ("layers/dense/vars/0", identity)
    name_map["params/fc/bias"] = ("layers/dense/vars/1", identity)
  template = inception_template("keras", num_classes)
  variables = assemble(path, "Keras' InceptionV3", name_map, tensors, template)
  return ImportedWeights(variables, "keras3", path, "keras", num_classes)


def load_keras_h5(path: str) -> dict:
  """Variables of ``InceptionV3()`` (notop file) or ``InceptionV3(num_classes=1000)`` (with top)
  from a Keras legacy-HDF5 file, e.g. the official ImageNet weights."""
  return read_keras_h5(path).variables


def load_keras3_weights(path: str) -> dict:
  """Variables of the Keras-convention InceptionV3 from a Keras 3 ``.weights.h5`` file."""
  return read_keras3(path).variables

