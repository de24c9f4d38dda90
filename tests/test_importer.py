"""Weight importers, proven by numerical parity with Keras and torchvision.

No weights can be downloaded, so the references are randomised:
``keras.applications.InceptionV3(weights=None)`` saved in the legacy HDF5
layout of the official ImageNet files and as a Keras 3 ``.weights.h5``, and
``torchvision.models.inception_v3(weights=None)`` saved as ``.pth`` and
safetensors. He-scaled kernels and random BatchNorm statistics make the
activations large enough that a wrong pooling convention or a swapped pair
of same-shaped convolutions shows (default initialisation would hide them).

Keras runs in a subprocess (this file run as a script): its backend must be
chosen before it is first imported, which other test modules in the same
session might do, and its eager weight initialisation compiles ~190 random
number programs, which is three times faster at XLA optimisation level 0.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import orbax.checkpoint as ocp
import pytest

PARITY_TOLERANCE = 1e-4  # of the largest absolute reference activation
SIZES = (299, 256)
MIXED = tuple(f"mixed{i}" for i in range(11))
TORCH_BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- #
# The Keras reference (run in a subprocess: python tests/test_importer.py DIR).


def _official_layer_name(name: str) -> str:
  """Keras 3 names a model's first Conv2D ``conv2d``, the official file ``conv2d_1``."""
  match = re.fullmatch(r"(conv2d|batch_normalization|activation|max_pooling2d|"
                       r"average_pooling2d|concatenate)(?:_(\d+))?", name)
  if match is None:
    return {"input_layer": "input_1"}.get(name, name)
  return f"{match.group(1)}_{int(match.group(2) or 0) + 1}"


def _write_legacy_h5(model, path: str, *, offset: int = 0) -> None:
  """Writes ``model``'s weights in the layout of Keras' official ImageNet files.

  Root attributes ``layer_names`` (every layer, in ``model.layers`` order),
  ``backend``, ``keras_version``; one group per layer with attribute
  ``weight_names`` (``conv2d_1/kernel:0``, ...) and a dataset per weight at
  that path inside the group; trainable weights first, as Keras 2 stored them.
  """

  def name(layer):
    official = _official_layer_name(layer.name)
    match = re.fullmatch(r"(conv2d|batch_normalization)_(\d+)", official)
    return f"{match.group(1)}_{int(match.group(2)) + offset}" if match and offset else official

  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([name(layer).encode() for layer in model.layers])
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.1.5"
    for layer in model.layers:
      group = f.create_group(name(layer))
      weights = layer.trainable_weights + layer.non_trainable_weights
      weight_names = [f"{name(layer)}/{w.name}:0" for w in weights]
      group.attrs["weight_names"] = np.array([n.encode() for n in weight_names], dtype="S")
      for weight_name, weight in zip(weight_names, weights):
        group.create_dataset(weight_name, data=np.asarray(weight.numpy()))


def _randomise_keras(model, rng) -> None:
  # Lazy: only the Keras subprocess imports keras (its backend is set first).
  import keras  # pylint: disable=g-import-not-at-top
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      (kernel,) = layer.get_weights()
      fan_in = np.prod(kernel.shape[:3])
      layer.set_weights([rng.normal(0, np.sqrt(2 / fan_in), kernel.shape).astype(np.float32)])
    elif isinstance(layer, keras.layers.BatchNormalization):
      n = layer.get_weights()[0].shape[0]  # scale=False: beta, moving mean, moving variance
      layer.set_weights([rng.normal(0, 0.2, n).astype(np.float32),
                         rng.normal(0, 0.2, n).astype(np.float32),
                         rng.uniform(0.5, 1.5, n).astype(np.float32)])
    elif isinstance(layer, keras.layers.Dense):
      kernel, bias = layer.get_weights()
      layer.set_weights([rng.normal(0, 1 / np.sqrt(kernel.shape[0]), kernel.shape)
                         .astype(np.float32), rng.normal(0, 0.1, bias.shape).astype(np.float32)])


