"""A training workdir's guards: one config per workdir, one writer at a time.

* ``check_config`` compares a run's config with the ``config.json`` stored
  by an earlier run in the workdir before anything is written: a resumed run
  may change only ``RESUMABLE_FIELDS``; any other difference raises
  ``ConfigMismatchError`` listing the fields (``config_differences``).
* ``write_config`` then writes ``config.json`` atomically.
* ``WorkdirLock`` is held by the process that writes the workdir: the file
  ``<workdir>/LOCK`` holds its pid and host, is created atomically and removed
  on exit (normally, on an exception or on SIGTERM). A lock left by a dead
  process on this host is taken over with a warning; one from another host
  is never guessed stale.
"""

import datetime
import json
import os
import signal
import socket
import threading
from typing import Mapping, Optional

from absl import logging

from drig import files
from drig.config_diff import config_differences

CONFIG_FILE = "config.json"
LOCK_FILE = "LOCK"

# Fields a resumed run may change: they decide how often the run logs,
# evaluates and checkpoints, how many checkpoints it keeps and where it reads
# the (same) data from, never what the model or its training is. Everything
# else (the model, data set, schedule, optimiser, seed, init) must match, or
# the checkpoints would not fit the config or the resumed run would differ
# from the run its checkpoints come from.
# Fields added to the training config after runs were written without them: the value a
# config.json without the field stands for (the one that trains as the run did).
ADDED_FIELDS = {"data.shuffle_labels": False}

RESUMABLE_FIELDS = (
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_batch_size",
    "data.data_dir",
    "data.manual_dir",
    "data.prefetch",
    "data.input_workers",
    # Evaluation settings change what is measured, not the weights being trained.
    "evaluation.checkpoint",
    "evaluation.bootstrap_resamples",
    "evaluation.bootstrap_seed",
    "evaluation.confidence",
    "evaluation.test_time_augmentation",
    # What TensorBoard shows beside the scalars.
    "tensorboard.hparams",
    "tensorboard.input_images",
    "tensorboard.confusion_matrix",
    "tensorboard.map_steps",
    "tensorboard.map_grade",
)


class WorkdirError(RuntimeError):
  """A training workdir that this run must not write; says why and what to do."""


class ConfigMismatchError(WorkdirError):
  """The workdir holds a run of another config."""


class WorkdirLockedError(WorkdirError):
  """Another process holds the workdir's lock."""


def config_record(config) -> dict:
  """``config`` (a ConfigDict) as the nested dict ``config.json`` holds."""
  return json.loads(config.to_json_best_effort())


def check_config(workdir: str, config) -> None:
  """Raises unless ``workdir`` is new or its ``config.json`` matches ``config``.

  Writes nothing.

  Raises:
    ConfigMismatchError: naming the workdir and each field outside
      ``RESUMABLE_FIELDS`` that differs, and how to start a new run.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigMismatchError(f"{path} cannot be read ({e}); this workdir's config is unknown. "
                              "Use a new --workdir, or delete this one to restart.") from e
  diffs = config_differences(stored, config_record(config), ignore=RESUMABLE_FIELDS,
                             absent=ADDED_FIELDS)
  if diffs:
    shown = "; ".join(diffs[:12]) + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
    raise ConfigMismatchError(
        f"{workdir} holds a run of another config ({path}); differences: {shown}. Only "
        f"{', '.join(RESUMABLE_FIELDS)} may change when resuming. To train this config, use a "
        "new --workdir (or delete this one to restart it).")


def write_config(workdir: str, config) -> None:
  """Writes ``config`` as ``<workdir>/config.json``, atomically."""
  files.atomic_write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


class WorkdirLock:
  """``<workdir>/LOCK``, held while a context (``with WorkdirLock(w):``) runs.

  Entering raises ``WorkdirLockedError`` naming the holder (pid, host, start
  time) when another live process holds the lock. While held, SIGTERM (if it
  had its default action) raises ``SystemExit`` so that the lock is released
  and the caller's ``finally`` blocks run.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._held = False
    self._previous_sigterm = None

  def _describe(self, holder: Mapping) -> str:
    return (f"process {holder.get('pid')} on host {holder.get('host')!r} "
            f"(since {holder.get('started', '?')})")

  def _read(self) -> Optional[dict]:
    try:
      with open(self.path, encoding="utf-8") as f:
        holder = json.load(f)
      return holder if isinstance(holder, dict) else None
    except FileNotFoundError:
      return {}
    except (OSError, ValueError):
      return None

  def _try_create(self) -> bool:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(record, f)
    return True

  def acquire(self) -> None:
    """Takes the lock, or raises ``WorkdirLockedError`` naming its holder."""
    os.makedirs(self.workdir, exist_ok=True)
    # Twice at most: once, then once more after removing a stale lock.
    for _ in range(2):
      if self._try_create():
        self._held = True
        self._catch_sigterm()
        return
      holder = self._read()
      if holder == {}:  # released meanwhile
        continue
      if holder is None:
        raise WorkdirLockedError(
            f"{self.workdir} is locked by {self.path}, which cannot be read (written by a "
            "process being started, or damaged). If no drig.train runs on this workdir, "
            f"remove {self.path} and rerun.")
      pid, host = holder.get("pid"), holder.get("host")
      if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        logging.warning("%s: taking over the stale lock of %s, which no longer runs",
                        self.workdir, self._describe(holder))
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      if host == socket.gethostname():
        raise WorkdirLockedError(
            f"{self.workdir} is in use by {self._describe(holder)}: one drig.train per workdir. "
            f"Wait for it to finish or stop it (kill {pid}), or use another --workdir.")
      raise WorkdirLockedError(
          f"{self.workdir} is in use by {self._describe(holder)}: one drig.train per workdir. "
          f"If that process no longer runs (e.g. the host is gone), remove {self.path} and "
          "rerun; otherwise use another --workdir.")
    raise WorkdirLockedError(f"{self.workdir}: could not take {self.path}; another process "
                             "keeps taking it. Use another --workdir.")

  def release(self) -> None:
    """Removes the lock if this object holds it."""
    if not self._held:
      return
    self._held = False
    self._restore_sigterm()
    holder = self._read()
    # Never remove a lock that another process took over meanwhile.
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
      os.remove(self.path)

  def _catch_sigterm(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
      return

    def on_sigterm(signum, frame):
      del frame
      raise SystemExit(128 + signum)

    self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

  def _restore_sigterm(self) -> None:
    if self._previous_sigterm is not None:
      signal.signal(signal.SIGTERM, self._previous_sigterm)
      self._previous_sigterm = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
