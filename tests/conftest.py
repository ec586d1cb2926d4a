"""Test set-up: 8 fake CPU devices (before any JAX computation) so sharded code runs as on a pod slice, and a
persistent compilation cache so the many identical tiny train steps compile once per test session; the
`fashion_mnist_dir` fixture."""
import tempfile

import jax
import pytest

from repa_jax.data import sources

jax.config.update("jax_platforms", "cpu")  # also where libtpu is installed (the TPU compile test): no TPU here
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="repa_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def fashion_mnist_dir():
  """The Debian package's Fashion-MNIST files (make test installs them)."""
  try:
    sources.fashion_mnist("train")
    return sources.FASHION_MNIST_DIRECTORY
  except FileNotFoundError:
    pytest.skip("dataset-fashion-mnist is not installed (make test installs it)")
