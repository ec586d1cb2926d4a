"""--mode=precompute: run the autoencoder and the encoders over an image source into a TFDS feature dataset.

Every process computes and writes the shards it owns (under `jit`, the batch split over its local devices), a re-run
keeps finished shards, and process 0 finalizes each split once all processes are done (exactly-once check by id).
"""
import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from repa_jax.data import encoder, features, sources
from repa_jax.data.pipeline import required_spec

Encode = Callable[[jax.Array], jax.Array]  # uint8 images [B, H, W, C] -> features [B, tokens, width]


def image_source(config: ml_collections.ConfigDict, split: str) -> sources.ImageSource:
  """The images of config.precompute.source ('fashion_mnist' | 'image_folder' | 'tfds:<name>'), the first
  config.precompute.limit of them when set."""
  p = config.precompute
  if p.source == "fashion_mnist":
    source = sources.fashion_mnist(split, p.source_dir or sources.FASHION_MNIST_DIRECTORY)
  elif p.source == "image_folder":
    source = sources.image_folder(f"{p.source_dir}/{split}", p.resolution)
  elif p.source.startswith("tfds:"):
    source = sources.tfds_images(p.source.removeprefix("tfds:"), split, p.source_dir or None, p.resolution or None)
  else:
    raise ValueError(f"config.precompute.source={p.source!r}: use 'fashion_mnist', 'image_folder' or 'tfds:<name>'")
  if p.limit and p.limit < len(source):
    return dataclasses.replace(source, num_examples=p.limit)
  return source


def encoder_config(config: ml_collections.ConfigDict, **overrides) -> encoder.EncoderConfig:
  """The training run of a project-trained encoder: the defaults, config.precompute.encoder_steps if set."""
  steps = {"steps": config.precompute.encoder_steps} if config.precompute.encoder_steps else {}
  return encoder.EncoderConfig(**steps, **overrides)


def load_encoder(name: str, config: ml_collections.ConfigDict) -> tuple[Encode, dict]:
  """(encode function, info) of a representation encoder named in config.align.encoders."""
  if name == "fmnist_vit":
    encode, info = encoder.load_or_train_encoder(config.precompute.encoder_dir, encoder_config(config), name=name,
                                                 directory=config.precompute.source_dir or
                                                 sources.FASHION_MNIST_DIRECTORY)
    return (lambda images: encode(images)[0]), info
  raise ValueError(f"encoder {name!r} in config.align.encoders cannot be precomputed here: available: 'fmnist_vit'")


def autoencoder_outputs(name: str, images: jax.Array) -> dict:
  """Stored autoencoder fields of uint8 images [B, H, W, C]: the pixels themselves for 'identity'."""
  if name == features.IDENTITY_AUTOENCODER:
    return {"ae_pixels": images}
  raise ValueError(f"config.data.autoencoder={name!r} cannot be precomputed here: available: 'identity'")


def compute_fn(config: ml_collections.ConfigDict, encoders: dict[str, Encode], mesh: Mesh):
  """Jitted uint8 images [B, H, W, C] -> stored fields, the batch split over the local devices of `mesh`."""
  batch_sharding = NamedSharding(mesh, P("devices"))

  def compute(images):
    out = autoencoder_outputs(config.data.autoencoder, images)
    out.update({f"feat_{name}": encode(images).astype(jnp.float32) for name, encode in encoders.items()})
    return out

  return jax.jit(compute, in_shardings=batch_sharding, out_shardings=batch_sharding)


def shard_records(source: sources.ImageSource, ids: range, compute, batch_size: int, num_devices: int,
                  progress: tqdm) -> Iterator[dict]:
  """Records of the source ids `ids`, computed batch by batch (the last batch padded to the device count)."""
  for start in range(ids.start, ids.stop, batch_size):
    chunk = [source[i] for i in range(start, min(start + batch_size, ids.stop))]
    images = np.stack([item["image"] for item in chunk])
    padding = [(0, -len(chunk) % num_devices)] + [(0, 0)] * (images.ndim - 1)
    outputs = jax.device_get(compute(np.pad(images, padding, mode="edge")))
    for k, item in enumerate(chunk):
      yield {"id": item["id"], "label": item["label"], **{name: value[k] for name, value in outputs.items()}}
    progress.update(len(chunk))


def precompute(config: ml_collections.ConfigDict) -> None:
  """Writes the feature dataset of `config` (config.data.directory) for every split in config.precompute.splits."""
  p = config.precompute
  encoders, infos = {}, {}
  for name, width in (config.align.encoders if config.align.weight else ()):
    encoders[name], infos[name] = load_encoder(name, config)
    if infos[name]["width"] != width:
      raise ValueError(f"encoder {name!r} is {infos[name]['width']} wide but config.align.encoders says {width}: "
                       f"set it to {infos[name]['width']}")
  required = required_spec(config)
  spec = features.FeatureSpec(
      **{**required.to_dict(), "quantize": p.quantize, "source": f"{p.source} {p.source_dir}".strip(),
         "preprocessing": "; ".join([f"autoencoder {config.data.autoencoder}"] +
                                    [f"{n}: {info['preprocessing']}" for n, info in infos.items()])})
  local_devices = jax.local_devices()
  compute = compute_fn(config, encoders, Mesh(np.asarray(local_devices), ("devices",)))
  for split in p.splits:
    source = image_source(config, split)
    pending = features.pending_shards(config.data.directory, split, p.num_shards, jax.process_index(),
                                      jax.process_count())
    total = sum(len(features.shard_range(len(source), s, p.num_shards)) for s in pending)
    with tqdm(total=total, desc=f"precompute {split}", unit="img", disable=jax.process_index() != 0) as progress:
      for shard in pending:
        ids = features.shard_range(len(source), shard, p.num_shards)
        features.write_shard(config.data.directory, spec, split, shard, p.num_shards,
                             shard_records(source, ids, compute, p.batch_size, len(local_devices), progress))
    multihost_utils.sync_global_devices(f"precompute {split} written")
    if jax.process_index() == 0:
      features.finalize(config.data.directory, split, len(source))
    multihost_utils.sync_global_devices(f"precompute {split} finalized")
