"""Triton kernels of repa_fused, installed as ``repa_fused.kernels``."""
