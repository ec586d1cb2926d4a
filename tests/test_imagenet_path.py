"""The ImageNet path with tiny random-weight networks saved as weights files: precompute (SD-VAE + two DINOv2) over an
image folder equals direct calls, sampling decodes with the VAE, evaluation with Inception against an ADM reference
batch, and missing weights files fail naming the config field."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from configs import tiny
from repa_jax.convert.dinov2 import load_pretrained
from repa_jax.convert.inception import abstract_model
from repa_jax.convert.sd_vae import diffusers_name, load_sd_vae
from repa_jax.data import features, sources
from repa_jax.data.precompute import precompute
from repa_jax.evaluate import evaluate, metrics
from repa_jax.models import dinov2, sd_vae
from repa_jax.models.network import as_network
from repa_jax.models.repa_sit import build_model
from repa_jax.specs.model import model_spec
from repa_jax.sample import generate

# The weights files these tests write are .safetensors (the parity extra, which `make test` installs).
save_file = pytest.importorskip("safetensors.numpy", reason="safetensors (the parity extra) is not installed").save_file

VAE8 = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)  # f = 8
DINO = dict(width=16, depth=1, num_heads=2)
ENCODERS = ("dinov2_vitb14", "dinov2_vits14_reg")  # without and with registers


def param_paths(abstract_state):
  """(names, shape) of every leaf of an abstract nnx state (names: the dict keys on its path)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
    yield tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)), leaf.shape


def torch_shape(names: tuple, shape: tuple) -> tuple:
  """The PyTorch layout of a Flax parameter's shape: conv [kh, kw, in, out] -> [out, in, kh, kw], linear transposed."""
  if names[-1] != "kernel":
    return shape
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]


def save_vae(path, spec_fields: dict) -> str:
  """Random diffusers-layout AutoencoderKL weights of VAESpec(**spec_fields) as .safetensors."""
  rng = np.random.default_rng(0)
  abstract = nnx.state(nnx.eval_shape(lambda: sd_vae.SDVAE(sd_vae.VAESpec(**spec_fields), nnx.Rngs(0))), nnx.Param)
  save_file({diffusers_name(names): rng.normal(0, 0.1, torch_shape(names, shape)).astype(np.float32)
             for names, shape in param_paths(abstract)}, str(path))
  return str(path)


def save_dinov2(path, spec: dinov2.DinoV2Spec) -> str:
  """Random weights of `spec` in the official hub layout as .safetensors."""
  d, hidden = spec.width, spec.ffn_hidden
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + spec.pos_grid ** 2, d),
            "patch_embed.proj.weight": (d, 3, spec.patch, spec.patch), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,)}
  if spec.num_registers:
    shapes["register_tokens"] = (1, spec.num_registers, d)
  for i in range(spec.depth):
    shapes.update({f"blocks.{i}.{name}": shape for name, shape in {
        "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "ls1.gamma": (d,), "norm2.weight": (d,),
        "norm2.bias": (d,), "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (d, hidden),
        "mlp.fc2.bias": (d,), "ls2.gamma": (d,)}.items()})
  rng = np.random.default_rng(1)
  save_file({key: rng.normal(0, 0.1, shape).astype(np.float32) for key, shape in shapes.items()}, str(path))
  return str(path)


def save_inception(path) -> str:
  """Random pytorch-fid-layout FID Inception weights (conv + BatchNorm per BasicConv2d, fc) as .safetensors."""
  rng = np.random.default_rng(2)
  state = {}
  for names, shape in param_paths(abstract_model()[1]):
    if names == ("fc", "kernel"):
      state["fc.weight"] = rng.normal(0, 0.02, shape[::-1]).astype(np.float32)
    elif names[-1] == "kernel":
      prefix, fan_in = ".".join(names[:-2]), np.prod(shape[:3])
      state[f"{prefix}.conv.weight"] = rng.normal(0, np.sqrt(2 / fan_in), torch_shape(names, shape)).astype(np.float32)
      state.update({f"{prefix}.bn.{name}": value.astype(np.float32) for name, value in {
          "weight": rng.uniform(0.5, 1.5, shape[3]), "bias": rng.normal(0, 0.2, shape[3]),
          "running_mean": np.zeros(shape[3]), "running_var": np.ones(shape[3])}.items()})
  save_file(state, str(path))
  return str(path)


