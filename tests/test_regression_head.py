"""The regression head: kappa-fitted thresholds, its grade probabilities, losses, end to end.

References: scikit-learn's quadratic kappa, a brute-force grid search over
threshold tuples, the adjacent-category model's closed form in float64, and
torch's smooth L1 loss.
"""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics
import torch

import helpers  # tests/helpers.py

from configs import analyze as analyze_config
from configs import base as base_config
from configs import model as model_config
from drig.analysis import job
from drig.attribution import quantities
from drig.data import datasets
from drig.models import classifier
from drig.models import runs
from drig.training import evaluation
from drig.training import losses
from drig.training import thresholds
from drig.training import trainer


def _noisy_scores(seed, n):
  """Grades with a grader's typical errors: regression to the mean plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.choice(5, size=n, p=[0.45, 0.1, 0.2, 0.1, 0.15])
  scores = 0.6 * labels + 0.5 + rng.normal(0, 0.45, n)
  return scores.astype(np.float32), labels


def test_kappa_matches_scikit_learn():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 60)
  predictions = np.stack([rng.integers(0, 5, 60), labels, np.clip(labels + 1, 0, 4),
                          np.zeros(60, int)])
  kappas = thresholds.quadratic_kappas(labels, predictions)
  for row, kappa in zip(predictions, kappas):
    expected = sk_metrics.cohen_kappa_score(labels, row, weights="quadratic", labels=range(5))
    assert kappa == pytest.approx(0.0 if np.isnan(expected) else expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_reaches_the_brute_force_optimum(seed):
  scores, labels = _noisy_scores(seed, 16)
  distinct = np.unique(scores.astype(np.float64))
  midpoints = (distinct[1:] + distinct[:-1]) / 2
  # Every non-decreasing 4-tuple of cut points (below all, between any two, above all).
  grid = np.concatenate([[distinct[0] - 1], midpoints, [distinct[-1] + 1]])
  tuples = np.array(list(itertools.combinations_with_replacement(grid, 4)))
  grades = (scores[None, :, None] > tuples[:, None, :]).sum(-1)
  # The vectorised kappa (checked against scikit-learn above) scores the whole grid.
  brute_force = thresholds.quadratic_kappas(labels, grades).max()
  fitted = thresholds.fit_thresholds(scores, labels)
  assert np.all(np.diff(fitted) >= 0)
  predicted = thresholds.grades_from_scores(scores, fitted)
  kappa = sk_metrics.cohen_kappa_score(labels, predicted, weights="quadratic", labels=range(5))
  assert kappa == pytest.approx(brute_force, abs=1e-12)
  start = sk_metrics.cohen_kappa_score(
      labels, thresholds.grades_from_scores(scores, thresholds.DEFAULT_THRESHOLDS),
      weights="quadratic", labels=range(5))
  assert kappa >= start
  # Deterministic, and padding (mask False) is ignored.
  padded = thresholds.fit_thresholds(np.concatenate([scores, [9.0, -9.0]]),
                                     np.concatenate([labels, [0, 4]]),
                                     np.concatenate([np.ones(16, bool), [False, False]]))
  np.testing.assert_array_equal(padded, fitted)


def test_fit_is_a_coordinate_optimum_on_larger_data():
  scores, labels = _noisy_scores(7, 400)
  fitted = thresholds.fit_thresholds(scores, labels)
  best = thresholds.quadratic_kappas(labels, thresholds.grades_from_scores(scores, fitted)[None])
  grid = np.linspace(scores.min() - 0.1, scores.max() + 0.1, 301)
  for k in range(4):
    low = fitted[k - 1] if k else -np.inf
    high = fitted[k + 1] if k < 3 else np.inf
    trial = np.repeat(fitted[None], grid.size, 0)
    trial[:, k] = grid
    allowed = (grid >= low) & (grid <= high)
    kappas = thresholds.quadratic_kappas(
        labels, (scores[None, :, None] > trial[:, None, :]).sum(-1))
    assert kappas[allowed].max() <= best[0] + 1e-12


def test_fit_rejects_bad_input():
  with pytest.raises(ValueError, match="labels"):
    thresholds.fit_thresholds([0.1, 0.2], [0, 5])
  with pytest.raises(ValueError, match="finite"):
    thresholds.fit_thresholds([np.nan, 0.2], [0, 1])
  with pytest.raises(ValueError, match="non-decreasing"):
    thresholds.fit_thresholds([0.1], [0], initial=(1.5, 0.5, 2.5, 3.5))


def _adjacent_category(y, t, s):
  """P(grade = k) proportional to exp(sum_{j <= k} (y - t_j) / s), in float64."""
  y = np.asarray(y, np.float64)[:, None]
  logits = np.concatenate([np.zeros_like(y), np.cumsum((y - np.asarray(t)[None]) / s, -1)], -1)
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(-1, keepdims=True)


def test_probabilities_are_distributions_whose_argmax_is_the_thresholded_grade():
  rng = np.random.default_rng(0)
  # Unequal gaps, including a near-empty grade, where the cumulative-link view's argmax fails.
  for t in ([0.5, 1.5, 2.5, 3.5], [0.3, 0.35, 2.9, 3.0], [-1.0, 0.9, 1.0, 6.0]):
    y = rng.uniform(-2, 7, 500).astype(np.float32)
    y = y[np.min(np.abs(y[:, None] - np.array(t)[None]), 1) > 1e-3]  # no exact ties
    for s in (0.25, 1.0):
      p = np.exp(np.asarray(classifier.regression_log_probabilities(y, t, s), np.float64))
      assert (p >= 0).all()
      np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
      np.testing.assert_allclose(p, _adjacent_category(y, t, s), atol=1e-5)
      np.testing.assert_array_equal(p.argmax(-1), thresholds.grades_from_scores(y, t))
      # More grade, more probability on the higher grades: P(grade >= k) rises with y.
      order = np.argsort(y)
      above = 1.0 - np.cumsum(p[order], -1)[:, :-1]
      assert (np.diff(above, axis=0) >= -1e-6).all()


@pytest.fixture(scope="module")
def regression_model():
  config = model_config.get_model_config("tiny")
  config.head = "regression"
  model = classifier.build_model(config)
  # The head alone, from fc2's activation [N, 8]: the base adds only compilation here.
  features = jax.random.normal(jax.random.key(1), (6, 8))
  variables = model.init({"params": jax.random.key(0)}, features, start_layer="fc2")
  return model, variables, features


def test_head_outputs_grade_and_log_probabilities_around_stored_thresholds(regression_model):
  model, variables, features = regression_model
  assert model.layer_names()[-2:] == ("score", "logits")
  assert set(variables["params"]) == {"score"}
  np.testing.assert_array_equal(evaluation.thresholds_of(variables), [0.5, 1.5, 2.5, 3.5])
  fitted = evaluation.with_thresholds(variables, [0.2, 0.4, 1.0, 2.0])
  y = np.asarray(model.apply(fitted, features, start_layer="fc2", stop_layer="score"))[:, 0]
  head = variables["params"]["score"]
  np.testing.assert_allclose(y, np.asarray(features) @ np.asarray(head["kernel"])[:, 0]
                             + np.asarray(head["bias"])[0], rtol=1e-5, atol=1e-6)
  log_p = np.asarray(model.apply(fitted, features, start_layer="fc2"))
  np.testing.assert_allclose(np.exp(log_p), _adjacent_category(y, [0.2, 0.4, 1.0, 2.0], 0.25),
                             atol=1e-5)
  # The untouched variables still hold the initial thresholds.
  np.testing.assert_array_equal(evaluation.thresholds_of(variables), [0.5, 1.5, 2.5, 3.5])


def test_probability_of_grade_works_unchanged(regression_model):
  model, variables, features = regression_model
  logits_fn = lambda x: model.apply(variables, x, start_layer="fc2")
  read_out = jax.jit(lambda x: (jnp.exp(logits_fn(x)), jnp.stack(
      [quantities.probability_of_grade(logits_fn, g)(x) for g in range(5)], -1)))
  probabilities, values = read_out(features)
  np.testing.assert_allclose(np.asarray(values), np.asarray(probabilities), rtol=1e-5)
  gradient = jax.jit(jax.grad(
      lambda x: quantities.probability_of_grade(logits_fn, 4)(x).sum()))(features)
  assert np.isfinite(np.asarray(gradient)).all() and np.abs(np.asarray(gradient)).max() > 0


def test_grade_probabilities_fit_on_validation_and_reuse_on_test(regression_model):
  model, variables, _ = regression_model
  scores, labels = _noisy_scores(3, 200)
  mask = np.ones(200, bool)
  probabilities, fitted, extra = evaluation.grade_probabilities(
      model, variables, scores, labels, mask, fit_thresholds=True)
  expected = thresholds.fit_thresholds(scores, labels)
  np.testing.assert_allclose(extra["thresholds"], expected, rtol=1e-7)
  np.testing.assert_array_equal(probabilities.argmax(-1),
                                thresholds.grades_from_scores(scores, expected))
  # Without fitting, the variables' own thresholds are used as they are.
  _, same, extra = evaluation.grade_probabilities(model, fitted, scores[:50], labels[:50])
  assert same is fitted and extra["thresholds"] == pytest.approx(list(expected))


def _loss_config(**fields):
  config = base_config.get_config("tiny").loss
  config.update(fields)
  return config


def test_regression_losses_match_closed_forms_and_torch():
  scores = jnp.array([[0.2], [1.7], [4.5], [-0.3]])
  labels = jnp.array([0, 2, 1, 0])
  proportions = (8, 1, 2, 1, 4)
  mse = losses.make_loss(_loss_config(), proportions, 5, head="regression")
  assert float(mse(scores, labels)) == pytest.approx(
      np.mean((np.asarray(scores)[:, 0] - np.asarray(labels)) ** 2), rel=1e-6)
  smooth = losses.make_loss(_loss_config(regression="smooth_l1", smooth_l1_beta=0.5),
                            proportions, 5, head="regression")
  expected = torch.nn.functional.smooth_l1_loss(
      torch.tensor(np.asarray(scores)[:, 0]), torch.tensor(np.asarray(labels), dtype=torch.float32),
      beta=0.5)
  assert float(smooth(scores, labels)) == pytest.approx(float(expected), rel=1e-6)
  weighted = losses.make_loss(_loss_config(class_weight_power=1.0), proportions, 5,
                              head="regression")
  weights = np.asarray(losses.class_weights(proportions, 1.0))[np.asarray(labels)]
  assert float(weighted(scores, labels)) == pytest.approx(
      np.mean(weights * (np.asarray(scores)[:, 0] - np.asarray(labels)) ** 2), rel=1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"regression": "l1"}, "config.loss.regression"),
    ({"smooth_l1_beta": 0.0}, "config.loss.smooth_l1_beta"),
    ({"name": "focal"}, "config.loss.regression"),
    ({"label_smoothing": 0.1}, "config.loss.label_smoothing"),
])
def test_bad_regression_loss_config_is_named(fields, message):
  with pytest.raises(ValueError, match=message):
    losses.check_loss_config(_loss_config(**fields), "regression")


# --------------------------------------------------------------------------- #
# End to end: a few training steps with the regression head, then the analysis.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("regression")
  config = base_config.get_config("tiny")
  config.data.data_dir = str(root / "tfds")
  datasets.load_builder_from_config(config.data)
  config = helpers.apply_overrides(config, {
      "model.head": "regression", "schedule.steps": (1, 1, 1), "eval_every": 2,
      "checkpoint_every": 1, "keep_checkpoints": 5, "evaluation.bootstrap_resamples": 20})
  workdir = root / "train"
  result = trainer.train_and_evaluate(config, str(workdir))
  return root, config, workdir, result


@pytest.mark.slow
def test_training_fits_thresholds_and_checkpoints_carry_them(trained):
  _, config, workdir, result = trained
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl", encoding="utf-8")]
  fits = {r["step"]: r["val/thresholds"] for r in records if "val/thresholds" in r}
  assert sorted(fits) == [2, 3]
  for step, fitted in fits.items():
    assert np.all(np.diff(fitted) >= 0)
    run = runs.load_run(str(workdir), str(step))
    np.testing.assert_allclose(evaluation.thresholds_of(run.variables), fitted, rtol=1e-6)
  final = json.loads((workdir / "final_metrics.json").read_text())
  test_step = final["test_checkpoint"]["step"]
  # The test split is graded with the thresholds of the checkpoint it is evaluated with.
  assert final["test"]["thresholds"] == pytest.approx(fits[test_step], rel=1e-6)
  assert final["validation"]["thresholds"] == fits[3]
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)


@pytest.mark.slow
def test_analysis_runs_on_the_regression_run(trained):
  root, config, workdir, _ = trained
  # Two images, one quantity, pixel IG only, the experiments off: each would only add
  # compilations.
  analysis = helpers.apply_overrides(analyze_config.get_config("tiny"), {
      "checkpoint": str(workdir), "data.data_dir": config.data.data_dir, "num_images": 2,
      "quantities": ("predicted",), "top_k": 1,
      "methods": ("integrated_gradients",), "randomisation.num_images": 0,
      "linearity.num_images": 0, "counterfactuals.max_images": 0})
  result = job.run_analysis(analysis, str(root / "analysis"))
  assert result.num_images == 2 and not result.skipped
  metrics = json.loads(open(result.report["metrics"], encoding="utf-8").read())
  assert metrics["num_images"] == 2
  assert os.path.exists(result.report["html"])
