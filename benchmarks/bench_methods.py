r"""Each attribution method's time per image in drig next to its reference implementation.

Same model weights in both libraries (torch for the references, Flax for
drig), same images, same settings; timed runs alternate drig / reference
(A B A B) so that load from other processes hits both alike, after one
untimed warm-up call each (drig's compiles).

  method      reference                          drig
  blur_ig     saliency 0.2.1 BlurIG              paths.blur_integrated_gradients
  guided_ig   saliency 0.2.1 GuidedIG            paths.guided_integrated_gradients
  grad_cam    Captum LayerGradCam + interpolate  gradcam.grad_cam
  occlusion   Captum Occlusion                   occlusion.occlusion
  xrai        saliency 0.2.1 XRAI                xrai.xrai
  saliency    Captum Saliency                    gradients.gradient(absolute=True)
  input_x_gradient  Captum InputXGradient        gradients.gradient_x_input
  smoothgrad, vargrad  Captum NoiseTunnel(Saliency)  gradients.smoothgrad
  gradient_shap  Captum GradientShap (stdevs 0)  gradients.gradient_shap
  expected_gradients  Captum IntegratedGradients, gradients.expected_gradients
              once per baseline, averaged

saliency is framework-agnostic: its ``call_model_function`` here runs the
torch model (input gradients by autograd), batch_size = drig's points per
call where saliency batches (Blur IG, XRAI's IG), one point per call where it
cannot (Guided IG). Captum's perturbations_per_eval likewise.

--model=cnn is a small CNN (3 -> 16 -> 32 (stride 2, the Grad-CAM layer) ->
32 -> mean -> 5 logits); --model=inception is torchvision's inception_v3 (5
classes, He-initialised) imported into drig's InceptionV3, Grad-CAM at mixed10
(Mixed_7c).

Full run (the lead, on a quiet machine):
  python benchmarks/bench_methods.py --model=inception --size=299
Smoke run:
  python benchmarks/bench_methods.py --model=cnn --size=32 --repeats=1 --blur_steps=4 \
    --guided_steps=4 --xrai_steps=4 --occlusion_window=16 --occlusion_stride=16
"""

import functools
import logging
import statistics
import time

from absl import app
from absl import flags
import numpy as np

# JAX, drig's JAX modules, torch and the reference libraries are imported in
# main: the module stays importable for --help without loading them.

METHOD_NAMES = ("blur_ig", "guided_ig", "grad_cam", "occlusion", "xrai", "saliency",
                "input_x_gradient", "smoothgrad", "vargrad", "gradient_shap",
                "expected_gradients")

_METHODS = flags.DEFINE_list("methods", list(METHOD_NAMES), "Methods to time.")
_MODEL = flags.DEFINE_enum("model", "cnn", ["cnn", "inception"], "The model.")
_SIZE = flags.DEFINE_integer("size", 64, "Square input size in pixels.")
_BATCH = flags.DEFINE_integer("batch", 1, "Images per drig call (the references run one "
                              "image at a time, as their APIs do).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repetitions of each side, alternating.")
_POINTS = flags.DEFINE_integer("points_per_call", 8, "Model inputs per call on both sides.")
_BLUR_STEPS = flags.DEFINE_integer("blur_steps", 100, "Blur IG steps (saliency's default).")
_MAX_SIGMA = flags.DEFINE_float("max_sigma", 50.0, "Blur IG's widest blur in pixels.")
_GUIDED_STEPS = flags.DEFINE_integer("guided_steps", 200, "Guided IG steps (saliency's).")
_OCCLUSION_WINDOW = flags.DEFINE_integer("occlusion_window", 15, "Occlusion window (pixels).")
_OCCLUSION_STRIDE = flags.DEFINE_integer("occlusion_stride", 8, "Occlusion stride (pixels).")
_XRAI_STEPS = flags.DEFINE_integer("xrai_steps", 100, "XRAI's IG steps per baseline.")
_SAMPLES = flags.DEFINE_integer("samples", 5, "Noise samples (SmoothGrad, VarGrad) and draws "
                                "(GradientShap) per image: Captum's default.")
