"""Triton kernels of fused_ops, installed as ``fused_ops.kernels``.

Each module holds ``@triton.jit`` kernels and one plain launcher per kernel: pointers, sizes and scalars
in, nothing about param groups, state dicts or autograd. Kernels never import from ``fused_ops``.
"""
