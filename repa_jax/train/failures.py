"""What stops a run, and how: preemption (save, then exit cleanly), non-finite losses, an unusable workdir."""
import contextlib
import math
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator

import jax
from etils import epath
from jax.experimental import multihost_utils


@contextlib.contextmanager
def preemption_check() -> Iterator[Callable[[int], bool]]:
  """Yields `preempted(step) -> bool`, called by every process at every step.

  Multi-process: JAX's preemption service (started by jax.distributed.initialize) catches SIGTERM on any host and
  makes all hosts agree on one step to stop at. Single process: a SIGTERM handler sets a flag (the previous handler is
  restored on exit)."""
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  received = threading.Event()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
  try:
    yield lambda step: received.is_set()
  finally:
    signal.signal(signal.SIGTERM, previous)


def check_finite(step: int, metrics: dict, last_checkpoint: int | None) -> None:
  """Raises FloatingPointError naming every non-finite term of a step's metrics ({name: scalar})."""
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    kept = f"checkpoint {last_checkpoint} is the last good state" if last_checkpoint is not None else "no checkpoint"
    raise FloatingPointError(
        f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} "
        f"(finite: {', '.join(f'{k}={v:.4g}' for k, v in values.items() if k not in bad)}). The run stopped without "
        f"saving this step; {kept}. Lower config.train.lr or the weight of the named term, or check the data.")


def check_workdir(workdir: str, needed_bytes: int) -> None:
  """Fails at start-up, not hours later, when `workdir` cannot be written or (local disks) has less free space than
  `needed_bytes`. Every process writes (and removes) its own probe file."""
  path = epath.Path(workdir)
  probe = path / f".write_probe_{jax.process_index()}_{uuid.uuid4().hex}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as error:
    raise OSError(f"--workdir={workdir} is not writable ({error}): pass a writable directory or gs:// path") from error
  if "://" not in workdir:
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
      raise OSError(f"--workdir={workdir} has {free / 2**30:.2f} GiB free, but the checkpoints kept at once need "
                    f"~{needed_bytes / 2**30:.2f} GiB: free space, lower config.train.keep_checkpoints, or use "
                    "another --workdir")
