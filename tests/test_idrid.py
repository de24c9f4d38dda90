"""End-to-end tests of the IDRiD builder on a fake manual download with the official layout."""

import os
import shutil

import cv2
import numpy as np
import pytest

from drig import preprocess
from drig.data import datasets
from drig.data import idrid
from drig.data import lesions
from drig.data.synthetic_fundus import render_fundus

SIZE = 64
SEG = os.path.join("A. Segmentation")
GRADING = os.path.join("B. Disease Grading")

# The fake photographs: a synthetic fundus rendered square with the retina
# centred, then cut at the top and bottom and padded left and right to IDRiD's
# 3:2 frame (4288 x 2848 scaled down), so the retina's geometry is known here.
RENDER = 400
RADIUS = 0.45 * RENDER
CUT = 30  # rows cut at the top and at the bottom
PAD = 56  # columns of black added left and right
CENTER = (RENDER / 2 + PAD, RENDER / 2 - CUT)  # (x, y) in the photograph
# A drawn hard exudate (yellow disc) and a one-pixel microaneurysm, relative to
# the retina's centre, in photograph pixels.
BLOB_OFFSET, BLOB_RADIUS = (60, -40), 12
DOT_OFFSET = (-70, 30)

SEG_TRAIN, SEG_TEST = ("IDRiD_01", "IDRiD_02", "IDRiD_03"), ("IDRiD_55", "IDRiD_56")
NO_SOFT_EXUDATE = "IDRiD_02"  # its _SE.tif is absent, as for 41 of IDRiD's 81 images
BAD_HAEMORRHAGE = "IDRiD_03"  # its _HE.tif is garbage
# Grading: name -> (DR grade, risk of macular edema).
GRADING_TRAIN = {"IDRiD_001": (3, 2), "IDRiD_002": (0, 0), "IDRiD_003": (4, 1)}
GRADING_TRAIN_BAD = {"IDRiD_004": (2, 1), "IDRiD_005": (1, 0)}  # truncated JPEG, not an image
GRADING_TRAIN_UNGRADABLE = "IDRiD_006"  # blank grade in the CSV
GRADING_TEST = {"IDRiD_001": (2, 0), "IDRiD_002": (1, 1)}


def photograph(seed, grade):
  """(RGB photograph [340, 512, 3], its synthetic masks) with the known geometry."""
  photo, masks = render_fundus(seed, grade, size=RENDER, retina_radius=(0.45, 0.45),
                               max_offset=(0.0, 0.0), crop_probability=0.0,
                               notch_probability=0.0, dust_probability=0.0)
  crop = lambda a: np.pad(a[CUT:RENDER - CUT], ((0, 0), (PAD, PAD)) + ((0, 0),) * (a.ndim - 2))
  return crop(photo), {k: crop(v) for k, v in masks.items()}


def blob_mask(shape):
  mask = np.zeros(shape[:2], np.uint8)
  center = (int(CENTER[0] + BLOB_OFFSET[0]), int(CENTER[1] + BLOB_OFFSET[1]))
  cv2.circle(mask, center, BLOB_RADIUS, 1, -1)
  return mask.astype(bool)


def write_jpeg(path, rgb):
  ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, 95])
  assert ok
  with open(path, "wb") as f:
    f.write(data.tobytes())
  return data.tobytes()


def write_mask_tif(path, mask):
  # IDRiD's masks are RGB TIFFs with the lesion in pure red.
  rgb = np.zeros(mask.shape + (3,), np.uint8)
  rgb[mask] = (255, 0, 0)
  assert cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_grades_csv(path, grades, trailing_columns):
  # The published files: a space after "edema", and (training) empty columns.
  extra = "," * trailing_columns
  lines = [f"Image name,Retinopathy grade,Risk of macular edema {extra}"]
  lines += [f"{name},{g},{e}{extra}" for name, (g, e) in grades.items()]
  with open(path, "w", newline="") as f:
    f.write("\r\n".join(lines) + "\r\n")


