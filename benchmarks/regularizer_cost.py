"""What each regulariser preset costs per train step, side by side in one process (interleaved rounds).

  python benchmarks/regularizer_cost.py [--config=fashion_mnist] [--regs=none,repa,disperse,both,irepa,sra,reg]

Each preset is `configs/<config>.py:reg=<preset>` on synthetic data of its shapes (float32, the config's batch and
remat), built as `repa_jax.train.loop.train` builds its step; the ratio is each preset's median step time over the
first preset's. SRA's extra cost is the EMA model's forward pass up to its teacher block; REG's is one more token.
The load average is printed before and after.
"""
import os
import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root, for configs/
from benchmarks.side_by_side import interleaved_medians, jax_step  # noqa: E402
from configs import fashion_mnist, imagenet  # noqa: E402
from repa_jax.config import REGULARIZERS  # noqa: E402

CONFIGS = {"fashion_mnist": fashion_mnist.get_config, "imagenet_S2": lambda arg: imagenet.get_config(f"model=S/2,{arg}")}
_CONFIG = flags.DEFINE_enum("config", "fashion_mnist", list(CONFIGS), "The config file (ImageNet: SiT-S/2).")
_REGS = flags.DEFINE_list("regs", ["none", "repa", "disperse", "both", "irepa", "sra", "reg"],
                          f"Presets, of {sorted(REGULARIZERS)}; the first is the reference.")
_BATCH = flags.DEFINE_integer("batch", None, "config.train.batch_size (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per preset and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (each times every preset).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per preset first.")


def preset_config(reg: str):
  config = CONFIGS[_CONFIG.value](f"reg={reg}")
  config.model.dtype = "float32"
  config.data.source = "synthetic"
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
  return config


def main(argv):
  del argv
  sides = {reg: jax_step(preset_config(reg)) for reg in _REGS.value}
  load_before = os.getloadavg()[0]
  medians = interleaved_medians(sides, _STEPS.value, _ROUNDS.value, _WARMUP.value)
  reference = _REGS.value[0]
  batch = preset_config(reference).train.batch_size
  print(f"{_CONFIG.value}, batch {batch}, {os.cpu_count()} CPUs, load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
  print(f"| preset | ms / step | x {reference} |\n|---|---|---|")
  for reg, seconds in medians.items():
    print(f"| {reg} | {seconds * 1e3:.1f} | {seconds / medians[reference]:.2f} |")
  print("SUMMARY " + " ".join(f"{reg}_ms={s * 1e3:.2f}" for reg, s in medians.items()) +
        f" loadavg_1m={os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
