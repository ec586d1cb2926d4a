"""Timing several train steps side by side in one process: repa_jax's jitted step as `train.loop.train` builds it
(on one fixed synthetic batch), and interleaved rounds that give each side the same share of the machine's drift."""
import statistics
import time
from collections.abc import Callable

import jax

from repa_jax.specs import sharding
from repa_jax.train.loop import make_batches
from repa_jax.train.state import abstract_state, init_state, make_optimizer
from repa_jax.train.step import jit_train_step

Step = Callable[[], None]  # one blocking train step


def jax_step(config) -> Step:
  """One jitted repa_jax train step of `config` (data.source 'synthetic') on its first batch, blocking."""
  mesh = sharding.config_mesh(config)
  tx = make_optimizer(config)
  state_sharding = sharding.state_sharding(abstract_state(config, tx), mesh)
  batch = jax.block_until_ready(next(make_batches(config, sharding.batch_sharding(mesh))))
  train_step = jit_train_step(config, mesh, state_sharding)
  holder = {"state": init_state(config, tx, state_sharding)}

  def step():
    holder["state"], metrics = train_step(holder["state"], batch)
    jax.block_until_ready(metrics)
  return step


def interleaved_medians(sides: dict[str, Step], steps: int, rounds: int, warmup: int) -> dict[str, float]:
  """{side: median seconds per step}: `warmup` untimed steps each, then `rounds` rounds of `steps` timed steps of
  every side in turn."""
  for step in sides.values():
    for _ in range(warmup):
      step()
  times = {side: [] for side in sides}
  for _ in range(rounds):
    for side, step in sides.items():
      for _ in range(steps):
        tick = time.perf_counter()
        step()
        times[side].append(time.perf_counter() - tick)
  return {side: statistics.median(values) for side, values in times.items()}
