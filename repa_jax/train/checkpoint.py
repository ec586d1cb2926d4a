"""Orbax checkpoints of the train state, the data-iterator position and the model's architecture: save every N
steps, keep the last K plus every M-th. Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a save interrupted at any moment is never restored. A checkpoint that cannot be read (a truncated or
corrupt file) is skipped with a warning for the next newest, and set aside as `<step>.corrupt` once an older one
restored: never deleted or overwritten."""
import contextlib
import gc
import json
import os
import re
import sys

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from repa_jax.specs.model import BLOCK_SWITCHES


def checkpoint_dir(workdir: str) -> epath.Path:
  """<workdir>/checkpoints as an absolute path (Orbax refuses relative ones); gs:// and other URLs as given."""
  path = epath.Path(workdir) / "checkpoints"
  return path if "://" in str(workdir) else epath.Path(os.path.abspath(path))


# The config.model fields that fix the model (dtype and remat only change how it is computed).
MODEL_SHAPE_FIELDS = ("name", "depth", "width", "num_heads", *BLOCK_SWITCHES)
# Architecture fields added after checkpoints were first written, with the value those checkpoints had.
LATER_FIELDS = {"align.projector": ["mlp", 1], "train.optimizer": "adamw", "sra.head": False, "reg.class_token": False}
LATER_MODEL_FIELDS = {"norm": "layernorm", "mlp": "gelu", "rope": False, "qk_norm": False}


def architecture(config: ml_collections.ConfigDict) -> dict:
  """The config fields that fix the state tree (parameters and optimizer state): a checkpoint only restores into a
  config with equal values."""
  fields = {"model": {k: config.model[k] for k in MODEL_SHAPE_FIELDS}, "data.latent_shape": config.data.latent_shape,
            "data.num_classes": config.data.num_classes,
            "align.encoders": config.align.encoders,
            "align.projector_dim": config.align.projector_dim if config.align.encoders else None,
            "align.projector": [config.align.projector, config.align.projector_kernel] if config.align.encoders
                               else LATER_FIELDS["align.projector"],
            "train.optimizer": config.train.optimizer, "sra.head": bool(config.sra.weight),
            "reg.class_token": bool(config.reg.weight)}
  return json.loads(json.dumps(fields))  # tuples -> lists, as the checkpoint's JSON holds them


class IncompatibleCheckpoint(ValueError):
  """A readable checkpoint of another architecture than the config's (an error of the command, not of the disk)."""


def check_architecture(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Refuses a checkpoint whose architecture differs from the config's, naming each differing field (of a saved
  dict, only the keys the config's has: checkpoints that also recorded config.model.dtype restore in any dtype)."""
  wanted = architecture(config)
  restrict = lambda value, like: {k: value.get(k) for k in like} if isinstance(value, dict) else value
  saved = {**LATER_FIELDS, **saved}
  if isinstance(saved.get("model"), dict):
    saved["model"] = {**LATER_MODEL_FIELDS, **saved["model"]}
  differ = [f"{k}: checkpoint {restrict(saved.get(k), v)!r} vs config {v!r}" for k, v in wanted.items()
            if restrict(saved.get(k), v) != v]
  if differ:
    raise IncompatibleCheckpoint(f"the checkpoint in {where} is from an incompatible config ({'; '.join(differ)}): "
                                 "run with the config it was trained with, or pass another --workdir")


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """An asynchronous manager over `<workdir>/checkpoints` keeping the newest config.train.keep_checkpoints
  checkpoints, and every config.train.keep_every-th step for good (None: none)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                         keep_period=config.train.keep_every, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: dict, data_state: dict, config: ml_collections.ConfigDict) -> None:
  """Starts an asynchronous save of the state, the iterator position and the architecture at the state's step."""
  step = int(state["step"])
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                             architecture=ocp.args.JsonSave(architecture(config))))


def _check_checkpoint(manager: ocp.CheckpointManager, step: int, config: ml_collections.ConfigDict) -> None:
  saved = manager.restore(step, args=ocp.args.Composite(architecture=ocp.args.JsonRestore()))["architecture"]
  check_architecture(saved, config, f"{manager.directory}/{step}")


@contextlib.contextmanager
def _quiet_orbax_reads():
  """Drops the "Exception ignored in <coroutine>" reports that a failed Orbax read leaves behind (one per array still
  in flight, each with its TensorStore spec): the error the caller raises or logs is the one a user should read."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda report: None
  try:
    yield
  finally:
    gc.collect()  # finalise the abandoned read coroutines while their reports are still dropped
    sys.unraisablehook = hook


def read_error(error: BaseException) -> str:
  """One line for an unreadable checkpoint: the error's first line and the item (array path) it names, if any."""
  chain, cause = [], error
  while cause is not None:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  text = " ".join(str(e) for e in chain)
  items = [i for i in re.findall(r"'path': '([^']+?)/?'", text) if not i.startswith("/")]
  first = lambda e: (str(e).split(" See full TensorStore details")[0].splitlines() or [""])[0][:300]
  cause = f", caused by {type(chain[-1]).__name__}: {first(chain[-1])}" if len(chain) > 1 else ""
  return f"{type(error).__name__}: {first(error)}{cause}" + (f" (item {items[0]})" if items else "")


