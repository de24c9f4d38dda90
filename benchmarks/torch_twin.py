"""A PyTorch copy of a drig grader (``DRClassifier``, softmax head), for Captum.

Captum attributes torch modules; a drig training run is a Flax model of any
width (``runlocal`` trains a quarter-width Inception-v3 with two fully
connected layers), which torchvision has no model for. ``TorchGrader`` builds
the same network in torch, module for module, and ``from_drig`` copies a drig
run's parameters into it, so that Captum and drig integrate the very same
function. ``tests/test_torch_twin.py`` checks the copy's logits and input
gradients against drig's.

Conventions follow ``drig.models.inception_v3``: bias-free convolutions,
BatchNorm with epsilon 1e-3 (scale fixed at 1 in the Keras convention), the
branch average pools excluding (Keras) or counting (torchvision) the padding,
VALID 3x3 stride-2 max pools. Inputs are NCHW in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from drig.models import inception_v3

_BN_EPSILON = inception_v3.BN_EPSILON


class ConvUnit(nn.Module):
  """Convolution (no bias), BatchNorm, ReLU; SAME pads (k - 1) / 2 (odd kernels, stride 1)."""

  def __init__(self, in_channels, out_channels, kernel, stride=1, same=True):
    super().__init__()
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    padding = (kh // 2, kw // 2) if same else 0
    self.conv = nn.Conv2d(in_channels, out_channels, (kh, kw), stride, padding, bias=False)
    self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPSILON)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _max_pool(x):
  return F.max_pool2d(x, 3, 2)


class _Block(nn.Module):

  def __init__(self, count_include_pad):
    super().__init__()
    self.count_include_pad = count_include_pad

  def branch_pool_input(self, x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=self.count_include_pad)


class BlockA(_Block):
  """Mixed_5b/5c/5d."""

  def __init__(self, c_in, pool_features, w, count_include_pad):
    super().__init__(count_include_pad)
    self.branch1x1 = ConvUnit(c_in, w(64), 1)
    self.branch5x5_1 = ConvUnit(c_in, w(48), 1)
    self.branch5x5_2 = ConvUnit(w(48), w(64), 5)
    self.branch3x3dbl_1 = ConvUnit(c_in, w(64), 1)
    self.branch3x3dbl_2 = ConvUnit(w(64), w(96), 3)
    self.branch3x3dbl_3 = ConvUnit(w(96), w(96), 3)
    self.branch_pool = ConvUnit(c_in, w(pool_features), 1)
    self.out_channels = w(64) + w(64) + w(96) + w(pool_features)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(self.branch_pool_input(x))], dim=1)


class BlockB(_Block):
  """Mixed_6a: 35 -> 17."""

  def __init__(self, c_in, w, count_include_pad):
    super().__init__(count_include_pad)
    self.branch3x3 = ConvUnit(c_in, w(384), 3, stride=2, same=False)
    self.branch3x3dbl_1 = ConvUnit(c_in, w(64), 1)
    self.branch3x3dbl_2 = ConvUnit(w(64), w(96), 3)
    self.branch3x3dbl_3 = ConvUnit(w(96), w(96), 3, stride=2, same=False)
    self.out_channels = w(384) + w(96) + c_in

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _max_pool(x)], dim=1)


class BlockC(_Block):
  """Mixed_6b-6e: factorised 7x7."""

  def __init__(self, c_in, c7, w, count_include_pad):
    super().__init__(count_include_pad)
    self.branch1x1 = ConvUnit(c_in, w(192), 1)
    self.branch7x7_1 = ConvUnit(c_in, w(c7), 1)
    self.branch7x7_2 = ConvUnit(w(c7), w(c7), (1, 7))
    self.branch7x7_3 = ConvUnit(w(c7), w(192), (7, 1))
    self.branch7x7dbl_1 = ConvUnit(c_in, w(c7), 1)
    self.branch7x7dbl_2 = ConvUnit(w(c7), w(c7), (7, 1))
    self.branch7x7dbl_3 = ConvUnit(w(c7), w(c7), (1, 7))
    self.branch7x7dbl_4 = ConvUnit(w(c7), w(c7), (7, 1))
    self.branch7x7dbl_5 = ConvUnit(w(c7), w(192), (1, 7))
    self.branch_pool = ConvUnit(c_in, w(192), 1)
    self.out_channels = 4 * w(192)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for unit in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                 self.branch7x7dbl_5):
      bd = unit(bd)
    return torch.cat([self.branch1x1(x), b7, bd,
                      self.branch_pool(self.branch_pool_input(x))], dim=1)


class BlockD(_Block):
  """Mixed_7a: 17 -> 8."""

  def __init__(self, c_in, w, count_include_pad):
    super().__init__(count_include_pad)
    self.branch3x3_1 = ConvUnit(c_in, w(192), 1)
    self.branch3x3_2 = ConvUnit(w(192), w(320), 3, stride=2, same=False)
    self.branch7x7x3_1 = ConvUnit(c_in, w(192), 1)
    self.branch7x7x3_2 = ConvUnit(w(192), w(192), (1, 7))
    self.branch7x7x3_3 = ConvUnit(w(192), w(192), (7, 1))
    self.branch7x7x3_4 = ConvUnit(w(192), w(192), 3, stride=2, same=False)
    self.out_channels = w(320) + w(192) + c_in

  def forward(self, x):
    b7 = self.branch7x7x3_1(x)
    for unit in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = unit(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, _max_pool(x)], dim=1)


class BlockE(_Block):
  """Mixed_7b/7c."""

  def __init__(self, c_in, w, count_include_pad):
    super().__init__(count_include_pad)
    self.branch1x1 = ConvUnit(c_in, w(320), 1)
    self.branch3x3_1 = ConvUnit(c_in, w(384), 1)
    self.branch3x3_2a = ConvUnit(w(384), w(384), (1, 3))
    self.branch3x3_2b = ConvUnit(w(384), w(384), (3, 1))
    self.branch3x3dbl_1 = ConvUnit(c_in, w(448), 1)
    self.branch3x3dbl_2 = ConvUnit(w(448), w(384), 3)
    self.branch3x3dbl_3a = ConvUnit(w(384), w(384), (1, 3))
    self.branch3x3dbl_3b = ConvUnit(w(384), w(384), (3, 1))
    self.branch_pool = ConvUnit(c_in, w(192), 1)
    self.out_channels = w(320) + 4 * w(384) + w(192)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    return torch.cat([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
        self.branch_pool(self.branch_pool_input(x))], dim=1)


class TorchGrader(nn.Module):
  """drig's DRClassifier (softmax head) in torch: Inception-v3 base, fc layers, logits."""

  def __init__(self, *, num_classes=5, fc_widths=(1024, 512), width_multiplier=1.0,
               convention="keras"):
    super().__init__()
    if convention not in inception_v3.CONVENTIONS:
      raise ValueError(f"convention must be one of {inception_v3.CONVENTIONS}, "
                       f"got {convention!r}")

    def w(channels):
      return inception_v3.scaled_width(channels, width_multiplier)
    pad = convention == "torchvision"
    self.Conv2d_1a_3x3 = ConvUnit(3, w(32), 3, stride=2, same=False)
    self.Conv2d_2a_3x3 = ConvUnit(w(32), w(32), 3, same=False)
    self.Conv2d_2b_3x3 = ConvUnit(w(32), w(64), 3)
    self.Conv2d_3b_1x1 = ConvUnit(w(64), w(80), 1, same=False)
    self.Conv2d_4a_3x3 = ConvUnit(w(80), w(192), 3, same=False)
    blocks = {}
    c = w(192)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      blocks[name] = BlockA(c, pool_features, w, pad)
      c = blocks[name].out_channels
    blocks["Mixed_6a"] = BlockB(c, w, pad)
    c = blocks["Mixed_6a"].out_channels
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      blocks[name] = BlockC(c, c7, w, pad)
      c = blocks[name].out_channels
    blocks["Mixed_7a"] = BlockD(c, w, pad)
    c = blocks["Mixed_7a"].out_channels
    for name in ("Mixed_7b", "Mixed_7c"):
      blocks[name] = BlockE(c, w, pad)
      c = blocks[name].out_channels
    self.blocks = nn.ModuleDict(blocks)
    head = []
    for width in fc_widths:
      head.append(nn.Linear(c, width))
      c = width
    self.fc = nn.ModuleList(head)
    self.logits = nn.Linear(c, num_classes)

  def forward(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x)))
    x = _max_pool(x)
    for block in self.blocks.values():
      x = block(x)
    x = x.mean(dim=(2, 3))
    for dense in self.fc:  # dropout is off in eval
      x = F.relu(dense(x))
    return self.logits(x)


