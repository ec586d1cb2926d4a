"""Images -> project-trained encoder -> precompute (resumable, exactly once) -> train from the feature dataset."""
import jax
import numpy as np

from configs import fashion_mnist
from repa_jax.data import features, sources
from repa_jax.data.precompute import precompute
from repa_jax.train.loop import train


def small_fashion_mnist(tmp_path, directory):
  config = fashion_mnist.get_config("reg=both")
  config.model.update(depth=2, width=32, num_heads=2)
  config.align.update(block=1, projector_dim=32)
  config.disperse.update(blocks=(2,), group_size=8)
  config.data.directory = str(tmp_path / "fm_features")
  config.precompute.update(source_dir=directory, limit=200, splits=("train",), num_shards=3,
                           encoder_dir=str(tmp_path / "encoders"), encoder_steps=20, batch_size=64)
  config.train.update(batch_size=16, steps=4, log_every=2, checkpoint_every=2)
  config.evaluate.every_steps = None
  return config


def test_precompute_then_train(tmp_path, fashion_mnist_dir):
  config = small_fashion_mnist(tmp_path, fashion_mnist_dir)
  precompute(config)
  source, spec = features.open_features(config.data.directory, "train")
  assert len(source) == 200 and sorted(int(source[i]["id"]) for i in range(200)) == list(range(200))
  assert spec.encoders == (("fmnist_vit", 49, config.align.encoders[0][1]),)
  images = sources.fashion_mnist("train", fashion_mnist_dir)
  np.testing.assert_array_equal(source[5]["ae_pixels"], images[5]["image"])

  # A killed run leaves a shard unfinished: the re-run writes only that one, and the dataset is whole again.
  shard = next(p for p in (tmp_path / "fm_features").iterdir() if p.name.endswith("-00001-of-00003"))
  shard.rename(shard.parent / (shard.name + ".incomplete"))
  untouched = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "fm_features").iterdir() if "-of-" in p.name}
  precompute(config)
  rewritten = [p.name for p in (tmp_path / "fm_features").iterdir()
               if p.name in untouched and p.stat().st_mtime_ns != untouched[p.name]]
  assert all("00001-of-00003" in name for name in rewritten)
  assert len(features.open_features(config.data.directory, "train")[0]) == 200

  state = jax.device_get(train(config, str(tmp_path / "workdir")))
  assert int(state["step"]) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert (tmp_path / "workdir" / "checkpoints" / "4").exists()
