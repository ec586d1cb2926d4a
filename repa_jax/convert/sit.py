"""Official PyTorch SiT checkpoints -> repa_jax parameters (the state of `RepaSiT`). The entry point writes them as a
repa_jax checkpoint that `--mode=sample` samples and `--mode=train` fine-tunes:

  python -m repa_jax.main --mode=convert --checkpoint=last.pt --config=configs/imagenet.py:model=XL/2,reg=repa \
    --workdir=DIR

Two code bases, with the same module names (x_embedder.proj, t_embedder.mlp.0/2, y_embedder.embedding_table, pos_embed,
blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}, final_layer.{linear, adaLN_modulation.1}):
- 'repa': sihyun-yu/REPA. x_t = (1 - t) x + t eps (t = 0 is data, as in repa_jax), C output channels, and
  `projectors.K.{0,2,4}` (build_mlp; always present: z_dims = [0] when trained without REPA). The released `last.pt` is
  a bare state dict; train.py saves {'model', 'ema', 'opt', 'args', 'steps'}. Legacy files name the blocks after
  `encoder_depth` `decoder_blocks.N` (= blocks.encoder_depth + N); they are renamed.
- 'sit': willisma/SiT (release `SiT-XL-2-256x256.pt`, a bare state dict) and raywang4/DispLoss, a fork of it whose
  train.py saves {'model', 'ema', 'opt', 'args'}. Time runs the other way (x_t = t x + (1 - t) eps, v = x - eps) and
  learn_sigma gives 2C output channels, of which forward() keeps the first C. The converter drops the sigma channels
  (exactly what forward() does) and folds the time reversal into the weights, v_repa(x, t) = -v_sit(x, 1 - t): the
  sinusoid of 1 - t is a fixed rotation of the sinusoid of t, absorbed by t_embedder.mlp.0; the output layer is negated.
By default the source is told by the keys: REPA's SiT always has `projectors.*`, SiT's never.
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from repa_jax.convert.torch_layout import conv_kernel, linear_kernel, load_state_dict, take
from repa_jax.models.layers import sincos_pos_embed_2d
from repa_jax.models.repa_sit import abstract_params
from repa_jax.specs.model import BLOCK_SWITCHES, SiTSpec, model_spec

SOURCES = ("repa", "sit")
# repa_jax module path under `sit` -> official module name; blocks' names are prefixed with `blocks.N.`.
SIT_MODULES = {("patch_embed",): "x_embedder.proj", ("t_embed", "fc1"): "t_embedder.mlp.0",
               ("t_embed", "fc2"): "t_embedder.mlp.2", ("y_embed",): "y_embedder.embedding_table",
               ("final_ada_ln",): "final_layer.adaLN_modulation.1", ("final_linear",): "final_layer.linear"}
BLOCK_MODULES = {("attn", "qkv"): "attn.qkv", ("attn", "proj"): "attn.proj", ("mlp", "fc1"): "mlp.fc1",
                 ("mlp", "fc2"): "mlp.fc2", ("ada_ln",): "adaLN_modulation.1"}
PROJECTOR_MODULES = {"fc1": "0", "fc2": "2", "fc3": "4"}  # build_mlp: Linear, SiLU, Linear, SiLU, Linear
PARAM_NAMES = {"kernel": "weight", "bias": "bias", "embedding": "weight"}


def model_weights(loaded: dict, which: str) -> dict[str, np.ndarray]:
  """The state dict of a loaded checkpoint file: loaded[which] ('ema' or 'model') of a training checkpoint, or the
  file itself when it is a bare state dict (the releases, which hold the weights the authors sample with)."""
  if "ema" not in loaded and "model" not in loaded:
    return loaded
  if which not in loaded:
    raise KeyError(f"the training checkpoint has no {which!r} weights (it has {sorted(loaded)}): pass --which=ema "
                   "or --which=model")
  return loaded[which]


def read_checkpoint(path: str, which: str = "ema") -> dict[str, np.ndarray]:
  """{official name: ndarray} of a REPA / SiT / DispLoss checkpoint file (training checkpoints: `which` of its 'ema'
  and 'model'; their argparse `args` is read and dropped)."""
  return model_weights(load_state_dict(path), which)


def block_indices(state_dict: dict[str, np.ndarray]) -> list[int]:
  """The N of the state dict's `blocks.N.*` keys, sorted."""
  return sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})


