r"""Trains the DR grader.

  python -m drig.train --config=configs/base.py:runlocal --workdir=workdirs/runlocal

Rerunning the same command resumes from the last checkpoint in --workdir. A
workdir refuses a second concurrent run and a changed config (only the fields
in drig.training.workdir.RESUMABLE_FIELDS may change), with a one-line error.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from drig import runtime
from drig.training import workdir as workdir_lib

try:  # --help prints this docstring: add the configs' ARGS tables
  import configs  # pylint: disable=g-import-not-at-top
  __doc__ += "\n" + configs.arguments_help("base", "kaggle") + "\n"
except ImportError:  # run from outside the repository, where configs/ is not importable
  pass

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file[:ARG]; the files and their ARGs are listed above.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_DISTRIBUTED = runtime.define_distributed_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup_process(_DISTRIBUTED.value)
  # After setup_process (XLA_FLAGS, jax.distributed), so no import can start a backend first.
  from drig.training import trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except workdir_lib.WorkdirError as e:
    # The message says what to do; a traceback would only bury it.
    raise SystemExit(f"drig.train: error: {e}") from None


if __name__ == "__main__":
  app.run(main)
