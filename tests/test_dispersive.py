"""Dispersive Loss vs float64 NumPy references written from docs/method.md section 3."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from repa_jax.objectives import dispersive

VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")
TAU = 0.5
MARGIN = 2.0  # with z ~ N(0, 1) per entry, D_ij ~ 2: some pairs inside the margin, some outside
COV_EPS = 1e-6

# ---------------------------------------------------------------- NumPy references (float64)


def np_flat(z):
  z = np.asarray(z, np.float64)
  return z.reshape(z.shape[0], -1)


def np_l2_distances(z):
  """D_ij = ||z_i - z_j||^2 / d by explicit differences."""
  z = np_flat(z)
  g, d = z.shape
  out = np.empty((g, g))
  for i in range(g):
    for j in range(g):
      diff = z[i] - z[j]
      out[i, j] = np.dot(diff, diff) / d
  return out


def np_cos_distances(z):
  z = np_flat(z)
  g = z.shape[0]
  out = np.empty((g, g))
  for i in range(g):
    for j in range(g):
      out[i, j] = -np.dot(z[i], z[j]) / (np.linalg.norm(z[i]) * np.linalg.norm(z[j]))
  return out


def np_log_mean_exp(x):
  m = np.max(x)
  return m + math.log(np.mean(np.exp(x - m)))


def np_group_value(z, variant, temperature=TAU, margin=MARGIN):
  """The per-group dispersive term; the mean runs over all G x G pairs including i = j."""
  if variant == "infonce_l2":
    return np_log_mean_exp(-np_l2_distances(z) / temperature)
  if variant == "infonce_cosine":
    return np_log_mean_exp(-np_cos_distances(z) / temperature)
  if variant == "hinge":
    return float(np.mean(np.maximum(0.0, margin - np_l2_distances(z)) ** 2))
  if variant == "covariance":
    z = np_flat(z)
    zs = (z - z.mean(axis=0)) / (z.std(axis=0, ddof=1) + COV_EPS)   # standardise each feature over the group
    c = np.cov(zs, rowvar=False)                                     # full d x d covariance, ddof = 1
    assert c.shape == (z.shape[1], z.shape[1])
    return float(np.sum(c ** 2) - np.sum(np.diag(c) ** 2))
  raise AssertionError(variant)


def np_dispersive(hidden, variant, group_size=None, **kw):
  hidden = np.asarray(hidden, np.float64)
  g = group_size or hidden.shape[0]
  return float(np.mean([np_group_value(hidden[k:k + g], variant, **kw) for k in range(0, hidden.shape[0], g)]))


def central_fd(fn, a, h=1e-5):
  a = np.array(a, np.float64)
  g = np.zeros_like(a)
  for idx in np.ndindex(a.shape):
    old = a[idx]
    a[idx] = old + h
    up = fn(a)
    a[idx] = old - h
    down = fn(a)
    a[idx] = old
    g[idx] = (up - down) / (2 * h)
  return g


def randn(shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


_jit_loss = jax.jit(dispersive.dispersive_loss, static_argnames=("variant", "temperature", "group_size", "margin"))


def jax_loss(hidden, variant, **kw):
  """dispersive_loss under jit (one compilation per shape/config instead of one per eager op)."""
  kw.setdefault("temperature", TAU)
  kw.setdefault("margin", MARGIN)
  return _jit_loss(jnp.asarray(hidden), variant=variant, **kw)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(6, 4, 3), (4, 2, 5)])
def test_value_vs_numpy(variant, shape):
  h = randn(shape, seed=sum(shape))
  loss = jax_loss(h, variant)
  chex.assert_shape(loss, ())
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), np_dispersive(h, variant), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 2.0])
def test_infonce_temperature(temperature):
  h = randn((5, 3, 4), seed=1)
  for variant in ("infonce_l2", "infonce_cosine"):
    np.testing.assert_allclose(float(jax_loss(h, variant, temperature=temperature)),
                               np_dispersive(h, variant, temperature=temperature), rtol=1e-5, atol=1e-6)


def test_infonce_l2_bound_and_limits():
  """Includes i = j, so value >= -log G; -> -log G as samples spread apart; 0 when all samples coincide."""
  g = 8
  for seed in range(5):
    h = randn((g, 3, 4), seed=seed)
    assert float(jax_loss(h, "infonce_l2")) >= -math.log(g) - 1e-6
  far = randn((g, 3, 4), seed=0, scale=100.0)
  np.testing.assert_allclose(float(jax_loss(far, "infonce_l2")), -math.log(g), atol=1e-6)
  np.testing.assert_allclose(np_dispersive(far, "infonce_l2"), -math.log(g), atol=1e-6)
  same = np.broadcast_to(randn((1, 3, 4), seed=1), (g, 3, 4))
  np.testing.assert_allclose(float(jax_loss(same, "infonce_l2")), 0.0, atol=1e-6)
  # Strictly above the floor for ordinary inputs: the diagonal is in the mean.
  assert float(jax_loss(randn((g, 3, 4), seed=2), "infonce_l2")) > -math.log(g) + 1e-3


def test_hinge_margin():
  h = randn((6, 4, 3), seed=3)
  dist = np_l2_distances(h)
  off = dist[~np.eye(6, dtype=bool)]
  assert (off < MARGIN).any() and (off > MARGIN).any()  # the margin is active for some pairs only
  for margin in (0.5, MARGIN, 4.0):
    np.testing.assert_allclose(float(jax_loss(h, "hinge", margin=margin)), np_dispersive(h, "hinge", margin=margin),
                               rtol=1e-5, atol=1e-6)
  # Far apart: only the G diagonal pairs (D_ii = 0) contribute margin^2 each.
  far = randn((6, 4, 3), seed=3, scale=100.0)
  np.testing.assert_allclose(float(jax_loss(far, "hinge", margin=1.5)), 1.5 ** 2 / 6, rtol=1e-6)


def test_covariance_decorrelated_features_give_zero():
  """Orthogonal centred columns: the standardised covariance is diagonal, so the loss is ~0."""
  had = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], np.float64)
  z = had[:, 1:].reshape(4, 1, 3).astype(np.float32)  # 3 zero-mean, mutually orthogonal features over 4 samples
  np.testing.assert_allclose(float(jax_loss(z, "covariance")), 0.0, atol=1e-6)
  np.testing.assert_allclose(np_dispersive(z, "covariance"), 0.0, atol=1e-9)
  # Perfectly correlated features: every off-diagonal entry is ~1 -> d (d - 1).
  col = randn((4, 1, 1), seed=2)
  z = np.concatenate([col, 2 * col + 1, -col], axis=2)
  np.testing.assert_allclose(float(jax_loss(z, "covariance")), 6.0, rtol=1e-4)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("group_size", [None, 4])
def test_gradient_vs_finite_differences(variant, group_size):
  # Batch 8: with groups of 2 the standardised covariance is degenerate (every entry +-1, gradient ~0 up to eps).
  h = randn((8, 3, 2), seed=7)
  grad = jax.grad(lambda x: jax_loss(x, variant, group_size=group_size))(jnp.asarray(h))
  want = central_fd(lambda x: np_dispersive(x, variant, group_size=group_size), h)
  chex.assert_shape(grad, h.shape)
  assert np.abs(want).max() > 1e-3  # the gradient reaches the input
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-3, atol=2e-4 * np.abs(want).max())


# ---------------------------------------------------------------- groups


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("group_size", [2, 4, 8, 16, None])
def test_group_value_is_mean_over_contiguous_groups(variant, group_size):
  h = randn((16, 2, 3), seed=11)
  np.testing.assert_allclose(float(jax_loss(h, variant, group_size=group_size)),
                             np_dispersive(h, variant, group_size=group_size), rtol=1e-5, atol=1e-5)


def test_groups_are_contiguous_slices():
  """Permuting within groups keeps the value; swapping samples across groups changes it."""
  h = randn((8, 2, 3), seed=12)
  base = float(jax_loss(h, "infonce_l2", group_size=4))
  within = h[[3, 1, 0, 2, 5, 7, 6, 4]]
  across = h[[0, 1, 2, 4, 3, 5, 6, 7]]
  np.testing.assert_allclose(float(jax_loss(within, "infonce_l2", group_size=4)), base, rtol=1e-6)
  assert abs(float(jax_loss(across, "infonce_l2", group_size=4)) - base) > 1e-4


def test_group_size_not_dividing_batch_raises():
  with pytest.raises(ValueError, match=r"config\.disperse\.group_size"):
    jax_loss(randn((10, 2, 3)), "infonce_l2", group_size=4)


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match=r"config\.disperse\.variant"):
    jax_loss(randn((4, 2, 3)), "barlow")


# ---------------------------------------------------------------- sharding invariance


def _meshes():
  devices = jax.devices()
  assert len(devices) >= 8, "tests/conftest.py should provide 8 CPU devices"
  return {
      "1": Mesh(np.array(devices[:1]).reshape(1, 1), ("data", "fsdp")),
      "2x4": Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "fsdp")),
      "8x1": Mesh(np.array(devices[:8]).reshape(8, 1), ("data", "fsdp")),
  }


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("group_size", [4, 16])
def test_sharding_invariance(variant, group_size):
  """The same global batch [16, N, D] sharded over the batch on 1, 2x4 and 8x1 meshes: equal values (rtol 1e-6)."""
  h = randn((16, 3, 4), seed=21)
  fn = jax.jit(functools.partial(dispersive.dispersive_loss, variant=variant, temperature=TAU,
                                 group_size=group_size, margin=MARGIN))
  values = {}
  for name, mesh in _meshes().items():
    x = jax.device_put(jnp.asarray(h), NamedSharding(mesh, P(("data", "fsdp"))))
    assert len(x.sharding.device_set) == mesh.size
    values[name] = float(fn(x))
  # rtol 1e-6; covariance 1e-5: it forms sum(Gram^2) - sum(diag^2), a float32 cancellation that amplifies the
  # reduction-order round-off of the sharded matmuls (seen: 1.8e-6). A batch split into per-device groups would be off
  # by O(1).
  rtol = 1e-5 if variant == "covariance" else 1e-6
  for name, value in values.items():
    np.testing.assert_allclose(value, values["1"], rtol=rtol, err_msg=f"mesh {name}")
  np.testing.assert_allclose(values["1"], np_dispersive(h, variant, group_size=group_size), rtol=1e-5, atol=1e-5)
