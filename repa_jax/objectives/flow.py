"""Flow matching: x_t = alpha_t x + sigma_t eps (t=0 data, t=1 noise), velocity target, time sampling, loss.

The formulas and their sources: docs/method.md section 1.
"""
import jax
import jax.numpy as jnp

PATHS = ("linear", "cosine")
TIME_SAMPLERS = ("uniform", "lognormal")


def path_coefficients(t: jax.Array, path: str) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """t: [B] -> (alpha, sigma, d_alpha/dt, d_sigma/dt), each [B] in float32 (float64 if t is: the samplers' x64 state)."""
  t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
  if path == "linear":
    return 1 - t, t, -jnp.ones_like(t), jnp.ones_like(t)
  if path == "cosine":
    half_pi = jnp.pi / 2
    return jnp.cos(half_pi * t), jnp.sin(half_pi * t), -half_pi * jnp.sin(half_pi * t), half_pi * jnp.cos(half_pi * t)
  raise ValueError(f"config.flow.path={path!r}: use one of {PATHS}")


def sample_time(key: jax.Array, batch_size: int, sampler: str, path: str) -> jax.Array:
  """t: [B] float32. 'uniform': U(0, 1); 'lognormal': s = exp(N(0, 1)) mapped to the path's t (logit-normal on linear)."""
  if sampler == "uniform":
    return jax.random.uniform(key, (batch_size,), jnp.float32)
  if sampler == "lognormal":
    s = jnp.exp(jax.random.normal(key, (batch_size,), jnp.float32))
    if path == "linear":
      return s / (1 + s)
    if path == "cosine":
      return 2 / jnp.pi * jnp.arctan(s)
    raise ValueError(f"config.flow.path={path!r}: use one of {PATHS}")
  raise ValueError(f"config.flow.time_sampler={sampler!r}: use one of {TIME_SAMPLERS}")


def interpolate(x: jax.Array, noise: jax.Array, t: jax.Array, path: str) -> tuple[jax.Array, jax.Array]:
  """x, noise: [B, ...]; t: [B] -> (x_t, velocity target d_alpha x + d_sigma noise), both [B, ...] float32."""
  alpha, sigma, d_alpha, d_sigma = (c.reshape((-1,) + (1,) * (x.ndim - 1)) for c in path_coefficients(t, path))
  return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise


def flow_loss(v_pred: jax.Array, v_target: jax.Array) -> jax.Array:
  """Per sample the mean squared error over all non-batch axes, then the batch mean. [B, ...] -> scalar float32."""
  err = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
  return err.reshape(err.shape[0], -1).mean(axis=1).mean()


def velocity_direction_loss(v_pred: jax.Array, v_target: jax.Array, eps: float = 1e-8) -> jax.Array:
  """LightningDiT's cosine loss: 1 - cos(v_pred, v_target) over the channel (last) axis at each position, with
  cos = a.b / (max(|a|, eps) max(|b|, eps)) (torch's cosine_similarity), averaged over positions, then the batch.
  [B, H, W, C] -> scalar float32. With one channel (grey pixels) the cosine is the sign of a product: no gradient."""
  a, b = v_pred.astype(jnp.float32), v_target.astype(jnp.float32)
  norm = lambda v: jnp.sqrt(jnp.maximum(jnp.square(v).sum(-1), eps ** 2))  # = max(|v|, eps), finite gradient at 0
  cos = (a * b).sum(-1) / (norm(a) * norm(b))
  return (1 - cos).reshape(cos.shape[0], -1).mean(axis=1).mean()

