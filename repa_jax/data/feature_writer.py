"""Writing a feature dataset (the format: `features.py`): shards written atomically and exactly once, by any number
of processes; a re-run skips the finished ones (complete, with the record count and size recorded when written) and
rewrites the others; with verify=True it also re-reads every record of the finished ones. Every process of a
precompute run writes the shards it owns:

  for shard in pending_shards(directory, split, num_shards, process_index, process_count, verify=False):
    write_shard(directory, spec, split, shard, num_shards,
                records_for(shard_range(len(source), shard, num_shards)))
  # once every process is done, on one process:
  finalize(directory, split, num_examples=len(source))
"""
import dataclasses
import json
import os
import uuid
from typing import Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module
from etils import epath

from repa_jax.data import features

DEFAULT_VERSION = "1.0.0"


def _input_shapes(spec: features.FeatureSpec) -> dict[str, tuple[int, ...]]:
  """Field name -> shape of a record handed to `write_shard`."""
  shapes = {"id": (), "label": ()}
  shapes.update(dict.fromkeys(features.autoencoder_dtypes(spec), spec.latent_shape))
  shapes.update({f"feat_{name}": (tokens, width) for name, tokens, width in spec.encoders})
  if spec.class_tokens:
    shapes.update({f"cls_{name}": (width,) for name, _, width in spec.encoders})
  return shapes


def encode_record(spec: features.FeatureSpec, record: Mapping) -> dict:
  """One record in the layout of `features.stored_fields(spec)`.

  record: 'id' (index in the image source), 'label', then 'ae_mean' and 'ae_std' [H, W, C] (VAE; any float dtype)
  or 'ae_pixels' uint8 [H, W, C] (identity autoencoder), and per encoder 'feat_<name>' [tokens, width] and, with
  spec.class_tokens, 'cls_<name>' [width] (any float dtype). Floats are cast to float16, or the features (not the
  class tokens) quantised to int8 when spec.quantize is 'int8'.
  """
  shapes = _input_shapes(spec)
  record_id = record.get("id")
  missing = [name for name in shapes if name not in record]
  unknown = [name for name in record if name not in shapes]
  if missing or unknown:
    raise ValueError(f"record {record_id}: fields {missing} missing, {unknown} unknown; the spec expects "
                     f"{list(shapes)}. Fix: make the precompute step emit exactly these fields.")
  for name, shape in shapes.items():
    if np.shape(record[name]) != shape:
      raise ValueError(f"record {record_id}: field {name} has shape {np.shape(record[name])}, the spec expects "
                       f"{shape}. Fix: make the spec match the autoencoder and encoders that produced it.")
  encoded = {"id": int(record_id), "label": int(record["label"])}
  for name, dtype in features.autoencoder_dtypes(spec).items():
    value = np.asarray(record[name])
    if dtype == np.uint8 and value.dtype != np.uint8:
      raise ValueError(f"record {record_id}: field {name} is {value.dtype}; it must be the uint8 image as is.")
    encoded[name] = value.astype(dtype)
  for name, _, _ in spec.encoders:
    if spec.quantize == "int8":
      encoded[f"feat_{name}"], encoded[f"feat_{name}_scale"] = features.quantize_int8(record[f"feat_{name}"])
    else:
      encoded[f"feat_{name}"] = np.asarray(record[f"feat_{name}"]).astype(np.float16)
    if spec.class_tokens:
      encoded[f"cls_{name}"] = np.asarray(record[f"cls_{name}"]).astype(np.float16)
  for name, value in encoded.items():
    if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all():
      raise ValueError(f"record {record_id}: field {name} is not finite in float16 (NaN, or |x| > 65504).")
  return encoded


def _ids_path(shard_path: epath.Path) -> epath.Path:
  return shard_path.parent / f"{shard_path.name}.ids.npy"


def _check_path(shard_path: epath.Path) -> epath.Path:
  return shard_path.parent / f"{shard_path.name}.json"


def _read_ids(shard_path: epath.Path) -> np.ndarray:
  with _ids_path(shard_path).open("rb") as file:
    return np.load(file)


def _num_records(shard_path: epath.Path) -> int:
  reader = array_record_module.ArrayRecordReader(os.fspath(shard_path))
  try:
    return reader.num_records()
  finally:
    reader.close()


