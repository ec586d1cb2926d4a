"""Image sources and precomputed feature datasets."""
