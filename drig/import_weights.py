r"""Converts Inception-v3 weights to a drig checkpoint that training can start from.

  python -m drig.import_weights --source=keras_h5 \
      --input=inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 --output=DIR
  python -m drig.import_weights --source=torchvision --input=inception_v3_google-0cc3c7bd.pth \
      --output=DIR --config=configs/model.py:torchvision

Sources: keras_h5 (Keras' legacy HDF5, e.g. the official ImageNet files),
keras3 (a Keras 3 ``.weights.h5``), torchvision (``.pth`` or safetensors state
dict), drig (a drig orbax checkpoint directory).

Without --config, DIR holds the file's own InceptionV3 variables (with the
ImageNet top if the file has one). With --config (any config with a ``model``
section, e.g. ``configs/model.py`` or ``configs/base.py``), DIR holds the
variables of that model: the Inception base from the file and everything else
(the DR classifier's head) freshly initialised from ``config.seed``. Train
from it with ``--config.init.source=drig --config.init.path=DIR``. The import
report (what was imported, initialised and ignored) is printed.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from drig.models import classifier
from drig.models import importer
from drig.models import weight_files

try:  # --help prints this docstring: add the configs' ARGS tables
  import configs  # pylint: disable=g-import-not-at-top
  __doc__ += "\n" + configs.arguments_help("model") + "\n"
except ImportError:  # run from outside the repository, where configs/ is not importable
  pass

_SOURCE = flags.DEFINE_enum("source", None, ["keras_h5", "keras3", "torchvision", "drig"],
                            "Format of --input.")
_INPUT = flags.DEFINE_string("input", None, "Weight file (or drig checkpoint directory).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory of the drig checkpoint to write.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Optional config file[:ARG] whose `model` section is the target model; ARGs above.",
    lock_config=True)
flags.mark_flags_as_required(["source", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every step of a save at INFO; the report below says what matters.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  model = None if config is None else classifier.build_model(config.model)
  try:
    report = importer.convert_weights(
        _SOURCE.value, _INPUT.value, _OUTPUT.value, model=model,
        convention=None if config is None else config.model.get("convention", None),
        seed=0 if config is None else config.get("seed", 0), overwrite=_OVERWRITE.value)
  except (weight_files.WeightImportError, FileExistsError) as e:
    print(f"import_weights: {e}", file=sys.stderr)
    sys.exit(1)
  print(report)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