def _tensor(value, *, transpose=None):
  array = np.asarray(value, np.float32)
  if transpose is not None:
    array = array.transpose(transpose)
  return torch.from_numpy(np.ascontiguousarray(array))


def _load_unit(unit: ConvUnit, params, stats, where):
  kernel = np.asarray(params["conv"]["kernel"])
  if tuple(kernel.shape[:2]) != tuple(unit.conv.kernel_size) or \
      kernel.shape[3] != unit.conv.out_channels or kernel.shape[2] != unit.conv.in_channels:
    raise ValueError(f"{where}: drig kernel {kernel.shape} does not fit the torch unit "
                     f"{tuple(unit.conv.weight.shape)} (OIHW)")
  unit.conv.weight.copy_(_tensor(kernel, transpose=(3, 2, 0, 1)))
  unit.bn.bias.copy_(_tensor(params["bn"]["bias"]))
  unit.bn.weight.copy_(_tensor(params["bn"]["scale"]) if "scale" in params["bn"]
                       else torch.ones_like(unit.bn.weight))
  unit.bn.running_mean.copy_(_tensor(stats["bn"]["mean"]))
  unit.bn.running_var.copy_(_tensor(stats["bn"]["var"]))


def _units(module: nn.Module, prefix=""):
  """(path, ConvUnit) of every conv unit, paths as drig's parameter tree names them."""
  for name, child in module.named_children():
    if isinstance(child, ConvUnit):
      yield prefix + name, child
    elif isinstance(child, nn.ModuleDict):
      for key, block in child.items():
        yield from _units(block, prefix + key + "/")


