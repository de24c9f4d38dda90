"""drig.attribution: integrated gradients for pixels, layers and neurons.

Pure functions, vectorised across images, chunked over interpolation steps,
compiled once per shape. Importing this package has no side effects.

Main entry points:
  integrated_gradients(f, x, baseline, *, steps, method, chunk_size) -> (attr, gap)
  half_gray_baseline(x, space="model")
  probability_of_grade / logit_of_grade / grade_difference / weighted_grades
  layer_integrated_gradients (the poster's, activation path) and
    layer_conductance (input path, Captum's LayerConductance)
  active_regions, unit_active_regions, select_top_k, resultant_active_region,
  lesion_detection
  BatchGroups (a model's batch in independent parts: faster on multi-core CPUs
    for many images per call); several devices: drig.parallel.sharded_call
  drig.attribution.heatmap (green/red rendering)

Every function that takes images raises AttributionArgumentError for an empty
batch and for NaN or infinite values in concrete images or baselines, naming the
images. Inside a jax.jit trace the values are unknown, so the caller checks them.
"""

from drig.attribution import heatmap
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
from drig.attribution.integration import AttributionArgumentError
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
