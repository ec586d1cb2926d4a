"""A training run sized to a wall-clock budget (config.train.time_budget_s).

The run measures its step time over a few steps after it starts, fixes its number of steps N once (at most
config.train.steps) and writes N to <workdir>/train_plan.json; from then on it is the fixed-length run of N steps:
its learning rate so far did not depend on N (constant after the warm-up, or the 'cooldown' schedule before its
decay), so the result equals `--config.train.steps=N` without a budget, and a resumed run reads N back. The budget
may also cover what runs after training (sampling, evaluation): config.train.time_budget_reserve_steps keeps that
many steps' worth of time for it, which scales with the machine as those stages do.
"""
import json
import math
import time

import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

PLAN_FILE = "train_plan.json"
SKIPPED_STEPS = 20  # after the (re)start, before the measurement: compilation, then steps slower than the rest
MEASURED_STEPS = 50


def read_plan(workdir: str) -> int | None:
  """The planned number of steps of the run in `workdir` (a local or gs:// path), None before it is decided."""
  path = epath.Path(workdir) / PLAN_FILE
  return int(json.loads(path.read_text())["steps"]) if path.exists() else None


def write_plan(workdir: str, steps: int, measurement: dict) -> None:
  (epath.Path(workdir) / PLAN_FILE).write_text(json.dumps({"steps": steps, **measurement}, indent=1))


def with_steps(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """A copy of `config` with train.steps = steps."""
  config = config.copy_and_resolve_references()
  config.train.steps = steps
  return config


def shortest_consistent(config: ml_collections.ConfigDict, steps_done: int) -> int:
  """The fewest total steps whose learning-rate schedule equals every longer one's over the first `steps_done`
  steps ('cooldown': the decay may only start after them; 'constant': any)."""
  if config.train.lr_schedule == "cooldown":
    return math.ceil((steps_done + 1) / (1 - config.train.cooldown_fraction)) + 1
  return steps_done + 1


def planned_steps(config: ml_collections.ConfigDict, *, elapsed_s: float, step_s: float, compile_s: float,
                  steps_done: int) -> int:
  """The total steps that fit config.train.time_budget_s: those done in `elapsed_s` plus what the rest of the budget,
  less one more compilation (`compile_s`, for the planned schedule), holds at `step_s` a step, less
  config.train.time_budget_reserve_steps; within [shortest_consistent, config.train.steps]."""
  remaining_s = config.train.time_budget_s - elapsed_s - compile_s
  fit = steps_done + math.floor(remaining_s / step_s) - config.train.time_budget_reserve_steps
  return min(max(fit, shortest_consistent(config, steps_done)), config.train.steps)


def plan(config: ml_collections.ConfigDict, workdir: str, begin: float, marks: dict,
         is_lead: bool) -> tuple[ml_collections.ConfigDict, int]:
  """(config with its planned train.steps, those steps) from the run's start time `begin` and the wall times `marks`
  {step: time} at its SKIPPED_STEPS-th and (SKIPPED_STEPS + MEASURED_STEPS)-th steps; process 0's plan for every
  process, written to <workdir>/train_plan.json."""
  first, last = sorted(marks)
  step_s = (marks[last] - marks[first]) / (last - first)
  compile_s = max(marks[first] - begin - SKIPPED_STEPS * step_s, 0.0)  # set-up and compilation
  steps = planned_steps(config, elapsed_s=time.perf_counter() - begin, step_s=step_s, compile_s=compile_s,
                        steps_done=last)
  steps = int(multihost_utils.broadcast_one_to_all(np.int32(steps)))
  if is_lead:
    t = config.train
    write_plan(workdir, steps, {"time_budget_s": t.time_budget_s, "reserve_steps": t.time_budget_reserve_steps,
                                "step_s": round(step_s, 4), "compile_s": round(compile_s, 2), "max_steps": t.steps})
    kept = t.time_budget_reserve_steps
    reserve = f", {kept} steps' time kept for what follows" if kept else ""
    print(f"time budget {t.time_budget_s:g} s at {step_s * 1e3:.0f} ms a step (set-up and compilation "
          f"{compile_s:.0f} s{reserve}): {steps} steps (reproduce with --config.train.steps={steps} "
          f"--config.train.time_budget_s=0)", flush=True)
  return with_steps(config, steps), steps
