"""How good a SiT block's representation is, the two ways REPA's paper measures it (its Fig. 2), on the feature
dataset's images noised to a few fixed t:

- **linear probe**: a ridge-regression classifier (closed form, one-hot targets, standardised features) fitted on
  the block's mean-pooled tokens of train images and scored on test images; beside it the same probe on the noised
  pixels (the floor: what the input alone gives) and on the target encoder's mean-pooled clean features.
- **alignment to the target encoder** on the test images: CKNNA (Huh et al. 2024, "The Platonic Representation
  Hypothesis": CKA restricted to pairs that are mutual k-nearest neighbours, with the unbiased HSIC of Song et al.
  2012, eq. 5) and mutual k-NN (the mean overlap of the two k-NN sets), on L2-normalised mean-pooled features, k = 10
  (minyoungg/platonic-rep @dcd76ba: metrics.py:55-84 mutual_knn, 180-227 cknna, 230-249 hsic_unbiased;
  measure_alignment.py:55-57 the normalisation).

The block is config.align.block for every arm (also those without REPA), fed the null class, so that the label's
conditioning does not leak into the probe.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from repa_jax.data.features import open_features
from repa_jax.data.pipeline import to_train_batch
from repa_jax.models.repa_sit import sit_graphdef
from repa_jax.objectives.flow import interpolate
from repa_jax.specs import rng
from repa_jax.specs.model import model_spec
from repa_jax.train.step import sample_latents

PROBE_TIMES = (0.1, 0.3, 0.5)  # t of the noised inputs (t = 0: data, t = 1: noise)
KNN = 10
RIDGE = 1e-3  # the probe's L2 penalty per example, on standardised features
BATCH = 500


def knn_mask(kernel: np.ndarray, k: int) -> np.ndarray:
  """[N, N] kernel -> [N, N] 0/1 mask: row i marks the k largest entries of kernel row i, i itself excluded."""
  off_diagonal = kernel.copy()
  np.fill_diagonal(off_diagonal, -np.inf)
  mask = np.zeros_like(kernel)
  np.put_along_axis(mask, np.argpartition(-off_diagonal, k - 1, axis=1)[:, :k], 1.0, axis=1)
  return mask


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
  """The unbiased HSIC of [m, m] kernels (Song et al. 2012, eq. 5; diagonals ignored), m >= 4."""
  m = k.shape[0]
  k, l = k.copy(), l.copy()
  np.fill_diagonal(k, 0.0)
  np.fill_diagonal(l, 0.0)
  value = np.sum(k * l.T) + k.sum() * l.sum() / ((m - 1) * (m - 2)) - 2 * (k.sum(0) @ l.sum(1)) / (m - 2)
  return float(value / (m * (m - 3)))


def cosine_kernel(x: np.ndarray) -> np.ndarray:
  """[N, D] -> [N, N] cosine similarities (rows L2-normalised, float64)."""
  x = np.asarray(x, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x @ x.T


def cknna(a: np.ndarray, b: np.ndarray, k: int = KNN) -> float:
  """CKNNA of features a [N, Da] and b [N, Db] of the same N inputs (L2-normalised here), in [-1, 1]."""
  if k < 2:
    raise ValueError(f"CKNNA needs k >= 2 nearest neighbours, got {k}")
  ka, kb = cosine_kernel(a), cosine_kernel(b)
  mask_a, mask_b = knn_mask(ka, k), knn_mask(kb, k)
  both = mask_a * mask_b
  ab = hsic_unbiased(both * ka, both * kb)
  return ab / (np.sqrt(hsic_unbiased(mask_a * ka, mask_a * ka) * hsic_unbiased(mask_b * kb, mask_b * kb)) + 1e-6)


def mutual_knn(a: np.ndarray, b: np.ndarray, k: int = KNN) -> float:
  """The mean fraction of each input's k nearest neighbours (cosine) shared by features a [N, Da] and b [N, Db]."""
  ka, kb = cosine_kernel(a), cosine_kernel(b)
  return float(np.mean(np.sum(knn_mask(ka, k) * knn_mask(kb, k), axis=1) / k))


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          ridge: float = RIDGE) -> float:
  """Test accuracy of the ridge classifier argmax_c (x W + w0)_c fitted on (train_x [N, D], train_y [N] int) to one-hot
  targets, features standardised by the train statistics; penalty ridge * N on W (not on the bias)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  standardise = lambda x: np.concatenate([(np.asarray(x, np.float64) - mean) / std, np.ones((len(x), 1))], axis=1)
  x = standardise(train_x)
  targets = np.eye(int(max(train_y.max(), test_y.max())) + 1)[train_y]
  penalty = ridge * len(x) * np.diag(np.r_[np.ones(x.shape[1] - 1), 0.0])
  weights = np.linalg.solve(x.T @ x + penalty, x.T @ targets)
  return float(np.mean(np.argmax(standardise(test_x) @ weights, axis=1) == test_y))


def load_split(config: ml_collections.ConfigDict, split: str, num: int) -> dict:
  """The first `num` records of a feature-dataset split as a train-step batch (numpy) with the features of every
  encoder the dataset stores: latent_mean (and latent_std), label, features {name: [num, tokens, width]}."""
  records, spec = open_features(config.data.directory, split)
  if num > len(records):
    raise ValueError(f"the representation probe wants {num} images of split {split!r} of {config.data.directory}, "
                     f"which has {len(records)}: lower the number")
  rows = [records[i] for i in range(num)]
  stacked = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
  return jax.tree.map(np.asarray, to_train_batch(stacked, tuple(name for name, _, _ in spec.encoders)))


def block_features(config: ml_collections.ConfigDict, sit_params, batch: dict, t: float) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
  """(mean-pooled tokens of block config.align.block [N, D], the noised inputs flattened [N, H*W*C]) at time t,
  null class, noise from the seed's 'sample_noise' stream."""
  graphdef, block = sit_graphdef(model_spec(config)), config.align.block

  @jax.jit
  def pooled(params, latents, key):
    x = sample_latents(key, latents, config.data.latent_scale)
    times = jnp.full(x.shape[:1], t, jnp.float32)
    x_t, _ = interpolate(x, jax.random.normal(jax.random.fold_in(key, 1), x.shape), times, config.flow.path)
    null = jnp.full(x.shape[:1], config.data.num_classes, jnp.int32)
    _, hidden = nnx.merge(graphdef, params)(x_t, times, null, hidden_blocks=(block,))
    return hidden[block].astype(jnp.float32).mean(1), x_t.reshape(x_t.shape[0], -1)

  key = jax.random.fold_in(rng.stream(config.seed, "sample_noise"), int(t * 1000))
  latents = {name: batch[name] for name in ("latent_mean", "latent_std") if name in batch}
  outputs = [pooled(sit_params, jax.tree.map(lambda x: x[i:i + BATCH], latents), jax.random.fold_in(key, i))
             for i in range(0, len(batch["label"]), BATCH)]
  return tuple(np.concatenate([np.asarray(o[j]) for o in outputs]) for j in range(2))


