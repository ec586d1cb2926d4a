"""The evaluation CNN against a NumPy forward pass; its training and cache as the encoder's (tiny, generated images)."""
import chex
import jax
import numpy as np
import pytest
from flax import nnx

from repa_jax.models import supervised as encoder
from repa_jax.models.cnn import CNN, CNNSpec, max_pool_2x2
from tests.test_vit_encoder import generated_images

TINY_CNN = encoder.EncoderConfig(arch="cnn", stage_channels=(4, 8, 8), steps=30, batch=32, lr=3e-3, warmup_steps=2)


def numpy_conv3x3(x, kernel, bias):
  """x [B, H, W, C], kernel [3, 3, C, D] -> [B, H, W, D], zero padding 1 (SAME), float64."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(np.einsum("bhwc,cd->bhwd", padded[:, i:i + h, j:j + w], kernel[i, j]) for i in range(3) for j in range(3))
  return out + bias


def numpy_cnn(params, x, convs_per_stage):
  """The CNN's forward pass in NumPy: stages of conv3x3 + ReLU, 2x2 max-pool between stages, flatten, ReLU hidden
  layer, linear head."""
  x = np.asarray(x, np.float64)
  convs = params["convs"]
  for i in range(len(convs)):
    if i and i % convs_per_stage == 0:
      b, h, w, c = x.shape
      x = x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    x = np.maximum(numpy_conv3x3(x, np.asarray(convs[i]["kernel"]), np.asarray(convs[i]["bias"])), 0)
  tokens = x.reshape(x.shape[0], -1, x.shape[-1])
  dense = lambda x, layer: x @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"])
  pooled = np.maximum(dense(tokens.reshape(len(x), -1), params["hidden"]), 0)
  return tokens, pooled, dense(pooled, params["head"])


@pytest.mark.parametrize("convs_per_stage", [1, 2])
def test_forward_equals_numpy_reference(convs_per_stage):
  spec = CNNSpec(image_size=(8, 8), channels=1, stage_channels=(4, 6, 8), num_classes=3,
                 convs_per_stage=convs_per_stage, hidden=5)
  model = CNN(spec, nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)  # nonzero biases
  nnx.update(model, params)
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 8, 1)))
  out = model(x)
  tokens, pooled, logits = numpy_cnn(jax.tree.map(np.asarray, nnx.to_pure_dict(params)), x, convs_per_stage)
  chex.assert_shape(out["patch_tokens"], (2, 4, 8))
  chex.assert_shape(out["pooled"], (2, 5))
  assert spec.grid == (2, 2) and spec.num_tokens == 4 and spec.width == 8
  np.testing.assert_allclose(out["patch_tokens"], tokens, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["pooled"], pooled, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-5)


def test_max_pool_and_its_gradient_equal_reduce_windows_even_at_ties():
  x = jax.random.randint(jax.random.key(0), (2, 8, 6, 3), 0, 3).astype(np.float32)  # many ties in the windows
  weights = jax.random.normal(jax.random.key(1), (2, 4, 3, 3))
  pools = {"reshape": max_pool_2x2, "reduce_window": lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2))}
  values = {name: pool(x) for name, pool in pools.items()}
  grads = {name: jax.grad(lambda x: (weights * pool(x)).sum())(x) for name, pool in pools.items()}
  np.testing.assert_array_equal(values["reshape"], values["reduce_window"])
  np.testing.assert_array_equal(grads["reshape"], grads["reduce_window"])


def test_bad_specs_and_inputs_name_the_field():
  with pytest.raises(ValueError, match="stage_channels"):
    CNNSpec(image_size=(28, 28), channels=1, stage_channels=(4, 8, 16, 32), num_classes=10)
  model = CNN(CNNSpec(image_size=(8, 8), channels=1, stage_channels=(4,), num_classes=2), nnx.Rngs(0))
  with pytest.raises(ValueError, match="image_size"):
    model(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="arch"):
    encoder.EncoderConfig(arch="mlp").spec((28, 28, 1), 10)


def test_cnn_trains_and_its_cache_round_trips(tmp_path, monkeypatch):
  images, labels = generated_images(256)
  encode, info = encoder.load_or_train_encoder(tmp_path, TINY_CNN, name="cnn", load_split=lambda split: (images, labels),
                                              log_every=0)
  assert info["tokens"] == 49 and info["token_grid"] == [7, 7] and info["width"] == 8
  assert info["test_accuracy"] > 0.9  # the two classes differ by where a bright square is
  out = encode(images[:5])
  chex.assert_shape(out["patch_tokens"], (5, 49, 8))
  chex.assert_shape(out["pooled"], (5, 128))
  chex.assert_shape(out["logits"], (5, 10))

  monkeypatch.setattr(encoder, "train_encoder", lambda *a, **k: pytest.fail("the cached CNN was retrained"))
  encode_again, info_again = encoder.load_or_train_encoder(tmp_path, TINY_CNN, name="cnn", load_split=None)
  assert info_again == info
  np.testing.assert_array_equal(encode_again(images[:5])["logits"], out["logits"])
