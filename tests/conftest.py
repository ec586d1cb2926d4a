"""Test set-up: 8 fake CPU devices (before any JAX computation) so sharded code runs as on a pod slice."""
import jax

jax.config.update("jax_num_cpu_devices", 8)
