"""Fused Triton kernels of the MGG optimizer step (installed as ``mgg_fast.kernels``)."""
