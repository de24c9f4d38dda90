r"""Data-side figures: preprocess at generation or on the fly, label index, read throughput.

Three measurements, each printed with its peer from the same run (the machine
is shared, so only same-run comparisons mean anything):

1. Storage decision. EyePACS-sized (3888x2592) fundus-like JPEGs go through the
   real ``eyepacs`` builder (``drig-256``) into an array_record data set. Then,
   alternating A B A B per image, on one core:
     A  on the fly: ``drig.preprocess.preprocess_file(path, 256)``;
     B  stored: ``source[i]`` of the generated data set (read + PNG decode).
   Also the size and PSNR of the stored image as PNG (lossless) and JPEG q95/q72.
2. Label index over ``--num_records`` records (default: Kaggle's 35,126 training
   images) of a data set holding 256 px PNGs like those of (1):
     full decoding of every record (timed on a prefix, alternated with the next,
     then extrapolated), ``drig.input.labels.load_labels`` without cache (raw
     records, labels parsed from the protos) and with its ``.npy`` cache.
3. Training batches per second, batch 32: ``input_pipeline.train_iterator``
   (grain, in threads and with 2 worker processes) against a hand-written
   thread-pool pipeline reading the same examples, alternated.

  python benchmarks/bench_input_pipeline.py                   # full: ~3 GB temp disk
  python benchmarks/bench_input_pipeline.py --num_records=2000 --num_photos=2  # smoke
  python benchmarks/bench_input_pipeline.py --parts=throughput --num_records=4000
"""

import argparse
import concurrent.futures
import csv
import itertools
import logging
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time

import cv2
import numpy as np

from drig import input_pipeline
from drig import preprocess
from drig.data import tf_runtime
from drig.input import labels as labels_lib
from drig.input import sampling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_preprocess  # pylint: disable=g-import-not-at-top,wrong-import-position

KAGGLE_TRAIN_COUNTS = (25810, 2443, 5292, 873, 708)


def fake_manual_dir(root, num_photos, seed):
  """A Kaggle layout holding ``num_photos`` EyePACS-sized training photographs."""
  for sub in ("train", "test", "sample"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  names = [f"{i + 1}_left" for i in range(num_photos)]
  for i, name in enumerate(names):
    rgb = bench_preprocess.render_fundus_like(np.random.default_rng([seed, i]))
    cv2.imwrite(os.path.join(root, "train", f"{name}.jpeg"), rgb[..., ::-1],
                [cv2.IMWRITE_JPEG_QUALITY, 90])
  with open(os.path.join(root, "trainLabels.csv"), "w", newline="") as f:
    csv.writer(f).writerows([("image", "level")] + [(n, i % 5) for i, n in enumerate(names)])
  # One photograph each for the other splits (the builder needs them all).
  first = os.path.join(root, "train", f"{names[0]}.jpeg")
  for sub, name in (("test", "100_left"), ("test", "100_right"), ("sample", "1_left")):
    shutil.copy(first, os.path.join(root, sub, f"{name}.jpeg"))
  with open(os.path.join(root, "retinopathy_solution.csv"), "w", newline="") as f:
    csv.writer(f).writerows([("image", "level", "Usage"), ("100_left", 0, "Public"),
                             ("100_right", 1, "Private")])
  return [os.path.join(root, "train", f"{n}.jpeg") for n in names]


def psnr(a, b):
  err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float("inf") if err == 0 else 10 * np.log10(255.0 ** 2 / err)


def storage_decision(tmp, args):
  # Lazy: TFDS is heavy and must follow main()'s tf_runtime.import_tensorflow().
  from drig.data import eyepacs  # pylint: disable=g-import-not-at-top
  print(f"== 1. preprocess once at generation vs on the fly ({args.num_photos} photographs)")
  start = time.perf_counter()
  paths = fake_manual_dir(os.path.join(tmp, "manual"), args.num_photos, args.seed)
  mib = [os.path.getsize(p) / 2 ** 20 for p in paths]
  print(f"wrote {len(paths)} 3888x2592 JPEGs (q90, {min(mib):.2f}-{max(mib):.2f} MiB) in "
        f"{time.perf_counter() - start:.1f} s")
  start = time.perf_counter()
  builder = eyepacs.prepare("drig-256", data_dir=os.path.join(tmp, "tfds"),
                            manual_dir=os.path.join(tmp, "manual"), num_workers=0)
  total = sum(s.num_examples for s in builder.info.splits.values())
  print(f"generated eyepacs/drig-256 ({total} images, 1 process) in "
        f"{time.perf_counter() - start:.1f} s, including TFDS's fixed overhead")
  source = builder.as_data_source("train")
  by_name = {source[i]["name"].decode(): i for i in range(len(source))}
  index = [by_name[os.path.basename(p)[:-5]] for p in paths]

  cv2.setNumThreads(1)  # one core, as one generation worker or one decoder thread
  preprocess.preprocess_file(paths[0], 256)
  source[index[0]]
  seconds = {"A on the fly": [], "B stored": []}
  for _ in range(args.repeats):
    for path, i in zip(paths, index):
      start = time.perf_counter()
      preprocess.preprocess_file(path, 256)
      seconds["A on the fly"].append(time.perf_counter() - start)
      start = time.perf_counter()
      for _ in range(args.inner):
        source[i]
      seconds["B stored"].append((time.perf_counter() - start) / args.inner)
  for name, values in seconds.items():
    print(f"{name:14s} {1e3 * statistics.median(values):8.2f} ms/image "
          f"{1 / statistics.median(values):8.1f} images/s on one core")
  ratios = [a / b for a, b in zip(seconds["A on the fly"], seconds["B stored"])]
  print(f"on the fly costs {statistics.median(ratios):.0f}x a stored read (median of "
        f"{len(ratios)} paired measurements)")

  stored = [source[i]["image"] for i in index]
  for name, ext, params in (("PNG (stored)", ".png", []),
                            ("JPEG q95", ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]),
                            ("JPEG q72 (btgraham)", ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 72])):
    sizes, psnrs, decode = [], [], []
    for image in stored:
      data = cv2.imencode(ext, image[..., ::-1], params)[1]
      sizes.append(len(data) / 1024)
      start = time.perf_counter()
      for _ in range(args.inner):
        decoded = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB)
      decode.append((time.perf_counter() - start) / args.inner)
      psnrs.append(psnr(decoded, image))
    print(f"{name:20s} {statistics.mean(sizes):6.1f} KiB/image, decode "
          f"{1e3 * statistics.median(decode):.2f} ms, PSNR vs the preprocessed image "
          f"{min(psnrs):.1f} dB (worst)")
  cv2.setNumThreads(0)
  return stored


