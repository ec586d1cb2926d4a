"""LightningDiT's block switches (RMSNorm, SwiGLU, 2D RoPE, QK-norm) and its velocity-direction loss, against NumPy."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from repa_jax.convert.sit import convert_state_dict
from repa_jax.models.layers import Attention, RMSNorm, SwiGLU, apply_rope, rope_2d_angles
from repa_jax.models.repa_sit import build_model
from repa_jax.models.sit import SiT
from repa_jax.objectives.flow import velocity_direction_loss
from repa_jax.specs.model import model_spec, spec_from_name
from repa_jax.train.loop import train
from tests.test_train_step import run

RNG = np.random.default_rng(0)
ALL_ON = dict(norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=True)


def normal(*shape):
  return RNG.normal(size=shape).astype(np.float32)


def numpy_rms_norm(x, weight, eps=1e-6):
  return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * weight


def numpy_layer_norm(x, weight, bias, eps):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def numpy_grad(f, x, h=1e-3):
  """Central differences of the scalar f at every entry of x (float64)."""
  x, grad = x.astype(np.float64), np.zeros(x.shape)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    grad[i] = (f(x + e) - f(x - e)) / (2 * h)
  return grad


def test_rms_norm_values_and_gradients_match_numpy():
  x, weight, probe = normal(3, 8), 1 + 0.1 * normal(8), normal(3, 8)
  norm = RMSNorm(8)
  norm.weight[...] = jnp.asarray(weight)
  np.testing.assert_allclose(norm(jnp.asarray(x)), numpy_rms_norm(x, weight), rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda x: (norm(x) * probe).sum())(jnp.asarray(x))
  np.testing.assert_allclose(grad, numpy_grad(lambda x: (numpy_rms_norm(x, weight) * probe).sum(), x),
                             rtol=1e-3, atol=1e-4)


def test_swiglu_values_and_gradients_match_numpy():
  mlp = SwiGLU(6, 4, nnx.Rngs(0))
  w12, b12 = np.asarray(mlp.w12.kernel[...]), normal(8)
  w3, b3 = np.asarray(mlp.w3.kernel[...]), normal(6)
  mlp.w12.bias[...], mlp.w3.bias[...] = jnp.asarray(b12), jnp.asarray(b3)
  silu = lambda a: a / (1 + np.exp(-a))

  def reference(x):
    h = x @ w12 + b12
    return (silu(h[..., :4]) * h[..., 4:]) @ w3 + b3  # the first half gates the second

  x = normal(5, 6)
  np.testing.assert_allclose(mlp(jnp.asarray(x)), reference(x), rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda x: mlp(x).sum())(jnp.asarray(x))
  np.testing.assert_allclose(grad, numpy_grad(lambda x: reference(x).sum(), x), rtol=1e-3, atol=1e-3)


def numpy_rope(x, grid_h, grid_w, theta=10000.0):
  """EVA-02's / LightningDiT's VisionRotaryEmbeddingFast on x [B, N, H, Dh], written out per channel pair."""
  dh = x.shape[-1]
  half = dh // 2
  out = np.empty_like(x, dtype=np.float64)
  for n in range(grid_h * grid_w):
    row, col = divmod(n, grid_w)
    for pair in range(dh // 2):
      axis_pos, k = (row, pair) if 2 * pair < half else (col, pair - half // 2)
      angle = axis_pos * theta ** (-2 * k / half)
      a, b = x[:, n, :, 2 * pair], x[:, n, :, 2 * pair + 1]
      out[:, n, :, 2 * pair] = a * np.cos(angle) - b * np.sin(angle)
      out[:, n, :, 2 * pair + 1] = b * np.cos(angle) + a * np.sin(angle)
  return out


def test_rope_matches_numpy_and_scores_depend_on_relative_position_only():
  x = normal(2, 12, 3, 8)  # grid 3 x 4, head width 8
  angles = jnp.asarray(rope_2d_angles(8, 3, 4))
  np.testing.assert_allclose(apply_rope(jnp.asarray(x), angles), numpy_rope(x, 3, 4), rtol=1e-5, atol=1e-5)
  # The same q and k at every position: q_m . k_n depends on the offset (row_m - row_n, col_m - col_n) only.
  q, k = (np.broadcast_to(normal(1, 1, 1, 8), (1, 12, 1, 8)) for _ in range(2))
  scores = np.einsum("bqhd,bkhd->qk", apply_rope(jnp.asarray(q), angles), apply_rope(jnp.asarray(k), angles))
  position = lambda n: divmod(n, 4)
  for m, n, m2, n2 in [(0, 5, 6, 11), (1, 4, 7, 10), (4, 0, 9, 5)]:
    assert np.subtract(position(m), position(n)).tolist() == np.subtract(position(m2), position(n2)).tolist()
    np.testing.assert_allclose(scores[m, n], scores[m2, n2], rtol=1e-4, atol=1e-5)
  assert not np.isclose(scores[0, 1], scores[0, 4], rtol=1e-3)  # different offsets, different scores


@pytest.mark.parametrize("implementation", ["einsum", "xla"])
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_qk_norm_attention_matches_numpy(kind, implementation):
  attn = Attention(8, 2, nnx.Rngs(0), qk_norm=kind, implementation=implementation)
  wq, bq = np.asarray(attn.qkv.kernel[...]), normal(24)
  attn.qkv.bias[...] = jnp.asarray(bq)
  x = normal(2, 6, 8)
  qkv = (x @ wq + bq).reshape(2, 6, 3, 2, 4)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if kind == "rmsnorm":
    q, k = numpy_rms_norm(q, 1.0), numpy_rms_norm(k, 1.0)
  else:
    q, k = numpy_layer_norm(q, 1.0, 0.0, 1e-5), numpy_layer_norm(k, 1.0, 0.0, 1e-5)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 6, 8) @ np.asarray(attn.proj.kernel[...])
  np.testing.assert_allclose(attn(jnp.asarray(x)), out, rtol=1e-4, atol=1e-5)


def test_dot_product_attention_gives_the_einsum_path_values_and_gradients():
  """jax.nn.dot_product_attention ('xla') computes the written-out attention: the SiT's output and its gradient agree;
  cuDNN's kernel is refused without a GPU."""
  config = tiny.get_config("reg=none")
  x, t, y = jnp.asarray(normal(2, 8, 8, 4)), jnp.asarray([0.2, 0.9]), jnp.asarray([1, 3])
  outputs = {}
  for implementation in ("einsum", "xla"):
    config.model.attention = implementation
    model = build_model(model_spec(config), jax.random.key(0)).sit
    nnx.update(model, jax.tree.map(lambda p: p + 0.02, nnx.state(model, nnx.Param)))  # non-zero output layers
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t, y)[0] ** 2)
    outputs[implementation] = jax.value_and_grad(loss)(params)
  chex.assert_trees_all_close(outputs["xla"], outputs["einsum"], rtol=1e-4, atol=1e-6)
  if jax.default_backend() == "cpu":
    with pytest.raises(Exception, match="(?i)cudnn|gpu|cuda"):
      Attention(8, 2, nnx.Rngs(0), implementation="cudnn")(jnp.asarray(normal(1, 4, 8)))


