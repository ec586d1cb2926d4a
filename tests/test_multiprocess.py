"""Two real processes on localhost (4 fake CPU devices each, gloo collectives) train like one process with the same 8
devices; a checkpoint they write resumes in one process. Only process 0 reports progress."""
import jax
import numpy as np
import pytest

from tests import processes
from tests.test_pipeline import tiny_feature_config, write_dataset

CONFIG = "configs/tiny.py:reg=repa"


@pytest.fixture(scope="module")
def feature_flags(tmp_path_factory):
  directory = tmp_path_factory.mktemp("multiprocess") / "features"
  config = tiny_feature_config(directory)
  write_dataset(directory, config)
  return config, [f"--config.data.{k}={v}" for k, v in config.data.items()
                  if k in ("source", "directory", "autoencoder")]


def steps_flags(steps):
  return [f"--config.train.steps={steps}", "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


def progress_lines(stdout: str) -> list[str]:
  return [line for line in stdout.splitlines() if line.startswith("step ")]


def test_two_processes_equal_one_and_their_checkpoint_resumes_in_one(feature_flags, tmp_path):
  config, flags = feature_flags
  one_env = processes.environment(devices=8, cache_dir=tmp_path / "xla_cache")
  processes.run(processes.main_command(tmp_path / "one", CONFIG, *flags, *steps_flags(4)), one_env)

  port = processes.free_port()
  two = [processes.start(processes.main_command(
      tmp_path / "two", CONFIG, *flags, *steps_flags(4), f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2", f"--process_id={i}"), processes.environment(devices=4, cache_dir=tmp_path / "xla_cache"))
         for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in two]
  assert [p.returncode for p in two] == [0, 0], outputs
  assert progress_lines(outputs[0])[-1].startswith("step 4/4") and not progress_lines(outputs[1])

  # Same global batches and devices; the cross-process reductions may add in another order: float32 rounding only.
  for a, b in zip(*(jax.tree.leaves(processes.newest_state(tmp_path / w, config)) for w in ("one", "two"))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  for workdir in ("one", "two"):  # the two-process checkpoint (step 4) resumes in one process
    result = processes.run(processes.main_command(tmp_path / workdir, CONFIG, *flags, *steps_flags(6)), one_env)
    assert progress_lines(result.stdout)[0].startswith("step 5/6")
  for a, b in zip(*(jax.tree.leaves(processes.newest_state(tmp_path / w, config)) for w in ("one", "two"))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
