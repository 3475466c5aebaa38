"""Triton kernels of fasttx, installed as fasttx.kernels.

Each module holds one op's @triton.jit kernels and the small host functions
that launch them. They take tensors and sizes and know nothing of dispatch or
autograd (that is fasttx.ops).
"""
