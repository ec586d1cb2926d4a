"""DINOv2 port: parity with Hugging Face's Dinov2Model on tiny random models (both checkpoint layouts), torch-bicubic
position-embedding resampling and REPA's preprocessing against torch's interpolate, converter errors."""
import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repa_jax.convert import dinov2 as convert
from repa_jax.convert.torch_layout import load_state_dict
from repa_jax.models import dinov2

# 42 px = a 3 x 3 patch grid at patch 14; 32 wide, 2 blocks, 2 heads.
TINY = dinov2.DinoV2Spec(width=32, depth=2, num_heads=2, pretrained_size=42)


def abstract_model(spec: dinov2.DinoV2Spec, **kwargs) -> dinov2.DinoV2:
  """The module without its random init (`convert.load` fills every parameter)."""
  return nnx.eval_shape(lambda: dinov2.DinoV2(spec, nnx.Rngs(0), **kwargs))


@nnx.jit
def forward(model, images):
  return model(images)


def hf_model(spec: dinov2.DinoV2Spec):
  """A random Hugging Face DINOv2 (registers -> Dinov2WithRegistersModel) whose every weight is perturbed."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  kw = dict(hidden_size=spec.width, num_hidden_layers=spec.depth, num_attention_heads=spec.num_heads,
            mlp_ratio=int(spec.mlp_ratio), image_size=spec.pretrained_size, patch_size=spec.patch)
  if spec.num_registers:
    model = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=spec.num_registers, **kw))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(use_swiglu_ffn=spec.ffn == "swiglu", **kw))
  torch.manual_seed(0)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))  # LayerScale, LayerNorm affine and biases away from their init
  return model.eval()


def hub_layout(model, tmp_path) -> dict[str, np.ndarray]:
  """The model as the Hugging Face hub stores it (`save_pretrained` writes the safetensors layout)."""
  model.save_pretrained(tmp_path)
  return load_state_dict(str(tmp_path / "model.safetensors"))


def official_layout(hf: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
  """The same weights under the facebookresearch/dinov2 names (q, k, v fused into qkv)."""
  renames = [(r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.mask_token$", "mask_token"),
             (r"^embeddings\.position_embeddings$", "pos_embed"), (r"^embeddings\.register_tokens$", "register_tokens"),
             (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."), (r"^layernorm\.", "norm."),
             (r"^encoder\.layer\.", "blocks."), (r"attention\.output\.dense\.", "attn.proj."),
             (r"layer_scale(\d)\.lambda1", r"ls\1.gamma"), (r"mlp\.weights_in\.", "mlp.w12."),
             (r"mlp\.weights_out\.", "mlp.w3.")]
  out = {}
  for key, value in hf.items():
    if ".attention.attention." in key:
      continue
    for pattern, new in renames:
      key = re.sub(pattern, new, key)
    out[key] = value
  for i in range(depth):
    for kind in ("weight", "bias"):
      out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(
          [hf[f"encoder.layer.{i}.attention.attention.{name}.{kind}"] for name in ("query", "key", "value")])
  return out


def hf_tokens(model, images: np.ndarray, registers: int) -> dict[str, np.ndarray]:
  """Hugging Face's normed tokens as DinoV2 returns them: patch tokens, and the class token (x_norm_clstoken)."""
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  return {"patch_tokens": out[:, 1 + registers:], "class_token": out[:, 0]}


@pytest.mark.parametrize("spec", [TINY, dataclasses.replace(TINY, ffn="swiglu"),
                                  dataclasses.replace(TINY, num_registers=4, interpolate_offset=0.0,
                                                      interpolate_antialias=True)],
                         ids=["mlp", "swiglu", "registers"])
def test_matches_hugging_face_in_both_layouts(spec, tmp_path):
  torch_model = hf_model(spec)
  hf = hub_layout(torch_model, tmp_path)
  images = np.random.default_rng(0).normal(size=(2, 42, 42, 3)).astype(np.float32)
  expected = hf_tokens(torch_model, images, spec.num_registers)
  for params in (convert.from_hf(hf, spec), convert.from_official(official_layout(hf, spec.depth), spec)):
    tokens = forward(convert.load(abstract_model(spec), params), jnp.asarray(images))
    chex.assert_shape((tokens["patch_tokens"], tokens["class_token"]), ((2, 9, spec.width), (2, spec.width)))
    chex.assert_trees_all_close(tokens, expected, rtol=1e-5, atol=1e-5)
  if spec.num_registers:
    # HF's register model resamples to a size with antialias, as the official '_reg' models and REPA (timm) do.
    small = images[:, :28, :28]
    expected = hf_tokens(torch_model, small, spec.num_registers)
    for pos_resample in dinov2.POS_RESAMPLES:
      model = convert.load(abstract_model(spec, pos_resample=pos_resample), convert.from_hf(hf, spec))
      chex.assert_trees_all_close(forward(model, jnp.asarray(small)), expected, rtol=1e-5, atol=1e-5)


