"""Precomputed feature datasets: autoencoder outputs and encoder features of every image, as a TFDS dataset.

One dataset per (image source, resolution, autoencoder, encoders); one ArrayRecord record per image, laid out as
`stored_fields(spec)` says. A dataset directory reads without TensorFlow through `open_features`,
`tfds.builder_from_directory(directory).as_data_source(split)`, or `tfds.data_source(name, data_dir=...)` when the
directory is `<data_dir>/<name>/<version>`. It holds:

  <name>-<split>.array_record-<i>-of-<n>          finished shard i (written under a temporary name, then renamed)
  <name>-<split>.array_record-<i>-of-<n>.ids.npy  the source ids in shard i, for `finalize`'s exactly-once check
  metadata.json                                  the FeatureSpec, written by the first shard writer
  dataset_info.json, features.json               written by `finalize`; a split is readable from then on

Every process of a precompute run writes the shards it owns, and a re-run skips the finished ones:

  for shard in pending_shards(directory, split, num_shards, process_index, process_count):
    write_shard(directory, spec, split, shard, num_shards,
                records_for(shard_range(len(source), shard, num_shards)))
  # once every process is done, on one process:
  finalize(directory, split, num_examples=len(source))
"""

import dataclasses
import json
import os
import re
from typing import Iterable, Mapping
import uuid

from array_record.python import array_record_module
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from repa_jax.specs.data import DatasetRequirement, check_encoder_features

