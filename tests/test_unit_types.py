"""drig.analysis.unit_types on constructed regions and masks with known shares and enrichments."""

import json

from matplotlib.patches import Rectangle
import numpy as np
import pytest

from drig.analysis import study_scores
from drig.analysis import unit_types

A, B = "microaneurysm", "haemorrhage"
NAMES = [A, B, unit_types.ANY_LESION]
SIZE = 10


def _masks(a_rows=2, b_rows=3):
  """A on the first a_rows rows, B on the last b_rows rows of a 10 x 10 image."""
  a = np.zeros((SIZE, SIZE), bool)
  b = np.zeros((SIZE, SIZE), bool)
  a[:a_rows] = True
  if b_rows:
    b[-b_rows:] = True
  return {A: a, B: b, "optic_disc": np.zeros((SIZE, SIZE), bool)}


def test_mask_names_are_the_lesion_types_present_then_their_union():
  assert unit_types.mask_names(_masks()) == NAMES
  assert unit_types.mask_names({"optic_disc": np.zeros((2, 2), bool)}) == []
  assert unit_types.ANY_LESION == study_scores.ANY_LESION


def test_image_shares_have_their_closed_forms():
  masks = _masks()
  fov = np.ones((SIZE, SIZE), bool)
  on_a = np.zeros((SIZE, SIZE, 3))
  on_a[0, :, 0] = 2.0  # every positive pixel on A
  on_a[5, :, 1] = -4.0  # negative evidence: not part of the positive mass
  uniform = np.ones((SIZE, SIZE, 3))
  half = np.zeros((SIZE, SIZE, 3))
  half[0, :5] = 1.0  # on A
  half[5, :5] = 1.0  # on neither
  cancelled = np.zeros((SIZE, SIZE, 3))
  cancelled[..., 0], cancelled[..., 1] = 1.0, -1.0  # channels cancel: no positive mass
  mass, share, area = unit_types.image_unit_shares(
      np.stack([on_a, uniform, half, cancelled]), masks, fov, NAMES)
  np.testing.assert_allclose(mass, [20.0, 300.0, 30.0, 0.0])
  np.testing.assert_allclose(area, [0.2, 0.3, 0.5])
  np.testing.assert_allclose(share[0], [1.0, 0.0, 1.0])
  np.testing.assert_allclose(share[1], area)  # uniform: the area shares
  np.testing.assert_allclose(share[2], [0.5, 0.0, 0.5])
  assert np.isnan(share[3]).all()  # no positive mass: undefined, not 0


def test_field_of_view_bounds_mass_and_area_and_empty_masks_are_nan():
  masks = _masks(b_rows=0)  # no B in this image
  fov = np.zeros((SIZE, SIZE), bool)
  fov[:, :5] = True
  region = np.ones((1, SIZE, SIZE))
  mass, share, area = unit_types.image_unit_shares(region, masks, fov, NAMES)
  np.testing.assert_allclose(mass, [50.0])  # the half outside the field of view is ignored
  np.testing.assert_allclose(area[[0, 2]], [0.2, 0.2])
  assert np.isnan(area[1]) and np.isnan(share[0, 1])
  np.testing.assert_allclose(share[0, [0, 2]], [0.2, 0.2])


def test_bad_shapes_and_missing_masks_are_named():
  fov = np.ones((SIZE, SIZE), bool)
  with pytest.raises(unit_types.UnitTypesError, match="field of view"):
    unit_types.image_unit_shares(np.ones((1, 4, 4)), _masks(), fov, NAMES)
  with pytest.raises(unit_types.UnitTypesError, match="lack"):
    unit_types.image_unit_shares(np.ones((1, SIZE, SIZE)), {A: _masks()[A]}, fov, NAMES)
  with pytest.raises(unit_types.UnitTypesError, match="do not agree"):
    unit_types.unit_type_table(np.zeros((2, 3)), np.zeros((2, 3, 2)), np.zeros((2, 3)), NAMES)


def _study(num_images=12, seed=0):
  """Per-image arrays of three units (channels 7, 3, 5) in every image, 2 slots of padding.

  Unit 7 lies on A only, unit 3 spreads uniformly, unit 5 lies half on A and half on B
  (with equal areas): a tie. Lesion areas vary by image.
  """
  rng = np.random.default_rng(seed)
  area_a = rng.uniform(0.05, 0.2, num_images)
  area_b = area_a.copy()
  area = np.stack([area_a, area_b, area_a + area_b], axis=1)
  channels = np.tile(np.array([7, 3, 5, -1]), (num_images, 1))
  share = np.full((num_images, 4, 3), np.nan)
  share[:, 0] = [1.0, 0.0, 1.0]
  share[:, 1] = area
  share[:, 2] = [0.5, 0.5, 1.0]
  return channels, share, area


