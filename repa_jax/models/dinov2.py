"""DINOv2 ViT (facebookresearch/dinov2, ViT-S/B/L/g with patch 14, with or without registers): REPA's target encoder.

`encode` is REPA's feature path: uint8 images -> `preprocess` (/255, ImageNet normalise, torch-bicubic resize to
224 per 256 px) -> patch tokens after the final LayerNorm (`x_norm_patchtokens`; CLS and registers dropped).

The position embedding is trained for 518 px (37 x 37 patches + CLS) and resampled to the input's patch grid:
- 'repa' (default): what REPA's `load_encoders` does, `timm.layers.pos_embed.resample_abs_pos_embed` to the square
  grid (bicubic to a size, antialias=True) once at load time; the official forward then resamples nothing.
- 'official': `DinoVisionTransformer.interpolate_pos_encoding`: bicubic with scale_factor (g + 0.1) / 37, no antialias
  (the `_reg` hub models: size, antialias); REPA never reaches this path.
(Hugging Face's `Dinov2Model` resamples to a size without antialias, which matches neither for the non-register models.)
All three use torch's bicubic, reproduced by `resize_bicubic`. Parameters float32; matmuls in `dtype`; LayerNorms,
softmax and the resampling in float32.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repa_jax.models.layers import SwiGLU, linear, normal_002, patchify
from repa_jax.models.vit import ViTBlock, ViTMlp, layer_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FFNS = ("mlp", "swiglu")
POS_RESAMPLES = ("repa", "official")


@dataclasses.dataclass(frozen=True)
class DinoV2Spec:
  """A DINOv2 ViT's shapes and the hub constructor's position-embedding interpolation arguments."""
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  ffn: str = "mlp"  # 'mlp' (exact GELU) or 'swiglu' (the official 'swiglufused' FFN of ViT-g)
  num_registers: int = 0
  patch: int = 14
  pretrained_size: int = 518  # the position embedding covers (518 / 14)^2 = 37 x 37 patches + CLS
  interpolate_offset: float = 0.1  # the hub's '_reg' models: 0.0 with antialias
  interpolate_antialias: bool = False
  eps: float = 1e-6

  def __post_init__(self):
    if self.ffn not in FFNS:
      raise ValueError(f"DinoV2Spec.ffn={self.ffn!r}: use one of {FFNS}")
    if self.pretrained_size % self.patch:
      raise ValueError(f"DinoV2Spec.pretrained_size={self.pretrained_size} is not divisible by patch={self.patch}")

  @property
  def pos_grid(self) -> int:
    """Side of the square patch grid the position embedding was trained on (37)."""
    return self.pretrained_size // self.patch

  @property
  def ffn_hidden(self) -> int:
    """FFN hidden width; SwiGLU keeps 2/3 of it, rounded up to a multiple of 8 (`SwiGLUFFNFused`)."""
    hidden = int(self.width * self.mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.ffn == "swiglu" else hidden


def _with_registers(spec: DinoV2Spec) -> DinoV2Spec:
  return dataclasses.replace(spec, num_registers=4, interpolate_offset=0.0, interpolate_antialias=True)


_BASE = {
    "dinov2_vits14": DinoV2Spec(width=384, depth=12, num_heads=6),
    "dinov2_vitb14": DinoV2Spec(width=768, depth=12, num_heads=12),
    "dinov2_vitl14": DinoV2Spec(width=1024, depth=24, num_heads=16),
    "dinov2_vitg14": DinoV2Spec(width=1536, depth=40, num_heads=24, ffn="swiglu"),
}
SPECS: dict[str, DinoV2Spec] = {**_BASE, **{f"{name}_reg": _with_registers(spec) for name, spec in _BASE.items()}}


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (torch: -0.75 plain, -0.5 antialiased)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_weights(n_in: int, n_out: int, scale_factor: float | None, antialias: bool) -> np.ndarray:
  """[n_out, n_in] float32 matrix of torch's 1-D bicubic resampling (align_corners=False); coordinates in float32
  as torch computes them. Plain: a = -0.75, border taps clamped. Antialiased: a = -0.5, kernel widened by the
  downscale factor, taps cut at the border and renormalised."""
  f32 = np.float32
  scale = f32(1.0 / scale_factor) if scale_factor else f32(n_in) / f32(n_out)
  out = np.arange(n_out, dtype=f32)
  if not antialias:
    src = scale * (out + f32(0.5)) - f32(0.5)
    first = np.floor(src)
    weights = np.zeros((n_out, n_in), np.float64)
    for k in range(-1, 3):
      taps = np.clip(first.astype(np.int64) + k, 0, n_in - 1)
      np.add.at(weights, (np.arange(n_out), taps), _cubic(src - first - f32(k), -0.75))
    return weights.astype(np.float32)
  support = f32(2.0) * scale if scale >= 1 else f32(2.0)
  inv_scale = f32(1.0) / scale if scale >= 1 else f32(1.0)
  center = scale * (out + f32(0.5))
  lo = np.maximum((center - support + f32(0.5)).astype(np.int64), 0)  # C++ truncation, as torch
  hi = np.minimum((center + support + f32(0.5)).astype(np.int64), n_in)
  taps = np.arange(n_in, dtype=f32)
  weights = _cubic((taps[None] - center[:, None] + f32(0.5)) * inv_scale, -0.5)
  weights = np.where((taps[None] >= lo[:, None]) & (taps[None] < hi[:, None]), weights, 0.0)
  return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def resize_bicubic(x: jax.Array, size: tuple[int, int] | None = None, *,
                   scale_factor: tuple[float, float] | None = None, antialias: bool = False) -> jax.Array:
  """torch `F.interpolate(mode='bicubic', align_corners=False)` on NHWC: [..., H, W, C] -> [..., H', W', C] float32.
  Give `size` (H', W') or `scale_factor` (sh, sw); with a scale factor H' = floor(H * sh) and the source coordinates
  use 1 / sh itself (as torch does), not H / H'."""
  if (size is None) == (scale_factor is None):
    raise ValueError("resize_bicubic: give exactly one of size and scale_factor")
  h, w = x.shape[-3], x.shape[-2]
  factors = scale_factor or (None, None)
  out_h, out_w = size or (int(h * factors[0]), int(w * factors[1]))
  rows = jnp.asarray(bicubic_weights(h, out_h, factors[0], antialias))
  cols = jnp.asarray(bicubic_weights(w, out_w, factors[1], antialias))
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,...hwc->...owc", rows, x.astype(jnp.float32), precision=hi)
  return jnp.einsum("pw,...owc->...opc", cols, x, precision=hi)


