"""Fused multi-tensor Adam / AdamW step with low-bit moments and stochastic rounding: one launch for all tensors.

One kernel, specialised at compile time by

- ``STATE="int8"``: exp_avg and exp_avg_sq stored as uint8 codes with one fp32 scale (the absmax) per block of 256
  consecutive elements of each tensor: the block-wise dynamic quantisation of Dettmers et al., "8-bit Optimizers
  via Block-wise Quantization" (ICLR 2022, arXiv:2110.02861). Codes index a sorted 256-entry map: the signed
  dynamic (tree) map for exp_avg, the unsigned one for exp_avg_sq, exactly as bitsandbytes builds them
  (``bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``; construction in
  :func:`_dynamic_map`), so the states have bitsandbytes' 8-bit block-wise layout. Dequantised with a gather
  (``map[code] * absmax``); re-quantised to the NEAREST code (ties to the lower entry) by a branch-free binary
  search over the sorted map: 8 gathers, then one for the upper neighbour; a positive exp_avg_sq never gets the
  code of 0.0 (the smallest positive entry instead: a v read as 0 under an m that is not would step by lr*m/eps).
  Every tensor is quantised, however small (bitsandbytes keeps tensors under 4096 elements in fp32), all in the
  same launch.
- ``STATE="bf16"``: moments stored in bf16, rounded stochastically.
- ``STATE="fp32"``: fp32 moments, for stochastic rounding of the params with full-precision states (the plain
  fp32 step, amsgrad and master weights included, is ``adam.py``'s kernel).
- ``PARAM_SR``: bf16/fp16 params without master weights, updated in fp32 and stored with stochastic rounding.
- ``KAHAN``: bf16/fp16 params without master weights, stored rounded to nearest with Kahan-compensated summation
  (optimi): a compensation buffer in the param's dtype carries what the rounding of the param lost.

The rules the kernel and the plain-torch oracle (``fused_ops/_ref_lowbit.py``) share, bit for bit in the interpreter
(on a GPU, fused multiply-adds and the approximate ``exp`` of the bias corrections move an ulp here and there, and so
a nearest code or a rounding at a boundary: README, "How the step works"), are stated in
that module's docstring (the normalisation, nearest code and ties, absmax 0, non-finite blocks, the random bits).
Bytes of state per parameter: int8 1 + 1 code bytes + 2 * 4 / 256 bytes of scales = 2.03125; bf16 4; fp32 8.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import MutableMapping, Sequence

import torch
import triton
import triton.language as tl
from triton.language.random import philox

from ._checks import check_numels, check_role, check_roles_memory, check_scalar, no_user_code
from ._multi_tensor import (
    TABLE_INTS,
    ChunkTable,
    PreparedLaunch,
    aligned_except,
    build_chunk_table,
    counters_reset_on_error,
    is_capturing,
    tensor_pointer,
    use_on_current_stream,
)
from ._numerics import load_fp32, rounded_fp32, store_fp32
from .adam import _GRAD_ROLE, AdamStep, _chunk_pointer, _neg_expm1

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_STATE_DTYPES = {"int8": torch.uint8, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANT_BLOCK = 256  # elements per block scale


@triton.jit
def _nearest_code(y, qmap_ptr):
    """Index (int32) of the entry of the sorted 256-entry map nearest to fp32 ``y``, ties to the lower entry.

    Branch-free binary search for lo = the largest index whose entry is <= y (0 when y is below every entry): 8
    gathers of 256 fp32 entries (1 KiB, cache-resident); then the upper neighbour decides the nearest.
    """
    lo = tl.zeros(y.shape, tl.int32)
    lo_val = tl.zeros(y.shape, tl.float32) + tl.load(qmap_ptr)
    for k in tl.static_range(8):
        cand = lo + (128 >> k)
        cand_val = tl.load(qmap_ptr + cand)
        take = cand_val <= y
        lo = tl.where(take, cand, lo)
        lo_val = tl.where(take, cand_val, lo_val)
    hi = tl.minimum(lo + 1, 255)
    return tl.where(tl.load(qmap_ptr + hi) - y < y - lo_val, hi, lo)


@triton.jit
def _in_block(a, qmap_ptr, START: tl.constexpr, K: tl.constexpr, DECADE: tl.constexpr, base, k, decade):
    """One step of :func:`_guess_lo`: where ``a`` is at least the first entry of the map's block starting at START
    (K entries, times 10^-DECADE), the block's start, size and inverse decade."""
    inside = a >= tl.load(qmap_ptr + START)
    return tl.where(inside, START, base), tl.where(inside, K, k), tl.where(inside, DECADE, decade)


