"""The sharded pure train step: equality across meshes, EMA, label dropout, no re-tracing, gradients, errors, and
every Fashion-MNIST preset training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist, tiny
from repa_jax.config import REGULARIZERS
from repa_jax.data.synthetic import SyntheticBatches
from repa_jax.models.repa_sit import model_graphdef
from repa_jax.objectives.flow import sample_time
from repa_jax.specs import rng, sharding
from repa_jax.specs.model import model_spec
from repa_jax.train.state import abstract_state, init_state, learning_rate_schedule, make_optimizer
from repa_jax.train.step import drop_labels, jit_train_step, make_train_step, sample_latents


def setup(config, mesh_shape):
  """(jitted step, state, batch iterator) on a mesh of the given ('data', 'fsdp') shape."""
  mesh = sharding.make_mesh(("data", "fsdp"), mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  tx = make_optimizer(config)
  shardings = sharding.state_sharding(abstract_state(config, tx), mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  return jit_train_step(config, mesh, shardings), init_state(config, tx, shardings), SyntheticBatches(config, batch_sharding)


def step_inputs(config, step: int, batch: dict):
  """(step key, x, dropped labels y, t, noise) that the train step draws at `step` (uniform times on the linear path),
  redrawn here for tests that recompute a term from its definition."""
  step_key = jax.random.fold_in(rng.stream(config.seed, "train"), step)
  latent_key, drop_key, time_key, noise_key = jax.random.split(step_key, 4)
  x = sample_latents(latent_key, batch, config.data.latent_scale)
  y = drop_labels(drop_key, batch["label"], config.train.label_dropout, config.data.num_classes)
  t = sample_time(time_key, x.shape[0], "uniform", "linear")
  return step_key, x, y, t, jax.random.normal(noise_key, x.shape)


def run(config, mesh_shape, steps):
  step, state, batches = setup(config, mesh_shape)
  for _ in range(steps):
    state, metrics = step(state, next(batches))
  return jax.device_get(state), jax.device_get(metrics)


# SRA's teacher (the EMA model) and student (the online model) run independent chains of FSDP collectives; XLA:CPU's
# in-process collectives of 8 fake devices can then deadlock (devices waiting in different all-to-alls, seen when a
# 2 x 4 mesh's step is reloaded from the persistent compilation cache; jax 0.10.2). Its multi-device tests use data
# parallelism, where the teacher's forward pass has no collectives.
SRA_MESH = (8, 1)


@pytest.mark.parametrize("reg, mesh_shape", [("both", (2, 4)), ("sra", SRA_MESH), ("reg", (2, 4))])
def test_sharded_step_equals_single_device_step(reg, mesh_shape):
  config = tiny.get_config(f"reg={reg}")
  config.model.width = 64  # wide enough that kernels are FSDP-sharded over 4 devices
  single, metrics_1 = run(config, (1, 1), 2)
  sharded, metrics_8 = run(config, mesh_shape, 2)
  # Same math, different reduction order across devices: float32 round-off only.
  chex.assert_trees_all_close(sharded["params"], single["params"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics_8, metrics_1, rtol=1e-5, atol=1e-6)


def test_fsdp_shards_the_large_kernels():
  config = tiny.get_config("reg=both")
  config.model.width = 64
  mesh = sharding.make_mesh(("data", "fsdp"), (2, 4), jax.devices())
  shardings = sharding.state_sharding(abstract_state(config, make_optimizer(config)), mesh)
  mlp_kernel = shardings["params"]["sit"]["blocks"]["mlp"]["fc1"]["kernel"]  # [depth 4, 64, 256]
  assert mlp_kernel.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
  assert shardings["step"].spec == jax.sharding.PartitionSpec()


def test_ema_starts_as_copy_and_first_update_mixes_with_decay():
  config = tiny.get_config("reg=none")
  config.train.ema_decay = 0.9
  step, state, batches = setup(config, (1, 1))
  initial = jax.device_get(state)
  chex.assert_trees_all_equal(initial["ema_params"], initial["params"])
  new = jax.device_get(step(state, next(batches))[0])
  expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, initial["ema_params"], new["params"])
  chex.assert_trees_all_close(new["ema_params"], expected, rtol=1e-6)
  assert not np.allclose(new["params"]["sit"]["final_linear"]["kernel"],
                         initial["params"]["sit"]["final_linear"]["kernel"])


def test_ema_warmup_decay_follows_its_formula_step_by_step():
  config = tiny.get_config("reg=none")
  config.train.update(ema_decay=0.5, ema_warmup=True)
  step, state, batches = setup(config, (1, 1))
  ema = jax.device_get(state["ema_params"])
  for i in range(3):  # NumPy reference: decay_i = min(0.5, (1 + i) / (10 + i)) -> 0.1, 0.1818..., 0.25
    state, _ = step(state, next(batches))
    params = jax.device_get(state["params"])
    decay = min(0.5, (1 + i) / (10 + i))
    ema = jax.tree.map(lambda e, p: decay * np.asarray(e, np.float64) + (1 - decay) * np.asarray(p, np.float64), ema,
                       params)
    chex.assert_trees_all_close(jax.device_get(state["ema_params"]), ema, rtol=1e-5, atol=1e-7)
  assert min(0.5, (1 + 100) / (10 + 100)) == 0.5  # the cap takes over once (1 + i) / (10 + i) exceeds the decay


@pytest.mark.parametrize("kind", ["constant", "cosine", "cooldown"])
def test_learning_rate_schedule_matches_numpy(kind):
  config = tiny.get_config("reg=none")
  config.train.update(lr=2e-3, warmup_steps=4, steps=20, lr_schedule=kind, cooldown_fraction=0.25)
  schedule = learning_rate_schedule(config)
  for step in range(24):  # NumPy reference: linear warm-up, then constant, a half cosine or a linear cooldown to 0
    lr = 2e-3 * min(1.0, (step + 1) / 4)
    if kind == "cosine":
      lr *= 0.5 * (1 + np.cos(np.pi * min(max(step - 4, 0) / 16, 1.0)))
    if kind == "cooldown":  # the last 5 of the 20 steps: 5/5 at step 15, 1/5 at step 19, 0 from step 20 on
      lr *= min(max((20 - step) / 5, 0.0), 1.0)
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5, atol=1e-12)


def test_unknown_learning_rate_schedule_is_refused():
  config = tiny.get_config("reg=none")
  config.train.lr_schedule = "linear"
  with pytest.raises(ValueError, match="config.train.lr_schedule"):
    learning_rate_schedule(config)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bfloat16_first_moments_hold_one_bfloat16_leaf_per_parameter_and_update_alike(optimizer):
  config = tiny.get_config("reg=repa")
  config.train.update(optimizer=optimizer, lr=1e-3, grad_clip=1e9)
  params = abstract_state(config, make_optimizer(config))["params"]
  params = jax.tree.map(lambda a: jnp.full(a.shape, 0.1, a.dtype), params)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]
  updates = {}
  for dtype in ("float32", "bfloat16"):
    config.train.moment_dtype = dtype
    tx = make_optimizer(config)
    state = tx.init(params)
    counts = {d: sum(leaf.dtype == d for leaf in jax.tree.leaves(state)) for d in (jnp.bfloat16, jnp.float32)}
    if dtype == "bfloat16":  # the first moment of each parameter; the second moments and counters stay as they were
      assert counts[jnp.bfloat16] == len(jax.tree.leaves(params))
    for g in grads:
      update, state = tx.update(g, state, params)
    updates[dtype] = update
  for a, b in zip(jax.tree.leaves(updates["float32"]), jax.tree.leaves(updates["bfloat16"]), strict=True):
    assert b.dtype == jnp.float32
    assert np.linalg.norm(b - a) <= 0.02 * np.linalg.norm(a)  # bfloat16 keeps 8 mantissa bits: ~0.4% per moment


def test_stop_steps_switch_the_terms_and_the_projector_updates_off():
  config = tiny.get_config("reg=both")
  config.align.stop_step, config.disperse.stop_step = 2, 3
  step, state, batches = setup(config, (1, 1))
  projectors = []
  for i in range(4):
    state, metrics = step(state, next(batches))
    projectors.append(jax.device_get(state["params"]["projectors"]))
    align = config.align.weight * metrics["align"] if i < 2 else 0.0
    disperse = config.disperse.weight * metrics["disperse"] if i < 3 else 0.0
    np.testing.assert_allclose(metrics["loss"], metrics["flow"] + align + disperse, rtol=1e-6, atol=1e-7)
    assert np.isfinite(metrics["align"]) and np.isfinite(metrics["disperse"])  # still measured, for the logs
  assert not np.allclose(*(jax.tree.leaves(p)[0] for p in projectors[:2]))  # trained before step 2
  chex.assert_trees_all_equal(projectors[1], projectors[2], projectors[3])  # not one update from step 2 on
  unstopped = jax.eval_shape(lambda: init_state(tiny.get_config("reg=both"), make_optimizer(config), None))
  assert jax.tree.structure(state) == jax.tree.structure(unstopped)  # the parameter tree does not change


def test_label_dropout_rate_and_null_class():
  labels = jnp.zeros((200_000,), jnp.int32)
  dropped = drop_labels(jax.random.key(0), labels, 0.1, num_classes=10)
  assert set(np.unique(dropped)) == {0, 10}
  assert abs(float(jnp.mean(dropped == 10)) - 0.1) < 0.003  # ~4.5 standard deviations


def test_step_is_traced_once():
  config = tiny.get_config("reg=both")
  mesh = sharding.make_mesh(("data", "fsdp"), (1, 1), jax.devices()[:1])
  tx = make_optimizer(config)
  shardings = sharding.state_sharding(abstract_state(config, tx), mesh)
  step = jax.jit(chex.assert_max_traces(make_train_step(config, model_graphdef(model_spec(config))), n=1),
                 donate_argnums=0)
  state, batches = init_state(config, tx, shardings), SyntheticBatches(config, sharding.batch_sharding(mesh))
  for _ in range(3):
    state, _ = step(state, next(batches))
  assert int(state["step"]) == 3


def test_parameter_tree_follows_the_encoders_not_the_weight():
  """Projectors exist iff config.align.encoders is non-empty: a REPA state trains on with align.weight 0 (no REPA term,
  no features read), its projectors untouched; without encoders there are none."""
  config = tiny.get_config("reg=repa")
  tx = make_optimizer(config)
  repa_tree = jax.tree.structure(abstract_state(config, tx))
  step, state, batches = setup(config, (1, 1))
  state, _ = step(state, next(batches))
  projectors = jax.device_get(state["params"]["projectors"])
  config.align.weight = 0.0
  assert jax.tree.structure(abstract_state(config, tx)) == repa_tree
  step_off, _, batches_off = setup(config, (1, 1))
  state, metrics = step_off(state, next(batches_off))
  assert "align" not in metrics
  chex.assert_trees_all_equal(jax.device_get(state["params"]["projectors"]), projectors)
  assert not jax.tree.leaves(abstract_state(tiny.get_config("reg=none"), tx)["params"].get("projectors", {}))


@pytest.mark.parametrize("reg, term", [("repa", "align"), ("disperse", "disperse"), ("sra", "sra")])
def test_regulariser_gradient_reaches_the_blocks_up_to_the_read_one(reg, term):
  """Only the regulariser's gradient differs between a run with and without it; it must reach the model's blocks."""
  config = tiny.get_config(f"reg={reg}")
  graphdef = model_graphdef(model_spec(config))
  mesh = sharding.make_mesh(("data", "fsdp"), (1, 1), jax.devices()[:1])
  tx = make_optimizer(config)
  state = init_state(config, tx, sharding.state_sharding(abstract_state(config, tx), mesh))
  batch = next(SyntheticBatches(config, sharding.batch_sharding(mesh)))

  def block_grads(weight):
    config[term].weight = weight
    step = make_train_step(config, graphdef)

    def loss(params):  # the step's own loss (its reported metric), as a function of the parameters
      return step({**state, "params": params}, batch)[1]["loss"]

    return jax.jit(jax.grad(loss))(state["params"])["sit"]["blocks"]

  with_term, without = block_grads(0.5), block_grads(0.0)
  read_block = {"align": config.align.block, "disperse": 4 // 4, "sra": config.sra.student_block}[term]
  # Per block (the leading axis of the stacked block parameters): the largest gradient difference.
  diff = np.max([np.abs(a - b).reshape(4, -1).max(axis=1) for a, b in
                 zip(jax.tree.leaves(with_term), jax.tree.leaves(without))], axis=0)
  assert diff[read_block - 1] > 0  # the block the term reads gets its gradient
  assert diff[-1] == 0  # blocks after it do not (SRA's teacher block is under stop-gradient)


def test_loss_falls_on_a_fixed_batch():
  config = tiny.get_config("reg=both")
  config.train.lr = 3e-3
  step, state, batches = setup(config, (1, 1))
  batch = next(batches)
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics["flow"]))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_mismatched_features_and_batches_are_refused():
  config = tiny.get_config("reg=repa")
  step, state, batches = setup(config, (1, 1))
  batch = next(batches)
  features = batch["features"]["toy_encoder"]
  with pytest.raises(ValueError, match=r"gives 8 tokens but the SiT's token grid \(4, 4\) has 16"):
    step(state, {**batch, "features": {"toy_encoder": features[:, :8]}})
  with pytest.raises(ValueError, match="are 8 wide but config.align.encoders says 16"):
    step(state, {**batch, "features": {"toy_encoder": features[..., :8]}})
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 devices"):
    sharding.check_batch_divisible(6, sharding.make_mesh(("data", "fsdp"), (2, 2), jax.devices()[:4]))
  config = tiny.get_config("reg=disperse")
  config.disperse.group_size = 3
  step, state, batches = setup(config, (1, 1))
  with pytest.raises(ValueError, match="group_size=3 does not divide the per-step batch 8"):
    step(state, next(batches))


@pytest.mark.parametrize("reg", sorted(REGULARIZERS))
def test_every_fashion_mnist_preset_trains(reg):
  config = fashion_mnist.get_config(f"reg={reg}")
  config.data.source = "synthetic"
  config.train.batch_size = 16  # one dispersive group of 16
  state, metrics = run(config, (1, 1), 2)
  assert all(np.isfinite(v) for v in jax.tree.leaves(metrics)) and int(state["step"]) == 2
