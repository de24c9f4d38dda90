r"""Preparing data: generate the synthetic fundus data set and preview it.

  python -m drig.prepare_data --config=configs/data.py:runlocal
  python -m drig.prepare_data --config=configs/data.py          # full size
  python -m drig.prepare_data --config=configs/data.py:tiny     # seconds

``drig.prepare_data`` reads only ``config.data`` (and ``num_workers``,
``num_preview``), so a training config works too:
``--config=configs/base.py:runlocal`` prepares exactly the data it trains on.

Arguments (``--config=configs/data.py:ARG``): the ``ARGS`` table below, which
``python -m drig.prepare_data --help`` lists. Expected runtimes: ``runlocal``
about 1.5 min on the 2-core development CPU (what remains of the demo's 8 min
besides training and analysis); ``tiny`` seconds; the full size renders twice
the examples at four times the pixels (not timed).

``config.data.overrides`` changes a synthetic variant without a new named
config (e.g. ``--config.data.overrides.num_train=2000``); the data then go to
``synthetic_fundus/<config>-<hash of the overrides>``.
"""

import ml_collections
from ml_collections import config_dict

import configs

ARGS = {
    "": "synthetic_fundus/default: 10k/2k/2k examples, 512 px photographs, 256 px inputs",
    "runlocal": "synthetic_fundus/runlocal: 5k/1k/1k, 256 px photographs, 128 px inputs "
                "(what configs/base.py:runlocal trains on)",
    "tiny": "synthetic_fundus/tiny: 40/15/15 at 80 px, for tests; seconds",
}


def get_config(arg=None):
  arg = configs.resolve_arg("configs/data.py", ARGS, arg)
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_fundus"
  config.data.builder_config = "default"
  config.data.data_dir = "data/tensorflow_datasets"  # relative to the working directory
  config.data.manual_dir = ""                        # real data sets only
  config.data.image_size = 256                       # checked against the prepared data
  config.data.overrides = ml_collections.ConfigDict()
  config.data.overrides.num_train = config_dict.placeholder(int)
  config.data.overrides.num_validation = config_dict.placeholder(int)
  config.data.overrides.num_test = config_dict.placeholder(int)
  config.data.overrides.seed = config_dict.placeholder(int)
  config.data.overrides.class_weights = config_dict.placeholder(tuple)
  config.data.overrides.min_per_class = config_dict.placeholder(int)

  config.num_workers = -1  # generation processes; -1: one per CPU, 0: in-process
  config.num_preview = 8   # examples in the preview figure

  if arg == "runlocal":
    config.data.builder_config = "runlocal"
    config.data.image_size = 128
  elif arg == "tiny":
    config.data.builder_config = "tiny"
    config.data.image_size = 80
    config.num_preview = 5
  return config
