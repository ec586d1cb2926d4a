"""Image sources: Fashion-MNIST IDX files, image folders with the ADM centre crop, TFDS image datasets."""

import gzip
import io
import os
import pickle

from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from repa_jax.data import sources

RED, GREEN = (255, 0, 0), (0, 255, 0)


def write_idx(path, array: np.ndarray, magic: int):
  header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def banded_image(width: int, height: int) -> Image.Image:
  """GREEN centre square of side min(width, height), RED margins left/right or top/bottom."""
  pixels = np.full((height, width, 3), RED, np.uint8)
  side = min(width, height)
  top, left = (height - side) // 2, (width - side) // 2
  pixels[top:top + side, left:left + side] = GREEN
  return Image.fromarray(pixels)


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIRECTORY),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_files_parse():
  for split, count in (("train", 60000), ("test", 10000)):
    source = sources.fashion_mnist(split)
    assert len(source) == count and source.num_classes == 10 and source.image_shape == (28, 28, 1)
    record = source[count - 1]
    assert record["id"] == count - 1
    assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
    labels = np.bincount([source[i]["label"] for i in range(count)], minlength=10)
    assert labels.tolist() == [count // 10] * 10  # Fashion-MNIST is balanced


def test_fashion_mnist_reads_idx_files_and_checks_magic_numbers(tmp_path):
  images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x803)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 4]), 0x801)
  source = sources.fashion_mnist("test", directory=tmp_path)
  assert len(source) == 3
  np.testing.assert_array_equal(source[2]["image"][..., 0], images[2])
  assert [source[i]["label"] for i in range(3)] == [9, 0, 4]
  assert pickle.loads(pickle.dumps(source))[1]["label"] == 0

  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 4]), 0x803)
  with pytest.raises(ValueError, match="IDX magic number 0x803, expected 0x801"):
    sources.fashion_mnist("test", directory=tmp_path)


def test_fashion_mnist_names_missing_files_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"absent/train-images-idx3-ubyte.gz not found.*apt-get install "
                     r"dataset-fashion-mnist.*config.precompute.source_dir"):
    sources.fashion_mnist("train", directory=tmp_path / "absent")


def test_image_folder_labels_by_sorted_folder_and_centre_crops(tmp_path):
  (tmp_path / "b_cat").mkdir()
  (tmp_path / "a_dog").mkdir()
  banded_image(64, 32).save(tmp_path / "a_dog" / "wide.png")
  banded_image(32, 80).save(tmp_path / "a_dog" / "tall.jpg", quality=100, subsampling=0)
  banded_image(16, 16).convert("L").save(tmp_path / "b_cat" / "grey.png")
  (tmp_path / "b_cat" / "notes.txt").write_text("not an image")

  source = sources.image_folder(tmp_path, resolution=16)
  assert len(source) == 3 and source.num_classes == 2 and source.image_shape == (16, 16, 3)
  assert [source[i]["label"] for i in range(3)] == [0, 0, 1]
  for index in range(3):
    image = source[index]["image"]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  # The crop keeps the centre square: wide and tall images come out all GREEN, without the RED margins.
  np.testing.assert_array_equal(source[1]["image"], np.broadcast_to(GREEN, (16, 16, 3)))
  np.testing.assert_allclose(source[0]["image"], np.broadcast_to(GREEN, (16, 16, 3)), atol=3)  # JPEG
  assert np.all(source[2]["image"] == source[2]["image"][..., :1])  # grey -> RGB


def test_center_crop_halves_large_images_then_resizes_the_short_side():
  # 384 x 128 -> 192 x 64 -> 96 x 32 (box), centre 32 x 32: exactly the GREEN square.
  np.testing.assert_array_equal(sources.center_crop(banded_image(384, 128), 32), np.broadcast_to(GREEN, (32, 32, 3)))
  # 45 x 30 -> 24 x 16 (bicubic), centre 16 x 16.
  np.testing.assert_array_equal(sources.center_crop(Image.new("RGB", (45, 30), GREEN), 16),
                                np.broadcast_to(GREEN, (16, 16, 3)))


def test_image_folder_names_a_missing_root(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent not found. Fix: set config.precompute.source_dir"):
    sources.image_folder(tmp_path / "absent", 16)


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """Four 12 x 8 RGB images in 2 classes, stored as PNG."""

  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = epath.Path(__file__).parent  # where TFDS looks for README/CITATIONS (the tests are no package)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                             "label": tfds.features.ClassLabel(num_classes=2)}),
        supervised_keys=("image", "label"), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for index in range(4):
      png = io.BytesIO()
      banded_image(12, 8).save(png, format="PNG")
      yield index, {"image": png.getvalue(), "label": index % 2}


def test_tfds_images_reads_an_array_record_dataset_without_tensorflow(tmp_path):
  TinyImages(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  stored = sources.tfds_images("tiny_images", "train", data_dir=tmp_path)
  assert len(stored) == 4 and stored.num_classes == 2 and stored.image_shape == (None, None, 3)
  assert stored[3]["label"] == 1
  np.testing.assert_array_equal(stored[3]["image"], np.asarray(banded_image(12, 8)))

  cropped = sources.tfds_images("tiny_images", "train", data_dir=tmp_path, resolution=4)
  assert cropped.image_shape == (4, 4, 3)
  np.testing.assert_array_equal(cropped[0]["image"], np.broadcast_to(GREEN, (4, 4, 3)))


def test_tfds_images_names_an_unprepared_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="'tiny_images' is not prepared.*--file_format=array_record"):
    sources.tfds_images("tiny_images", "train", data_dir=tmp_path)
