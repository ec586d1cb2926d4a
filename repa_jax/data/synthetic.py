"""The `synthetic` source: random latents, labels and encoder features of the configured shapes.

For throughput benchmarks and tests only. Batch `s` is a pure function of (seed, s), made on device directly in the
batch sharding, so resuming at step s reproduces the same batches.
"""
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from repa_jax.specs import rng
from repa_jax.specs.model import aligned_encoders, sit_spec


class SyntheticBatches:
  """Iterator of global batches {'latent_mean', 'latent_std', 'label', 'features'} (and 'class_tokens' with REG); its
  state is the next index."""

  def __init__(self, config: ml_collections.ConfigDict, sharding: NamedSharding):
    batch, spec = config.train.batch_size, sit_spec(config)
    encoders = aligned_encoders(config)
    key = rng.stream(config.seed, "synthetic_data")

    def make(index):
      keys = jax.random.split(jax.random.fold_in(key, index), 3 + len(encoders))
      shape = (batch, *config.data.latent_shape)
      out = {
          "latent_mean": jax.random.normal(keys[0], shape),
          "latent_std": 0.1 * jax.random.uniform(keys[1], shape),
          "label": jax.random.randint(keys[2], (batch,), 0, config.data.num_classes),
          "features": {name: jax.random.normal(k, (batch, spec.num_tokens, width))
                       for k, (name, width) in zip(keys[3:], encoders.items())},
      }
      if config.reg.weight:
        out["class_tokens"] = {name: jax.random.normal(jax.random.fold_in(k, 1), (batch, width))
                               for k, (name, width) in zip(keys[3:], encoders.items())}
      return out

    self._make = jax.jit(make, out_shardings=sharding)
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self._make(jnp.int32(self.index))
    self.index += 1
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])
