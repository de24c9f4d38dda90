"""Tests of the synthetic fundus renderer, its TFDS builder and drig.prepare_data."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from configs import data as data_configs
from drig.data import datasets
from drig.data import lesions
from drig import preprocess
from drig.data import synthetic_examples as examples
from drig.data import synthetic_fundus as sf

LESIONS = lesions.LESION_NAMES


def _lesion_union(masks):
  union = np.zeros_like(masks["optic_disc"])
  for name in LESIONS:
    union |= masks[name]
  return union


# ---------------------------------------------------------------------------
# Renderer.


def test_render_shapes_and_dtypes():
  photo, masks = sf.render_fundus(3, 2, size=160)
  assert photo.shape == (160, 160, 3) and photo.dtype == np.uint8
  assert list(masks) == list(lesions.MASK_NAMES)
  for mask in masks.values():
    assert mask.shape == (160, 160) and mask.dtype == np.bool_
  # Black corners, a bright retina.
  assert photo[:3, :3].max() < 20 and photo[80, 80].mean() > 40


def test_render_is_deterministic():
  a, masks_a = sf.render_fundus(11, 3, size=192)
  b, masks_b = sf.render_fundus(11, 3, size=192)
  assert a.tobytes() == b.tobytes()
  assert all((masks_a[k] == masks_b[k]).all() for k in masks_a)
  c, _ = sf.render_fundus(12, 3, size=192)
  assert (a != c).mean() > 0.2
  # A Generator seeded alike gives the same photograph.
  d, _ = sf.render_fundus(np.random.default_rng(5), 1, size=192)
  e, _ = sf.render_fundus(np.random.default_rng(5), 1, size=192)
  assert d.tobytes() == e.tobytes()


@pytest.mark.parametrize("size", [128, 320])
def test_masks_contain_every_lesion_pixel(size):
  """Rendered with and without lesions, the photographs differ only inside the masks."""
  for seed in range(4):
    for grade in range(5):
      photo, masks = sf.render_fundus(seed, grade, size=size)
      clean, clean_masks = sf.render_fundus(seed, grade, size=size, draw_lesions=False)
      changed = (photo != clean).any(axis=-1)
      union = _lesion_union(masks)
      assert not (changed & ~union).any(), (seed, grade)
      assert not _lesion_union(clean_masks).any()
      assert (clean_masks["optic_disc"] == masks["optic_disc"]).all()
      if grade == 0:
        assert not union.any() and not changed.any()
      # Masks are tight: most of each mask's pixels were actually painted.
      for name in LESIONS:
        if masks[name].any():
          assert (changed & masks[name]).sum() >= 0.5 * masks[name].sum(), (seed, grade, name)


def test_lesion_types_follow_the_grade():
  for seed in range(6):
    for grade in range(5):
      _, masks = sf.render_fundus(100 + seed, grade, size=256)
      present = {name for name in LESIONS if masks[name].any()}
      assert set(sf.REQUIRED_LESIONS[grade]) <= present, (seed, grade, present)
      assert present <= set(sf.ALLOWED_LESIONS[grade]), (seed, grade, present)
      if grade == 4:
        assert present & set(sf.PROLIFERATIVE_LESIONS)
      assert masks["optic_disc"].any()


def test_grade_3_haemorrhages_in_all_quadrants():
  for seed in range(4):
    photo, masks = sf.render_fundus(seed, 3, size=256)
    ys, xs = np.nonzero(masks["haemorrhage"])
    # Retina centre from the bright pixels of the photograph.
    bright = photo.sum(-1) > 60
    cy, cx = np.argwhere(bright).mean(0)
    quadrants = {(y < cy, x < cx) for y, x in zip(ys, xs)}
    assert len(quadrants) == 4, seed


def test_grade_1_microaneurysms_are_few_and_small():
  """Grade 1 shows 1-4 microaneurysms of a few pixels at a 256 px retina."""
  for seed in range(8):
    photo, masks = sf.render_fundus(seed, 1, size=512)
    count, _, stats, _ = cv2.connectedComponentsWithStats(masks["microaneurysm"].astype(np.uint8))
    assert 1 <= count - 1 <= 4, seed
    retina_diameter = (photo[256].sum(-1) > 60).sum()
    to_256 = 256 / retina_diameter
    # Painted radius 0.8-1.5 % of the retina's radius: 2-4 px across at 256 px;
    # the mask adds the soft rim (about 0.7 px each side at that scale).
    diameters = 2 * np.sqrt(stats[1:, cv2.CC_STAT_AREA] / np.pi) * to_256
    assert (diameters >= 2.0).all() and (diameters <= 6.0).all(), (seed, diameters)


def test_render_rejects_bad_arguments():
  with pytest.raises(ValueError, match="grade"):
    sf.render_fundus(0, 5)
  with pytest.raises(TypeError):
    sf.render_fundus(0, 1, no_such_option=True)
  with pytest.raises(TypeError, match="rng_or_seed"):
    sf.render_fundus("seed", 1)


# ---------------------------------------------------------------------------
# Class counts and seeds.


def test_allocate_counts_known_answers():
  assert examples.allocate_counts(10, [1, 1, 1, 1, 1]).tolist() == [2, 2, 2, 2, 2]
  # Equal remainders go to the lower grades first.
  assert examples.allocate_counts(7, [1, 1, 1, 1, 1]).tolist() == [2, 2, 1, 1, 1]
  assert examples.allocate_counts(15, sf.KAGGLE_TRAIN_COUNTS, min_count=3).tolist() == [3] * 5
  # Shares 6.8, 1.7, 1.5: floors 6+1+1, the largest remainders (.8, .7) get the two left.
  assert examples.allocate_counts(10, [68, 17, 15]).tolist() == [7, 2, 1]
  with pytest.raises(ValueError):
    examples.allocate_counts(10, [1, 1, 1, 1, 1], min_count=3)


@pytest.mark.parametrize("total", [10_000, 2_000, 997])
def test_allocate_counts_matches_kaggle_proportions(total):
  counts = examples.allocate_counts(total, sf.KAGGLE_TRAIN_COUNTS, min_count=3)
  exact = total * np.array(sf.KAGGLE_TRAIN_COUNTS) / sum(sf.KAGGLE_TRAIN_COUNTS)
  assert counts.sum() == total
  assert (np.abs(counts - exact) < 1).all(), (counts, exact)


def test_split_labels_and_example_seeds():
  counts = [5, 1, 2, 1, 3]
  labels = examples.split_labels(0, "train", counts)
  assert np.bincount(labels, minlength=5).tolist() == counts
  assert (labels == examples.split_labels(0, "train", counts)).all()
  assert not (labels == examples.split_labels(1, "train", counts)).all()
  state = lambda *a: examples.example_seed(*a).generate_state(4).tolist()
  assert state(0, "train", 3) == state(0, "train", 3)
  assert len({str(state(0, "train", 3)), str(state(0, "test", 3)), str(state(0, "train", 4)),
              str(state(1, "train", 3))}) == 4


def test_examples_do_not_depend_on_generation_order():
  spec = examples.ExampleSpec(seed=7, photo_size=128, image_size=64)
  jobs = [("train", 0, 2), ("train", 1, 0), ("test", 0, 4)]
  forward = [examples.make_example(spec, *job, encode=False) for job in jobs]
  backward = [examples.make_example(spec, *job, encode=False) for job in reversed(jobs)][::-1]
  for a, b in zip(forward, backward):
    assert a["photo"] == b["photo"] and (a["image"] == b["image"]).all()


def test_example_masks_line_up_with_the_preprocessed_lesions():
  """In the model input, lesions change pixels where the masks say they are."""
  spec = examples.ExampleSpec(seed=1, photo_size=384, image_size=192, jpeg_quality=(95, 95))
  for index in range(3):
    example = examples.make_example(spec, "train", index, 3, encode=False)
    clean = examples.make_example(spec, "train", index, 3, encode=False, draw_lesions=False)
    masks = example["masks"]
    union = _lesion_union(masks)
    assert union.any()
    change = np.abs(example["image"].astype(int) - clean["image"].astype(int)).sum(-1)
    # Preprocessing blurs (sigma 0.5 px, then the local average at size / 60 px),
    # and the JPEG blocks are 8x8 (16x16 for colour) photograph pixels: allow
    # a margin around the masks.
    near = cv2.dilate(union.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert change[near].sum() > 0.8 * change.sum(), index
    assert change[union].mean() > 10 * change[~near].mean(), index
    # And the stored masks are the lesions', not some other example's.
    assert example["name"] == clean["name"] == f"train_{index:06d}"


def test_grade_1_microaneurysms_survive_in_the_model_input():
  """Every microaneurysm of a grade-1 photograph is in the input's mask, and visible there."""
  # synthetic_fundus/runlocal's sizes.
  spec = examples.ExampleSpec(seed=0, photo_size=256, image_size=128)
  fov = preprocess.field_of_view(spec.image_size)
  contrasts = []
  for index in range(8):
    example = examples.make_example(spec, "test", index, 1, encode=False)
    clean = examples.make_example(spec, "test", index, 1, encode=False, draw_lesions=False)
    render_seq, _ = examples.example_seed(spec.seed, "test", index).spawn(2)
    _, photo_masks = sf.render_fundus(render_seq, 1, size=spec.photo_size)
    geometry = preprocess.find_retina(examples.decode_image(example["photo"]))
    scale = spec.image_size / geometry.diameter
    count, components = cv2.connectedComponents(photo_masks["microaneurysm"].astype(np.uint8))
    assert count - 1 >= 1
    change = np.abs(example["image"].astype(int) - clean["image"].astype(int)).max(-1)
    for component in range(1, count):
      rows, cols = np.nonzero(components == component)
      # Where the lesion's photograph pixels land in the input (pixel centres as OpenCV's).
      x = (cols - geometry.center_x) * scale + (spec.image_size - 1) / 2
      y = (rows - geometry.center_y) * scale + (spec.image_size - 1) / 2
      footprint = np.zeros_like(fov)
      footprint[np.clip(np.round(y).astype(int), 0, spec.image_size - 1),
                np.clip(np.round(x).astype(int), 0, spec.image_size - 1)] = True
      footprint &= fov
      assert footprint.any(), (index, component)  # inside the field of view
      kept = example["masks"]["microaneurysm"] & footprint
      assert kept.any(), (index, component)
      contrasts.append(change[kept].max())
  # The lesions also change the input's pixels there, well above JPEG noise.
  assert min(contrasts) >= 20, contrasts


