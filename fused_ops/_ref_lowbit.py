"""Plain-torch low-bit Adam states: the block-wise 8-bit quantisation, stochastic rounding with given random bits,
and one Adam(W) step with int8 or bf16 moments. The oracle of ``kernels/adam_lowbit.py`` (float64-capable for the
update) and the CPU path; nothing here imports triton.

8-bit states (Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
arXiv:2110.02861): a tensor is cut into blocks of ``QUANT_BLOCK`` = 256 consecutive elements (the last one may be
shorter); each block stores one fp32 scale, its absmax, and each element the uint8 index of the entry of a sorted
256-entry map nearest to ``x / absmax``. The maps are the paper's dynamic (tree) data type as bitsandbytes builds
it (``bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``, reproduced by
:func:`create_dynamic_map`, value for value): the signed map (exp_avg) and the unsigned map (exp_avg_sq, which is
never negative). Codes are the same uint8 indices into the same sorted maps as bitsandbytes' 8-bit block-wise
optimizer states (``state1``/``state2`` with ``absmax1``/``absmax2``, block size 256).

The rule every implementation follows, bit for bit (kernel, this file, :func:`quantize_blockwise`):

- normalised value ``y = x / absmax`` in fp32, correctly rounded; a block whose absmax is 0 (all zeros) divides by
  1 instead (no 0/0: every element gets the code of 0.0, which both maps contain exactly);
- code = the index ``i`` of the nearest map entry: with ``lo`` the largest index whose entry is <= y (0 when y is
  below every entry) and ``hi = min(lo + 1, 255)``, the code is ``hi`` when ``map[hi] - y < y - map[lo]`` (fp32),
  else ``lo``: the nearest entry, ties to the lower one (torchao's ``argmin(|y - map|)`` picks the same);
- except that with the unsigned map (exp_avg_sq) a positive ``y`` never gets the code of 0.0: it gets code 1, the
  smallest positive entry (3.25e-7), where the nearest rule (bitsandbytes', torchao's) stores every ``y`` under
  1.625e-7 as 0. A second moment read back as 0 under a first moment that is not 0 makes the update
  ``lr * m_hat / eps``: an element whose grad was tiny next to its block's largest, then 0, moved by hundreds of
  times ``lr`` (fp32 states move it by less than ``lr``). Rounded up, v is at least 3.25e-7 of its block's absmax
  and the update stays of the order of ``lr``; the first moment keeps the nearest rule (a small m read as 0 only
  shortens the step);
- non-finite values: a block holding a NaN or an inf gets the scale NaN and every element the code of 0.0, so the
  whole block reads back as NaN (a NaN grad poisons its 256-element block of both moments, where fp32 states
  poison one element; loss scaling's ``found_inf`` skips such steps before they write anything).
- dequantised value: ``map[code] * absmax`` in fp32.

Loads (fp32 moments into 8-bit states) quantise with :func:`quantize_blockwise_unclipped`: the same codes of
``x / scale``, but a block's scale is the smallest that clips nothing (a negative extreme ``x`` gives
``|x| / 0.99297``, the signed map's lowest entry being -0.99297), so that a dequantised state loads back as the
same codes and scales instead of a scale 0.7% smaller at every save/load cycle.

Stochastic rounding (bf16 moments, and bf16/fp16 params without master weights) uses 32 random bits per element
drawn by :func:`philox` (Philox4x32-10, the generator of ``triton.language.random``) with key ``seed`` and counter
(element index low 32 bits, element index high 32 bits, tensor index, step number): the kernel and this file draw
the same bits, so the oracle reproduces the kernel's rounding exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor

QUANT_BLOCK = 256  # elements per block-wise scale
STATES = ("int8", "bf16", "fp32")


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The sorted 256-entry dynamic quantisation map (fp32, CPU) of bitsandbytes' ``create_dynamic_map``.

    For exponent i = 0 .. max_exponent_bits - 1 the map holds the midpoints of a linear grid on [0.1, 1] with
    2^i (signed, and its negatives) or 2^(i+1) (unsigned) intervals, scaled by 10^(i - max_exponent_bits + 1):
    a leading-zero "exponent" in decades and a linear fraction whose resolution grows with the magnitude. Then
    0 and 1. Signed: 127 positive + 127 negative + 0 + 1 = 256 values in [-0.99297, 1]; unsigned: 254 positive
    + 0 + 1 in [0, 1]. The arithmetic is bitsandbytes' (fp32 ``linspace`` and midpoints, scaled in fp32), so the
    values are the same bits.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        exponent = i + non_sign_bits - max_exponent_bits
        fraction_items = int(2**exponent + 1 if signed else 2 ** (exponent + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:  # not reached for 8 bits and 7 exponent bits
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"create_dynamic_map: {len(data)} values for {total_bits} bits")
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


_MAPS: dict[tuple[bool, torch.device], tuple[Tensor, tuple]] = {}


def _mark(t: Tensor) -> tuple:
    return t.data_ptr(), t._version, t.numel(), t.dtype, t.is_contiguous(), t.untyped_storage().nbytes()


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """:func:`create_dynamic_map` (8 bits) on ``device``, cached: checked at every call (one freed, resized or
    written since is made again, not read)."""
    device = torch.device(device)
    key = (bool(signed), device)
    entry = _MAPS.get(key)
    if entry is None or _mark(entry[0]) != entry[1]:
        m = create_dynamic_map(signed).to(device)
        entry = _MAPS[key] = (m, _mark(m))
    return entry[0]


def n_scales(numel: int) -> int:
    """Number of block scales of a tensor of ``numel`` elements: ceil(numel / 256)."""
    return -(-numel // QUANT_BLOCK)


def _blocks(x: Tensor) -> Tensor:
    """``x`` flattened to fp32, zero-padded to whole blocks, as (n_blocks, 256)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = n_scales(flat.numel()) * QUANT_BLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, QUANT_BLOCK)


