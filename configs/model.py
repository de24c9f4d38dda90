r"""Model config section: the DR classifier (or a bare Inception-v3).

Other configs call ``get_model_config(arg)`` for their ``model`` field; this
file is also a config of its own (``model`` and ``seed``), e.g. for importing
weights:

  python -m drig.import_weights --source=keras_h5 \
      --input=inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 \
      --output=workdirs/imagenet_init --config=configs/model.py

Arguments (``configs/model.py:ARG``): the ``ARGS`` table below, which
``python -m drig.import_weights --help`` lists. Expected runtime: an import
runs in seconds to minutes on a CPU (reading the file, initialising the head,
writing the checkpoint).
"""

import ml_collections

import configs

ARGS = {
    "": "the poster's model: the full Inception-v3 base and two fully connected layers, "
        "Keras conventions",
    "torchvision": "the same with torchvision's conventions (for its weights)",
    "inception": "a bare Inception-v3 with the 1000-class ImageNet top",
    "runlocal": "the quarter-width variant for a 2-core CPU",
    "tiny": "a minimal variant for tests",
}


def get_model_config(arg=None) -> ml_collections.ConfigDict:
  """The ``model`` config section.

  Fields: name ("dr_classifier" or "inception_v3"), num_classes, head
  ("softmax", "ordinal" or "regression", dr_classifier only),
  regression_scale, convention
  ("keras" or "torchvision"), width_multiplier, fc_widths, activation,
  dropout, dtype and param_dtype (names: "float32", "bfloat16").
  """
  arg = configs.resolve_arg("configs/model.py", ARGS, arg)
  model = ml_collections.ConfigDict()
  model.name = "dr_classifier"
  model.num_classes = 5
  # "softmax": the poster's 5 logits; "ordinal": a cumulative-link head whose
  # outputs are log-probabilities; "regression": the grade as one real number,
  # thresholds fitted on the validation split for kappa, log-probabilities around
  # them (drig/models/classifier.py).
  model.head = "softmax"
  # Regression head only: grades per unit of log-odds between adjacent grades in
  # its probabilities, log P(k) / P(k - 1) = (y - t_k) / regression_scale.
  model.regression_scale = 0.25
  model.convention = "keras"
  model.width_multiplier = 1.0
  # The poster adds "two fully connected layers" without their widths; 1024
  # follows Keras' fine-tuning example for InceptionV3, halved for the second.
  model.fc_widths = (1024, 512)
  model.activation = "relu"
  model.dropout = 0.5
  model.dtype = "float32"            # "bfloat16" on accelerators
  model.param_dtype = "float32"
  if arg == "torchvision":
    model.convention = "torchvision"
  elif arg == "inception":
    model.name = "inception_v3"
    model.num_classes = 1000
  elif arg == "runlocal":
    model.width_multiplier = 0.25
    model.fc_widths = (256, 128)
  elif arg == "tiny":
    model.width_multiplier = 0.0625
    model.fc_widths = (16, 8)
  return model


def get_config(arg=None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = get_model_config(arg)
  return config
