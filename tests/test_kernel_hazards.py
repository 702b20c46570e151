"""Interpret tier: kernel behaviour the GPU has and the interpreter does not, emulated in the interpreter.

The interpreter computes with numpy, where the GPU has instructions of its own. Where the two differ in a way
that changes results, a fixture here makes the interpreter do what the GPU does, so that a kernel relying on
the interpreter's kinder behaviour fails on CPU too. (What cannot be emulated, the compiled code's ordering,
layouts and rounding, is asserted on the PTX in tests/test_compile.py.)
"""

import numpy as np
import pytest
import torch
from fused_ops.kernels import adam as adam_kernels

pytestmark = pytest.mark.interpret

NAN = float("nan")


@pytest.fixture
def gpu_max(monkeypatch):
    """tl.maximum as the GPU computes it: without ``propagate_nan`` it is max.f32, which returns the other
    operand when one is NaN (numpy's fmax); the interpreter uses numpy's maximum (NaN propagates) for both."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_maxnumf",
                        lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax))  # fmt: skip


def test_gpu_max_emulation_drops_nan(gpu_max):
    """The fixture is in force for kernels: a plain tl.maximum drops the NaN, a NaN-propagating one keeps it."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, y_ptr, plain_ptr, nan_ptr):
        x = tl.load(x_ptr + tl.arange(0, 4))
        y = tl.load(y_ptr + tl.arange(0, 4))
        tl.store(plain_ptr + tl.arange(0, 4), tl.maximum(x, y))
        tl.store(nan_ptr + tl.arange(0, 4), tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL))

    x, y = torch.tensor([NAN, 1.0, NAN, 2.0]), torch.tensor([3.0, NAN, NAN, 1.0])
    plain, nan = torch.empty(4), torch.empty(4)
    kernel[(1,)](x, y, plain, nan)
    assert torch.equal(plain.isnan(), torch.tensor([False, False, True, False]))
    assert torch.equal(nan.isnan(), torch.maximum(x, y).isnan())


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amsgrad_nan_positions_match_torch(gpu_max, decoupled, dtype):
    """amsgrad: v_max = max(v_max, v) propagates NaN as torch.maximum does. A NaN in exp_avg_sq, in
    max_exp_avg_sq or in the grad gives NaN exactly where torch.optim.Adam(W)(amsgrad=True) gives NaN, in
    the params and in every state (a NaN-dropping max would keep max_exp_avg_sq and the params finite)."""
    n = 37  # two blocks and a tail of the small launch below
    params = [torch.randn(n).to(dtype) for _ in range(2)]
    grads = [torch.randn(n).to(dtype) for _ in range(2)]
    ms = [0.1 * torch.randn(n) for _ in range(2)]
    vs = [0.01 * torch.rand(n) for _ in range(2)]
    mxs = [v + 0.01 * torch.rand(n) for v in vs]
    vs[0][[1, 20]] = NAN
    mxs[0][[3, 33]] = NAN
    grads[1][[5, 36]] = NAN
    mxs[1][0] = NAN
    steps = [torch.tensor(3.0) for _ in range(2)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=True)

    # torch.optim on fp32 copies (torch's Adam keeps bf16 states for bf16 params: compare NaN positions there).
    ref_params = [p.float().clone().requires_grad_() for p in params]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(ref_params, foreach=False, **kw)
    for p, g, m, v, mx, s in zip(ref_params, grads, ms, vs, mxs, steps):
        p.grad = g.float().clone()
        opt.state[p] = dict(step=s.clone(), exp_avg=m.clone(), exp_avg_sq=v.clone(), max_exp_avg_sq=mx.clone())
    opt.step()

    adam_kernels.adam_launch(params, grads, ms, vs, mxs, steps, lr=kw["lr"], beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.1, amsgrad=True, maximize=False, decoupled=decoupled, chunk_size=32,
                             block_size=16, cache={})  # fmt: skip

    for i, p in enumerate(ref_params):
        st = opt.state[p]
        for name, ours, theirs in (("params", params[i], p.detach()), ("exp_avgs", ms[i], st["exp_avg"]),
                                   ("exp_avg_sqs", vs[i], st["exp_avg_sq"]),
                                   ("max_exp_avg_sqs", mxs[i], st["max_exp_avg_sq"])):  # fmt: skip
            if name in ("params", "max_exp_avg_sqs"):
                assert theirs.isnan().any(), f"{name}[{i}]: the test must put NaNs there"
            assert torch.equal(ours.isnan(), theirs.isnan()), f"{name}[{i}]: NaN positions differ from torch"
            keep = ~theirs.isnan()
            tol = 2e-6 if ours.dtype == torch.float32 else 2**-7
            torch.testing.assert_close(ours.float()[keep], theirs.float()[keep], atol=tol, rtol=tol)
    assert [s.item() for s in steps] == [4.0, 4.0]
