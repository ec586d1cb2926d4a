"""The projectors: iREPA's convolution over the token grid vs a float64 NumPy convolution (values and gradients),
and the iREPA preset's train step, sharded = unsharded, on the tiny config."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from repa_jax.models.projector import ConvProjector
from tests.test_train_step import run


def np_conv_tokens(x, kernel, bias, grid):
  """[B, N, D] tokens of an h x w grid, a k x k 'SAME' convolution with zero padding by explicit loops -> [B, N, Z]."""
  b, _, d = x.shape
  (h, w), k, z = grid, kernel.shape[0], kernel.shape[-1]
  image, pad = x.reshape(b, h, w, d).astype(np.float64), k // 2
  out = np.zeros((b, h, w, z))
  for i in range(h):
    for j in range(w):
      for di in range(k):
        for dj in range(k):
          ii, jj = i + di - pad, j + dj - pad
          if 0 <= ii < h and 0 <= jj < w:
            out[:, i, j] += image[:, ii, jj] @ kernel[di, dj].astype(np.float64)
  return (out + bias).reshape(b, h * w, z)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_projector_vs_numpy(kernel):
  grid, width, z_dim = (3, 4), 5, 6
  projector = ConvProjector(width, z_dim, grid, nnx.Rngs(0), kernel=kernel)
  projector.conv.bias[...] = jnp.arange(z_dim, dtype=jnp.float32) / 10
  x = np.random.default_rng(0).normal(size=(2, 12, width)).astype(np.float32)
  weights, bias = np.asarray(projector.conv.kernel[...]), np.asarray(projector.conv.bias[...])
  np.testing.assert_allclose(projector(jnp.asarray(x)), np_conv_tokens(x, weights, bias, grid), rtol=1e-5, atol=1e-5)

  # Gradient of sum(out * r) with respect to the input, against central differences of the NumPy convolution.
  r = np.random.default_rng(1).normal(size=(2, 12, z_dim))
  grad = np.asarray(jax.grad(lambda v: jnp.sum(projector(v) * r))(jnp.asarray(x)))
  numeric = np.zeros(x.shape)
  for index in np.ndindex(x.shape):
    step = np.zeros(x.shape)
    step[index] = 1e-4
    numeric[index] = np.sum((np_conv_tokens(x + step, weights, bias, grid) -
                             np_conv_tokens(x - step, weights, bias, grid)) * r) / 2e-4
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-4)


def test_irepa_step_sharded_equals_unsharded_and_trains_the_conv_projector():
  config = tiny.get_config("reg=irepa")
  config.model.width = 64
  single, metrics_1 = run(config, (1, 1), 2)
  sharded, metrics_8 = run(config, (2, 4), 2)
  # Float32 round-off of another reduction order; Adam's m / sqrt(v) magnifies it where a gradient is near 0 (one
  # entry in ~1e5 moves by ~2e-6 at lr 1e-3), hence atol 1e-5 on the parameters.
  chex.assert_trees_all_close(sharded["params"], single["params"], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(metrics_8, metrics_1, rtol=1e-5, atol=1e-6)
  conv = single["params"]["projectors"]["toy_encoder"]["conv"]["kernel"]
  assert conv.shape == (3, 3, 64, 16) and np.isfinite(metrics_1["align"])
