"""A minimal PyTorch re-implementation of the official SiT (sihyun-yu/REPA models/sit.py; willisma/SiT models.py for
learn_sigma), with its module names; timm's PatchEmbed, Attention and Mlp are written out. The converter's parity
reference (tests/test_convert_sit.py) and the official side of benchmarks/compare_pytorch.py."""
import math

import numpy as np
import torch
from torch import nn


def get_2d_sincos_pos_embed(embed_dim, grid_size):
  grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)), axis=0)
  grid = grid.reshape([2, 1, grid_size, grid_size])  # grid[0]: the column (w goes first), grid[1]: the row

  def embed_1d(dim, pos):
    omega = 1. / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([embed_1d(embed_dim // 2, grid[0]), embed_1d(embed_dim // 2, grid[1])], axis=1)


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
  def __init__(self, patch, in_chans, dim):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch, bias=True)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # BCHW -> BNC


class TimestepEmbedder(nn.Module):
  def __init__(self, dim, frequency_embedding_size=256):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))
    self.frequency_embedding_size = frequency_embedding_size

  def forward(self, t):
    half = self.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes, dim):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, dim)  # + the CFG null class

  def forward(self, labels):
    return self.embedding_table(labels)


class Attention(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU(approximate="tanh")
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

  def forward(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
  def __init__(self, dim, patch, out_channels):
    super().__init__()
    self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(dim, patch * patch * out_channels, bias=True)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


def build_mlp(hidden_size, projector_dim, z_dim):
  return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                       nn.SiLU(), nn.Linear(projector_dim, z_dim))


class SiT(nn.Module):
  """forward(x NCHW, t, y) -> (velocity NCHW, [projector outputs of block encoder_depth])."""

  def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=10,
               z_dims=(16,), projector_dim=64, encoder_depth=2, learn_sigma=False):
    super().__init__()
    self.learn_sigma, self.in_channels, self.patch_size = learn_sigma, in_channels, patch_size
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.encoder_depth = encoder_depth
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    pos_embed = get_2d_sincos_pos_embed(hidden_size, input_size // patch_size)
    self.pos_embed = nn.Parameter(torch.from_numpy(pos_embed).float().unsqueeze(0), requires_grad=False)
    self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads) for _ in range(depth)])
    self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z_dim) for z_dim in z_dims])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

  def unpatchify(self, x):
    c, p = self.out_channels, self.patch_size
    h = w = int(x.shape[1] ** 0.5)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
    return x.reshape(x.shape[0], c, h * p, w * p)

  def forward(self, x, t, y):
    x = self.x_embedder(x) + self.pos_embed
    n, tokens, d = x.shape
    c = self.t_embedder(t) + self.y_embedder(y)
    zs = []
    for i, block in enumerate(self.blocks):
      x = block(x, c)
      if i + 1 == self.encoder_depth:
        zs = [projector(x.reshape(-1, d)).reshape(n, tokens, -1) for projector in self.projectors]
    x = self.unpatchify(self.final_layer(x, c))
    if self.learn_sigma:
      x, _ = x.chunk(2, dim=1)
    return x, zs