def from_drig(model, variables) -> TorchGrader:
  """The torch copy (eval mode) of a drig ``DRClassifier`` and its variables.

  Raises:
    ValueError: a head other than softmax, or parameters that do not match.
  """
  if model.head != "softmax":
    raise ValueError(f"the torch copy has the softmax head only, not {model.head!r}")
  twin = TorchGrader(num_classes=model.num_classes, fc_widths=model.fc_widths,
                     width_multiplier=model.width_multiplier, convention=model.convention)
  if model.activation != "relu":
    raise ValueError(f"the torch copy uses ReLU in the head, not {model.activation!r}")
  params, stats = variables["params"], variables["batch_stats"]
  copied = set()
  with torch.no_grad():
    for path, unit in _units(twin):
      p, s = params["base"], stats["base"]
      for key in path.split("/"):
        p, s = p[key], s[key]
      _load_unit(unit, p, s, path)
      copied.add(path)
    for i, dense in enumerate(list(twin.fc) + [twin.logits]):
      name = f"fc{i + 1}" if i < len(twin.fc) else inception_v3.LOGITS_LAYER
      dense.weight.copy_(_tensor(params[name]["kernel"], transpose=(1, 0)))
      dense.bias.copy_(_tensor(params[name]["bias"]))
      copied.add(name)
  expected = {"/".join(k for k in path) for path in _unit_paths(params["base"])}
  if expected != {p for p in copied if "/" in p or p.startswith("Conv2d")}:
    missing = sorted(expected - copied)
    raise ValueError(f"drig units not copied: {missing[:5]} ({len(missing)} in all)")
  return twin.eval()


def _unit_paths(tree, path=()):
  """Paths of the dicts in a drig parameter tree that hold a conv unit."""
  if "conv" in tree and "bn" in tree:
    yield path
    return
  for key, child in tree.items():
    yield from _unit_paths(child, path + (key,))
