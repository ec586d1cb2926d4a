"""Image sources: random access to labelled uint8 images.

Every source is an `ImageSource`: `len(source)` images, `source[i] -> {'id': i, 'image': uint8 [H, W, C],
'label': int}`, with `num_classes` and `image_shape` (H, W, C). Sources are picklable (data-loader workers).
"""

import dataclasses
import functools
import gzip
from typing import Callable

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

FASHION_MNIST_DIRECTORY = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILE_PREFIX = {"train": "train", "test": "t10k"}
FASHION_MNIST_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                             "Ankle boot")
_FASHION_MNIST_CLASSES = len(FASHION_MNIST_CLASS_NAMES)
# IDX magic number of unsigned-byte data: 0x08 type code, then the number of dimensions.
_IDX_UBYTE_MAGIC = 0x800
IMAGE_FILE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """`num_examples` labelled images; `load(i) -> (uint8 [H, W, C] image, label)`.

  `image_shape` is (H, W, C); H and W are None when the images differ in size.
  """

  num_examples: int
  num_classes: int
  image_shape: tuple[int | None, int | None, int]
  load: Callable[[int], tuple[np.ndarray, int]]

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"image {index} out of range: the source has {self.num_examples} images")
    image, label = self.load(index)
    return {"id": index, "image": image, "label": int(label)}


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
  """ADM centre crop of a PIL image of any size -> uint8 [resolution, resolution, C].

  Halves the image with a box filter while its short side is >= 2 * resolution, resizes it (bicubic) so that its
  short side is `resolution`, then cuts out the centre square.
  """
  while min(image.size) >= 2 * resolution:
    image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
  scale = resolution / min(image.size)
  image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
  pixels = np.asarray(image)
  top = (pixels.shape[0] - resolution) // 2
  left = (pixels.shape[1] - resolution) // 2
  return pixels[top:top + resolution, left:left + resolution].reshape(resolution, resolution, -1)


def fashion_mnist(split: str, directory: str = FASHION_MNIST_DIRECTORY) -> ImageSource:
  """Fashion-MNIST from its IDX gz files: 'train' (60000) or 'test' (10000) images [28, 28, 1], 10 classes."""
  if split not in _FASHION_MNIST_FILE_PREFIX:
    raise ValueError(f"Fashion-MNIST split {split!r} unknown; use one of {list(_FASHION_MNIST_FILE_PREFIX)}.")
  prefix = epath.Path(directory) / _FASHION_MNIST_FILE_PREFIX[split]
  image_path = epath.Path(f"{prefix}-images-idx3-ubyte.gz")
  label_path = epath.Path(f"{prefix}-labels-idx1-ubyte.gz")
  for path in (image_path, label_path):
    if not path.exists():
      raise FileNotFoundError(
          f"Fashion-MNIST file {path} not found. Fix: `apt-get install dataset-fashion-mnist`, or set "
          "config.precompute.source_dir to the folder holding the *-ubyte.gz files.")
  images = read_idx_ubyte(image_path, ndim=3)[..., None]
  labels = read_idx_ubyte(label_path, ndim=1)
  if len(images) != len(labels):
    raise ValueError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels.")
  if labels.max() >= _FASHION_MNIST_CLASSES:
    raise ValueError(f"{label_path} holds label {labels.max()}; Fashion-MNIST labels are 0..9.")
  return ImageSource(len(labels), _FASHION_MNIST_CLASSES, images.shape[1:],
                     functools.partial(_array_item, images, labels))


