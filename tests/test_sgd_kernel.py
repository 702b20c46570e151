"""Interpret tier: the fused SGD kernel through its launcher, on CPU tensors, against float64 math and torch.optim.SGD.

Every tensor lives inside a larger NaN-guarded buffer, so a write outside a tensor (an off-by-one in a mask or a
chunk offset) shows up as a changed guard; elements the kernel fails to write keep their old value, which differs
from the reference by far more than the tolerance. New momentum buffers (``first_step``) are poisoned with NaN:
the kernel must write them without reading them.
"""

import math

import pytest
import torch
from fused_ops.kernels import sgd as sgd_kernels

from fused_ops import _ref_sgd_lion as reference
from tests.utils import DTYPES, assert_close_list, f64

pytestmark = pytest.mark.interpret

GUARD = 5
CHUNK, BLOCK = 64, 32  # small, so that odd sizes cover several blocks and chunks
SIZES = [0, 1, 2, 13, 31, 32, 33, 64, 65, 97, 130]
NAN = float("nan")


def _guarded(n, dtype, fill):
    """A length-n tensor inside a NaN-filled buffer with GUARD elements on each side."""
    buf = torch.full((n + 2 * GUARD,), NAN, dtype=dtype)
    view = buf[GUARD : GUARD + n]
    view.copy_(fill)
    return buf, view


def _make(sizes, dtype, momentum=True, state_dtype=torch.float32, grad_dtype=None, poison_buffers=False):
    bufs, params, grads, moms = [], [], [], []
    for n in sizes:
        for lst, dt, fill in (
            (params, dtype, torch.randn(n)),
            (grads, grad_dtype or dtype, torch.randn(n)),
            (moms, state_dtype, torch.full((n,), NAN) if poison_buffers else 0.5 * torch.randn(n)),
        ):
            buf, view = _guarded(n, dt, fill.to(dt))
            bufs.append(buf)
            lst.append(view)
    return dict(params=params, grads=grads, momentum_buffers=moms if momentum else []), bufs


def _reference(t, master_params=(), **kw):
    ref = {k: f64(v) for k, v in t.items()}
    masters = f64(master_params)
    reference.sgd_(**ref, master_params=masters, **kw)
    return ref, masters


def _check_guards(bufs):
    for b in bufs:
        assert torch.isnan(b[:GUARD]).all() and torch.isnan(b[-GUARD:]).all(), "kernel wrote outside a tensor"


def _launch(t, **kw):
    sgd_kernels.sgd_launch(**t, chunk_size=CHUNK, block_size=BLOCK, cache={}, **kw)


def _bits(tensors):
    """Bit patterns (NaN-safe equality of before/after snapshots)."""
    return [x.detach().clone().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[x.element_size()])
            for x in tensors]  # fmt: skip


# (momentum, dampening, nesterov, first_step)
_MOMENTA = {
    "plain": (0.0, 0.0, False, False),
    "momentum-first": (0.9, 0.0, False, True),
    "momentum": (0.9, 0.0, False, False),
    "dampening": (0.8, 0.3, False, False),
    "nesterov-first": (0.9, 0.0, True, True),
    "nesterov": (0.9, 0.0, True, False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mom", list(_MOMENTA))
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.1, True)], ids=["", "wd-maximize"])
def test_sgd_kernel_matches_float64(dtype, mom, weight_decay, maximize):
    momentum, dampening, nesterov, first_step = _MOMENTA[mom]
    t, bufs = _make(SIZES, dtype, momentum=momentum != 0, poison_buffers=first_step)
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
              maximize=maximize, first_step=first_step)  # fmt: skip
    ref, _ = _reference(t, **kw)
    _launch(t, **kw)
    _check_guards(bufs)
    assert_close_list(t["params"], ref["params"], dtype, "params")
    assert_close_list(t["momentum_buffers"], ref["momentum_buffers"], torch.float32, "momentum_buffers")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_buffers_and_fp32_grads(dtype):
    """Buffers of the params' dtype are stored rounded; fp32 grads (fp32 accumulation) with 16-bit params."""
    for state_dtype, grad_dtype in ((dtype, None), (torch.float32, torch.float32), (dtype, torch.float32)):
        t, bufs = _make([1, 33, 97], dtype, state_dtype=state_dtype, grad_dtype=grad_dtype)
        kw = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False,
                  first_step=False)  # fmt: skip
        ref, _ = _reference(t, **kw)
        _launch(t, **kw)
        _check_guards(bufs)
        assert_close_list(t["params"], ref["params"], dtype, "params")
        assert_close_list(t["momentum_buffers"], ref["momentum_buffers"], state_dtype, "momentum_buffers")


