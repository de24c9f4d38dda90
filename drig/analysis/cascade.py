"""Cascading model randomisation (Adebayo et al., 2018): maps as ever more layers turn random.

Stage k re-initialises the top k + 1 layers, from the logits down to the stem
(``drig.analysis.randomisation.cascade_scopes``). Every stage draws its new
weights from the same seed (``randomise_variables`` is a pure function of the
model and the seed), so stage k + 1 differs from stage k in one layer only.
Each stage's maps are compared with the trained model's by the Spearman rank
correlation of their absolute values over the field of view, as Adebayo et al.
do. A method whose maps stay correlated while most of the network is random
shows the input more than the model.

* ``select_stages``: every stage, or an evenly spaced subset with the first and last;
* ``cascade_correlations``: the correlations, [maps, stages, images], for any
  ``maps_fn(variables) -> {name: maps}``;
* ``registry_maps_fn``: such a function from ``drig.attribution.methods``;
* ``cascade_figure``, ``cascade_markdown``: the figure and table of a result;
* ``report_section``: the analysis report's "Cascading randomisation".

Example::

  maps_fn = registry_maps_fn(model, ("integrated_gradients", "saliency"), x,
                             quantity=lambda logits_fn: probability_of_grade(logits_fn, 4))
  result = cascade_correlations(model, variables, maps_fn, seed=1, max_stages=6)
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np

from drig import grading
from drig import parallel
from drig import preprocess
from drig import prng
from drig.analysis import figures as figures_lib
from drig.analysis import localization
from drig.analysis import randomisation
from drig.analysis.model_source import ModelLogits
from drig.analysis.quantity_specs import make_quantity, parse_quantity
from drig.attribution import methods as methods_lib

MapsFn = Callable[[dict], Mapping[str, np.ndarray]]


class CascadeError(ValueError):
  """A cascade that cannot run: no stage, no image, or maps of mismatched shapes."""


class CascadeResult(NamedTuple):
  """The cascade's correlations.

  Attributes:
    layers: the layer re-initialised at each stage, in the order used (top down).
    maps: the maps' names.
    correlations: float64 [maps, stages, images], Spearman rank correlation of
      |map| with the trained model's |map| (nan where a map is constant).
  """
  layers: tuple[str, ...]
  maps: tuple[str, ...]
  correlations: np.ndarray

  def mean(self) -> np.ndarray:
    """[maps, stages]: the mean over images, ignoring undefined correlations."""
    with np.errstate(invalid="ignore"):
      values = np.where(np.isfinite(self.correlations), self.correlations, 0.0)
      counts = np.isfinite(self.correlations).sum(axis=-1)
      return np.where(counts > 0, values.sum(axis=-1) / np.maximum(counts, 1), np.nan)


def select_stages(stages: Sequence, max_stages: int = 0) -> list:
  """Every stage (max_stages <= 0 or >= their number), else max_stages evenly spaced ones.

  The subset always holds the first stage (the logits alone) and the last (the
  whole network), the two ends of the cascade.

  Raises:
    CascadeError: no stage, or max_stages == 1 with several stages (one stage
      cannot hold both ends).
  """
  stages = list(stages)
  if not stages:
    raise CascadeError("the model has no layer to randomise")
  if max_stages <= 0 or max_stages >= len(stages):
    return stages
  if max_stages == 1:
    raise CascadeError("max_stages must be 0 (every stage) or at least 2 (the first and the last)")
  picks = np.unique(np.round(np.linspace(0, len(stages) - 1, max_stages)).astype(int))
  return [stages[i] for i in picks]


def _correlations(trained: np.ndarray, randomised: np.ndarray, field_of_view) -> np.ndarray:
  if trained.shape != randomised.shape:
    raise CascadeError(f"maps of shape {randomised.shape} after randomisation, "
                       f"{trained.shape} before")
  return np.array([localization.rank_correlation(
      localization.saliency(trained[i], "absolute"),
      localization.saliency(randomised[i], "absolute"), field_of_view)
                   for i in range(trained.shape[0])], np.float64)


def cascade_correlations(model, variables, maps_fn: MapsFn, *, seed: int,
                         max_stages: int = 0, field_of_view=None,
                         calibration_images=None, input_shape=None,
                         trained_maps: Optional[Mapping[str, np.ndarray]] = None,
                         progress: Optional[Callable[[int, int, str], None]] = None
                         ) -> CascadeResult:
  """The trained model's maps against each cascade stage's.

  Args:
    model: a drig classifier (``randomisation.cascade_scopes`` reads its layers).
    variables: its trained variables.
    maps_fn: variables -> {name: attributions [N, H, W(, C)]}, the same images
      and quantity for every set of variables (e.g. ``registry_maps_fn``).
    seed: the re-initialised weights' seed (the same at every stage).
    max_stages: 0 for every layer, else that many evenly spaced stages.
    field_of_view: bool [H, W]: the pixels ranked (None: all).
    calibration_images: float32 model inputs [M, H, W, 3]: re-estimate the batch
      statistics of re-initialised BatchNorm layers on them (without, they are
      the initial mean 0 and variance 1, and a randomised Inception block's
      activations drift in scale).
    input_shape: model.init's dummy input shape (``randomise_variables``).
    trained_maps: the trained model's maps, if already computed.
    progress: called (stage index, number of stages, layer) before each stage.

  Returns:
    A CascadeResult.

  Raises:
    CascadeError: no stage, or maps whose shapes differ between models.
    RandomisationError: variables that do not match the model.
  """
  trained = dict(trained_maps) if trained_maps is not None else dict(maps_fn(variables))
  if not trained:
    raise CascadeError("maps_fn returned no map")
  names = tuple(trained)
  trained = {name: np.asarray(trained[name], np.float32) for name in names}
  stages = select_stages(randomisation.cascade_scopes(model, variables), max_stages)
  table = np.full((len(names), len(stages), next(iter(trained.values())).shape[0]), np.nan)
  for s, (layer, scope) in enumerate(stages):
    if progress is not None:
      progress(s, len(stages), layer)
    randomised = randomisation.randomise_variables(
        model, variables, seed, scope=scope, input_shape=input_shape,
        calibration_images=calibration_images)
    maps = maps_fn(randomised)
    for m, name in enumerate(names):
      if name not in maps:
        raise CascadeError(f"maps_fn returned no {name!r} map at stage {layer!r}")
      table[m, s] = _correlations(trained[name], np.asarray(maps[name], np.float32),
                                  field_of_view)
  return CascadeResult(tuple(layer for layer, _ in stages), names, table)


def registry_maps_fn(model, methods: Sequence[str], x, *, quantity: Callable,
                     baseline="half_gray", key=None, options=None) -> MapsFn:
  """maps_fn for ``cascade_correlations`` from drig.attribution.methods.

  Args:
    model: the Flax model.
    methods: names of ``methods_lib.METHODS`` (not the distribution methods).
    x: the model inputs [N, H, W, 3].
    quantity: logits_fn -> f(x) [N], e.g. ``lambda lf: probability_of_grade(lf, 4)``;
      the logits function is a pytree (``ModelLogits``), so each method's program
      compiles once for all stages.
    baseline, key: as ``methods_lib.attribute``'s; key defaults to PRNGKey(0).
    options: {method: options} for ``methods_lib.attribute``.

  Raises:
    CascadeError: an unknown method or one that needs a baseline distribution.
  """
  for name in methods:
    if name not in methods_lib.METHODS:
      raise CascadeError(f"unknown method {name!r}; known: {sorted(methods_lib.METHODS)}")
    if methods_lib.METHODS[name].distribution:
      raise CascadeError(f"method {name!r} needs a baseline distribution; the cascade "
                         "compares single-baseline methods")
  key = jax.random.PRNGKey(0) if key is None else key
  options = options or {}

  def maps_fn(variables):
    f = quantity(ModelLogits(model, variables))
    return {name: np.asarray(methods_lib.attribute(
        name, quantity=f, x=x, baseline=baseline, key=prng.named_key(key, name),
        options=options.get(name))) for name in methods}
  return maps_fn


def cascade_markdown(result: CascadeResult) -> str:
  """A table: stage, layer re-initialised last, each map's mean correlation over images."""
  means = result.mean()
  lines = ["| stage | re-initialised down to | " + " | ".join(result.maps) + " |",
           "|---|---|" + "---|" * len(result.maps)]
  for s, layer in enumerate(result.layers):
    cells = ["n/a" if not np.isfinite(means[m, s]) else f"{means[m, s]:.3f}"
             for m in range(len(result.maps))]
    lines.append(f"| {s + 1} | {layer} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def cascade_figure(result: CascadeResult, *, title: str = "",
                   dpi: int = figures_lib.DEFAULT_DPI) -> Figure:
  """Each map's mean rank correlation per stage (line), each image's (dots), top down."""
  stages = np.arange(len(result.layers))
  fig = figures_lib.new_figure(max(6.0, 0.45 * len(stages) + 2.5), 4.2, dpi=dpi)
  ax = fig.add_subplot(1, 1, 1)
  means = result.mean()
  for m, name in enumerate(result.maps):
    line, = ax.plot(stages, means[m], marker="o", label=name)
    for s in stages:
      values = result.correlations[m, s]
      values = values[np.isfinite(values)]
      ax.scatter(np.full(values.shape, s), values, s=8, color=line.get_color(), alpha=0.35)
  ax.axhline(0.0, color="0.5", lw=0.8)
  ax.set_xticks(stages)
  ax.set_xticklabels(result.layers, rotation=60, ha="right", fontsize=8)
  ax.set_ylim(-1.0, 1.0)
  ax.set_xlabel("re-initialised from the logits down to")
  ax.set_ylabel("Spearman rank correlation of |map|")
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  return fig


