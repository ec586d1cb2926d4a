"""Flax NNX modules: the SiT backbone, REPA projectors and the model that holds both."""
