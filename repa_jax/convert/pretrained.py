"""The pretrained networks a config names, loaded from the weights files it points at, as `Network`s whose weights
`jit` takes as arguments (not as compile-time constants). Weights files and architectures:
- SD-VAE encoder (config.data.autoencoder 'sd-vae-ft-mse', the training latents): config.precompute.autoencoder_weights;
  decoder ('sd-vae-ft-ema' for samples, as REPA): config.sample.decoder_weights. Both SD_VAE with the fields of
  config.data.autoencoder_spec replaced (tests, other VAE configurations).
- DINOv2 encoders (`dinov2.SPECS` names): config.precompute.encoder_weights[name]; SPECS[name] with the fields of
  config.precompute.encoder_specs[name] replaced.
- The FID Inception-v3: config.evaluate.inception_weights.
"""
import dataclasses
import os

import ml_collections
from flax import nnx

from repa_jax.convert.dinov2 import load_pretrained
from repa_jax.convert.inception import load_inception
from repa_jax.convert.sd_vae import load_sd_vae
from repa_jax.models import dinov2, inception, sd_vae
from repa_jax.models.network import Network, as_network

SD_VAES = ("sd-vae-ft-mse", "sd-vae-ft-ema")
_HF_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
INCEPTION_SOURCE = ("pytorch-fid's pt_inception-2015-12-05-6726825d.pth (https://github.com/mseitzer/pytorch-fid/"
                    "releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth)")


def weights_file(path: str, field: str, source: str) -> str:
  """`path` if it is a file, else a FileNotFoundError naming the config field and where to get the file."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"{field}={path!r} is not a file. Fix: download {source} and set {field} to its path.")
  return path


def sd_vae_source(name: str) -> str:
  return f"Hugging Face stabilityai/{name} (diffusion_pytorch_model.safetensors)"


def dinov2_source(name: str) -> str:
  """Where the weights of DINOv2 `name` ('dinov2_vitb14', 'dinov2_vitb14_reg', ...) are published."""
  base, registers = name.removesuffix("_reg"), name.endswith("_reg")
  official = f"https://dl.fbaipublicfiles.com/dinov2/{base}/{base}{'_reg4' if registers else ''}_pretrain.pth"
  hf = f"facebook/dinov2-{'with-registers-' if registers else ''}{_HF_SIZES[base[len('dinov2_vit')]]}"
  return f"the official DINOv2 release ({official}) or Hugging Face {hf} (model.safetensors)"


def vae_spec(config: ml_collections.ConfigDict) -> sd_vae.VAESpec:
  """SD_VAE with the fields of config.data.autoencoder_spec replaced."""
  return dataclasses.replace(sd_vae.SD_VAE, **config.data.autoencoder_spec)


def _sd_vae(config: ml_collections.ConfigDict, name: str, path: str, field: str, abstract: bool) -> sd_vae.SDVAE:
  """SDVAE(vae_spec(config)) with the weights of `name` at `path` (the value of config field `field`); abstract: its
  parameters as ShapeDtypeStructs, no weights read (for compiling ahead of time)."""
  if config.data.autoencoder not in SD_VAES:
    raise ValueError(f"config.data.autoencoder={config.data.autoencoder!r}: use 'identity' or one of {SD_VAES}")
  if abstract:
    return nnx.eval_shape(lambda: sd_vae.SDVAE(vae_spec(config), nnx.Rngs(0)))
  return load_sd_vae(weights_file(path, field, sd_vae_source(name)), vae_spec(config))


def vae_encoder(config: ml_collections.ConfigDict, *, abstract: bool = False) -> Network:
  """uint8 images [B, H, W, 3] -> the posterior (mean, std), each [B, H / f, W / f, latent_channels] float32, of
  config.data.autoencoder ('sd-vae-ft-mse'), weights from config.precompute.autoencoder_weights (abstract: none)."""
  vae = _sd_vae(config, config.data.autoencoder, config.precompute.autoencoder_weights,
                "config.precompute.autoencoder_weights", abstract)
  return as_network(vae, sd_vae.encode_uint8)


def vae_decoder(config: ml_collections.ConfigDict, *, abstract: bool = False) -> Network:
  """VAE latents [B, h, w, latent_channels] (unscaled) -> pixels [B, h f, w f, 3] float32 in [-1, 1] (not clipped),
  with the 'sd-vae-ft-ema' weights of config.sample.decoder_weights (REPA decodes with ft-ema whatever encoded;
  abstract: none)."""
  vae = _sd_vae(config, "sd-vae-ft-ema", config.sample.decoder_weights, "config.sample.decoder_weights", abstract)
  return as_network(vae, sd_vae.decode)


def dinov2_encoder(config: ml_collections.ConfigDict, name: str, *,
                   abstract: bool = False) -> tuple[Network, dinov2.DinoV2Spec]:
  """(uint8 images [B, res, res, 3] -> REPA's DINOv2 patch tokens [B, tokens, width] float32, the spec) of encoder
  `name`, weights from config.precompute.encoder_weights[name] (abstract: ShapeDtypeStructs, none read)."""
  spec = dataclasses.replace(dinov2.SPECS[name], **config.precompute.encoder_specs.get(name, {}))
  if abstract:
    model = nnx.eval_shape(lambda: dinov2.DinoV2(spec, nnx.Rngs(0)))
  else:
    field = f"config.precompute.encoder_weights[{name!r}]"
    path = weights_file(config.precompute.encoder_weights.get(name, ""), field, dinov2_source(name))
    model = load_pretrained(path, name, spec)
  return as_network(model, dinov2.encode), spec


def inception_network(config: ml_collections.ConfigDict) -> Network:
  """uint8 images [B, H, W, 3] -> {'pool' [B, 2048], 'logits' [B, 1008], 'spatial' [B, 2023]} of the FID
  Inception-v3, weights from config.evaluate.inception_weights."""
  path = weights_file(config.evaluate.inception_weights, "config.evaluate.inception_weights", INCEPTION_SOURCE)
  return as_network(load_inception(path), inception.features)
