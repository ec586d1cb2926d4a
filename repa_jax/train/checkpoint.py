"""Orbax checkpoints of the train state, the data-iterator position and the model's architecture: save every N
steps, keep the last K plus every M-th. Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a save interrupted at any moment is never restored."""
import json
import os

import ml_collections
import orbax.checkpoint as ocp
from etils import epath


def checkpoint_dir(workdir: str) -> epath.Path:
  """<workdir>/checkpoints as an absolute path (Orbax refuses relative ones); gs:// and other URLs as given."""
  path = epath.Path(workdir) / "checkpoints"
  return path if "://" in str(workdir) else epath.Path(os.path.abspath(path))


# The config.model fields that fix the parameter tree (dtype and remat only change how it is computed).
MODEL_SHAPE_FIELDS = ("name", "depth", "width", "num_heads")


def architecture(config: ml_collections.ConfigDict) -> dict:
  """The config fields that fix the parameter tree: a checkpoint only restores into a config with equal values."""
  fields = {"model": {k: config.model[k] for k in MODEL_SHAPE_FIELDS}, "data.latent_shape": config.data.latent_shape,
            "data.num_classes": config.data.num_classes,
            "align.encoders": config.align.encoders,
            "align.projector_dim": config.align.projector_dim if config.align.encoders else None}
  return json.loads(json.dumps(fields))  # tuples -> lists, as the checkpoint's JSON holds them


def check_architecture(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Refuses a checkpoint whose architecture differs from the config's, naming each differing field (of a saved
  dict, only the keys the config's has: checkpoints that also recorded config.model.dtype restore in any dtype)."""
  wanted = architecture(config)
  restrict = lambda value, like: {k: value.get(k) for k in like} if isinstance(value, dict) else value
  differ = [f"{k}: checkpoint {restrict(saved.get(k), v)!r} vs config {v!r}" for k, v in wanted.items()
            if restrict(saved.get(k), v) != v]
  if differ:
    raise ValueError(f"the checkpoint in {where} is from an incompatible config ({'; '.join(differ)}): run with the "
                     "config it was trained with, or pass another --workdir")


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


def restore_latest(manager: ocp.CheckpointManager, target, config: ml_collections.ConfigDict
                   ) -> tuple[dict, dict] | None:
  """(state, data_state) of the newest checkpoint, restored into `target`'s shapes and shardings (any mesh); None if
  there is none. A checkpoint of another architecture is refused."""
  step = manager.latest_step()
  if step is None:
    return None
  _check_checkpoint(manager, step, config)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                           data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def latest_step(workdir: str) -> int:
  """The newest checkpoint step in `workdir`, or an error saying there is none."""
  step = ocp.CheckpointManager(checkpoint_dir(workdir)).latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first, or pass another --workdir")
  return step


def restore_ema_params(workdir: str, target, config: ml_collections.ConfigDict, step: int | None = None
                       ) -> tuple[dict, int]:
  """(EMA parameters, step) of checkpoint `step` (None = newest) in `workdir`, restored into `target` (a tree of
  ShapeDtypeStructs with shardings); nothing else (no optimizer state) is read."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir))
  step = latest_step(workdir) if step is None else step
  if step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint {step} in {workdir}/checkpoints (it has {manager.all_steps()}): "
                            "choose one of those (config.sample.checkpoint_step)")
  _check_checkpoint(manager, step, config)
  item = {"ema_params": target}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  return restored["state"]["ema_params"], step
