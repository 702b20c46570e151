"""Multi-tensor dtype copy between fp32, bf16 and fp16: one launch for any number of tensor pairs.

``dst[i] = src[i]`` converted to the destination dtype, either rounded to nearest even (bit-exact with
torch's ``.to()``, inf, nan, subnormals and fp16 overflow included) or rounded stochastically: up or down
to one of the two neighbouring representable values, with the probability of each proportional to the
distance to the other, so the rounding is unbiased (E[round(x)] = x). Stochastic rounding draws its random
bits from Triton's Philox generator, keyed by ``seed`` and by each element's (tensor, index) position.

The key is a host int (reproducible: the same seed gives the same bits, also at every replay of a captured CUDA
graph) or a 1-element int64 device tensor read by the kernel when it runs: a key drawn on the device right before
the launch (``torch.randint``, graph-safe) makes every replay of a captured launch draw new bits, where a host int
would be baked into the launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping, Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_numels, check_role, check_scalar, no_user_code
from ._multi_tensor import TABLE_INTS, build_chunk_table, tensor_pointer, use_on_current_stream
from ._numerics import load_fp32, store_fp32

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit(do_not_specialize=[*TABLE_INTS, "seed"])
def _cast_kernel(
    table_ptr,  # int64 chunk table: addresses of dst (role 0) and src (role 1), numels, chunk map
    n_tensors,
    numel_offset,
    chunk_tensor_offset,
    chunk_start_offset,
    seed,  # runtime int: the Philox key for stochastic rounding, unless SEED_FROM_PTR
    seed_ptr,  # 1-element int64 device tensor holding the key, read when SEED_FROM_PTR
    SRC_DTYPE: tl.constexpr,
    DST_DTYPE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor starts on a 16-byte boundary: lets the compiler vectorise
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """dst = convert(src) on one chunk of one tensor pair: src is widened to fp32 (exact), then stored as
    DST_DTYPE rounded to nearest even or, with STOCHASTIC and a narrower destination, stochastically
    (``store_fp32``).
    """
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(table_ptr + chunk_tensor_offset + pid)
    chunk_start = tl.multiple_of(tl.load(table_ptr + chunk_start_offset + pid), 16)  # CHUNK_SIZE % 16 == 0
    n_here = tl.minimum(tl.load(table_ptr + numel_offset + t) - chunk_start, CHUNK_SIZE)
    dst_ptr = tensor_pointer(table_ptr, 0, n_tensors, t, DST_DTYPE, ALIGNED) + chunk_start
    src_ptr = tensor_pointer(table_ptr, 1, n_tensors, t, SRC_DTYPE, ALIGNED) + chunk_start
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)  # read when the kernel runs: a graph replay sees the key drawn for it

    for block_start in tl.range(0, CHUNK_SIZE, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        # Full blocks: a mask provably uniform per 16 lanes, so accesses are vectorised; the tail is masked.
        if block_start + BLOCK_SIZE <= n_here:
            _cast_block(dst_ptr, src_ptr, offsets, offsets < block_start + BLOCK_SIZE, seed, t, chunk_start,
                        SRC_DTYPE, DST_DTYPE, STOCHASTIC)  # fmt: skip
        elif block_start < n_here:
            _cast_block(dst_ptr, src_ptr, offsets, offsets < n_here, seed, t, chunk_start, SRC_DTYPE, DST_DTYPE,
                        STOCHASTIC)  # fmt: skip


@triton.jit
def _cast_block(dst_ptr, src_ptr, offsets, mask, seed, t, chunk_start, SRC_DTYPE: tl.constexpr,
                DST_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):  # fmt: skip
    x = load_fp32(src_ptr + offsets, mask, SRC_DTYPE)
    if STOCHASTIC and DST_DTYPE != tl.float32:
        # A distinct Philox counter per element of the launch: (tensor index, element index).
        rnd = tl.randint(seed, (t << 40) + chunk_start + offsets)
        store_fp32(dst_ptr + offsets, x, mask, DST_DTYPE, True, rnd)
    else:
        store_fp32(dst_ptr + offsets, x, mask, DST_DTYPE)


def _check(dst, src) -> None:
    check_role("cast_launch", "dst", dst, _TL_DTYPES)
    check_role("cast_launch", "src", src, _TL_DTYPES, dst[0].device)
    check_numels("cast_launch", "dst", dst, "src", src)


@no_user_code
def cast_launch(
    dst: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    *,
    stochastic: bool = False,
    seed: int | torch.Tensor = 0,
    chunk_size: int = 65536,
    block_size: int = 1024,
    cache: MutableMapping | None = None,
) -> None:
    """Copy ``src[i]`` into ``dst[i]`` converting the dtype, for every i, in one launch (no host sync).

    All ``dst`` share one dtype and all ``src`` one dtype, each fp32, bf16 or fp16; tensors are contiguous,
    on one device and pairwise equally sized (checked on every call). ``stochastic`` rounds narrowing conversions
    stochastically with Philox key ``seed``: an int in [0, 2^31) (same seed and layout, same bits), or a
    1-element int64 tensor on the tensors' device, read by the kernel (see the module docstring).
    Not checked here: that no ``dst`` shares memory with another tensor of the launch (programs run in parallel
    on a GPU, so overlapping tensors race; the interpreter runs them in order and hides it). ``functional.cast_``
    checks it.
    """
    if len(dst) == 0 and len(src) == 0:
        return
    if len(dst) != len(src) or len(dst) == 0:
        raise ValueError(f"cast_launch: dst has {len(dst)} tensors, src has {len(src)}")
    seed_is_tensor = isinstance(seed, torch.Tensor)
    if seed_is_tensor:
        try:
            check_scalar("cast_launch", "seed", seed, dst[0].device, (torch.int64,))
        except ValueError as e:
            raise ValueError(f"cast_launch: seed must be an int in [0, 2^31) or a 1-element int64 tensor on the "
                             f"tensors' device ({e})") from None  # fmt: skip
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        # One integer type for every seed: a new seed never recompiles.
        raise ValueError(f"cast_launch: seed must be an int in [0, 2^31) or a 1-element int64 tensor, got {seed!r}")
    table = build_chunk_table([dst, src], chunk_size, cache, check=lambda: _check(dst, src))
    if table.n_chunks == 0:
        return
    use_on_current_stream(table)
    with torch.cuda.device(dst[0].device) if dst[0].is_cuda else contextlib.nullcontext():
        _cast_kernel[(table.n_chunks,)](
            table.table,
            table.n_tensors,
            table.numel_offset,
            table.chunk_tensor_offset,
            table.chunk_start_offset,
            0 if seed_is_tensor else seed,
            seed if seed_is_tensor else table.table,  # (not read without SEED_FROM_PTR)
            SRC_DTYPE=_TL_DTYPES[src[0].dtype],
            DST_DTYPE=_TL_DTYPES[dst[0].dtype],
            STOCHASTIC=bool(stochastic),
            SEED_FROM_PTR=seed_is_tensor and bool(stochastic),
            ALIGNED=table.aligned,
            CHUNK_SIZE=chunk_size,
            BLOCK_SIZE=block_size,
        )
