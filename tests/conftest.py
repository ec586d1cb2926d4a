"""Test set-up: 8 fake CPU devices (before any JAX computation) so sharded code runs as on a pod slice, and a
persistent compilation cache so the many identical tiny train steps compile once per test session."""
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="repa_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
