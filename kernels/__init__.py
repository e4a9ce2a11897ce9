"""Triton kernels, installed as ``bharnet.kernels`` (one op per module)."""
