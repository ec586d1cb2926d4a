"""Building blocks shared by SiT: embeddings, float32 layer and RMS norms, 2D rotary embedding, attention and MLPs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repa_jax.specs import sharding
from repa_jax.specs.model import ATTENTIONS

xavier = nnx.initializers.xavier_uniform()
normal_002 = nnx.initializers.normal(0.02)
zeros = nnx.initializers.zeros_init()


def linear(din: int, dout: int, rngs: nnx.Rngs, *, dtype=jnp.float32, init=xavier,
           gathered: bool = False) -> nnx.Linear:
  """A float32-parameter linear layer computing in `dtype`, with zero bias. gathered: its kernel is all-gathered where
  it is used (`sharding.gathered`), for the layers of the per-image conditioning."""
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, bias_init=zeros, rngs=rngs,
                    dot_general=sharding.gathered_dot_general if gathered else jax.lax.dot_general)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters over the last axis, computed in float32, returned in x.dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * weight over the last axis, the norm in float32, a learnable weight (ones at init),
  no bias (LightningDiT's models/rmsnorm.py, from Llama)."""

  def __init__(self, width: int, *, eps: float = 1e-6):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((width,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)).astype(x.dtype) * \
        self.weight[...].astype(x.dtype)


def rope_2d_angles(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0) -> np.ndarray:
  """[grid_h * grid_w, head_dim] rotation angles of the 2D rotary embedding (LightningDiT's VisionRotaryEmbeddingFast,
  from EVA-02): the first head_dim / 2 channels rotate by the row index, the rest by the column index, each half with
  frequencies theta^(-2k / (head_dim / 2)), every frequency repeated for the adjacent channel pair it rotates."""
  if head_dim % 4:
    raise ValueError(f"the head width {head_dim} must be divisible by 4 for the 2D rotary embedding (model.rope)")
  half = head_dim // 2
  freqs = np.repeat(1.0 / theta ** (np.arange(0, half, 2, dtype=np.float64) / half), 2)  # [half]
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
  return np.concatenate([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], axis=1).astype(np.float32)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates each adjacent channel pair (x[2k], x[2k+1]) of x [B, N, H, Dh] by angles [N, Dh] (equal in a pair)."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos, sin = (f(angles)[None, :, None].astype(x.dtype) for f in (jnp.cos, jnp.sin))
  return x * cos + rotated * sin


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
    self.fc1 = linear(freq_dim, width, rngs, dtype=dtype, init=normal_002, gathered=True)
    self.fc2 = linear(width, width, rngs, dtype=dtype, init=normal_002, gathered=True)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.fc2(nnx.silu(self.fc1(timestep_embedding(t, self.freq_dim))))


class Attention(nnx.Module):
  """Multi-head self-attention with a qkv bias; logits and softmax in float32. [B, N, D] -> [B, N, D].
  qk_norm: None | 'layernorm' | 'rmsnorm', a learnable norm of each head's q and k (LightningDiT's use_qknorm);
  rope_angles [N, Dh] (`rope_2d_angles`) rotates q and k after it. implementation (ATTENTIONS): 'einsum' (two einsums
  and a softmax, written out) or jax.nn.dot_product_attention's 'xla' / 'cudnn' (cuDNN's fused kernel, GPU only)."""

  def __init__(self, width: int, num_heads: int, rngs: nnx.Rngs, *, dtype=jnp.float32, qk_norm: str | None = None,
               implementation: str = "einsum"):
    if width % num_heads:
      raise ValueError(f"model width {width} must be divisible by num_heads {num_heads}")
    if implementation not in ATTENTIONS:
      raise ValueError(f"config.model.attention={implementation!r}: use one of {ATTENTIONS}")
    self.num_heads = num_heads
    self.implementation = implementation
    self.qkv = linear(width, 3 * width, rngs, dtype=dtype)
    self.proj = linear(width, width, rngs, dtype=dtype)
    head_norm = {None: lambda: None, "rmsnorm": lambda: RMSNorm(width // num_heads),
                 "layernorm": lambda: nnx.LayerNorm(width // num_heads, epsilon=1e-5, dtype=dtype,
                                                    param_dtype=jnp.float32, rngs=rngs)}[qk_norm]
    self.q_norm, self.k_norm = head_norm(), head_norm()

  def __call__(self, x: jax.Array, rope_angles: jax.Array | None = None) -> jax.Array:
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))  # [B, N, H, Dh]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope_angles is not None:
      q, k = apply_rope(q, rope_angles), apply_rope(k, rope_angles)
    if self.implementation == "einsum":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      weights = jax.nn.softmax(logits * (d // self.num_heads) ** -0.5, axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  """Linear -> tanh-GELU -> Linear."""

  def __init__(self, width: int, hidden: int, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.fc1 = linear(width, hidden, rngs, dtype=dtype)
    self.fc2 = linear(hidden, width, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=True))


class SwiGLU(nnx.Module):
  """w3(silu(gate) * value) with [gate, value] = w12(x), biases on both: DINOv2's `SwiGLUFFN` layout, which
  LightningDiT's models/swiglu_ffn.py shares."""

  def __init__(self, width: int, hidden: int, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.w12 = linear(width, 2 * hidden, rngs, dtype=dtype)
    self.w3 = linear(hidden, width, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, value = jnp.split(self.w12(x), 2, axis=-1)
    return self.w3(nnx.silu(gate) * value)
