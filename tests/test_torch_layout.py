"""The PyTorch checkpoint reader without PyTorch: torch.save's zip files read back equal to torch.load's tensors
(dtypes, views, shared storages, nested containers, argparse args), and foreign classes refused by name."""
import argparse
import collections

import numpy as np
import pytest

from repa_jax.convert.torch_layout import load_state_dict, read_torch_zip

torch = pytest.importorskip("torch")  # writes the files the reader is checked on


def test_torch_save_files_read_back_as_torch_loads_them(tmp_path):
  torch.manual_seed(0)
  base = torch.randn(6, 5)
  saved = {
      "model": collections.OrderedDict(w=base, half=torch.randn(3, 4).half(), bf16=torch.randn(7).bfloat16(),
                                       steps=torch.arange(5), mask=torch.tensor([True, False])),
      "views": {"transposed": base.t(), "slice": base[2:, 1:4], "param": torch.nn.Parameter(torch.randn(2, 2))},
      "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
      "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=8)}
  path = str(tmp_path / "checkpoint.pt")
  torch.save(saved, path)
  expected = torch.load(path, weights_only=False)
  got = read_torch_zip(path)
  for group in ("model", "views"):
    for name, tensor in expected[group].items():
      value = got[group][name]
      assert value.shape == tuple(tensor.shape) and str(value.dtype) == str(tensor.dtype).removeprefix("torch."), name
      np.testing.assert_array_equal(value.astype(np.float64), tensor.detach().double().numpy(), err_msg=name)
  assert got["opt"] == {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
  assert vars(got["args"]) == {"model": "SiT-XL/2", "encoder_depth": 8}
  state = load_state_dict(path)  # floats as float32, integers kept
  assert state["model"]["half"].dtype == np.float32 and state["model"]["steps"].dtype == np.int64


class Foreign:
  pass


def test_a_pickled_object_that_is_not_a_tensor_is_refused(tmp_path):
  path = str(tmp_path / "odd.pth")
  torch.save({"w": torch.zeros(2), "odd": Foreign()}, path)
  with pytest.raises(Exception, match=r"odd.pth: the pickle holds a .*Foreign, which is not a tensor"):
    load_state_dict(path)
  legacy = tmp_path / "legacy.pth"
  torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match="not in torch.save's zip format"):
    load_state_dict(str(legacy))
