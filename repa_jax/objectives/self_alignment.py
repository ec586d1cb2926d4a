"""SRA, self-representation alignment (Jiang et al. 2025, "No Other Representation Component Is Needed: Diffusion
Transformers Can Provide Representation Guidance by Themselves"; official code vvvvvjdy/SRA @1723f85): no external
encoder. The student is the online model's block-`student` output through a small head; the teacher is the EMA
model's raw block-`teacher` output on the same data and noise at a less noisy time, under stop-gradient.

- teacher time ``s = clip(t - max_gap * u, 0, 1)``, u ~ U(0, 1) per sample (SiT-SRA/loss.py:98, 114; max_gap 0.2);
- loss ``smooth_l1(head(h_student), sg(h_teacher); beta = 0.05)``, the mean over batch, tokens and channels
  (SiT-SRA/loss.py:16, the paper's), or per-token ``1 - cos`` averaged (the official code's later 'cos' option,
  loss.py:22, takes the cosine over the token axis, torch's default dim=1; here it is over the channels, per token);
- weight ``lambda * 0.1 ** (max(epoch - decay_start, 0) / decay_epochs)``, epoch = step // steps_per_epoch
  (SiT-SRA/train.py:319-328: 2 * 0.1 ** (((epoch - 149) / 1000 + 1) if epoch > 149 else 1) = 0.2 then decaying);
  decay_epochs None: constant lambda (the 'cos' option's 0.5).
"""
import jax
import jax.numpy as jnp

from repa_jax.objectives.alignment import token_cosine

SRA_OBJECTIVES = ("smooth_l1", "cosine")


def teacher_time(key: jax.Array, t: jax.Array, max_gap: float) -> jax.Array:
  """t [B] -> the teacher's less noisy time clip(t - max_gap * U(0, 1), 0, 1) [B]."""
  return jnp.clip(t - max_gap * jax.random.uniform(key, t.shape, t.dtype), 0.0, 1.0)


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Elementwise Huber-type loss: 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta (torch's smooth_l1_loss)."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * jnp.square(x) / beta, ax - 0.5 * beta)


def self_alignment_loss(student: jax.Array, teacher: jax.Array, objective: str = "smooth_l1",
                        beta: float = 0.05) -> jax.Array:
  """student (head output), teacher (stop-gradient is the caller's): [B, N, D] -> scalar float32."""
  student, teacher = student.astype(jnp.float32), teacher.astype(jnp.float32)
  if objective == "smooth_l1":
    return jnp.mean(smooth_l1(student - teacher, beta))
  if objective == "cosine":
    return jnp.mean(1.0 - token_cosine(student, teacher))
  raise ValueError(f"config.sra.objective={objective!r}: use one of {SRA_OBJECTIVES}")


def sra_weight(step: jax.Array, weight: float, steps_per_epoch: int, decay_start_epoch: int,
               decay_epochs: int | None) -> jax.Array:
  """The SRA weight at `step`: weight * 0.1 ** (max(epoch - decay_start_epoch, 0) / decay_epochs), float32."""
  if decay_epochs is None:
    return jnp.float32(weight)
  epoch = (step // steps_per_epoch).astype(jnp.float32)
  return weight * jnp.power(0.1, jnp.maximum(epoch - decay_start_epoch, 0.0) / decay_epochs).astype(jnp.float32)
