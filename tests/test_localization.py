"""Lesion-localisation scores and the model-randomisation check.

Constructed cases with known answers (a map equal to the mask scores 1, a
random map scores chance), scikit-learn's roc_auc_score and scipy's spearmanr
and distance transform as independent references, and on the tiny model:
integrated gradients change when randomise_variables replaces the weights.
"""

import importlib.util
import math
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy import stats
from sklearn import metrics

from drig import attribution
from drig import preprocess
from drig.analysis import localization as loc
from drig.analysis import randomisation
from drig.models import classifier
from drig.models import initialization

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
FOV = preprocess.field_of_view(SIZE)


def _lesions(seed=0, count=6, radius=3, size=SIZE):
  """bool [size, size]: `count` discs inside the field of view."""
  rng = np.random.default_rng(seed)
  ys, xs = np.mgrid[:size, :size]
  mask = np.zeros((size, size), bool)
  for _ in range(count):
    while True:
      cy, cx = rng.integers(radius, size - radius, 2)
      if FOV[cy, cx] and ((cy - size / 2) ** 2 + (cx - size / 2) ** 2) < (0.35 * size) ** 2:
        break
    mask |= (ys - cy) ** 2 + (xs - cx) ** 2 <= radius ** 2
  return mask


def test_map_equal_to_mask_scores_one():
  mask = _lesions()
  for saliency_map in (mask.astype(np.float32), mask.astype(np.float64) * 3.5, mask):
    assert loc.pointing_game(saliency_map, mask, FOV) == 1.0
    assert loc.relevance_mass(saliency_map, mask, FOV) == 1.0
    assert loc.pixel_auroc(saliency_map, mask, FOV) == 1.0
  # Its negation (and a map on everything but the lesions) scores 0.
  assert loc.pixel_auroc(-mask.astype(float), mask, FOV) == 0.0
  assert loc.pointing_game((~mask).astype(float), mask, FOV) == 0.0
  assert loc.relevance_mass((~mask).astype(float), mask, FOV) == 0.0


def test_random_map_scores_chance():
  mask = _lesions(seed=1)
  share = mask[FOV].mean()
  assert 0.05 < share < 0.3
  seeds = range(400)
  scores = np.array([[loc.pointing_game(m, mask, FOV), loc.relevance_mass(m, mask, FOV),
                      loc.pixel_auroc(m, mask, FOV)]
                     for m in (loc.random_map(s, (SIZE, SIZE)) for s in seeds)])
  hits, mass, auroc = scores.T
  assert set(np.unique(hits)) <= {0.0, 1.0}  # continuous values: no ties
  binomial_std = math.sqrt(share * (1 - share) / len(hits))
  assert abs(hits.mean() - share) < 4 * binomial_std, (hits.mean(), share)
  assert abs(mass.mean() - share) < 0.01 and mass.std() < 0.02
  assert abs(auroc.mean() - 0.5) < 0.01 and auroc.std() < 0.05


def test_random_map():
  a = loc.random_map(3, (5, 7))
  assert a.dtype == np.float32 and a.shape == (5, 7) and (a >= 0).all() and (a < 1).all()
  np.testing.assert_array_equal(a, loc.random_map(3, (5, 7)))
  assert not np.array_equal(a, loc.random_map(4, (5, 7)))


def test_pixel_auroc_equals_sklearn_with_ties_and_signs():
  rng = np.random.default_rng(5)
  mask = _lesions(seed=2)
  for levels, scale in ((3, 1.0), (10, -2.0), (None, 1.0)):
    values = rng.normal(size=(SIZE, SIZE)) + 0.7 * mask
    if levels:  # coarse values: many ties within and across the classes
      values = np.round(values * levels / 4) * scale
    for fov in (FOV, None):
      inside = np.ones_like(mask) if fov is None else fov
      expected = metrics.roc_auc_score(mask[inside], values[inside])
      assert loc.pixel_auroc(values, mask, fov) == pytest.approx(expected, abs=1e-12)