def test_enrichment_is_the_ratio_of_summed_shares_and_the_rule_picks_the_lesion_unit():
  channels, share, area = _study()
  table = unit_types.unit_type_table(channels, share, area, NAMES, num_resamples=500)
  assert list(table["units"]) == ["3", "5", "7"]  # as often each: by channel id
  on_a = table["units"]["7"]
  assert on_a["images"] == 12 and on_a["specific"] == A
  np.testing.assert_allclose(on_a["cells"][A]["enrichment"], 12 / area[:, 0].sum())
  np.testing.assert_allclose(on_a["cells"][A]["share"], 1.0)
  assert on_a["cells"][B]["enrichment"] == 0 and on_a["cells"][A]["low"] > 1
  assert all(c["n"] == 12 for c in on_a["cells"].values())
  uniform = table["units"]["3"]
  for name in NAMES:
    np.testing.assert_allclose(uniform["cells"][name]["enrichment"], 1.0)
    np.testing.assert_allclose([uniform["cells"][name]["low"], uniform["cells"][name]["high"]],
                               1.0)  # share = area in every image: no spread
  assert uniform["specific"] is None
  tie = table["units"]["5"]
  np.testing.assert_allclose(tie["cells"][A]["enrichment"], tie["cells"][B]["enrichment"])
  assert tie["cells"][A]["low"] > 1 and tie["specific"] is None  # a tie is not specific


def test_bootstrap_interval_matches_a_plain_resampling_loop():
  rng = np.random.default_rng(3)
  n = 9
  area = rng.uniform(0.05, 0.3, (n, 1))
  share = np.clip(area[:, :, None] * rng.uniform(0.5, 4.0, (n, 1, 1)), 0, 1)
  table = unit_types.unit_type_table(np.zeros((n, 1), int), share, area, [A],
                                     num_resamples=400, seed=11, confidence=0.9)
  cell = table["units"]["0"]["cells"][A]
  # The documented draws (drig.statistics.resample_counts), resampled image by image.
  draws = np.random.default_rng(11).integers(n, size=(400, n))
  ratios = [share[d, 0, 0].sum() / area[d, 0].sum() for d in draws]
  np.testing.assert_allclose([cell["low"], cell["high"]], np.percentile(ratios, [5, 95]))
  assert cell["low"] <= cell["enrichment"] <= cell["high"]


def test_undefined_cells_leave_n_and_too_few_images_are_not_specific():
  channels, share, area = _study(num_images=4)
  area[:2, 1] = np.nan  # B absent from two images
  share[:2, :, 1] = np.nan
  share[0, 0] = np.nan  # unit 7 has no positive mass in image 0
  table = unit_types.unit_type_table(channels, share, area, NAMES, num_resamples=200)
  cells = table["units"]["7"]["cells"]
  assert cells[A]["n"] == 3 and cells[B]["n"] == 2 and cells[unit_types.ANY_LESION]["n"] == 3
  assert table["units"]["7"]["specific"] == A
  assert unit_types.unit_type_table(channels, share, area, NAMES, num_resamples=200,
                                    min_images=4)["units"]["7"]["specific"] is None


