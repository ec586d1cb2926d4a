"""Metrics of generated samples from feature-network outputs, in NumPy float64 (as the ADM evaluator defines them).

- Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (FID on pooled features, sFID on flattened
  spatial features). The trace of the matrix square root is computed eigen-based:
  ``tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``, symmetric PSD matrices only (``eigh``), so no complex
  parts or singular-matrix retries as with ``scipy.linalg.sqrtm``.
- Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from logits, the mean over splits.
- Precision / recall by k-NN manifolds (Kynkaanniemi et al. 2019): a point is in a set's manifold if it lies within
  the distance from some point of the set to that point's k-th nearest neighbour (itself excluded).
"""
import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """features [N, D] -> (mean [D], covariance [D, D] with N - 1 normalisation), float64."""
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric PSD [D, D] -> its symmetric square root (negative round-off eigenvalues clipped to 0)."""
  eigval, eigvec = np.linalg.eigh(matrix)
  return (eigvec * np.sqrt(np.clip(eigval, 0, None))) @ eigvec.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1 [D], sigma1 [D, D]) and N(mu2, sigma2)."""
  mu1, sigma1, mu2, sigma2 = (np.atleast_1d(np.asarray(a, np.float64)) for a in (mu1, sigma1, mu2, sigma2))
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  root1 = _sqrt_psd(sigma1)
  inner = root1 @ sigma2 @ root1
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """Frechet distance between the Gaussian fits of features1 [N1, D] and features2 [N2, D]."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def sfid_from_features(spatial1: np.ndarray, spatial2: np.ndarray) -> float:
  """sFID: the Frechet distance of spatial features [N, ...] (e.g. [N, H, W, C]) flattened to [N, D]."""
  return fid_from_features(np.reshape(spatial1, (len(spatial1), -1)), np.reshape(spatial2, (len(spatial2), -1)))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> float:
  """logits [N, K] -> mean over ``num_splits`` contiguous splits of exp(mean_x KL(p(y|x) || p(y)))."""
  logits = np.asarray(logits, np.float64)
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(log_p, num_splits):
    log_marginal = np.log(np.exp(part).mean(axis=0))
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a [n, D], b [m, D] -> [n, m] squared Euclidean distances, float64, clipped at 0."""
  d = a @ b.T
  d *= -2
  d += (a * a).sum(1)[:, None]
  d += (b * b).sum(1)[None, :]
  return np.maximum(d, 0, out=d)


def knn_radii(features: np.ndarray, k: int = 3, batch_size: int = 1000) -> np.ndarray:
  """features [N, D] -> [N] squared distance of each point to its k-th nearest other point; rows in batches."""
  features = np.asarray(features, np.float64)
  radii = []
  for i in range(0, len(features), batch_size):
    distances = _squared_distances(features[i:i + batch_size], features)
    radii.append(np.partition(distances, k, axis=1)[:, k].copy())  # copy: a view would keep the whole chunk alive
  return np.concatenate(radii)


def manifold_coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, batch_size: int = 1000) -> float:
  """Fraction of queries [M, D] within radius (radii [N], squared) of at least one manifold point [N, D]."""
  manifold, queries = np.asarray(manifold, np.float64), np.asarray(queries, np.float64)
  inside = [np.any(_squared_distances(queries[i:i + batch_size], manifold) <= radii[None, :], axis=1)
            for i in range(0, len(queries), batch_size)]
  return float(np.concatenate(inside).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
  """real [N, D], fake [M, D] -> (precision: fake in the real manifold, recall: real in the fake manifold)."""
  precision = manifold_coverage(real, knn_radii(real, k, batch_size), fake, batch_size)
  recall = manifold_coverage(fake, knn_radii(fake, k, batch_size), real, batch_size)
  return precision, recall
