"""REPA: align projected SiT hidden states with frozen encoder patch features, per token.

The formulas and their sources: docs/method.md section 2.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp

OBJECTIVES = ("cosine", "ntxent")
TARGET_NORMS = ("none", "zscore")


def zscore_tokens(features: jax.Array, gamma: float, eps: float = 1e-6) -> jax.Array:
  """iREPA's spatial normalisation of encoder targets: (f - gamma * mean_N(f)) / (std_N(f) + eps), mean and
  (unbiased, as torch.std) standard deviation over the N tokens of each image and channel. [B, N, C] -> [B, N, C]."""
  f = features.astype(jnp.float32)
  return (f - gamma * f.mean(axis=1, keepdims=True)) / (jnp.std(f, axis=1, ddof=1, keepdims=True) + eps)


def normalize_targets(features: jax.Array, method: str, gamma: float) -> jax.Array:
  """The alignment target of encoder features [B, N, C] under config.align.target_norm (one of TARGET_NORMS)."""
  if method == "none":
    return features
  if method == "zscore":
    return zscore_tokens(features, gamma)
  raise ValueError(f"config.align.target_norm={method!r}: use one of {TARGET_NORMS}")


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / max(||x||, eps) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def token_cosine(pred: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Cosine similarity per token. pred, target: [B, N, C] -> [B, N] float32."""
  return jnp.sum(l2_normalize(pred, eps) * l2_normalize(target, eps), axis=-1)


def token_ntxent(pred: jax.Array, target: jax.Array, temperature: float, eps: float = 1e-6) -> jax.Array:
  """NT-Xent per token position: token n of image i must pick target n of image i among the B images.

  pred, target: [B, N, C] -> [B, N] float32 cross-entropies with logits cos(pred_i,n, target_j,n) / temperature.
  """
  logits = jnp.einsum("inc,jnc->nij", l2_normalize(pred, eps), l2_normalize(target, eps)) / temperature
  return -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1), axis1=1, axis2=2).T


def alignment_loss(projected: Sequence[jax.Array], features: Sequence[jax.Array], *, objective: str = "cosine",
                   temperature: float = 0.1, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """REPA term averaged over tokens, batch and encoders, and the mean cosine similarity (a metric).

  projected[k], features[k]: [B, N, C_k], one pair per encoder. Returns (loss, mean cosine), scalars float32.
  """
  if len(projected) != len(features) or not projected:
    raise ValueError(f"alignment needs one projector output per encoder: got {len(projected)} outputs "
                     f"for {len(features)} encoders")
  for k, (p, f) in enumerate(zip(projected, features)):
    if p.shape != f.shape:
      raise ValueError(f"encoder {k}: projector output {p.shape} != features {f.shape} ([batch, tokens, width])")
  cosines = [token_cosine(p, f, eps) for p, f in zip(projected, features)]
  mean_cosine = jnp.mean(jnp.stack([c.mean() for c in cosines]))
  if objective == "cosine":
    return -mean_cosine, mean_cosine
  if objective == "ntxent":
    losses = [token_ntxent(p, f, temperature, eps).mean() for p, f in zip(projected, features)]
    return jnp.mean(jnp.stack(losses)), mean_cosine
  raise ValueError(f"config.align.objective={objective!r}: use one of {OBJECTIVES}")