@pytest.mark.parametrize("nesterov,dampening,weight_decay,maximize",
                         [(False, 0.0, 0.0, False), (True, 0.0, 0.01, False), (False, 0.2, 0.05, True)])  # fmt: skip
def test_matches_torch_optim_sgd_over_steps(nesterov, dampening, weight_decay, maximize):
    """Five fp32 steps against torch.optim.SGD (its single-tensor path), the first creating the buffers."""
    sizes = [1, 31, 65]
    params = [torch.randn(n) for n in sizes]
    theirs = [p.clone().requires_grad_() for p in params]
    hyper = dict(lr=0.03, momentum=0.9, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize)  # fmt: skip
    opt = torch.optim.SGD(theirs, foreach=False, **hyper)
    moms = [torch.full((n,), NAN) for n in sizes]
    for step in range(5):
        grads = [torch.randn(n) for n in sizes]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        _launch(dict(params=params, grads=grads, momentum_buffers=moms), first_step=step == 0, **hyper)
    for i, p in enumerate(theirs):
        torch.testing.assert_close(params[i], p.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(moms[i], opt.state[p]["momentum_buffer"], atol=1e-6, rtol=1e-6)


def test_nan_and_inf_grads_match_torch():
    """NaN and inf grads give NaN/inf exactly where torch.optim.SGD gives them (params and buffers)."""
    n = 37
    params = [torch.randn(n) for _ in range(2)]
    moms = [torch.randn(n) for _ in range(2)]
    grads = [torch.randn(n) for _ in range(2)]
    grads[0][[1, 20]] = NAN
    grads[1][[3, 36]] = math.inf
    grads[1][5] = -math.inf
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False)
    theirs = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(theirs, foreach=False, **hyper)
    for p, g, m in zip(theirs, grads, moms):
        p.grad = g.clone()
        opt.state[p] = dict(momentum_buffer=m.clone())
    opt.step()
    _launch(dict(params=params, grads=grads, momentum_buffers=moms), first_step=False, **hyper)
    for i, p in enumerate(theirs):
        for ours, ref in ((params[i], p.detach()), (moms[i], opt.state[p]["momentum_buffer"])):
            assert not ref.isfinite().all(), "the test must put non-finite values there"
            assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
            keep = ref.isfinite()
            torch.testing.assert_close(ours[keep], ref[keep], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_and_found_inf_clear(dtype):
    t, bufs = _make([1, 33, 97], dtype)
    scale = torch.tensor(1024.0)
    for g in t["grads"]:
        g.copy_((g.float() * 1024.0).to(dtype))
    kw = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False, maximize=True,
              first_step=False)  # fmt: skip
    ref, _ = _reference(t, grad_scale=scale.double(), **kw)
    grads_before = _bits(t["grads"])
    _launch(t, grad_scale=scale, found_inf=torch.tensor([0.0]), **kw)
    _check_guards(bufs)
    assert_close_list(t["params"], ref["params"], dtype, "params")
    assert_close_list(t["momentum_buffers"], ref["momentum_buffers"], torch.float32, "momentum_buffers")
    assert all(torch.equal(a, b) for a, b in zip(_bits(t["grads"]), grads_before)), "grads were modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first_step", [False, True])
def test_found_inf_set_is_a_no_op(dtype, first_step):
    t, _ = _make([1, 65, 130], dtype, poison_buffers=first_step)
    t["grads"][1][3] = math.inf
    masters = [p.float() for p in t["params"]]
    before = {k: _bits(v) for k, v in t.items()}
    masters_before = _bits(masters)
    _launch(t, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, maximize=False,
            first_step=first_step, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0),
            master_params=masters)  # fmt: skip
    for k in before:
        assert all(torch.equal(a, b) for a, b in zip(_bits(t[k]), before[k])), k
    assert all(torch.equal(a, b) for a, b in zip(_bits(masters), masters_before))
    # found_inf is read on the device: the reference agrees
    reference.sgd_(**t, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, maximize=False,
                   first_step=first_step, found_inf=torch.tensor(1.0))  # fmt: skip
    for k in before:
        assert all(torch.equal(a, b) for a, b in zip(_bits(t[k]), before[k])), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_master_params(dtype, momentum):
    """fp32 masters: the update runs on them, the 16-bit params receive the rounded result."""
    t, bufs = _make([3, 65, 97], dtype, momentum=momentum != 0)
    masters = [p.float() + 1e-3 * torch.randn(p.numel()) for p in t["params"]]  # not the params' values
    kw = dict(lr=0.05, momentum=momentum, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False,
              first_step=False)  # fmt: skip
    ref, ref_masters = _reference(t, master_params=masters, **kw)
    _launch(t, master_params=masters, **kw)
    _check_guards(bufs)
    assert_close_list(masters, ref_masters, torch.float32, "masters")
    assert_close_list(t["momentum_buffers"], ref["momentum_buffers"], torch.float32, "momentum_buffers")
    for p, m in zip(t["params"], masters):
        assert torch.equal(p, m.to(dtype))  # rounded to nearest even, as torch's .to()


