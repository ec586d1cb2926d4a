"""The Fashion-MNIST evaluation: the CNN classifier's metrics with their real-data floor, the per-class grid, and the
main job's last console line."""
import json

import numpy as np
import pytest

from configs import fashion_mnist
from repa_jax import main
from repa_jax.data import sources
from repa_jax.evaluate import evaluate
from repa_jax.sample import generate


@pytest.fixture
def fashion_mnist_config(tmp_path):
  """configs/fashion_mnist.py with a classifier of 30 steps cached under tmp_path (needs the Debian package)."""
  try:
    sources.fashion_mnist("train")
  except FileNotFoundError:
    pytest.skip("dataset-fashion-mnist is not installed (make test installs it)")
  config = fashion_mnist.get_config("reg=repa")
  config.precompute.encoder_dir = str(tmp_path / "encoders")
  config.evaluate.classifier_steps = 30
  return config


def test_metrics_come_with_their_real_data_floor(tmp_path, fashion_mnist_config):
  config = fashion_mnist_config
  test = sources.fashion_mnist("test")
  images = np.stack([test[i]["image"] for i in range(200)])
  labels = np.array([test[i]["label"] for i in range(200)])
  npz = tmp_path / "samples.npz"
  np.savez(npz, arr_0=images, arr_1=labels)
  noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
  np.savez(tmp_path / "noise.npz", arr_0=noise, arr_1=labels)

  real = evaluate.evaluate_npz(config, str(npz))
  assert json.loads((tmp_path / "samples.npz.metrics.json").read_text()) == real
  floor = real["floor"]
  assert floor["num_samples"] == 200 and floor["class_accuracy"] == real["feature_network_test_accuracy"]
  assert floor["fid"] > 0 and 0 <= floor["precision"] <= 1
  # Real test images against the test split score near the floor (train images); noise is far above it.
  assert real["fid"] < 2 * floor["fid"]
  noisy = evaluate.evaluate_npz(config, str(tmp_path / "noise.npz"))
  assert noisy["fid"] > 5 * noisy["floor"]["fid"]
  assert noisy["floor"] == floor  # the same real images, the same reference

  line = main.summary_line(real, str(npz))
  assert line.startswith(f"grid {tmp_path / 'grid.png'} | metrics {npz}.metrics.json | FD ")
  assert f"real-data floor {floor['fid']:.2f}" in line and f"class accuracy {real['class_accuracy']:.3f}" in line


def test_the_floor_refuses_the_reference_split_and_too_many_images(fashion_mnist_config):
  config = fashion_mnist_config
  config.evaluate.floor_split = "test"
  with pytest.raises(ValueError, match=r"config\.evaluate\.floor_split='test' is the reference split"):
    evaluate.real_images(config, 10)
  config.evaluate.floor_split = "train"
  with pytest.raises(ValueError, match="needs 70000 real images but split 'train'"):
    evaluate.real_images(config, 70_000)


def test_class_grid_has_a_labelled_row_per_class():
  rng = np.random.default_rng(0)
  labels = np.array([2, 0, 1, 0, 2, 2, 1, 0])
  images = rng.integers(0, 256, (8, 4, 4, 1), dtype=np.uint8)
  grid = generate.class_grid(images, labels, rows=10, columns=2, zoom=2, class_names=("zero", "one", "two"))
  margin = grid.shape[1] - 2 * 4 * 2
  assert grid.shape == (3 * 8, margin + 16, 3) and grid.dtype == np.uint8
  for row, cls in enumerate((0, 1, 2)):
    for column, i in enumerate(np.flatnonzero(labels == cls)[:2]):
      cell = grid[row * 8:(row + 1) * 8, margin + column * 8:margin + (column + 1) * 8, 0]
      np.testing.assert_array_equal(cell, np.kron(images[i, ..., 0], np.ones((2, 2), np.uint8)))
  assert (grid[:, :margin] < 255).any()  # the names are drawn in the margin
