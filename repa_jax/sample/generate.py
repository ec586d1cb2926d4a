"""--mode=sample: EMA parameters of a checkpoint -> N samples (decoded by the SD-VAE for latent models) -> an
ADM-format .npz and a PNG grid.

Deterministic for config.sample.seed whatever the device count (chunk i draws its noise from
fold_in(rng.stream(seed, 'sample_noise'), i), the labels are drawn up front), and resumable: finished chunks are kept
on disk and skipped by a re-run.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from PIL import Image, ImageDraw
from tqdm import tqdm

from repa_jax.convert import pretrained
from repa_jax.data.features import IDENTITY_AUTOENCODER
from repa_jax.data.sources import FASHION_MNIST_CLASS_NAMES
from repa_jax.models.network import Network
from repa_jax.models.repa_sit import abstract_params, sit_graphdef
from repa_jax.sample.samplers import Guidance, sample
from repa_jax.specs import rng, sharding
from repa_jax.specs.model import model_spec
from repa_jax.train import checkpoint

LABEL_MODES = ("uniform", "balanced")
GRID_FILE = "grid.png"


def sample_labels(config: ml_collections.ConfigDict, num: int) -> np.ndarray:
  """[num] int32 labels: uniform random from config.sample.seed, or class-balanced (0, 1, ..., K-1, 0, ...)."""
  classes = config.data.num_classes
  if config.sample.labels == "uniform":
    key = rng.stream(config.sample.seed, "sample_labels")
    return np.asarray(jax.random.randint(key, (num,), 0, classes), np.int32)
  if config.sample.labels == "balanced":
    return np.arange(num, dtype=np.int32) % classes
  raise ValueError(f"config.sample.labels={config.sample.labels!r}: use one of {LABEL_MODES}")


def to_uint8(x: jax.Array) -> jax.Array:
  """Pixels in [-1, 1] -> uint8 clip(255 (x + 1) / 2), rounded."""
  return jnp.clip(jnp.round(255 * (x + 1) / 2), 0, 255).astype(jnp.uint8)


def pixel_decoder(config: ml_collections.ConfigDict, *, abstract: bool = False) -> Network:
  """Network: SiT-space latents / config.data.latent_scale [B, h, w, c] -> pixels [B, H, W, C] in [-1, 1]: the
  identity for pixel-space models, else the SD-VAE decoder (config.sample.decoder_weights, sd-vae-ft-ema); abstract:
  its parameters as ShapeDtypeStructs, no weights read (for compiling ahead of time)."""
  if config.data.autoencoder == IDENTITY_AUTOENCODER:
    return Network(lambda _, x: x, ())
  return pretrained.vae_decoder(config, abstract=abstract)


def sampler_program(config: ml_collections.ConfigDict, mesh: Mesh, decode):
  """Jitted (decoder params, SiT params, noise [B, h, w, c], labels [B], key) -> uint8 images [B, H, W, C], the batch
  over all devices, the parameters replicated (with REG the class token is sampled jointly and dropped); `decode` is
  a pixel decoder's apply (`pixel_decoder`). What `make_sampler` runs, and what benchmarks/tpu_compile.py compiles."""
  s, spec = config.sample, model_spec(config)
  graphdef = sit_graphdef(spec)
  guidance = None if s.cfg_scale == 1.0 else Guidance(s.cfg_scale, config.data.num_classes, s.guidance_low,
                                                      s.guidance_high)
  if s.batch_size % mesh.size:
    raise ValueError(f"config.sample.batch_size={s.batch_size} (config.evaluate.batch_size in training) is not "
                     f"divisible by the {mesh.size} devices: use a multiple of {mesh.size}")

  def generate(decoder_params, params, noise, labels, key):
    sit = nnx.merge(graphdef, params)
    velocity = lambda x, t, y: sit(x, t, y)[0]
    state = noise
    if e := spec.sit.class_token_dim:  # REG: the class token is generated jointly, from its own noise
      key, cls_key = jax.random.split(key)
      state = (noise, jax.random.normal(cls_key, (noise.shape[0], e), noise.dtype))
    x = sample(s.sampler, velocity, state, labels, key, s.steps, config.flow.path, guidance)
    x = x[0] if spec.sit.class_token_dim else x
    return to_uint8(decode(decoder_params, x / config.data.latent_scale))

  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(generate, in_shardings=(replicated, replicated, batch, batch, None), out_shardings=batch)


def make_sampler(config: ml_collections.ConfigDict, mesh: Mesh):
  """`sampler_program` with `pixel_decoder`'s weights bound in (replicated): (SiT params, noise, labels, key) ->
  uint8 images."""
  decoder = pixel_decoder(config)
  return functools.partial(sampler_program(config, mesh, decoder.apply),
                           jax.device_put(decoder.params, sharding.replicated(mesh)))


def load_sit_ema(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, step: int | None = None):
  """(SiT EMA parameters replicated on `mesh`, step) from a checkpoint, reading nothing else."""
  abstract = abstract_params(model_spec(config))
  replicated = sharding.replicated(mesh)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
  params, step = checkpoint.restore_ema_params(workdir, target, config, step)
  return params["sit"], step


