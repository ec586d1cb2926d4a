"""ODE and SDE samplers of the flow (SiT's and REPA's samplers), pure JAX over any velocity function.

t = 1 is noise, t = 0 is data. A model enters as ``velocity_fn(x [B, ...], t [B], y [B] int) -> v [B, ...]`` (wrap the
SiT, which returns ``(v, hiddens)``). The state x may be any pytree of [B, ...] arrays (REG's (image, class token)):
every leaf takes the same steps, each with its own noise, and v has the state's structure. The model is called in the
dtype of the initial noise; the state and the time grid are float64 when ``jax_enable_x64`` is on, else float32.
Steps run in ``lax.fori_loop``, so for a static ``num_steps`` a jitted sampler compiles once.

Classifier-free guidance (``Guidance``): ``out = uncond + scale * (cond - uncond)`` on all channels of every leaf
(REG's class token too, at the same scale as its preset), applied to v (ODE) or to the drift (SDE), only while
``low <= t <= high``. All samples share t, so ``lax.cond`` on the scalar predicate
picks a branch at run time: the branch with the doubled batch (each row twice: with its label, then with
``null_class``, so that a batch sharded over devices needs no exchange) is executed only inside the interval, the plain
branch only outside it.

The formulas and their sources: docs/method.md section 4.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from repa_jax.objectives.flow import path_coefficients

VelocityFn = Callable[[Any, jax.Array, jax.Array], Any]  # (state pytree, t [B], y [B]) -> velocity pytree
SAMPLERS = ("euler", "heun", "sde")


class Guidance(NamedTuple):
  """Classifier-free guidance. ``null_class`` is the label of the unconditional row (= num_classes)."""
  scale: float | jax.Array
  null_class: int | jax.Array
  low: float | jax.Array = 0.0
  high: float | jax.Array = 1.0


def state_dtype() -> jnp.dtype:
  """float64 when jax_enable_x64 is on, else float32."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def ode_time_grid(num_steps: int) -> jax.Array:
  """[N + 1]: linspace(1, 0, N + 1)."""
  return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=state_dtype())


def sde_time_grid(num_steps: int) -> jax.Array:
  """[N + 1]: linspace(1, 0.04, N), then 0."""
  return jnp.append(jnp.linspace(1.0, 0.04, num_steps, dtype=state_dtype()), jnp.zeros((1,), state_dtype()))


def _normal_like(key: jax.Array, x):
  """Standard normal noise shaped like the state pytree x: one array from `key` itself, several from its splits."""
  leaves, treedef = jax.tree.flatten(x)
  keys = [key] if len(leaves) == 1 else jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])


def _axpy(x, a, v):
  """x + a * v over the leaves of the state pytrees x and v."""
  return jax.tree.map(lambda x, v: x + a * v, x, v)


def _guide(out: jax.Array, scale) -> jax.Array:
  """[2B, ...] (each sample's conditional row, then its unconditional one) -> [B, ...] uncond + scale (cond - uncond)."""
  pairs = out.reshape(-1, 2, *out.shape[1:])
  cond, uncond = pairs[:, 0], pairs[:, 1]
  return uncond + jnp.asarray(scale, out.dtype) * (cond - uncond)


def _evaluate(velocity_fn: VelocityFn, x, t: jax.Array, y: jax.Array, model_dtype: jnp.dtype,
              guidance: Guidance | None, t_guide: jax.Array, out_fn: Callable[[jax.Array, jax.Array], jax.Array]):
  """x state pytree ([B, ...] leaves), t scalar -> out_fn(v, x) per leaf, in the state dtype, guided iff
  low <= t_guide <= high."""
  def model(x, y):
    t_batch = jnp.full((y.shape[0],), t, model_dtype)
    v = velocity_fn(jax.tree.map(lambda leaf: leaf.astype(model_dtype), x), t_batch, y)
    return jax.tree.map(lambda v, x: out_fn(v.astype(x.dtype), x), v, x)

  if guidance is None:
    return model(x, y)

  def guided(x):  # each row beside its unconditional twin: a batch-sharded state stays on its devices
    y_both = jnp.stack([y, jnp.full_like(y, guidance.null_class)], axis=1).reshape(-1)
    return jax.tree.map(lambda out: _guide(out, guidance.scale),
                        model(jax.tree.map(lambda leaf: jnp.repeat(leaf, 2, axis=0), x), y_both))

  inside = (guidance.low <= t_guide) & (t_guide <= guidance.high)
  return lax.cond(inside, guided, lambda x: model(x, y), x)


