"""Training: the state pytree, shardings, the pure train step, checkpoints and the loop."""
