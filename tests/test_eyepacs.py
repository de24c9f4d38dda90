"""End-to-end tests of the EyePACS builder on a fake Kaggle manual download."""

import csv
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from drig import input_pipeline
from drig import preprocess
from drig.data import eyepacs
from drig.input import labels as labels_lib
from drig.input import sampling

SIZE = 64

# name -> level of the good training photographs, and of the two bad ones.
TRAIN = {"1_left": 0, "1_right": 1, "2_left": 2, "2_right": 3, "3_left": 4, "3_right": 0}
TRAIN_BAD = {"4_left": 2, "4_right": 0}  # truncated JPEG, all black
# Kaggle's test images with the solution file's level and Usage.
TEST = {"10_left": (1, "Public"), "10_right": (0, "Private"), "11_left": (4, "Public"),
        "11_right": (2, "Private"), "12_left": (3, "Private")}
SAMPLE = ("13_left", "13_right")


def fundus_photo(seed, grade):
  """An RGB fundus photograph framed like EyePACS (wider than high, black sides)."""
  try:
    from drig.data.synthetic_fundus import render_fundus  # pylint: disable=g-import-not-at-top
    photo = render_fundus(seed, grade, size=240)[0]
  except ImportError:
    rng = np.random.default_rng(seed)
    photo = np.zeros((240, 240, 3), np.uint8)
    cv2.circle(photo, (120, 120), 110, (200, 90, 40), -1)
    for _ in range(8):
      p, q = rng.integers(40, 200, (2, 2))
      cv2.line(photo, tuple(map(int, p)), tuple(map(int, q)), (120, 30, 20), 2)
  return np.pad(photo, ((0, 0), (50, 50), (0, 0)))


