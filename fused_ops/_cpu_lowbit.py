"""The CPU path of low-bit Adam(W): :func:`adam_lowbit_cpu_`, the step of :func:`fused_ops._ref_lowbit.adam_lowbit_`
(same signature, same contract, the same bits for ``compute_dtype=torch.float32``) over many tensors at once.

The oracle runs about a hundred small torch ops per tensor, so a model of thousands of small tensors spends its
step in per-op overhead. Here the tensors are concatenated into flat fp32 buffers (a chunk of at most ``CHUNK``
elements at a time, so temporaries stay bounded; a tensor larger than a chunk is cut at block boundaries) and
every elementwise op of the oracle runs once over the chunk, in the oracle's order and with the oracle's Python
scalars, so each element sees the same fp32 operations as in the oracle:

- tensors are grouped by step count (and param dtype): the bias corrections, the Philox step counter and the
  stochastic-rounding target are Python scalars of the group, computed as the oracle computes them;
- 8-bit moments are dequantised per element (``map[code] * scale`` of the element's block) and quantised on a
  block-padded copy of the chunk (each tensor zero-padded to whole 256-element blocks, so no block straddles two
  tensors: the padding is the oracle's own), with the oracle's rule (:func:`_ref_lowbit.quantize_blockwise`),
  the code looked up in two tables built from the oracle's own ``quantize_code`` (:func:`code_tables`;
  checked against it for every fp32 value in [-1, 1], both maps, when written) instead of a binary search;
- the random bits are Philox4x32-10 with the oracle's counters (element index within the tensor, tensor index,
  step), computed on the whole chunk (:func:`philox`, the same function as ``_ref_lowbit.philox`` with fewer
  passes), and bf16 stochastic rounding adds their low 16 bits in int32 (:func:`_round_bf16`);
- results go back with one ``torch._foreach_copy_`` per output (the same roundings as the oracle's ``copy_``), once
  every chunk is computed: the whole step is computed out of place first (every allocation), then stored by copies
  into the existing tensors, the step counts last, so an error (out of memory) leaves every tensor as it was.

NaNs keep their places but not necessarily their payloads (torch's vectorised and scalar fp32 -> bf16 casts write
different NaN bit patterns, so the position of an element inside a buffer can change its NaN's bits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _ref_lowbit as ref
from ._ref_lowbit import QUANT_BLOCK, n_scales
from .reference import _next_steps, _noop, _plus_one, _store_steps

Tensor = torch.Tensor

CHUNK = 1 << 18  # elements per flat chunk (a multiple of QUANT_BLOCK): bounds the temporaries (~100 B / element)
PHILOX_CHUNK = 1 << 16  # elements per Philox pass (its int64 temporaries stay in cache)

_U32 = 0xFFFFFFFF
_A, _B = 0xD2511F53, 0xCD9E8D57  # Philox round multipliers (those of triton.language.random and _ref_lowbit)
_KA, _KB = 0x9E3779B9, 0xBB67AE85  # key increments


def philox(seed: int, c0: Tensor, c1: Tensor | int, c2: Tensor | int, c3: Tensor | int, n_rounds: int = 10,
           mask: bool = True) -> list:  # fmt: skip
    """``_ref_lowbit.philox`` (same outputs, bit for bit) in fewer passes: ``c0`` an int64 tensor of uint32 values,
    ``c1..c3`` tensors of its shape or Python ints (uint32). The low halves of the products are not masked until
    they are used: they only enter XORs whose results are masked (``mask=False``: outputs 1 and 3 are returned
    unmasked too, their low 32 bits the outputs)."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c1 = c1 if isinstance(c1, Tensor) else c1 & _U32
    c3 = c3 if isinstance(c3, Tensor) else c3 & _U32
    if not isinstance(c2, Tensor):
        c2 = torch.full_like(c0, c2 & _U32)
    for _ in range(n_rounds):
        pb = c2 * _B  # both factors < 2^32: the int64 product wraps like the uint64 one
        pa = c0 * _A
        n0 = pb >> 32  # bits 32..63 (the arithmetic shift's sign bits above are masked below)
        n2 = pa >> 32
        for x, c, k in ((n0, c1, k0), (n2, c3, k1)):
            if isinstance(c, Tensor):
                x ^= c
                x ^= k
            else:
                x ^= c ^ k
            x &= _U32
        c0, c1, c2, c3 = n0, pb, n2, pa
        k0, k1 = (k0 + _KA) & _U32, (k1 + _KB) & _U32
    return [c0, c1 & _U32, c2, c3 & _U32] if mask else [c0, c1, c2, c3]


