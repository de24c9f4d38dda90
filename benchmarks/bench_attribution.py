r"""drig's integrated gradients against Captum's, on the same Inception-v3.

Both libraries run torchvision's inception_v3 architecture with the same
weights (random, He-initialised, 5 classes; saved by torch and imported into
drig with drig.models.torch_weights.load_torchvision), on the same images, with the
same steps and rule (riemann_right, the poster's). Timed runs alternate
drig / Captum (A B A B) so that load from other processes hits both alike.

Parts (--parts, comma-separated):
  pixel        pixel IG, images/s and s/step, at each --sizes.
  analysis     the poster's whole per-image analysis: pixel IG, layer IG at
               Conv2d_4a_3x3, the top-10 positive and negative neurons' active
               regions and both resultant maps. --neurons=unit (default; the
               poster's single neurons, which drig integrates on receptive-field
               crops) or channel.
  memory       peak RSS for each --memory_steps, each in a fresh subprocess
               (drig chunked; Captum's internal_batch_size bounds its memory).
  flops        achieved GFLOP/s from XLA's cost analysis of one chunk, next to
               the best float32 matrix multiply of torch, numpy and jax.
  maxpool      pixel IG with drig's slice-based max pool against jax's
               reduce_window max pool (whose gradient, XLA's select_and_scatter,
               is slow on CPU), same process, alternating.
  xla_flags    pixel IG under each --xla_flag_sets, one subprocess per run.
  batching     one big batch against chunks; Python loop over jitted chunks
               against lax.scan.
  convergence  relative completeness gap against steps for riemann_right and
               gausslegendre; the fewest steps under 1% for each.
  adaptive     time and model evaluations to a relative gap of 1% for every image
               (batches of 1 and 8, at the first of --sizes): drig's steps="auto"
               against drig's and Captum's riemann_right at the fewest doubled steps
               that reach it, timed alternately; then each map's distance from a
               converged reference (--adaptive_reference_steps), since a small gap
               can hide errors of opposite sign.
               --adaptive_control=map: to a relative map error of 1% instead
               (drig's control="map"; the fixed rules are searched by their maps'
               distance from that reference).
  map_estimate control="map" at each --map_tolerances: evaluations, each map's
               true error against the reference and the estimate's ratio to it;
               and the maps of uniform trapezoid grids of --uniform_intervals
               (images: the largest of --adaptive_batches).

--checkpoint=WORKDIR (a drig.train workdir; --checkpoint_step picks the step, as
drig.analyze's config.checkpoint_step) replaces the random He weights by that
trained grader in 'convergence', 'adaptive' and 'map_estimate' (the only parts it allows):
drig's own architecture at the run's image size (--sizes is then unused), on the first
images of --checkpoint_split of the run's data set whose true grade is at least
--checkpoint_min_grade. Captum runs a torch copy of the run's network
(benchmarks/torch_twin.py), checked against drig's on two of those images first.

--xla_flags sets XLA_FLAGS (appended) before JAX starts, for every part and
child process; the 'xla_flags' part compares --xla_flag_sets instead.

Full run (the lead, on a quiet machine):
  python benchmarks/bench_attribution.py
Smoke run:
  python benchmarks/bench_attribution.py --sizes=96 --steps=4 --repeats=1 \
    --captum_neurons=1 --memory_steps=4,8 --memory_size=96 --convergence_steps=8,16 \
    --batching_configs=python:4:1,python:4:2,python:2,scan:2,map:2
  python benchmarks/bench_attribution.py --parts=adaptive --sizes=80 --repeats=1 \
    --adaptive_batches=1 --adaptive_tolerance=0.1 --adaptive_max_fixed_steps=16
  python benchmarks/bench_attribution.py --parts=map_estimate --sizes=80 \
    --adaptive_batches=1 --adaptive_reference_steps=64 --uniform_intervals=8,16 \
    --map_tolerances=0.1 --map_max_steps=65
Time to 1% on a trained grader (the demo's run; smoke: a tiny run, tolerance 0.1):
  python benchmarks/bench_attribution.py --parts=adaptive,convergence \
    --checkpoint=workdirs/runlocal --adaptive_max_fixed_steps=1024
The same with refinement rounds of one call (checks the gap after every 8 points):
  python benchmarks/bench_attribution.py --parts=adaptive --checkpoint=workdirs/runlocal \
    --adaptive_max_fixed_steps=1024 --adaptive_points_per_round=8 --repeats=1
Time to a 1% map error on the same grader:
  python benchmarks/bench_attribution.py --parts=adaptive --checkpoint=workdirs/runlocal \
    --adaptive_control=map --adaptive_reference_steps=4096 --adaptive_max_fixed_steps=2048 \
    --repeats=1 --adaptive_search_timing
How the map control's estimate tracks the true error, against uniform grids:
  python benchmarks/bench_attribution.py --parts=map_estimate --checkpoint=workdirs/runlocal \
    --adaptive_reference_steps=8192
"""

import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from drig import grading

# JAX (and drig's JAX modules) and torch are imported inside the parts: --xla_flags
# must reach XLA_FLAGS before JAX starts, and torch loads only where Captum runs.

_PARTS = flags.DEFINE_list(
    "parts", ["pixel", "analysis", "flops", "maxpool", "batching", "xla_flags", "memory",
              "convergence", "adaptive"],
    "Which measurements to run.")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "Appended to XLA_FLAGS before JAX starts.")
