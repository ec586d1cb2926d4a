"""Samplers vs NumPy references written from docs/method.md section 4, guidance, exact Gaussian flows."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repa_jax.sample import samplers

NUM_CLASSES = 3
SHAPE = (4, 2, 3)  # [B, H, C]
EMB = np.linspace(-1.0, 1.0, (NUM_CLASSES + 1) * 3).reshape(NUM_CLASSES + 1, 3)  # last row: null class
GUIDANCE = samplers.Guidance(scale=1.7, null_class=NUM_CLASSES, low=0.3, high=0.7)

# ---------------------------------------------------------------- NumPy references (float64, from the formulas)


def np_model(x, t, y):
  """Test velocity: nonlinear in x, depends on t and (through a per-class channel offset) on y."""
  return np.tanh(x) * (1.0 + t) + EMB[y][:, None, :]


def jax_model(x, t, y):
  return jnp.tanh(x) * (1.0 + t[:, None, None]) + jnp.asarray(EMB, x.dtype)[y][:, None, :]


def np_coefficients(t, path):
  if path == "linear":
    return 1.0 - t, t, -1.0, 1.0
  h = np.pi / 2
  return np.cos(h * t), np.sin(h * t), -h * np.sin(h * t), h * np.cos(h * t)


def np_drift(v, x, t, path):
  alpha, sigma, d_alpha, d_sigma = np_coefficients(t, path)
  score = (alpha / d_alpha * v - x) / (sigma**2 - alpha / d_alpha * d_sigma * sigma)
  return v - 0.5 * (2 * t) * score


def np_output(x, t, y, guidance, t_guide, out=lambda v, x: v):
  """out(v, x) at time t, with CFG uncond + w (cond - uncond) iff low <= t_guide <= high."""
  cond = out(np_model(x, t, y), x)
  if guidance is None or not guidance.low <= t_guide <= guidance.high:
    return cond
  uncond = out(np_model(x, t, np.full_like(y, guidance.null_class)), x)
  return uncond + guidance.scale * (cond - uncond)


def np_ode(x, y, num_steps, heun, guidance):
  ts = np.linspace(1.0, 0.0, num_steps + 1)
  for i in range(num_steps):
    t, t_next = ts[i], ts[i + 1]
    d = np_output(x, t, y, guidance, t)
    x_next = x + (t_next - t) * d
    if heun and i < num_steps - 1:
      x_next = x + (t_next - t) * (0.5 * d + 0.5 * np_output(x_next, t_next, y, guidance, t))
    x = x_next
  return x


def np_sde(x, y, key, num_steps, path, guidance, noise_dtype=jnp.float32):
  ts = np.append(np.linspace(1.0, 0.04, num_steps), 0.0)
  for i in range(num_steps):
    t, dt = ts[i], ts[i + 1] - ts[i]
    d = np_output(x, t, y, guidance, t, lambda v, x: np_drift(v, x, t, path))
    x = x + d * dt
    if i < num_steps - 1:
      eps = np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape, noise_dtype), np.float64)
      x = x + np.sqrt(2 * t) * np.sqrt(abs(dt)) * eps
  return x


def inputs():
  noise = np.asarray(jax.random.normal(jax.random.key(0), SHAPE, jnp.float32), np.float64)
  return noise, np.array([0, 1, 2, 1], np.int32), jax.random.key(7)


@functools.cache
def jitted(name, num_steps, path):
  """One jitted sampler per static setting; Guidance values are traced, so all scales and intervals share it."""
  return jax.jit(lambda noise, y, key, guidance:
                 samplers.sample(name, jax_model, noise, y, key, num_steps, path, guidance))


def run(name, noise, y, key, num_steps, path="linear", guidance=None):
  return jitted(name, num_steps, path)(jnp.asarray(noise, jnp.float32), jnp.asarray(y), key, guidance)


# ---------------------------------------------------------------- steps vs the references


@pytest.mark.parametrize("guidance", [None, GUIDANCE])
@pytest.mark.parametrize("num_steps", [1, 4])
@pytest.mark.parametrize("heun", [False, True])
def test_ode_matches_reference(heun, num_steps, guidance):
  noise, y, key = inputs()
  out = run("heun" if heun else "euler", noise, y, key, num_steps, guidance=guidance)
  chex.assert_shape(out, SHAPE)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_ode(noise, y, num_steps, heun, guidance), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [None, GUIDANCE])
@pytest.mark.parametrize("num_steps", [1, 4])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_matches_reference(path, num_steps, guidance):
  noise, y, key = inputs()
  out = run("sde", noise, y, key, num_steps, path, guidance)
  np.testing.assert_allclose(out, np_sde(noise, y, key, num_steps, path, guidance), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_float64_state_under_x64(name):
  noise, y, key = inputs()
  with jax.enable_x64(True):
    out = jax.jit(lambda n: samplers.sample(name, jax_model, n, jnp.asarray(y), key, 3, "cosine", GUIDANCE))(noise)
    assert out.dtype == jnp.float64
    if name == "sde":  # path_coefficients computes in float32, so the SDE drift is float32-accurate
      np.testing.assert_allclose(out, np_sde(noise, y, key, 3, "cosine", GUIDANCE, jnp.float64), rtol=1e-6, atol=1e-6)
    else:  # the ODE is exact to float64
      np.testing.assert_allclose(out, np_ode(noise, y, 3, name == "heun", GUIDANCE), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- guidance


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_cfg_scale_one_equals_no_guidance(name):
  noise, y, key = inputs()
  plain = run(name, noise, y, key, 4, "cosine")
  scale_one = run(name, noise, y, key, 4, "cosine", GUIDANCE._replace(scale=1.0, low=0.0, high=1.0))
  np.testing.assert_allclose(scale_one, plain, rtol=1e-6, atol=1e-6)
  assert not np.allclose(run(name, noise, y, key, 4, "cosine", GUIDANCE), plain, atol=1e-3)


def evaluations(name, num_steps):
  """(t, batch size) of every model evaluation, recorded at run time (so an untaken lax.cond branch does not log)."""
  log = []

  def model(x, t, y):
    jax.debug.callback(lambda t, b=x.shape[0]: log.append((float(t), b)), t[0], ordered=True)
    return jax_model(x, t, y)

  noise, y, key = inputs()
  guidance = GUIDANCE._replace(low=0.25, high=0.65)
  jax.block_until_ready(jax.jit(lambda n: samplers.sample(name, model, n, y, key, num_steps, "linear", guidance))(
      jnp.asarray(noise, jnp.float32)))
  jax.effects_barrier()
  return log


def batch(t):
  return 8 if 0.25 <= t <= 0.65 else 4


def test_guidance_interval_euler():
  ts = np.linspace(1, 0, 11)
  log = evaluations("euler", 10)
  np.testing.assert_allclose([t for t, _ in log], ts[:-1], atol=1e-6)
  assert [b for _, b in log] == [batch(t) for t in ts[:-1]]  # doubled at t = 0.6 .. 0.3 only


def test_guidance_interval_heun():
  ts = np.linspace(1, 0, 11)
  expected = [(t, batch(t)) for i in range(9) for t in (ts[i], ts[i + 1])] + [(ts[9], batch(ts[9]))]  # 2N - 1 evals
  log = evaluations("heun", 10)
  assert len(log) == 19
  np.testing.assert_allclose([t for t, _ in log], [t for t, _ in expected], atol=1e-6)
  assert [b for _, b in log] == [batch(ts[i // 2]) if i < 18 else 4 for i in range(19)]  # guided by the step's start


def test_guidance_interval_sde():
  ts = np.linspace(1, 0.04, 10)
  log = evaluations("sde", 10)  # N evaluations, the last at t = 0.04
  np.testing.assert_allclose([t for t, _ in log], ts, atol=1e-6)
  assert [b for _, b in log] == [batch(t) for t in ts]


def test_sde_deterministic_for_a_seed():
  noise, y, key = inputs()
  a, b = run("sde", noise, y, key, 5), run("sde", noise, y, key, 5)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, run("sde", noise, y, jax.random.key(8), 5))


# ---------------------------------------------------------------- exact flow of a Gaussian: N(MU, S^2)

MU, S = 2.0, 0.5


def gaussian_velocity(path):
  """E[v | x_t] for x0 ~ N(MU, S^2): E[v] + Cov(v, x_t) / Var(x_t) (x_t - E[x_t]), v = a' x0 + s' eps."""
  def velocity(x, t, y):
    t = t[:, None]
    if path == "linear":
      a, s, da, ds = 1 - t, t, -1.0, 1.0
    else:
      h = jnp.pi / 2
      a, s, da, ds = jnp.cos(h * t), jnp.sin(h * t), -h * jnp.sin(h * t), h * jnp.cos(h * t)
    return da * MU + (da * a * S**2 + ds * s) / (a**2 * S**2 + s**2) * (x - a * MU)
  return velocity


@pytest.mark.parametrize("name,num_steps,tol", [("euler", 200, 1e-2), ("heun", 50, 2e-3), ("sde", 250, 2e-2)])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_exact_gaussian_flow(name, num_steps, tol, path):
  """The ODE map is affine, so with standardised noise only discretisation error remains; the SDE adds sampling
  error (std error of the mean 0.0035 for 20000 samples) and the noiseless last step from t = 0.04."""
  z = jax.random.normal(jax.random.key(0), (20000, 1))
  z = (z - z.mean()) / z.std()
  out = jax.jit(lambda z: samplers.sample(name, gaussian_velocity(path), z, jnp.zeros(20000, jnp.int32),
                                          jax.random.key(1), num_steps, path))(z)
  assert abs(float(out.mean()) - MU) < tol
  assert abs(float(out.std()) - S) < tol