def shard_problem(shard_path: epath.Path) -> str | None:
  """Why a finished shard is not whole, by the cheap checks (its ids file, and the record count and size recorded
  when it was written; datasets written before that record: the count in its footer); None if it passes."""
  if not _ids_path(shard_path).exists():
    return f"{_ids_path(shard_path).name} is missing"
  num_ids = _read_ids(shard_path).size
  if _check_path(shard_path).exists():
    recorded = json.loads(_check_path(shard_path).read_text())
    size = shard_path.stat().length
    if size != recorded["bytes"] or num_ids != recorded["records"]:
      return (f"it is {size} bytes with {num_ids} ids, but was written as {recorded['bytes']} bytes with "
              f"{recorded['records']} records")
    return None
  try:
    num_records = _num_records(shard_path)
  except Exception as error:  # noqa: BLE001 - a damaged footer fails here: report it
    return f"it cannot be opened ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})"
  return None if num_records == num_ids else f"it holds {num_records} records but its ids file lists {num_ids}"


def verify_shard(spec: features.FeatureSpec, shard_path: epath.Path) -> str | None:
  """`shard_problem`, then the full check: every record is read and decoded, and their ids are the ids file's."""
  if (problem := shard_problem(shard_path)) is not None:
    return problem
  connectors, ids, index = features.tfds_features(spec), _read_ids(shard_path), None
  try:
    reader = array_record_module.ArrayRecordReader(os.fspath(shard_path))
    try:
      num_records = reader.num_records()
      for start in range(0, num_records, 256):  # a chunk of records in memory at a time
        index = start
        for index, data in enumerate(reader.read(start, min(start + 256, num_records)), start):
          record_id = connectors.deserialize_example_np(data)["id"]
          if record_id != ids[index]:
            return f"record {index} has id {record_id}, its ids file says {ids[index]}"
    finally:
      reader.close()
  except Exception as error:  # noqa: BLE001 - any read or decode error is the shard's damage
    where = "it cannot be opened" if index is None else f"the records from {index} on cannot be read"
    return f"{where} ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})"
  return None


def shard_range(num_examples: int, shard_index: int, num_shards: int) -> range:
  """Source ids of one shard: contiguous blocks whose sizes differ by at most one."""
  return range(num_examples * shard_index // num_shards, num_examples * (shard_index + 1) // num_shards)


def pending_shards(directory: epath.PathLike, split: str, num_shards: int, process_index: int = 0,
                   process_count: int = 1, verify: bool = False) -> list[int]:
  """Shards that process `process_index` of `process_count` owns (index % count) and that are not finished: missing,
  failing `shard_problem`, or with `verify` failing `verify_shard` (each damaged one logged with why)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in range(process_count={process_count}).")
  directory = epath.Path(directory)
  spec = features.read_spec(directory) if verify and (directory / features.METADATA_FILE).exists() else None
  pending = []
  for shard in range(process_index, num_shards, process_count):
    path = features.shard_path(directory, split, shard, num_shards)
    if not path.exists():
      pending.append(shard)
    elif (problem := verify_shard(spec, path) if verify else shard_problem(path)):
      logging.warning("feature shard %s is damaged (%s): rewriting it", path, problem)
      pending.append(shard)
  return pending


def _write_atomically(path: epath.Path, data: bytes) -> None:
  """Writes `data` to a unique temporary file, then renames it to `path`: readers see all of it or nothing."""
  temporary = path.parent / f"{path.name}.{uuid.uuid4().hex}.tmp"
  temporary.write_bytes(data)
  temporary.replace(path)


def _record_spec(directory: epath.Path, spec: features.FeatureSpec) -> None:
  """Writes `spec` as the dataset's metadata, or checks that it equals the spec already written."""
  if not (directory / features.METADATA_FILE).exists():
    metadata = json.dumps({features.METADATA_KEY: spec.to_dict(),
                           features.NAME_KEY: features.dataset_name(directory)}).encode()
    _write_atomically(directory / features.METADATA_FILE, metadata)
    return
  written = features.read_spec(directory)
  differences = [f"{field.name}: dataset has {getattr(written, field.name)!r}, this run {getattr(spec, field.name)!r}"
                 for field in dataclasses.fields(spec) if getattr(written, field.name) != getattr(spec, field.name)]
  if differences:
    raise ValueError(f"feature dataset {directory} was started with another spec ({'; '.join(differences)}). "
                     f"Fix: write to another directory, or delete {directory} to start over.")


def write_shard(directory: epath.PathLike, spec: features.FeatureSpec, split: str, shard_index: int, num_shards: int,
                records: Iterable[Mapping]) -> int:
  """Writes one shard of `split` from records laid out as `encode_record` takes them; returns the record count.

  The shard becomes visible (finished) only once complete; an interrupted shard is rewritten by the next run.
  The first writer records `spec` as the dataset's metadata, later writers must have the same spec.
  """
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _record_spec(directory, spec)
  connectors = features.tfds_features(spec)
  path = features.shard_path(directory, split, shard_index, num_shards)
  partial = path.parent / f"{path.name}.incomplete"
  ids = []
  writer = array_record_module.ArrayRecordWriter(os.fspath(partial), "group_size:1")
  try:
    for record in records:
      encoded = encode_record(spec, record)
      writer.write(connectors.serialize_example(encoded))
      ids.append(encoded["id"])
  finally:
    writer.close()
  with _ids_path(path).open("wb") as file:
    np.save(file, np.asarray(ids, np.int64))
  partial.replace(path)  # over a damaged shard being rewritten
  _write_atomically(_check_path(path), json.dumps({"records": len(ids), "bytes": path.stat().length}).encode())
  return len(ids)


def _finished_shards(directory: epath.Path, split: str) -> list[epath.Path]:
  """Paths of all shards of `split`, in order; refuses missing shards or mixed shard counts."""
  template = features.shard_template(directory, split)
  found = [info for info in (template.parse_filename_info(path.name) for path in directory.iterdir())
           if info is not None and info.split == split]
  if not found:
    raise FileNotFoundError(f"no finished shards of split {split!r} in {directory}. {features.PRECOMPUTE_FIX}")
  shard_counts = sorted({info.num_shards for info in found})
  if len(shard_counts) > 1:
    raise ValueError(f"split {split!r} in {directory} has shards of different shard counts {shard_counts}. "
                     "Fix: delete the shards of the unwanted count and re-run --mode=precompute.")
  (num_shards,) = shard_counts
  unfinished = sorted(set(range(num_shards)) - {info.shard_index for info in found})
  if unfinished:
    raise ValueError(f"split {split!r} in {directory}: shards {unfinished} of {num_shards} are not finished. "
                     "Fix: re-run --mode=precompute (finished shards are kept).")
  return template.sharded_filepaths(num_shards)


def _check_exactly_once(ids: np.ndarray, num_examples: int, where: str) -> None:
  """Refuses `ids` unless they are a permutation of range(num_examples)."""
  in_range = (ids >= 0) & (ids < num_examples)
  counts = np.bincount(ids[in_range], minlength=num_examples)
  absent, repeated, out_of_range = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1), ids[~in_range]
  if absent.size or repeated.size or out_of_range.size:
    raise ValueError(f"{where} must hold every id in range({num_examples}) exactly once; it holds {ids.size} records: "
                     f"{absent.size} ids missing {absent[:5]}, {repeated.size} repeated {repeated[:5]}, "
                     f"{out_of_range.size} out of range {out_of_range[:5]}. Fix: delete the shards holding them "
                     "(and the .ids.npy beside them) and re-run --mode=precompute.")