def rename_legacy_blocks(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """REPA's legacy layout (blocks.0..E-1 then decoder_blocks.0..) -> blocks.0..depth-1, as REPA's
  `load_legacy_checkpoints` with E = encoder_depth = the number of `blocks.N`."""
  offset = len(block_indices(state_dict))
  return {re.sub(r"^decoder_blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) + offset}.", k): v
          for k, v in state_dict.items()}


def detect_source(state_dict: dict[str, np.ndarray]) -> str:
  """'repa' if the state dict has REPA's `projectors.*` (present in every REPA SiT), else 'sit'."""
  return "repa" if any(k.startswith("projectors.") for k in state_dict) else "sit"


def time_reversal(freq_dim: int, max_period: float = 10000.0) -> np.ndarray:
  """M [freq_dim, freq_dim] with emb(1 - t) = emb(t) @ M for repa_jax's [cos(f t), sin(f t)] timestep sinusoid:
  cos(f (1 - t)) = cos f cos(f t) + sin f sin(f t) and sin(f (1 - t)) = sin f cos(f t) - cos f sin(f t)."""
  half = freq_dim // 2
  freqs = np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / half)
  cos, sin = np.diag(np.cos(freqs)), np.diag(np.sin(freqs))
  return np.block([[cos, sin], [sin, -cos]])


def drop_sigma(weight: np.ndarray, patch: int, channels: int) -> np.ndarray:
  """A learn_sigma output layer's weight [p*p*2C, ...] or bias [p*p*2C] -> the rows of the first C channels of each
  pixel (unpatchify puts the channel last, then forward() keeps channels [0, C))."""
  return weight.reshape(patch, patch, 2 * channels, *weight.shape[1:])[:, :, :channels].reshape(
      patch * patch * channels, *weight.shape[1:])


def official_name(path: tuple, projector_index: dict[str, int], block: int | None = None) -> str:
  """A repa_jax parameter path (under the model, without the block axis) -> its official state-dict key."""
  *modules, param = path
  if modules[0] == "projectors":
    return f"projectors.{projector_index[modules[1]]}.{PROJECTOR_MODULES[modules[2]]}.{PARAM_NAMES[param]}"
  if modules[1] == "blocks":
    return f"blocks.{block}.{BLOCK_MODULES[tuple(modules[2:])]}.{PARAM_NAMES[param]}"
  return f"{SIT_MODULES[tuple(modules[1:])]}.{PARAM_NAMES[param]}"


def torch_to_flax(weight: np.ndarray, path: tuple, spec, source: str) -> np.ndarray:
  """An official weight in repa_jax's layout: the patch conv [D, C, p, p] -> [p*p*C, D] in patchify's (p, p, C) order,
  linear [out, in] -> [in, out]. With learn_sigma (2C outputs) the final layer loses its sigma channels. For a 'sit'
  source the time MLP's first kernel is fed emb(1 - t) and the final layer is negated: v_repa(x, t) = -v_sit(x, 1 - t).
  """
  *modules, param = path
  if modules[-1] == "final_linear" and weight.shape[0] == 2 * spec.patch ** 2 * spec.in_channels:
    weight = drop_sigma(weight, spec.patch, spec.in_channels)
  if source == "sit" and modules[-1] == "final_linear":
    weight = -weight
  if param != "kernel":
    return weight
  if modules[-1] == "patch_embed":
    return conv_kernel(weight).reshape(-1, weight.shape[0])
  if source == "sit" and tuple(modules[-2:]) == ("t_embed", "fc1"):
    return (time_reversal(weight.shape[1]) @ linear_kernel(weight).astype(np.float64)).astype(np.float32)
  return linear_kernel(weight)


