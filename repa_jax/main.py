"""Entry point: python -m repa_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--mode=train].

The one place that puts the layers together: it builds the periodic evaluator it hands to `train()`, and writes the
repa_jax checkpoint of converted official weights (--mode=convert --checkpoint=last.pt).

Multi-host: add --distributed on a Cloud TPU pod slice (every worker runs the same command), or --coordinator_address,
--num_processes and --process_id elsewhere (e.g. 2 processes on one machine)."""
import contextlib
import json
import os
import time

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from repa_jax.convert.sit import SOURCES, convert_state_dict, read_checkpoint
from repa_jax.data.precompute import precompute
from repa_jax.evaluate.evaluate import evaluate_npz, periodic_evaluator
from repa_jax.sample.generate import GRID_FILE, generate, samples_to_evaluate
from repa_jax.train import checkpoint
from repa_jax.train.loop import train
from repa_jax.train.state import make_optimizer, new_state
from repa_jax.validate import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/tiny.py:reg=both.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and logs (every mode but "
                                "precompute, which writes config.data.directory).")
_MODE = flags.DEFINE_enum("mode", "train", ["precompute", "train", "sample", "evaluate", "convert"],
                          "precompute: build the config's feature dataset; train: train (resuming in --workdir); "
                          "sample: EMA samples of a checkpoint in --workdir to .npz + PNG; evaluate: metrics of "
                          "--samples; convert: an official SiT/REPA --checkpoint as checkpoint 0 of a new --workdir.")
_SAMPLES = flags.DEFINE_string("samples", None, "--mode=evaluate: the ADM-format .npz to evaluate (default: what "
                                "--mode=sample wrote for this config from the newest checkpoint in --workdir).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with JAX's cluster "
                                  "auto-detection (Cloud TPU pod slices, SLURM, ...).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, to start a multi-process "
                                   "run explicitly (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "--mode=convert: the official .pt file (last.pt, "
                                  "SiT-XL-2-256x256.pt, or a train.py checkpoint).")
_WHICH = flags.DEFINE_enum("which", "ema", ["ema", "model"], "--mode=convert: the weights of a training checkpoint to "
                           "convert (ignored for bare state dicts such as the releases).")
_SOURCE = flags.DEFINE_enum("source", None, list(SOURCES), "--mode=convert: repa: sihyun-yu/REPA; sit: willisma/SiT "
                            "or raywang4/DispLoss (time reversed). Default: told by the presence of projectors.*.")
flags.mark_flags_as_required(["config"])


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


def log_to_workdir(workdir: str | None) -> None:
  """absl/Orbax/JAX log lines go to <workdir>/logs/repa_jax.* (without a workdir: absl's default directory); the
  console shows warnings and the progress lines."""
  if workdir is not None:
    log_dir = os.path.join(workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file("repa_jax", log_dir)
  flags.FLAGS.stderrthreshold = "warning"


@contextlib.contextmanager
def stage(name: str):
  """Prints the stage's start and end with the machine's 1-minute load average (timings are only comparable on a
  quiet machine) and its wall time."""
  start = time.time()
  if jax.process_index() == 0:
    print(f"== {name}: start (1-min load average {os.getloadavg()[0]:.2f})", flush=True)
  yield
  if jax.process_index() == 0:
    print(f"== {name}: done in {time.time() - start:.0f} s (1-min load average {os.getloadavg()[0]:.2f})", flush=True)


def convert_to_workdir(checkpoint_path: str, config: ml_collections.ConfigDict, workdir: str, which: str = "ema",
                       source: str | None = None) -> str:
  """Writes converted official weights as checkpoint step 0 of `workdir` (params = EMA = the weights, a fresh
  optimizer state, an unread data iterator), which --mode=sample samples and --mode=train fine-tunes. Returns the
  checkpoint's directory."""
  directory = checkpoint.checkpoint_dir(workdir)
  if directory.exists() and any(directory.iterdir()):
    raise FileExistsError(f"{directory} is not empty: convert into a new --workdir")
  params = convert_state_dict(read_checkpoint(checkpoint_path, which), config, source)
  manager = checkpoint.make_manager(workdir, config)
  checkpoint.save(manager, new_state(params, make_optimizer(config)), {}, config)  # no data position: from the start
  manager.wait_until_finished()
  manager.close()
  return str(directory / "0")


def needed_flags() -> None:
  """Refuses a mode without the flags it needs, naming them."""
  needed = {"precompute": [], "convert": ["workdir", "checkpoint"]}.get(_MODE.value, ["workdir"])
  missing = [f"--{name}" for name in needed if flags.FLAGS[name].value is None]
  if missing:
    raise app.UsageError(f"--mode={_MODE.value} needs {' and '.join(missing)}")


def summary_line(metrics: dict, samples: str) -> str:
  """One line naming the grid and the metrics file with FD and class accuracy beside their real-data floor."""
  floor = metrics["floor"]
  if floor is None:
    numbers = f"FD {metrics['fid']:.2f} (no real-data floor: config.evaluate.floor_split is empty)"
  else:
    numbers = f"FD {metrics['fid']:.2f} (real-data floor {floor['fid']:.2f}, ratio {metrics['fid'] / floor['fid']:.2f})"
  if "class_accuracy" in metrics:
    numbers += f", class accuracy {metrics['class_accuracy']:.3f}"
    numbers += f" (real test images {floor['class_accuracy']:.3f})" if floor else ""
  grid = os.path.join(os.path.dirname(samples), GRID_FILE)
  return f"grid {grid} | metrics {samples}.metrics.json | {numbers}"


def main(argv):
  del argv
  needed_flags()
  config = _CONFIG.value
  validate(config)
  log_to_workdir(_WORKDIR.value)
  initialize_distributed()
  with stage(_MODE.value):
    if _MODE.value == "precompute":
      precompute(config)
    elif _MODE.value == "train":
      train(config, _WORKDIR.value, periodic_evaluator(config))
    elif _MODE.value == "convert":
      print(f"wrote {convert_to_workdir(_CHECKPOINT.value, config, _WORKDIR.value, _WHICH.value, _SOURCE.value)}")
    elif _MODE.value == "sample":
      print(generate(config, _WORKDIR.value))
    elif _MODE.value == "evaluate":
      samples = _SAMPLES.value or str(samples_to_evaluate(config, _WORKDIR.value))
      metrics = evaluate_npz(config, samples)
      print(json.dumps(metrics, indent=2))
  if _MODE.value == "evaluate":
    print(summary_line(metrics, samples), flush=True)


if __name__ == "__main__":
  app.run(main)
