"""Dispersive Loss (Wang & He): spread a block's hidden states apart within groups of the batch, no positives.

The formulas and their sources: docs/method.md section 3.
"""
import math

import jax
import jax.numpy as jnp

VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


def _flat(z: jax.Array) -> jax.Array:
  """[G, ...] -> [G, d] float32: each sample's hidden state flattened (all tokens x channels)."""
  return z.reshape(z.shape[0], -1).astype(jnp.float32)


def scaled_sq_distances(z: jax.Array) -> jax.Array:
  """D_ij = ||z_i - z_j||^2 / d for all pairs, diagonal exactly 0. z: [G, d] -> [G, G]."""
  sq_norms = jnp.sum(jnp.square(z), axis=1)
  gram = z @ z.T
  dist = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * gram, 0.0)
  return jnp.where(jnp.eye(z.shape[0], dtype=bool), 0.0, dist) / z.shape[1]


def cosine_distances(z: jax.Array, eps: float = 1e-6) -> jax.Array:
  """D_ij = -cos(z_i, z_j). z: [G, d] -> [G, G]."""
  unit = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(z), axis=1, keepdims=True), eps * eps))
  return -(unit @ unit.T)


def log_mean_exp(x: jax.Array) -> jax.Array:
  """log(mean(exp(x))) over all entries, stably."""
  return jax.nn.logsumexp(x) - math.log(x.size)


def infonce_l2(z: jax.Array, temperature: float) -> jax.Array:
  """log mean_{i,j} exp(-D_ij / tau) over all G x G pairs including i = j (so >= -log G). z: [G, ...]."""
  return log_mean_exp(-scaled_sq_distances(_flat(z)) / temperature)


def infonce_cosine(z: jax.Array, temperature: float) -> jax.Array:
  """As infonce_l2 with D_ij = -cos(z_i, z_j). z: [G, ...]."""
  return log_mean_exp(-cosine_distances(_flat(z)) / temperature)


def hinge(z: jax.Array, margin: float) -> jax.Array:
  """mean_{i,j} max(0, margin - D_ij)^2 with D_ij = ||z_i - z_j||^2 / d. z: [G, ...]."""
  return jnp.mean(jnp.square(jnp.maximum(margin - scaled_sq_distances(_flat(z)), 0.0)))


def covariance(z: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Sum of squared off-diagonal entries of the covariance of z standardised per feature over the group.

  z: [G, ...]. With zs = standardised z [G, d], C = zs^T zs / (G - 1) is [d, d]; sum(C^2) = sum((zs zs^T)^2) / (G-1)^2
  is computed through the G x G Gram matrix, so memory stays O(G^2 + G d).
  """
  z = _flat(z)
  g = z.shape[0]
  zs = (z - z.mean(axis=0)) / (z.std(axis=0, ddof=1) + eps)
  total = jnp.sum(jnp.square(zs @ zs.T))
  diagonal = jnp.sum(jnp.square(jnp.sum(jnp.square(zs), axis=0)))
  return (total - diagonal) / (g - 1) ** 2


def dispersive_loss(hidden: jax.Array, *, variant: str = "infonce_l2", temperature: float = 0.5,
                    group_size: int | None = None, margin: float = 1.0) -> jax.Array:
  """The dispersive term of one block's hidden states, averaged over groups of `group_size` samples.

  hidden: [B, N, D]; the batch is split in order into B / group_size groups, so the value does not depend on how the
  batch is spread over devices. group_size None = the whole batch is one group. Returns a float32 scalar.
  """
  per_group = {
      "infonce_l2": lambda z: infonce_l2(z, temperature),
      "infonce_cosine": lambda z: infonce_cosine(z, temperature),
      "hinge": lambda z: hinge(z, margin),
      "covariance": covariance,
  }
  if variant not in per_group:
    raise ValueError(f"config.disperse.variant={variant!r}: use one of {VARIANTS}")
  batch = hidden.shape[0]
  group_size = batch if group_size is None else group_size
  if group_size < 1 or batch % group_size:
    raise ValueError(f"config.disperse.group_size={group_size} does not divide the per-step batch {batch}: "
                     f"choose a divisor of {batch}")
  groups = hidden.reshape(batch // group_size, group_size, -1)
  return jnp.mean(jax.vmap(per_group[variant])(groups))