def _random_bits(seed: int, elem: Tensor, tid: Tensor, step: int, which: dict[int, bool], high: bool) -> list:
    """``_ref_lowbit.random_bits`` for the elements of several tensors: ``elem`` (int64) the index of each element
    in its tensor (``high``: some are 2^32 or more), ``tid`` its tensor's index. Outputs ``which`` of the four (the
    others None): ``which[i]`` True: the low 16 bits only, as int32 (all a bf16 rounding reads); False: all 32, as
    int64. Computed in pieces of PHILOX_CHUNK elements."""
    n = elem.numel()
    out = [None] * 4
    for i, low in which.items():
        out[i] = torch.empty(n, dtype=torch.int32 if low else torch.int64)
    for a in range(0, n, PHILOX_CHUNK):
        e = elem[a : a + PHILOX_CHUNK]
        bits = philox(seed, e & _U32 if high else e, e >> 32 if high else 0, tid[a : a + PHILOX_CHUNK], step,
                      mask=False)  # fmt: skip
        for i, low in which.items():
            torch.bitwise_and(bits[i], 0xFFFF if low else _U32, out=out[i][a : a + PHILOX_CHUNK])
    return out


def _round_bf16(x: Tensor, low_bits: Tensor) -> Tensor:
    """``_ref_lowbit.stochastic_round(x, torch.bfloat16, bits)`` (but for NaN payloads) with ``low_bits`` = bits &
    0xFFFF as int32: the same sum of the fp32 pattern and the bits, truncated, in int32 (no finite or infinite
    pattern overflows: a negative one stays negative, a positive one is at most 0x7F800000 + 0xFFFF; NaNs,
    whose sums may wrap, are replaced by x)."""
    rounded = x.view(torch.int32) + low_bits
    rounded &= -0x10000  # 0xFFFF0000
    return torch.where(torch.isnan(x), x, rounded.view(torch.float32)).to(torch.bfloat16)


def _round(x: Tensor, dtype: torch.dtype, bits: Tensor) -> Tensor:
    """fp32 ``x`` rounded stochastically to ``dtype`` (bf16: with the low bits of :func:`_random_bits`)."""
    return _round_bf16(x, bits) if dtype == torch.bfloat16 else ref.stochastic_round(x, dtype, bits)


def _ordered_to_float(key: Tensor) -> Tensor:
    """fp32 values of int64 order keys (the inverse of: pattern for x >= +0, minus the magnitude pattern for
    x < 0; key 0 is +0.0): consecutive keys are consecutive floats."""
    pattern = torch.where(key >= 0, key, (-key) | 0x80000000)
    return (pattern - ((pattern >> 31) << 32)).to(torch.int32).view(torch.float32)


_CODE_TABLES: dict[bool, tuple[Tensor, Tensor]] = {}


def code_tables(signed: bool) -> tuple[Tensor, Tensor]:
    """Tables giving ``_ref_lowbit.quantize_code(y, map, signed)`` of every finite fp32 ``y`` in two lookups: with
    ``b`` the top 16 bits of y's pattern, the code is ``codes[b] + (y >= thresholds[b])``.

    The code is a nondecreasing function of y (the nearest entry of a sorted map; on the fp32 arithmetic of the rule
    both differences are monotone in y; the unsigned map's positive values raised to code 1 keep it so), so each
    code c < 255 has a threshold: the least float whose code exceeds c, found by bisection over the floats in order
    with the oracle's own ``quantize_code``. Each 16-bit bucket (an interval of floats 2^-7 wide relative to its
    values) holds at most one threshold (checked here: the codes at its two ends differ by at most 1), so the code
    within bucket b is the code at its lower end, ``codes[b]`` (uint8), plus one from ``thresholds[b]`` on (the
    threshold of that code; +inf for code 255)."""
    if signed not in _CODE_TABLES:
        qmap = ref.dynamic_map(signed)
        bucket = torch.arange(1 << 16, dtype=torch.int64)
        ends = [((bucket << 16) | low) for low in (0, 0xFFFF)]
        ends = [(e - ((e >> 31) << 32)).to(torch.int32).view(torch.float32) for e in ends]
        finite = ((bucket >> 7) & 0xFF) != 0xFF  # exponent all ones: inf and NaN patterns (no code needed)
        lo_end = torch.where(finite, torch.minimum(*ends), 0.0)
        hi_end = torch.where(finite, torch.maximum(*ends), 0.0)
        first, last = ref.quantize_code(lo_end, qmap, signed), ref.quantize_code(hi_end, qmap, signed)
        if int((last - first).max()) > 1 or int((last - first).min()) < 0:
            raise RuntimeError("code_tables: a 16-bit bucket holds two code thresholds")
        # threshold[c]: the least key (float) whose code is >= c + 1, by bisection over [-FLT_MAX, FLT_MAX]
        fmax = 0x7F7FFFFF
        lo = torch.full((255,), -fmax, dtype=torch.int64)
        hi = torch.full((255,), fmax, dtype=torch.int64)
        target = torch.arange(1, 256)
        while bool((lo < hi).any()):
            mid = torch.div(lo + hi, 2, rounding_mode="floor")
            above = ref.quantize_code(_ordered_to_float(mid), qmap, signed) >= target
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid + 1)
        thresholds = torch.cat([_ordered_to_float(lo), torch.tensor([math.inf])])
        _CODE_TABLES[signed] = (first.to(torch.uint8), thresholds[first])
    return _CODE_TABLES[signed]


