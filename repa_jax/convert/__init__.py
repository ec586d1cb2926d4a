"""Converters from published PyTorch weights (official releases, Hugging Face layouts) to repa_jax parameters."""