def finalize(directory: epath.PathLike, split: str, num_examples: int) -> None:
  """Makes `split` readable: checks its shards hold every id in range(num_examples) exactly once (by count and by
  id), then writes the dataset info. Run on one process once every shard is written."""
  directory = epath.Path(directory)
  spec = features.read_spec(directory)
  paths = _finished_shards(directory, split)
  shard_lengths, ids = [], []
  for path in paths:
    if (problem := shard_problem(path)) is not None:
      raise ValueError(f"feature shard {path} is damaged: {problem}. Fix: re-run --mode=precompute (it rewrites "
                       "damaged shards).")
    shard_ids = _read_ids(path)
    shard_lengths.append(shard_ids.size)
    ids.append(shard_ids)
  _check_exactly_once(np.concatenate(ids), num_examples, f"split {split!r} in {directory}")

  splits = {}
  if (directory / "dataset_info.json").exists():
    splits = dict(tfds.builder_from_directory(directory).info.splits.items())
  splits[split] = tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths,
                                      num_bytes=sum(path.stat().length for path in paths),
                                      filename_template=features.shard_template(directory, split))
  name = features.dataset_name(directory)
  version = directory.name if tfds.core.Version.is_valid(directory.name) else DEFAULT_VERSION
  identity = tfds.core.dataset_info.DatasetIdentity(name=name, version=tfds.core.Version(version),
                                                    data_dir=os.fspath(directory), module_name="")
  info = tfds.core.DatasetInfo(
      builder=identity, features=features.tfds_features(spec), disable_shuffling=True,
      metadata=tfds.core.MetadataDict({features.METADATA_KEY: spec.to_dict()}),
      description=f"repa_jax precomputed features of {spec.source}; FeatureSpec in metadata.json.")
  info.set_file_format(features.FILE_FORMAT)
  info.set_splits(tfds.core.SplitDict(list(splits.values())))
  info.write_to_directory(directory)
