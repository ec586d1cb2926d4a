"""Metrics vs closed forms and independent NumPy/SciPy references (scipy.linalg.sqrtm, cdist, scipy.stats.entropy)."""
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats

from repa_jax.evaluate import metrics

# ---------------------------------------------------------------- references


def scipy_frechet(mu1, sigma1, mu2, sigma2):
  """The ADM / pytorch-fid formula with scipy.linalg.sqrtm."""
  covmean = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def brute_precision_recall(real, fake, k):
  """Full distance matrices; radius = k-th smallest distance to another point of the same set."""
  def coverage(manifold, queries):
    radii = np.sort(scipy.spatial.distance.cdist(manifold, manifold), axis=1)[:, k]  # column 0 is the point itself
    return np.mean((scipy.spatial.distance.cdist(queries, manifold) <= radii[None]).any(axis=1))
  return coverage(real, fake), coverage(fake, real)


# ---------------------------------------------------------------- Frechet distance


def test_fd_identical_sets_is_zero():
  feats = np.random.default_rng(0).normal(size=(500, 16))
  assert abs(metrics.fid_from_features(feats, feats)) < 1e-8


def test_fd_of_known_gaussians_closed_form():
  """Commuting covariances (shared eigenvectors Q): FD = |m1 - m2|^2 + sum (sqrt(l1) - sqrt(l2))^2."""
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  l1, l2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  m1, m2 = rng.normal(size=6), rng.normal(size=6)
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
  got = metrics.frechet_distance(m1, q @ np.diag(l1) @ q.T, m2, q @ np.diag(l2) @ q.T)
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  np.testing.assert_allclose(metrics.frechet_distance(0.0, 4.0, 1.0, 1.0), 1.0 + (2.0 - 1.0) ** 2)  # 1-D


def test_fd_matches_scipy_sqrtm_on_non_commuting_covariances():
  rng = np.random.default_rng(2)
  m1, m2, s1, s2 = rng.normal(size=32), rng.normal(size=32), random_spd(rng, 32), random_spd(rng, 32)
  np.testing.assert_allclose(metrics.frechet_distance(m1, s1, m2, s2), scipy_frechet(m1, s1, m2, s2), rtol=1e-8)


def test_fd_from_samples_and_sfid_flattening():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(4000, 4)), rng.normal(1.0, 2.0, size=(4000, 4))  # true FD = 4 * (1 + 1) = 8
  assert abs(metrics.fid_from_features(a, b) - 8.0) < 0.5
  spatial_a, spatial_b = a.reshape(4000, 2, 2, 1), b.reshape(4000, 2, 2, 1)
  np.testing.assert_allclose(metrics.sfid_from_features(spatial_a, spatial_b), metrics.fid_from_features(a, b))
  mu_a, cov_a = metrics.feature_statistics(a)
  np.testing.assert_allclose(cov_a, np.cov(a.T))
  np.testing.assert_allclose(mu_a, a.mean(0))


# ---------------------------------------------------------------- Inception Score


def test_is_uniform_logits_is_one():
  assert abs(metrics.inception_score(np.zeros((100, 10)), num_splits=4) - 1.0) < 1e-12


def test_is_confident_distinct_classes_is_num_classes():
  logits = 50.0 * np.eye(10)[np.tile(np.arange(10), 20)]  # each split holds every class equally often
  np.testing.assert_allclose(metrics.inception_score(logits, num_splits=2), 10.0, rtol=1e-6)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_is_matches_scipy_entropy(num_splits):
  logits = np.random.default_rng(4).normal(scale=3.0, size=(300, 7))
  scores = []
  for part in np.array_split(logits, num_splits):
    p = scipy.special.softmax(part, axis=1)
    scores.append(np.exp(np.mean([scipy.stats.entropy(row, p.mean(0)) for row in p])))
  np.testing.assert_allclose(metrics.inception_score(logits, num_splits), np.mean(scores), rtol=1e-10)


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets():
  feats = np.random.default_rng(5).normal(size=(200, 8))
  assert metrics.precision_recall(feats, feats.copy(), k=3, batch_size=64) == (1.0, 1.0)


def test_precision_recall_disjoint_far_sets():
  rng = np.random.default_rng(6)
  real, fake = rng.normal(size=(150, 8)), rng.normal(size=(120, 8)) + 100.0
  assert metrics.precision_recall(real, fake, k=3, batch_size=64) == (0.0, 0.0)


def test_precision_recall_constructed_line():
  """Real 0, 1, .., 9: 3rd-NN radii 3 at the ends, 2 inside. Fake 0, 0.5, 1, 1.5 (radii 1.5, 1, 1, 1.5) and 50..53.
  Precision: the 4 fakes near 0 of 8. Recall: real 0..3 lie within 1.5 of fake 1.5 or 0; real 4..9 do not."""
  real = np.arange(10.0)[:, None]
  fake = np.array([0.0, 0.5, 1.0, 1.5, 50.0, 51.0, 52.0, 53.0])[:, None]
  assert metrics.precision_recall(real, fake, k=3) == (0.5, 0.4)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
  rng = np.random.default_rng(7)
  real, fake = rng.normal(size=(300, 5)), rng.normal(0.5, 1.3, size=(250, 5))
  got = metrics.precision_recall(real, fake, k=k, batch_size=70)  # batches that do not divide the set sizes
  np.testing.assert_allclose(got, brute_precision_recall(real, fake, k), rtol=1e-12)
