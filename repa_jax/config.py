"""The config schema every experiment file in configs/ starts from, and its argument parser."""
import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
  """All fields with REPA's published defaults (SiT-XL/2 + REPA on 256 px ImageNet latents)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # name '<S|B|L|XL>/<1|2|4|8>'; depth/width/num_heads: None = the named size's. remat: what each block keeps for
  # the backward pass: none (everything), dots (matmul outputs; the rest is recomputed), full (only its input).
  # norm (layernorm | rmsnorm), mlp (gelu | swiglu), rope, qk_norm: LightningDiT's block switches (specs.model.SiTSpec);
  # the defaults are SiT's. attention: einsum (written out) | xla | cudnn (jax.nn.dot_product_attention's
  # implementations; cudnn: the fused kernel on NVIDIA GPUs).
  c.model = dict(name="XL/2", depth=placeholder(int), width=placeholder(int), num_heads=placeholder(int),
                 dtype="float32", remat="none", attention="einsum", norm="layernorm", mlp="gelu", rope=False,
                 qk_norm=False)
  # source: 'synthetic' (random data of the configured shapes, for benchmarks and tests) or 'features'.
  # autoencoder: 'identity' (pixels) or 'sd-vae-ft-mse'; autoencoder_spec: VAESpec fields replacing SD-VAE's (tests).
  c.data = dict(source="synthetic", directory="", split="train", latent_shape=(32, 32, 4), num_classes=1000,
                autoencoder="sd-vae-ft-mse", latent_scale=0.18215, autoencoder_spec={})
  # cosine_weight: of LightningDiT's velocity-direction loss (objectives.flow.velocity_direction_loss; 0: off).
  c.flow = dict(path="linear", time_sampler="uniform", cosine_weight=0.0)
  # encoders: ((name, feature width), ...), a projector each: () = no REPA (see `select_regularizers`); weight scales
  # the term (0: not computed, the projectors stay in the parameter tree); block is 1-indexed (REPA's encoder_depth).
  # stop_step (both regularisers; None: never): from this step on the term is 0 and its projectors stay as they are.
  # projector: mlp (REPA: 3 linear layers of width projector_dim) | conv (iREPA: one projector_kernel^2 convolution
  # over the token grid); target_norm: none | zscore (iREPA: (f - zscore_gamma * mean) / (std + 1e-6) over tokens).
  c.align = dict(weight=0.5, block=8, encoders=(("dinov2_vitb14", 768),), projector_dim=2048, objective="cosine",
                 temperature=0.1, stop_step=placeholder(int), projector="mlp", projector_kernel=1, target_norm="none",
                 zscore_gamma=0.6)
  # weight 0 switches it off (see `select_regularizers`); blocks None = (depth // 4,); group_size None = the whole
  # per-step batch.
  c.disperse = dict(weight=0.5, variant="infonce_l2", temperature=0.5, blocks=placeholder(tuple), group_size=16,
                    margin=1.0, stop_step=placeholder(int))
  # SRA (objectives/self_alignment.py, no encoder): the online model's block student_block through a head, aligned to
  # the EMA model's block teacher_block at a less noisy time (up to max_time_gap earlier); weight 0 switches it off
  # (no head; see `select_regularizers`). objective smooth_l1 (beta) | cosine; the weight falls 10x per decay_epochs
  # epochs of steps_per_epoch steps after decay_start_epoch (decay_epochs None: constant). Blocks are SRA's for XL/2.
  c.sra = dict(weight=0.2, student_block=8, teacher_block=20, max_time_gap=0.2, objective="smooth_l1", beta=0.05,
               steps_per_epoch=5005, decay_start_epoch=149, decay_epochs=1000, stop_step=placeholder(int))
  # REG (Martinser/REG): the class token of the first aligned encoder, noised on the latents' path, joins the SiT's
  # tokens; its velocity error is added with `weight` (REG's --cls 0.03; 0 switches it off, see
  # `select_regularizers`), and REPA's target becomes [class token; patch tokens]. Needs REPA and a feature dataset
  # precomputed with REG on (it stores the class tokens).
  c.reg = dict(weight=0.03)
  # keep_every: also keep every keep_every-th checkpoint for good (None: only the newest keep_checkpoints).
  # restore_step: resume from this checkpoint (None: the newest readable one). profile_steps: (first, last) steps
  # (1-indexed) traced by jax.profiler into <workdir>/profile (None: no trace).
  # ema_warmup: decay min(ema_decay, (1 + step) / (10 + step)) instead of a constant ema_decay (REPA: constant).
  # lr_schedule: constant (REPA) | cosine (from lr after the warm-up to 0 at `steps`) | cooldown (constant, then
  # linear to 0 at `steps` over the last cooldown_fraction of them).
  # optimizer: adamw (REPA) | muon (Muon on the weight matrices at muon_lr_scale x lr with momentum muon_beta and
  # muon_ns_steps Newton-Schulz iterations, AdamW on the rest and on the kernels of the modules named in
  # muon_adamw_modules, e.g. ('ada_ln', 'final_ada_ln'); see repa_jax/train/state.py); moment_dtype: float32 |
  # bfloat16, of the first moments. time_budget_s: train as many steps as fit this many seconds of wall time (at most
  # `steps`), decided from the step time measured at the start and kept in <workdir>/train_plan.json
  # (repa_jax/train/budget.py), keeping time_budget_reserve_steps steps' worth of it for what follows (sampling,
  # evaluation); None or 0: exactly `steps`.
  c.train = dict(batch_size=256, steps=400_000, lr=1e-4, lr_schedule="constant", cooldown_fraction=0.2,
                 warmup_steps=0, optimizer="adamw", muon_lr_scale=1.0, muon_beta=0.95, muon_ns_steps=5,
                 muon_adamw_modules=(), b1=0.9, b2=0.999, eps=1e-8, moment_dtype="float32", weight_decay=0.0,
                 grad_clip=1.0, ema_decay=0.9999,
                 ema_warmup=False, label_dropout=0.1, log_every=100, checkpoint_every=10_000, keep_checkpoints=3,
                 keep_every=placeholder(int), restore_step=placeholder(int), profile_steps=placeholder(tuple),
                 time_budget_s=placeholder(float), time_budget_reserve_steps=0)
  # The device mesh (repa_jax/specs/sharding.py:make_mesh): shape per slice (one -1 allowed), laid out on the chips'
  # topology; dcn_shape (None: one slice) the axes' factors across slices, e.g. (2, 1): data parallel over 2 slices.
  c.mesh = dict(axes=("data", "fsdp"), shape=(-1, 1), dcn_shape=placeholder(tuple))
  # --mode=sample: sampler euler | heun | sde; labels uniform | balanced; checkpoint_step None = the newest;
  # decoder_weights: the sd-vae-ft-ema .safetensors that decodes VAE latents (unused for the identity autoencoder).
  c.sample = dict(sampler="sde", steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, num_samples=50_000,
                  batch_size=256, labels="uniform", seed=0, checkpoint_step=placeholder(int), decoder_weights="")
  # --mode=evaluate and in-training evaluation (every_steps None = off; its sampler: sampler, steps, cfg_scale,
  # guidance_low/high). feature_network 'fashion_mnist_classifier' (a CNN trained for classifier_steps, against the
  # real split `split`) or 'inception' (pytorch-fid's weights file inception_weights, against the ADM reference batch
  # .npz reference_npz). floor_split: the real images of config.precompute.source whose metrics are the floor
  # ('': none).
  c.evaluate = dict(split="test", every_steps=placeholder(int), num_samples=1000, batch_size=200, sampler="euler",
                    steps=50, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                    feature_network="fashion_mnist_classifier", classifier_steps=1875, floor_split="train",
                    inception_weights="", reference_npz="")
  # --mode=precompute: images of `source` ('fashion_mnist' | 'image_folder' | 'tfds:<name>') -> config.data.directory;
  # resolution: the ADM centre crop's size (None: the images as stored; image_folder needs one).
  # limit: use only the first `limit` images of each split (None = all); encoder_dir, encoder_steps: the
  # project-trained encoders' cache and training steps (None = their default); autoencoder_weights: the SD-VAE
  # .safetensors; encoder_weights: {DINOv2 name: .pth / .safetensors}; encoder_specs: {DINOv2 name: DinoV2Spec fields
  # replacing its preset's} (tests); workers: threads decoding and cropping images ahead of the devices; verify:
  # re-read every record of the finished shards and rewrite the damaged ones (else only their size and count).
  c.precompute = dict(source="fashion_mnist", source_dir="", resolution=placeholder(int), splits=("train",),
                      limit=placeholder(int), num_shards=8, batch_size=256, workers=16, quantize="float16",
                      encoder_dir="data/encoders", encoder_steps=placeholder(int), autoencoder_weights="",
                      encoder_weights={}, encoder_specs={}, verify=False)
  return c


def parse_arg(arg: str | None, defaults: dict[str, str]) -> dict[str, str]:
  """'model=XL/2,reg=repa' -> {'model': 'XL/2', 'reg': 'repa', ...the other defaults}; unknown keys are refused."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}")
    values[key] = value
  return values


