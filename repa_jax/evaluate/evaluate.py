"""Evaluation: a feature network's outputs of samples vs a real split -> FID, sFID, IS, precision/recall, and the
class accuracy of class-conditional samples (does a sample of class y look like y?).

For Fashion-MNIST the feature network is a ViT classifier trained by the project with its own seed and cache
(`fashion_mnist_classifier`), separate from the REPA encoder, so alignment cannot game the metric. Its outputs:
pool = the mean final-norm patch token [N, width] (FID, precision/recall), spatial = the first 8 channels of every
patch token flattened [N, 49 * 8] (sFID), logits [N, 10] (IS, class accuracy).
"""
import json

import jax
import ml_collections
import numpy as np
from etils import epath

from repa_jax.data import encoder
from repa_jax.data.precompute import encoder_config, image_source
from repa_jax.data.sources import FASHION_MNIST_DIRECTORY
from repa_jax.evaluate import metrics

CLASSIFIER_SEED = 1  # another initialisation and data order than the REPA encoder's (seed 0)
SPATIAL_CHANNELS = 8


def feature_network(config: ml_collections.ConfigDict):
  """(images uint8 [B, H, W, C] -> {'pool', 'spatial', 'logits'}, info with the test accuracy) of config's data."""
  if config.precompute.source != "fashion_mnist":
    raise ValueError(f"config.precompute.source={config.precompute.source!r}: its feature network (Inception-v3 for "
                     "ImageNet) is not available yet; evaluation supports 'fashion_mnist'")
  encode, info = encoder.load_or_train_encoder(
      config.precompute.encoder_dir, encoder_config(config, seed=CLASSIFIER_SEED), name="fashion_mnist_classifier",
      directory=config.precompute.source_dir or FASHION_MNIST_DIRECTORY)

  def features(images):
    tokens, logits = encode(images)
    return {"pool": tokens.mean(axis=1), "spatial": tokens[..., :SPATIAL_CHANNELS].reshape(len(images), -1),
            "logits": logits}

  return features, info


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


def sample_metrics(reference: dict, samples: dict, labels: np.ndarray | None, *, with_knn: bool = True) -> dict:
  """FID, sFID, IS (and precision/recall with k = 3, class accuracy when labels are given) of network outputs."""
  result = {"fid": metrics.fid_from_features(reference["pool"], samples["pool"]),
            "sfid": metrics.sfid_from_features(reference["spatial"], samples["spatial"]),
            "inception_score": metrics.inception_score(samples["logits"]),
            "num_samples": int(len(samples["pool"]))}
  if with_knn:
    result["precision"], result["recall"] = metrics.precision_recall(reference["pool"], samples["pool"], k=3)
  if labels is not None:
    result["class_accuracy"] = float(np.mean(samples["logits"].argmax(-1) == labels))
  return result


def evaluate_npz(config: ml_collections.ConfigDict, npz_path: str) -> dict:
  """Metrics of an ADM-format .npz (arr_0 uint8 NHWC, arr_1 labels) against config.evaluate.split; writes JSON beside
  it (<npz>.metrics.json) and returns the metrics."""
  features, info = feature_network(config)
  with epath.Path(npz_path).open("rb") as file, np.load(file) as stored:
    images, labels = stored["arr_0"], stored["arr_1"] if "arr_1" in stored else None
  result = sample_metrics(reference_outputs(config, features, config.evaluate.split),
                          network_outputs(features, images), labels)
  result.update(reference_split=config.evaluate.split, feature_network=info["name"],
                feature_network_test_accuracy=info["test_accuracy"])
  epath.Path(f"{npz_path}.metrics.json").write_text(json.dumps(result, indent=2))
  return result


def make_periodic_evaluator(config: ml_collections.ConfigDict, mesh):
  """In-training evaluation: `evaluate(sit_params) -> (metrics, uint8 grid)` on config.evaluate.num_samples
  class-balanced samples (config.evaluate.sampler / steps) against config.evaluate.split; no k-NN metrics."""
  from repa_jax.sample.generate import generate_images, image_grid, make_sampler
  features, _ = feature_network(config)
  reference = reference_outputs(config, features, config.evaluate.split)
  e = config.evaluate
  sample_config = config.copy_and_resolve_references()
  sample_config.sample.update(sampler=e.sampler, steps=e.steps, num_samples=e.num_samples, labels="balanced",
                              cfg_scale=1.0, batch_size=e.batch_size)
  sampler = make_sampler(sample_config, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def evaluate(sit_params) -> tuple[dict, np.ndarray]:
    images, labels = generate_images(sample_config, jax.device_put(sit_params, replicated), e.num_samples, sampler)
    return sample_metrics(reference, network_outputs(features, images), labels, with_knn=False), \
        image_grid(images[:100], 10)

  return evaluate
