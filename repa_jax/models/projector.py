"""The REPA projector: per token Linear(D, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, z_dim)."""
import jax
import jax.numpy as jnp
from flax import nnx

from repa_jax.models.layers import linear


class Projector(nnx.Module):
  """[B, N, D] -> [B, N, z_dim]; Xavier-uniform weights, zero biases."""

  def __init__(self, width: int, z_dim: int, rngs: nnx.Rngs, *, hidden: int = 2048, dtype=jnp.float32):
    self.fc1 = linear(width, hidden, rngs, dtype=dtype)
    self.fc2 = linear(hidden, hidden, rngs, dtype=dtype)
    self.fc3 = linear(hidden, z_dim, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc3(nnx.silu(self.fc2(nnx.silu(self.fc1(x)))))
