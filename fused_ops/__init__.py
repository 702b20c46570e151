"""fused_ops: Triton kernels for the optimizer hot path of large-model training.

Public API (see README.md)::

    fused_ops.FusedAdam, fused_ops.FusedAdamW      drop-in torch.optim.Adam / AdamW
    fused_ops.functional.adam_                     the multi-tensor step, for kernel developers
"""

from __future__ import annotations

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _bind_kernels() -> None:
    # Installed, ``kernels/`` is ``fused_ops.kernels`` (setup.py package_dir: PyPI's ``kernels`` is another
    # project). In a source checkout that mapping does not exist, so load the sibling folder under that name.
    if _importlib_util.find_spec("fused_ops.kernels") is not None:
        return
    path = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    spec = _importlib_util.spec_from_file_location(
        "fused_ops.kernels", _os.path.join(path, "__init__.py"), submodule_search_locations=[path]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - broken install
        raise ImportError("fused_ops.kernels not found: reinstall fused_ops")
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["fused_ops.kernels"] = module
    spec.loader.exec_module(module)


_bind_kernels()

from . import functional, reference  # noqa: E402
from ._backend import resolve_backend  # noqa: E402
from .optim import FusedAdam, FusedAdamW, FusedLion, FusedOptimizer, FusedSGD  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FusedAdam", "FusedAdamW", "FusedLion", "FusedOptimizer", "FusedSGD", "functional", "reference",
           "resolve_backend", "__version__"]  # fmt: skip

from . import autograd, buffers, distributed, precision  # noqa: E402
from .buffers import FlatBuffer  # noqa: E402
from .functional import cast_, clip_grad_norm_, flatten, grad_norm, unflatten, unscale_  # noqa: E402
from .precision import DynamicLossScaler  # noqa: E402

__all__ += ["flatten", "unflatten", "FlatBuffer", "cast_", "unscale_", "grad_norm", "clip_grad_norm_",
            "DynamicLossScaler", "autograd", "buffers", "distributed", "precision"]  # fmt: skip
