"""SiT: the flow-matching diffusion transformer (adaLN-Zero DiT blocks on patch tokens).

The state it denoises is an image (latent) x [B, H, W, C], or with REG's class token (SiTSpec.class_token_dim > 0) the
pair (x, class token [B, E]); its velocity has the state's structure. REG (Martinser/REG models/sit.py:222-223,
292-297, 153-163): the noised class token, projected to the width and LayerNorm-ed, is token 0 (position embedding
zero, no rotary rotation); the final norm and modulation act on it too, and a zero-initialised linear layer reads its
velocity from it.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repa_jax.models.layers import (Attention, Mlp, RMSNorm, SwiGLU, TimestepEmbedder, layer_norm, linear, modulate,
                                    normal_002, patchify, rope_2d_angles, sincos_pos_embed_2d, unpatchify, zeros)
from repa_jax.specs import sharding
from repa_jax.specs.model import SiTSpec

# specs.model.REMAT name -> the jax.checkpoint policy of a block (None: no rematerialisation).
REMAT_POLICIES = {"none": None, "dots": jax.checkpoint_policies.checkpoint_dots,
                  "full": jax.checkpoint_policies.nothing_saveable}


def make_norm(kind: str, width: int):
  """The pre-modulation norm of specs.model.NORMS `kind`: SiT's LayerNorm without parameters, or RMSNorm."""
  return RMSNorm(width) if kind == "rmsnorm" else layer_norm


class SiTBlock(nnx.Module):
  """norm -> modulate -> attention -> gated residual; norm -> modulate -> MLP -> gated residual. The switches of
  SiTSpec (norm, mlp, qk_norm; rope angles passed in) are LightningDiT's; their defaults give SiT's block."""

  def __init__(self, spec: SiTSpec, rngs: nnx.Rngs, *, dtype=jnp.float32, attention: str = "einsum"):
    width, hidden = spec.width, int(spec.width * spec.mlp_ratio)
    self.norm1, self.norm2 = make_norm(spec.norm, width), make_norm(spec.norm, width)
    self.attn = Attention(width, spec.num_heads, rngs, dtype=dtype, qk_norm=spec.norm if spec.qk_norm else None,
                          implementation=attention)
    # SwiGLU at 2/3 of the hidden width keeps the MLP's parameter count (LightningDiT: int(2/3 * hidden)).
    self.mlp = SwiGLU(width, int(2 / 3 * hidden), rngs, dtype=dtype) if spec.mlp == "swiglu" else \
        Mlp(width, hidden, rngs, dtype=dtype)
    self.ada_ln = linear(width, 6 * width, rngs, dtype=dtype, init=zeros, gathered=True)

  def __call__(self, x: jax.Array, c: jax.Array, rope_angles: jax.Array | None = None) -> jax.Array:
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(self.ada_ln(nnx.silu(c)), 6, axis=-1)
    x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope_angles)
    return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


State = jax.Array | tuple[jax.Array, jax.Array]  # x [B, H, W, C], or (x, class token [B, E]) with REG


