"""Orbax checkpoints of the train state and the data-iterator position: save every N steps, keep the last K."""
import ml_collections
import orbax.checkpoint as ocp
from etils import epath


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """An asynchronous manager over `<workdir>/checkpoints` keeping config.train.keep_checkpoints checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, enable_async_checkpointing=True)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options)


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
