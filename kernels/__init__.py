"""Triton kernels of fused_ops, installed as ``fused_ops.kernels``.

Each module holds ``@triton.jit`` kernels and one plain launcher per kernel: pointers, sizes and scalars
in, nothing about param groups, state dicts or autograd. Kernels never import from ``fused_ops``.
"""

if __name__ != "fused_ops.kernels":
    # Run from a source checkout, the repository root is on sys.path and this folder answers ``import kernels``,
    # the name of another PyPI project (Hugging Face's ``kernels``, which transformers and bitsandbytes import):
    # hand the import to that project when it is installed further down sys.path (transformers imports it
    # unguarded once its metadata says it is there), else refuse, so that callers see it as not installed instead
    # of loading these kernels a second time.
    def _load_the_other_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rest = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
        spec = importlib.machinery.PathFinder.find_spec(__name__, rest)
        if spec is None or spec.loader is None:
            raise ImportError(
                f"{__file__} is fused_ops' kernel folder, imported as {__name__!r}: use fused_ops.kernels (the "
                "PyPI project 'kernels' is another package, and it is not installed)",
                name=__name__,
            )
        module = importlib.util.module_from_spec(spec)
        # The import statement returns what sys.modules holds under the name once this file has run.
        sys.modules[__name__] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(__name__, None)
            raise

    _load_the_other_kernels()
