"""Compiles the real train step for a TPU slice on this machine (no TPU needed) and reports what it would cost there.

  pip install -e ".[tpu-compile]"   # libtpu, the TPU compiler (212 MB)
  python benchmarks/tpu_compile.py --topology=v5p:4x4x2 --config=configs/imagenet.py:model=XL/2,reg=repa,res=256 \\
      --config.train.batch_size=256 --config.mesh.shape='(1,32)' [--async_collectives]

`jax.experimental.topologies.get_topology_desc` gives the devices of the slice; the step that `train()` runs
(`train/step.py:jit_train_step`, with the state and batch shardings of `specs/sharding.py` over those devices) is
lowered on ShapeDtypeStructs and compiled by libtpu's compiler. Printed: the per-chip argument / output / temporary
bytes of `compiled.memory_analysis()` against the chip's HBM, the compile time, every collective of the HLO with its
count and bytes per step (ops inside a `while` body, the scanned blocks, counted once per trip), and the analytic
FLOPs per chip with the MFU that --step_time_s would mean; then (--sampler) the sampler program of --mode=sample
(`sample/generate.py:sampler_program`, with the SD-VAE decoder for latent models) and (--precompute) the program of
--mode=precompute (the SD-VAE encoder and DINOv2 for one host's chips) compiled likewise, their memory. XLA's own
cost analysis counts a loop body once, so it is not used. Last line:
`SUMMARY topology=... chips=... hbm_gib=... argument_gib=... temp_gib=... fits=yes|no`.
"""
import collections
import math
import os
import re
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server here
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: several processes may load libtpu
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from absl.flags import FLAGS  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from benchmarks.flops import analytic_flops  # noqa: E402
from launch.tpu import ASYNC_COLLECTIVE_FLAGS  # noqa: E402
from repa_jax.data import precompute  # noqa: E402
from repa_jax.models.repa_sit import abstract_params  # noqa: E402
from repa_jax.sample.generate import pixel_decoder, sampler_program  # noqa: E402
from repa_jax.specs import rng, sharding  # noqa: E402
from repa_jax.specs.data import dataset_requirement  # noqa: E402
from repa_jax.specs.model import aligned_encoders, model_spec, sit_spec  # noqa: E402
from repa_jax.train.state import abstract_state, make_optimizer  # noqa: E402
from repa_jax.train.step import jit_train_step  # noqa: E402

jax.config.update("jax_platforms", "cpu")  # the host's own backend stays the CPU; the TPU exists only as a topology
GIB = 2**30
# Per chip: HBM (GiB) and dense bfloat16 peak (TFLOP/s), from Google Cloud's TPU pages. v4 as 'megacore' (one device
# per chip); without it libtpu presents each v4 chip as two devices of half the HBM.
CHIPS = {"v4": (32.0, 275.0), "v5e": (16.0, 197.0), "v5litepod": (16.0, 197.0), "v5p": (95.0, 459.0),
         "v6e": (31.25, 918.0)}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}


def size(nbytes: float) -> str:
  return f"{nbytes / GIB:.2f} GiB" if nbytes >= 0.1 * GIB else f"{nbytes / 2**20:.2f} MiB"


def chip(topology: str) -> tuple[float, float]:
  """(HBM GiB, peak bf16 TFLOP/s) of the topology's chip kind ('v5p:4x4x2' -> v5p)."""
  kind = topology.split(":")[0].split("-")[0]
  if kind not in CHIPS:
    raise SystemExit(f"--topology={topology}: unknown chip {kind!r}; known: {sorted(CHIPS)}")
  return CHIPS[kind]


def abstract_batch(config, batch_sharding) -> dict:
  """The train batch's ShapeDtypeStructs (as FeatureBatches / SyntheticBatches give it) in the batch sharding."""
  batch, spec = config.train.batch_size, sit_spec(config)
  struct = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
  shape = (batch, *config.data.latent_shape)
  out = {"latent_mean": struct(shape), "label": struct((batch,), jnp.int32),
         "features": {name: struct((batch, spec.num_tokens, width)) for name, width in aligned_encoders(config).items()}}
  if config.data.autoencoder != "identity":
    out["latent_std"] = struct(shape)
  return out


