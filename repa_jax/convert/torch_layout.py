"""Reading PyTorch state dicts as NumPy, and the layout changes every converter needs (PyTorch -> Flax).

A `.pt`/`.pth`/`.bin` file in torch.save's zip format is read without PyTorch: its pickle through an unpickler that
builds only tensors (as ndarrays), containers and argparse namespaces (what torch's weights-only loader lets through
for REPA's training checkpoints), its storages from the archive. `.safetensors` needs the `safetensors` package
(extra `imagenet`).
"""
import argparse
import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np

try:
  from safetensors.numpy import load_file as load_safetensors
except ImportError:  # optional: pip install -e ".[imagenet]"
  load_safetensors = None

# torch.save's storage classes -> the NumPy dtype of their bytes.
STORAGE_DTYPES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
                  "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
                  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def _rebuild_tensor(storage, offset, size, stride, *_):
  """torch._utils._rebuild_tensor_v2: a view of `storage` (elements) -> an ndarray copy."""
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * itemsize for s in stride)).copy()


class _WeightsUnpickler(pickle.Unpickler):
  """torch.save's data.pkl -> nested containers of ndarrays; any other class is refused."""

  def __init__(self, archive: zipfile.ZipFile, root: str, path: str):
    super().__init__(archive.open(f"{root}/data.pkl"))
    self._archive, self._root, self._path = archive, root, path

  def find_class(self, module, name):
    allowed = {("collections", "OrderedDict"): collections.OrderedDict, ("argparse", "Namespace"): argparse.Namespace,
               ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
               **{("torch", n): np.dtype(d) for n, d in STORAGE_DTYPES.items()}}
    if (module, name) not in allowed:
      raise pickle.UnpicklingError(f"{self._path}: the pickle holds a {module}.{name}, which is not a tensor or a "
                                   "container of tensors; save the state dict alone (or as .safetensors)")
    return allowed[module, name]

  def persistent_load(self, pid):
    _, dtype, key, _, _ = pid  # ('storage', storage class, key, location, numel)
    return np.frombuffer(self._archive.read(f"{self._root}/data/{key}"), dtype)


def read_torch_zip(path: str):
  """The object torch.save wrote to `path` (zip format, torch >= 1.6), tensors as ndarrays of their dtype."""
  with zipfile.ZipFile(path) as archive:
    root = archive.namelist()[0].split("/")[0]
    byteorder = archive.read(f"{root}/byteorder").decode() if f"{root}/byteorder" in archive.namelist() else "little"
    if byteorder != "little":
      raise ValueError(f"{path}: a {byteorder}-endian checkpoint; re-save it on a little-endian machine")
    return _WeightsUnpickler(archive, root, path).load()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A checkpoint file as {name: float32/int ndarray}: `.safetensors`, or a PyTorch pickle (`.pt`/`.pth`/`.bin`,
  torch.save's zip format). A pickle holding {'model': ..., 'ema': ...} etc. is returned as saved."""
  if path.endswith(".safetensors"):
    if load_safetensors is None:
      raise ImportError(f"{path}: reading .safetensors needs the safetensors package: pip install -e '.[imagenet]'")
    return load_safetensors(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not in torch.save's zip format (a pre-1.6 PyTorch file?): re-save it with "
                     "torch >= 1.6 (torch.save(torch.load(path), path)) or as .safetensors")
  return to_numpy(read_torch_zip(path))


def to_numpy(tree):
  """torch tensors or ndarrays in a (nested) dict -> float32 (or integer) ndarrays."""
  if isinstance(tree, dict):
    return {k: to_numpy(v) for k, v in tree.items()}
  if hasattr(tree, "detach"):
    tree = tree.detach().cpu().float().numpy() if tree.is_floating_point() else tree.detach().cpu().numpy()
  if isinstance(tree, np.ndarray) and not np.issubdtype(tree.dtype, np.integer) and tree.dtype != np.bool_:
    return tree.astype(np.float32)
  return tree


def linear_kernel(weight: np.ndarray) -> np.ndarray:
  """torch nn.Linear weight [out, in] -> Flax kernel [in, out]."""
  return np.ascontiguousarray(weight.T)


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch nn.Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out] (NHWC convolution)."""
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def take(state: dict[str, np.ndarray], key: str) -> np.ndarray:
  """state[key], or a KeyError naming the missing key and a few present ones (a wrong layout or model size)."""
  if key not in state:
    near = sorted(k for k in state if k.split(".")[0] == key.split(".")[0])[:8]
    raise KeyError(f"weight {key!r} is not in the checkpoint (keys with the same prefix: {near}); "
                   "is it the layout and model size the converter was asked for?")
  return state[key]
