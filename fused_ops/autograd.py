"""Differentiable flatten and cast (``torch.autograd.Function``), built on the fused ops.

``cast(x, dtype)``'s backward casts the incoming grad back to ``x``'s dtype; ``flatten(tensors)``'s backward
returns views of the flat grad shaped like each input (the padding's grad is dropped). Both backward passes
are themselves differentiable (double backward works).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import functional
from ._backend import check_backend


class CastFunction(torch.autograd.Function):
    """y = x in another dtype; dL/dx = (dL/dy) cast back to x's dtype (both one fused launch)."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype, stochastic: bool, backend: str | None) -> Tensor:
        ctx.src_dtype = x.dtype
        ctx.backend = backend
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        functional.cast_([out], [x], stochastic=stochastic, backend=backend)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return CastFunction.apply(grad.contiguous(), ctx.src_dtype, False, ctx.backend), None, None, None


class FlattenFunction(torch.autograd.Function):
    """flat = flatten(tensors); dL/dtensors[i] = the i-th segment of dL/dflat, shaped like tensors[i]."""

    @staticmethod
    def forward(ctx, align: int, backend: str | None, *tensors: Tensor) -> Tensor:
        ctx.shapes = [x.shape for x in tensors]
        ctx.align = align
        return functional.flatten(tensors, align, backend=backend)

    @staticmethod
    def backward(ctx, grad_flat: Tensor):
        grads = functional.unflatten(grad_flat.contiguous(), ctx.shapes, ctx.align)
        return (None, None, *grads)


def cast(x: Tensor, dtype: torch.dtype, *, stochastic: bool = False, backend: str | None = None) -> Tensor:
    """``x`` converted to ``dtype`` (nearest even, or stochastic rounding), differentiably: the backward pass
    casts the grad back to ``x.dtype``. Returns a new contiguous tensor. Everything is checked before the
    forward runs."""
    if not isinstance(x, Tensor):
        raise TypeError(f"cast: x must be a floating-point tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"cast: x must be a dense floating-point tensor, got {x.layout}")
    if not x.is_floating_point():
        raise TypeError(f"cast: x must be a floating-point tensor, got {x.dtype}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"cast: dtype must be a floating-point torch.dtype, got {dtype!r}")
    functional._check_stochastic("cast", stochastic)
    check_backend(backend)
    return CastFunction.apply(x, dtype, stochastic, backend)


def flatten(tensors: Sequence[Tensor], align: int = 64, *, backend: str | None = None) -> Tensor:
    """``fused_ops.flatten(tensors, align)``, differentiably: the backward pass unflattens the grad. Everything
    is checked before the forward runs."""
    tensors, dtypes = functional._float_tensors_and_dtypes("flatten", "tensors", tensors)
    if not tensors:
        raise ValueError("flatten: tensors must not be empty")
    functional._check_align("flatten", align)
    functional._one_group("flatten", "tensors", tensors, dtypes)
    check_backend(backend)
    return FlattenFunction.apply(align, backend, *tensors)