def test_rank_correlation_equals_scipy():
  rng = np.random.default_rng(6)
  a = rng.normal(size=(SIZE, SIZE))
  b = a + rng.normal(size=a.shape)
  b_tied = np.round(b)
  for x, y in ((a, b), (a, b_tied), (np.round(a), b_tied), (a, -a)):
    for fov in (FOV, None):
      inside = np.ones(a.shape, bool) if fov is None else fov
      expected = stats.spearmanr(x[inside], y[inside]).statistic
      assert loc.rank_correlation(x, y, fov) == pytest.approx(expected, abs=1e-12)
  assert loc.rank_correlation(a, a.astype(np.float32) * 7 + 1) == 1.0
  assert math.isnan(loc.rank_correlation(a, np.ones_like(a)))
  with pytest.raises(loc.LocalizationInputError, match="differ in shape"):
    loc.rank_correlation(a, a[:-1])


def test_field_of_view_excludes_outside_pixels():
  mask = _lesions(seed=3)
  rng = np.random.default_rng(7)
  inside_map = rng.random((SIZE, SIZE)) + 2 * mask
  # Outside the FOV: a huge peak, large relevance and arbitrary values.
  noisy = inside_map.copy()
  noisy[~FOV] = rng.normal(size=(~FOV).sum()) * 100
  noisy[0, 0] = 1e6
  zeroed = inside_map * FOV
  assert loc.pointing_game(noisy, mask, FOV) == 1.0
  assert loc.pointing_game(noisy, mask) == 0.0  # without the FOV the corner wins
  assert loc.relevance_mass(noisy, mask, FOV) == pytest.approx(
      loc.relevance_mass(zeroed, mask, FOV))
  assert loc.relevance_mass(noisy, mask, FOV) == pytest.approx(
      inside_map[mask & FOV].sum() / inside_map[FOV].sum())
  assert loc.pixel_auroc(noisy, mask, FOV) == loc.pixel_auroc(inside_map, mask, FOV)
  # Lesion pixels outside the FOV do not count as lesion.
  outside_lesion = mask | ~FOV
  assert loc.pixel_auroc(inside_map, outside_lesion, FOV) == loc.pixel_auroc(
      inside_map, mask, FOV)
  assert loc.rank_correlation(noisy, inside_map, FOV) == 1.0
  assert loc.rank_correlation(noisy, inside_map) < 0.9


def test_undefined_scores_are_nan():
  mask = _lesions(seed=4)
  saliency_map = np.random.default_rng(8).random((SIZE, SIZE))
  empty = np.zeros_like(mask)
  only_outside = ~FOV
  for m in (empty, only_outside):
    assert math.isnan(loc.pointing_game(saliency_map, m, FOV))
    assert math.isnan(loc.relevance_mass(saliency_map, m, FOV))
    assert math.isnan(loc.pixel_auroc(saliency_map, m, FOV))
  # Lesion everywhere in the FOV: no negatives for the AUROC; all mass is inside.
  assert math.isnan(loc.pixel_auroc(saliency_map, FOV, FOV))
  assert loc.relevance_mass(saliency_map, FOV, FOV) == 1.0
  # No positive relevance at all.
  assert math.isnan(loc.relevance_mass(-saliency_map, mask, FOV))
  assert math.isnan(loc.relevance_mass(np.zeros_like(saliency_map), mask, FOV))


def test_pointing_game_ties_and_tolerance():
  mask = _lesions(seed=5)
  share = mask[FOV].mean()
  constant = np.ones((SIZE, SIZE))
  assert loc.pointing_game(constant, mask, FOV) == pytest.approx(share)
  assert loc.pointing_game(constant, mask, FOV, ties="any") == 1.0
  assert loc.pointing_game(constant, mask, FOV, ties="all") == 0.0
  two_peaks = np.zeros((SIZE, SIZE))
  hit = tuple(np.argwhere(mask)[0])
  miss = tuple(np.argwhere(FOV & ~mask)[0])
  two_peaks[hit] = two_peaks[miss] = 1.0
  assert loc.pointing_game(two_peaks, mask, FOV) == 0.5
  # A peak 3 px from the nearest lesion pixel: a hit from tolerance 3 on.
  distance = ndimage.distance_transform_edt(~mask)
  y, x = np.argwhere(FOV & (distance == 3.0))[0]
  peak = np.zeros((SIZE, SIZE))
  peak[y, x] = 1.0
  assert [loc.pointing_game(peak, mask, FOV, tolerance=t) for t in (0, 2, 3, 4)] == [0, 0, 1, 1]
  for t in (1, 2, 5, 15):  # the dilation is Euclidean
    np.testing.assert_array_equal(loc.dilate(mask, t), distance <= t)
  with pytest.raises(loc.LocalizationInputError, match="ties"):
    loc.pointing_game(peak, mask, ties="first")
  with pytest.raises(loc.LocalizationInputError, match="tolerance"):
    loc.pointing_game(peak, mask, tolerance=-1)


