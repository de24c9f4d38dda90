r"""The poster's training recipe, on the embedded synthetic fundus data.

  python -m drig.train --config=configs/base.py --workdir=workdirs/base
  python -m drig.train --config=configs/base.py:runlocal --workdir=workdirs/runlocal
  python -m drig.train --config=configs/base.py:runlocal_shuffled_labels \
      --workdir=workdirs/runlocal_shuffled_labels

Recipe (Li et al.): Inception-v3 base without its top, two fully connected
layers, a 5-way softmax; class-balanced batches with grades 0-4 in the ratio
8:1:2:1:4; learning rate 0.001 for 550 batches, 0.0002 for 350, 0.00005 for 495
(1395 steps).

Optimizer: the poster names none. drig uses Adam: the poster's rates (1e-3
falling to 5e-5 within 1.4k steps) are Adam's default rate and its usual
fine-tuning decay, whereas SGD at 1e-3 would barely move a fresh head in 1395
steps. ``config.optimizer.name`` offers ``adamw``, ``sgd`` (momentum, Nesterov)
and ``rmsprop`` (the optimizer Inception-v3 was trained with).

Arguments (``--config=configs/base.py:ARG``): the ``ARGS`` table below, which
``python -m drig.train --help`` lists. Expected runtimes: ``runlocal`` about
4 min 15 s of training on the 2-core development CPU (the demo's training step,
compilation and evaluations included); the full size about 4 hours of compute
on that CPU, a few minutes on one GPU (estimates, docs/scaling.md); ``tiny``
seconds. ``imagenet_h5`` (the full size from Keras' ImageNet weights): an
estimate of about 5 minutes on one H100/H200 GPU (docs/scaling.md: 2.5-7 s of
compute for the 1395 steps; compilation, input, evaluations and checkpoints
make the rest), plus a one-time generation of synthetic_fundus/default on the
host's CPUs if it is not prepared yet; not measured. ``runlocal_shuffled_labels``
and ``tiny_shuffled_labels`` cost what ``runlocal`` and ``tiny`` cost (the same
model, steps and data; only the train split's labels are permuted).

Shuffled labels (``config.data.shuffle_labels``, the ``*_shuffled_labels``
arguments: the base argument with that one field set): the model for Adebayo
et al.'s data-randomisation check, which the analysis compares with the
properly trained one (``configs/analyze.py``, ``randomisation.data_checkpoint``).

Transfer from ImageNet: ``imagenet_h5`` reads Keras' notop Inception-v3 file
from ``config.init.path`` (default ``IMAGENET_H5_PATH``) through
drig.models.importer; a missing file stops training before anything else
runs, with the download address. ``imagenet_h5_tiny`` is the same path with
the tiny model for tests: give it a Keras-layout h5 file of the tiny model.
"""

import ml_collections

import configs
from configs import data as data_config
from configs import model as model_config

POSTER_LEARNING_RATES = (1e-3, 2e-4, 5e-5)
POSTER_STEPS = (550, 350, 495)
IMAGENET_H5_PATH = "data/weights/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"

ARGS = {
    "": "full size: the whole Inception-v3 at 256 px, 1395 steps of 32 images; needs an "
        "accelerator",
    "runlocal": "the demo on a 2-core CPU: quarter-width Inception-v3 at 128 px on "
                "synthetic_fundus/runlocal, schedule scaled to 40% (558 steps), about 4 min",
    "tiny": "tests: a minimal model on synthetic_fundus/tiny, 10 steps, seconds",
    "runlocal_shuffled_labels": "runlocal trained on a random permutation of the train "
                                "labels (data.shuffle_labels), for the data-randomisation "
                                "check; about 4 min",
    "tiny_shuffled_labels": "tests: tiny with data.shuffle_labels; seconds",
    "imagenet_h5": "the full size initialised from Keras' ImageNet Inception-v3 h5 (notop) "
                   f"at config.init.path ({IMAGENET_H5_PATH}); needs an accelerator: about "
                   "5 min on one H100/H200 (estimate)",
    "imagenet_h5_tiny": "tests: the imagenet_h5 import-then-train path with the tiny model on "
                        "synthetic_fundus/tiny; give config.init.path (a Keras h5 of the tiny "
                        "model); seconds",
}

# The data and model sections of each argument (configs/data.py, configs/model.py).
_SECTION_ARGS = {"imagenet_h5": "", "imagenet_h5_tiny": "tiny"}
# Arguments that are another argument's config trained on shuffled labels.
_SHUFFLED_LABELS_ARGS = {"runlocal_shuffled_labels": "runlocal",
                         "tiny_shuffled_labels": "tiny"}


