"""Evaluation: a feature network's outputs of samples vs reference images -> FID, sFID, IS, precision/recall, and
for the classifier the class accuracy of class-conditional samples (does a sample of class y look like y?).

config.evaluate.feature_network:
- 'fashion_mnist_classifier': a ViT classifier trained by the project with its own seed and cache, separate from the
  REPA encoder, so alignment cannot game the metric; reference: the real split config.evaluate.split. Outputs:
  pool = the mean final-norm patch token [N, width] (FID, precision/recall), spatial = the first 8 channels of every
  patch token flattened [N, 49 * 8] (sFID), logits [N, 10] (IS, class accuracy).
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

from repa_jax.data import encoder
from repa_jax.data.precompute import encoder_config, image_source
from repa_jax.data.sources import FASHION_MNIST_DIRECTORY
from repa_jax.evaluate import metrics
from repa_jax.models import pretrained

CLASSIFIER_SEED = 1  # another initialisation and data order than the REPA encoder's (seed 0)
SPATIAL_CHANNELS = 8
CLASSIFIER, INCEPTION = "fashion_mnist_classifier", "inception"
ADM_STATISTICS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # names in an ADM reference batch
ADM_IS_SPLIT_SIZE = 5000


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
  encode, info = encoder.load_or_train_encoder(
      config.precompute.encoder_dir, encoder_config(config, seed=CLASSIFIER_SEED), name="fashion_mnist_classifier",
      directory=config.precompute.source_dir or FASHION_MNIST_DIRECTORY)

  def features(images):
    tokens, logits = encode(images)
    return {"pool": tokens.mean(axis=1), "spatial": tokens[..., :SPATIAL_CHANNELS].reshape(len(images), -1),
            "logits": logits}

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


def evaluate_npz(config: ml_collections.ConfigDict, npz_path: str) -> dict:
  """Metrics of an ADM-format .npz (arr_0 uint8 NHWC, arr_1 labels) against config.evaluate.feature_network's
  reference; writes JSON beside it (<npz>.metrics.json) and returns the metrics."""
  features, info = feature_network(config)
  with epath.Path(npz_path).open("rb") as file, np.load(file) as stored:
    images, labels = stored["arr_0"], stored["arr_1"] if "arr_1" in stored else None
  result = sample_metrics(reference(config, features), network_outputs(features, images),
                          **metric_options(config, labels))
  result.update(info)
  epath.Path(f"{npz_path}.metrics.json").write_text(json.dumps(result, indent=2))
  return result


def make_periodic_evaluator(config: ml_collections.ConfigDict, mesh):
  """In-training evaluation: `evaluate(sit_params) -> (metrics, uint8 grid)` on config.evaluate.num_samples
  class-balanced samples (config.evaluate.sampler / steps) against the feature network's reference; no k-NN metrics."""
  from repa_jax.sample.generate import generate_images, image_grid, make_sampler
  features, _ = feature_network(config)
  real = reference(config, features)
  e = config.evaluate
  sample_config = config.copy_and_resolve_references()
  sample_config.sample.update(sampler=e.sampler, steps=e.steps, num_samples=e.num_samples, labels="balanced",
                              cfg_scale=1.0, batch_size=e.batch_size)
  sampler = make_sampler(sample_config, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def evaluate(sit_params) -> tuple[dict, np.ndarray]:
    images, labels = generate_images(sample_config, jax.device_put(sit_params, replicated), e.num_samples, sampler)
    return sample_metrics(real, network_outputs(features, images), with_knn=False,
                          **metric_options(config, labels)), image_grid(images[:100], 10)

  return evaluate
