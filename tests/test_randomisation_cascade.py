"""The cascading randomisation's stages: from the logits down to the stem, cumulative."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import base as base_config
from drig import grading
from drig import preprocess
from drig.analysis import cascade
from drig.analysis import randomisation
from drig.attribution import quantities
from drig.data import synthetic_fundus
from drig.models import classifier
from drig.models import initialization


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


def test_select_stages_keeps_both_ends_and_rejects_one_stage():
  stages = list(range(20))
  assert cascade.select_stages(stages, 0) == stages
  assert cascade.select_stages(stages, 25) == stages
  picked = cascade.select_stages(stages, 5)
  assert picked[0] == 0 and picked[-1] == 19 and len(picked) == 5
  assert picked == sorted(picked)
  with pytest.raises(cascade.CascadeError, match="at least 2"):
    cascade.select_stages(stages, 1)
  with pytest.raises(cascade.CascadeError, match="no layer"):
    cascade.select_stages([], 0)


@pytest.fixture(scope="module")
def tiny_cascade():
  """The tiny model's cascade (4 stages) on 3 synthetic grade-3 fundus images."""
  config = base_config.get_config("tiny")
  model = classifier.build_model(config.model)
  size = config.data.image_size
  images = np.stack([np.asarray(synthetic_fundus.render_fundus(seed, 3, size=size)[0])
                     for seed in range(3)])
  x = grading.to_model_input(images)
  shape = (1,) + x.shape[1:]
  # "Trained" weights: another draw, so every stage's weights differ from the start's.
  variables = initialization.random_variables(model, 0, input_shape=shape)
  maps_fn = cascade.registry_maps_fn(
      model, ("integrated_gradients", "saliency"), x,
      quantity=lambda logits_fn: quantities.probability_of_grade(logits_fn, 2),
      options={"integrated_gradients": {"steps": 8}})
  seen = []
  result = cascade.cascade_correlations(
      model, variables, maps_fn, seed=1, max_stages=4,
      field_of_view=preprocess.field_of_view(size), calibration_images=x, input_shape=shape,
      progress=lambda s, n, layer: seen.append((s, n, layer)))
  return model, variables, result, seen


def test_cascade_reports_its_layer_order_and_decorrelates_when_all_is_random(tiny_cascade):
  model, variables, result, seen = tiny_cascade
  every = [name for name, _ in randomisation.cascade_scopes(model, variables)]
  # Top down, both ends kept, each stage deeper than the one before.
  assert result.layers[0] == "logits" and result.layers[-1] == "base/Conv2d_1a_3x3"
  positions = [every.index(layer) for layer in result.layers]
  assert positions == sorted(set(positions))
  assert [layer for _, _, layer in seen] == list(result.layers)
  assert result.maps == ("integrated_gradients", "saliency")
  assert result.correlations.shape == (2, 4, 3)
  means = result.mean()
  # Only the logits random: the maps still resemble the trained model's; the whole
  # network random: the rank correlation is near 0 (measured 0.06-0.28 per image).
  assert (means[:, 0] > 0.6).all(), means
  assert (np.abs(means[:, -1]) < 0.3).all(), means
  assert (means[:, -1] < means[:, 0] - 0.4).all(), means


def test_cascade_table_and_figure_follow_the_result(tiny_cascade):
  _, _, result, _ = tiny_cascade
  table = cascade.cascade_markdown(result).splitlines()
  assert len(table) == 2 + len(result.layers)
  assert "integrated_gradients" in table[0] and result.layers[-1] in table[-1]
  fig = cascade.cascade_figure(result, title="tiny")
  labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
  assert labels == list(result.layers)
  assert len(fig.axes[0].get_lines()) >= len(result.maps)


def test_registry_maps_fn_rejects_unknown_and_distribution_methods():
  config = base_config.get_config("tiny")
  model = classifier.build_model(config.model)
  x = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(cascade.CascadeError, match="unknown method 'ig'"):
    cascade.registry_maps_fn(model, ("ig",), x, quantity=lambda f: f)
  with pytest.raises(cascade.CascadeError, match="baseline distribution"):
    cascade.registry_maps_fn(model, ("expected_gradients",), x, quantity=lambda f: f)
