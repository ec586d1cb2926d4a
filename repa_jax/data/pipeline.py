"""The input pipeline: grain over a TFDS feature dataset -> global, sharded train batches.

Global batch b is records [b * G, (b + 1) * G) of the seeded, per-epoch reshuffled, repeated dataset (G the global
batch); a process reads only the rows b * G + r that its devices hold in the batch sharding (`process_rows`: the slice
[p * L, (p + 1) * L) when the mesh lists devices in process order, L = G / process count; any rows under a
topology-aware mesh), so the global batch is the same whatever the number of processes and the device order. The
iterator's state is one index, equal on every process.
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


def process_rows(sharding: NamedSharding, global_batch: int, devices=None) -> np.ndarray:
  """[L] int, ascending: the rows of a global batch of `global_batch` that `devices` (default: this process's) hold
  under `sharding`, i.e. the local batch that jax.make_array_from_process_local_data expects."""
  devices = set(sharding.addressable_devices if devices is None else devices)
  rows = np.arange(global_batch)
  index_map = sharding.devices_indices_map((global_batch,))
  return np.unique(np.concatenate([rows[index[0]] for device, index in index_map.items() if device in devices]))


def process_batches(source, *, seed: int, global_batch: int, rows: np.ndarray, fields: set[str]) -> grain.MapDataset:
  """This process's batches (dicts of stacked `fields`): batch b holds records b * G + rows of the shuffled, repeated
  source (G = global_batch; rows [L] from `process_rows`)."""
  records = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  local = len(rows)
  return (grain.MapDataset.range(len(records) // global_batch * local)
          .map(lambda k: records[k // local * global_batch + int(rows[k % local])])
          .map(lambda record: {k: np.asarray(v) for k, v in record.items() if k in fields})
          .batch(local))


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
                            rows=process_rows(sharding, config.train.batch_size), fields=fields)
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