def make_keras_reference(out_dir: str) -> None:
  """Writes the Keras weight files, inputs and activations to ``out_dir``."""
  # Lazy: only the Keras subprocess imports keras (its backend is set first).
  import keras  # pylint: disable=g-import-not-at-top
  assert keras.backend.backend() == "jax", keras.backend.backend()
  rng = np.random.default_rng(1234)
  # One model serves every file and size: the base on any input size plus the
  # with-top head exactly as keras.applications builds it (avg_pool, predictions).
  base = keras.applications.InceptionV3(weights=None, include_top=False,
                                        input_shape=(None, None, 3))
  pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
  logits = keras.layers.Dense(1000, name="predictions")(pooled)
  top = keras.Model(base.input, logits, name="inception_v3")
  _randomise_keras(top, rng)

  _write_legacy_h5(top, os.path.join(out_dir, "keras_top.h5"))
  _write_legacy_h5(base, os.path.join(out_dir, "keras_notop.h5"))
  _write_legacy_h5(top, os.path.join(out_dir, "keras_top_offset.h5"), offset=200)
  top.save_weights(os.path.join(out_dir, "keras_top.weights.h5"))
  base.save_weights(os.path.join(out_dir, "keras_notop.weights.h5"))

  # Keras itself must read the legacy file back (its loader goes by layer order).
  saved = [np.array(w) for w in top.get_weights()]
  top.set_weights([np.zeros_like(w) for w in saved])
  top.load_weights(os.path.join(out_dir, "keras_top.h5"))
  legacy_roundtrip = all(np.array_equal(a, b) for a, b in zip(saved, top.get_weights()))

  probe = keras.Model(top.input, [top.get_layer(n).output for n in MIXED] + [top.output])
  arrays = {}
  for size in SIZES:
    x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    outputs = probe.predict(x, batch_size=2, verbose=0)
    arrays[f"x{size}"] = x
    for name, value in zip(MIXED + ("logits",), outputs):
      arrays[f"{name}_{size}"] = np.asarray(value)
  np.savez(os.path.join(out_dir, "reference.npz"), **arrays)
  with open(os.path.join(out_dir, "info.json"), "w") as f:
    json.dump({"params_notop": base.count_params(), "params_top": top.count_params(),
               "legacy_roundtrip": legacy_roundtrip}, f)


if __name__ == "__main__":
  make_keras_reference(sys.argv[1])
  sys.exit(0)


# --------------------------------------------------------------------------- #
# Fixtures.

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from drig.models import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position
from drig.models import classifier  # pylint: disable=g-import-not-at-top,wrong-import-position
from drig.models import importer  # pylint: disable=g-import-not-at-top,wrong-import-position
from drig.models import inception_v3  # pylint: disable=g-import-not-at-top,wrong-import-position
from drig.models import keras_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from drig.models import torch_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from drig.models import weight_files  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module", autouse=True)
def keras_process(tmp_path_factory):
  """Starts the Keras reference in the background; the torchvision tests run meanwhile."""
  out = tmp_path_factory.mktemp("keras_ref")
  env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  yield out, proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def keras_ref(keras_process):
  out, proc = keras_process
  _, stderr = proc.communicate(timeout=900)
  assert proc.returncode == 0, stderr[-5000:]
  with open(out / "info.json") as f:
    info = json.load(f)
  return out, dict(np.load(out / "reference.npz")), info


def _randomise_torch(model, seed):
  # Lazy: torch is a slow, test-only import.
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
      elif isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
        module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
        module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
      elif isinstance(module, torch.nn.Linear):
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                            / module.in_features ** 0.5)
        module.bias.copy_(torch.randn(module.out_features, generator=gen) * 0.1)


