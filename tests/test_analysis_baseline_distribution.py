"""Expected gradients and GradientShap in the analysis job: baselines drawn from a data split.

One tiny job (the tiny synthetic data set, the tiny model with random weights,
2 images, K = 2 baselines) is run once per module; its shards are checked
against drig.attribution.methods.attribute called directly with baselines read
from the data set independently of the job, and against the expected-gradients
completeness identity E[sum IG] = F(x) - E[F(b)].
"""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers  # tests/helpers.py

from configs import analyze as analyze_config
from configs import base as base_config
from drig import grading
from drig import parallel
from drig import prng
from drig.analysis import attributor
from drig.analysis import errors
from drig.analysis import images as images_lib
from drig.analysis import job
from drig.analysis import model_source
from drig.analysis import quantity_specs
from drig.analysis import shards as shards_lib
from drig.analysis import validation
from drig.attribution import baselines as baselines_lib
from drig.attribution import gradients
from drig.attribution import methods
from drig.data import datasets

DISTRIBUTION_METHODS = ("expected_gradients", "gradient_shap")
COUNT = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The tiny data set, a training workdir (random weights, its data set's directory) and one
  finished analysis job."""
  root = tmp_path_factory.mktemp("baseline_distribution")
  train_dir = helpers.write_tiny_analysis_run(root)
  train_config = base_config.get_config("tiny")
  train_config.data.data_dir = str(root / "tfds")
  builder = datasets.load_builder_from_config(train_config.data)
  config = _config(str(train_dir))
  workdir = str(root / "analysis")
  result = job.run_analysis(config, workdir)
  data = shards_lib.load_shards(sorted(glob.glob(os.path.join(workdir, "shards", "*.npz"))))
  return {"config": config, "builder": builder, "result": result, "data": data,
          "train_dir": train_dir, "root": root}


def _config(train_dir, **overrides):
  config = analyze_config.get_config("tiny")
  config.checkpoint = train_dir
  defaults = {
      "num_images": 2, "shard_size": 2, "quantities": ("predicted",),
      "methods": ("integrated_gradients",) + DISTRIBUTION_METHODS,
      "baseline_distribution.count": COUNT, "baseline_distribution.seed": 5,
      "storage_dtype": "float32", "figures.num_images": 1, "randomisation.num_images": 0,
      "counterfactuals.max_images": 0, "linearity.num_images": 0}
  return helpers.apply_overrides(config, {**defaults, **overrides})


def _split_images(builder, split, indices):
  source = builder.as_data_source(split)
  return np.stack([np.asarray(source[int(i)]["image"], np.uint8) for i in indices])


def test_shards_hold_maps_equal_to_the_registry_with_the_same_baselines_and_key(run):
  config, data = run["config"], run["data"]
  # The baselines, read here from the data set: the documented draw from the train split.
  train_size = len(run["builder"].as_data_source("train"))
  key = prng.named_key(jax.random.PRNGKey(5), "baseline_distribution")
  baseline_indices = np.asarray(jax.random.permutation(key, train_size)[:COUNT])
  # Placed as the job places them (weights, baselines and grades replicated, images split
  # over the local devices), so the registry's calls reuse the programs the job compiled.
  mesh = parallel.local_mesh()
  baselines = parallel.replicate(
      grading.to_model_input(_split_images(run["builder"], "train", baseline_indices)), mesh)
  x = parallel.shard_batch(
      grading.to_model_input(_split_images(run["builder"], "test", data["index"])), mesh)
  loaded = model_source.load_model(config)
  logits = model_source.ModelLogits(loaded.model, parallel.replicate(loaded.variables, mesh))
  quantity = quantity_specs.make_quantity(quantity_specs.parse_quantity("predicted"), logits,
                                          parallel.replicate(jnp.asarray(data["prediction"]),
                                                             mesh))
  attribution_key = attributor.attribution_key(config.seed, data["index"])
  for name in DISTRIBUTION_METHODS:
    stored = shards_lib.decode_map(data, shards_lib.method_map_key(name, "predicted"))
    expected = np.asarray(methods.attribute(
        name, quantity=quantity, x=x, baseline=baselines_lib.BaselineDistribution(baselines),
        key=attribution_key, options=attributor.job_method_options(config, name)))
    assert stored.shape == x.shape and np.abs(expected).max() > 0
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(),
                               err_msg=name)
  # Completeness: the stored gap is sum(EG) - (F(x) - mean_k F(b_k)), which is the
  # mean of the K integrated-gradients gaps that the IG engine reports.
  # Each baseline's path at the job's config.steps (4 in the tiny config), not the default 50.
  options = attributor.job_method_options(config, "expected_gradients")
  assert options["steps"] == config.steps == 4
  _, ig_gaps = gradients.expected_gradients(
      quantity, x, baselines, **methods.method_options("expected_gradients", options))
  np.testing.assert_allclose(data["map_gap.expected_gradients.predicted"], ig_gaps,
                             atol=1e-5 + 1e-3 * np.abs(np.asarray(ig_gaps)).max())
  forward = jax.jit(lambda fn, z: fn(z))
  probabilities = np.asarray(jax.nn.softmax(forward(logits, baselines), axis=-1), np.float64)
  f_x = np.asarray(forward(quantity, x), np.float64)
  mean_f_b = probabilities[:, data["prediction"]].mean(axis=0)  # [N]: each image's grade
  shap = shards_lib.decode_map(data, "map.gradient_shap.predicted")
  np.testing.assert_allclose(data["map_gap.gradient_shap.predicted"],
                             shap.reshape(len(f_x), -1).sum(axis=1) - (f_x - mean_f_b),
                             atol=1e-5)


def test_maps_are_scored_for_localisation_and_the_report_names_split_and_k(run):
  data, result = run["data"], run["result"]
  methods_scored = [str(m) for m in data["localization_methods"]]
  for name in DISTRIBUTION_METHODS:
    assert name in methods_scored and name in result.metrics["localization"]
  markdown = open(result.report["markdown"], encoding="utf-8").read()
  assert f"K = {COUNT} images of split 'train' (seed 5)" in markdown


def test_baseline_draws_are_distinct_deterministic_and_follow_the_seed():
  a = images_lib.baseline_distribution_indices(0, 40, 16)
  np.testing.assert_array_equal(a, images_lib.baseline_distribution_indices(0, 40, 16))
  assert len(set(a.tolist())) == 16 and a.min() >= 0 and a.max() < 40
  assert not np.array_equal(a, images_lib.baseline_distribution_indices(1, 40, 16))
  # More baselines extend the same draw: K = 8 is the first 8 of K = 16.
  np.testing.assert_array_equal(images_lib.baseline_distribution_indices(0, 40, 8), a[:8])


@pytest.mark.parametrize("field, value, message", [
    ("baseline_distribution.count", 0, r"config\.baseline_distribution\.count=0 .*>= 1"),
    ("baseline_distribution.split", "", r"config\.baseline_distribution\.split=''.*split name"),
])
def test_bad_distribution_settings_are_named(run, field, value, message):
  config = _config(run["train_dir"], **{field: value})
  with pytest.raises(errors.AnalysisError, match=message):
    validation.validate_config(config)
  # Without a distribution method the settings are not used, so not checked.
  validation.validate_config(_config(run["train_dir"], methods=("integrated_gradients",),
                                     **{field: value}))


@pytest.mark.parametrize("field, value, message", [
    ("baseline_distribution.split", "training",
     r"config\.baseline_distribution\.split='training'.*no such split; splits: "),
    ("baseline_distribution.count", 1000,
     r"config\.baseline_distribution\.count=1000 is more than the \d+ images of split 'train'"),
])
def test_unusable_split_fails_before_the_workdir_is_written(run, tmp_path, field, value,
                                                           message):
  config = _config(run["train_dir"], **{field: value})
  with pytest.raises(errors.AnalysisError, match=message):
    job.run_analysis(config, str(tmp_path / "analysis"))
  assert not os.path.exists(tmp_path / "analysis" / job.CONFIG_FILE)


def test_attributor_without_baseline_images_names_the_method(run):
  config = run["config"]
  loaded = model_source.load_model(config)
  shard = attributor.ShardAttributor(config, loaded, jax.sharding.Mesh(
      np.array(jax.local_devices()[:1]), ("batch",)))
  images = np.zeros((2, 80, 80, 3), np.uint8)
  with pytest.raises(errors.AnalysisError, match="'expected_gradients' averages over a "
                     "distribution of baselines: pass baseline_images"):
    shard(images, np.arange(2), np.ones((2, 80, 80), bool), None)
