"""drig: diabetic-retinopathy grading in JAX/Flax, explained with integrated gradients.

Importing ``drig`` has no side effects: it configures no devices, no logging and
does not import TensorFlow. Import the sub-package you need, for example
``drig.preprocess``, ``drig.models.inception_v3`` or ``drig.attribution``.
"""

__version__ = "0.1.0"
