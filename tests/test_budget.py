"""A run sized to a time budget (config.train.time_budget_s): its arithmetic, a schedule that the later decision
cannot change, and a budgeted run bit-identical to the fixed-length run of the steps it chose, also when re-run."""
import json

import jax
import numpy as np
import pytest

from configs import tiny
from repa_jax.train import budget
from repa_jax.train.loop import train
from repa_jax.train.state import learning_rate_schedule
from repa_jax.validate import validate


def cooldown_config(steps, fraction=0.4):
  config = tiny.get_config("reg=repa")
  config.train.update(steps=steps, lr_schedule="cooldown", cooldown_fraction=fraction, warmup_steps=3,
                      checkpoint_every=1000, log_every=1000)
  return config


def test_planned_steps_fill_the_rest_of_the_budget_within_the_bounds():
  config = cooldown_config(1000)
  config.train.time_budget_s = 100.0
  # 25 steps in 10 s, then (100 - 10 - 5 for the recompilation) / 0.5 s = 170 more.
  assert budget.planned_steps(config, elapsed_s=10.0, step_s=0.5, compile_s=5.0, steps_done=25) == 195
  config.train.steps = 150  # the most it may train
  assert budget.planned_steps(config, elapsed_s=10.0, step_s=0.5, compile_s=5.0, steps_done=25) == 150
  config.train.update(steps=1000, time_budget_reserve_steps=70)  # 70 steps' time kept for sampling and evaluation
  assert budget.planned_steps(config, elapsed_s=10.0, step_s=0.5, compile_s=5.0, steps_done=25) == 125
  # A budget already spent: the fewest steps that keep the steps done valid.
  assert budget.planned_steps(config, elapsed_s=200.0, step_s=0.5, compile_s=5.0,
                              steps_done=25) == budget.shortest_consistent(config, 25)


@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.5])
def test_the_shortest_consistent_schedule_agrees_with_every_longer_one_over_the_steps_done(fraction):
  done = 25
  shortest = budget.shortest_consistent(cooldown_config(1, fraction), done)
  rates = lambda n: np.asarray([learning_rate_schedule(cooldown_config(n, fraction))(s) for s in range(done)])
  for longer in (shortest, shortest + 1, 3 * shortest):
    np.testing.assert_array_equal(rates(longer), rates(10_000))
  assert not np.array_equal(rates(done), rates(10_000))  # a run of exactly the steps done would already decay


def test_a_budgeted_run_equals_the_fixed_run_of_its_planned_steps(tmp_path, monkeypatch):
  monkeypatch.setattr(budget, "SKIPPED_STEPS", 2)
  monkeypatch.setattr(budget, "MEASURED_STEPS", 3)
  config = cooldown_config(500)
  config.train.time_budget_s = 1e-3  # spent before the measurement: the shortest consistent length
  budgeted = jax.device_get(train(config, str(tmp_path / "budget")))
  plan = json.loads((tmp_path / "budget" / budget.PLAN_FILE).read_text())
  steps = budget.shortest_consistent(config, budget.SKIPPED_STEPS + budget.MEASURED_STEPS)
  assert plan["steps"] == steps == int(budgeted["step"]) and plan["step_s"] > 0
  fixed = jax.device_get(train(cooldown_config(steps), str(tmp_path / "fixed")))
  for a, b in zip(jax.tree.leaves(budgeted), jax.tree.leaves(fixed), strict=True):
    np.testing.assert_array_equal(a, b)
  rerun = train(config, str(tmp_path / "budget"))  # the plan is kept: nothing more to train
  assert int(rerun["step"]) == steps


def test_a_budget_with_the_cosine_schedule_is_refused():
  config = cooldown_config(500)
  config.train.update(time_budget_s=60.0, lr_schedule="cosine")
  with pytest.raises(ValueError, match=r"config.train.time_budget_s with config.train.lr_schedule='cosine'"):
    validate(config)