def read_idx_ubyte(path: epath.PathLike, ndim: int) -> np.ndarray:
  """The uint8 array of `ndim` dimensions stored in a gzipped IDX file (the MNIST format)."""
  data = gzip.decompress(epath.Path(path).read_bytes())
  magic = int.from_bytes(data[:4], "big")
  if magic != _IDX_UBYTE_MAGIC + ndim:
    raise ValueError(f"{path}: IDX magic number {magic:#x}, expected {_IDX_UBYTE_MAGIC + ndim:#x} "
                     f"(unsigned bytes, {ndim} dimensions). Is it the right file?")
  shape = tuple(int(size) for size in np.frombuffer(data, ">u4", count=ndim, offset=4))
  header_size = 4 + 4 * ndim
  if len(data) - header_size != np.prod(shape):
    raise ValueError(f"{path}: header says shape {shape} but it holds {len(data) - header_size} bytes of data "
                     "(truncated download?).")
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def _array_item(images: np.ndarray, labels: np.ndarray, index: int) -> tuple[np.ndarray, int]:
  return images[index], labels[index]


def image_folder(root: epath.PathLike, resolution: int) -> ImageSource:
  """JPEG/PNG images under `root/<class>/`, ADM centre-cropped to RGB [resolution, resolution, 3].

  Labels number the class folders in sorted order; ids number the images class by class, in sorted file order.
  Hidden entries and files without a JPEG/PNG suffix are ignored.
  """
  root = epath.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"image folder {root} not found. Fix: set config.precompute.source_dir to a folder with one "
                            "sub-folder of JPEG/PNG images per class.")
  class_folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
  files, labels = [], []
  for label, folder in enumerate(class_folders):
    images = sorted(path for path in folder.iterdir()
                    if path.suffix.lower() in IMAGE_FILE_SUFFIXES and not path.name.startswith("."))
    files += images
    labels += [label] * len(images)
  if not files:
    raise ValueError(f"image folder {root} holds no class sub-folders with {'/'.join(IMAGE_FILE_SUFFIXES)} files. "
                     "Fix: arrange the images as <root>/<class name>/<image>.")
  return ImageSource(len(files), len(class_folders), (resolution, resolution, 3),
                     functools.partial(_load_image_file, tuple(files), tuple(labels), resolution))


def _load_image_file(files: tuple[epath.Path, ...], labels: tuple[int, ...], resolution: int,
                     index: int) -> tuple[np.ndarray, int]:
  with files[index].open("rb") as file, Image.open(file) as image:
    return center_crop(image.convert("RGB"), resolution), labels[index]


def tfds_images(name: str, split: str, data_dir: epath.PathLike | None = None,
                resolution: int | None = None) -> ImageSource:
  """An image-classification dataset prepared in TFDS as ArrayRecord (read without TensorFlow).

  Images and labels are the dataset's supervised keys; with `resolution`, images are ADM centre-cropped to
  [resolution, resolution, C], otherwise returned as stored.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except tfds.core.DatasetNotFoundError:
    prepared = False
  if not prepared:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir={data_dir}. Fix: prepare it there with "
        f"`tfds build {name} --file_format=array_record --data_dir=<data_dir>`, or set config.precompute.source_dir to the "
        "data_dir where it is prepared.")
  if builder.info.supervised_keys is None:
    raise ValueError(f"TFDS dataset {name!r} declares no supervised keys (image, label); only image-classification "
                     "datasets can be image sources.")
  image_key, label_key = builder.info.supervised_keys
  records = builder.as_data_source(split)
  stored_shape = builder.info.features[image_key].shape
  image_shape = stored_shape if resolution is None else (resolution, resolution, stored_shape[-1])
  return ImageSource(len(records), builder.info.features[label_key].num_classes, image_shape,
                     functools.partial(_load_tfds_record, records, image_key, label_key, resolution))


def _load_tfds_record(records, image_key: str, label_key: str, resolution: int | None,
                      index: int) -> tuple[np.ndarray, int]:
  record = records[index]
  image = record[image_key]
  if resolution is not None:
    image = center_crop(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), resolution)
  return image, record[label_key]


def fashion_mnist_arrays(split: str, directory: str = FASHION_MNIST_DIRECTORY) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [N, 28, 28, 1] images and int64 [N] labels of a Fashion-MNIST split."""
  source = fashion_mnist(split, directory)
  items = [source[i] for i in range(len(source))]
  return np.stack([item["image"] for item in items]), np.array([item["label"] for item in items])
