"""Hostile inputs are refused early with errors that name the culprit: retinas cut at
the side, NaN or infinite images, empty batches, bad output sizes and batch sizes
whose suggested fixes would fail."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drig import attribution
from drig import parallel
from drig import preprocess as pp

# ----------------------------------------------------------------------------------------
# A retina cut by the left or right edge of the frame.

HEIGHT, WIDTH, CX, CY, RADIUS = 600, 800, 400, 300, 270


def textured_disc(seed=0):
  """A bright vignetted, textured disc on black: (image, centre, radius) as drawn."""
  rng = np.random.default_rng(seed)
  ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
  r = np.hypot(xs - CX, ys - CY) / RADIUS
  shade = np.clip(1 - 0.45 * r ** 4, 0, 1) * (1 + 0.08 * rng.standard_normal(r.shape))
  image = np.array([200, 95, 45]) * shade[..., None]
  image[r > 1] = 0
  return np.clip(image, 0, 255).astype(np.uint8)


# (top, bottom, left, right) pixels cut from each side of the photograph. A field
# stop alone (top and bottom) leaves the middle row whole: test_preprocess.py.
CUTS = {
    "left": (0, 0, 230, 0),
    "right": (0, 0, 0, 230),
    "both_sides": (0, 0, 200, 200),
    "both_sides_and_field_stop": (60, 60, 200, 200),
}


@pytest.fixture(scope="module")
def photograph():
  return textured_disc()


@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_find_retina_when_the_frame_cuts_the_disc(photograph, cut):
  top, bottom, left, right = cut
  image = photograph[top:HEIGHT - bottom, left:WIDTH - right]
  geometry = pp.find_retina(image)
  # The truth, in the cut image's pixels: the same disc, moved by the cut.
  assert geometry.radius == pytest.approx(RADIUS, rel=0.02)
  assert abs(geometry.center_x - (CX - left)) <= 0.02 * RADIUS
  assert abs(geometry.center_y - (CY - top)) <= 0.02 * RADIUS


def test_cut_retina_is_found_despite_a_label_and_a_frame(photograph):
  image = photograph[:, 230:].copy()
  image[:50, -60:] = 220  # A label in a corner, separated from the retina by black.
  image[:, -3:] = 150  # A bright frame along the right edge.
  geometry = pp.find_retina(image)
  assert geometry.radius == pytest.approx(RADIUS, rel=0.02)
  assert abs(geometry.center_x - (CX - 230)) <= 0.02 * RADIUS
  assert abs(geometry.center_y - CY) <= 0.02 * RADIUS


def test_cut_retina_is_preprocessed_like_the_whole_one(photograph):
  whole = pp.preprocess_fundus(photograph, 64)
  cut, geometry = pp.preprocess_fundus_with_geometry(photograph[:, 230:], 64)
  assert geometry.radius == pytest.approx(RADIUS, rel=0.02)
  # The visible part (right of the cut, minus the blur's reach) matches the whole
  # photograph's output; the rest is the fill, as where a field stop cuts.
  visible = pp.source_footprint(geometry, (HEIGHT, WIDTH - 230), size=64)
  assert (cut[~visible] == pp.DEFAULT_FILL).all()
  keep = pp.field_of_view(64) & visible
  keep[:, :28] = False  # Columns near the cut, where step 4 blurs across it.
  difference = np.abs(cut.astype(int) - whole.astype(int))[keep]
  assert np.median(difference) <= 2


def test_retina_cut_on_every_side_is_refused(photograph):
  image = photograph[120:-120, 200:-200]  # The retina spans every row.
  with pytest.raises(pp.FundusImageError, match=r"cut\.jpeg: cannot locate the retina"):
    pp.find_retina(image, source="cut.jpeg")


def test_bright_block_at_the_edge_is_not_a_retina():
  image = np.zeros((300, 400, 3), np.uint8)
  image[40:260, :150] = 180  # Touches the left edge; its boundary is no circle.
  with pytest.raises(pp.FundusImageError, match="block.png: cannot locate the retina"):
    pp.preprocess_fundus(image, source="block.png")


# ----------------------------------------------------------------------------------------
# Output sizes.


@pytest.mark.parametrize("size", [0, -5, 2.5, True, "256", pp.MAX_SIZE + 1])
def test_bad_size_is_refused_naming_the_argument(photograph, size, tmp_path):
  with pytest.raises(ValueError, match=r"^size must be"):
    pp.preprocess_fundus(photograph, size)
  path = tmp_path / "photo.png"
  path.write_bytes(b"not read: size is checked first")
  with pytest.raises(ValueError, match=r"^size must be"):
    pp.preprocess_file(path, size)


# ----------------------------------------------------------------------------------------
# Global batch sizes.


def fake_mesh(devices):
  return jax.sharding.Mesh(np.array(jax.devices()[:1] * devices), ("data",))


def suggested_sizes(error):
  return [int(n) for n in re.search(r"e\.g\. (\d+) or (\d+)", str(error)).groups()]


@pytest.mark.parametrize("batch, devices, multiple_of, suggestions", [
    (16, 3, 1, [15, 18]),
    (16, 3, 16, [48, 96]),
    (100, 3, 16, [96, 144]),
    (2, 3, 1, [3, 6]),
])
def test_suggested_batch_sizes_satisfy_every_constraint(batch, devices, multiple_of,
                                                        suggestions):
  mesh = fake_mesh(devices)
  with pytest.raises(parallel.BatchSizeError, match="does not divide") as error:
    parallel.check_global_batch(batch, mesh, multiple_of=multiple_of)
  assert suggested_sizes(error.value) == suggestions
  for size in suggestions:
    parallel.check_global_batch(size, mesh, multiple_of=multiple_of)


def test_batch_size_must_be_a_positive_int():
  for batch in (0, -3, 4.0):
    with pytest.raises(parallel.BatchSizeError):
      parallel.check_global_batch(batch, fake_mesh(1))
  with pytest.raises(parallel.BatchSizeError, match="multiple_of"):
    parallel.check_global_batch(16, fake_mesh(1), multiple_of=0)


# ----------------------------------------------------------------------------------------
# NaN, infinite and empty image batches in attribution.

DN = ("NHWC", "HWIO", "NHWC")
_W = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 2, 3)), jnp.float32)


def to_layer(x):
  return jax.nn.relu(jax.lax.conv_general_dilated(x, _W, (1, 1), "SAME",
                                                  dimension_numbers=DN))


def from_layer(a):
  return jnp.tanh(a.mean(axis=(1, 2, 3)))


def quantity(x):
  return from_layer(to_layer(x))


def images(n=3):
  return np.random.default_rng(1).uniform(-1, 1, (n, 6, 6, 2)).astype(np.float32)


def cotangents(x):
  return attribution.channel_cotangents((6, 6, 3), np.zeros((x.shape[0], 1), int))


ENTRY_POINTS = {
    "integrated_gradients": lambda x, b: attribution.integrated_gradients(
        quantity, x, b, steps=2),
    "layer_integrated_gradients": lambda x, b: attribution.layer_integrated_gradients(
        to_layer, from_layer, x, b, steps=2),
    "layer_conductance": lambda x, b: attribution.layer_conductance(
        to_layer, from_layer, x, b, steps=2),
    "active_regions": lambda x, b: attribution.active_regions(
        to_layer, x, b, cotangents(x), steps=2),
    "unit_active_regions": lambda x, b: attribution.unit_active_regions(
        to_layer, x, b, np.zeros((x.shape[0], 1, 3), int), steps=2),
    "lesion_detection": lambda x, b: attribution.lesion_detection(
        to_layer, from_layer, x, b, k=1, steps=2),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_images_are_named(entry, bad):
  x = images()
  x[1, 2, 3, 0] = bad
  with pytest.raises(attribution.AttributionArgumentError,
                     match=r"^x image 1 \(of 3\) has NaN or infinite"):
    entry(x, 0.0)


@pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
def test_non_finite_baselines_are_named(entry):
  x = images()
  per_image = np.zeros_like(x)
  per_image[[0, 2], 0, 0, 1] = -np.inf
  with pytest.raises(attribution.AttributionArgumentError,
                     match=r"^baseline images 0, 2 \(of 3\) have NaN or infinite"):
    entry(x, per_image)
  with pytest.raises(attribution.AttributionArgumentError,
                     match=r"^baseline has NaN or infinite"):
    entry(x, np.full((1,) + x.shape[1:], np.nan, np.float32))


def test_concrete_inputs_are_checked_traced_ones_by_the_caller():
  x = images()
  x[1, 0, 0, 0] = np.nan
  with pytest.raises(attribution.AttributionArgumentError, match="x image 1"):
    attribution.integrated_gradients(quantity, jnp.asarray(x), 0.0, steps=2)
  # Values are unknown while tracing: no error, and the NaN image's gap is NaN.
  gap = jax.jit(lambda v: attribution.integrated_gradients(quantity, v, 0.0, steps=2)[1])(x)
  assert np.isnan(np.asarray(gap)).tolist() == [False, True, False]


@pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
def test_empty_batch_is_named(entry):
  with pytest.raises(attribution.AttributionArgumentError, match=r"^x is an empty batch"):
    entry(images(0), 0.0)
