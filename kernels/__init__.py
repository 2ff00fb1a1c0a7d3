"""Triton kernels of fxlra, installed as ``fxlra.kernels`` (filled in by the GPU work)."""
