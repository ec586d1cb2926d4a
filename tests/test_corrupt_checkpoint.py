"""An unreadable newest checkpoint (a truncated data file): training and sampling fall back to the newest readable one,
training sets the bad one aside without deleting it, evaluation finds the samples of the step sampled, and none
readable fails with one message naming every step."""
import pathlib
import shutil

import jax
import numpy as np
import pytest

from configs import tiny
from repa_jax.sample.generate import load_sit_ema, output_dir, samples_to_evaluate
from repa_jax.specs import sharding
from repa_jax.train.loop import train


def tiny_config(steps: int):
  config = tiny.get_config("reg=none")
  config.train.update(steps=steps, checkpoint_every=5, keep_checkpoints=3)
  return config


def truncate_data(workdir: pathlib.Path, step: int) -> None:
  """Cuts every array data file of checkpoint `step` in half, as a crashed copy or storage layer leaves them."""
  files = [p for p in (workdir / "checkpoints" / str(step) / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
  assert files, "the checkpoint layout changed: no OCDBT data files found"
  for path in files:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def names(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(a workdir trained to step 15 with checkpoints 5, 10, 15, the final state of an uninterrupted 20-step run)."""
  root = tmp_path_factory.mktemp("corrupt")
  train(tiny_config(15), str(root / "base"))
  return root / "base", train(tiny_config(20), str(root / "uninterrupted"))


def copy_of(trained, tmp_path) -> pathlib.Path:
  shutil.copytree(trained[0], tmp_path / "run")
  return tmp_path / "run"


def test_training_resumes_from_the_newest_readable_checkpoint_bit_identical(trained, tmp_path, capfd):
  workdir = copy_of(trained, tmp_path)
  truncate_data(workdir, 15)
  state = train(tiny_config(20), str(workdir))
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(trained[1])), strict=True):
    np.testing.assert_array_equal(a, b)
  assert names(workdir) == ["10", "15", "15.corrupt", "20"]  # the bad one kept aside, not deleted or overwritten
  assert "Exception ignored" not in capfd.readouterr().err  # no asyncio/coroutine noise around the warning


def test_sampling_falls_back_and_moves_nothing(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  truncate_data(workdir, 15)
  params, step = load_sit_ema(tiny_config(15), str(workdir), sharding.data_mesh())
  assert step == 10 and jax.tree.leaves(params)
  assert names(workdir) == ["10", "15", "5"]


def test_no_readable_checkpoint_names_every_step_and_the_fixes(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  for step in (5, 10, 15):
    truncate_data(workdir, step)
  with pytest.raises(RuntimeError, match=r"step 15: .*step 10: .*step 5: .*restore_step") as error:
    train(tiny_config(20), str(workdir))
  assert "OUT_OF_RANGE" in str(error.value) or "item" in str(error.value)
  assert names(workdir) == ["10", "15", "5"]  # nothing changed on disk


def test_restore_step_picks_a_checkpoint_and_refuses_to_overwrite_newer_ones(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  config = tiny_config(20)
  config.train.restore_step = 10
  with pytest.raises(ValueError, match=r"restore_step=10: checkpoints \[15\] are newer"):
    train(config, str(workdir))
  config.train.restore_step = 7
  with pytest.raises(FileNotFoundError, match="restore_step=7: no such checkpoint"):
    train(config, str(workdir))
  config.train.restore_step = 15
  train(config, str(workdir))
  assert names(workdir) == ["10", "15", "20"]


def test_evaluate_reads_the_samples_of_the_newest_sampled_checkpoint(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  config = tiny_config(15)
  assert samples_to_evaluate(config, str(workdir)) == output_dir(config, str(workdir), 15) / "samples.npz"
  fallback = output_dir(config, str(workdir), 10)  # what sampling writes when checkpoint 15 is unreadable
  fallback.mkdir(parents=True)
  (fallback / "samples.npz").write_bytes(b"")
  assert samples_to_evaluate(config, str(workdir)) == fallback / "samples.npz"