def check_pos_embed(state_dict: dict[str, np.ndarray], spec) -> None:
  """The checkpoint's fixed `pos_embed` [1, N, D] must be repa_jax's sin-cos embedding of the config's token grid."""
  saved, expected = take(state_dict, "pos_embed"), sincos_pos_embed_2d(spec.width, *spec.grid)
  if saved.size != expected.size or not np.allclose(saved.reshape(expected.shape), expected, atol=1e-4):
    raise ValueError(f"checkpoint weight 'pos_embed' of shape {saved.shape} is not the sin-cos embedding of the "
                     f"config's {spec.grid[0]}x{spec.grid[1]} token grid of width {spec.width}: the checkpoint is for "
                     "another resolution, patch size or width")


def convert_state_dict(state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                       source: str | None = None) -> nnx.State:
  """{official name: ndarray} -> the parameters of the config's `RepaSiT` (sit and projectors, as the train
  state's 'params'); the K-th official projector goes to the K-th of config.align.encoders. Projectors are ignored
  when the config has none (REPA off). source: 'repa' | 'sit' (see the module docstring), None = detect_source.

  A missing key raises a KeyError naming it; another depth, width, patch, class count or resolution a ValueError
  naming the key and its shape."""
  source = source or detect_source(state_dict)
  if source not in SOURCES:
    raise ValueError(f"source {source!r}: use one of {SOURCES}")
  state_dict = rename_legacy_blocks(state_dict)
  if config.align.encoders and config.align.projector != "mlp":
    raise ValueError(f"config.align.projector={config.align.projector!r}: the official REPA / SiT checkpoints have "
                     "MLP projectors; convert with config.align.projector='mlp' (or without alignment: reg=none)")
  spec = model_spec(config).sit
  switched = [f"config.model.{f}={getattr(spec, f)!r}" for f in BLOCK_SWITCHES
              if getattr(spec, f) != getattr(SiTSpec, f)]
  if switched:
    raise ValueError(f"{', '.join(switched)}: the official REPA / SiT checkpoints have SiT's blocks; convert with the "
                     f"defaults ({', '.join(f'{f}={getattr(SiTSpec, f)!r}' for f in BLOCK_SWITCHES)})")
  abstract = abstract_params(model_spec(config))
  projector_index = {name: k for k, name in enumerate(abstract.get("projectors", {}))}
  if len(block_indices(state_dict)) != spec.depth:
    raise ValueError(f"the checkpoint has {len(block_indices(state_dict))} blocks (blocks.N.*), the config's model "
                     f"{config.model.name!r} {spec.depth}: convert with the config of the checkpoint's model size")
  check_pos_embed(state_dict, spec)
  used = {"pos_embed"}

  def convert(name: str, path: tuple, shape: tuple) -> np.ndarray:
    used.add(name)
    weight = np.asarray(take(state_dict, name), np.float32)
    value = torch_to_flax(weight, path, spec, source)
    if value.shape != shape:
      raise ValueError(f"checkpoint weight {name!r} of shape {weight.shape} gives {value.shape}, not the expected "
                       f"{shape}: the checkpoint is not of the config's model ({spec})")
    return value

  def load(path, leaf):
    names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    if names[:2] == ("sit", "blocks"):  # stacked blocks: leaf [depth, ...]
      return jnp.asarray(np.stack([convert(official_name(names, projector_index, n), names, leaf.shape[1:])
                                   for n in range(spec.depth)]))
    return jnp.asarray(convert(official_name(names, projector_index), names, leaf.shape))

  params = jax.tree_util.tree_map_with_path(load, abstract)
  unused = sorted(k for k in set(state_dict) - used if projector_index or not k.startswith("projectors."))
  if unused:
    raise ValueError(f"{len(unused)} checkpoint weights have no place in the config's model, e.g. {unused[:8]}: is "
                     "it a model of another configuration (qk-norm, more projectors than config.align.encoders)?")
  if not projector_index and any(k.startswith("projectors.") for k in state_dict):
    logging.warning("the config has no REPA projectors: the checkpoint's projectors.* are not converted")
  if state_dict["final_layer.linear.bias"].shape[0] == 2 * spec.patch ** 2 * spec.in_channels:
    logging.warning("learn_sigma checkpoint: its sigma output channels are dropped (as SiT's forward drops them)")
  if source == "sit":
    logging.warning("SiT/DispLoss checkpoint (t = 0: noise): converted to repa_jax time, v(x, t) = -v_sit(x, 1 - t)")
  return params
