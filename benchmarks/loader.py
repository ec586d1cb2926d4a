"""Throughput of the feature-dataset input pipeline on a synthetic ImageNet-shaped dataset, and what a TPU host needs.

  python benchmarks/loader.py --records=2000 --quantize=float16 --workdir=/tmp/loader_bench
  python benchmarks/loader.py --records=2000 --quantize=int8 --workdir=/tmp/loader_bench

Writes (or reuses) `<workdir>/synth_in1k_<quantize>_<records>`: random records laid out as the default config's
`dataset_requirement` (256 px ImageNet, SD-VAE mean/std [32, 32, 4], DINOv2-B/14 features [256, 768], 1000 classes) with
`write_shard` / `finalize`, in --shards shards. It then measures, each with wall time, process CPU time (all threads)
and the load average:
  (a) random-access reads through the TFDS data source of `open_features`: raw record bytes (ArrayRecord read +
      zstd), and read + decode to NumPy; (a') the same on an uncompressed copy of the records (--uncompressed_probe);
  (b) `process_batches` (the training pipeline's MapDataset) at --batch records per batch: indexed in this thread,
      then through `.to_iter_dataset(grain.ReadOptions(num_threads=N))` for N in --threads;
  (c) bytes on disk per image, extrapolated to ImageNet-1k train;
and sets the measured rates against what a TPU host must deliver to keep SiT-B/2 and SiT-XL/2 (+REPA) busy
(`forward_flops`; its 'blocks GMAC' column is what the DiT paper reports as "Gflops": 118.6 for XL/2, 23.01 for B/2).

The dataset is written just before it is read, so reads come from the page cache: (a) and (b) measure the CPU cost
of reading, not a disk or network file system.
"""
import dataclasses
import os
import shutil
import time

import grain
import numpy as np
from absl import app, flags
from array_record.python import array_record_data_source, array_record_module

from repa_jax.config import base_config, select_regularizers
from repa_jax.data.feature_writer import finalize, pending_shards, shard_range, write_shard
from repa_jax.data.features import FeatureSpec, open_features, stored_fields
from repa_jax.data.pipeline import process_batches
from repa_jax.specs.data import dataset_requirement
from repa_jax.specs.model import sit_spec

_RECORDS = flags.DEFINE_integer("records", 2000, "Records in the synthetic dataset.")
_QUANTIZE = flags.DEFINE_enum("quantize", "float16", ["float16", "int8"], "How encoder features are stored.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/loader_bench", "Where the synthetic dataset is written.")
_SHARDS = flags.DEFINE_integer("shards", 4, "Shards of the synthetic dataset.")
_BATCH = flags.DEFINE_integer("batch", 256, "Records per batch in (b) (global batch, one process).")
_BATCHES = flags.DEFINE_integer("batches", 16, "Batches timed per pipeline in (b), the first (start-up) included.")
_READS = flags.DEFINE_integer("reads", 2000, "Random-access reads timed per mode in (a).")
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "grain.ReadOptions.num_threads values for (b).")
_PREFETCH = flags.DEFINE_integer("prefetch", 8, "grain.ReadOptions.prefetch_buffer_size (batches), as FeatureBatches.")
_MFU = flags.DEFINE_float("mfu", 0.40, "Assumed model FLOPs utilisation of the TPU chips.")
_REWRITE = flags.DEFINE_bool("rewrite", False, "Delete and rewrite the synthetic dataset if it exists.")
_UNCOMPRESSED = flags.DEFINE_bool("uncompressed_probe", True, "Also time (a) on an uncompressed ArrayRecord copy "
                                   "(write_shard writes zstd-3), to show what compression costs.")
_KEEP = flags.DEFINE_bool("keep", True, "Keep the synthetic dataset afterwards (for re-runs).")

IMAGENET_TRAIN = 1_281_167
# (name, chips per host, peak dense bf16 TFLOP/s per chip), public Cloud TPU figures.
TPU_HOSTS = (("v4", 4, 275.0), ("v5p", 4, 459.0))
MODELS = ("B/2", "XL/2")


