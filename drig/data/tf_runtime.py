"""TensorFlow, imported lazily and kept off accelerators.

TFDS needs TensorFlow to generate and read data sets. drig imports it only when
a data set is touched, and hides every GPU from it first, so that TensorFlow
never reserves accelerator memory that JAX needs.
"""

import functools


@functools.cache
def import_tensorflow():
  """Returns the ``tensorflow`` module, restricted to the CPU."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # Devices were already initialised by someone else's TF code; GPUs may be
    # visible, but there is nothing left to change.
    pass
  return tf
