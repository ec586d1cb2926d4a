"""The projectors from SiT hidden tokens to an encoder's feature width: REPA's MLP per token, Linear(D, 2048) - SiLU -
Linear(2048, 2048) - SiLU - Linear(2048, z_dim); iREPA's single k x k convolution over the token grid; and SRA's
head from a block's tokens to a later block's, Linear(D, 2D) - SiLU - Linear(2D, D) (vvvvvjdy/SRA
SiT-SRA/models/sit.py:18-27)."""
import jax
import jax.numpy as jnp
from flax import nnx

from repa_jax.models.layers import linear, xavier, zeros


class Projector(nnx.Module):
  """[B, N, D] -> [B, N, z_dim]; Xavier-uniform weights, zero biases."""

  def __init__(self, width: int, z_dim: int, rngs: nnx.Rngs, *, hidden: int = 2048, dtype=jnp.float32):
    self.fc1 = linear(width, hidden, rngs, dtype=dtype)
    self.fc2 = linear(hidden, hidden, rngs, dtype=dtype)
    self.fc3 = linear(hidden, z_dim, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc3(nnx.silu(self.fc2(nnx.silu(self.fc1(x)))))


class ConvProjector(nnx.Module):
  """[B, N, D] -> [B, N, z_dim]: the tokens as their [h, w] grid, one k x k convolution (stride 1, 'SAME' padding, as
  iREPA's Conv2d(padding=k // 2) for odd k), back to tokens. Xavier-uniform weights, zero bias."""

  def __init__(self, width: int, z_dim: int, grid: tuple[int, int], rngs: nnx.Rngs, *, kernel: int = 1,
               dtype=jnp.float32):
    self.grid = grid
    self.conv = nnx.Conv(width, z_dim, (kernel, kernel), padding="SAME", dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=xavier, bias_init=zeros, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    return self.conv(x.reshape(b, *self.grid, d)).reshape(b, n, -1)


class SelfAlignmentHead(nnx.Module):
  """SRA's head, per token: [B, N, D] -> [B, N, D]; Xavier-uniform weights, zero biases (as SRA initialises it)."""

  def __init__(self, width: int, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.fc1 = linear(width, 2 * width, rngs, dtype=dtype)
    self.fc2 = linear(2 * width, width, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.silu(self.fc1(x)))
