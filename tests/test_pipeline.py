"""The grain pipeline over a feature dataset: process shards, determinism, resume, on-device batches, spec checks."""
import dataclasses

import chex
import jax
import numpy as np
import pytest

from configs import tiny
from repa_jax.data import feature_writer, features
from repa_jax.data.pipeline import FeatureBatches, process_batches, process_rows
from repa_jax.specs.data import dataset_requirement
from repa_jax.specs import sharding

NUM_EXAMPLES = 40


def tiny_feature_config(directory, quantize="float16"):
  """The tiny SiT config (8x8x4 latents, 16 tokens, one 16-wide encoder) reading a feature dataset."""
  config = tiny.get_config("reg=repa")
  config.data.update(source="features", directory=str(directory), autoencoder="sd-vae-ft-mse")
  return config


def write_dataset(directory, config, quantize="float16"):
  spec = features.FeatureSpec(**dataclasses.asdict(dataset_requirement(config)), quantize=quantize, source="random",
                                preprocessing="")
  (name, tokens, width), = spec.encoders
  for shard in range(2):
    ids = feature_writer.shard_range(NUM_EXAMPLES, shard, 2)
    rng = np.random.default_rng(shard)
    records = [{"id": i, "label": i % 10, "ae_mean": rng.normal(size=spec.latent_shape),
                "ae_std": rng.uniform(0.1, 1, spec.latent_shape), f"feat_{name}": rng.normal(size=(tokens, width)),
                **({f"cls_{name}": rng.normal(size=width)} if spec.class_tokens else {})} for i in ids]
    feature_writer.write_shard(directory, spec, "train", shard, 2, records)
  feature_writer.finalize(directory, "train", NUM_EXAMPLES)
  return features.open_features(directory, "train")[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  directory = tmp_path_factory.mktemp("features") / "toy_features"
  config = tiny_feature_config(directory)
  return config, write_dataset(directory, config)





@pytest.mark.parametrize("order", ["process", "interleaved"])
def test_process_slices_are_disjoint_and_make_the_global_batch(dataset, order):
  _, source = dataset
  fields = {"id"}
  devices = jax.devices()
  # Two pretend processes of 4 devices each; the mesh lists them in process order or alternating (as a topology-aware
  # mesh may), so that each process holds half of the batch's rows: contiguous, or every other one.
  listed = devices if order == "process" else [devices[i // 2 + 4 * (i % 2)] for i in range(8)]
  batch_sharding = sharding.batch_sharding(sharding.make_mesh(("data", "fsdp"), (8, 1), listed))
  rows = [process_rows(batch_sharding, 8, devices[4 * p:4 * p + 4]) for p in range(2)]
  assert rows[0].tolist() == ([0, 1, 2, 3] if order == "process" else [0, 2, 4, 6])
  whole = process_batches(source, seed=3, global_batch=8, rows=process_rows(batch_sharding, 8), fields=fields)
  halves = [process_batches(source, seed=3, global_batch=8, rows=rows[p], fields=fields) for p in range(2)]
  seen = []
  for b in range(5):  # one epoch = 40 records = 5 global batches
    placed = np.empty(8, int)  # the global batch as make_array_from_process_local_data assembles it
    for p in range(2):
      placed[rows[p]] = halves[p][b]["id"]
    assert placed.tolist() == whole[b]["id"].tolist()
    seen += whole[b]["id"].tolist()
  assert sorted(seen) == list(range(NUM_EXAMPLES))  # every record exactly once per epoch
  second_epoch = sum((whole[b]["id"].tolist() for b in range(5, 10)), [])
  assert sorted(second_epoch) == list(range(NUM_EXAMPLES)) and second_epoch != seen  # reshuffled


def test_same_seed_same_batches_and_another_seed_differs(dataset):
  _, source = dataset
  make = lambda seed: process_batches(source, seed=seed, global_batch=8, rows=np.arange(8), fields={"id"})
  assert [make(1)[b]["id"].tolist() for b in range(3)] == [make(1)[b]["id"].tolist() for b in range(3)]
  assert make(1)[0]["id"].tolist() != make(2)[0]["id"].tolist()


def test_feature_batches_resume_with_the_identical_next_batch(dataset):
  config, _ = dataset
  mesh = sharding.make_mesh(("data", "fsdp"), (4, 2))
  batches = FeatureBatches(config, sharding.batch_sharding(mesh))
  first = next(batches)
  assert first["latent_mean"].shape == (8, 8, 8, 4) and first["features"]["toy_encoder"].shape == (8, 16, 16)
  assert first["latent_mean"].sharding == sharding.batch_sharding(mesh)
  state = batches.get_state()
  expected = jax.device_get(next(batches))
  resumed = FeatureBatches(config, sharding.batch_sharding(mesh))
  resumed.set_state(state)
  chex.assert_trees_all_equal(jax.device_get(next(resumed)), expected)


def test_int8_features_are_dequantised_on_device(tmp_path):
  config = tiny_feature_config(tmp_path / "toy_int8")
  source = write_dataset(tmp_path / "toy_int8", config, quantize="int8")
  mesh = sharding.make_mesh(("data", "fsdp"), (1, 1), jax.devices()[:1])
  batch = jax.device_get(next(FeatureBatches(config, sharding.batch_sharding(mesh))))
  stored = process_batches(source, seed=config.seed, global_batch=8, rows=np.arange(8),
                           fields={"feat_toy_encoder", "feat_toy_encoder_scale"})[0]
  assert stored["feat_toy_encoder"].dtype == np.int8
  np.testing.assert_allclose(batch["features"]["toy_encoder"],
                             features.dequantize_int8(stored["feat_toy_encoder"], stored["feat_toy_encoder_scale"]))
  assert batch["features"]["toy_encoder"].dtype == np.float32


def test_a_dataset_of_another_shape_is_refused(dataset):
  config, _ = dataset
  config = config.copy_and_resolve_references()
  config.align.encoders = (("toy_encoder", 32),)
  mesh = sharding.make_mesh(("data", "fsdp"), (1, 1), jax.devices()[:1])
  with pytest.raises(ValueError, match="encoder 'toy_encoder' features are 16 wide but config.align.encoders says 32"):
    FeatureBatches(config, sharding.batch_sharding(mesh))
  config.align.encoders = (("other", 16),)
  with pytest.raises(ValueError, match="no field feat_other"):
    FeatureBatches(config, sharding.batch_sharding(mesh))
  config.align.encoders = (("toy_encoder", 16),)
  config.reg.weight = 0.03  # REG reads class tokens, which this dataset does not hold
  with pytest.raises(ValueError, match="no class tokens"):
    FeatureBatches(config, sharding.batch_sharding(mesh))


def test_reg_batches_carry_the_stored_class_tokens(tmp_path):
  config = tiny_feature_config(tmp_path / "reg_features")
  config.reg.weight = 0.03
  source = write_dataset(tmp_path / "reg_features", config)
  mesh = sharding.make_mesh(("data", "fsdp"), (1, 1), jax.devices()[:1])
  batch = next(FeatureBatches(config, sharding.batch_sharding(mesh)))
  stored = {int(source[i]["id"]): source[i]["cls_toy_encoder"] for i in range(len(source))}
  chex.assert_shape(batch["class_tokens"]["toy_encoder"], (config.train.batch_size, 16))
  # Each row is the stored token of some record, with the record's label.
  for row, label in zip(np.asarray(batch["class_tokens"]["toy_encoder"]), np.asarray(batch["label"])):
    matches = [i for i, token in stored.items() if np.array_equal(token, row.astype(np.float16))]
    assert len(matches) == 1 and matches[0] % 10 == label
