"""Muon's Newton-Schulz iteration: repa_jax's on the Gram matrix (repa_jax/train/muon.py) against the written-out one
of optax.contrib.muon, on the Fashion-MNIST default's matrices, and the whole train step with either, side by side.

  python benchmarks/muon.py [--rounds=3]

Prints, per stacked block kernel [depth, in, out], the median milliseconds of both iterations (5 steps, float32; the
written-out one as optax.contrib.muon computes it) and the largest difference between their results relative to the
largest entry; then the train step of
configs/fashion_mnist.py:reg=repa (synthetic data) with repa_jax's Muon and with optax.contrib.muon configured alike
(interleaved rounds in one process). The 1-minute load average is printed at the start and the end.
"""
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from optax import contrib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root, for configs/
from benchmarks import side_by_side  # noqa: E402
from configs import fashion_mnist  # noqa: E402
from repa_jax.models.repa_sit import abstract_params  # noqa: E402
from repa_jax.specs.model import model_spec  # noqa: E402
from repa_jax.train import step as train_step_module  # noqa: E402
from repa_jax.train.muon import NS_COEFFS, orthogonalize  # noqa: E402
from repa_jax.train.state import MUON_RMS, learning_rate_schedule, muon_batch_axes  # noqa: E402

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds of the train-step comparison.")
NS_STEPS = 5


def written_out_iteration(x: jax.Array) -> jax.Array:
  """[..., m, n] -> NS_STEPS steps of X <- a X + (b A + c A^2) X, A = X X^T, from x / ||x||_F on the wide orientation
  (what optax.contrib.muon computes)."""
  wide = x.shape[-2] <= x.shape[-1]
  x = x if wide else jnp.swapaxes(x, -1, -2)
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)) + 1e-8)
  a, b, c = NS_COEFFS
  for _ in range(NS_STEPS):
    gram = x @ jnp.swapaxes(x, -1, -2)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else jnp.swapaxes(x, -1, -2)


def median_ms(fn, x, calls: int = 20, repeats: int = 5) -> float:
  fn(x).block_until_ready()
  times = []
  for _ in range(repeats):
    tick = time.perf_counter()
    for _ in range(calls):
      out = fn(x)
    out.block_until_ready()
    times.append((time.perf_counter() - tick) / calls)
  return 1e3 * float(np.median(times))


def optax_muon(config) -> optax.GradientTransformation:
  """The optimizer `state.make_optimizer` builds, with optax.contrib.muon's written-out iteration instead of ours."""
  t, lr = config.train, learning_rate_schedule(config)

  def dimensions(params):
    return jax.tree.map(lambda leaf, axes: None if axes is None else contrib.MuonDimensionNumbers(
        tuple(range(axes, leaf.ndim - 1)), leaf.ndim - 1), params, muon_batch_axes(params))

  muon = contrib.muon(lambda step: t.muon_lr_scale * lr(step), beta=t.muon_beta, ns_steps=t.muon_ns_steps, eps=t.eps,
                      weight_decay=t.weight_decay, consistent_rms=MUON_RMS, adam_learning_rate=lr, adam_b1=t.b1,
                      adam_b2=t.b2, adam_weight_decay=t.weight_decay, muon_weight_dimension_numbers=dimensions)
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), muon)


def main(_):
  config = fashion_mnist.get_config("reg=repa")
  config.data.source = "synthetic"
  print(f"1-minute load average at the start: {os.getloadavg()[0]:.2f}")
  written_out = jax.jit(written_out_iteration)
  gram = jax.jit(lambda x: orthogonalize(x, NS_STEPS))
  blocks = abstract_params(model_spec(config))["sit"]["blocks"]
  kernels = {"/".join(str(k.key) for k in path[:-1]): leaf.shape for path, leaf in
             jax.tree_util.tree_flatten_with_path(blocks)[0] if path[-2].key == "kernel"}
  totals = np.zeros(2)
  for name, shape in kernels.items():
    x = jax.random.normal(jax.random.key(0), shape)
    times = np.array([median_ms(written_out, x), median_ms(gram, x)])
    totals += times
    error = float(jnp.abs(written_out(x) - gram(x)).max() / jnp.abs(written_out(x)).max())
    print(f"{name:12s} {str(shape):16s} written-out {times[0]:6.2f} ms  Gram {times[1]:6.2f} ms  "
          f"({times[0] / times[1]:.2f}x, max difference {error:.1e})")
  print(f"all block kernels: written-out {totals[0]:.1f} ms, Gram {totals[1]:.1f} ms ({totals[0] / totals[1]:.2f}x)")

  sides = {"repa_jax Muon (Gram)": side_by_side.jax_step(config)}
  # The step and its state built with optax's Muon: the two modules' optimizer factory swapped for this side only.
  train_step_module.make_optimizer, side_by_side.make_optimizer = optax_muon, optax_muon
  sides["optax.contrib.muon"] = side_by_side.jax_step(config)
  medians = side_by_side.interleaved_medians(sides, steps=10, rounds=_ROUNDS.value, warmup=3)
  for side, seconds in medians.items():
    print(f"train step, {side}: {1e3 * seconds:.1f} ms")
  ratio = medians["optax.contrib.muon"] / medians["repa_jax Muon (Gram)"]
  print(f"ratio {ratio:.2f}x; 1-minute load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  app.run(main)
