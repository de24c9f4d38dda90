"""TensorBoard events of training and analysis, read back with TensorBoard's own reader."""

import functools
import json
import os

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

import helpers  # tests/helpers.py

from configs import base as base_config
from drig import attribution
from drig import config_diff
from drig import grading
from drig.data import datasets
from drig.models import runs
from drig.training import evaluation
from drig.training import metric_writer as metric_writer_lib
from drig.training import summaries
from drig.training import trainer
from drig.training import workdir as workdir_lib

# A few steps: evaluations at 2 and 4, the test split after.
OVERRIDES = {"schedule.steps": (2, 1, 1), "eval_every": 2, "checkpoint_every": 2,
             "tensorboard.input_images": 6, "tensorboard.map_steps": 4,
             "tensorboard.map_grade": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 4 steps and its TensorBoard events."""
  root = tmp_path_factory.mktemp("tensorboard")
  config = base_config.get_config("tiny")
  config.data.data_dir = str(root / "tfds")
  config = helpers.apply_overrides(config, OVERRIDES)
  datasets.load_builder_from_config(config.data)
  workdir = str(root / "train")
  trainer.train_and_evaluate(config, workdir)
  return config, workdir, helpers.tensorboard_events(os.path.join(workdir, "tensorboard"))


def test_training_writes_hparams_of_the_whole_config(trained):
  config, workdir, events = trained
  content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
  start = hparams_metadata.parse_session_start_info_plugin_data(
      content[hparams_metadata.SESSION_START_INFO_TAG])
  experiment = hparams_metadata.parse_experiment_plugin_data(
      content[hparams_metadata.EXPERIMENT_TAG])
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    stored = dict(config_diff.flat_items(json.load(f)))
  assert set(start.hparams) == set(stored) == {h.name for h in experiment.hparam_infos}
  assert start.hparams["seed"].number_value == config.seed
  assert start.hparams["data.image_size"].number_value == config.data.image_size
  assert start.hparams["optimizer.name"].string_value == config.optimizer.name
  assert start.hparams["data.augment.flip"].bool_value is True
  assert json.loads(start.hparams["schedule.steps"].string_value) == [2, 1, 1]
  assert "val/quadratic_kappa" in {m.name.tag for m in experiment.metric_infos}


def test_training_writes_inputs_confusion_matrices_and_maps(trained):
  config, workdir, events = trained
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"),
                                               encoding="utf-8")]
  eval_steps = [r["step"] for r in records if "val/quadratic_kappa" in r]
  assert eval_steps == [2, 4]
  tags = events.Tags()[event_accumulator.IMAGES]

  inputs = events.Images("train/input_images")
  assert [e.step for e in inputs] == [0]
  # 6 images: 4 columns of 200 px, 2 rows of 200 px plus a 40 px title band.
  assert helpers.decode_image_event(inputs[0]).shape[:2] == (480, 800)

  matrices = events.Images("val/confusion_matrix")
  assert [e.step for e in matrices] == eval_steps
  for event in matrices:
    pixels = helpers.decode_image_event(event)
    assert pixels.shape[:2] == (400, 400) and pixels.std() > 10
  assert len(events.Images("test/confusion_matrix")) == 1

  map_tags = [t for t in tags if t.startswith("val/attribution_map/image_")]
  assert len(map_tags) == 1
  index = int(map_tags[0].rsplit("_", 1)[1])
  source = trainer.load_sources(config.data, prepare=False)["validation"]
  labels = [int(source[i]["label"]) for i in range(len(source))]
  assert index == (labels.index(2) if 2 in labels else int(np.argmax(labels)))
  maps = events.Images(map_tags[0])
  assert [e.step for e in maps] == eval_steps
  for event in maps:
    assert helpers.decode_image_event(event).shape[:2] == (240, 600)  # 3 panels of 200 px under a 40 px title


def test_map_attribution_is_ig_of_the_evaluations_predicted_grade(trained):
  config, workdir, _ = trained
  run = runs.load_run(workdir, "latest")
  source = trainer.load_sources(config.data, prepare=False)["validation"]
  image = source[0]["image"]
  attributions, probabilities = jax.jit(functools.partial(
      summaries.predicted_grade_attribution, model=run.model, steps=16))(run.variables, image)
  expected = np.asarray(evaluation.predict_step(run.variables, image[None], model=run.model))[0]
  np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
  # The reference: IG of the probability of the grade the evaluation predicts, chosen
  # outside the program; another grade's IG differs (the choice matters).
  x = grading.to_model_input(image[None])
  logits_fn = jax.tree_util.Partial(functools.partial(run.model.apply, train=False),
                                    run.variables)

  def reference(grade):
    return np.asarray(attribution.integrated_gradients(
        attribution.probability_of_grade(logits_fn, grade), x,
        attribution.half_gray_baseline(x), steps=16)[0][0])

  predicted = int(np.argmax(expected))
  ours = reference(predicted)
  scale = np.abs(ours).max()
  np.testing.assert_allclose(attributions, ours, atol=1e-4 * scale, rtol=1e-3)
  other = reference((predicted + 1) % 5)
  assert np.abs(np.asarray(attributions) - other).max() > 0.1 * scale


def test_writer_rejects_what_is_not_an_image(tmp_path):
  writer = metric_writer_lib.MetricWriter(str(tmp_path))
  with pytest.raises(ValueError, match="not PNG data"):
    writer.write_image(0, "x", b"GIF89a not a png at all, just bytes")
  with pytest.raises(ValueError, match="image: expected"):
    writer.write_image(0, "x", np.zeros((4, 4, 2)))
  writer.close()
  disabled = metric_writer_lib.MetricWriter(str(tmp_path / "other"), enabled=False)
  disabled.write_image(0, "x", np.zeros((4, 4, 3)))
  disabled.write_hparams({"a": 1})
  assert not os.path.exists(tmp_path / "other")


def test_tensorboard_settings_may_change_on_resume(tmp_path):
  config = base_config.get_config("tiny")
  workdir_lib.write_config(str(tmp_path), config)
  changed = helpers.apply_overrides(base_config.get_config("tiny"), {
      "tensorboard.map_steps": 16, "tensorboard.input_images": 0, "tensorboard.hparams": False,
      "tensorboard.confusion_matrix": False, "tensorboard.map_grade": 1})
  workdir_lib.check_config(str(tmp_path), changed)
  with pytest.raises(workdir_lib.ConfigMismatchError, match="seed"):
    workdir_lib.check_config(str(tmp_path), helpers.apply_overrides(
        base_config.get_config("tiny"), {"tensorboard.map_steps": 16, "seed": 1}))


def test_a_run_written_before_a_field_existed_resumes_with_its_neutral_value(tmp_path):
  stored = json.loads(base_config.get_config("tiny").to_json_best_effort())
  del stored["data"]["shuffle_labels"]  # as a config.json written before the field
  (tmp_path / "config.json").write_text(json.dumps(stored))
  workdir_lib.check_config(str(tmp_path), base_config.get_config("tiny"))
  with pytest.raises(workdir_lib.ConfigMismatchError, match="data.shuffle_labels"):
    workdir_lib.check_config(str(tmp_path), base_config.get_config("tiny_shuffled_labels"))
