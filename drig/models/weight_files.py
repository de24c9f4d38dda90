"""What every weight-file reader shares: its result, its error and the name-map assembly.

Every name map is explicit: each drig variable comes from one named tensor of
the file. ``assemble`` checks a file's tensors against the shapes of the
InceptionV3 they should fill (``inception_template``) and raises
``WeightImportError`` listing the missing, unexpected and shape-mismatched
tensors and naming the file, so nothing is silently left at its random
initialisation. The readers are ``keras_weights``, ``torch_weights`` and
``checkpoints``; ``importer`` puts what they read into a model.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from drig.models import inception_v3

# Items listed in an error message or report before "... and N more".
MAX_LISTED = 12


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
        shown = ", ".join(items[:MAX_LISTED])
        more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
        lines.append(f"  {title} ({len(items)}): {shown}{more}")
    super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class ImportedWeights:
  """Variables read from a file, with what they fit.

  Attributes:
    variables: {"params": ..., "batch_stats": ...} nested dicts of jax arrays.
    source: one of ``importer.SOURCES``.
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


# --------------------------------------------------------------------------- #
# Templates and assembly.


def flatten(tree) -> dict[str, Any]:
  """``{"params/base/fc1/kernel": array}`` from nested variables."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of ``flatten``."""
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
    _TEMPLATES[key] = {k: tuple(v.shape) for k, v in flatten(flax.core.unfreeze(shapes)).items()}
  return _TEMPLATES[key]


# A converter turns the file's array into drig's layout (e.g. OIHW -> HWIO).
Entry = tuple[str, Callable[[np.ndarray], np.ndarray]]


def identity(a):
  return a


def oihw_to_hwio(a):
  if a.ndim != 4:
    raise ValueError(f"expected a 4-D convolution weight, got shape {a.shape}")
  return a.transpose(2, 3, 1, 0)


def transpose_2d(a):
  if a.ndim != 2:
    raise ValueError(f"expected a 2-D weight, got shape {a.shape}")
  return a.T


def assemble(path: str, what: str, name_map: Mapping[str, Entry],
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
  return unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def unit_key(unit: tuple[str, ...]) -> str:
  """drig's path of a conv unit of ``inception_v3.CONV_UNITS``, e.g. ``Mixed_5b/branch1x1``."""
  return "/".join(unit)


def describe_format(path: str) -> str:
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

