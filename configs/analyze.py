r"""Batch attribution of a trained grader: the poster's figures, scores and experiments.

  python -m drig.analyze --config=configs/analyze.py --workdir=workdirs/analysis \
      --config.checkpoint=workdirs/base
  python -m drig.analyze --config=configs/analyze.py:runlocal \
      --workdir=workdirs/analysis       # after python -m drig.train ...:runlocal

Rerunning the same command resumes: finished shards are kept, the rest are
attributed. A different config in the same --workdir is refused (the config
is stored there as analysis_config.json). See docs/analysis.md for the outputs.

Arguments (``--config=configs/analyze.py:ARG``): the ``ARGS`` table below,
which ``python -m drig.analyze --help`` lists. Expected runtimes: ``runlocal``
about 2.5 min on the 2-core development CPU (the demo's analysis step), about a
minute of it compilation; ``tiny`` seconds; the full size on the EyePACS test
set needs an accelerator (estimates per machine in docs/scaling.md).

The model comes from ``checkpoint`` (a drig training workdir: its config.json
gives the model and data sections, and the checkpoint restored is
``checkpoint_step``: "best" (highest validation kappa among the kept
checkpoints), "latest" or a step number), or, when ``checkpoint`` is empty,
from ``init`` (random, keras_h5, keras3, torchvision, drig) with ``model``.

Images: a split of a data set (``data.name`` empty: the training run's data
set; ``data.split``), or photographs matching ``data.files`` (a glob), which
are preprocessed like the training data; unreadable or ungradable files are
skipped and listed in skipped.json and the report.
"""

import ml_collections

import configs
from configs import model as model_config

ARGS = {
    "": "full size: the model in config.checkpoint on its data set's whole test split, "
        "50 IG steps, 3 quantities; needs an accelerator for EyePACS-sized splits",
    "runlocal": "the demo: workdirs/runlocal (configs/base.py:runlocal), 12 test images at "
                "128 px, 16 steps, every experiment; about 2.5 min on a 2-core CPU",
    "tiny": "tests: give checkpoint (or init) and data.data_dir; 6 images of the tiny "
            "synthetic data, 4 steps",
    "study": "the lesion study (docs/results.md): 512 test images stratified by lesion type, "
             "every attribution method, 50 IG steps, controls and faithfulness curves; "
             "needs an accelerator",
    "study_local": "the lesion study on the demo's grader (workdirs/runlocal): 100 test "
                   "images stratified by lesion type, 5 methods, faithfulness curves; about "
                   "12 min on a 2-core CPU (an estimate from the runlocal analysis's rate, "
                   "not measured)",
    "study_idrid": "the lesion study on IDRiD's 81 expert-annotated photographs (part A, "
                   "train+test): give checkpoint (a 256 px grader), data.data_dir and "
                   "data.manual_dir (docs/idrid.md); every method; needs an accelerator",
}


