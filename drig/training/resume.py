"""Resuming from the newest checkpoint that can be read.

``restore_latest_intact`` tries a run's kept checkpoints newest first. A
checkpoint that cannot be read (a truncated data file, a garbled
``_METADATA``) is reported in one line (step, path, reason); once an older
intact step is restored, each damaged step directory is renamed
``<step>.damaged-<time>`` beside the others (kept for inspection; orbax lists
only numbered directories, so the manager no longer sees it). When no step
can be read, nothing is renamed and ``NoIntactCheckpointError`` lists the
directories to remove.
"""

import os
from typing import Any, Callable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils

from drig import files
from drig.models import checkpoints as checkpoint_files
from drig.training import workdir as workdir_lib


class NoIntactCheckpointError(workdir_lib.WorkdirError):
  """Every kept checkpoint of the workdir is damaged."""


def _step_dir(directory: str, step: int) -> str:
  for name in os.listdir(directory):
    if name.isdigit() and int(name) == step:
      return os.path.join(directory, name)
  return os.path.join(directory, str(step))


def restore_latest_intact(make_manager: Callable[[], Any],
                          restore: Callable[[Any, int], Any], *,
                          is_writer: bool) -> tuple[Any, Optional[Any], Optional[int]]:
  """Restores the newest readable checkpoint of the manager ``make_manager`` opens.

  Args:
    make_manager: opens the run's orbax ``CheckpointManager``.
    restore: ``restore(manager, step)`` -> the restored state.
    is_writer: whether this process renames damaged directories (host 0).

  Returns:
    ``(manager, state, step)``: a manager that lists no damaged step, and
    the restored state and its step, or ``(manager, None, None)`` when the
    run has no checkpoint yet. The caller closes the manager.

  Raises:
    NoIntactCheckpointError: checkpoints exist but none can be read; the
      message lists the directories to remove to start afresh.
  """
  manager = make_manager()
  directory = str(manager.directory)
  damaged = []
  state, restored_step = None, None
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      step_dir = _step_dir(directory, step)
      try:
        state = restore(manager, step)
      except Exception as e:  # orbax/TensorStore raise many types for damaged files.
        reason = checkpoint_files.one_line_reason(e)
        logging.error("checkpoint step %d at %s cannot be read: %s", step, step_dir, reason)
        damaged.append(step_dir)
        continue
      restored_step = step
      break
    if damaged and restored_step is None:
      raise NoIntactCheckpointError(
          f"no checkpoint in {directory} can be read (damaged: {', '.join(damaged)}). Remove "
          f"these directories to start the run again from step 0, or use a new --workdir.")
  except BaseException:
    manager.close()
    raise
  if damaged:
    # A new manager: the old one still lists the renamed steps.
    manager.close()
    if is_writer:
      for step_dir in damaged:
        logging.warning("moved the damaged checkpoint %s aside to %s; resuming from step %d",
                        step_dir, files.move_aside(step_dir), restored_step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("drig:damaged_checkpoints_moved")
    manager = make_manager()
  return manager, state, restored_step
