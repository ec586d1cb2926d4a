"""What a run needs from its feature dataset (`DatasetRequirement`), and the one check of encoder features against
the SiT's token grid and the projectors' widths."""
import dataclasses

import ml_collections

from repa_jax.specs.model import aligned_encoders, sit_spec


@dataclasses.dataclass(frozen=True)
class DatasetRequirement:
  """What a run of a config reads: latents of `autoencoder` [*latent_shape] (scaled by latent_scale), labels in
  [0, num_classes), per aligned encoder (name, tokens, width) features on the SiT's token grid, and with REG
  (`class_tokens`) each encoder's class token [width]."""
  autoencoder: str
  latent_shape: tuple[int, int, int]
  latent_scale: float
  encoders: tuple[tuple[str, int, int], ...]
  token_grid: tuple[int, int]
  num_classes: int
  class_tokens: bool = False


def dataset_requirement(config: ml_collections.ConfigDict) -> DatasetRequirement:
  """The requirement of a run of `config` (encoders only while REPA's term is computed, see `aligned_encoders`)."""
  spec = sit_spec(config)
  return DatasetRequirement(
      autoencoder=config.data.autoencoder, latent_shape=tuple(config.data.latent_shape),
      latent_scale=config.data.latent_scale, token_grid=spec.grid, num_classes=config.data.num_classes,
      encoders=tuple((name, spec.num_tokens, width) for name, width in aligned_encoders(config).items()),
      class_tokens=bool(config.reg.weight))


def check_encoder_features(name: str, tokens: int, width: int, requirement: DatasetRequirement, where: str,
                           remedy: str = "") -> None:
  """Refuses features of encoder `name` ([tokens, width], found in `where`) that the requirement does not take: a
  token count other than the SiT's grid, or a width other than the projector's (config.align.encoders). The error
  ends with `remedy`, where there is another fix than changing the config."""
  def refuse(problem: str):
    raise ValueError(f"{where}: encoder {name!r} {problem} {remedy}".rstrip())

  wanted = {n: (t, w) for n, t, w in requirement.encoders}
  if name not in wanted:
    refuse(f"is not among config.align.encoders {sorted(wanted)}.")
  want_tokens, want_width = wanted[name]
  if tokens != want_tokens:
    refuse(f"gives {tokens} tokens but the SiT's token grid {requirement.token_grid} has {want_tokens}: use features "
           "on the SiT's token grid, or change config.model.name's patch size (or config.precompute.resolution).")
  if width != want_width:
    refuse(f"features are {width} wide but config.align.encoders says {want_width}: set its width to {width}.")
