"""The training loop: mesh -> state (fresh or restored) -> jitted sharded steps -> logs and checkpoints."""
import json
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from repa_jax.data.pipeline import FeatureBatches
from repa_jax.data.synthetic import SyntheticBatches
from repa_jax.specs import sharding
from repa_jax.train import budget, checkpoint, failures
from repa_jax.train.state import abstract_state, init_state, make_optimizer
from repa_jax.train.step import jit_train_step

# EMA SiT parameters -> (metrics, uint8 image grid [H, W, 3]).
Evaluator = Callable[[dict], tuple[dict, np.ndarray]]


def make_batches(config: ml_collections.ConfigDict, batch_sharding):
  """The batch iterator of config.data.source (with get_state/set_state for checkpoints)."""
  if config.data.source == "features":
    return FeatureBatches(config, batch_sharding)
  if config.data.source == "synthetic":
    return SyntheticBatches(config, batch_sharding)
  raise ValueError(f"config.data.source={config.data.source!r}: use 'features' or 'synthetic'")


def format_metrics(step: int, total_steps: int, metrics: dict, images_per_s: float, elapsed_s: float,
                   steps_done: int) -> str:
  """The progress line: step, loss terms, learning rate, throughput, elapsed time and the ETA at this run's pace."""
  terms = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "lr")
  eta = elapsed_s / max(steps_done, 1) * (total_steps - step)
  return (f"step {step}/{total_steps} | {terms} | lr {metrics['lr']:.2e} | {images_per_s:.1f} img/s | "
          f"elapsed {elapsed_s:.0f} s, ETA {eta:.0f} s")


def train(config: ml_collections.ConfigDict, workdir: str, evaluator: Evaluator | None = None) -> dict:
  """Trains to config.train.steps, resuming from the newest checkpoint in `workdir`. Returns the final state.

  evaluator: called on the EMA SiT parameters every config.evaluate.every_steps steps and at the end (built by the
  entry point, e.g. `evaluate.make_periodic_evaluator`); its metrics go to TensorBoard and <workdir>/eval.jsonl.

  Stops early, after saving, when preempted (SIGTERM); raises FloatingPointError, without saving, on a non-finite
  loss term. With config.train.profile_steps = (first, last), steps first..last (1-indexed) are traced by
  jax.profiler into <workdir>/profile (TensorBoard's profile plugin or Perfetto read it). With a
  config.train.time_budget_s (> 0), the run fixes its number of steps (at most config.train.steps) from its measured
  step time once it has started, and keeps it in <workdir>/train_plan.json (`budget`)."""
  begin = time.perf_counter()
  planned = budget.read_plan(workdir) if config.train.time_budget_s else None
  if planned is not None:
    config = budget.with_steps(config, planned)
  # Mesh, shardings and the state: restored if a checkpoint exists (onto this mesh, whatever mesh wrote it), else new.
  mesh = sharding.config_mesh(config)
  sharding.check_batch_divisible(config.train.batch_size, mesh)
  tx = make_optimizer(config)
  abstract = abstract_state(config, tx)
  state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
  failures.check_workdir(workdir, needed_bytes=(config.train.keep_checkpoints + 1) * state_bytes)
  state_sharding = sharding.state_sharding(abstract, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  batches = make_batches(config, batch_sharding)
  manager = checkpoint.make_manager(workdir, config)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
  restored = checkpoint.restore_latest(manager, target, config)
  if restored is None:
    state = init_state(config, tx, state_sharding)
  else:
    state, data_state = restored
    if data_state:  # empty for a converted checkpoint (repa_jax.convert.sit): the data starts from the beginning
      batches.set_state(data_state)
    logging.info("resumed from step %d", int(state["step"]))

  # The jitted step: donated state, explicit shardings in and out.
  train_step = jit_train_step(config, mesh, state_sharding)

  # The loop: logs every log_every steps (process 0 only), checkpoints every checkpoint_every steps, at the end and on
  # preemption. A step's metrics are checked for NaN/Inf once the next step is dispatched (so the host never stalls
  # the device), and always before its state is saved: a non-finite state is never checkpointed.
  is_lead = jax.process_index() == 0
  writer = SummaryWriter(workdir) if is_lead else None
  step, total = int(state["step"]), config.train.steps
  tick, tick_step = time.perf_counter(), step
  start, start_step = tick, step
  measure = (step + budget.SKIPPED_STEPS, step + budget.SKIPPED_STEPS + budget.MEASURED_STEPS)
  measuring = bool(config.train.time_budget_s) and planned is None and measure[1] < total
  marks = {}
  unchecked = None
  profile_first, profile_last = config.train.profile_steps or (None, None)
  with failures.preemption_check() as preempted:
    try:
      while step < total:
        if step + 1 == profile_first:
          jax.profiler.start_trace(f"{workdir}/profile")
        state, metrics = train_step(state, next(batches))
        step += 1
        if step == profile_last:
          jax.block_until_ready(metrics)
          jax.profiler.stop_trace()
          logging.info("profile of steps %d..%d written to %s/profile", profile_first, profile_last, workdir)
        if unchecked:
          failures.check_finite(*unchecked, manager.latest_step())
        unchecked = (step, metrics)
        if measuring and step in measure:
          jax.block_until_ready(metrics)
          marks[step] = time.perf_counter()
          if step == measure[1]:
            config, total = budget.plan(config, workdir, begin, marks, is_lead)
            train_step = jit_train_step(config, mesh, state_sharding)
            measuring = False
        stop = preempted(step)
        if step % config.train.log_every == 0 or step == total:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          rate = (step - tick_step) * config.train.batch_size / (time.perf_counter() - tick)
          tick, tick_step = time.perf_counter(), step
          if is_lead:
            for name, value in metrics.items():
              writer.add_scalar(f"train/{name}", value, step)
            writer.add_scalar("train/images_per_second", rate, step)
            print(format_metrics(step, total, metrics, rate, time.perf_counter() - start, step - start_step),
                  flush=True)
        if evaluator and (step % config.evaluate.every_steps == 0 or step == total):
          results, grid = evaluator(state["ema_params"]["sit"])
          if is_lead:
            for name, value in results.items():
              writer.add_scalar(f"eval/{name}", value, step)
            writer.add_image("eval/samples", grid, step, dataformats="HWC")
            with open(f"{workdir}/eval.jsonl", "a") as file:
              file.write(json.dumps({"step": step, **results}) + "\n")
            print(f"eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in results.items()), flush=True)
        if step % config.train.checkpoint_every == 0 or step == total or stop:
          failures.check_finite(*unchecked, manager.latest_step())
          unchecked = None
          checkpoint.save(manager, state, batches.get_state(), config)
        if stop:
          logging.warning("preempted: saved step %d, exiting", step)
          if is_lead:
            print(f"preempted at step {step}: checkpoint saved; re-run the same command to resume", flush=True)
          break
    finally:
      manager.wait_until_finished()  # an asynchronous save in flight completes before the process exits
      if writer:
        writer.close()
  return state
