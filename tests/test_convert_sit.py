"""Official PyTorch SiT checkpoints (REPA, SiT/DispLoss) -> repa_jax: the converted model computes the same function."""
import argparse
import importlib.util
import math
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

from repa_jax.convert.sit import convert_state_dict, read_checkpoint
from repa_jax.main import convert_to_workdir
from repa_jax.convert.torch_layout import to_numpy
from repa_jax.sample.generate import load_sit_ema
from repa_jax.specs import sharding
from repa_jax.train import checkpoint
from repa_jax.models.repa_sit import model_graphdef
from repa_jax.specs.model import model_spec
from repa_jax.train.state import abstract_state, make_optimizer
from tests.processes import ROOT, environment, newest_state, run

torch = pytest.importorskip("torch")
nn = torch.nn


def tiny_config(reg: str):
  """configs/tiny.py: SiT depth 4, width 32, 2 heads, 8x8x4 latents, patch 2, 10 classes; REPA at block 2 (16-d)."""
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"reg={reg}")


# A minimal re-implementation of the official SiT (sihyun-yu/REPA models/sit.py; willisma/SiT models.py for
# learn_sigma), with its module names. timm's PatchEmbed, Attention and Mlp are written out.

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


def random_sit(seed=0, **kwargs) -> SiT:
  """The official model with random non-zero weights everywhere (adaLN and the final layer are zero-initialised
  officially), except the fixed pos_embed."""
  torch.manual_seed(seed)
  model = SiT(**kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":
        p.normal_(0.0, 0.15)
  return model


def inputs(seed=1, batch=3):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
  t = rng.uniform(size=batch).astype(np.float32)
  return x, t, np.array([3, 10, 7][:batch], np.int64)  # 10: the null class


def repa_jax_forward(params, config, x, t, y):
  """(velocity NCHW, {encoder: projector output}) of the converted model."""
  graphdef = model_graphdef(model_spec(config))

  @jax.jit
  def forward(params, x, t, y):
    model = nnx.merge(graphdef, params)
    v, hiddens = model.sit(x.transpose(0, 2, 3, 1), t, y, hidden_blocks=(config.align.block,))
    return v.transpose(0, 3, 1, 2), {name: p(hiddens[config.align.block]) for name, p in model.projectors.items()}

  return jax.tree.map(np.asarray, forward(params, x, t, y))


def torch_forward(model, x, t, y):
  with torch.no_grad():
    v, zs = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
  return v.numpy(), [z.numpy() for z in zs]


def max_relative_error(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("reg, z_dims", [("repa", (16,)), ("none", (0,))])  # REPA off: the official z_dims = [0]
def test_repa_checkpoint_computes_the_official_function(reg, z_dims):
  config = tiny_config(reg)
  model = random_sit(z_dims=z_dims)
  params = convert_state_dict(to_numpy(model.state_dict()), config)
  x, t, y = inputs()
  v_torch, zs_torch = torch_forward(model, x, t, y)
  v, zs = repa_jax_forward(params, config, x, t, y)
  assert np.abs(v_torch).max() > 1  # random adaLN and final layer: a non-trivial output
  assert max_relative_error(v, v_torch) < 2e-5, np.abs(v - v_torch).max()
  if reg == "repa":
    assert max_relative_error(zs["toy_encoder"], zs_torch[0]) < 2e-5, np.abs(zs["toy_encoder"] - zs_torch[0]).max()
  else:
    assert zs == {}


def test_sit_checkpoint_drops_sigma_and_reverses_time():
  """willisma/SiT and DispLoss: learn_sigma (8 output channels), no projectors, t = 0 noise. The converted model is
  the repa_jax-convention velocity v(x, t) = -v_sit(x, 1 - t)."""
  config = tiny_config("none")
  model = random_sit(z_dims=(), learn_sigma=True)
  assert model.state_dict()["final_layer.linear.weight"].shape[0] == 2 * 2 * 8
  params = convert_state_dict(to_numpy(model.state_dict()), config)
  x, t, y = inputs()
  v_torch, _ = torch_forward(model, x, 1 - t, y)
  v, _ = repa_jax_forward(params, config, x, t, y)
  assert max_relative_error(v, -v_torch) < 2e-5, np.abs(v + v_torch).max()


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=3), "has 3 blocks"),
    (dict(hidden_size=48), r"'pos_embed' of shape \(1, 16, 48\)"),
    (dict(num_classes=20), r"'y_embedder.embedding_table.weight' of shape \(21, 32\)"),
    (dict(z_dims=(8,)), r"'projectors.0.4.bias' of shape \(8,\)"),
    (dict(z_dims=(16, 16)), r"no place in the config's model, e.g. \['projectors.1.0.bias'"),
])
def test_refuses_another_model(kwargs, message):
  with pytest.raises(ValueError, match=message):
    convert_state_dict(to_numpy(random_sit(**kwargs).state_dict()), tiny_config("repa"))


def test_reads_training_and_legacy_checkpoints(tmp_path):
  """train.py's {'model', 'ema', 'opt', 'args', 'steps'} (args an argparse.Namespace); REPA's legacy block names."""
  config = tiny_config("repa")
  model, ema = random_sit(seed=0), random_sit(seed=1)
  path = str(tmp_path / "0400000.pt")
  torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}, "param_groups": []},
              "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=8), "steps": 400000}, path)
  for which, source in (("ema", ema), ("model", model)):
    read = read_checkpoint(path, which)
    assert all(np.array_equal(read[k], v.numpy()) for k, v in source.state_dict().items())
  legacy = {k.replace("blocks.2.", "decoder_blocks.0.").replace("blocks.3.", "decoder_blocks.1."): v
            for k, v in to_numpy(ema.state_dict()).items()}
  assert "decoder_blocks.1.attn.qkv.weight" in legacy
  equal = jax.tree.map(np.array_equal, convert_state_dict(legacy, config),
                       convert_state_dict(to_numpy(ema.state_dict()), config))
  assert all(jax.tree.leaves(equal))


def test_entry_point_writes_a_checkpoint_to_sample_and_fine_tune(tmp_path):
  config = tiny_config("repa")
  ema = random_sit(seed=1)
  path = str(tmp_path / "last.pt")
  torch.save({"model": random_sit(seed=0).state_dict(), "ema": ema.state_dict(), "opt": {}, "args":
              argparse.Namespace(model="SiT-XL/2")}, path)
  workdir = tmp_path / "run"
  out = run([sys.executable, "-m", "repa_jax.main", "--mode=convert",
             f"--checkpoint={path}", "--config=configs/tiny.py:reg=repa", f"--workdir={workdir}"],
            environment(1, tmp_path / "cache"))
  assert "checkpoints/0" in out.stdout
  expected = jax.tree.map(np.asarray, convert_state_dict(to_numpy(ema.state_dict()), config))

  mesh = sharding.make_mesh(("data", "fsdp"), (1, 1), jax.devices()[:1])
  sit, step = load_sit_ema(config, str(workdir), mesh)  # what --mode=sample reads
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, sit), expected["sit"])
  device = SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract_state(config, make_optimizer(config))["ema_params"])
  ema_params, _ = checkpoint.restore_ema_params(str(workdir), target, config)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ema_params), expected)

  state = newest_state(workdir, config)  # what --mode=train resumes from
  assert int(state["step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, state["params"], expected)
  assert not any(np.any(leaf) for leaf in jax.tree.leaves(state["opt_state"]))  # fresh Adam moments and count

  with pytest.raises(FileExistsError, match="not empty"):
    convert_to_workdir(path, config, str(workdir))
