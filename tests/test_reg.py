"""REG (representation entanglement) against NumPy references: the class token's path and loss (values and
gradients), the step's REG and REPA terms recomputed from their definitions, the SiT's class-token input and output,
sampling the class token jointly, and its config checks."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from repa_jax.models.repa_sit import build_model, model_graphdef
from repa_jax.objectives import entanglement
from repa_jax.objectives.flow import interpolate
from repa_jax.sample import samplers
from repa_jax.specs.model import model_spec
from repa_jax.validate import validate
from tests.test_generate import images_on
from tests.test_train_step import setup, step_inputs


def path_reference(t: np.ndarray, path: str):
  """(alpha, sigma, d_alpha, d_sigma) [B, 1] of the linear and cosine paths, float64."""
  t = t[:, None]
  if path == "linear":
    return 1 - t, t, -np.ones_like(t), np.ones_like(t)
  h = np.pi / 2
  return np.cos(h * t), np.sin(h * t), -h * np.sin(h * t), h * np.cos(h * t)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_class_token_path_and_loss_value_and_gradient(path):
  r = np.random.default_rng(0)
  cls, noise, v = r.normal(size=(4, 6)), r.normal(size=(4, 6)), r.normal(size=(4, 6))
  t = r.uniform(size=4)
  alpha, sigma, d_alpha, d_sigma = path_reference(t, path)
  cls_t, target = entanglement.noised_class_token(*(jnp.asarray(a, jnp.float32) for a in (cls, noise, t)), path)
  np.testing.assert_allclose(cls_t, alpha * cls + sigma * noise, rtol=1e-5, atol=1e-6)
  expected_target = d_alpha * cls + d_sigma * noise
  np.testing.assert_allclose(target, expected_target, rtol=1e-5, atol=1e-6)
  value, grad = jax.value_and_grad(entanglement.class_token_loss)(jnp.asarray(v, jnp.float32), target)
  np.testing.assert_allclose(value, np.mean((v - expected_target) ** 2), rtol=1e-5)
  np.testing.assert_allclose(grad, 2 * (v - expected_target) / v.size, rtol=1e-4, atol=1e-7)


def test_entangled_target_puts_the_class_token_first():
  r = np.random.default_rng(1)
  features, cls = r.normal(size=(2, 3, 5)).astype(np.float32), r.normal(size=(2, 5)).astype(np.float32)
  np.testing.assert_array_equal(entanglement.entangled_target(jnp.asarray(features), jnp.asarray(cls)),
                                np.concatenate([cls[:, None], features], axis=1))


def test_step_terms_match_their_definitions():
  """The step's REG and REPA metrics recomputed: the class token noised on the linear path (own noise, same t), the
  model's class-token velocity error, and the projected block against [class token; features]."""
  config = tiny.get_config("reg=reg")
  config.flow.time_sampler = "uniform"
  step, state, batches = setup(config, (1, 1))
  state, _ = step(state, next(batches))  # trained once: the zero-initialised output layers are not zero any more
  state, batch = jax.device_get(state), next(batches)
  _, metrics = step(jax.tree.map(jnp.asarray, state), batch)

  step_key, x, y, t, noise = step_inputs(config, state["step"], batch)
  x_t = interpolate(x, noise, t, "linear")[0]
  cls = np.asarray(batch["class_tokens"]["toy_encoder"], np.float64)
  cls_noise = np.asarray(jax.random.normal(jax.random.fold_in(step_key, 2), cls.shape), np.float64)
  t64 = np.asarray(t, np.float64)[:, None]
  cls_t = (1 - t64) * cls + t64 * cls_noise
  model = nnx.merge(model_graphdef(model_spec(config)), state["params"])
  (_, v_cls), hiddens = model.sit((x_t, jnp.asarray(cls_t, jnp.float32)), t, y, hidden_blocks=(config.align.block,))
  np.testing.assert_allclose(metrics["reg"], np.mean((np.asarray(v_cls, np.float64) - (cls_noise - cls)) ** 2),
                             rtol=1e-4)

  projected = np.asarray(model.projectors["toy_encoder"](hiddens[config.align.block]), np.float64)
  target = np.concatenate([cls[:, None], np.asarray(batch["features"]["toy_encoder"], np.float64)], axis=1)
  cos = np.sum(projected * target, -1) / (np.linalg.norm(projected, axis=-1) * np.linalg.norm(target, axis=-1))
  assert projected.shape[1] == 1 + 16  # the class token and the 4 x 4 patch tokens
  np.testing.assert_allclose(metrics["align"], -cos.mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], metrics["flow"] + config.align.weight * metrics["align"] +
                             config.reg.weight * metrics["reg"], rtol=1e-5)


