"""The cascading randomisation's stages: from the logits down to the stem, cumulative."""

import jax
import numpy as np
from flax import traverse_util

from configs import base as base_config
from drig.analysis import randomisation
from drig.models import classifier


def test_stages_run_from_the_logits_to_the_stem_and_accumulate():
  config = base_config.get_config("tiny")
  model = classifier.build_model(config.model)
  size = config.data.image_size
  variables = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, size, size, 3)))
  stages = randomisation.cascade_scopes(model, variables)
  names = [name for name, _ in stages]
  assert names[:4] == ["logits", "fc2", "fc1", "base/Mixed_7c"]
  assert names[-1] == "base/Conv2d_1a_3x3"
  assert names.index("base/Mixed_5b") > names.index("base/Mixed_6a")
  # Every parameter is re-initialised by the last stage, and each stage adds one layer.
  paths = ["/".join(p) for p in traverse_util.flatten_dict(dict(variables["params"]))]
  last_scope = stages[-1][1]
  assert all(any(p.startswith(s + "/") for s in last_scope) for p in paths)
  for k, (name, scope) in enumerate(stages):
    assert len(scope) == k + 1 and scope[-1] == name
    assert any(p.startswith(name + "/") for p in paths), name