def _torch_reference(model, x_nhwc):
  """(logits, {block: activation NHWC}) of a torchvision Inception3 in eval mode."""
  # Lazy: torch is a slow, test-only import.
  import torch  # pylint: disable=g-import-not-at-top
  acts = {}
  hooks = [getattr(model, name).register_forward_hook(
      lambda m, i, o, name=name: acts.__setitem__(name, o.numpy().transpose(0, 2, 3, 1)))
           for name in TORCH_BLOCKS]
  try:
    with torch.no_grad():
      logits = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
  finally:
    for hook in hooks:
      hook.remove()
  return logits, acts


@pytest.fixture(scope="module")
def torch_ref(tmp_path_factory):
  # Lazy: torch is a slow, test-only import.
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("torch_ref")
  # aux_logits=True: the state dict then holds AuxLogits.*, like the official file.
  model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
  _randomise_torch(model, seed=4321)
  model.eval()
  torch.save(model.state_dict(), out / "tv.pth")
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "tv.safetensors"))
  rng = np.random.default_rng(99)
  refs = {}
  for size in SIZES:
    x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    refs[size] = (x,) + _torch_reference(model, x)
  return out, refs, model


_APPLY_CACHE = {}


def drig_forward(model, variables, x):
  """(logits, {mixed_i: activation}) of a drig model, jitted once per model."""
  if model not in _APPLY_CACHE:
    def run(variables, x):
      logits, state = model.apply(
          variables, x, capture_intermediates=lambda mdl, method: (
              mdl.name in inception_v3.MIXED_MODULES and method == "__call__"))
      acts = state["intermediates"]
      return logits, {layer: acts[module]["__call__"][0]
                      for layer, module in zip(MIXED, inception_v3.MIXED_MODULES)}
    _APPLY_CACHE[model] = jax.jit(run)
  logits, acts = _APPLY_CACHE[model](variables, jnp.asarray(x))
  return np.asarray(logits), {k: np.asarray(v) for k, v in acts.items()}


def relative_error(actual, reference) -> float:
  return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


def assert_parity(actual: dict, reference: dict):
  errors = {k: relative_error(actual[k], reference[k]) for k in reference}
  bad = {k: e for k, e in errors.items() if not e <= PARITY_TOLERANCE}
  assert not bad, f"beyond {PARITY_TOLERANCE} of the largest activation: {bad}"