# ---------------------------------------------------------------------------
# Configs.


def test_data_configs_match_the_builder_configs():
  from configs import base as base_configs  # pylint: disable=g-import-not-at-top
  from drig.data import synthetic_fundus_builder as sfb  # pylint: disable=g-import-not-at-top
  for arg in (None, "runlocal", "tiny"):
    data = data_configs.get_config(arg).data
    builder_config = sfb.make_config(data.builder_config)
    assert builder_config.image_size == data.image_size
    train = base_configs.get_config(arg).data
    assert (train.name, train.builder_config, train.image_size) == (
        data.name, data.builder_config, data.image_size)
  default = sfb.make_config("default")
  assert (default.num_train, default.num_validation, default.num_test) == (10_000, 2_000, 2_000)
  assert (default.photo_size, default.image_size) == (512, 256)
  custom = sfb.make_config("tiny", num_train=12, seed=None)
  assert custom.name.startswith("tiny-") and custom.num_train == 12
  assert custom.name == sfb.make_config("tiny", num_train=12).name
  assert custom.name != sfb.make_config("tiny", num_train=13).name
  with pytest.raises(ValueError, match="cannot override"):
    sfb.make_config("tiny", no_such_field=1)


def test_importing_does_not_import_tensorflow():
  code = ("import sys; import drig.data.datasets, drig.data.synthetic_fundus, drig.prepare_data;"
          " assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------
# TFDS builder, end to end (generated once per module, with worker processes).


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic_fundus")
  config = data_configs.get_config("tiny")
  summary = datasets.prepare_data(config, workdir=root / "work", data_dir=str(root / "tfds"),
                                  num_workers=2)
  builder = datasets.load_builder("synthetic_fundus", data_dir=root / "tfds",
                                  builder_config="tiny", prepare=False)
  return summary, builder


def test_builder_splits_and_exact_class_counts(prepared):
  summary, builder = prepared
  config = builder.builder_config
  assert summary.generated
  for split, n in (("train", 40), ("validation", 15), ("test", 15)):
    assert builder.info.splits[split].num_examples == n
    assert summary.counts[split] == config.class_counts(split).tolist()
    assert min(summary.counts[split]) >= 3
  assert summary.counts["train"] == examples.allocate_counts(40, sf.KAGGLE_TRAIN_COUNTS, 3).tolist()


def test_builder_data_source_examples(prepared):
  _, builder = prepared
  source = builder.as_data_source("train")
  assert len(source) == 40
  spec = builder.builder_config.example_spec()
  for index in (0, 7, 39):
    example = source[index]
    assert example["name"] == f"train_{index:06d}".encode()
    assert example["image"].shape == (80, 80, 3) and example["image"].dtype == np.uint8
    assert example["photo"].shape == (160, 160, 3) and example["photo"].dtype == np.uint8
    assert set(example["masks"]) == set(lesions.MASK_NAMES)
    for mask in example["masks"].values():
      assert mask.shape == (80, 80) and mask.dtype == np.bool_
    # Worker processes made exactly what this process makes for (seed, split, index).
    expected = examples.make_example(spec, "train", index, int(example["label"]), encode=False)
    assert (example["image"] == expected["image"]).all()
    for name in lesions.MASK_NAMES:
      assert (example["masks"][name] == expected["masks"][name]).all(), name
    assert (example["photo"] == examples.decode_image(expected["photo"])).all()
    # Outside the field of view the input is half gray and the masks are empty.
    assert (example["image"][0, 0] == 128).all()
    assert not any(m[0, 0] for m in example["masks"].values())


def test_builder_lesion_pixels_stand_out(prepared):
  """In stored inputs, haemorrhage pixels are darker than the rest of the field of view."""
  _, builder = prepared
  source = builder.as_data_source("train")
  from drig import preprocess  # pylint: disable=g-import-not-at-top
  fov = preprocess.field_of_view(80)
  gaps = []
  for index in range(len(source)):
    example = source[index]
    mask = example["masks"]["haemorrhage"]
    if example["label"] < 2:
      assert not mask.any()
      continue
    if mask.sum() < 3:
      continue
    lesion_free = fov & ~_lesion_union(example["masks"])
    brightness = example["image"].astype(float).sum(-1)
    gaps.append(brightness[mask].mean() - brightness[lesion_free].mean())
  # Channel sums: 0-765, 384 is the gray background. A mask is the lesion's support in
  # the input: its fringe pixels are only partly haemorrhage, which dilutes the mean.
  assert len(gaps) >= 3 and max(gaps) < -10 and np.mean(gaps) < -25, gaps


def test_tfrecord_copy_reads_through_tfds_load(prepared, tmp_path):
  """tf.data needs the tfrecord format (TFDS cannot make tf.data from array_record).

  The copy is generated in this process; the array_record copy by worker
  processes. Both must hold the same examples.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _, builder = prepared
  source = builder.as_data_source("test")
  with pytest.raises(NotImplementedError):
    builder.as_dataset("test")
  datasets.load_builder("synthetic_fundus", data_dir=tmp_path, builder_config="tiny",
                        file_format="tfrecord", num_workers=0)
  dataset = tfds.load("synthetic_fundus/tiny", split="test", data_dir=tmp_path, download=False,
                      shuffle_files=False)
  rows = list(dataset.as_numpy_iterator())
  assert len(rows) == len(source) == 15
  by_name = {row["name"]: row for row in rows}
  for index in range(len(source)):
    expected = source[index]
    row = by_name[expected["name"]]
    assert row["label"] == expected["label"]
    assert row["image"].shape == (80, 80, 3) and row["image"].dtype == np.uint8
    assert (row["image"] == expected["image"]).all()
    for name in lesions.MASK_NAMES:
      assert row["masks"][name].dtype == np.bool_
      assert (row["masks"][name] == expected["masks"][name]).all()


def test_prepare_data_reports_and_reuses(prepared, tmp_path):
  summary, builder = prepared
  assert summary.path == os.fspath(builder.data_dir)
  assert summary.num_bytes > 0 and summary.seconds > 0
  text = summary.format()
  assert "synthetic_fundus/tiny/1.1.0" in text and "train" in text
  assert [os.path.basename(p) for p in summary.previews] == [
      "preview_train.png", "preview_validation.png", "preview_test.png"]
  for path in summary.previews:
    preview = cv2.imread(path)
    assert preview is not None and preview.shape[1] == 3 * 256 and preview.std() > 20
  # A second call finds the data and regenerates nothing.
  again = datasets.prepare_data(data_configs.get_config("tiny"), workdir=tmp_path,
                                data_dir=str(builder.data_dir_root), num_preview=0)
  assert not again.generated and again.counts == summary.counts and not again.previews


def test_preview_indices_cover_every_grade():
  grades = np.array([0, 0, 0, 0, 2, 0, 1, 4, 0, 3, 0])
  chosen = datasets._preview_indices(grades, 6)  # pylint: disable=protected-access
  assert sorted(set(grades[chosen])) == [0, 1, 2, 3, 4] and len(chosen) == 6
  assert list(grades[chosen]) == sorted(grades[chosen])


def test_load_builder_errors_clearly(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError, match="not prepared"):
    datasets.load_builder("synthetic_fundus", data_dir=tmp_path, builder_config="tiny",
                          prepare=False)
