"""The analytic FLOP count of a train step, shared by the benchmarks (XLA's cost analysis counts a scanned loop's
body once, so it undercounts the SiT blocks)."""
from repa_jax.specs.model import aligned_encoders, sit_spec


def analytic_flops(config) -> dict[str, float]:
  """Matmul FLOPs (2 per multiply-add) of one training step's forward + backward (backward = 2 x forward).

  Counts, per image: patch embed 2*T*(p*p*C)*D; per SiT block 2*T*12*D^2 (qkv 3D^2, proj D^2, MLP 8D^2 at ratio 4)
  + attention 2*2*T^2*D (QK^T and AV) + adaLN 2*D*6D; final layer 2*D*2D + 2*T*D*(p*p*C); timestep MLP
  2*(256*D + D*D); REPA projector per token and encoder 2*T*(D*H + H*H + H*z). Ignores element-wise work
  (norms, softmax, GELU, losses), the optimizer and the EMA. Total = 3 * forward * batch; with SRA also its head
  (3 x) and the EMA teacher's forward through block sra.teacher_block (1 x, no backward).
  """
  spec = sit_spec(config)
  t, d, pc = spec.num_tokens, spec.width, spec.patch ** 2 * spec.in_channels
  hidden_mlp = int(d * spec.mlp_ratio)
  per_block = 2 * t * (4 * d * d + 2 * d * hidden_mlp) + 2 * 2 * t * t * d + 2 * d * 6 * d
  terms = {
      "blocks": spec.depth * per_block,
      "embed+final": 2 * t * pc * d + 2 * d * 2 * d + 2 * t * d * pc + 2 * (256 * d + d * d),
      "projector": 0.0,
  }
  h = config.align.projector_dim
  terms["projector"] = sum(2 * t * (d * h + h * h + h * z) for z in aligned_encoders(config).values())
  if config.sra.weight:
    terms["sra head"] = 2 * t * 4 * d * d
  batch = config.train.batch_size
  out = {k: 3.0 * v * batch for k, v in terms.items()}
  if config.sra.weight:
    out["sra teacher"] = config.sra.teacher_block * per_block * batch
  out["total"] = sum(out.values())
  return out