def synthetic_store(tmp, stored, args):
  """A TFDS array_record data set of ``num_records`` 256 px PNGs with Kaggle's grade mix."""
  # Lazy: TFDS is heavy and must follow main()'s tf_runtime.import_tensorflow().
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  pool = []
  for image in stored:
    for k in range(4):  # Rotations: different bytes, same statistics.
      pool.append(cv2.imencode(".png", np.ascontiguousarray(np.rot90(image, k))[..., ::-1])[1]
                  .tobytes())
  weights = np.asarray(KAGGLE_TRAIN_COUNTS, np.float64)
  labels = np.random.default_rng(args.seed).choice(5, size=args.num_records,
                                                   p=weights / weights.sum())

  class BenchStore(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "name": tfds.features.Text(),
          "image": tfds.features.Image(shape=(256, 256, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=5)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(args.num_records):
        yield str(i), {"name": f"{i}_left", "image": pool[i % len(pool)],
                       "label": int(labels[i])}

  start = time.perf_counter()
  builder = BenchStore(data_dir=os.path.join(tmp, "store"), file_format="array_record")
  builder.download_and_prepare()
  print(f"wrote a {args.num_records}-record array_record data set in "
        f"{time.perf_counter() - start:.1f} s")
  return builder


def label_index(builder, args):
  print(f"== 2. label index over {args.num_records} records")
  source = builder.as_data_source("train")
  n = len(source)
  chunk = min(1000, n // 4)
  full, proto = [], []
  for r in range(2):  # A B A B on disjoint chunks: full decoding vs raw proto parsing.
    lo = 2 * r * chunk
    start = time.perf_counter()
    for i in range(lo, lo + chunk):
      source[i]["label"]
    full.append((time.perf_counter() - start) / chunk)
    sub = _Prefix(source, lo + chunk, lo + 2 * chunk)
    start = time.perf_counter()
    labels_lib._tfds_labels(sub, "label")  # pylint: disable=protected-access
    proto.append((time.perf_counter() - start) / chunk)
  print(f"full record decoding: {1e3 * statistics.mean(full):.2f} ms/record -> "
        f"{n * statistics.mean(full):.1f} s for {n} (extrapolated)")
  print(f"labels from raw protos: {1e3 * statistics.mean(proto):.3f} ms/record")
  for f in os.listdir(builder.data_dir):
    if f.startswith(labels_lib.LABEL_CACHE_PREFIX):
      os.remove(os.path.join(builder.data_dir, f))
  start = time.perf_counter()
  labels = labels_lib.load_labels(source)
  print(f"load_labels, no cache (reads all {n} records, writes the cache): "
        f"{time.perf_counter() - start:.2f} s")
  start = time.perf_counter()
  cached = labels_lib.load_labels(source)
  print(f"load_labels, cached .npy: {1e3 * (time.perf_counter() - start):.2f} ms")
  assert np.array_equal(labels, cached)
  return labels


class _Prefix:
  """Records [lo, hi) of a TFDS source, looking like one to ``_tfds_labels``."""

  def __init__(self, source, lo, hi):
    self.lo, self.hi, self.split, self.dataset_info = lo, hi, source.split, source.dataset_info
    raw = source.data_source

    class Raw:
      def __getitems__(self, keys):
        return raw.__getitems__([lo + k for k in keys])

    self.data_source = Raw()

  def __len__(self):
    return self.hi - self.lo


def threaded_peer(source, labels, *, batch_size, start_step, num_threads, depth=2):
  """The peer: class-balanced batches read by a hand-written thread pool and prefetch thread.

  The same examples and output as ``input_pipeline.train_iterator`` (no
  augmentation), without grain: one background thread produces batch after batch,
  decoding each batch's images with a pool of ``num_threads`` threads.
  """
  sampler = sampling.BalancedSampler(labels, batch_size, seed=0)
  pool = concurrent.futures.ThreadPoolExecutor(num_threads)
  ready = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def read(index):
    record = source[int(index)]
    return np.asarray(record["image"]), int(record["label"])

  def run():
    for step in itertools.count(start_step):
      if stop.is_set():
        return
      examples = list(pool.map(read, sampler(step)))
      batch = {"image": np.stack([e[0] for e in examples]),
               "label": np.asarray([e[1] for e in examples], np.int32)}
      while not stop.is_set():
        try:
          ready.put(batch, timeout=0.1)
          break
        except queue.Full:
          pass

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  try:
    while True:
      yield ready.get()
  finally:
    stop.set()
    thread.join()
    pool.shutdown(wait=False, cancel_futures=True)


def throughput(builder, labels, args):
  print(f"== 3. training batches into the train step (batch 32, uint8, no augmentation), "
        f"{args.batches} batches per measurement")
  source = builder.as_data_source("train")
  threads = args.threads

  def grain_pipeline(workers):
    return lambda step: input_pipeline.train_iterator(
        source, batch_size=32, labels=labels, start_step=step, process_index=0,
        process_count=1, num_threads=threads, prefetch=2, workers=workers)

  peers = {
      f"hand-written threads ({threads} decoder threads)": lambda step: threaded_peer(
          source, labels, batch_size=32, start_step=step, num_threads=threads),
      f"grain, threads ({threads})": grain_pipeline(0),
      f"grain, 2 worker processes ({threads} threads each)": grain_pipeline(2),
  }
  results = {name: [] for name in peers}
  step = 0
  for _ in range(args.repeats):
    for name, make in peers.items():  # Alternating A B C A B C.
      it = make(step)
      next(it)  # Start-up (threads, worker processes, first batch) is not throughput.
      start = time.perf_counter()
      for _ in range(args.batches):
        next(it)
      results[name].append(32 * args.batches / (time.perf_counter() - start))
      it.close()
      step += args.batches + 4
  reference = statistics.median(next(iter(results.values())))
  for name, values in results.items():
    median = statistics.median(values)
    print(f"{name:48s} {median:7.0f} images/s (median of {len(values)}; "
          f"{median / reference:.2f}x the hand-written peer)")
  print(f"({os.cpu_count()} cores; each image is a 256 px PNG)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_photos", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--inner", type=int, default=20, help="stored reads per measurement")
  parser.add_argument("--num_records", type=int, default=sum(KAGGLE_TRAIN_COUNTS))
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--threads", type=int, default=2, help="decoder threads of each pipeline")
  parser.add_argument("--parts", default="storage,labels,throughput",
                      help="comma-separated: storage, labels, throughput")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None, help="keep files here (default: temp)")
  args = parser.parse_args()
  logging.getLogger().setLevel(logging.WARNING)
  tf_runtime.import_tensorflow()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = args.workdir or tmp
    parts = set(args.parts.split(","))
    if "storage" in parts:
      stored = storage_decision(tmp, args)
    else:  # Fundus-like 256 px images without the storage measurement.
      stored = [cv2.resize(bench_preprocess.render_fundus_like(np.random.default_rng([args.seed, i])),
                           (256, 256), interpolation=cv2.INTER_AREA)
                for i in range(args.num_photos)]
    builder = synthetic_store(tmp, stored, args)
    if "labels" in parts:
      labels = label_index(builder, args)
    else:
      labels = labels_lib.load_labels(builder.as_data_source("train"))
    if "throughput" in parts:
      throughput(builder, labels, args)


if __name__ == "__main__":
  main()
