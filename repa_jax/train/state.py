"""The training state, a plain pytree: {'step', 'params', 'opt_state', 'ema_params'}; and its optimizer."""
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from repa_jax.models.repa_sit import build_model
from repa_jax.specs import rng
from repa_jax.specs.model import model_spec

LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate of update `step` (0-indexed): a linear warm-up over config.train.warmup_steps to config.train.lr,
  then constant (lr_schedule 'constant') or a half cosine to 0 at config.train.steps ('cosine')."""
  t = config.train
  if t.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"config.train.lr_schedule={t.lr_schedule!r} is not one of {LR_SCHEDULES}")
  warmup, decay_steps = t.warmup_steps, max(t.steps - t.warmup_steps, 1)

  def schedule(step):
    lr = t.lr * (jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0)
    if t.lr_schedule == "cosine":
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return lr
  return schedule


def ema_decay_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The EMA decay used by update `step` (0-indexed): config.train.ema_decay, or with config.train.ema_warmup
  min(ema_decay, (1 + step) / (10 + step)), so the average of a short run is not dominated by its first weights."""
  decay = config.train.ema_decay
  if not config.train.ema_warmup:
    return optax.constant_schedule(decay)
  return lambda step: jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Grad-norm clipping then AdamW (REPA defaults: lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay)."""
  t = config.train
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(learning_rate_schedule(config), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay))


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
