"""Generative-model metrics from feature-network outputs: FD (FID, sFID), Inception Score, precision/recall."""
