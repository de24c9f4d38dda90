"""Adebayo et al.'s data-randomisation check: shuffled training labels and the report section."""

import dataclasses
import json
import os
import types

import numpy as np
import pytest

import helpers  # tests/helpers.py

from configs import analyze as analyze_config
from configs import base as base_config
from drig import input_pipeline
from drig import parallel
from drig.analysis import attributor as attributor_lib
from drig.analysis import data_randomisation
from drig.analysis import model_source
from drig.analysis import randomisation
from drig.analysis.report_document import Report
from drig.data import synthetic_fundus
from drig.input import labels as labels_lib
from drig.input.errors import InputPipelineError
from drig.models import checkpoints
from drig.training import trainer

STEP = 3


class IndexedSource:
  """A random-access source whose image encodes its index (pixel [0, 0]) beside its label."""

  def __init__(self, labels):
    self.labels = np.asarray(labels, np.int64)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    image = np.zeros((4, 4, 3), np.uint8)
    image[0, 0] = (i % 256, i // 256, 0)
    return {"image": image, "label": int(self.labels[i])}


def _true_labels():
  # 240 examples: every grade present, imbalanced like DR data.
  return np.random.default_rng(5).permutation(np.repeat(np.arange(5), [120, 30, 40, 20, 30]))


def _train_config(seed=0, shuffle=True):
  config = base_config.get_config("tiny_shuffled_labels" if shuffle else "tiny")
  config.seed = seed
  return config


def test_shuffled_train_labels_are_a_seeded_permutation():
  true = _true_labels()
  source = IndexedSource(true)
  shuffled = trainer.training_labels(_train_config(), source)
  # A permutation: every grade keeps its count, so the balanced sampler still works.
  np.testing.assert_array_equal(np.bincount(shuffled, minlength=5), np.bincount(true, minlength=5))
  # Unrelated to the images: about 1 - sum(p_c^2) = 66% of the examples change grade.
  assert np.mean(shuffled != true) > 0.5
  np.testing.assert_array_equal(trainer.training_labels(_train_config(), source), shuffled)
  assert np.mean(trainer.training_labels(_train_config(seed=1), source) != shuffled) > 0.5
  np.testing.assert_array_equal(trainer.training_labels(_train_config(shuffle=False), source),
                                true)
  with pytest.raises(InputPipelineError, match="1-D integer"):
    labels_lib.permuted_labels(np.zeros((3, 2), np.int64), None)


def test_training_batches_carry_the_shuffled_labels_and_evaluation_the_true_ones():
  true = _true_labels()
  source = IndexedSource(true)
  config = _train_config()
  shuffled = trainer.training_labels(config, source)
  # No augmentation: the images keep the index they encode.
  batches = input_pipeline.train_iterator(source, batch_size=16, seed=0, labels=shuffled,
                                          proportions=config.data.class_proportions,
                                          process_index=0, process_count=1)
  for _ in range(4):
    batch = next(batches)
    index = batch["image"][:, 0, 0, 0].astype(int) + 256 * batch["image"][:, 0, 0, 1].astype(int)
    np.testing.assert_array_equal(batch["label"], shuffled[index])
    # Balanced by the labels it trains on: 8:1:2:1:4 of the shuffled grades.
    np.testing.assert_array_equal(np.bincount(batch["label"], minlength=5), [8, 1, 2, 1, 4])
  batches.close()
  # Validation and test read their records' own labels.
  evaluated = np.concatenate([b["label"][b["mask"]] for b in input_pipeline.eval_batches(
      source, 64, process_index=0, process_count=1)])
  np.testing.assert_array_equal(evaluated, true)


# --------------------------------------------------------------------------- #
# The report section, on the tiny model.


def _write_run(path, variables, *, model_overrides=None, image_size=None, shuffled=False,
               validation_kappa=None):
  """A drig.train-like workdir: config.json, one checkpoint at STEP, final_metrics.json."""
  config = base_config.get_config("tiny_shuffled_labels" if shuffled else "tiny")
  for key, value in (model_overrides or {}).items():
    config.model[key] = value
  if image_size is not None:
    config.data.image_size = image_size
  os.makedirs(os.path.join(path, "checkpoints"))
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  checkpoints.save_variables(os.path.join(path, "checkpoints", str(STEP), "default"), variables)
  if validation_kappa is not None:
    with open(os.path.join(path, "final_metrics.json"), "w", encoding="utf-8") as f:
      json.dump({"step": STEP, "shuffled_train_labels": shuffled,
                 "validation": {"quadratic_kappa": validation_kappa}}, f)
  return str(path)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
  """The tiny model's first shard (2 synthetic fundus images) as the analysis job stores it."""
  root = tmp_path_factory.mktemp("data_randomisation")
  variables, size = helpers.write_trained_run(str(root))  # numpy-filled tiny weights
  trained_dir = _write_run(root / "trained", variables, validation_kappa=0.7)
  config = analyze_config.get_config("tiny")
  config.checkpoint = trained_dir
  config.randomisation.num_images = 2
  # One quantity: the check attributes the first only, and each one compiles its programs.
  config.quantities = ("predicted",)
  loaded = model_source.load_model(config)
  pixels = np.stack([np.asarray(synthetic_fundus.render_fundus(seed, grade, size=size)[0])
                     for seed, grade in ((0, 3), (1, 4))])
  indices = np.arange(config.shard_size)
  data = attributor_lib.ShardAttributor(config, loaded, parallel.local_mesh())(
      pixels, indices, None, None)
  data["index"] = indices
  return types.SimpleNamespace(root=root, config=config, loaded=loaded, variables=variables,
                               pixels=pixels, data=data, size=size)


def test_same_weights_correlate_perfectly_and_random_weights_do_not(analysed):
  config, loaded = analysed.config, analysed.loaded
  names = ("integrated_gradients", "saliency", "input_x_gradient", "smoothgrad")
  same = data_randomisation.data_randomisation_correlations(config, analysed.data,
                                                            analysed.pixels, loaded)
  assert same.maps == names and same.quantity == "predicted"
  assert same.correlations.shape == (4, 2)
  # The same attribution path and random keys: the maps are identical.
  np.testing.assert_allclose(same.correlations, 1.0, atol=1e-6)
  randomised = randomisation.randomise_variables(
      loaded.model, loaded.variables, 1, input_shape=(1, analysed.size, analysed.size, 3))
  other = data_randomisation.data_randomisation_correlations(
      config, analysed.data, analysed.pixels, dataclasses.replace(loaded, variables=randomised))
  means = other.mean()
  assert np.isfinite(other.correlations).all()
  # Measured: pixel IG, saliency and input x gradient near 0, SmoothGrad about 0.2.
  assert (means < 0.5).all(), means


def test_report_section_reads_the_shuffled_run_and_its_kappa(analysed):
  other_dir = _write_run(analysed.root / "shuffled", analysed.variables, shuffled=True,
                         validation_kappa=0.02)

  class Images:
    def read(self, index):
      return types.SimpleNamespace(image=analysed.pixels[index])

  config = analysed.config.copy_and_resolve_references()
  config.randomisation.data_checkpoint = other_dir
  report, metrics = Report("test", str(analysed.root)), {}
  data_randomisation.report_section(config, analysed.data, Images(), analysed.loaded, report,
                                    metrics)
  summary = metrics["data_randomisation"]
  assert summary["step"] == STEP and summary["shuffled_labels"] is True
  assert summary["validation_kappa"] == pytest.approx(0.02)
  assert summary["trained_validation_kappa"] == pytest.approx(0.7)
  assert summary["images"] == 2 and len(summary["maps"]) == 4
  # The same weights under another name: every map correlates perfectly.
  for values in summary["maps"].values():
    assert values["mean"] == pytest.approx(1.0, abs=1e-6) and len(values["per_image"]) == 2
  # Off by default: no section, no metrics.
  metrics = {}
  data_randomisation.report_section(analysed.config, analysed.data, Images(), analysed.loaded,
                                    report, metrics)
  assert "data_randomisation" not in metrics


def test_missing_or_different_runs_raise_clear_errors(analysed):
  root, loaded, size = analysed.root, analysed.loaded, analysed.size
  error = data_randomisation.DataRandomisationError
  missing = str(root / "never_trained")
  with pytest.raises(error, match=r"data_checkpoint=.*never_trained.*no such directory"):
    data_randomisation.load_shuffled_model(missing, loaded, size)
  os.makedirs(root / "empty")
  with pytest.raises(error, match=r"data_checkpoint=.*empty.*config.json not found"):
    data_randomisation.load_shuffled_model(str(root / "empty"), loaded, size)
  wider = _write_run(root / "wider", analysed.variables,
                     model_overrides={"fc_widths": (32, 8)})
  with pytest.raises(error, match=r"wider/config.json describes another architecture.*"
                                  r"fc_widths: \[16, 8\] -> \[32, 8\]"):
    data_randomisation.load_shuffled_model(wider, loaded, size)
  larger = _write_run(root / "larger", analysed.variables, image_size=96)
  with pytest.raises(error, match=r"larger/config.json trained at data.image_size 96, but the "
                                  r"analysed images are 80 px"):
    data_randomisation.load_shuffled_model(larger, loaded, size)
