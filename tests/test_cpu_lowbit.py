"""The multi-tensor CPU step of low-bit Adam (fused_ops/_cpu_lowbit.py) against the plain-torch oracle
(fused_ops/_ref_lowbit.py, fp32 update): the same bits in every output, NaN payloads aside.

Every tensor lives inside a larger guarded buffer (NaN, or 0xA5 for uint8 codes): a write outside a tensor shows
up as a changed guard. Chunks and Philox pieces are made small so that big tensors are cut and many chunks run.
"""

import copy

import pytest
import torch

from fused_ops import _cpu_lowbit as cpu
from fused_ops import _ref_lowbit as ref

GUARD = 3
SIZES = [0, 1, 255, 256, 257, 509, 2, 1031, 17, 4099, 3000, 7]  # 509, 1031, 4099, 17, 7 prime
KW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False, decoupled=True)
STATE_DTYPES = {"int8": torch.uint8, "bf16": torch.bfloat16, "fp32": torch.float32}
# (state, param dtype, master, kahan, param_sr)
MODES = [
    ("int8", torch.float32, False, False, False),
    ("int8", torch.bfloat16, True, False, False),
    ("int8", torch.bfloat16, False, False, True),
    ("int8", torch.bfloat16, False, True, False),
    ("int8", torch.float16, False, True, False),
    ("int8", torch.float16, False, False, True),
    ("bf16", torch.float32, False, False, False),
    ("bf16", torch.bfloat16, False, False, True),
    ("bf16", torch.bfloat16, True, False, False),
    ("bf16", torch.float16, False, True, False),
    ("fp32", torch.bfloat16, False, True, False),
    ("fp32", torch.float16, False, False, True),
    ("fp32", torch.float32, False, False, False),
]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK", 2048)  # a multiple of 256: 4099 and 3000 are cut; many chunks
    monkeypatch.setattr(cpu, "PHILOX_CHUNK", 1000)


def _guarded(x, bufs):
    guard = 0xA5 if x.dtype == torch.uint8 else float("nan")
    buf = torch.full((x.numel() + 2 * GUARD,), guard, dtype=x.dtype)
    view = buf[GUARD : GUARD + x.numel()].view(x.shape)
    view.copy_(x)
    bufs.append(buf)
    return view


