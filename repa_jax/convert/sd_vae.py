"""diffusers AutoencoderKL weights (e.g. sd-vae-ft-mse / sd-vae-ft-ema `diffusion_pytorch_model.safetensors`) ->
the state of `repa_jax.models.sd_vae.SDVAE`.

Both attention layouts are read: current diffusers (`attentions.0.to_q/to_k/to_v/to_out.0`) and the legacy one of the
published sd-vae files (`query/key/value/proj_attn`); attention weights may be [out, in] or 1x1-conv [out, in, 1, 1].
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repa_jax.convert.torch_layout import conv_kernel, linear_kernel, load_state_dict, take
from repa_jax.models.sd_vae import SD_VAE, SDVAE, VAESpec

LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
MODULE_NAMES = {"downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv", "to_out": "to_out.0"}
PARAM_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def current_attention_names(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The state dict with legacy attention keys (`attentions.N.query.weight`, ...) renamed to the current ones."""
  renamed = {}
  for name, value in state_dict.items():
    parts = name.split(".")
    if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in LEGACY_ATTENTION:
      name = ".".join(parts[:-2] + [LEGACY_ATTENTION[parts[-2]], parts[-1]])
    renamed[name] = value
  return renamed


def diffusers_name(path: tuple) -> str:
  """An SDVAE parameter path, e.g. ('encoder', 'down_blocks', 0, 'downsample', 'kernel') -> its diffusers key
  'encoder.down_blocks.0.downsamplers.0.conv.weight'."""
  *modules, param = path
  return ".".join([MODULE_NAMES.get(str(m), str(m)) for m in modules] + [PARAM_NAMES[param]])


def torch_to_flax(weight: np.ndarray, param: str, ndim: int) -> np.ndarray:
  """A torch parameter in the layout of the Flax one: conv [out, in, kh, kw] -> [kh, kw, in, out], linear [out, in]
  (or a 1x1 conv's [out, in, 1, 1]) -> [in, out], norm scales and biases unchanged."""
  if param != "kernel":
    return weight
  if ndim == 4:
    return conv_kernel(weight)
  if weight.ndim > 2 and math.prod(weight.shape[2:]) == 1:
    weight = weight.reshape(weight.shape[:2])
  return linear_kernel(weight)


def convert_state_dict(state_dict: dict[str, np.ndarray], spec: VAESpec = SD_VAE) -> nnx.State:
  """{diffusers name: ndarray} -> the nnx.Param state of SDVAE(spec). A missing key raises a KeyError naming it;
  a wrong shape or a key the model does not use raises a ValueError (the checkpoint is not of `spec`)."""
  state_dict = current_attention_names(state_dict)
  abstract = nnx.state(nnx.eval_shape(lambda: SDVAE(spec, nnx.Rngs(0))), nnx.Param)
  used = set()

  def load(path, leaf):
    names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    key = diffusers_name(names)
    used.add(key)
    weight = np.asarray(take(state_dict, key), np.float32)
    value = torch_to_flax(weight, names[-1], leaf.ndim)
    if value.shape != leaf.shape:
      raise ValueError(f"weight {key!r} of shape {weight.shape} gives {value.shape}, not the expected {leaf.shape}; "
                       f"the checkpoint is not of {spec}")
    return jnp.asarray(value)

  params = jax.tree_util.tree_map_with_path(load, abstract)
  unused = sorted(set(state_dict) - used)
  if unused:
    raise ValueError(f"{len(unused)} checkpoint weights are not used by SDVAE({spec}), e.g. {unused[:8]}; the "
                     "checkpoint is of another configuration")
  return params


def load_sd_vae(path: str, spec: VAESpec = SD_VAE, *, dtype=jnp.float32) -> SDVAE:
  """SDVAE(spec) computing in `dtype` with the weights of a diffusers AutoencoderKL file (`.safetensors` or `.bin`)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: SDVAE(spec, nnx.Rngs(0), dtype=dtype)))
  return nnx.merge(graphdef, convert_state_dict(load_state_dict(path), spec))
