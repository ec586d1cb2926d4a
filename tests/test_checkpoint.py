"""Checkpoints: restore onto another mesh or device count, refusal of another architecture, what is kept."""
import jax
import numpy as np
import pytest

from configs import tiny
from repa_jax.data.synthetic import SyntheticBatches
from repa_jax.specs import sharding
from repa_jax.train import checkpoint
from repa_jax.train.loop import train
from repa_jax.train.state import abstract_state, make_optimizer
from repa_jax.train.step import jit_train_step


def wide_config(steps, mesh_shape=(2, 4)):
  """The tiny config, wide enough (width 128) for FSDP to shard the larger kernels."""
  config = tiny.get_config("reg=both")
  config.model.update(width=128, num_heads=2, depth=2)
  config.train.update(steps=steps, checkpoint_every=2, log_every=2)
  config.mesh.shape = mesh_shape
  return config


def restore_on(workdir, config, devices):
  """(newest state of `workdir` restored onto an FSDP mesh over `devices`, the mesh, the state shardings)."""
  mesh = sharding.make_mesh(("data", "fsdp"), (1, len(devices)), devices)
  abstract = abstract_state(config, make_optimizer(config))
  shardings = sharding.state_sharding(abstract, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  state, _ = checkpoint.restore_latest(checkpoint.make_manager(str(workdir), config), target, config)
  return state, mesh, shardings


def test_restore_onto_fewer_devices_gives_equal_values_and_training_continues(tmp_path):
  config = wide_config(2)
  saved = jax.device_get(train(config, str(tmp_path)))
  for devices in (jax.devices()[:4], jax.devices()[:1]):
    state, mesh, shardings = restore_on(tmp_path, config, devices)
    leaves = jax.tree.leaves(state)
    assert {d for leaf in leaves for d in leaf.devices()} == set(devices)
    assert len(devices) == 1 or any(not leaf.sharding.is_fully_replicated for leaf in leaves)  # FSDP-sharded
    for a, b in zip(jax.tree.leaves(saved), leaves, strict=True):
      np.testing.assert_array_equal(a, np.asarray(b))
    batch = next(SyntheticBatches(config, sharding.batch_sharding(mesh)))
    state, metrics = jit_train_step(config, mesh, shardings)(state, batch)
    assert int(state["step"]) == 3 and np.isfinite(float(metrics["loss"]))


def test_resume_on_another_mesh_shape_continues_the_run(tmp_path):
  uninterrupted = jax.device_get(train(wide_config(4), str(tmp_path / "a")))
  train(wide_config(2, mesh_shape=(2, 4)), str(tmp_path / "b"))
  resumed = jax.device_get(train(wide_config(4, mesh_shape=(8, 1)), str(tmp_path / "b")))
  assert int(resumed["step"]) == 4
  # Another mesh reduces gradients in another order: equal up to float32 rounding, not bit for bit.
  for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field, change", [
    ("model.width", lambda c: c.model.update(width=64)),
    ("align.encoders", lambda c: c.align.update(encoders=(("other_encoder", 16),))),
    ("data.latent_shape", lambda c: c.data.update(latent_shape=(16, 16, 4))),
    ("train.optimizer", lambda c: c.train.update(optimizer="muon")),  # another optimizer state tree
    ("sra.head", lambda c: c.sra.update(weight=0.2)),  # SRA's head joins the parameters
    ("reg.class_token", lambda c: c.reg.update(weight=0.03)),  # REG: the class token's layers join the SiT
])
def test_a_checkpoint_of_another_architecture_is_refused_naming_the_field(tmp_path, field, change):
  config = tiny.get_config("reg=both")
  config.train.update(steps=1, checkpoint_every=1)
  train(config, str(tmp_path))
  other = tiny.get_config("reg=both")
  other.train.update(steps=2, checkpoint_every=1)
  change(other)
  with pytest.raises(ValueError, match=f"incompatible config.*{field.split('.')[0]}"):
    train(other, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]  # nothing lost or overwritten


def test_a_checkpoint_resumes_with_another_dtype_or_remat(tmp_path):
  config = tiny.get_config("reg=none")
  config.train.update(steps=1, checkpoint_every=1)
  train(config, str(tmp_path))
  config.train.steps = 2
  config.model.update(dtype="bfloat16", remat="full")  # how the same parameters are computed, not which
  train(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_keeps_the_newest_k_and_every_m_th(tmp_path):
  config = tiny.get_config("reg=none")
  config.train.update(steps=9, checkpoint_every=1, keep_checkpoints=2, keep_every=4)
  train(config, str(tmp_path))
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 8, 9]
