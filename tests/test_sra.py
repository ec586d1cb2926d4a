"""SRA (self-representation alignment) against NumPy references of the official formulas (values and gradients), its
teacher (the EMA model's block, less noisy, stop-gradient), its stop step and its config checks."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from repa_jax.models.repa_sit import build_model, model_graphdef
from repa_jax.objectives import self_alignment as sra
from repa_jax.objectives.flow import interpolate
from repa_jax.specs.model import model_spec
from repa_jax.validate import validate
from tests.test_train_step import setup, step_inputs


def smooth_l1_reference(x, beta):
  """torch.nn.functional.smooth_l1_loss's elementwise formula and its derivative, float64."""
  ax = np.abs(x)
  return np.where(ax < beta, 0.5 * x**2 / beta, ax - 0.5 * beta), np.where(ax < beta, x / beta, np.sign(x))


def test_smooth_l1_loss_value_and_gradient():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(3, 5, 8)) * 0.1, rng.normal(size=(3, 5, 8)) * 0.1  # both sides of beta
  value, grad = jax.value_and_grad(sra.self_alignment_loss)(jnp.asarray(student, jnp.float32),
                                                            jnp.asarray(teacher, jnp.float32), "smooth_l1", 0.05)
  elementwise, derivative = smooth_l1_reference(student - teacher, 0.05)
  assert 0 < np.mean(np.abs(student - teacher) < 0.05) < 1  # the test covers both branches
  np.testing.assert_allclose(value, elementwise.mean(), rtol=1e-5)
  np.testing.assert_allclose(grad, derivative / student.size, rtol=1e-4, atol=1e-8)


def test_cosine_loss_value_and_gradient():
  rng = np.random.default_rng(1)
  student, teacher = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6))

  def reference(s):  # 1 - cos per token over channels, the mean over batch and tokens
    cos = np.sum(s * teacher, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(teacher, axis=-1))
    return np.mean(1 - cos)

  value, grad = jax.value_and_grad(sra.self_alignment_loss)(jnp.asarray(student, jnp.float32),
                                                            jnp.asarray(teacher, jnp.float32), "cosine")
  np.testing.assert_allclose(value, reference(student), rtol=1e-5)
  eps, numeric = 1e-6, np.zeros_like(student)
  for index in np.ndindex(student.shape):
    step = np.zeros_like(student)
    step[index] = eps
    numeric[index] = (reference(student + step) - reference(student - step)) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)
  with pytest.raises(ValueError, match="config.sra.objective"):
    sra.self_alignment_loss(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1, 2)), "mse")


def test_teacher_time_is_t_minus_a_uniform_gap_clipped_at_zero():
  t = jnp.asarray(np.random.default_rng(2).uniform(size=10_000), jnp.float32)
  key = jax.random.key(3)
  s = np.asarray(sra.teacher_time(key, t, 0.2))
  u = np.asarray(jax.random.uniform(key, t.shape, jnp.float32))
  np.testing.assert_allclose(s, np.clip(np.asarray(t) - 0.2 * u, 0, 1), rtol=1e-6, atol=1e-7)
  gap = np.asarray(t) - s
  assert gap.min() >= 0 and gap.max() <= 0.2 + 1e-6 and (s == 0).any()


def test_weight_schedule_is_the_official_one():
  """SiT-SRA/train.py: 2 * 0.1 ** (((epoch - 149) / 1000 + 1) if epoch > 149 else 1), per epoch."""
  for epoch in (0, 100, 149, 150, 400, 800, 1500):
    official = 2 * 0.1 ** (((epoch - 149) / 1000 + 1) if epoch > 149 else 1)
    for step in (epoch * 5005, epoch * 5005 + 5004):
      got = sra.sra_weight(jnp.int32(step), 0.2, 5005, 149, 1000)
      np.testing.assert_allclose(got, official, rtol=1e-5)
  assert float(sra.sra_weight(jnp.int32(10**8), 0.5, 5005, 149, None)) == 0.5


def test_hidden_states_equal_the_full_forward_and_run_no_later_block():
  config = tiny.get_config("reg=sra")
  sit = build_model(model_spec(config), jax.random.key(0)).sit
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, y = jnp.asarray([0.3, 0.9]), jnp.asarray([1, 10])
  _, full = sit(x, t, y, hidden_blocks=(1, 3))
  partial = sit.hidden_states(x, t, y, (1, 3))
  chex.assert_trees_all_close(partial, full, rtol=1e-6)
  # Block 4's parameters cannot change block 3's output.
  graphdef, params = nnx.split(sit)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p.at[3].set(100.0) if any(getattr(k, "key", None) == "blocks" for k in path) else p, params)
  chex.assert_trees_all_close(nnx.merge(graphdef, params).hidden_states(x, t, y, (3,))[3], full[3], rtol=1e-6)


def test_sra_term_is_the_head_on_the_student_against_the_ema_teacher():
  """The step's SRA metric recomputed from its definition: the online model's head on block `student`, the EMA
  model's block `teacher` at the teacher time, same data, noise and (dropped) labels."""
  config = tiny.get_config("reg=sra")
  config.flow.time_sampler = "uniform"
  step, state, batches = setup(config, (1, 1))
  state, _ = step(state, next(batches))  # the EMA now differs from the online parameters
  state = jax.device_get(state)
  batch = next(batches)
  _, metrics = step(jax.tree.map(jnp.asarray, state), batch)

  step_key, x, y, t, noise = step_inputs(config, state["step"], batch)
  s = sra.teacher_time(jax.random.fold_in(step_key, 1), t, config.sra.max_time_gap)
  graphdef = model_graphdef(model_spec(config))
  online, ema = nnx.merge(graphdef, state["params"]), nnx.merge(graphdef, state["ema_params"])
  _, student = online.sit(interpolate(x, noise, t, "linear")[0], t, y, hidden_blocks=(1,))
  _, teacher = ema.sit(interpolate(x, noise, s, "linear")[0], s, y, hidden_blocks=(3,))
  elementwise, _ = smooth_l1_reference(np.asarray(online.sra_head(student[1]), np.float64) -
                                       np.asarray(teacher[3], np.float64), config.sra.beta)
  np.testing.assert_allclose(metrics["sra"], elementwise.mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], metrics["flow"] + config.sra.weight * metrics["sra"], rtol=1e-5)


def test_stop_step_freezes_the_head_and_keeps_the_tree():
  config = tiny.get_config("reg=sra")
  config.sra.stop_step = 2
  step, state, batches = setup(config, (1, 1))
  heads = []
  for i in range(4):
    state, metrics = step(state, next(batches))
    heads.append(jax.device_get(state["params"]["sra_head"]))
    expected = metrics["flow"] + (config.sra.weight * metrics["sra"] if i < 2 else 0.0)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(*(jax.tree.leaves(h)[0] for h in heads[:2]))
  chex.assert_trees_all_equal(heads[1], heads[2], heads[3])


def test_no_head_without_sra_and_blocks_checked():
  assert "sra_head" not in nnx.state(build_model(model_spec(tiny.get_config("reg=repa")), jax.random.key(0)))
  config = tiny.get_config("reg=sra")
  config.sra.update(student_block=3, teacher_block=3)
  with pytest.raises(ValueError, match="config.sra.student_block=3 >= teacher_block=3"):
    validate(config)
  config.sra.update(student_block=1, objective="l2")
  with pytest.raises(ValueError, match="config.sra.objective='l2'"):
    validate(config)