@pytest.mark.parametrize("lr", [torch.tensor([0.03]), torch.tensor(0.03, dtype=torch.float64)], ids=["fp32", "fp64"])
def test_tensor_lr(lr):
    t, _ = _make([5, 70], torch.float32)
    kw = dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=False)
    ref, _ = _reference(t, lr=0.03, **kw)
    _launch(t, lr=lr, **kw)
    assert_close_list(t["params"], ref["params"], torch.float32, "params")


def test_many_tensors_one_launch(monkeypatch):
    """23 tensors of mixed sizes (0 included): one launch, one program per chunk, every tensor right."""
    sizes = [0, 1, 2, 3, 5, 7, 11, 13, 31, 33, 63, 64, 65, 100, 127, 129, 1, 0, 257, 8, 9, 40, 71]
    t, bufs = _make(sizes, torch.float32)
    launches = []
    real = sgd_kernels._sgd_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(sgd_kernels, "_sgd_kernel", Counting())
    kw = dict(lr=0.02, momentum=0.9, dampening=0.1, weight_decay=0.05, nesterov=False, maximize=False,
              first_step=False)  # fmt: skip
    ref, _ = _reference(t, **kw)
    _launch(t, **kw)
    assert launches == [(sum(math.ceil(n / CHUNK) for n in sizes),)]  # empty tensors: no program
    _check_guards(bufs)
    assert_close_list(t["params"], ref["params"], torch.float32, "params")
    assert_close_list(t["momentum_buffers"], ref["momentum_buffers"], torch.float32, "momentum_buffers")


def test_all_empty_and_no_tensors():
    t, _ = _make([0, 0], torch.float32)
    _launch(t, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
            first_step=False)  # fmt: skip
    _launch(dict(params=[], grads=[], momentum_buffers=[]), lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
            nesterov=False, maximize=False, first_step=False)  # fmt: skip


def _bad_cases(t):
    """(changed inputs, extra kwargs, exception, message pattern)."""
    p, g, m = t["params"], t["grads"], t["momentum_buffers"]
    return [
        (dict(momentum_buffers=[m[0], torch.zeros(6)]), {}, ValueError, r"momentum_buffers\[1\] has 6"),
        (dict(momentum_buffers=[m[0]]), {}, ValueError, "momentum_buffers has 1 tensors, params has 2"),
        (dict(momentum_buffers=[]), {}, ValueError, "momentum_buffers must hold"),
        (dict(grads=[g[0], g[1].double()]), {}, TypeError, r"grads\[1\]"),
        (dict(grads=[g[0], torch.zeros(5, dtype=torch.float16)]), {}, (TypeError, ValueError), r"grads\[1\]"),
        (dict(grads=[g[0], torch.zeros(10)[::2]]), {}, ValueError, r"grads\[1\] must be contiguous"),
        (dict(grads=[g[0], torch.zeros(5).to_sparse()]), {}, TypeError, r"grads\[1\] must be a dense"),
        (dict(grads=[g[0], "x"]), {}, TypeError, r"grads\[1\] must be a Tensor"),
        (dict(params=[p[0], torch.zeros(5, dtype=torch.float64)]), {}, (TypeError, ValueError), r"params\[1\]"),
        (dict(params=[p[0].int(), p[1]]), {}, TypeError, r"params\[0\] must be"),
        (dict(momentum_buffers=[m[0], torch.zeros(5, device="meta")]), {}, ValueError, r"momentum_buffers\[1\]"),
        (dict(momentum_buffers=[m[0], torch.zeros(5, dtype=torch.bfloat16)]), {}, TypeError, r"momentum_buffers\[1\]"),
        ({}, dict(master_params=[torch.zeros(4), torch.zeros(5, dtype=torch.float16)]), TypeError,
         r"master_params\[1\]"),
        ({}, dict(master_params=[torch.zeros(4)]), ValueError, "master_params has 1 tensors"),
        ({}, dict(lr=torch.tensor([0.1, 0.2])), ValueError, "lr must be a 1-element"),
        ({}, dict(lr="0.1"), TypeError, "lr must be a float"),
        ({}, dict(grad_scale=torch.tensor([2], dtype=torch.int32)), ValueError, "grad_scale must be a 1-element"),
        ({}, dict(found_inf=torch.zeros(1, device="meta")), ValueError, "found_inf must be a 1-element"),
        ({}, dict(momentum=0.0), ValueError, "momentum_buffers must be empty"),
    ]  # fmt: skip


