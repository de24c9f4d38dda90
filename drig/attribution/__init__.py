"""drig.attribution: integrated gradients for pixels, layers and neurons.

Pure functions, vectorised across images, chunked over interpolation steps,
compiled once per shape. Importing this package has no side effects.

Main entry points:
  integrated_gradients(f, x, baseline, *, steps, method, chunk_size) -> (attr, gap)
    steps="auto": error-controlled to `tolerance` -> AdaptiveAttribution;
    control="gap" (the completeness gap) or "map" (each map's error as well)
  half_gray_baseline(x, space="model")
  probability_of_grade / logit_of_grade / grade_difference / weighted_grades
  layer_integrated_gradients (the poster's, activation path) and
    layer_conductance (input path, Captum's LayerConductance)
  active_regions, unit_active_regions, select_top_k, resultant_active_region,
  lesion_detection
  BatchGroups (a model's batch in independent parts: faster on multi-core CPUs
    for many images per call); several devices: drig.parallel.sharded_call
  resolve_baseline (named baselines: half_gray, black, blurred, uniform_noise,
    and BaselineDistribution for expected gradients)
  gradient, gradient_x_input, noise_tunnel / smoothgrad (SmoothGrad,
    SmoothGrad-squared, VarGrad), expected_gradients, gradient_shap
  attribute(name, ...): every method by name (drig.attribution.methods)
  blur_integrated_gradients, guided_integrated_gradients (drig.attribution.paths),
    grad_cam / model_grad_cam (gradcam); occlusion.occlusion and xrai.xrai (the
    modules are exported, so their names stay modules)
  drig.attribution.heatmap (green/red rendering)

Every function that takes images raises AttributionArgumentError for an empty
batch and for NaN or infinite values in concrete images or baselines, naming the
images. Inside a jax.jit trace the values are unknown, so the caller checks them.
"""

from drig.attribution import heatmap
from drig.attribution import methods
from drig.attribution.baselines import BASELINE_NAMES
from drig.attribution.baselines import BaselineDistribution
from drig.attribution.baselines import Blurred
from drig.attribution.baselines import gaussian_blur
from drig.attribution.baselines import resolve_baseline
from drig.attribution.gradients import expected_gradients
from drig.attribution.gradients import gradient
from drig.attribution.gradients import gradient_shap
from drig.attribution.gradients import gradient_x_input
from drig.attribution.gradients import NOISE_TUNNEL_TYPES
from drig.attribution.gradients import noise_tunnel
from drig.attribution.gradients import smoothgrad
from drig.attribution.methods import attribute
from drig.attribution.methods import METHOD_NAMES
from drig.attribution.regions import active_regions
from drig.attribution.regions import ActiveRegions
from drig.attribution.regions import channel_cotangents
from drig.attribution.regions import combine_cotangents
from drig.attribution.regions import lesion_detection
from drig.attribution.regions import LesionAnalysis
from drig.attribution.regions import resultant_active_region
from drig.attribution.regions import select_top_k
from drig.attribution.regions import TopK
from drig.attribution.regions import unit_cotangents
from drig.attribution.regions import unit_active_regions
from drig.attribution.adaptive import AdaptiveAttribution
from drig.attribution.arguments import AttributionArgumentError
from drig.attribution.integration import BatchGroups
from drig.attribution.integration import HALF_GRAY_MODEL
from drig.attribution.integration import HALF_GRAY_PIXEL
from drig.attribution.integration import half_gray_baseline
from drig.attribution.integration import integrated_gradients
from drig.attribution.integration import METHODS
from drig.attribution.integration import quadrature
from drig.attribution.layer import layer_activations
from drig.attribution.layer import layer_conductance
from drig.attribution.layer import layer_integrated_gradients
from drig.attribution.layer import LayerAttribution
from drig.attribution.layer import model_layer_integrated_gradients
from drig.attribution.layer import per_channel
from drig.attribution.layer import split_model
from drig.attribution.layer import UnknownLayerError
from drig.attribution.quantities import grade_difference
from drig.attribution.quantities import GradeQuantity
from drig.attribution.quantities import logit_of_grade
from drig.attribution.quantities import probability_of_grade
from drig.attribution.quantities import weighted_grades
from drig.attribution.gradcam import grad_cam
from drig.attribution.gradcam import GradCam
from drig.attribution.gradcam import model_grad_cam
from drig.attribution import occlusion
from drig.attribution.paths import blur_integrated_gradients
from drig.attribution.paths import guided_integrated_gradients
from drig.attribution import xrai
