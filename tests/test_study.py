"""The lesion study: selection rules, control maps, relevance rank, the study's tables.

Known answers on constructed inputs: a map equal to the mask scores 1 and a
constant map its chance level; strata get equal counts; the contrast control is
|x - baseline| by hand; intervals and sign-flip p-values of constant and
exactly enumerable paired differences; the percentile bootstrap against numpy
redrawing the same documented indices. One shard's study arrays on a linear
model of 16 px images (a compile of a second or two). The study_local config end to end on
the tiny data set and model (about a minute and a half on 2 cores).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

import helpers  # tests/helpers.py
from configs import analyze as analyze_configs
from configs import model as model_config
from drig import preprocess
from drig.analysis import controls
from drig.analysis import images as images_lib
from drig.analysis import job
from drig.analysis import localization as loc
from drig.analysis import selection
from drig.analysis import study
from drig.analysis import study_scores
from drig.analysis.shards import encode_map
from drig.analysis import validation
from drig.analysis.errors import AnalysisError

SIZE = 32
FOV = preprocess.field_of_view(SIZE)


def _square_mask(top=10, left=12, side=5, size=SIZE):
  mask = np.zeros((size, size), bool)
  mask[top:top + side, left:left + side] = True
  return mask


# ------------------------------------------------------------------------------
# Relevance rank.


def test_relevance_rank_known_answers():
  mask = _square_mask()
  assert loc.relevance_rank(mask.astype(np.float32), mask, FOV) == 1.0
  # A constant map: every FOV pixel tied, so the expected share is the mask's share.
  assert loc.relevance_rank(np.ones((SIZE, SIZE)), mask, FOV) == pytest.approx(
      (mask & FOV).sum() / FOV.sum())
  assert math.isnan(loc.relevance_rank(np.ones((SIZE, SIZE)), np.zeros_like(mask), FOV))
  # The map ranks the mask last: no top-K pixel is on it.
  assert loc.relevance_rank((~mask).astype(np.float32), mask, FOV) == 0.0


def test_relevance_rank_equals_top_k_overlap_without_ties_and_expectation_with_them():
  rng = np.random.default_rng(3)
  mask = _square_mask(side=6)
  values = rng.random((SIZE, SIZE))
  k = int((mask & FOV).sum())
  inside = values[FOV]
  top = np.argsort(-inside)[:k]  # no ties among random floats
  assert loc.relevance_rank(values, mask, FOV) == pytest.approx(mask[FOV][top].sum() / k)
  # Ties at the K-th value: the average over random tie-breaks converges to the score.
  tied = np.round(values * 4) / 4
  score = loc.relevance_rank(tied, mask, FOV)
  labels, flat = mask[FOV], tied[FOV]
  draws = []
  for _ in range(400):
    jitter = flat + rng.random(flat.size) * 1e-6  # breaks ties only
    draws.append(labels[np.argsort(-jitter)[:k]].sum() / k)
  assert score == pytest.approx(np.mean(draws), abs=0.01)


def test_score_maps_computes_the_asked_metrics_like_the_single_functions():
  rng = np.random.default_rng(0)
  mask = _square_mask()
  saliency_map = rng.random((SIZE, SIZE)).astype(np.float32)
  scores = loc.score_maps({"m": saliency_map}, {"lesion": mask}, FOV, metrics=loc.ALL_METRICS)
  cell = scores["m"]["lesion"]
  assert list(cell) == list(loc.ALL_METRICS)
  assert cell["relevance_rank"] == loc.relevance_rank(saliency_map, mask, FOV)
  assert cell["pixel_auroc"] == pytest.approx(sk_metrics.roc_auc_score(mask[FOV],
                                                                       saliency_map[FOV]))
  with pytest.raises(loc.LocalizationInputError, match="unknown metrics"):
    loc.score_maps({"m": saliency_map}, {"lesion": mask}, FOV, metrics=("hit_rate",))


@pytest.mark.parametrize("tolerance", [0, 2])
def test_score_table_equals_score_maps_with_ties_and_absent_masks(tolerance):
  rng = np.random.default_rng(1)
  maps = {"random": rng.random((SIZE, SIZE)), "tied": np.round(rng.random((SIZE, SIZE)) * 3),
          "constant": np.zeros((SIZE, SIZE)), "signed": rng.normal(size=(SIZE, SIZE))}
  masks = {"square": _square_mask(), "absent": np.zeros((SIZE, SIZE), bool),
           "speckle": (rng.random((SIZE, SIZE)) < 0.05) & FOV}
  expected = loc.score_maps(maps, masks, FOV, tolerance=tolerance, metrics=loc.ALL_METRICS)
  table = loc.score_table(maps, masks, FOV, tolerance=tolerance)
  for a, name in enumerate(maps):
    for b, mask in enumerate(masks):
      np.testing.assert_allclose(table[a, b], [expected[name][mask][k] for k in loc.ALL_METRICS],
                                 rtol=1e-12, err_msg=f"{name} on {mask}")


# ------------------------------------------------------------------------------
# Selection.


@pytest.mark.parametrize("spec, expected", [
    ("first", selection.Selection("first")),
    ("stratified", selection.Selection("stratified", "grade")),
    ("stratified:lesion", selection.Selection("stratified", "lesion")),
    ("correct:4", selection.Selection("correct", 4)),
    ("lesion:haemorrhage", selection.Selection("lesion", "haemorrhage")),
])
def test_selection_rules_parse(spec, expected):
  assert selection.parse_selection(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("best", "unknown rule"), ("correct:7", "needs a grade"), ("correct", "needs a grade"),
    ("stratified:age", "stratify by"), ("first:3", "no argument"), ("", "a rule"),
])
def test_bad_selection_rules_are_named(spec, message):
  with pytest.raises(selection.SelectionError, match=message):
    selection.parse_selection(spec)


def test_allocation_is_equal_up_to_what_each_stratum_has():
  np.testing.assert_array_equal(selection.allocate_equally([10, 10, 10], 9), [3, 3, 3])
  np.testing.assert_array_equal(selection.allocate_equally([10, 10, 10], 10), [4, 3, 3])
  # A small stratum gives all it has; the others fill its places.
  np.testing.assert_array_equal(selection.allocate_equally([1, 10, 10], 9), [1, 4, 4])
  np.testing.assert_array_equal(selection.allocate_equally([2, 3], 50), [2, 3])


def test_stratified_by_grade_is_equal_per_grade_and_deterministic_in_the_seed():
  labels = np.repeat(np.arange(5), [60, 10, 20, 6, 4])  # imbalanced like EyePACS
  chosen = selection.select(selection.parse_selection("stratified"), 25, labels=labels, seed=1)
  np.testing.assert_array_equal(np.bincount(labels[chosen], minlength=5), [6, 5, 5, 5, 4])
  assert list(chosen) == sorted(chosen) and len(set(chosen)) == 25
  again = selection.select(selection.parse_selection("stratified"), 25, labels=labels, seed=1)
  other = selection.select(selection.parse_selection("stratified"), 25, labels=labels, seed=2)
  np.testing.assert_array_equal(chosen, again)
  assert not np.array_equal(chosen, other)


def test_lesion_strata_use_the_rarest_type_an_image_carries():
  names = ("microaneurysm", "haemorrhage", "neovascularisation")
  presence = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]], bool)
  assert selection.rarest_lesion_strata(presence, names) == [
      "haemorrhage", "microaneurysm", "neovascularisation", "none", "haemorrhage", "microaneurysm"]
  chosen = selection.select(selection.parse_selection("stratified:lesion"), 4,
                            labels=np.zeros(6), presence=presence, lesion_names=names)
  strata = np.array(selection.rarest_lesion_strata(presence, names))[chosen]
  assert sorted(strata) == ["haemorrhage", "microaneurysm", "neovascularisation", "none"]


def test_conditions_on_predictions_choose_only_fitting_images():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 200)
  predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 5, 200))
  fits = np.flatnonzero((labels == 4) & (predictions == 4))
  chosen = selection.select(selection.parse_selection("correct:4"), 5, labels=labels,
                            predictions=predictions, seed=0)
  assert len(chosen) == 5 and set(chosen) <= set(fits)
  wrong = selection.select(selection.parse_selection("wrong:1"), 500, labels=labels,
                           predictions=predictions)
  np.testing.assert_array_equal(wrong, np.flatnonzero((labels == 1) & (predictions != 1)))
  with pytest.raises(selection.SelectionError, match="needs predictions"):
    selection.select(selection.parse_selection("correct:4"), 5, labels=labels)
  with pytest.raises(selection.SelectionError, match="needs lesion masks"):
    selection.select(selection.parse_selection("stratified:lesion"), 5, labels=labels)


@pytest.mark.parametrize("field, value, message", [
    ("selection", "best:3", "unknown rule"),
    ("selection_pool", 3, "at least config.num_images"),
    ("study.confidence", 1.5, "in \\(0, 1\\)"),
    ("study.faithfulness_points", 1, ">= 2"),
])
def test_bad_selection_and_study_fields_are_named(field, value, message):
  config = analyze_configs.get_config("study_local")
  parent, _, name = field.rpartition(".")
  (config[parent] if parent else config)[name] = value
  with pytest.raises(AnalysisError, match=f"config.{field}.*{message}"):
    validation._check_selection_and_study(config)  # pylint: disable=protected-access


def test_study_configs_are_sized_as_documented():
  full, local = (analyze_configs.get_config(a) for a in ("study", "study_local"))
  assert full.num_images >= 500 and local.num_images >= 100
  assert full.study.enabled and local.study.enabled and full.study.faithfulness
  assert selection.parse_selection(full.selection).kind == "stratified"
  assert "input_x_gradient" in full.methods and "input_x_gradient" in local.methods
  assert local.checkpoint == "workdirs/runlocal"
  for config in (full, local):
    validation._check_selection_and_study(config)  # pylint: disable=protected-access


def test_study_local_config_runs_end_to_end_on_tiny_data(tmp_path):
  """configs/analyze.py:study_local as shipped (selection, methods, faithfulness curves, unit
  types, cascade), sized down to the tiny data set and model."""
  config = analyze_configs.get_config("study_local")
  config.checkpoint = helpers.write_tiny_analysis_run(tmp_path)
  config.model = model_config.get_model_config("tiny")
  helpers.apply_overrides(config, {
      "num_images": 4, "shard_size": 2, "selection_pool": 15, "tolerance": 0.0, "steps": 4,
      "top_k": 4, "figures.num_images": 1, "randomisation.num_images": 1,
      "randomisation.max_stages": 2, "randomisation.cascade_methods": ["integrated_gradients"],
      "study.num_resamples": 100, "study.num_permutations": 100,
      "study.faithfulness_points": 3})
  result = job.run_analysis(config, str(tmp_path / "analysis"))
  with open(result.report["metrics"], encoding="utf-8") as f:
    metrics = json.load(f)
  assert metrics["section_errors"] == {}
  results = metrics["study"]
  assert results["n_images"] == 4
  scored = set(results["localization"]["relevance_mass"])
  assert {"pixel_ig", "active_regions", "contrast", "random"} <= scored
  for method in config.methods[1:]:
    assert any(name.startswith(method) for name in scored), method
  areas = results["faithfulness"]["deletion"]
  assert {"pixel_ig", "grad_cam", "contrast", "random"} <= set(areas)
  assert results["unit_types"]["record"]["layer"] == config.layer
  assert metrics["randomisation_cascade"]["layers"] == ["logits", "base/Conv2d_1a_3x3"]
  with open(result.report["markdown"], encoding="utf-8") as f:
    text = f.read()
  for heading in ("Lesion study", "Faithfulness", "Lesion types of the units",
                  "Cascading randomisation"):
    assert heading in text, heading
  names = {os.path.basename(p) for p in result.figures}
  assert {"study_relevance_mass.png", "study_faithfulness.png", "study_unit_types.png",
          "cascading_randomisation.png"} <= names


# ------------------------------------------------------------------------------
# Controls.


def test_contrast_map_is_the_channel_sum_of_the_absolute_difference():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  baseline = np.full((1, 8, 8, 3), 1 / 255, np.float32)
  expected = np.array([[[sum(abs(x[n, i, j, c] - baseline[0, i, j, c]) for c in range(3))
                         for j in range(8)] for i in range(8)] for n in range(2)])
  np.testing.assert_allclose(controls.contrast_map(x, baseline), expected, rtol=1e-6)
  with pytest.raises(controls.ControlError, match="broadcast"):
    controls.contrast_map(x, np.zeros((1, 4, 4, 3)))


def test_optic_disc_map_peaks_on_the_disc_and_points_at_it():
  rows, columns = np.mgrid[:SIZE, :SIZE]
  disc = (rows - 12.0) ** 2 + (columns - 20.0) ** 2 <= 16
  cone = controls.optic_disc_map(disc)
  assert np.unravel_index(np.argmax(cone), cone.shape) == (12, 20)
  radius = math.sqrt(disc.sum() / math.pi)
  assert cone[(rows - 12.0) ** 2 + (columns - 20.0) ** 2 > (2 * radius + 1) ** 2].max() == 0
  assert loc.pointing_game(cone, disc, FOV) == 1.0
  assert controls.optic_disc_map(np.zeros_like(disc)) is None
  maps = controls.control_maps(np.zeros((SIZE, SIZE)), {"optic_disc": disc}, seed=3)
  assert list(maps) == list(controls.CONTROL_MAPS)
  assert "optic_disc" not in controls.control_maps(np.zeros((SIZE, SIZE)), None, seed=3)


# ------------------------------------------------------------------------------
# The study's tables.


def _records(n=10):
  """Three maps on two masks: "good" = control + 0.2 on every image, "noisy" around it."""
  rng = np.random.default_rng(0)
  control = rng.uniform(0.2, 0.6, (n, 2))
  good = control + 0.2
  noisy = control + rng.normal(0, 0.3, (n, 2))
  scores = np.stack([good, noisy, control], axis=1)[..., None]  # [n, 3 maps, 2 masks, 1 metric]
  scores[:3, :, 1] = np.nan  # the second lesion is absent from the first three images
  deletion = np.stack([control[:, 0] - 0.1, control[:, 0]], axis=1)  # "good" falls sooner
  return study.make_records(("good", "noisy", "contrast"), ("haemorrhage", "any_lesion"),
                            ("pixel_auroc",), scores, kinds=("method", "method", "control"),
                            ranked=("good", "random"), deletion=deletion, insertion=deletion)


def test_localization_table_matches_a_numpy_percentile_bootstrap():
  records = _records()
  table = study.localization_table(records, num_resamples=500, seed=7)
  values = records.scores[:, 1, 0, 0]
  indices = np.random.default_rng(7).integers(len(values), size=(500, len(values)))
  means = values[indices].mean(axis=1)
  cell = table["pixel_auroc"]["noisy"]["haemorrhage"]
  assert cell["mean"] == pytest.approx(values.mean())
  assert (cell["low"], cell["high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
  assert cell["n"] == 10 and table["pixel_auroc"]["noisy"]["any_lesion"]["n"] == 7


def test_paired_differences_and_the_finds_lesions_verdict():
  records = _records()
  paired = study.paired_table(records, ("contrast", "missing"), num_resamples=200)
  against = paired["pixel_auroc"]["haemorrhage"]["good"]["contrast"]
  # A constant difference of 0.2: a degenerate interval, and an exact p-value of
  # 2 / 2^10 (only the all-plus and all-minus sign patterns are as extreme).
  assert (against["mean"], against["low"], against["high"]) == pytest.approx((0.2, 0.2, 0.2))
  assert against["p_value"] == pytest.approx(2 / 2 ** 10) and against["n"] == 10
  assert paired["pixel_auroc"]["any_lesion"]["good"]["contrast"]["n"] == 7
  assert "contrast" not in paired["pixel_auroc"]["haemorrhage"]["contrast"]
  assert "missing" not in paired["pixel_auroc"]["haemorrhage"]["good"]
  found = study.finds_lesions(paired, "contrast")
  assert found["pixel_auroc"]["haemorrhage"][0] == "good"
  assert "contrast" not in found["pixel_auroc"]["haemorrhage"]
  # Three images: a constant difference has a degenerate interval above 0, but the
  # sign-flip test cannot go below 2 / 2^3, so no verdict.
  few = study.make_records(("good", "contrast"), ("haemorrhage",), ("pixel_auroc",),
                           np.array([[[[0.7]], [[0.5]]]] * 3))
  few_paired = study.paired_table(few, ("contrast",), num_resamples=50)
  assert few_paired["pixel_auroc"]["haemorrhage"]["good"]["contrast"]["low"] > 0
  assert study.finds_lesions(few_paired)["pixel_auroc"]["haemorrhage"] == []
  noisy = paired["pixel_auroc"]["haemorrhage"]["noisy"]["contrast"]
  assert ("noisy" in found["pixel_auroc"]["haemorrhage"]) == (noisy["low"] > 0
                                                             and noisy["p_value"] < 0.05)


def test_faithfulness_table_says_which_maps_beat_the_random_order():
  table = study.faithfulness_table(_records(), num_resamples=200)
  assert table["deletion"]["good"]["beats_control"]  # 0.1 lower on every image
  assert not table["insertion"]["good"]["beats_control"]  # lower insertion is worse
  assert table["deletion"]["random"]["against_control"] is None
  assert table["deletion"]["good"]["against_control"]["mean"] == pytest.approx(-0.1)


def test_markdown_and_figure_show_every_cell():
  records = _records()
  result = study.summary(records, references=("contrast",), num_resamples=100,
                         num_permutations=100)
  text = study.study_markdown(result["localization"], result["paired"],
                              result["finds_lesions"], result["faithfulness"])
  mean = np.nanmean(records.scores[:, 0, 0, 0])
  assert f"{mean:.3f} [" in text and "(n=7)" in text and "p=0.00195 ↑" in text
  assert "- haemorrhage: good" in text and "Faithfulness" in text
  fig = study.metric_figure(result["localization"], "pixel_auroc")
  assert len(fig.axes[0].containers) == 3  # one error-bar series per map
  with pytest.raises(study.StudyError, match="scores must be"):
    study.make_records(("a",), ("b",), ("c",), np.zeros((3, 2, 1, 1)))


# ------------------------------------------------------------------------------
# One shard's study arrays (a linear model on 16 px images).


@pytest.fixture(scope="module")
def shard_case():
  size, n = 16, 3
  rng = np.random.default_rng(0)
  config = analyze_configs.get_config("tiny")
  config.methods = ("integrated_gradients", "saliency")
  config.quantities = ("predicted",)
  config.study.enabled = config.study.faithfulness = True
  config.study.faithfulness_points = 3
  config.study.faithfulness_chunk = 3
  weights = jnp.asarray(rng.normal(0, 0.01, (size * size * 3, 5)), jnp.float32)
  logits_fn = jax.tree_util.Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, weights)
  batch = rng.integers(0, 255, (n, size, size, 3)).astype(np.uint8)
  lesion = np.zeros((size, size), bool)
  lesion[4:8, 4:8] = True
  disc = np.zeros((size, size), bool)
  disc[6:10, 9:13] = True
  batch[:, lesion] = 255  # the lesion is bright: the contrast control points at it
  masks = [{"haemorrhage": lesion, "microaneurysm": np.zeros_like(lesion), "optic_disc": disc},
           {"haemorrhage": lesion, "microaneurysm": lesion, "optic_disc": disc}, None]
  arrays = {"prediction": np.array([4, 0, 0], np.int32)}
  for key in ("pixel_ig.predicted", "positive_resultant.predicted", "gradient.predicted",
              "map.saliency.predicted"):
    arrays[key], arrays[f"{key}.scale"] = encode_map(rng.normal(size=(n, size, size, 3)),
                                                     "float32")
  out = study_scores.shard_study_arrays(config, logits_fn, batch, np.array([0, 1, -1]),
                                        np.ones((size, size), bool), masks, arrays)
  return out, lesion


def test_shard_study_arrays_score_methods_and_controls(shard_case):
  out, lesion = shard_case
  names = json.loads(str(out[study_scores.NAMES_KEY]))
  assert names["maps"][:2] == ["pixel_ig", "pixel_ig (absolute)"]
  assert names["maps"][-3:] == ["random", "contrast", "optic_disc"]
  assert names["masks"] == ["microaneurysm", "haemorrhage", "any_lesion", "optic_disc"]
  assert names["metrics"] == list(loc.ALL_METRICS)
  scores = out["study.scores"]
  assert scores.shape == (3, len(names["maps"]), 4, 4)
  assert np.isnan(scores[2]).all()  # padding
  assert np.isnan(scores[0, :, 0]).all()  # no microaneurysm in image 0
  contrast = names["maps"].index("contrast")
  auroc = names["metrics"].index("pixel_auroc")
  assert scores[0, contrast, 1, auroc] > 0.9  # the bright lesion stands out of the contrast
  disc = names["maps"].index("optic_disc")
  assert scores[0, disc, 3, names["metrics"].index("pointing_game")] == 1.0
  records = study.records_from_shards({k: v[:2] if k.startswith("study.") and np.ndim(v) else v
                                       for k, v in out.items()})
  assert records.ranked[-2:] == ("contrast", "random") and records.deletion.shape == (2, 6)


def test_faithfulness_curves_start_at_the_image_and_end_at_the_baseline(shard_case):
  out, _ = shard_case
  deletion, insertion = out["study.deletion_curve"], out["study.insertion_curve"]
  assert deletion.shape == insertion.shape == (3, 6, 3)
  # Every ranking deletes nothing at 0 and everything at 1: equal end points.
  np.testing.assert_allclose(deletion[:, :, 0], deletion[:, :1, 0].repeat(6, 1), rtol=1e-5)
  np.testing.assert_allclose(deletion[:, :, -1], insertion[:, :, 0], rtol=1e-5)
  np.testing.assert_allclose(out["study.deletion_area"],
                             np.trapezoid(deletion, [0, 0.5, 1], axis=-1), rtol=1e-5)
  names = study_scores.read_names(out)
  fig = study.faithfulness_figure(names["fractions"], deletion, insertion, names["ranked"])
  assert [len(ax.lines) for ax in fig.axes] == [6, 6]
  np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), deletion[:, 0].mean(axis=0),
                             rtol=1e-6)


# ------------------------------------------------------------------------------
# The candidate pool and the chosen subset.


class _FakeImages(images_lib.ImageSet):
  """Four 8 px images; image 2 unreadable; haemorrhages on images 1 and 3."""
  has_masks = True
  image_size = 8
  mask_names = ("haemorrhage", "microaneurysm", "optic_disc")
  description = "four fake images"

  def __len__(self):
    return 4

  def read(self, index):
    if index == 2:
      return "cannot decode"
    masks = {name: np.zeros((8, 8), bool) for name in self.mask_names}
    masks["haemorrhage"][2, 2] = index in (1, 3)
    masks["optic_disc"][4, 4] = True  # anatomy: not a lesion
    return images_lib.Example(index, f"img{index}", index % 5,
                              np.full((8, 8, 3), index, np.uint8), None, masks)

  def name(self, index):
    return f"img{index}"


def test_candidates_and_the_selected_subset():
  pool = _FakeImages()
  candidates = images_lib.read_candidates(pool, with_images=True)
  np.testing.assert_array_equal(candidates.indices, [0, 1, 3])
  assert candidates.lesion_names == ("haemorrhage", "microaneurysm")
  np.testing.assert_array_equal(candidates.presence, [[0, 0], [1, 0], [1, 0]])
  assert candidates.images.shape == (3, 8, 8, 3)
  chosen = selection.select(selection.parse_selection("lesion:haemorrhage"), 5,
                            labels=candidates.labels, presence=candidates.presence,
                            lesion_names=candidates.lesion_names)
  subset = images_lib.SelectedImages(pool, candidates.indices[chosen], "two with haemorrhages")
  assert len(subset) == 2 and subset.name(1) == "img3"
  example = subset.read(1)
  assert example.index == 1 and example.name == "img3" and example.image[0, 0, 0] == 3
