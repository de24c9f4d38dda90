"""Inception-v3 in Flax Linen, numerically equal to Keras' and torchvision's.

One concept: the Inception-v3 network (its modules, conventions, parameter
tree and named layers); long because the network has many modules.

Two conventions, chosen by the ``convention`` field, reproduce the two public
sets of ImageNet weights exactly:

* ``"keras"`` (default), as ``keras.applications.InceptionV3``: BatchNorm
  without scale; the 3x3 stride-1 average pools of the ``branch_pool`` paths
  use TF's SAME padding and exclude the padding from the average.
* ``"torchvision"``, as ``torchvision.models.inception_v3``: BatchNorm with a
  scale; those average pools count the zero padding (``count_include_pad``);
  optionally ``transform_input``. The auxiliary classifier is not built.

Everything else is common: convolutions without bias, BatchNorm epsilon 1e-3,
ReLU; every strided convolution and max pool is VALID, every SAME convolution
has stride 1 and an odd kernel (so SAME pads symmetrically, as torchvision's
explicit paddings do).

Input: float32 NHWC scaled to [-1, 1] (Keras' ``preprocess_input``, which is
also what torchvision's ImageNet weights see after ``transform_input``), at
least 75 px on each side. Output: ``[N, num_classes]`` float32 logits, or the
``[N, 2048]`` globally pooled features when ``num_classes`` is None.

Parameter tree: the modules are named after torchvision's (``Conv2d_1a_3x3``,
``Mixed_5b/branch1x1``, ..., ``fc``); each convolution unit holds ``conv``
(kernel HWIO) and ``bn`` (bias, scale if torchvision; batch_stats mean, var).
``CONV_UNITS`` lists the 94 units in canonical order.

Named layers (for attribution, see ``drig.models.layer_access``), in forward
order: the stem convolutions ``Conv2d_1a_3x3`` ... ``Conv2d_4a_3x3`` (each the
output of its conv unit after BN and ReLU; the max pools belong to the next
layer), ``mixed0`` ... ``mixed10`` (Keras' names; torchvision's ``Mixed_5b`` ...
``Mixed_7c``, accepted as aliases), ``pooled`` (global average, [N, C]) and,
with a top, ``logits``. ``__call__(x, start_layer=L)`` takes the activation
of layer L instead of the image and runs the rest; ``stop_layer=L`` returns
the activation of L. One code path serves the whole model and both halves,
which is why the halves compose to the full model bit for bit.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

CONVENTIONS = ("keras", "torchvision")
MIN_INPUT_SIZE = 75
BN_EPSILON = 1e-3

STEM_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
               "Conv2d_4a_3x3")
# Keras' block names (the attribution layer names) and torchvision's (the
# parameter-tree names), in forward order.
MIXED_LAYERS = tuple(f"mixed{i}" for i in range(11))
MIXED_MODULES = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                 "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
POOLED_LAYER = "pooled"
# Prefix of the sown activations' names (capture_layers), distinct from submodule names.
CAPTURE_PREFIX = "activation_of_"
LOGITS_LAYER = "logits"

# The convolution units of each block type, in canonical order: torchvision's
# state_dict order, which is also the order in which Keras creates the layers.
_BLOCK_UNITS = {
    "A": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "D": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"),
    "E": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
}
_BLOCK_TYPES = ("A", "A", "A", "B", "C", "C", "C", "C", "D", "E", "E")

# The 94 convolution units as parameter-tree paths, in canonical order.
CONV_UNITS: tuple[tuple[str, ...], ...] = tuple(
    [(name,) for name in STEM_LAYERS]
    + [(block, unit) for block, kind in zip(MIXED_MODULES, _BLOCK_TYPES)
       for unit in _BLOCK_UNITS[kind]])

# torchvision's transform_input: from ImageNet mean/std normalisation to [-1, 1].
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def layer_aliases() -> dict[str, str]:
  """Accepted alternative layer names -> canonical names (torchvision's block names)."""
  return dict(zip(MIXED_MODULES, MIXED_LAYERS))


def inception_layer_names(include_top: bool) -> tuple[str, ...]:
  """The named layers of InceptionV3, in forward order."""
  names = STEM_LAYERS + MIXED_LAYERS + (POOLED_LAYER,)
  return names + ((LOGITS_LAYER,) if include_top else ())


def run_stages(stages: Sequence[tuple[str, Callable[[Any], Any]]], x, start_layer: Optional[str],
               stop_layer: Optional[str], record: Optional[Callable[[str, Any], None]] = None):
  """Runs ``stages`` (name, fn) in order, from after ``start_layer`` up to ``stop_layer``.

  With ``start_layer`` set, ``x`` is that layer's activation and its own stage
  and all earlier ones are skipped. With ``stop_layer`` set, the activation of
  that stage is returned. Both None: the whole sequence. Names must be valid
  (callers canonicalise and check them first). ``record(name, activation)``
  is called after each stage that runs.
  """
  names = [name for name, _ in stages]
  start = 0 if start_layer is None else names.index(start_layer) + 1
  stop = len(stages) if stop_layer is None else names.index(stop_layer) + 1
  if stop < start:
    raise ValueError(f"stop_layer {stop_layer!r} comes before start_layer {start_layer!r}")
  for name, stage in stages[start:stop]:
    x = stage(x)
    if record is not None:
      record(name, x)
  return x


def layer_recorder(module: nn.Module, capture: bool) -> Optional[Callable[[str, Any], None]]:
  """For ``run_stages``: sows each activation into ``module``'s "layers" collection."""
  if not capture:
    return None
  return lambda name, value: module.sow("layers", CAPTURE_PREFIX + name, value)


def canonical_layer(name: str, valid: Sequence[str], aliases: dict[str, str]) -> str:
  """Resolves an alias and checks the name; ValueError listing the valid names."""
  canonical = aliases.get(name, name)
  if canonical not in valid:
    raise ValueError(f"unknown layer {name!r}; valid layers, in forward order: "
                     f"{', '.join(valid)} (aliases: {', '.join(aliases)})")
  return canonical


def scaled_width(channels: int, width_multiplier: float) -> int:
  """Channel count of a layer in the width-scaled variant (at least 1)."""
  return max(1, int(round(channels * width_multiplier)))


class Conv(nn.Module):
  """A bias-free 2-D convolution (NHWC, HWIO kernel), parameters as ``flax.linen.Conv``'s.

  Same parameter ("kernel", [kh, kw, in, out]) and result as ``nn.Conv(...,
  use_bias=False)``, computed the way XLA:CPU runs fastest (measured on 2 cores,
  8 images at 256 px, forward / input-gradient):

  * 1x1, stride 1: a matrix product over the channel axis (the 14x14 768->192
    convolutions: 2.5 / 3.0 ms against 4.3 / 5.2 ms as a convolution).
  * VALID with a window > 1: XLA:CPU runs unpadded convolutions far slower than
    padded ones of the same size (Conv2d_2a_3x3: 123 ms against 31 ms). One row
    and column of zeros at the far edges, which no VALID output reads, moves
    them to the fast path; the extra output row or column is cut off.
  * SAME, stride 1, square windows on maps of 8x8 or more: explicit zero
    padding, then the VALID path.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: str = "SAME"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel",
                        nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
                        (kh, kw, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    strides = (self.strides, self.strides)
    if (kh, kw) == (1, 1) and self.strides == 1:
      return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    padding = self.padding
    if padding == "SAME" and self.strides == 1 and kh == kw > 1 and min(x.shape[1:3]) >= 8:
      # Zero padding as an explicit pad, then the VALID path below (Conv2d_2b_3x3:
      # 51 / 55 ms -> 30 / 32 ms; the 29x29 5x5 and 3x3 ones about 1.5x). Not for
      # the 6x6 maps of Mixed_7b/c, where XLA's own padding is faster.
      lo = (kh - 1) // 2
      x = jnp.pad(x, ((0, 0), (lo, kh - 1 - lo), (lo, kh - 1 - lo), (0, 0)))
      padding = "VALID"
    if padding == "VALID" and (kh, kw) != (1, 1):
      out_h, out_w = ((n - k) // self.strides + 1 for n, k in zip(x.shape[1:3], (kh, kw)))
      y = jax.lax.conv_general_dilated(x, kernel, strides, ((0, 1), (0, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return y[:, :out_h, :out_w]
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvBN(nn.Module):
  """Convolution (no bias) + BatchNorm (epsilon 1e-3) + ReLU: one conv unit."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: str = "SAME"
  bn_scale: bool = False
  bn_momentum: float = 0.99
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(self.features, self.kernel_size, strides=self.strides, padding=self.padding,
             dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=BN_EPSILON, use_scale=self.bn_scale, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="bn")(x)
    return nn.relu(x)


def _window_slices(x, window: tuple[int, int], strides: tuple[int, int]):
  """The k*k strided views of NHWC ``x``, one per window offset, in row-major order.

  View (i, j) holds ``x[:, i + s*a, j + t*b, :]`` for every VALID output (a, b).
  """
  (kh, kw), (sh, sw) = window, strides
  n, h, w, c = x.shape
  out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
  views = []
  for i in range(kh):
    for j in range(kw):
      views.append(jax.lax.slice(x, (0, i, j, 0),
                                 (n, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, c),
                                 (1, sh, sw, 1)))
  return views


def _first_max_masks(views, out):
  """For each view, where it holds its window's first maximum (row-major order)."""
  taken = jnp.zeros(out.shape, bool)
  masks = []
  for view in views:
    mask = (view == out) & ~taken
    taken = taken | mask
    masks.append(mask)
  return masks


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def max_pool_valid(x, window: tuple[int, int] = (3, 3), strides: tuple[int, int] = (2, 2)):
  """VALID max pooling of NHWC ``x`` built from strided slices, with a fast derivative.

  Equals ``flax.linen.max_pool(x, window, strides, padding="VALID")`` exactly.
  The derivative routes each output's tangent (cotangent, in reverse mode) to
  the first maximum of its window in row-major order, which is the position
  XLA's ``select_and_scatter`` (jax's gradient of ``reduce_window`` max, with
  ``ge`` as the select) and torch's ``max_pool2d`` choose, so gradients equal
  jax's, ties included. Why not ``nn.max_pool``: XLA:CPU runs the
  ``select_and_scatter`` of its gradient about 10x slower than these slices,
  masks and pads; the forward is as fast either way.

  Args:
    x: [N, H, W, C] float array, H >= window[0], W >= window[1].
    window: (kh, kw) window size (static).
    strides: (sh, sw) strides (static).

  Returns:
    [N, (H - kh) // sh + 1, (W - kw) // sw + 1, C], x's dtype.
  """
  return functools.reduce(jnp.maximum, _window_slices(x, window, strides))


@max_pool_valid.defjvp
def _max_pool_valid_jvp(window, strides, primals, tangents):
  (x,), (dx,) = primals, tangents
  out = max_pool_valid(x, window, strides)
  masks = _first_max_masks(_window_slices(x, window, strides), out)
  # Linear in dx, so JAX transposes it for reverse mode: each slice becomes a
  # strided pad and the selections add up where windows overlap.
  dx_views = _window_slices(dx, window, strides)
  zero = jnp.zeros((), dx.dtype)
  d_out = functools.reduce(jnp.add, [jnp.where(m, v, zero) for m, v in zip(masks, dx_views)])
  return out, d_out


def _max_pool(x):
  """The 3x3 stride-2 VALID max pool of the stem and the grid reductions."""
  return max_pool_valid(x, (3, 3), (2, 2))


def _branch_avg_pool(x, count_include_pad: bool):
  """The 3x3 stride-1 average pool of the branch_pool paths."""
  if count_include_pad:  # torchvision: avg_pool2d(3, stride=1, padding=1)
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=True)
  # Keras/TF: SAME padding, the average over the valid pixels only.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


