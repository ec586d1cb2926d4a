"""Evaluation: a feature network's outputs of samples vs reference images -> FID, sFID, IS, precision/recall, and
for the classifier the class accuracy of class-conditional samples (does a sample of class y look like y?).

config.evaluate.feature_network:
- 'fashion_mnist_classifier': a small CNN (`models/cnn.py`) trained by the project with its own seed and cache, another
  architecture than the REPA target ViT, so alignment cannot game the metric; reference: the real split
  config.evaluate.split. Outputs: pool = the penultimate layer [N, 128] (FID, precision/recall), spatial = the first 8
  channels of the last 7x7 feature map flattened [N, 49 * 8] (sFID), logits [N, 10] (IS, class accuracy).
- 'inception': the FID Inception-v3 (pytorch-fid's weights, config.evaluate.inception_weights): pool [N, 2048],
  spatial [N, 2023], logits [N, 1008] (IS in splits of 5000 samples, as the ADM evaluator); reference: an ADM reference
  batch (config.evaluate.reference_npz, e.g. VIRTUAL_imagenet256_labeled.npz): its images `arr_0` (precision/recall,
  and FID/sFID unless it stores the statistics `mu`, `sigma` (pool) and `mu_s`, `sigma_s` (spatial), used as given).
"""
import functools
import json

import jax
import ml_collections
import numpy as np
from etils import epath

from repa_jax.convert import pretrained
from repa_jax.data.precompute import fashion_mnist_splits, image_source
from repa_jax.evaluate import metrics
from repa_jax.models import supervised
from repa_jax.sample.generate import class_grid, class_names, generate_images, make_sampler
from repa_jax.specs import sharding

CLASSIFIER_SEED = 1  # another initialisation and data order than the REPA encoder's (seed 0)
FLOOR_SEED = 2  # which real images of config.evaluate.floor_split make the floor
SPATIAL_CHANNELS = 8
CLASSIFIER, INCEPTION = "fashion_mnist_classifier", "inception"
ADM_STATISTICS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # names in an ADM reference batch
ADM_IS_SPLIT_SIZE = 5000


def classifier_config(config: ml_collections.ConfigDict) -> supervised.EncoderConfig:
  """The evaluation CNN and its training run: config.evaluate.classifier_steps of batch 128 (1875 = 4 epochs reach
  >= 91% on the test split, see docs/fashion_mnist_recipe.md)."""
  return supervised.EncoderConfig(arch="cnn", stage_channels=(16, 32, 64), steps=config.evaluate.classifier_steps,
                               batch=128, lr=3e-3, seed=CLASSIFIER_SEED)


def feature_network(config: ml_collections.ConfigDict):
  """(images uint8 [B, H, W, C] -> {'pool', 'spatial', 'logits'}, info: what to report with the metrics) of
  config.evaluate.feature_network."""
  if config.evaluate.feature_network == INCEPTION:
    network = pretrained.inception_network(config)
    return functools.partial(jax.jit(network.apply), network.params), {
        "feature_network": "inception_v3_fid", "reference_npz": config.evaluate.reference_npz}
  if config.evaluate.feature_network != CLASSIFIER:
    raise ValueError(f"config.evaluate.feature_network={config.evaluate.feature_network!r}: use {CLASSIFIER!r} or "
                     f"{INCEPTION!r}")
  if config.precompute.source != "fashion_mnist":
    raise ValueError(f"config.evaluate.feature_network={CLASSIFIER!r} needs config.precompute.source='fashion_mnist' "
                     f"(got {config.precompute.source!r}): set config.evaluate.feature_network={INCEPTION!r}")
  encode, info = supervised.load_or_train_encoder(
      config.precompute.encoder_dir, classifier_config(config), name="fashion_mnist_cnn",
      load_split=fashion_mnist_splits(config))

  def features(images):
    out = encode(images)
    return {"pool": out["pooled"], "spatial": out["patch_tokens"][..., :SPATIAL_CHANNELS].reshape(len(images), -1),
            "logits": out["logits"]}

  return features, {"reference_split": config.evaluate.split, "feature_network": info["name"],
                    "feature_network_test_accuracy": info["test_accuracy"]}


