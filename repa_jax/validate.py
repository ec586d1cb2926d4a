"""One check of a whole config before anything runs: a rule per numeric and enumerated field, each bad value refused
with the field, the value and what is allowed (`validate(config)`, called by main.py in every mode)."""
import math
from collections.abc import Callable

import ml_collections

from repa_jax.data.features import QUANTIZATIONS
from repa_jax.objectives.alignment import OBJECTIVES, TARGET_NORMS
from repa_jax.objectives.dispersive import VARIANTS
from repa_jax.objectives.flow import PATHS, TIME_SAMPLERS
from repa_jax.objectives.self_alignment import SRA_OBJECTIVES
from repa_jax.sample.generate import LABEL_MODES
from repa_jax.sample.samplers import SAMPLERS
from repa_jax.specs.model import ATTENTIONS, DTYPES, MLPS, NORMS, PROJECTORS, REMAT
from repa_jax.train.state import LR_SCHEDULES, MOMENT_DTYPES, OPTIMIZERS

Rule = Callable[[object], str | None]  # value -> what is allowed, if the value is not


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
           integer: bool = False, optional: bool = False) -> Rule:
  """A number in [low, high] (an end excluded when open), an int if `integer`, None allowed if `optional`."""
  brackets = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open or high == math.inf else "]")
  allowed = f"{'an integer' if integer else 'a number'} in {brackets}" + (" or None" if optional else "")

  def rule(value):
    if value is None:
      return None if optional else allowed
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or math.isnan(value):
      return allowed
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    return allowed if below or above else None
  return rule


def one_of(choices) -> Rule:
  return lambda value: None if value in choices else f"one of {tuple(choices)}"


