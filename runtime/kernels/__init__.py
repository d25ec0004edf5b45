"""Triton-lang kernels and their PyTorch references."""