def _newest_readable(manager: ocp.CheckpointManager, steps: list[int], restore, config: ml_collections.ConfigDict,
                     what: str):
  """(restore(step), step, unreadable steps) for the newest of `steps` that restores; a refused architecture is
  raised at once, any other error logged and the next newest tried. Raises one message naming every step and why if
  none restores."""
  failed = []
  for step in sorted(steps, reverse=True):
    try:
      with _quiet_orbax_reads():
        _check_checkpoint(manager, step, config)
        return restore(step), step, [s for s, _ in failed]
    except IncompatibleCheckpoint:
      raise
    except Exception as error:  # noqa: BLE001 - any read or decode error of this step: try the next one
      failed.append((step, read_error(error)))
      logging.warning("checkpoint %s/%d is unreadable, trying the next newest: %s", manager.directory, step,
                      failed[-1][1])
  tried = "; ".join(f"step {s}: {why}" for s, why in failed)
  raise RuntimeError(f"no checkpoint in {manager.directory} could be read for {what} (tried {tried}). Nothing was "
                     "changed on disk. Start fresh with another --workdir, or pick a step with "
                     "--config.train.restore_step=N (--config.sample.checkpoint_step=N for sample/evaluate).")


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames unreadable checkpoints to <step>.corrupt (<step>.corrupt.<n> if taken), out of the manager's view; on
  process 0 only, the others wait for it."""
  if not steps:
    return
  for step in steps if jax.process_index() == 0 else ():
    source = epath.Path(manager.directory) / str(step)
    target, n = source.parent / f"{step}.corrupt", 1
    while target.exists():
      target, n = source.parent / f"{step}.corrupt.{n}", n + 1
    source.rename(target)
    logging.warning("set aside the unreadable checkpoint %s as %s (a newer one will be written)", source, target)
  multihost_utils.sync_global_devices("unreadable checkpoints set aside")
  manager.reload()


def restore_latest(manager: ocp.CheckpointManager, target, config: ml_collections.ConfigDict
                   ) -> tuple[dict, dict] | None:
  """(state, data_state) of the newest readable checkpoint (or of config.train.restore_step), restored into `target`'s
  shapes and shardings (any mesh); None if there is none. A checkpoint of another architecture is refused; unreadable
  ones newer than the restored step are set aside as <step>.corrupt."""
  steps, chosen = manager.all_steps(), config.train.restore_step
  if not steps:
    return None
  if chosen is not None:
    if chosen not in steps:
      raise FileNotFoundError(f"config.train.restore_step={chosen}: no such checkpoint in {manager.directory} (it "
                              f"has {sorted(steps)})")
    newer = [s for s in steps if s > chosen]
    if newer:
      raise ValueError(f"config.train.restore_step={chosen}: checkpoints {newer} are newer; move them out of "
                       f"{manager.directory} first (a resumed run would overwrite them)")
    steps = [chosen]
  restore = lambda step: manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                       data=ocp.args.JsonRestore()))
  restored, _, unreadable = _newest_readable(manager, steps, restore, config, "training")
  _set_aside(manager, unreadable)
  return restored["state"], restored["data"]


def all_steps(workdir: str) -> list[int]:
  """The checkpoint steps in `workdir`, oldest first (set-aside `<step>.corrupt` ones are not steps)."""
  return sorted(ocp.CheckpointManager(checkpoint_dir(workdir)).all_steps())


def latest_step(workdir: str) -> int:
  """The newest checkpoint step in `workdir`, or an error saying there is none."""
  step = ocp.CheckpointManager(checkpoint_dir(workdir)).latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first, or pass another --workdir")
  return step


def restore_ema_params(workdir: str, target, config: ml_collections.ConfigDict, step: int | None = None
                       ) -> tuple[dict, int]:
  """(EMA parameters, step) of checkpoint `step` (None = the newest readable) in `workdir`, restored into `target` (a
  tree of ShapeDtypeStructs with shardings); nothing else (no optimizer state) is read, nothing is moved."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir))
  latest_step(workdir)  # there is at least one
  if step is not None and step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint {step} in {workdir}/checkpoints (it has {manager.all_steps()}): "
                            "choose one of those (config.sample.checkpoint_step)")
  item = {"ema_params": target}
  restore = lambda s: manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  restored, step, _ = _newest_readable(manager, manager.all_steps() if step is None else [step], restore, config,
                                       "sampling")
  return restored["state"]["ema_params"], step
