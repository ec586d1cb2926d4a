"""--mode=sample: the same samples on 1 or 8 devices, resumable chunks, and the ADM .npz written and read back."""
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from configs import tiny
from repa_jax.models.repa_sit import build_model
from repa_jax.specs.model import model_spec
from repa_jax.sample import generate
from repa_jax.train.loop import train


def pixel_config(sampler="sde"):
  """The tiny SiT in pixel space (identity autoencoder, 8x8 RGB), 12 samples in chunks of 8 with 4 steps."""
  config = tiny.get_config("reg=none")
  config.data.update(autoencoder="identity", latent_shape=(8, 8, 3), latent_scale=1.0)
  config.sample.update(sampler=sampler, steps=4, num_samples=12, batch_size=8, labels="uniform", cfg_scale=1.5)
  return config


def images_on(devices, config):
  mesh = Mesh(np.asarray(devices), ("data",))
  params = nnx.split(build_model(model_spec(config), jax.random.key(3)).sit)[1]
  return generate.generate_images(config, params, config.sample.num_samples, generate.make_sampler(config, mesh))


def test_samples_are_the_same_on_one_and_eight_devices():
  for sampler in ("sde", "heun"):
    config = pixel_config(sampler)
    (one, labels_one), (eight, labels_eight) = images_on(jax.devices()[:1], config), images_on(jax.devices(), config)
    assert one.shape == (12, 8, 8, 3) and one.dtype == np.uint8 and len(np.unique(one)) > 10
    np.testing.assert_array_equal(labels_one, labels_eight)
    np.testing.assert_array_equal(one, eight)


def test_generate_writes_an_adm_npz_and_resumes_from_its_chunks(tmp_path):
  config = pixel_config()
  config.train.update(steps=1, checkpoint_every=1)
  train(config, str(tmp_path))
  npz = generate.generate(config, str(tmp_path))
  with np.load(npz) as data:
    images, labels = data["arr_0"], data["arr_1"]
  assert images.shape == (12, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (12,)
  np.testing.assert_array_equal(labels, generate.sample_labels(config, 12))
  assert (npz.parent / "grid.png").exists()

  # A re-run reuses the finished chunks: a chunk overwritten on disk shows up in the new .npz unchanged.
  chunk = npz.parent / "chunks" / "chunk_00000.npy"
  np.save(chunk, np.zeros_like(np.load(chunk)))
  with np.load(generate.generate(config, str(tmp_path))) as data:
    np.testing.assert_array_equal(data["arr_0"][:8], 0)
    np.testing.assert_array_equal(data["arr_0"][8:], images[8:])
