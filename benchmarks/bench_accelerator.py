r"""Pixel IG on an accelerator: images/s and model-FLOP utilisation, float32 and bfloat16.

The accelerator check, as one prepared run: Inception-v3 (5 grades, random
weights: the speed does not depend on them), ``--batch`` images of ``--size`` px,
``--steps`` riemann_right steps, for each of ``--dtypes`` (the model's computation
dtype; sums accumulate in float32 either way). It prints, per dtype:

  images/s        best of ``--repeats`` full pixel-IG calls (after one compiling call);
  GFLOP/point     XLA's cost analysis of one forward + input-gradient point;
  achieved        FLOP/s = GFLOP/point x points / time;
  MFU             achieved / the chip's peak for that dtype (dense; ``--peak_tflops``
                  overrides, e.g. for an unlisted chip), and achieved / the best
                  matrix product measured in the same run (the practical peak).

Nothing here needs weight files, data sets or the reference libraries. On the device
machine (JAX, Flax and absl are installed there; ml_collections is not needed):

  PYTHONUNBUFFERED=1 python3 benchmarks/bench_accelerator.py --out=$OUT/accelerator.json

and on a CPU, as a smoke test: ``--batch=1 --steps=2 --size=96 --dtypes=float32``.
"""

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from drig import attribution
from drig import grading
from drig.models.inception_v3 import InceptionV3

_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Model computation dtypes.")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per call.")
_STEPS = flags.DEFINE_integer("steps", 50, "IG steps (riemann_right).")
_SIZE = flags.DEFINE_integer("size", 256, "Image side in pixels (>= 75).")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "Steps per model call; 0: drig's default.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per dtype (best is reported).")
_MATMUL = flags.DEFINE_integer("matmul_size", 8192, "Side of the peak-rate matrix product.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Chip peak TFLOP/s for every dtype (0: table).")
_OUT = flags.DEFINE_string("out", "", "Also write the results here as JSON.")

# Dense peak TFLOP/s by device kind (substring, lower case) and dtype: vendors' data
# sheets. float32 on NVIDIA is TF32 on the tensor cores, which XLA uses for float32
# convolutions by default.
PEAK_TFLOPS = {
    "h200": {"bfloat16": 989.0, "float32": 494.0},
    "h100": {"bfloat16": 989.0, "float32": 494.0},
    "a100": {"bfloat16": 312.0, "float32": 156.0},
    "l4": {"bfloat16": 121.0, "float32": 60.0},
    "tpu v4": {"bfloat16": 275.0, "float32": 275.0},
    "tpu v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "tpu v5p": {"bfloat16": 459.0, "float32": 459.0},
    "tpu v6 lite": {"bfloat16": 918.0, "float32": 918.0},
}
GRADE = 4


def chip_peak(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of ``device_kind`` for ``dtype`` (--peak_tflops, else the table)."""
  if _PEAK.value:
    return _PEAK.value * 1e12
  kind = device_kind.lower()
  for name, peaks in PEAK_TFLOPS.items():
    if name in kind:
      return peaks[dtype] * 1e12
  return None


def matmul_rate(dtype, n: int) -> float:
  """Best FLOP/s of an n x n x n matrix product in ``dtype`` on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  product = jax.jit(lambda u: u @ u)
  product(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    product(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def flops_per_point(quantity, x) -> float:
  """XLA's FLOP count of one forward + input-gradient pass, per image."""
  gradient = jax.jit(jax.grad(lambda z: jnp.sum(quantity(z))))
  cost = gradient.lower(x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / x.shape[0]


def run_dtype(dtype_name: str) -> dict:
  """Times pixel IG with the model computing in ``dtype_name``."""
  dtype = jnp.dtype(dtype_name)
  model = InceptionV3(num_classes=grading.NUM_GRADES, dtype=dtype)
  x = jax.random.uniform(jax.random.key(1), (_BATCH.value, _SIZE.value, _SIZE.value, 3),
                         jnp.float32, -1.0, 1.0)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  logits = jax.tree_util.Partial(lambda v, z: model.apply(v, z), variables)
  quantity = attribution.probability_of_grade(logits, GRADE)
  baseline = attribution.half_gray_baseline(x)
  chunk = _CHUNK.value or None

  def call():
    return jax.block_until_ready(attribution.integrated_gradients(
        quantity, x, baseline, steps=_STEPS.value, chunk_size=chunk))

  start = time.perf_counter()
  _, gap = call()
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - start)
  per_point = flops_per_point(quantity, x[:min(8, x.shape[0])])
  points = _BATCH.value * _STEPS.value
  achieved = per_point * points / best
  device = jax.devices()[0]
  peak = chip_peak(device.device_kind, dtype_name)
  practical = matmul_rate(dtype, _MATMUL.value)
  f_x, f_b = quantity(x), quantity(baseline * jnp.ones_like(x))
  return {
      "dtype": dtype_name, "device": device.device_kind, "platform": device.platform,
      "batch": _BATCH.value, "steps": _STEPS.value, "size": _SIZE.value,
      "first_call_s": first, "best_s": best, "images_per_s": _BATCH.value / best,
      "gflop_per_point": per_point / 1e9, "achieved_tflops": achieved / 1e12,
      "peak_tflops": None if peak is None else peak / 1e12,
      "mfu": None if peak is None else achieved / peak,
      "matmul_tflops": practical / 1e12, "fraction_of_matmul": achieved / practical,
      "max_relative_gap": float(jnp.max(jnp.abs(gap) / (jnp.abs(f_x - f_b) + 1e-12))),
  }


def main(argv):
  del argv
  print(f"devices: {jax.devices()}", flush=True)
  results = []
  for dtype_name in _DTYPES.value:
    r = run_dtype(dtype_name)
    results.append(r)
    mfu = ("MFU n/a (chip not in the table: give --peak_tflops)" if r["mfu"] is None else
           f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOP/s")
    print(f"[{r['dtype']:8s} {r['device']}] batch {r['batch']}, {r['steps']} steps, "
          f"{r['size']} px: {r['images_per_s']:.3g} images/s (best {r['best_s']:.3f} s, first "
          f"call {r['first_call_s']:.1f} s); {r['gflop_per_point']:.2f} GFLOP/point -> "
          f"{r['achieved_tflops']:.3g} TFLOP/s; {mfu}; "
          f"{100 * r['fraction_of_matmul']:.1f}% of this run's {_MATMUL.value}^3 matmul "
          f"({r['matmul_tflops']:.3g} TFLOP/s); max relative completeness gap "
          f"{r['max_relative_gap']:.3g}", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