def make_manual_dir(root):
  seed = 0
  for split, names in (("train", SEG_TRAIN), ("test", SEG_TEST)):
    set_dir = idrid.SET_DIRS[split]
    images = os.path.join(root, SEG, "1. Original Images", set_dir)
    os.makedirs(images)
    truth = os.path.join(root, SEG, "2. All Segmentation Groundtruths", set_dir)
    for folder, _ in idrid.IDRID_MASKS.values():
      os.makedirs(os.path.join(truth, folder))
    for name in names:
      seed += 1
      photo, masks = photograph(seed, 2)
      blob = blob_mask(photo.shape)
      photo[blob] = (250, 230, 90)
      write_jpeg(os.path.join(images, f"{name}.jpg"), photo)
      dot = np.zeros(photo.shape[:2], bool)
      dot[int(CENTER[1] + DOT_OFFSET[1]), int(CENTER[0] + DOT_OFFSET[0])] = True
      patch = np.zeros(photo.shape[:2], bool)
      patch[150:170, 200:230] = True
      files = {"microaneurysm": dot, "haemorrhage": masks["haemorrhage"], "hard_exudate": blob,
               "cotton_wool_spot": patch, "optic_disc": masks["optic_disc"]}
      for mask_name, (folder, suffix) in idrid.IDRID_MASKS.items():
        path = os.path.join(truth, folder, f"{name}_{suffix}.tif")
        if name == NO_SOFT_EXUDATE and mask_name == "cotton_wool_spot":
          continue
        if name == BAD_HAEMORRHAGE and mask_name == "haemorrhage":
          with open(path, "wb") as f:
            f.write(b"II*\x00 not really a tiff")
          continue
        write_mask_tif(path, files[mask_name])
  for split, grades, trailing in (("train", GRADING_TRAIN, 8), ("test", GRADING_TEST, 0)):
    images = os.path.join(root, GRADING, "1. Original Images", idrid.SET_DIRS[split])
    os.makedirs(images)
    for name, (grade, _) in grades.items():
      seed += 1
      write_jpeg(os.path.join(images, f"{name}.jpg"), photograph(seed, grade)[0])
    rows = dict(grades)
    if split == "train":
      data = write_jpeg(os.path.join(images, "IDRiD_004.jpg"), photograph(99, 2)[0])
      with open(os.path.join(images, "IDRiD_004.jpg"), "wb") as f:
        f.write(data[:len(data) // 2])
      with open(os.path.join(images, "IDRiD_005.jpg"), "wb") as f:
        f.write(b"not an image at all" * 20)
      rows.update(GRADING_TRAIN_BAD)
      rows[GRADING_TRAIN_UNGRADABLE] = ("", "")
      write_jpeg(os.path.join(images, f"{GRADING_TRAIN_UNGRADABLE}.jpg"), photograph(98, 1)[0])
    truth = os.path.join(root, GRADING, "2. Groundtruths")
    os.makedirs(truth, exist_ok=True)
    write_grades_csv(os.path.join(truth, idrid.GRADES_CSVS[split]), rows, trailing)
  return root


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  return make_manual_dir(str(tmp_path_factory.mktemp("idrid")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def segmentation(manual_dir, data_dir):
  return idrid.prepare(idrid.make_config("segmentation", SIZE), data_dir=data_dir,
                       manual_dir=manual_dir, num_workers=0)


@pytest.fixture(scope="module")
def grading(manual_dir, data_dir):
  # Two worker processes: the path real generation takes.
  return idrid.prepare(idrid.make_config("grading", SIZE), data_dir=data_dir,
                       manual_dir=manual_dir, num_workers=2)


def examples_by_name(builder, split):
  source = builder.as_data_source(split)
  return {ex["name"].decode(): ex for ex in (source[i] for i in range(len(source)))}


def expected_position(offset):
  """Where preprocessing puts a photograph point at ``offset`` from the retina's centre."""
  return tuple((SIZE - 1) / 2 + o * SIZE / (2 * RADIUS) for o in offset)


def test_segmentation_splits_features_and_labels(segmentation):
  assert {k: v.num_examples for k, v in segmentation.info.splits.items()} == {
      "train": len(SEG_TRAIN), "test": len(SEG_TEST)}
  features = segmentation.info.features
  assert set(features["masks"].keys()) == set(lesions.MASK_NAMES)
  assert set(features["annotated"].keys()) == set(lesions.MASK_NAMES)
  for split, names in (("train", SEG_TRAIN), ("test", SEG_TEST)):
    examples = examples_by_name(segmentation, split)
    assert sorted(examples) == list(names)
    for ex in examples.values():
      # IDRiD publishes no grade for the segmentation images.
      assert int(ex["label"]) == -1 and int(ex["macular_edema"]) == -1
      assert ex["image"].shape == (SIZE, SIZE, 3) and ex["image"].dtype == np.uint8
      assert ex["photo"].shape == (2 * SIZE, 2 * SIZE, 3)
      for name in lesions.MASK_NAMES:
        assert ex["masks"][name].shape == (SIZE, SIZE) and ex["masks"][name].dtype == bool


def test_images_equal_preprocess_file(segmentation, grading, manual_dir):
  for builder, part in ((segmentation, SEG), (grading, GRADING)):
    for split in ("train", "test"):
      folder = os.path.join(manual_dir, part, "1. Original Images", idrid.SET_DIRS[split])
      for name, ex in examples_by_name(builder, split).items():
        expected = preprocess.preprocess_file(os.path.join(folder, f"{name}.jpg"), SIZE)
        np.testing.assert_array_equal(ex["image"], expected, err_msg=name)  # PNG: lossless


def centroid(mask):
  ys, xs = np.nonzero(mask)
  return xs.mean(), ys.mean()


def test_masks_land_where_the_lesions_were_drawn(segmentation):
  blob_x, blob_y = expected_position(BLOB_OFFSET)
  dot_x, dot_y = expected_position(DOT_OFFSET)
  blob_radius = BLOB_RADIUS * SIZE / (2 * RADIUS)
  for split in ("train", "test"):
    for name, ex in examples_by_name(segmentation, split).items():
      exudate = ex["masks"]["hard_exudate"]
      x, y = centroid(exudate)
      assert abs(x - blob_x) < 0.6 and abs(y - blob_y) < 0.6, (name, x, y, blob_x, blob_y)
      # Max-pooling: at least the blob's area, at most a one-pixel fringe more.
      assert np.pi * blob_radius ** 2 <= exudate.sum() <= np.pi * (blob_radius + 1.5) ** 2
      # The drawn blob is in the image right there: bright after local-average subtraction.
      image = ex["image"].astype(float).sum(axis=2)
      fov = preprocess.field_of_view(SIZE)
      assert image[exudate].mean() > np.percentile(image[fov & ~exudate], 95)
      # A single full-resolution pixel (5.6 of them per output pixel) survives.
      dot = ex["masks"]["microaneurysm"]
      assert 1 <= dot.sum() <= 4
      x, y = centroid(dot)
      assert abs(x - dot_x) <= 1 and abs(y - dot_y) <= 1
      # Types IDRiD lacks are empty.
      for lacking in ("venous_beading", "neovascularisation", "preretinal_haemorrhage"):
        assert not ex["masks"][lacking].any() and not ex["annotated"][lacking]


def test_optic_disc_mask_follows_the_photograph(segmentation, manual_dir):
  """The rendered optic disc's mask maps like any point: centroid and area."""
  scale = SIZE / (2 * RADIUS)
  truth = os.path.join(manual_dir, SEG, "2. All Segmentation Groundtruths")
  for split in ("train", "test"):
    folder = os.path.join(truth, idrid.SET_DIRS[split], "5. Optic Disc")
    for name, ex in examples_by_name(segmentation, split).items():
      full = cv2.imread(os.path.join(folder, f"{name}_OD.tif"), cv2.IMREAD_UNCHANGED).any(2)
      fx, fy = centroid(full)
      ex_x, ex_y = expected_position((fx - CENTER[0], fy - CENTER[1]))
      x, y = centroid(ex["masks"]["optic_disc"])
      assert abs(x - ex_x) < 0.6 and abs(y - ex_y) < 0.6, name
      area = full.sum() * scale ** 2
      assert area <= ex["masks"]["optic_disc"].sum() <= area + 4 * np.sqrt(area * np.pi) + 4


def test_missing_and_bad_masks(segmentation, manual_dir):
  examples = examples_by_name(segmentation, "train")
  for name, ex in examples.items():
    for mask_name in idrid.IDRID_MASKS:
      # A missing file is an empty, annotated mask; a garbage file is not annotated.
      expected = not (name == BAD_HAEMORRHAGE and mask_name == "haemorrhage")
      assert bool(ex["annotated"][mask_name]) == expected, (name, mask_name)
  assert not examples[NO_SOFT_EXUDATE]["masks"]["cotton_wool_spot"].any()
  assert examples["IDRiD_01"]["masks"]["cotton_wool_spot"].any()
  assert not examples[BAD_HAEMORRHAGE]["masks"]["haemorrhage"].any()
  report = idrid.read_bad_image_report(segmentation)
  train = report["splits"]["train"]
  assert report["num_bad"] == 0
  assert [(m["name"], m["mask"]) for m in train["missing_masks"]] == [
      (NO_SOFT_EXUDATE, "cotton_wool_spot")]
  assert train["missing_masks"][0]["file"].endswith(
      os.path.join("a. Training Set", "4. Soft Exudates",
                   f"{NO_SOFT_EXUDATE}_SE.tif"))
  assert [(m["name"], m["mask"]) for m in train["bad_masks"]] == [
      (BAD_HAEMORRHAGE, "haemorrhage")]
  assert train["mask_files"] == {"microaneurysm": 3, "haemorrhage": 2, "hard_exudate": 3,
                                 "cotton_wool_spot": 2, "optic_disc": 3}
  assert report["annotated_types"] == sorted(idrid.IDRID_MASKS)


def test_grading_labels_and_bad_images_reported(grading, manual_dir):
  assert {k: v.num_examples for k, v in grading.info.splits.items()} == {
      "train": len(GRADING_TRAIN), "test": len(GRADING_TEST)}
  for split, grades in (("train", GRADING_TRAIN), ("test", GRADING_TEST)):
    examples = examples_by_name(grading, split)
    assert {n: (int(ex["label"]), int(ex["macular_edema"])) for n, ex in examples.items()} == \
        grades
    for ex in examples.values():
      assert not any(ex["annotated"][k] for k in lesions.MASK_NAMES)
      assert not any(ex["masks"][k].any() for k in lesions.MASK_NAMES)
  report = idrid.read_bad_image_report(grading)
  assert report["num_bad"] == 3
  train = report["splits"]["train"]
  assert train["listed"] == 6 and train["written"] == 3
  problems = {b["name"]: b["problem"] for b in train["bad"]}
  assert set(problems) == {"IDRiD_004", "IDRiD_005", GRADING_TRAIN_UNGRADABLE}
  assert "truncated" in problems["IDRiD_004"]
  assert "not a readable image" in problems["IDRiD_005"]
  assert "ungradable" in problems[GRADING_TRAIN_UNGRADABLE]
  images = os.path.join(manual_dir, GRADING, "1. Original Images", "a. Training Set")
  assert {b["file"] for b in train["bad"] if b["name"] != GRADING_TRAIN_UNGRADABLE} == {
      os.path.join(images, "IDRiD_004.jpg"), os.path.join(images, "IDRiD_005.jpg")}
  assert report["splits"]["test"]["bad"] == []


def test_registered_with_load_builder(segmentation, grading, data_dir):
  for config in (idrid.make_config("segmentation", SIZE), idrid.make_config("grading", SIZE)):
    builder = datasets.load_builder("idrid", data_dir=data_dir, builder_config=config,
                                    prepare=False)
    assert builder.info.full_name == f"idrid/{config.name}/1.0.0"
  assert datasets.load_builder("idrid", data_dir=data_dir, builder_config=f"grading-{SIZE}",
                               prepare=False).is_prepared()


def test_missing_folders_are_named(manual_dir, tmp_path):
  with pytest.raises(idrid.ManualDownloadError, match="does not exist"):
    idrid.check_manual_dir(tmp_path / "nowhere")
  with pytest.raises(idrid.ManualDownloadError, match="No manual directory"):
    idrid.check_manual_dir(None, "grading")
  # Only the segmentation part: the grading configs name what is missing.
  partial = tmp_path / "partial"
  shutil.copytree(os.path.join(manual_dir, SEG), partial / SEG)
  idrid.check_manual_dir(partial, "segmentation")
  with pytest.raises(idrid.ManualDownloadError) as e:
    idrid.check_manual_dir(partial, "grading")
  assert os.path.join(str(partial), GRADING, "1. Original Images") in str(e.value)
  assert "ieee-dataport.org" in str(e.value)
  # A removed mask folder and a removed CSV are named by their full expected paths.
  shutil.copytree(os.path.join(manual_dir, GRADING), partial / GRADING)
  os.remove(partial / GRADING / "2. Groundtruths" / idrid.GRADES_CSVS["test"])
  shutil.rmtree(partial / SEG / "2. All Segmentation Groundtruths" / "b. Testing Set"
                / "3. Hard Exudates")
  with pytest.raises(idrid.ManualDownloadError) as e:
    idrid.check_manual_dir(partial, "grading")
  assert str(partial / GRADING / "2. Groundtruths" / idrid.GRADES_CSVS["test"]) in str(e.value)
  with pytest.raises(idrid.ManualDownloadError) as e:
    idrid.check_manual_dir(partial, "segmentation")
  assert str(partial / SEG / "2. All Segmentation Groundtruths" / "b. Testing Set"
             / "3. Hard Exudates") in str(e.value)
  # From the builder too, before anything is generated.
  with pytest.raises(idrid.ManualDownloadError, match="Hard Exudates"):
    idrid.prepare(idrid.make_config("segmentation", SIZE), data_dir=tmp_path / "tfds",
                  manual_dir=partial, num_workers=0)
  # An empty image folder is incomplete too.
  empty = partial / SEG / "1. Original Images" / "a. Training Set"
  shutil.rmtree(empty)
  os.makedirs(empty)
  with pytest.raises(idrid.ManualDownloadError, match="no .jpg images"):
    idrid.check_manual_dir(partial, "segmentation")


def test_tolerant_layout(manual_dir, tmp_path):
  """A part one folder deeper and sloppier names resolve to the same files."""
  nested = tmp_path / "nested"
  shutil.copytree(os.path.join(manual_dir, GRADING), nested / "B.%20Disease%20Grading" / GRADING)
  renamed = nested / "B.%20Disease%20Grading" / GRADING / "2. Groundtruths"
  os.rename(renamed / idrid.GRADES_CSVS["train"],
            renamed / "IDRiD_Disease_Grading_Training_Labels.csv")
  layout = idrid.check_manual_dir(nested, "grading")
  assert layout.grades["train"] == str(renamed / "IDRiD_Disease_Grading_Training_Labels.csv")
  entries, bad, unlisted = idrid.grading_entries(layout, "train")
  assert [e.name for e in entries] == list(GRADING_TRAIN) + list(GRADING_TRAIN_BAD)
  assert [b["name"] for b in bad] == [GRADING_TRAIN_UNGRADABLE] and unlisted == []


def test_read_grades_columns(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_text("Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,5,0\n"
                  "IDRiD_002,2,1\nIDRiD_002,3,1\n\n")
  rows, problems = idrid.read_grades(str(path))
  assert rows == [("IDRiD_002", 2, 1)]
  assert "not a grade 0-4" in problems[0]["problem"] and "repeats" in problems[1]["problem"]
  path.write_text("Image,level\nIDRiD_001,1\n")
  with pytest.raises(ValueError, match="Image name"):
    idrid.read_grades(str(path))


def test_config_names():
  assert [c.name for c in idrid.Idrid.BUILDER_CONFIGS] == [
      "segmentation-256", "grading-256", "segmentation-512", "grading-512"]
  assert idrid.make_config("grading", 128).photo_size == 256
  custom = idrid.make_config("segmentation", 256, preprocess_options={"denoise_sigma": 0.0})
  assert custom.name.startswith("segmentation-256-") and custom.name != "segmentation-256"
  assert custom.name == idrid.make_config(
      "segmentation", 256, preprocess_options={"denoise_sigma": 0.0}).name
  with pytest.raises(ValueError, match="task"):
    idrid.make_config("localization")
  # IDRiD's folder names are the registry's IDRiD class names.
  for name, (folder, _) in idrid.IDRID_MASKS.items():
    assert folder.split(". ", 1)[1] == lesions.mask_type(name).idrid_name


def test_prepare_data_counts_ungraded_segmentation_images(segmentation, data_dir, tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"name": "idrid", "builder_config": f"segmentation-{SIZE}",
                                      "data_dir": data_dir, "manual_dir": ""})
  summary = datasets.prepare_data(config, workdir=str(tmp_path), num_preview=2)
  assert not summary.generated
  assert summary.ungraded == {"train": len(SEG_TRAIN), "test": len(SEG_TEST)}
  assert all(counts == [0] * 5 for counts in summary.counts.values())
  assert summary.num_examples == len(SEG_TRAIN) + len(SEG_TEST)
  assert "ungraded" in summary.format()
