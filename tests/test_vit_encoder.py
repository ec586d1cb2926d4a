"""ViT encoder shapes and final norm; encoder training and its cache (tiny models on generated images)."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repa_jax.models import supervised as encoder
from repa_jax.models.vit import ViT, ViTSpec

TINY = encoder.EncoderConfig(width=32, depth=1, num_heads=2, mlp_ratio=2.0, steps=8, batch=32, lr=3e-3,
                             warmup_steps=2)


def tiny_vit(**kw):
  spec = ViTSpec(**{**dict(image_size=(28, 28), channels=1, patch=4, depth=2, width=32, num_heads=2, num_classes=10),
                    **kw})
  return ViT(spec, nnx.Rngs(0))


@nnx.jit
def forward(model, images):
  return model(images)


def generated_images(n=256, seed=0):
  """Two classes that differ in where the bright square is: uint8 [n, 28, 28, 1], labels [n]."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
  for image, label in zip(images, labels):
    top = 2 if label else 16
    image[top:top + 10, 9:19] = 230
  return images, labels


@pytest.mark.parametrize("pos_embed, pool, layer_scale", [("sincos", "cls", None), ("learned", "mean", 1e-5)])
def test_outputs_drop_cls_and_have_the_token_grid(pos_embed, pool, layer_scale):
  model = tiny_vit(pos_embed=pos_embed, pool=pool, layer_scale=layer_scale)
  out = forward(model, jnp.ones((3, 28, 28, 1)))
  chex.assert_shape(out["patch_tokens"], (3, 49, 32))
  chex.assert_shape(out["logits"], (3, 10))
  assert model.spec.grid == (7, 7) and model.spec.num_tokens == 49
  assert out["patch_tokens"].dtype == jnp.float32


def test_patch_tokens_are_final_layer_norm_outputs():
  model = tiny_vit()
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  tokens = forward(model, x)["patch_tokens"]
  # Identity affine at init: every token has mean 0 and variance 1 over channels.
  np.testing.assert_allclose(tokens.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(tokens.var(-1), 1, atol=1e-3)
  # The affine is applied: tokens = normed * scale + bias.
  model.norm.scale[...] = jnp.full((32,), 2.0)
  model.norm.bias[...] = jnp.arange(32.0)
  np.testing.assert_allclose(forward(model, x)["patch_tokens"], 2 * tokens + jnp.arange(32.0), atol=1e-4)


def test_cls_is_dropped_and_patches_keep_raster_order():
  # With no blocks the outputs are the final norm of the embeddings: patch tokens come from patches in raster
  # order with position embeddings 1..N, and the CLS-pooled head reads norm(cls + pos[0]).
  model = tiny_vit(depth=0, pool="cls", pos_embed="learned")
  model.head.kernel[...] = jax.random.normal(jax.random.key(2), (32, 10))
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  out = forward(model, x)
  patches = x.reshape(2, 7, 4, 7, 4, 1).transpose(0, 1, 3, 2, 4, 5).reshape(2, 49, 16)
  pos = model.pos_embed[...]
  np.testing.assert_allclose(out["patch_tokens"], model.norm(model.patch_embed(patches) + pos[:, 1:]), atol=1e-5)
  cls = model.norm(model.cls_token[...][0] + pos[:, 0])
  np.testing.assert_allclose(out["logits"], jnp.broadcast_to(model.head(cls), (2, 10)), atol=1e-5)


def test_bad_inputs_fail_with_the_field_name():
  with pytest.raises(ValueError, match="patch"):
    ViTSpec(image_size=(28, 28), channels=1, patch=5, depth=1, width=32, num_heads=2, num_classes=10)
  with pytest.raises(ValueError, match="num_heads"):
    ViTSpec(image_size=(28, 28), channels=1, patch=4, depth=1, width=30, num_heads=4, num_classes=10)
  with pytest.raises(ValueError, match="image_size"):
    tiny_vit()(jnp.ones((1, 32, 32, 1)))


def test_training_reduces_the_loss_and_beats_chance():
  images, labels = generated_images()
  spec, params = encoder.train_encoder(images, labels, dataclasses.replace(TINY, steps=24))
  initial = nnx.state(ViT(spec, nnx.Rngs(TINY.seed)), nnx.Param)

  def loss_and_accuracy(params):
    logits = jnp.asarray(encoder.make_encode_fn(spec, params)(images)["logits"])
    loss = -jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels].mean()
    return loss, (logits.argmax(-1) == labels).mean()

  (loss_before, _), (loss_after, accuracy) = loss_and_accuracy(initial), loss_and_accuracy(params)
  assert loss_after < 0.8 * loss_before
  assert accuracy > 0.8


def test_cache_round_trip_loads_without_training(tmp_path, monkeypatch):
  images, labels = generated_images(64)
  encode, info = encoder.load_or_train_encoder(tmp_path, TINY, name="vit", load_split=lambda split: (images, labels),
                                              log_every=0)
  assert info["tokens"] == 49 and info["token_grid"] == [7, 7] and info["width"] == 32
  assert 0 <= info["test_accuracy"] <= 1 and "255" in info["preprocessing"]
  out = encode(images[:5])
  features = out["patch_tokens"]
  chex.assert_shape(features, (5, 49, 32))
  chex.assert_shape(out["logits"], (5, 10))
  chex.assert_shape(out["pooled"], (5, 32))
  assert features.dtype == jnp.float32

  def no_training(*args, **kwargs):
    raise AssertionError("the cached encoder was retrained")
  monkeypatch.setattr(encoder, "train_encoder", no_training)
  encode_again, info_again = encoder.load_or_train_encoder(tmp_path, TINY, name="vit", load_split=None)
  assert info_again == info
  np.testing.assert_array_equal(encode_again(images[:5])["patch_tokens"], features)
  with pytest.raises(ValueError, match="delete"):
    encoder.load_or_train_encoder(tmp_path, dataclasses.replace(TINY, width=64), name="vit", load_split=None)
  with pytest.raises(ValueError, match="uint8"):
    encode_again(images[:5].astype(np.float32))
