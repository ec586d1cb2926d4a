"""The representation metrics against independent NumPy references: the unbiased HSIC against its U-statistic
definition (Song et al. 2012, Theorem 2) and its eq. 5 in matrix form, CKNNA and mutual k-NN against set-based loops, the linear probe against a
least-squares solve; then on a trained model's block."""
import itertools

import numpy as np
import pytest

from repa_jax.data.precompute import precompute
from repa_jax.evaluate import representation
from repa_jax.train.loop import train
from tests.test_end_to_end import small_fashion_mnist


def hsic_u_statistic(k, l):
  """HSIC_1 of symmetric kernels = (1 / (m)_4) sum over distinct (i, j, q, r) of h, h the mean over the 24 orderings
  (t, u, v, w) of K_tu L_tu + K_tu L_vw - 2 K_tu L_tv."""
  m, total = len(k), 0.0
  for quad in itertools.permutations(range(m), 4):
    total += np.mean([k[t, u] * l[t, u] + k[t, u] * l[v, w] - 2 * k[t, u] * l[t, v]
                      for t, u, v, w in itertools.permutations(quad)])
  return total / (m * (m - 1) * (m - 2) * (m - 3))


def hsic_equation_5(k, l):
  """Song et al.'s eq. 5 as written, for any (also masked, asymmetric) kernels:
  [tr(K~ L~) + 1'K~1 1'L~1 / ((m-1)(m-2)) - 2/(m-2) 1'K~L~1] / (m(m-3)), K~ = K with a zero diagonal."""
  m, ones = len(k), np.ones(len(k))
  k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
  return (np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((m - 1) * (m - 2))
          - 2 * ones @ k @ l @ ones / (m - 2)) / (m * (m - 3))


def neighbours(x, k):
  """The k nearest neighbours (cosine) of each row, itself excluded, as sets."""
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = x @ x.T
  return [set(sorted((j for j in range(len(x)) if j != i), key=lambda j: -sims[i, j])[:k]) for i in range(len(x))]


def cknna_reference(a, b, k):
  """CKNNA by its definition: the unbiased HSIC (U-statistic) of the kernels restricted to k-NN pairs."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  ka, kb = unit(a) @ unit(a).T, unit(b) @ unit(b).T
  na, nb = neighbours(a, k), neighbours(b, k)
  n = len(a)
  only = lambda sets: np.array([[float(j in sets[i]) for j in range(n)] for i in range(n)])
  both = np.array([[float(j in na[i] and j in nb[i]) for j in range(n)] for i in range(n)])
  ab = hsic_equation_5(both * ka, both * kb)
  aa, bb = hsic_equation_5(only(na) * ka, only(na) * ka), hsic_equation_5(only(nb) * kb, only(nb) * kb)
  return ab / (np.sqrt(aa * bb) + 1e-6)


def test_hsic_unbiased_equals_its_u_statistic():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))
  k, l = x @ x.T, np.exp(-np.square(y[:, None] - y[None]).sum(-1))
  np.testing.assert_allclose(representation.hsic_unbiased(k, l), hsic_u_statistic(k, l), rtol=1e-10)
  np.testing.assert_allclose(hsic_equation_5(k, l), hsic_u_statistic(k, l), rtol=1e-10)
  # Masked (asymmetric) kernels, as CKNNA feeds it: the equation as written.
  mask = (rng.uniform(size=(7, 7)) < 0.5).astype(float)
  np.testing.assert_allclose(representation.hsic_unbiased(mask * k, mask * l), hsic_equation_5(mask * k, mask * l),
                             rtol=1e-10)


def test_cknna_and_mutual_knn_against_the_definitions():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(8, 5))
  b = a @ rng.normal(size=(5, 4)) + 0.5 * rng.normal(size=(8, 4))
  np.testing.assert_allclose(representation.cknna(a, b, k=3), cknna_reference(a, b, 3), rtol=1e-8)
  na, nb = neighbours(a, 3), neighbours(b, 3)
  assert representation.mutual_knn(a, b, k=3) == pytest.approx(np.mean([len(p & q) / 3 for p, q in zip(na, nb)]))


def test_cknna_is_one_for_the_same_geometry_and_lower_for_noise():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(200, 16))
  rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0]
  assert representation.cknna(a, 3.0 * a @ rotation) == pytest.approx(1.0, abs=1e-4)
  assert representation.mutual_knn(a, a @ rotation) == pytest.approx(1.0)
  assert abs(representation.cknna(a, rng.normal(size=(200, 16)))) < 0.2
  with pytest.raises(ValueError, match="k >= 2"):
    representation.cknna(a, a, k=1)


def test_linear_probe_is_the_ridge_least_squares_classifier():
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(4, 6)) * 3
  train_y, test_y = rng.integers(0, 4, 300), rng.integers(0, 4, 100)
  train_x = centres[train_y] + rng.normal(size=(300, 6)) * 2
  test_x = centres[test_y] + rng.normal(size=(100, 6)) * 2
  ridge = 0.05
  # Reference: the augmented least-squares system [X 1; sqrt(ridge N) I 0] W = [Y; 0] on standardised features.
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  x = np.c_[(train_x - mean) / std, np.ones(300)]
  rows = np.c_[np.sqrt(ridge * 300) * np.eye(6), np.zeros(6)]
  weights = np.linalg.lstsq(np.r_[x, rows], np.r_[np.eye(4)[train_y], np.zeros((6, 4))], rcond=None)[0]
  expected = np.mean(np.argmax(np.c_[(test_x - mean) / std, np.ones(100)] @ weights, 1) == test_y)
  got = representation.linear_probe_accuracy(train_x, train_y, test_x, test_y, ridge)
  assert got == pytest.approx(expected) and got > 0.7  # well above chance (0.25) on separated blobs


def test_representation_metrics_of_a_trained_model(tmp_path, fashion_mnist_dir):
  config = small_fashion_mnist(tmp_path, fashion_mnist_dir)
  config.precompute.splits = ("train", "test")
  precompute(config)
  state = train(config, str(tmp_path / "workdir"))
  results = representation.representation_metrics(config, state["ema_params"]["sit"], num_train=150, num_test=100)
  assert results["block"] == config.align.block and results["encoder"] == "fmnist_vit"
  for t in representation.PROBE_TIMES:
    assert 0.0 <= results[f"probe_t{t}"] <= 1.0 and 0.0 <= results[f"mutual_knn_t{t}"] <= 1.0
    assert -1.0 <= results[f"cknna_t{t}"] <= 1.0
  assert results["probe_encoder"] > 0.3  # the trained encoder's features separate the 10 classes (chance 0.1)
  with pytest.raises(ValueError, match="which has 200"):  # precompute's limit
    representation.representation_metrics(config, state["ema_params"]["sit"], num_train=150, num_test=201)
