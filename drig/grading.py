"""The grading vocabulary shared by every part of drig.

DR grades 0-4 and their names, the half-gray pixel value (preprocessing's fill
outside the retina and the poster's integrated-gradients baseline), and the map
between uint8 pixels and the model's float input. Imports nothing from drig.
"""

import numpy as np

NUM_GRADES = 5
GRADE_NAMES = ("no DR", "mild", "moderate", "severe", "proliferative")

# Half gray: the value preprocessing puts outside the kept disc, so that the
# poster's baseline image equals the background of every preprocessed image.
HALF_GRAY = 128

# The model sees pixel / 127.5 - 1 (Keras' Inception preprocessing), so half
# gray is 128 / 127.5 - 1 = 1/255 ~= 0.00392 in its input space, not 0.
_PIXEL_SCALE = 127.5
HALF_GRAY_MODEL = HALF_GRAY / _PIXEL_SCALE - 1.0


def grade_name(grade: int) -> str:
  """"grade 3 (severe)"; a grade outside 0-4 (e.g. -1, unknown) without a name."""
  grade = int(grade)
  if 0 <= grade < NUM_GRADES:
    return f"grade {grade} ({GRADE_NAMES[grade]})"
  return f"grade {grade}"


def to_model_input(images):
  """Maps uint8 pixels ``[0, 255]`` to float32 ``[-1, 1]`` as ``x / 127.5 - 1``.

  The Keras ``inception_v3.preprocess_input`` convention. Works on numpy and
  jax arrays alike (uses only array methods), so it can run inside ``jit``.

  Args:
    images: uint8 (or any real dtype) array of pixel values, any shape.

  Returns:
    float32 array of the same shape.
  """
  return images.astype(np.float32) / np.float32(_PIXEL_SCALE) - np.float32(1.0)


def from_model_input(x):
  """Inverse of ``to_model_input``: float ``[-1, 1]`` to uint8 ``[0, 255]``.

  Values are rounded to the nearest integer and clipped to ``[0, 255]``.

  Args:
    x: float array, any shape.

  Returns:
    uint8 array of the same shape.
  """
  return ((x + 1.0) * _PIXEL_SCALE).round().clip(0, 255).astype(np.uint8)
