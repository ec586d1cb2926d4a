"""Feature datasets: write -> read round trips, sharding by processes, resuming, int8 quantisation, spec checks."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from repa_jax.data import feature_writer, features
from repa_jax.specs.data import DatasetRequirement


def make_spec(**overrides) -> features.FeatureSpec:
  fields = dict(autoencoder="sd-vae-ft-mse", latent_shape=(4, 4, 2), latent_scale=0.18215,
                encoders=(("dino", 4, 8), ("clip", 4, 6)), token_grid=(2, 2), quantize="float16", num_classes=3,
                preprocessing="test", source="random")
  return features.FeatureSpec(**(fields | overrides))


def make_requirement(**overrides) -> DatasetRequirement:
  """What a run of make_spec()'s shapes needs, with `overrides`."""
  fields = dict(autoencoder="sd-vae-ft-mse", latent_shape=(4, 4, 2), latent_scale=0.18215,
                encoders=(("dino", 4, 8), ("clip", 4, 6)), token_grid=(2, 2), num_classes=3)
  return DatasetRequirement(**(fields | overrides))


def make_records(spec: features.FeatureSpec, ids) -> list[dict]:
  """Random records for `ids`, laid out as write_shard takes them (float32 features)."""
  records = []
  for record_id in ids:
    rng = np.random.default_rng(record_id)
    record = {"id": record_id, "label": record_id % spec.num_classes}
    if spec.autoencoder == features.IDENTITY_AUTOENCODER:
      record["ae_pixels"] = rng.integers(0, 256, spec.latent_shape, dtype=np.uint8)
    else:
      record["ae_mean"] = rng.normal(size=spec.latent_shape).astype(np.float32)
      record["ae_std"] = rng.uniform(0.01, 1, size=spec.latent_shape).astype(np.float32)
    for name, tokens, width in spec.encoders:
      record[f"feat_{name}"] = rng.normal(size=(tokens, width)).astype(np.float32) * 3
      if spec.class_tokens:
        record[f"cls_{name}"] = rng.normal(size=width).astype(np.float32)
    records.append(record)
  return records


def write_all(directory, spec, split, num_examples, num_shards, process_count=1):
  """What every process of a precompute run does, one simulated process after another."""
  for process_index in range(process_count):
    for shard in feature_writer.pending_shards(directory, split, num_shards, process_index, process_count):
      ids = feature_writer.shard_range(num_examples, shard, num_shards)
      feature_writer.write_shard(directory, spec, split, shard, num_shards, make_records(spec, ids))


def assert_bit_exact(source, spec, num_examples):
  """Every record equals the encoded input in every field, dtype and bit, and every id appears once."""
  assert len(source) == num_examples
  seen = []
  for index in range(num_examples):
    record = source[index]
    expected = feature_writer.encode_record(spec, make_records(spec, [int(record["id"])])[0])
    assert set(record) == set(features.stored_fields(spec))
    for name, (shape, dtype) in features.stored_fields(spec).items():
      value = np.asarray(record[name])
      assert value.shape == shape and value.dtype == dtype, name
      assert value.tobytes() == np.asarray(expected[name], dtype).tobytes(), name
    seen.append(int(record["id"]))
  assert sorted(seen) == list(range(num_examples))


@pytest.mark.parametrize("autoencoder, quantize, class_tokens", [
    ("sd-vae-ft-mse", "float16", False), ("sd-vae-ft-mse", "int8", False), ("identity", "float16", False),
    ("sd-vae-ft-mse", "int8", True)])
def test_round_trip_is_bit_exact(tmp_path, autoencoder, quantize, class_tokens):
  spec = make_spec(autoencoder=autoencoder, quantize=quantize, class_tokens=class_tokens)
  directory = tmp_path / "tiny_features" / "1.0.0"
  write_all(directory, spec, "train", num_examples=5, num_shards=1)
  feature_writer.finalize(directory, "train", num_examples=5)

  source, read_spec = features.open_features(directory, "train")
  assert read_spec == spec
  assert_bit_exact(source, spec, 5)
  by_name = tfds.data_source("tiny_features", split="train", data_dir=tmp_path, download=False)
  assert [record["id"] for record in by_name] == list(range(5))


def test_two_processes_write_their_own_shards(tmp_path):
  spec = make_spec(quantize="int8")
  assert feature_writer.pending_shards(tmp_path, "train", 2, process_index=0, process_count=2) == [0]
  assert feature_writer.pending_shards(tmp_path, "train", 2, process_index=1, process_count=2) == [1]
  write_all(tmp_path, spec, "train", num_examples=7, num_shards=2, process_count=2)
  write_all(tmp_path, spec, "test", num_examples=3, num_shards=2, process_count=2)
  feature_writer.finalize(tmp_path, "train", num_examples=7)
  feature_writer.finalize(tmp_path, "test", num_examples=3)

  builder = tfds.builder_from_directory(tmp_path)
  assert builder.info.splits["train"].shard_lengths == [3, 4]
  assert builder.info.splits["test"].shard_lengths == [1, 2]
  assert_bit_exact(builder.as_data_source("train"), spec, 7)
  assert_bit_exact(builder.as_data_source("test"), spec, 3)


