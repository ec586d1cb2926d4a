"""The start-up check of a whole config: every numeric field of the tiny config driven with 0, a negative and an
absurd value, every enumerated field with an unknown name; the shipped configs pass; main refuses before any I/O."""
import subprocess
import sys

import pytest

from configs import fashion_mnist, imagenet, tiny
from repa_jax.config import REGULARIZERS
from repa_jax.validate import RULES, validate
from tests.processes import ROOT

# Fields where the value is allowed, written out independently of the rules in repa_jax/validate.py.
ZERO_ALLOWED = {"seed", "flow.cosine_weight", "align.weight", "align.stop_step", "align.zscore_gamma", "disperse.weight",
                "disperse.stop_step", "disperse.margin", "train.time_budget_s", "train.time_budget_reserve_steps",
                "train.warmup_steps", "train.b1", "train.b2", "train.muon_beta", "train.weight_decay",
                "train.ema_decay", "train.label_dropout", "train.restore_step",
                "sample.cfg_scale", "sample.guidance_low", "sample.seed", "sample.checkpoint_step",
                "evaluate.cfg_scale", "evaluate.guidance_low", "sra.weight", "sra.max_time_gap",
                "sra.decay_start_epoch", "sra.stop_step", "reg.weight"}
HUGE_ALLOWED = {"seed", "align.stop_step", "disperse.stop_step", "model.depth", "model.width", "model.num_heads",
                "data.num_classes", "align.block",
                "align.projector_dim", "disperse.group_size", "train.batch_size", "train.steps", "train.warmup_steps",
                "train.grad_clip", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                "train.keep_every", "train.restore_step", "train.time_budget_s", "train.time_budget_reserve_steps",
                "sample.steps", "sample.num_samples", "sample.batch_size",
                "sample.seed", "sample.checkpoint_step", "evaluate.every_steps", "evaluate.num_samples",
                "evaluate.batch_size", "evaluate.steps", "evaluate.classifier_steps", "precompute.resolution",
                "precompute.limit", "precompute.num_shards", "precompute.batch_size", "precompute.workers",
                "precompute.encoder_steps", "sra.student_block", "sra.teacher_block", "sra.steps_per_epoch",
                "sra.decay_start_epoch", "sra.decay_epochs", "sra.stop_step"}


def fields(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items") and not isinstance(value, dict):
      yield from fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def numeric_fields():
  """The tiny config's numeric fields (ints, floats and int placeholders that are None), with their type."""
  config = tiny.get_config()
  found = {}
  for field, value in fields(config):
    if isinstance(value, bool) or field in ("disperse.blocks", "train.profile_steps", "mesh.dcn_shape"):
      continue
    if isinstance(value, (int, float)):
      found[field] = type(value)
    elif value is None:
      found[field] = int  # every None placeholder but the tuples (blocks, profile_steps, dcn_shape) holds an int
  return found


def with_value(field: str, value):
  config = tiny.get_config()
  section, key = field.rsplit(".", 1) if "." in field else (None, field)
  (config[section] if section else config)[key] = value
  return config


def test_every_numeric_and_enumerated_field_has_a_rule():
  assert set(numeric_fields()) <= set(RULES)
  every = dict(fields(tiny.get_config()))
  assert set(RULES) <= set(every), set(RULES) - set(every)
  enumerated = {f for f, v in every.items() if isinstance(v, str) and f in RULES}
  assert {"model.dtype", "model.remat", "flow.time_sampler", "train.lr_schedule", "sample.sampler"} <= enumerated


@pytest.mark.parametrize("field", sorted(numeric_fields()))
def test_zero_negative_and_absurd_values(field):
  kind = numeric_fields()[field]
  for value, allowed in ((0, field in ZERO_ALLOWED), (-1, False), (10 ** 9, field in HUGE_ALLOWED)):
    config = with_value(field, kind(value))
    if allowed:
      validate(config)
      continue
    with pytest.raises(ValueError) as error:
      validate(config)
    message, key = str(error.value), field.rsplit(".", 1)[-1]
    assert f"config.{field}={kind(value)!r}: use " in message or f"{key}={kind(value)!r}" in message, message
    assert message.count("\n  config.") == 1  # only the bad field is reported


@pytest.mark.parametrize("field", sorted(f for f, v in fields(tiny.get_config()) if isinstance(v, str) and f in RULES))
def test_unknown_names_are_refused_with_the_choices(field):
  with pytest.raises(ValueError, match=rf"config\.{field}='nonsense': use one of \("):
    validate(with_value(field, "nonsense"))


def test_the_issues_examples_are_all_reported_at_once():
  config = tiny.get_config()
  config.train.update(ema_decay=2, label_dropout=-1, grad_clip=0, lr=1e9, steps=0)
  with pytest.raises(ValueError) as error:
    validate(config)
  for text in ("ema_decay=2.0", "label_dropout=-1.0", "grad_clip=0.0", "lr=1000000000.0",
               "steps=0: use an integer in [1, inf) (0 steps: there is nothing to train)"):
    assert text in str(error.value)


def test_an_empty_guidance_interval_is_refused():
  config = tiny.get_config()
  config.sample.update(guidance_low=0.7, guidance_high=0.3)
  with pytest.raises(ValueError, match="guidance_low=0.7 >= guidance_high=0.3"):
    validate(config)


@pytest.mark.parametrize("dcn_shape", [(2,), (2, 0), (2, -1)])
def test_a_bad_multi_slice_shape_is_refused(dcn_shape):
  config = tiny.get_config()
  config.mesh.dcn_shape = dcn_shape
  with pytest.raises(ValueError, match=r"config.mesh.dcn_shape=.*one positive integer per axis"):
    validate(config)
  config.mesh.dcn_shape = (2, 1)
  validate(config)


@pytest.mark.parametrize("config", [
    *(tiny.get_config(f"reg={r}") for r in REGULARIZERS),
    *(fashion_mnist.get_config(f"reg={r}") for r in REGULARIZERS),
    *(imagenet.get_config(f"model={m},reg={r}") for m in ("S/2", "B/2", "L/2", "XL/2") for r in REGULARIZERS)])
def test_the_shipped_configs_pass(config):
  validate(config)


def test_main_refuses_before_touching_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-m", "repa_jax.main", "--mode=train", "--config=configs/tiny.py",
                           f"--workdir={workdir}", "--config.train.ema_decay=2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0 and "config.train.ema_decay=2.0: use a number in [0, 1]" in result.stderr
  assert not workdir.exists()