def report_section(config, data, images, loaded, report, figures: list, folder: str,
                   metrics: dict) -> None:
  """The report's "Cascading randomisation" (``config.randomisation.cascade``).

  The first ``config.randomisation.num_images`` analysed images (padded to a
  shard, so each method compiles once), the first quantity with the trained
  model's predicted grades, each method of ``config.randomisation.cascade_methods``.
  """
  settings = config.randomisation
  count = min(settings.num_images, len(data["index"]), config.shard_size)
  if not settings.cascade:
    return
  report.heading("Cascading randomisation", about="Adebayo et al.'s cascade: the layers are "
                 "re-initialised one at a time from the logits down to the stem; maps that "
                 "keep their rank correlation with the trained model's while most of the "
                 "network is random show the input rather than the model.")
  if count == 0:
    report.paragraph("Not run (config.randomisation.num_images = 0, or no image).")
    return
  spec = parse_quantity(config.quantities[0])
  pixels = np.stack([images.read(int(data["index"][i])).image for i in range(count)])
  pad = config.shard_size - count
  batch = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
  predictions = np.concatenate([data["prediction"][:count],
                                np.repeat(data["prediction"][count - 1:count], pad)])
  mesh = parallel.local_mesh()
  x = parallel.shard_batch(grading.to_model_input(batch), mesh)
  grades = parallel.replicate(jnp.asarray(predictions, jnp.int32), mesh)
  maps_fn = registry_maps_fn(
      loaded.model, tuple(settings.cascade_methods), x,
      quantity=lambda logits_fn: make_quantity(spec, logits_fn, grades),
      baseline=config.baseline,
      key=prng.named_key(jax.random.PRNGKey(config.seed), "cascade"),
      # IG at the job's fixed rule: a rank correlation needs no 1% completeness.
      options={"integrated_gradients": {"steps": config.steps, "method": config.method}})

  def on_replicas(fn):
    return lambda variables: {name: value[:count] for name, value in
                              fn(parallel.replicate(variables, mesh)).items()}

  result = cascade_correlations(
      loaded.model, loaded.variables, on_replicas(maps_fn), seed=config.seed + 1,
      max_stages=settings.max_stages, field_of_view=preprocess.field_of_view(x.shape[1]),
      calibration_images=x if settings.calibrate else None,
      input_shape=(1,) + tuple(x.shape[1:]))
  path = os.path.join(folder, "cascading_randomisation.png")
  figures_lib.save_figure(cascade_figure(result, title=f"{spec.label}, {count} image(s)"),
                          path, formats=config.figures.formats)
  figures.append(path)
  report.paragraph(
      f"Layers re-initialised, in this order (each stage keeps the previous ones random): "
      f"{', '.join(result.layers)}. Spearman rank correlation of |map| ({spec.label}) with "
      f"the trained model's, mean over {count} image(s)"
      + (", batch statistics re-estimated on those images" if settings.calibrate else "")
      + ". Near 0 at the last stage: the map depends on the weights; near 1: it does not.")
  report.markdown_block(cascade_markdown(result))
  report.figure(path, "Cascading randomisation: mean (line) and per-image (dots) rank "
                "correlation with the trained model's maps.",
                alternates=figures_lib.vector_paths(path, config.figures.formats))
  metrics["randomisation_cascade"] = {
      "layers": list(result.layers), "images": count,
      "maps": {name: {"mean": result.mean()[m].tolist(),
                      "per_image": result.correlations[m].tolist()}
               for m, name in enumerate(result.maps)}}