def shape_bytes(text: str) -> int:
  """Bytes of an HLO result shape, e.g. 'f32[28,1152]' or a tuple '(bf16[8,4], f32[2])'."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", text):
    if dtype in DTYPE_BYTES:
      count = 1
      for d in filter(None, dims.split(",")):
        count *= int(d)
      total += count * DTYPE_BYTES[dtype]
  return total


def received_shape(result: str, is_start: bool) -> str:
  """The buffer a collective produces, from its HLO result shape: an async -start's tuple is (operand, result, ...
  context), of which only the result is received."""
  if not (is_start and result.startswith("(")):
    return result
  elements, depth, begin = [], 0, 1
  for i, char in enumerate(result):
    depth += char in "([{"
    depth -= char in ")]}"
    if (char == "," and depth == 1) or (char == ")" and depth == 0):
      elements.append(result[begin:i].strip())
      begin = i + 1
  return elements[1] if len(elements) > 1 else result


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """{collective kind: (executions per step, bytes received per step)} of an HLO module's text: each op (or its async
  -start) counted once per trip of the while loops around it (lax.scan's, and the ring loops of XLA's windowed
  einsums)."""
  computations, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  def trip_count(line: str) -> int:
    """A while's trips: its known_trip_count, else the bound N of its condition `i < constant(N)` (lax.scan's)."""
    if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', line):
      return int(known.group(1))
    condition = computations.get(re.search(r"condition=%?([\w.\-]+)", line).group(1), [])
    bound = [int(c) for l in condition for c in re.findall(r"[su](?:32|64)\[\]\S* constant\((\d+)\)", l)]
    return bound[0] if len(bound) == 1 and any("direction=LT" in l for l in condition) else 1

  trips = collections.defaultdict(lambda: 1)
  for _ in range(4):  # nested loops: propagate the trip counts outward-in a few times
    for name, lines in computations.items():
      for line in lines:
        body = re.search(r"body=%?([\w.\-]+)", line)
        if " while(" in line and body:
          trips[body.group(1)] = trips[name] * trip_count(line)
  found = collections.defaultdict(lambda: [0, 0])
  for name, lines in computations.items():
    for line in lines:
      for kind in COLLECTIVES:
        op = re.search(rf"= (.*?) {kind}(-start)?\(", line)
        if op:
          found[kind][0] += trips[name]
          found[kind][1] += trips[name] * shape_bytes(received_shape(op.group(1), bool(op.group(2))))
  return {kind: tuple(value) for kind, value in found.items()}


def ideal_collective_bytes(abstract, shardings) -> float:
  """Per chip per step, in result-shape bytes (as `collectives` counts them), the least that FSDP + ZeRO-1 move: a
  parameter sharded over s_p devices all-gathered twice (forward and backward, float32 as stored); its gradient
  reduce-scattered onto its optimizer state's s_o shards (all-reduced when s_o = 1); the updated shard all-gathered
  back to s_p shards when s_o > s_p."""
  shards = lambda placed, shape: math.prod(shape) // math.prod(placed.shard_shape(shape))
  several_devices = jax.tree.leaves(shardings["params"])[0].mesh.size > 1
  total = 0.0
  for leaf, param, ema in zip(jax.tree.leaves(abstract["params"]), jax.tree.leaves(shardings["params"]),
                              jax.tree.leaves(shardings["ema_params"]), strict=True):
    nbytes, s_p, s_o = leaf.size * leaf.dtype.itemsize, shards(param, leaf.shape), shards(ema, leaf.shape)
    gathers = 2 * nbytes if s_p > 1 else 0
    reduction = nbytes / s_o if several_devices else 0
    total += gathers + reduction + (nbytes / s_p if s_o > s_p else 0)
  return total


def topology_devices(topology_name: str, chip_config_name: str | None = None, num_slices: int = 1) -> list:
  """The TPU devices of `num_slices` slices of a topology, e.g. 'v5p:4x4x2' (no TPU needed)."""
  kwargs = {"chip_config_name": chip_config_name} if chip_config_name else {}
  return topologies.get_topology_desc(topology_name=topology_name, platform="tpu", num_slices=num_slices,
                                      **kwargs).devices


def placed(abstract, shardings):
  """ShapeDtypeStructs of `abstract` (a pytree of arrays or structs) placed with `shardings` (a pytree or one)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def compiled_report(lowered, topology_name: str) -> dict:
  """Compiles a lowered program: {compile_s, memory (CompiledMemoryStats), collectives, used_bytes, fits, hbm_gib,
  peak_tflops}."""
  hbm_gib, peak_tflops = chip(topology_name)
  start = time.time()
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  used = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + \
      memory.temp_size_in_bytes + memory.generated_code_size_in_bytes
  return {"compile_s": time.time() - start, "memory": memory, "collectives": collectives(compiled.as_text()),
          "used_bytes": used, "fits": used <= hbm_gib * GIB, "hbm_gib": hbm_gib, "peak_tflops": peak_tflops}


