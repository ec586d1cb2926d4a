"""A plain ViT encoder (pre-norm blocks, CLS token, final LayerNorm) whose patch tokens are REPA's targets.

The structure follows DINOv2's (patch embed as a linear layer == conv with stride p, CLS token, position embedding
over [CLS, patches], pre-norm blocks with optional LayerScale, exact-GELU MLP, affine final LayerNorm), so a DINOv2
port can reuse it with `pos_embed='learned'`, `layer_scale=1e-5`, `patch=14`. Parameters float32; matmuls in `dtype`;
LayerNorms and softmax in float32.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from repa_jax.models.layers import Attention, linear, normal_002, patchify, sincos_pos_embed_2d, zeros

POS_EMBEDS = ("sincos", "learned")
POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """Everything that fixes a ViT's parameter shapes and forward pass."""
  image_size: tuple[int, int]  # (H, W)
  channels: int
  patch: int
  depth: int
  width: int
  num_heads: int
  num_classes: int  # 0 = no classifier head ('logits' is then [B, 0])
  mlp_ratio: float = 4.0
  pos_embed: str = "sincos"  # 'sincos' (fixed, zero for CLS) or 'learned' (over [CLS, patches], N(0, 0.02))
  pool: str = "cls"  # the token the head reads: 'cls' or 'mean' (of the normed patch tokens)
  layer_scale: float | None = None  # DINOv2-style LayerScale init (e.g. 1e-5); None = off
  eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
    h, w = self.image_size
    if h % self.patch or w % self.patch:
      raise ValueError(f"ViTSpec.image_size {h}x{w} is not divisible by ViTSpec.patch={self.patch}")
    if self.width % self.num_heads:
      raise ValueError(f"ViTSpec.width={self.width} is not divisible by ViTSpec.num_heads={self.num_heads}")
    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f"ViTSpec.pos_embed={self.pos_embed!r}: use one of {POS_EMBEDS}")
    if self.pool not in POOLS:
      raise ValueError(f"ViTSpec.pool={self.pool!r}: use one of {POOLS}")

  @property
  def grid(self) -> tuple[int, int]:
    return self.image_size[0] // self.patch, self.image_size[1] // self.patch

  @property
  def num_tokens(self) -> int:
    """Patch tokens per image (CLS not counted)."""
    return self.grid[0] * self.grid[1]


def layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """Affine LayerNorm computed and stored in float32."""
  return nnx.LayerNorm(width, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


class ViTMlp(nnx.Module):
  """Linear -> exact GELU -> Linear (as in DINOv2 / timm)."""

  def __init__(self, width: int, hidden: int, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.fc1 = linear(width, hidden, rngs, dtype=dtype)
    self.fc2 = linear(hidden, width, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class ViTBlock(nnx.Module):
  """x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x)). [B, T, D] -> [B, T, D]. ls: LayerScale starting at `scale`
  (none when None); `mlp`: the feed-forward module (a GELU MLP; SwiGLU in DINOv2-g)."""

  def __init__(self, width: int, num_heads: int, eps: float, scale: float | None, mlp: nnx.Module, rngs: nnx.Rngs, *,
               dtype=jnp.float32):
    d = width
    self.norm1 = layer_norm(d, eps, rngs)
    self.attn = Attention(d, num_heads, rngs, dtype=dtype)
    self.norm2 = layer_norm(d, eps, rngs)
    self.mlp = mlp
    self.ls1 = nnx.Param(jnp.full((d,), scale, jnp.float32)) if scale is not None else None
    self.ls2 = nnx.Param(jnp.full((d,), scale, jnp.float32)) if scale is not None else None

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.attn(self.norm1(x).astype(x.dtype))
    x = x + (a if self.ls1 is None else a * self.ls1[...].astype(x.dtype))
    m = self.mlp(self.norm2(x).astype(x.dtype))
    return x + (m if self.ls2 is None else m * self.ls2[...].astype(x.dtype))


class ViT(nnx.Module):
  """images float [B, H, W, C] -> {'patch_tokens': [B, N, width] float32 after the final LayerNorm (CLS dropped),
  'pooled': [B, width] the normed CLS (or mean patch) token, 'logits': [B, num_classes] float32 from a linear head on
  it}."""

  def __init__(self, spec: ViTSpec, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.spec = spec
    self.dtype = dtype
    p, c, d = spec.patch, spec.channels, spec.width
    self.patch_embed = linear(p * p * c, d, rngs, dtype=dtype)  # == conv(kernel p, stride p) on raster patches
    self.cls_token = nnx.Param(normal_002(rngs.params(), (1, 1, d), jnp.float32))
    self.pos_embed = (nnx.Param(normal_002(rngs.params(), (1, 1 + spec.num_tokens, d), jnp.float32))
                      if spec.pos_embed == "learned" else None)
    self.blocks = nnx.List([
        ViTBlock(d, spec.num_heads, spec.eps, spec.layer_scale, ViTMlp(d, int(d * spec.mlp_ratio), rngs, dtype=dtype),
                 rngs, dtype=dtype) for _ in range(spec.depth)])
    self.norm = layer_norm(d, spec.eps, rngs)
    self.head = linear(d, spec.num_classes, rngs, dtype=jnp.float32, init=zeros)

  def position_embedding(self) -> jax.Array:
    """[1, 1 + N, D] float32: the embedding added to [CLS, patch tokens]."""
    if self.pos_embed is not None:
      return self.pos_embed[...]
    patches = jnp.asarray(sincos_pos_embed_2d(self.spec.width, *self.spec.grid))
    return jnp.concatenate([jnp.zeros((1, self.spec.width)), patches])[None]

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    b, h, w, c = images.shape
    if (h, w, c) != (*self.spec.image_size, self.spec.channels):
      raise ValueError(f"ViT input [B, H, W, C] = {images.shape} does not match ViTSpec image_size "
                       f"{self.spec.image_size} with {self.spec.channels} channels")
    patches = patchify(images, self.spec.patch)
    x = self.patch_embed(patches.astype(self.dtype))
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1])), x], axis=1)
    x = x + self.position_embedding().astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x).astype(jnp.float32)
    cls, patch_tokens = x[:, 0], x[:, 1:]
    pooled = cls if self.spec.pool == "cls" else patch_tokens.mean(1)
    return {"patch_tokens": patch_tokens, "pooled": pooled, "logits": self.head(pooled)}
