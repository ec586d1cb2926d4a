"""Throughput of the ImageNet precompute networks with random weights: SD-VAE encoder (256 px) and DINOv2-B (REPA's
preprocessing: 256 px -> 224 px, 256 patch tokens), each alone and together as `--mode=precompute` runs them.

  python benchmarks/precompute.py --batch=4 --steps=2

Prints per component: XLA's FLOPs per image (cost analysis of the compiled function), compile time, seconds per batch
and images/s; then the host-side JPEG decode + ADM centre crop rate of one core (PIL).
"""
import io
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from repa_jax.data.precompute import compute_fn
from repa_jax.data.sources import center_crop
from repa_jax.models import dinov2, sd_vae
from repa_jax.models.network import Network, as_network
from repa_jax.specs.sharding import replicated

_BATCH = flags.DEFINE_integer("batch", 4, "Images per batch.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed batches per component (after compilation).")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Image resolution (DINOv2 sees 224 px per 256 px).")


def random_model(build) -> nnx.Module:
  """The module `build()` with N(0, 0.02) float32 parameters, drawn in NumPy (no per-parameter init compilation)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape, np.float32)), abstract)
  return nnx.merge(graphdef, state)


def time_function(name: str, fn, params, images: np.ndarray) -> float:
  """Compiles fn(params, images), times _STEPS calls; prints and returns images/s."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(params, images).compile()
  compile_seconds = time.perf_counter() - start
  flops = compiled.cost_analysis().get("flops", float("nan")) / len(images)
  seconds = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, images))
    seconds.append(time.perf_counter() - start)
  rate = len(images) / np.median(seconds)
  print(f"{name:28s} {flops / 1e9:7.1f} GFLOP/img  compile {compile_seconds:5.1f} s  "
        f"{np.median(seconds):6.2f} s/batch of {len(images)}  {rate:6.2f} img/s  ({rate * flops / 1e9:5.1f} GFLOP/s)")
  return rate


def crop_rate(resolution: int, count: int = 20) -> float:
  """Images/s of one core decoding a 500 x 375 JPEG (ImageNet's typical size) and ADM-centre-cropping it."""
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), np.uint8)).save(buffer, "JPEG")
  start = time.perf_counter()
  for _ in range(count):
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
      center_crop(image.convert("RGB"), resolution)
  return count / (time.perf_counter() - start)


def main(argv):
  del argv
  res = _RESOLUTION.value
  images = np.random.default_rng(1).integers(0, 256, (_BATCH.value, res, res, 3), np.uint8)
  print(f"{jax.devices()[0].platform}, {len(jax.devices())} device(s), batch {len(images)} at {res} px, float32")
  vae = random_model(lambda: sd_vae.SDVAE(sd_vae.SD_VAE, nnx.Rngs(0)))
  dino = random_model(lambda: dinov2.DinoV2(dinov2.SPECS["dinov2_vitb14"], nnx.Rngs(0)))
  count = lambda *modules: sum(x.size for x in jax.tree.leaves(nnx.state(modules, nnx.Param))) / 1e6
  print(f"SD-VAE encoder {count(vae.encoder, vae.quant_conv):.1f}M params, DINOv2-B {count(dino):.1f}M params")
  encode = as_network(vae, sd_vae.encode_uint8)
  autoencoder = Network(lambda params, x: dict(zip(("ae_mean", "ae_std"), encode.apply(params, x))), encode.params)
  encoder = as_network(dino, dinov2.encode)
  time_function("SD-VAE encode", encode.apply, encode.params, images)
  time_function("DINOv2-B encode", encoder.apply, encoder.params, images)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("devices",))
  compute, params = compute_fn(autoencoder, {"dinov2_vitb14": encoder}, mesh)
  params = jax.device_put(params, replicated(mesh))
  time_function("together (precompute)", compute, params, images)
  print(f"JPEG decode + ADM crop (PIL, 1 core): {crop_rate(res):.0f} img/s")


if __name__ == "__main__":
  app.run(main)