_SIZES = flags.DEFINE_list("sizes", ["256", "299"], "Square input sizes in pixels.")
_STEPS = flags.DEFINE_integer("steps", 32, "Integration steps.")
_BATCH = flags.DEFINE_integer("batch", 1, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repetitions (alternating drig/Captum).")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "drig's chunk_size; 0: its default.")
_CAPTUM_BATCH = flags.DEFINE_integer("captum_internal_batch_size", 8,
                                     "Captum's internal_batch_size (path points per call).")
_CAPTUM_NEURONS = flags.DEFINE_integer(
    "captum_neurons", 20, "How many of Captum's 20 neuron integrations to run in 'analysis'; "
    "fewer are timed and scaled to 20 (said so in the output).")
_LAYER = flags.DEFINE_string("layer", "Conv2d_4a_3x3", "The inspected layer (the stem's last).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Neurons of each sign in 'analysis'.")
_NEURONS = flags.DEFINE_enum(
    "neurons", "unit", ["unit", "channel"],
    "What a neuron is in 'analysis': a unit (one channel at one position, the poster's "
    "'single neuron', Captum's neuron_selector=(c, h, w)) or a whole channel.")
_MEMORY_STEPS = flags.DEFINE_list("memory_steps", ["32", "128", "512"], "Steps for 'memory'.")
_MEMORY_SIZE = flags.DEFINE_integer("memory_size", 256, "Input size for 'memory'.")
_MEMORY_UNCHUNKED_MAX = flags.DEFINE_integer(
    "memory_unchunked_max", 128, "In 'memory', also run drig unchunked up to this many steps.")
_XLA_FLAG_SETS = flags.DEFINE_list(
    "xla_flag_sets",
    ["", "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
     "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY",
     "--xla_cpu_enable_fast_min_max=true"],
    "XLA_FLAGS values to compare ('' = XLA's defaults).")
_BATCHING = flags.DEFINE_list(
    "batching_configs", ["python:32:1", "python:16:1", "python:8:1", "python:4:1",
                         "python:8:2", "python:8:4", "python:16:2", "python:16:4", "scan:8",
                         "map:8"],
    "loop:chunk_size[:groups] settings for 'batching' (chunk = steps is one big batch); "
    "loop is python (jitted chunks dispatched from Python), scan (one lax.scan) or map (one "
    "lax.map over the chunks, then a sum); groups (python only; default drig's): "
    "independent groups each chunk is split into inside its compiled program.")
_CONVERGENCE_STEPS = flags.DEFINE_list("convergence_steps",
                                       ["8", "16", "32", "64", "128", "256"],
                                       "Step counts for 'convergence' (multiples of 8 share "
                                       "one compiled chunk).")
_CONVERGENCE_IMAGES = flags.DEFINE_integer("convergence_images", 2,
                                           "Images for 'convergence'.")
_ADAPTIVE_BATCHES = flags.DEFINE_list("adaptive_batches", ["1", "8"],
                                      "Batch sizes for 'adaptive' (at the first of --sizes).")
_ADAPTIVE_TOLERANCE = flags.DEFINE_float(
    "adaptive_tolerance", 0.01, "'adaptive': the relative completeness gap every image must meet.")
_ADAPTIVE_MAX_FIXED = flags.DEFINE_integer(
    "adaptive_max_fixed_steps", 512, "'adaptive': the most steps tried (doubling from "
    "--adaptive_first_steps) for the fixed riemann_right rules of drig and Captum.")
_ADAPTIVE_FIRST = flags.DEFINE_integer("adaptive_first_steps", 8,
                                       "'adaptive': the first fixed step count tried.")
_ADAPTIVE_REFERENCE = flags.DEFINE_integer(
    "adaptive_reference_steps", 2048,
    "'adaptive': the maps' accuracy is measured against drig's riemann_middle at this many "
    "steps (and its own at half as many, to show how settled it is); 0: not measured. Costs "
    "1.5x this many evaluations per image.")
_ADAPTIVE_ROUND_CAP = flags.DEFINE_integer(
    "adaptive_points_per_round", 0,
    "'adaptive': an alternative design to measure: each image adds at most this many points "
    "per refinement round (the rest only fill the round's last call), so the gap is checked "
    "after every few points; 0: drig's own rounds, planned until the sum of |interval "
    "errors| is within tolerance.")
_ADAPTIVE_CONTROL = flags.DEFINE_enum(
    "adaptive_control", "gap", ["gap", "map"],
    "'adaptive': what drig's error control bounds and the fixed rules are searched for. gap: "
    "the relative completeness gap; map: each map's relative L2 error against the reference "
    "(--adaptive_reference_steps), which drig estimates as it bisects (control='map').")
_UNIFORM_INTERVALS = flags.DEFINE_list(
    "uniform_intervals", ["64", "128", "256", "512", "1024"],
    "'map_estimate': the uniform trapezoid grids' interval counts.")
_MAP_TOLERANCES = flags.DEFINE_list("map_tolerances", ["0.04", "0.02", "0.01", "0.005"],
                                    "'map_estimate': the map control's tolerances.")
_MAP_MAX_STEPS = flags.DEFINE_integer("map_max_steps", 4097,
                                      "'map_estimate': the map control's max_steps.")
_ADAPTIVE_SEARCH_TIMING = flags.DEFINE_bool(
    "adaptive_search_timing", False,
    "'adaptive': also count the search's run at the step count found as one timing of each "
    "fixed rule (it includes the gap's two forward passes); with --repeats=0 the fixed rules "
    "run only in the search, for paths so long that a timed rerun would double the cost.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "A drig.train workdir: 'convergence', 'adaptive' and 'map_estimate' "
    "attribute its trained grader on its data set's images instead of random He weights on "
    "smooth random images.")
_CHECKPOINT_STEP = flags.DEFINE_string(
    "checkpoint_step", "best", "With --checkpoint: 'best' (validation kappa), 'latest' or a "
    "step number.")
_CHECKPOINT_SPLIT = flags.DEFINE_string("checkpoint_split", "test",
                                        "With --checkpoint: the data split the images come from.")
_CHECKPOINT_MIN_GRADE = flags.DEFINE_integer(
    "checkpoint_min_grade", 2, "With --checkpoint: only images of at least this true grade "
    "(the lesions the maps should find).")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one measurement in this process.")
_CHILD_ARGS = flags.DEFINE_string("child_args", "{}", "Internal: JSON arguments for --child.")

NUM_GRADES = grading.NUM_GRADES
GRADE = 4


def log(*args):
  print(*args, flush=True)


# ------------------------------------------------------------------------------
# Models, weights and inputs shared by both libraries.


def smooth_images(n, size, seed=7):
  """Smooth random images in [-1, 1] with a little noise (no max-pool ties)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = np.zeros((n, size, size, 3), np.float32)
  for i in range(n):
    for _ in range(12):
      cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.2)
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)).astype(np.float32)
      out[i] += rng.normal(size=3).astype(np.float32) * blob[..., None]
  out = 0.95 * np.tanh(out) + rng.normal(0, 0.01, out.shape).astype(np.float32)
  return np.clip(out, -1, 1).astype(np.float32)


def torch_inception(seed=0):
  """torchvision's inception_v3, 5 classes, He-initialised, eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                          num_classes=NUM_GRADES)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.8, 1.2)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.8, 1.2)
  return model.eval()


def weights_file():
  path = os.path.join(tempfile.gettempdir(), "drig_bench_inception_v3.pth")
  if not os.path.exists(path):
    import torch  # pylint: disable=g-import-not-at-top
    torch.save(torch_inception().state_dict(), path)
  return path


def _apply(model, variables, x):
  return model.apply(variables, x)


class Drig:
  """drig's side: the imported model and its quantity functions."""

  def __init__(self, path):
    import jax  # pylint: disable=g-import-not-at-top
    from drig import attribution  # pylint: disable=g-import-not-at-top
    from drig.models import torch_weights  # pylint: disable=g-import-not-at-top
    from drig.models.inception_v3 import InceptionV3  # pylint: disable=g-import-not-at-top
    self.attribution = attribution
    self.model = InceptionV3(num_classes=NUM_GRADES, convention="torchvision")
    self.variables = torch_weights.load_torchvision(path)
    logits = jax.tree_util.Partial(functools.partial(_apply, self.model), self.variables)
    self.quantity = attribution.probability_of_grade(logits, GRADE)

  def pixel_ig(self, x, steps, chunk_size=None, loop=None, method="riemann_right",
               groups=None):
    import jax  # pylint: disable=g-import-not-at-top
    from drig.attribution import integration as ig_lib  # pylint: disable=g-import-not-at-top
    b = self.attribution.half_gray_baseline(x)
    out = ig_lib._integrated_gradients(self.quantity, x, b, steps=steps, method=method,  # pylint: disable=protected-access
                                       chunk_size=chunk_size, loop=loop, groups=groups)
    return jax.block_until_ready(out)

  def pixel_ig_auto(self, x, tolerance, chunk_size=None, control=None, max_steps=None):
    """Error-controlled pixel IG: an AdaptiveAttribution (steps = evaluations per image).

    control defaults to --adaptive_control; max_steps to the fixed search's cap
    (--adaptive_max_fixed_steps), twice that plus one under control="map"."""
    import jax  # pylint: disable=g-import-not-at-top
    b = self.attribution.half_gray_baseline(x)
    control = control or _ADAPTIVE_CONTROL.value
    most = max_steps or max(2, _ADAPTIVE_MAX_FIXED.value) * (2 if control == "map" else 1) + 1
    out = self.attribution.integrated_gradients(self.quantity, x, b, steps="auto",
                                                tolerance=tolerance, chunk_size=chunk_size,
                                                max_steps=most, control=control)
    return jax.block_until_ready(out)

  def change(self, x):
    """|F(x) - F(half gray)| per image, float64."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    b = self.attribution.half_gray_baseline(x)
    return np.abs(np.asarray(self.quantity(x) - self.quantity(jnp.broadcast_to(b, x.shape)),
                             np.float64))

  def analysis(self, x, steps, k, layer, chunk_size=None, by="unit"):
    import jax  # pylint: disable=g-import-not-at-top
    to_layer, layer_logits = self.attribution.split_model(self.model, self.variables, layer)
    out = self.attribution.lesion_detection(
        to_layer, self.attribution.probability_of_grade(layer_logits, GRADE), x,
        self.attribution.half_gray_baseline(x), k=k, steps=steps, chunk_size=chunk_size, by=by)
    return jax.block_until_ready(out)


class DrigRun(Drig):
  """drig's side on a trained run (--checkpoint): its model, weights and image size."""

  def __init__(self, workdir, step):  # pylint: disable=super-init-not-called
    from drig import attribution  # pylint: disable=g-import-not-at-top
    from drig.analysis import model_source  # pylint: disable=g-import-not-at-top
    from drig.models import runs  # pylint: disable=g-import-not-at-top
    self.attribution = attribution
    try:
      run = runs.load_run(workdir, step)
    except runs.RunError as e:
      raise app.UsageError(f"--checkpoint={workdir!r} --checkpoint_step={step!r}: {e}") from e
    self.run = run
    self.model, self.variables = run.model, run.variables
    self.quantity = attribution.probability_of_grade(
        model_source.ModelLogits(run.model, run.variables), GRADE)
    self.image_size = int(run.training_config["data"]["image_size"])
    self.description = f"{os.path.abspath(workdir)}, step {run.step} ({run.why})"

  def images(self, n):
    """The first n images of --checkpoint_split with a true grade >= --checkpoint_min_grade,
    float32 [n, S, S, 3] in the model's [-1, 1]."""
    import ml_collections  # pylint: disable=g-import-not-at-top
    from drig.data import datasets  # pylint: disable=g-import-not-at-top
    data = ml_collections.ConfigDict(self.run.training_config["data"])
    split, min_grade = _CHECKPOINT_SPLIT.value, _CHECKPOINT_MIN_GRADE.value
    try:
      builder = datasets.load_builder_from_config(data, prepare=False)
    except (datasets.DatasetNotPreparedError, ValueError) as e:
      raise app.UsageError(f"--checkpoint: the run's data set cannot be read: {e}") from e
    if split not in builder.info.splits:
      raise app.UsageError(f"--checkpoint_split={split!r}: {builder.info.full_name} has the "
                           f"splits {sorted(builder.info.splits)}")
    source = builder.as_data_source(split)
    chosen = []
    for index in range(len(source)):
      example = source[index]
      if int(example["label"]) >= min_grade:
        chosen.append(np.asarray(example["image"], np.uint8))
        if len(chosen) == n:
          return np.asarray(grading.to_model_input(np.stack(chosen)), np.float32)
    raise app.UsageError(f"--checkpoint: split {split!r} of {builder.info.full_name} has "
                         f"{len(chosen)} images of grade >= {min_grade}, fewer than the {n} "
                         "needed (--checkpoint_min_grade)")


def inputs(drig, n, size, seed):
  """The images a part attributes: the trained run's (--checkpoint), else smooth random ones."""
  if isinstance(drig, DrigRun):
    return drig.images(n)
  return smooth_images(n, size, seed=seed)


class Captum:
  """Captum's side: torchvision's model with the same weights as drig's, or ``model``."""

  def __init__(self, path=None, model=None):
    import torch  # pylint: disable=g-import-not-at-top
    from captum import attr  # pylint: disable=g-import-not-at-top
    self.torch, self.attr = torch, attr
    if model is None:
      model = torch_inception()
      model.load_state_dict(torch.load(path, weights_only=True))
    self.model = model.eval()
    self.forward = lambda inputs: torch.softmax(self.model(inputs), dim=-1)

  def _inputs(self, x):
    inputs = self.torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    return inputs, self.torch.full_like(inputs, grading.HALF_GRAY_MODEL)

  def pixel_ig(self, x, steps, internal_batch_size):
    inputs, baselines = self._inputs(x)
    return self.attr.IntegratedGradients(self.forward).attribute(
        inputs, baselines=baselines, target=GRADE, n_steps=steps, method="riemann_right",
        internal_batch_size=internal_batch_size)

  def analysis(self, x, steps, k, layer, internal_batch_size, neurons_run, by="unit"):
    """Returns {part: seconds}; neuron time is scaled to 2k if fewer were run."""
    inputs, baselines = self._inputs(x)
    kw = dict(baselines=baselines, n_steps=steps, method="riemann_right",
              internal_batch_size=internal_batch_size)
    times = {}
    t = time.perf_counter()
    pixels = self.attr.IntegratedGradients(self.forward).attribute(inputs, target=GRADE, **kw)
    times["pixel IG"] = time.perf_counter() - t
    module = getattr(self.model, layer)
    t = time.perf_counter()
    units = self.attr.LayerIntegratedGradients(self.forward, module).attribute(
        inputs, target=GRADE, **kw)
    times["layer IG"] = time.perf_counter() - t
    scores = units[0] if by == "unit" else units.sum(dim=(2, 3))[0]
    order = self.torch.argsort(scores.flatten())
    chosen = list(order[-k:].tolist()) + list(order[:k].tolist())
    nig = self.attr.NeuronIntegratedGradients(self.model, module)
    regions = []
    t = time.perf_counter()
    for c in chosen[:neurons_run]:
      if by == "unit":  # Captum's selector for one unit: (channel, row, column)
        selector = tuple(int(i) for i in np.unravel_index(c, tuple(scores.shape)))
      else:
        selector = lambda a, c=c: a[:, c].sum((1, 2))
      regions.append(nig.attribute(inputs, neuron_selector=selector, **kw))
    elapsed = time.perf_counter() - t
    times["neuron IGs"] = elapsed * len(chosen) / max(1, len(regions))
    t = time.perf_counter()
    w = scores.flatten()[chosen[:len(regions)]]
    sum(wi * r for wi, r in zip(w, regions))  # the resultant maps: weighted sums
    times["resultant maps"] = time.perf_counter() - t
    del pixels
    return times


def captum_on_run(drig_run):
  """Captum on the torch copy of a trained drig run (benchmarks/torch_twin.py), after
  checking that the copy's p(grade) and its input gradient equal drig's on the run's images."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch_twin  # pylint: disable=g-import-not-at-top
  try:
    twin = torch_twin.from_drig(drig_run.model, drig_run.variables)
  except ValueError as e:
    raise app.UsageError(f"--checkpoint: Captum cannot run this model: {e}") from e
  captum = Captum(model=twin)
  x = drig_run.images(2)
  inputs, _ = captum._inputs(x)  # pylint: disable=protected-access
  inputs.requires_grad_(True)
  probability = captum.forward(inputs)[:, GRADE]
  probability.sum().backward()
  drig_probability, drig_gradient = jax.vmap(jax.value_and_grad(
      lambda v: drig_run.quantity(v[None])[0]))(jnp.asarray(x))
  value_error = float(np.abs(probability.detach().numpy() - np.asarray(drig_probability)).max())
  gradient = inputs.grad.numpy().transpose(0, 2, 3, 1)
  gradient_error = float(np.abs(gradient - np.asarray(drig_gradient)).max()
                         / np.abs(np.asarray(drig_gradient)).max())
  log(f"torch copy of the run: max |p - p_drig| {value_error:.1e}, max |grad - grad_drig| / "
      f"max |grad_drig| {gradient_error:.1e} on 2 images")
  if value_error > 1e-4 or gradient_error > 1e-3:
    raise app.UsageError("--checkpoint: the torch copy of the run does not compute drig's "
                         "function; Captum's figures would not be comparable")
  return captum



# ------------------------------------------------------------------------------
# Parts.


def _chunk(steps):
  return _CHUNK.value or None


def _settle(seconds=1.0):
  """Lets the other library's worker threads stop spinning before a timed run."""
  time.sleep(seconds)


def part_pixel(drig, captum):
  for size in map(int, _SIZES.value):
    x = smooth_images(_BATCH.value, size)
    steps = _STEPS.value
    t = time.perf_counter()
    drig.pixel_ig(x, steps, _chunk(steps))
    log(f"[pixel {size}px] drig first call (compile + run): {time.perf_counter() - t:.1f} s")
    captum.pixel_ig(x, steps, _CAPTUM_BATCH.value)  # warm-up
    d, c = [], []
    for _ in range(_REPEATS.value):
      _settle()
      t = time.perf_counter()
      drig.pixel_ig(x, steps, _chunk(steps))
      d.append(time.perf_counter() - t)
      _settle()
      t = time.perf_counter()
      captum.pixel_ig(x, steps, _CAPTUM_BATCH.value)
      c.append(time.perf_counter() - t)
    n = _BATCH.value
    log(f"[pixel {size}px, {steps} steps, batch {n}] drig {min(d):.2f} s "
        f"({n / min(d):.3f} img/s, {min(d) / steps / n:.3f} s/step)  Captum {min(c):.2f} s "
        f"({n / min(c):.3f} img/s, {min(c) / steps / n:.3f} s/step)  "
        f"speed-up {min(c) / min(d):.2f}x   (all drig {['%.2f' % v for v in d]}, "
        f"Captum {['%.2f' % v for v in c]})")


def part_analysis(drig, captum):
  for size in map(int, _SIZES.value):
    x = smooth_images(1, size)
    steps, k = _STEPS.value, _TOP_K.value
    t = time.perf_counter()
    drig.analysis(x, steps, k, _LAYER.value, _chunk(steps), by=_NEURONS.value)
    log(f"[analysis {size}px] drig first call (compile + run): {time.perf_counter() - t:.1f} s")
    d, c = [], []
    for _ in range(_REPEATS.value):
      _settle()
      t = time.perf_counter()
      drig.analysis(x, steps, k, _LAYER.value, _chunk(steps), by=_NEURONS.value)
      d.append(time.perf_counter() - t)
      _settle()
      c.append(captum.analysis(x, steps, k, _LAYER.value, _CAPTUM_BATCH.value,
                               _CAPTUM_NEURONS.value, by=_NEURONS.value))
    best = min(c, key=lambda times: sum(times.values()))
    total = sum(best.values())
    scaled = (f" (neuron IGs: {_CAPTUM_NEURONS.value} of {2 * k} run, time scaled)"
              if _CAPTUM_NEURONS.value < 2 * k else "")
    log(f"[analysis {size}px, {steps} steps, top-{k} {_NEURONS.value}s] drig {min(d):.2f} s  Captum "
        f"{total:.2f} s = " + ", ".join(f"{p} {s:.2f}" for p, s in best.items()) + scaled +
        f"  speed-up {total / min(d):.2f}x")


def _run_child(kind, args, xla_flags=None):
  env = dict(os.environ)
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  cmd = [sys.executable, __file__, f"--child={kind}", f"--child_args={json.dumps(args)}"]
  result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
  if result.returncode != 0 or not lines:
    return {"error": (result.stderr or result.stdout)[-2000:]}
  return json.loads(lines[-1])


def part_memory(drig, captum):
  del drig, captum
  size = _MEMORY_SIZE.value
  for steps in map(int, _MEMORY_STEPS.value):
    runs = [("drig", _CHUNK.value), ("captum", 0)]
    if steps <= _MEMORY_UNCHUNKED_MAX.value:
      runs.insert(1, ("drig", steps))  # one big batch, for contrast
    for lib, chunk in runs:
      r = _run_child("memory", dict(lib=lib, size=size, steps=steps, chunk=chunk,
                                    captum_batch=_CAPTUM_BATCH.value))
      name = lib if lib == "captum" else f"drig (chunk {chunk or 'default'})"
      if "error" in r:
        log(f"[memory {name} {steps} steps] failed: {r['error']}")
        continue
      log(f"[memory {size}px, {steps:3d} steps] {name:22s} peak RSS {r['run_mb']:6.0f} MB "
          f"(+{r['run_mb'] - r['before_mb']:5.0f} MB over the {r['before_mb']:.0f} MB before the "
          f"call); first call (compiling) {r['first_mb']:.0f} MB; {r['loaded_mb']:.0f} MB after "
          f"loading the model; {r['seconds']:.1f} s")


def _child_memory(args):
  x = smooth_images(1, args["size"])
  path = weights_file()
  if args["lib"] == "drig":
    lib = Drig(path)
    run = lambda: lib.pixel_ig(x, args["steps"], args["chunk"] or None)
  else:
    lib = Captum(path)
    run = lambda: lib.pixel_ig(x, args["steps"], args["captum_batch"])
  loaded = _rss_mb("VmRSS")
  _reset_peak()
  run()
  first = _rss_mb("VmHWM")
  _reset_peak()
  before = _rss_mb("VmRSS")
  t = time.perf_counter()
  run()
  return dict(run_mb=_rss_mb("VmHWM"), before_mb=before, first_mb=first, loaded_mb=loaded,
              seconds=time.perf_counter() - t)


def _reset_peak():
  """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _rss_mb(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024  # kB
  return float("nan")


def _matmul_rates(n=2048, reps=5):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
  flop = 2 * n ** 3
  rates = {}
  ta = torch.from_numpy(a)
  ja = jnp.asarray(a)
  mm = jax.jit(lambda u: u @ u)
  mm(ja).block_until_ready()
  for name, fn in [("torch", lambda: ta @ ta), ("numpy", lambda: a @ a),
                   ("jax", lambda: mm(ja).block_until_ready())]:
    best = float("inf")
    for _ in range(reps):
      t = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - t)
    rates[name] = flop / best / 1e9
  return rates


def part_flops(drig, captum):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  del captum
  from drig.attribution import integration as ig_lib  # pylint: disable=g-import-not-at-top
  for size in map(int, _SIZES.value):
    x = jnp.asarray(smooth_images(_BATCH.value, size))
    steps = _STEPS.value
    num_chunks, chunk = ig_lib.chunk_plan(steps, _chunk(steps), x.shape[0])
    b = drig.attribution.half_gray_baseline(x)
    nodes = [jnp.zeros((chunk,), jnp.float32)] * 3
    operands = ig_lib.Operands(drig.quantity)
    total = jnp.zeros(x.shape, jnp.float32)
    groups = min(ig_lib.default_groups_per_call(), chunk)
    compiled = ig_lib._chunk_step.lower(ig_lib._input_gradient, groups, operands, b, x, *nodes,  # pylint: disable=protected-access
                                        total).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_point = cost["flops"] / (chunk * x.shape[0])
    drig.pixel_ig(x, steps, _chunk(steps))
    best = float("inf")
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      drig.pixel_ig(x, steps, _chunk(steps))
      best = min(best, time.perf_counter() - t)
    achieved = per_point * steps * x.shape[0] / best / 1e9
    rates = _matmul_rates()
    log(f"[flops {size}px] {per_point / 1e9:.1f} GFLOP per forward+input-gradient point "
        f"(XLA cost analysis, chunks of {chunk}); pixel IG achieves {achieved:.0f} GFLOP/s; "
        "best float32 2048^2 matmul: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
        + " GFLOP/s")


def part_xla_flags(drig, captum):
  del drig, captum
  size = int(_SIZES.value[0])
  results = {s: [] for s in _XLA_FLAG_SETS.value}
  for round_index in range(_REPEATS.value):
    # A B C, then C B A: a trend in the machine's load favours no setting.
    order = _XLA_FLAG_SETS.value[::(-1) ** round_index]
    for setting in order:
      r = _run_child("pixel", dict(size=size, steps=_STEPS.value, chunk=_CHUNK.value,
                                   batch=_BATCH.value), xla_flags=setting)
      if "error" in r:
        log(f"[xla_flags {setting or 'default'}] failed: {r['error']}")
        continue
      results[setting].append(r["seconds"])
  for setting, times in results.items():
    if times:
      log(f"[xla_flags {size}px, {_STEPS.value} steps] {setting or '(XLA defaults)'}: best "
          f"{min(times):.2f} s ({min(times) / _STEPS.value / _BATCH.value:.3f} s/step), "
          f"all {['%.2f' % t for t in times]}")


def _child_pixel(args):
  drig = Drig(weights_file())
  x = smooth_images(args["batch"], args["size"])
  drig.pixel_ig(x, args["steps"], args["chunk"] or None)
  best = float("inf")
  for _ in range(2):
    t = time.perf_counter()
    drig.pixel_ig(x, args["steps"], args["chunk"] or None)
    best = min(best, time.perf_counter() - t)
  return dict(seconds=best)


def _reduce_window_max_pool(x):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def part_maxpool(drig, captum):
  """Pixel IG with the slice-based max pool (A) and reduce_window's (B), alternating.

  B is a second Drig whose programs are traced while inception_v3._max_pool is
  swapped for flax's reduce_window pool; compiled programs are cached per
  model function, so the swap is undone before the timed calls.
  """
  del captum
  from drig.models import inception_v3  # pylint: disable=g-import-not-at-top
  size = int(_SIZES.value[0])
  x = smooth_images(_BATCH.value, size)
  steps = _STEPS.value
  variants = {"slices (drig)": drig, "reduce_window": Drig(weights_file())}
  fast_pool = inception_v3._max_pool  # pylint: disable=protected-access
  for name, lib in variants.items():
    pool = fast_pool if lib is drig else _reduce_window_max_pool
    inception_v3._max_pool = pool  # pylint: disable=protected-access
    try:
      t = time.perf_counter()
      lib.pixel_ig(x, steps, _chunk(steps))
      log(f"[maxpool {size}px] {name} first call (compile + run) {time.perf_counter() - t:.1f} s")
    finally:
      inception_v3._max_pool = fast_pool  # pylint: disable=protected-access
  times = {name: [] for name in variants}
  for _ in range(_REPEATS.value):
    for name, lib in variants.items():
      t = time.perf_counter()
      lib.pixel_ig(x, steps, _chunk(steps))
      times[name].append(time.perf_counter() - t)
  for name, ts in times.items():
    log(f"[maxpool {size}px, {steps} steps, batch {_BATCH.value}] {name:14s} best {min(ts):.2f} s "
        f"({min(ts) / steps / _BATCH.value:.3f} s/step), all {['%.2f' % t for t in ts]}")
  ratios = [b / a for a, b in zip(times["slices (drig)"], times["reduce_window"])]
  log(f"[maxpool {size}px] reduce_window / slices time per alternating round: "
      f"{['%.2f' % r for r in ratios]}")


def part_batching(drig, captum):
  del captum
  size = int(_SIZES.value[0])
  x = smooth_images(_BATCH.value, size)
  steps = _STEPS.value
  configs = {}
  for text in _BATCHING.value:
    loop, chunk, *groups = text.split(":")
    configs[text] = functools.partial(drig.pixel_ig, x, steps, int(chunk), loop,
                                      groups=int(groups[0]) if groups else None)
  for name, run in configs.items():
    t = time.perf_counter()
    run()
    log(f"[batching {size}px] {name} first call (compile + run) "
        f"{time.perf_counter() - t:.1f} s")
  times = {name: [] for name in configs}
  for round_index in range(_REPEATS.value):
    # Forward, then backward: a trend in the machine's load favours no setting.
    for name in list(configs)[::(-1) ** round_index]:
      t = time.perf_counter()
      configs[name]()
      times[name].append(time.perf_counter() - t)
  for name, ts in times.items():
    log(f"[batching {size}px, {steps} steps] {name:12s} best {min(ts):.2f} s, median "
        f"{statistics.median(ts):.2f} s ({min(ts) / steps / _BATCH.value:.3f} s/step), "
        f"all {['%.2f' % t for t in ts]}")


def part_convergence(drig, captum):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  del captum
  size = drig.image_size if isinstance(drig, DrigRun) else int(_SIZES.value[0])
  x = inputs(drig, _CONVERGENCE_IMAGES.value, size, seed=11)
  b = drig.attribution.half_gray_baseline(x)
  change = np.abs(np.asarray(drig.quantity(x) - drig.quantity(jnp.broadcast_to(b, x.shape))))
  summary = []
  for method in ("riemann_right", "gausslegendre"):
    under = []
    for steps in map(int, _CONVERGENCE_STEPS.value):
      _, gap = drig.pixel_ig(x, steps, chunk_size=8, method=method)
      relative = np.abs(np.asarray(gap)) / change
      log(f"[convergence {size}px] {method:14s} {steps:4d} steps: relative gap per image "
          f"{' '.join('%.2e' % r for r in relative)}")
      under.append((steps, bool(relative.max() < 0.01)))
    first = next((s for s, ok in under if ok), None)
    # The gap need not fall monotonically (ReLU kinks): also the count from
    # which every larger count tested stays under 1%.
    stays = next((s for i, (s, _) in enumerate(under) if all(ok for _, ok in under[i:])), None)
    summary.append(f"{method} first at {first}, stays from {stays}")
  log(f"[convergence {size}px] relative gap < 1% for every image: " + "; ".join(summary))


def _fewest_steps(relative_gap_at, tolerance):
  """The first of first, 2 first, 4 first, ... (up to the limit) whose gap is within tolerance;
  at the limit the gap may still exceed it (the log then says so).

  Returns (steps, gap, seconds): seconds is the wall time of the run at those steps
  (attribution and the gap's two forward passes)."""
  steps = _ADAPTIVE_FIRST.value
  while True:
    _settle()
    t = time.perf_counter()
    gap = relative_gap_at(steps)
    seconds = time.perf_counter() - t
    if gap <= tolerance or steps * 2 > _ADAPTIVE_MAX_FIXED.value:
      return steps, gap, seconds
    steps *= 2


def _needs(steps, gap, tolerance):
  if gap <= tolerance:
    return f"needs {steps} steps"
  return (f"is still above tolerance at {steps} steps, the limit (--adaptive_max_fixed_steps; "
          "its time is a lower bound)")


@contextlib.contextmanager
def _capped_rounds(points_per_round):
  """Within the block, drig's adaptive engine adds at most points_per_round points per image
  per round (0: unchanged)."""
  if not points_per_round:
    yield
    return
  from drig.attribution import adaptive  # pylint: disable=g-import-not-at-top
  plan = adaptive._plan_image  # pylint: disable=protected-access

  def capped(path, tolerance, budget):
    chosen, spare, converged = plan(path, tolerance, budget)
    # chosen is in priority order, above every spare: the rest go first into the fill.
    spare = [(np.inf, a) for a in chosen[points_per_round:]] + spare
    return chosen[:points_per_round], spare, converged

  adaptive._plan_image = capped  # pylint: disable=protected-access
  try:
    yield
  finally:
    adaptive._plan_image = plan  # pylint: disable=protected-access


def part_adaptive(drig, captum):
  """Time and model evaluations to a relative gap of --adaptive_tolerance for every image:
  drig's error-controlled IG, drig's fixed riemann_right and Captum's at the fewest doubled
  steps that reach it (found first, untimed), then timed alternately."""
  with _capped_rounds(_ADAPTIVE_ROUND_CAP.value):
    _time_to_tolerance(drig, captum)


def _time_to_tolerance(drig, captum):
  size, tolerance = int(_SIZES.value[0]), _ADAPTIVE_TOLERANCE.value
  if isinstance(drig, DrigRun):
    size = drig.image_size
  for batch in map(int, _ADAPTIVE_BATCHES.value):
    x = inputs(drig, batch, size, seed=11)
    change = drig.change(x)
    reference, settled = _reference_maps(drig, x) if _ADAPTIVE_REFERENCE.value else (None, None)
    by_map = _ADAPTIVE_CONTROL.value == "map"
    if by_map and reference is None:
      raise app.UsageError("--adaptive_control=map needs --adaptive_reference_steps > 0")
    t = time.perf_counter()
    result = drig.pixel_ig_auto(x, tolerance, _CHUNK.value or None)
    log(f"[adaptive {size}px, batch {batch}] drig first call (compile + run): "
        f"{time.perf_counter() - t:.1f} s")
    adaptive_gap = np.abs(np.asarray(result.gap)) / change
    evaluations = np.asarray(result.steps)

    searched_maps = {}  # steps -> drig's riemann_right attributions

    def drig_gap(steps):
      attributions, gap = drig.pixel_ig(x, steps, _chunk(steps))
      searched_maps[steps] = np.asarray(attributions)
      if by_map:
        return float(_relative_errors(searched_maps[steps], reference).max())
      return float((np.abs(np.asarray(gap)) / change).max())

    def captum_gap(steps):
      output = captum.pixel_ig(x, steps, _CAPTUM_BATCH.value)
      if by_map:
        return float(_relative_errors(_as_map(output), reference).max())
      attributions = output.detach().numpy()
      inputs, baselines = captum._inputs(x)  # pylint: disable=protected-access
      with captum.torch.no_grad():
        torch_change = (captum.forward(inputs)[:, GRADE]
                        - captum.forward(baselines)[:, GRADE]).numpy().astype(np.float64)
      total = attributions.reshape(batch, -1).sum(axis=1)
      return float((np.abs(total - torch_change) / np.abs(torch_change)).max())

    drig.pixel_ig(x, 2, _chunk(2))  # compiles the fixed rule's chunk outside any timing
    fixed_steps, fixed_gap, fixed_search_time = _fewest_steps(drig_gap, tolerance)
    runs = {"drig adaptive": lambda: drig.pixel_ig_auto(x, tolerance, _CHUNK.value or None),
            f"drig riemann_right {fixed_steps}": lambda: drig.pixel_ig(x, fixed_steps,
                                                                       _chunk(fixed_steps))}
    if captum is not None:
      captum_steps, captum_gap_found, captum_search_time = _fewest_steps(captum_gap, tolerance)
      runs[f"Captum riemann_right {captum_steps}"] = lambda: captum.pixel_ig(
          x, captum_steps, _CAPTUM_BATCH.value)
    times, maps = {name: [] for name in runs}, {}
    if _ADAPTIVE_SEARCH_TIMING.value:
      times[f"drig riemann_right {fixed_steps}"].append(fixed_search_time)
      if captum is not None:
        times[f"Captum riemann_right {captum_steps}"].append(captum_search_time)
    for _ in range(_REPEATS.value):  # A B C A B C
      for name, run in runs.items():
        _settle()
        t = time.perf_counter()
        maps[name] = run()
        times[name].append(time.perf_counter() - t)
    for name, run in runs.items():  # --repeats=0: drig adaptive still needs one timing
      if not times[name]:
        _settle()
        t = time.perf_counter()
        maps[name] = run()
        times[name].append(time.perf_counter() - t)
    best = {name: min(v) for name, v in times.items()}
    bound = "max map error" if by_map else "max gap"
    fixed_time = best[f"drig riemann_right {fixed_steps}"]
    if captum is not None:
      captum_time = best[f"Captum riemann_right {captum_steps}"]
      captum_words = (f"Captum {_needs(captum_steps, captum_gap_found, tolerance)} ({bound} "
                      f"{captum_gap_found:.2e}), "
                      f"{captum_time:.2f} s; Captum / drig adaptive "
                      f"{captum_time / best['drig adaptive']:.2f}x, drig fixed / drig adaptive "
                      f"{fixed_time / best['drig adaptive']:.2f}x")
    else:
      captum_words = (f"Captum not run; drig fixed / drig adaptive "
                      f"{fixed_time / best['drig adaptive']:.2f}x")
    weights = drig.description if isinstance(drig, DrigRun) else "random He weights"
    estimates = ("" if result.map_error is None else ", estimated map errors "
                 + " ".join("%.2e" % e for e in np.asarray(result.map_error)))
    log(f"[adaptive {size}px, batch {batch}, {_ADAPTIVE_CONTROL.value} tolerance {tolerance:g}, "
        f"{weights}] drig adaptive: "
        f"evaluations per image {evaluations.tolist()} (total {int(evaluations.sum())}), "
        f"relative gaps {' '.join('%.2e' % g for g in adaptive_gap)}{estimates}, converged "
        f"{np.asarray(result.converged).tolist()}, {best['drig adaptive']:.2f} s; drig "
        f"riemann_right {_needs(fixed_steps, fixed_gap, tolerance)} ({fixed_steps * batch} "
        f"evaluations, {bound} "
        f"{fixed_gap:.2e}), {fixed_time:.2f} s; {captum_words}  (all "
        f"{ {k: ['%.2f' % t for t in v] for k, v in times.items()} })")
    if reference is not None:
      _log_map_errors(reference, settled, x, f"[adaptive {size}px, batch {batch}]", maps, searched_maps,
                      adaptive_evaluations=int(evaluations.sum()))


def _as_map(output):
  """[N, H, W, C] numpy attributions from any run's output (drig fixed, adaptive, Captum)."""
  if hasattr(output, "attributions"):
    return np.asarray(output.attributions)
  if isinstance(output, tuple):
    return np.asarray(output[0])
  return output.detach().numpy().transpose(0, 2, 3, 1)


def _relative_errors(attributions, reference):
  n = reference.shape[0]
  difference = (attributions - reference).reshape(n, -1)
  return np.linalg.norm(difference, axis=1) / np.linalg.norm(reference.reshape(n, -1), axis=1)


def _reference_maps(drig, x):
  """(drig's riemann_middle maps at --adaptive_reference_steps, the relative errors of its
  maps at half as many steps against them)."""
  steps = _ADAPTIVE_REFERENCE.value
  reference = np.asarray(drig.pixel_ig(x, steps, _chunk(steps), method="riemann_middle")[0])
  coarser = np.asarray(drig.pixel_ig(x, steps // 2, _chunk(steps // 2),
                                     method="riemann_middle")[0])
  return reference, _relative_errors(coarser, reference)


def _log_map_errors(reference, settled, x, prefix, maps, searched_maps, adaptive_evaluations):
  """How far each map is from the integral itself: the completeness gap bounds only the
  sum of a map, whose errors of opposite sign can cancel."""
  steps = _ADAPTIVE_REFERENCE.value
  describe = lambda e: f"median {np.median(e):.2%}, max {np.max(e):.2%}"
  words = [f"reference drig riemann_middle {steps} (at {steps // 2} steps it differs by "
           f"{describe(settled)})"]
  words += [f"{name} {describe(_relative_errors(_as_map(m), reference))}"
            for name, m in maps.items()]
  log(f"{prefix} map error, relative L2 against the reference per image: " + "; ".join(words))
  adaptive_worst = np.max(_relative_errors(_as_map(maps["drig adaptive"]), reference))
  fixed = {k: _relative_errors(m, reference) for k, m in sorted(searched_maps.items())}
  as_accurate = next((k for k, e in fixed.items() if np.max(e) <= adaptive_worst), None)
  log(f"{prefix} drig riemann_right map error at each searched step count: "
      + "; ".join(f"{k} {describe(e)}" for k, e in fixed.items())
      + (f"; the fewest as accurate as drig adaptive's worst image: {as_accurate} steps "
         f"({as_accurate * x.shape[0]} evaluations against {adaptive_evaluations})"
         if as_accurate else "; none searched is as accurate as drig adaptive's worst image"))


def part_map_estimate(drig, captum):
  """How well control="map"'s estimate tracks the maps' true error, and what it saves over
  uniform grids: drig at each --map_tolerances, and trapezoid maps on uniform grids of
  --uniform_intervals, against the reference (--adaptive_reference_steps)."""
  del captum
  size = drig.image_size if isinstance(drig, DrigRun) else int(_SIZES.value[0])
  x = inputs(drig, max(map(int, _ADAPTIVE_BATCHES.value)), size, seed=11)
  reference, settled = _reference_maps(drig, x)
  prefix = f"[map_estimate {size}px, {x.shape[0]} images]"
  span = lambda v, f="%.2f": f"{f % np.min(v)} / {f % np.median(v)} / {f % np.max(v)}"
  log(f"{prefix} reference drig riemann_middle {_ADAPTIVE_REFERENCE.value}; at half the "
      f"steps it differs by min / median / max {span(settled * 100, '%.3f')}%")
  for m in map(int, _UNIFORM_INTERVALS.value):
    error = _relative_errors(
        np.asarray(drig.pixel_ig(x, m + 1, _chunk(m + 1), method="trapezoid")[0]), reference)
    log(f"{prefix} uniform trapezoid, {m + 1} evaluations: map error min / median / max "
        f"{span(error * 100, '%.3f')}%")
  for tolerance in map(float, _MAP_TOLERANCES.value):
    out = drig.pixel_ig_auto(x, tolerance, _chunk(0), control="map",
                             max_steps=_MAP_MAX_STEPS.value)
    error = _relative_errors(np.asarray(out.attributions), reference)
    estimate = np.asarray(out.map_error, np.float64)
    log(f"{prefix} control=\"map\", tolerance {tolerance:g}: evaluations "
        f"{span(np.asarray(out.steps), '%d')} (min / median / max), converged "
        f"{int(np.sum(out.converged))}/{x.shape[0]}; map error {span(error * 100, '%.3f')}%; "
        f"estimate / error {span(estimate / error)}; per image (evaluations, error %, "
        "estimate %): " + ", ".join(f"({s}, {100 * e:.3f}, {100 * t:.3f})"
                                    for s, e, t in zip(np.asarray(out.steps), error, estimate)))


PARTS = {"pixel": part_pixel, "analysis": part_analysis, "memory": part_memory,
         "flops": part_flops, "maxpool": part_maxpool, "xla_flags": part_xla_flags,
         "batching": part_batching,
         "convergence": part_convergence, "adaptive": part_adaptive,
         "map_estimate": part_map_estimate}
# The parts that --checkpoint (a trained drig run) can run.
CHECKPOINT_PARTS = {"convergence", "adaptive", "map_estimate"}


def main(argv):
  del argv
  if _XLA_FLAGS.value:  # before JAX starts; children inherit the environment
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _XLA_FLAGS.value).strip()
  if _CHILD.value:
    child = {"memory": _child_memory, "pixel": _child_pixel}[_CHILD.value]
    print(json.dumps(child(json.loads(_CHILD_ARGS.value))), flush=True)
    return
  unknown = set(_PARTS.value) - set(PARTS)
  if unknown:
    raise app.UsageError(f"unknown parts {sorted(unknown)}; use some of {sorted(PARTS)}")
  if _CHECKPOINT.value and set(_PARTS.value) - CHECKPOINT_PARTS:
    raise app.UsageError(
        f"--checkpoint runs only the parts {sorted(CHECKPOINT_PARTS)}; drop "
        f"{sorted(set(_PARTS.value) - CHECKPOINT_PARTS)} from --parts (they compare with "
        "Captum on torchvision's architecture, which a drig run does not have)")
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  log(f"jax {jax.__version__} on {jax.devices()}; torch {torch.__version__} with "
      f"{torch.get_num_threads()} threads; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
      f"load average {os.getloadavg()[0]:.1f}")
  if _CHECKPOINT.value:
    drig = DrigRun(_CHECKPOINT.value, _CHECKPOINT_STEP.value)
    captum = captum_on_run(drig) if "adaptive" in _PARTS.value else None
    log(f"trained grader: {drig.description}, {drig.image_size} px, p(grade {GRADE}); images "
        f"of grade >= {_CHECKPOINT_MIN_GRADE.value} from split {_CHECKPOINT_SPLIT.value!r}")
  else:
    path = weights_file()
    drig = Drig(path) if set(_PARTS.value) - {"memory", "xla_flags"} else None
    captum = Captum(path) if set(_PARTS.value) & {"pixel", "analysis", "adaptive"} else None
  for part in _PARTS.value:
    PARTS[part](drig, captum)


if __name__ == "__main__":
  app.run(main)
