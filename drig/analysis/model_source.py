"""The model the analysis attributes: a training run's checkpoint, or initial weights.

``load_model(config)`` reads ``config.checkpoint`` (a drig training workdir,
restored at ``config.checkpoint_step`` by ``drig.models.runs``) or, without
one, builds ``config.model`` with the weights ``config.init`` names, and says
where the weights came from. ``ModelLogits`` is the model as a function of its
input that the attribution engine can trace.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax

from drig.analysis.errors import AnalysisError
from drig.models import classifier
from drig.models import initialization
from drig.models import runs
from drig.models.weight_files import WeightImportError

# The input size without a training run to take it from (config.data.image_size 0).
DEFAULT_IMAGE_SIZE = 256


@jax.tree_util.register_pytree_node_class
class ModelLogits:
  """x -> model.apply(variables, x) logits, inference mode; a pytree (weights traced)."""

  def __init__(self, model, variables):
    self.model, self.variables = model, variables

  def __call__(self, x):
    return self.model.apply(self.variables, x, train=False)

  def tree_flatten(self):
    return (self.variables,), self.model

  @classmethod
  def tree_unflatten(cls, model, children):
    return cls(model, children[0])


@dataclasses.dataclass
class LoadedModel:
  """A model with its weights, and where they came from."""
  model: Any
  variables: dict
  model_config: Any
  training_config: Optional[dict]  # the training run's config.json, if any
  description: str                 # where the weights came from
  source: dict                     # stored with the config (what was resolved)


def load_model(config) -> LoadedModel:
  """The model and variables the config names (see configs/analyze.py).

  Raises:
    AnalysisError: naming the config field whose workdir, step or weight file
      cannot be used.
  """
  if config.checkpoint:
    try:
      run = runs.load_run(config.checkpoint, config.checkpoint_step)
    except runs.StepNotKeptError as e:
      raise AnalysisError(f"config.checkpoint_step={config.checkpoint_step!r}: {e}") from e
    except runs.RunError as e:
      raise AnalysisError(f"config.checkpoint={config.checkpoint!r}: {e}") from e
    workdir = os.path.abspath(config.checkpoint)
    description = f"{workdir}, step {run.step} ({run.why})"
    return LoadedModel(run.model, run.variables, run.model_config, run.training_config,
                       description, {"checkpoint": workdir, "step": run.step})
  model_config = config.model
  model = classifier.build_model(model_config)
  try:
    initialization.check_weight_source(config.init.source, config.init.path)
    # drig.train's keys for the same seed: the weights a run with that seed starts from.
    variables, report = initialization.initial_variables(
        model, model_config, rngs=initialization.init_rngs(jax.random.key(int(config.seed))),
        image_size=config.data.image_size or DEFAULT_IMAGE_SIZE,
        source=config.init.source, path=config.init.path)
  except (FileNotFoundError, WeightImportError) as e:
    raise AnalysisError(f"config.init ({config.init.source}, {config.init.path!r}): {e}") from e
  return LoadedModel(model, variables, model_config, None, f"config.init: {report}",
                     {"init": config.init.source, "path": config.init.path})
