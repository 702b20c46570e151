"""Interpret tier: the fused Lion kernel through its launcher, on CPU tensors, against float64 math and a plain-torch
Lion written as lucidrains/lion-pytorch writes it (torch has no Lion).

Every tensor lives inside a larger NaN-guarded buffer, so a write outside a tensor shows up as a changed guard;
elements the kernel fails to write keep their old value, which differs from the reference by far more than the
tolerance (every param moves by +-lr, every exp_avg changes).
"""

import math

import pytest
import torch
from fused_ops.kernels import lion as lion_kernels

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


def _make(sizes, dtype, state_dtype=torch.float32, grad_dtype=None):
    bufs, params, grads, ms = [], [], [], []
    for n in sizes:
        for lst, dt, fill in (
            (params, dtype, torch.randn(n)),
            (grads, grad_dtype or dtype, torch.randn(n)),
            (ms, state_dtype, 0.5 * torch.randn(n)),
        ):
            buf, view = _guarded(n, dt, fill.to(dt))
            bufs.append(buf)
            lst.append(view)
    return dict(params=params, grads=grads, exp_avgs=ms), bufs


def _reference(t, master_params=(), **kw):
    ref = {k: f64(v) for k, v in t.items()}
    masters = f64(master_params)
    reference.lion_(**ref, master_params=masters, **kw)
    return ref, masters


def _check_guards(bufs):
    for b in bufs:
        assert torch.isnan(b[:GUARD]).all() and torch.isnan(b[-GUARD:]).all(), "kernel wrote outside a tensor"


def _launch(t, **kw):
    lion_kernels.lion_launch(**t, chunk_size=CHUNK, block_size=BLOCK, cache={}, **kw)


def _bits(tensors):
    return [x.detach().clone().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[x.element_size()])
            for x in tensors]  # fmt: skip


def _lucidrains_step(p, grad, exp_avg, lr, wd, beta1, beta2):
    """lion-pytorch's update_fn, as published (in place, one tensor)."""
    p.mul_(1.0 - lr * wd)
    update = exp_avg.clone().mul_(beta1).add(grad, alpha=1.0 - beta1).sign_()
    p.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
def test_lion_kernel_matches_float64(dtype, weight_decay, maximize):
    t, bufs = _make(SIZES, dtype)
    kw = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=weight_decay, maximize=maximize)
    ref, _ = _reference(t, **kw)
    _launch(t, **kw)
    _check_guards(bufs)
    assert_close_list(t["params"], ref["params"], dtype, "params")
    assert_close_list(t["exp_avgs"], ref["exp_avgs"], torch.float32, "exp_avgs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_states_and_fp32_grads(dtype):
    """exp_avgs of the params' dtype are stored rounded; fp32 grads (fp32 accumulation) with 16-bit params."""
    for state_dtype, grad_dtype in ((dtype, None), (torch.float32, torch.float32), (dtype, torch.float32)):
        t, bufs = _make([1, 33, 97], dtype, state_dtype=state_dtype, grad_dtype=grad_dtype)
        kw = dict(lr=0.01, beta1=0.95, beta2=0.98, weight_decay=0.1, maximize=False)
        ref, _ = _reference(t, **kw)
        _launch(t, **kw)
        _check_guards(bufs)
        assert_close_list(t["params"], ref["params"], dtype, "params")
        assert_close_list(t["exp_avgs"], ref["exp_avgs"], state_dtype, "exp_avgs")


def test_matches_lucidrains_lion_over_steps():
    """Six fp32 steps from zero states against lion-pytorch's update, tensor by tensor."""
    sizes = [1, 31, 65]
    lr, wd, beta1, beta2 = 3e-3, 0.1, 0.9, 0.99
    params = [torch.randn(n) for n in sizes]
    ms = [torch.zeros(n) for n in sizes]
    theirs = [p.clone() for p in params]
    their_ms = [m.clone() for m in ms]
    for _ in range(6):
        grads = [torch.randn(n) for n in sizes]
        for p, g, m in zip(theirs, grads, their_ms):
            _lucidrains_step(p, g, m, lr, wd, beta1, beta2)
        _launch(dict(params=params, grads=grads, exp_avgs=ms), lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd,
                maximize=False)  # fmt: skip
    for i in range(len(sizes)):
        torch.testing.assert_close(params[i], theirs[i], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ms[i], their_ms[i], atol=1e-6, rtol=1e-6)


def test_sign_of_zero_nan_and_inf_grads_match_torch():
    """sign is torch.sign's: a zero interpolation gives no update (only the decay), NaN gives 0 too (torch.sign(NaN)
    is 0) while exp_avg becomes NaN; inf grads give +-lr updates and infinite exp_avgs: all exactly where the
    plain-torch Lion has them."""
    n = 37
    lr, wd, beta1, beta2 = 0.01, 0.1, 0.9, 0.99
    params = [torch.randn(n) for _ in range(2)]
    ms = [torch.randn(n) for _ in range(2)]
    grads = [torch.randn(n) for _ in range(2)]
    ms[0][[0, 7, 33]] = 0.0
    grads[0][[0, 7, 33]] = 0.0  # interpolation exactly 0
    grads[0][[1, 20]] = NAN
    grads[1][[3, 36]] = math.inf
    grads[1][5] = -math.inf
    theirs = [p.clone() for p in params]
    their_ms = [m.clone() for m in ms]
    for p, g, m in zip(theirs, grads, their_ms):
        _lucidrains_step(p, g, m, lr, wd, beta1, beta2)
    _launch(dict(params=params, grads=grads, exp_avgs=ms), lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd,
            maximize=False)  # fmt: skip
    for i in range(2):
        for ours, ref in ((params[i], theirs[i]), (ms[i], their_ms[i])):
            assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
            keep = ref.isfinite()
            torch.testing.assert_close(ours[keep], ref[keep], atol=1e-6, rtol=1e-6)
    assert not ms[0].isfinite().all() and not ms[1].isfinite().all(), "the test must put non-finite values there"
    assert params[0].isfinite().all()  # torch.sign(NaN) == 0: the NaN grad does not reach this step's params


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_and_found_inf_clear(dtype):
    t, bufs = _make([1, 33, 97], dtype)
    scale = torch.tensor(1024.0)
    for g in t["grads"]:
        g.copy_((g.float() * 1024.0).to(dtype))
    kw = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.01, maximize=True)
    ref, _ = _reference(t, grad_scale=scale.double(), **kw)
    grads_before = _bits(t["grads"])
    _launch(t, grad_scale=scale, found_inf=torch.tensor([0.0]), **kw)
    _check_guards(bufs)
    assert_close_list(t["params"], ref["params"], dtype, "params")
    assert_close_list(t["exp_avgs"], ref["exp_avgs"], torch.float32, "exp_avgs")
    assert all(torch.equal(a, b) for a, b in zip(_bits(t["grads"]), grads_before)), "grads were modified"