def write_image_folder(root, count: int = 6, size: int = 64) -> None:
  """`count` random RGB PNGs in two class folders under root/train."""
  rng = np.random.default_rng(3)
  for i in range(count):
    folder = root / "train" / f"class_{i % 2}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def imagenet_like_config(tmp_path, **weights):
  """The tiny SiT (S/2, 32 x 32 x 4 latents: a 16 x 16 grid) on SD-VAE latents of 256 px images with REPA on two tiny
  DINOv2s (224 px: 16 x 16 patches); weights files from `weights` (field -> path)."""
  config = tiny.get_config("reg=repa")
  config.data.update(autoencoder="sd-vae-ft-mse", latent_shape=(32, 32, 4), autoencoder_spec=VAE8,
                     directory=str(tmp_path / "imagenet_features"))
  config.align.encoders = tuple((name, DINO["width"]) for name in ENCODERS)
  config.precompute.update(source="image_folder", source_dir=str(tmp_path / "images"), resolution=256, num_shards=2,
                           batch_size=4, encoder_specs={name: DINO for name in ENCODERS}, **weights)
  return config


def jitted(model, fn, inputs):
  """fn(model, inputs) under jit (one compilation instead of one per operation)."""
  network = as_network(model, fn)
  return jax.jit(network.apply)(network.params, inputs)


def test_precompute_with_sd_vae_and_two_dinov2_equals_direct_calls(tmp_path):
  write_image_folder(tmp_path / "images")
  vae_path = save_vae(tmp_path / "vae.safetensors", VAE8)
  specs = {name: dataclasses.replace(dinov2.SPECS[name], **DINO) for name in ENCODERS}
  paths = {name: save_dinov2(tmp_path / f"{name}.safetensors", spec) for name, spec in specs.items()}
  config = imagenet_like_config(tmp_path, autoencoder_weights=vae_path, encoder_weights=paths)
  config.reg.weight = 0.03  # REG on: the encoders' class tokens are stored too
  precompute(config)

  records, spec = features.open_features(config.data.directory, "train")
  assert spec.autoencoder == "sd-vae-ft-mse" and spec.latent_shape == (32, 32, 4) and spec.class_tokens
  assert [name for name, _, _ in spec.encoders] == list(ENCODERS) and "ADM centre crop to 256 px" in spec.preprocessing
  source = sources.image_folder(tmp_path / "images" / "train", 256)
  images = np.stack([source[i]["image"] for i in range(len(source))])
  stored = [records[i] for i in range(len(records))]
  assert sorted(r["id"] for r in stored) == list(range(6))
  stored = sorted(stored, key=lambda r: r["id"])
  np.testing.assert_array_equal([r["label"] for r in stored], [source[i]["label"] for i in range(6)])

  mean, std = jitted(load_sd_vae(vae_path, sd_vae.VAESpec(**VAE8)), sd_vae.encode_uint8, images)
  direct = {"ae_mean": mean, "ae_std": std}
  for name, spec in specs.items():
    tokens = jitted(load_pretrained(paths[name], name, spec), dinov2.encode, images)
    direct[f"feat_{name}"], direct[f"cls_{name}"] = tokens["patch_tokens"], tokens["class_token"]
  for field, value in direct.items():
    got = np.stack([r[field] for r in stored]).astype(np.float32)
    assert got.dtype == np.float32 and stored[0][field].dtype == np.float16
    np.testing.assert_allclose(got, np.asarray(value), rtol=2e-3, atol=2e-3, err_msg=field)


