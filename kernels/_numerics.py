"""Rounding helpers shared by kernels that store fp32 results into bf16/fp16."""

import triton
import triton.language as tl


@triton.jit
def round_to_dtype(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to ``DTYPE`` with round-to-nearest-even, bit-exact with torch's ``.to()``.

    GPUs round fp32 -> bf16 to nearest even, but the Triton interpreter truncates. Rounding the fp32 bit
    pattern explicitly (add 0x7FFF plus the lowest kept bit, clear the low 16 bits) makes the final
    conversion exact on both, so interpreter tests check the same bits the GPU writes. NaN is kept as
    NaN (the bit trick could carry a NaN payload into the sign bit). fp16 and fp32 convert directly:
    both the GPU and the interpreter (numpy) round those to nearest even.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded).to(tl.bfloat16)
    else:
        return x.to(DTYPE)