def trees_equal(a, b) -> bool:
  fa, fb = weight_files.flatten(a), weight_files.flatten(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


KERAS_TOP = inception_v3.InceptionV3(num_classes=1000)
TV_TOP = inception_v3.InceptionV3(num_classes=1000, convention="torchvision")


@pytest.fixture(scope="module")
def keras_variables(keras_ref):
  return keras_weights.load_keras_h5(str(keras_ref[0] / "keras_top.h5"))


@pytest.fixture(scope="module")
def tv_variables(torch_ref):
  return torch_weights.load_torchvision(str(torch_ref[0] / "tv.pth"))


# --------------------------------------------------------------------------- #
# torchvision parity.


@pytest.mark.parametrize("size", SIZES)
def test_torchvision_parity(torch_ref, tv_variables, size):
  _, refs, _ = torch_ref
  x, ref_logits, ref_acts = refs[size]
  logits, acts = drig_forward(TV_TOP, tv_variables, x)
  expected = {layer: ref_acts[module] for layer, module in zip(MIXED, TORCH_BLOCKS)}
  assert_parity(dict(acts, logits=logits), dict(expected, logits=ref_logits))


def fold_bn_scale(variables):
  """torchvision-convention variables as a Keras-convention model's: the BN scale
  is folded into the kernel and the mean, (gx - gm) / s + b = g (x - m) / s + b."""
  def fold(params, stats):
    if "bn" in params and "conv" in params:
      g = params["bn"]["scale"]
      return ({"conv": {"kernel": params["conv"]["kernel"] * g},
               "bn": {"bias": params["bn"]["bias"]}},
              {"bn": {"mean": stats["bn"]["mean"] * g, "var": stats["bn"]["var"]}})
    new_params, new_stats = {}, {}
    for k, v in params.items():
      if k in stats:
        new_params[k], new_stats[k] = fold(v, stats[k])
      else:
        new_params[k] = v
    return new_params, new_stats
  params, stats = fold(variables["params"], variables["batch_stats"])
  return {"params": params, "batch_stats": stats}


def test_torchvision_weights_fail_under_keras_convention(torch_ref, tv_variables):
  """Negative control: only the pooling convention differs, and the test sees it."""
  _, refs, _ = torch_ref
  x, ref_logits, ref_acts = refs[299]
  folded = fold_bn_scale(tv_variables)
  # The fold itself is exact: a conv unit gives the same activation.
  first = x[:, :75, :75]
  np.testing.assert_allclose(
      KERAS_TOP.apply(folded, first, stop_layer="Conv2d_1a_3x3"),
      TV_TOP.apply(tv_variables, first, stop_layer="Conv2d_1a_3x3"), rtol=1e-5, atol=1e-5)
  logits, acts = drig_forward(KERAS_TOP, folded, x)
  assert relative_error(logits, ref_logits) > 100 * PARITY_TOLERANCE
  assert relative_error(acts["mixed0"], ref_acts["Mixed_5b"]) > 100 * PARITY_TOLERANCE


def test_safetensors_equal_pth(torch_ref, tv_variables):
  out, _, _ = torch_ref
  assert trees_equal(torch_weights.load_torchvision(str(out / "tv.safetensors")), tv_variables)


def test_torchvision_aux_head_is_ignored_and_reported(torch_ref):
  out, _, _ = torch_ref
  weights = torch_weights.read_torchvision(str(out / "tv.pth"))
  assert weights.num_classes == 1000
  assert any(n.startswith("AuxLogits.") for n in weights.ignored)
  assert all(n.startswith("AuxLogits.") or n.endswith("num_batches_tracked")
             for n in weights.ignored)


def test_torchvision_transform_input(torch_ref, tv_variables):
  """transform_input=True takes ImageNet-normalised input as torchvision does.

  The transform only changes the first convolution's input, so its activation
  is compared (the rest of the network is proven by the parity tests).
  """
  _, refs, model = torch_ref
  x = refs[256][0][:, :80, :80]
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  normalised = (((x + 1) / 2 - mean) / std).astype(np.float32)
  captured = {}
  hook = model.Conv2d_1a_3x3.register_forward_hook(
      lambda m, i, o: captured.__setitem__("out", o.numpy().transpose(0, 2, 3, 1)))
  model.transform_input = True
  try:
    _torch_reference(model, normalised)
  finally:
    model.transform_input = False
    hook.remove()
  drig_model = inception_v3.InceptionV3(num_classes=1000, convention="torchvision",
                                        transform_input=True)
  ours = drig_model.apply(tv_variables, normalised, stop_layer="Conv2d_1a_3x3")
  assert relative_error(np.asarray(ours), captured["out"]) <= PARITY_TOLERANCE
  # The transform maps ImageNet normalisation back to [-1, 1]: same as x untransformed.
  plain = TV_TOP.apply(tv_variables, x, stop_layer="Conv2d_1a_3x3")
  assert relative_error(np.asarray(ours), np.asarray(plain)) <= PARITY_TOLERANCE


# --------------------------------------------------------------------------- #
# Keras parity.


def test_keras_reference_is_meaningful(keras_ref):
  _, ref, info = keras_ref
  assert info["legacy_roundtrip"], "Keras could not read the legacy-layout file back"
  for size in SIZES:  # randomised so that errors show: activations far from tiny
    assert np.abs(ref[f"logits_{size}"]).max() > 1.0
    assert np.abs(ref[f"mixed10_{size}"]).max() > 1.0


@pytest.mark.parametrize("size", SIZES)
def test_keras_h5_parity(keras_ref, keras_variables, size):
  _, ref, _ = keras_ref
  logits, acts = drig_forward(KERAS_TOP, keras_variables, ref[f"x{size}"])
  expected = {name: ref[f"{name}_{size}"] for name in MIXED}
  assert_parity(dict(acts, logits=logits), dict(expected, logits=ref[f"logits_{size}"]))


def with_unit_bn_scale(variables):
  """Keras-convention variables with BatchNorm scale 1: the same function."""
  def add_scale(tree):
    if isinstance(tree, dict) and "bn" in tree and "conv" in tree:
      return dict(tree, bn=dict(tree["bn"], scale=jnp.ones_like(tree["bn"]["bias"])))
    return {k: add_scale(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
  return {"params": add_scale(variables["params"]), "batch_stats": variables["batch_stats"]}


def test_keras_weights_fail_under_torchvision_convention(keras_ref, keras_variables):
  """Negative control: only the pooling convention differs, and the test sees it."""
  _, ref, _ = keras_ref
  logits, acts = drig_forward(TV_TOP, with_unit_bn_scale(keras_variables), ref["x299"])
  error = relative_error(logits, ref["logits_299"])
  assert error > 100 * PARITY_TOLERANCE, error
  assert relative_error(acts["mixed0"], ref["mixed0_299"]) > 100 * PARITY_TOLERANCE


def test_keras3_weights_equal_legacy_import(keras_ref, keras_variables):
  out, _, _ = keras_ref
  keras3 = keras_weights.load_keras3_weights(str(out / "keras_top.weights.h5"))
  assert trees_equal(keras3, keras_variables)


def test_notop_files_give_the_base(keras_ref, keras_variables):
  out, _, _ = keras_ref
  base = {"params": {k: v for k, v in keras_variables["params"].items() if k != "fc"},
          "batch_stats": keras_variables["batch_stats"]}
  weights = keras_weights.read_keras_h5(str(out / "keras_notop.h5"))
  assert weights.num_classes is None
  assert trees_equal(weights.variables, base)
  assert trees_equal(keras_weights.load_keras3_weights(str(out / "keras_notop.weights.h5")), base)


def test_legacy_layer_numbering_offset_is_sorted_not_assumed(keras_ref, keras_variables):
  out, _, _ = keras_ref
  assert trees_equal(keras_weights.load_keras_h5(str(out / "keras_top_offset.h5")), keras_variables)


def test_parameter_count_matches_keras(keras_ref, keras_variables):
  _, _, info = keras_ref
  assert info["params_notop"] == 21_802_784
  assert info["params_top"] == 23_851_784
  assert inception_v3.count_parameters(keras_variables) == info["params_top"]
  base = jax.eval_shape(inception_v3.InceptionV3().init, jax.random.key(0),
                        jnp.zeros((1, 75, 75, 3)))
  assert inception_v3.count_parameters(base) == info["params_notop"]


# --------------------------------------------------------------------------- #
# Bad files.


def test_wrong_architecture_keras(tmp_path):
  path = tmp_path / "small.h5"
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([b"conv2d_1", b"batch_normalization_1"])
    g = f.create_group("conv2d_1")
    g.attrs["weight_names"] = np.array([b"conv2d_1/kernel:0"])
    g.create_dataset("conv2d_1/kernel:0", data=np.zeros((3, 3, 3, 8), np.float32))
    g = f.create_group("batch_normalization_1")
    g.attrs["weight_names"] = np.array([b"batch_normalization_1/beta:0"])
    g.create_dataset("batch_normalization_1/beta:0", data=np.zeros(8, np.float32))
  with pytest.raises(weight_files.WeightImportError, match=r"1 conv2d layers where Inception-v3 "
                     r"has 94") as info:
    keras_weights.load_keras_h5(str(path))
  assert str(path) in str(info.value)


def test_wrong_architecture_torchvision(tmp_path):
  # Lazy: torch is a slow, test-only import.
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  path = tmp_path / "resnet18.pth"
  torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
  with pytest.raises(weight_files.WeightImportError) as info:
    torch_weights.load_torchvision(str(path))
  message = str(info.value)
  assert str(path) in message and "missing (" in message and "unexpected (" in message
  assert any(m.startswith("Conv2d_1a_3x3.conv.weight (->") for m in info.value.missing)
  assert "layer1.0.conv1.weight" in info.value.unexpected
  assert "... and" in message  # long lists are shortened, with their counts


def _truncate(src, dst, fraction=0.5):
  data = open(src, "rb").read()
  with open(dst, "wb") as f:
    f.write(data[:int(len(data) * fraction)])


@pytest.mark.parametrize("name,loader", [
    ("keras_top.h5", keras_weights.load_keras_h5),
    ("keras_top.weights.h5", keras_weights.load_keras3_weights)])
def test_truncated_keras_files(keras_ref, tmp_path, name, loader):
  path = tmp_path / name
  _truncate(keras_ref[0] / name, path)
  with pytest.raises(weight_files.WeightImportError, match=re.escape(str(path))):
    loader(str(path))


@pytest.mark.parametrize("name", ["tv.pth", "tv.safetensors"])
def test_truncated_torchvision_files(torch_ref, tmp_path, name):
  path = tmp_path / name
  _truncate(torch_ref[0] / name, path)
  with pytest.raises(weight_files.WeightImportError, match=re.escape(str(path))) as info:
    torch_weights.load_torchvision(str(path))
  assert "truncated" in str(info.value)


def test_wrong_formats(keras_ref, torch_ref, tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("not weights\n")
  pth = str(torch_ref[0] / "tv.pth")
  legacy, keras3 = str(keras_ref[0] / "keras_top.h5"), str(keras_ref[0] / "keras_top.weights.h5")
  cases = [
      (keras_weights.load_keras_h5, str(text), "cannot be opened as an HDF5 file"),
      (keras_weights.load_keras_h5, pth, "PyTorch .pth file: use source 'torchvision'"),
      (keras_weights.load_keras_h5, keras3, "use source 'keras3'"),
      (keras_weights.load_keras3_weights, legacy, "use source 'keras_h5'"),
      (torch_weights.load_torchvision, legacy, "HDF5 file"),
      (torch_weights.load_torchvision, str(text), "not a PyTorch state dict"),
      (keras_weights.load_keras_h5, str(tmp_path / "absent.h5"), "no such file"),
  ]
  for loader, path, fragment in cases:
    with pytest.raises(weight_files.WeightImportError) as info:
      loader(path)
    assert path in str(info.value) and fragment in str(info.value), (loader, str(info.value))


def test_missing_and_mismatched_torchvision_tensors(torch_ref, tmp_path):
  # Lazy: torch is a slow, test-only import.
  import torch  # pylint: disable=g-import-not-at-top
  state = torch.load(torch_ref[0] / "tv.pth", weights_only=True)
  del state["Mixed_6e.branch_pool.bn.running_var"]
  state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
  path = tmp_path / "damaged.pth"
  torch.save(state, path)
  with pytest.raises(weight_files.WeightImportError) as info:
    torch_weights.load_torchvision(str(path))
  err = info.value
  assert err.missing == ("Mixed_6e.branch_pool.bn.running_var "
                         "(-> batch_stats/Mixed_6e/branch_pool/bn/var)",)
  assert len(err.mismatched) == 1 and "Mixed_5b.branch1x1.conv.weight" in err.mismatched[0]
  assert not err.unexpected
  assert str(path) in str(err)


def test_missing_keras_tensors(keras_ref, tmp_path):
  legacy, keras3 = tmp_path / "legacy.h5", tmp_path / "k3.weights.h5"
  shutil.copy(keras_ref[0] / "keras_top.h5", legacy)
  shutil.copy(keras_ref[0] / "keras_top.weights.h5", keras3)
  with h5py.File(legacy, "a") as f:
    del f["batch_normalization_7"]["batch_normalization_7/moving_mean:0"]
  with pytest.raises(weight_files.WeightImportError, match="batch_normalization_7/moving_mean:0"):
    keras_weights.load_keras_h5(str(legacy))
  with h5py.File(keras3, "a") as f:
    del f["layers/batch_normalization_8/vars/2"]
  with pytest.raises(weight_files.WeightImportError) as info:
    keras_weights.load_keras3_weights(str(keras3))
  # conv2d_8 / batch_normalization_8 in Keras 3 numbering is Mixed_5b.branch1x1.
  assert info.value.missing == ("layers/batch_normalization_8/vars/2 "
                                "(-> batch_stats/Mixed_5b/branch1x1/bn/var)",)


# --------------------------------------------------------------------------- #
# Into the DR classifier, drig checkpoints and the CLI.


def random_like(tree, seed=0):
  """Stand-in for a fresh init (cheap: no random-initialiser compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.05, 0.05, s.shape), s.dtype), tree)


def zeros_like(tree):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


@pytest.fixture(scope="module")
def fresh_classifier():
  """A DRClassifier's variables as a fresh init would shape them."""
  model = classifier.DRClassifier()
  return random_like(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3))))


def test_import_into_classifier_reports(keras_ref, keras_variables, fresh_classifier):
  fresh = fresh_classifier
  weights = keras_weights.read_keras_h5(str(keras_ref[0] / "keras_top.h5"))
  variables, report = importer.import_into(fresh, weights, convention="keras")
  assert trees_equal(variables["params"]["base"],
                     {k: v for k, v in keras_variables["params"].items() if k != "fc"})
  assert trees_equal(variables["batch_stats"]["base"], keras_variables["batch_stats"])
  assert set(report.initialised) == {"params/fc1/kernel", "params/fc1/bias", "params/fc2/kernel",
                                     "params/fc2/bias", "params/logits/kernel",
                                     "params/logits/bias"}
  assert all(k.split("/")[1] == "base" for k in report.imported)
  assert report.imported_values == 21_802_784
  assert set(report.ignored) == {"params/fc/kernel", "params/fc/bias"}
  for k in report.initialised:  # the head is left exactly as initialised
    collection, *rest = k.split("/")
    a, b = variables[collection], fresh[collection]
    for part in rest:
      a, b = a[part], b[part]
    assert np.array_equal(a, b)
  text = str(report)
  assert "freshly initialised (6 arrays" in text and "params/fc1/kernel" in text


def test_import_refuses_misfits(keras_ref, fresh_classifier):
  weights = keras_weights.read_keras_h5(str(keras_ref[0] / "keras_notop.h5"))
  small = classifier.DRClassifier(width_multiplier=0.25)
  fresh = zeros_like(jax.eval_shape(small.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3))))
  with pytest.raises(weight_files.WeightImportError, match="shape mismatch"):
    importer.import_into(fresh, weights, convention="keras")
  with pytest.raises(weight_files.WeightImportError, match="model uses convention='torchvision'"):
    importer.import_into(fresh_classifier, weights, convention="torchvision")
  # Keras weights into a torchvision-convention classifier: its BN scales are missing.
  tv_classifier = dict(fresh_classifier, params=dict(
      fresh_classifier["params"], base=with_unit_bn_scale(
          {"params": fresh_classifier["params"]["base"], "batch_stats": {}})["params"]))
  with pytest.raises(weight_files.WeightImportError, match=r"missing \(94\)"):
    importer.import_into(tv_classifier, weights)
  # A model with an ImageNet top needs the top from the file.
  template = weight_files.inception_template("keras", 1000)
  top = weight_files.unflatten(
      {k: jnp.zeros(s) for k, s in template.items()})
  with pytest.raises(weight_files.WeightImportError, match=r"params/fc/kernel"):
    importer.import_into(top, weights)


