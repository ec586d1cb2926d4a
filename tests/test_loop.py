"""The training loop: checkpoints, TensorBoard logs, a resumed run equal to an uninterrupted one, profiling."""
import jax
import numpy as np
import pytest

from configs import tiny
from repa_jax.train.loop import train
from repa_jax.validate import validate


def tiny_run_config(steps):
  config = tiny.get_config("reg=both")
  config.train.update(steps=steps, checkpoint_every=3, log_every=3)
  config.mesh.shape = (2, 4)
  return config


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
  uninterrupted = jax.device_get(train(tiny_run_config(6), str(tmp_path / "a")))
  monkeypatch.chdir(tmp_path)  # the resumed run uses a relative --workdir, as `make run` does
  train(tiny_run_config(3), "b")
  assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["3"]
  resumed = jax.device_get(train(tiny_run_config(6), "b"))
  assert int(resumed["step"]) == 6
  for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert list((tmp_path / "a").glob("events.out.tfevents.*"))


def test_a_run_resumed_across_a_stop_step_is_bit_identical(tmp_path):
  def config(steps):
    c = tiny_run_config(steps)
    c.align.stop_step, c.disperse.stop_step = 4, 5  # both switch off after the resume at step 3
    c.sra.update(weight=0.2, student_block=1, teacher_block=3, stop_step=5)  # and SRA, with its EMA teacher
    c.mesh.shape = (8, 1)  # see SRA_MESH in tests/test_train_step.py
    return c
  uninterrupted = jax.device_get(train(config(6), str(tmp_path / "a")))
  train(config(3), str(tmp_path / "b"))
  resumed = jax.device_get(train(config(6), str(tmp_path / "b")))
  for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def test_profile_steps_write_a_trace_and_bad_ranges_are_refused(tmp_path):
  config = tiny.get_config("reg=none")
  config.train.update(steps=4, profile_steps=(2, 3))
  train(config, str(tmp_path))
  assert list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
  config.train.profile_steps = (3, 2)
  with pytest.raises(ValueError, match=r"config.train.profile_steps=\(3, 2\)"):
    validate(config)
