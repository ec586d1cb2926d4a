"""repa_jax: SiT flow-matching transformers with REPA and Dispersive Loss, in JAX/Flax."""