def test_rerun_keeps_finished_shards_and_redoes_the_interrupted_one(tmp_path):
  spec = make_spec()
  ids = feature_writer.shard_range(6, 1, 2)
  feature_writer.write_shard(tmp_path, spec, "train", 0, 2, make_records(spec, feature_writer.shard_range(6, 0, 2)))

  def crashing_records():
    yield make_records(spec, ids)[0]
    raise RuntimeError("preempted")

  with pytest.raises(RuntimeError, match="preempted"):
    feature_writer.write_shard(tmp_path, spec, "train", 1, 2, crashing_records())
  assert feature_writer.pending_shards(tmp_path, "train", 2) == [1]
  with pytest.raises(ValueError, match=r"shards \[1\] of 2 are not finished"):
    feature_writer.finalize(tmp_path, "train", num_examples=6)

  write_all(tmp_path, spec, "train", num_examples=6, num_shards=2)
  assert feature_writer.pending_shards(tmp_path, "train", 2) == []
  feature_writer.finalize(tmp_path, "train", num_examples=6)
  assert_bit_exact(features.open_features(tmp_path, "train")[0], spec, 6)


def test_finalize_refuses_repeated_and_missing_ids(tmp_path):
  spec = make_spec()
  feature_writer.write_shard(tmp_path, spec, "train", 0, 1, make_records(spec, [0, 1, 1]))
  with pytest.raises(ValueError, match=r"exactly once.*1 ids missing \[2\], 1 repeated \[1\]"):
    feature_writer.finalize(tmp_path, "train", num_examples=3)
  with pytest.raises(FileNotFoundError, match="was not finalized"):
    features.open_features(tmp_path, "train")


def test_int8_quantisation_error_is_at_most_half_a_step():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 32)).astype(np.float32) * rng.uniform(1e-3, 100, size=(2, 16, 1))
  x[0, 3] = 0  # an all-zero token
  quantized, scale = features.quantize_int8(x)
  assert quantized.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (2, 16)
  assert np.abs(quantized).max() <= 127
  restored = features.dequantize_int8(quantized, scale)
  assert np.all(np.abs(restored - x) <= scale.astype(np.float32)[..., None] * 0.5 * (1 + 1e-6))
  assert np.all(restored[0, 3] == 0)
  np.testing.assert_array_equal(features.dequantize_int8(jnp.asarray(quantized), jnp.asarray(scale)), restored)


@pytest.mark.parametrize("expected, message", [
    (make_requirement(token_grid=(4, 4), encoders=(("dino", 16, 8),)),
     r"encoder 'dino' gives 4 tokens but the SiT's token grid \(4, 4\) has 16"),
    (make_requirement(encoders=(("dino", 4, 16),)),
     "encoder 'dino' features are 8 wide but config.align.encoders says 16"),
    (make_requirement(encoders=(("mae", 4, 8),)), "no field feat_mae"),
    (make_requirement(autoencoder="identity"), "autoencoder: dataset has 'sd-vae-ft-mse', config expects 'identity'"),
    (make_requirement(latent_shape=(8, 8, 2)),
     r"latent_shape: dataset has \(4, 4, 2\), config expects \(8, 8, 2\)"),
    (make_requirement(class_tokens=True), "no class tokens .*REG"),
])
def test_check_spec_refuses_a_mismatch(expected, message):
  with pytest.raises(ValueError, match=message) as error:
    features.check_spec(make_spec(), expected)
  assert "Fix:" in str(error.value)


def test_check_spec_accepts_a_subset_of_encoders_and_other_quantisation():
  features.check_spec(make_spec(quantize="int8", source="elsewhere"), make_requirement(encoders=(("clip", 4, 6),)))


def test_spec_from_metadata_refuses_a_missing_field():
  fields = make_spec().to_dict()
  assert features.FeatureSpec.from_dict(fields) == make_spec()
  del fields["class_tokens"]  # datasets written before REG: no class tokens
  assert features.FeatureSpec.from_dict(fields) == make_spec(class_tokens=False)
  del fields["token_grid"]
  with pytest.raises(ValueError, match=r"fields \['token_grid'\] missing"):
    features.FeatureSpec.from_dict(fields)


def test_write_refuses_records_that_do_not_fit_the_spec(tmp_path):
  spec = make_spec()
  (record,) = make_records(spec, [0])
  with pytest.raises(ValueError, match=r"field feat_dino has shape \(4, 9\), the spec expects \(4, 8\)"):
    feature_writer.write_shard(tmp_path, spec, "train", 0, 1, [record | {"feat_dino": np.zeros((4, 9))}])
  with pytest.raises(ValueError, match=r"fields \['feat_clip'\] missing"):
    feature_writer.write_shard(tmp_path, spec, "train", 0, 1, [{k: v for k, v in record.items() if k != "feat_clip"}])
  with pytest.raises(ValueError, match="latent_scale: dataset has 0.18215, this run 1.0"):
    feature_writer.write_shard(tmp_path, dataclasses.replace(spec, latent_scale=1.0), "train", 0, 1, [record])


def test_open_features_names_a_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist. Fix: run"):
    features.open_features(tmp_path / "absent", "train")
