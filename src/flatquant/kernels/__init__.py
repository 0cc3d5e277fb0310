"""Fused GPU kernels (Triton) with plain PyTorch references beside them."""
