"""FID Inception-v3 port: parity with pytorch-fid's `InceptionV3` (use_fid_inception=True) on random weights with
calibrated, perturbed BatchNorm statistics (pool features, logits, ADM's sFID slice), the torch-bilinear resize, and
converter errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repa_jax.convert import inception as convert
from repa_jax.convert.torch_layout import to_numpy
from repa_jax.models import inception

pfi = pytest.importorskip("pytorch_fid.inception")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def torch_net():
  """pytorch-fid's FID Inception3 with random weights (no download) and BatchNorms that matter: scales in [0.5, 1.5],
  biases ~ N(0, 0.2) and running statistics of a random image (calibrated: activations stay O(1))."""
  torch.manual_seed(0)
  with pytest.MonkeyPatch.context() as patch:  # the FID blocks have torchvision's parameter names and shapes
    patch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: pfi._inception_v3(
        num_classes=1008, aux_logits=False, weights=None).state_dict())
    net = pfi.fid_inception_v3()
  with torch.no_grad():
    for norm in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
      norm.weight.uniform_(0.5, 1.5)
      norm.bias.normal_(0, 0.2)
      norm.momentum = None  # cumulative average: after one batch, the running stats are that batch's
      norm.reset_running_stats()
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 64, 64), size=(299, 299), mode="bilinear")
    net.train()(2 * smooth - 1)  # an input like the test's upsampled 64 px images
  return net.eval()


@pytest.fixture(scope="module")
def state(torch_net) -> dict[str, np.ndarray]:
  return to_numpy(torch_net.state_dict())


def test_features_match_pytorch_fid(torch_net, state, monkeypatch):
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  monkeypatch.setattr(pfi, "fid_inception_v3", lambda: torch_net)
  reference = pfi.InceptionV3([3]).eval()  # resize to 299 and 2x - 1 inside, as pytorch-fid runs it
  captured = {}
  hook = torch_net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: captured.update(mixed_6_conv=out))
  with torch.no_grad():
    pool = reference(torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0)[0].flatten(1)
    logits = torch_net.fc(pool).numpy()
  hook.remove()
  spatial = captured["mixed_6_conv"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()  # ADM: [..., :7], flattened

  model = nnx.merge(convert.abstract_model()[0], convert.convert_state_dict(state))
  out = jax.device_get(nnx.jit(inception.features)(model, jnp.asarray(images)))
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008) and out["spatial"].shape == (2, 2023)
  for name, want, got in (("pool", pool.numpy(), out["pool"]), ("spatial", spatial, out["spatial"]),
                          ("logits", logits, out["logits"] + state["fc.bias"])):  # ours: without fc's bias (ADM)
    scale = np.abs(want).max()
    assert scale > 1e-2, f"{name}: degenerate reference features"
    # float32 rounding through ~50 layers: torch float32 itself is ~1e-4 * scale from torch float64 here
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-4 * scale, err_msg=name)


@pytest.mark.parametrize("shape", [(64, 64), (512, 512), (37, 300), (299, 299)])
def test_resize_matches_torch_bilinear(shape):
  images = np.random.default_rng(1).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
  want = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0, size=(299, 299),
                                         mode="bilinear", align_corners=False)
  want = 2 * want.permute(0, 2, 3, 1).numpy() - 1
  np.testing.assert_allclose(np.asarray(inception.preprocess(jnp.asarray(images))), want, rtol=0, atol=1e-6)
  floats = images.astype(np.float32) / 255.0
  np.testing.assert_allclose(np.asarray(inception.preprocess(jnp.asarray(floats))), want, rtol=0, atol=1e-6)


def test_converter_names_missing_and_unused_keys(state):
  missing = {k: v for k, v in state.items() if k != "Mixed_6d.branch1x1.bn.running_var"}
  with pytest.raises(KeyError, match=r"Mixed_6d\.branch1x1\.bn\.running_var"):
    convert.convert_state_dict(missing)
  with pytest.raises(ValueError, match=r"AuxLogits\.fc\.weight"):
    convert.convert_state_dict({**state, "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="RGB"):
    inception.preprocess(jnp.zeros((1, 28, 28, 1), jnp.uint8))
  with pytest.raises(ValueError, match="299"):
    nnx.merge(*convert.abstract_model())(jnp.zeros((1, 64, 64, 3)))