def test_drig_checkpoint_roundtrip_and_training_layout(tmp_path, keras_variables):
  path = tmp_path / "plain"
  checkpoints.save_variables(str(path), keras_variables)
  assert trees_equal(checkpoints.load_drig_checkpoint(str(path)), keras_variables)
  with pytest.raises(FileExistsError, match=re.escape(str(path))):
    checkpoints.save_variables(str(path), keras_variables)  # no silent overwrite
  # The training loop's layout: CheckpointManager steps of a state with more fields.
  small = {"params": {"fc1": {"kernel": jnp.arange(6.0).reshape(2, 3)}},
           "batch_stats": {"Conv2d_1a_3x3": {"bn": {"mean": jnp.ones(4)}}}}
  state = {"step": jnp.asarray(7), "params": small["params"],
           "batch_stats": small["batch_stats"], "opt_state": (jnp.zeros(3),)}
  manager = ocp.CheckpointManager(str(tmp_path / "run"))
  for step in (5, 7):
    manager.save(step, args=ocp.args.StandardSave(dict(state, step=jnp.asarray(step))))
  manager.wait_until_finished()
  manager.close()
  for where in ("run", "run/7", "run/7/default"):
    weights = checkpoints.read_drig_checkpoint(str(tmp_path / where))
    assert trees_equal(weights.variables, small)
    assert set(weights.ignored) == {"step", "opt_state"}
    assert weights.path.endswith(os.path.join("7", "default"))
  assert checkpoints.read_drig_checkpoint(str(tmp_path / "run"), step=5).path.endswith("5/default")
  with pytest.raises(weight_files.WeightImportError, match="no such checkpoint directory"):
    checkpoints.load_drig_checkpoint(str(tmp_path / "absent"))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("not a checkpoint")
  with pytest.raises(weight_files.WeightImportError, match="not a drig"):
    checkpoints.load_drig_checkpoint(str(tmp_path / "other"))


