"""The imagenet_h5 transfer config end to end: Keras h5 -> importer -> training.

Keras cannot build a width-scaled Inception-v3, so the test writes the tiny
model's randomised weights itself, in the layout of Keras' official ImageNet
files (tests/test_importer.py proves that layout against Keras): one
``conv2d_<i>`` and ``batch_normalization_<i>`` group per conv unit, numbered
in ``inception_v3.CONV_UNITS`` order, with ``layer_names`` and
``weight_names`` attributes. The tiny variant keeps the tiny config's shapes
and schedule, so its programs are the ones tests/test_train.py compiles.
"""

import json

import h5py
import numpy as np
import pytest

import helpers  # tests/helpers.py

from configs import base as base_config
from drig.data import datasets
from drig.models import checkpoints
from drig.models import inception_v3
from drig.models import weight_files
from drig.training import trainer


def write_keras_h5(path, width_multiplier, seed=0):
  """A randomised legacy-layout Keras h5 of a width-scaled Inception-v3 base (no top).

  Returns {drig variable path: array} of what was written, e.g.
  ``params/base/Conv2d_1a_3x3/conv/kernel``.
  """
  template = weight_files.inception_template("keras", None, width_multiplier)
  rng = np.random.default_rng(seed)
  expected, layer_names, groups = {}, [], []
  for i, unit in enumerate(inception_v3.CONV_UNITS, start=1):
    key = weight_files.unit_key(unit)
    kernel_shape = template[f"params/{key}/conv/kernel"]
    channels = kernel_shape[-1]
    values = {
        "kernel": rng.normal(0, np.sqrt(2 / np.prod(kernel_shape[:-1])), kernel_shape),
        "beta": rng.normal(0, 0.1, channels),
        "moving_mean": rng.normal(0, 0.1, channels),
        "moving_variance": rng.uniform(0.5, 1.5, channels),
    }
    values = {k: v.astype(np.float32) for k, v in values.items()}
    expected[f"params/base/{key}/conv/kernel"] = values["kernel"]
    expected[f"params/base/{key}/bn/bias"] = values["beta"]
    expected[f"batch_stats/base/{key}/bn/mean"] = values["moving_mean"]
    expected[f"batch_stats/base/{key}/bn/var"] = values["moving_variance"]
    groups.append((f"conv2d_{i}", {"kernel": values["kernel"]}))
    groups.append((f"batch_normalization_{i}", {k: values[k] for k in
                                                ("beta", "moving_mean", "moving_variance")}))
    layer_names += [f"conv2d_{i}", f"batch_normalization_{i}", f"activation_{i}"]
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([n.encode() for n in ["input_1"] + layer_names])
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.1.5"
    f.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S")
    for name, weights in groups:
      group = f.create_group(name)
      names = [f"{name}/{w}:0" for w in weights]
      group.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
      for weight_name, value in zip(names, weights.values()):
        group.create_dataset(weight_name, data=value)
    for name in layer_names:
      if name.startswith("activation_"):
        f.create_group(name).attrs["weight_names"] = np.array([], dtype="S")
  return expected


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("transfer")
  config = base_config.get_config("imagenet_h5_tiny")
  config.data.data_dir = str(root / "tfds")
  datasets.load_builder_from_config(config.data)
  expected = write_keras_h5(str(root / "tiny_notop.h5"), config.model.width_multiplier)
  config = helpers.apply_overrides(config, {
      "init.path": str(root / "tiny_notop.h5"), "checkpoint_every": 1, "keep_checkpoints": 10,
      "evaluation.bootstrap_resamples": 20})
  result = trainer.train_and_evaluate(config, str(root / "train"))
  return root, config, expected, result


def test_imagenet_h5_config_is_the_full_model_from_keras_weights():
  config = base_config.get_config("imagenet_h5")
  assert (config.init.source, config.init.path) == ("keras_h5", base_config.IMAGENET_H5_PATH)
  assert config.model.width_multiplier == 1.0 and config.data.image_size == 256
  assert config.data.builder_config == "default"
  assert tuple(config.schedule.steps) == base_config.POSTER_STEPS
  tiny = base_config.get_config("imagenet_h5_tiny")
  assert tiny.init.source == "keras_h5" and tiny.model == base_config.get_config("tiny").model


def test_missing_h5_is_a_clear_error(tmp_path):
  config = base_config.get_config("imagenet_h5")
  config.init.path = str(tmp_path / "absent.h5")
  with pytest.raises(FileNotFoundError, match=r"config\.init\.path=.*absent\.h5.*keras-applications"):
    trainer.check_inputs(config)
  with pytest.raises(FileNotFoundError, match=r"config\.init\.path=''"):
    trainer.check_inputs(base_config.get_config("imagenet_h5_tiny"))


@pytest.mark.slow
def test_training_starts_from_the_imported_weights(transfer_run):
  root, config, expected, result = transfer_run
  report = (root / "train" / "init_report.txt").read_text()
  assert "keras_h5" in report and "tiny_notop.h5" in report
  first = helpers.flatten(checkpoints.load_drig_checkpoint(str(root / "train" / "checkpoints"), 1))
  last = helpers.flatten(checkpoints.load_drig_checkpoint(str(root / "train" / "checkpoints"),
                                                          sum(config.schedule.steps)))
  # Adam's first update moves each parameter by at most the learning rate
  # (m / sqrt(v) = g / |g|), so after one step every imported parameter is
  # within 1e-3 of the file's value; a random initialisation is not (kernels
  # of scale 0.1-1, independent of the file's).
  learning_rate = config.schedule.learning_rates[0]
  params = [k for k in expected if k.startswith("params/")]
  assert len(params) == 2 * len(inception_v3.CONV_UNITS)
  for key in params:
    np.testing.assert_allclose(first[key], expected[key], rtol=0, atol=learning_rate * 1.001,
                               err_msg=key)
  # BatchNorm's running variances start from the file's: after one step of momentum
  # 0.99, var = 0.99 var_file + 0.01 var_batch >= 0.99 var_file (a fresh start, var 1,
  # would fail wherever the file's exceeds 1.0101, about half of the channels).
  variances = [k for k in expected if k.endswith("/bn/var")]
  for key in variances:
    assert (first[key] >= 0.99 * expected[key] * (1 - 1e-6)).all(), key
  # Training then moves on from them.
  moved = max(np.abs(last[k] - expected[k]).max() for k in params)
  assert moved > learning_rate
  final = json.loads((root / "train" / "final_metrics.json").read_text())
  assert final["step"] == sum(config.schedule.steps) and final["test"]["num_examples"] == 15
