"""--mode=precompute: run the autoencoder and the encoders over an image source into a TFDS feature dataset.

Every process computes and writes the shards it owns (under `jit`, the batch split over its local devices), a re-run
keeps finished shards, and process 0 finalizes each split once all processes are done (exactly-once check by id).
"""
import dataclasses
import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from repa_jax.convert import pretrained
from repa_jax.data import feature_writer, features, sources
from repa_jax.models import dinov2, supervised
from repa_jax.models.network import Network
from repa_jax.specs import sharding
from repa_jax.specs.data import check_encoder_features, dataset_requirement
from repa_jax.specs.model import aligned_encoders

DINOV2_PREPROCESSING = ("uint8 / 255, ImageNet mean/std, torch bicubic (no antialias) to 224 px per 256 px, patch "
                        "tokens after the final LayerNorm (REPA's)")


def image_source(config: ml_collections.ConfigDict, split: str) -> sources.ImageSource:
  """The images of config.precompute.source ('fashion_mnist' | 'image_folder' | 'tfds:<name>'), the first
  config.precompute.limit of them when set."""
  p = config.precompute
  if p.source == "fashion_mnist":
    source = sources.fashion_mnist(split, p.source_dir or sources.FASHION_MNIST_DIRECTORY)
  elif p.source == "image_folder":
    if p.resolution is None:
      raise ValueError("config.precompute.source='image_folder' needs config.precompute.resolution (the ADM centre "
                       "crop's size, e.g. 256)")
    source = sources.image_folder(f"{p.source_dir}/{split}", p.resolution)
  elif p.source.startswith("tfds:"):
    source = sources.tfds_images(p.source.removeprefix("tfds:"), split, p.source_dir or None, p.resolution)
  else:
    raise ValueError(f"config.precompute.source={p.source!r}: use 'fashion_mnist', 'image_folder' or 'tfds:<name>'")
  if p.limit is not None and p.limit < len(source):
    return dataclasses.replace(source, num_examples=p.limit)
  return source


def encoder_config(config: ml_collections.ConfigDict, **overrides) -> supervised.EncoderConfig:
  """The training run of a project-trained encoder: the defaults, config.precompute.encoder_steps if set."""
  steps = {"steps": config.precompute.encoder_steps} if config.precompute.encoder_steps is not None else {}
  return supervised.EncoderConfig(**steps, **overrides)


def fashion_mnist_splits(config: ml_collections.ConfigDict):
  """`load_split(split) -> (uint8 images [N, 28, 28, 1], labels [N])` of Fashion-MNIST in config.precompute.source_dir
  (default: the Debian package's directory), for the networks the project trains on it."""
  return functools.partial(sources.fashion_mnist_arrays,
                           directory=config.precompute.source_dir or sources.FASHION_MNIST_DIRECTORY)


def load_encoder(name: str, config: ml_collections.ConfigDict, *, abstract: bool = False) -> tuple[Network, dict]:
  """(Network: uint8 images [B, H, W, C] -> {'patch_tokens': [B, tokens, width], 'class_token': [B, width]}, info)
  of an encoder in config.align.encoders: 'fmnist_vit' (project-trained, cached; its class token is the token its
  head reads, `pooled`) or a DINOv2 ('dinov2_vit{s,b,l,g}14' or '..._reg', x_norm_clstoken; weights from
  config.precompute.encoder_weights[name]; abstract: ShapeDtypeStruct parameters, for compiling ahead of time)."""
  if name in dinov2.SPECS:
    network, spec = pretrained.dinov2_encoder(config, name, abstract=abstract)
    return network, {"width": spec.width, "preprocessing": DINOV2_PREPROCESSING}
  if name == "fmnist_vit" and not abstract:
    encode, info = supervised.load_or_train_encoder(config.precompute.encoder_dir, encoder_config(config), name=name,
                                                    load_split=fashion_mnist_splits(config))
    def tokens(_, images):
      out = encode(images)
      return {"patch_tokens": out["patch_tokens"], "class_token": out["pooled"]}
    return Network(tokens, ()), info
  available = list(dinov2.SPECS) if abstract else ["fmnist_vit", *dinov2.SPECS]  # fmnist_vit is trained, not built
  raise ValueError(f"encoder {name!r} in config.align.encoders cannot be precomputed here"
                   f"{' ahead of time' if abstract else ''}: available: {', '.join(map(repr, available))}")


def load_autoencoder(config: ml_collections.ConfigDict, *, abstract: bool = False) -> Network:
  """Network: uint8 images [B, H, W, C] -> the stored autoencoder fields of config.data.autoencoder: the pixels
  ('ae_pixels') for 'identity', the posterior 'ae_mean' and 'ae_std' [B, H / 8, W / 8, 4] for an SD-VAE (weights from
  config.precompute.autoencoder_weights; abstract: ShapeDtypeStruct parameters)."""
  if config.data.autoencoder == features.IDENTITY_AUTOENCODER:
    return Network(lambda _, images: {"ae_pixels": images}, ())
  if config.data.autoencoder in pretrained.SD_VAES:
    vae = pretrained.vae_encoder(config, abstract=abstract)
    return Network(lambda params, images: dict(zip(("ae_mean", "ae_std"), vae.apply(params, images))), vae.params)
  raise ValueError(f"config.data.autoencoder={config.data.autoencoder!r} cannot be precomputed here: available: "
                   f"'identity', {', '.join(repr(n) for n in pretrained.SD_VAES)}")


