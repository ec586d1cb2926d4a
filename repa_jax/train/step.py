"""The pure train step: flow loss + lambda_align * REPA + lambda_disp * dispersive + lambda_sra * SRA + lambda_reg *
REG's class-token flow, the optimizer, EMA."""
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from repa_jax.objectives.alignment import alignment_loss, normalize_targets
from repa_jax.objectives.dispersive import dispersive_loss
from repa_jax.objectives.entanglement import class_token_loss, entangled_target, noised_class_token
from repa_jax.objectives.flow import flow_loss, interpolate, sample_time, velocity_direction_loss
from repa_jax.objectives.self_alignment import self_alignment_loss, sra_weight, teacher_time
from repa_jax.models.repa_sit import model_graphdef
from repa_jax.specs import rng, sharding
from repa_jax.specs.data import DatasetRequirement, check_encoder_features, dataset_requirement
from repa_jax.specs.model import aligned_encoders, dispersive_blocks, model_spec, reg_encoder, sit_spec
from repa_jax.train.state import ema_decay_schedule, learning_rate_schedule, make_optimizer


def sample_latents(key: jax.Array, batch: dict, latent_scale: float) -> jax.Array:
  """z = (mean + std * eps) * scale from the stored VAE posterior; mean * scale when the batch has no std (pixels)."""
  mean = batch["latent_mean"].astype(jnp.float32)
  if "latent_std" in batch:
    mean = mean + batch["latent_std"].astype(jnp.float32) * jax.random.normal(key, mean.shape, jnp.float32)
  return mean * latent_scale


def drop_labels(key: jax.Array, labels: jax.Array, rate: float, num_classes: int) -> jax.Array:
  """Replace each label by the null class `num_classes` with probability `rate`. [B] -> [B]."""
  return jnp.where(jax.random.uniform(key, labels.shape) < rate, num_classes, labels)


def check_features(features: dict, requirement: DatasetRequirement) -> None:
  """Refuses a batch whose encoder features ([B, tokens, width] per encoder) do not fit the SiT and its projectors
  (at trace time)."""
  for name, _, _ in requirement.encoders:
    if name not in features:
      raise ValueError(f"the batch has no features of encoder {name!r} (config.align.encoders); it has "
                       f"{sorted(features)}")
    _, tokens, width = features[name].shape
    check_encoder_features(name, tokens, width, requirement, "the train batch")


