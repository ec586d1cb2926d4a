"""Muon (config.train.optimizer='muon'): which parameters it orthogonalises, its Gram-space Newton-Schulz iteration and
its update against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from repa_jax.models.repa_sit import abstract_params
from repa_jax.specs.model import model_spec
from repa_jax.train.loop import train
from repa_jax.train.muon import NS_COEFFS, orthogonalize
from repa_jax.train.state import MUON_RMS, make_optimizer, muon_batch_axes, optimizer_labels


def leaf_batch_axes(config, adamw_modules=()):
  """{'sit/blocks/mlp/fc1/kernel': leading batch axes or None} for every parameter of the config."""
  axes = muon_batch_axes(abstract_params(model_spec(config)), adamw_modules)
  flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: x is None)[0]
  name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path if hasattr(k, "key"))
  return {name(path): a for path, a in flat}


def test_muon_takes_the_hidden_matrices_and_leaves_the_rest_to_adamw():
  axes = leaf_batch_axes(tiny.get_config("reg=repa"))
  assert axes["sit/blocks/mlp/fc1/kernel"] == 1  # [depth, in, out]: one matrix per block
  assert axes["sit/blocks/ada_ln/kernel"] == 1
  assert axes["sit/t_embed/fc1/kernel"] == 0
  assert axes["projectors/toy_encoder/fc2/kernel"] == 0
  for adamw in ("sit/patch_embed/kernel", "sit/final_linear/kernel", "sit/blocks/mlp/fc1/bias", "sit/y_embed/embedding",
                "sit/final_ada_ln/bias"):
    assert axes[adamw] is None, adamw
  assert leaf_batch_axes(tiny.get_config("reg=irepa"))["projectors/toy_encoder/conv/kernel"] == 0  # [kh * kw * in, out]


def test_muon_adamw_modules_move_the_named_matrices_to_adamw_and_refuse_unknown_names():
  config = tiny.get_config("reg=repa")
  axes = leaf_batch_axes(config, ("ada_ln", "final_ada_ln"))
  assert axes["sit/blocks/ada_ln/kernel"] is None and axes["sit/final_ada_ln/kernel"] is None
  assert axes["sit/blocks/mlp/fc1/kernel"] == 1 and axes["sit/t_embed/fc1/kernel"] == 0
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(model_spec(config)))
  with pytest.raises(ValueError, match=r"config.train.muon_adamw_modules.*\['adaln'\]"):
    optimizer_labels(params, ("adaln",))
  # The optimizer trains them with AdamW (Nesterov's, as the rest of AdamW's parameters): optax's nadamw update.
  config.train.update(optimizer="muon", muon_adamw_modules=("ada_ln", "final_ada_ln"), lr=1e-2, grad_clip=1e9)
  tx = make_optimizer(config)
  grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).normal(size=p.shape), p.dtype), params)
  update, _ = tx.update(grads, tx.init(params), params)
  kernel = lambda tree: tree["sit"]["blocks"]["ada_ln"]["kernel"]
  adamw = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, nesterov=True)
  want, _ = adamw.update(kernel(grads), adamw.init(kernel(params)), kernel(params))
  np.testing.assert_allclose(kernel(update), want, rtol=1e-5, atol=1e-8)


def numpy_orthogonalise(g, steps, eps=1e-8):
  """The quintic Newton-Schulz iteration on one matrix [in, out], on its wide orientation, as Jordan et al. write it."""
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    a = x @ x.T
    x = NS_COEFFS[0] * x + (NS_COEFFS[1] * a + NS_COEFFS[2] * a @ a) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def numpy_muon(grads, lr, beta, steps):
  """Parameter deltas of Muon on a stacked kernel [depth, in, out] over successive gradients: bias-corrected
  Nesterov momentum, each block's matrix orthogonalised, scaled by MUON_RMS * sqrt(max(in, out))."""
  mu, deltas = np.zeros_like(grads[0]), []
  for t, g in enumerate(grads, start=1):
    mu = beta * mu + (1 - beta) * g
    nesterov = beta * mu / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
    scale = MUON_RMS * np.sqrt(max(g.shape[1:]))
    deltas.append(-lr * scale * np.stack([numpy_orthogonalise(m, steps) for m in nesterov]))
  return deltas


@pytest.mark.parametrize("steps", [0, 1, 5])
@pytest.mark.parametrize("shape", [(3, 8, 24), (24, 8), (16, 16)])
def test_gram_space_iteration_matches_the_written_out_one(shape, steps):
  rng = np.random.default_rng(1)
  u, _ = np.linalg.qr(rng.normal(size=(shape[-2], shape[-2])))
  x = rng.normal(size=shape)
  x[..., :, :] = u[:, :] @ (np.geomspace(1, 1e-4, shape[-2])[:, None] * x)  # singular values over 4 decades
  got = np.asarray(orthogonalize(jnp.asarray(x, jnp.float32), steps))
  want = np.stack([numpy_orthogonalise(m, steps) for m in x.reshape(-1, *shape[-2:])]).reshape(shape)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("ns_steps", [3, 5])
def test_muon_update_matches_numpy(ns_steps):
  config = tiny.get_config("reg=none")
  config.train.update(optimizer="muon", lr=1e-2, muon_lr_scale=2.0, muon_beta=0.9, muon_ns_steps=ns_steps,
                      grad_clip=1e9)
  rng = np.random.default_rng(0)
  params = {"sit": {"blocks": {"mlp": {"fc1": {"kernel": jnp.zeros((3, 8, 24))}}},
                    "final_linear": {"kernel": jnp.zeros((8, 4))}}}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]
  tx = make_optimizer(config)
  state, deltas = tx.init(params), []
  for g in grads:
    update, state = tx.update(g, state, params)
    deltas.append(update)
  expected = numpy_muon([np.asarray(g["sit"]["blocks"]["mlp"]["fc1"]["kernel"]) for g in grads], 2e-2, 0.9, ns_steps)
  for got, want in zip(deltas, expected, strict=True):
    np.testing.assert_allclose(got["sit"]["blocks"]["mlp"]["fc1"]["kernel"], want, rtol=2e-4, atol=1e-6)
  # The output layer is AdamW's (with Muon's Nesterov momentum): optax's nadamw at the schedule's learning rate.
  adamw = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, nesterov=True)
  adamw_state = adamw.init(params["sit"]["final_linear"])
  for g, got in zip(grads, deltas, strict=True):
    want, adamw_state = adamw.update(g["sit"]["final_linear"], adamw_state, params["sit"]["final_linear"])
    np.testing.assert_allclose(got["sit"]["final_linear"]["kernel"], want["kernel"], rtol=1e-5, atol=1e-8)


def test_muon_trains_and_resumes_bit_identically(tmp_path):
  config = tiny.get_config("reg=irepa")  # a conv projector too
  config.train.update(optimizer="muon", steps=4, checkpoint_every=2)
  uninterrupted = jax.device_get(train(config, str(tmp_path / "a")))
  config.train.steps = 2
  train(config, str(tmp_path / "b"))
  config.train.steps = 4
  resumed = jax.device_get(train(config, str(tmp_path / "b")))
  for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert np.isfinite(np.asarray(jax.tree.leaves(uninterrupted["params"])[0])).all()


def test_unknown_optimizer_is_refused():
  config = tiny.get_config("reg=none")
  config.train.optimizer = "sgd"
  with pytest.raises(ValueError, match="config.train.optimizer"):
    make_optimizer(config)
