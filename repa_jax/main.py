"""Entry point: python -m repa_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--mode=train]."""
import json

from absl import app, flags
from ml_collections import config_flags

from repa_jax.data.precompute import precompute
from repa_jax.evaluate.evaluate import evaluate_npz
from repa_jax.sample.generate import generate, output_dir
from repa_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/tiny.py:reg=both.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["precompute", "train", "sample", "evaluate"],
                          "precompute: build the config's feature dataset; train: train (resuming in --workdir); "
                          "sample: EMA samples of a checkpoint in --workdir to .npz + PNG; evaluate: metrics of --samples.")
_SAMPLES = flags.DEFINE_string("samples", None, "--mode=evaluate: the ADM-format .npz to evaluate (default: what "
                                "--mode=sample wrote for this config from the newest checkpoint in --workdir).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _MODE.value == "precompute":
    precompute(_CONFIG.value)
  elif _MODE.value == "train":
    train(_CONFIG.value, _WORKDIR.value)
  elif _MODE.value == "sample":
    print(generate(_CONFIG.value, _WORKDIR.value))
  elif _MODE.value == "evaluate":
    samples = _SAMPLES.value or str(output_dir(_CONFIG.value, _WORKDIR.value) / "samples.npz")
    print(json.dumps(evaluate_npz(_CONFIG.value, samples), indent=2))


if __name__ == "__main__":
  app.run(main)
