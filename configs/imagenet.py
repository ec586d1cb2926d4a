"""ImageNet SiT presets: `configs/imagenet.py:model=XL/2,reg=repa,res=256`.

model: S/2, B/2, L/2, XL/2 (any <size>/<patch>); reg: none | repa | disperse | both; res: 256 | 512.
REPA: lambda 0.5 at block 4 (B) or 8 (L, XL), DINOv2-B features (256 x 768 at 256 px, 1024 x 768 at 512 px).
Dispersive: InfoNCE-L2, lambda 0.5, tau 0.5, block depth // 4, groups of 16 (the paper's JAX setting).
"""
from repa_jax.config import base_config, choose, parse_arg, select_regularizers


def get_config(arg=None):
  args = parse_arg(arg, {"model": "XL/2", "reg": "repa", "res": "256"})
  c = base_config()
  c.model.update(name=args["model"], dtype="bfloat16")  # bfloat16 matmuls on TPU; parameters stay float32
  grid = choose("res", args["res"], {"256": 32, "512": 64})
  c.data.latent_shape = (grid, grid, 4)
  c.data.directory = f"data/imagenet{args['res']}_sdvae_dinov2b"
  c.data.source = "features"
  c.align.block = 4 if args["model"].split("/")[0] in ("S", "B") else 8
  select_regularizers(c, args["reg"])
  return c
