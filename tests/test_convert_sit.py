"""Official PyTorch SiT checkpoints (REPA, SiT/DispLoss) -> repa_jax: the converted model computes the same function."""
import argparse
import importlib.util
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

from repa_jax.convert.sit import convert_state_dict, read_checkpoint
from repa_jax.convert.torch_layout import to_numpy
from repa_jax.main import convert_to_workdir
from repa_jax.models.repa_sit import model_graphdef
from repa_jax.sample.generate import load_sit_ema
from repa_jax.specs import sharding
from repa_jax.specs.model import model_spec
from repa_jax.train import checkpoint
from repa_jax.train.state import abstract_state, make_optimizer
from tests.processes import ROOT, environment, newest_state, run

torch = pytest.importorskip("torch")
from tests.torch_sit import SiT  # noqa: E402  (needs torch)


def tiny_config(reg: str):
  """configs/tiny.py: SiT depth 4, width 32, 2 heads, 8x8x4 latents, patch 2, 10 classes; REPA at block 2 (16-d)."""
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"reg={reg}")


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