_STDEV = flags.DEFINE_float("stdev", 0.2, "Absolute noise std of SmoothGrad and VarGrad.")
_EG_BASELINES = flags.DEFINE_integer("eg_baselines", 4, "Expected gradients: K baselines.")
_EG_STEPS = flags.DEFINE_integer("eg_steps", 16, "Expected gradients: IG steps per baseline.")

NUM_GRADES = 5
GRADE = 4


def log(*args):
  print(*args, flush=True)


def smooth_images(n, size, seed=7):
  """Smooth random images in [-1, 1] (blobs of colour, a little noise)."""
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


# ------------------------------------------------------------------------------
# The two models, each in torch and in drig with the same weights.


def _small_cnn(torch, nn):
  """(torch module, its Grad-CAM layer, drig's (logits, to_layer, layer_logits))."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  class TorchCNN(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.block1 = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU())
      self.block2 = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                        torch.nn.ReLU())
      self.block3 = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU())
      self.fc = torch.nn.Linear(32, NUM_GRADES)

    def forward(self, x):
      return self.fc(self.block3(self.block2(self.block1(x))).mean(dim=(2, 3)))

  class FlaxCNN(nn.Module):

    def setup(self):
      pad = ((1, 1), (1, 1))
      self.conv1 = nn.Conv(16, (3, 3), padding=pad)
      self.conv2 = nn.Conv(32, (3, 3), strides=(2, 2), padding=pad)
      self.conv3 = nn.Conv(32, (3, 3), padding=pad)
      self.fc = nn.Dense(NUM_GRADES)

    def to_layer(self, x):
      return nn.relu(self.conv2(nn.relu(self.conv1(x))))

    def from_layer(self, a):
      return self.fc(nn.relu(self.conv3(a)).mean(axis=(1, 2)))

    def __call__(self, x):
      return self.from_layer(self.to_layer(x))

  torch.manual_seed(0)
  model = TorchCNN().eval()

  def conv(m):
    return {"kernel": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(m.bias.detach().numpy())}
  variables = {"params": {
      "conv1": conv(model.block1[0]), "conv2": conv(model.block2[0]),
      "conv3": conv(model.block3[0]),
      "fc": {"kernel": jnp.asarray(model.fc.weight.detach().numpy().T),
             "bias": jnp.asarray(model.fc.bias.detach().numpy())}}}

  def part(method):
    return jax.tree_util.Partial(
        functools.partial(lambda m, v, x: FlaxCNN().apply(v, x, method=m), method), variables)
  return model, model.block2, (part(FlaxCNN.__call__), part(FlaxCNN.to_layer),
                               part(FlaxCNN.from_layer))


def _inception(torch):
  """torchvision's inception_v3 (5 classes, He weights) and drig's import of it."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from drig import attribution  # pylint: disable=g-import-not-at-top
  from drig.models import torch_weights  # pylint: disable=g-import-not-at-top
  from drig.models.inception_v3 import InceptionV3  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
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
  model.eval()
  path = os.path.join(tempfile.mkdtemp(), "inception_v3.pth")
  torch.save(model.state_dict(), path)
  flax_model = InceptionV3(num_classes=NUM_GRADES, convention="torchvision")
  variables = torch_weights.load_torchvision(path)
  logits = jax.tree_util.Partial(lambda v, x: flax_model.apply(v, x), variables)
  to_layer, layer_logits = attribution.split_model(flax_model, variables, "mixed10")
  return model, model.Mixed_7c, (logits, to_layer, layer_logits)


# ------------------------------------------------------------------------------
# The methods: (drig call, reference call, model evaluations per image).


