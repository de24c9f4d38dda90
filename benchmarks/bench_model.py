r"""Inception-v3 speed: drig against torchvision (PyTorch) and Keras-on-JAX, in the same run.

Measures images/s of the forward pass and of forward plus input gradient (what
integrated gradients needs per step), at each size and batch, alternating the
frameworks round by round (A B C A B C ...) so that a busy machine affects them
alike. Each line also gives the achieved GFLOP/s, from the FLOPs XLA's cost
analysis counts for drig's compiled program (the same arithmetic for all
three), next to the float32 matrix-multiply rate measured in the same run with
PyTorch and with JAX: the practical peak of this machine.

  python benchmarks/bench_model.py                       # full: 256/299 px, batch 1/16
  python benchmarks/bench_model.py --sizes=256 --batches=1 --rounds=1 --iters=1 \
      --frameworks=drig,torch                            # smoke run

All three carry random weights scaled like trained ones (He-scaled kernels,
BatchNorm statistics of order 1): default initialisations drive activations
into denormal numbers, which would time the CPU's slow path instead.

PyTorch uses all cores by default (--threads); on a machine shared with other
jobs, one thread can be faster than two.

Options set before JAX is imported: --xla_flags (appended to XLA_FLAGS), e.g.
--xla_flags=--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

FRAMEWORKS = ("drig", "torch", "keras")
MODES = ("forward", "grad")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="256,299", help="comma-separated input sizes (px)")
  parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
  parser.add_argument("--modes", default="forward,grad", help="forward and/or grad")
  parser.add_argument("--frameworks", default="drig,torch,keras", help="subset of " +
                      ",".join(FRAMEWORKS))
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
  parser.add_argument("--iters", type=int, default=3, help="timed calls per framework per round")
  parser.add_argument("--matmul_size", type=int, default=2048, help="n of the n x n matmul")
  parser.add_argument("--threads", type=int, default=0,
                      help="PyTorch intra-op threads (0: all cores)")
  parser.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before JAX starts")
  args = parser.parse_args(argv)
  args.sizes = [int(s) for s in args.sizes.split(",") if s]
  args.batches = [int(b) for b in args.batches.split(",") if b]
  args.modes = [m for m in args.modes.split(",") if m]
  args.frameworks = [f for f in args.frameworks.split(",") if f]
  for value, allowed, name in ((args.modes, MODES, "modes"),
                               (args.frameworks, FRAMEWORKS, "frameworks")):
    bad = set(value) - set(allowed)
    if bad:
      parser.error(f"unknown {name}: {sorted(bad)}; choose from {allowed}")
  return args


def timed(fn, iters: int) -> float:
  """Median seconds per call of ``fn`` (which blocks until its result is ready)."""
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# --------------------------------------------------------------------------- #
# The three implementations. Each factory returns {mode: callable(x_numpy)}, with
# the compilation (if any) done on first call; the caller warms up.


def random_flax_variables(model, size):
  """He-scaled random variables built with numpy (no initialiser compilation)."""
  # Lazy: after main() sets XLA_FLAGS, which JAX reads at import.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape),
                         jnp.float32)
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def make_drig():
  # Lazy: after main() sets XLA_FLAGS, which JAX reads at import.
  import jax  # pylint: disable=g-import-not-at-top
  from drig.models import inception_v3  # pylint: disable=g-import-not-at-top
  model = inception_v3.InceptionV3(num_classes=1000)
  variables = random_flax_variables(model, 299)

  def forward(v, x):
    return model.apply(v, x)

  def input_gradient(v, x):
    return jax.grad(lambda x: model.apply(v, x)[:, 0].sum())(x)

  jitted = {"forward": jax.jit(forward), "grad": jax.jit(input_gradient)}
  calls = {mode: (lambda x, f=f: jax.block_until_ready(f(variables, x)))
           for mode, f in jitted.items()}

  def flops(mode, x):
    cost = jitted[mode].lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))
  return calls, flops


def make_torch(threads):
  # Lazy: torch is optional and slow to import.
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  if threads:
    torch.set_num_threads(threads)
  model = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                          init_weights=False).eval()
  # Default initialisation shrinks the activations layer by layer into
  # denormal numbers, which CPUs process many times slower: randomise like drig.
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.from_numpy(
            rng.normal(0, np.sqrt(2 / fan_in), module.weight.shape).astype(np.float32)))
      elif isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32)))
        module.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.1, n).astype(np.float32)))

  def to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

  def forward(x):
    with torch.inference_mode():
      model(to_torch(x))

  def input_gradient(x):
    xt = to_torch(x).requires_grad_(True)
    model(xt)[:, 0].sum().backward()
    return xt.grad

  return {"forward": forward, "grad": input_gradient}


def make_keras():
  # Lazy: after main() sets XLA_FLAGS and KERAS_BACKEND, which they read at import.
  import jax  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  if keras.backend.backend() != "jax":
    raise RuntimeError(f"Keras runs on {keras.backend.backend()}; set KERAS_BACKEND=jax")
  base = keras.applications.InceptionV3(weights=None, include_top=False,
                                        input_shape=(None, None, 3))
  logits = keras.layers.Dense(1000, name="predictions")(
      keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output))
  model = keras.Model(base.input, logits)
  rng = np.random.default_rng(0)  # as drig's and torch's: activations of order 1
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      (kernel,) = layer.get_weights()
      layer.set_weights([rng.normal(0, np.sqrt(2 / np.prod(kernel.shape[:3])), kernel.shape)
                         .astype(np.float32)])
    elif isinstance(layer, keras.layers.BatchNormalization):
      beta, _, _ = layer.get_weights()
      n = beta.shape[0]
      layer.set_weights([beta, rng.normal(0, 0.1, n).astype(np.float32),
                         rng.uniform(0.5, 1.5, n).astype(np.float32)])
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]

  def forward(t, n, x):
    return model.stateless_call(t, n, x, training=False)[0]

  def input_gradient(t, n, x):
    return jax.grad(lambda x: forward(t, n, x)[:, 0].sum())(x)

  jitted = {"forward": jax.jit(forward), "grad": jax.jit(input_gradient)}
  return {mode: (lambda x, f=f: jax.block_until_ready(f(trainable, non_trainable, x)))
          for mode, f in jitted.items()}


# --------------------------------------------------------------------------- #


def matmul_rates(n: int, iters: int = 5) -> dict[str, float]:
  """Best float32 n x n matmul GFLOP/s with PyTorch and JAX."""
  # Lazy: after main() sets XLA_FLAGS, which JAX reads at import.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rates = {}
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  flops = 2.0 * n ** 3
  try:
    # Lazy: torch is optional and slow to import.
    import torch  # pylint: disable=g-import-not-at-top
    ta = torch.from_numpy(a)
    torch.mm(ta, ta)
    rates["torch"] = flops / min(timed(lambda: torch.mm(ta, ta), 1) for _ in range(iters)) / 1e9
  except ImportError:
    pass
  ja = jnp.asarray(a)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(ja, ja))
  rates["jax"] = flops / min(timed(lambda: jax.block_until_ready(dot(ja, ja)), 1)
                             for _ in range(iters)) / 1e9
  return rates


def main(argv):
  args = parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  if "keras" in args.frameworks:
    os.environ.setdefault("KERAS_BACKEND", "jax")
  # Lazy: after main() sets XLA_FLAGS, which JAX reads at import.
  import jax  # pylint: disable=g-import-not-at-top

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  start = time.perf_counter()
  implementations = {}
  flops_of = None
  for framework in args.frameworks:
    t0 = time.perf_counter()
    if framework == "drig":
      implementations["drig"], flops_of = make_drig()
    elif framework == "torch":
      implementations["torch"] = make_torch(args.threads)
    else:
      implementations["keras"] = make_keras()
    print(f"built {framework} in {time.perf_counter() - t0:.1f} s")
  if flops_of is None:  # the FLOP count comes from drig's compiled program
    _, flops_of = make_drig()

  rates = matmul_rates(args.matmul_size)
  print("float32 matmul %dx%d: %s" % (args.matmul_size, args.matmul_size, ", ".join(
      f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())))
  peak = max(rates.values())

  rng = np.random.default_rng(1)
  header = (f"{'px':>4} {'batch':>5} {'mode':>8} {'framework':>9} {'ms/call':>9} "
            f"{'img/s':>8} {'GFLOP/s':>8} {'%peak':>6} {'GFLOP/img':>9}")
  print(header)
  results = []
  for size in args.sizes:
    for batch in args.batches:
      x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
      for mode in args.modes:
        flops = flops_of(mode, x)
        for framework, calls in implementations.items():
          calls[mode](x)  # compile / warm up
        samples = {framework: [] for framework in implementations}
        for _ in range(args.rounds):  # alternate: A B C A B C ...
          for framework, calls in implementations.items():
            samples[framework].append(timed(lambda: calls[mode](x), args.iters))
        for framework, times in samples.items():
          seconds = statistics.median(times)
          achieved = flops / seconds / 1e9
          results.append((size, batch, mode, framework, seconds, achieved))
          print(f"{size:>4} {batch:>5} {mode:>8} {framework:>9} {seconds * 1e3:>9.1f} "
                f"{batch / seconds:>8.2f} {achieved:>8.1f} {100 * achieved / peak:>5.0f}% "
                f"{flops / batch / 1e9:>9.2f}", flush=True)
  print(f"total {time.perf_counter() - start:.0f} s")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
