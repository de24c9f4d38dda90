"""Process set-up shared by drig's binaries (never run on import).

``setup_process`` is the one place that touches global state: logging, XLA
flags, the multi-controller runtime. Library functions never do; notebooks
that import drig are left exactly as they were.
"""

import ctypes
import ctypes.util
import logging as python_logging
import os
import sys

from absl import flags
from absl import logging

# XLA:CPU flags drig sets by default in its binaries, unless XLA_FLAGS already
# names them. See benchmarks/bench_attribution.py for the measurements.
DEFAULT_CPU_XLA_FLAGS = ()


def _explicit_coordinator(env) -> dict:
  """jax.distributed.initialize arguments named by DRIG_* or JAX_* variables, if any."""
  for prefix in ("DRIG_", "JAX_"):
    address = env.get(prefix + "COORDINATOR_ADDRESS")
    if address:
      kwargs = {"coordinator_address": address}
      for name in ("num_processes", "process_id"):
        value = env.get(prefix + name.upper())
        # Absent: JAX takes it from the cluster's environment (Slurm, TPU), or says it is missing.
        if value is not None:
          kwargs[name] = int(value)
      return kwargs
  return {}


def multihost_requested(mode: str = "auto", env=None) -> bool:
  """Whether ``setup_process(mode)`` calls ``jax.distributed.initialize()``.

  Args:
    mode: ``yes``, ``no`` or ``auto``: several Slurm tasks (``srun``), an
      explicit coordinator (``DRIG_COORDINATOR_ADDRESS`` or
      ``JAX_COORDINATOR_ADDRESS``) or a TPU pod slice listing several workers
      in ``TPU_WORKER_HOSTNAMES``.
    env: the environment to read; default ``os.environ``.
  """
  if mode in ("yes", "true", "1"):
    return True
  if mode in ("no", "false", "0"):
    return False
  if mode != "auto":
    raise ValueError(f"--distributed must be auto, yes or no; got {mode!r}")
  env = os.environ if env is None else env
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
    return True
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("DRIG_COORDINATOR_ADDRESS"):
    return True
  # TPU pod slices: every worker sees TPU_WORKER_HOSTNAMES with several hosts.
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


class _QuietLibraries:
  """A logging filter that drops INFO records from chatty libraries (orbax logs
  a dozen lines per checkpoint), keeping their warnings and errors."""

  PREFIXES = ("orbax", "tensorflow_datasets", "etils")

  def filter(self, record) -> bool:
    if record.levelno >= 30:  # WARNING
      return True
    name = record.pathname.replace(os.sep, "/")
    return not any(f"/{p}/" in name for p in self.PREFIXES)


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse instead of handing it back to the kernel.

  By default glibc returns large freed buffers to the kernel, so a process that
  decodes one photograph after another maps fresh pages, and takes a page fault on
  each, for every image: about 900-1,100 faults and 2 of 22 ms per 3888x2592 JPEG
  in a data-set generation worker (``tests/test_eyepacs.py`` counts them). Meant
  for processes that repeat the same work, such as drig's generation workers; the
  memory stays with the process until it exits. Process-wide: never called on import.

  Returns:
    True once set; False where the C library has no ``mallopt`` (not glibc).
  """
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
  # Some glibc versions cap the mmap threshold at 32 MiB (HEAP_MAX_SIZE / 2).
  mmap_set = mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 1 << 25)
  return bool(mmap_set) and bool(mallopt(m_trim_threshold, 1 << 30))


def setup_process(distributed: str = "auto") -> None:
  """Sets XLA flags and starts JAX's multi-controller runtime when launched on several hosts.

  Must run before the first JAX computation. ``distributed``: ``auto`` detects
  Slurm (``srun`` with several tasks), TPU pod slices and an explicit
  coordinator (``DRIG_COORDINATOR_ADDRESS`` or ``JAX_COORDINATOR_ADDRESS``, with
  ``*_NUM_PROCESSES`` and ``*_PROCESS_ID`` of the same prefix), see
  ``multihost_requested``; ``yes`` always calls ``jax.distributed.initialize()``;
  ``no`` never does.
  """
  logging.get_absl_handler().addFilter(_QuietLibraries())
  python_logging.getLogger().addFilter(_QuietLibraries())
  flags = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in DEFAULT_CPU_XLA_FLAGS if f.split("=")[0] not in flags]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([flags] + extra).strip()
  # Imported here, not at the top: data-generation workers import this module for
  # keep_freed_memory and never use JAX.
  import jax  # pylint: disable=g-import-not-at-top
  if multihost_requested(distributed):
    # Without an explicit coordinator, JAX reads Slurm's or the TPU slice's environment.
    jax.distributed.initialize(**_explicit_coordinator(os.environ))
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)


def define_distributed_flag():
  """The binaries' --distributed flag (absl), for `setup_process`.

  Registered under the calling binary, so that its --help lists the flag.
  """
  caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
  return flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                           "Call jax.distributed.initialize() (auto: when launched on several "
                           "hosts by Slurm, a TPU pod or JAX_COORDINATOR_ADDRESS).",
                           module_name=sys.argv[0] if caller == "__main__" else caller)
