"""Weight import: read a weight file of any source and put it into a model.

Sources (``SOURCES``), each read by its own module:

* ``keras_h5`` and ``keras3``: Keras' InceptionV3 files (``keras_weights``).
* ``torchvision``: torchvision's inception_v3 state dict, ``.pth`` or
  safetensors (``torch_weights``).
* ``drig``: drig's own orbax checkpoints (``checkpoints``).

``read_weights`` dispatches on the source; every reader checks the file
against an explicit name map (``weight_files``) and raises
``WeightImportError`` rather than leave a variable silently at its random
initialisation. ``initialise_from`` puts imported ImageNet weights into the
base of a freshly initialised ``DRClassifier`` and returns an ``ImportReport``
saying what was imported, what stays freshly initialised and what in the file
was ignored. ``convert_weights`` (``python -m drig.import_weights``) writes
them as a drig checkpoint.
"""

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from drig.models import checkpoints
from drig.models import inception_v3
from drig.models import keras_weights
from drig.models import torch_weights
from drig.models.weight_files import (MAX_LISTED, ImportedWeights, WeightImportError, flatten,
                                      unflatten)

SOURCES = ("keras_h5", "keras3", "torchvision", "drig")


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
      shown = ", ".join(items[:MAX_LISTED])
      return shown + (f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED
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
# Reading any source, and placing what was read into a model.


_READERS = {"keras_h5": keras_weights.read_keras_h5, "keras3": keras_weights.read_keras3,
            "torchvision": torch_weights.read_torchvision,
            "drig": checkpoints.read_drig_checkpoint}


def read_weights(source: str, path: str) -> ImportedWeights:
  """Reads weights of ``source`` (one of SOURCES) from ``path``."""
  if source not in _READERS:
    raise ValueError(f"unknown weight source {source!r}; use one of {SOURCES}")
  return _READERS[source](path)


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
  target = flatten(flax.core.unfreeze(dict(variables)))
  source = flatten(flax.core.unfreeze(weights.variables))
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
    raise ValueError(f"variables neither initialised nor imported: {abstract[:MAX_LISTED]}")
  report = ImportReport(source=weights.source, path=weights.path, imported=imported,
                        initialised=initialised, ignored=tuple(ignored),
                        imported_values=_count(target, imported),
                        initialised_values=_count(target, initialised))
  return unflatten(new), report


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
  flat = flatten(abstract)
  flat.update(flatten(head))
  return unflatten(flat)


def convert_weights(source: str, input_path: str, output_dir: str, *, model=None,
                    convention: Optional[str] = None, seed: int = 0,
                    overwrite: bool = False) -> ImportReport:
  """Reads weights and writes them as a drig checkpoint that training can start from.

  Args:
    source: one of SOURCES.
    input_path: the weight file (or checkpoint directory for "drig").
    output_dir: the orbax checkpoint directory to write
      (``checkpoints.save_variables``).
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
    flat = flatten(weights.variables)
    variables = weights.variables
    report = ImportReport(source=weights.source, path=weights.path, imported=tuple(sorted(flat)),
                          initialised=(), ignored=weights.ignored,
                          imported_values=_count(flat, flat))
  else:
    fresh = init_for_import(model, jax.random.key(seed))
    variables, report = import_into(fresh, weights, convention=convention)
  checkpoints.save_variables(output_dir, variables, overwrite=overwrite)
  return report
