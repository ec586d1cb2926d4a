"""SiT shapes, parameter counts, zero-init, hidden states and precision."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repa_jax.models.layers import sincos_pos_embed_2d
from repa_jax.models.sit import SiT
from repa_jax.specs.model import PATCH_SIZES, SIZES, ModelSpec, spec_from_name


def count_params(name, **kw):
  spec = spec_from_name(name, input_size=(32, 32), in_channels=4, num_classes=1000, **kw)
  model = nnx.eval_shape(lambda: SiT(spec, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name, millions", [("B/2", 130), ("L/2", 458), ("XL/2", 675)])
def test_parameter_counts_match_the_paper(name, millions):
  assert abs(count_params(name) / 1e6 - millions) / millions < 0.01


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("patch", PATCH_SIZES)
def test_output_and_hidden_shapes_for_every_size(size, patch):
  spec = spec_from_name(f"{size}/{patch}", input_size=(32, 32), in_channels=4, num_classes=1000)
  model = nnx.eval_shape(lambda: SiT(spec, nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  out, hiddens = jax.eval_shape(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y, hidden_blocks=(1, spec.depth)),
                                params, x, t, y)
  assert out.shape == (2, 32, 32, 4) and out.dtype == jnp.float32
  assert set(hiddens) == {1, spec.depth}
  assert hiddens[1].shape == (2, (32 // patch) ** 2, SIZES[size][1])


def tiny_sit(dtype=jnp.float32, remat="none", **kw):
  spec = spec_from_name("S/4", input_size=(28, 28), in_channels=1, num_classes=10, depth=3, width=32, num_heads=2,
                        **kw)
  return SiT(spec, nnx.Rngs(0), dtype=dtype, remat=remat)


def random_inputs(batch=3):
  keys = jax.random.split(jax.random.key(1), 2)
  return (jax.random.normal(keys[0], (batch, 28, 28, 1)), jax.random.uniform(keys[1], (batch,)),
          jnp.arange(batch) % 11)


def test_zero_init_gives_zero_output_and_nonzero_after_perturbing_the_final_layer():
  model = tiny_sit()
  out, _ = model(*random_inputs())
  chex.assert_trees_all_equal(out, jnp.zeros_like(out))
  model.final_linear.bias[...] = 1.0
  out, _ = model(*random_inputs())
  assert jnp.all(out == 1.0)


def test_hidden_blocks_are_one_indexed_block_outputs():
  model = tiny_sit()
  x, t, y = random_inputs()
  _, hiddens = model(x, t, y, hidden_blocks=(1, 3))
  assert hiddens[1].shape == (3, 49, 32)
  # Block 1's output feeds block 2: recompute block 2 and 3 by hand from block 1 and compare with block 3.
  c = model.t_embed(t) + model.y_embed(y)
  chex.assert_trees_all_close(model.run_blocks(hiddens[1], c, 1, 3)[0], hiddens[3], atol=1e-6)
  graphdef, stacked = nnx.split(model.blocks)
  block = lambda k: nnx.merge(graphdef, jax.tree.map(lambda p: p[k - 1], stacked))  # the k-th block alone
  chex.assert_trees_all_close(block(3)(block(2)(hiddens[1], c), c), hiddens[3], atol=1e-6)
  with pytest.raises(ValueError, match="outside 1..3"):
    model(x, t, y, hidden_blocks=(0,))


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_changes_no_value_or_gradient(remat):
  x, t, y = random_inputs()

  def loss_and_grads(model):
    graphdef, params = nnx.split(model)
    loss = lambda p: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(nnx.merge(graphdef, p)(x, t, y, (2,))))
    return jax.jit(jax.value_and_grad(loss))(jax.tree.map(lambda a: a + 0.05, params))  # off the zero init

  reference, rematerialised = loss_and_grads(tiny_sit()), loss_and_grads(tiny_sit(remat=remat))
  chex.assert_trees_all_close(rematerialised, reference, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(reference[1]["blocks"]["mlp"]["fc1"]["kernel"][...]).max()) > 0  # a real gradient


def test_position_embedding_is_fixed_2d_sincos_and_not_a_parameter():
  names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(tiny_sit(), nnx.Param))}
  assert not any("pos" in n for n in names)
  emb = sincos_pos_embed_2d(8, 2, 3)  # [6, 8]: first half encodes the column, second half the row
  np.testing.assert_allclose(emb[:, 0], np.sin([0, 1, 2, 0, 1, 2]), atol=1e-6)
  np.testing.assert_allclose(emb[:, 4], np.sin([0, 0, 0, 1, 1, 1]), atol=1e-6)
  np.testing.assert_allclose(emb[:, 2], np.cos([0, 1, 2, 0, 1, 2]), atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters_and_output():
  model = tiny_sit(jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  model.final_linear.bias[...] = 1.0
  out, hiddens = model(*random_inputs(), hidden_blocks=(2,))
  assert out.dtype == jnp.float32 and hiddens[2].dtype == jnp.bfloat16


def test_unknown_model_name_bad_patch_and_unknown_remat_are_refused():
  with pytest.raises(ValueError, match="config.model.name='M/2'"):
    spec_from_name("M/2", input_size=(32, 32), in_channels=4, num_classes=10)
  with pytest.raises(ValueError, match="not divisible by the patch size 8"):
    spec_from_name("S/8", input_size=(28, 28), in_channels=1, num_classes=10)
  sit = spec_from_name("S/4", input_size=(28, 28), in_channels=1, num_classes=10)
  with pytest.raises(ValueError, match="config.model.remat='some'"):
    ModelSpec(sit=sit, encoders=(), projector_dim=8, remat="some")
