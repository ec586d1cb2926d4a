"""The trained model: a SiT backbone plus one REPA projector per aligned encoder and, with SRA, its head (both are used
in training only)."""
import jax
from flax import nnx

from repa_jax.models.projector import ConvProjector, Projector, SelfAlignmentHead
from repa_jax.models.sit import SiT
from repa_jax.specs.model import ModelSpec


class RepaSiT(nnx.Module):
  """`sit` (the velocity model), `projectors[name]` for each encoder of the spec, and `sra_head` iff spec.sra_head."""

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    dtype = spec.compute_dtype
    self.sit = SiT(spec.sit, rngs, dtype=dtype, remat=spec.remat, attention=spec.attention)
    def projector(z_dim: int):
      if spec.projector == "conv":
        return ConvProjector(spec.sit.width, z_dim, spec.sit.grid, rngs, kernel=spec.projector_kernel, dtype=dtype)
      return Projector(spec.sit.width, z_dim, rngs, hidden=spec.projector_dim, dtype=dtype)
    self.projectors = nnx.Dict({name: projector(width) for name, width in spec.encoders})
    if spec.sra_head:
      self.sra_head = SelfAlignmentHead(spec.sit.width, rngs, dtype=dtype)


def build_model(spec: ModelSpec, key: jax.Array) -> RepaSiT:
  """The model of `spec`, initialised from `key` (a run's `rng.stream(seed, 'init')`)."""
  return RepaSiT(spec, nnx.Rngs(key))


def model_graphdef(spec: ModelSpec) -> nnx.GraphDef:
  """The static structure that `nnx.merge(graphdef, params)` turns back into a RepaSiT."""
  return nnx.graphdef(nnx.eval_shape(lambda: build_model(spec, jax.random.key(0))))


def abstract_params(spec: ModelSpec):
  """ShapeDtypeStructs of the model parameters (also the EMA's), without allocating them."""
  return jax.eval_shape(lambda: nnx.split(build_model(spec, jax.random.key(0)))[1])


def sit_graphdef(spec: ModelSpec) -> nnx.GraphDef:
  """The static structure of the SiT alone (sampling needs no projectors)."""
  return nnx.graphdef(nnx.eval_shape(lambda: SiT(spec.sit, nnx.Rngs(0), dtype=spec.compute_dtype, remat=spec.remat,
                                                 attention=spec.attention)))
