"""Triton kernels for OLMo 2 (installed as olmo2_fast.kernels)."""
