r"""Batch attribution of a trained DR grader: the poster's figures, scores and experiments.

  python -m drig.analyze --config=configs/analyze.py:runlocal --workdir=workdirs/analysis
  python -m drig.analyze --config=configs/analyze.py --workdir=workdirs/analysis \
      --config.checkpoint=workdirs/base

Rerunning the same command skips finished shards. See docs/analysis.md.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from drig import runtime

try:  # --help prints this docstring: add the configs' ARGS tables
  import configs  # pylint: disable=g-import-not-at-top
  __doc__ += "\n" + configs.arguments_help("analyze") + "\n"
except ImportError:  # run from outside the repository, where configs/ is not importable
  pass

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Analysis config file[:ARG]; the ARGs are listed above.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for shards, figures and the report.")
_DISTRIBUTED = runtime.define_distributed_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup_process(_DISTRIBUTED.value)
  # After setup_process (XLA_FLAGS, jax.distributed), so no import can start a backend first.
  from drig.analysis import errors  # pylint: disable=g-import-not-at-top
  from drig.analysis import validation  # pylint: disable=g-import-not-at-top
  try:
    # Before the job's heavy imports (data sets, figures): a bad value fails in a second.
    validation.validate_config(_CONFIG.value)
    from drig.analysis import job  # pylint: disable=g-import-not-at-top
    result = job.run_analysis(_CONFIG.value, _WORKDIR.value)
  except errors.AnalysisError as e:
    sys.exit(f"drig.analyze: {type(e).__name__}: {' '.join(str(e).split())}")  # one line, status 1
  if result.report:
    print(f"Report:  {result.report['markdown']}\n         {result.report['html']}")
    print(f"Metrics: {result.report['metrics']}")
    for path in result.figures:
      print(f"Figure:  {path}")


if __name__ == "__main__":
  app.run(main)