def quantize_padded(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``_ref_lowbit.quantize_blockwise`` of a flat fp32 ``x`` of whole blocks: (uint8 codes, fp32 scales), the
    same bits, with the codes looked up in :func:`code_tables`."""
    blocks = x.view(-1, QUANT_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # NaN or inf for a block holding a non-finite value
    bad = ~torch.isfinite(absmax)
    y = blocks / torch.where((absmax == 0) | bad, 1.0, absmax)  # a finite block: the oracle's absmax, the same y
    scales = absmax.view(-1)
    if bool(bad.any()):
        y = torch.where(bad, 0.0, y)
        scales = torch.where(bad.view(-1), math.nan, scales)
    codes_t, thresholds_t = code_tables(signed)
    bucket = (y.view(-1).view(torch.int32) >> 16) & 0xFFFF
    codes = codes_t.index_select(0, bucket)
    codes += y.view(-1) >= thresholds_t.index_select(0, bucket)
    return codes, scales


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _bump_steps(state_steps: Sequence[Tensor]) -> tuple[list[tuple[Tensor, Tensor]], list[float]]:
    """The counts after adding 1 to every step count (the oracle's ``add_(1)`` then ``item()`` per tensor), computed
    out of place: ``(writes, counts)``, ``writes`` the copies that store them (see ``reference._next_steps``); one
    foreach op and one read unless a count is shared or the counts differ in layout."""
    writes, new = _next_steps(state_steps, chained=True)
    if new is None:  # (distinct counts)
        return writes, _plus_one(state_steps)
    s0 = new[0]
    if len(writes) == len(new) and all(s.shape == s0.shape and s.numel() == 1 and s.dtype == s0.dtype
                                       and s.device == s0.device for s in new):  # fmt: skip
        return writes, [float(x) for x in torch.stack(new).reshape(-1).tolist()]
    return writes, [_scalar(s) for s in new]


def _chunks(order: list[int], numels: list[int], splittable: list[bool]) -> list[list[tuple[int, int, int, bool]]]:
    """The tensors ``order`` as chunks of at most CHUNK elements: lists of (tensor index, start, end, whole); a
    splittable tensor over CHUNK elements is cut into pieces at multiples of CHUNK, each a chunk of its own."""
    chunks, cur, size = [], [], 0
    for t in order:
        n = numels[t]
        if n > CHUNK and splittable[t]:
            chunks += [[(t, a, min(a + CHUNK, n), False)] for a in range(0, n, CHUNK)]
            continue
        if cur and size + n > CHUNK:
            chunks.append(cur)
            cur, size = [], 0
        cur.append((t, 0, n, True))
        size += n
    if cur:
        chunks.append(cur)
    return chunks


@torch.no_grad()
def adam_lowbit_cpu_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    exp_avg_scales: Sequence[Tensor] = (),
    exp_avg_sq_scales: Sequence[Tensor] = (),
    master_params: Sequence[Tensor] = (),
    kahan_comps: Sequence[Tensor] = (),
    state: str = "int8",
    param_sr: bool = False,
    seed: int = 0,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    decoupled: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    defer: bool = False,
):
    """:func:`fused_ops._ref_lowbit.adam_lowbit_` (the same contract and, for ``compute_dtype=torch.float32``, the
    same bits but for NaN payloads), over all tensors at once; see the module docstring. Another
    ``compute_dtype``, or a tensor off the CPU, runs the oracle. With ``defer``, only the first phase runs (see
    :func:`adam_lowbit_cpu_prepare`): the function that stores the step is returned."""
    store = adam_lowbit_cpu_prepare(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales=exp_avg_scales,
        exp_avg_sq_scales=exp_avg_sq_scales, master_params=master_params, kahan_comps=kahan_comps, state=state,
        param_sr=param_sr, seed=seed, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        maximize=maximize, decoupled=decoupled, grad_scale=grad_scale, found_inf=found_inf,
        compute_dtype=compute_dtype,
    )  # fmt: skip
    if defer:
        return store
    store()
    return None


@torch.no_grad()
def adam_lowbit_cpu_prepare(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    exp_avg_scales: Sequence[Tensor] = (),
    exp_avg_sq_scales: Sequence[Tensor] = (),
    master_params: Sequence[Tensor] = (),
    kahan_comps: Sequence[Tensor] = (),
    state: str = "int8",
    param_sr: bool = False,
    seed: int = 0,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    decoupled: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
):
    """:func:`adam_lowbit_cpu_` in two phases: every chunk computed here (all the allocations; nothing the step
    writes is changed), returned with the function that stores the results (copies into the existing tensors, the
    step counts last). (The oracle's path, another ``compute_dtype`` or a tensor off the CPU, runs whole in that
    function.)"""
    kw = dict(exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales, master_params=master_params,
              kahan_comps=kahan_comps, state=state, param_sr=param_sr, seed=seed, lr=lr, beta1=beta1, beta2=beta2,
              eps=eps, weight_decay=weight_decay, maximize=maximize, decoupled=decoupled, grad_scale=grad_scale,
              found_inf=found_inf)  # fmt: skip
    if compute_dtype != torch.float32 or any(p.device.type != "cpu" for p in params):
        return lambda: ref.adam_lowbit_(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kw,
                                        compute_dtype=compute_dtype)  # fmt: skip
    if len(params) == 0 or (found_inf is not None and _scalar(found_inf) != 0):
        return _noop
    kw["lr"] = _scalar(lr)
    kw["grad_scale"] = None if grad_scale is None else _scalar(grad_scale)
    step_writes, steps = _bump_steps(state_steps)

    roles = [params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, master_params, kahan_comps]
    numels = [p.numel() for p in params]
    splittable = [n > CHUNK and all(r[t].is_contiguous() for r in roles if len(r)) for t, n in enumerate(numels)]
    groups: dict[tuple[float, torch.dtype], list[int]] = {}
    for t, p in enumerate(params):
        groups.setdefault((steps[t], p.dtype), []).append(t)
    writes: list[tuple[list[Tensor], Tensor]] = []
    for (step, pdtype), order in groups.items():
        for segs in _chunks(order, numels, splittable):
            writes += _chunk_step(segs, step, pdtype, params, grads, exp_avgs, exp_avg_sqs, **kw)

    def commit() -> None:
        for dsts, flat in writes:
            _write(dsts, flat)
        _store_steps(step_writes)

    return commit


def _pick(xs: Sequence[Tensor], segs: list, scales: bool = False) -> list[Tensor]:
    """The tensors (or the one piece) of a chunk, from one role's list."""
    if segs[0][3]:
        return [xs[t] for t, _, _, _ in segs]
    ((t, a, b, _),) = segs
    if scales:
        return [xs[t].view(-1)[a // QUANT_BLOCK : n_scales(b)]]
    return [xs[t].view(-1)[a:b]]


def _flat(xs: list[Tensor]) -> Tensor:
    """The tensors concatenated (one tensor: a view of it, never to be written)."""
    if len(xs) == 1:
        return xs[0].reshape(-1)
    return torch.cat([x if x.dim() == 1 else x.reshape(-1) for x in xs])


def _write(dsts: list[Tensor], flat: Tensor) -> None:
    """Copy consecutive pieces of ``flat`` into ``dsts`` (rounded to their dtypes as ``copy_`` rounds)."""
    pieces = flat.split([d.numel() for d in dsts])
    torch._foreach_copy_(dsts, [x if d.dim() == 1 else x.view(d.shape) for x, d in zip(pieces, dsts)])


def _chunk_step(segs, step, pdtype, params, grads, exp_avgs, exp_avg_sqs, *, exp_avg_scales, exp_avg_sq_scales,
                master_params, kahan_comps, state, param_sr, seed, lr, beta1, beta2, eps, weight_decay, maximize,
                decoupled, grad_scale, found_inf) -> list[tuple[list[Tensor], Tensor]]:  # fmt: skip
    """The oracle's step body on one chunk (tensors of one step count and param dtype), out of place: returns the
    ``(destinations, flat values)`` pairs to store with :func:`_write` (nothing is written here)."""
    del found_inf
    sizes = [b - a for _, a, b, _ in segs]
    n = sum(sizes)
    need_bits = param_sr or state == "bf16"
    int8 = state == "int8"
    if need_bits or int8:
        counts = torch.tensor(sizes, dtype=torch.int64)
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
    if int8:
        # position of each element in the block-padded layout, and its block
        pad_starts, blocks = [], 0
        for s in sizes:
            pad_starts.append(blocks * QUANT_BLOCK)
            blocks += n_scales(s)
        shift = torch.tensor([ps - s for ps, s in zip(pad_starts, starts)], dtype=torch.int64)
        pad_pos = torch.arange(n, dtype=torch.int64) + torch.repeat_interleave(shift, counts, output_size=n)
        block_of = pad_pos >> 8 if QUANT_BLOCK == 256 else pad_pos // QUANT_BLOCK

    g = _flat(_pick(grads, segs)).to(torch.float32)
    pc = _flat(_pick(master_params if master_params else params, segs)).to(torch.float32)
    if int8:
        scales_m = _flat(_pick(exp_avg_scales, segs, True))
        scales_v = _flat(_pick(exp_avg_sq_scales, segs, True))
        m = ref.dynamic_map(True).index_select(0, _flat(_pick(exp_avgs, segs)).int())
        m *= scales_m.index_select(0, block_of)
        v = ref.dynamic_map(False).index_select(0, _flat(_pick(exp_avg_sqs, segs)).int())
        v *= scales_v.index_select(0, block_of)
    else:
        m = _flat(_pick(exp_avgs, segs)).to(torch.float32)
        v = _flat(_pick(exp_avg_sqs, segs)).to(torch.float32)

    # the update, op for op the oracle's (fresh tensors are updated in place; a gathered input may be a view)
    if grad_scale is not None:
        g = g / grad_scale
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled:
            pc = pc * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * pc
    d = g - m
    d *= 1 - beta1
    m = m + d
    del d
    g2 = (1 - beta2) * g
    g2 *= g
    v = v * beta2
    v += g2
    del g2, g
    step_size, bc2_sqrt, counter = ref.step_terms(step, lr, beta1, beta2)
    denom = v.sqrt()
    denom /= bc2_sqrt
    denom += eps
    upd = m / denom
    del denom
    upd *= step_size
    pc = pc - upd
    del upd

    bits = [None] * 4
    if need_bits:
        offs = torch.tensor([a - s for (_, a, _, _), s in zip(segs, starts)], dtype=torch.int64)
        elem = torch.arange(n, dtype=torch.int64) + torch.repeat_interleave(offs, counts, output_size=n)
        tid = torch.repeat_interleave(torch.tensor([t for t, _, _, _ in segs], dtype=torch.int64), counts,
                                      output_size=n)  # fmt: skip
        which = {1: True, 2: True} if state == "bf16" else {}
        if param_sr:
            which[0] = pdtype == torch.bfloat16
        bits = _random_bits(seed, elem, tid, counter, which, any(b > _U32 for _, _, b, _ in segs))
        del elem, tid

    writes = []
    if int8:
        for x, signed, codes_l, scales_l in ((m, True, exp_avgs, exp_avg_scales),
                                             (v, False, exp_avg_sqs, exp_avg_sq_scales)):  # fmt: skip
            padded = torch.zeros(blocks * QUANT_BLOCK, dtype=torch.float32)
            padded.index_copy_(0, pad_pos, x)
            c, s = quantize_padded(padded, signed)
            del padded
            writes.append((_pick(codes_l, segs), c.index_select(0, pad_pos)))
            writes.append((_pick(scales_l, segs, True), s))
            del c
    elif state == "bf16":
        writes.append((_pick(exp_avgs, segs), _round_bf16(m, bits[1])))
        writes.append((_pick(exp_avg_sqs, segs), _round_bf16(v, bits[2])))
    else:
        writes.append((_pick(exp_avgs, segs), m))
        writes.append((_pick(exp_avg_sqs, segs), v))
    del m, v

    ps = _pick(params, segs)
    if master_params:
        writes.append((_pick(master_params, segs), pc))
        writes.append((ps, pc))
    elif kahan_comps:
        y = pc + _flat(_pick(kahan_comps, segs)).to(torch.float32)
        new_p = y.to(pdtype)
        y -= new_p.to(torch.float32)
        writes.append((_pick(kahan_comps, segs), y))
        writes.append((ps, new_p))
    elif param_sr:
        writes.append((ps, _round(pc, pdtype, bits[0])))
    else:
        writes.append((ps, pc))
    return writes
