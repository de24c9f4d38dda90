r"""The poster's recipe on Kaggle/EyePACS, starting from ImageNet weights.

  python -m drig.train --config=configs/kaggle.py --workdir=workdirs/kaggle

Needs, before the first run (nothing is downloaded at run time):
  * the Kaggle files in ``config.data.manual_dir`` (default
    ``data/manual/diabetic_retinopathy_detection``), laid out as docs/data.md
    describes; the first run generates the preprocessed TFDS data set once;
  * Keras' ImageNet weights without the top,
    ``inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5``, at
    ``config.init.path`` (default ``data/weights/...``).
Missing either stops the run at start-up with the download instructions.

Expected runtime: 1395 steps of 32 images at 256 px, estimated at a few minutes
on one H100-class GPU once the data set is generated (docs/scaling.md; not yet
measured). Generation preprocesses 88,712 photographs once: 35-70 core-minutes
(docs/data.md). The only argument is the default (``ARGS``): EyePACS needs an
accelerator, so there is no ``runlocal``.
"""

import configs
from configs import base

ARGS = {
    "": "the poster's recipe on EyePACS from Keras' ImageNet weights, bfloat16; needs your "
        "Kaggle download, the weights file and an accelerator",
}


def get_config(arg=None):
  arg = configs.resolve_arg("configs/kaggle.py", ARGS, arg)
  config = base.get_config(arg)
  config.data.name = "eyepacs"
  config.data.builder_config = f"drig-{config.data.image_size}"
  config.data.manual_dir = "data/manual/diabetic_retinopathy_detection"
  config.init.source = "keras_h5"
  config.init.path = "data/weights/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
  config.model.dtype = "bfloat16"
  return config