def test_saliency_modes_and_bad_inputs():
  attributions = np.zeros((2, 2, 3), np.float64)
  attributions[0, 0] = (1.0, 2.0, -0.5)   # sum 2.5
  attributions[1, 1] = (-1.0, -1.0, 0.5)  # sum -1.5
  expected = np.array([[2.5, 0.0], [0.0, -1.5]])
  for mode, want in (("signed", expected), ("positive", np.maximum(expected, 0)),
                     ("absolute", np.abs(expected))):
    got = loc.saliency(attributions, mode)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(loc.saliency(expected, "signed"), expected)
  with pytest.raises(loc.LocalizationInputError, match="mode"):
    loc.saliency(attributions, "abs")
  with pytest.raises(loc.LocalizationInputError, match="shape"):
    loc.saliency(np.zeros((1, 2, 2, 3)))
  with pytest.raises(loc.LocalizationInputError, match="mask has shape"):
    loc.pixel_auroc(np.zeros((4, 4)), np.zeros((4, 5), bool))
  with pytest.raises(loc.LocalizationInputError, match="boolean"):
    loc.relevance_mass(np.zeros((2, 2)), np.full((2, 2), 0.5))
  with pytest.raises(loc.LocalizationInputError, match="non-finite"):
    loc.pointing_game(np.full((2, 2), np.nan), np.ones((2, 2), bool))
  # uint8 masks of 0/255, as image files store them, are accepted.
  assert loc.pixel_auroc(np.eye(3), np.eye(3, dtype=np.uint8) * 255) == 1.0


def test_score_maps_summarise_and_markdown():
  masks = {"microaneurysm": _lesions(seed=6), "haemorrhage": _lesions(seed=7, count=2),
           "hard_exudate": np.zeros((SIZE, SIZE), bool)}
  attributions = np.random.default_rng(9).normal(size=(SIZE, SIZE, 3))
  attributions[masks["microaneurysm"]] += 5.0
  maps = {"pixel_ig": attributions, "random": loc.random_map(0, (SIZE, SIZE))}
  scores = loc.score_maps(maps, masks, FOV)
  assert list(scores) == ["pixel_ig", "random"] and list(scores["random"]) == list(masks)
  positive = loc.saliency(attributions, "positive")
  for lesion, mask in masks.items():
    cell = scores["pixel_ig"][lesion]
    assert set(cell) == set(loc.METRICS)
    np.testing.assert_equal(cell["pixel_auroc"], loc.pixel_auroc(positive, mask, FOV))
    np.testing.assert_equal(cell["relevance_mass"], loc.relevance_mass(positive, mask, FOV))
  assert scores["pixel_ig"]["microaneurysm"]["pointing_game"] == 1.0
  assert all(math.isnan(v) for v in scores["random"]["hard_exudate"].values())

  # Summaries over hand-made per-image scores: nan (lesion absent) does not count.
  nan = math.nan
  per_image = [
      {"ig": {"ma": {"pointing_game": 1.0, "pixel_auroc": 0.9}}},
      {"ig": {"ma": {"pointing_game": 0.0, "pixel_auroc": nan}}},
      {"ig": {"ma": {"pointing_game": nan, "pixel_auroc": 0.7}, "he": {"pointing_game": 1.0}},
       "random": {"ma": {"pointing_game": 0.0}}},
  ]
  summary = loc.summarise(per_image)
  ma = summary["ig"]["ma"]
  assert ma["pointing_game"] == {"mean": 0.5, "std": pytest.approx(np.std([1, 0], ddof=1)),
                                 "count": 2}
  assert ma["pixel_auroc"]["mean"] == pytest.approx(0.8) and ma["pixel_auroc"]["count"] == 2
  assert ma["pixel_auroc"]["std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
  one = summary["ig"]["he"]["pointing_game"]
  assert one["mean"] == 1.0 and one["count"] == 1 and math.isnan(one["std"])
  assert loc.summarise(per_image, ddof=0)["ig"]["he"]["pointing_game"]["std"] == 0.0
  assert summary["random"]["ma"]["pointing_game"]["count"] == 1

  text = loc.summary_markdown(summary)
  assert "### Pointing game (hit rate)" in text and "### Pixel AUROC" in text
  assert "| lesion | ig | random |" in text
  assert "| ma | 0.500 ± 0.707 (n=2) | 0.000 (n=1) |" in text
  assert "| he | 1.000 (n=1) | – |" in text
  full = loc.summary_markdown(loc.summarise([scores, scores]))
  assert full.count("| microaneurysm |") == 3 and "| hard_exudate | – | – |" in full


# ------------------------------------------------------------------------------
# Model randomisation on the tiny model.


def _tiny_model():
  spec = importlib.util.spec_from_file_location("model_config",
                                                os.path.join(ROOT, "configs", "model.py"))
  config_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_module)
  return classifier.build_model(config_module.get_model_config("tiny"))


