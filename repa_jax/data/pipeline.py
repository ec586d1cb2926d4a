"""The input pipeline: grain over a TFDS feature dataset -> global, sharded train batches.

Global batch b is records [b * G, (b + 1) * G) of the seeded, per-epoch reshuffled, repeated dataset (G the global
batch); process p reads only its contiguous slice [b * G + p * L, b * G + (p + 1) * L) (L = G / process count), so the
global batch is the same whatever the number of processes. The iterator's state is one index, equal on every process.
"""
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from repa_jax.data.features import check_spec, dequantize_int8, open_features
from repa_jax.specs.data import dataset_requirement
from repa_jax.specs.model import aligned_encoders


def to_train_batch(records: dict, encoders: tuple[str, ...]) -> dict:
  """Stored fields (stacked records) -> the train step's batch; runs on device, so int8 is de-quantised there.

  Pixels (identity autoencoder, uint8) become latent_mean = x / 127.5 - 1; VAE moments and float16 features pass as
  is, and so do the encoders' class tokens ('class_tokens': {name: [B, width]}) where the records hold them (REG).
  """
  if "ae_pixels" in records:
    batch = {"latent_mean": records["ae_pixels"].astype(jnp.float32) / 127.5 - 1}
  else:
    batch = {"latent_mean": records["ae_mean"], "latent_std": records["ae_std"]}
  batch["label"] = records["label"].astype(jnp.int32)
  batch["features"] = {
      name: dequantize_int8(records[f"feat_{name}"], records[f"feat_{name}_scale"])
      if f"feat_{name}_scale" in records else records[f"feat_{name}"] for name in encoders}
  if any(f"cls_{name}" in records for name in encoders):
    batch["class_tokens"] = {name: records[f"cls_{name}"] for name in encoders}
  return batch


def process_batches(source, *, seed: int, global_batch: int, process_index: int, process_count: int,
                    fields: set[str]) -> grain.MapDataset:
  """This process's batches (dicts of stacked `fields`): batch b holds records [b*G + p*L, b*G + (p+1)*L) of the
  shuffled, repeated source; G = global_batch, L = G / process_count, p = process_index."""
  if global_batch % process_count:
    raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the {process_count} processes")
  return (grain.MapDataset.source(source).shuffle(seed=seed).repeat()
          .map(lambda record: {k: np.asarray(v) for k, v in record.items() if k in fields})
          .batch(global_batch // process_count))[process_index::process_count]


class FeatureBatches:
  """Iterator of global train batches from the feature dataset in config.data.directory (split config.data.split)."""

  def __init__(self, config: ml_collections.ConfigDict, sharding: NamedSharding, *, num_threads: int = 4,
               prefetch: int = 8):
    source, spec = open_features(config.data.directory, config.data.split)
    requirement = dataset_requirement(config)
    check_spec(spec, requirement)
    self.encoders = tuple(aligned_encoders(config))
    fields = {"label", "ae_pixels", "ae_mean", "ae_std"} | {f"feat_{n}" for n in self.encoders} | {
        f"feat_{n}_scale" for n in self.encoders} | {f"cls_{n}" for n in self.encoders if requirement.class_tokens}
    local = process_batches(source, seed=config.seed, global_batch=config.train.batch_size,
                            process_index=jax.process_index(), process_count=jax.process_count(), fields=fields)
    self._iterator = iter(local.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                                  prefetch_buffer_size=prefetch)))
    self._sharding = sharding
    self._to_train_batch = jax.jit(lambda records: to_train_batch(records, self.encoders), out_shardings=sharding)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    local = next(self._iterator)
    records = jax.tree.map(lambda x: jax.make_array_from_process_local_data(self._sharding, x), local)
    return self._to_train_batch(records)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)