def generate_images(config: ml_collections.ConfigDict, params, num: int, sampler, chunk_dir: epath.Path | None = None,
                    show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [num, H, W, C], labels [num]) in chunks of config.sample.batch_size; chunks found in `chunk_dir`
  are reused, new ones saved there."""
  s, shape = config.sample, tuple(config.data.latent_shape)
  labels, key = sample_labels(config, num), rng.stream(s.seed, "sample_noise")
  images = []
  for i, start in enumerate(tqdm(range(0, num, s.batch_size), disable=not show_progress, desc="sample", unit="chunk")):
    path = chunk_dir / f"chunk_{i:05d}.npy" if chunk_dir else None
    if path and path.exists():
      images.append(np.load(path))
      continue
    chunk_key = jax.random.fold_in(key, i)
    noise = jax.random.normal(jax.random.fold_in(chunk_key, 0), (s.batch_size, *shape))
    chunk_labels = np.resize(labels[start:start + s.batch_size], s.batch_size)  # the last chunk padded
    chunk = np.asarray(jax.device_get(sampler(params, noise, chunk_labels, jax.random.fold_in(chunk_key, 1))))
    chunk = chunk[:min(s.batch_size, num - start)]
    if path and jax.process_index() == 0:
      np.save(path, chunk)
    images.append(chunk)
  return np.concatenate(images), labels


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows * H, columns * W, C] grid (empty cells black)."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  padded = np.concatenate([images, np.zeros((rows * columns - n, h, w, c), np.uint8)])
  return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def class_grid(images: np.ndarray, labels: np.ndarray, rows: int = 10, columns: int = 10, zoom: int = 2,
               class_names: tuple[str, ...] | None = None) -> np.ndarray:
  """uint8 [N, H, W, C] samples with labels [N] -> one uint8 RGB grid: a row per class (the `rows` smallest labels
  present), its first `columns` samples, each pixel repeated `zoom` times, the class name (or number) on the left."""
  classes = np.unique(labels)[:rows]
  _, h, w, c = images.shape
  cells = [[images[i] for i in np.flatnonzero(labels == k)[:columns]] for k in classes]
  blank = np.zeros((h, w, c), np.uint8)
  grid = image_grid(np.stack([cell for row in cells for cell in row + [blank] * (columns - len(row))]), columns)
  grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
  grid = np.repeat(grid, 3, axis=-1) if c == 1 else grid
  margin = 90
  canvas = Image.new("RGB", (margin + grid.shape[1], grid.shape[0]), "white")
  canvas.paste(Image.fromarray(grid), (margin, 0))
  draw = ImageDraw.Draw(canvas)
  for row, k in enumerate(classes):
    name = class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"
    draw.text((4, row * h * zoom + h * zoom // 2 - 6), name, fill="black")
  return np.asarray(canvas)


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The class names of config.precompute.source, when known (Fashion-MNIST)."""
  return FASHION_MNIST_CLASS_NAMES if config.precompute.source == "fashion_mnist" else None


def save_png(path: epath.Path, grid: np.ndarray) -> None:
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def output_dir(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> epath.Path:
  """<workdir>/samples/<step>_<sampler><steps>_cfg<scale>[_t<low>-<high>]_seed<seed> (the guidance interval named when
  guidance is on and the interval is not [0, 1]); step None = config.sample.checkpoint_step, None there = the newest
  checkpoint's."""
  s = config.sample
  step = step if step is not None else s.checkpoint_step
  step = checkpoint.latest_step(workdir) if step is None else step
  interval = (f"_t{s.guidance_low}-{s.guidance_high}"
              if s.cfg_scale != 1.0 and (s.guidance_low, s.guidance_high) != (0.0, 1.0) else "")
  return epath.Path(workdir) / "samples" / f"{step}_{s.sampler}{s.steps}_cfg{s.cfg_scale}{interval}_seed{s.seed}"


def samples_to_evaluate(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
  """The samples.npz that `generate` wrote for config.sample.checkpoint_step, or, when that is None, for the newest
  checkpoint that has samples of this sampler setting (sampling falls back past an unreadable newest checkpoint);
  a warning names the newer checkpoints without them."""
  if config.sample.checkpoint_step is not None:
    return output_dir(config, workdir) / "samples.npz"
  steps = checkpoint.all_steps(workdir) or [checkpoint.latest_step(workdir)]  # latest_step: the error when none
  for step in reversed(steps):
    path = output_dir(config, workdir, step) / "samples.npz"
    if path.exists():
      if step != steps[-1]:
        logging.warning("evaluating the samples of checkpoint %d: the newer checkpoints %s have none of this sampler "
                        "setting (run --mode=sample to sample them)", step, [s for s in steps if s > step])
      return path
  return output_dir(config, workdir, steps[-1]) / "samples.npz"  # none sampled yet: evaluate names it and the fix


def generate(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
  """Writes <workdir>/samples/<step>/samples.npz (ADM format: uint8 NHWC arr_0, labels arr_1) and grid.png (a row of
  samples per class)."""
  s = config.sample
  mesh = sharding.data_mesh()
  params, step = load_sit_ema(config, workdir, mesh, s.checkpoint_step)
  out_dir = output_dir(config, workdir, step)
  (out_dir / "chunks").mkdir(parents=True, exist_ok=True)
  images, labels = generate_images(config, params, s.num_samples, make_sampler(config, mesh), out_dir / "chunks",
                                   show_progress=jax.process_index() == 0)
  if jax.process_index() == 0:
    np.savez(out_dir / "samples.npz", arr_0=images, arr_1=labels)
    save_png(out_dir / GRID_FILE, class_grid(images, labels, class_names=class_names(config)))
  return out_dir / "samples.npz"