def test_launcher_rejects_bad_inputs_before_writing():
    t, bufs = _make([4, 5], torch.float32)
    good = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False,
                first_step=False)  # fmt: skip
    before = _bits(bufs)
    cache = {}
    for change, extra, exc, pattern in _bad_cases(t):
        with pytest.raises(exc, match=pattern):
            sgd_kernels.sgd_launch(**{**t, **change}, **{**good, **extra}, chunk_size=CHUNK, block_size=BLOCK,
                                   cache=cache)  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(_bits(bufs), before)), (pattern, "changed an input")
    # the check is never cached: a good call, then the same addresses with a bad scalar, raises again
    sgd_kernels.sgd_launch(**t, **good, chunk_size=CHUNK, block_size=BLOCK, cache=cache)
    before = _bits(bufs)
    with pytest.raises(ValueError, match="lr must be"):
        sgd_kernels.sgd_launch(**t, **{**good, "lr": torch.ones(2)}, chunk_size=CHUNK, block_size=BLOCK, cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(_bits(bufs), before))


def test_prepared_step_matches_launcher_and_repoints_grads():
    """SGDStep: first step (new buffers), then steps with grads at new addresses, against the reference."""
    sizes = [1, 33, 70]
    t, bufs = _make(sizes, torch.bfloat16, poison_buffers=True)
    masters = [p.float() for p in t["params"]]
    step = sgd_kernels.SGDStep(t["params"], t["grads"], t["momentum_buffers"], masters, chunk_size=CHUNK,
                               block_size=BLOCK)  # fmt: skip
    ref = {k: f64(v) for k, v in t.items()}
    ref_masters = f64(masters)
    kw = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False)
    keep = []
    for i in range(3):
        grads = t["grads"] if i == 0 else [torch.randn(n).to(torch.bfloat16) for n in sizes]
        keep.append(grads)  # the table points at them
        step.set_grads(grads)
        step(first_step=i == 0, **kw)
        reference.sgd_(ref["params"], f64(grads), ref["momentum_buffers"], master_params=ref_masters,
                       first_step=i == 0, **kw)  # fmt: skip
    _check_guards(bufs)
    assert_close_list(masters, ref_masters, torch.float32, "masters")
    assert_close_list(t["momentum_buffers"], ref["momentum_buffers"], torch.float32, "momentum_buffers")
    for p, m in zip(t["params"], masters):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_prepared_step_rejects_bad_grads_and_momentum():
    t, bufs = _make([4, 5], torch.float32)
    step = sgd_kernels.SGDStep(t["params"], t["grads"], t["momentum_buffers"], chunk_size=CHUNK, block_size=BLOCK)
    table_before = step.table.table.clone()
    for grads, exc, pattern in (
        ([t["grads"][0], torch.zeros(6)], ValueError, r"grads\[1\] has 6 elements"),
        ([t["grads"][0], torch.zeros(5, dtype=torch.float16)], TypeError, r"grads\[1\]"),
        ([t["grads"][0], torch.zeros(10)[::2]], ValueError, r"grads\[1\] must be contiguous"),
        ([t["grads"][0]], ValueError, "1 grads for 2 params"),
    ):
        with pytest.raises(exc, match=pattern):
            step.set_grads(grads)
        assert torch.equal(step.table.table, table_before)
    before = _bits(bufs)
    kw = dict(lr=0.1, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=False)
    with pytest.raises(ValueError, match="built with momentum buffers"):
        step(momentum=0.0, **kw)
    with pytest.raises(ValueError, match="found_inf"):
        step(momentum=0.9, found_inf=torch.zeros(2), **kw)
    assert all(torch.equal(a, b) for a, b in zip(_bits(bufs), before))
    plain = sgd_kernels.SGDStep(t["params"], t["grads"], [], chunk_size=CHUNK, block_size=BLOCK)
    with pytest.raises(ValueError, match="built without momentum buffers"):
        plain(momentum=0.9, **kw)
    plain(momentum=0.0, **kw)  # plain SGD: p -= lr * g
    with pytest.raises(ValueError, match="no tensors"):
        sgd_kernels.SGDStep([], [], [])
