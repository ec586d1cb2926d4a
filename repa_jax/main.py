"""Entry point: python -m repa_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--mode=train].

Multi-host: add --distributed on a Cloud TPU pod slice (every worker runs the same command), or --coordinator_address,
--num_processes and --process_id elsewhere (e.g. 2 processes on one machine)."""
import json

import jax
from absl import app, flags, logging
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
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with JAX's cluster "
                                  "auto-detection (Cloud TPU pod slices, SLURM, ...).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, to start a multi-process "
                                   "run explicitly (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """jax.distributed.initialize as the flags ask (explicit, automatic, or not at all for a single process); then only
  process 0 logs below warnings."""
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


def main(argv):
  del argv
  initialize_distributed()
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
