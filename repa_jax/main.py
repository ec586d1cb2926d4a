"""Entry point: python -m repa_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--mode=train]."""
from absl import app, flags
from ml_collections import config_flags

from repa_jax.data.precompute import precompute
from repa_jax.sample.generate import generate
from repa_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/tiny.py:reg=both.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["precompute", "train", "sample"],
                          "precompute: build the config's feature dataset; train: train (resuming in --workdir); "
                          "sample: EMA samples of a checkpoint in --workdir to .npz + PNG.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _MODE.value == "precompute":
    precompute(_CONFIG.value)
  elif _MODE.value == "train":
    train(_CONFIG.value, _WORKDIR.value)
  elif _MODE.value == "sample":
    print(generate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