def test_cli_converts_keras_h5_for_training(keras_ref, keras_variables, tmp_path):
  out = tmp_path / "init"
  proc = subprocess.run(
      [sys.executable, "-m", "drig.import_weights", "--source=keras_h5",
       f"--input={keras_ref[0] / 'keras_notop.h5'}", f"--output={out}",
       "--config=configs/model.py"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "freshly initialised (6 arrays" in proc.stdout and "params/fc1/kernel" in proc.stdout
  restored = checkpoints.load_drig_checkpoint(str(out))
  assert trees_equal(restored["params"]["base"],
                     {k: v for k, v in keras_variables["params"].items() if k != "fc"})
  assert trees_equal(restored["batch_stats"]["base"], keras_variables["batch_stats"])
  # What training does with config.init.source="drig": every variable imported.
  model = classifier.build_model(_model_config())
  fresh = random_like(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3))))
  variables, report = importer.initialise_from(fresh, source="drig", path=str(out),
                                               model_config=_model_config())
  assert not report.initialised and trees_equal(variables, restored)


def test_convert_without_model_writes_the_files_variables(keras_ref, keras_variables, tmp_path):
  report = importer.convert_weights("keras3", str(keras_ref[0] / "keras_top.weights.h5"),
                                    str(tmp_path / "out"))
  assert not report.initialised and report.imported_values == 23_851_784
  assert trees_equal(checkpoints.load_drig_checkpoint(str(tmp_path / "out")), keras_variables)


def _model_config():
  # Lazy: configs/ is importable only with the repository root on sys.path.
  sys.path.insert(0, ROOT)
  try:
    from configs import model as model_config  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(ROOT)
  return model_config.get_model_config()