def _ode(velocity_fn: VelocityFn, noise, y: jax.Array, num_steps: int, heun: bool, guidance: Guidance | None):
  ts = ode_time_grid(num_steps)
  model_dtype = jax.tree.leaves(noise)[0].dtype

  def velocity(x, t, t_guide):
    return _evaluate(velocity_fn, x, t, y, model_dtype, guidance, t_guide, lambda v, x: v)

  def euler_step(i, x):
    t, t_next = ts[i], ts[i + 1]
    return _axpy(x, t_next - t, velocity(x, t, t))

  def heun_step(i, x):
    t, t_next = ts[i], ts[i + 1]
    d = velocity(x, t, t)
    d_next = velocity(_axpy(x, t_next - t, d), t_next, t)  # guided by t (the step's start), as the official code
    return _axpy(x, t_next - t, jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, d, d_next))

  x = jax.tree.map(lambda leaf: leaf.astype(state_dtype()), noise)
  if not heun:
    return lax.fori_loop(0, num_steps, euler_step, x)
  return euler_step(num_steps - 1, lax.fori_loop(0, num_steps - 1, heun_step, x))


def euler_ode(velocity_fn: VelocityFn, noise, y: jax.Array, num_steps: int, guidance: Guidance | None = None):
  """noise [B, ...] (t = 1), y [B] -> samples [B, ...] (t = 0). N Euler steps ``x += (t_next - t) v``; N evaluations."""
  return _ode(velocity_fn, noise, y, num_steps, False, guidance)


def heun_ode(velocity_fn: VelocityFn, noise, y: jax.Array, num_steps: int, guidance: Guidance | None = None):
  """As ``euler_ode`` with Heun's correction on all but the last step; 2N - 1 evaluations."""
  return _ode(velocity_fn, noise, y, num_steps, True, guidance)


def sde_drift(v: jax.Array, x: jax.Array, t: jax.Array, path: str) -> jax.Array:
  """v, x [B, ...], scalar t -> drift v - 0.5 w s, w = 2t, score s = (a/a' v - x) / (sigma^2 - a/a' sigma' sigma)."""
  alpha, sigma, d_alpha, d_sigma = (c.astype(x.dtype) for c in path_coefficients(t, path))
  ratio = alpha / d_alpha
  score = (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)
  return v - 0.5 * (2 * t) * score


def euler_maruyama_sde(velocity_fn: VelocityFn, noise, y: jax.Array, key: jax.Array, num_steps: int,
                       path: str = "linear", guidance: Guidance | None = None):
  """noise [B, ...], y [B] -> samples [B, ...]; N evaluations on the grid 1 .. 0.04, 0.

  Steps ``x += d dt + sqrt(2t) sqrt(|dt|) N(0, 1)``, the noise of step i from ``fold_in(key, i)`` (split over the
  leaves of a pytree state); the last step 0.04 -> 0 uses the drift only.
  """
  ts = sde_time_grid(num_steps)
  model_dtype = jax.tree.leaves(noise)[0].dtype

  def drift(x, t):
    return _evaluate(velocity_fn, x, t, y, model_dtype, guidance, t, lambda v, x: sde_drift(v, x, t, path))

  def step(i, x):
    t, t_next = ts[i], ts[i + 1]
    dt = t_next - t
    eps = _normal_like(jax.random.fold_in(key, i), x)
    return _axpy(_axpy(x, dt, drift(x, t)), jnp.sqrt(2 * t) * jnp.sqrt(jnp.abs(dt)), eps)

  x = lax.fori_loop(0, num_steps - 1, step, jax.tree.map(lambda leaf: leaf.astype(state_dtype()), noise))
  return _axpy(x, ts[-1] - ts[-2], drift(x, ts[-2]))


def sample(sampler: str, velocity_fn: VelocityFn, noise, y: jax.Array, key: jax.Array, num_steps: int,
           path: str = "linear", guidance: Guidance | None = None):
  """Dispatch on ``sampler`` in SAMPLERS; ``key`` is used by 'sde' only, ``path`` likewise."""
  if sampler == "euler":
    return euler_ode(velocity_fn, noise, y, num_steps, guidance)
  if sampler == "heun":
    return heun_ode(velocity_fn, noise, y, num_steps, guidance)
  if sampler == "sde":
    return euler_maruyama_sde(velocity_fn, noise, y, key, num_steps, path, guidance)
  raise ValueError(f"sampler={sampler!r}: use one of {SAMPLERS}")
