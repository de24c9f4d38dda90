"""The attribution methods by name: one uniform call for the analysis job and notebooks.

``attribute(name, quantity=f, x=x, baseline="half_gray", key=key, options={...})``
runs the method ``name`` (Captum's name where Captum has the method) and
returns float32 attributions: [N, H, W, C] for pixel methods, [N, H, W] for
maps without channels (``METHODS[name].channels`` says which).

``METHODS[name]`` also says whether the map is signed (localisation scores the
positive part of signed maps and, in addition, their absolute value), whether
it draws random numbers (``key``), whether it needs a baseline distribution
[K, ...] (``BaselineDistribution``), its options with their defaults, and its
cost per image in gradient evaluations.

Keys: the method draws from ``named_key(key, name)`` and a random baseline from
``named_key(key, "baseline")`` (``drig.prng``), so adding a method never
changes another's draws.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from drig import prng
from drig.attribution import arguments
from drig.attribution import baselines as baselines_lib
from drig.attribution import gradcam
from drig.attribution import gradients
from drig.attribution import integration as ig_lib
from drig.attribution import occlusion as occlusion_lib
from drig.attribution import paths
from drig.attribution import xrai as xrai_lib
from drig.attribution.arguments import AttributionArgumentError

_IG_DEFAULTS = {"steps": 50, "method": "riemann_right", "chunk_size": None}
# Noise tunnels: Captum's 5 samples, PAIR's noise of 15% of each image's range
# (an absolute ``stdev`` replaces it), of the signed gradient unless ``of`` says.
# samples_per_call None: about the engine's points per call for a gradient, one
# noisy copy per call for IG (whose calls already hold a chunk of path points).
_NOISE_DEFAULTS = {"samples": 5, "stdev": None, "stdev_spread": 0.15, "of": "gradient",
                   "samples_per_call": None, **_IG_DEFAULTS}
NOISE_TUNNEL_OF = ("gradient", "input_x_gradient", "integrated_gradients")


@dataclasses.dataclass(frozen=True)
class Call:
  """One method call's resolved arguments (what a method's ``compute`` receives).

  Attributes:
    quantity: f: x [N, ...] -> [N].
    x: the inputs [N, H, W, C].
    baseline: an array broadcasting to x, or [K, ...] for distribution methods.
    key: the method's own key (or None).
    split_model: (to_layer, layer_quantity) for layer methods, else None.
    options: the method's options, defaults filled in.
  """
  quantity: Callable
  x: jax.Array
  baseline: Any
  key: Any
  split_model: Any
  options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered attribution method.

  Attributes:
    name: the registry name.
    compute: Call -> attributions.
    signed: whether the map's sign carries meaning (a function of the options).
    channels: [N, H, W, C] (True) or [N, H, W] (False).
    random: draws random numbers from the key.
    distribution: needs a baseline distribution [K, ...].
    defaults: the options it accepts, with their defaults.
    cost: gradient (or forward) evaluations per image, in words.
  """
  name: str
  compute: Callable[[Call], jax.Array]
  signed: Callable[[Mapping], bool]
  channels: bool = True
  random: bool = False
  distribution: bool = False
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  cost: str = ""


def _always(value: bool) -> Callable[[Mapping], bool]:
  return lambda options: value


def _ig(f, x, baseline, options) -> jax.Array:
  """Fixed-step IG with the options' rule: the attributions alone."""
  attributions, _ = ig_lib.integrated_gradients(
      f, x, baseline, steps=options["steps"], method=options["method"],
      chunk_size=options["chunk_size"])
  return attributions


def _integrated_gradients(call: Call) -> jax.Array:
  return _ig(call.quantity, call.x, call.baseline, call.options)


def _saliency(call: Call) -> jax.Array:
  return gradients.gradient(call.quantity, call.x, absolute=call.options["abs"])


def _input_x_gradient(call: Call) -> jax.Array:
  return gradients.gradient_x_input(call.quantity, call.x)


