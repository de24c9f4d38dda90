r"""Generates the data set a config names and writes preview figures.

  python -m drig.prepare_data --config=configs/data.py:runlocal
  python -m drig.prepare_data --config=configs/base.py:runlocal --workdir=workdirs/data

Prints a summary (examples per split and grade, time, path, size on disk) and
writes ``preview_<split>.png`` (photographs, model inputs, mask outlines) into
``--workdir``. Data that are already prepared are reused.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from drig.data import datasets

try:  # --help prints this docstring: add the configs' ARGS tables
  import configs  # pylint: disable=g-import-not-at-top
  __doc__ += "\n" + configs.arguments_help("data") + "\n"
except ImportError:  # run from outside the repository, where configs/ is not importable
  pass

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/data.py",
    "Config file[:ARG] (reads config.data; a training config works too); ARGs above.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/data", "Where the preview PNGs go.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory; overrides config.data.data_dir.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  summary = datasets.prepare_data(_CONFIG.value, workdir=_WORKDIR.value, data_dir=_DATA_DIR.value)
  print(summary.format(), flush=True)


if __name__ == "__main__":
  app.run(main)
