"""Test-session set-up.

torchvision (through torch._dynamo and triton) segfaults when it is imported
after TensorFlow in the same process (`import tensorflow; import torchvision`
crashes with torch 2.14.1 and tensorflow-cpu 2.21). TFDS tests load TensorFlow,
reference tests load torchvision, and pytest runs them in one process, so the
reference libraries are imported first, here.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent compilation cache per test process (each pytest worker has its
# own), shared with the binaries that tests start: they compile the programs
# that the in-process tests already compiled, and the suite is mostly compilation.
# Set before any test module imports jax, which reads these at import.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="drig-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

try:
  import torch  # noqa: F401  pylint: disable=unused-import
  import torchvision  # noqa: F401  pylint: disable=unused-import
except ImportError:  # the reference libraries are optional outside the test suite
  pass


# The longest test files (minutes each on 2 cores: their own processes, training
# runs, Inception-v3 compilations) first. pytest-xdist's --dist loadfile hands out
# files in collection order, so the two workers then end together instead of one
# finishing a long file alone at the end.
_LONGEST_FIRST = (
    "test_multiprocess.py", "test_analyze.py", "test_train.py", "test_unit_regions.py",
    "test_tensorboard.py", "test_adaptive_integration.py", "test_attribution_captum.py",
    "test_training_workdir.py", "test_notebook.py", "test_regression_head.py",
    "test_transfer_h5.py", "test_analysis_baseline_distribution.py", "test_readme_snippet.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))