def compute_fn(autoencoder: Network, encoders: dict[str, Network], mesh: Mesh, class_tokens: bool = False):
  """(jitted `compute(params, uint8 images [B, H, W, C]) -> stored fields`, its params, not yet placed): the batch
  split over the devices of `mesh`, the weights replicated (`sharding.replicated(mesh)`); the encoders' class tokens
  too if `class_tokens`."""
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  def compute(params, images):
    autoencoder_params, encoder_params = params
    out = autoencoder.apply(autoencoder_params, images)
    for name, net in encoders.items():
      tokens = net.apply(encoder_params[name], images)
      out[f"feat_{name}"] = tokens["patch_tokens"].astype(jnp.float32)
      if class_tokens:
        out[f"cls_{name}"] = tokens["class_token"].astype(jnp.float32)
    return out

  params = (autoencoder.params, {name: net.params for name, net in encoders.items()})
  return jax.jit(compute, in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding), params


def check_output_shapes(config: ml_collections.ConfigDict, spec: features.FeatureSpec, shapes: dict) -> None:
  """Refuses networks whose outputs (`shapes`: field -> [B, ...]) differ from the FeatureSpec the config needs."""
  res = f"config.precompute.resolution={config.precompute.resolution}"
  for name, _, _ in spec.encoders:
    check_encoder_features(name, *shapes[f"feat_{name}"][1:], dataset_requirement(config), f"at {res}")
  for name, shape in shapes.items():
    if name.startswith("ae_") and tuple(shape[1:]) != spec.latent_shape:
      raise ValueError(f"autoencoder {config.data.autoencoder!r} gives {name} {tuple(shape[1:])} at {res}, but "
                       f"config.data.latent_shape={spec.latent_shape}: set it to {tuple(shape[1:])}")


def shard_records(source: sources.ImageSource, ids: range, compute, batch_size: int, num_devices: int,
                  progress: tqdm, pool: ThreadPoolExecutor) -> Iterator[dict]:
  """Records of the source ids `ids`, computed batch by batch (the last batch padded to the device count). The `pool`
  threads decode and crop the next batch's images while the devices compute this one."""
  def load(start):  # submits every image of the batch now; the iterator yields them in order
    return pool.map(source.__getitem__, range(start, min(start + batch_size, ids.stop)))

  starts = range(ids.start, ids.stop, batch_size)
  loading = load(starts[0]) if starts else iter(())
  for k, start in enumerate(starts):
    chunk = list(loading)
    if k + 1 < len(starts):
      loading = load(starts[k + 1])
    images = np.stack([item["image"] for item in chunk])
    padding = [(0, -len(chunk) % num_devices)] + [(0, 0)] * (images.ndim - 1)
    outputs = jax.device_get(compute(np.pad(images, padding, mode="edge")))
    for i, item in enumerate(chunk):
      yield {"id": item["id"], "label": item["label"], **{name: value[i] for name, value in outputs.items()}}
    progress.update(len(chunk))


def precompute(config: ml_collections.ConfigDict) -> None:
  """Writes the feature dataset of `config` (config.data.directory) for every split in config.precompute.splits."""
  p = config.precompute
  encoders, infos = {}, {}
  for name, width in aligned_encoders(config).items():
    encoders[name], infos[name] = load_encoder(name, config)
    if infos[name]["width"] != width:
      raise ValueError(f"encoder {name!r} is {infos[name]['width']} wide but config.align.encoders says {width}: "
                       f"set it to {infos[name]['width']}")
  requirement = dataset_requirement(config)
  crop = [f"ADM centre crop to {p.resolution} px"] if p.resolution is not None else []
  spec = features.FeatureSpec(
      **dataclasses.asdict(requirement), quantize=p.quantize, source=f"{p.source} {p.source_dir}".strip(),
      preprocessing="; ".join(crop + [f"autoencoder {config.data.autoencoder}"] +
                              [f"{n}: {info['preprocessing']}" for n, info in infos.items()]))
  local_devices = jax.local_devices()
  mesh = sharding.data_mesh(local_devices)
  compute, params = compute_fn(load_autoencoder(config), encoders, mesh, spec.class_tokens)
  params = jax.device_put(params, sharding.replicated(mesh))
  for split in p.splits:
    source = image_source(config, split)
    if None not in source.image_shape:
      image = jax.ShapeDtypeStruct((len(local_devices), *source.image_shape), jnp.uint8)
      check_output_shapes(config, spec, {k: v.shape for k, v in jax.eval_shape(compute, params, image).items()})
    pending = feature_writer.pending_shards(config.data.directory, split, p.num_shards, jax.process_index(),
                                            jax.process_count(), verify=p.verify)
    total = sum(len(feature_writer.shard_range(len(source), s, p.num_shards)) for s in pending)
    with (tqdm(total=total, desc=f"precompute {split}", unit="img", disable=jax.process_index() != 0) as progress,
          ThreadPoolExecutor(p.workers) as pool):
      for shard in pending:
        ids = feature_writer.shard_range(len(source), shard, p.num_shards)
        feature_writer.write_shard(config.data.directory, spec, split, shard, p.num_shards,
                             shard_records(source, ids, functools.partial(compute, params), p.batch_size,
                                           len(local_devices), progress, pool))
    multihost_utils.sync_global_devices(f"precompute {split} written")
    if jax.process_index() == 0:
      feature_writer.finalize(config.data.directory, split, len(source))
    multihost_utils.sync_global_devices(f"precompute {split} finalized")