def _split_pos_embed(pos_embed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[1, 1 + M * M, D] -> CLS entry [1, 1, D] and patch grid [1, M, M, D]."""
  m = math.isqrt(pos_embed.shape[1] - 1)
  if m * m != pos_embed.shape[1] - 1:
    raise ValueError(f"position embedding {pos_embed.shape} is not CLS + a square patch grid")
  return pos_embed[:, :1], pos_embed[:, 1:].reshape(1, m, m, -1)


def interpolate_pos_encoding(pos_embed: jax.Array, grid: tuple[int, int], *, offset: float = 0.1,
                             antialias: bool = False) -> jax.Array:
  """The official `DinoVisionTransformer.interpolate_pos_encoding`: [1, 1 + M * M, D] -> [1, 1 + gh * gw, D]
  float32. offset > 0: scale_factor ((gh + offset) / M, (gw + offset) / M); offset 0: size (gh, gw). Unchanged if the
  grid is (M, M)."""
  cls, patches = _split_pos_embed(pos_embed.astype(jnp.float32))
  m = patches.shape[1]
  if tuple(grid) == (m, m):
    return pos_embed.astype(jnp.float32)
  if offset:
    patches = resize_bicubic(patches, scale_factor=((grid[0] + offset) / m, (grid[1] + offset) / m),
                             antialias=antialias)
  else:
    patches = resize_bicubic(patches, tuple(grid), antialias=antialias)
  if patches.shape[1:3] != tuple(grid):
    raise ValueError(f"interpolate_pos_encoding: {m}x{m} -> {patches.shape[1:3]}, expected {tuple(grid)}")
  return jnp.concatenate([cls, patches.reshape(1, -1, patches.shape[-1])], axis=1)


def resample_abs_pos_embed(pos_embed: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """timm's `resample_abs_pos_embed` as REPA calls it (bicubic to `grid`, antialias=True; unchanged if the grid is the
  trained one): [1, 1 + M * M, D] -> [1, 1 + gh * gw, D] float32."""
  cls, patches = _split_pos_embed(pos_embed.astype(jnp.float32))
  if tuple(grid) == patches.shape[1:3]:
    return pos_embed.astype(jnp.float32)
  patches = resize_bicubic(patches, tuple(grid), antialias=True)
  return jnp.concatenate([cls, patches.reshape(1, -1, patches.shape[-1])], axis=1)


class DinoV2(nnx.Module):
  """Normalised images float [B, H, W, 3] (H, W multiples of 14) -> the tokens after the final LayerNorm, float32:
  {'patch_tokens': [B, (H / 14) * (W / 14), width], 'class_token': [B, width]} (DINOv2's x_norm_patchtokens and
  x_norm_clstoken; registers dropped)."""

  def __init__(self, spec: DinoV2Spec, rngs: nnx.Rngs, *, pos_resample: str = "repa", dtype=jnp.float32):
    if pos_resample not in POS_RESAMPLES:
      raise ValueError(f"DinoV2 pos_resample={pos_resample!r}: use one of {POS_RESAMPLES}")
    self.spec = spec
    self.pos_resample = pos_resample
    self.dtype = dtype
    p, d = spec.patch, spec.width
    self.patch_embed = linear(p * p * 3, d, rngs, dtype=dtype)  # == the conv(kernel p, stride p) on raster patches
    self.cls_token = nnx.Param(normal_002(rngs.params(), (1, 1, d), jnp.float32))
    self.pos_embed = nnx.Param(normal_002(rngs.params(), (1, 1 + spec.pos_grid ** 2, d), jnp.float32))
    self.register_tokens = (nnx.Param(normal_002(rngs.params(), (1, spec.num_registers, d), jnp.float32))
                            if spec.num_registers else None)
    ffn = ViTMlp if spec.ffn == "mlp" else SwiGLU
    self.blocks = nnx.List([ViTBlock(d, spec.num_heads, spec.eps, 1.0, ffn(d, spec.ffn_hidden, rngs, dtype=dtype), rngs,
                                     dtype=dtype) for _ in range(spec.depth)])
    self.norm = layer_norm(d, spec.eps, rngs)

  def position_embedding(self, grid: tuple[int, int]) -> jax.Array:
    """[1, 1 + gh * gw, D] float32 for a gh x gw patch grid, resampled as `pos_resample` says."""
    if self.pos_resample == "repa":
      if grid[0] != grid[1]:
        raise ValueError(f"DinoV2 pos_resample='repa' resamples to a square grid (REPA's), got {grid}")
      return resample_abs_pos_embed(self.pos_embed[...], grid)
    return interpolate_pos_encoding(self.pos_embed[...], grid, offset=self.spec.interpolate_offset,
                                    antialias=self.spec.interpolate_antialias)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    b, h, w, c = images.shape
    p = self.spec.patch
    if c != 3 or h % p or w % p:
      raise ValueError(f"DinoV2 input [B, H, W, C] = {images.shape}: needs 3 channels and H, W divisible by {p}")
    x = self.patch_embed(patchify(images.astype(self.dtype), p))
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1])), x], axis=1)
    x = x + self.position_embedding((h // p, w // p)).astype(x.dtype)
    if self.register_tokens is not None:
      registers = jnp.broadcast_to(self.register_tokens[...].astype(x.dtype), (b, *self.register_tokens.shape[1:]))
      x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x).astype(jnp.float32)
    return {"patch_tokens": x[:, 1 + self.spec.num_registers:], "class_token": x[:, 0]}


def preprocess(images: jax.Array, resolution: int) -> jax.Array:
  """REPA's `preprocess_raw_image` for DINOv2: uint8 [B, res, res, 3] -> /255 -> ImageNet mean/std -> torch bicubic
  (no antialias) to 224 * (res // 256) px. Returns float32 [B, 224 k, 224 k, 3]."""
  if images.dtype != jnp.uint8 or images.shape[1:] != (resolution, resolution, 3):
    raise ValueError(f"DINOv2 preprocess wants uint8 [B, {resolution}, {resolution}, 3] images, got "
                     f"{images.dtype} {images.shape}")
  size = 224 * (resolution // 256)
  if not size:
    raise ValueError(f"DINOv2 preprocess: resolution {resolution} < 256 gives no 224 px input (REPA uses 256, 512)")
  x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return resize_bicubic(x, (size, size))


def encode(model: DinoV2, images: jax.Array) -> dict[str, jax.Array]:
  """REPA's DINOv2 features: uint8 [B, res, res, 3] -> {'patch_tokens': float32 [B, (224 k / 14)^2, width],
  'class_token': [B, width]}, k = res // 256 (256 x width tokens at 256 px, 1024 x width at 512 px)."""
  return model(preprocess(images, images.shape[2]))
