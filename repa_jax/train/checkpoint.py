"""Orbax checkpoints of the train state and the data-iterator position: save every N steps, keep the last K."""
import os

import ml_collections
import orbax.checkpoint as ocp
from etils import epath


def checkpoint_dir(workdir: str) -> epath.Path:
  """<workdir>/checkpoints as an absolute path (Orbax refuses relative ones); gs:// and other URLs as given."""
  path = epath.Path(workdir) / "checkpoints"
  return path if "://" in str(workdir) else epath.Path(os.path.abspath(path))


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """An asynchronous manager over `<workdir>/checkpoints` keeping config.train.keep_checkpoints checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: dict, data_state: dict) -> None:
  """Starts an asynchronous save of the state (and the iterator position) at the state's step."""
  step = int(state["step"])
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(data_state)))


def restore_latest(manager: ocp.CheckpointManager, target) -> tuple[dict, dict] | None:
  """(state, data_state) of the newest checkpoint, restored into `target`'s shapes and shardings; None if none."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                           data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def latest_step(workdir: str) -> int:
  """The newest checkpoint step in `workdir`, or an error saying there is none."""
  step = ocp.CheckpointManager(checkpoint_dir(workdir)).latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first, or pass another --workdir")
  return step


def restore_ema_params(workdir: str, target, step: int | None = None) -> tuple[dict, int]:
  """(EMA parameters, step) of checkpoint `step` (None = newest) in `workdir`, restored into `target` (a tree of
  ShapeDtypeStructs with shardings); nothing else (no optimizer state) is read."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir))
  step = latest_step(workdir) if step is None else step
  if step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint {step} in {workdir}/checkpoints (it has {manager.all_steps()}): "
                            "choose one of those (config.sample.checkpoint_step)")
  item = {"ema_params": target}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  return restored["state"]["ema_params"], step