@pytest.fixture(scope="module")
def tiny():
  """The tiny model, random weights, two random 80 px images and an IG function."""
  model = _tiny_model()
  variables = initialization.random_variables(model, 0)
  images = jnp.asarray(np.random.default_rng(10).uniform(-1, 1, (2, 80, 80, 3)), jnp.float32)

  def pixel_ig(weights):
    """float32 [2, 80, 80, 3]: IG of the grade-4 probability (one compiled program)."""
    f = attribution.probability_of_grade(jax.tree_util.Partial(model.apply, weights), 4)
    result, _ = attribution.integrated_gradients(
        f, images, attribution.half_gray_baseline(images), steps=4, chunk_size=4)
    return np.asarray(result)

  return model, variables, images, pixel_ig


def _correlations(a, b):
  fov = preprocess.field_of_view(a.shape[1])
  return [loc.rank_correlation(loc.saliency(x, "absolute"), loc.saliency(y, "absolute"), fov)
          for x, y in zip(a, b)]


def test_model_randomisation_changes_attributions(tiny):
  model, variables, _, pixel_ig = tiny
  original = pixel_ig(variables)
  assert np.abs(original).max() > 0
  copy = jax.tree.map(lambda a: np.array(a), variables)
  assert _correlations(original, pixel_ig(copy)) == [1.0, 1.0]
  everything = randomisation.randomise_variables(model, variables, 1)
  head = randomisation.randomise_variables(model, variables, 1, scope="head")
  all_correlations = _correlations(original, pixel_ig(everything))
  head_correlations = _correlations(original, pixel_ig(head))
  print("rank correlation after randomising all:", all_correlations, "head:", head_correlations)
  assert max(all_correlations) < 0.8
  assert max(head_correlations) < 0.95