@pytest.mark.parametrize("dtype", DTYPES)
def test_found_inf_set_is_a_no_op(dtype):
    t, _ = _make([1, 65, 130], dtype)
    t["grads"][1][3] = math.inf
    masters = [p.float() for p in t["params"]]
    before = {k: _bits(v) for k, v in t.items()}
    masters_before = _bits(masters)
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
    _launch(t, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0), master_params=masters, **kw)
    for k in before:
        assert all(torch.equal(a, b) for a, b in zip(_bits(t[k]), before[k])), k
    assert all(torch.equal(a, b) for a, b in zip(_bits(masters), masters_before))
    reference.lion_(**t, found_inf=torch.tensor(1.0), **kw)
    for k in before:
        assert all(torch.equal(a, b) for a, b in zip(_bits(t[k]), before[k])), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_params(dtype):
    """fp32 masters: the update runs on them, the 16-bit params receive the rounded result."""
    t, bufs = _make([3, 65, 97], dtype)
    masters = [p.float() + 1e-3 * torch.randn(p.numel()) for p in t["params"]]  # not the params' values
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
    ref, ref_masters = _reference(t, master_params=masters, **kw)
    _launch(t, master_params=masters, **kw)
    _check_guards(bufs)
    assert_close_list(masters, ref_masters, torch.float32, "masters")
    assert_close_list(t["exp_avgs"], ref["exp_avgs"], torch.float32, "exp_avgs")
    for p, m in zip(t["params"], masters):
        assert torch.equal(p, m.to(dtype))


@pytest.mark.parametrize("lr", [torch.tensor([0.02]), torch.tensor(0.02, dtype=torch.float64)], ids=["fp32", "fp64"])
def test_tensor_lr(lr):
    t, _ = _make([5, 70], torch.float32)
    kw = dict(beta1=0.9, beta2=0.99, weight_decay=0.5, maximize=False)  # the decay reads the tensor lr too
    ref, _ = _reference(t, lr=0.02, **kw)
    _launch(t, lr=lr, **kw)
    assert_close_list(t["params"], ref["params"], torch.float32, "params")


