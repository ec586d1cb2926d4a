"""Flow-matching objective vs NumPy references written from docs/method.md section 1."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repa_jax.objectives import flow

# ---------------------------------------------------------------- NumPy references (float64, from the formulas)


def np_coefficients(t, path):
  t = np.asarray(t, np.float64)
  if path == "linear":
    return 1.0 - t, t, -np.ones_like(t), np.ones_like(t)
  return (np.cos(np.pi * t / 2), np.sin(np.pi * t / 2),
          -(np.pi / 2) * np.sin(np.pi * t / 2), (np.pi / 2) * np.cos(np.pi * t / 2))


def np_flow_loss(v_pred, v_target):
  """Per sample: mean over all non-batch entries of the squared error; then the mean over samples (explicit loop)."""
  v_pred = np.asarray(v_pred, np.float64)
  v_target = np.asarray(v_target, np.float64)
  per_sample = [np.mean((v_pred[i] - v_target[i]) ** 2) for i in range(v_pred.shape[0])]
  return float(np.mean(per_sample))


def normal_cdf(x):
  return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, np.float64) / math.sqrt(2.0)))


def ks_statistic(samples, cdf):
  """Kolmogorov-Smirnov distance between the empirical CDF of `samples` and `cdf`."""
  x = np.sort(np.asarray(samples, np.float64))
  n = x.size
  f = cdf(x)
  return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(0, n) / n)))


# ---------------------------------------------------------------- path coefficients

PATHS = ("linear", "cosine")
T_GRID = np.linspace(0.0, 1.0, 11, dtype=np.float32)


@pytest.mark.parametrize("path", PATHS)
def test_path_coefficients_values(path):
  out = flow.path_coefficients(jnp.asarray(T_GRID), path)
  assert len(out) == 4
  for got, want in zip(out, np_coefficients(T_GRID, path)):
    chex.assert_shape(got, (T_GRID.size,))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_path_endpoints(path):
  """t = 0 is data (alpha 1, sigma 0), t = 1 is noise (alpha 0, sigma 1)."""
  alpha, sigma, _, _ = flow.path_coefficients(jnp.array([0.0, 1.0]), path)
  np.testing.assert_allclose(np.asarray(alpha), [1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(sigma), [0.0, 1.0], atol=1e-6)


def test_linear_literal_values():
  alpha, sigma, d_alpha, d_sigma = flow.path_coefficients(jnp.array([0.25]), "linear")
  np.testing.assert_allclose([alpha[0], sigma[0], d_alpha[0], d_sigma[0]], [0.75, 0.25, -1.0, 1.0], atol=1e-7)


def test_cosine_literal_values():
  alpha, sigma, d_alpha, d_sigma = flow.path_coefficients(jnp.array([0.5]), "cosine")
  r = math.sqrt(0.5)
  np.testing.assert_allclose([alpha[0], sigma[0], d_alpha[0], d_sigma[0]],
                             [r, r, -math.pi / 2 * r, math.pi / 2 * r], rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_derivatives_match_numerical_derivatives(path):
  """d_alpha, d_sigma = central finite differences (h = 1e-3, float32) and autodiff of alpha, sigma."""
  t = jnp.linspace(0.05, 0.95, 19)
  h = 1e-3
  alpha_p, sigma_p, _, _ = flow.path_coefficients(t + h, path)
  alpha_m, sigma_m, _, _ = flow.path_coefficients(t - h, path)
  _, _, d_alpha, d_sigma = flow.path_coefficients(t, path)
  # FD error: O(h^2 f''') ~ 1e-6 plus float32 round-off ~ 1e-7 / h ~ 1e-4.
  np.testing.assert_allclose(np.asarray(d_alpha), np.asarray((alpha_p - alpha_m) / (2 * h)), atol=1e-3)
  np.testing.assert_allclose(np.asarray(d_sigma), np.asarray((sigma_p - sigma_m) / (2 * h)), atol=1e-3)
  grad_alpha = jax.vmap(jax.grad(lambda s: flow.path_coefficients(s[None], path)[0][0]))(t)
  grad_sigma = jax.vmap(jax.grad(lambda s: flow.path_coefficients(s[None], path)[1][0]))(t)
  np.testing.assert_allclose(np.asarray(d_alpha), np.asarray(grad_alpha), atol=1e-5)
  np.testing.assert_allclose(np.asarray(d_sigma), np.asarray(grad_sigma), atol=1e-5)


# ---------------------------------------------------------------- interpolate / velocity target


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(5, 4, 4, 3), (3, 7)])
def test_interpolate_vs_numpy(path, shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  eps = rng.normal(size=shape).astype(np.float32)
  t = rng.uniform(size=shape[:1]).astype(np.float32)
  x_t, v = flow.interpolate(jnp.asarray(x), jnp.asarray(eps), jnp.asarray(t), path)
  chex.assert_shape([x_t, v], shape)
  chex.assert_type([x_t, v], jnp.float32)
  want_xt = np.empty(shape)
  want_v = np.empty(shape)
  for i in range(shape[0]):  # per-sample coefficients, applied sample by sample
    a, s, da, ds = (c[0] for c in np_coefficients([t[i]], path))
    want_xt[i] = a * x[i] + s * eps[i]
    want_v[i] = da * x[i] + ds * eps[i]
  np.testing.assert_allclose(np.asarray(x_t), want_xt, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(v), want_v, rtol=1e-5, atol=1e-5)


def test_linear_target_is_noise_minus_data():
  rng = np.random.default_rng(1)
  x, eps = rng.normal(size=(2, 4, 6)).astype(np.float32)
  _, v = flow.interpolate(jnp.asarray(x), jnp.asarray(eps), jnp.array([0.1, 0.2, 0.9, 0.4]), "linear")
  np.testing.assert_allclose(np.asarray(v), eps - x, atol=1e-6)


# ---------------------------------------------------------------- flow loss


@pytest.mark.parametrize("shape", [(4, 3, 5, 2), (6, 11), (2, 8, 8, 4)])
def test_flow_loss_vs_numpy(shape):
  rng = np.random.default_rng(sum(shape))
  v_pred = rng.normal(size=shape).astype(np.float32)
  v_target = rng.normal(size=shape).astype(np.float32)
  loss = flow.flow_loss(jnp.asarray(v_pred), jnp.asarray(v_target))
  chex.assert_shape(loss, ())
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), np_flow_loss(v_pred, v_target), rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 2, 3, 1), (5, 3, 5, 4)])
def test_flow_loss_is_mean_of_per_sample_losses(shape):
  """The batch loss is the mean of the single-sample losses (each a mean over its own entries)."""
  rng = np.random.default_rng(2)
  # Unequal error scales per sample so that a per-sample weighting error would change the value.
  scale = np.arange(1, shape[0] + 1, dtype=np.float32).reshape((-1,) + (1,) * (len(shape) - 1))
  v_pred = (scale * rng.normal(size=shape)).astype(np.float32)
  v_target = rng.normal(size=shape).astype(np.float32)
  singles = [float(flow.flow_loss(jnp.asarray(v_pred[i:i + 1]), jnp.asarray(v_target[i:i + 1])))
             for i in range(shape[0])]
  for i, value in enumerate(singles):
    np.testing.assert_allclose(value, np.mean((v_pred[i].astype(np.float64) - v_target[i]) ** 2), rtol=1e-5)
  batch = float(flow.flow_loss(jnp.asarray(v_pred), jnp.asarray(v_target)))
  np.testing.assert_allclose(batch, np.mean(singles), rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 3), (4, 16, 16, 8)])
def test_flow_loss_is_mean_not_sum_over_non_batch_axes(shape):
  """One sample with a constant error c, the rest exact: loss = c^2 / B whatever the per-sample size.

  A sum over non-batch axes (or a sum over the batch) would scale with the shape and fail.
  """
  c = 0.5
  target = np.zeros(shape, np.float32)
  pred = target.copy()
  pred[1] = c
  loss = flow.flow_loss(jnp.asarray(pred), jnp.asarray(target))
  np.testing.assert_allclose(float(loss), c * c / shape[0], rtol=1e-6)


def test_flow_loss_low_precision_inputs_give_float32():
  rng = np.random.default_rng(3)
  v_pred, v_target = rng.normal(size=(2, 4, 6, 2)).astype(np.float32)
  loss = flow.flow_loss(jnp.asarray(v_pred, jnp.bfloat16), jnp.asarray(v_target, jnp.bfloat16))
  assert loss.dtype == jnp.float32
  bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(float(loss), np_flow_loss(bf(v_pred), bf(v_target)), rtol=1e-5)


# ---------------------------------------------------------------- time samplers

N_SAMPLES = 20000
# KS critical value at the 0.1% level is 1.95 / sqrt(n) = 0.0138; the seeds are fixed, so this is deterministic.
KS_TOL = 1.95 / math.sqrt(N_SAMPLES)


@pytest.mark.parametrize("path", PATHS)
def test_uniform_sampler(path):
  t = flow.sample_time(jax.random.key(0), N_SAMPLES, "uniform", path)
  chex.assert_shape(t, (N_SAMPLES,))
  assert t.dtype == jnp.float32
  t = np.asarray(t)
  assert t.min() >= 0.0 and t.max() <= 1.0
  assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.005
  assert ks_statistic(t, lambda x: np.clip(x, 0, 1)) < KS_TOL


def test_samplers_are_deterministic_per_key():
  for sampler in ("uniform", "lognormal"):
    a = flow.sample_time(jax.random.key(3), 16, sampler, "linear")
    b = flow.sample_time(jax.random.key(3), 16, sampler, "linear")
    c = flow.sample_time(jax.random.key(4), 16, sampler, "linear")
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_lognormal_linear_is_logit_normal():
  """t = s / (1 + s), s = exp(N(0,1))  <=>  logit(t) ~ N(0, 1)."""
  t = np.asarray(flow.sample_time(jax.random.key(1), N_SAMPLES, "lognormal", "linear"), np.float64)
  chex.assert_shape(t, (N_SAMPLES,))
  assert t.min() > 0.0 and t.max() < 1.0
  u = np.log(t) - np.log1p(-t)
  assert abs(u.mean()) < 0.03 and abs(u.std() - 1.0) < 0.03  # 1/sqrt(n) = 0.007
  assert ks_statistic(u, normal_cdf) < KS_TOL
  # The check has power: a uniform t is far from logit-normal.
  t_unif = np.asarray(flow.sample_time(jax.random.key(1), N_SAMPLES, "uniform", "linear"), np.float64)
  assert ks_statistic(np.log(t_unif) - np.log1p(-t_unif), normal_cdf) > 3 * KS_TOL


def test_lognormal_cosine_is_two_over_pi_atan():
  """t = (2/pi) atan(s), s = exp(N(0,1))  <=>  log(tan(pi t / 2)) ~ N(0, 1)."""
  t = np.asarray(flow.sample_time(jax.random.key(2), N_SAMPLES, "lognormal", "cosine"), np.float64)
  assert t.min() > 0.0 and t.max() < 1.0
  u = np.log(np.tan(np.pi * t / 2))
  assert abs(u.mean()) < 0.03 and abs(u.std() - 1.0) < 0.03
  assert ks_statistic(u, normal_cdf) < KS_TOL
  # The linear mapping applied on the cosine path would be detected.
  t_lin = np.asarray(flow.sample_time(jax.random.key(2), N_SAMPLES, "lognormal", "linear"), np.float64)
  assert ks_statistic(np.log(np.tan(np.pi * t_lin / 2)), normal_cdf) > 3 * KS_TOL


def test_lognormal_same_key_maps_same_normal_draw():
  """Both paths transform the same s: tan(pi t_cos / 2) = t_lin / (1 - t_lin) = s."""
  key = jax.random.key(5)
  t_lin = np.asarray(flow.sample_time(key, 64, "lognormal", "linear"), np.float64)
  t_cos = np.asarray(flow.sample_time(key, 64, "lognormal", "cosine"), np.float64)
  np.testing.assert_allclose(np.tan(np.pi * t_cos / 2), t_lin / (1 - t_lin), rtol=1e-4)


# ---------------------------------------------------------------- config errors


def test_unknown_path_raises():
  with pytest.raises(ValueError, match=r"config\.flow\.path"):
    flow.path_coefficients(jnp.zeros(2), "sigmoid")
  with pytest.raises(ValueError, match=r"config\.flow\.path"):
    flow.interpolate(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2), "sigmoid")
  with pytest.raises(ValueError, match=r"config\.flow\.path"):
    flow.sample_time(jax.random.key(0), 4, "lognormal", "sigmoid")


def test_unknown_sampler_raises():
  with pytest.raises(ValueError, match=r"config\.flow\.time_sampler"):
    flow.sample_time(jax.random.key(0), 4, "beta", "linear")