def nearest_code(y: Tensor, qmap: Tensor) -> Tensor:
    """Index (int64) of the entry of the sorted ``qmap`` nearest to fp32 ``y``, ties to the lower entry (see the
    module docstring); NaN gives the code of 0.0."""
    zero_code = int(torch.nonzero(qmap == 0)[0])
    lo = (torch.searchsorted(qmap, y.contiguous(), right=True) - 1).clamp(0, qmap.numel() - 1)
    hi = (lo + 1).clamp_max(qmap.numel() - 1)
    code = torch.where(qmap[hi] - y < y - qmap[lo], hi, lo)
    return torch.where(torch.isnan(y), zero_code, code)


def quantize_code(y: Tensor, qmap: Tensor, signed: bool) -> Tensor:
    """The code of normalised values ``y`` (see the module docstring): :func:`nearest_code`, except that with the
    unsigned map a positive ``y`` gets at least code 1 (the smallest positive entry)."""
    code = nearest_code(y, qmap)
    return code if signed else torch.where((y > 0) & (code == 0), 1, code)


def quantize_blockwise(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Block-wise 8-bit quantisation of ``x`` (any shape, any float dtype; read as fp32): ``(codes, scales)``,
    ``codes`` uint8 of ``x``'s shape (indices into ``dynamic_map(signed)``), ``scales`` fp32 of ceil(numel/256)
    elements (each block's absmax; NaN for a block holding a non-finite value). See the module docstring. The
    kernel's rule (the step's requantisation); loads use :func:`quantize_blockwise_unclipped`."""
    blocks = _blocks(x)
    finite = torch.isfinite(blocks)
    absmax = torch.where(finite, blocks.abs(), 0.0).amax(dim=1, keepdim=True)
    return _coded(x, blocks, finite, absmax, signed)


def quantize_blockwise_unclipped(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """:func:`quantize_blockwise` with each block's scale chosen so that no value is clipped: the quantiser of loads
    (fp32 moments of a torch.optim.AdamW or dequantised dict into 8-bit states, and their resharding).

    The scale of a block is ``max(x / map_max for x >= 0, |x| / |map_min| for x < 0)``, with ``map_max = 1`` and
    ``map_min`` the map's lowest entry: -(1 - 0.45 / 64) = -0.99297 for the signed map (the unsigned map's scale is
    the absmax, as the kernel's); in fp32, the ``|x| / |map_min|`` term is the smallest fp32 ``s`` with
    ``fl(s * |map_min|) >= |x|``. Codes are then the nearest entries of ``x / scale``, as the kernel's. The
    kernel's absmax scale would clip a block whose extreme is negative to ``map_min * absmax``: a dequantised
    block, whose extreme is ``map_min * scale``, requantised with it, comes back with a scale 0.7% smaller, and
    every save/load cycle through a dequantised dict would shrink it again. With this rule,
    ``quantize_blockwise_unclipped(dequantize_blockwise(codes, scales))`` gives the same codes, and the same
    scales bit for bit for codes it made (for the kernel's codes too, except where two fp32 scales ``s`` and
    ``s + ulp`` dequantise a block to the same fp32 values, fp32 rounding having dropped which one it was: then
    the smaller, one ulp off). Against the kernel's rule on the same values: scales up to 1 / 0.99297 = 1.0071
    times larger (blocks whose extreme is negative only), codes at most one index apart.
    """
    blocks = _blocks(x)
    finite = torch.isfinite(blocks)
    values = torch.where(finite, blocks, 0.0)
    absmax = values.abs().amax(dim=1, keepdim=True)
    if not signed:
        return _coded(x, blocks, finite, absmax, signed)
    low = -dynamic_map(signed, x.device)[0]  # |map_min|
    neg = (-values).clamp_min(0).amax(dim=1, keepdim=True)
    # the smallest fp32 s with fl(s * low) >= neg: within an ulp of fl(neg / low); the candidates from the largest
    # down, each kept while it still reaches neg (fl(s * low) grows with s)
    guess = neg / low
    zero, inf = torch.zeros_like(guess), torch.full_like(guess, float("inf"))
    below = torch.nextafter(guess, zero)
    above = torch.nextafter(guess, inf)
    scale = torch.nextafter(above, inf)
    for s in (above, guess, below, torch.nextafter(below, zero)):
        scale = torch.where(s * low >= neg, s, scale)
    scale = torch.maximum(values.clamp_min(0).amax(dim=1, keepdim=True), scale)
    scale = torch.where(torch.isinf(scale), absmax, scale)  # (|x| > 0.99297 * fp32 max: clipped, as the kernel)
    return _coded(x, blocks, finite, scale, signed)


def _coded(x: Tensor, blocks: Tensor, finite: Tensor, scale: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes, scales)`` of ``x`` (as :func:`_blocks` cut it) with the blocks' finite scales ``scale`` (n, 1): the
    nearest codes of ``x / scale`` (``x / 1`` where the scale is 0); a block with a non-finite value: NaN and the
    code of 0.0."""
    qmap = dynamic_map(signed, x.device)
    bad = ~finite.all(dim=1, keepdim=True)
    y = blocks / torch.where(scale == 0, 1.0, scale)
    codes = quantize_code(torch.where(bad, 0.0, y), qmap, signed)
    scales = torch.where(bad, float("nan"), scale).view(-1)
    codes = codes.view(-1)[: x.numel()].to(torch.uint8).view(x.shape)
    return codes, scales


def dequantize_blockwise(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """fp32 values (``codes``' shape) of block-wise codes: ``map[code] * scale`` of the code's block."""
    if codes.dtype != torch.uint8 or scales.dtype != torch.float32 or scales.numel() != n_scales(codes.numel()):
        raise ValueError(f"dequantize_blockwise: codes must be uint8 and scales fp32 with ceil(numel / 256) elements, "
                         f"got {codes.dtype} codes of {codes.numel()} elements and {scales.dtype} scales of "
                         f"{scales.numel()}")  # fmt: skip
    qmap = dynamic_map(signed, codes.device)
    n = codes.numel()
    values = qmap[codes.reshape(-1).long()]
    # Whole blocks times their scale (a broadcast, not a gather by element // 256: torch 2.13's Inductor
    # miscompiles that gather past the first block under torch.compile).
    pad = n_scales(n) * QUANT_BLOCK - n
    out = torch.nn.functional.pad(values, (0, pad)).view(-1, QUANT_BLOCK) * scales.reshape(-1, 1)
    return out.reshape(-1)[:n].view(codes.shape)


def state_bytes_per_param(state: str, *, master: bool = False, kahan: bool = False, param_bytes: int = 2) -> float:
    """Bytes of optimizer state per parameter (not counting the param and its grad): the two moments (int8: 1 + 1
    code bytes and 2 * 4 / 256 bytes of block scales; bf16: 2 + 2; fp32: 4 + 4), plus 4 for an fp32 master, plus
    ``param_bytes`` for a Kahan compensation buffer (the param's dtype)."""
    moments = {"int8": 2 + 2 * 4 / QUANT_BLOCK, "bf16": 4.0, "fp32": 8.0}[state]
    return moments + (4.0 if master else 0.0) + (float(param_bytes) if kahan else 0.0)


# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) with the constants of
# triton.language.random, on int64 tensors holding uint32 values (torch has no uint32 arithmetic).
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_U32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of the 64-bit product of uint32 ``a`` and ``b``: one int64 multiply, which wraps modulo
    2^64 (two's complement), so its bit pattern is the unsigned product's; the masks take the two halves (the
    arithmetic shift's sign bits above bit 63 - 32 are masked off)."""
    prod = b * a
    return (prod >> 32) & _U32, prod & _U32


def philox(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, n_rounds: int = 10) -> list[Tensor]:
    """Philox4x32 with key ``seed`` (the low and high 32 bits) and counters ``c0..c3`` (int64 tensors of uint32
    values, broadcast): the four uint32 outputs as int64 tensors, those of ``triton.language.random.philox``."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) & _U32 for c in (c0, c1, c2, c3)))
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return [c0, c1, c2, c3]


def step_terms(step: float, lr: float, beta1: float, beta2: float) -> tuple[float, float, int]:
    """The host's terms of step number ``step``: ``lr / bias_correction1``, ``sqrt(bias_correction2)`` and the step
    number of the random bits. In IEEE arithmetic, as the kernel computes them on the device: a step count edited in
    place to 0, a negative or a NaN (no check reads device values at every step) gives an inf or NaN update there
    and in torch, so here too, never an exception half-way through a step (ZeroDivisionError, a math domain or
    range error) after some tensors were written."""

    def neg_expm1(beta: float) -> float:  # 1 - beta^step
        if beta <= 0:
            return 1.0
        try:
            return -math.expm1(step * math.log(beta))
        except OverflowError:  # (a huge negative step count)
            return -math.inf

    bc1, bc2 = neg_expm1(beta1), neg_expm1(beta2)
    if bc1 != 0:
        step_size = lr / bc1
    else:
        step_size = math.copysign(math.inf, bc1) if lr > 0 else math.nan  # (lr / +-0.0)
    bc2_sqrt = math.sqrt(bc2) if bc2 >= 0 else math.nan
    counter = int(step) if math.isfinite(step) and step >= 0 else 0  # (the update is inf or NaN: any bits)
    return step_size, bc2_sqrt, counter


def random_bits(seed: int, tensor_index: int, step: int, numel: int, device: torch.device | str = "cpu") -> list:
    """The kernel's random bits for one tensor at one step: four int64 tensors of ``numel`` uint32 values; output 0
    rounds the param, 1 the exp_avg, 2 the exp_avg_sq (bf16 states)."""
    elem = torch.arange(numel, dtype=torch.int64, device=device)
    return philox(seed, elem & _U32, elem >> 32, torch.tensor(tensor_index, device=device),
                  torch.tensor(step, device=device))  # fmt: skip


def stochastic_round(x: Tensor, dtype: torch.dtype, bits: Tensor) -> Tensor:
    """fp32 ``x`` rounded to ``dtype`` with the given random bits (int64 tensor of uint32 values, ``x``'s shape), as
    ``kernels/_numerics.py`` does: bf16 adds the low 16 bits to the fp32 pattern and truncates (NaN -> the
    canonical NaN); fp16 rounds in fixed point on the fp16 grid of x's binade with u = (bits >> 8) * 2^-24;
    fp32 is returned as is."""
    x = x.to(torch.float32)
    if dtype == torch.float32:
        return x
    if dtype == torch.bfloat16:
        pattern = x.view(torch.int32).to(torch.int64) & _U32
        rounded = ((pattern + (bits & 0xFFFF)) & 0xFFFF0000).to(torch.int32).view(torch.float32)  # wraps like uint32
        return torch.where(torch.isnan(x), x, rounded).to(dtype)
    if dtype != torch.float16:
        raise TypeError(f"stochastic_round: bfloat16 or float16, got {dtype}")
    e = (((x.view(torch.int32) >> 23) & 0xFF) - 127).clamp_min(-14)
    ulp = torch.ldexp(torch.ones_like(x), (e - 10).to(torch.float32))
    q = x.abs() * torch.ldexp(torch.ones_like(x), (10 - e).to(torch.float32))
    low = q.floor()
    up = ((bits >> 8).to(torch.float32) * 2.0**-24) < (q - low)
    rounded = torch.copysign((low + up.to(torch.float32)) * ulp, x)
    return torch.where(torch.isfinite(x), rounded, x).to(dtype)


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def adam_lowbit_(
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
) -> None:
    """One Adam / AdamW step with low-bit moments, in plain torch: the contract of ``adam_lowbit_launch``.

    Moments: ``state="int8"``: uint8 codes (``exp_avgs``: signed map, ``exp_avg_sqs``: unsigned map) with fp32 block
    scales; ``"bf16"``: bf16, stored with stochastic rounding; ``"fp32"``: fp32. The step: moments are read as fp32,
    the update (torch.optim.adam's order of operations) runs in ``compute_dtype`` (float64 for the test oracle)
    from fp32 params or masters, the new moments are rounded to fp32 and stored (re-quantised / rounded
    stochastically); the param is stored rounded to nearest even, or stochastically with ``param_sr``, or through
    Kahan-compensated summation with ``kahan_comps`` (see the kernel). Step counts move by one (fp32), unless
    ``found_inf`` is set: then nothing changes. Reads ``lr``, ``found_inf`` and step counts on the host.
    """
    if len(params) == 0 or (found_inf is not None and _scalar(found_inf) != 0):
        return
    lr = _scalar(lr)
    inv_scale = None if grad_scale is None else _scalar(grad_scale)
    for t, p in enumerate(params):
        state_steps[t].add_(1)
        step = _scalar(state_steps[t])
        n = p.numel()
        g = grads[t].detach().reshape(-1).to(compute_dtype)
        pc = (master_params[t] if master_params else p).detach().reshape(-1).to(torch.float32).to(compute_dtype)
        if state == "int8":
            m = dequantize_blockwise(exp_avgs[t], exp_avg_scales[t], True).reshape(-1)
            v = dequantize_blockwise(exp_avg_sqs[t], exp_avg_sq_scales[t], False).reshape(-1)
        else:
            m = exp_avgs[t].reshape(-1).to(torch.float32)
            v = exp_avg_sqs[t].reshape(-1).to(torch.float32)
        m, v = m.to(compute_dtype), v.to(compute_dtype)
        if inv_scale is not None:
            g = g / inv_scale
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                pc = pc * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * pc
        m = m + (1 - beta1) * (g - m)
        v = v * beta2 + (1 - beta2) * g * g
        step_size, bc2_sqrt, counter = step_terms(step, lr, beta1, beta2)
        denom = v.sqrt() / bc2_sqrt + eps
        pc = pc - step_size * (m / denom)

        bits = random_bits(seed, t, counter, n, p.device) if (param_sr or state == "bf16") else None
        m32, v32 = m.to(torch.float32), v.to(torch.float32)
        if state == "int8":
            for codes, scales, x, signed in ((exp_avgs[t], exp_avg_scales[t], m32, True),
                                             (exp_avg_sqs[t], exp_avg_sq_scales[t], v32, False)):  # fmt: skip
                c, s = quantize_blockwise(x, signed)
                codes.copy_(c.view(codes.shape))
                scales.copy_(s.view(scales.shape))
        elif state == "bf16":
            exp_avgs[t].copy_(stochastic_round(m32, torch.bfloat16, bits[1]).view(exp_avgs[t].shape))
            exp_avg_sqs[t].copy_(stochastic_round(v32, torch.bfloat16, bits[2]).view(exp_avg_sqs[t].shape))
        else:
            exp_avgs[t].copy_(m32.view(exp_avgs[t].shape))
            exp_avg_sqs[t].copy_(v32.view(exp_avg_sqs[t].shape))

        if master_params:
            master_params[t].copy_(pc.to(torch.float32).view(p.shape))
            p.copy_(master_params[t])
        elif kahan_comps:
            comp = kahan_comps[t].detach().reshape(-1).to(torch.float32)
            # the fp32 sum the kernel forms; rounding it to the param gives the new param, the remainder the new
            # compensation (both rounded to nearest even)
            y = pc.to(torch.float32) + comp
            new_p = y.to(p.dtype)
            kahan_comps[t].copy_((y - new_p.to(torch.float32)).to(kahan_comps[t].dtype).view(p.shape))
            p.copy_(new_p.view(p.shape))
        elif param_sr:
            p.copy_(stochastic_round(pc.to(torch.float32), p.dtype, bits[0]).view(p.shape))
        else:
            p.copy_(pc.to(torch.float32).view(p.shape))
