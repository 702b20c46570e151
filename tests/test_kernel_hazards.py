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


class _Recorder:
    """Stands in for a Triton kernel: records the constexprs of each launch, runs nothing."""

    def __init__(self) -> None:
        self.launches: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


def _aligned(n: int) -> torch.Tensor:
    """A fresh fp32 tensor (torch's CPU allocator aligns storages to 64 bytes)."""
    t = torch.randn(n)
    assert t.data_ptr() % 16 == 0
    return t


@pytest.mark.parametrize("odd", ["steps", "scales", "param"])
def test_aligned_ignores_the_roles_read_without_hints(monkeypatch, odd):
    """ALIGNED (128-bit accesses) depends on the roles the kernels read with alignment hints only. Step counts
    (read as scalars) and int8 block scales (read per row) at 4-byte offsets, as a ZeRO shard's views of one
    tensor are, took the vectorised accesses of every tensor away; a param at such an offset still must."""
    from fused_ops.kernels import adam_lowbit

    sizes = [300, 1000]
    steps_flat, scales_flat = torch.zeros(8), torch.zeros(16)
    steps = [steps_flat[1:2], steps_flat[2:3]] if odd == "steps" else [torch.zeros(()) for _ in sizes]
    params = [_aligned(n) for n in sizes]
    if odd == "param":
        params[1] = torch.randn(1001)[1:]
    m_scales = [scales_flat[1:3], scales_flat[3:7]] if odd == "scales" else [torch.zeros(2), torch.zeros(4)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
    rec = _Recorder()
    monkeypatch.setattr(adam_kernels, "_adam_kernel", rec)
    monkeypatch.setattr(adam_lowbit, "_adam_lowbit_kernel", rec)
    adam_kernels.adam_launch(params, [_aligned(n) for n in sizes], [_aligned(n) for n in sizes],
                             [_aligned(n) for n in sizes], [], steps, amsgrad=False, cache={}, **kw)  # fmt: skip
    codes = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    adam_lowbit.adam_lowbit_launch(params, [_aligned(n) for n in sizes], codes, [c.clone() for c in codes], steps,
                                   exp_avg_scales=m_scales, exp_avg_sq_scales=[torch.zeros(2), torch.zeros(4)],
                                   cache={}, **kw)  # fmt: skip
    assert [launch["ALIGNED"] for launch in rec.launches] == [odd != "param", odd != "param"]
