"""drig's slice-based max pool against jax's reduce_window max (flax.linen.max_pool).

The reference is flax.linen.max_pool, i.e. lax.reduce_window(max), whose
gradient is XLA's select_and_scatter; the forward pass, the reverse-mode
gradient (ties included: both pick a window's first maximum in row-major
order), the forward-mode derivative and torch's max_pool2d gradient must agree.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from drig.models import inception_v3
from drig.models.inception_v3 import max_pool_valid

SHAPES = [(2, 9, 11, 3), (1, 10, 10, 5), (3, 17, 8, 4)]
SETTINGS = [((3, 3), (2, 2)), ((2, 2), (2, 2)), ((3, 2), (1, 2))]


def _reference(x, window, strides):
  return nn.max_pool(x, window, strides=strides, padding="VALID")


def _inputs(shape, seed, ties=False):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  if ties:  # few distinct values: most windows hold their maximum more than once
    x = np.round(x)
  return jnp.asarray(x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window,strides", SETTINGS)
def test_forward_equals_reduce_window(shape, window, strides):
  x = _inputs(shape, 0)
  np.testing.assert_array_equal(max_pool_valid(x, window, strides),
                                _reference(x, window, strides))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window,strides", SETTINGS)
def test_gradient_equals_reduce_window(shape, window, strides, ties):
  x = _inputs(shape, 1, ties)
  out_shape = _reference(x, window, strides).shape
  cotangent = _inputs(out_shape, 2)
  if ties:  # the test is meaningful only if there are ties
    assert len(np.unique(np.asarray(x))) < x.size // 4
  expected = jax.vjp(lambda v: _reference(v, window, strides), x)[1](cotangent)[0]
  got = jax.vjp(lambda v: max_pool_valid(v, window, strides), x)[1](cotangent)[0]
  np.testing.assert_array_equal(got, expected)
  # Under jit too (XLA may fuse the masks and pads differently).
  got_jit = jax.jit(lambda v, c: jax.vjp(lambda u: max_pool_valid(u, window, strides), v)[1](c)[0])
  np.testing.assert_array_equal(got_jit(x, cotangent), expected)


def test_overlapping_windows_add_up():
  # A single large value is the maximum of all four overlapping 3x3/2 windows
  # of a 5x5 input: its gradient is the sum of the four cotangents.
  x = jnp.zeros((1, 5, 5, 1)).at[0, 2, 2, 0].set(1.0)
  cotangent = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
  grad = jax.vjp(lambda v: max_pool_valid(v, (3, 3), (2, 2)), x)[1](cotangent)[0]
  assert float(grad[0, 2, 2, 0]) == 10.0
  assert float(jnp.abs(grad).sum()) == 10.0


def test_forward_mode_equals_reduce_window():
  x, tangent = _inputs((2, 11, 9, 3), 3), _inputs((2, 11, 9, 3), 4)
  _, expected = jax.jvp(lambda v: _reference(v, (3, 3), (2, 2)), (x,), (tangent,))
  _, got = jax.jvp(lambda v: max_pool_valid(v, (3, 3), (2, 2)), (x,), (tangent,))
  np.testing.assert_array_equal(got, expected)


def test_gradient_equals_torch_max_pool2d():
  x = _inputs((2, 15, 13, 4), 5)
  cotangent = _inputs((2, 7, 6, 4), 6)
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  out = torch.nn.functional.max_pool2d(xt, 3, stride=2)
  out.backward(torch.from_numpy(np.asarray(cotangent).transpose(0, 3, 1, 2).copy()))
  got = jax.vjp(lambda v: max_pool_valid(v, (3, 3), (2, 2)), x)[1](cotangent)[0]
  np.testing.assert_array_equal(np.asarray(got), xt.grad.numpy().transpose(0, 2, 3, 1))


def test_bfloat16_and_vmap():
  x = _inputs((3, 2, 9, 9, 2), 7).astype(jnp.bfloat16)
  got = jax.vmap(lambda v: max_pool_valid(v, (3, 3), (2, 2)))(x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got, jax.vmap(lambda v: _reference(v, (3, 3), (2, 2)))(x))


def test_inception_uses_the_slice_pool():
  # The model's gradient contains no select_and_scatter (the slow op).
  model = inception_v3.InceptionV3(width_multiplier=0.125)
  x = jnp.zeros((1, 75, 75, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), variables)
  hlo = jax.jit(jax.grad(lambda v: model.apply(variables, v).sum())).lower(x).as_text()
  assert "select_and_scatter" not in hlo
  assert "reduce_window" in hlo  # the average pools still are reduce_window