def active(stop_step: int | None, step: jax.Array) -> jax.Array:
  """1.0 while a regulariser with this stop step (None: never stops) is on at `step`, else 0.0."""
  return jnp.float32(1.0) if stop_step is None else (step < stop_step).astype(jnp.float32)


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef):
  """Returns the pure `train_step(state, batch) -> (state, metrics)` for a config and model structure.

  batch: {'latent_mean': [B, H, W, C], optional 'latent_std': [B, H, W, C], 'label': [B] int,
          'features': {encoder name: [B, N, C_k]}, 'class_tokens': {encoder name: [B, C_k]}} (features only when
          REPA is on, class tokens only with REG).
  """
  tx = make_optimizer(config)
  schedule = learning_rate_schedule(config)
  ema_decay = ema_decay_schedule(config)
  spec = sit_spec(config)
  align, disperse = config.align, config.disperse
  requirement = dataset_requirement(config)
  encoders = aligned_encoders(config)
  disperse_blocks = dispersive_blocks(config)
  sra, reg = config.sra, config.reg
  reg_name = reg_encoder(config)[0] if reg.weight else None
  hidden_blocks = tuple(sorted(set(disperse_blocks) | ({align.block} if encoders else set()) |
                               ({sra.student_block} if sra.weight else set())))
  train_key = rng.stream(config.seed, "train")

  def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
    if encoders:
      check_features(batch["features"], requirement)

    step_key = jax.random.fold_in(train_key, state["step"])
    latent_key, drop_key, time_key, noise_key = jax.random.split(step_key, 4)
    x = sample_latents(latent_key, batch, config.data.latent_scale)
    y = drop_labels(drop_key, batch["label"], config.train.label_dropout, spec.num_classes)
    t = sample_time(time_key, x.shape[0], config.flow.time_sampler, config.flow.path)
    noise = jax.random.normal(noise_key, x.shape, jnp.float32)
    x_t, v_target = interpolate(x, noise, t, config.flow.path)
    if reg.weight:  # REG's class token: on the same path at the same t, with its own noise
      class_token = batch["class_tokens"][reg_name]
      cls_noise = jax.random.normal(jax.random.fold_in(step_key, 2), class_token.shape, jnp.float32)
      cls_t, v_cls_target = noised_class_token(class_token, cls_noise, t, config.flow.path)

    def state_at(time):  # the SiT's noised input at times [B]: the image, with REG (image, class token)
      image = interpolate(x, noise, time, config.flow.path)[0]
      return (image, noised_class_token(class_token, cls_noise, time, config.flow.path)[0]) if reg.weight else image

    if sra.weight:  # SRA's teacher: the EMA model's block on the same data and noise at a less noisy time
      s = teacher_time(jax.random.fold_in(step_key, 1), t, sra.max_time_gap)
      teacher = jax.lax.stop_gradient(nnx.merge(graphdef, state["ema_params"]).sit.hidden_states(
          state_at(s), s, y, (sra.teacher_block,))[sra.teacher_block])

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      v_pred, hiddens = model.sit((x_t, cls_t) if reg.weight else x_t, t, y, hidden_blocks=hidden_blocks)
      if reg.weight:
        v_pred, v_cls = v_pred
      terms = {"flow": flow_loss(v_pred, v_target)}
      total = terms["flow"]
      if reg.weight:
        terms["reg"] = class_token_loss(v_cls, v_cls_target)
        total = total + reg.weight * terms["reg"]
      if config.flow.cosine_weight:
        terms["cosine"] = velocity_direction_loss(v_pred, v_target)
        total = total + config.flow.cosine_weight * terms["cosine"]
      if encoders:
        projected = [model.projectors[name](hiddens[align.block]) for name in encoders]
        targets = {name: batch["features"][name] for name in encoders}
        if reg.weight:
          targets = {name: entangled_target(f, batch["class_tokens"][name]) for name, f in targets.items()}
        terms["align"], terms["align_cos"] = alignment_loss(
            projected, [normalize_targets(f, align.target_norm, align.zscore_gamma) for f in targets.values()],
            objective=align.objective, temperature=align.temperature)
        total = total + align.weight * active(align.stop_step, state["step"]) * terms["align"]
      if disperse_blocks:
        terms["disperse"] = jnp.mean(jnp.stack([
            dispersive_loss(hiddens[k], variant=disperse.variant, temperature=disperse.temperature,
                            group_size=disperse.group_size, margin=disperse.margin) for k in disperse_blocks]))
        total = total + disperse.weight * active(disperse.stop_step, state["step"]) * terms["disperse"]
      if sra.weight:
        terms["sra"] = self_alignment_loss(model.sra_head(hiddens[sra.student_block]), teacher, sra.objective,
                                           sra.beta)
        weight = sra_weight(state["step"], sra.weight, sra.steps_per_epoch, sra.decay_start_epoch, sra.decay_epochs)
        total = total + weight * active(sra.stop_step, state["step"]) * terms["sra"]
      return total, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    # Projectors and SRA's head without their term (align.weight 0, or from their stop_step on) stay as they are,
    # whatever the optimizer's momentum says.
    trains = {"projectors": active(align.stop_step, state["step"]) if encoders else False,
              "sra_head": active(sra.stop_step, state["step"])}
    updates = jax.tree_util.tree_map_with_path(
        lambda path, u: jnp.where(trains[path[0].key], u, 0) if path[0].key in trains else u, updates)
    params = optax.apply_updates(state["params"], updates)
    decay = ema_decay(state["step"])
    ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema_params"], params)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema_params": ema_params}, metrics

  return train_step


def jit_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, state_sharding):
  """`make_train_step` under jax.jit: explicit shardings in and out (batch over all mesh axes), state donated; traced
  with the mesh current, so the SiT's activations stay batch-sharded (`sharding.constrain_batch`)."""
  batch_sharding = sharding.batch_sharding(mesh)
  inner = make_train_step(config, model_graphdef(model_spec(config)))

  def step(state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return inner(state, batch)

  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
