"""Interpret tier: the low-bit Adam kernel (kernels/adam_lowbit.py) through its launcher, on CPU tensors, against the
plain-torch oracle (fused_ops/_ref_lowbit.py, update in float64).

Every tensor lives inside a larger guarded buffer (NaN, or 0xA5 for uint8 codes), so a write outside a tensor
shows up as a changed guard. The oracle draws the same Philox bits as the kernel, so stochastic rounding is
compared element by element; unbiasedness is tested statistically besides. Where the oracle's float64 update and
the kernel's fp32 update may round to different neighbours (a code at a midpoint between two map entries, a
bf16 value at a stochastic threshold, a scale's last bit) the comparison allows one step in a small fraction of
elements; the quantiser itself is checked bit for bit (zero states with beta1 = beta2 = 0 make the new moments
exactly g and g * g).
"""

import functools
import math

import pytest
import torch
from fused_ops.kernels import adam_lowbit as lowbit

from fused_ops import FusedAdamW
from fused_ops import _ref_lowbit as ref
from tests.utils import assert_close_list

# numpy's warnings from the interpreter: log(0) in the bias correction of beta = 0, NaN/inf arithmetic (on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
interpret = pytest.mark.interpret  # the kernel tests; the plain-torch quantisation tests run in every tier

GUARD = 5
CHUNK, BLOCK = 512, 256  # the smallest allowed: a chunk covers two tiles, a tile one scale block
SIZES = [0, 1, 13, 255, 256, 257, 509, 513, 1031]  # 509 prime; 513 just over a chunk; 1031 three chunks
KW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False, decoupled=True)
STATE_DTYPES = {"int8": torch.uint8, "bf16": torch.bfloat16, "fp32": torch.float32}


def _guarded_on(n, dtype, fill, bufs, device="cpu"):
    """A length-n tensor of ``fill`` inside a guard-filled buffer with GUARD elements on each side."""
    guard = 0xA5 if dtype == torch.uint8 else float("nan")
    buf = torch.full((n + 2 * GUARD,), guard, dtype=dtype, device=device)
    view = buf[GUARD : GUARD + n]
    view.copy_(fill)
    bufs.append(buf)
    return view


def _check_guards(bufs):
    for b in bufs:
        for g in (b[:GUARD], b[-GUARD:]):
            assert (g == 0xA5).all() if b.dtype == torch.uint8 else torch.isnan(g).all(), "wrote outside a tensor"


def _make(sizes, dtype, state, *, grad_dtype=None, step0=3.0, zero_states=False, master=False, kahan=False,
          device="cpu"):  # fmt: skip
    """Inputs of one launch: random params, grads and moments (quantised for int8), guarded; and the guards."""
    bufs = []
    _guarded = functools.partial(_guarded_on, device=device)
    t = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps")}
    if state == "int8":
        t["exp_avg_scales"], t["exp_avg_sq_scales"] = [], []
    if master:
        t["master_params"] = []
    if kahan:
        t["kahan_comps"] = []
    for n in sizes:
        p = torch.randn(n)
        t["params"].append(_guarded(n, dtype, p.to(dtype), bufs))
        t["grads"].append(_guarded(n, grad_dtype or dtype, torch.randn(n).to(grad_dtype or dtype), bufs))
        m = torch.zeros(n) if zero_states else 0.1 * torch.randn(n)
        v = torch.zeros(n) if zero_states else 0.01 * torch.rand(n)
        if state == "int8":
            for x, signed, codes, scales in ((m, True, "exp_avgs", "exp_avg_scales"),
                                             (v, False, "exp_avg_sqs", "exp_avg_sq_scales")):  # fmt: skip
                c, s = ref.quantize_blockwise(x, signed)
                t[codes].append(_guarded(n, torch.uint8, c, bufs))
                t[scales].append(_guarded(s.numel(), torch.float32, s, bufs))
        else:
            t["exp_avgs"].append(_guarded(n, STATE_DTYPES[state], m.to(STATE_DTYPES[state]), bufs))
            t["exp_avg_sqs"].append(_guarded(n, STATE_DTYPES[state], v.to(STATE_DTYPES[state]), bufs))
        if master:
            t["master_params"].append(_guarded(n, torch.float32, p, bufs))
        if kahan:
            t["kahan_comps"].append(_guarded(n, dtype, (1e-3 * torch.randn(n)).to(dtype), bufs))
        t["state_steps"].append(torch.tensor(step0, device=device))
    return t, bufs


def _clone(t):
    return {k: [x.clone() for x in v] for k, v in t.items()}


def _oracle(t, **kw):
    r = _clone(t)
    ref.adam_lowbit_(**r, compute_dtype=torch.float64, **kw)
    return r


def _launch(t, **kw):
    lowbit.adam_lowbit_launch(**t, chunk_size=CHUNK, block_size=BLOCK, **kw)