def test_sit_takes_and_returns_the_class_token():
  config = tiny.get_config("reg=reg")
  spec = model_spec(config)
  with_token, without = build_model(spec, jax.random.key(0)), build_model(model_spec(tiny.get_config("reg=repa")),
                                                                          jax.random.key(0))
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m.sit, nnx.Param)))
  e, d = spec.sit.class_token_dim, spec.sit.width
  assert e == 16 and count(with_token) - count(without) == (e * d + d) + 2 * d + (d * e + e)

  r = np.random.default_rng(2)
  x, cls = jnp.asarray(r.normal(size=(2, 8, 8, 4)), jnp.float32), jnp.asarray(r.normal(size=(2, e)), jnp.float32)
  t, y = jnp.asarray([0.3, 0.8]), jnp.asarray([1, 10])
  (v, v_cls), _ = with_token.sit((x, cls), t, y)
  chex.assert_shape((v, v_cls), ((2, 8, 8, 4), (2, e)))
  np.testing.assert_array_equal(v_cls, 0)  # the class token's output layer starts at zero, as REG's
  step, state, batches = setup(config, (1, 1))
  for _ in range(2):
    state, _ = step(state, next(batches))
  trained = nnx.merge(model_graphdef(spec), jax.device_get(state["params"])).sit
  (v, v_cls), _ = trained((x, cls), t, y)
  (v_other, v_cls_other), _ = trained((x, cls + 1), t, y)
  assert not np.allclose(v, v_other) and not np.allclose(v_cls, v_cls_other)  # the image depends on the token
  with pytest.raises(ValueError, match=r"takes \(image, class token\)"):
    trained(x, t, y)
  with pytest.raises(ValueError, match="takes an image array"):
    without.sit((x, cls), t, y)


def test_samplers_move_every_leaf_of_a_pytree_state():
  """A velocity acting on each leaf alone: Euler / Heun on (a, b) equal the runs on a and on b; the SDE's leaves get
  the noise of the key's splits (NumPy Euler-Maruyama reference)."""
  r = np.random.default_rng(3)
  a, b = jnp.asarray(r.normal(size=(3, 4, 4, 1)), jnp.float32), jnp.asarray(r.normal(size=(3, 5)), jnp.float32)
  y = jnp.asarray([0, 1, 2])
  leafwise = lambda x, t, y: x * (0.5 + y.reshape((-1,) + (1,) * (x.ndim - 1))) - t.reshape((-1,) + (1,) * (x.ndim - 1))
  velocity = lambda state, t, y: jax.tree.map(lambda leaf: leafwise(leaf, t, y), state)
  guidance = samplers.Guidance(scale=2.0, null_class=3, high=0.7)
  for sampler in (samplers.euler_ode, samplers.heun_ode):
    pair = sampler(velocity, (a, b), y, 5, guidance)
    for leaf, alone in zip(pair, (sampler(leafwise, a, y, 5, guidance), sampler(leafwise, b, y, 5, guidance))):
      np.testing.assert_allclose(leaf, alone, rtol=1e-6)

  key, steps = jax.random.key(4), 4
  got = samplers.euler_maruyama_sde(velocity, (a, b), y, key, steps)
  ts = np.append(np.linspace(1, 0.04, steps), 0.0)
  state = [np.asarray(a, np.float64), np.asarray(b, np.float64)]
  yb = lambda leaf: np.asarray(y).reshape((-1,) + (1,) * (leaf.ndim - 1))
  for i in range(steps):
    t, dt = ts[i], ts[i + 1] - ts[i]
    keys = jax.random.split(jax.random.fold_in(key, i), 2)
    for k, leaf in enumerate(state):
      v = leaf * (0.5 + yb(leaf)) - t
      score = ((1 - t) / -1 * v - leaf) / (t ** 2 - (1 - t) / -1 * t)  # linear path: alpha / alpha' = -(1 - t)
      drift = v - t * score
      state[k] = leaf + drift * dt
      if i < steps - 1:
        state[k] = state[k] + np.sqrt(2 * t) * np.sqrt(abs(dt)) * np.asarray(jax.random.normal(keys[k], leaf.shape))
  for leaf, expected in zip(got, state):
    np.testing.assert_allclose(leaf, expected, rtol=1e-4, atol=1e-5)


def test_a_reg_model_samples_images():
  config = tiny.get_config("reg=reg")
  config.data.update(autoencoder="identity", latent_shape=(8, 8, 3), latent_scale=1.0)
  config.sample.update(sampler="sde", steps=4, num_samples=8, batch_size=8, labels="uniform", cfg_scale=1.5)
  images, labels = images_on(jax.devices()[:1], config)
  assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (8,)


def test_reg_needs_repa_and_the_mlp_projector():
  config = tiny.get_config("reg=reg")
  validate(config)
  config.align.weight = 0.0
  with pytest.raises(ValueError, match="config.reg.weight=0.03 needs REPA"):
    validate(config)
  config = tiny.get_config("reg=reg")
  config.align.projector = "conv"
  with pytest.raises(ValueError, match="projector='conv'"):
    validate(config)
