r"""File-to-tensor speed of drig's preprocessing against TFDS's btgraham path.

Writes a few EyePACS-sized (3888x2592) fundus-like JPEGs to a temporary folder, then
times, alternating A B A B on the same files:

  A  drig.preprocess.preprocess_file (reduced-resolution JPEG decoding: the retina
     keeps >= working_ratio x 256 px);
  B  TFDS's `_btgraham_processing` with target radius 128 (a 256 px retina, full
     decoding, JPEG q72 as the builder stores it) followed by decoding its output,
     i.e. what a pipeline on the `btgraham` config gets as a tensor;
  D  A's reduced JPEG decoding alone (read_fundus): the floor under A's time;
  C  drig with working_ratio=None: full-resolution decoding and processing (the
     reference for the PSNR; timed only with --time_full_decode, it is slow because
     step 2's blur then runs on 10 Mpx).

It also times other JPEG decoders at A's scale (Pillow's ``draft``; simplejpeg, if
installed, plain and with its fast DCT and upsampling), to show that A's decoding is
at libjpeg-turbo's floor whichever library calls it.

It prints images/s of each, the A/B ratio, and the PSNR of A's output against C's
(the error that reduced decoding introduces; the 128 outside the disc is excluded).
Targets: A/B >= 3, PSNR >= 35 dB.

Two regimes are timed, each A B A B:
  one stream   one call at a time in this process (OpenCV's own threads allowed);
  throughput   ``--workers`` processes (default: one per core) each with OpenCV
               single-threaded, as drig's EyePACS builder generates its data set; the
               files are processed ``--rounds`` times per contender and the wall time of
               the whole batch gives images/s. This is the rate a data-set build sees.

Each regime runs under two heap policies, because B's figure depends on them:
  glibc default  as Python starts. Here glibc serves the ~30 MB buffers of B's
                 full-resolution decode with a fresh mmap on every call: ~8,000 page faults
                 (printed per call), about 20 ms of B's time; A's buffers are small.
  warm heap      ``drig.runtime.keep_freed_memory`` (``mallopt``) keeps freed memory in the
                 heap, as in drig's data-set generation workers (a long-running pipeline
                 can get the same with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``),
                 so that the comparison is of the work itself. Skipped where the C library
                 has no ``mallopt``.

  python benchmarks/bench_preprocess.py --num_images=4 --repeats=3
  python benchmarks/bench_preprocess.py --working_ratio=1  # 1/8 decoding: faster, lower PSNR
"""

import argparse
import concurrent.futures
import functools
import multiprocessing
import os
import resource
import statistics
import tempfile
import time

import cv2
import numpy as np

from drig import preprocess
from drig import runtime
from drig.data import generation