def _make(sizes, pdtype, state, *, master=False, kahan=False, steps=None, special=False, seed=0):
    """Inputs of one call (all guarded) and the guard buffers. ``special``: a NaN grad, an inf grad, an all-zero
    tensor (grads and states), values over a huge dynamic range, a non-contiguous param."""
    gen = torch.Generator().manual_seed(seed)
    bufs = []
    t = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps")}
    kw = {}
    if state == "int8":
        kw["exp_avg_scales"], kw["exp_avg_sq_scales"] = [], []
    if master:
        kw["master_params"] = []
    if kahan:
        kw["kahan_comps"] = []
    for i, n in enumerate(sizes):
        p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        m, v = 0.1 * torch.randn(n, generator=gen), 0.01 * torch.rand(n, generator=gen)
        if special and n > 0:
            if i % 4 == 1:  # 10^-30 .. 10^30 in one tensor
                g *= torch.pow(10.0, torch.randint(-30, 31, (n,), generator=gen).float())
                m *= torch.pow(10.0, torch.randint(-20, 21, (n,), generator=gen).float())
            if i % 5 == 2:
                g[n // 2] = float("nan")
            if i % 5 == 3:
                g[n - 1] = float("inf") if i % 2 else -float("inf")
            if i % 6 == 4:
                g.zero_(), m.zero_(), v.zero_()
            if i % 7 == 5 and n >= 600:  # a zero block in the middle
                g[256:512] = 0.0
                m[256:512] = 0.0
                v[256:512] = 0.0
        shape = (n,)
        if special and n == 3000:
            shape = (60, 50)  # a non-contiguous param (and grad, states): the transposed view of a buffer
        pt = _guarded(p.to(pdtype).view(shape), bufs)
        if shape != (n,):
            pt = torch.full((50, 60), float("nan"), dtype=pdtype).t()
            pt.copy_(p.to(pdtype).view(shape))
        t["params"].append(pt)
        t["grads"].append(_guarded(g.to(pdtype).view(shape), bufs))
        if state == "int8":
            for x, signed, codes, scales in ((m, True, "exp_avgs", "exp_avg_scales"),
                                             (v, False, "exp_avg_sqs", "exp_avg_sq_scales")):  # fmt: skip
                c, s = ref.quantize_blockwise(x, signed)
                t[codes].append(_guarded(c.view(shape), bufs))
                kw[scales].append(_guarded(s, bufs))
        else:
            t["exp_avgs"].append(_guarded(m.to(STATE_DTYPES[state]).view(shape), bufs))
            t["exp_avg_sqs"].append(_guarded(v.to(STATE_DTYPES[state]).view(shape), bufs))
        t["state_steps"].append(torch.tensor(float(steps[i] if steps else 3)))
        if master:
            kw["master_params"].append(_guarded(p.view(shape), bufs))
            t["params"][-1].fill_(float("nan"))  # never read with masters: only written
        if kahan:
            kw["kahan_comps"].append(_guarded((1e-3 * torch.randn(n, generator=gen)).to(pdtype).view(shape), bufs))
    return t, kw, bufs


def _bits(x):
    """``x`` as integers (NaNs as one value: payloads may differ)."""
    if not x.dtype.is_floating_point:
        return x
    x = torch.where(torch.isnan(x), torch.tensor(float("nan"), dtype=x.dtype), x)
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _assert_same(a, b, what=""):
    for (k, xs), ys in zip(a.items(), b.values()):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(_bits(x), _bits(y)), f"{what} {k}[{i}] differs"


def _run_both(t, kw, bufs, n_steps=1, **args):
    t2, kw2, bufs2 = copy.deepcopy((t, kw, bufs))  # deepcopy keeps views of the guard buffers as views
    for _ in range(n_steps):
        ref.adam_lowbit_(*t.values(), **kw, **args)
        cpu.adam_lowbit_cpu_(*t2.values(), **kw2, **args)
    _assert_same(t, t2)
    _assert_same(kw, kw2)
    _assert_same({"guards": bufs}, {"guards": bufs2})  # guards and everything inside
    return t2, kw2


@pytest.mark.parametrize("state,pdtype,master,kahan,param_sr", MODES)
def test_bit_identical_to_the_oracle(state, pdtype, master, kahan, param_sr):
    t, kw, bufs = _make(SIZES, pdtype, state, master=master, kahan=kahan, steps=[3, 3, 7, 3, 1, 3, 7, 3, 3, 2, 3, 3],
                        special=True)  # fmt: skip
    _run_both(t, kw, bufs, n_steps=3, state=state, param_sr=param_sr, seed=1234, **KW)


@pytest.mark.parametrize("state", ["int8", "bf16"])
@pytest.mark.parametrize("variant", ["l2", "maximize", "no_decay", "grad_scale", "lr_tensor", "beta0", "found_unset"])
def test_variants(state, variant):
    args = dict(KW, state=state, param_sr=True, seed=7)
    if variant == "l2":
        args["decoupled"] = False
    elif variant == "maximize":
        args["maximize"] = True
    elif variant == "no_decay":
        args["weight_decay"] = 0.0
    elif variant == "grad_scale":
        args["grad_scale"] = torch.tensor(1024.0)
    elif variant == "lr_tensor":
        args["lr"] = torch.tensor(3e-3)
    elif variant == "beta0":
        args["beta1"], args["beta2"] = 0.0, 0.0
    else:
        args["found_inf"] = torch.tensor(0.0)
    t, kw, bufs = _make(SIZES, torch.bfloat16, state, special=True, seed=1)
    _run_both(t, kw, bufs, n_steps=2, **args)


def test_found_inf_changes_nothing():
    t, kw, bufs = _make(SIZES, torch.bfloat16, "int8", kahan=True, seed=2)
    before = copy.deepcopy((t, kw))
    cpu.adam_lowbit_cpu_(*t.values(), **kw, state="int8", found_inf=torch.tensor(1.0), **KW)
    _assert_same(t, before[0])
    _assert_same(kw, before[1])


def test_mixed_param_dtypes_steps_and_a_shared_step_count():
    """fp32 and bf16 params in one call, different step counts, and one step tensor shared by two params (the
    oracle counts it twice: the second param sees the second count)."""
    t, kw, bufs = _make(SIZES, torch.float32, "bf16", steps=list(range(1, 13)), seed=3)
    for i in (1, 4, 5, 9):
        t["params"][i] = t["params"][i].to(torch.bfloat16)
    t["state_steps"][7] = t["state_steps"][2]
    _run_both(t, kw, bufs, n_steps=2, state="bf16", param_sr=True, seed=5, **KW)


def test_whole_chunks_and_single_tensor(monkeypatch):
    """Default chunk sizes (one chunk), one tensor, and an empty list."""
    monkeypatch.setattr(cpu, "CHUNK", 1 << 20)
    monkeypatch.setattr(cpu, "PHILOX_CHUNK", 1 << 16)
    t, kw, bufs = _make(SIZES, torch.bfloat16, "int8", special=True, seed=4)
    _run_both(t, kw, bufs, n_steps=2, state="int8", param_sr=True, seed=9, **KW)
    t, kw, bufs = _make([70000], torch.float32, "fp32", seed=4)
    _run_both(t, kw, bufs, state="fp32", **KW)
    cpu.adam_lowbit_cpu_([], [], [], [], [], state="int8", **KW)


def test_float64_compute_runs_the_oracle():
    t, kw, bufs = _make(SIZES[:6], torch.float32, "int8", seed=6)
    t2, kw2 = copy.deepcopy((t, kw))
    ref.adam_lowbit_(*t.values(), **kw, state="int8", compute_dtype=torch.float64, **KW)
    cpu.adam_lowbit_cpu_(*t2.values(), **kw2, state="int8", compute_dtype=torch.float64, **KW)
    _assert_same(t, t2)
    _assert_same(kw, kw2)


def test_philox_matches_the_oracle():
    gen = torch.Generator().manual_seed(0)
    c = [torch.randint(0, 1 << 32, (5000,), generator=gen, dtype=torch.int64) for _ in range(4)]
    for seed in (0, 1234, (1 << 63) - 25):
        assert all(torch.equal(a, b) for a, b in zip(cpu.philox(seed, *c), ref.philox(seed, *c)))
        want3 = ref.philox(seed, c[0], c[1], c[2], torch.tensor(123456789))
        assert all(torch.equal(a, b) for a, b in zip(cpu.philox(seed, c[0], c[1], c[2], 123456789), want3))
    # element indices past 2^32 (the counter's high word)
    elem = torch.tensor([0, 1, (1 << 32) - 1, 1 << 32, (1 << 32) + 5, (1 << 40) + 3], dtype=torch.int64)
    tid = torch.tensor([0, 3, 1, 2, 7, 9], dtype=torch.int64)
    want = ref.philox(42, elem & 0xFFFFFFFF, elem >> 32, tid, torch.tensor(11))
    got = cpu._random_bits(42, elem, tid, 11, dict.fromkeys(range(4), False), True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    got = cpu._random_bits(42, elem, tid, 11, dict.fromkeys(range(4), True), True)  # the low 16 bits, int32
    assert all(a.dtype == torch.int32 and torch.equal(a.long(), b & 0xFFFF) for a, b in zip(got, want))


@pytest.mark.parametrize("signed", [True, False])
def test_code_tables_give_the_oracles_code(signed):
    """The table lookup against the oracle's search (``quantize_code``: the nearest code, a positive value never
    code 0 with the unsigned map): at every threshold and 16-bit bucket end (and a few ulps
    around them), at the map entries and their midpoints, and at random values over the whole fp32 range."""
    qmap = ref.dynamic_map(signed)
    codes_t, thresholds_t = cpu.code_tables(signed)
    thr = thresholds_t[torch.isfinite(thresholds_t)]
    ends = torch.arange(1 << 16, dtype=torch.int64) << 16
    ends = torch.cat([ends, ends | 0xFFFF])
    ends = ends[((ends >> 23) & 0xFF) != 0xFF]  # finite patterns
    ends = (ends - ((ends >> 31) << 32)).to(torch.int32).view(torch.float32)
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    rand = rand.view(torch.float32)
    rand = rand[torch.isfinite(rand)]
    y = torch.cat([thr, ends, qmap, (qmap[1:] + qmap[:-1]) / 2, rand, torch.rand(1 << 16, generator=gen) * 2 - 1,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45])])  # fmt: skip
    keys = torch.where(y.view(torch.int32) >= 0, y.view(torch.int32).long(), -(y.view(torch.int32).long() & 0x7FFFFFFF))
    y = torch.cat([cpu._ordered_to_float((keys + d).clamp(-0x7F7FFFFF, 0x7F7FFFFF)) for d in (-2, -1, 0, 1, 2)])
    bucket = (y.view(torch.int32) >> 16).long() & 0xFFFF
    got = codes_t[bucket].long() + (y >= thresholds_t[bucket]).long()
    assert torch.equal(got, ref.quantize_code(y, qmap, signed))