def network_outputs(features, images: np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
  """The feature network's outputs of uint8 images [N, H, W, C], batch by batch, as NumPy arrays."""
  outputs = [jax.device_get(features(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
  return {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}


def reference_outputs(config: ml_collections.ConfigDict, features, split: str) -> dict[str, np.ndarray]:
  """The feature network's outputs of a real split, cached as <encoder_dir>/reference_<source>_<split>.npz."""
  path = epath.Path(config.precompute.encoder_dir) / f"reference_{config.precompute.source}_{split}.npz"
  if path.exists():
    with path.open("rb") as file:
      return dict(np.load(file))
  source = image_source(config, split)
  images = np.stack([source[i]["image"] for i in range(len(source))])
  outputs = network_outputs(features, images)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as file:
    np.savez(file, **outputs)
  return outputs


def read_reference_npz(path: str) -> dict[str, np.ndarray]:
  """An ADM reference batch: {'arr_0': uint8 images [N, H, W, 3]} and, when stored, the statistics 'mu', 'sigma'
  (pool) and 'mu_s', 'sigma_s' (spatial) [D], [D, D]."""
  if not path or not epath.Path(path).exists():
    raise FileNotFoundError(f"config.evaluate.reference_npz={path!r} does not exist. Fix: download the ADM reference "
                            "batch (e.g. https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                            "imagenet/256/VIRTUAL_imagenet256_labeled.npz) and set the field to its path.")
  with epath.Path(path).open("rb") as file, np.load(file) as stored:
    wanted = ["arr_0", *(key for pair in ADM_STATISTICS.values() for key in pair)]
    reference = {key: stored[key] for key in wanted if key in stored}
  images = reference.get("arr_0")
  if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    found = "no arr_0" if images is None else f"arr_0 {images.dtype} {images.shape}"
    raise ValueError(f"config.evaluate.reference_npz={path!r} holds {found}; an ADM reference batch holds uint8 "
                     "images arr_0 [N, H, W, 3]. Fix: point the field at an ADM reference batch .npz.")
  for mu, sigma in ADM_STATISTICS.values():
    if (mu in reference) != (sigma in reference):
      raise ValueError(f"config.evaluate.reference_npz={path!r} holds only one of {mu!r}, {sigma!r}; store both or "
                       "neither.")
  return reference


def reference(config: ml_collections.ConfigDict, features) -> dict[str, np.ndarray]:
  """The reference of config.evaluate.feature_network: the outputs of the real split (classifier), or of the ADM
  reference batch's images with its stored statistics (inception)."""
  if config.evaluate.feature_network != INCEPTION:
    return reference_outputs(config, features, config.evaluate.split)
  stored = read_reference_npz(config.evaluate.reference_npz)
  outputs = network_outputs(features, stored.pop("arr_0"))
  for name, (mu, sigma) in ADM_STATISTICS.items():
    dim = outputs[name].shape[1]
    if mu in stored and (stored[mu].shape != (dim,) or stored[sigma].shape != (dim, dim)):
      raise ValueError(f"config.evaluate.reference_npz: {mu} {stored[mu].shape} / {sigma} {stored[sigma].shape} do "
                       f"not fit the {dim}-dim {name} features of Inception; is it an ADM reference batch?")
  return {**outputs, **stored}


def statistics(outputs: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of outputs[name] ('pool' or 'spatial'), or the ones an ADM reference batch stores."""
  mu, sigma = ADM_STATISTICS[name]
  return (outputs[mu], outputs[sigma]) if mu in outputs else metrics.feature_statistics(outputs[name])


def sample_metrics(reference: dict, samples: dict, labels: np.ndarray | None, *, with_knn: bool = True,
                   is_split_size: int | None = None) -> dict:
  """FID, sFID, IS (in splits of `is_split_size` samples; None: 10 splits), and precision/recall with k = 3 and the
  class accuracy when labels are given, of network outputs."""
  n = len(samples["pool"])
  result = {"fid": metrics.frechet_distance(*statistics(reference, "pool"), *statistics(samples, "pool")),
            "sfid": metrics.frechet_distance(*statistics(reference, "spatial"), *statistics(samples, "spatial")),
            "inception_score": metrics.inception_score(samples["logits"],
                                                       -(-n // is_split_size) if is_split_size else 10),
            "num_samples": int(n)}
  if with_knn:
    result["precision"], result["recall"] = metrics.precision_recall(reference["pool"], samples["pool"], k=3)
  if labels is not None:
    result["class_accuracy"] = float(np.mean(samples["logits"].argmax(-1) == labels))
  return result


def metric_options(config: ml_collections.ConfigDict, labels: np.ndarray | None) -> dict:
  """`sample_metrics` arguments of the feature network: Inception's 1008 logits are no labels of the data and its IS
  uses the ADM evaluator's splits of 5000."""
  if config.evaluate.feature_network == INCEPTION:
    return {"labels": None, "is_split_size": ADM_IS_SPLIT_SIZE}
  return {"labels": labels}


def real_images(config: ml_collections.ConfigDict, num: int) -> np.ndarray:
  """uint8 [num, H, W, C]: `num` real images of config.evaluate.floor_split, drawn without replacement (FLOOR_SEED)."""
  split = config.evaluate.floor_split
  if split == config.evaluate.split:
    raise ValueError(f"config.evaluate.floor_split={split!r} is the reference split config.evaluate.split: use "
                     "another split (e.g. 'train'), so that the floor's images are held out from the reference")
  source = image_source(config, split)
  if num > len(source):
    raise ValueError(f"the floor needs {num} real images but split {split!r} (config.evaluate.floor_split) has "
                     f"{len(source)}: evaluate fewer samples")
  ids = np.random.default_rng(FLOOR_SEED).permutation(len(source))[:num]
  return np.stack([source[int(i)]["image"] for i in ids])


def real_floor(config: ml_collections.ConfigDict, features, real: dict, info: dict, num: int, *,
               with_knn: bool = True) -> dict:
  """The metrics of `num` real images of config.evaluate.floor_split against the same reference `real`: what a
  perfect generator scores with `num` samples. Its class accuracy is the feature network's on the real test split."""
  floor = sample_metrics(real, network_outputs(features, real_images(config, num)), None, with_knn=with_knn,
                         **({"is_split_size": ADM_IS_SPLIT_SIZE} if config.evaluate.feature_network == INCEPTION
                            else {}))
  if "feature_network_test_accuracy" in info:
    floor["class_accuracy"] = info["feature_network_test_accuracy"]
  return floor


def evaluate_npz(config: ml_collections.ConfigDict, npz_path: str) -> dict:
  """Metrics of an ADM-format .npz (arr_0 uint8 NHWC, arr_1 labels) against config.evaluate.feature_network's
  reference, with their real-data floor (`floor`, see `real_floor`; None when config.evaluate.floor_split is ''); writes
  JSON beside it (<npz>.metrics.json) and returns the metrics."""
  if not epath.Path(npz_path).exists():
    raise FileNotFoundError(f"no samples at {npz_path}. Fix: run --mode=sample with the same config first, or pass "
                            "--samples=<an ADM .npz>")
  features, info = feature_network(config)
  with epath.Path(npz_path).open("rb") as file, np.load(file) as stored:
    images, labels = stored["arr_0"], stored["arr_1"] if "arr_1" in stored else None
  real = reference(config, features)
  result = sample_metrics(real, network_outputs(features, images), **metric_options(config, labels))
  result["floor"] = real_floor(config, features, real, info, len(images)) if config.evaluate.floor_split else None
  result.update(info)
  epath.Path(f"{npz_path}.metrics.json").write_text(json.dumps(result, indent=2))
  return result


def periodic_evaluator(config: ml_collections.ConfigDict):
  """In-training evaluation for `train()` (None while config.evaluate.every_steps is None): `evaluate(sit_params) ->
  (metrics, uint8 grid)` on config.evaluate.num_samples class-balanced samples (config.evaluate.sampler / steps /
  cfg_scale / guidance interval) against the feature network's reference, with the floor's FD and class accuracy
  (floor_fid, floor_class_accuracy); no k-NN metrics. Samples on the training run's mesh (config.mesh)."""
  if config.evaluate.every_steps is None:
    return None
  mesh = sharding.config_mesh(config)
  features, info = feature_network(config)
  real = reference(config, features)
  e = config.evaluate
  floor = real_floor(config, features, real, info, e.num_samples, with_knn=False) if e.floor_split else {}
  floor = {f"floor_{name}": floor[name] for name in ("fid", "class_accuracy") if name in floor}
  sample_config = config.copy_and_resolve_references()
  sample_config.sample.update(sampler=e.sampler, steps=e.steps, num_samples=e.num_samples, labels="balanced",
                              cfg_scale=e.cfg_scale, guidance_low=e.guidance_low, guidance_high=e.guidance_high,
                              batch_size=e.batch_size)
  sampler = make_sampler(sample_config, mesh)
  replicated = sharding.replicated(mesh)

  def evaluate(sit_params) -> tuple[dict, np.ndarray]:
    images, labels = generate_images(sample_config, jax.device_put(sit_params, replicated), e.num_samples, sampler)
    results = sample_metrics(real, network_outputs(features, images), with_knn=False, **metric_options(config, labels))
    return {**results, **floor}, class_grid(images, labels, class_names=class_names(config))

  return evaluate
