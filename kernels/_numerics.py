"""Exact loads and correctly rounded stores between fp32 and bf16/fp16, shared by every kernel.

GPUs convert fp32 -> bf16 with round-to-nearest-even, but the Triton interpreter truncates, and its bf16
conversions mangle subnormals in both directions. These helpers work on bit patterns instead, so a kernel
stores the same bits on the GPU and in interpreter tests, and those bits equal torch's ``.to()``.
"""

import triton
import triton.language as tl


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
