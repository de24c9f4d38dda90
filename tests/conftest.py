"""Test-session set-up.

torchvision (through torch._dynamo and triton) segfaults when it is imported
after TensorFlow in the same process (`import tensorflow; import torchvision`
crashes with torch 2.14.1 and tensorflow-cpu 2.21). TFDS tests load TensorFlow,
reference tests load torchvision, and pytest runs them in one process, so the
reference libraries are imported first, here.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
  import torch  # noqa: F401  pylint: disable=unused-import
  import torchvision  # noqa: F401  pylint: disable=unused-import
except ImportError:  # the reference libraries are optional outside the test suite
  pass