def test_quantize_padded_matches_the_oracle():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256 * 40, generator=gen) * torch.pow(10.0, torch.randint(-40, 38, (256 * 40,), generator=gen))
    x[:256] = 0.0
    x[300], x[600], x[1000] = float("nan"), float("inf"), -float("inf")
    x[1100:1356] = -0.0
    x[2000] = 1e-45
    for signed in (True, False):
        xs = x if signed else x.abs()
        codes, scales = cpu.quantize_padded(xs, signed)
        want_codes, want_scales = ref.quantize_blockwise(xs, signed)
        assert torch.equal(codes, want_codes)
        assert torch.equal(_bits(scales), _bits(want_scales))


def test_fused_adamw_cpu_steps_run_the_multi_tensor_path(monkeypatch):
    """FusedAdamW's CPU step (and the custom op's CPU body) call adam_lowbit_cpu_; results are the oracle's."""
    from fused_ops import _ops
    from fused_ops.optim import FusedAdamW

    calls = []
    real = cpu.adam_lowbit_cpu_
    monkeypatch.setattr(cpu, "adam_lowbit_cpu_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 5, 1000)]
    opt = FusedAdamW(params, lr=1e-2, state_dtype="int8")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls
    calls.clear()
    t, kw, _ = _make([300, 5], torch.float32, "bf16", seed=8)
    _ops.adam_lowbit_(*t.values(), [], [], [], [], "bf16", False, 0, 1e-2, None, 0.9, 0.999, 1e-8, 0.0, False, True,
                      None, None, "reference")  # fmt: skip
    assert calls
    t2, kw2, _ = _make([300, 5], torch.float32, "bf16", seed=8)
    ref.adam_lowbit_(*t2.values(), state="bf16", seed=0, **dict(KW, weight_decay=0.0))
    _assert_same(t, t2)


def test_bf16_rounding_matches_the_oracle():
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-(1 << 31), 1 << 31, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([x.view(torch.float32), torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38,
                                                        float("inf"), -float("inf"), float("nan")])])  # fmt: skip
    bits = torch.randint(0, 1 << 32, x.shape, generator=gen, dtype=torch.int64)
    bits[-9:] = 0xFFFF
    got = cpu._round_bf16(x, (bits & 0xFFFF).to(torch.int32))
    assert torch.equal(_bits(got), _bits(ref.stochastic_round(x, torch.bfloat16, bits)))
