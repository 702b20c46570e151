"""Multi-tensor dtype copy between fp32, bf16 and fp16: one launch for any number of tensor pairs.

``dst[i] = src[i]`` converted to the destination dtype, either rounded to nearest even (bit-exact with
torch's ``.to()``, inf, nan, subnormals and fp16 overflow included) or rounded stochastically: up or down
to one of the two neighbouring representable values, with the probability of each proportional to the
distance to the other, so the rounding is unbiased (E[round(x)] = x). Stochastic rounding draws its random
bits from Triton's Philox generator, keyed by ``seed`` and by each element's (tensor, index) position.
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping, Sequence

import torch
import triton
import triton.language as tl

from ._multi_tensor import build_chunk_table

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def load_fp32(ptr, mask, DTYPE: tl.constexpr):
    """Load ``DTYPE`` (fp32, bf16 or fp16) elements widened to fp32, exactly (masked-off lanes read 0).

    bf16 is widened by shifting its bits into the top half of an fp32 pattern: exact everywhere, where the
    Triton interpreter's bf16 conversion mangles subnormals.
    """
    if DTYPE == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _bf16_bits(x, rnd, STOCHASTIC: tl.constexpr):
    """The bf16 bit pattern (uint16) of fp32 ``x``, rounded to nearest even or, with STOCHASTIC, stochastically.

    bf16 keeps the top 16 bits of the fp32 pattern. Nearest even adds 0x7FFF plus the lowest kept bit before
    dropping the low 16 bits (ties go to the even neighbour). Stochastic rounding adds 16 random bits
    instead: that carries into the kept part with probability (low 16 bits) / 2^16, i.e. rounds away from
    zero with probability proportional to the distance from the value below, so E[result] = x. Overflow
    carries into the exponent and gives inf, as in torch; inf is kept; nan becomes the canonical 0x7FC0 that
    torch writes.
    """
    bits = x.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        bits = bits + (rnd & 0xFFFF)
    else:
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    return tl.where(x != x, 0x7FC0, bits >> 16).to(tl.uint16)


@triton.jit
def _fp16_stochastic(x, rnd):
    """fp32 ``x`` rounded to fp16 stochastically (unbiased), using 32 random bits ``rnd`` per element.

    fp16's exponent range differs from fp32's, so this rounds in fixed point on the fp16 grid of ``x``'s
    binade: with ulp = 2^(max(e, -14) - 10) (``e`` the exponent of x; the max covers fp16 subnormals),
    q = |x| / ulp exactly, and the result is (floor(q) + [u < frac(q)]) * ulp with u uniform on a 2^-24 grid
    in [0, 1). The result is exact in fp32, so the final conversion does not round again (values past
    65504 go to inf with probability proportional to their distance from it, on a grid step of 32). inf and
    nan are kept.
    """
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -14)
    ulp = ((e - 10 + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((10 - e + 127) << 23).to(tl.float32, bitcast=True)
    q = tl.abs(x) * inv_ulp
    low = tl.floor(q)
    u = (rnd >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    magnitude = (low + tl.where(u < q - low, 1.0, 0.0)) * ulp
    signed = (magnitude.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(x - x == 0.0, signed, x).to(tl.float16)  # x - x is nan for inf and nan


@triton.jit
def rounded_fp32(x, DTYPE: tl.constexpr):
    """The fp32 value that ``store_fp32(ptr, x, mask, DTYPE)`` (nearest even) stores, without storing it."""
    if DTYPE == tl.bfloat16:
        return (_bf16_bits(x, None, False).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def store_fp32(ptr, x, mask, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr = False, rnd=None):
    """Store fp32 ``x`` as ``DTYPE``, rounded to nearest even (bit-exact with torch's ``.to()``, on the GPU and
    in the interpreter alike) or, with STOCHASTIC, stochastically using the random bits ``rnd``."""
    if DTYPE == tl.bfloat16:
        tl.store(ptr.to(tl.pointer_type(tl.uint16)), _bf16_bits(x, rnd, STOCHASTIC), mask=mask)
    elif DTYPE == tl.float16 and STOCHASTIC:
        tl.store(ptr, _fp16_stochastic(x, rnd), mask=mask)
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)  # fp16: both the GPU and numpy round to nearest even


@triton.jit(do_not_specialize=["seed"])
def _cast_kernel(
    table_ptr,  # int64 chunk table: addresses of dst (role 0) and src (role 1), numels, chunk map
    n_tensors,
    numel_offset,
    chunk_tensor_offset,
    chunk_start_offset,
    seed,  # runtime int: the Philox key for stochastic rounding
    SRC_DTYPE: tl.constexpr,
    DST_DTYPE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """dst = convert(src) on one chunk of one tensor pair: src is widened to fp32 (exact), then stored as
    DST_DTYPE rounded to nearest even or, with STOCHASTIC and a narrower destination, stochastically
    (``store_fp32``).
    """
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(table_ptr + chunk_tensor_offset + pid)
    chunk_start = tl.load(table_ptr + chunk_start_offset + pid)
    n_here = tl.minimum(tl.load(table_ptr + numel_offset + t) - chunk_start, CHUNK_SIZE)
    dst_ptr = tl.load(table_ptr + t).to(tl.pointer_type(DST_DTYPE)) + chunk_start
    src_ptr = tl.load(table_ptr + n_tensors + t).to(tl.pointer_type(SRC_DTYPE)) + chunk_start

    for block_start in tl.range(0, CHUNK_SIZE, BLOCK_SIZE):
        if block_start < n_here:
            offsets = block_start + tl.arange(0, BLOCK_SIZE)
            mask = offsets < n_here
            x = load_fp32(src_ptr + offsets, mask, SRC_DTYPE)
            if STOCHASTIC and DST_DTYPE != tl.float32:
                # A distinct Philox counter per element of the launch: (tensor index, element index).
                rnd = tl.randint(seed, (t << 40) + chunk_start + offsets)
                store_fp32(dst_ptr + offsets, x, mask, DST_DTYPE, True, rnd)
            else:
                store_fp32(dst_ptr + offsets, x, mask, DST_DTYPE)


def _check(dst, src) -> None:
    if len(dst) != len(src):
        raise ValueError(f"cast_launch: dst has {len(dst)} tensors, src has {len(src)}")
    device = dst[0].device
    for name, lst in (("dst", dst), ("src", src)):
        dtype = lst[0].dtype
        if dtype not in _TL_DTYPES:
            raise TypeError(f"cast_launch: {name} must be float32, bfloat16 or float16, got {dtype}")
        for i, x in enumerate(lst):
            if x.dtype != dtype or x.device != device:
                raise ValueError(f"cast_launch: {name}[{i}] is {x.dtype} on {x.device}, expected {dtype} on {device}")
            if not x.is_contiguous():
                raise ValueError(f"cast_launch: {name}[{i}] must be contiguous")
    for i, (d, s) in enumerate(zip(dst, src, strict=True)):
        if d.numel() != s.numel():
            raise ValueError(f"cast_launch: dst[{i}] has {d.numel()} elements, src[{i}] has {s.numel()}")


def cast_launch(
    dst: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    *,
    stochastic: bool = False,
    seed: int = 0,
    chunk_size: int = 65536,
    block_size: int = 1024,
    cache: MutableMapping | None = None,
) -> None:
    """Copy ``src[i]`` into ``dst[i]`` converting the dtype, for every i, in one launch (no host sync).

    All ``dst`` share one dtype and all ``src`` one dtype, each fp32, bf16 or fp16; tensors are contiguous
    and pairwise equally sized. ``stochastic`` rounds narrowing conversions stochastically with Philox key
    ``seed`` (same seed and layout, same bits). Inputs are checked when their chunk table is first built.
    """
    if len(dst) == 0 and len(src) == 0:
        return
    if len(dst) != len(src) or len(dst) == 0:
        _check(dst, src)
    if not 0 <= seed < 2**31:
        # One integer type for every seed: a new seed never recompiles.
        raise ValueError(f"cast_launch: seed must be in [0, 2^31), got {seed}")
    table = build_chunk_table([dst, src], chunk_size, cache, check=lambda: _check(dst, src))
    if table.n_chunks == 0:
        return
    with torch.cuda.device(dst[0].device) if dst[0].is_cuda else contextlib.nullcontext():
        _cast_kernel[(table.n_chunks,)](
            table.table,
            table.n_tensors,
            table.numel_offset,
            table.chunk_tensor_offset,
            table.chunk_start_offset,
            seed,
            SRC_DTYPE=_TL_DTYPES[src[0].dtype],
            DST_DTYPE=_TL_DTYPES[dst[0].dtype],
            STOCHASTIC=stochastic,
            CHUNK_SIZE=chunk_size,
            BLOCK_SIZE=block_size,
        )