def compile_step(config, topology_name: str, chip_config_name: str | None = None, num_slices: int = 1) -> dict:
  """AOT-compiles config's train step for `num_slices` slices of a TPU topology (several: config.mesh.dcn_shape says
  how the axes span them): `compiled_report`'s fields and {devices, mesh, state_bytes, ideal_collective_bytes}."""
  devices = topology_devices(topology_name, chip_config_name, num_slices)
  mesh = sharding.config_mesh(config, devices)
  tx = make_optimizer(config)
  abstract = abstract_state(config, tx)
  state_sharding = sharding.state_sharding(abstract, mesh)
  lowered = jit_train_step(config, mesh, state_sharding).lower(
      placed(abstract, state_sharding), abstract_batch(config, sharding.batch_sharding(mesh)))
  return {**compiled_report(lowered, topology_name), "devices": devices, "mesh": dict(mesh.shape),
          "state_bytes": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract)),
          "ideal_collective_bytes": ideal_collective_bytes(abstract, state_sharding)}


def compile_sampler(config, topology_name: str, chip_config_name: str | None = None, num_slices: int = 1) -> dict:
  """AOT-compiles config's sampler (`sample/generate.py:sampler_program`: config.sample's sampler, steps and
  guidance over a batch of config.sample.batch_size, the SiT's EMA and the pixel decoder replicated, as --mode=sample
  runs it) for the slice's data mesh: `compiled_report`'s fields."""
  mesh = sharding.data_mesh(topology_devices(topology_name, chip_config_name, num_slices))
  decoder = pixel_decoder(config, abstract=True)
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  b = config.sample.batch_size
  lowered = sampler_program(config, mesh, decoder.apply).lower(
      placed(decoder.params, replicated), placed(abstract_params(model_spec(config))["sit"], replicated),
      jax.ShapeDtypeStruct((b, *config.data.latent_shape), jnp.float32, sharding=batch),
      jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch), jax.eval_shape(lambda: rng.stream(0, "sample_noise")))
  return compiled_report(lowered, topology_name)


def compile_precompute(config, topology_name: str, chip_config_name: str | None = None) -> dict:
  """AOT-compiles --mode=precompute's program (`data/precompute.py:compute_fn`: config.data.autoencoder's encoder and
  every encoder of config.align.encoders on config.precompute.batch_size uint8 images of
  config.precompute.resolution px, the weights replicated) for the chips of one host, as each process runs it:
  `compiled_report`'s fields and {chips}."""
  devices = topology_devices(topology_name, chip_config_name)
  local = [d for d in devices if d.process_index == devices[0].process_index]
  mesh = sharding.data_mesh(local)
  encoders = {name: precompute.load_encoder(name, config, abstract=True)[0] for name in aligned_encoders(config)}
  compute, params = precompute.compute_fn(precompute.load_autoencoder(config, abstract=True), encoders, mesh,
                                          dataset_requirement(config).class_tokens)
  p = config.precompute
  images = jax.ShapeDtypeStruct((p.batch_size, p.resolution, p.resolution, 3), jnp.uint8,
                                sharding=sharding.batch_sharding(mesh))
  return {**compiled_report(compute.lower(placed(params, sharding.replicated(mesh)), images), topology_name),
          "chips": len(local)}


