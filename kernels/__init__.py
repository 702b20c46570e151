"""Triton kernels of fused_ops, installed as ``fused_ops.kernels``.

Each module holds ``@triton.jit`` kernels and one plain launcher per kernel: pointers, sizes and scalars
in, nothing about param groups, state dicts or autograd. Kernels never import from ``fused_ops``.
"""

if __name__ != "fused_ops.kernels":
    # Run from a source checkout, the repository root is on sys.path and this folder answers ``import kernels``,
    # the name of another PyPI project (Hugging Face's ``kernels``, which bitsandbytes and transformers try to
    # import): refuse, so that they see it as not installed instead of loading these kernels a second time.
    raise ImportError(
        f"{__file__} is fused_ops' kernel folder, imported as {__name__!r}: use fused_ops.kernels (the PyPI "
        "project 'kernels' is another package)"
    )
