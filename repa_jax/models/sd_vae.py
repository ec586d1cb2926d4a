"""SD-VAE: diffusers' `AutoencoderKL` (stabilityai/sd-vae-ft-mse, sd-vae-ft-ema) in NHWC.

The module tree follows diffusers (encoder / decoder -> conv_in, down_blocks / up_blocks -> resnets, mid_block ->
resnets + attentions, conv_norm_out, conv_out; quant_conv, post_quant_conv), so `repa_jax/convert/sd_vae.py` maps
names one to one. Parameters float32; convolutions and attention matmuls in `dtype`; GroupNorm, SiLU after it,
softmax and the posterior in float32.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from repa_jax.models.layers import linear

EPS = 1e-6  # every GroupNorm of the diffusers VAE


@dataclasses.dataclass(frozen=True)
class VAESpec:
  """Everything that fixes an AutoencoderKL's parameter shapes (diffusers' config names)."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  norm_num_groups: int
  latent_channels: int
  in_channels: int = 3
  out_channels: int = 3
  scaling_factor: float = 0.18215  # SiT trains on mean-plus-noise latents times this

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAESpec.block_out_channels {self.block_out_channels}: {bad} not divisible by "
                       f"VAESpec.norm_num_groups={self.norm_num_groups}")

  @property
  def downsample(self) -> int:
    """The spatial factor between images and latents."""
    return 2 ** (len(self.block_out_channels) - 1)


SD_VAE = VAESpec(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4)


def conv(din: int, dout: int, rngs: nnx.Rngs, *, kernel: int = 3, stride: int = 1, padding=1, dtype=jnp.float32):
  """A float32-parameter 2D convolution (NHWC) computing in `dtype`."""
  return nnx.Conv(din, dout, (kernel, kernel), strides=stride, padding=padding, dtype=dtype, param_dtype=jnp.float32,
                  rngs=rngs)


def group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """Affine GroupNorm (eps 1e-6) computed in float32 with the two-pass variance, as torch."""
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


