"""Runs killed at arbitrary steps (SIGKILL) or preempted (SIGTERM) resume to the bit-identical state of an
uninterrupted run; a checkpoint directory left half-written is never restored."""
import random
import shutil
import signal

import jax
import numpy as np
import pytest

from tests import processes
from tests.test_pipeline import tiny_feature_config, write_dataset

STEPS = 12
CONFIG = "configs/tiny.py:reg=repa"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(feature dataset flags, the uninterrupted run's final state, config, subprocess environment)."""
  root = tmp_path_factory.mktemp("resume")
  directory = root / "features"
  config = tiny_feature_config(directory)
  write_dataset(directory, config)
  config.train.steps = STEPS
  flags = [f"--config.data.{k}={v}" for k, v in config.data.items() if k in ("source", "directory", "autoencoder")]
  flags += [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
  env = processes.environment(devices=8, cache_dir=root / "xla_cache")
  processes.run(processes.main_command(root / "uninterrupted", CONFIG, *flags), env)
  return flags, processes.newest_state(root / "uninterrupted", config), config, env


def run_until(command, env, step: int, sig: int) -> tuple[int, list[str]]:
  """Starts the trainer, sends `sig` once it printed step >= `step`; (return code, progress lines)."""
  process = processes.start(command, env)
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
      process.send_signal(sig)
      break
  lines += process.stdout.read().splitlines()
  return process.wait(timeout=300), lines


def assert_bit_identical(a: dict, b: dict) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigkill_at_random_steps_then_resume_is_bit_identical(setup, tmp_path):
  flags, uninterrupted, config, env = setup
  command = processes.main_command(tmp_path, CONFIG, *flags)
  for kill_at in sorted(random.Random(0).sample(range(1, STEPS), 3)):
    code, _ = run_until(command, env, kill_at, signal.SIGKILL)
    assert code == -signal.SIGKILL
  # A save interrupted mid-write leaves a temporary directory; resuming must ignore it, not restore it.
  checkpoints = tmp_path / "checkpoints"
  newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  shutil.copytree(checkpoints / str(newest), checkpoints / f"{STEPS + 2}.orbax-checkpoint-tmp-1")
  processes.run(command, env)
  assert_bit_identical(processes.newest_state(tmp_path, config), uninterrupted)


def test_sigterm_saves_exits_cleanly_and_resumes_bit_identical(setup, tmp_path):
  flags, uninterrupted, config, env = setup
  command = processes.main_command(tmp_path, CONFIG, *flags)
  code, lines = run_until(command, env, 5, signal.SIGTERM)
  assert code == 0
  stopped = [line for line in lines if line.startswith("preempted at step")]
  assert stopped, lines
  step = int(stopped[0].split()[3].rstrip(":"))
  assert 5 <= step < STEPS and (tmp_path / "checkpoints" / str(step)).is_dir()  # saved where it stopped, off-period
  processes.run(command, env)
  assert_bit_identical(processes.newest_state(tmp_path, config), uninterrupted)