def test_many_tensors_one_launch(monkeypatch):
    """23 tensors of mixed sizes (0 included): one launch, one program per chunk, every tensor right."""
    sizes = [0, 1, 2, 3, 5, 7, 11, 13, 31, 33, 63, 64, 65, 100, 127, 129, 1, 0, 257, 8, 9, 40, 71]
    t, bufs = _make(sizes, torch.float32)
    launches = []
    real = lion_kernels._lion_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(lion_kernels, "_lion_kernel", Counting())
    kw = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.05, maximize=False)
    ref, _ = _reference(t, **kw)
    _launch(t, **kw)
    assert launches == [(sum(math.ceil(n / CHUNK) for n in sizes),)]
    _check_guards(bufs)
    assert_close_list(t["params"], ref["params"], torch.float32, "params")
    assert_close_list(t["exp_avgs"], ref["exp_avgs"], torch.float32, "exp_avgs")


def _bad_cases(t):
    """(changed inputs, extra kwargs, exception, message pattern)."""
    p, g, m = t["params"], t["grads"], t["exp_avgs"]
    return [
        (dict(exp_avgs=[m[0], torch.zeros(6)]), {}, ValueError, r"exp_avgs\[1\] has 6"),
        (dict(exp_avgs=[m[0]]), {}, ValueError, "exp_avgs has 1 tensors, params has 2"),
        (dict(exp_avgs=[m[0], torch.zeros(5, dtype=torch.bfloat16)]), {}, TypeError, r"exp_avgs\[1\]"),
        (dict(exp_avgs=[m[0], torch.zeros(5, device="meta")]), {}, ValueError, r"exp_avgs\[1\]"),
        (dict(grads=[g[0], g[1].double()]), {}, TypeError, r"grads\[1\]"),
        (dict(grads=[g[0], torch.zeros(10)[::2]]), {}, ValueError, r"grads\[1\] must be contiguous"),
        (dict(grads=[g[0], torch.zeros(5).to_sparse()]), {}, TypeError, r"grads\[1\] must be a dense"),
        (dict(params=[p[0], torch.zeros(5, dtype=torch.float64)]), {}, (TypeError, ValueError), r"params\[1\]"),
        (dict(params=[p[0], torch.zeros(10)[::2]]), {}, ValueError, r"params\[1\] must be contiguous"),
        ({}, dict(master_params=[torch.zeros(4), torch.zeros(5, dtype=torch.float16)]), TypeError,
         r"master_params\[1\]"),
        ({}, dict(lr=torch.tensor([0.1, 0.2])), ValueError, "lr must be a 1-element"),
        ({}, dict(grad_scale=torch.tensor([2], dtype=torch.int32)), ValueError, "grad_scale must be a 1-element"),
        ({}, dict(found_inf=torch.zeros(1, device="meta")), ValueError, "found_inf must be a 1-element"),
    ]  # fmt: skip


def test_launcher_rejects_bad_inputs_before_writing():
    t, bufs = _make([4, 5], torch.float32)
    good = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
    before = _bits(bufs)
    cache = {}
    for change, extra, exc, pattern in _bad_cases(t):
        with pytest.raises(exc, match=pattern):
            lion_kernels.lion_launch(**{**t, **change}, **{**good, **extra}, chunk_size=CHUNK, block_size=BLOCK,
                                     cache=cache)  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(_bits(bufs), before)), (pattern, "changed an input")


def test_prepared_step_matches_reference_and_repoints_grads():
    """LionStep: three steps, the grads at new addresses after the first, each against the reference stepped from
    the kernel's previous (fp16, rounded) params."""
    sizes = [1, 33, 70]
    t, bufs = _make(sizes, torch.float16)
    step = lion_kernels.LionStep(t["params"], t["grads"], t["exp_avgs"], chunk_size=CHUNK, block_size=BLOCK)
    ref_ms = f64(t["exp_avgs"])
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
    keep = []
    for i in range(3):
        grads = t["grads"] if i == 0 else [torch.randn(n).to(torch.float16) for n in sizes]
        keep.append(grads)  # the table points at them
        ref_params = f64(t["params"])
        step.set_grads(grads)
        step(**kw)
        reference.lion_(ref_params, f64(grads), ref_ms, **kw)
        assert_close_list(t["params"], ref_params, torch.float16, f"params (step {i})")
    _check_guards(bufs)
    assert_close_list(t["exp_avgs"], ref_ms, torch.float32, "exp_avgs")
    with pytest.raises(ValueError, match=r"LionStep.set_grads: grads\[1\] has 6 elements"):
        step.set_grads([keep[-1][0], torch.zeros(6, dtype=torch.float16), keep[-1][2]])
    with pytest.raises(ValueError, match="grad_scale"):
        step(grad_scale=torch.ones(3), **kw)
