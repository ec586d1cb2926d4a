"""A damaged feature dataset is named and repairable: a truncated shard's read error names the file, the record and
the fix; `precompute.verify` rewrites only the damaged shard (and the cheap check catches a truncation by itself);
a dataset copied under another directory name is resumed and read in place."""
import pathlib
import shutil

import numpy as np
import pytest

from repa_jax.data import feature_writer, features
from repa_jax.data.pipeline import FeatureBatches
from repa_jax.data.precompute import precompute
from repa_jax.specs import sharding
from tests.test_end_to_end import small_fashion_mnist


@pytest.fixture
def dataset(tmp_path, fashion_mnist_dir):
  """The small Fashion-MNIST config and its precomputed dataset (200 images, 3 shards)."""
  config = small_fashion_mnist(tmp_path, fashion_mnist_dir)
  precompute(config)
  return config


def shard_file(config, index: int):
  return next(p for p in pathlib.Path(config.data.directory).iterdir()
              if p.name.endswith(f"-{index:05d}-of-00003"))


def damage_keeping_size(path) -> None:
  """Overwrites bytes in the middle of a shard (its size and footer stay): only a full read can find it."""
  data = bytearray(path.read_bytes())
  middle = len(data) // 3
  data[middle:middle + 4096] = bytes(4096)
  path.write_bytes(bytes(data))


def modified(directory, before: dict) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if p.name in before and p.stat().st_mtime_ns != before[p.name])


def mtimes(directory) -> dict:
  return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_a_damaged_shard_is_named_on_read_and_verify_rewrites_only_it(dataset):
  config, directory = dataset, pathlib.Path(dataset.data.directory)
  damaged = shard_file(config, 1)
  damage_keeping_size(damaged)
  records, _ = features.open_features(directory, "train")
  with pytest.raises(RuntimeError, match=rf"record \d+ of shard {damaged}.*precompute.verify=true"):
    for i in range(len(records)):
      records[i]
  # The cheap check (size and count) cannot see this damage; verify re-reads every record and rewrites that shard.
  assert feature_writer.pending_shards(directory, "train", 3) == []
  before = mtimes(directory)
  config.precompute.verify = True
  precompute(config)
  assert {name.split(".array_record-")[1][:14] for name in modified(directory, before) if "-of-" in name} == {
      "00001-of-00003"}
  records, _ = features.open_features(directory, "train")
  assert sorted(int(records[i]["id"]) for i in range(len(records))) == list(range(200))  # every record, once


def test_a_truncated_shard_fails_the_cheap_check_and_is_rewritten(dataset):
  config, directory = dataset, pathlib.Path(dataset.data.directory)
  truncated = shard_file(config, 2)
  truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
  assert feature_writer.pending_shards(directory, "train", 3) == [2]
  with pytest.raises(ValueError, match=rf"feature shard {truncated} is damaged: it is \d+ bytes"):
    feature_writer.finalize(directory, "train", 200)
  precompute(config)  # without verify: the recorded size alone finds it
  assert feature_writer.pending_shards(directory, "train", 3, verify=True) == []


def test_a_copied_dataset_is_resumed_and_read_in_place(dataset, tmp_path):
  config = dataset
  copy = tmp_path / "copied_elsewhere"
  shutil.copytree(config.data.directory, copy)
  assert features.dataset_name(copy) == features.dataset_name(config.data.directory)
  next(p for p in copy.iterdir() if p.name.endswith("-00000-of-00003")).unlink()  # a shard to redo in the copy
  config.data.directory = str(copy)
  precompute(config)
  assert sorted(p.name.split("-train.")[0] for p in copy.iterdir() if "-of-" in p.name) == ["fm_features"] * 9
  batch = next(FeatureBatches(config, sharding.batch_sharding(sharding.data_mesh())))
  assert np.isfinite(np.asarray(batch["latent_mean"])).all()
