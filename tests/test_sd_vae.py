"""SD-VAE: parity with diffusers' AutoencoderKL (tiny random config), both attention key layouts, the SD preset's
parameter names and count, and the uint8 / SiT-latent conveniences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repa_jax.convert.sd_vae import convert_state_dict, diffusers_name
from repa_jax.convert.torch_layout import to_numpy
from repa_jax.models.sd_vae import SD_VAE, SDVAE, VAESpec, decode, decode_sit_latents, encode, encode_uint8

TINY = VAESpec(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
H, W = 16, 24  # non-square to catch H/W mix-ups


def diffusers_vae(spec: VAESpec):
  diffusers = pytest.importorskip("diffusers")
  blocks = len(spec.block_out_channels)
  return diffusers.AutoencoderKL(
      in_channels=spec.in_channels, out_channels=spec.out_channels, down_block_types=("DownEncoderBlock2D",) * blocks,
      up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=spec.block_out_channels,
      layers_per_block=spec.layers_per_block, norm_num_groups=spec.norm_num_groups,
      latent_channels=spec.latent_channels)


@pytest.fixture(scope="module")
def torch_vae():
  """A tiny diffusers AutoencoderKL with random weights (norms and biases too, so no term is trivial)."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  vae = diffusers_vae(TINY).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if p.ndim == 1:  # GroupNorm weights (around 1) and biases (around 0)
        p.copy_(float(name.endswith("weight")) + 0.2 * torch.randn_like(p))
  return vae


def torch_state(vae) -> dict[str, np.ndarray]:
  return to_numpy(vae.state_dict())


def flax_vae(state_dict, spec=TINY) -> SDVAE:
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: SDVAE(spec, nnx.Rngs(0))))
  return nnx.merge(graphdef, convert_state_dict(state_dict, spec))


def nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def test_encode_decode_match_diffusers(torch_vae):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
  latents = rng.normal(size=(2, H // 2, W // 2, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = torch_vae.encode(torch.from_numpy(nchw(images))).latent_dist
    want_mean, want_std = nhwc(posterior.mean), nhwc(posterior.std)
    want_images = nhwc(torch_vae.decode(torch.from_numpy(nchw(latents))).sample)
  model = flax_vae(torch_state(torch_vae))
  mean, std = encode(model, jnp.asarray(images))
  decoded = decode(model, jnp.asarray(latents))
  assert mean.shape == std.shape == (2, H // 2, W // 2, 4) and decoded.shape == (2, H, W, 3)
  assert mean.dtype == std.dtype == decoded.dtype == jnp.float32
  assert np.std(want_mean) > 0.1 and np.std(want_std) > 0.01 and np.std(want_images) > 0.1
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(std, want_std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(decoded, want_images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv_weights", [False, True])
def test_legacy_attention_keys_convert_identically(torch_vae, conv_weights):
  state = torch_state(torch_vae)
  legacy = {}
  for name, value in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in name:
        name = name.replace(f".{new}.", f".{old}.")
        value = value[:, :, None, None] if conv_weights and value.ndim == 2 else value
    legacy[name] = value
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  want = convert_state_dict(state, TINY)
  got = convert_state_dict(legacy, TINY)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_missing_and_unused_keys_are_named(torch_vae):
  state = torch_state(torch_vae)
  missing = {k: v for k, v in state.items() if k != "decoder.up_blocks.0.upsamplers.0.conv.bias"}
  with pytest.raises(KeyError, match="decoder.up_blocks.0.upsamplers.0.conv.bias"):
    convert_state_dict(missing, TINY)
  with pytest.raises(ValueError, match="encoder.extra.weight"):
    convert_state_dict({**state, "encoder.extra.weight": np.zeros(3, np.float32)}, TINY)
  wrong = dict(state, **{"encoder.conv_in.weight": np.zeros((8, 3, 1, 1), np.float32)})
  with pytest.raises(ValueError, match="encoder.conv_in.weight"):
    convert_state_dict(wrong, TINY)


def test_sd_preset_matches_diffusers_names_and_size():
  torch = pytest.importorskip("torch")
  with torch.device("meta"):
    names = {k: v.numel() for k, v in diffusers_vae(SD_VAE).state_dict().items()}
  params = nnx.state(nnx.eval_shape(lambda: SDVAE(SD_VAE, nnx.Rngs(0))), nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  ours = {diffusers_name(tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))): leaf.size
          for path, leaf in leaves}
  assert ours == names
  assert sum(ours.values()) == 83_653_863
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  mean, std = jax.eval_shape(lambda x: encode(SDVAE(SD_VAE, nnx.Rngs(0)), x), images)
  assert mean.shape == std.shape == (1, 32, 32, 4)


def test_uint8_and_sit_latent_conveniences():
  rng = np.random.default_rng(1)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: SDVAE(TINY, nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape, np.float32), abstract))
  pixels = rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8)
  for got, want in zip(encode_uint8(model, jnp.asarray(pixels)), encode(model, pixels / 127.5 - 1.0)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  latents = rng.normal(size=(2, H // 2, W // 2, 4)).astype(np.float32)
  np.testing.assert_allclose(decode_sit_latents(model, latents * TINY.scaling_factor), decode(model, latents),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="in_channels"):
    encode(model, jnp.zeros((2, H, W, 4)))
