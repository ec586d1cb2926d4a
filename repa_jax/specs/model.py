"""The model a config describes: the SiT's shape, the REPA projectors beside it, the blocks the regularisers read."""
import dataclasses

import jax.numpy as jnp
import ml_collections

# size -> (depth, width, heads), as in the official SiT.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (1, 2, 4, 8)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PROJECTORS = ("mlp", "conv")  # REPA's MLP per token, iREPA's convolution over the token grid
REMAT = ("none", "dots", "full")  # what a SiT block saves for the backward pass (models.sit.REMAT_POLICIES)
ATTENTIONS = ("einsum", "xla", "cudnn")  # the attention written out | jax.nn.dot_product_attention's implementations
NORMS = ("layernorm", "rmsnorm")  # SiT's parameter-free LayerNorm | LightningDiT's RMSNorm (also the QK-norm's kind)
MLPS = ("gelu", "swiglu")  # SiT's tanh-GELU MLP | LightningDiT's SwiGLU
BLOCK_SWITCHES = ("norm", "mlp", "rope", "qk_norm")  # config.model fields -> the SiTSpec fields of the same name


@dataclasses.dataclass(frozen=True)
class SiTSpec:
  """Everything that fixes a SiT's parameter shapes."""
  input_size: tuple[int, int]  # (H, W) of the latent / image
  in_channels: int
  num_classes: int
  patch: int
  depth: int
  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  # LightningDiT's block switches (the defaults are SiT's): norm (NORMS), mlp (MLPS), 2D rotary embedding of q and k
  # (beside the sin-cos position embedding), and a norm of each head's q and k of the kind `norm`.
  norm: str = "layernorm"
  mlp: str = "gelu"
  rope: bool = False
  qk_norm: bool = False
  # REG: the width E of the encoder class token that joins the tokens (0: none).
  class_token_dim: int = 0

  def __post_init__(self):
    for field, value, choices in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS)):
      if value not in choices:
        raise ValueError(f"config.model.{field}={value!r}: use one of {choices}")

  @property
  def grid(self) -> tuple[int, int]:
    return self.input_size[0] // self.patch, self.input_size[1] // self.patch

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The trained model: the SiT, one REPA projector per aligned encoder (name, feature width) of kind `projector`
  (one of PROJECTORS; the MLP's hidden width projector_dim, the convolution's kernel projector_kernel), and
  the compute dtype ('float32' | 'bfloat16'), the blocks' rematerialisation (one of REMAT; it changes what the
  backward pass stores and recomputes, never a value) and the attention's implementation (one of ATTENTIONS;
  the same function, computed another way). The projectors exist iff `encoders` is non-empty, whatever the
  loss weights: a weight only scales its term. `sra_head`: the model has SRA's head (config.sra.weight is not 0)."""
  sit: SiTSpec
  encoders: tuple[tuple[str, int], ...]
  projector_dim: int
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "einsum"
  projector: str = "mlp"
  projector_kernel: int = 1
  sra_head: bool = False

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"config.model.dtype={self.dtype!r}: use one of {sorted(DTYPES)}")
    if self.remat not in REMAT:
      raise ValueError(f"config.model.remat={self.remat!r}: use one of {REMAT}")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"config.model.attention={self.attention!r}: use one of {ATTENTIONS}")
    if self.projector not in PROJECTORS:
      raise ValueError(f"config.align.projector={self.projector!r}: use one of {PROJECTORS}")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


def spec_from_name(name: str, *, input_size, in_channels: int, num_classes: int, depth: int | None = None,
                   width: int | None = None, num_heads: int | None = None) -> SiTSpec:
  """'XL/2' -> SiTSpec; depth/width/num_heads, when given (not None), override the named size."""
  size, _, patch = name.partition("/")
  if size not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
    raise ValueError(f"config.model.name={name!r} is not a SiT model: use <size>/<patch> with size in "
                     f"{sorted(SIZES)} and patch in {PATCH_SIZES}, e.g. 'XL/2'")
  named_depth, named_width, named_heads = SIZES[size]
  h, w = input_size
  if h % int(patch) or w % int(patch):
    raise ValueError(f"input size {h}x{w} is not divisible by the patch size {patch} of config.model.name={name!r}")
  pick = lambda value, named: named if value is None else value
  return SiTSpec(input_size=(h, w), in_channels=in_channels, num_classes=num_classes, patch=int(patch),
                 depth=pick(depth, named_depth), width=pick(width, named_width),
                 num_heads=pick(num_heads, named_heads))


def sit_spec(config: ml_collections.ConfigDict) -> SiTSpec:
  """The SiT shape implied by config.model, config.data and, with REG (config.reg.weight), the class token of the
  first encoder of config.align.encoders."""
  m, shape = config.model, tuple(config.data.latent_shape)
  named = spec_from_name(m.name, input_size=shape[:2], in_channels=shape[2], num_classes=config.data.num_classes,
                         depth=m.depth, width=m.width, num_heads=m.num_heads)
  return dataclasses.replace(named, **{field: m[field] for field in BLOCK_SWITCHES},
                             class_token_dim=reg_encoder(config)[1] if config.reg.weight else 0)


def reg_encoder(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """(name, width) of the encoder whose class token REG feeds the SiT: the first of config.align.encoders."""
  if not config.align.encoders:
    raise ValueError("config.reg.weight is set but config.align.encoders is empty: REG's class token comes from an "
                     "aligned encoder (use a preset with REPA, e.g. reg=reg)")
  name, width = config.align.encoders[0]
  return str(name), int(width)


def model_spec(config: ml_collections.ConfigDict) -> ModelSpec:
  """The model of a config: its SiT, a projector for each of config.align.encoders, SRA's head if SRA is on."""
  return ModelSpec(sit=sit_spec(config), encoders=tuple((str(n), int(w)) for n, w in config.align.encoders),
                   projector_dim=config.align.projector_dim, dtype=config.model.dtype,
                   remat=config.model.remat, attention=config.model.attention, projector=config.align.projector,
                   projector_kernel=config.align.projector_kernel, sra_head=bool(config.sra.weight))


def aligned_encoders(config: ml_collections.ConfigDict) -> dict[str, int]:
  """{encoder name: feature width} whose REPA term the train step computes: config.align.encoders while
  config.align.weight is not 0, else none (the projectors stay in the parameter tree, untrained)."""
  return dict(config.align.encoders) if config.align.weight else {}


def dispersive_blocks(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The 1-indexed blocks the dispersive term reads (none while config.disperse.weight is 0): config.disperse.blocks,
  or (depth // 4,) when it is None."""
  if not config.disperse.weight:
    return ()
  blocks = config.disperse.blocks
  return tuple(blocks) if blocks is not None else (max(sit_spec(config).depth // 4, 1),)