def get_config(arg=None):
  arg = configs.resolve_arg("configs/base.py", ARGS, arg)
  if arg in _SHUFFLED_LABELS_ARGS:
    config = get_config(_SHUFFLED_LABELS_ARGS[arg])
    config.data.shuffle_labels = True
    return config
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data and model sections are shared with configs/data.py and configs/model.py.
  sections = _SECTION_ARGS.get(arg, arg)
  config.data = data_config.get_config(sections).data
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.test_split = "test"
  # Per-batch share of grades 0-4: 50 / 6.25 / 12.5 / 6.25 / 25 %.
  config.data.class_proportions = (8, 1, 2, 1, 4)
  # Adebayo et al.'s data randomisation: train on a random permutation of the train
  # split's labels (seeded from config.seed; each grade keeps its count, so the balanced
  # batches stay balanced); validation and test keep the true labels. A model that
  # learns nothing transferable, whose maps the analysis compares with a trained one's.
  config.data.shuffle_labels = False
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.flip = True
  config.data.augment.rotate = True           # any angle; the retina is a disc
  config.data.prefetch = 4
  # grain worker processes for reading and augmentation; 0: threads of this process.
  config.data.input_workers = 0

  config.model = model_config.get_model_config(sections)

  # Where the initial weights come from: random, keras_h5, keras3, torchvision
  # or drig (a drig checkpoint directory, or a drig.train workdir: its latest
  # checkpoint). Never silent: a report is written.
  config.init = ml_collections.ConfigDict()
  config.init.source = "random"
  config.init.path = ""
  if arg in ("imagenet_h5", "imagenet_h5_tiny"):
    config.init.source = "keras_h5"
    config.init.path = IMAGENET_H5_PATH if arg == "imagenet_h5" else ""

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-7                 # Keras' Adam epsilon
  config.optimizer.weight_decay = 1e-4        # adamw only
  config.optimizer.momentum = 0.9             # sgd / rmsprop
  config.optimizer.nesterov = True            # sgd
  config.optimizer.rmsprop_decay = 0.9
  config.optimizer.grad_clip_norm = 0.0       # 0: no clipping

  config.schedule = ml_collections.ConfigDict()
  config.schedule.learning_rates = POSTER_LEARNING_RATES
  config.schedule.steps = POSTER_STEPS

  config.batch_size = 32                      # global, over all devices and hosts
  config.eval_batch_size = 64
  config.freeze_base_steps = 0                # train only the head for this many steps
  config.log_every = 25
  config.eval_every = 250
  config.checkpoint_every = 100
  config.keep_checkpoints = 3

  # The test split, evaluated once after training: with the checkpoint the analysis
  # loads ("best" validation kappa, "latest" or a kept step), and percentile-bootstrap
  # intervals over the test images (seeded, so they reproduce).
  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.checkpoint = "best"
  config.evaluation.bootstrap_resamples = 1000
  config.evaluation.bootstrap_seed = 0
  config.evaluation.confidence = 0.95
  # Average the grade probabilities over transformed copies of each image at
  # evaluation: "none", "flips" (4: horizontal, vertical, both), "rotations"
  # (4: by 0/90/180/270 degrees) or "dihedral" (all 8 flips and rotations).
  config.evaluation.test_time_augmentation = "none"

  # The training loss (drig/training/losses.py); the poster's is plain softmax
  # cross-entropy. focal: -(1 - p_y)^gamma log p_y. class_weight_power k weighs each
  # example by share(grade)^-k of data.class_proportions (1: inverse frequency).
  config.loss = ml_collections.ConfigDict()
  config.loss.name = "softmax_cross_entropy"    # or "focal"
  config.loss.label_smoothing = 0.0
  config.loss.class_weight_power = 0.0
  config.loss.focal_gamma = 2.0                 # focal only
  # The regression head's loss (model.head = "regression"): "mse" or "smooth_l1"
  # (quadratic within smooth_l1_beta grades of the truth, linear beyond).
  config.loss.regression = "mse"
  config.loss.smooth_l1_beta = 1.0

  # TensorBoard beyond the scalars (host 0; drig/training/summaries.py). They change
  # what is shown, never the training, so a resumed run may change them.
  config.tensorboard = ml_collections.ConfigDict()
  config.tensorboard.hparams = True             # the flattened config, HPARAMS tab
  config.tensorboard.input_images = 8           # first-batch rows shown with grades; 0: none
  config.tensorboard.confusion_matrix = True    # an image at each evaluation
  # Pixel IG (this many steps) of the predicted grade of one fixed validation image
  # at each evaluation, drawn as Fig (a)-style maps; 0: off.
  config.tensorboard.map_steps = 8
  config.tensorboard.map_grade = 4              # that image: the first validation image of this grade

  if arg == "runlocal":
    config.schedule.steps = _scaled(POSTER_STEPS, 0.4)
    config.eval_every = 100
    config.checkpoint_every = 50
    config.log_every = 10
  elif arg in ("tiny", "imagenet_h5_tiny"):
    config.schedule.steps = (4, 3, 3)
    config.batch_size = 16
    config.eval_batch_size = 16
    config.log_every = 2
    config.eval_every = 5
    config.checkpoint_every = 2
    # One compilation less per test run; tests/test_tensorboard.py turns the maps on.
    config.tensorboard.map_steps = 0
  return config


def _scaled(steps, factor):
  return tuple(max(1, round(s * factor)) for s in steps)