def test_position_embedding_resampling_matches_torch():
  torch = pytest.importorskip("torch")
  interpolate = torch.nn.functional.interpolate
  pos = np.random.default_rng(0).normal(size=(1, 1 + 37 * 37, 8)).astype(np.float32)
  grid = torch.from_numpy(pos[:, 1:].reshape(1, 37, 37, 8)).permute(0, 3, 1, 2)

  def torch_pos(**kwargs) -> np.ndarray:
    patches = interpolate(grid, mode="bicubic", **kwargs).permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
    return np.concatenate([pos[:, :1], patches], axis=1)

  for g in [(16, 16), (32, 32), (16, 24)]:
    # The official interpolate_pos_encoding: scale_factor with the 0.1 offset, no antialias (offset 0 and antialias
    # for the '_reg' models).
    official = dinov2.interpolate_pos_encoding(jnp.asarray(pos), g, offset=0.1, antialias=False)
    expected = torch_pos(scale_factor=((g[0] + 0.1) / 37, (g[1] + 0.1) / 37), antialias=False)
    np.testing.assert_allclose(official, expected, rtol=1e-5, atol=1e-5)
    registers = dinov2.interpolate_pos_encoding(jnp.asarray(pos), g, offset=0.0, antialias=True)
    np.testing.assert_allclose(registers, torch_pos(size=g, antialias=True), rtol=1e-5, atol=1e-5)
  # REPA: timm's resample_abs_pos_embed (size, antialias=True).
  np.testing.assert_allclose(dinov2.resample_abs_pos_embed(jnp.asarray(pos), (16, 16)),
                             torch_pos(size=(16, 16), antialias=True), rtol=1e-5, atol=1e-5)
  assert dinov2.interpolate_pos_encoding(jnp.asarray(pos), (37, 37)).shape == pos.shape


def test_preprocess_matches_repa_torch():
  torch = pytest.importorskip("torch")
  images = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0
  x = (x - torch.tensor(dinov2.IMAGENET_MEAN)[:, None, None]) / torch.tensor(dinov2.IMAGENET_STD)[:, None, None]
  expected = torch.nn.functional.interpolate(x, 224, mode="bicubic", antialias=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(dinov2.preprocess(jnp.asarray(images), 256), expected, rtol=1e-5, atol=2e-5)


def test_encode_gives_the_repa_token_grid_and_specs_have_official_shapes():
  images = jnp.zeros((1, 256, 256, 3), jnp.uint8)
  tokens = nnx.eval_shape(lambda: dinov2.encode(dinov2.DinoV2(TINY, nnx.Rngs(0)), images))
  chex.assert_shape((tokens["patch_tokens"], tokens["class_token"]), ((1, 256, 32), (1, 32)))
  assert tokens["patch_tokens"].dtype == tokens["class_token"].dtype == jnp.float32
  assert dinov2.SPECS["dinov2_vitg14"].ffn_hidden == 4096  # official w12: [8192, 1536]
  assert dinov2.SPECS["dinov2_vitb14_reg"].num_registers == 4 and dinov2.SPECS["dinov2_vitb14"].pos_grid == 37
  with pytest.raises(ValueError, match="uint8"):
    dinov2.preprocess(jnp.zeros((1, 256, 256, 3)), 256)


def test_converter_errors_name_the_problem():
  spec = dataclasses.replace(TINY, depth=1)
  params = jax.tree.map(lambda leaf: np.zeros(leaf.shape), nnx.to_pure_dict(nnx.state(abstract_model(spec))))
  official = {"cls_token": params["cls_token"], "pos_embed": params["pos_embed"],
              "patch_embed.proj.weight": np.zeros((32, 3, 14, 14)), "patch_embed.proj.bias": np.zeros(32),
              "norm.weight": np.ones(32), "norm.bias": np.zeros(32)}
  with pytest.raises(KeyError, match=re.escape("'blocks.0.norm1.weight' is not in the checkpoint")):
    convert.from_official(official, spec)
  with pytest.raises(ValueError, match="register_tokens"):
    convert.from_official({**official, "register_tokens": np.zeros((1, 4, 32))}, dataclasses.replace(spec, depth=0))
  params["pos_embed"] = np.zeros((1, 1 + 37 * 37, 32))
  with pytest.raises(ValueError, match=re.escape("['pos_embed']: model (1, 10, 32), converted (1, 1370, 32)")):
    convert.load(abstract_model(spec), params)
