"""A small convolutional classifier: the feature network of the Fashion-MNIST metrics (FD, precision/recall, IS and
class accuracy), deliberately another architecture than the ViT whose tokens REPA aligns to.

Stages of [3x3 conv -> ReLU] x convs_per_stage, a 2x2 max-pool between stages; the last stage's feature map read as
tokens [B, h * w, C] (the spatial features, like Inception's mixed_6 for sFID); the flattened map -> a ReLU hidden layer
(the pooled features, the penultimate layer like Inception's pool3) -> a linear head (the logits).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class CNNSpec:
  """Everything that fixes the CNN's parameter shapes and forward pass."""
  image_size: tuple[int, int]  # (H, W)
  channels: int  # input channels
  stage_channels: tuple[int, ...]  # output channels of each stage; the last one is the feature width
  num_classes: int
  convs_per_stage: int = 1
  hidden: int = 128  # width of the penultimate layer

  def __post_init__(self):
    object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
    object.__setattr__(self, "stage_channels", tuple(int(c) for c in self.stage_channels))
    scale = 2 ** (len(self.stage_channels) - 1)
    if not self.stage_channels or self.image_size[0] % scale or self.image_size[1] % scale:
      raise ValueError(f"CNNSpec.image_size {self.image_size} must be divisible by 2^(stages - 1) = {scale} "
                       f"(CNNSpec.stage_channels={self.stage_channels})")

  @property
  def width(self) -> int:
    return self.stage_channels[-1]

  @property
  def grid(self) -> tuple[int, int]:
    scale = 2 ** (len(self.stage_channels) - 1)
    return self.image_size[0] // scale, self.image_size[1] // scale

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]


def _windows(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H / 2, W / 2, C, 4]: each 2x2 window's values in raster order."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H / 2, W / 2, C], the max of each 2x2 window, its gradient to the window's first maximum: the
  values and gradient of reduce_window max-pooling (select-and-scatter), which XLA:CPU runs ~2x slower."""
  return _windows(x).max(-1)


def _max_pool_forward(x):
  return max_pool_2x2(x), _windows(x).argmax(-1)


def _max_pool_backward(first_max, g):
  b, h, w, c = g.shape
  routed = jax.nn.one_hot(first_max, 4, dtype=g.dtype) * g[..., None]  # [B, h, w, C, 4]
  return (routed.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


class CNN(nnx.Module):
  """images float [B, H, W, C] -> {'patch_tokens': [B, h * w, width] the last stage's ReLU features as tokens,
  'pooled': [B, hidden] the penultimate ReLU layer on the flattened tokens, 'logits': [B, num_classes] a linear head on
  it}. float32 throughout."""

  def __init__(self, spec: CNNSpec, rngs: nnx.Rngs):
    self.spec = spec
    widths = (spec.channels, *spec.stage_channels)
    self.convs = nnx.List([
        nnx.Conv(widths[i] if j == 0 else widths[i + 1], widths[i + 1], (3, 3), padding="SAME", rngs=rngs)
        for i in range(len(spec.stage_channels)) for j in range(spec.convs_per_stage)])
    self.hidden = nnx.Linear(spec.num_tokens * spec.width, spec.hidden, rngs=rngs)
    self.head = nnx.Linear(spec.hidden, spec.num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    b, h, w, c = images.shape
    if (h, w, c) != (*self.spec.image_size, self.spec.channels):
      raise ValueError(f"CNN input [B, H, W, C] = {images.shape} does not match CNNSpec image_size "
                       f"{self.spec.image_size} with {self.spec.channels} channels")
    x = images.astype(jnp.float32)
    for i, conv in enumerate(self.convs):
      if i and i % self.spec.convs_per_stage == 0:
        x = max_pool_2x2(x)
      x = nnx.relu(conv(x))
    tokens = x.reshape(b, -1, self.spec.width)
    pooled = nnx.relu(self.hidden(tokens.reshape(b, -1)))
    return {"patch_tokens": tokens, "pooled": pooled, "logits": self.head(pooled)}
