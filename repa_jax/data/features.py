"""The format of a precomputed feature dataset (a TFDS dataset of autoencoder outputs and encoder features, one
ArrayRecord record per image): what it holds (`FeatureSpec`), the record layout and its int8 codec, the reader
(`open_features`), and the check of a dataset against what a run needs (`check_spec`). Writing lives in
`feature_writer.py`.

One dataset per (image source, resolution, autoencoder, encoders); records laid out as `stored_fields(spec)` says. A
dataset directory reads without TensorFlow through `open_features`, `tfds.builder_from_directory(directory)
.as_data_source(split)`, or `tfds.data_source(name, data_dir=...)` when the directory is `<data_dir>/<name>/<version>`.
It holds:

  <name>-<split>.array_record-<i>-of-<n>          finished shard i (written under a temporary name, then renamed)
  <name>-<split>.array_record-<i>-of-<n>.ids.npy  the source ids in shard i, for the writer's exactly-once check
  <name>-<split>.array_record-<i>-of-<n>.json     its record count and size in bytes, written last (integrity)
  metadata.json                                  the FeatureSpec and <name>, written by the first shard writer
  dataset_info.json, features.json               written by `finalize`; a split is readable from then on
"""

import dataclasses
import json
import re
from typing import Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from repa_jax.specs.data import DatasetRequirement, check_encoder_features

IDENTITY_AUTOENCODER = "identity"
QUANTIZATIONS = ("float16", "int8")
METADATA_FILE = "metadata.json"
METADATA_KEY = "feature_spec"
NAME_KEY = "dataset_name"
FILE_FORMAT = "array_record"
_DATASET_NAME = re.compile(r"[a-zA-Z]\w*")
_SHARD_FILE = re.compile(rf"([a-zA-Z]\w*)-\w+\.{FILE_FORMAT}-\d{{5}}-of-\d{{5}}")
# FeatureSpec fields added after datasets were first written, with the value those datasets have.
LATER_SPEC_FIELDS = {"class_tokens": False}
PRECOMPUTE_FIX = ("Fix: point the run at a feature dataset precomputed for this config, or precompute one "
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
    class_tokens: records also hold each encoder's class token [width] after its final norm ('cls_<name>', float16;
      REG's input). Datasets written before this field have none.
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
  class_tokens: bool = False

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
    fields = {**LATER_SPEC_FIELDS, **fields}
    missing = [name for name in names if name not in fields]
    unknown = [name for name in fields if name not in names]
    if missing or unknown:
      raise ValueError(f"feature dataset metadata: fields {missing} missing, {unknown} unknown; it was written by "
                       f"another version of repa_jax. {PRECOMPUTE_FIX}")
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


def autoencoder_dtypes(spec: FeatureSpec) -> dict[str, type]:
  """Autoencoder field name -> stored dtype; every such field is [H, W, C]."""
  if spec.autoencoder == IDENTITY_AUTOENCODER:
    return {"ae_pixels": np.uint8}
  return {"ae_mean": np.float16, "ae_std": np.float16}


def stored_fields(spec: FeatureSpec) -> dict[str, tuple[tuple[int, ...], type]]:
  """Field name -> (shape, dtype) of a stored record, as read back from the dataset."""
  fields = {"id": ((), np.int64), "label": ((), np.int64)}
  fields.update({name: (spec.latent_shape, dtype) for name, dtype in autoencoder_dtypes(spec).items()})
  for name, tokens, width in spec.encoders:
    if spec.quantize == "int8":
      fields[f"feat_{name}"] = ((tokens, width), np.int8)
      fields[f"feat_{name}_scale"] = ((tokens,), np.float16)
    else:
      fields[f"feat_{name}"] = ((tokens, width), np.float16)
    if spec.class_tokens:
      fields[f"cls_{name}"] = ((width,), np.float16)
  return fields


def tfds_features(spec: FeatureSpec) -> tfds.features.FeaturesDict:
  """The TFDS feature connectors of `stored_fields(spec)`; tensors are stored as raw bytes."""
  connectors = {name: tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)
                for name, (shape, dtype) in stored_fields(spec).items()}
  connectors["id"] = tfds.features.Scalar(np.int64)
  connectors["label"] = tfds.features.ClassLabel(num_classes=spec.num_classes)
  return tfds.features.FeaturesDict(connectors)