def _noise_tunnel(kind: str) -> Callable[[Call], jax.Array]:
  def compute(call: Call) -> jax.Array:
    o = call.options
    if o["of"] not in NOISE_TUNNEL_OF:
      raise AttributionArgumentError(
          f"{kind}: option of={o['of']!r} is not one of {NOISE_TUNNEL_OF}")
    f = call.quantity
    if o["of"] == "gradient":
      inner = lambda z: gradients.gradient(f, z)
    elif o["of"] == "input_x_gradient":
      inner = lambda z: gradients.gradient_x_input(f, z)
    else:
      # The noisy batch holds each image's copies side by side: a per-image
      # baseline is repeated to match.
      def inner(z):
        b = jnp.asarray(call.baseline)
        if b.ndim == z.ndim and b.shape[0] not in (1, z.shape[0]):
          b = jnp.repeat(b, z.shape[0] // b.shape[0], axis=0)
        return _ig(f, z, b, o)
    per_call = o["samples_per_call"]
    if per_call is None and o["of"] == "integrated_gradients":
      per_call = 1
    stdev, spread = o["stdev"], (o["stdev_spread"] if o["stdev"] is None else None)
    return gradients.noise_tunnel(inner, call.x, kind=kind, samples=o["samples"], key=call.key,
                                  stdev=stdev, stdev_spread=spread, samples_per_call=per_call)
  return compute


def _expected_gradients(call: Call) -> jax.Array:
  o = call.options
  attributions, _ = gradients.expected_gradients(
      call.quantity, call.x, call.baseline, steps=o["steps"], method=o["method"],
      chunk_size=o["chunk_size"])
  return attributions


def _gradient_shap(call: Call) -> jax.Array:
  return gradients.gradient_shap(call.quantity, call.x, call.baseline, key=call.key,
                                 samples=call.options["samples"],
                                 samples_per_call=call.options["samples_per_call"])


def _blur_ig(call: Call) -> jax.Array:
  attributions, _ = paths.blur_integrated_gradients(call.quantity, call.x, **call.options)
  return attributions


def _guided_ig(call: Call) -> jax.Array:
  attributions, _ = paths.guided_integrated_gradients(call.quantity, call.x, call.baseline,
                                                      **call.options)
  return attributions


def _grad_cam(call: Call) -> jax.Array:
  if call.split_model is None:
    raise AttributionArgumentError(
        "method 'grad_cam' needs split_model=(to_layer, layer_quantity): the images -> layer "
        "activations and the activations -> quantity halves of the model")
  to_layer, layer_quantity = call.split_model
  return gradcam.grad_cam(to_layer, layer_quantity, call.x, **call.options).map


def _occlusion(call: Call) -> jax.Array:
  # The window is filled with the baseline's pixels (half gray by default).
  return occlusion_lib.occlusion(call.quantity, call.x, value=call.baseline, **call.options)


def _xrai(call: Call) -> jax.Array:
  return jnp.asarray(xrai_lib.xrai(call.quantity, call.x, **call.options).saliency)


_REGISTRY = {
    "integrated_gradients": Method(
        "integrated_gradients", _integrated_gradients, _always(True), defaults=_IG_DEFAULTS,
        cost="steps"),
    "saliency": Method(
        "saliency", _saliency, lambda o: not o["abs"], defaults={"abs": True}, cost="1"),
    "input_x_gradient": Method(
        "input_x_gradient", _input_x_gradient, _always(True), cost="1"),
    "smoothgrad": Method(
        "smoothgrad", _noise_tunnel("smoothgrad"), _always(True), random=True,
        defaults=_NOISE_DEFAULTS, cost="samples (x steps of IG)"),
    "smoothgrad_sq": Method(
        "smoothgrad_sq", _noise_tunnel("smoothgrad_sq"), _always(False), random=True,
        defaults=_NOISE_DEFAULTS, cost="samples (x steps of IG)"),
    "vargrad": Method(
        "vargrad", _noise_tunnel("vargrad"), _always(False), random=True,
        defaults=_NOISE_DEFAULTS, cost="samples (x steps of IG)"),
    "expected_gradients": Method(
        "expected_gradients", _expected_gradients, _always(True), distribution=True,
        defaults=_IG_DEFAULTS, cost="K baselines x steps"),
    "gradient_shap": Method(
        "gradient_shap", _gradient_shap, _always(True), random=True, distribution=True,
        defaults={"samples": 5, "samples_per_call": None}, cost="samples"),
    # Path and region methods (drig.attribution.paths, gradcam, occlusion, xrai),
    # their defaults those of PAIR's saliency (blur_ig, guided_ig, xrai) and Captum.
    "blur_ig": Method(
        "blur_ig", _blur_ig, _always(True),
        defaults={"max_sigma": 50.0, "steps": 100, "grad_step": 0.01, "sqrt": False,
                  "chunk_size": None}, cost="steps"),
    "guided_ig": Method(
        "guided_ig", _guided_ig, _always(True),
        defaults={"steps": 200, "fraction": 0.25, "max_dist": 0.02, "images_per_call": None},
        cost="steps"),
    "grad_cam": Method(
        "grad_cam", _grad_cam, lambda o: not o["relu"], channels=False,
        defaults={"relu": True, "upsample": "bilinear"}, cost="1"),
    "occlusion": Method(
        "occlusion", _occlusion, _always(True), channels=False,
        defaults={"window": (15, 15), "stride": (8, 8), "chunk_size": None},
        cost="window positions + 1 forward passes"),
    "xrai": Method(
        "xrai", _xrai, _always(True), channels=False,
        defaults={"steps": 100, "algorithm": "full", "area_threshold": 1.0,
                  "min_pixel_diff": 50, "chunk_size": None},
        cost="2 x steps, plus the segmentation"),
}

METHODS: Mapping[str, Method] = types.MappingProxyType(_REGISTRY)
METHOD_NAMES = tuple(_REGISTRY)


def get_method(name: str) -> Method:
  """The registered method ``name``; AttributionArgumentError listing the names if unknown."""
  if not isinstance(name, str) or name not in _REGISTRY:
    raise AttributionArgumentError(
        f"unknown attribution method {name!r}; use one of {METHOD_NAMES}")
  return _REGISTRY[name]


def method_options(name: str, options: Mapping | None = None) -> dict:
  """The method's options: its defaults updated by ``options``.

  Raises:
    AttributionArgumentError: an unknown method, or an option it does not take
      (listing the ones it does).
  """
  method = get_method(name)
  options = dict(options or {})
  unknown = sorted(set(options) - set(method.defaults))
  if unknown:
    raise AttributionArgumentError(
        f"method {name!r} takes no option {', '.join(map(repr, unknown))}; its options are "
        f"{tuple(method.defaults) or 'none'}")
  return {**method.defaults, **options}


def is_signed(name: str, options: Mapping | None = None) -> bool:
  """Whether the method's maps (with these options) are signed; unsigned ones are >= 0."""
  return get_method(name).signed(method_options(name, options))


def attribute(name: str, *, quantity: Callable, x, baseline="half_gray", key=None,
              split_model=None, options: Mapping | None = None,
              space: str = "model") -> jax.Array:
  """Attributions of ``quantity`` at ``x`` by the method ``name``.

  Args:
    name: one of METHOD_NAMES.
    quantity: f: x [N, ...] -> [N] (e.g. ``probability_of_grade(logits_fn, 4)``).
    x: images [N, H, W, C], floating, in ``space``.
    baseline: an array or a name for `resolve_baseline` (ignored by methods that
      use none: saliency, input_x_gradient, noise tunnels of gradients, blur_ig
      (its path starts at the blurred image), grad_cam, xrai (min and max
      baselines)); occlusion fills its window with it; a
      ``BaselineDistribution`` (or an array [K, ...]) for the distribution
      methods (expected_gradients, gradient_shap).
    key: a jax random key; required by random methods and random baselines.
    split_model: (to_layer, layer_quantity) for layer methods (grad_cam).
    options: the method's options (see ``METHODS[name].defaults``).
    space: the inputs' value range, for named baselines.

  Returns:
    float32 [N, H, W, C] (or [N, H, W] where ``METHODS[name].channels`` is False).

  Raises:
    AttributionArgumentError: an unknown method or option (listing the known
      ones), an unknown baseline name, a baseline distribution of the wrong
      shape, a missing key, or the method's own argument errors.
  """
  method = get_method(name)
  options = method_options(name, options)
  x = arguments.as_batch(x)
  if method.random and key is None:
    raise AttributionArgumentError(f"method {name!r} draws random numbers: pass key=")
  baseline_key = None if key is None else prng.named_key(key, "baseline")
  if method.distribution:
    if not isinstance(baseline, baselines_lib.BaselineDistribution):
      if isinstance(baseline, str):
        raise AttributionArgumentError(
            f"method {name!r} averages over a distribution of baselines: pass "
            f"BaselineDistribution([K, ...]) (e.g. K images of a data split), not {baseline!r}")
      baseline = baselines_lib.BaselineDistribution(baseline)
  resolved = baselines_lib.resolve_baseline(baseline, x, key=baseline_key, space=space)
  method_key = None if key is None else prng.named_key(key, name)
  call = Call(quantity, x, resolved, method_key, split_model, options)
  return jnp.asarray(method.compute(call)).astype(jnp.float32)
