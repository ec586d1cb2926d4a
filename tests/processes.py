"""Helpers for tests that run `python -m repa_jax.main` in subprocesses (kill-and-resume, multi-process runs)."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from repa_jax.train import checkpoint
from repa_jax.train.state import abstract_state, make_optimizer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main_command(workdir, config: str, *flags: str, mode: str = "train") -> list[str]:
  return [sys.executable, "-m", "repa_jax.main", f"--mode={mode}", f"--config={config}", f"--workdir={workdir}",
          *flags]


def environment(devices: int, cache_dir) -> dict:
  """A subprocess environment with `devices` fake CPU devices and a compilation cache shared between runs."""
  return {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def start(command: list[str], env: dict) -> subprocess.Popen:
  """The process, its stdout (progress lines) piped as text, stderr (absl logs) discarded."""
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def newest_state(workdir, config) -> dict:
  """The newest checkpoint's state in `workdir` as NumPy (restored onto this process's first device)."""
  device = SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract_state(config, make_optimizer(config)))
  manager = checkpoint.make_manager(str(workdir), config)
  state, _ = checkpoint.restore_latest(manager, target, config)
  manager.close()
  return jax.tree.map(np.asarray, state)
