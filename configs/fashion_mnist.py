"""Fashion-MNIST (the embedded default), sized for a 2-core CPU: `configs/fashion_mnist.py:reg=repa`.

reg: none | repa | disperse | both. Pixel space (identity autoencoder), 28x28x1, SiT patch 4 -> 7x7 = 49 tokens, depth 6,
width 192. REPA aligns block 2 to the project's own small ViT encoder ('fmnist_vit', trained on the train split and
cached under config.precompute.encoder_dir); the dispersive term reads block depth // 4 = 1.
"""
from repa_jax.config import base_config, parse_arg, select_regularizers
from repa_jax.data.encoder import EncoderConfig


def get_config(arg=None):
  args = parse_arg(arg, {"reg": "repa"})
  c = base_config()
  c.model.update(name="S/4", depth=6, width=192, num_heads=3)
  c.data.update(source="features", directory="data/fashion_mnist_fmnist_vit", split="train", latent_shape=(28, 28, 1),
                num_classes=10, autoencoder="identity", latent_scale=1.0)
  c.align.update(block=2, encoders=(("fmnist_vit", EncoderConfig().width),), projector_dim=512)
  c.disperse.update(group_size=16)
  select_regularizers(c, args["reg"])
  # Sized so that `make run` (install, encoder + classifier training, precompute, training, sampling, metrics) takes
  # under 15 minutes on 2 CPU cores; benchmarks/fashion_mnist_study.py trains longer.
  c.train.update(batch_size=64, steps=300, lr=2e-4, ema_decay=0.99, log_every=50, checkpoint_every=150)
  c.evaluate.update(every_steps=150, num_samples=256, batch_size=256, sampler="euler", steps=25)
  c.sample.update(sampler="euler", steps=25, num_samples=1000, batch_size=200, labels="balanced")
  c.precompute.update(source="fashion_mnist", splits=("train", "test"), num_shards=4, encoder_dir="data/encoders",
                      encoder_steps=1000)
  return c