POSITIVE = number(1, integer=True)
COUNT = number(0, integer=True)
PROBABILITY = number(0, 1)
RULES: dict[str, Rule] = {
    "seed": COUNT,
    "model.depth": number(1, integer=True, optional=True), "model.width": number(1, integer=True, optional=True),
    "model.num_heads": number(1, integer=True, optional=True), "model.dtype": one_of(DTYPES),
    "model.remat": one_of(REMAT), "model.attention": one_of(ATTENTIONS), "model.norm": one_of(NORMS), "model.mlp": one_of(MLPS),
    "model.rope": one_of((False, True)), "model.qk_norm": one_of((False, True)),
    "data.num_classes": POSITIVE, "data.latent_scale": number(0, 1e3, low_open=True),
    "data.source": one_of(("synthetic", "features")),
    "flow.path": one_of(PATHS), "flow.time_sampler": one_of(TIME_SAMPLERS), "flow.cosine_weight": number(0, 100),
    "align.weight": number(0, 100), "align.block": POSITIVE, "align.projector_dim": POSITIVE,
    "align.objective": one_of(OBJECTIVES), "align.temperature": number(0, 100, low_open=True),
    "align.stop_step": number(0, integer=True, optional=True), "align.projector": one_of(PROJECTORS),
    "align.projector_kernel": lambda k: POSITIVE(k) or (None if k % 2 else "an odd integer (a centred kernel)"),
    "align.target_norm": one_of(TARGET_NORMS), "align.zscore_gamma": number(0, 1),
    "disperse.stop_step": number(0, integer=True, optional=True),
    "disperse.weight": number(0, 100), "disperse.variant": one_of(VARIANTS),
    "disperse.temperature": number(0, 100, low_open=True),
    "disperse.group_size": number(2, integer=True, optional=True),
    "disperse.margin": number(0, 100),
    "sra.weight": number(0, 100), "sra.student_block": POSITIVE, "sra.teacher_block": POSITIVE,
    "sra.max_time_gap": PROBABILITY, "sra.objective": one_of(SRA_OBJECTIVES), "sra.beta": number(0, 100, low_open=True),
    "sra.steps_per_epoch": POSITIVE, "sra.decay_start_epoch": COUNT,
    "sra.decay_epochs": number(1, integer=True, optional=True), "sra.stop_step": number(0, integer=True, optional=True),
    "reg.weight": number(0, 100),
    "train.batch_size": POSITIVE,
    "train.steps": lambda value: POSITIVE(value) and f"{POSITIVE(value)} (0 steps: there is nothing to train)",
    "train.lr": number(0, 1, low_open=True),
    "train.lr_schedule": one_of(LR_SCHEDULES), "train.cooldown_fraction": number(0, 1, low_open=True),
    "train.optimizer": one_of(OPTIMIZERS), "train.moment_dtype": one_of(MOMENT_DTYPES),
    "train.muon_lr_scale": number(0, 100, low_open=True), "train.muon_beta": number(0, 1, high_open=True),
    "train.muon_ns_steps": number(1, 20, integer=True), "train.warmup_steps": COUNT,
    "train.b1": number(0, 1, high_open=True),
    "train.b2": number(0, 1, high_open=True), "train.eps": number(0, 1, low_open=True),
    "train.weight_decay": number(0, 1), "train.grad_clip": number(0, low_open=True),
    "train.ema_decay": PROBABILITY, "train.label_dropout": number(0, 1, high_open=True),
    "train.log_every": POSITIVE, "train.checkpoint_every": POSITIVE, "train.keep_checkpoints": POSITIVE,
    "train.keep_every": number(1, integer=True, optional=True),
    "train.restore_step": number(0, integer=True, optional=True),
    "train.time_budget_s": number(0, optional=True), "train.time_budget_reserve_steps": COUNT,
    "sample.sampler": one_of(SAMPLERS), "sample.steps": POSITIVE, "sample.cfg_scale": number(0, 100),
    "sample.guidance_low": PROBABILITY, "sample.guidance_high": PROBABILITY, "sample.num_samples": POSITIVE,
    "sample.batch_size": POSITIVE, "sample.labels": one_of(LABEL_MODES), "sample.seed": COUNT,
    "sample.checkpoint_step": number(0, integer=True, optional=True),
    "evaluate.every_steps": number(1, integer=True, optional=True), "evaluate.num_samples": number(2, integer=True),
    "evaluate.batch_size": POSITIVE, "evaluate.sampler": one_of(SAMPLERS), "evaluate.steps": POSITIVE,
    "evaluate.cfg_scale": number(0, 100), "evaluate.guidance_low": PROBABILITY,
    "evaluate.guidance_high": PROBABILITY, "evaluate.classifier_steps": POSITIVE,
    "evaluate.feature_network": one_of(("fashion_mnist_classifier", "inception")),
    "precompute.resolution": number(1, integer=True, optional=True),
    "precompute.limit": number(1, integer=True, optional=True), "precompute.num_shards": POSITIVE,
    "precompute.batch_size": POSITIVE, "precompute.workers": POSITIVE, "precompute.quantize": one_of(QUANTIZATIONS),
    "precompute.encoder_steps": number(1, integer=True, optional=True),
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises one ValueError listing every field of RULES whose value is not allowed (all of them, not the first)."""
  problems = []
  for field, rule in RULES.items():
    value = config
    for key in field.split("."):
      value = value[key]
    if (allowed := rule(value)) is not None:
      problems.append(f"config.{field}={value!r}: use {allowed}")
  for section in ("sample", "evaluate"):
    low, high = config[section].guidance_low, config[section].guidance_high
    if PROBABILITY(low) is None and PROBABILITY(high) is None and low >= high:
      problems.append(f"config.{section}.guidance_low={low} >= guidance_high={high}: the guidance interval is empty")
  student, teacher = config.sra.student_block, config.sra.teacher_block
  if config.sra.weight and POSITIVE(student) is None and POSITIVE(teacher) is None and student >= teacher:
    problems.append(f"config.sra.student_block={student} >= teacher_block={teacher}: SRA's teacher is a later block")
  profile = config.train.profile_steps
  if profile is not None and not (len(profile) == 2 and all(POSITIVE(s) is None for s in profile)
                                  and profile[0] <= profile[1]):
    problems.append(f"config.train.profile_steps={profile!r}: use (first, last) steps with 1 <= first <= last")
  if config.train.time_budget_s and config.train.lr_schedule == "cosine":
    problems.append("config.train.time_budget_s with config.train.lr_schedule='cosine': the cosine depends on the "
                    "number of steps from the first one, which a budget decides only after a few; use 'cooldown'")
  dcn = config.mesh.dcn_shape
  if dcn is not None and not (len(dcn) == len(config.mesh.axes) and all(POSITIVE(s) is None for s in dcn)):
    problems.append(f"config.mesh.dcn_shape={dcn!r}: use None (one slice) or one positive integer per axis of "
                    f"{tuple(config.mesh.axes)}")
  if config.reg.weight and not (config.align.weight and config.align.encoders):
    problems.append(f"config.reg.weight={config.reg.weight} needs REPA (config.align.weight and encoders): REG's class "
                    "token comes from the aligned encoder and joins its target; use the preset reg=reg")
  if config.reg.weight and config.align.projector == "conv":
    problems.append("config.reg.weight with config.align.projector='conv': the convolution reads the token grid, "
                    "which REG's class token is not on; use the 'mlp' projector")
  if problems:
    raise ValueError("invalid config, nothing was run:\n  " + "\n  ".join(problems))