def test_missing_weights_files_name_the_field(tmp_path):
  write_image_folder(tmp_path / "images", count=2)
  config = imagenet_like_config(tmp_path, autoencoder_weights=str(tmp_path / "absent.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"config\.precompute\.encoder_weights\['dinov2_vitb14'\].*"
                                              r"dinov2_vitb14_pretrain\.pth.*facebook/dinov2-base"):
    precompute(config)
  config.align.weight = 0.0
  with pytest.raises(FileNotFoundError, match=r"config\.precompute\.autoencoder_weights=.*stabilityai/sd-vae-ft-mse"):
    precompute(config)
  with pytest.raises(FileNotFoundError, match=r"config\.sample\.decoder_weights=''.*stabilityai/sd-vae-ft-ema"):
    generate.make_sampler(config, Mesh(np.asarray(jax.devices()), ("data",)))
  config.evaluate.feature_network = "inception"
  with pytest.raises(FileNotFoundError, match=r"config\.evaluate\.inception_weights=''.*pt_inception-2015-12-05"):
    evaluate.feature_network(config)
  with pytest.raises(FileNotFoundError, match=r"config\.evaluate\.reference_npz=''"):
    evaluate.read_reference_npz(config.evaluate.reference_npz)


def test_sampler_decodes_sit_latents_with_the_vae_decoder(tmp_path):
  vae2 = dict(VAE8, block_out_channels=(8, 8))  # f = 2: 8 x 8 x 4 latents -> 16 x 16 x 3 images
  config = tiny.get_config("reg=none")
  config.model.depth = 1
  config.data.update(autoencoder="sd-vae-ft-mse", autoencoder_spec=vae2)
  config.sample.update(sampler="euler", steps=2, num_samples=8, batch_size=8,
                       decoder_weights=save_vae(tmp_path / "ema.safetensors", vae2))
  sampler = generate.make_sampler(config, Mesh(np.asarray(jax.devices()), ("data",)))
  params = nnx.split(build_model(model_spec(config), jax.random.key(0)).sit)[1]
  images, labels = generate.generate_images(config, params, 8, sampler)
  assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8 and labels.shape == (8,)  # decoded: 3 channels
  assert len(np.unique(images)) > 10


def write_reference(path, images, **statistics) -> str:
  np.savez(path, arr_0=images, **statistics)
  return str(path)


def test_reference_npz_reading(tmp_path):
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  stats = {"mu": rng.normal(size=3), "sigma": np.eye(3), "mu_s": rng.normal(size=2), "sigma_s": np.eye(2)}
  read = evaluate.read_reference_npz(write_reference(tmp_path / "full.npz", images, **stats))
  assert sorted(read) == sorted(["arr_0", *stats])
  np.testing.assert_array_equal(read["arr_0"], images)
  np.testing.assert_array_equal(read["mu_s"], stats["mu_s"])
  assert sorted(evaluate.read_reference_npz(write_reference(tmp_path / "images.npz", images))) == ["arr_0"]
  with pytest.raises(ValueError, match=r"only one of 'mu', 'sigma'"):
    evaluate.read_reference_npz(write_reference(tmp_path / "half.npz", images, mu=stats["mu"]))
  with pytest.raises(ValueError, match=r"config\.evaluate\.reference_npz=.*float64"):
    evaluate.read_reference_npz(write_reference(tmp_path / "float.npz", images / 255.0))

  # Stored statistics replace the fitted ones (FID, sFID); the pool features still give precision / recall.
  pool, spatial = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
  samples = {"pool": pool + 1, "spatial": spatial, "logits": rng.normal(size=(4, 5))}
  result = evaluate.sample_metrics({"pool": pool, "spatial": spatial, **stats}, samples, None, is_split_size=5000)
  assert result["fid"] == pytest.approx(metrics.frechet_distance(stats["mu"], stats["sigma"],
                                                                 *metrics.feature_statistics(pool + 1)))
  assert result["sfid"] == pytest.approx(metrics.frechet_distance(stats["mu_s"], stats["sigma_s"],
                                                                  *metrics.feature_statistics(spatial)))
  assert result["inception_score"] == pytest.approx(metrics.inception_score(samples["logits"], num_splits=1))
  assert "class_accuracy" not in result and 0 <= result["precision"] <= 1


def test_inception_evaluation_against_an_adm_reference_batch(tmp_path, monkeypatch):
  images = np.random.default_rng(6).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
  config = tiny.get_config("reg=none")
  config.evaluate.update(feature_network="inception",
                         inception_weights=save_inception(tmp_path / "inception.safetensors"),
                         reference_npz=write_reference(tmp_path / "reference.npz", images),
                         floor_split="")  # no real ImageNet images here for the floor
  samples = tmp_path / "samples.npz"
  np.savez(samples, arr_0=images, arr_1=np.arange(4))
  # The Frechet distance's eigendecompositions of 2048 x 2048 matrices take ~1 s each on an idle 2-core CPU (tested
  # in test_metrics); here it records its inputs and returns the mean term only.
  fitted = []
  monkeypatch.setattr(metrics, "frechet_distance", lambda mu1, sigma1, mu2, sigma2: fitted.append(
      (mu1.shape, sigma1.shape)) or float(np.sum((mu1 - mu2) ** 2)))
  result = evaluate.evaluate_npz(config, str(samples))
  assert fitted == [((2048,), (2048, 2048)), ((2023,), (2023, 2023))]  # pool (FID), Mixed_6d 7 x 17 x 17 (sFID)
  # The reference images themselves as samples: the same features, full precision / recall.
  assert result["fid"] == result["sfid"] == 0.0 and result["precision"] == result["recall"] == 1.0
  assert np.isfinite(result["inception_score"]) and result["inception_score"] >= 1 - 1e-6
  assert result["feature_network"] == "inception_v3_fid" and "class_accuracy" not in result
  assert result["floor"] is None
  assert (tmp_path / "samples.npz.metrics.json").exists()