def numpy_velocity_direction_loss(a, b, eps=1e-8):
  dot = (a * b).sum(-1)
  cos = dot / (np.maximum(np.linalg.norm(a, axis=-1), eps) * np.maximum(np.linalg.norm(b, axis=-1), eps))
  return (1 - cos).mean()


def test_velocity_direction_loss_values_and_gradients_match_numpy():
  a, b = normal(2, 3, 3, 4), normal(2, 3, 3, 4)
  np.testing.assert_allclose(velocity_direction_loss(jnp.asarray(a), jnp.asarray(b)),
                             numpy_velocity_direction_loss(a, b), rtol=1e-5)
  grad = jax.grad(velocity_direction_loss)(jnp.asarray(a), jnp.asarray(b))
  np.testing.assert_allclose(grad, numpy_grad(lambda a: numpy_velocity_direction_loss(a, b), a), rtol=1e-3,
                             atol=1e-5)
  assert float(velocity_direction_loss(jnp.asarray(b), jnp.asarray(3 * b))) == pytest.approx(0.0, abs=1e-6)
  zero_grad = jax.grad(velocity_direction_loss)(jnp.zeros_like(b), jnp.asarray(b))  # a zero-initialised model's v
  assert np.isfinite(np.asarray(zero_grad)).all()


def count_params(name, **switches):
  spec = dataclasses.replace(spec_from_name(name, input_size=(32, 32), in_channels=4, num_classes=1000), **switches)
  return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: SiT(spec, nnx.Rngs(0))), nnx.Param)))


def test_parameter_counts_of_each_switch():
  base, depth, width = count_params("XL/2"), 28, 1152
  assert abs(base / 1e6 - 675) / 675 < 0.01  # every switch off: the official SiT-XL/2
  assert count_params("XL/2", rope=True) == base  # rotations have no parameters
  assert count_params("XL/2", norm="rmsnorm") == base + (2 * depth + 1) * width  # a weight per block norm and final
  assert count_params("XL/2", qk_norm=True) == base + depth * 2 * 2 * (width // 16)  # LayerNorm weight + bias of q, k
  hidden = int(2 / 3 * 4 * width)  # 3072
  gelu_mlp, swiglu_mlp = 2 * 4 * width * width + 5 * width, 3 * hidden * width + 2 * hidden + width
  assert count_params("XL/2", mlp="swiglu") == base + depth * (swiglu_mlp - gelu_mlp)


def test_all_switches_train_sharded_equal_to_unsharded():
  config = tiny.get_config("reg=both")
  config.model.update(width=64, **ALL_ON)
  config.flow.cosine_weight = 1.0
  single, metrics_1 = run(config, (1, 1), 2)
  sharded, metrics_8 = run(config, (2, 4), 2)
  assert np.isfinite(metrics_1["cosine"]) and metrics_1["cosine"] > 0
  chex.assert_trees_all_close(sharded["params"], single["params"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics_8, metrics_1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("switch", sorted(ALL_ON))
def test_a_checkpoint_with_another_block_switch_is_refused(tmp_path, switch):
  config = tiny.get_config("reg=none")
  config.train.update(steps=1, checkpoint_every=1)
  train(config, str(tmp_path))
  config.train.steps = 2
  config.model[switch] = ALL_ON[switch]
  with pytest.raises(ValueError, match=f"incompatible config.*{switch}"):
    train(config, str(tmp_path))


def test_the_official_converter_refuses_the_switches():
  config = tiny.get_config("reg=none")
  config.model.update(norm="rmsnorm", rope=True)
  with pytest.raises(ValueError, match="config.model.norm='rmsnorm', config.model.rope=True: the official"):
    convert_state_dict({}, config)