@triton.jit
def _guess_lo(y, qmap_ptr, SIGNED: tl.constexpr):
    """The index of the largest map entry <= ``y`` (int32), computed from the map's structure without gathers; off by
    one for about 2 values in 10^6 (fp32 rounding next to an entry), which :func:`_nearest_code_fast` catches.

    The map (``_dynamic_map``) is, above 0.0 and below 1.0, 7 blocks: block i holds K_i = 2^i (signed) or 2^(i+1)
    (unsigned) entries 10^(i-6) * (0.1 + (j + 0.5) * 0.9 / K_i), j = 0..K_i-1, the blocks in order. So the block
    of |y| is found by comparing with each block's first entry (7 scalars), and j by inverting the formula. The
    signed map's negative half mirrors the positive one (index 254 - i for entry i).
    """
    a = tl.abs(y) if SIGNED else y
    zero_idx = 127 if SIGNED else 0
    base = tl.zeros(y.shape, tl.int32) + zero_idx
    k = tl.zeros(y.shape, tl.float32) + 1.0
    decade = tl.zeros(y.shape, tl.float32)  # (below the first block: j = 0, the index of 0.0)
    if SIGNED:
        base, k, decade = _in_block(a, qmap_ptr, 128, 1.0, 1e6, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 129, 2.0, 1e5, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 131, 4.0, 1e4, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 135, 8.0, 1e3, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 143, 16.0, 1e2, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 159, 32.0, 1e1, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 191, 64.0, 1.0, base, k, decade)
    else:
        base, k, decade = _in_block(a, qmap_ptr, 1, 2.0, 1e6, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 3, 4.0, 1e5, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 7, 8.0, 1e4, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 15, 16.0, 1e3, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 31, 32.0, 1e2, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 63, 64.0, 1e1, base, k, decade)
        base, k, decade = _in_block(a, qmap_ptr, 127, 128.0, 1.0, base, k, decade)
    j = tl.floor((a * decade - 0.1) * (k * 1.1111111111111112) - 0.5)  # (k / 0.9: a guess, no division needed)
    g = base + tl.minimum(tl.maximum(j, 0.0), k - 1.0).to(tl.int32)
    g = tl.where(a >= 1.0, 255, g)
    if SIGNED:
        g = tl.where(y < 0.0, 253 - g, g)  # (the largest negative entry <= -a, when a is no entry itself)
    return tl.maximum(g, 0)


@triton.jit
def _nearest_code_fast(y, qmap_ptr, SIGNED: tl.constexpr):
    """:func:`_nearest_code`, bit for bit, with 2 gathers per element instead of 10: the arithmetic guess of lo
    (:func:`_guess_lo`), checked against its entry and the next (``map[g] <= y < map[g + 1]``, which only lo
    satisfies: the map is strictly increasing; g = 0 holds every y below map[1], g = 255 every y from 1.0). A tile
    in which any element's guess fails takes the binary search instead (a few tiles in 1,000 for random values)."""
    g = _guess_lo(y, qmap_ptr, SIGNED)
    hi = tl.minimum(g + 1, 255)
    lo_val = tl.load(qmap_ptr + g)
    hi_val = tl.load(qmap_ptr + hi)
    ok = ((g == 0) | (lo_val <= y)) & ((g == 255) | (y < hi_val))
    code = tl.where(hi_val - y < y - lo_val, hi, g)
    if tl.min(ok.to(tl.int32)) == 0:
        code = _nearest_code(y, qmap_ptr)
    return code


@triton.jit
def _dequantize(codes_ptr, scales_ptr, qmap_ptr, offsets, mask, qidx, qmask):
    """fp32 values of a [rows, 256] tile of codes: map[code] * the row's scale (0 in masked-off lanes)."""
    code = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + qidx, mask=qmask, other=0.0)
    return tl.where(mask, tl.load(qmap_ptr + code) * scale[:, None], 0.0)