def dataset_name(directory: epath.PathLike) -> str:
  """TFDS name of the dataset in `directory`: the one its metadata (or its shards' file names) record once it exists,
  so a copied or renamed directory is read and resumed in place; for a new dataset `<name>` of
  `<data_dir>/<name>/<version>`, else the folder's name."""
  directory = epath.Path(directory)
  if (directory / METADATA_FILE).exists():
    recorded = json.loads((directory / METADATA_FILE).read_text()).get(NAME_KEY)
    if recorded:
      return recorded
  if directory.exists():
    names = sorted({m.group(1) for p in directory.iterdir() if (m := _SHARD_FILE.fullmatch(p.name))})
    if len(names) == 1:
      return names[0]
  name = directory.parent.name if tfds.core.Version.is_valid(directory.name) else directory.name
  if not _DATASET_NAME.fullmatch(name):
    suggestion = re.sub(r"\W", "_", name)
    raise ValueError(f"feature dataset directory {directory}: {name!r} is not a TFDS dataset name (a letter, then "
                     f"letters, digits or _). Fix: name the folder e.g. {suggestion!r}.")
  return name


def shard_template(directory: epath.Path, split: str) -> tfds.core.ShardedFileTemplate:
  return tfds.core.ShardedFileTemplate(data_dir=directory, dataset_name=dataset_name(directory), split=split,
                                       filetype_suffix=FILE_FORMAT)


def shard_path(directory: epath.Path, split: str, shard_index: int, num_shards: int) -> epath.Path:
  return shard_template(directory, split).sharded_filepath(shard_index=shard_index, num_shards=num_shards)


def _spec_from_metadata(metadata: Mapping, directory: epath.Path) -> FeatureSpec:
  if METADATA_KEY not in metadata:
    raise ValueError(f"{directory} is not a repa_jax feature dataset: its metadata has no {METADATA_KEY!r}. "
                     f"{PRECOMPUTE_FIX}")
  return FeatureSpec.from_dict(metadata[METADATA_KEY])


def read_spec(directory: epath.Path) -> FeatureSpec:
  path = directory / METADATA_FILE
  if not path.exists():
    raise FileNotFoundError(f"no feature dataset in {directory} ({path.name} missing). {PRECOMPUTE_FIX}")
  return _spec_from_metadata(json.loads(path.read_text()), directory)


VERIFY_FIX = ("Fix: re-run --mode=precompute with the same config and --config.precompute.verify=true: it re-reads "
              "every shard and rewrites only the damaged ones.")


class NamedRecords:
  """A split's records (`records[i]`, as the TFDS data source gives them) whose read errors name the shard file, the
  record in it and the fix, instead of a bare Riegeli / ArrayRecord error."""

  def __init__(self, source, split_info, directory: epath.Path):
    self._source, self._split, self._directory = source, split_info.name, directory
    self._starts = np.cumsum([0, *split_info.shard_lengths])
    self._paths = split_info.filepaths

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    try:
      return self._source[index]
    except Exception as error:
      shard = int(np.searchsorted(self._starts, index, side="right")) - 1
      first_line = (str(error).splitlines() or [""])[0][:200]
      raise RuntimeError(f"feature dataset {self._directory}: record {index - self._starts[shard]} of shard "
                         f"{self._paths[shard]} (record {index} of split {self._split!r}) cannot be read "
                         f"({type(error).__name__}: {first_line}). {VERIFY_FIX}") from error


def open_features(directory: epath.PathLike, split: str):
  """(random-access records of `split` (a `NamedRecords`), FeatureSpec) of a finalized feature dataset.

  `records[i]` is a dict laid out as `stored_fields(spec)`.
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
  records = NamedRecords(builder.as_data_source(split), builder.info.splits[split], directory)
  return records, _spec_from_metadata(builder.info.metadata, directory)


def check_spec(spec: FeatureSpec, requirement: DatasetRequirement) -> None:
  """Refuses a feature dataset (`spec`) that does not hold what a run needs, with a ValueError naming the field.

  Compared: every required encoder (present, tokens, width), the class tokens if required (REG), then autoencoder,
  latent_shape, latent_scale, token_grid and num_classes. The dataset may hold more encoders, and class tokens a run
  does not read; quantize (the reader dequantises), preprocessing and source (free text) are a dataset's own.
  """
  stored = {name: (tokens, width) for name, tokens, width in spec.encoders}
  for name, _, _ in requirement.encoders:
    if name not in stored:
      raise ValueError(f"feature dataset has no field feat_{name}: encoder {name!r} is not among its encoders "
                       f"{list(stored)}. {PRECOMPUTE_FIX}")
    check_encoder_features(name, *stored[name], requirement, "feature dataset", PRECOMPUTE_FIX)
  if requirement.class_tokens and not spec.class_tokens:
    raise ValueError("feature dataset has no class tokens (fields cls_<encoder>), which REG (config.reg.weight) "
                     "feeds the SiT: it was precomputed without REG. Fix: precompute this config into a new "
                     "config.data.directory, or set config.reg.weight=0.")
  for field in ("autoencoder", "latent_shape", "latent_scale", "token_grid", "num_classes"):
    have, want = getattr(spec, field), getattr(requirement, field)
    if have != want:
      raise ValueError(f"feature dataset {field}: dataset has {have!r}, config expects {want!r}. {PRECOMPUTE_FIX}")
