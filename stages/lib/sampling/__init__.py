"""Sampling: the batched sampler and the inference helpers built on it."""