def _assert_codes(actual, expected, name, max_frac=0.02):
    """uint8 codes equal, but for a code one step away in a few elements (a value at a midpoint between entries)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        d = (a.int() - e.int()).abs()
        if d.numel():
            assert d.max() <= 1 and (d > 0).double().mean() <= max_frac, f"{name}[{i}]: {(d > 0).sum()} codes differ"


def _assert_near_bits(actual, expected, name, rtol, max_frac=0.02):
    """Equal values (NaN where NaN), but for one rounding step (relative ``rtol``) in a few elements. Values that
    cancelled (m near 0) carry the fp32 update's error relative to the tensor's magnitude: atol = 1e-6 * max |e|."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = a.double(), e.double()
        atol = 1e-6 * float(e.nan_to_num(0.0, 0.0, 0.0).abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol + 1e-30, equal_nan=True,
                                   msg=lambda m, i=i: f"{name}[{i}] {m}")  # fmt: skip
        if a.numel():
            differ = ~((a == e) | (torch.isnan(a) & torch.isnan(e)))
            assert differ.double().mean() <= max_frac, f"{name}[{i}]: {differ.sum()} of {a.numel()} differ"


def _same_bits(a, b):
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _assert_matches(t, r, state, param_rtol, param_max_frac=1.0):
    if state == "int8":
        _assert_codes(t["exp_avgs"], r["exp_avgs"], "exp_avgs")
        _assert_codes(t["exp_avg_sqs"], r["exp_avg_sqs"], "exp_avg_sqs")
        _assert_near_bits(t["exp_avg_scales"], r["exp_avg_scales"], "exp_avg_scales", 4e-6, 1.0)
        _assert_near_bits(t["exp_avg_sq_scales"], r["exp_avg_sq_scales"], "exp_avg_sq_scales", 4e-6, 1.0)
    else:
        rtol = 2**-7 if state == "bf16" else 1e-6
        _assert_near_bits(t["exp_avgs"], r["exp_avgs"], "exp_avgs", rtol, 0.02 if state == "bf16" else 1.0)
        _assert_near_bits(t["exp_avg_sqs"], r["exp_avg_sqs"], "exp_avg_sqs", rtol, 0.02 if state == "bf16" else 1.0)
    for i, (a, e) in enumerate(zip(t["params"], r["params"])):
        a, e = a.double(), e.double()
        torch.testing.assert_close(a, e, rtol=param_rtol, atol=2e-6, equal_nan=True,
                                   msg=lambda m, i=i: f"params[{i}] {m}")  # fmt: skip
        if a.numel():
            differ = ~((a == e) | (torch.isnan(a) & torch.isnan(e)))
            assert differ.double().mean() <= param_max_frac, f"params[{i}]: {differ.sum()} of {a.numel()} differ"
    assert [s.item() for s in t["state_steps"]] == [s.item() for s in r["state_steps"]]


# --- the quantisation (plain torch) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_maps(signed):
    """256 sorted distinct entries with 0 and 1; the kernel module's construction is the oracle's, bit for bit."""
    qmap = ref.create_dynamic_map(signed)
    assert qmap.dtype == torch.float32 and qmap.numel() == 256
    assert (qmap[1:] > qmap[:-1]).all()
    assert (qmap == 0).sum() == 1 and qmap[-1] == 1.0
    assert torch.equal(lowbit._dynamic_map(signed), qmap)
    if signed:  # 127 negative, 127 positive below 1; smallest magnitude 0.325e-6 (decade 10^-6, two intervals)
        assert (qmap < 0).sum() == 127 and abs(qmap[0].item() + (1 - 0.45 / 64)) < 1e-6
    else:
        assert qmap[0] == 0 and abs(qmap[1].item() - 0.325e-6) < 1e-12


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_nearest_code_is_brute_force_argmin(signed):
    """The nearest-code rule (searchsorted + neighbour, ties low) is argmin |y - map| (first index on ties)."""
    qmap = ref.create_dynamic_map(signed)
    mids = (qmap[1:] + qmap[:-1]) / 2  # fp32 midpoints: exact ties, or the nearest fp32 value to one
    y = torch.cat([torch.rand(4000) * (2 if signed else 1) - (1 if signed else 0), qmap, mids,
                   torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                   torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-9, -1e-9])])  # fmt: skip
    brute = (y[:, None] - qmap[None, :]).abs().argmin(dim=1)
    assert torch.equal(ref.nearest_code(y, qmap), brute)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_code_keeps_positive_second_moments_positive(signed):
    """``quantize_code`` is the nearest code, except that with the unsigned map (exp_avg_sq) every positive value
    gets at least code 1 (the smallest positive entry, 3.25e-7): a v read back as 0 under an m that is not would
    make the update lr * m / eps. 0 (and -0) keep the code of 0.0; the signed map keeps the nearest rule."""
    qmap = ref.create_dynamic_map(signed)
    zero = int(torch.nonzero(qmap == 0)[0])
    y = torch.cat([torch.tensor([0.0, -0.0, 1e-45, 1e-30, 1e-9, 1.6e-7, 1.7e-7, 3.25e-7]), torch.rand(1000)])
    code = ref.quantize_code(y, qmap, signed)
    nearest = ref.nearest_code(y, qmap)
    if signed:
        assert torch.equal(code, nearest)
    else:
        assert torch.equal(code[:2], torch.zeros(2, dtype=code.dtype))
        assert (code[2:] >= 1).all() and (nearest[2:6] == 0).all()  # (the nearest rule would store them as 0)
        assert torch.equal(code[6:], nearest[6:])
        x = torch.zeros(256)
        x[0], x[1] = 1.0, 1e-9  # 1e-9 of the block's absmax
        codes, scales = ref.quantize_blockwise(x, signed)
        back = ref.dequantize_blockwise(codes, scales, signed)
        assert back[1] == qmap[1] * 1.0 and back[2] == 0 and codes[1] == zero + 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int8_tiny_second_moment_then_zero_grad_steps_like_fp32(backend):
    """An element whose grad is tiny next to its block's largest (its v under the smallest map entry), then 0: with
    v stored as 0 under an m that is not, the second step moved it by lr * m_hat / eps (here ~600 lr). v rounded
    up to the smallest entry keeps the step of the order of lr: within lr of torch's fp32 AdamW."""
    p = torch.nn.Parameter(torch.zeros(256))
    q = torch.nn.Parameter(torch.zeros(256))
    opt = FusedAdamW([p], lr=1e-2, state_dtype="int8", backend=backend)
    want = torch.optim.AdamW([q], lr=1e-2, foreach=False)
    g1 = torch.zeros(256)
    g1[0], g1[1] = 0.3, 1e-5
    g2 = torch.zeros(256)
    g2[0] = 0.3
    for g in (g1, g2):
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        want.step()
        assert (p.detach() - q.detach()).abs().max() < 1e-2
    assert p[1] < 0  # (it moved, the right way)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 1000])
