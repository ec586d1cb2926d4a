"""Inception-v3 of the FID graph (TF `inception-2015-12-05`, as ported by pytorch-fid: `InceptionV3` with
use_fid_inception=True), NHWC: the feature network of FID, sFID, IS and precision/recall on ImageNet.

`features(model, images)`: uint8 or [0, 1] float images [B, H, W, 3] -> pytorch-fid's preprocessing (torch bilinear
resize to 299 x 299, align_corners=False, no antialias; x -> 2x - 1) -> {'pool', 'logits', 'spatial'}:
- pool [B, 2048]: the final average pool (TF `pool_3`; FID, precision/recall),
- logits [B, 1008]: pool @ fc weight, without fc's bias, as the ADM evaluator's IS (`softmax/logits/MatMul`),
- spatial [B, 2023]: the first 7 channels of TF `mixed_6/conv` (Mixed_6d's 1x1 branch after ReLU, 17 x 17), flattened
  in (row, column, channel) order, as the ADM evaluator's sFID.
The FID variants of the blocks: average pools in Mixed_5*, 6b-e and 7b skip padded zeros (count_include_pad=False);
Mixed_7c's pool branch max-pools. BatchNorm (eps 1e-3) is folded into each conv's kernel and bias by the converter.
Convolutions run in float32 at HIGHEST precision (the metric must not depend on the TPU's default bf16 passes).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
HIGHEST = jax.lax.Precision.HIGHEST


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32 matrix of torch's 1-D bilinear resampling (align_corners=False, no antialias): source
  coordinate max(s (i + 0.5) - 0.5, 0) with s = n_in / n_out in float32 and the coordinate rounded to float32 once
  (torch's CPU kernel: a fused multiply-add); taps clamped at the border."""
  f32 = np.float32
  scale = np.float64(f32(n_in) / f32(n_out))
  src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(f32), f32(0))  # exact in float64, one rounding
  first = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  frac = np.clip(src - first.astype(f32), 0, 1)
  weights = np.zeros((n_out, n_in), np.float32)
  np.add.at(weights, (np.arange(n_out), first), 1 - frac)
  np.add.at(weights, (np.arange(n_out), np.minimum(first + 1, n_in - 1)), frac)
  return weights


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch `F.interpolate(mode='bilinear', align_corners=False)` on NHWC: [B, H, W, C] -> [B, H', W', C] float32
  (no antialiasing when downsampling, unlike `jax.image.resize`)."""
  rows = jnp.asarray(bilinear_weights(x.shape[1], size[0]))
  cols = jnp.asarray(bilinear_weights(x.shape[2], size[1]))
  x = jnp.einsum("oh,bhwc->bowc", rows, x.astype(jnp.float32), precision=HIGHEST)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=HIGHEST)


def preprocess(images: jax.Array) -> jax.Array:
  """pytorch-fid's input path: uint8 [B, H, W, 3] (scaled by 1 / 255) or float in [0, 1] -> bilinear to 299 x 299
  -> 2x - 1. Returns float32 [B, 299, 299, 3] in [-1, 1]."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Inception input must be RGB images [B, H, W, 3], got {images.shape}; convert grayscale to RGB")
  x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
  return 2 * resize_bilinear(x, (SIZE, SIZE)) - 1


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """3 x 3 max pool (padding with -inf, as torch). [B, H, W, C] -> [B, H', W', C]."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool(x: jax.Array) -> jax.Array:
  """3 x 3 stride-1 average pool with padding 1 that does not count the padded zeros (TF's; torch
  count_include_pad=False). [B, H, W, C] -> [B, H, W, C]."""
  def box_sum(a):
    return jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))

  return box_sum(x) / box_sum(jnp.ones((1, *x.shape[1:3], 1), x.dtype))


class BasicConv(nnx.Module):
  """torch `BasicConv2d` with its BatchNorm folded in: conv (kernel, bias) -> ReLU. [B, H, W, in] -> [B, H', W', out].
  `padding` (ph, pw) pads both sides, as torch's."""

  def __init__(self, din: int, dout: int, kernel: int | tuple[int, int], rngs: nnx.Rngs, *, stride: int = 1,
               padding: int | tuple[int, int] = 0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(din, dout, kernel, stride, padding=((ph, ph), (pw, pw)), precision=HIGHEST, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.conv(x))


class InceptionA(nnx.Module):
  """35 x 35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1.
  [B, 35, 35, in] -> [B, 35, 35, 224 + pool_features]."""

  def __init__(self, din: int, pool_features: int, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv, rngs=rngs)
    self.branch1x1 = conv(din, 64, 1)
    self.branch5x5_1 = conv(din, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(din, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(din, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                            self.branch_pool(avg_pool(x))], axis=-1)


class InceptionB(nnx.Module):
  """35 -> 17 reduction: 3x3 / 2 | 1x1 -> 3x3 -> 3x3 / 2 | max pool / 2. [B, 35, 35, in] -> [B, 17, 17, 480 + in]."""

  def __init__(self, din: int, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv, rngs=rngs)
    self.branch3x3 = conv(din, 384, 3, stride=2)
    self.branch3x3dbl_1 = conv(din, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                            max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
  """17 x 17 block with factorised 7x7 convs: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> (7x1 -> 1x7) x 2 | avg pool -> 1x1.
  [B, 17, 17, 768] -> [B, 17, 17, 768]; the 1x1 branch is the first 192 channels."""

  def __init__(self, din: int, channels_7x7: int, rngs: nnx.Rngs):
    conv, c7 = functools.partial(BasicConv, rngs=rngs), channels_7x7
    self.branch1x1 = conv(din, 192, 1)
    self.branch7x7_1 = conv(din, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(din, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(din, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d7 = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      d7 = layer(d7)
    return jnp.concatenate([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool(x))], axis=-1)


class InceptionD(nnx.Module):
  """17 -> 8 reduction: 1x1 -> 3x3 / 2 | 1x1 -> 1x7 -> 7x1 -> 3x3 / 2 | max pool / 2.
  [B, 17, 17, 768] -> [B, 8, 8, 1280]."""

  def __init__(self, din: int, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv, rngs=rngs)
    self.branch3x3_1 = conv(din, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = conv(din, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """8 x 8 block with split 1x3 / 3x1 convs: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1.
  `pool`: 'avg' (Mixed_7b) or 'max' (Mixed_7c, the FID graph's). [B, 8, 8, in] -> [B, 8, 8, 2048]."""

  def __init__(self, din: int, pool: str, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"InceptionE pool={pool!r}: use 'avg' or 'max'")
    self.pool = pool
    conv = functools.partial(BasicConv, rngs=rngs)
    self.branch1x1 = conv(din, 320, 1)
    self.branch3x3_1 = conv(din, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(din, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(din, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_1(x)
    d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = avg_pool(x) if self.pool == "avg" else max_pool(x, 1, padding=1)
    return jnp.concatenate([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """The FID Inception-v3 (torchvision `Inception3` names). Preprocessed images [B, 299, 299, 3] in [-1, 1] ->
  {'pool': [B, 2048], 'logits': [B, 1008] (no bias), 'spatial': [B, 17 * 17 * 7]}, float32."""

  def __init__(self, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv, rngs=rngs)
    self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = conv(32, 32, 3)
    self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = conv(64, 80, 1)
    self.Conv2d_4a_3x3 = conv(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32, rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs)
    self.Mixed_6a = InceptionB(288, rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs)
    self.Mixed_7a = InceptionD(768, rngs)
    self.Mixed_7b = InceptionE(1280, "avg", rngs)
    self.Mixed_7c = InceptionE(2048, "max", rngs)
    self.fc = nnx.Linear(2048, NUM_CLASSES, use_bias=False, precision=HIGHEST, rngs=rngs)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if x.shape[1:] != (SIZE, SIZE, 3):
      raise ValueError(f"InceptionV3 input must be [B, {SIZE}, {SIZE}, 3] (see `preprocess`), got {x.shape}")
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x.astype(jnp.float32))))
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x, 2))), 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
      x = block(x)
    x = self.Mixed_6d(x)
    spatial = x[..., :SPATIAL_CHANNELS].reshape(len(x), -1)  # channels 0-6 of the 1x1 branch = TF mixed_6/conv
    for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    pool = x.mean(axis=(1, 2))
    return {"pool": pool, "logits": self.fc(pool), "spatial": spatial}


def features(model: InceptionV3, images: jax.Array) -> dict[str, jax.Array]:
  """uint8 or [0, 1] float images [B, H, W, 3] -> the model's outputs on `preprocess`ed images (pytorch-fid's)."""
  return model(preprocess(images))