@triton.jit
def _quantize_store(x, codes_ptr, scales_ptr, qmap_ptr, offsets, mask, qidx, qmask, SIGNED: tl.constexpr):
    """Store a [rows, 256] fp32 tile (zeros in masked-off lanes) as codes and one absmax per row.

    The code is the nearest entry's; with the unsigned map (``SIGNED`` False: exp_avg_sq) a positive value gets at
    least code 1, the smallest positive entry (never 0.0: see ``_ref_lowbit``'s docstring).

    The absmax is a max over the finite elements, and a row holding a NaN or an inf is stored as scale NaN with
    every code that of 0.0: it reads back as NaN. tl.max alone would not do: max.f32 on the GPU drops NaN operands
    where the interpreter (numpy) propagates them. A row of zeros divides by 1 (no 0/0) and stores scale 0.
    """
    finite = x - x == 0.0  # nan for inf and nan
    absmax = tl.max(tl.where(finite, tl.abs(x), 0.0), axis=1)
    bad = tl.max(tl.where(finite, 0, 1), axis=1) > 0
    y = tl.div_rn(x, tl.where(absmax == 0.0, 1.0, absmax)[:, None])  # correctly rounded, as torch's `/`
    y = tl.where(bad[:, None], 0.0, y)
    code = _nearest_code_fast(y, qmap_ptr, SIGNED)
    if not SIGNED:
        code = tl.where((y > 0.0) & (code == 0), 1, code)
    tl.store(codes_ptr + offsets, code.to(tl.uint8), mask=mask)
    nan = tl.full(absmax.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    tl.store(scales_ptr + qidx, tl.where(bad, nan, absmax), mask=qmask)


@triton.jit(do_not_specialize=[*TABLE_INTS, "seed"])
def _adam_lowbit_kernel(
    table_ptr,  # int64 chunk table: addresses per role, numels, per-program tensor index and chunk start
    n_tensors,
    numel_offset,
    chunk_tensor_offset,
    chunk_start_offset,
    lr,  # learning rate (runtime float), unless LR_IS_TENSOR
    lr_ptr,  # 1-element device tensor holding the learning rate, read when LR_IS_TENSOR
    one_minus_beta1,  # 1 - beta1, computed in float64 on the host
    beta2,
    one_minus_beta2,
    log_beta1,  # ln(beta1) in float64 on the host, for the bias corrections
    log_beta2,
    eps,
    weight_decay,
    seed,  # runtime int in [0, 2^31): the Philox key of the stochastic roundings
    signed_map_ptr,  # 256 sorted fp32 entries: exp_avg codes (STATE="int8")
    unsigned_map_ptr,  # 256 sorted fp32 entries: exp_avg_sq codes (STATE="int8")
    grad_scale_ptr,  # 1-element fp32 tensor: grads are divided by it when HAS_GRAD_SCALE
    found_inf_ptr,  # 1-element fp32 tensor: when non-zero the whole step is a no-op (HAS_FOUND_INF)
    counters_ptr,  # int32 per tensor, zeros between launches: programs arriving (to move the step counts)
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE: tl.constexpr,  # "int8", "bf16" or "fp32": how exp_avg and exp_avg_sq are stored
    MASTER: tl.constexpr,
    PARAM_SR: tl.constexpr,
    KAHAN: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor starts on a 16-byte boundary: lets the compiler vectorise
    CHUNK_SIZE: tl.constexpr,  # a multiple of QBLOCK: a program owns whole scale blocks
    BLOCK_SIZE: tl.constexpr,  # a power-of-two multiple of QBLOCK: a tile is [BLOCK_SIZE // QBLOCK, QBLOCK]
    QBLOCK: tl.constexpr,
):
    """One Adam(W) step on one chunk of one tensor, torch.optim.adam's order of operations (as ``_adam_kernel``):

        m, v = dequantise(codes, scales)  (int8) | widen (bf16, fp32)
        g = grad / grad_scale;  g = -g if maximize
        AdamW: p = p * (1 - lr * wd)          Adam: g = g + wd * p
        m = m + (1 - beta1) * (g - m);        v = v * beta2 + (1 - beta2) * g * g
        p = p - lr / (1 - beta1^t) * (m / (sqrt(v) / sqrt(1 - beta2^t) + eps))
        store m, v: re-quantise per 256-block (int8) | stochastic rounding (bf16) | as is (fp32)
        store p: fp32 master and rounded param (MASTER) | Kahan sum (KAHAN) | stochastic (PARAM_SR) | nearest

    The update uses the fp32 moments before they are re-quantised (as bitsandbytes and torchao do). Roles in the
    table: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, then the exp_avg and exp_avg_sq scales (int8), the fp32
    masters (MASTER), the compensation buffers (KAHAN), and the fp32 step counts, which move in this launch.

    Random bits: Philox4x32-10 keyed by ``seed`` with the counter (element index low 32 bits, high 32 bits, tensor
    index, step number), outputs 0/1/2 for the param/exp_avg/exp_avg_sq. Philox is a bijection of the counter for
    a key, so no two (tensor, element, step) of one launch share bits, and the bits of every step are new: the
    step number is the tensor's fp32 count, read here from device memory when the kernel runs, so a captured CUDA
    graph draws fresh bits at every replay with no host input. The same seed and counts give the same bits.
    """
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(table_ptr + chunk_tensor_offset + pid)
    chunk_start = tl.multiple_of(tl.load(table_ptr + chunk_start_offset + pid), QBLOCK)  # CHUNK_SIZE % QBLOCK == 0
    n_here = tl.minimum(tl.load(table_ptr + numel_offset + t) - chunk_start, CHUNK_SIZE)

    param_ptr = _chunk_pointer(table_ptr, 0, n_tensors, t, chunk_start, PARAM_DTYPE, ALIGNED)
    grad_ptr = _chunk_pointer(table_ptr, 1, n_tensors, t, chunk_start, GRAD_DTYPE, ALIGNED)
    m_scale_ptr = None
    v_scale_ptr = None
    if STATE == "int8":
        exp_avg_ptr = tensor_pointer(table_ptr, 2, n_tensors, t, tl.uint8, ALIGNED) + chunk_start
        exp_avg_sq_ptr = tensor_pointer(table_ptr, 3, n_tensors, t, tl.uint8, ALIGNED) + chunk_start
        # the scales of this chunk's blocks (the table holds the scale tensors' addresses, not their sizes)
        m_scale_ptr = tensor_pointer(table_ptr, 4, n_tensors, t, tl.float32, False) + chunk_start // QBLOCK
        v_scale_ptr = tensor_pointer(table_ptr, 5, n_tensors, t, tl.float32, False) + chunk_start // QBLOCK
        next_role = 6
    elif STATE == "bf16":
        exp_avg_ptr = _chunk_pointer(table_ptr, 2, n_tensors, t, chunk_start, tl.bfloat16, ALIGNED)
        exp_avg_sq_ptr = _chunk_pointer(table_ptr, 3, n_tensors, t, chunk_start, tl.bfloat16, ALIGNED)
        next_role = 4
    else:
        exp_avg_ptr = tensor_pointer(table_ptr, 2, n_tensors, t, tl.float32, ALIGNED) + chunk_start
        exp_avg_sq_ptr = tensor_pointer(table_ptr, 3, n_tensors, t, tl.float32, ALIGNED) + chunk_start
        next_role = 4
    master_ptr = None
    kahan_ptr = None
    if MASTER:
        master_ptr = tensor_pointer(table_ptr, next_role, n_tensors, t, tl.float32, ALIGNED) + chunk_start
        next_role += 1
    if KAHAN:
        kahan_ptr = _chunk_pointer(table_ptr, next_role, n_tensors, t, chunk_start, PARAM_DTYPE, ALIGNED)
        next_role += 1

    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = tl.cast(lr, tl.float32)
    step_ptr = tl.load(table_ptr + next_role * n_tensors + t).to(tl.pointer_type(tl.float32))
    step_f = tl.load(step_ptr) + 1.0  # this step's number; written back once the tensor is done (below)
    bias_correction1 = _neg_expm1(step_f * tl.cast(log_beta1, tl.float32))
    bias_correction2_sqrt = tl.sqrt_rn(_neg_expm1(step_f * tl.cast(log_beta2, tl.float32)))
    step_size = tl.div_rn(lr, bias_correction1)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    decay = 1.0 - lr * weight_decay
    grad_scale = None
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)

    ROWS: tl.constexpr = BLOCK_SIZE // QBLOCK
    rows = tl.arange(0, ROWS)
    tile = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    for block_start in tl.range(0, CHUNK_SIZE, BLOCK_SIZE):
        offsets = block_start + tile
        qidx = block_start // QBLOCK + rows  # the tile's scale blocks, from the chunk's first
        # Full tiles get a mask the compiler can prove uniform (vectorised accesses); only a tensor's tail tile is
        # masked element by element. Skipping empty tiles keeps small tensors cheap.
        if block_start + BLOCK_SIZE <= n_here:
            _adam_lowbit_tile(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, m_scale_ptr, v_scale_ptr, master_ptr,
                              kahan_ptr, signed_map_ptr, unsigned_map_ptr, offsets, offsets < block_start + BLOCK_SIZE,
                              qidx, qidx < block_start // QBLOCK + ROWS, one_minus_beta1, beta2, one_minus_beta2, eps,
                              weight_decay, decay, step_size, bias_correction2_sqrt, grad_scale, seed, t, chunk_start,
                              step_f, PARAM_DTYPE, GRAD_DTYPE, STATE, MASTER, PARAM_SR, KAHAN, MAXIMIZE, DECOUPLED,
                              HAS_GRAD_SCALE)  # fmt: skip
        elif block_start < n_here:
            _adam_lowbit_tile(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, m_scale_ptr, v_scale_ptr, master_ptr,
                              kahan_ptr, signed_map_ptr, unsigned_map_ptr, offsets, offsets < n_here, qidx,
                              qidx * QBLOCK < n_here, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                              decay, step_size, bias_correction2_sqrt, grad_scale, seed, t, chunk_start, step_f,
                              PARAM_DTYPE, GRAD_DTYPE, STATE, MASTER, PARAM_SR, KAHAN, MAXIMIZE, DECOUPLED,
                              HAS_GRAD_SCALE)  # fmt: skip

    # The step count moves in this launch, as in _adam_kernel: every program of tensor t read the count above,
    # before its arrival (acq_rel atomic, after a barrier that orders every warp's read); the last of the tensor's
    # programs to arrive writes the new count and resets the counter for the next launch.
    t = tl.load(table_ptr + chunk_tensor_offset + tl.program_id(0).to(tl.int64))
    n_chunks_t = tl.maximum(tl.cdiv(tl.load(table_ptr + numel_offset + t), CHUNK_SIZE), 1)
    tl.debug_barrier()
    arrived = tl.atomic_add(counters_ptr + t, 1, sem="acq_rel")
    if arrived == n_chunks_t - 1:
        step_ptr = tl.load(table_ptr + next_role * n_tensors + t).to(tl.pointer_type(tl.float32))
        tl.store(step_ptr, step_f)
        tl.store(counters_ptr + t, 0)


