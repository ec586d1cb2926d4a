"""Muon (Jordan et al. 2024) as an optax transform, its Newton-Schulz iteration run on each matrix's Gram matrix.

The quintic iteration X <- a X + (b A + c A^2) X, A = X X^T, on the wide orientation X [m, n] (m <= n) multiplies X by
a polynomial of A each step, so every iterate is X_k = Q_k X_0 with Q_k a polynomial of A_0 = X_0 X_0^T: with
P_k = a I + b A_k + c A_k^2, Q_{k+1} = P_k Q_k and A_{k+1} = P_k A_k P_k. Iterating on the [m, m] matrices and
applying Q once replaces the two [m, m, n] products of every step by ~4 [m, m, m] ones. Iterated alone, the Gram
matrix loses float32 precision on ill-conditioned inputs (3e-4 of the largest entry for singular values over 4
decades), so every RESTART_EVERY steps X_k = Q_k X_0 is formed and A recomputed from it: then the result equals the
written-out iteration's to its own float32 error (1e-5; tests/test_muon.py), 1.4x faster on the Fashion-MNIST SiT's
block kernels (`benchmarks/muon.py`; the whole train step 1.00-1.04x). Formulas and sources: docs/method.md section 5.
"""
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # (a, b, c), Jordan et al.'s quintic iteration
RESTART_EVERY = 3  # steps between fresh Gram matrices (module docstring)
BatchAxesFn = Callable[[optax.Params], optax.Params]  # params -> per leaf: the number of leading batch axes (0 or 1)


def orthogonalize(x: jax.Array, steps: int, eps: float = 1e-8) -> jax.Array:
  """[..., m, n] -> the quintic Newton-Schulz iterate (`steps` steps) of each matrix x / ||x||_F, on its wide
  orientation: approximately U V^T of x = U S V^T. Computed in the Gram space (module docstring)."""
  wide = x.shape[-2] <= x.shape[-1]
  x = x if wide else jnp.swapaxes(x, -1, -2)
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)) + eps)
  a_coeff, b_coeff, c_coeff = NS_COEFFS
  gram = x @ jnp.swapaxes(x, -1, -2)
  identity = jnp.eye(gram.shape[-1], dtype=x.dtype)
  q = None
  for k in range(steps):
    if k and k % RESTART_EVERY == 0:  # X_k = Q_k X_0 and a fresh Gram matrix: the error stays the direct iteration's
      x, q = q @ x, None
      gram = x @ jnp.swapaxes(x, -1, -2)
    p = a_coeff * identity + b_coeff * gram + c_coeff * (gram @ gram)
    q = p if q is None else p @ q
    if k < steps - 1:
      gram = p @ gram @ p
  x = x if q is None else q @ x
  return x if wide else jnp.swapaxes(x, -1, -2)


def as_matrices(x: jax.Array, batch_axes: int) -> jax.Array:
  """A kernel [batch..., fan_in..., fan_out] -> [batch, fan_in, fan_out] (batch = 1 without batch axes)."""
  return x.reshape(math.prod(x.shape[:batch_axes]), -1, x.shape[-1])


class MuonState(NamedTuple):
  """scale_by_muon's state."""
  count: jax.Array  # [] int32, updates done
  mu: optax.Updates  # the momentum, in its moment dtype


def scale_by_muon(batch_axes: BatchAxesFn, *, beta: float, steps: int, rms: float, eps: float = 1e-8,
                  mu_dtype=None) -> optax.GradientTransformation:
  """Each matrix of a kernel -> rms * sqrt(max(fan_in, fan_out)) * orthogonalize(m_hat), m_hat the bias-corrected
  Nesterov momentum beta m_t / (1 - beta^(t+1)) + (1 - beta) g_t / (1 - beta^t), m_t = beta m_{t-1} + (1 - beta) g_t.
  `batch_axes(updates)` names each leaf's leading batch axes (a stacked [depth, in, out] kernel: 1)."""
  def init(params):
    return MuonState(jnp.zeros([], jnp.int32), jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params))

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.mu, updates)
    t = count.astype(jnp.float32)

    def direction(m, g, leading):
      m_hat = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
      matrices = as_matrices(m_hat, leading)
      scale = rms * max(matrices.shape[1:]) ** 0.5
      return (scale * orthogonalize(matrices, steps, eps)).reshape(g.shape).astype(g.dtype)

    out = jax.tree.map(direction, mu, updates, batch_axes(updates))
    return out, MuonState(count, mu if mu_dtype is None else jax.tree.map(lambda m: m.astype(mu_dtype), mu))

  return optax.GradientTransformation(init, update)
