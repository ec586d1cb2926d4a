"""Reading PyTorch state dicts as NumPy, and the layout changes every converter needs (PyTorch -> Flax)."""
import numpy as np


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A checkpoint file as {name: float32/int ndarray}: `.safetensors` (read without PyTorch) or a PyTorch pickle
  (`.pt`/`.pth`/`.bin`; needs torch). A pickle holding {'model': ..., 'ema': ...} etc. is returned as saved."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  import torch
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  return to_numpy(loaded)


def to_numpy(tree):
  """torch tensors in a (nested) dict -> float32 (or integer) ndarrays."""
  if isinstance(tree, dict):
    return {k: to_numpy(v) for k, v in tree.items()}
  if hasattr(tree, "detach"):
    array = tree.detach().cpu()
    return array.float().numpy() if array.is_floating_point() else array.numpy()
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