def render_fundus_like(rng, height=2592, width=3888, noise=2.5):
  """An RGB uint8 fundus-like photograph with realistic JPEG statistics.

  An orange-red retina on black (diameter 0.95-1.25 x the height, so some are cut at
  top and bottom), vignetting, uneven illumination, choroidal texture, a vessel tree,
  an optic disc, a macula and sensor noise (standard deviation ``noise``).
  """
  diameter = height * rng.uniform(0.95, 1.25)
  center = (width / 2 + rng.uniform(-0.05, 0.05) * width, height / 2)
  small = 8  # Smooth components are drawn at 1/8 resolution and upsampled.
  hs, ws = height // small, width // small
  yy, xx = np.mgrid[0:hs, 0:ws].astype(np.float32) * small
  r = np.hypot(xx - center[0], yy - center[1]) / (diameter / 2)
  illumination = cv2.GaussianBlur(rng.normal(0, 1, (hs, ws)).astype(np.float32), (0, 0), 20)
  illumination = 1 + 0.25 * illumination / (np.abs(illumination).max() + 1e-6)
  shade = np.clip(1 - 0.6 * r ** 4, 0, 1) * illumination
  disc = (np.hypot(xx - center[0] - 0.2 * diameter, yy - center[1]) < 0.08 * diameter)
  macula = np.exp(-((xx - center[0] + 0.1 * diameter) ** 2 + (yy - center[1]) ** 2)
                  / (2 * (0.06 * diameter) ** 2))
  base = np.stack([185 * shade, 85 * shade, 35 * shade], axis=-1)
  base *= (1 - 0.35 * macula)[..., None]
  base[disc] = base[disc] * 0.5 + np.array([230, 200, 120]) * 0.5
  base = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)

  texture = cv2.GaussianBlur(rng.normal(0, 1, (height // 2, width // 2)).astype(np.float32),
                             (0, 0), 2.5)
  texture = cv2.resize(texture, (width, height), interpolation=cv2.INTER_LINEAR)
  base *= (1 + 0.6 * texture)[..., None]

  vessels = np.zeros((height, width), np.float32)
  for _ in range(rng.integers(6, 10)):  # Vessel trees from the optic disc.
    point = np.array([center[0] + 0.2 * diameter, center[1]])
    angle = rng.uniform(0, 2 * np.pi)
    thickness = rng.uniform(14, 26)
    for _ in range(60):
      angle += rng.normal(0, 0.25)
      step = point + 0.012 * diameter * np.array([np.cos(angle), np.sin(angle)])
      cv2.line(vessels, tuple(int(v) for v in point), tuple(int(v) for v in step), 1.0,
               max(2, int(thickness)))
      point, thickness = step, thickness * 0.985
  vessels = cv2.GaussianBlur(vessels, (0, 0), 2)
  base *= (1 - 0.45 * vessels)[..., None]

  base += rng.normal(0, noise, base.shape).astype(np.float32)  # Sensor noise.
  mask = np.zeros((height, width), np.uint8)
  cv2.circle(mask, (int(center[0]), int(center[1])), int(diameter / 2), 1, -1)
  mask = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 3)
  image = base * mask[..., None] + rng.uniform(0, 3, (height, width, 1)).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_jpegs(folder, num_images, quality, seed, noise):
  paths = []
  for i in range(num_images):
    path = os.path.join(folder, f"{seed}_{i}_q{quality}_noise{noise:g}.jpeg")
    paths.append(path)
    if os.path.exists(path):  # Reused from an earlier run with --workdir.
      continue
    rgb = render_fundus_like(np.random.default_rng([seed, i]), noise=noise)
    cv2.imwrite(path, rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
  return paths


def drig_reduced(path, size, working_ratio=preprocess.DEFAULT_WORKING_RATIO):
  return preprocess.preprocess_file(path, size, working_ratio=working_ratio)


def drig_full(path, size):
  return preprocess.preprocess_file(path, size, working_ratio=None)


def decode_only(path, size, working_ratio=preprocess.DEFAULT_WORKING_RATIO):
  """A's JPEG decoding alone (same reduction), the floor under A's time."""
  return preprocess.read_fundus(path, min_retina_diameter=working_ratio * size)


def tfds_btgraham(path, size):
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.image_classification import diabetic_retinopathy_detection as dr
  with open(path, "rb") as f:
    encoded = dr._btgraham_processing(  # pylint: disable=protected-access
        image_fobj=f, filepath=path, target_pixels=size // 2, crop_to_radius=True)
  decoded = cv2.imdecode(np.frombuffer(encoded.getvalue(), np.uint8), cv2.IMREAD_COLOR_RGB)
  return decoded


def _init_worker(warm_heap):
  # As drig's EyePACS builder's workers (which keep freed memory), heap policy aside.
  generation.init_worker(keep_freed_memory=warm_heap)
  cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _shape_of(fn, path, size):
  return fn(path, size).shape  # Only the shape crosses the process boundary.


def _minor_faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_one_stream(contenders, paths, size, repeats):
  """Seconds and minor page faults of every call, one at a time, A B A B per file."""
  for fn in contenders.values():  # Warm up (imports, OpenCV's thread pool, the heap).
    fn(paths[0], size)
  seconds = {name: [] for name in contenders}
  faults = {name: [] for name in contenders}
  for _ in range(repeats):
    for path in paths:
      for name, fn in contenders.items():
        before = _minor_faults()
        start = time.perf_counter()
        fn(path, size)
        seconds[name].append(time.perf_counter() - start)
        faults[name].append(_minor_faults() - before)
  return seconds, faults


def time_throughput(contenders, paths, size, workers, rounds, warm_heap):
  """images/s per contender with ``workers`` processes, alternating A B A B."""
  context = multiprocessing.get_context("spawn")
  pools = {name: concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=context, initializer=_init_worker, initargs=(warm_heap,))
           for name in contenders}
  try:
    for name, fn in contenders.items():  # Start the workers and warm them up.
      list(pools[name].map(_shape_of, [fn] * (2 * workers), [paths[0]] * (2 * workers),
                           [size] * (2 * workers)))
    rates = {name: [] for name in contenders}
    for _ in range(rounds):
      for name, fn in contenders.items():
        batch = paths * max(1, (4 * workers) // len(paths))
        start = time.perf_counter()
        list(pools[name].map(_shape_of, [fn] * len(batch), batch, [size] * len(batch)))
        rates[name].append(len(batch) / (time.perf_counter() - start))
    return rates
  finally:
    for pool in pools.values():
      pool.shutdown()


def print_comparison(title, samples, rates):
  """Per contender images/s (median, best, worst) and the paired A/B speed-up."""
  print(f"{title}:")
  for name, values in rates.items():
    print(f"{name:24s} {statistics.median(values):7.2f} images/s  (median of {len(values)} "
          f"{samples}; best {max(values):.2f}, worst {min(values):.2f})")
  ratios = [a / b for a, b in zip(rates["A drig reduced decode"], rates["B tfds btgraham"])]
  print(f"speed-up A/B: {statistics.median(ratios):.2f}x (median of {len(ratios)} paired "
        f"{samples}; quartiles {np.percentile(ratios, 25):.2f}-{np.percentile(ratios, 75):.2f};"
        f" target >= 3)")


def _decoders(reduction):
  """name -> fn(bytes) decoding a JPEG to RGB at 1/reduction: OpenCV (drig's), and, where
  installed, Pillow's ``draft`` and simplejpeg (plain and with its fast options)."""
  flags = preprocess._REDUCED_FLAGS[reduction]  # pylint: disable=protected-access
  decoders = {"opencv (drig)": lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), flags),
              "opencv full resolution (B)": lambda data: cv2.imdecode(
                  np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)}
  try:
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top

    def pillow(data):
      image = Image.open(io.BytesIO(data))
      image.draft("RGB", (image.width // reduction, image.height // reduction))
      return np.asarray(image.convert("RGB"))
    decoders["pillow draft"] = pillow
  except ImportError:
    pass
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    pass
  else:
    def simple(data, **options):
      height, width = simplejpeg.decode_jpeg_header(data)[:2]
      return simplejpeg.decode_jpeg(data, "RGB", min_height=height // reduction,
                                    min_width=width // reduction, **options)
    decoders["simplejpeg"] = simple
    decoders["simplejpeg fast dct+upsampling"] = functools.partial(
        simple, fastdct=True, fastupsample=True)
  return decoders


def compare_decoders(paths, reduction, repeats):
  """Median ms per decode of each available decoder, alternating, same files and scale."""
  datas = [open(p, "rb").read() for p in paths]  # pylint: disable=consider-using-with
  decoders = _decoders(reduction)
  shapes = {name: fn(datas[0]).shape for name, fn in decoders.items()}
  times = {name: [] for name in decoders}
  for _ in range(max(repeats, 10)):
    for data in datas:
      for name, fn in decoders.items():
        start = time.perf_counter()
        fn(data)
        times[name].append(time.perf_counter() - start)
  print(f"JPEG decoders at 1/{reduction} unless named (median of {len(times['opencv (drig)'])} "
        "alternating calls; all libjpeg-turbo; pip install simplejpeg to add it):")
  for name, values in times.items():
    print(f"  {name:32s} {1e3 * statistics.median(values):6.2f} ms  {shapes[name]}")


def psnr(a, b, where):
  err = np.mean((a[where].astype(np.float64) - b[where].astype(np.float64)) ** 2)
  return float("inf") if err == 0 else 10 * np.log10(255.0 ** 2 / err)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_images", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--quality", type=int, default=90)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--noise", type=float, default=2.5,
                      help="sensor noise (std) of the test images; more noise, bigger files")
  parser.add_argument("--working_ratio", type=float,
                      default=preprocess.DEFAULT_WORKING_RATIO,
                      help="A decodes so that the retina keeps >= this x size pixels")
  parser.add_argument("--time_full_decode", action="store_true",
                      help="also time C, drig at full resolution (slow)")
  parser.add_argument("--workdir", default=None, help="keep the JPEGs here (default: temp)")
  parser.add_argument("--workers", type=int, default=os.cpu_count(),
                      help="processes of the throughput regime (0 skips it)")
  parser.add_argument("--rounds", type=int, default=5,
                      help="A B rounds of the throughput regime")
  args = parser.parse_args()
  # TFDS's path JPEG-encodes a float64 image; OpenCV warns about it on every call.
  cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

  with tempfile.TemporaryDirectory() as tmp:
    folder = args.workdir or tmp
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    paths = write_jpegs(folder, args.num_images, args.quality, args.seed, args.noise)
    sizes = [os.path.getsize(p) / 2 ** 20 for p in paths]
    print(f"{len(paths)} 3888x2592 JPEGs ready (q{args.quality}, "
          f"{min(sizes):.2f}-{max(sizes):.2f} MiB) in {time.perf_counter() - start:.1f} s")

    reduced = functools.partial(drig_reduced, working_ratio=args.working_ratio)
    contenders = {"A drig reduced decode": reduced, "B tfds btgraham": tfds_btgraham}
    if args.time_full_decode:
      contenders["C drig full resolution"] = drig_full
    contenders["D A's decoding alone"] = functools.partial(
        decode_only, working_ratio=args.working_ratio)
    decoded = preprocess.read_fundus(
        paths[0], min_retina_diameter=args.working_ratio * args.size)
    print(f"A decodes {os.path.basename(paths[0])} at {decoded.shape[1]}x{decoded.shape[0]} "
          f"(retina >= {args.working_ratio:g} x {args.size} px)")
    # The test images are 2592 px high (render_fundus_like): A's reduction factor.
    reduction = round(2592 / decoded.shape[0])
    for policy in ["glibc default", "warm heap"]:
      if policy == "warm heap" and not runtime.keep_freed_memory():
        print("\nwarm heap: skipped (no mallopt in this C library)")
        break
      print(f"\n== heap policy: {policy} ==")
      # Interleaved per file (A B A B ...), so that both see the same machine load; the
      # speed-up is the median of the paired per-file ratios.
      seconds, faults = time_one_stream(contenders, paths, args.size, args.repeats)
      print_comparison("one stream (one call at a time)", "calls",
                       {name: [1 / v for v in values] for name, values in seconds.items()})
      print("minor page faults per call: " + ", ".join(
          f"{name.split()[0]} {statistics.median(values):.0f}" for name, values in faults.items()))
      floor = statistics.median(seconds["D A's decoding alone"])
      print(f"A's decoding (read, reduced decode, locate) takes {1e3 * floor:.1f} ms of A's "
            f"{1e3 * statistics.median(seconds['A drig reduced decode']):.1f} ms: even with "
            f"no processing at all A/B would be "
            f"{statistics.median(seconds['B tfds btgraham']) / floor:.2f}x")
      compare_decoders(paths, reduction, args.repeats)
      if args.workers:
        rates = time_throughput(
            {"A drig reduced decode": reduced, "B tfds btgraham": tfds_btgraham}, paths,
            args.size, args.workers, args.rounds, warm_heap=policy == "warm heap")
        print_comparison(
            f"throughput ({args.workers} processes, OpenCV single-threaded in each)",
            "rounds", rates)
    print()

    inside = preprocess.field_of_view(args.size)
    values = []
    for path in paths:
      fast, full = reduced(path, args.size), drig_full(path, args.size)
      values.append((psnr(fast, full, inside), psnr(fast, full, np.ones_like(inside))))
    print("PSNR A vs C (reduced vs full resolution), inside the kept disc: "
          + ", ".join(f"{v[0]:.1f}" for v in values)
          + f" dB (min {min(v[0] for v in values):.1f}; target >= 35)")
    print("PSNR A vs C over the whole image:                                "
          + ", ".join(f"{v[1]:.1f}" for v in values) + " dB")


if __name__ == "__main__":
  main()
