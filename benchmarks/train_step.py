"""Throughput of the jitted, sharded train step on synthetic data (compile time, step time, memory, FLOPs).

  python benchmarks/train_step.py --config=configs/imagenet.py:model=B/2,reg=repa --batch=8 --steps=5
  python benchmarks/train_step.py --config=configs/tiny.py --batch=8 --steps=5 --config.model.dtype=bfloat16
  python benchmarks/train_step.py --config=configs/fashion_mnist.py --batch=32 --config.model.remat=none  # vs 'dots'

The mesh, state, optimizer, batches and the jitted step are built by the same library functions as
`repa_jax.train.loop.train` (data.source is forced to 'synthetic'; the batch is config.train.batch_size = --batch).
Only the train step is timed: each timed step gets a batch made (and finished) beforehand.
"""
import os
import pathlib
import resource
import statistics
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks/
from benchmarks.flops import analytic_flops  # noqa: E402
from repa_jax.specs import sharding  # noqa: E402
from repa_jax.specs.model import aligned_encoders, dispersive_blocks, sit_spec  # noqa: E402
from repa_jax.train.loop import make_batches  # noqa: E402
from repa_jax.train.state import abstract_state, init_state, make_optimizer  # noqa: E402
from repa_jax.train.step import jit_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/imagenet.py:model=B/2.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch size (sets config.train.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "If set, write a jax.profiler trace of the timed steps here (also as Perfetto JSON, "
    "plugins/profile/*/*.trace.json.gz, readable without TensorBoard; XLA:CPU's per-op events need "
    "XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true).")
flags.mark_flags_as_required(["config"])


def xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else None
  return None if not analysis else analysis.get("flops")


def fmt_flops(x: float | None) -> str:
  return "n/a" if x is None else f"{x / 1e9:.3g} GFLOP"


def main(argv):
  del argv
  config = _CONFIG.value
  if _BATCH.value is not None:
    config.train.batch_size = _BATCH.value
  config.data.source = "synthetic"
  batch_size = config.train.batch_size
  spec = sit_spec(config)
  print(f"model {config.model.name}: depth {spec.depth} width {spec.width} heads {spec.num_heads} patch {spec.patch} "
        f"tokens {spec.num_tokens} input {spec.input_size}x{spec.in_channels} dtype {config.model.dtype} | "
        f"align weight {config.align.weight} block {config.align.block} encoders {tuple(config.align.encoders)} "
        f"projector {config.align.projector_dim} | disperse weight {config.disperse.weight}"
        f"{' blocks ' + str(dispersive_blocks(config)) if config.disperse.weight else ''} | "
        f"batch {batch_size} | devices {jax.devices()} | load average {os.getloadavg()}", flush=True)

  # As in repa_jax.train.loop.train: mesh, shardings, state, batches, jitted step with the same shardings/donation.
  mesh = sharding.config_mesh(config)
  sharding.check_batch_divisible(batch_size, mesh)
  tx = make_optimizer(config)
  abstract = abstract_state(config, tx)
  state_sharding = sharding.state_sharding(abstract, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  batches = make_batches(config, batch_sharding)
  state = init_state(config, tx, state_sharding)
  train_step = jit_train_step(config, mesh, state_sharding)
  num_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))

  batch = jax.block_until_ready(next(batches))
  tick = time.perf_counter()
  lowered = train_step.lower(state, batch)
  lower_s = time.perf_counter() - tick
  tick = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - tick

  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))

  times, cpu_times = [], []
  if _PROFILE_DIR.value:
    jax.profiler.start_trace(_PROFILE_DIR.value, create_perfetto_trace=True)
  for _ in range(_STEPS.value):
    batch = jax.block_until_ready(next(batches))
    tick, cpu_tick = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - tick)
    cpu_times.append(time.process_time() - cpu_tick)
  if _PROFILE_DIR.value:
    jax.profiler.stop_trace()
  loss = float(metrics["loss"])

  median, best = statistics.median(times), min(times)
  maxrss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  device_stats = jax.devices()[0].memory_stats()
  xla = xla_flops(compiled)
  analytic = analytic_flops(config)

  print(f"parameters (incl. projectors): {num_params / 1e6:.2f} M")
  print(f"compile: lower {lower_s:.2f} s + compile {compile_s:.2f} s = {lower_s + compile_s:.2f} s")
  print(f"step time over {len(times)} steps: median {median:.4f} s, min {best:.4f} s "
        f"(all: {', '.join(f'{t:.3f}' for t in times)}); final loss {loss:.4f}")
  print(f"process CPU time per step (user+sys, all threads): median {statistics.median(cpu_times):.4f} s "
        f"= {statistics.median(cpu_times) / median:.2f} cores busy on average; machine load average {os.getloadavg()}")
  print(f"throughput: {batch_size / median:.2f} images/s (median), {batch_size / best:.2f} images/s (best)")
  print(f"peak host memory (maxrss): {maxrss_gb:.2f} GiB")
  if device_stats:
    peak = device_stats.get("peak_bytes_in_use", device_stats.get("bytes_in_use", 0))
    print(f"device memory: peak {peak / 2**30:.2f} GiB ({device_stats})")
  else:
    print("device memory_stats: not available on this backend")
  # XLA's cost analysis counts the body of a lax.scan once, not once per trip: with the SiT blocks scanned it misses
  # (depth - 1) blocks of the forward and the backward pass, so only the analytic count gives a FLOP rate.
  print(f"FLOPs per step: XLA cost analysis {fmt_flops(xla)} (the scanned blocks counted once, not per block: a lower "
        f"bound); analytic fwd+bwd {fmt_flops(analytic['total'])} "
        f"({', '.join(f'{k} {fmt_flops(v)}' for k, v in analytic.items() if k != 'total')})")
  achieved = analytic["total"] / median
  print(f"achieved: {achieved / 1e9:.1f} GFLOP/s (analytic / median)")
  print(f"SUMMARY model={config.model.name} depth={spec.depth} width={spec.width} tokens={spec.num_tokens} "
        f"align={bool(aligned_encoders(config))} disperse={bool(dispersive_blocks(config))} dtype={config.model.dtype} "
        f"batch={batch_size} compile_s={lower_s + compile_s:.1f} step_median_s={median:.4f} step_min_s={best:.4f} "
        f"images_per_s={batch_size / median:.2f} cpu_s_per_step={statistics.median(cpu_times):.4f} maxrss_gib={maxrss_gb:.2f} "
        f"xla_gflop_scan_once={'n/a' if xla is None else f'{xla / 1e9:.4g}'} analytic_gflop={analytic['total'] / 1e9:.4g} "
        f"gflop_per_s={achieved / 1e9:.1f} loadavg_1m={os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
