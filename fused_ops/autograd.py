"""Differentiable flatten and cast (``torch.autograd.Function``), built on the fused ops.

``cast(x, dtype)``'s backward casts the incoming grad back to ``x``'s dtype; ``flatten(tensors)``'s backward
returns views of the flat grad shaped like each input (the padding's grad is dropped). Both backward passes
are themselves differentiable (double backward works).

Both ops are linear, and both Functions support what ``x.to(dtype)`` and ``torch.cat`` support:

- **Forward-mode AD** (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``): the tangent of
  ``cast(x, dtype)`` is ``x``'s tangent cast to ``dtype`` rounding to nearest even, also when the primal used
  stochastic rounding (the derivative of the rounding is taken as the identity, as in the backward pass, which
  casts the grad to nearest: the tangent is then exactly what ``x.to(dtype)``'s is). The tangent of
  ``flatten(tensors)`` is the flatten of the inputs' tangents in the same layout, zero padded; an input without a
  tangent counts as zeros.
- **torch.func transforms** (``grad``, ``vjp``, ``jacrev``, ``vmap`` and their compositions): the Functions
  use the ``forward`` + ``setup_context`` form with ``jvp`` and ``vmap`` staticmethods.

  ``vmap`` of ``cast`` casts the batched tensor as a whole (elementwise: the batch dim stays where it is, one
  launch). With ``stochastic=True`` it follows vmap's ``randomness``: ``"error"`` (vmap's default) raises as
  torch's random ops do, ``"different"`` rounds every example independently, ``"same"`` rounds every example
  with the same random stream (one cast per example and a host sync: slow; not differentiable, so refused under
  ``grad(vmap(...))``). An ``x`` that is not batched is not seen by vmap: it is cast once, for every example.

  ``vmap`` of ``flatten`` gives a ``(batch, flat_len)`` tensor whose row ``b`` is the flatten of example ``b``
  (its padding zero). It is correct rather than fast: it is one flatten of the ``batch * len(tensors)`` example
  slices (the layout of ``flatten`` repeats, since every segment's span is a multiple of ``align``), so it costs
  a Python view per slice on the host, a copy of each slice that is not contiguous (an unbatched input is
  read once per example), and one launch.
- **torch.compile**, also with ``fullgraph=True``: under tracing, the Functions skip the Python checks of the
  eager path (strict mode, which Dynamo uses for a backward pass, bans reading ``.layout``); the public
  ``cast``/``flatten`` check the inputs and the custom ops check what runs, as everywhere in ``fused_ops``. Dynamo
  refuses a Function that defines ``jvp``, so under tracing the public functions apply a twin without it
  (``_CastFunction``/``_FlattenFunction``), and run the eager Function out of the trace (a graph break) while a
  forward-AD level is open. ``CastFunction.apply`` called directly in a compiled function graph-breaks where an
  input requires grad, and drops tangents (as any custom op without a tangent formula does) where none does.
  Double backward through a compiled graph is not supported (aot_autograd's limitation, the same for
  ``x.to(dtype)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import _ops, functional, reference
from ._backend import check_backend

__all__ = ["CastFunction", "FlattenFunction", "cast", "flatten"]


def _cast(x: Tensor, dtype: torch.dtype, stochastic: bool, backend: str | None) -> Tensor:
    """A new contiguous ``x`` in ``dtype`` (not differentiable: the Functions' forward)."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if torch.compiler.is_compiling():  # (traced: fake tensors; the custom op checks the real ones)
        name = functional._op_backend("cast", backend, x.device, (dtype, x.dtype))
        _ops.cast_eager([out], [x.contiguous()], stochastic, None, name)
    else:
        functional.cast_([out], [x], stochastic=stochastic, backend=backend)
    return out


def _flatten(tensors: Sequence[Tensor], align: int, backend: str | None) -> Tensor:
    if torch.compiler.is_compiling():
        name = functional._op_backend("flatten", backend, tensors[0].device, [tensors[0].dtype],
                                      functional._KERNEL_DTYPES + (torch.float64,))  # fmt: skip
        return _ops.flatten_eager([x.contiguous() for x in tensors], align, name)
    return functional.flatten(tensors, align, backend=backend)


def _unflatten(flat: Tensor, shapes: list[torch.Size], align: int) -> list[Tensor]:
    flat = flat.contiguous()
    if torch.compiler.is_compiling():
        numels = [s.numel() for s in shapes]
        offsets = reference.flatten_layout(numels, align)[0]
        return [flat.narrow(0, off, n).view(s) for s, off, n in zip(shapes, offsets, numels, strict=True)]
    return functional.unflatten(flat, shapes, align)


class _CastFunction(torch.autograd.Function):
    """:class:`CastFunction` without ``jvp``: what ``torch.compile`` traces (Dynamo refuses a Function that defines
    one: "Unsupported custom jvp")."""

    @staticmethod
    def forward(x: Tensor, dtype: torch.dtype, stochastic: bool, backend: str | None) -> Tensor:
        return _cast(x, dtype, stochastic, backend)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, dtype, _, backend = inputs
        ctx.src_dtype = x.dtype
        ctx.dtype = dtype
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _cast_apply(grad, ctx.src_dtype, False, ctx.backend), None, None, None

    @staticmethod
    def vmap(info, in_dims, x: Tensor, dtype: torch.dtype, stochastic: bool, backend: str | None):
        x_dim = in_dims[0]
        if stochastic:
            if info.randomness == "error":
                raise RuntimeError("vmap: cast(stochastic=True) is a random operation: pass randomness='different' "
                                   "or 'same' to torch.func.vmap")  # fmt: skip
            if info.randomness == "same" and x_dim is not None:
                return _cast_same_randomness(x, x_dim, dtype, backend), x_dim
        return _cast_apply(x, dtype, stochastic, backend), x_dim


def _cast_same_randomness(x: Tensor, x_dim: int, dtype: torch.dtype, backend: str | None) -> Tensor:
    """vmap of a stochastic cast with ``randomness="same"``: every example rounded with one random stream (one seed
    drawn from torch's generator, one cast per example). Not differentiable (``functional.cast_`` with a seed), so
    refused where a grad transform or autograd is recording ``x``."""
    if x.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("vmap: cast(stochastic=True) with randomness='same' is not differentiable (each "
                                  "example is cast with one shared seed, outside autograd); use "
                                  "randomness='different'")  # fmt: skip
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    examples = x.unbind(x_dim)
    outs = [torch.empty(e.shape, dtype=dtype, device=e.device) for e in examples]
    for out, e in zip(outs, examples, strict=True):
        functional.cast_([out], [e], stochastic=True, seed=seed, backend=backend)
    return torch.stack(outs, x_dim)


class CastFunction(_CastFunction):
    """y = x in another dtype; dL/dx = (dL/dy) cast back to x's dtype (both one fused launch). Tangent: x's tangent
    cast to y's dtype (nearest even). See the module docstring for vmap."""

    @staticmethod
    def jvp(ctx, x_tangent: Tensor, *_):
        return CastFunction.apply(x_tangent, ctx.dtype, False, ctx.backend)


def _cast_apply(*args) -> Tensor:
    return _apply(CastFunction, _CastFunction, args)


class _FlattenFunction(torch.autograd.Function):
    """:class:`FlattenFunction` without ``jvp``: what ``torch.compile`` traces."""

    @staticmethod
    def forward(align: int, backend: str | None, *tensors: Tensor) -> Tensor:
        return _flatten(tensors, align, backend)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        align, backend, *tensors = inputs
        ctx.shapes = [x.shape for x in tensors]
        ctx.align = align
        ctx.backend = backend
        ctx.like = (output.dtype, output.device)

    @staticmethod
    def backward(ctx, grad_flat: Tensor):
        return (None, None, *_unflatten(grad_flat, ctx.shapes, ctx.align))

    @staticmethod
    def vmap(info, in_dims, align: int, backend: str | None, *tensors: Tensor):
        dims = in_dims[2:]
        if all(d is None for d in dims):
            return _flatten_apply(align, backend, *tensors), None
        batch = info.batch_size
        # Example b's tensors, example after example: flatten's layout repeats, as every span divides by align.
        examples = [x.select(d, b) if d is not None else x for b in range(batch) for x, d in zip(tensors, dims)]
        if not examples:  # (an empty batch: each example's numels from the shapes without the batch dim)
            numels = [x.numel() if d is None else math.prod(x.shape[:d] + x.shape[d + 1 :])
                      for x, d in zip(tensors, dims)]  # fmt: skip
            return tensors[0].new_zeros((0, reference.flatten_layout(numels, align)[2])), 0
        return _flatten_apply(align, backend, *examples).view(batch, -1), 0


class FlattenFunction(_FlattenFunction):
    """flat = flatten(tensors); dL/dtensors[i] = the i-th segment of dL/dflat, shaped like tensors[i]. Tangent:
    the flatten of the tangents (zeros for inputs without one). See the module docstring for vmap."""

    @staticmethod
    def jvp(ctx, _align_tangent, _backend_tangent, *tangents: Tensor | None):
        dtype, device = ctx.like
        tangents = [t if t is not None else torch.zeros(s, dtype=dtype, device=device)
                    for t, s in zip(tangents, ctx.shapes, strict=True)]  # fmt: skip
        return FlattenFunction.apply(ctx.align, ctx.backend, *tangents)


def _flatten_apply(*args) -> Tensor:
    return _apply(FlattenFunction, _FlattenFunction, args)


def _apply(eager: type[torch.autograd.Function], traced: type[torch.autograd.Function], args: tuple) -> Tensor:
    """``eager.apply(*args)``; under ``torch.compile``, ``traced.apply(*args)`` (no ``jvp``: Dynamo refuses one), or
    ``eager``'s out of the trace when a forward-AD level is open (Dynamo would trace the forward's custom op, which
    has no tangent formula, and drop the tangents)."""
    if not torch.compiler.is_compiling():
        return eager.apply(*args)
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return _apply_untraced(eager, args)
    return traced.apply(*args)


@torch.compiler.disable
def _apply_untraced(fn: type[torch.autograd.Function], args: tuple) -> Tensor:
    return fn.apply(*args)


def cast(x: Tensor, dtype: torch.dtype, *, stochastic: bool = False, backend: str | None = None) -> Tensor:
    """``x`` converted to ``dtype`` (nearest even, or stochastic rounding), differentiably: the backward pass
    casts the grad back to ``x.dtype``; forward-mode AD casts the tangent to ``dtype`` (nearest even); vmap casts
    the batch. Returns a new contiguous tensor. Everything is checked before the forward runs."""
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
    return _cast_apply(x, dtype, stochastic, backend)


def flatten(tensors: Sequence[Tensor], align: int = 64, *, backend: str | None = None) -> Tensor:
    """``fused_ops.flatten(tensors, align)``, differentiably: the backward pass unflattens the grad; forward-mode AD
    flattens the tangents (zero padding); vmap flattens each example into a row. Everything is checked before the
    forward runs."""
    tensors, dtypes = functional._float_tensors_and_dtypes("flatten", "tensors", tensors)
    if not tensors:
        raise ValueError("flatten: tensors must not be empty")
    align = functional._check_align("flatten", align)
    functional._one_group("flatten", "tensors", tensors, dtypes)
    check_backend(backend)
    return _flatten_apply(align, backend, *tensors)