class SiT(nnx.Module):
  """Velocity model v(state_t, t, y). state: x [B, H, W, C] (NHWC) or (x, class token [B, E]) (REG), t: [B] in
  [0, 1], y: [B] int in [0, num_classes]."""

  def __init__(self, spec: SiTSpec, rngs: nnx.Rngs, *, dtype=jnp.float32, remat: str = "none",
               attention: str = "einsum"):
    self.spec = spec
    self.dtype = dtype
    self.remat = remat
    p, c, d = spec.patch, spec.in_channels, spec.width
    self.patch_embed = linear(p * p * c, d, rngs, dtype=dtype)  # == conv(kernel p, stride p), Xavier as a linear
    self.t_embed = TimestepEmbedder(d, rngs, dtype=dtype)
    # The extra row (index num_classes) is the null class for classifier-free guidance.
    self.y_embed = nnx.Embed(spec.num_classes + 1, d, embedding_init=normal_002, rngs=rngs)

    @nnx.split_rngs(splits=spec.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return SiTBlock(spec, rngs, dtype=dtype, attention=attention)

    # All blocks' parameters stacked on a leading [depth] axis; the forward pass scans over them, which keeps compile
    # time flat in depth and lets XLA keep the backward pass linear in depth.
    self.blocks = make_blocks(rngs)
    self.final_norm = make_norm(spec.norm, d)
    self.final_ada_ln = linear(d, 2 * d, rngs, dtype=dtype, init=zeros, gathered=True)
    self.final_linear = linear(d, p * p * c, rngs, dtype=dtype, init=zeros)
    if e := spec.class_token_dim:
      self.cls_embed = linear(e, d, rngs, dtype=dtype)
      self.cls_norm = nnx.LayerNorm(d, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
      self.final_cls = linear(d, e, rngs, dtype=dtype, init=zeros)

  def split_state(self, state: State) -> tuple[jax.Array, jax.Array | None]:
    """(image, class token or None), refusing a state that does not fit the spec (a class token iff REG)."""
    with_token = isinstance(state, (tuple, list))
    if with_token != bool(self.spec.class_token_dim):
      want = "(image, class token) (REG's SiT)" if self.spec.class_token_dim else "an image array (no class token)"
      raise ValueError(f"this SiT takes {want}, got a {'pair' if with_token else 'single array'}")
    return tuple(state) if with_token else (state, None)

  def run_blocks(self, hidden: jax.Array, c: jax.Array, start: int, stop: int, *,
                 outputs: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Blocks start+1 .. stop (1-indexed) applied to hidden [B, N, D] with conditioning c [B, D] by one lax.scan (each
    block under jax.checkpoint with the policy of `remat`, if any): (the last output [B, N, D], with outputs=True every
    block's output stacked [stop - start, B, N, D], else None)."""
    if start == stop:
      return hidden, None
    graphdef, params = nnx.split(self.blocks)
    segment = jax.tree.map(lambda p: p[start:stop], params)
    angles = None
    if self.spec.rope:  # the class token (REG), ahead of the grid, is not rotated
      angles = rope_2d_angles(self.spec.width // self.spec.num_heads, *self.spec.grid)
      angles = np.pad(angles, ((hidden.shape[1] - angles.shape[0], 0), (0, 0)))
    block = lambda h, p: sharding.constrain_batch(nnx.merge(graphdef, p)(h, c, angles))
    if (policy := REMAT_POLICIES[self.remat]) is not None:
      block = jax.checkpoint(block, policy=policy)

    def step(h, p):
      h = block(h, p)
      return h, h if outputs else None
    return jax.lax.scan(step, hidden, segment)

  def embed(self, state: State, t: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """state, t [B], y [B] -> (tokens entering block 1 [B, N (+ 1 with a class token, first), D], conditioning c
    [B, D])."""
    x, cls = self.split_state(state)
    _, h, w, _ = x.shape
    p, (gh, gw) = self.spec.patch, self.spec.grid
    if (h, w) != tuple(self.spec.input_size):
      raise ValueError(f"input {h}x{w} does not match the model's input_size {self.spec.input_size}")
    tokens = patchify(x, p)
    position = sincos_pos_embed_2d(self.spec.width, gh, gw).astype(self.dtype)
    hidden = self.patch_embed(tokens.astype(self.dtype)) + position
    if cls is not None:
      cls = self.cls_norm(self.cls_embed(cls.astype(self.dtype))).astype(self.dtype)
      hidden = jnp.concatenate([cls[:, None], hidden], axis=1)
    label = jnp.take(sharding.gathered(self.y_embed.embedding[...]), y, axis=0)  # the table gathered, like the layers
    c = (self.t_embed(t) + label).astype(self.dtype)
    return sharding.constrain_batch(hidden), sharding.constrain_batch(c)

  def run_to(self, hidden: jax.Array, c: jax.Array,
             blocks: Sequence[int]) -> tuple[dict[int, jax.Array], jax.Array, int]:
    """Runs the blocks up to the last of `blocks` (1-indexed) in one scan that keeps every block's output: ({k: output
    of block k}, the last output, its index)."""
    for k in blocks:
      if not 1 <= k <= self.spec.depth:
        raise ValueError(f"hidden block {k} is outside 1..{self.spec.depth} (the model depth)")
    if not blocks:
      return {}, hidden, 0
    last = max(blocks)
    hidden, outputs = self.run_blocks(hidden, c, 0, last, outputs=True)
    return {k: outputs[k - 1] for k in set(blocks)}, hidden, last

  def hidden_states(self, state: State, t: jax.Array, y: jax.Array, blocks: Sequence[int]) -> dict[int, jax.Array]:
    """{k: output of block k, [B, N, D]} for k in blocks, running no block after the last of them (SRA's teacher)."""
    return self.run_to(*self.embed(state, t, y), blocks)[0]

  def __call__(self, state: State, t: jax.Array, y: jax.Array,
               hidden_blocks: Sequence[int] = ()) -> tuple[State, dict[int, jax.Array]]:
    """Returns the velocity (float32, the state's structure: [B, H, W, C], or with REG ([B, H, W, C], [B, E])) and
    {k: output of block k, [B, N, D]} for k in hidden_blocks (N counts REG's class token, the first).

    Blocks are numbered from 1 like REPA's `encoder_depth`: block k is the output of the k-th block.
    """
    hidden, c = self.embed(state, t, y)
    hiddens, hidden, done = self.run_to(hidden, c, hidden_blocks)
    hidden = self.run_blocks(hidden, c, done, self.spec.depth)[0]
    shift, scale = jnp.split(self.final_ada_ln(nnx.silu(c)), 2, axis=-1)
    hidden = modulate(self.final_norm(hidden), shift, scale)
    image = self.split_state(state)[0]
    out = self.final_linear(hidden[:, -self.spec.num_tokens:])
    out = unpatchify(out, self.spec.patch, *image.shape[1:3]).astype(jnp.float32)
    if not self.spec.class_token_dim:
      return out, hiddens
    return (out, self.final_cls(hidden[:, 0]).astype(jnp.float32)), hiddens