def main(argv):
  del argv
  config, topology, step_time = FLAGS.config, FLAGS.topology, FLAGS.step_time_s
  if FLAGS.async_collectives:  # read by libtpu when it loads, at the first topology query below
    os.environ["LIBTPU_INIT_ARGS"] = f"{os.environ.get('LIBTPU_INIT_ARGS', '')} {ASYNC_COLLECTIVE_FLAGS}".strip()
  print(f"LIBTPU_INIT_ARGS={os.environ.get('LIBTPU_INIT_ARGS', '')!r}")
  r = compile_step(config, topology, FLAGS.chip_config_name, FLAGS.num_slices)
  chips, memory = len(r["devices"]), r["memory"]
  print(f"topology {topology}: {chips} chips of {r['hbm_gib']} GiB HBM; mesh {r['mesh']}; global batch "
        f"{config.train.batch_size}; compiled in {r['compile_s']:.1f} s")
  print(f"per chip: arguments {size(memory.argument_size_in_bytes)} (the whole state is {size(r['state_bytes'])}, / "
        f"{chips} chips = {size(r['state_bytes'] / chips)}), outputs {size(memory.output_size_in_bytes)} "
        f"(aliased {size(memory.alias_size_in_bytes)}), temporaries {size(memory.temp_size_in_bytes)}, code "
        f"{size(memory.generated_code_size_in_bytes)}")
  for kind, (count, nbytes) in sorted(r["collectives"].items()):
    print(f"collective {kind}: {count} per step, {size(nbytes)} per chip per step (result shapes)")
  moved, ideal = sum(nbytes for _, nbytes in r["collectives"].values()), r["ideal_collective_bytes"]
  ratio = f", {moved / ideal:.2f}x" if ideal else ""
  print(f"collectives in all: {size(moved)} per chip per step; the FSDP ideal (weights gathered forward and backward, "
        f"gradients reduce-scattered once, ZeRO-1's update gathered): {size(ideal)}{ratio}")
  flops, peak = analytic_flops(config)["total"] / chips, r["peak_tflops"] * 1e12
  mfu = f", MFU {flops / step_time / peak:.1%} at {step_time} s/step" if step_time else ""
  print(f"analytic FLOPs per chip per step: {flops / 1e12:.3f} TFLOP ({flops / peak * 1e3:.1f} ms at the chip's "
        f"{r['peak_tflops']:.0f} TFLOP/s bf16 peak){mfu}")
  if FLAGS.sampler:
    s, c = compile_sampler(config, topology, FLAGS.chip_config_name, FLAGS.num_slices), config.sample
    m = s["memory"]
    print(f"sampler ({c.sampler} {c.steps} steps, CFG {c.cfg_scale}, batch {c.batch_size}, the data mesh): compiled "
          f"in {s['compile_s']:.1f} s; per chip arguments {size(m.argument_size_in_bytes)}, temporaries "
          f"{size(m.temp_size_in_bytes)}, {size(s['used_bytes'])} used of {s['hbm_gib']} GiB: "
          f"fits={'yes' if s['fits'] else 'no'}")
  if FLAGS.precompute:
    pc, p = compile_precompute(config, topology, FLAGS.chip_config_name), config.precompute
    m = pc["memory"]
    print(f"precompute ({config.data.autoencoder} + {', '.join(aligned_encoders(config))}, batch {p.batch_size} at "
          f"{p.resolution} px over one host's {pc['chips']} chips): compiled in {pc['compile_s']:.1f} s; per chip "
          f"arguments {size(m.argument_size_in_bytes)}, temporaries {size(m.temp_size_in_bytes)}, "
          f"{size(pc['used_bytes'])} used of {pc['hbm_gib']} GiB: fits={'yes' if pc['fits'] else 'no'}")
  print(f"SUMMARY topology={topology} chips={chips} hbm_gib={r['hbm_gib']:.2f} "
        f"argument_gib={memory.argument_size_in_bytes / GIB:.3f} temp_gib={memory.temp_size_in_bytes / GIB:.3f} "
        f"used_gib={r['used_bytes'] / GIB:.3f} compile_s={r['compile_s']:.0f} fits={'yes' if r['fits'] else 'no'}",
        flush=True)


if __name__ == "__main__":  # the flags only for the script, so that tests import the functions beside repa_jax.main's
  flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:4x4x2 (v5p-64), v6e:8x8, v4:2x2x4.")
  flags.DEFINE_string("chip_config_name", None, "libtpu chip config, e.g. 'megacore' for v4.")
  flags.DEFINE_integer("num_slices", 1, "Slices of --topology (multi-slice: set --config.mesh.dcn_shape too).")
  flags.DEFINE_float("step_time_s", None, "A measured step time on that slice, for the MFU it means.")
  flags.DEFINE_bool("sampler", True, "Also compile the sampler program (--mode=sample's, config.sample).")
  flags.DEFINE_bool("precompute", True, "Also compile --mode=precompute's program (the autoencoder and the "
                    "encoders, config.precompute) for one host's chips.")
  flags.DEFINE_bool("async_collectives", False, "Compile with launch/tpu.py's ASYNC_COLLECTIVE_FLAGS in "
                    "LIBTPU_INIT_ARGS, as `launch/tpu.py run` starts the job.")
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config.")
  app.run(main)
