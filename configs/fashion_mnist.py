"""Fashion-MNIST (the embedded default), sized for a 2-core CPU: `configs/fashion_mnist.py:reg=repa`.

reg: none | repa | disperse | both | irepa | irepa+disperse | sra | reg (repa_jax.config.REGULARIZERS). Pixel space
(identity autoencoder), 28x28x1, SiT patch 4 -> 7x7 = 49 tokens, depth 6, width 128, 2 heads. REPA aligns block 2 to
the project's own small ViT encoder ('fmnist_vit', trained on the train split and cached under
config.precompute.encoder_dir); the dispersive term reads block depth // 4 = 1; SRA aligns block 2 (through its head)
to the EMA model's block 4.

The training recipe and the sampler were chosen by benchmarks/fashion_mnist_sweep.py (docs/fashion_mnist_recipe.md),
not copied from ImageNet: a short run wants a high learning rate after a warm-up and an EMA whose decay warms up;
its samples are best with REPA's kind of sampler, the SDE, guided on t in [0.1, 0.7] (not the noisiest 30%, where
guidance trades diversity for class accuracy, nor the last steps), at CFG 2.0: the 5000-step model of a fast machine
is over-guided at 3.0 (FD 4.07 against 3.40-3.53 over three sampler seeds at 2.0). Muon on the weight matrices
(at 2x the learning rate, AdamW on the rest) learned ~1.7x more per step than AdamW by step 800, at 1.2-1.36x its
step time; the adaLN modulation matrices are left to AdamW (a 0.78x step, more steps in the same time). How many
steps the main job trains is decided by the run from its measured step time (train.time_budget_s):
the 2-core machines this ran on differ by 2.5x in speed (3000 steps took 468 s on one, 758 steps 362 s on another:
README, "What make run did"), and a fixed count either overruns the 15 minutes or wastes them. The learning rate
falls linearly to 0 over the last 40% of the steps (FD 12.0 against 13.5 with a constant one at step 1400 of a
1400-step run, one seed). The blocks rematerialise all but their matmuls (model.remat='dots'): on a 2-core CPU
that makes the step ~1.2x faster (less memory traffic).
"""
from repa_jax.config import base_config, parse_arg, select_regularizers

ENCODER_WIDTH = 64  # the width of the 'fmnist_vit' encoder (repa_jax.models.supervised.EncoderConfig().width)


def get_config(arg=None):
  args = parse_arg(arg, {"reg": "repa"})
  c = base_config()
  c.model.update(name="S/4", depth=6, width=128, num_heads=2, remat="dots")
  c.data.update(source="features", directory="data/fashion_mnist_fmnist_vit", split="train", latent_shape=(28, 28, 1),
                num_classes=10, autoencoder="identity", latent_scale=1.0)
  c.flow.time_sampler = "lognormal"
  c.align.update(block=2, encoders=(("fmnist_vit", ENCODER_WIDTH),), projector_dim=256)
  c.disperse.update(group_size=16)
  c.sra.update(student_block=2, teacher_block=4, steps_per_epoch=60_000 // 32)  # SRA's 8 / 20 of 28 blocks, scaled
  select_regularizers(c, args["reg"])
  if c.reg.weight:
    c.data.directory += "_cls"
  # As many steps (at most 5000) as fit 750 s with sampling and evaluation, which cost about as much as 1000 steps on
  # any machine (train.time_budget_s: the number is decided once, at the start, from the measured step time;
  # `make run` passes the time left of its 15 minutes; --config.train.time_budget_s=0 trains exactly train.steps).
  # The adaLN modulation matrices train with AdamW, not Muon: their Newton-Schulz iterations cost ~22% of the step,
  # and at equal wall time the run scored FD 4.36 against 5.05 (docs/fashion_mnist_recipe.md, one seed).
  c.train.update(batch_size=32, steps=5000, time_budget_s=750.0, time_budget_reserve_steps=1000, lr=4e-3,
                 warmup_steps=100, lr_schedule="cooldown", cooldown_fraction=0.4, optimizer="muon", muon_lr_scale=2.0,
                 muon_adamw_modules=("ada_ln", "final_ada_ln"), ema_decay=0.999, ema_warmup=True, log_every=100,
                 checkpoint_every=1000)
  # The main job's sampler (REPA's kind: SDE with a guidance interval), also for in-training evaluation.
  sampler = dict(sampler="sde", steps=50, cfg_scale=2.0, guidance_low=0.1, guidance_high=0.7)
  c.evaluate.update(num_samples=1000, batch_size=200, **sampler)
  c.sample.update(num_samples=1000, batch_size=200, labels="balanced", **sampler)
  c.precompute.update(source="fashion_mnist", splits=("train", "test"), num_shards=4, encoder_dir="data/encoders",
                      encoder_steps=3000)
  return c