class _Block(nn.Module):
  """Base of the mixed blocks: ``unit`` builds a ConvBN, ``width`` scales channels."""
  unit: Callable[..., nn.Module]
  width: Callable[[int], int]
  count_include_pad: bool


class InceptionA(_Block):
  """Mixed_5b/5c/5d (Keras mixed0-2): 35x35."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x, train: bool):
    u, w = self.unit, self.width
    b1 = u(w(64), (1, 1), name="branch1x1")(x, train)
    b5 = u(w(48), (1, 1), name="branch5x5_1")(x, train)
    b5 = u(w(64), (5, 5), name="branch5x5_2")(b5, train)
    b3 = u(w(64), (1, 1), name="branch3x3dbl_1")(x, train)
    b3 = u(w(96), (3, 3), name="branch3x3dbl_2")(b3, train)
    b3 = u(w(96), (3, 3), name="branch3x3dbl_3")(b3, train)
    bp = _branch_avg_pool(x, self.count_include_pad)
    bp = u(w(self.pool_features), (1, 1), name="branch_pool")(bp, train)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (Keras mixed3): grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x, train: bool):
    u, w = self.unit, self.width
    b3 = u(w(384), (3, 3), strides=2, padding="VALID", name="branch3x3")(x, train)
    bd = u(w(64), (1, 1), name="branch3x3dbl_1")(x, train)
    bd = u(w(96), (3, 3), name="branch3x3dbl_2")(bd, train)
    bd = u(w(96), (3, 3), strides=2, padding="VALID", name="branch3x3dbl_3")(bd, train)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b-6e (Keras mixed4-7): 17x17 with factorised 7x7 convolutions."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x, train: bool):
    u, w, c7 = self.unit, self.width, self.channels_7x7
    b1 = u(w(192), (1, 1), name="branch1x1")(x, train)
    b7 = u(w(c7), (1, 1), name="branch7x7_1")(x, train)
    b7 = u(w(c7), (1, 7), name="branch7x7_2")(b7, train)
    b7 = u(w(192), (7, 1), name="branch7x7_3")(b7, train)
    bd = u(w(c7), (1, 1), name="branch7x7dbl_1")(x, train)
    bd = u(w(c7), (7, 1), name="branch7x7dbl_2")(bd, train)
    bd = u(w(c7), (1, 7), name="branch7x7dbl_3")(bd, train)
    bd = u(w(c7), (7, 1), name="branch7x7dbl_4")(bd, train)
    bd = u(w(192), (1, 7), name="branch7x7dbl_5")(bd, train)
    bp = _branch_avg_pool(x, self.count_include_pad)
    bp = u(w(192), (1, 1), name="branch_pool")(bp, train)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (Keras mixed8): grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x, train: bool):
    u, w = self.unit, self.width
    b3 = u(w(192), (1, 1), name="branch3x3_1")(x, train)
    b3 = u(w(320), (3, 3), strides=2, padding="VALID", name="branch3x3_2")(b3, train)
    b7 = u(w(192), (1, 1), name="branch7x7x3_1")(x, train)
    b7 = u(w(192), (1, 7), name="branch7x7x3_2")(b7, train)
    b7 = u(w(192), (7, 1), name="branch7x7x3_3")(b7, train)
    b7 = u(w(192), (3, 3), strides=2, padding="VALID", name="branch7x7x3_4")(b7, train)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b/7c (Keras mixed9, mixed10): 8x8 with expanded filter banks."""

  @nn.compact
  def __call__(self, x, train: bool):
    u, w = self.unit, self.width
    b1 = u(w(320), (1, 1), name="branch1x1")(x, train)
    b3 = u(w(384), (1, 1), name="branch3x3_1")(x, train)
    b3 = jnp.concatenate([u(w(384), (1, 3), name="branch3x3_2a")(b3, train),
                          u(w(384), (3, 1), name="branch3x3_2b")(b3, train)], axis=-1)
    bd = u(w(448), (1, 1), name="branch3x3dbl_1")(x, train)
    bd = u(w(384), (3, 3), name="branch3x3dbl_2")(bd, train)
    bd = jnp.concatenate([u(w(384), (1, 3), name="branch3x3dbl_3a")(bd, train),
                          u(w(384), (3, 1), name="branch3x3dbl_3b")(bd, train)], axis=-1)
    bp = _branch_avg_pool(x, self.count_include_pad)
    bp = u(w(192), (1, 1), name="branch_pool")(bp, train)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def global_average_pool(x):
  """[N, H, W, C] -> [N, C], averaged in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class InceptionV3(nn.Module):
  """Inception-v3 (Szegedy et al. 2016) matching Keras or torchvision weights.

  Attributes:
    num_classes: None for the base without its top (output: pooled features
      [N, 2048 * width]); otherwise the size of the ImageNet-style top
      (Keras' ``predictions``, torchvision's ``fc``; parameters under ``fc``).
    convention: "keras" or "torchvision" (see the module docstring).
    width_multiplier: scales every layer's channel count (1.0: the real network).
    transform_input: torchvision's input transform, for inputs normalised with
      ImageNet's mean and std; it maps them to [-1, 1]. Leave False for [-1, 1]
      inputs (drig's convention).
    bn_momentum: BatchNorm running-average momentum (Flax convention: the weight
      of the old value); None: 0.99 for Keras, 0.9 for torchvision (torch's 0.1).
    dtype: computation dtype (e.g. bfloat16 on accelerators); logits are float32.
    param_dtype: parameter dtype.
  """
  num_classes: Optional[int] = None
  convention: str = "keras"
  width_multiplier: float = 1.0
  transform_input: bool = False
  bn_momentum: Optional[float] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def layer_names(self) -> tuple[str, ...]:
    """The named layers, in forward order (see the module docstring)."""
    return inception_layer_names(self.num_classes is not None)

  def canonical_layer(self, name: str) -> str:
    return canonical_layer(name, self.layer_names(), layer_aliases())

  @nn.compact
  def __call__(self, x, train: bool = False, *, start_layer: Optional[str] = None,
               stop_layer: Optional[str] = None, capture_layers: bool = False):
    """Runs the network (or part of it).

    Args:
      x: float32 [N, H, W, 3] images in [-1, 1], H, W >= 75; or, with
        ``start_layer``, that layer's activation.
      train: BatchNorm uses batch statistics and updates ``batch_stats``
        (apply with ``mutable=["batch_stats"]``).
      start_layer: a layer name; ``x`` is its activation and the network runs
        from the layer after it.
      stop_layer: a layer name; returns its activation.
      capture_layers: sow every named layer's activation that is computed into
        the "layers" collection (apply with ``mutable=["layers"]``).

    Returns:
      float32 logits [N, num_classes], pooled features [N, C] without a top, or
      the activation of ``stop_layer``.
    """
    if self.convention not in CONVENTIONS:
      raise ValueError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
    names = self.layer_names()
    start = None if start_layer is None else self.canonical_layer(start_layer)
    stop = None if stop_layer is None else self.canonical_layer(stop_layer)
    if start is None:
      # Every layer runs from 75 px up; the stem alone also runs on smaller
      # crops (drig.attribution.receptive_field integrates units on them).
      _check_image(x, full=stop is None)
    torchvision = self.convention == "torchvision"
    momentum = self.bn_momentum if self.bn_momentum is not None else (0.9 if torchvision else 0.99)
    unit = functools.partial(ConvBN, bn_scale=torchvision, bn_momentum=momentum,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    width = functools.partial(scaled_width, width_multiplier=self.width_multiplier)
    block_kw = dict(unit=unit, width=width, count_include_pad=torchvision)

    def first(h):
      if self.transform_input:
        mean, std = jnp.asarray(_IMAGENET_MEAN), jnp.asarray(_IMAGENET_STD)
        h = h * (std / 0.5) + (mean - 0.5) / 0.5
      return unit(width(32), (3, 3), strides=2, padding="VALID", name="Conv2d_1a_3x3")(h, train)

    stages = [
        ("Conv2d_1a_3x3", first),
        ("Conv2d_2a_3x3", lambda h: unit(width(32), (3, 3), padding="VALID",
                                         name="Conv2d_2a_3x3")(h, train)),
        ("Conv2d_2b_3x3", lambda h: unit(width(64), (3, 3), name="Conv2d_2b_3x3")(h, train)),
        ("Conv2d_3b_1x1", lambda h: unit(width(80), (1, 1), padding="VALID",
                                         name="Conv2d_3b_1x1")(_max_pool(h), train)),
        ("Conv2d_4a_3x3", lambda h: unit(width(192), (3, 3), padding="VALID",
                                         name="Conv2d_4a_3x3")(h, train)),
    ]
    blocks = [
        InceptionA(pool_features=32, name="Mixed_5b", **block_kw),
        InceptionA(pool_features=64, name="Mixed_5c", **block_kw),
        InceptionA(pool_features=64, name="Mixed_5d", **block_kw),
        InceptionB(name="Mixed_6a", **block_kw),
        InceptionC(channels_7x7=128, name="Mixed_6b", **block_kw),
        InceptionC(channels_7x7=160, name="Mixed_6c", **block_kw),
        InceptionC(channels_7x7=160, name="Mixed_6d", **block_kw),
        InceptionC(channels_7x7=192, name="Mixed_6e", **block_kw),
        InceptionD(name="Mixed_7a", **block_kw),
        InceptionE(name="Mixed_7b", **block_kw),
        InceptionE(name="Mixed_7c", **block_kw),
    ]
    # The max pool after Conv2d_4a belongs to mixed0, so that Conv2d_4a's
    # activation is its conv unit's output, like every other stem layer's.
    stages.append(("mixed0", lambda h: blocks[0](_max_pool(h), train)))
    for layer, block in zip(MIXED_LAYERS[1:], blocks[1:]):
      stages.append((layer, functools.partial(block, train=train)))
    stages.append((POOLED_LAYER, global_average_pool))
    if self.num_classes is not None:
      top = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc")
      stages.append((LOGITS_LAYER, lambda h: top(h).astype(jnp.float32)))
    assert tuple(name for name, _ in stages) == names
    return run_stages(stages, x, start, stop, layer_recorder(self, capture_layers))


def _check_image(x, full: bool = True):
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"InceptionV3 expects NHWC images with 3 channels, got shape {x.shape}")
  if full and min(x.shape[1:3]) < MIN_INPUT_SIZE:
    raise ValueError(f"InceptionV3 needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} "
                     f"pixels, got {x.shape[1]}x{x.shape[2]}")


def count_parameters(variables) -> int:
  """Number of scalars in a variables tree (params and batch_stats, like Keras' count)."""
  return sum(int(leaf.size) for leaf in jax.tree.leaves(variables))
