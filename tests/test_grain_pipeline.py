"""The grain input pipeline: worker processes give the same batches as threads; state is the step."""

import numpy as np
import pytest

from drig import input_pipeline as ip
from drig.input.errors import InputPipelineError
from drig.input import sampling


class ImageSource:
  """A picklable random-access source: image i is filled with i % 251, label i % 5."""

  def __init__(self, n=160, size=8):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.full((self.size, self.size, 3), i % 251, np.uint8)
    return {"image": image, "label": i % 5}


def _take(iterator, count):
  batches = [next(iterator) for _ in range(count)]
  iterator.close()
  return batches


def test_worker_processes_give_the_threads_batches():
  source = ImageSource()
  labels = np.arange(len(source)) % 5
  common = dict(batch_size=16, labels=labels, seed=7, start_step=3, process_index=0,
                process_count=1, augment={"flip": True, "rotate": "90"})
  threads = _take(ip.train_iterator(source, **common, workers=0), 3)
  workers = _take(ip.train_iterator(source, **common, workers=2), 3)
  for a, b in zip(threads, workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # The batches are the sampler's examples for steps 3, 4, 5, in order.
  sampler = sampling.BalancedSampler(labels, 16, seed=7)
  for step, batch in zip(range(3, 6), threads):
    np.testing.assert_array_equal(batch["label"], labels[sampler(step)])


def test_eval_with_workers_visits_every_example_once():
  source = ImageSource(n=37)
  batches = list(ip.eval_batches(source, 8, process_index=0, process_count=1, workers=2))
  assert len(batches) == ip.num_eval_batches(37, 8)
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index[mask], np.arange(37))
  assert (index[~mask] == -1).all()
  pixels = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
  np.testing.assert_array_equal(pixels[mask], np.arange(37) % 251)
  assert (pixels[~mask] == 0).all()


def test_a_sampler_survives_pickling_with_the_same_batches():
  import pickle  # pylint: disable=g-import-not-at-top
  labels = np.arange(200) % 5
  sampler = sampling.BalancedSampler(labels, 32, seed=1)
  first = sampler(9)
  copy = pickle.loads(pickle.dumps(sampler))
  np.testing.assert_array_equal(copy(9), first)
  np.testing.assert_array_equal(copy(10), sampler(10))


@pytest.mark.parametrize("workers", [-1, 1.5, True])
def test_bad_worker_counts_raise(workers):
  source = ImageSource()
  with pytest.raises(InputPipelineError, match="input workers"):
    ip.train_iterator(source, batch_size=16, process_index=0, process_count=1, workers=workers)
  with pytest.raises(InputPipelineError, match="input workers"):
    ip.eval_batches(source, 16, process_index=0, process_count=1, workers=workers)


def test_worker_processes_read_a_tfds_array_record_source(tmp_path):
  # Lazy: the builder imports TensorFlow Datasets.
  from drig.data import datasets  # pylint: disable=g-import-not-at-top
  from drig.data import synthetic_fundus_builder  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
  builder = datasets.load_builder("synthetic_fundus", data_dir=tmp_path, builder_config="tiny")
  source = builder.as_data_source("test")
  threads = list(ip.eval_batches(source, 4, process_index=0, process_count=1, workers=0))
  workers = list(ip.eval_batches(source, 4, process_index=0, process_count=1, workers=2))
  assert len(threads) == len(workers) == ip.num_eval_batches(len(source), 4)
  for a, b in zip(threads, workers):
    for key in ("image", "label", "mask", "index"):
      np.testing.assert_array_equal(a[key], b[key])