def choose(name: str, value: str, options: dict):
  """options[value], or an error naming the config argument and its choices."""
  if value not in options:
    raise ValueError(f"config argument {name}={value!r}: use one of {sorted(options)}")
  return options[value]


# reg preset -> (the regularisers it keeps, the config fields it sets). irepa: iREPA's latent-model preset
# (End2End-Diffusion/iREPA ldm/configs/irepa.yaml: conv projector, zscore targets, coefficient 1.0) with the 3 x 3
# kernel of its README (its ldm/train.py defaults to 1); see docs/method.md.
IREPA = {"projector": "conv", "projector_kernel": 3, "target_norm": "zscore", "zscore_gamma": 0.6, "weight": 1.0}
REGULARIZERS = {"none": ((), {}), "repa": (("align",), {}), "disperse": (("disperse",), {}),
                "both": (("align", "disperse"), {}), "irepa": (("align",), {"align": IREPA}),
                "irepa+disperse": (("align", "disperse"), {"align": IREPA}), "sra": (("sra",), {}),
                "reg": (("align", "reg"), {})}


def select_regularizers(c: ml_collections.ConfigDict, reg: str) -> None:
  """Keep the regularisers of preset `reg` (a REGULARIZERS key), set its fields, and switch the others off: without
  alignment the model has no projectors (align.encoders = ()), without the dispersive term, SRA or REG their weight is
  0 (SRA's: no head; REG's: no class token)."""
  kept, fields = choose("reg", reg, REGULARIZERS)
  for section, values in fields.items():
    c[section].update(values)
  if "align" not in kept:
    c.align.encoders = ()
  if "disperse" not in kept:
    c.disperse.weight = 0.0
  if "sra" not in kept:
    c.sra.weight = 0.0
  if "reg" not in kept:
    c.reg.weight = 0.0
