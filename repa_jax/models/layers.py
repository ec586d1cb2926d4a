"""Building blocks shared by SiT: embeddings, float32 layer norm, attention and MLP."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

xavier = nnx.initializers.xavier_uniform()
normal_002 = nnx.initializers.normal(0.02)
zeros = nnx.initializers.zeros_init()


def linear(din: int, dout: int, rngs: nnx.Rngs, *, dtype=jnp.float32, init=xavier) -> nnx.Linear:
  """A float32-parameter linear layer computing in `dtype`, with zero bias."""
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, bias_init=zeros, rngs=rngs)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters over the last axis, computed in float32, returned in x.dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def patchify(x: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H / p) * (W / p), p * p * C], patches in raster order (a stride-p conv's receptive fields)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: jax.Array, patch: int, h: int, w: int) -> jax.Array:
  """The inverse of `patchify`: [B, (H / p) * (W / p), p * p * C] -> [B, H, W, C]."""
  b = tokens.shape[0]
  return tokens.reshape(b, h // patch, w // patch, patch, patch, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation. x: [B, N, D]; shift, scale: [B, D]."""
  return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed_2d(width: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed MAE-style 2D sin-cos position embedding, [grid_h * grid_w, width] float32 (a trace-time constant)."""
  if width % 4:
    raise ValueError(f"model width {width} must be divisible by 4 for the 2D sin-cos position embedding")

  def embed_1d(positions: np.ndarray, dim: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
  # As in MAE: the first half of the channels encodes the column (w), the second the row (h).
  return np.concatenate([embed_1d(cols, width // 2), embed_1d(rows, width // 2)], axis=1).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos, sin] of the raw t in [0, 1] (no x1000). t: [B] -> [B, dim] float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedder(nnx.Module):
  """t [B] -> [B, D]: sinusoid (256) -> Linear -> SiLU -> Linear, N(0, 0.02) weights."""

  def __init__(self, width: int, rngs: nnx.Rngs, *, freq_dim: int = 256, dtype=jnp.float32):
    self.freq_dim = freq_dim
    self.fc1 = linear(freq_dim, width, rngs, dtype=dtype, init=normal_002)
    self.fc2 = linear(width, width, rngs, dtype=dtype, init=normal_002)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.fc2(nnx.silu(self.fc1(timestep_embedding(t, self.freq_dim))))


class Attention(nnx.Module):
  """Multi-head self-attention with a qkv bias; logits and softmax in float32. [B, N, D] -> [B, N, D]."""

  def __init__(self, width: int, num_heads: int, rngs: nnx.Rngs, *, dtype=jnp.float32):
    if width % num_heads:
      raise ValueError(f"model width {width} must be divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.qkv = linear(width, 3 * width, rngs, dtype=dtype)
    self.proj = linear(width, width, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))  # [B, N, H, Dh]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (d // self.num_heads) ** -0.5, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
    return self.proj(out)


class Mlp(nnx.Module):
  """Linear -> tanh-GELU -> Linear."""

  def __init__(self, width: int, hidden: int, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.fc1 = linear(width, hidden, rngs, dtype=dtype)
    self.fc2 = linear(hidden, width, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=True))
