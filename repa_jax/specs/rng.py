"""Random streams by purpose: each draw of a run starts from `stream(seed, purpose)` and then folds in its own
index (the step, the chunk), so that no two purposes ever share a key."""
import jax

PURPOSES = ("init", "train", "sample_noise", "sample_labels", "synthetic_data")


def stream(seed: int, purpose: str) -> jax.Array:
  """The key of `purpose` (one of PURPOSES) for a run of `seed`: fold_in(key(seed), PURPOSES.index(purpose))."""
  if purpose not in PURPOSES:
    raise ValueError(f"random stream {purpose!r}: use one of {PURPOSES}")
  return jax.random.fold_in(jax.random.key(seed), PURPOSES.index(purpose))
