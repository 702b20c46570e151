"""Interpret tier: the fused Adam kernel through its launcher, on CPU tensors, against float64 math.

Every tensor lives inside a larger NaN-guarded buffer, so a write outside a tensor (an off-by-one in a
mask or a chunk offset) shows up as a changed guard; elements the kernel fails to write keep their old
value, which differs from the reference by far more than the tolerance (every moment changes each step).
"""

import math

import pytest
import torch
from fused_ops.kernels import adam as adam_kernels

from fused_ops import reference
from tests.utils import DTYPES, assert_close_list, f64

pytestmark = pytest.mark.interpret

GUARD = 5
CHUNK, BLOCK = 64, 32  # small, so that odd sizes cover several blocks and chunks
SIZES = [0, 1, 2, 13, 31, 32, 33, 64, 65, 97, 130]


def _guarded(n, dtype, fill):
    """A length-n tensor inside a NaN-filled buffer with GUARD elements on each side."""
    buf = torch.full((n + 2 * GUARD,), float("nan"), dtype=dtype)
    view = buf[GUARD : GUARD + n]
    view.copy_(fill)
    return buf, view


def _make(sizes, dtype, amsgrad, step0=3.0):
    bufs, params, grads, ms, vs, mxs, steps = [], [], [], [], [], [], []
    for n in sizes:
        for lst, dt, fill in (
            (params, dtype, torch.randn(n)),
            (grads, dtype, torch.randn(n)),
            (ms, torch.float32, 0.1 * torch.randn(n)),
            (vs, torch.float32, 0.01 * torch.rand(n)),
            (mxs, torch.float32, 0.02 * torch.rand(n)),
        ):
            buf, view = _guarded(n, dt, fill.to(dt))
            bufs.append(buf)
            lst.append(view)
        steps.append(torch.tensor(step0))
    return dict(params=params, grads=grads, exp_avgs=ms, exp_avg_sqs=vs, max_exp_avg_sqs=mxs if amsgrad else [],
                state_steps=steps), bufs  # fmt: skip


def _reference(t, **kw):
    ref = {k: f64(v) if k != "state_steps" else [s.clone() for s in v] for k, v in t.items()}
    reference.adam_(**ref, **kw)
    return ref


def _check_guards(bufs):
    for b in bufs:
        assert torch.isnan(b[:GUARD]).all() and torch.isnan(b[-GUARD:]).all(), "kernel wrote outside a tensor"


def _launch(t, **kw):
    adam_kernels.adam_launch(**t, chunk_size=CHUNK, block_size=BLOCK, **kw)  # moves the step counts too


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_kernel_matches_float64(dtype, decoupled, amsgrad, maximize, weight_decay):
    t, bufs = _make(SIZES, dtype, amsgrad)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize, decoupled=decoupled)  # fmt: skip
    ref = _reference(t, **kw)
    _launch(t, **kw)
    _check_guards(bufs)
    assert_close_list(t["params"], ref["params"], dtype, "params")
    assert_close_list(t["exp_avgs"], ref["exp_avgs"], torch.float32, "exp_avgs")
    assert_close_list(t["exp_avg_sqs"], ref["exp_avg_sqs"], torch.float32, "exp_avg_sqs")
    if amsgrad:
        assert_close_list(t["max_exp_avg_sqs"], ref["max_exp_avg_sqs"], torch.float32, "max_exp_avg_sqs")
    assert [s.item() for s in t["state_steps"]] == [4.0] * len(SIZES)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_and_found_inf_clear(dtype):
    t, bufs = _make([1, 33, 97], dtype, amsgrad=False)
    scale = torch.tensor(1024.0)
    scaled_grads = [(g.float() * 1024.0).to(dtype) for g in t["grads"]]
    kw = dict(lr=1e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01, amsgrad=False, maximize=False,
              decoupled=True)  # fmt: skip
    ref = _reference({**t, "grads": scaled_grads}, grad_scale=scale.double(), **kw)
    for g, s in zip(t["grads"], scaled_grads):
        g.copy_(s)
    _launch(t, grad_scale=scale, found_inf=torch.tensor(0.0), **kw)
    _check_guards(bufs)
    assert_close_list(t["params"], ref["params"], dtype, "params")
    assert_close_list(t["exp_avg_sqs"], ref["exp_avg_sqs"], torch.float32, "exp_avg_sqs")


@pytest.mark.parametrize("dtype", DTYPES)
def test_found_inf_set_is_a_no_op(dtype):
    t, _ = _make([1, 65, 130], dtype, amsgrad=True)
    t["grads"][1][3] = float("inf")
    before = {k: [x.clone() for x in v] for k, v in t.items()}
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=True, maximize=False,
              decoupled=False)  # fmt: skip
    adam_kernels.adam_launch(**t, chunk_size=CHUNK, block_size=BLOCK, found_inf=torch.tensor(1.0), **kw)
    for k in before:
        for a, b in zip(t[k], before[k]):
            assert torch.equal(a, b), k