class Meter:
  """Wall time, process CPU time (every thread) and load average over a `with` block."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall
    self.cpu = time.process_time() - self.cpu
    self.load = os.getloadavg()[0]


def report(name: str, meter: Meter, records: int, stored_bytes: float) -> dict:
  row = dict(name=name, records=records, wall=meter.wall, cpu=meter.cpu, load=meter.load,
             rate=records / meter.wall, mbps=records * stored_bytes / meter.wall / 1e6,
             per_cpu_s=records / meter.cpu, cores=meter.cpu / meter.wall)
  print(f"  {name:38s} {row['rate']:8.0f} rec/s {row['mbps']:8.1f} MB/s stored | {row['per_cpu_s']:8.0f} rec/CPU-s "
        f"| {row['cores']:.2f} cores busy | {records} rec in {meter.wall:.2f} s | load1 {meter.load:.2f}", flush=True)
  return row


def synthetic_records(ids: range, spec, seed: int):
  """Random records in `encode_record`'s layout; features ~ N(0, 1) like the per-token-normalised REPA targets."""
  rng = np.random.default_rng(seed)
  ((encoder, tokens, width),) = spec.encoders
  for i in ids:
    yield {"id": i, "label": int(rng.integers(spec.num_classes)),
           "ae_mean": rng.standard_normal(spec.latent_shape, np.float32),
           "ae_std": rng.uniform(0.01, 0.2, spec.latent_shape).astype(np.float32),
           f"feat_{encoder}": rng.standard_normal((tokens, width), np.float32)}


def make_dataset(directory: str, spec, records: int, shards: int) -> None:
  if _REWRITE.value and os.path.exists(directory):
    shutil.rmtree(directory)
  if os.path.exists(os.path.join(directory, "dataset_info.json")):
    print(f"reusing {directory}")
    return
  pending = pending_shards(directory, "train", shards)
  with Meter() as meter:
    for shard in pending:
      write_shard(directory, spec, "train", shard, shards,
                  synthetic_records(shard_range(records, shard, shards), spec, seed=shard))
    finalize(directory, "train", num_examples=records)
  written = sum(len(shard_range(records, shard, shards)) for shard in pending)
  print(f"wrote {written} records in {len(pending)} shards in {meter.wall:.1f} s ({written / meter.wall:.0f} rec/s "
        f"incl. random generation; load1 {meter.load:.2f})")


def disk_bytes(directory: str) -> int:
  return sum(entry.stat().st_size for entry in os.scandir(directory) if ".array_record-" in entry.name
             and not entry.name.endswith(".ids.npy"))


def payload_bytes(spec) -> int:
  return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in stored_fields(spec).values())


def random_reads(source, stored_bytes: float) -> list[dict]:
  """(a): random-access single-record reads, raw bytes and decoded."""
  rng = np.random.default_rng(1)
  order = rng.permutation(np.resize(np.arange(len(source)), max(_READS.value, len(source))))[:_READS.value]
  raw = source.data_source  # the ArrayRecordDataSource under TFDS's decoding wrapper
  rows = []
  for name, read in (("(a) raw bytes (read + zstd)", lambda i: raw[i]),
                     ("(a) read + decode (TFDS source[i])", lambda i: source[i])):
    read(int(order[0]))
    with Meter() as meter:
      for i in order:
        read(int(i))
    rows.append(report(name, meter, len(order), stored_bytes))
  return rows


def uncompressed_reads(source, directory: str) -> list[dict]:
  """(a) on a copy of the same serialized records written with ArrayRecord's 'uncompressed' option."""
  path = f"{directory}.uncompressed.array_record"
  if not os.path.exists(path):
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
    for i in range(len(source)):
      writer.write(source.data_source[i])
    writer.close()
  raw = array_record_data_source.ArrayRecordDataSource([path])
  features = source.dataset_info.features
  stored = os.path.getsize(path) / len(raw)
  order = np.random.default_rng(1).permutation(len(raw))[:_READS.value]
  rows = []
  for name, read in (("(a') uncompressed copy: raw bytes", lambda i: raw[i]),
                     ("(a') uncompressed copy: read + decode", lambda i: features.deserialize_example_np(raw[i]))):
    read(int(order[0]))
    with Meter() as meter:
      for i in order:
        read(int(i))
    rows.append(report(name, meter, len(order), stored))
  print(f"  (uncompressed copy: {stored / 1e3:.1f} kB/record on disk)")
  return rows


def pipeline_rates(source, spec, stored_bytes: float) -> list[dict]:
  """(b): the training MapDataset, indexed in this thread and through grain's threaded iterator."""
  (encoder, _, _), = spec.encoders
  fields = {"label", "ae_mean", "ae_std", f"feat_{encoder}", f"feat_{encoder}_scale"}  # as FeatureBatches
  dataset = process_batches(source, seed=0, global_batch=_BATCH.value, process_index=0, process_count=1,
                            fields=fields)
  count = _BATCHES.value * _BATCH.value
  rows = []
  with Meter() as meter:
    for b in range(_BATCHES.value):
      batch = dataset[b]
  assert batch[f"feat_{encoder}"].shape[0] == _BATCH.value
  rows.append(report("(b) process_batches[b], this thread", meter, count, stored_bytes))
  for threads in map(int, _THREADS.value):
    with Meter() as meter:
      iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                                prefetch_buffer_size=_PREFETCH.value)))
      for _ in range(_BATCHES.value):
        next(iterator)
    rows.append(report(f"(b) to_iter_dataset num_threads={threads}", meter, count, stored_bytes))
    del iterator
  return rows


