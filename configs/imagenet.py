"""ImageNet SiT presets: `configs/imagenet.py:model=XL/2,reg=repa,res=256,source=folder`.

model: S/2, B/2, L/2, XL/2 (any <size>/<patch>); reg: none | repa | disperse | both | irepa | irepa+disperse | sra | reg
(repa_jax.config.REGULARIZERS); res: 256 | 512;
source (--mode=precompute): folder (ILSVRC train class folders under precompute.source_dir/train) | tfds
(imagenet2012 prepared as ArrayRecord in the TFDS data_dir precompute.source_dir).
REPA: lambda 0.5 at block 4 (B) or 8 (L, XL), DINOv2-B features (256 x 768 at 256 px, 1024 x 768 at 512 px).
Dispersive: InfoNCE-L2, lambda 0.5, tau 0.5, block depth // 4, groups of 16 (the paper's JAX setting).
SRA: lambda 0.2 decaying 10x per 1000 epochs after epoch 149, smooth-L1 (beta 0.05), teacher time up to 0.2 earlier.
REG: REPA plus DINOv2-B's class token in the SiT (lambda 0.03), on a feature dataset that also stores the class tokens
(`..._cls`, precomputed with reg=reg; it serves every preset); its paper samples with SDE 250, CFG 2.3 on t <= 0.85.
Weights files (README, "ImageNet"): weights/sd-vae-ft-mse.safetensors, weights/sd-vae-ft-ema.safetensors,
weights/dinov2_vitb14_pretrain.pth, weights/pt_inception-2015-12-05-6726825d.pth; the ADM reference batch in data/.
"""
from repa_jax.config import base_config, choose, parse_arg, select_regularizers

REFERENCE_BATCHES = {"256": "data/VIRTUAL_imagenet256_labeled.npz", "512": "data/VIRTUAL_imagenet512.npz"}  # ADM's
SOURCES = {"folder": ("image_folder", "data/ILSVRC/Data/CLS-LOC"), "tfds": ("tfds:imagenet2012", "data/tfds")}


def get_config(arg=None):
  args = parse_arg(arg, {"model": "XL/2", "reg": "repa", "res": "256", "source": "folder"})
  c = base_config()
  c.model.update(name=args["model"], dtype="bfloat16")  # bfloat16 matmuls on TPU; parameters stay float32
  grid = choose("res", args["res"], {"256": 32, "512": 64})
  c.data.latent_shape = (grid, grid, 4)
  c.data.directory = f"data/imagenet{args['res']}_sdvae_dinov2b"
  c.data.source = "features"
  small = args["model"].split("/")[0] in ("S", "B")
  c.align.block = 4 if small else 8
  # SRA: blocks 8 -> 20 for XL/2 (its README), 3 -> 8 for B/2 (its SiT-SRA_DTS_AS script); L/2 takes XL's.
  c.sra.update(student_block=3 if small else 8, teacher_block=8 if small else 20, steps_per_epoch=1_281_167 // 256)
  select_regularizers(c, args["reg"])
  if c.reg.weight:
    c.data.directory += "_cls"
  source, source_dir = choose("source", args["source"], SOURCES)
  # 1.28M train images: ~378 kB per record at 256 px (~480 GB), ~1.6 MB at 512 px; shards of ~0.5 GB.
  c.precompute.update(source=source, source_dir=source_dir, resolution=8 * grid, splits=("train",),
                      num_shards=1024 if grid == 32 else 4096, batch_size=256,
                      autoencoder_weights="weights/sd-vae-ft-mse.safetensors",
                      encoder_weights={"dinov2_vitb14": "weights/dinov2_vitb14_pretrain.pth"})
  c.sample.decoder_weights = "weights/sd-vae-ft-ema.safetensors"
  c.evaluate.update(feature_network="inception", inception_weights="weights/pt_inception-2015-12-05-6726825d.pth",
                    reference_npz=choose("res", args["res"], REFERENCE_BATCHES))
  return c
