"""REG (Wu et al. 2025, "Representation Entanglement for Generation"; Martinser/REG @021ea2e): the encoder's class
token travels the latents' path with its own noise and the same t, joins the SiT's input as one more token, and the
SiT predicts its velocity too. The loss adds

  L_REG = mean_b mean_e (v_cls(b, e) - (d_alpha_t cls + d_sigma_t eps_cls)(b, e))^2      (loss.py:73-90)

with weight 0.03 (train.py:319, --cls), and REPA's target becomes [class token; patch tokens] (train.py:306-308),
aligned on all 1 + N hidden tokens (models/sit.py:308-309). The formulas: docs/method.md section 2c.
"""
import jax
import jax.numpy as jnp

from repa_jax.objectives.flow import flow_loss, interpolate


def noised_class_token(class_token: jax.Array, noise: jax.Array, t: jax.Array,
                       path: str) -> tuple[jax.Array, jax.Array]:
  """class token, noise [B, E], t [B] -> (the noised token, its velocity target), both [B, E] float32."""
  return interpolate(class_token.astype(jnp.float32), noise, t, path)


def class_token_loss(v_pred: jax.Array, v_target: jax.Array) -> jax.Array:
  """REG's term: the class token's velocity error, mean over its E channels, then the batch. [B, E] -> scalar."""
  return flow_loss(v_pred, v_target)


def entangled_target(features: jax.Array, class_token: jax.Array) -> jax.Array:
  """REPA's target under REG: the class token ahead of the patch tokens. [B, N, C], [B, C] -> [B, 1 + N, C]."""
  return jnp.concatenate([class_token[:, None].astype(features.dtype), features], axis=1)
