"""DINOv2 weights -> `repa_jax.models.dinov2.DinoV2` parameters, from the official torch hub checkpoints
(`dinov2_vitb14_pretrain.pth`, ...) or Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` safetensors
(`facebook/dinov2-base`, ...). Converters are pure: state dict {name: ndarray} -> nested dict of the module's params."""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repa_jax.convert.torch_layout import conv_kernel, linear_kernel, load_state_dict, take
from repa_jax.models.dinov2 import SPECS, DinoV2, DinoV2Spec

MASK_TOKENS = {"mask_token", "embeddings.mask_token"}  # used only by masked pre-training; not part of the module


def _reader(state: dict[str, np.ndarray]) -> tuple[Callable[[str], np.ndarray], set[str]]:
  """`take` that records which keys it read."""
  used = set()

  def get(key: str) -> np.ndarray:
    used.add(key)
    return take(state, key)

  return get, used


def _check_all_used(state: dict[str, np.ndarray], used: set[str], spec: DinoV2Spec):
  unused = sorted(set(state) - used - MASK_TOKENS)
  if unused:
    raise ValueError(f"checkpoint weights not used by DINOv2 {spec}: {unused[:8]} ({len(unused)} in all); "
                     "wrong depth, registers or FFN type?")


def _linear(get, prefix: str) -> dict[str, np.ndarray]:
  return {"kernel": linear_kernel(get(prefix + ".weight")), "bias": get(prefix + ".bias")}


def _norm(get, prefix: str) -> dict[str, np.ndarray]:
  return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}


def _ffn(get, prefix: str, spec: DinoV2Spec, swiglu: tuple[str, str]) -> dict:
  """fc1 / fc2 of the GELU MLP, or the SwiGLU's fused input and its output linear (`swiglu` = their names)."""
  if spec.ffn == "mlp":
    return {"fc1": _linear(get, prefix + "fc1"), "fc2": _linear(get, prefix + "fc2")}
  return {"w12": _linear(get, prefix + swiglu[0]), "w3": _linear(get, prefix + swiglu[1])}


def _patch_embed(get, prefix: str, spec: DinoV2Spec) -> dict[str, np.ndarray]:
  """Conv2d(3, D, 14, stride 14) -> the linear layer over raster patches ([p * p * 3, D], (row, col, channel))."""
  return {"kernel": conv_kernel(get(prefix + ".weight")).reshape(-1, spec.width), "bias": get(prefix + ".bias")}


def from_official(state: dict[str, np.ndarray], spec: DinoV2Spec) -> dict:
  """The facebookresearch/dinov2 hub state dict (`blocks.N.attn.qkv`, `ls1.gamma`, `mlp.fc1` or `mlp.w12`, ...)."""
  get, used = _reader(state)

  def block(i: int) -> dict:
    p = f"blocks.{i}."
    return {"norm1": _norm(get, p + "norm1"),
            "attn": {"qkv": _linear(get, p + "attn.qkv"), "proj": _linear(get, p + "attn.proj")},
            "ls1": get(p + "ls1.gamma"), "norm2": _norm(get, p + "norm2"),
            "mlp": _ffn(get, p + "mlp.", spec, ("w12", "w3")), "ls2": get(p + "ls2.gamma")}

  params = {"patch_embed": _patch_embed(get, "patch_embed.proj", spec), "cls_token": get("cls_token"),
            "pos_embed": get("pos_embed"), "blocks": {i: block(i) for i in range(spec.depth)},
            "norm": _norm(get, "norm")}
  if spec.num_registers:
    params["register_tokens"] = get("register_tokens")
  _check_all_used(state, used, spec)
  return params


def from_hf(state: dict[str, np.ndarray], spec: DinoV2Spec) -> dict:
  """The Hugging Face safetensors layout (`encoder.layer.N.attention.attention.query`, `layer_scale1.lambda1`,
  `mlp.fc1` or `mlp.weights_in`, `layernorm`, ...); q, k, v are fused into the module's qkv."""
  get, used = _reader(state)

  def block(i: int) -> dict:
    p = f"encoder.layer.{i}."
    q, k, v = (_linear(get, f"{p}attention.attention.{name}") for name in ("query", "key", "value"))
    qkv = {name: np.concatenate([q[name], k[name], v[name]], axis=-1) for name in ("kernel", "bias")}
    return {"norm1": _norm(get, p + "norm1"),
            "attn": {"qkv": qkv, "proj": _linear(get, p + "attention.output.dense")},
            "ls1": get(p + "layer_scale1.lambda1"), "norm2": _norm(get, p + "norm2"),
            "mlp": _ffn(get, p + "mlp.", spec, ("weights_in", "weights_out")), "ls2": get(p + "layer_scale2.lambda1")}

  params = {"patch_embed": _patch_embed(get, "embeddings.patch_embeddings.projection", spec),
            "cls_token": get("embeddings.cls_token"), "pos_embed": get("embeddings.position_embeddings"),
            "blocks": {i: block(i) for i in range(spec.depth)}, "norm": _norm(get, "layernorm")}
  if spec.num_registers:
    params["register_tokens"] = get("embeddings.register_tokens")
  _check_all_used(state, used, spec)
  return params


def load(model: DinoV2, params: dict) -> DinoV2:
  """Writes converted params into the model (float32; it may be abstract, from `nnx.eval_shape`) after checking that
  every parameter is there with its shape."""
  def shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}

  want, got = shapes(nnx.to_pure_dict(nnx.state(model, nnx.Param))), shapes(params)
  if want != got:
    diff = sorted(f"{key}: model {want.get(key)}, converted {got.get(key)}"
                  for key in set(want) | set(got) if want.get(key) != got.get(key))
    raise ValueError(f"converted DINOv2 params do not fit the model ({len(diff)} differences): {diff[:8]}")
  nnx.update(model, jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), params))
  return model


def load_pretrained(path: str, name: str, spec: DinoV2Spec | None = None, **model_kwargs) -> DinoV2:
  """A DinoV2 `name` ('dinov2_vitb14', ...) with the weights at `path`: an official `.pth` or a Hugging Face
  `.safetensors` (told apart by their keys). `spec` replaces SPECS[name] (e.g. a tiny test model); `model_kwargs` go
  to `DinoV2` (pos_resample, dtype)."""
  if name not in SPECS:
    raise ValueError(f"unknown DINOv2 model {name!r}: use one of {sorted(SPECS)}")
  spec = spec or SPECS[name]
  state = load_state_dict(path)
  convert = from_official if "pos_embed" in state else from_hf
  model = nnx.eval_shape(lambda: DinoV2(spec, nnx.Rngs(0), **model_kwargs))  # no random init: `load` fills it
  return load(model, convert(state, spec))
