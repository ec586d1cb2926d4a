"""The training state, a plain pytree: {'step', 'params', 'opt_state', 'ema_params'}; and its optimizer."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from repa_jax.models.repa_sit import build_model
from repa_jax.specs import rng
from repa_jax.specs.model import model_spec
from repa_jax.train import muon

LR_SCHEDULES = ("constant", "cosine", "cooldown")
OPTIMIZERS = ("adamw", "muon")
MOMENT_DTYPES = ("float32", "bfloat16")  # config.train.moment_dtype: of the first moments (the second stay float32)
# Muon's update RMS: 0.2 x sqrt(max(fan_in, fan_out)) scaling makes it match AdamW's typical update RMS, so Muon runs
# at AdamW's learning rate (Liu et al. 2025, "Muon is Scalable for LLM Training", section 2.2).
MUON_RMS = 0.2
# Matrices Muon always leaves to AdamW: the network's first and last layer (Jordan et al.'s Muon recipe), by module
# name; config.train.muon_adamw_modules names more.
MUON_EXCLUDED = ("patch_embed", "final_linear")
STACKED = "blocks"  # sit.blocks: each parameter has a leading [depth] axis (one matrix per block)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate of update `step` (0-indexed): a linear warm-up over config.train.warmup_steps to config.train.lr,
  then constant (lr_schedule 'constant'), a half cosine to 0 at config.train.steps ('cosine'), or constant and then
  linear to 0 at config.train.steps over its last config.train.cooldown_fraction ('cooldown': warm-up, stable, decay,
  Hägele et al. 2024)."""
  t = config.train
  if t.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"config.train.lr_schedule={t.lr_schedule!r} is not one of {LR_SCHEDULES}")
  warmup, decay_steps = t.warmup_steps, max(t.steps - t.warmup_steps, 1)
  cooldown_steps = max(round(t.cooldown_fraction * t.steps), 1)

  def schedule(step):
    lr = t.lr * (jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0)
    if t.lr_schedule == "cosine":
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    if t.lr_schedule == "cooldown":
      lr = lr * jnp.clip((t.steps - step) / cooldown_steps, 0.0, 1.0)
    return lr
  return schedule


def ema_decay_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The EMA decay used by update `step` (0-indexed): config.train.ema_decay, or with config.train.ema_warmup
  min(ema_decay, (1 + step) / (10 + step)), so the average of a short run is not dominated by its first weights."""
  decay = config.train.ema_decay
  if not config.train.ema_warmup:
    return optax.constant_schedule(decay)
  return lambda step: jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def path_names(path) -> list[str]:
  """The module and parameter names of a pytree key path."""
  return [str(getattr(key, "key", getattr(key, "name", ""))) for key in path]


def muon_batch_axes(params, adamw_modules: tuple[str, ...] = ()):
  """For each parameter leaf: the number of leading batch axes of a weight Muon orthogonalises, or None (AdamW's).

  Muon's: every 'kernel' (a linear [in, out] or convolution [kh, kw, in, out]) but those under a module named in
  MUON_EXCLUDED or `adamw_modules` (config.train.muon_adamw_modules), as a matrix [everything but the last axis, the
  last axis]; under sit.blocks the leading [depth] axis is a batch of matrices (1). AdamW's: biases, embeddings and
  the kernels of those modules."""
  excluded = MUON_EXCLUDED + tuple(adamw_modules)

  def batch_axes(path, leaf):
    names = path_names(path)
    if "kernel" not in names or any(name in names for name in excluded):
      return None
    return 1 if STACKED in names else 0
  return jax.tree_util.tree_map_with_path(batch_axes, params)


def optimizer_labels(params, adamw_modules: tuple[str, ...] = ()):
  """'muon' or 'adamw' for each parameter leaf (`muon_batch_axes`), refusing module names the model does not have."""
  paths = [path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if unknown := [name for name in adamw_modules if not any(name in names for names in paths)]:
    raise ValueError(f"config.train.muon_adamw_modules: no parameter lies under a module named {unknown}; name "
                     "modules of the model, e.g. 'ada_ln' (the blocks' modulation) or 'final_ada_ln'")
  return jax.tree.map(lambda axes: "adamw" if axes is None else "muon", muon_batch_axes(params, adamw_modules),
                      is_leaf=lambda axes: axes is None)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Grad-norm clipping, then config.train.optimizer:
  - 'adamw' (REPA defaults: lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay);
  - 'muon': Muon (momentum muon_beta, Nesterov, muon_ns_steps Newton-Schulz steps, update RMS matched to AdamW's by
    MUON_RMS; `train.muon`) on the matrices of `muon_batch_axes` (less those under muon_adamw_modules) at
    muon_lr_scale x the schedule's learning rate, NAdamW (b1, b2, eps) at the schedule's on every other parameter.
  The first moments (momentum) are stored in config.train.moment_dtype: bfloat16 halves their memory."""
  t = config.train
  if t.optimizer not in OPTIMIZERS:
    raise ValueError(f"config.train.optimizer={t.optimizer!r} is not one of {OPTIMIZERS}")
  if t.moment_dtype not in MOMENT_DTYPES:
    raise ValueError(f"config.train.moment_dtype={t.moment_dtype!r} is not one of {MOMENT_DTYPES}")
  lr = learning_rate_schedule(config)
  if t.optimizer == "adamw":
    update = optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mu_dtype=t.moment_dtype)
  else:
    modules = tuple(t.muon_adamw_modules)
    update = optax.partition({
        "muon": optax.chain(
            muon.scale_by_muon(functools.partial(muon_batch_axes, adamw_modules=modules), beta=t.muon_beta,
                               steps=t.muon_ns_steps, rms=MUON_RMS, eps=t.eps, mu_dtype=t.moment_dtype),
            optax.add_decayed_weights(t.weight_decay),
            optax.scale_by_learning_rate(lambda step: t.muon_lr_scale * lr(step))),
        "adamw": optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mu_dtype=t.moment_dtype,
                             nesterov=True)}, functools.partial(optimizer_labels, adamw_modules=modules))
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), update)


def new_state(params, tx: optax.GradientTransformation) -> dict:
  """The state of a run that starts at step 0 from `params`: a fresh optimizer state, the EMA a copy of `params`."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "ema_params": jax.tree.map(jnp.copy, params)}


def _init_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> dict:
  return new_state(nnx.split(build_model(model_spec(config), rng.stream(config.seed, "init")))[1], tx)


def abstract_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
  """ShapeDtypeStructs of the state, without allocating it."""
  return jax.eval_shape(lambda: _init_state(config, tx))


def init_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation, shardings) -> dict:
  """The initial state, created directly in its (FSDP) shardings: no host ever holds the whole model."""
  return jax.jit(lambda: _init_state(config, tx), out_shardings=shardings)()
