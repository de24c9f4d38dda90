"""Each binary's --help lists its configs' arguments, and configs reject unknown ones."""

import importlib
import os
import subprocess
import sys

import pytest

import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# binary -> the config files whose arguments its --help lists.
BINARIES = {
    "drig.train": ("base", "kaggle"),
    "drig.analyze": ("analyze",),
    "drig.prepare_data": ("data",),
    "drig.import_weights": ("model",),
}


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_help_lists_every_config_argument(binary):
  result = subprocess.run([sys.executable, "-m", binary, "--help"], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=120)
  text = result.stdout
  # absl's --help prints the usage and exits with status 1.
  assert result.returncode == 1 and "--config:" in text, result.stderr[-3000:]
  for name in BINARIES[binary]:
    module = importlib.import_module(f"configs.{name}")
    assert f"configs/{name}.py" in text
    for arg, description in module.ARGS.items():
      label = arg or "(none)"
      assert f"    {label} " in text, f"{binary} --help does not list {name}.py:{label}"
      assert description.split()[0] in text


@pytest.mark.parametrize("name", ["analyze", "base", "data", "kaggle", "model"])
def test_every_declared_argument_builds_and_unknown_ones_list_them(name):
  module = importlib.import_module(f"configs.{name}")
  get = getattr(module, "get_config")
  for arg in list(module.ARGS) + [None, "default"]:
    get(arg)
  with pytest.raises(ValueError, match=rf"unknown configs/{name}\.py argument 'nope'; known: "
                                       r"\(none\)"):
    get("nope")
  assert module.__doc__.count("python -m drig.") >= 1, "the docstring gives its command"
  assert "runtime" in module.__doc__.lower(), "the docstring gives the expected runtime"


def test_arguments_help_is_built_from_the_tables():
  text = configs.arguments_help("base")
  for arg in ("runlocal", "tiny", "(none)"):
    assert arg in text
