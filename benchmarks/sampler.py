"""Sampler throughput: seconds per model evaluation of the jitted SiT samplers (random weights, float32).

  python benchmarks/sampler.py --config=configs/imagenet.py:model=B/2 --batch=4 --steps=50
  python benchmarks/sampler.py --config=configs/tiny.py --batch=4 --steps=50

Times whole sampling runs (noise -> latents, no VAE decode) of Euler ODE, Euler ODE with CFG 1.5 (the batch doubled
inside the guidance interval [0, 1], i.e. at every step) and the Euler-Maruyama SDE, after one untimed compile+run.
The reference is the official PyTorch sampler on this machine kind (float32, 2 threads, SiT-B/2, batch 4, 50 steps):
1.19 s per evaluation (Euler ODE), 2.48 s (CFG 1.5), 1.12 s (SDE), 0.98 s (ODE with fused attention).
"""
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from repa_jax.specs.model import model_spec, sit_spec
from repa_jax.models.sit import SiT
from repa_jax.sample.samplers import Guidance, sample

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/imagenet.py:model=B/2.")
_BATCH = flags.DEFINE_integer("batch", 4, "Samples per run.")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps (= model evaluations for these samplers).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per sampler.")
flags.mark_flags_as_required(["config"])

PYTORCH_SECONDS_PER_EVALUATION = {"euler": 1.19, "euler_cfg1.5": 2.48, "sde": 1.12}


def main(argv):
  del argv
  config = _CONFIG.value
  spec = sit_spec(config)
  graphdef, params = nnx.split(SiT(spec, nnx.Rngs(0), dtype=model_spec(config).compute_dtype))
  noise = jax.random.normal(jax.random.key(1), (_BATCH.value, *config.data.latent_shape))
  labels = jnp.arange(_BATCH.value, dtype=jnp.int32) % spec.num_classes
  guidance = Guidance(1.5, spec.num_classes)
  print(f"{config.model.name} depth {spec.depth} width {spec.width} tokens {spec.num_tokens} batch {_BATCH.value} "
        f"steps {_STEPS.value} dtype {config.model.dtype} devices {jax.device_count()}")
  for name, sampler, cfg in (("euler", "euler", None), ("euler_cfg1.5", "euler", guidance), ("sde", "sde", None)):
    def run(params, noise, labels, key, sampler=sampler, cfg=cfg):
      sit = nnx.merge(graphdef, params)
      return sample(sampler, lambda x, t, y: sit(x, t, y)[0], noise, labels, key, _STEPS.value, config.flow.path, cfg)

    run = jax.jit(run)
    start = time.perf_counter()
    run(params, noise, labels, jax.random.key(2)).block_until_ready()
    first = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      run(params, noise, labels, jax.random.key(2)).block_until_ready()
      times.append(time.perf_counter() - start)
    per_eval = statistics.median(times) / _STEPS.value
    reference = PYTORCH_SECONDS_PER_EVALUATION.get(name)
    ratio = f" | PyTorch/repa_jax time {reference / per_eval:.2f}" if reference and config.model.name == "B/2" else ""
    print(f"{name:13s} {per_eval * 1e3:.1f} ms per evaluation ({_BATCH.value / per_eval / _STEPS.value:.3f} samples/s) "
          f"| compile+first run {first:.1f} s{ratio}", flush=True)


if __name__ == "__main__":
  app.run(main)