def representation_metrics(config: ml_collections.ConfigDict, sit_params, num_train: int = 6000,
                           num_test: int = 2000) -> dict:
  """{probe_t<t>, probe_pixels_t<t>, cknna_t<t>, mutual_knn_t<t>} for t in PROBE_TIMES, and probe_encoder: the probe of
  the target encoder's mean-pooled clean features (the dataset's first encoder by name, whether or not the run
  aligns to it)."""
  if config.reg.weight:
    raise ValueError("representation metrics of a REG model (config.reg.weight) are not computed: its input holds the "
                     "encoder's (noised) class token, so a probe of its blocks would read the encoder's")
  train, test = load_split(config, "train", num_train), load_split(config, config.evaluate.split, num_test)
  if not train["features"]:
    raise ValueError(f"feature dataset {config.data.directory} stores no encoder features, so there is no target to "
                     "align to: precompute it with config.align.encoders set")
  encoder = sorted(train["features"])[0]
  target = {name: split["features"][encoder].astype(np.float32).mean(1) for name, split in (("train", train),
                                                                                               ("test", test))}
  results = {"probe_encoder": linear_probe_accuracy(target["train"], train["label"], target["test"], test["label"]),
             "block": config.align.block, "encoder": encoder, "knn": KNN}
  for t in PROBE_TIMES:
    (train_tokens, train_pixels), (test_tokens, test_pixels) = (block_features(config, sit_params, split, t)
                                                                for split in (train, test))
    results[f"probe_t{t}"] = linear_probe_accuracy(train_tokens, train["label"], test_tokens, test["label"])
    results[f"probe_pixels_t{t}"] = linear_probe_accuracy(train_pixels, train["label"], test_pixels, test["label"])
    results[f"cknna_t{t}"] = cknna(test_tokens, target["test"])
    results[f"mutual_knn_t{t}"] = mutual_knn(test_tokens, target["test"])
  return results
