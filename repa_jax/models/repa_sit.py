"""The trained model: a SiT backbone plus one REPA projector per encoder (projectors are used in training only)."""
import jax.numpy as jnp
import ml_collections
from flax import nnx

from repa_jax.models.projector import Projector
from repa_jax.models.sit import SiT, SiTSpec, spec_from_name

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class RepaSiT(nnx.Module):
  """`sit` (the velocity model) and `projectors[name]` for each aligned encoder."""

  def __init__(self, spec: SiTSpec, encoder_widths: dict[str, int], rngs: nnx.Rngs, *, projector_dim: int = 2048,
               dtype=jnp.float32):
    self.sit = SiT(spec, rngs, dtype=dtype)
    self.projectors = nnx.Dict({name: Projector(spec.width, width, rngs, hidden=projector_dim, dtype=dtype)
                                for name, width in encoder_widths.items()})


def sit_spec(config: ml_collections.ConfigDict) -> SiTSpec:
  """The SiT shape implied by config.model and config.data."""
  m = config.model
  return spec_from_name(m.name, input_size=tuple(config.data.latent_shape[:2]), in_channels=config.data.latent_shape[2],
                        num_classes=config.data.num_classes, depth=m.depth, width=m.width, num_heads=m.num_heads)


def compute_dtype(config: ml_collections.ConfigDict):
  if config.model.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={config.model.dtype!r}: use one of {sorted(DTYPES)}")
  return DTYPES[config.model.dtype]


def build_model(config: ml_collections.ConfigDict, seed: int) -> RepaSiT:
  """The model of a config, with projectors only for the encoders REPA aligns to (none when align.weight == 0)."""
  widths = dict(config.align.encoders) if config.align.weight else {}
  return RepaSiT(sit_spec(config), widths, nnx.Rngs(seed), projector_dim=config.align.projector_dim,
                 dtype=compute_dtype(config))