def _leaves(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_randomise_variables_scopes(tiny):
  model, variables, _, _ = tiny
  before = {c: _leaves(variables[c]) for c in ("params", "batch_stats")}
  for scope, changed_prefixes in (("all", ("",)), ("head", ("fc1/", "fc2/", "logits/")),
                                  (("logits", "base/Mixed_7c"), ("logits/", "base/Mixed_7c/"))):
    new = randomisation.randomise_variables(model, variables, 2, scope=scope)
    assert set(new) == {"params", "batch_stats"}
    for collection, old_leaves in before.items():
      new_leaves = _leaves(new[collection])
      assert new_leaves.keys() == old_leaves.keys()
      for path, old in old_leaves.items():
        value = new_leaves[path]
        assert value.shape == old.shape and value.dtype == old.dtype
        selected = path.startswith(changed_prefixes)
        if not selected:
          np.testing.assert_array_equal(value, old, err_msg=path)
        elif collection == "batch_stats":  # re-initialised layers: initial statistics
          np.testing.assert_array_equal(value, 0.0 if path.endswith("mean") else 1.0)
        elif path.endswith("kernel"):
          assert not np.allclose(value, old), path
  np.testing.assert_array_equal(  # deterministic in the seed
      randomisation.randomise_variables(model, variables, 3)["params"]["logits"]["kernel"],
      randomisation.randomise_variables(model, variables, 3)["params"]["logits"]["kernel"])
  with pytest.raises(randomisation.RandomisationError, match="no parameters"):
    randomisation.randomise_variables(model, variables, 2, scope="base/mixed_99")
  with pytest.raises(randomisation.RandomisationError, match="do not match"):
    randomisation.randomise_variables(
        model, {"params": {"logits": variables["params"]["logits"]}}, 2, scope="logits")


def test_calibrated_batch_statistics(tiny):
  """Calibrated statistics are the batch's; inference then equals a training-mode pass."""
  model, variables, images, _ = tiny
  new = randomisation.randomise_variables(model, variables, 4, calibration_images=images)
  # The first unit by hand: a 3x3 stride-2 VALID convolution, then per-channel moments.
  x = np.asarray(images, np.float64)
  kernel = np.asarray(new["params"]["base"]["Conv2d_1a_3x3"]["conv"]["kernel"], np.float64)
  out = x.shape[1] // 2 - 1
  conv = sum(x[:, i:i + 2 * out:2, j:j + 2 * out:2, :] @ kernel[i, j]
             for i in range(3) for j in range(3))
  stats = new["batch_stats"]["base"]["Conv2d_1a_3x3"]["bn"]
  np.testing.assert_allclose(stats["mean"], conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], conv.var(axis=(0, 1, 2)), rtol=1e-4)
  # Whole layers: with 2 images, deep layers see a few values per channel and
  # amplify rounding (the statistics are read through the momentum update, to
  # about 1e-5), so compare up to mixed2.
  inference = model.apply(new, images, stop_layer="mixed2")
  training, _ = model.apply(new, images, train=True, stop_layer="mixed2", mutable=["batch_stats"])
  np.testing.assert_allclose(inference, training, atol=1e-3 * np.abs(training).max())
  uncalibrated = model.apply(randomisation.randomise_variables(model, variables, 4), images,
                             stop_layer="mixed2")
  assert np.abs(uncalibrated - training).max() > 0.1 * np.abs(training).max()


def test_method_maps_score_signed_methods_by_positive_part_and_absolute_value():
  rng = np.random.default_rng(21)
  attributions = rng.normal(size=(12, 10, 3)).astype(np.float32)
  summed = attributions.sum(-1)
  signed = loc.method_maps("input_x_gradient", attributions, signed=True)
  assert list(signed) == ["input_x_gradient", "input_x_gradient (absolute)"]
  np.testing.assert_allclose(signed["input_x_gradient"], np.maximum(summed, 0), rtol=1e-6)
  np.testing.assert_allclose(signed["input_x_gradient (absolute)"], np.abs(summed), rtol=1e-6)
  squares = attributions ** 2  # an unsigned map (SmoothGrad-squared) is scored as it is
  unsigned = loc.method_maps("smoothgrad_sq", squares, signed=False)
  assert list(unsigned) == ["smoothgrad_sq"]
  np.testing.assert_allclose(unsigned["smoothgrad_sq"], squares.sum(-1), rtol=1e-6)
  mask = np.zeros((12, 10), bool)
  mask[2:6, 3:7] = True
  scores = loc.score_maps({**signed, **unsigned}, {"lesion": mask})
  expected = metrics.roc_auc_score(mask.ravel(), np.abs(summed).ravel())
  assert scores["input_x_gradient (absolute)"]["lesion"]["pixel_auroc"] == pytest.approx(expected)
