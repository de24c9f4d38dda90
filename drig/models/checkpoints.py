"""drig's own checkpoints: orbax directories of ``{"params", "batch_stats"}``.

Written by ``save_variables`` (and so by ``python -m drig.import_weights``) or
by a training run's ``CheckpointManager``. ``read_drig_checkpoint`` accepts an
item directory, a step directory, or the manager's root (whose latest step is
taken, or the one asked for) or a training workdir (its ``checkpoints``
root), and restores onto one local device whatever the sharding at save time;
the item must hold a state with ``params`` (and ``batch_stats``). Problems
raise ``WeightImportError`` naming the directory; files that orbax cannot read
raise its subclass ``DamagedCheckpointError`` naming the step, in one line.

orbax is imported inside the functions that use it: it takes about 1.5 s to
import, which every ``import drig.models...`` would otherwise pay.
"""

import os
from typing import Any, Mapping, Optional

from etils import epath
import flax
import jax

from drig.models.weight_files import ImportedWeights, WeightImportError


def save_variables(path: str, variables: Mapping[str, Any], *, overwrite: bool = False) -> None:
  """Writes ``{"params", "batch_stats"}`` as an orbax checkpoint directory at ``path``.

  ``load_drig_checkpoint(path)`` and ``--config ... init.source='drig'`` read it.
  """
  # Lazy: orbax is slow to import (see the module docstring).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; choose another directory or overwrite it")
  tree = {"params": flax.core.unfreeze(variables["params"]),
          "batch_stats": flax.core.unfreeze(variables.get("batch_stats", {}))}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), tree, force=overwrite)
  checkpointer.wait_until_finished()
  checkpointer.close()


# The longest reason quoted from orbax/TensorStore, whose messages run to pages.
_MAX_REASON = 300


class DamagedCheckpointError(WeightImportError):
  """A checkpoint's files cannot be read (truncated, missing or garbled)."""

  def __init__(self, path: str, step: Optional[int], reason: str):
    self.step = step
    self.reason = reason
    at = f"step {step} " if step is not None else ""
    super().__init__(path, f"checkpoint {at}is damaged and cannot be read: {reason}")


def one_line_reason(error: BaseException) -> str:
  """The first line of ``error``'s message with its type, at most _MAX_REASON characters."""
  lines = str(error).strip().splitlines()
  # TensorStore appends its whole spec after this phrase, on the same line.
  first = lines[0].split(" See full TensorStore details")[0].strip() if lines else ""
  text = f"{type(error).__name__}: {first}" if first else type(error).__name__
  return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


def step_of(item_dir: str) -> Optional[int]:
  """The step of a manager's item or step directory (``.../<step>/default``), or None."""
  for name in (os.path.basename(item_dir), os.path.basename(os.path.dirname(item_dir))):
    if name.isdigit():
      return int(name)
  return None


def _is_item_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "_METADATA"))


def resolve_checkpoint_dir(path: str, step: Optional[int] = None) -> str:
  """The orbax item directory for ``path``: an item, a step, or a manager root.

  A manager root (numbered step subdirectories) resolves to ``step``, by
  default the latest committed one; a step directory to its item (``state``,
  ``default``, or its only item); a training workdir (with ``config.json``
  and ``checkpoints/``) to its manager root's.
  """
  path = os.path.abspath(str(path))
  if not os.path.isdir(path):
    raise WeightImportError(path, "no such checkpoint directory")
  if _is_item_dir(path):
    return path
  if (os.path.isfile(os.path.join(path, "config.json"))
      and os.path.isdir(os.path.join(path, "checkpoints"))):
    return resolve_checkpoint_dir(os.path.join(path, "checkpoints"), step)
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
  # Lazy: orbax is slow to import (see the module docstring).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  item = resolve_checkpoint_dir(path, step)
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
    raise DamagedCheckpointError(item, step_of(item), one_line_reason(e)) from e
  finally:
    checkpointer.close()
  variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}
  return ImportedWeights(variables, "drig", item, None, None,
                         ignored=tuple(sorted(k for k in restored if k not in variables)))


def load_drig_checkpoint(path: str, step: Optional[int] = None) -> dict:
  """``{"params", "batch_stats"}`` from a drig orbax checkpoint directory."""
  return read_drig_checkpoint(path, step).variables