def build_methods(torch, model, layer, drig_parts, points):
  import jax  # pylint: disable=g-import-not-at-top
  import saliency.core as saliency  # pylint: disable=g-import-not-at-top
  from captum import attr as captum_attr  # pylint: disable=g-import-not-at-top
  from drig import attribution  # pylint: disable=g-import-not-at-top
  from drig.attribution import gradcam, occlusion, paths, xrai  # pylint: disable=g-import-not-at-top

  logits, to_layer, layer_logits = drig_parts
  quantity = attribution.probability_of_grade(logits, GRADE)
  layer_quantity = attribution.probability_of_grade(layer_logits, GRADE)

  def forward(inputs):
    return torch.softmax(model(inputs), dim=-1)

  def call_model_function(batch, call_model_args=None, expected_keys=None):
    """saliency's protocol: input gradients of p(GRADE) from the torch model, NHWC."""
    del call_model_args, expected_keys
    inputs = torch.from_numpy(np.ascontiguousarray(
        np.asarray(batch, np.float32).transpose(0, 3, 1, 2))).requires_grad_(True)
    forward(inputs)[:, GRADE].sum().backward()
    return {saliency.INPUT_OUTPUT_GRADIENTS: inputs.grad.numpy().transpose(0, 2, 3, 1)}

  def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))

  def ready(tree):
    return jax.block_until_ready(tree)

  window, stride = _OCCLUSION_WINDOW.value, _OCCLUSION_STRIDE.value
  blur, guided, xrai_steps = _BLUR_STEPS.value, _GUIDED_STEPS.value, _XRAI_STEPS.value

  def positions(size):
    return (int(np.ceil((size - window) / stride)) + 1) ** 2

  methods = {
      "blur_ig": (
          lambda x: ready(paths.blur_integrated_gradients(
              quantity, x, max_sigma=_MAX_SIGMA.value, steps=blur,
              chunk_size=max(1, points // len(x)))),
          lambda x: [saliency.BlurIG().GetMask(im, call_model_function,
                                               max_sigma=_MAX_SIGMA.value, steps=blur,
                                               batch_size=points) for im in x],
          lambda size: f"{blur} gradients"),
      "guided_ig": (
          lambda x: ready(paths.guided_integrated_gradients(
              quantity, x, attribution.half_gray_baseline(x), steps=guided)),
          lambda x: [saliency.GuidedIG().GetMask(
              im, call_model_function, x_baseline=np.full_like(im, attribution.HALF_GRAY_MODEL),
              x_steps=guided) for im in x],
          lambda size: f"{guided} gradients"),
      "grad_cam": (
          lambda x: ready(gradcam.grad_cam(to_layer, layer_quantity, x)),
          lambda x: captum_attr.LayerAttribution.interpolate(
              captum_attr.LayerGradCam(forward, layer).attribute(
                  nchw(x), target=GRADE, relu_attributions=True),
              tuple(x.shape[1:3]), interpolate_mode="bilinear"),
          lambda size: "1 gradient"),
      "occlusion": (
          lambda x: ready(occlusion.occlusion(quantity, x, window=window, stride=stride,
                                              value=attribution.HALF_GRAY_MODEL,
                                              chunk_size=max(1, points // len(x)))),
          lambda x: captum_attr.Occlusion(forward).attribute(
              nchw(x), sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
              baselines=attribution.HALF_GRAY_MODEL, target=GRADE,
              perturbations_per_eval=points),
          lambda size: f"{positions(size) + 1} forward passes"),
      "xrai": (
          lambda x: xrai.xrai(quantity, x, steps=xrai_steps),
          lambda x: [saliency.XRAI().GetMask(im, call_model_function, batch_size=points,
                                             extra_parameters=saliency.XRAIParameters(
                                                 steps=xrai_steps)) for im in x],
          lambda size: f"{2 * xrai_steps} gradients + segmentation"),
  }
  methods.update(gradient_methods(torch, forward, quantity, nchw, ready, points))
  return methods


def gradient_methods(torch, forward, quantity, nchw, ready, points):
  """drig.attribution.gradients against Captum: (drig call, Captum call, evaluations)."""
  from captum import attr as captum_attr  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from drig.attribution import gradients  # pylint: disable=g-import-not-at-top
  samples, stdev = _SAMPLES.value, _STDEV.value
  k, steps = _EG_BASELINES.value, _EG_STEPS.value
  key = jax.random.PRNGKey(0)
  distribution = {}

  def baselines(x):  # K smooth images of x's size, made once
    if "images" not in distribution:
      distribution["images"] = smooth_images(k, x.shape[1], seed=11)
    return distribution["images"]

  def tunnel(kind):
    return (
        lambda x: ready(gradients.smoothgrad(quantity, x, key=key, samples=samples,
                                             stdev=stdev, kind=kind,
                                             samples_per_call=max(1, points // len(x)))),
        lambda x: captum_attr.NoiseTunnel(captum_attr.Saliency(forward)).attribute(
            nchw(x), nt_type=kind, nt_samples=samples, stdevs=stdev, target=GRADE, abs=False,
            nt_samples_batch_size=max(1, points // len(x))),
        lambda size: f"{samples} gradients")

  def captum_expected_gradients(x):
    ig = captum_attr.IntegratedGradients(forward)
    return [ig.attribute(nchw(x), baselines=nchw(np.broadcast_to(b, x.shape)), target=GRADE,
                         n_steps=steps, method="riemann_right",
                         internal_batch_size=max(points, len(x))) for b in baselines(x)]

  del torch  # Captum turns gradients on itself
  return {
      "saliency": (
          lambda x: ready(gradients.gradient(quantity, x, absolute=True)),
          lambda x: captum_attr.Saliency(forward).attribute(nchw(x), target=GRADE),
          lambda size: "1 gradient"),
      "input_x_gradient": (
          lambda x: ready(gradients.gradient_x_input(quantity, x)),
          lambda x: captum_attr.InputXGradient(forward).attribute(nchw(x), target=GRADE),
          lambda size: "1 gradient"),
      "smoothgrad": tunnel("smoothgrad"),
      "vargrad": tunnel("vargrad"),
      "gradient_shap": (
          lambda x: ready(gradients.gradient_shap(quantity, x, baselines(x), key=key,
                                                  samples=samples,
                                                  samples_per_call=max(1, points // len(x)))),
          lambda x: captum_attr.GradientShap(forward).attribute(
              nchw(x), baselines=nchw(baselines(x)), n_samples=samples, stdevs=0.0,
              target=GRADE),
          lambda size: f"{samples} gradients"),
      "expected_gradients": (
          lambda x: ready(gradients.expected_gradients(quantity, x, baselines(x), steps=steps)),
          captum_expected_gradients,
          lambda size: f"{k * steps} gradients ({k} baselines x {steps} steps)"),
  }


def shim_numpy_quantile():
  """saliency 0.2.1's GuidedIG calls np.quantile(interpolation=...), gone in NumPy 2.4."""
  quantile = np.quantile

  def shimmed(*args, interpolation=None, **kwargs):
    if interpolation is not None:
      kwargs["method"] = interpolation
    return quantile(*args, **kwargs)
  np.quantile = shimmed


def main(argv):
  del argv
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(_METHODS.value) - set(METHOD_NAMES))
  if unknown:
    raise app.UsageError(f"unknown methods {unknown}; choose from {METHOD_NAMES}")
  shim_numpy_quantile()
  logging.getLogger("saliency").setLevel(logging.WARNING)  # XRAI logs each phase at INFO
  torch.set_grad_enabled(True)
  if _MODEL.value == "cnn":
    model, layer, parts = _small_cnn(torch, nn)
  else:
    model, layer, parts = _inception(torch)
  methods = build_methods(torch, model, layer, parts, _POINTS.value)
  x = smooth_images(_BATCH.value, _SIZE.value)
  n = len(x)
  log(f"model {_MODEL.value}, {_SIZE.value} px, batch {n}, {_POINTS.value} points per call, "
      f"{torch.get_num_threads()} torch threads")
  rows = []
  for name in _METHODS.value:
    ours, reference, cost = methods[name]
    t = time.perf_counter()
    ours(x)
    first = time.perf_counter() - t
    reference(x)  # warm-up
    drig_times, reference_times = [], []
    for _ in range(_REPEATS.value):
      time.sleep(1.0)  # lets the other library's worker threads stop spinning
      t = time.perf_counter()
      ours(x)
      drig_times.append((time.perf_counter() - t) / n)
      time.sleep(1.0)
      t = time.perf_counter()
      reference(x)
      reference_times.append((time.perf_counter() - t) / n)
    d, r = statistics.median(drig_times), statistics.median(reference_times)
    rows.append((name, cost(_SIZE.value), d, r, r / d, first))
    log(f"  {name}: drig {['%.3f' % v for v in drig_times]} s/img, reference "
        f"{['%.3f' % v for v in reference_times]} s/img (first drig call {first:.1f} s)")
  log("")
  log("| method | model evaluations per image | drig s/image | reference s/image | "
      "reference / drig |")
  log("|---|---|---|---|---|")
  for name, cost, d, r, ratio, _ in rows:
    log(f"| {name} | {cost} | {d:.3f} | {r:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
  app.run(main)