def norm_silu(norm: nnx.GroupNorm, x: jax.Array) -> jax.Array:
  """SiLU(GroupNorm(x)) in float32, returned in x.dtype."""
  return nnx.silu(norm(x.astype(jnp.float32))).astype(x.dtype)


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without a time embedding: x + conv(SiLU(GN(conv(SiLU(GN(x)))))), the skip through a 1x1
  conv when the width changes. [B, H, W, din] -> [B, H, W, dout]."""

  def __init__(self, din: int, dout: int, groups: int, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.norm1 = group_norm(din, groups, rngs)
    self.conv1 = conv(din, dout, rngs, dtype=dtype)
    self.norm2 = group_norm(dout, groups, rngs)
    self.conv2 = conv(dout, dout, rngs, dtype=dtype)
    self.conv_shortcut = conv(din, dout, rngs, kernel=1, padding=0, dtype=dtype) if din != dout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv2(norm_silu(self.norm2, self.conv1(norm_silu(self.norm1, x))))
    return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the H * W positions with a residual: x + to_out(attn(GN(x))).
  [B, H, W, C] -> [B, H, W, C]."""

  def __init__(self, width: int, groups: int, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.group_norm = group_norm(width, groups, rngs)
    self.to_q = linear(width, width, rngs, dtype=dtype)
    self.to_k = linear(width, width, rngs, dtype=dtype)
    self.to_v = linear(width, width, rngs, dtype=dtype)
    self.to_out = linear(width, width, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x.astype(jnp.float32)).astype(x.dtype).reshape(b, h * w, c)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = self.to_out(jnp.einsum("bqk,bkc->bqc", weights, v))
    return x + out.reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nnx.Module):
  """resnet -> attention -> resnet at the lowest resolution (diffusers UNetMidBlock2D)."""

  def __init__(self, width: int, groups: int, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.resnets = nnx.List([ResnetBlock(width, width, groups, rngs, dtype=dtype) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(width, groups, rngs, dtype=dtype)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nnx.Module):
  """`layers` resnets, then (unless last) zero padding (0, 1) on H and W and a stride-2 3x3 conv (DownEncoderBlock2D).
  [B, H, W, din] -> [B, floor(H / 2), floor(W / 2), dout]."""

  def __init__(self, din: int, dout: int, layers: int, groups: int, add_downsample: bool, rngs: nnx.Rngs, *,
               dtype=jnp.float32):
    self.resnets = nnx.List([ResnetBlock(din if i == 0 else dout, dout, groups, rngs, dtype=dtype)
                             for i in range(layers)])
    self.downsample = (conv(dout, dout, rngs, stride=2, padding=((0, 1), (0, 1)), dtype=dtype)
                       if add_downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
  """`layers` resnets, then (unless last) nearest x2 upsampling and a 3x3 conv (UpDecoderBlock2D).
  [B, H, W, din] -> [B, 2H, 2W, dout]."""

  def __init__(self, din: int, dout: int, layers: int, groups: int, add_upsample: bool, rngs: nnx.Rngs, *,
               dtype=jnp.float32):
    self.resnets = nnx.List([ResnetBlock(din if i == 0 else dout, dout, groups, rngs, dtype=dtype)
                             for i in range(layers)])
    self.upsample = conv(dout, dout, rngs, dtype=dtype) if add_upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsample is None:
      return x
    return self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Encoder(nnx.Module):
  """images [B, H, W, in_channels] -> moments [B, H / f, W / f, 2 * latent_channels] (before quant_conv)."""

  def __init__(self, spec: VAESpec, rngs: nnx.Rngs, *, dtype=jnp.float32):
    widths, groups = spec.block_out_channels, spec.norm_num_groups
    self.conv_in = conv(spec.in_channels, widths[0], rngs, dtype=dtype)
    self.down_blocks = nnx.List([
        DownBlock(widths[max(i - 1, 0)], width, spec.layers_per_block, groups, i < len(widths) - 1, rngs, dtype=dtype)
        for i, width in enumerate(widths)])
    self.mid_block = MidBlock(widths[-1], groups, rngs, dtype=dtype)
    self.conv_norm_out = group_norm(widths[-1], groups, rngs)
    self.conv_out = conv(widths[-1], 2 * spec.latent_channels, rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(norm_silu(self.conv_norm_out, self.mid_block(x)))


class Decoder(nnx.Module):
  """latents [B, h, w, latent_channels] (after post_quant_conv) -> images [B, h * f, w * f, out_channels]."""

  def __init__(self, spec: VAESpec, rngs: nnx.Rngs, *, dtype=jnp.float32):
    widths, groups = spec.block_out_channels[::-1], spec.norm_num_groups
    self.conv_in = conv(spec.latent_channels, widths[0], rngs, dtype=dtype)
    self.mid_block = MidBlock(widths[0], groups, rngs, dtype=dtype)
    self.up_blocks = nnx.List([
        UpBlock(widths[max(i - 1, 0)], width, spec.layers_per_block + 1, groups, i < len(widths) - 1, rngs,
                dtype=dtype)
        for i, width in enumerate(widths)])
    self.conv_norm_out = group_norm(widths[-1], groups, rngs)
    self.conv_out = conv(widths[-1], spec.out_channels, rngs, dtype=dtype)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(norm_silu(self.conv_norm_out, x))


class SDVAE(nnx.Module):
  """diffusers AutoencoderKL: encoder + 1x1 quant_conv, 1x1 post_quant_conv + decoder. Use `encode` / `decode`."""

  def __init__(self, spec: VAESpec, rngs: nnx.Rngs, *, dtype=jnp.float32):
    self.spec = spec
    self.dtype = dtype
    latent = spec.latent_channels
    self.encoder = Encoder(spec, rngs, dtype=dtype)
    self.decoder = Decoder(spec, rngs, dtype=dtype)
    self.quant_conv = conv(2 * latent, 2 * latent, rngs, kernel=1, padding=0, dtype=dtype)
    self.post_quant_conv = conv(latent, latent, rngs, kernel=1, padding=0, dtype=dtype)


def check_channels(what: str, x: jax.Array, channels: int, field: str) -> None:
  """Fail early on a non-NHWC input or one with the wrong channel count."""
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f"SD-VAE {what} must be NHWC [B, H, W, {channels}] (VAESpec.{field}), got shape {x.shape}")


def encode(model: SDVAE, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images [B, H, W, in_channels] in [-1, 1] -> the posterior (mean, std), each [B, H / f, W / f, latent_channels]
  float32; std = exp(0.5 * clip(logvar, -30, 20)) as diffusers' DiagonalGaussianDistribution."""
  check_channels("images", images, model.spec.in_channels, "in_channels")
  moments = model.quant_conv(model.encoder(images.astype(model.dtype))).astype(jnp.float32)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))


def decode(model: SDVAE, latents: jax.Array) -> jax.Array:
  """latents [B, h, w, latent_channels] (unscaled) -> images [B, h * f, w * f, out_channels] float32, nominally in
  [-1, 1] (not clipped, as diffusers)."""
  check_channels("latents", latents, model.spec.latent_channels, "latent_channels")
  return model.decoder(model.post_quant_conv(latents.astype(model.dtype))).astype(jnp.float32)


def encode_uint8(model: SDVAE, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`encode` of uint8 images [B, H, W, C] in [0, 255], scaled x / 127.5 - 1."""
  return encode(model, images.astype(jnp.float32) / 127.5 - 1.0)


def decode_sit_latents(model: SDVAE, latents: jax.Array) -> jax.Array:
  """`decode` of SiT-space latents (VAE latents times spec.scaling_factor, 0.18215 for SD)."""
  return decode(model, latents.astype(jnp.float32) / model.spec.scaling_factor)
