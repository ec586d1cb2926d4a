"""pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`: the TF 2015-12-05 graph under
torchvision's `Inception3` names, `Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`, `fc.weight`) -> the state of
`repa_jax.models.inception.InceptionV3`, each BatchNorm (inference mode, eps 1e-3) folded into its conv:
kernel * gamma / sqrt(var + eps), bias = beta - mean * gamma / sqrt(var + eps), computed in float64."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repa_jax.convert.torch_layout import conv_kernel, linear_kernel, load_state_dict, take
from repa_jax.models.inception import InceptionV3

BN_EPS = 1e-3
IGNORED = {"fc.bias"}  # the ADM evaluator's IS takes the logits without the bias


@functools.cache
def abstract_model() -> tuple[nnx.GraphDef, nnx.State]:
  """InceptionV3's graph definition and parameter shapes (traced once; no weights are initialised)."""
  return nnx.split(nnx.eval_shape(lambda: InceptionV3(nnx.Rngs(0))))


def folded_conv(get, prefix: str, param: str) -> np.ndarray:
  """The BatchNorm-folded 'kernel' [kh, kw, in, out] or 'bias' [out] of torch BasicConv2d `prefix` (conv + bn);
  `get(key)` reads the state dict."""
  bn = {name: np.asarray(get(f"{prefix}.bn.{name}"), np.float64)
        for name in ("weight", "bias", "running_mean", "running_var")}
  scale = bn["weight"] / np.sqrt(bn["running_var"] + BN_EPS)
  if param == "bias":
    return (bn["bias"] - bn["running_mean"] * scale).astype(np.float32)
  weight = np.asarray(get(f"{prefix}.conv.weight"), np.float64)
  return conv_kernel(weight * scale[:, None, None, None]).astype(np.float32)


def convert_state_dict(state: dict[str, np.ndarray]) -> nnx.State:
  """{pytorch-fid name: ndarray} -> the nnx.Param state of InceptionV3. A missing key raises a KeyError naming it; a
  wrong shape or a key the model does not use raises a ValueError."""
  used = set()

  def get(key: str) -> np.ndarray:
    used.add(key)
    return take(state, key)

  def load(path, leaf):
    names = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    if names == ("fc", "kernel"):
      value = linear_kernel(np.asarray(get("fc.weight"), np.float32))
    else:  # (..., 'conv', 'kernel' | 'bias') of a BasicConv
      value = folded_conv(get, ".".join(names[:-2]), names[-1])
    if value.shape != leaf.shape:
      raise ValueError(f"weight {'.'.join(names)} converts to shape {value.shape}, not the expected {leaf.shape}; "
                       "is the checkpoint pytorch-fid's FID Inception?")
    return jnp.asarray(value)

  params = jax.tree_util.tree_map_with_path(load, abstract_model()[1])
  unused = sorted(k for k in set(state) - used - IGNORED if not k.endswith(".num_batches_tracked"))
  if unused:
    raise ValueError(f"{len(unused)} checkpoint weights are not used by the FID InceptionV3, e.g. {unused[:8]}; "
                     "is the checkpoint pytorch-fid's FID Inception (not torchvision's, with AuxLogits)?")
  return params


def load_inception(path: str) -> InceptionV3:
  """InceptionV3 with the weights of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or the same state dict
  saved as `.safetensors`)."""
  return nnx.merge(abstract_model()[0], convert_state_dict(load_state_dict(path)))
