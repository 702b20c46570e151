"""What torch.optim takes and the last checks must not refuse (probe 67), and what they must not cost.

- a param group's own key (one the step never reads) holding anything, as torch keeps it: a tensor whose class
  defines tensor methods (quantised base weights next to LoRA params), a list of them;
- a plain value set on a param under a ``torch.Tensor`` attribute's name (a tag: ``p.is_distributed = True``), which
  runs no code, where a method set so is refused;
- numpy integers for ``align`` / ``world_size``, a tensor ``max_norm`` (as torch's clip takes them);
- the reference backend checks every state of a group for code of its own in one pass, not a call each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fused_ops
from fused_ops import FlatBuffer, FusedAdamW, FusedLion, FusedSGD, functional

BACKENDS = ["reference", "triton"]


class _Frozen(torch.nn.Parameter):  # (as quantised param classes do: methods of its own; never stepped here)
    def to(self, *args, **kwargs):
        return super().to(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [FusedAdamW, FusedSGD, FusedLion], ids=["adamw", "sgd", "lion"])
def test_a_group_key_the_step_never_reads_is_kept_as_it_is(make, backend):
    base = _Frozen(torch.zeros(4, 4), requires_grad=False)
    tag = [base, "weights", np.float32(2.0)]
    p = torch.nn.Parameter(torch.ones(5))
    twin = torch.nn.Parameter(torch.ones(5))
    kwargs = dict(lr=0.1, momentum=0.9) if make is FusedSGD else dict(lr=0.1)
    ours = make([{"params": [p], "base_weights": tag}], backend=backend, **kwargs)
    theirs = {FusedAdamW: torch.optim.AdamW, FusedSGD: torch.optim.SGD}.get(make)
    theirs = theirs([{"params": [twin], "base_weights": tag}], **kwargs) if theirs else None
    for _ in range(2):
        p.grad, twin.grad = torch.full((5,), 0.5), torch.full((5,), 0.5)
        ours.step()
        if theirs is not None:
            theirs.step()
    assert ours.param_groups[0]["base_weights"] is tag and tag[0] is base
    assert ours.state_dict()["param_groups"][0]["base_weights"] is tag  # (as torch.optim keeps it)
    assert not torch.equal(p.detach(), torch.ones(5))
    if theirs is not None:
        torch.testing.assert_close(p.detach(), twin.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plain_value_under_a_tensor_attribute_name_is_a_tag_not_code(backend):
    p = torch.nn.Parameter(torch.ones(3))
    twin = torch.nn.Parameter(torch.ones(3))
    for t in (p, twin):
        t.is_distributed, t.type, t.index = True, "weight", 3
    ours, theirs = FusedAdamW([p], lr=0.1, backend=backend), torch.optim.AdamW([twin], lr=0.1)
    for _ in range(2):
        p.grad, twin.grad = torch.full((3,), 0.25), torch.full((3,), 0.25)
        ours.step()
        theirs.step()
    torch.testing.assert_close(p.detach(), twin.detach(), rtol=0, atol=1e-6)
    before = p.detach().clone()
    called = []
    p.numel = lambda: called.append(1) or 3  # (a method set on the object: code)
    p.grad = torch.ones(3)
    if backend == "reference":  # (torch's code calls the methods: refused before anything is written)
        with pytest.raises(TypeError, match="param 0 of param group 0 runs Python code of its own .* numel"):
            ours.step()
        assert torch.equal(p.detach(), before)
    else:  # (the reused plan reads the param through torch.Tensor's own methods: the object's is never called)
        ours.step()
        assert not torch.equal(p.detach(), before)
    assert not called


def test_numpy_integers_for_align_and_world_size():
    xs = [torch.randn(3), torch.randn(5)]
    flat = functional.flatten(xs, np.int64(16), backend="reference")
    views = functional.unflatten(flat, xs, np.int64(16))
    assert all(torch.equal(v, x) for v, x in zip(views, xs))
    buf = FlatBuffer(xs, align=np.int32(8), world_size=np.int64(2), backend="reference")
    assert type(buf.align) is int and type(buf.world_size) is int and buf.numel % 16 == 0
    for bad in (np.bool_(True), 0, 2.0, "8"):
        with pytest.raises(ValueError, match="align must be a positive int"):
            functional.unflatten(flat, xs, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grad_norm_takes_a_tensor_max_norm_as_torch_does(backend):
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(7, generator=gen)) for _ in range(2)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(7, generator=gen)
        b.grad = a.grad.clone()
    total = fused_ops.clip_grad_norm_(ours, torch.tensor(0.5), backend=backend)
    expect = torch.nn.utils.clip_grad_norm_(theirs, torch.tensor(0.5))
    torch.testing.assert_close(total, expect, rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    before = [a.grad.clone() for a in ours]
    for bad in (torch.tensor([0.5, 1.0]), torch.tensor(True), torch.empty(0)):
        with pytest.raises(ValueError, match="clip_grad_norm_: max_norm must be a number or a 1-element real"):
            fused_ops.clip_grad_norm_(ours, bad, backend=backend)
    assert all(torch.equal(a.grad, b) for a, b in zip(ours, before))


def test_the_reference_step_checks_a_groups_states_in_one_pass(monkeypatch):
    """The override check of the states ran once per state tensor at every reference step (probe 67: +40-70 % host
    time with 3,000 small params); now one pass for params, one for grads, one for all states of a group."""
    from fused_ops.optim import _base

    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(40)]
    opt = FusedAdamW(params, lr=1e-3, backend="reference")
    for p in params:
        p.grad = torch.randn(4)
    opt.step()
    calls = []
    real = _base.check_no_overrides

    def counting(fn, name, tensors, *args, **kwargs):
        calls.append(len(tensors))
        return real(fn, name, tensors, *args, **kwargs)

    monkeypatch.setattr(_base, "check_no_overrides", counting)
    opt.step()
    assert sorted(calls) == [40, 40, 120], calls  # (params, grads, and step, exp_avg, exp_avg_sq of each)