IDENTITY_AUTOENCODER = "identity"
QUANTIZATIONS = ("float16", "int8")
_METADATA_FILE = "metadata.json"
_METADATA_KEY = "feature_spec"
_FILE_FORMAT = "array_record"
_DEFAULT_VERSION = "1.0.0"
_DATASET_NAME = re.compile(r"[a-zA-Z]\w*")
_PRECOMPUTE_FIX = ("Fix: point the run at a feature dataset precomputed for this config, or precompute one "
                   "(--mode=precompute).")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """What a feature dataset holds; stored in its dataset info as `metadata['feature_spec']`.

  Attributes:
    autoencoder: 'identity' (records hold the pixels) or a VAE's name such as 'sd-vae-ft-mse' (records hold the
      posterior mean and std).
    latent_shape: (H, W, C) of the pixels or of the posterior mean and std.
    latent_scale: factor applied to latents before the diffusion model (0.18215 for SD-VAE, 1.0 for pixels).
    encoders: (name, tokens, width) per encoder; its features are [tokens, width].
    token_grid: (h, w) patch grid shared by every encoder; h * w = tokens.
    quantize: 'float16', or 'int8' (symmetric per token, with a float16 scale per token).
    num_classes: number of class labels.
    preprocessing: how images were prepared for the autoencoder and the encoders (free text).
    source: which images (free text, e.g. 'imagenet2012 train').
  """

  autoencoder: str
  latent_shape: tuple[int, int, int]
  latent_scale: float
  encoders: tuple[tuple[str, int, int], ...]
  token_grid: tuple[int, int]
  quantize: str
  num_classes: int
  preprocessing: str
  source: str

  def __post_init__(self):
    # Sequences (e.g. lists read back from JSON) become tuples, so that specs compare and hash by value.
    object.__setattr__(self, "latent_shape", tuple(int(size) for size in self.latent_shape))
    object.__setattr__(self, "token_grid", tuple(int(size) for size in self.token_grid))
    object.__setattr__(self, "encoders",
                       tuple((str(name), int(tokens), int(width)) for name, tokens, width in self.encoders))
    if self.quantize not in QUANTIZATIONS:
      raise ValueError(f"FeatureSpec.quantize={self.quantize!r}; use one of {QUANTIZATIONS}.")
    if len(self.latent_shape) != 3 or len(self.token_grid) != 2:
      raise ValueError(f"FeatureSpec.latent_shape={self.latent_shape} must be (H, W, C) and "
                       f"FeatureSpec.token_grid={self.token_grid} must be (h, w).")
    names = [name for name, _, _ in self.encoders]
    if len(set(names)) != len(names):
      raise ValueError(f"FeatureSpec.encoders names {names} repeat; give every encoder its own name.")
    grid_tokens = self.token_grid[0] * self.token_grid[1]
    for name, tokens, _ in self.encoders:
      if tokens != grid_tokens:
        raise ValueError(f"FeatureSpec.encoders[{name!r}] has {tokens} tokens but token_grid {self.token_grid} has "
                         f"{grid_tokens}; every encoder must give one token per grid cell.")

  @classmethod
  def from_dict(cls, fields: Mapping) -> "FeatureSpec":
    """The spec of `to_dict`, e.g. read back from a dataset's metadata; refuses missing or unknown fields."""
    names = [field.name for field in dataclasses.fields(cls)]
    missing = [name for name in names if name not in fields]
    unknown = [name for name in fields if name not in names]
    if missing or unknown:
      raise ValueError(f"feature dataset metadata: fields {missing} missing, {unknown} unknown; it was written by "
                       f"another version of repa_jax. {_PRECOMPUTE_FIX}")
    return cls(**fields)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def quantize_int8(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric per-token int8: features [..., tokens, width] -> (int8 [..., tokens, width], float16 [..., tokens]).

  scale = max|x| / 127 over the width (at least float16's smallest normal number, so all-zero tokens work),
  q = round(x / scale); then |x - q * scale| <= scale / 2.
  """
  features = np.asarray(features, np.float32)
  scale = np.maximum(np.abs(features).max(axis=-1) / 127, np.finfo(np.float16).tiny).astype(np.float16)
  # |x| / scale <= 127 * (1 + 2**-11) after rounding the scale to float16, so |q| <= 127 without clipping.
  quantized = np.rint(features / scale.astype(np.float32)[..., None]).astype(np.int8)
  return quantized, scale


def dequantize_int8(quantized, scale):
  """float32 [..., tokens, width] from int8 [..., tokens, width] and scale [..., tokens]; NumPy or jax arrays."""
  return quantized.astype(np.float32) * scale.astype(np.float32)[..., None]


def _autoencoder_dtypes(spec: FeatureSpec) -> dict[str, type]:
  """Autoencoder field name -> stored dtype; every such field is [H, W, C]."""
  if spec.autoencoder == IDENTITY_AUTOENCODER:
    return {"ae_pixels": np.uint8}
  return {"ae_mean": np.float16, "ae_std": np.float16}


def _input_shapes(spec: FeatureSpec) -> dict[str, tuple[int, ...]]:
  """Field name -> shape of a record handed to `write_shard`."""
  shapes = {"id": (), "label": ()}
  shapes.update(dict.fromkeys(_autoencoder_dtypes(spec), spec.latent_shape))
  shapes.update({f"feat_{name}": (tokens, width) for name, tokens, width in spec.encoders})
  return shapes


def stored_fields(spec: FeatureSpec) -> dict[str, tuple[tuple[int, ...], type]]:
  """Field name -> (shape, dtype) of a stored record, as read back from the dataset."""
  fields = {"id": ((), np.int64), "label": ((), np.int64)}
  fields.update({name: (spec.latent_shape, dtype) for name, dtype in _autoencoder_dtypes(spec).items()})
  for name, tokens, width in spec.encoders:
    if spec.quantize == "int8":
      fields[f"feat_{name}"] = ((tokens, width), np.int8)
      fields[f"feat_{name}_scale"] = ((tokens,), np.float16)
    else:
      fields[f"feat_{name}"] = ((tokens, width), np.float16)
  return fields


def tfds_features(spec: FeatureSpec) -> tfds.features.FeaturesDict:
  """The TFDS feature connectors of `stored_fields(spec)`; tensors are stored as raw bytes."""
  connectors = {name: tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)
                for name, (shape, dtype) in stored_fields(spec).items()}
  connectors["id"] = tfds.features.Scalar(np.int64)
  connectors["label"] = tfds.features.ClassLabel(num_classes=spec.num_classes)
  return tfds.features.FeaturesDict(connectors)


def encode_record(spec: FeatureSpec, record: Mapping) -> dict:
  """One record in the layout of `stored_fields(spec)`.

  record: 'id' (index in the image source), 'label', then 'ae_mean' and 'ae_std' [H, W, C] (VAE; any float dtype)
  or 'ae_pixels' uint8 [H, W, C] (identity autoencoder), and per encoder 'feat_<name>' [tokens, width] (any float
  dtype). Floats are cast to float16, or the features quantised to int8 when spec.quantize is 'int8'.
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
  for name, dtype in _autoencoder_dtypes(spec).items():
    value = np.asarray(record[name])
    if dtype == np.uint8 and value.dtype != np.uint8:
      raise ValueError(f"record {record_id}: field {name} is {value.dtype}; it must be the uint8 image as is.")
    encoded[name] = value.astype(dtype)
  for name, _, _ in spec.encoders:
    if spec.quantize == "int8":
      encoded[f"feat_{name}"], encoded[f"feat_{name}_scale"] = quantize_int8(record[f"feat_{name}"])
    else:
      encoded[f"feat_{name}"] = np.asarray(record[f"feat_{name}"]).astype(np.float16)
  for name, value in encoded.items():
    if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all():
      raise ValueError(f"record {record_id}: field {name} is not finite in float16 (NaN, or |x| > 65504).")
  return encoded


def dataset_name(directory: epath.PathLike) -> str:
  """TFDS name of the dataset in `directory`: `<name>` of `<data_dir>/<name>/<version>`, else the folder's name."""
  directory = epath.Path(directory)
  name = directory.parent.name if tfds.core.Version.is_valid(directory.name) else directory.name
  if not _DATASET_NAME.fullmatch(name):
    suggestion = re.sub(r"\W", "_", name)
    raise ValueError(f"feature dataset directory {directory}: {name!r} is not a TFDS dataset name (a letter, then "
                     f"letters, digits or _). Fix: name the folder e.g. {suggestion!r}.")
  return name


def _shard_template(directory: epath.Path, split: str) -> tfds.core.ShardedFileTemplate:
  return tfds.core.ShardedFileTemplate(data_dir=directory, dataset_name=dataset_name(directory), split=split,
                                       filetype_suffix=_FILE_FORMAT)


def _shard_path(directory: epath.Path, split: str, shard_index: int, num_shards: int) -> epath.Path:
  return _shard_template(directory, split).sharded_filepath(shard_index=shard_index, num_shards=num_shards)


def _ids_path(shard_path: epath.Path) -> epath.Path:
  return shard_path.parent / f"{shard_path.name}.ids.npy"


def shard_range(num_examples: int, shard_index: int, num_shards: int) -> range:
  """Source ids of one shard: contiguous blocks whose sizes differ by at most one."""
  return range(num_examples * shard_index // num_shards, num_examples * (shard_index + 1) // num_shards)


def pending_shards(directory: epath.PathLike, split: str, num_shards: int, process_index: int = 0,
                   process_count: int = 1) -> list[int]:
  """Shards that process `process_index` of `process_count` owns (index % count) and that are not finished yet."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in range(process_count={process_count}).")
  directory = epath.Path(directory)
  return [shard for shard in range(process_index, num_shards, process_count)
          if not _shard_path(directory, split, shard, num_shards).exists()]


def _write_atomically(path: epath.Path, data: bytes) -> None:
  """Writes `data` to a unique temporary file, then renames it to `path`: readers see all of it or nothing."""
  temporary = path.parent / f"{path.name}.{uuid.uuid4().hex}.tmp"
  temporary.write_bytes(data)
  temporary.rename(path)


def _spec_from_metadata(metadata: Mapping, directory: epath.Path) -> FeatureSpec:
  if _METADATA_KEY not in metadata:
    raise ValueError(f"{directory} is not a repa_jax feature dataset: its metadata has no {_METADATA_KEY!r}. "
                     f"{_PRECOMPUTE_FIX}")
  return FeatureSpec.from_dict(metadata[_METADATA_KEY])


def _read_spec(directory: epath.Path) -> FeatureSpec:
  path = directory / _METADATA_FILE
  if not path.exists():
    raise FileNotFoundError(f"no feature dataset in {directory} ({path.name} missing). {_PRECOMPUTE_FIX}")
  return _spec_from_metadata(json.loads(path.read_text()), directory)


def _record_spec(directory: epath.Path, spec: FeatureSpec) -> None:
  """Writes `spec` as the dataset's metadata, or checks that it equals the spec already written."""
  if not (directory / _METADATA_FILE).exists():
    _write_atomically(directory / _METADATA_FILE, json.dumps({_METADATA_KEY: spec.to_dict()}).encode())
    return
  written = _read_spec(directory)
  differences = [f"{field.name}: dataset has {getattr(written, field.name)!r}, this run {getattr(spec, field.name)!r}"
                 for field in dataclasses.fields(spec) if getattr(written, field.name) != getattr(spec, field.name)]
  if differences:
    raise ValueError(f"feature dataset {directory} was started with another spec ({'; '.join(differences)}). "
                     f"Fix: write to another directory, or delete {directory} to start over.")


def write_shard(directory: epath.PathLike, spec: FeatureSpec, split: str, shard_index: int, num_shards: int,
                records: Iterable[Mapping]) -> int:
  """Writes one shard of `split` from records laid out as `encode_record` takes them; returns the record count.

  The shard becomes visible (finished) only once complete; an interrupted shard is rewritten by the next run.
  The first writer records `spec` as the dataset's metadata, later writers must have the same spec.
  """
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _record_spec(directory, spec)
  features = tfds_features(spec)
  path = _shard_path(directory, split, shard_index, num_shards)
  partial = path.parent / f"{path.name}.incomplete"
  ids = []
  writer = array_record_module.ArrayRecordWriter(os.fspath(partial), "group_size:1")
  try:
    for record in records:
      encoded = encode_record(spec, record)
      writer.write(features.serialize_example(encoded))
      ids.append(encoded["id"])
  finally:
    writer.close()
  with _ids_path(path).open("wb") as file:
    np.save(file, np.asarray(ids, np.int64))
  partial.rename(path)
  return len(ids)


def _finished_shards(directory: epath.Path, split: str) -> list[epath.Path]:
  """Paths of all shards of `split`, in order; refuses missing shards or mixed shard counts."""
  template = _shard_template(directory, split)
  found = [info for info in (template.parse_filename_info(path.name) for path in directory.iterdir())
           if info is not None and info.split == split]
  if not found:
    raise FileNotFoundError(f"no finished shards of split {split!r} in {directory}. {_PRECOMPUTE_FIX}")
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
  spec = _read_spec(directory)
  paths = _finished_shards(directory, split)
  shard_lengths, ids = [], []
  for path in paths:
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    num_records = reader.num_records()
    reader.close()
    with _ids_path(path).open("rb") as file:
      shard_ids = np.load(file)
    if num_records != shard_ids.size:
      raise ValueError(f"{path} holds {num_records} records but {_ids_path(path).name} lists {shard_ids.size} ids. "
                       "Fix: delete both files and re-run --mode=precompute.")
    shard_lengths.append(num_records)
    ids.append(shard_ids)
  _check_exactly_once(np.concatenate(ids), num_examples, f"split {split!r} in {directory}")

  splits = {}
  if (directory / "dataset_info.json").exists():
    splits = dict(tfds.builder_from_directory(directory).info.splits.items())
  splits[split] = tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths,
                                      num_bytes=sum(path.stat().length for path in paths),
                                      filename_template=_shard_template(directory, split))
  name = dataset_name(directory)
  version = directory.name if tfds.core.Version.is_valid(directory.name) else _DEFAULT_VERSION
  identity = tfds.core.dataset_info.DatasetIdentity(name=name, version=tfds.core.Version(version),
                                                    data_dir=os.fspath(directory), module_name="")
  info = tfds.core.DatasetInfo(
      builder=identity, features=tfds_features(spec), disable_shuffling=True,
      metadata=tfds.core.MetadataDict({_METADATA_KEY: spec.to_dict()}),
      description=f"repa_jax precomputed features of {spec.source}; FeatureSpec in metadata.json.")
  info.set_file_format(_FILE_FORMAT)
  info.set_splits(tfds.core.SplitDict(list(splits.values())))
  info.write_to_directory(directory)


def open_features(directory: epath.PathLike, split: str):
  """(random-access data source of `split`, FeatureSpec) of a finalized feature dataset.

  `source[i]` is a dict laid out as `stored_fields(spec)`.
  """
  directory = epath.Path(directory)
  if not (directory / "dataset_info.json").exists():
    state = "was not finalized" if directory.exists() else "does not exist"
    raise FileNotFoundError(f"feature dataset {directory} {state}. Fix: run (or re-run, finished shards are kept) "
                            "--mode=precompute into it, or point the config at a precomputed dataset.")
  builder = tfds.builder_from_directory(directory)
  if split not in builder.info.splits:
    raise ValueError(f"feature dataset {directory} has no split {split!r}, only {list(builder.info.splits)}. "
                     f"Fix: precompute that split (--mode=precompute) or choose one of these.")
  return builder.as_data_source(split), _spec_from_metadata(builder.info.metadata, directory)


def check_spec(spec: FeatureSpec, requirement: DatasetRequirement) -> None:
  """Refuses a feature dataset (`spec`) that does not hold what a run needs, with a ValueError naming the field.

  Compared: every required encoder (present, tokens, width), then autoencoder, latent_shape, latent_scale,
  token_grid and num_classes. The dataset may hold more encoders; quantize (the reader dequantises), preprocessing
  and source (free text) are a dataset's own.
  """
  stored = {name: (tokens, width) for name, tokens, width in spec.encoders}
  for name, _, _ in requirement.encoders:
    if name not in stored:
      raise ValueError(f"feature dataset has no field feat_{name}: encoder {name!r} is not among its encoders "
                       f"{list(stored)}. {_PRECOMPUTE_FIX}")
    check_encoder_features(name, *stored[name], requirement, "feature dataset", _PRECOMPUTE_FIX)
  for field in ("autoencoder", "latent_shape", "latent_scale", "token_grid", "num_classes"):
    have, want = getattr(spec, field), getattr(requirement, field)
    if have != want:
      raise ValueError(f"feature dataset {field}: dataset has {have!r}, config expects {want!r}. {_PRECOMPUTE_FIX}")
