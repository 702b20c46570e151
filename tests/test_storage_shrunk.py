"""A storage freed and allocated again smaller in place, at the same address (probe 58).

``x.untyped_storage().resize_(0)`` then ``resize_(k)`` with ``k`` below what the tensor needs keeps the tensor's
sizes, strides and dtype, and the allocator often hands back the block it just freed: the tensor keeps its address
too. A reused step plan that compared only identities, addresses and metadata launched on it and read or wrote past
the end of the storage (glibc aborted with "corrupted size vs. prev_size", or a segfault). Every param's, grad's and
state's storage size is now read at every step, and a prepared launch (``AdamStep``) checks it at every call: the
step is refused as the checked step refuses it, with everything else unchanged.

Each case runs in a forked child (the old code crashed), where glibc serves large blocks by mmap: a block freed and
allocated again a little smaller comes back at the same address whatever the heap's state (the child tries fresh
tensors a few times, and fails saying so if it never does).
"""

from __future__ import annotations

import pytest
import torch
from fused_ops.kernels.adam import AdamStep

from fused_ops import FusedAdamW, FusedLion, FusedSGD

from .safety import assert_unchanged, isolated, mmap_large_allocations, shrink_in_place, snapshot

pytestmark = pytest.mark.safety

N = 65536  # 256 KiB of fp32: served by mmap (mmap_large_allocations), which comes back at the same address
TRIES = 100  # (a busy machine can take more: probe 70 saw 10 fail once, a CI run 30 once)


OPTIMIZERS = {
    "adamw": lambda ps, backend: FusedAdamW(ps, lr=1e-2, backend=backend),
    "adamw_int8": lambda ps, backend: FusedAdamW(ps, lr=1e-2, state_dtype="int8", backend=backend),
    "sgd": lambda ps, backend: FusedSGD(ps, lr=1e-2, momentum=0.9, backend=backend),
    "lion": lambda ps, backend: FusedLion(ps, lr=1e-3, backend=backend),
}
STATE_KEY = {"adamw": "exp_avg", "adamw_int8": "exp_avg", "sgd": "momentum_buffer", "lion": "exp_avg"}


def _target(opt, p, what: str, name: str) -> torch.Tensor:
    if what == "param":
        return p.detach()
    if what == "grad":
        return p.grad
    st = opt.state[p]
    if name == "adamw_int8":  # (the 8-bit codes: a uint8 tensor as large as the param's element count)
        key = next(k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8)
        return st[key]
    return st[STATE_KEY[name]]


@pytest.mark.parametrize("what", ["param", "grad", "state"])
@pytest.mark.parametrize(
    "name, backend",
    [("adamw", "reference"), ("adamw", "triton"), ("adamw_int8", "reference"), ("adamw_int8", "triton"),
     ("sgd", "reference"), ("sgd", "triton"), ("lion", "reference"), ("lion", "triton")],
)  # fmt: skip
@isolated
def test_reused_plan_reads_storage_sizes(name, backend, what):
    mmap_large_allocations()
    n = N  # (the 8-bit codes, one byte an element: 64 KiB, also served by mmap)
    for _ in range(TRIES):
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n)
        opt = OPTIMIZERS[name]([p], backend)
        for _ in range(2):  # builds, then reuses, the plan (the same grad tensor: it does not move)
            p.grad.copy_(torch.randn(n))
            opt.step()
        t = _target(opt, p, what, name)
        if shrink_in_place(t):
            break
    else:
        pytest.fail(f"the allocator never returned the same address in {TRIES} tries")
    keep = [x for x in (p.detach(), p.grad, *opt.state[p].values()) if isinstance(x, torch.Tensor) and x is not t]
    before = snapshot(opt, keep)
    with pytest.raises(ValueError, match="lies outside its storage"):
        opt.step()
    assert_unchanged(before, snapshot(opt, keep))


@isolated
def test_prepared_launch_reads_storage_sizes():
    mmap_large_allocations()
    for _ in range(TRIES):
        params, grads = [torch.randn(N)], [torch.randn(N)]
        m, v, steps = [torch.zeros(N)], [torch.zeros(N)], [torch.zeros(())]
        launch = AdamStep(params, grads, m, v, [], steps, amsgrad=False)
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
        launch(**kw)
        if shrink_in_place(m[0]):
            break
    else:
        pytest.fail(f"the allocator never returned the same address in {TRIES} tries")
    before = snapshot([params, grads, v, steps])
    with pytest.raises(ValueError, match="storage freed or shrunk in place"):
        launch(**kw)
    assert_unchanged(before, snapshot([params, grads, v, steps]))