def write_jpeg(path, rgb, quality=95):
  ok, data = cv2.imencode(".jpeg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, quality])
  assert ok
  with open(path, "wb") as f:
    f.write(data.tobytes())
  return data.tobytes()


def make_manual_dir(root):
  """The Kaggle layout: train/, trainLabels.csv, test/, sample/, retinopathy_solution.csv."""
  for sub in ("train", "test", "sample"):
    os.makedirs(os.path.join(root, sub))
  for seed, (name, level) in enumerate(TRAIN.items()):
    write_jpeg(os.path.join(root, "train", f"{name}.jpeg"), fundus_photo(seed, level))
  data = write_jpeg(os.path.join(root, "train", "tmp.jpeg"), fundus_photo(99, 2))
  os.remove(os.path.join(root, "train", "tmp.jpeg"))
  with open(os.path.join(root, "train", "4_left.jpeg"), "wb") as f:
    f.write(data[:len(data) // 2])  # OpenCV still decodes this, padding with gray
  write_jpeg(os.path.join(root, "train", "4_right.jpeg"), np.zeros((240, 340, 3), np.uint8))
  with open(os.path.join(root, "trainLabels.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "level"])
    writer.writerows(list(TRAIN.items()) + list(TRAIN_BAD.items()))
  for seed, (name, (level, _)) in enumerate(TEST.items(), start=20):
    write_jpeg(os.path.join(root, "test", f"{name}.jpeg"), fundus_photo(seed, level))
  with open(os.path.join(root, eyepacs.TEST_LABELS_FILE), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "level", "Usage"])
    writer.writerows([(n, lv, u) for n, (lv, u) in TEST.items()])
  for seed, name in enumerate(SAMPLE, start=40):
    write_jpeg(os.path.join(root, "sample", f"{name}.jpeg"), fundus_photo(seed, 0))
  return root


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  return make_manual_dir(str(tmp_path_factory.mktemp("kaggle")))


@pytest.fixture(scope="module")
def built(manual_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  # Two worker processes: the path real generation takes.
  builder = eyepacs.prepare(eyepacs.EyepacsConfig(size=SIZE), data_dir=data_dir,
                            manual_dir=manual_dir, num_workers=2)
  return builder


def examples_by_name(builder, split, **kwargs):
  source = builder.as_data_source(split, **kwargs)
  return {ex["name"].decode(): ex for ex in (source[i] for i in range(len(source)))}


def test_splits_and_labels(built):
  assert built.info.file_format.value == "array_record"
  assert {k: v.num_examples for k, v in built.info.splits.items()} == {
      "train": len(TRAIN), "validation": 2, "test": 3, "sample": len(SAMPLE)}
  train = examples_by_name(built, "train")
  assert {n: int(ex["label"]) for n, ex in train.items()} == TRAIN
  for split, usage in (("validation", "Public"), ("test", "Private")):
    got = {n: int(ex["label"]) for n, ex in examples_by_name(built, split).items()}
    assert got == {n: lv for n, (lv, u) in TEST.items() if u == usage}
  sample = examples_by_name(built, "sample")
  assert sorted(sample) == sorted(SAMPLE)
  assert all(int(ex["label"]) == -1 for ex in sample.values())


def test_images_equal_preprocess_file(built, manual_dir):
  for split, folder in (("train", "train"), ("test", "test"), ("sample", "sample")):
    for name, ex in examples_by_name(built, split).items():
      expected = preprocess.preprocess_file(os.path.join(manual_dir, folder, f"{name}.jpeg"),
                                            SIZE)
      assert ex["image"].shape == (SIZE, SIZE, 3) and ex["image"].dtype == np.uint8
      # PNG storage is lossless: exactly equal.
      np.testing.assert_array_equal(ex["image"], expected, err_msg=name)


def test_bad_image_report_lists_the_two_bad_files(built, manual_dir):
  path = os.path.join(built.data_dir, eyepacs.BAD_IMAGE_REPORT)
  assert os.path.isfile(path)
  report = eyepacs.read_bad_image_report(built)
  assert report["num_bad"] == 2
  train = report["splits"]["train"]
  assert train["listed"] == len(TRAIN) + len(TRAIN_BAD) and train["written"] == len(TRAIN)
  problems = {b["name"]: b["problem"] for b in train["bad"]}
  assert set(problems) == set(TRAIN_BAD)
  assert "truncated" in problems["4_left"]
  assert "all black" in problems["4_right"]
  assert {b["file"] for b in train["bad"]} == {
      os.path.join(manual_dir, "train", f"{n}.jpeg") for n in TRAIN_BAD}
  for split in ("validation", "test", "sample"):
    assert report["splits"][split]["bad"] == []


def test_same_layout_as_the_tfds_reference_builder(built, manual_dir, tmp_path, monkeypatch):
  """TFDS's own builder reads the fake folder the same way (bad files aside)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.image_classification import (  # pylint: disable=g-import-not-at-top
      diabetic_retinopathy_detection as tfds_dr)
  # The reference downloads the test labels; hand it the local file instead.
  monkeypatch.setattr(tfds.download.DownloadManager, "download", lambda self, url: manual_dir)

  class Reference(tfds_dr.DiabeticRetinopathyDetection, skip_registration=True):
    # TFDS's code unchanged, except that it skips looking up its checksum file,
    # which needs the importlib_resources package (etils' [epath] extra).
    code_path = None

  reference = Reference(config="original", data_dir=str(tmp_path))
  reference.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  for split in ("train", "validation", "test", "sample"):
    # The reference stores the photographs as they are, bad ones included.
    ref = examples_by_name(reference, split, decoders={"image": tfds.decode.SkipDecoding()})
    ours = examples_by_name(built, split)
    if split == "train":
      assert set(TRAIN_BAD) <= set(ref)
    expected = {n: int(ex["label"]) for n, ex in ref.items() if n not in TRAIN_BAD}
    assert {n: int(ex["label"]) for n, ex in ours.items()} == expected, split


def test_label_index_of_the_tfds_source(built):
  source = built.as_data_source("train")
  full = np.array([int(source[i]["label"]) for i in range(len(source))])
  np.testing.assert_array_equal(labels_lib.load_labels(source), full)
  cache = [f for f in os.listdir(built.data_dir)
           if f.startswith(labels_lib.LABEL_CACHE_PREFIX)]
  assert cache == [f"{labels_lib.LABEL_CACHE_PREFIX}-label-train.npy"]
  np.testing.assert_array_equal(np.load(os.path.join(built.data_dir, cache[0])), full)
  np.testing.assert_array_equal(labels_lib.load_labels(source), full)


def test_input_pipeline_reads_the_prepared_data_set(built):
  """Balanced batches from the real array_record source, read by several threads."""
  source = built.as_data_source("train")
  labels = labels_lib.load_labels(source)
  proportions = (1, 1, 1, 1, 1)
  sampler = sampling.BalancedSampler(labels, 10, proportions, seed=3)
  it = input_pipeline.train_iterator(source, batch_size=10, proportions=proportions, seed=3,
                                     process_index=0, process_count=1, num_threads=4)
  for step in range(6):
    batch = next(it)
    indices = sampler(step)
    np.testing.assert_array_equal(batch["label"], labels[indices])
    np.testing.assert_array_equal(batch["image"], np.stack([source[int(i)]["image"]
                                                            for i in indices]))
  it.close()
  evals = list(input_pipeline.eval_batches(built.as_data_source("test"), 2, process_index=0,
                                           process_count=1))
  assert [b["mask"].tolist() for b in evals] == [[True, True], [True, False]]


def test_missing_test_labels_name_the_download(manual_dir, tmp_path):
  incomplete = str(tmp_path / "manual")
  shutil.copytree(manual_dir, incomplete)
  os.remove(os.path.join(incomplete, eyepacs.TEST_LABELS_FILE))
  with pytest.raises(eyepacs.ManualDownloadError) as e:
    eyepacs.prepare(eyepacs.EyepacsConfig(size=SIZE), data_dir=str(tmp_path / "tfds"),
                    manual_dir=incomplete, num_workers=0)
  message = str(e.value)
  assert os.path.join(incomplete, eyepacs.TEST_LABELS_FILE) in message
  assert eyepacs.TEST_LABELS_URL in message
  # Raised from the builder too, not only from prepare()'s early check.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = eyepacs.builder(eyepacs.EyepacsConfig(size=SIZE), data_dir=tmp_path / "tfds2",
                            num_workers=0)
  with pytest.raises(eyepacs.ManualDownloadError, match="retinopathy_solution.csv"):
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=incomplete))


def test_missing_manual_dir_and_folders_are_named(tmp_path):
  with pytest.raises(eyepacs.ManualDownloadError, match="does not exist"):
    eyepacs.check_manual_dir(tmp_path / "nowhere")
  with pytest.raises(eyepacs.ManualDownloadError, match="No manual directory"):
    eyepacs.check_manual_dir(None)
  os.makedirs(tmp_path / "partial" / "train")
  with pytest.raises(eyepacs.ManualDownloadError) as e:
    eyepacs.check_manual_dir(tmp_path / "partial")
  message = str(e.value)
  for entry in ("trainLabels.csv", "test/", "sample/", eyepacs.TEST_LABELS_FILE):
    assert entry in message
  assert f"{tmp_path / 'partial' / 'train'}/:" not in message  # present, so not listed
  assert "kaggle.com" in message


def test_each_bad_input_is_reported_not_raised(tmp_path):
  photo = fundus_photo(0, 2)
  cases = {}
  cases["garbage"] = tmp_path / "garbage.jpeg"
  cases["garbage"].write_bytes(b"this is not an image" * 10)
  cases["empty"] = tmp_path / "empty.jpeg"
  cases["empty"].write_bytes(b"")
  cases["gray"] = tmp_path / "gray.jpeg"  # no retina: a uniform frame
  write_jpeg(cases["gray"], np.full((240, 340, 3), 90, np.uint8))
  cases["missing"] = tmp_path / "missing.jpeg"
  expected = {"garbage": "not a readable image", "empty": "empty file", "gray": "no retina",
              "missing": "missing file"}
  for key, path in cases.items():
    png, problem, _ = eyepacs._process_photograph((str(path), SIZE, {}))
    assert png is None and expected[key] in problem, (key, problem)
  good = tmp_path / "good.jpeg"
  write_jpeg(good, photo)
  png, problem, _ = eyepacs._process_photograph((str(good), SIZE, {}))
  assert problem is None
  decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR),
                         cv2.COLOR_BGR2RGB)
  np.testing.assert_array_equal(decoded, preprocess.preprocess_file(str(good), SIZE))


def test_small_retina_is_kept_with_a_warning(tmp_path):
  small = tmp_path / "small.jpeg"
  write_jpeg(small, fundus_photo(1, 0)[::4, ::4])  # retina ~55 px < SIZE
  png, problem, warnings_ = eyepacs._process_photograph((str(small), SIZE, {}))
  assert problem is None and png is not None
  assert any("upsampling" in w for w in warnings_)


def test_jpeg_problem():
  data = cv2.imencode(".jpeg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
  assert eyepacs.jpeg_problem(data) is None
  assert eyepacs.jpeg_problem(data + b"\x00\x00") is None
  assert "truncated" in eyepacs.jpeg_problem(data[:-10])
  assert eyepacs.jpeg_problem(b"\x89PNG\r\n\x1a\n") is None  # not a JPEG: left to the decoder


def test_config_names_and_options():
  config = eyepacs.EyepacsConfig(size=128, preprocess_options={"denoise_sigma": 0.0})
  assert config.name == "drig-128" and "denoise_sigma=0.0" in config.description
  assert [c.name for c in eyepacs.Eyepacs.BUILDER_CONFIGS] == ["drig-256", "drig-512"]
  with pytest.raises(ValueError, match="size"):
    eyepacs.EyepacsConfig(preprocess_options={"size": 3})


_WORKER_FAULTS = r"""
import json, resource, sys
from drig import preprocess
from drig.data import generation

def faults_per_call(path, calls=6):
  for _ in range(2):  # warm-up
    preprocess.preprocess_file(path, 256)
  counts = []
  for _ in range(calls):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    preprocess.preprocess_file(path, 256)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return sorted(counts)[calls // 2]

generation.init_worker(keep_freed_memory=False)
default = faults_per_call(sys.argv[1])
generation.init_worker()
print(json.dumps({"default": default, "kept": faults_per_call(sys.argv[1])}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_generation_workers_reuse_freed_memory(tmp_path):
  """A worker's photographs after the first take (almost) no fresh pages."""
  # EyePACS-sized (3888x2592), written here so that the worker allocates nothing large first.
  photo = np.zeros((2592, 3888, 3), np.uint8)
  cv2.circle(photo, (1944, 1296), 1290, (35, 85, 185), -1)
  photo = cv2.add(photo, np.random.default_rng(0).integers(0, 6, photo.shape, np.uint8))
  path = tmp_path / "photo.jpeg"
  cv2.imwrite(str(path), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
  result = subprocess.run([sys.executable, "-c", _WORKER_FAULTS, str(path)],
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  faults = json.loads(result.stdout.strip().splitlines()[-1])
  # glibc's default took ~1,000 faults a call here (the 1/4-scale decode alone is
  # 1.9 MB, ~470 pages); kept, none.
  assert faults["kept"] < 50, faults