def test_quantize_dequantize_error_bound(signed, n):
    """Each value comes back within half the gap between its two neighbouring entries, times its block's absmax;
    so within 0.45 / 64 (signed) or 0.45 / 128 (unsigned) of the absmax: half the widest gaps, near 1 (and the
    distance from -1 to the signed map's lowest entry, -(1 - 0.45 / 64))."""
    x = torch.randn(n) * torch.logspace(-4, 2, n) if signed else torch.rand(n) * torch.logspace(-8, 0, n)
    codes, scales = ref.quantize_blockwise(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and scales.numel() == ref.n_scales(n)
    back = ref.dequantize_blockwise(codes, scales, signed)
    absmax = scales.repeat_interleave(256)[:n]
    qmap = ref.create_dynamic_map(signed)
    gap = torch.cat([qmap[1:] - qmap[:-1], torch.zeros(1)]).max()
    assert ((back - x).abs() <= absmax * (gap / 2 + 1e-6)).all()
    assert ((back - x).abs() <= absmax * (0.45 / (64 if signed else 128) + 1e-6)).all()
    padded = torch.nn.functional.pad(x.abs(), (0, scales.numel() * 256 - n))
    assert torch.equal(scales, padded.view(-1, 256).amax(dim=1))  # each block's absmax


def test_quantize_zero_and_nonfinite_blocks():
    """An all-zero block: scale 0 and the code of 0.0, read back as zeros (no 0/0). A block with a NaN or an inf:
    scale NaN, read back as NaN; other blocks are not affected."""
    x = torch.randn(1024)
    x[256:512] = 0
    x[600] = float("nan")
    x[900] = float("-inf")
    for signed in (True, False):
        codes, scales = ref.quantize_blockwise(x.abs() if not signed else x, signed)
        zero_code = int(torch.nonzero(ref.create_dynamic_map(signed) == 0)[0])
        assert scales[1] == 0 and (codes[256:512] == zero_code).all()
        assert torch.isnan(scales[2:]).all() and (codes[512:] == zero_code).all()
        back = ref.dequantize_blockwise(codes, scales, signed)
        assert (back[256:512] == 0).all() and torch.isnan(back[512:]).all() and torch.isfinite(back[:256]).all()


def test_state_bytes_per_param():
    assert ref.state_bytes_per_param("int8") == 1 + 1 + 2 * 4 / 256
    assert ref.state_bytes_per_param("bf16") == 4 and ref.state_bytes_per_param("fp32") == 8
    assert ref.state_bytes_per_param("int8", master=True) == 6 + 1 / 32
    assert ref.state_bytes_per_param("bf16", kahan=True) == 6


def test_philox_known_answers():
    """The oracle's Philox4x32-10: known-answer vectors of Salmon et al. (Random123's kat_vectors, philox4x32 with
    10 rounds: counter c0..c3, key k0 k1 = seed's low and high 32 bits)."""
    cases = [((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, 0xFFFFFFFF_FFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0_A4093822,
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]  # fmt: skip
    for counter, seed, expected in cases:
        assert tuple(int(x) for x in ref.philox(seed, *map(torch.tensor, counter))) == expected


@interpret
def test_philox_matches_triton():
    """The oracle's bits are those ``triton.language.random.philox`` draws (in the interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, seed, n, t, step):
        i = tl.arange(0, 64).to(tl.int64) + (1 << 32) - 7  # element indices across the 2^32 boundary
        lo = i.to(tl.uint32)
        z = lo * 0
        a, b, c, d = tl.philox(seed, lo, (i >> 32).to(tl.uint32), z + t, z + step)
        j = tl.arange(0, 64)
        for k, x in enumerate((a, b, c, d)):
            tl.store(out_ptr + k * 64 + j, x.to(tl.int64) & 0xFFFFFFFF)

    out = torch.empty(4, 64, dtype=torch.int64)
    kernel[(1,)](out, 1234567, 64, 3, 17)
    elem = torch.arange(64, dtype=torch.int64) + 2**32 - 7
    expected = ref.philox(1234567, elem & 0xFFFFFFFF, elem >> 32, torch.tensor(3), torch.tensor(17))
    assert torch.equal(out, torch.stack(expected))


# --- the kernel against the oracle -------------------------------------------------------------------------------


ORACLE_CASES = [
    (s, d, sr)
    for s in ("int8", "bf16", "fp32")
    for d, sr in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True))
]
ORACLE_CASES.append(("int8", torch.float16, True))  # fp16 stochastic rounding: one state is enough


@interpret
@pytest.mark.parametrize("state,dtype,param_sr", ORACLE_CASES,
                         ids=[f"{s}-{str(d)[6:]}{'-sr' if sr else ''}" for s, d, sr in ORACLE_CASES])  # fmt: skip
def test_kernel_matches_oracle(state, dtype, param_sr):
    t, bufs = _make(SIZES, dtype, state)
    kw = dict(KW, state=state, param_sr=param_sr, seed=1234)
    r = _oracle(t, **kw)
    _launch(t, **kw)
    _check_guards(bufs)
    # fp32 params: a few ulp; nearest-rounded params: the oracle's float64 value rounded (one ulp where the fp32
    # value sits at a midpoint); stochastically rounded ones: the same bits, one ulp apart in a few elements
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    _assert_matches(t, r, state, rtol, 0.02 if dtype != torch.float32 else 1.0)
    # a second step from the new states (codes, scales, moments as the kernel left them)
    r = _oracle(t, **kw)
    _launch(t, **kw)
    _assert_matches(t, r, state, rtol, 0.02 if dtype != torch.float32 else 1.0)
    assert [s.item() for s in t["state_steps"]] == [5.0] * len(SIZES)


@interpret
@pytest.mark.parametrize("decoupled,maximize,weight_decay", [(False, False, 0.1), (False, True, 0.0),
                                                             (True, True, 0.05)])  # fmt: skip
def test_int8_adam_variants(decoupled, maximize, weight_decay):
    """Coupled weight decay (Adam), maximize, fp32 grads with bf16 params."""
    t, bufs = _make([1, 257, 513], torch.bfloat16, "int8", grad_dtype=torch.float32)
    kw = dict(KW, decoupled=decoupled, maximize=maximize, weight_decay=weight_decay, state="int8")
    r = _oracle(t, **kw)
    _launch(t, **kw)
    _check_guards(bufs)
    _assert_matches(t, r, "int8", 2**-7, 0.02)


@interpret
def test_int8_quantiser_is_exact_and_writes_every_code():
    """Zero moments read through poisoned codes (random garbage, scale 0: they read as 0), beta1 = beta2 = 0: the
    new moments are exactly g and g * g, and every code and scale must be those of the plain-torch quantiser."""
    t, bufs = _make(SIZES, torch.float32, "int8", zero_states=True)
    for codes in t["exp_avgs"] + t["exp_avg_sqs"]:
        codes.copy_(torch.randint(0, 256, codes.shape, dtype=torch.uint8))
    grads = t["grads"]
    grads[7][3] = 1e-30  # a huge dynamic range in one block: tiny values quantise to 0
    grads[7][4] = 1e15
    _launch(t, **dict(KW, beta1=0.0, beta2=0.0, weight_decay=0.0))
    _check_guards(bufs)
    for i, g in enumerate(grads):
        for codes, scales, x, signed in ((t["exp_avgs"][i], t["exp_avg_scales"][i], g, True),
                                         (t["exp_avg_sqs"][i], t["exp_avg_sq_scales"][i], g * g, False)):  # fmt: skip
            c, s = ref.quantize_blockwise(x, signed)
            assert torch.equal(codes, c) and torch.equal(scales, s), f"tensor {i} ({'m' if signed else 'v'})"


@interpret
def test_int8_zero_blocks_stay_zero():
    """All-zero grads and moments: scales stay 0 (no NaN from 0/0), codes are the code of 0.0."""
    t, bufs = _make([1, 300], torch.float32, "int8", zero_states=True)
    for g in t["grads"]:
        g.zero_()
    _launch(t, **KW)
    _check_guards(bufs)
    for signed, codes, scales in ((True, t["exp_avgs"], t["exp_avg_scales"]),
                                  (False, t["exp_avg_sqs"], t["exp_avg_sq_scales"])):  # fmt: skip
        zero_code = int(torch.nonzero(ref.create_dynamic_map(signed) == 0)[0])
        for c, s in zip(codes, scales):
            assert (s == 0).all() and (c == zero_code).all()
    assert all(torch.isfinite(p).all() for p in t["params"])


@interpret
@pytest.mark.parametrize("state", ["int8", "bf16"])
def test_nonfinite_grads(state):
    """A NaN and an inf grad: the oracle's result, NaN where it has NaN (int8: the whole 256-block of the moments,
    from the next step on also of the params; the other blocks are untouched)."""
    t, bufs = _make([1, 600], torch.float32, state)
    t["grads"][1][10] = float("nan")
    t["grads"][1][300] = float("inf")
    t["grads"][0][0] = float("-inf")
    kw = dict(KW, state=state, seed=7)
    for _ in range(2):
        r = _oracle(t, **kw)
        _launch(t, **kw)
        _check_guards(bufs)
        _assert_matches(t, r, state, 1e-6)
    if state == "int8":
        scales = t["exp_avg_scales"][1]
        assert torch.isnan(scales[:2]).all() and torch.isfinite(scales[2:]).all()
        p = t["params"][1]
        assert torch.isnan(p[:512]).all() and torch.isfinite(p[512:]).all()


@interpret
def test_many_tensors_one_launch(monkeypatch):
    """23 tensors of mixed sizes (0 included), int8 states: one launch, every tensor right, counters reset."""
    sizes = [0, 1, 2, 3, 5, 7, 11, 13, 31, 33, 63, 64, 65, 100, 127, 129, 1, 0, 257, 8, 9, 40, 513]
    t, bufs = _make(sizes, torch.float32, "int8")
    launches = []
    real = lowbit._adam_lowbit_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(lowbit, "_adam_lowbit_kernel", Counting())
    for step in (4.0, 5.0):
        r = _oracle(t, **KW)
        _launch(t, **KW)
        _check_guards(bufs)
        _assert_matches(t, r, "int8", 1e-6)
        assert [s.item() for s in t["state_steps"]] == [step] * len(sizes)
    assert launches == [(sum(max(1, math.ceil(n / CHUNK)) for n in sizes),)] * 2


@interpret
def test_master_params():
    """bf16 params with fp32 masters and int8 states: the masters follow the oracle, the params are their rounding."""
    t, bufs = _make([3, 257, 600], torch.bfloat16, "int8", master=True)
    r = _oracle(t, **KW)
    _launch(t, **KW)
    _check_guards(bufs)
    _assert_codes(t["exp_avgs"], r["exp_avgs"], "exp_avgs")
    assert_close_list(t["master_params"], r["master_params"], torch.float32, "masters")
    for p, m in zip(t["params"], t["master_params"]):
        assert torch.equal(p, m.to(torch.bfloat16))


@interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kahan_compensation(dtype):
    """Kahan-compensated bf16/fp16 params follow the oracle; over steps far below one ulp of the param, the param
    plus its compensation tracks the fp32 trajectory where rounding to nearest alone would stall."""
    t, bufs = _make([5, 300], dtype, "bf16", kahan=True)
    kw = dict(KW, state="bf16", seed=3)
    r = _oracle(t, **kw)
    _launch(t, **kw)
    _check_guards(bufs)
    _assert_near_bits(t["params"], r["params"], "params", 2**-7, 0.02)
    # the compensation resolves the fp32 update's last bits, where the float64 oracle differs: compare the sums
    for i, (p, c, rp, rc) in enumerate(zip(t["params"], t["kahan_comps"], r["params"], r["kahan_comps"])):
        total, ref_total = p.double() + c.double(), rp.double() + rc.double()
        assert ((total - ref_total).abs() <= 2**-16 * rp.double().abs() + 1e-30).all(), f"param + comp [{i}]"

    n = 512
    t, _ = _make([n], dtype, "fp32", zero_states=True, kahan=True)
    t["params"][0].fill_(1.0)
    t["kahan_comps"][0].zero_()
    t["grads"][0].fill_(1.0)
    plain = _clone({k: v for k, v in t.items() if k != "kahan_comps"})
    lr = 2.0**-12  # a quarter of bf16's ulp below 1 (2^-8); fp16's ulp below 1 is 2^-11: half of it
    kw = dict(lr=lr, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0, maximize=False, decoupled=True, state="fp32")
    for _ in range(8):  # each step moves the fp32 value by -lr (|m / sqrt(v)| = 1)
        _launch(t, **kw)
        _launch(plain, **kw)
    exact = 1.0 - 8 * lr
    tracked = t["params"][0].float() + t["kahan_comps"][0].float()
    assert (tracked - exact).abs().max() <= 1e-6
    if dtype == torch.bfloat16:
        assert (plain["params"][0] == 1.0).all()  # rounding to nearest alone never moves


@interpret
def test_grad_scale_and_found_inf():
    t, bufs = _make([1, 300], torch.bfloat16, "int8")
    scaled = [(g.float() * 1024.0).to(torch.bfloat16) for g in t["grads"]]
    for g, s in zip(t["grads"], scaled):
        g.copy_(s)
    scale = torch.tensor(1024.0)
    kw = dict(KW, state="int8", param_sr=True, grad_scale=scale, found_inf=torch.tensor(0.0))
    r = _oracle(t, **kw)
    _launch(t, **kw)
    _check_guards(bufs)
    _assert_matches(t, r, "int8", 2**-7, 0.02)

    t["grads"][1][3] = float("inf")
    before = _clone(t)
    _launch(t, **dict(kw, found_inf=torch.tensor(1.0)))
    for k in before:  # nothing written: no state, no param, no step count
        for a, b in zip(t[k], before[k]):
            assert _same_bits(a, b), k


@interpret
def test_tensor_lr():
    t, _ = _make([5, 300], torch.float32, "int8")
    r = _oracle(t, **dict(KW, lr=2e-3))
    _launch(t, **dict(KW, lr=torch.tensor([2e-3])))
    _assert_matches(t, r, "int8", 1e-6)


# --- stochastic rounding ----------------------------------------------------------------------------------------------


def _sr_setup(n, step0=0.0, copies=1):
    """bf16 params at 1.0, grads +1, zero int8 moments: the first step moves each param to y = 1 - lr exactly in
    fp32 (m / sqrt(v) = 1 after bias correction, eps = 0); y lies 0.3 of the way from 1 down to 1 - 2^-8."""
    t, _ = _make([n] * copies, torch.bfloat16, "int8", zero_states=True, step0=step0)
    for p, g in zip(t["params"], t["grads"]):
        p.fill_(1.0)
        g.fill_(1.0)
    return t


SR_KW = dict(lr=0.3 * 2**-8, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0, maximize=False, decoupled=True,
             state="int8", param_sr=True)  # fmt: skip


@interpret
def test_param_stochastic_rounding_is_unbiased():
    n = 4096
    t = _sr_setup(n)
    _launch(t, seed=11, **SR_KW)
    p = t["params"][0].double()
    assert set(p.unique().tolist()) == {1.0, 1.0 - 2**-8}
    y = 1.0 - 0.3 * 2**-8
    frac_down = 0.3
    standard_error = 2**-8 * math.sqrt(frac_down * (1 - frac_down) / n)
    assert abs(p.mean().item() - y) < 4 * standard_error


@interpret
def test_bf16_state_stochastic_rounding_is_unbiased():
    """bf16 moments: m = (1 - beta1) * g with g = 1/3: the mean of the stored bf16 values is m."""
    n = 4096
    t, _ = _make([n], torch.float32, "bf16", zero_states=True)
    t["grads"][0].fill_(1 / 3)
    _launch(t, **dict(KW, state="bf16", weight_decay=0.0, seed=5))
    m = torch.tensor(1 - 0.9, dtype=torch.float32) * torch.tensor(1 / 3, dtype=torch.float32)
    stored = t["exp_avgs"][0].double()
    lo = m.to(torch.bfloat16).double().item()
    values = stored.unique().tolist()
    assert len(values) == 2  # the two bf16 neighbours of m
    ulp = abs(values[1] - values[0])
    frac = (stored != lo).double().mean().item()
    assert abs(stored.mean().item() - m.item()) < 4 * ulp * math.sqrt(max(frac * (1 - frac), 1e-3) / n)


@interpret
def test_random_bits_differ_by_step_tensor_and_seed():
    """The same inputs give the same roundings at the same (seed, step) (reproducible), different roundings at the
    next step (the step count is part of the counter), in another tensor of the launch, and with another seed."""

    def rounded(step0, seed, copies=1):
        t = _sr_setup(1024, step0=step0, copies=copies)
        s = step0 + 1  # zero moments at step s: m_hat / sqrt(v_hat) = ratio; lr / ratio gives the same y every step
        ratio = (0.1 / (1 - 0.9**s)) / math.sqrt(0.001 / (1 - 0.999**s))
        _launch(t, seed=seed, **dict(SR_KW, lr=SR_KW["lr"] / ratio))
        return [p == 1.0 for p in t["params"]]

    a = rounded(0.0, 11)[0]
    assert torch.equal(a, rounded(0.0, 11)[0])
    assert not torch.equal(a, rounded(1.0, 11)[0])
    assert not torch.equal(a, rounded(0.0, 12)[0])
    pair = rounded(0.0, 11, copies=2)
    assert torch.equal(pair[0], a) and not torch.equal(pair[0], pair[1])


# --- the prepared step ---------------------------------------------------------------------------------------------


@interpret
def test_prepared_step_matches_launch_and_follows_moved_grads():
    t, _ = _make([1, 300, 513], torch.bfloat16, "int8")
    u = _clone(t)
    step = lowbit.AdamLowbitStep(**u, state="int8", param_sr=True, seed=9, chunk_size=CHUNK, block_size=BLOCK)
    kw = dict(KW)
    for i in range(3):
        if i == 1:  # new grad tensors (backward after zero_grad(set_to_none=True)), same values
            u["grads"] = [g.clone() for g in u["grads"]]
            step.set_grads(u["grads"])
        for g, h in zip(t["grads"], u["grads"]):
            new = torch.randn(g.shape).to(g.dtype)
            g.copy_(new)
            h.copy_(new)
        _launch(t, state="int8", param_sr=True, seed=9, **kw)
        step(**kw)
        for k in t:
            for a, b in zip(t[k], u[k]):
                assert _same_bits(a, b), (i, k)
    with pytest.raises(ValueError, match="grads\\[1\\]"):
        step.set_grads([u["grads"][0], torch.zeros(299, dtype=torch.bfloat16), u["grads"][2]])


# --- bad inputs ------------------------------------------------------------------------------------------------------


def _bad_cases(t):
    p = t["params"]
    yield dict(t, exp_avgs=[t["exp_avgs"][0], t["exp_avgs"][1].view(torch.int8)]), {}, TypeError, "exp_avgs\\[1\\]"
    yield dict(t, exp_avg_scales=[t["exp_avg_scales"][0], torch.zeros(3)]), {}, ValueError, "exp_avg_scales\\[1\\]"
    yield dict(t, exp_avg_sq_scales=t["exp_avg_sq_scales"][:1]), {}, ValueError, "exp_avg_sq_scales"
    yield dict(t, exp_avg_sq_scales=[t["exp_avg_sq_scales"][0], torch.zeros(2, dtype=torch.float64)]), {}, \
        TypeError, "exp_avg_sq_scales\\[1\\]"  # fmt: skip
    yield dict(t, exp_avg_sqs=[t["exp_avg_sqs"][0], torch.zeros(600, dtype=torch.uint8)[::2]]), {}, ValueError, \
        "contiguous"  # fmt: skip
    yield dict(t, grads=[t["grads"][0], t["grads"][1].double()]), {}, TypeError, "grads\\[1\\]"
    yield dict(t, state_steps=[t["state_steps"][0], torch.tensor([1.0, 2.0])]), {}, ValueError, "state_steps\\[1\\]"
    yield dict(t, state_steps=[t["state_steps"][0], torch.tensor(1, dtype=torch.int64)]), {}, TypeError, "state_steps"
    yield dict(t, master_params=[p[0].float(), torch.zeros(3)]), {}, ValueError, "master_params\\[1\\]"
    yield t, dict(amsgrad=True), ValueError, "amsgrad"
    yield t, dict(state="int4"), ValueError, "state"
    yield t, dict(state="bf16"), TypeError, "exp_avgs\\[0\\]"  # uint8 codes are not bf16 moments
    yield t, dict(seed=-1), ValueError, "seed"
    yield t, dict(seed=2**31), ValueError, "seed"
    yield t, dict(block_size=128), ValueError, "block_size"
    yield t, dict(chunk_size=1000), ValueError, "chunk_size"
    yield t, dict(param_sr=True, master_params=[x.float() for x in p]), ValueError, "param_sr"
    yield t, dict(grad_scale=torch.tensor([1.0, 2.0])), ValueError, "grad_scale"
    yield t, dict(found_inf=torch.tensor(0, dtype=torch.int32)), ValueError, "found_inf"


@interpret
def test_bad_inputs_raise_with_nothing_changed():
    t, _ = _make([4, 300], torch.float32, "int8")
    before = _clone(t)
    for i, (inputs, extra, exc, match) in enumerate(_bad_cases(t)):
        kw = dict(KW, chunk_size=CHUNK, block_size=BLOCK, cache={})
        kw.update(extra)
        with pytest.raises(exc, match=match):
            lowbit.adam_lowbit_launch(**inputs, **kw)
        for k in before:
            for a, b in zip(t[k], before[k]):
                assert _same_bits(a, b), (i, k)
    with pytest.raises(ValueError, match="param_sr"):  # fp32 params: nothing to round
        lowbit.adam_lowbit_launch(**t, **dict(KW, param_sr=True))
    with pytest.raises(ValueError, match="amsgrad"):
        lowbit.AdamLowbitStep(**t, amsgrad=True)


# --- GPU: compiled kernels, default sizes, CUDA graph capture (run by benchmarks/gpu_check.sh on a lent GPU) ---------


def _to_cpu(t):
    return {k: [x.cpu() for x in v] for k, v in t.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("state", ["int8", "bf16"])
def test_gpu_matches_oracle_at_default_sizes(state):
    """The compiled kernel (chunk 65536, block 1024; tensors over a chunk) against the oracle, SR params included."""
    t, bufs = _make([1, 255, 257, 4099, 70001, 140000], torch.bfloat16, state, device="cuda")
    kw = dict(KW, state=state, param_sr=True, seed=77)
    r = _oracle(_to_cpu(t), **kw)
    lowbit.adam_lowbit_launch(**t, **kw)
    torch.cuda.synchronize()
    _check_guards([b.cpu() for b in bufs])
    _assert_matches(_to_cpu(t), r, state, 2**-7, 0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("state", ["int8", "bf16"])
def test_gpu_graph_replays_draw_fresh_bits(state):
    """AdamLowbitStep captured in a CUDA graph: each replay equals an eager launch at the next step count (the bits
    move with the count on the device, no host input), with grads that moved after the warm-up."""
    t, _ = _make([3, 300, 70001], torch.bfloat16, state, device="cuda")
    kw = dict(KW, state=state, param_sr=True, seed=5)
    step = lowbit.AdamLowbitStep(**t, state=state, param_sr=True, seed=5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(**KW)  # warm-up: compiles, and prepares the staging buffer of the capture's table
    torch.cuda.current_stream().wait_stream(side)
    t["grads"] = [g.clone() for g in t["grads"]]  # moved since the warm-up
    step.set_grads(t["grads"])
    eager = _clone(t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(**KW)
    snapshots = []
    for _ in range(3):
        for g, h in zip(t["grads"], eager["grads"]):
            new = torch.randn(g.shape, device="cuda").to(g.dtype)
            g.copy_(new)
            h.copy_(new)
        graph.replay()
        lowbit.adam_lowbit_launch(**eager, **kw)
        torch.cuda.synchronize()
        for k in t:
            for a, b in zip(t[k], eager[k]):
                assert _same_bits(a, b), k
        snapshots.append([s.item() for s in t["state_steps"]])
    assert snapshots == [[5.0] * 3, [6.0] * 3, [7.0] * 3]


@pytest.mark.interpret
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_nearest_code_from_the_maps_structure_is_the_binary_searchs(signed):
    """The quantiser's nearest code comes from an arithmetic guess checked against two entries (2 gathers instead
    of the binary search's 10), a tile whose guess fails anywhere falling back to the search: the same codes, bit
    for bit, on random values, every entry, the midpoints and their neighbours, exact negative entries (the guess
    misses those: the fallback runs), 0, +-1, tiny values; and the guess alone is right for all but a few values
    in 10^4 of random ones (so the fallback stays rare)."""
    import triton
    import triton.language as tl

    @triton.jit
    def run(y_ptr, out_ptr, guess_ptr, qmap_ptr, n, SIGNED: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        if FAST:
            tl.store(out_ptr + offs, lowbit._nearest_code_fast(y, qmap_ptr, SIGNED), mask=mask)
            tl.store(guess_ptr + offs, lowbit._guess_lo(y, qmap_ptr, SIGNED), mask=mask)
        else:
            tl.store(out_ptr + offs, lowbit._nearest_code(y, qmap_ptr), mask=mask)

    qmap = lowbit._dynamic_map(signed)
    gen = torch.Generator().manual_seed(7)
    mids = (qmap[1:] + qmap[:-1]) / 2
    lo = -1.0 if signed else 0.0
    uniform = torch.rand(60_000, generator=gen) * (1 - lo) + lo
    signs = torch.sign(torch.randn(20_000, generator=gen)).clamp(min=lo)
    tiny = signs * 10 ** (-8 * torch.rand(20_000, generator=gen))
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    edges = torch.tensor([1.0, 0.0, -0.0, 1e-9, 1e-30] + ([-1.0, -1e-9] if signed else []))
    near = [
        torch.nextafter(mids, up),
        torch.nextafter(mids, down),
        torch.nextafter(qmap, up),
        torch.nextafter(qmap, down),
    ]
    y = torch.cat([uniform, tiny, qmap, mids, *near, edges]).clamp(lo, 1.0)
    n, block = y.numel(), 1024
    fast, search, guess = (torch.full((n,), -7, dtype=torch.int32) for _ in range(3))
    run[(triton.cdiv(n, block),)](y, fast, guess, qmap, n, SIGNED=signed, FAST=True, BLOCK=block)
    run[(triton.cdiv(n, block),)](y, search, guess, qmap, n, SIGNED=signed, FAST=False, BLOCK=block)
    assert torch.equal(fast, search)
    assert torch.equal(search.long(), ref.nearest_code(y, qmap))
    true_lo = (torch.searchsorted(qmap, y, right=True) - 1).clamp(min=0)
    random_part = slice(0, 60_000)
    assert (guess[random_part].long() != true_lo[random_part]).float().mean() < 1e-4
    assert (guess.long() - true_lo).abs().max() <= 1
    if signed:
        assert (guess.long() != true_lo).any()  # (exact negative entries: the fallback ran, and agreed)