def forward_flops(model: str) -> dict[str, float]:
  """Forward FLOPs per image (2 per multiply-add) of SiT `model` + REPA at 256 px, from the default config's shapes.

  Blocks: 24*N*D^2 (qkv, proj, ratio-4 MLP) + 4*N^2*D (QK^T, AV) per block, plus 12*D^2 for adaLN; then patch embed
  and final layer 2*2*N*(p*p*C)*D, and the REPA projector 2*N*(D*H + H*H + H*z) (H = projector_dim, z = encoder width).
  """
  config = base_config()
  config.model.name = model
  s = sit_spec(config)
  n, d = s.num_tokens, s.width
  (_, z), = config.align.encoders
  h = config.align.projector_dim
  terms = {"blocks": s.depth * (24 * n * d * d + 4 * n * n * d + 12 * d * d),
           "embed+final": 4 * n * s.patch ** 2 * s.in_channels * d,
           "projector": 2 * n * (d * h + h * h + h * z)}
  terms["total"] = sum(terms.values())
  terms["depth"], terms["width"], terms["tokens"] = s.depth, d, n
  return terms


def feed_requirements(stored_bytes: float, per_cpu_s: float) -> None:
  print(f"\nTPU host feed rates (train step = 3 x forward FLOPs; MFU {_MFU.value:.0%}; per-image storage "
        f"{stored_bytes / 1e3:.1f} kB; this loader {per_cpu_s:.0f} rec per CPU-second):")
  print(f"  {'model':6s} {'GFLOP fwd':>9s} {'blocks GMAC':>12s} {'host':>5s} {'img/s/host':>10s} {'MB/s/host':>9s} "
        f"{'cores':>6s}")
  for model in MODELS:
    flops = forward_flops(model)
    for host, chips, tflops in TPU_HOSTS:
      images = chips * tflops * 1e12 * _MFU.value / (3 * flops["total"])
      print(f"  {model:6s} {flops['total'] / 1e9:9.1f} {flops['blocks'] / 2e9:12.1f} {host:>5s} {images:10.0f} "
            f"{images * stored_bytes / 1e6:9.1f} {images / per_cpu_s:6.2f}")


def main(argv):
  del argv
  config = base_config()
  select_regularizers(config, "repa")  # REPA's records: latents and DINOv2-B patch tokens
  spec = FeatureSpec(**dataclasses.asdict(dataset_requirement(config)), quantize=_QUANTIZE.value,
                     preprocessing="synthetic N(0, 1)", source="loader benchmark")
  directory = os.path.join(_WORKDIR.value, f"synth_in1k_{_QUANTIZE.value}_{_RECORDS.value}")
  print(f"spec: {spec}\nload average at start: {os.getloadavg()}, {os.cpu_count()} CPUs")
  make_dataset(directory, spec, _RECORDS.value, _SHARDS.value)
  source, _ = open_features(directory, "train")
  assert len(source) == _RECORDS.value, (len(source), _RECORDS.value)

  on_disk = disk_bytes(directory)
  stored = on_disk / len(source)
  serialized = len(source.data_source[0])
  payload = payload_bytes(spec)
  print(f"\n(c) storage: {stored / 1e3:.1f} kB/image on disk (zstd-3 ArrayRecord), {serialized / 1e3:.1f} kB serialized "
        f"record, {payload / 1e3:.1f} kB tensor payload; ImageNet-1k train ({IMAGENET_TRAIN} images): "
        f"{stored * IMAGENET_TRAIN / 1e9:.0f} GB on disk")
  for quantize in ("float16", "int8"):
    other = payload_bytes(dataclasses.replace(spec, quantize=quantize))
    print(f"    payload if {quantize:7s}: {other / 1e3:.1f} kB/image, {other * IMAGENET_TRAIN / 1e9:.0f} GB for "
          "ImageNet-1k")

  print(f"\nthroughput (stored bytes = {stored / 1e3:.1f} kB/record on disk):")
  rows = random_reads(source, stored)
  if _UNCOMPRESSED.value:
    rows += uncompressed_reads(source, directory)
  rows += pipeline_rates(source, spec, stored)
  # Loader cost per image: the threaded iterator's records per CPU-second (the fastest of the --threads runs).
  per_cpu_s = max(row["per_cpu_s"] for row in rows if "to_iter_dataset" in row["name"])
  feed_requirements(stored, per_cpu_s)
  print(f"\nload average at end: {os.getloadavg()}")
  if not _KEEP.value:
    shutil.rmtree(directory)
    if os.path.exists(f"{directory}.uncompressed.array_record"):
      os.remove(f"{directory}.uncompressed.array_record")


if __name__ == "__main__":
  app.run(main)
