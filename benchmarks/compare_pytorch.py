"""repa_jax's jitted train step vs the official PyTorch step, side by side in one process on identical shapes.

  pip install -e ".[test,parity]"   # torch
  python benchmarks/compare_pytorch.py [--cases=fashion_mnist,S/2,B/2] [--steps=20] [--rounds=3]

The official side is this project's PyTorch re-implementation of REPA's step (tests/torch_sit.py: the official SiT
with REPA's projectors and module names; the arithmetic of REPA's loss.py `SILoss` and train.py): label dropout
(p = 0.1), the latent drawn from the stored posterior times the scale, x_t = (1 - t) x + t eps with t from the
config's time sampler, the per-sample mean squared velocity error, REPA's per-token negative cosine times λ, backward,
gradient clipping at norm 1, AdamW, and the EMA update `ema.mul_(decay).add_(p, alpha=1 - decay)`, float32, with
torch's intra-op threads = the CPU count (2 here). The repa_jax side is `jit_train_step` on the same batch shapes
(synthetic data). Cases: the Fashion-MNIST default (configs/fashion_mnist.py:reg=repa, batch 32), and SiT-S/2 and
B/2 + REPA on 256 px ImageNet latents (32x32x4, DINOv2-B features 256 x 768, block 4) at batch 8.

Each round times --steps steps of one side, then of the other (median per side, after warm-up); the ratio is
PyTorch's median step time over repa_jax's (> 1: repa_jax is faster). The load average is printed beside each case.
"""
import os
import pathlib
import sys

import jax
import torch
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root, for configs/, tests/
from configs import fashion_mnist, imagenet  # noqa: E402
from benchmarks.side_by_side import interleaved_medians, jax_step  # noqa: E402
from repa_jax.specs.model import REMAT, sit_spec  # noqa: E402
from tests.torch_sit import SiT  # noqa: E402

CASES = {"fashion_mnist": (lambda: fashion_mnist.get_config("reg=repa"), None),
         "S/2": (lambda: imagenet.get_config("model=S/2,reg=repa,res=256"), 8),
         "B/2": (lambda: imagenet.get_config("model=B/2,reg=repa,res=256"), 8)}
_CASES = flags.DEFINE_list("cases", list(CASES), f"Cases, of {list(CASES)}.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per side and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (each times both sides).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per side first.")
_REMAT = flags.DEFINE_enum("remat", None, list(REMAT), "repa_jax's model.remat (default: the case config's; it "
                           "changes what the backward pass stores, not what is computed).")


def case_config(name: str):
  """The case's config: float32, synthetic data, its batch, AdamW (the official step's optimizer; the Fashion-MNIST
  default trains with Muon)."""
  make, batch = CASES[name]
  config = make()
  config.model.dtype = "float32"
  config.train.optimizer = "adamw"
  config.data.source = "synthetic"
  if _REMAT.value:
    config.model.remat = _REMAT.value
  if batch:
    config.train.batch_size = batch
  return config


def torch_side(config):
  """(step(): one official-arithmetic PyTorch train step on a fixed random batch of the same shapes)."""
  spec, ((_, width),) = sit_spec(config), config.align.encoders
  assert spec.input_size[0] == spec.input_size[1], "the official SiT takes square inputs"
  shape = dict(input_size=spec.input_size[0], patch_size=spec.patch, in_channels=spec.in_channels,
               hidden_size=spec.width, depth=spec.depth, num_heads=spec.num_heads, num_classes=spec.num_classes,
               z_dims=(width,), projector_dim=config.align.projector_dim, encoder_depth=config.align.block)
  model, ema = SiT(**shape).train(), SiT(**shape)
  ema.load_state_dict(model.state_dict())
  ema.requires_grad_(False)
  t = config.train
  params = [p for n, p in model.named_parameters() if n != "pos_embed"]
  ema_params = [p for n, p in ema.named_parameters() if n != "pos_embed"]
  optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay)
  b, (h, w, c) = t.batch_size, spec.input_size + (spec.in_channels,)
  mean, std = torch.randn(b, c, h, w), 0.1 * torch.rand(b, c, h, w)
  labels, features = torch.randint(0, spec.num_classes, (b,)), torch.randn(b, spec.num_tokens, width)
  lognormal = config.flow.time_sampler == "lognormal"

  def step():
    y = torch.where(torch.rand(b) < t.label_dropout, spec.num_classes, labels)
    x = (mean + std * torch.randn_like(mean)) * config.data.latent_scale
    time_ = torch.sigmoid(torch.randn(b)) if lognormal else torch.rand(b)
    noise = torch.randn_like(x)
    x_t = (1 - time_.view(-1, 1, 1, 1)) * x + time_.view(-1, 1, 1, 1) * noise
    v, zs = model(x_t, time_, y)
    denoising = ((v - (noise - x)) ** 2).mean(dim=(1, 2, 3)).mean()
    cosine = (torch.nn.functional.normalize(zs[0], dim=-1) * torch.nn.functional.normalize(features, dim=-1)).sum(-1)
    loss = denoising + config.align.weight * (-cosine.mean())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_mul_(ema_params, t.ema_decay)
      torch._foreach_add_(ema_params, params, alpha=1 - t.ema_decay)
  return step


def main(argv):
  del argv
  torch.set_num_threads(os.cpu_count())
  print(f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}")
  for name in _CASES.value:
    config = case_config(name)
    spec = sit_spec(config)
    sides = {"repa_jax": jax_step(config), "pytorch": torch_side(config)}
    load_before = os.getloadavg()[0]
    medians = interleaved_medians(sides, _STEPS.value, _ROUNDS.value, _WARMUP.value)
    ratio = medians["pytorch"] / medians["repa_jax"]
    print(f"{name}: SiT depth {spec.depth} width {spec.width} tokens {spec.num_tokens}, batch "
          f"{config.train.batch_size}, remat {config.model.remat} | repa_jax {medians['repa_jax'] * 1e3:.1f} ms/step, PyTorch "
          f"{medians['pytorch'] * 1e3:.1f} ms/step | repa_jax is {ratio:.2f}x the official step's speed | "
          f"load {load_before:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
    print(f"SUMMARY case={name} remat={config.model.remat} jax_ms={medians['repa_jax'] * 1e3:.2f} torch_ms={medians['pytorch'] * 1e3:.2f} "
          f"ratio={ratio:.3f} loadavg_1m={os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
