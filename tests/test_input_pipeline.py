"""Tests of drig.input_pipeline on small in-memory sources with known answers."""

import itertools
import os

import numpy as np
import pytest

from drig import grading
from drig import input_pipeline as ip
from drig import preprocess
from drig.data import datasets
from drig.input import augmentation
from drig.input import labels as labels_lib
from drig.input import sampling

POSTER = (8, 1, 2, 1, 4)
# Kaggle's training grade counts (25810 / 2443 / 5292 / 873 / 708), divided by 10.
KAGGLE_TENTH = (2581, 244, 529, 87, 71)


def kaggle_like_labels(seed=0):
  labels = np.repeat(np.arange(5), KAGGLE_TENTH)
  return np.random.default_rng(seed).permutation(labels)


class FakeSource:
  """Random-access source whose images encode their own index (pixel [0, 0])."""

  def __init__(self, labels, size=8, expose_labels=True):
    self._labels = np.asarray(labels)
    self.size = size
    self.reads = 0
    if expose_labels:
      self.labels = self._labels

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, i):
    self.reads += 1
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
    image[0, 0] = (i % 256, (i // 256) % 256, 7)
    return {"image": image, "label": int(self._labels[i]), "extra": np.float32(i)}


def decode_index(images):
  return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


# ---------------------------------------------------------------------------
# Class counts and bad configs.


def test_class_counts_follow_the_poster():
  for k in (1, 2, 3):
    np.testing.assert_array_equal(sampling.class_counts(16 * k, POSTER),
                                  np.array([8, 1, 2, 1, 4]) * k)
  fractions = tuple(p / 16 for p in POSTER)
  np.testing.assert_array_equal(sampling.class_counts(32, fractions), [16, 2, 4, 2, 8])
  np.testing.assert_array_equal(sampling.class_counts(3, (1 / 3, 1 / 3, 1 / 3)), [1, 1, 1])


def test_batch_unit_is_the_smallest_batch_with_whole_class_counts():
  for proportions, unit in ((POSTER, 16), ((0.5, 0.25, 0.25), 4), ((1, 1, 1), 3), ((2, 2), 2)):
    assert sampling.batch_unit(proportions) == unit
    sampling.class_counts(unit, proportions)  # whole counts: no error
    for smaller in range(1, unit):
      with pytest.raises(ip.InputPipelineError):
        sampling.class_counts(smaller, proportions)


@pytest.mark.parametrize("batch_size,proportions,message", [
    (24, POSTER, "multiple of 16"),
    (32, (0.5, 0.2, 0.2), "sum to"),
    (32, (8, -1, 2, 1, 4), ">= 0"),
    (32, (0, 0, 0), "all zero"),
    (32, (), "empty"),
    (32, ("a", 1), "numbers"),
    (0, POSTER, "positive"),
    (16.0, POSTER, "positive integer"),
])
def test_bad_configs_raise(batch_size, proportions, message):
  with pytest.raises(ip.InputPipelineError, match=message):
    sampling.class_counts(batch_size, proportions)


def test_sampler_rejects_bad_labels_and_empty_classes():
  with pytest.raises(ip.InputPipelineError, match="outside"):
    sampling.BalancedSampler(np.array([0, 1, 5]), 16, POSTER)
  with pytest.raises(ip.InputPipelineError, match="no examples"):
    sampling.BalancedSampler(np.array([0, 1, 2, 3]), 16, POSTER)  # no grade 4
  with pytest.raises(ip.InputPipelineError, match="seed"):
    sampling.BalancedSampler(np.arange(5), 16, POSTER, seed=-1)
  # A class with zero share needs no examples.
  sampler = sampling.BalancedSampler(np.array([0, 0, 2]), 4, (1, 0, 1))
  assert sorted(np.bincount(np.array([0, 0, 2])[sampler(0)], minlength=3)) == [0, 2, 2]


# ---------------------------------------------------------------------------
# Balanced sampler.


def test_exact_class_counts_in_each_of_100_batches():
  labels = kaggle_like_labels()
  sampler = sampling.BalancedSampler(labels, 32, POSTER, seed=3)
  for step in range(100):
    batch = sampler(step)
    assert batch.shape == (32,)
    np.testing.assert_array_equal(np.bincount(labels[batch], minlength=5), [16, 2, 4, 2, 8])


def test_each_class_is_read_in_epochs_without_replacement():
  labels = kaggle_like_labels()
  sampler = sampling.BalancedSampler(labels, 32, POSTER, seed=0)
  seen = np.concatenate([sampler(s) for s in range(100)])
  counts = np.bincount(seen, minlength=len(labels))
  for c in range(5):
    members = counts[labels == c]
    # After T draws from N examples: every example drawn floor(T/N) or ceil(T/N) times.
    assert members.max() - members.min() <= 1, c
  # Grade 4 (71 examples, 8 per batch): its first 8 batches (64 draws) have no repeats.
  first = np.concatenate([sampler(s) for s in range(8)])
  grade4 = first[labels[first] == 4]
  assert len(grade4) == 64 and len(set(grade4.tolist())) == 64


def test_batches_are_shuffled_within_the_batch():
  labels = kaggle_like_labels()
  sampler = sampling.BalancedSampler(labels, 32, POSTER, seed=0)
  for s in range(20):
    batch_labels = labels[sampler(s)]
    assert (np.diff(batch_labels) < 0).any(), "classes come in blocks"
  orders = {tuple(labels[sampler(s)]) for s in range(20)}
  assert len(orders) == 20


def test_each_class_epoch_has_its_own_order():
  labels = np.array([0] * 4 + [1] * 4)
  sampler = sampling.BalancedSampler(labels, 2, (1, 1), seed=0)
  # One example of each class per batch: steps 4e..4e+3 read class epoch e in order.
  stream = np.array([[i for i in sampler(s) if labels[i] == 1][0] for s in range(32)])
  epochs = stream.reshape(8, 4)
  assert all(sorted(e.tolist()) == [4, 5, 6, 7] for e in epochs)
  assert len({tuple(e.tolist()) for e in epochs}) > 1


def test_sampler_is_deterministic_from_the_seed():
  labels = kaggle_like_labels()
  a = [sampling.BalancedSampler(labels, 32, POSTER, seed=5)(s) for s in range(10)]
  b = [sampling.balanced_batch_indices(labels, 32, POSTER, seed=5, step=s) for s in range(10)]
  c = [sampling.BalancedSampler(labels, 32, POSTER, seed=6)(s) for s in range(10)]
  for x, y, z in zip(a, b, c):
    np.testing.assert_array_equal(x, y)
    assert not np.array_equal(x, z)


def test_resume_at_step_s_equals_continuing():
  labels = kaggle_like_labels()
  continuing = sampling.BalancedSampler(labels, 32, POSTER, seed=1)
  stream = [continuing(s) for s in range(60)]
  fresh = sampling.BalancedSampler(labels, 32, POSTER, seed=1)
  # Jump straight to step 57 (past several class epochs of grade 4) and go back.
  for s in (57, 58, 12, 0):
    np.testing.assert_array_equal(fresh(s), stream[s])


def test_batch_larger_than_a_class_spans_several_class_epochs():
  labels = np.array([0] * 10 + [1] * 3)
  sampler = sampling.BalancedSampler(labels, 16, (1, 1), seed=0)
  batch = sampler(0)
  counts = np.bincount(batch, minlength=13)
  np.testing.assert_array_equal(np.bincount(labels[batch]), [8, 8])
  # 8 draws of 3 grade-1 examples: each drawn 2 or 3 times.
  assert set(counts[10:].tolist()) <= {2, 3} and counts[10:].sum() == 8


# ---------------------------------------------------------------------------
# Training iterator.


def test_train_iterator_yields_balanced_uint8_batches():
  labels = kaggle_like_labels()
  source = FakeSource(labels)
  batches = take(ip.train_iterator(source, batch_size=16, seed=0, process_index=0,
                                   process_count=1), 5)
  sampler = sampling.BalancedSampler(labels, 16, POSTER, seed=0)
  for step, batch in enumerate(batches):
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(decode_index(batch["image"]), sampler(step))
    np.testing.assert_array_equal(batch["label"], labels[sampler(step)])
    np.testing.assert_array_equal(np.bincount(batch["label"], minlength=5), [8, 1, 2, 1, 4])


def test_train_iterator_reads_the_data_config():
  ml_collections = pytest.importorskip("ml_collections")
  data = ml_collections.ConfigDict({
      "class_proportions": (1, 1, 1, 1, 0), "prefetch": 1,
      "augment": {"flip": True, "rotate": "90"}})
  data.lock()
  labels = kaggle_like_labels()
  common = dict(batch_size=8, seed=0, process_index=0, process_count=1)
  batch = take(ip.train_iterator(FakeSource(labels), data, **common), 1)[0]
  np.testing.assert_array_equal(np.bincount(batch["label"], minlength=5), [2, 2, 2, 2, 0])
  explicit = take(ip.train_iterator(FakeSource(labels), proportions=(1, 1, 1, 1, 0),
                                    augment={"flip": True, "rotate": "90"}, **common), 1)[0]
  np.testing.assert_array_equal(batch["image"], explicit["image"])
  plain = take(ip.train_iterator(FakeSource(labels), proportions=(1, 1, 1, 1, 0), **common),
               1)[0]
  assert not np.array_equal(batch["image"], plain["image"])  # the config's augmentation ran
  # Keyword arguments win over the config.
  batch = take(ip.train_iterator(FakeSource(labels), data, proportions=POSTER, batch_size=16,
                                 process_index=0, process_count=1), 1)[0]
  np.testing.assert_array_equal(np.bincount(batch["label"], minlength=5), [8, 1, 2, 1, 4])


def test_train_iterator_float32_output_is_model_input():
  labels = kaggle_like_labels()
  source = FakeSource(labels)
  u8 = take(ip.train_iterator(source, batch_size=16, process_index=0, process_count=1), 1)[0]
  f32 = take(ip.train_iterator(source, batch_size=16, process_index=0, process_count=1,
                               image_dtype=np.float32), 1)[0]
  assert f32["image"].dtype == np.float32
  np.testing.assert_array_equal(f32["image"], grading.to_model_input(u8["image"]))


def test_train_iterator_resumes_without_replaying():
  labels = kaggle_like_labels()
  aug = {"flip": True, "rotate": "any"}
  whole = take(ip.train_iterator(FakeSource(labels), batch_size=16, seed=2, augment=aug,
                                 process_index=0, process_count=1), 8)
  source = FakeSource(labels)
  resumed = take(ip.train_iterator(source, batch_size=16, seed=2, augment=aug, start_step=5,
                                   process_index=0, process_count=1, prefetch=1), 3)
  for a, b in zip(whole[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Only the resumed batches (plus at most the prefetched ones) were read.
  assert source.reads <= 16 * (3 + 2 + 1)


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_batches_concatenate_to_the_global_batch(process_count):
  labels = kaggle_like_labels()
  aug = {"flip": True, "rotate": True}
  common = dict(batch_size=32, seed=4, augment=aug, start_step=3)
  single = take(ip.train_iterator(FakeSource(labels), process_index=0, process_count=1,
                                  **common), 3)
  hosts = [take(ip.train_iterator(FakeSource(labels), process_index=p,
                                  process_count=process_count, **common), 3)
           for p in range(process_count)]
  for step in range(3):
    for key in ("image", "label"):
      assert hosts[0][step][key].shape[0] == 32 // process_count
      np.testing.assert_array_equal(
          np.concatenate([h[step][key] for h in hosts]), single[step][key])


def test_bad_host_layouts_raise():
  source = FakeSource(kaggle_like_labels())
  with pytest.raises(ip.InputPipelineError, match="divide by the number of hosts"):
    ip.train_iterator(source, batch_size=48, process_index=0, process_count=5)
  with pytest.raises(ip.InputPipelineError, match="process_index"):
    ip.train_iterator(source, batch_size=32, process_index=2, process_count=2)
  with pytest.raises(ip.InputPipelineError, match="multiple of 16"):
    ip.train_iterator(source, batch_size=40, process_index=0, process_count=1)
  with pytest.raises(ip.InputPipelineError, match="divide by the number of hosts"):
    ip.eval_batches(source, 10, process_index=0, process_count=4)


def test_reader_errors_reach_the_consumer():
  class Broken(FakeSource):
    def __getitem__(self, i):
      raise OSError(f"cannot read record {i}")

  it = ip.train_iterator(Broken(kaggle_like_labels()), batch_size=16, process_index=0,
                         process_count=1)
  with pytest.raises(OSError, match="cannot read record"):
    next(it)


def test_labels_are_read_from_the_source_when_not_given():
  labels = kaggle_like_labels()[:200]
  labels[:5] = [0, 1, 2, 3, 4]
  records = FakeSource(labels, expose_labels=False)
  np.testing.assert_array_equal(labels_lib.load_labels(records), labels)
  as_list = [records[i] for i in range(len(records))]
  np.testing.assert_array_equal(labels_lib.load_labels(as_list), labels)
  batch = take(ip.train_iterator(as_list, batch_size=16, process_index=0, process_count=1), 1)[0]
  np.testing.assert_array_equal(np.bincount(batch["label"], minlength=5), [8, 1, 2, 1, 4])


# ---------------------------------------------------------------------------
# Evaluation batches.


@pytest.mark.parametrize("n,batch_size,process_count", [(37, 8, 1), (37, 8, 2), (40, 8, 4),
                                                         (3, 8, 4)])
def test_eval_covers_every_example_once_with_padding_mask(n, batch_size, process_count):
  labels = np.arange(n) % 5
  source = FakeSource(labels)
  per_host = [list(ip.eval_batches(source, batch_size, process_index=p,
                                   process_count=process_count))
              for p in range(process_count)]
  expected_batches = -(-n // batch_size)
  assert all(len(h) == expected_batches for h in per_host)
  local = batch_size // process_count
  indices, pads = [], 0
  for b in range(expected_batches):
    batch = np.concatenate([h[b]["index"] for h in per_host])
    mask = np.concatenate([h[b]["mask"] for h in per_host])
    images = np.concatenate([h[b]["image"] for h in per_host])
    labels_b = np.concatenate([h[b]["label"] for h in per_host])
    assert all(h[b]["image"].shape == (local, 8, 8, 3) for h in per_host)
    # Global batch b holds examples b*B .. b*B+B-1 in order, then padding.
    np.testing.assert_array_equal(batch[mask], np.arange(b * batch_size,
                                                         min(n, (b + 1) * batch_size)))
    np.testing.assert_array_equal(mask, np.arange(b * batch_size, (b + 1) * batch_size) < n)
    np.testing.assert_array_equal(decode_index(images[mask]), batch[mask])
    np.testing.assert_array_equal(labels_b[mask], labels[batch[mask]])
    assert (batch[~mask] == -1).all() and (images[~mask] == 0).all()
    indices.extend(batch[mask].tolist())
    pads += int((~mask).sum())
  assert sorted(indices) == list(range(n))
  assert pads == expected_batches * batch_size - n


def test_eval_keys_and_float_images():
  source = FakeSource(np.arange(10) % 5)
  batches = list(ip.eval_batches(source, 4, process_index=0, process_count=1,
                                 keys=("image", "extra"), image_dtype=np.float32))
  assert set(batches[0]) == {"image", "extra", "mask", "index"}
  assert batches[0]["image"].dtype == np.float32
  np.testing.assert_array_equal(batches[2]["extra"], [8, 9, 0, 0])
  assert list(ip.eval_batches([], 4, process_index=0, process_count=1)) == []


# ---------------------------------------------------------------------------
# Augmentation.


def test_augmentation_is_deterministic_and_shape_preserving():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  for options in ({"flip": True}, {"rotate": "90"}, {"rotate": True},
                  {"flip": True, "rotate": "any"}):
    aug = augmentation.Augmentation.from_config(options)
    a = augmentation.augment_image(image, aug, seed=1, step=2, row=3)
    b = augmentation.augment_image(image, aug, seed=1, step=2, row=3)
    assert a.shape == image.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    outs = {augmentation.augment_image(image, aug, seed=1, step=2, row=r).tobytes()
            for r in range(16)}
    assert len(outs) > 1  # rows get different draws
  none = augmentation.Augmentation()
  assert augmentation.augment_image(image, none, seed=1, step=2, row=3) is image


def test_flips_and_quarter_turns_are_exact_dihedral_transforms():
  image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  dihedral = {np.ascontiguousarray(np.rot90(f, k)).tobytes()
              for f in (image, image[:, ::-1]) for k in range(4)}
  flips = {image.tobytes(), image[:, ::-1].tobytes(), image[::-1].tobytes(),
           image[::-1, ::-1].tobytes()}
  flip = augmentation.Augmentation(flip=True)
  quarter = augmentation.Augmentation(flip=True, rotate="90")
  seen_flips = {augmentation.augment_image(image, flip, seed=0, step=0, row=r).tobytes()
                for r in range(64)}
  seen_dihedral = {augmentation.augment_image(image, quarter, seed=0, step=0, row=r).tobytes()
                   for r in range(256)}
  assert seen_flips == flips
  assert seen_dihedral == dihedral


def test_arbitrary_rotation_matches_numpy_at_right_angles_and_fills_gray():
  image = np.random.default_rng(2).integers(0, 256, (20, 20, 3), dtype=np.uint8)
  for k in range(4):
    np.testing.assert_allclose(augmentation.rotate_image(image, 90.0 * k), np.rot90(image, k),
                               atol=1)
  # A preprocessed retina: half gray outside the disc stays half gray under any rotation,
  # and the corners rotated in from outside the image are half gray too.
  disc = preprocess.field_of_view(64)
  retina = np.full((64, 64, 3), 128, np.uint8)
  retina[disc] = np.random.default_rng(3).integers(0, 256, (disc.sum(), 3))
  rotated = augmentation.rotate_image(retina, 33.0)
  ring = ~preprocess.field_of_view(64, 0.95)
  assert (rotated[ring] == 128).all()


def test_bad_augmentation_options_raise():
  with pytest.raises(ip.InputPipelineError, match="unknown augmentation"):
    augmentation.Augmentation.from_config({"flip": True, "rotation": True})
  with pytest.raises(ip.InputPipelineError, match="rotate"):
    augmentation.Augmentation(rotate="45")


# ---------------------------------------------------------------------------
# Model-input conversion.


def test_to_model_input_matches_keras_preprocess_input():
  keras_inception = pytest.importorskip("keras.applications.inception_v3")
  x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)[None]
  expected = keras_inception.preprocess_input(x.astype(np.float32))
  np.testing.assert_allclose(grading.to_model_input(x), expected, rtol=0, atol=1e-6)
  assert grading.to_model_input(x).dtype == np.float32
  np.testing.assert_array_equal(grading.from_model_input(grading.to_model_input(x)), x)
  assert grading.from_model_input(np.array([-3.0, 3.0])).tolist() == [0, 255]


def test_model_input_conversion_works_on_jax_arrays_under_jit():
  jax = pytest.importorskip("jax")
  x = np.arange(256, dtype=np.uint8)
  y = jax.jit(grading.to_model_input)(x)
  np.testing.assert_allclose(np.asarray(y), grading.to_model_input(x), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(jax.jit(grading.from_model_input)(y)), x)


# ---------------------------------------------------------------------------
# With the synthetic TFDS data set (array_record, random access).


def _synthetic_builder(tmp_path):
  try:
    # Lazy, to skip rather than fail without TensorFlow Datasets, which it imports.
    from drig.data import synthetic_fundus_builder  # noqa: F401 pylint: disable=unused-import
  except ImportError as e:
    pytest.skip(f"synthetic fundus builder not available: {e}")
  return datasets.load_builder("synthetic_fundus", data_dir=tmp_path, builder_config="tiny")


def test_with_synthetic_tfds_source(tmp_path):
  builder = _synthetic_builder(tmp_path)
  source = builder.as_data_source("train")
  labels = labels_lib.load_labels(source)
  reference = np.array([int(source[i]["label"]) for i in range(len(source))])
  np.testing.assert_array_equal(labels, reference)
  cached = [f for f in os.listdir(builder.data_dir)
            if f.startswith(labels_lib.LABEL_CACHE_PREFIX)]
  assert cached, "label index was not cached beside the data set"
  np.testing.assert_array_equal(labels_lib.load_labels(source), reference)
  counts = np.bincount(labels, minlength=5)
  proportions = tuple(int(c > 0) for c in counts)
  batch_size = 2 * sum(proportions)
  batch = next(ip.train_iterator(source, batch_size=batch_size, proportions=proportions,
                                 process_index=0, process_count=1))
  size = builder.info.features["image"].shape[0]
  assert batch["image"].shape == (batch_size, size, size, 3)
  np.testing.assert_array_equal(np.bincount(batch["label"], minlength=5),
                                2 * np.array(proportions))
  evals = list(ip.eval_batches(builder.as_data_source("test"), 4, process_index=0,
                               process_count=1))
  assert sum(int(b["mask"].sum()) for b in evals) == builder.info.splits["test"].num_examples