def get_config(arg=None):
  arg = configs.resolve_arg("configs/analyze.py", ARGS, arg)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.checkpoint = ""           # a drig training workdir (or "" to use init + model)
  config.checkpoint_step = "best"  # "best", "latest" or a step number, e.g. "400"
  config.init = ml_collections.ConfigDict()
  config.init.source = "random"    # used only without a checkpoint
  config.init.path = ""
  config.model = model_config.get_model_config(None)

  config.data = ml_collections.ConfigDict()
  config.data.name = ""            # "": the training run's data set
  config.data.builder_config = ""
  config.data.data_dir = ""        # "": the training run's
  config.data.manual_dir = ""
  config.data.split = "test"
  config.data.files = ""           # a glob of photographs; replaces the data set
  config.data.image_size = 0       # 0: the training run's (files mode: 256 without one)

  config.num_images = 0            # 0: the whole split
  # Which images (drig.analysis.selection): "first" (the first num_images), "stratified"
  # ("stratified:grade": equal numbers per true grade; "stratified:lesion": per lesion type,
  # each image counted under the rarest type it carries, or "none"), or a condition:
  # "grade:K", "predicted:K", "correct:K" (true and predicted grade K, as the poster's
  # Fig (a)), "wrong:K", "lesion:NAME". Chosen among the split's first selection_pool
  # images (0: all; rules on predictions run a forward pass over them), in an order drawn
  # from config.seed; num_images (> 0) of them.
  config.selection = "first"
  config.selection_pool = 0
  config.shard_size = 16           # images per shard file (a multiple of the local devices)

  # Quantities of interest: "predicted", "grade:K" or "diff:A:B" (probabilities).
  config.quantities = ("predicted", "grade:0", "grade:4")
  config.steps = 50                # IG path points (>= 1; >= 2 for "trapezoid")
  # > 0: error-controlled IG (steps="auto", drig.attribution.adaptive) until each image's
  # relative completeness gap is within this, at most max_steps evaluations per image and
  # pass; config.steps and config.method are then unused. 0: fixed config.steps (the poster's).
  config.tolerance = 0.0
  config.max_steps = 256
  # What tolerance bounds: "gap" (the completeness gap; points placed where the
  # integrand changes) or "map" (also each map's estimated relative L2 error,
  # drig.attribution.map_control; on the demo's grader 137 to 782 evaluations
  # for 1%, so raise max_steps to 1024).
  config.error_control = "gap"
  config.method = "riemann_right"  # the poster's sum over k = 1..m
  config.chunk_size = 0            # path points per image per call; 0: automatic
  # Parts each model call's batch is split into; 0: automatic (2 on a one-device
  # CPU when a call has one path point per image: about 9% faster; else 1).
  config.batch_groups = 0
  config.storage_dtype = "float16"  # maps in the shards: float16 (scaled) or float32
  # Attribution methods per image and quantity (drig.attribution.METHOD_NAMES, default
  # options but those built on IG, which integrate at config.steps with config.method:
  # drig.analysis.attributor.job_method_options): "integrated_gradients" is the pixel IG above (always computed); each other
  # is stored as map.METHOD.QUANTITY and scored for localisation beside it ("grad_cam" at
  # config.layer).
  config.methods = ("integrated_gradients",)
  # The baseline of every path method: "half_gray" (the poster's), "black", "blurred"
  # ("blurred:SIGMA", SIGMA in pixels) or "uniform_noise" (drawn from config.seed).
  config.baseline = "half_gray"
  # The baselines of "expected_gradients" and "gradient_shap" (loaded only when one of them is
  # in config.methods): `count` images of the analysed data set's split `split`, drawn without
  # replacement from named_key(PRNGKey(seed), "baseline_distribution"), preprocessed like the
  # analysed images; the same on every process. Expected gradients costs count x config.steps
  # gradient evaluations per image and quantity (gradient_shap: 5).
  config.baseline_distribution = ml_collections.ConfigDict()
  config.baseline_distribution.split = "train"  # the training run's data set
  config.baseline_distribution.count = 16
  config.baseline_distribution.seed = 0

  config.layer = "Conv2d_4a_3x3"   # the stem's last convolution, before mixed0
  config.top_k = 10               # neurons of each sign (>= 1; at most the layer has)
  # What a neuron is: "unit" (one channel at one position, the poster's "single
  # neuron", whose active region "is quite small and concentrate"; integrated on a
  # crop around its receptive field, about 2x faster at the stem) or "channel"
  # (activation summed over all positions: a region over the whole image).
  config.neurons = "unit"

  config.figures = ml_collections.ConfigDict()
  config.figures.num_images = 4    # Fig (a) panels, the first images
  config.figures.percentile = 99.0
  config.figures.pair_grades = (0, 4)  # Fig (b)
  # Files per figure: the PNG (always; the report embeds it) and "svg" and/or "pdf" beside it.
  config.figures.formats = ("png",)
  # Signed heat maps' colours: "poster" (green for, red against) or "colorblind" (Okabe-Ito
  # blue for, orange against: told apart in every common colour-vision deficiency).
  config.palette = "poster"
  # Rows of the report's per-image table at most (the rest are counted; all are in the shards).
  config.report_max_rows = 50

  config.localization = ml_collections.ConfigDict()
  config.localization.quantity = "predicted"  # scored when the data set has masks

  # The lesion study (drig.analysis.study; data sets with masks): every map and control
  # scored against each lesion type and their union with every localisation score, bootstrap
  # intervals over images, paired differences against the references, and a "Lesion study"
  # report section; the shards keep every per-image score (study.* keys).
  config.study = ml_collections.ConfigDict()
  config.study.enabled = False
  # Deletion and insertion curves of every method's map, the contrast and a random order
  # (faithfulness_points shares of pixels from 0 to 1; faithfulness_chunk of them per call).
  config.study.faithfulness = False
  config.study.faithfulness_points = 21
  config.study.faithfulness_chunk = 4
  # Every map is compared with these (paired over images); a map "finds lesions" where it
  # beats `control` (the interval of the paired difference above 0).
  config.study.references = ("pixel_ig", "gradient (absolute)", "contrast")
  config.study.control = "contrast"
  config.study.confidence = 0.95
  config.study.num_resamples = 2000
  config.study.num_permutations = 10000
  # Lesion types of the inspected layer's top positive units (drig.analysis.unit_types):
  # each unit's share of active-region mass per lesion type, its enrichment over the type's
  # area, which units are specific to a type, and per-type maps. It needs the k individual
  # regions of the localisation quantity: with config.neurons="unit" on exact receptive-field
  # crops they are computed anyway (no cost); otherwise (channels, or tolerance > 0) each
  # path step pulls back 2 * top_k + 1 cotangents instead of 3.
  config.study.unit_types = False

  config.randomisation = ml_collections.ConfigDict()
  config.randomisation.num_images = 2
  config.randomisation.scope = "all"  # "all" or "head"
  # Adebayo et al.'s cascade: the same images' maps as the layers are re-initialised one by
  # one from the logits down to the stem (drig/analysis/cascade.py). Each stage costs one
  # attribution of num_images images per method.
  config.randomisation.cascade = False
  config.randomisation.cascade_methods = ("integrated_gradients", "saliency")
  config.randomisation.max_stages = 0  # 0: every layer; else that many, evenly spaced
  config.randomisation.calibrate = True  # re-estimate re-initialised BatchNorm statistics
  # Adebayo et al.'s data randomisation: a drig.train workdir of the same architecture
  # trained on shuffled labels (configs/base.py:*_shuffled_labels, its latest checkpoint);
  # its maps of the same num_images images, pixel IG and each single-baseline method of
  # config.methods, are rank-correlated with the trained model's
  # (drig/analysis/data_randomisation.py). "": off.
  config.randomisation.data_checkpoint = ""

  config.counterfactuals = ml_collections.ConfigDict()
  config.counterfactuals.max_images = 4  # of true grade 1 predicted 0
  config.counterfactuals.target_grade = 1
  # Too few among the analysed images: look for more among the split's first
  # search_images (a forward pass each; 0: only the analysed images).
  config.counterfactuals.search_images = 0
  # budget "l2": each c is the change's L2 norm in pixel values (every method scaled to
  # it, then clipped), so IG and gradient compare at equal size; "coefficient": the
  # poster's x + c * direction (IG in pixels is ~1e-5, so c must be ~1e5 or more).
  config.counterfactuals.budget = "l2"
  # Small budgets first: there the first-order rise of F is visible.
  config.counterfactuals.cs = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
  config.counterfactuals.quantity = "probability"  # F: "probability" or "logit" of the grade
  # Also the other direction: true grade 0 predicted 1 or higher, pushed towards grade 0.
  config.counterfactuals.reverse = True

  config.linearity = ml_collections.ConfigDict()
  config.linearity.num_images = 2
  # c = start * factor**k in model space (pixels / 127.5), along dq/dx.
  config.linearity.start = 1.0
  config.linearity.factor = 4.0
  config.linearity.count = 8
  config.linearity.clip = False  # True: clip to the valid range [-1, 1] (the poster's clip)
  # The quantity moved along and attributed: "logit" of the grade (unbounded, as the
  # poster's growing attributions need) or "probability" (bounded by 1).
  config.linearity.quantity = "logit"
  config.linearity.threshold = 0.9  # R^2 below which an active unit is special
  config.linearity.layers = ("fc1", "fc2")

  if arg == "runlocal":
    config.checkpoint = "workdirs/runlocal"
    config.num_images = 12
    config.shard_size = 4
    config.steps = 16
    # Error-controlled to 1% (fixed 16 steps left gaps of up to 30%); at most 128
    # evaluations per image and pass bound the run time, and the report lists the
    # images that stop above 1%.
    config.tolerance = 0.01
    config.max_steps = 128
    config.methods = ("integrated_gradients", "saliency", "input_x_gradient", "smoothgrad")
    config.figures.num_images = 2
    config.randomisation.num_images = 1
    config.counterfactuals.max_images = 2
    config.counterfactuals.search_images = 300
    config.linearity.num_images = 1
    config.linearity.count = 6
  elif arg == "tiny":
    config.num_images = 6
    config.shard_size = 2
    config.steps = 4
    config.methods = ("integrated_gradients", "saliency", "input_x_gradient", "smoothgrad")
    config.top_k = 4
    config.figures.num_images = 2
    config.randomisation.num_images = 1
    config.counterfactuals.max_images = 1
    config.counterfactuals.cs = (1.0, 100.0, 1000.0)
    config.linearity.num_images = 1
    config.linearity.count = 4
    # The study's scores, tables and report section on every tiny run (its curves are
    # compiled programs of their own, so they stay off here).
    config.study.enabled = True
    config.study.unit_types = True  # top_k 4: 9 cotangents per step instead of 3
    config.randomisation.cascade = True
    config.randomisation.max_stages = 3
    config.model = model_config.get_model_config("tiny")
  elif arg in ("study", "study_local", "study_idrid"):
    # One quantity (the predicted grade, the one scored) and no host-0 experiments but
    # Fig (a): the study's cost is the attributions, the scores and the curves.
    config.quantities = ("predicted",)
    config.selection = "stratified:lesion"
    config.study.enabled = True
    config.study.faithfulness = True
    config.study.unit_types = True
    # The sanity check: the cascade (every layer in the full study) on one shard of images.
    config.randomisation.num_images = 4
    config.randomisation.cascade = True
    config.randomisation.cascade_methods = ("integrated_gradients", "saliency",
                                            "input_x_gradient", "smoothgrad")
    config.counterfactuals.max_images = 0
    config.linearity.num_images = 0
    if arg == "study_idrid":
      # Every annotated image: 54 train + 27 test (an empty mask, e.g. a type the experts did
      # not annotate, scores NaN and is left out of that type's n).
      config.data.name = "idrid"
      config.data.builder_config = "segmentation-256"  # segmentation-512 for a 512 px grader
      config.data.split = "train+test"
      config.num_images = 81
      config.selection = "first"
    if arg in ("study", "study_idrid"):
      config.num_images = 512 if arg == "study" else config.num_images
      config.methods = ("integrated_gradients", "saliency", "input_x_gradient", "smoothgrad",
                        "smoothgrad_sq", "vargrad", "expected_gradients", "gradient_shap",
                        "blur_ig", "guided_ig", "grad_cam", "occlusion", "xrai")
    else:
      config.checkpoint = "workdirs/runlocal"
      config.num_images = 100
      config.selection_pool = 1000
      config.shard_size = 4
      config.tolerance = 0.01  # as runlocal: error-controlled IG
      config.max_steps = 128
      config.methods = ("integrated_gradients", "saliency", "input_x_gradient", "smoothgrad",
                        "grad_cam")
      config.figures.num_images = 2
      config.randomisation.max_stages = 8
  return config
