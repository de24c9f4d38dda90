"""The benchmarks' torch copy of a drig grader computes drig's function.

bench_attribution.py times Captum on this copy of a trained drig run; the
comparison is fair only if both integrate the same function, checked here on
random weights: logits, probabilities and the input gradient of p(grade 4).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import torch_twin  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from drig.models import classifier  # noqa: E402  pylint: disable=wrong-import-position
import helpers  # noqa: E402  pylint: disable=wrong-import-position

SIZE = 80


@pytest.mark.parametrize("convention", ["keras", "torchvision"])
def test_copy_matches_logits_and_input_gradients(convention):
  model = classifier.DRClassifier(width_multiplier=0.125, fc_widths=(32, 16),
                                  convention=convention)
  variables = helpers.random_variables(model, SIZE, seed=1)
  twin = torch_twin.from_drig(model, variables)
  x = np.random.default_rng(2).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)

  logits = np.asarray(model.apply(variables, x))
  inputs = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  torch_logits = twin(inputs)
  np.testing.assert_allclose(torch_logits.detach().numpy(), logits, rtol=1e-4, atol=1e-4)
  # The logits must differ between images and grades, or the check above says little.
  assert np.ptp(logits) > 0.1

  torch.softmax(torch_logits, dim=-1)[:, 4].sum().backward()
  gradient = jax.grad(lambda v: jnp.sum(jax.nn.softmax(model.apply(variables, v))[:, 4]))(x)
  torch_gradient = inputs.grad.numpy().transpose(0, 2, 3, 1)
  scale = np.abs(np.asarray(gradient)).max()
  assert scale > 0
  np.testing.assert_allclose(torch_gradient / scale, np.asarray(gradient) / scale, atol=1e-4)


def test_copy_refuses_other_heads():
  model = classifier.DRClassifier(width_multiplier=0.125, fc_widths=(8,), head="ordinal")
  with pytest.raises(ValueError, match="softmax head only"):
    torch_twin.from_drig(model, {"params": {}, "batch_stats": {}})


def test_copy_refuses_parameters_of_another_width():
  narrow = classifier.DRClassifier(width_multiplier=0.125, fc_widths=(8,))
  variables = helpers.random_variables(narrow, SIZE, seed=0)
  wide = classifier.DRClassifier(width_multiplier=0.25, fc_widths=(8,))
  with pytest.raises(ValueError, match="does not fit"):
    torch_twin.from_drig(wide, variables)