def test_a_channel_at_several_positions_of_an_image_is_one_mass_weighted_observation():
  channels = np.array([[4, 4, 2], [4, 2, -1]])
  share = np.full((2, 3, 3), np.nan)
  share[0, 0], share[0, 1] = [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]
  share[0, 2] = share[1, 0] = share[1, 1] = [0.2, 0.3, 0.5]
  mass = np.array([[3.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
  area = np.array([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
  ids, pooled = unit_types.channel_shares(channels, share, mass)
  np.testing.assert_array_equal(ids, [2, 4])
  np.testing.assert_allclose(pooled[0, 1], [0.75, 0.0, 0.75])  # (3 * 1 + 1 * 0) / 4
  table = unit_types.unit_type_table(channels, share, area, NAMES, mass=mass,
                                     num_resamples=100)
  cell = table["units"]["4"]["cells"][A]
  assert table["units"]["4"]["images"] == 2 and cell["n"] == 2
  np.testing.assert_allclose(cell["enrichment"], (0.75 + 0.2) / 0.4)
  np.testing.assert_allclose(cell["share"], (0.75 + 0.2) / 2)


def test_specific_type_rule_on_cells():
  cell = lambda e, low, n=5: {"enrichment": e, "low": low, "high": e + 1, "n": n}
  assert unit_types.specific_type({A: cell(3.0, 2.0), B: cell(1.5, 1.0)}) == A
  assert unit_types.specific_type({A: cell(3.0, 1.4), B: cell(1.5, 1.0)}) is None  # B close
  assert unit_types.specific_type({A: cell(3.0, 0.9), B: cell(0.5, 0.2)}) is None  # not > 1
  # The union contains the type: never a rival, never a type of its own.
  assert unit_types.specific_type({A: cell(3.0, 2.0),
                                   unit_types.ANY_LESION: cell(9.0, 8.0)}) == A


def test_relevance_mass_of_units_equals_the_summed_maps_score():
  rng = np.random.default_rng(0)
  masks, fov = _masks(), np.ones((SIZE, SIZE), bool)
  fov[:, -1] = False
  regions = rng.normal(size=(2, 3, SIZE, SIZE))  # 2 images, 3 units
  weights = rng.uniform(0.1, 1.0, (2, 3))
  selected = np.array([[True, False, True], [True, True, True]])
  arrays = [unit_types.image_unit_shares(r, masks, fov, NAMES) for r in regions]
  mass, share = np.stack([a[0] for a in arrays]), np.stack([a[1] for a in arrays])
  got = unit_types.relevance_mass_of_units(weights, mass, share, selected)
  union = masks[A] | masks[B]
  for i in range(2):
    summed = np.einsum("k,khw->hw", weights[i] * selected[i], np.maximum(regions[i], 0)) * fov
    for j, mask in enumerate((masks[A], masks[B], union)):
      np.testing.assert_allclose(got[i, j], summed[mask].sum() / summed.sum(), rtol=1e-6)  # float32 maps
  assert np.isnan(unit_types.relevance_mass_of_units(weights, mass, share,
                                                     np.zeros((2, 3), bool))).all()


def test_typed_maps_of_specific_units_beat_the_pooled_map():
  channels, share, area = _study()
  weights, mass = np.ones(channels.shape), np.ones(channels.shape)
  table = unit_types.unit_type_table(channels, share, area, NAMES, num_resamples=300)
  maps = unit_types.type_map_table(table, channels, weights, mass, share, num_resamples=300)
  assert list(maps) == [A] and maps[A]["units"] == [7]
  np.testing.assert_allclose(maps[A]["typed"]["mean"], 1.0)  # unit 7 alone: all on A
  pooled = (1.0 + area[:, 0] + 0.5) / 3  # the three units' shares on A, equal weights
  np.testing.assert_allclose(maps[A]["pooled"]["mean"], pooled.mean())
  assert maps[A]["difference"]["low"] > 0 and maps[A]["difference"]["n"] == 12


def test_shard_arrays_keep_channels_padding_and_names():
  masks = [_masks(), _masks(b_rows=0), None]
  fov = np.ones((SIZE, SIZE), bool)
  regions = np.ones((3, 2, SIZE, SIZE, 3))
  regions[0, 0] = 0
  regions[0, 0, 0] = 1.0  # on A
  top = np.array([[13, 4], [5, 8], [0, 0]])
  out = unit_types.shard_unit_arrays(regions, top, np.array([[2.0, -1.0]] * 3), 4, masks, fov,
                                     quantity="predicted", layer="L", neurons="unit")
  np.testing.assert_array_equal(out["study.unit_channels"], [[1, 0], [1, 0], [-1, -1]])
  np.testing.assert_array_equal(out["study.unit_weights"][0], [2.0, 0.0])
  np.testing.assert_allclose(out["study.unit_type_share"][0, 0], [1.0, 0.0, 1.0])
  assert np.isnan(out["study.unit_type_share"][1, :, 1]).all()  # no B in image 1
  assert np.isnan(out["study.unit_type_share"][2]).all() and np.isnan(out["study.unit_mass"][2]).all()
  np.testing.assert_allclose(out["study.type_area_share"][0], [0.2, 0.3, 0.5])
  record = json.loads(str(out[unit_types.NAMES_KEY]))
  assert record == {"types": NAMES, "quantity": "predicted", "layer": "L", "neurons": "unit"}


def test_summary_markdown_and_figure():
  channels, share, area = _study()
  data = {"study.unit_channels": channels, "study.unit_type_share": share,
          "study.type_area_share": area, "study.unit_weights": np.ones(channels.shape),
          "study.unit_mass": np.ones(channels.shape),
          unit_types.NAMES_KEY: np.array(json.dumps({"types": NAMES, "quantity": "predicted",
                                                     "layer": "L", "neurons": "unit"}))}
  result = unit_types.summary(data, num_resamples=200, num_permutations=100)
  assert result["specific"] == {"7": A}
  text = unit_types.unit_types_markdown(result["table"], result["type_maps"])
  assert "| 7 | 12 |" in text and "Specific units: microaneurysm: 7" in text
  assert "No unit is specific" not in text
  fig = unit_types.unit_type_figure(result["table"], palette="colorblind")
  boxes = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
  assert len(boxes) == 1 and boxes[0].get_xy() == (-0.5, 1.5)  # unit 7 (row 2), column A
  assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == NAMES
  # Units spread as the lesions are: none specific, and the report says so.
  share[:, 0] = area
  share[:, 2] = area
  plain = unit_types.summary(data, num_resamples=200, num_permutations=100)
  assert plain["specific"] == {} and plain["type_maps"] == {}
  assert "No unit is specific to a lesion type" in unit_types.unit_types_markdown(
      plain["table"], plain["type_maps"])
  assert unit_types.summary({}) is None
