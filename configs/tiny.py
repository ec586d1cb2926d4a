"""A tiny SiT on synthetic data, for tests and smoke runs: `configs/tiny.py:reg=both`."""
from repa_jax.config import base_config, parse_arg, select_regularizers


def get_config(arg=None):
  args = parse_arg(arg, {"reg": "both"})
  c = base_config()
  c.model.update(name="S/2", depth=4, width=32, num_heads=2)
  c.data.update(source="synthetic", latent_shape=(8, 8, 4), num_classes=10)
  c.align.update(block=2, encoders=(("toy_encoder", 16),), projector_dim=64)
  c.disperse.group_size = 4
  c.sra.update(student_block=1, teacher_block=3)
  select_regularizers(c, args["reg"])
  c.train.update(batch_size=8, steps=20, lr=1e-3, log_every=5, checkpoint_every=10, keep_checkpoints=2)
  return c