@triton.jit
def _adam_lowbit_tile(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, m_scale_ptr, v_scale_ptr, master_ptr, kahan_ptr,
    signed_map_ptr, unsigned_map_ptr, offsets, mask, qidx, qmask, one_minus_beta1, beta2, one_minus_beta2, eps,
    weight_decay, decay, step_size, bias_correction2_sqrt, grad_scale, seed, t, chunk_start, step_f,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE: tl.constexpr, MASTER: tl.constexpr,
    PARAM_SR: tl.constexpr, KAHAN: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):  # fmt: skip
    """The update of one [rows, 256] tile (see ``_adam_lowbit_kernel``); masked-off lanes hold zeros."""
    g = load_fp32(grad_ptr + offsets, mask, GRAD_DTYPE)
    if MASTER:
        p = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    else:
        p = load_fp32(param_ptr + offsets, mask, PARAM_DTYPE)
    if STATE == "int8":
        m = _dequantize(exp_avg_ptr, m_scale_ptr, signed_map_ptr, offsets, mask, qidx, qmask)
        v = _dequantize(exp_avg_sq_ptr, v_scale_ptr, unsigned_map_ptr, offsets, mask, qidx, qmask)
    elif STATE == "bf16":
        m = load_fp32(exp_avg_ptr + offsets, mask, tl.bfloat16)
        v = load_fp32(exp_avg_sq_ptr + offsets, mask, tl.bfloat16)
    else:
        m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if MAXIMIZE:
        g = -g
    if weight_decay != 0.0:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    p = p - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps)

    rnd_p = None
    rnd_m = None
    rnd_v = None
    if PARAM_SR or STATE == "bf16":
        elem = chunk_start + offsets  # the element's index in its tensor: the counter (see the kernel's docstring)
        lo = elem.to(tl.uint32)
        zero = lo * 0
        rnd_p, rnd_m, rnd_v, _ = philox(seed, lo, (elem >> 32).to(tl.uint32), zero + t.to(tl.uint32),
                                        zero + step_f.to(tl.uint32))  # fmt: skip

    if STATE == "int8":
        _quantize_store(m, exp_avg_ptr, m_scale_ptr, signed_map_ptr, offsets, mask, qidx, qmask, True)
        _quantize_store(v, exp_avg_sq_ptr, v_scale_ptr, unsigned_map_ptr, offsets, mask, qidx, qmask, False)
    elif STATE == "bf16":
        store_fp32(exp_avg_ptr + offsets, m, mask, tl.bfloat16, True, rnd_m)
        store_fp32(exp_avg_sq_ptr + offsets, v, mask, tl.bfloat16, True, rnd_v)
    else:
        tl.store(exp_avg_ptr + offsets, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)

    if MASTER:
        tl.store(master_ptr + offsets, p, mask=mask)
        store_fp32(param_ptr + offsets, p, mask, PARAM_DTYPE)
    elif KAHAN:
        # Kahan-compensated summation (optimi): the exact sum of the new param and what earlier roundings lost,
        # rounded to the param (nearest even); the new compensation is what this rounding lost.
        y = p + load_fp32(kahan_ptr + offsets, mask, PARAM_DTYPE)
        store_fp32(param_ptr + offsets, y, mask, PARAM_DTYPE)
        store_fp32(kahan_ptr + offsets, y - rounded_fp32(y, PARAM_DTYPE), mask, PARAM_DTYPE)
    elif PARAM_SR:
        store_fp32(param_ptr + offsets, p, mask, PARAM_DTYPE, True, rnd_p)
    else:
        store_fp32(param_ptr + offsets, p, mask, PARAM_DTYPE)


