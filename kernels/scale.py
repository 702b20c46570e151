"""Gradient scaling kernels: fused unscale + non-finite check, and multi-tensor norm partials.

Both run one launch for any number of tensors of one (device, dtype) through a chunk table
(``_multi_tensor.py``) and never synchronise with the host: the scale is read from a device tensor, the
"found inf" flag is written to one, and the norm stays on the device.

The norm is deterministic: each program writes the partial sum (or max) of its chunk to its own slot of a
partials buffer, with no atomics, and the launcher reduces the partials with one torch reduction in float64
in a fixed order. Same inputs and layout, same bits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import MutableMapping, Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_numels, check_role, check_scalar, no_user_code
from ._multi_tensor import TABLE_INTS, build_chunk_table, tensor_pointer, use_on_current_stream
from ._numerics import load_fp32, rounded_fp32, store_fp32

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit(do_not_specialize=TABLE_INTS)
def _unscale_kernel(
    table_ptr,  # int64 chunk table: addresses of grads (role 0) and, with HAS_OUT, outputs (role 1)
    n_tensors,
    numel_offset,
    chunk_tensor_offset,
    chunk_start_offset,
    inv_scale,  # runtime float, unless INV_SCALE_IS_TENSOR
    inv_scale_ptr,  # 1-element device tensor holding the multiplier, read when INV_SCALE_IS_TENSOR
    found_inf_ptr,  # 1-element device tensor, set to 1 when a result is inf or nan (HAS_FOUND_INF)
    GRAD_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    HAS_OUT: tl.constexpr,
    INV_SCALE_IS_TENSOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor starts on a 16-byte boundary: lets the compiler vectorise
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """y = grad * inv_scale in fp32 (torch's ``_amp_foreach_non_finite_check_and_unscale_``), stored rounded
    to nearest even into the grad itself or, with HAS_OUT, into ``out``; found_inf = 1 if any stored y is
    inf or nan. found_inf is only ever set, never cleared, so every program that sees a non-finite value may
    store the same 1 without atomics (as torch's kernel does). Checking the stored result rather than the
    input also catches a finite grad that overflows once multiplied or narrowed.
    """
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(table_ptr + chunk_tensor_offset + pid)
    chunk_start = tl.multiple_of(tl.load(table_ptr + chunk_start_offset + pid), 16)  # CHUNK_SIZE % 16 == 0
    n_here = tl.minimum(tl.load(table_ptr + numel_offset + t) - chunk_start, CHUNK_SIZE)
    grad_ptr = tensor_pointer(table_ptr, 0, n_tensors, t, GRAD_DTYPE, ALIGNED) + chunk_start
    if HAS_OUT:
        out_ptr = tensor_pointer(table_ptr, 1, n_tensors, t, OUT_DTYPE, ALIGNED) + chunk_start
    else:
        out_ptr = tensor_pointer(table_ptr, 0, n_tensors, t, OUT_DTYPE, ALIGNED) + chunk_start
    if INV_SCALE_IS_TENSOR:
        inv_scale = tl.load(inv_scale_ptr).to(tl.float32)
    else:
        inv_scale = tl.cast(inv_scale, tl.float32)

    n_bad = tl.zeros((BLOCK_SIZE,), dtype=tl.int32)
    for block_start in tl.range(0, CHUNK_SIZE, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        # Full blocks: a mask provably uniform per 16 lanes, so accesses are vectorised; the tail is masked.
        if block_start + BLOCK_SIZE <= n_here:
            n_bad += _unscale_block(grad_ptr, out_ptr, offsets, offsets < block_start + BLOCK_SIZE, inv_scale,
                                    GRAD_DTYPE, OUT_DTYPE, HAS_FOUND_INF)  # fmt: skip
        elif block_start < n_here:
            n_bad += _unscale_block(grad_ptr, out_ptr, offsets, offsets < n_here, inv_scale, GRAD_DTYPE, OUT_DTYPE,
                                    HAS_FOUND_INF)  # fmt: skip
    if HAS_FOUND_INF:
        if tl.sum(n_bad, axis=0) > 0:
            tl.store(found_inf_ptr, 1.0)


@triton.jit
def _unscale_block(grad_ptr, out_ptr, offsets, mask, inv_scale, GRAD_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                   HAS_FOUND_INF: tl.constexpr):  # fmt: skip
    """Store one block of grad * inv_scale; returns 1 where the stored value is inf or nan (if checked)."""
    y = load_fp32(grad_ptr + offsets, mask, GRAD_DTYPE) * inv_scale
    bad = tl.zeros(offsets.shape, dtype=tl.int32)
    if HAS_FOUND_INF:
        r = rounded_fp32(y, OUT_DTYPE)  # the value stored: narrowing may overflow
        bad = tl.where(mask & (r - r != 0.0), 1, 0)  # r - r is nan exactly for inf and nan
    store_fp32(out_ptr + offsets, y, mask, OUT_DTYPE)
    return bad


@triton.jit(do_not_specialize=TABLE_INTS)
def _norm_partials_kernel(
    table_ptr,  # int64 chunk table over the tensors (one role)
    n_tensors,
    numel_offset,
    chunk_tensor_offset,
    chunk_start_offset,
    partials_ptr,  # fp64 [n_chunks]: one partial per program, no atomics
    # fp64 [2], read when NORM == 3: 1 / max |x| (1 when that is 0, inf or nan), and p (a float argument would be
    # float32: p = 0.1 rounded to float32 moves |x|^p by up to p * 1e-8 * |ln |x||)
    scale_and_p_ptr,
    DTYPE: tl.constexpr,
    NORM: tl.constexpr,  # 0: inf (max |x|), 1: sum |x|, 2: sum x^2, 3: sum |x|^p
    ALIGNED: tl.constexpr,  # every tensor starts on a 16-byte boundary: lets the compiler vectorise
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """partials[pid] = sum over the program's chunk of |x|^p (p = 1 or 2), of (|x| / scale)^p (any other p > 0,
    both read from ``scale_and_p_ptr``), or max |x| for p = inf, accumulated in fp64 in a fixed order (elementwise over
    blocks, then a tree sum): |x| is widened to fp64 before the power, so 1e20^2 does not overflow nor 1e-30^2
    underflow (the float64 value that ``reference.grad_norm`` computes; fp32 accumulation returned inf or 0 there).
    For a general p the launcher passes ``scale = max |x|`` (from a first, inf-norm launch), so every scaled
    |x| / scale is at most 1 and its p-th power neither overflows (1e30^100) nor, for the elements that count,
    underflows. A correctly rounded fp64 division, so the largest is exactly 1 (|x| times a rounded 1 / max can be
    1 - 2^-53, whose p-th power is 0 for p above ~1e18: the norm came out 0). The power is computed in fp64
    (``_pow_fp64``). The inf norm adds the sum of the chunk's nans (0 when there are none) to the max, because the
    hardware max drops nans: a chunk with a nan yields nan, as
    ``torch.linalg.vector_norm`` does.
    """
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(table_ptr + chunk_tensor_offset + pid)
    chunk_start = tl.multiple_of(tl.load(table_ptr + chunk_start_offset + pid), 16)  # CHUNK_SIZE % 16 == 0
    n_here = tl.minimum(tl.load(table_ptr + numel_offset + t) - chunk_start, CHUNK_SIZE)
    x_ptr = tensor_pointer(table_ptr, 0, n_tensors, t, DTYPE, ALIGNED) + chunk_start
    if NORM == 3:
        scale = tl.load(scale_and_p_ptr).to(tl.float64)
        p = tl.load(scale_and_p_ptr + 1).to(tl.float64)
    else:
        scale = tl.full((), 1.0, tl.float64)  # (not read)
        p = scale

    # A general p takes a quarter block at a time (2 elements a thread at 1024 and 4 warps): its fp64 power on a
    # whole block holds 154 registers on sm_90 (43 so; p = 2: 32).
    STEP: tl.constexpr = BLOCK_SIZE // 4 if NORM == 3 else BLOCK_SIZE
    acc = tl.zeros((STEP,), dtype=tl.float64)
    nan_probe = tl.zeros((STEP,), dtype=tl.float64)  # stays 0 unless a nan is added in
    for block_start in tl.range(0, CHUNK_SIZE, STEP):
        offsets = block_start + tl.arange(0, STEP)
        # Full blocks: a mask provably uniform per 16 lanes, so loads are vectorised; the tail is masked.
        if block_start + STEP <= n_here:
            acc, nan_probe = _norm_block(x_ptr, offsets, offsets < block_start + STEP, p, scale, acc, nan_probe,
                                         DTYPE, NORM)  # fmt: skip
        elif block_start < n_here:
            acc, nan_probe = _norm_block(x_ptr, offsets, offsets < n_here, p, scale, acc, nan_probe, DTYPE,
                                         NORM)  # fmt: skip
    if NORM == 0:
        partial = tl.max(acc, axis=0) + tl.sum(nan_probe, axis=0)
    else:
        partial = tl.sum(acc, axis=0)
    tl.store(partials_ptr + pid, partial)


@triton.jit
def _norm_block(x_ptr, offsets, mask, p, scale, acc, nan_probe, DTYPE: tl.constexpr, NORM: tl.constexpr):
    """Fold one block into the running elementwise accumulators (see ``_norm_partials_kernel``)."""
    x32 = load_fp32(x_ptr + offsets, mask, DTYPE)
    x = x32.to(tl.float64)  # (exact: every fp32/bf16/fp16 value is a double)
    a = tl.abs(x)
    if NORM == 0:
        acc = tl.maximum(acc, a)
        nan_probe += tl.where(x != x, x, 0.0)
    elif NORM == 1:
        acc += a
    elif NORM == 2:
        acc += x * x
    else:
        # r^p, r = |x| / max |x| <= 1 (no overflow), in fp64: the float64 value, not float32's logarithm (whose
        # rounding, times p, cost 10-20 float32 ulp of the norm). 0 stays 0; inf and nan (unscaled) stay as they are.
        r = a / scale
        acc += tl.where(a == 0.0, 0.0, tl.where(r - r != 0.0, r, _pow_fp64(r, p)))
    return acc, nan_probe


@triton.jit
def _pow_fp64(r, p):
    """r^p = 2^(p log2 r) for fp64 r > 0 finite (normal), to a few fp64 ulp (times p |log2 r|, as any pow built on
    log2). log2 r = e + log2 m (r = m 2^e, m in [1, 2): the exponent bits); log2 m from a float32 seed y0 refined in
    fp64 by one step that needs only exp2: m 2^-y0 = 1 + d, |d| < 1e-6, log2 m = y0 + log2(1 + d) = y0 + (d - d^2/2 +
    d^3/3) / ln 2 (what is left out is below 1e-24). Not libdevice's fp64 log2: it seeds a reciprocal with
    rcp.approx.ftz.f64 (refined, but the compile tier refuses approximate divisions); fp64 exp2 has none."""
    bits = r.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)
    y0 = tl.log2(m.to(tl.float32)).to(tl.float64)
    d = m * tl.exp2(-y0) - 1.0
    log2e = tl.full(r.shape, 1.4426950408889634, tl.float64)  # (a float literal would be a float32 constant)
    log2_m = y0 + d * (1.0 - d * (0.5 - d * 0.3333333432674408)) * log2e
    return tl.exp2(p * (e.to(tl.float64) + log2_m))


def _check_unscale(grads, out) -> None:
    check_role("unscale_launch", "grads", grads, _TL_DTYPES)
    if out:
        check_role("unscale_launch", "out", out, _TL_DTYPES, grads[0].device)
        check_numels("unscale_launch", "out", out, "grads", grads)


@no_user_code
def unscale_launch(
    grads: Sequence[torch.Tensor],
    inv_scale: float | torch.Tensor,
    found_inf: torch.Tensor | None,
    out: Sequence[torch.Tensor] | None = None,
    *,
    chunk_size: int = 65536,
    block_size: int = 1024,
    cache: MutableMapping | None = None,
) -> None:
    """Multiply every grad by ``inv_scale`` and set ``found_inf`` to 1 if any result is inf or nan: one launch.

    ``inv_scale`` is a float or a 1-element float tensor on the grads' device (read on the device: no sync);
    ``found_inf`` a 1-element float tensor on that device that is set, never cleared (None: no check). With
    ``out`` (same sizes, one dtype), results go there and the grads are left unchanged, e.g. fp32 copies of bf16
    grads. Every tensor and scalar is checked on every call (the table is cached by address), except that no
    written tensor shares memory with another (overlapping tensors race on a GPU, where programs run in parallel;
    the interpreter runs them in order and hides it): ``functional.unscale_`` checks that.
    """
    if len(grads) == 0:
        return
    out = list(out) if out else []
    if not isinstance(grads[0], torch.Tensor):
        _check_unscale(grads, out)  # (names it)
    device = grads[0].device
    scale_is_tensor = isinstance(inv_scale, torch.Tensor)
    if scale_is_tensor:
        check_scalar("unscale_launch", "inv_scale", inv_scale, device)
    if found_inf is not None:
        check_scalar("unscale_launch", "found_inf", found_inf, device)
    roles = [grads, out] if out else [grads]
    table = build_chunk_table(roles, chunk_size, cache, check=lambda: _check_unscale(grads, out))
    if table.n_chunks == 0:
        return
    use_on_current_stream(table)
    dummy = table.table
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _unscale_kernel[(table.n_chunks,)](
            table.table,
            table.n_tensors,
            table.numel_offset,
            table.chunk_tensor_offset,
            table.chunk_start_offset,
            0.0 if scale_is_tensor else float(inv_scale),
            inv_scale if scale_is_tensor else dummy,
            found_inf if found_inf is not None else dummy,
            GRAD_DTYPE=_TL_DTYPES[grads[0].dtype],
            OUT_DTYPE=_TL_DTYPES[(out or grads)[0].dtype],
            HAS_OUT=bool(out),
            INV_SCALE_IS_TENSOR=scale_is_tensor,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=table.aligned,
            CHUNK_SIZE=chunk_size,
            BLOCK_SIZE=block_size,
        )


@no_user_code
def norm_launch(
    tensors: Sequence[torch.Tensor],
    norm_type: float = 2.0,
    *,
    chunk_size: int = 65536,
    block_size: int = 1024,
    cache: MutableMapping | None = None,
) -> torch.Tensor:
    """The ``norm_type``-norm of all elements of all ``tensors`` together, as a 0-d fp32 device tensor.

    One launch writes one fp64 partial per chunk (accumulated in fp64); the partials are then reduced by torch in
    float64 (a sum, or a max for ``inf``) and the root taken in float64. No host sync; deterministic. ``norm_type`` is
    ``inf`` or any p > 0. A p other than 1, 2 and inf takes two launches: the inf norm ``m`` first, then the sum of
    ``(|x| / m)^p``, whose root times ``m`` is the norm: the p-th powers neither overflow nor underflow where the
    norm does not (``[1e30]`` with p = 100 is 1e30, not inf).
    """
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"norm_launch: norm_type must be inf or > 0, got {norm_type}")
    if block_size < 16 or block_size & (block_size - 1) or chunk_size % block_size:
        raise ValueError(  # (a general p takes a quarter block at a time)
            f"norm_launch: block_size must be a power of two >= 16 dividing chunk_size, got {block_size} "
            f"(chunk_size {chunk_size})"
        )
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.float32)
    table = build_chunk_table([tensors], chunk_size, cache,
                              check=lambda: check_role("norm_launch", "tensors", tensors, _TL_DTYPES))  # fmt: skip
    device = tensors[0].device
    if table.n_chunks == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    norm = 0 if math.isinf(norm_type) else 1 if norm_type == 1.0 else 2 if norm_type == 2.0 else 3
    use_on_current_stream(table)

    def partials_of(kind: int, scale_and_p: torch.Tensor | None) -> torch.Tensor:
        partials = torch.empty(table.n_chunks, dtype=torch.float64, device=device)
        with torch.cuda.device(device) if tensors[0].is_cuda else contextlib.nullcontext():
            _norm_partials_kernel[(table.n_chunks,)](
                table.table,
                table.n_tensors,
                table.numel_offset,
                table.chunk_tensor_offset,
                table.chunk_start_offset,
                partials,
                scale_and_p if scale_and_p is not None else partials,
                DTYPE=_TL_DTYPES[tensors[0].dtype],
                NORM=kind,
                ALIGNED=table.aligned,
                CHUNK_SIZE=chunk_size,
                BLOCK_SIZE=block_size,
            )
        return partials

    if norm == 3:
        scale = _norm_scale(partials_of(0, None).max())
        scale_and_p = torch.cat([scale, torch.full_like(scale, norm_type)])
        return (partials_of(3, scale_and_p).sum().pow(1.0 / norm_type) * scale).reshape(()).to(torch.float32)
    partials = partials_of(norm, None)
    if norm == 0:
        return partials.max().to(torch.float32)
    total = partials.sum()
    if norm == 2:
        total = total.sqrt()
    return total.to(torch.float32)


def _norm_scale(max_abs: torch.Tensor) -> torch.Tensor:
    """The divisor of a general-p norm's elements (fp64, 1 element, on the device; no host sync): ``max |x|``,
    or 1 when that is 0 (all zeros), inf or nan (the sum is then inf or nan unscaled, as it must be)."""
    m = max_abs.to(torch.float64).reshape(1)
    return torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
