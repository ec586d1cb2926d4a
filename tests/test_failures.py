"""A non-finite loss stops the run naming the step and the term, keeping the last good checkpoint; an unusable
workdir fails at start-up, and so does a mode without the flags it needs."""
import subprocess
import sys

import jax.numpy as jnp
import pytest

from configs import tiny
from repa_jax.data.synthetic import SyntheticBatches
from repa_jax.train import failures, loop
from tests.processes import ROOT


class PoisonedBatches(SyntheticBatches):
  """Synthetic batches whose encoder features are NaN from batch `poisoned` on."""
  poisoned = 3

  def __next__(self):
    index = self.index
    batch = super().__next__()
    if index >= self.poisoned:
      batch["features"] = {k: v * jnp.nan for k, v in batch["features"].items()}
    return batch


def test_nan_in_a_term_stops_the_run_naming_it_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "make_batches", PoisonedBatches)
  config = tiny.get_config("reg=both")
  config.train.update(steps=8, checkpoint_every=2, log_every=100)
  with pytest.raises(FloatingPointError, match=r"step 4: non-finite .*align=nan.*checkpoint 2 is the last good"):
    loop.train(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_an_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(OSError, match="--workdir=.* is not writable"):
    loop.train(tiny.get_config(), str(blocker / "run"))


def test_too_little_disk_space_fails_before_training(tmp_path, monkeypatch):
  monkeypatch.setattr(failures.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
  with pytest.raises(OSError, match="GiB free, but the checkpoints kept at once need"):
    loop.train(tiny.get_config(), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("mode, missing", [("train", "--workdir"), ("convert", "--workdir and --checkpoint")])
def test_a_mode_without_the_flags_it_needs_is_refused(mode, missing):
  result = subprocess.run([sys.executable, "-m", "repa_jax.main", f"--mode={mode}", "--config=configs/tiny.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert f"--mode={mode} needs {missing}" in result.stderr
