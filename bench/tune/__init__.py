"""Tuning benches of the kernels, run as modules from the repository root: python -m bench.tune.cosine."""