def test_many_tensors_one_launch(monkeypatch):
    """23 tensors of mixed sizes (0 included): one launch, every tensor right."""
    sizes = [0, 1, 2, 3, 5, 7, 11, 13, 31, 33, 63, 64, 65, 100, 127, 129, 1, 0, 257, 8, 9, 40, 71]
    t, bufs = _make(sizes, torch.float32, amsgrad=False)
    launches = []
    real = adam_kernels._adam_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(adam_kernels, "_adam_kernel", Counting())
    kw = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, amsgrad=False, maximize=False,
              decoupled=True)  # fmt: skip
    ref = _reference(t, **kw)
    _launch(t, **kw)
    assert len(launches) == 1  # step counts included: no other launch
    assert launches[0] == (sum(max(1, math.ceil(n / CHUNK)) for n in sizes),)  # empty tensors: one program
    _check_guards(bufs)
    assert_close_list(t["params"], ref["params"], torch.float32, "params")
    assert [s.item() for s in t["state_steps"]] == [4.0] * len(sizes)  # every tensor's count moved once
    # the arrival counters are back at zero, so the next launch counts again: run it
    ref2 = _reference(t, **kw)
    _launch(t, **kw)
    assert_close_list(t["params"], ref2["params"], torch.float32, "params (second step)")
    assert [s.item() for s in t["state_steps"]] == [5.0] * len(sizes)


def test_tensor_lr_and_float_step():
    """lr as a device tensor and one float step number for all tensors (no step tensors)."""
    t, _ = _make([5, 70], torch.float32, amsgrad=False)
    t["state_steps"] = []
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=True)
    ref = _reference(t, lr=2e-3, step=7.0, **kw)
    adam_kernels.adam_launch(**t, lr=torch.tensor([2e-3]), step=7.0, chunk_size=CHUNK, block_size=BLOCK, **kw)
    assert_close_list(t["params"], ref["params"], torch.float32, "params")


def test_bias_correction_is_accurate_at_step_one():
    """1 - beta2**1 cancels catastrophically in fp32; the kernel must still match float64."""
    t, _ = _make([97], torch.float32, amsgrad=False, step0=0.0)
    kw = dict(lr=1.0, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled=True)  # fmt: skip
    t["exp_avgs"][0].zero_()
    t["exp_avg_sqs"][0].zero_()
    ref = _reference(t, **kw)
    _launch(t, **kw)
    # With zero states the first update is lr * g/|g| exactly: sign(g) * lr.
    torch.testing.assert_close(t["params"][0].double(), ref["params"][0], atol=1e-6, rtol=0)


def test_launcher_rejects_mismatched_inputs():
    t, _ = _make([4, 5], torch.float32, amsgrad=False)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled=True, chunk_size=CHUNK, block_size=BLOCK, cache={})  # fmt: skip
    bad = dict(t, exp_avgs=[t["exp_avgs"][0], torch.zeros(6)])
    with pytest.raises(ValueError, match="exp_avgs\\[1\\]"):
        adam_kernels.adam_launch(**bad, **kw)
    bad = dict(t, grads=[t["grads"][0], t["grads"][1].double()])
    with pytest.raises(TypeError, match="grads\\[1\\]"):
        adam_kernels.adam_launch(**bad, **kw)
    bad = dict(t, exp_avg_sqs=[t["exp_avg_sqs"][0], torch.zeros(5, dtype=torch.bfloat16)])
    with pytest.raises(TypeError, match="exp_avg_sqs\\[1\\]"):
        adam_kernels.adam_launch(**bad, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_grads_with_low_precision_params_and_masters(dtype):
    """fp32-accumulated grads (e.g. reduced ZeRO shards) with bf16/fp16 params and fp32 masters."""
    t, bufs = _make([3, 65, 97], dtype, amsgrad=False)
    t["grads"] = [torch.randn(g.numel()) for g in t["grads"]]
    masters = [p.float() for p in t["params"]]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
              decoupled=True)  # fmt: skip
    ref = {k: f64(v) if k != "state_steps" else [s.clone() for s in v] for k, v in t.items()}
    ref_masters = f64(masters)
    reference.adam_(**ref, master_params=ref_masters, **kw)
    _launch(t, master_params=masters, **kw)
    _check_guards(bufs)
    assert_close_list(masters, ref_masters, torch.float32, "masters")
    for p, m in zip(t["params"], masters):
        assert torch.equal(p, m.to(dtype))


def test_table_alignment_and_chunk_size_checks():
    from fused_ops.kernels._multi_tensor import build_chunk_table

    base = torch.zeros(100)
    assert build_chunk_table([[base[:40], base[8:40]]], 64, cache={}).aligned  # 32-byte offset: aligned
    assert not build_chunk_table([[base[:40], base[5:40]]], 64, cache={}).aligned  # 20-byte offset
    with pytest.raises(ValueError, match="multiple of 16"):
        build_chunk_table([[base]], 40, cache={})