def _dynamic_map(signed: bool) -> torch.Tensor:
    """The sorted 256-entry dynamic map of bitsandbytes' ``create_dynamic_map(signed, 7, 8)`` (fp32, CPU).

    Exponent i = 0..6 holds the midpoints of a linear grid on [0.1, 1] with 2^i (signed, with the negatives) or
    2^(i+1) (unsigned) intervals, times 10^(i-6); then 0 and 1: 256 values, in bitsandbytes' fp32 arithmetic.
    ``fused_ops/_ref_lowbit.create_dynamic_map`` builds the same (the tests compare them bit for bit).
    """
    data: list[float] = [0.0, 1.0]
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1 if signed else 2 ** (i + 1) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (i - 6) * means).tolist()
        if signed:
            data += (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(data), dtype=torch.float32)


# The (signed, unsigned) maps each device's launches read through their addresses, with what each was when
# uploaded (address, version counter, element count, storage size): private, and checked at every launch.
_MAPS: dict[torch.device, tuple[tuple[torch.Tensor, torch.Tensor], tuple]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # (maps replaced: a captured graph may still read them)


def _map_mark(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t._version, t.numel(), t.dtype, t.device, t.is_contiguous(), t.untyped_storage().nbytes()


def _launch_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps a launch on ``device`` reads: uploaded once per device and kept (captured graphs read them), and
    checked at every launch (a few attribute reads): one freed, resized, moved or written since (it is private,
    but reachable) is replaced by a fresh upload rather than read."""
    entry = _MAPS.get(device)
    if entry is not None and tuple(map(_map_mark, entry[0])) == entry[1]:
        return entry[0]
    if is_capturing(device):
        raise RuntimeError("adam_lowbit: the quantisation maps cannot be uploaded during CUDA graph capture; run "
                           "one eager step (a warm-up) before capturing")  # fmt: skip
    if entry is not None:
        _RETIRED.append(entry[0])
    maps = (_dynamic_map(True).to(device), _dynamic_map(False).to(device))
    _MAPS[device] = (maps, tuple(map(_map_mark, maps)))
    return maps


def quant_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (signed, unsigned) 8-bit maps (256 fp32 values each, ascending) on ``device``: copies (the launches
    read their own, private ones)."""
    return tuple(m.clone() for m in _launch_maps(device))


def _check_options(fn, params, state, param_sr, seed, amsgrad, master, kahan, chunk_size, block_size) -> None:
    if state not in _STATE_DTYPES:
        raise ValueError(f"{fn}: state must be 'int8', 'bf16' or 'fp32', got {state!r}")
    if amsgrad:
        raise ValueError(f"{fn}: amsgrad is not supported with low-bit states (state={state!r}); use fp32 states "
                         "(kernels.adam.adam_launch)")  # fmt: skip
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:  # one int type: no recompiles
        raise ValueError(f"{fn}: seed must be an int in [0, 2^31), got {seed!r}")
    low_precision = isinstance(params[0], torch.Tensor) and params[0].dtype in (torch.bfloat16, torch.float16)
    for flag, name in ((param_sr, "param_sr"), (kahan, "kahan_comps")):
        if flag and (master or not low_precision):
            raise ValueError(f"{fn}: {name} is for bfloat16/float16 params without master weights")
    if param_sr and kahan:
        raise ValueError(f"{fn}: param_sr and kahan_comps exclude each other (two ways to keep the lost bits)")
    if block_size < QUANT_BLOCK or block_size & (block_size - 1):
        raise ValueError(f"{fn}: block_size must be a power of two >= {QUANT_BLOCK}, got {block_size}")
    if chunk_size <= 0 or chunk_size % QUANT_BLOCK:
        raise ValueError(f"{fn}: chunk_size must be a positive multiple of {QUANT_BLOCK}, got {chunk_size}")


def _check(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales, master_params,
           kahan_comps, state) -> None:  # fmt: skip
    """Types, dtypes, sizes, contiguity and device of every tensor (metadata only: no host sync)."""
    fn = "adam_lowbit_launch"
    check_role(fn, "params", params, _TL_DTYPES)
    device, dtype = params[0].device, params[0].dtype
    check_numels(fn, "grads", grads, "params", params)
    check_role(fn, "grads", grads, tuple(dict.fromkeys((dtype, torch.float32))), device)
    for name, lst in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        check_numels(fn, name, lst, "params", params)
        check_role(fn, name, lst, (_STATE_DTYPES[state],), device)
    for name, lst in (("exp_avg_scales", exp_avg_scales), ("exp_avg_sq_scales", exp_avg_sq_scales)):
        if state != "int8":
            if len(lst):
                raise ValueError(f"{fn}: {name} are for state='int8' only (state={state!r})")
            continue
        if len(lst) != len(params):
            raise ValueError(f"{fn}: {name} has {len(lst)} tensors, params has {len(params)}")
        check_role(fn, name, lst, (torch.float32,), device)
        for i, (s, p) in enumerate(zip(lst, params)):
            if s.numel() != -(-p.numel() // QUANT_BLOCK):
                raise ValueError(f"{fn}: {name}[{i}] has {s.numel()} elements, params[{i}] has {p.numel()}: expected "
                                 f"ceil({p.numel()} / {QUANT_BLOCK}) = {-(-p.numel() // QUANT_BLOCK)}")  # fmt: skip
    for name, lst, dt in (("master_params", master_params, torch.float32), ("kahan_comps", kahan_comps, dtype)):
        if len(lst):
            check_numels(fn, name, lst, "params", params)
            check_role(fn, name, lst, (dt,), device)
    if len(state_steps) != len(params):
        raise ValueError(f"{fn}: state_steps has {len(state_steps)} tensors, params has {len(params)}")
    check_role(fn, "state_steps", state_steps, (torch.float32,), device)
    for i, s in enumerate(state_steps):
        if s.numel() != 1:
            raise ValueError(f"{fn}: state_steps[{i}] must be a 1-element float32 tensor, has {s.numel()} elements")


def _roles(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales, master_params,
           kahan_comps, state) -> list:  # fmt: skip
    """The chunk table's roles, in the order the kernel reads them (grads are role 1, as in ``adam.py``)."""
    roles = [params, grads, exp_avgs, exp_avg_sqs]
    if state == "int8":
        roles += [exp_avg_scales, exp_avg_sq_scales]
    if master_params:
        roles.append(master_params)
    if kahan_comps:
        roles.append(kahan_comps)
    roles.append(state_steps)
    return roles


def _role_names(state: str, master: bool, kahan: bool) -> list[str]:
    """The names of ``_roles``' roles, for messages."""
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs"]
    names += ["exp_avg_scales", "exp_avg_sq_scales"] if state == "int8" else []
    return names + (["master_params"] if master else []) + (["kahan_comps"] if kahan else []) + ["state_steps"]


@no_user_code
def adam_lowbit_launch(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    exp_avg_scales: Sequence[torch.Tensor] = (),
    exp_avg_sq_scales: Sequence[torch.Tensor] = (),
    master_params: Sequence[torch.Tensor] = (),
    kahan_comps: Sequence[torch.Tensor] = (),
    state: str = "int8",
    param_sr: bool = False,
    seed: int = 0,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    decoupled: bool,
    amsgrad: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    chunk_size: int = 65536,
    block_size: int = 1024,
    cache: MutableMapping | None = None,
    checked: bool = False,
) -> None:
    """Launch one fused Adam(W) step with low-bit moments over all tensors (one launch; no host synchronisation).

    ``state="int8"``: ``exp_avgs`` (signed map) and ``exp_avg_sqs`` (unsigned map) are uint8 codes of the params'
    sizes, ``exp_avg_scales`` / ``exp_avg_sq_scales`` fp32 with ceil(numel / 256) elements each (block absmax).
    ``"bf16"``: bf16 moments, stored with stochastic rounding. ``"fp32"``: fp32 moments. ``state_steps``: fp32 step
    counts (steps taken so far), moved in the same launch unless ``found_inf`` is set (then nothing is written).
    ``param_sr``: bf16/fp16 params without masters are stored with stochastic rounding; ``kahan_comps`` (the
    params' dtype) instead keeps what rounding to nearest lost. ``master_params`` (fp32): the update runs on them,
    the params receive the rounded result. ``seed``: int in [0, 2^31), the key of every random bit (see the
    kernel's docstring; give different param groups different seeds, their tensor indices restart at 0).
    ``lr`` may be a 1-element device tensor. Grads have the params' dtype or are all fp32. amsgrad is refused.
    Inputs are checked on every call; the chunk table is cached by address.
    ``checked=True``: the caller has just run this launcher's checks on these very inputs (the ``fused_ops::`` custom
    ops do, before their own memory check), so the table look-up does not run them again.
    """
    fn = "adam_lowbit_launch"
    if len(params) == 0:
        return
    _check_options(fn, params, state, param_sr, seed, amsgrad, bool(master_params), bool(kahan_comps), chunk_size,
                   block_size)  # fmt: skip
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales, master_params,
             kahan_comps, state)  # fmt: skip
    roles = _roles(*lists)

    def check() -> None:
        _check(*lists)
        check_roles_memory(fn, roles, _role_names(state, bool(master_params), bool(kahan_comps)), _GRAD_ROLE)

    table = build_chunk_table(roles, chunk_size, cache, check=None if checked else check, with_counters=True)
    _launch(table, params[0], grads[0].dtype, fn, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay, maximize=maximize, decoupled=decoupled, grad_scale=grad_scale,
            found_inf=found_inf, state=state, master=bool(master_params), param_sr=param_sr, kahan=bool(kahan_comps),
            seed=seed, chunk_size=chunk_size, block_size=block_size)  # fmt: skip


def _launch(
    table: ChunkTable,
    param0: torch.Tensor,
    grad_dtype: torch.dtype,
    fn: str,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    decoupled: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    state: str,
    master: bool,
    param_sr: bool,
    kahan: bool,
    seed: int,
    chunk_size: int,
    block_size: int,
) -> None:
    lr_is_tensor = isinstance(lr, torch.Tensor)
    for name, x in (("lr", lr if lr_is_tensor else None), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if x is not None:  # read by the kernel through a raw pointer: one float element on the params' device
            check_scalar(fn, name, x, param0.device)
    if table.n_chunks == 0:
        return
    maps = _launch_maps(param0.device)
    use_on_current_stream(table)
    dummy = table.table  # any device pointer for arguments a flag switches off
    with (
        torch.cuda.device(param0.device) if param0.is_cuda else contextlib.nullcontext(),
        counters_reset_on_error(table),
    ):
        _adam_lowbit_kernel[(table.n_chunks,)](
            table.table,
            table.n_tensors,
            table.numel_offset,
            table.chunk_tensor_offset,
            table.chunk_start_offset,
            0.0 if lr_is_tensor else float(lr),
            lr if lr_is_tensor else dummy,
            1.0 - beta1,
            float(beta2),  # (floats: an int 0 or 1 would compile another variant, see TABLE_INTS)
            1.0 - beta2,
            math.log(beta1) if beta1 > 0 else -math.inf,
            math.log(beta2) if beta2 > 0 else -math.inf,
            float(eps),
            float(weight_decay),
            seed,
            maps[0],
            maps[1],
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            table.counters,
            PARAM_DTYPE=_TL_DTYPES[param0.dtype],
            GRAD_DTYPE=_TL_DTYPES[grad_dtype],
            STATE=state,
            MASTER=master,
            PARAM_SR=param_sr,
            KAHAN=kahan,
            MAXIMIZE=maximize,
            DECOUPLED=decoupled,
            LR_IS_TENSOR=lr_is_tensor,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=aligned_except(table, (4, 5, -1) if state == "int8" else (-1,)),  # (scales, step counts)
            CHUNK_SIZE=chunk_size,
            BLOCK_SIZE=block_size,
            QBLOCK=QUANT_BLOCK,
            # 4 elements per thread (one 128-bit fp32 access). At 8 (Triton's default 4 warps for block 1024) the
            # int8 path holds two binary searches per element live: ptxas (sm_90a) gives 168-197 registers and
            # spills; at 4, 118-119 registers, no spills (bf16 states: 64).
            num_warps=max(1, min(8, block_size // 128)),
        )


class AdamLowbitStep(AdamStep):
    """A prepared low-bit Adam(W) launch over one fixed set of tensors (``AdamStep``'s contract and machinery).

    Built once (every input checked once, the table and the quantisation maps uploaded and owned); between steps
    only the grads may change, through :meth:`set_grads` (inherited: checks the new grads, rewrites their addresses
    with one small copy when they moved; during CUDA graph capture each capture launches on a table of its own).
    The random bits need no host input per step (the step counts move on the device), so a captured step draws
    new bits at every replay.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        exp_avg_sqs: Sequence[torch.Tensor],
        state_steps: Sequence[torch.Tensor],
        *,
        exp_avg_scales: Sequence[torch.Tensor] = (),
        exp_avg_sq_scales: Sequence[torch.Tensor] = (),
        master_params: Sequence[torch.Tensor] = (),
        kahan_comps: Sequence[torch.Tensor] = (),
        state: str = "int8",
        param_sr: bool = False,
        seed: int = 0,
        amsgrad: bool = False,
        chunk_size: int = 65536,
        block_size: int = 1024,
    ) -> None:
        fn = "AdamLowbitStep"
        if len(params) == 0:
            raise ValueError(f"{fn}: no tensors")
        _check_options(fn, params, state, param_sr, seed, amsgrad, bool(master_params), bool(kahan_comps),
                       chunk_size, block_size)  # fmt: skip
        lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
                 master_params, kahan_comps, state)  # fmt: skip
        _check(*lists)
        PreparedLaunch.__init__(self, _roles(*lists), _GRAD_ROLE, chunk_size, block_size, with_counters=True,
                                names=_role_names(state, bool(master_params), bool(kahan_comps)))  # fmt: skip
        _launch_maps(params[0].device)  # (uploaded before any capture)
        self.state = state
        self.master = bool(master_params)
        self.kahan = bool(kahan_comps)
        self.param_sr = bool(param_sr)
        self.seed = seed

    def _run(
        self,
        *,
        lr: float | torch.Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        maximize: bool,
        decoupled: bool,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> None:
        """One step (one launch); the step counts move in the kernel (not when ``found_inf`` is set)."""
        table = self.launch_table()
        _launch(table, self.param0, self.grad_dtype, "AdamLowbitStep", lr=lr, beta1=beta1, beta2=beta2,
                eps=eps, weight_decay=weight_decay, maximize=maximize, decoupled=decoupled, grad_scale=grad_scale,
                found_inf=found_inf, state=self.state, master=self.master, param_sr=self.param_sr, kahan=self.kahan,
                seed=self.seed, chunk_size=self.chunk_size, block_size=self.block_size)  # fmt: skip
