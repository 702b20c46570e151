"""What torch.optim takes and the last checks must not refuse (probe 67), and what they must not cost.

- a param group's own key (one the step never reads) holding anything, as torch keeps it: a tensor whose class
  defines tensor methods (quantised base weights next to LoRA params), a list of them;
- (not a false refusal: any value set on a param under a ``torch.Tensor`` attribute's name, a plain one too, which
  the step's own calls would fail on part-way;)
- numpy integers for ``align`` / ``world_size``, a tensor ``max_norm`` (as torch's clip takes them);
- the reference backend checks every state of a group for code of its own in one pass, not a call each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fused_ops
from fused_ops import FlatBuffer, FusedAdamW, FusedLion, FusedSGD, functional

from .safety import isolated

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
@pytest.mark.parametrize("make", [FusedAdamW, FusedSGD, FusedLion], ids=["adamw", "sgd", "lion"])
def test_any_value_under_a_tensor_attribute_name_is_refused_first(make, backend):
    """A value set on a param under a ``torch.Tensor`` attribute's name shadows it: a method (code) and also a plain
    value (``p.copy_ = "w"``), which the step's own calls would fail on after other groups stepped (probe 70: a
    385b116 relaxation let such tags through; group 0 was then stepped by a step that raised). Refused before
    anything changes, naming the param; torch.optim, which calls none of them, steps."""
    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))]
    opt = make([{"params": [ps[0]]}, {"params": [ps[1]]}], lr=0.1, master_weights=True, backend=backend)
    for name, value in (("copy_", "weight"), ("numel", 3), ("type", "w"), ("dim", lambda: 1)):
        setattr(ps[1], name, value)
        for p in ps:
            p.grad = torch.ones_like(p)
        before = [p.detach().clone() for p in ps]
        with pytest.raises(TypeError, match=rf"param 0 of param group 1 runs Python code .* defines {name}"):
            opt.step()
        assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before)) and not opt.state
        delattr(ps[1], name)
    opt.step()
    assert not torch.equal(ps[1].detach(), torch.ones(3, dtype=torch.bfloat16))


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
    theirs_np = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs_np):
        b.grad = a.grad.clone()
    total = fused_ops.clip_grad_norm_(ours, torch.tensor(0.5), backend=backend)
    expect = torch.nn.utils.clip_grad_norm_(theirs, torch.tensor(0.5))
    torch.testing.assert_close(total, expect, rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused_ops.clip_grad_norm_(theirs_np, np.array(0.5), backend=backend), total)
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


@isolated
def test_zero_adamw_takes_a_numpy_int_align(tmp_path):
    import torch.distributed as dist

    from fused_ops.distributed import ZeroAdamW

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        p = torch.nn.Parameter(torch.randn(10))
        opt = ZeroAdamW([p], lr=1e-2, align=np.int64(32))
        p.grad = torch.ones(10)
        opt.step()
        with pytest.raises(ValueError, match="align must be a positive int"):
            ZeroAdamW([torch.nn.Parameter(torch.randn(3))], align=np.float64(32.0))
    finally:
        dist.destroy_process_group()


def test_the_scaler_checks_its_grads_for_code_of_their_own_once(monkeypatch):
    """``DynamicLossScaler.unscale_`` and ``grad_scale_and_norm`` check their grads before reading them, and the
    functional op they call does not check them again (~1 ms per 10,000 tensors, at every step)."""
    from fused_ops.kernels import _checks

    from fused_ops import DynamicLossScaler

    calls = []
    real = _checks.python_overrides

    def counting(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(_checks, "python_overrides", counting)
    grads = [torch.randn(3) for _ in range(7)]
    scaler = DynamicLossScaler(init_scale=2.0, device="cpu", backend="reference")
    scaler.unscale_(grads)
    assert calls.count(7) == 1, calls
    calls.clear()
    scaler.update()
    scaler.grad_scale_and_norm(grads)
    assert calls.count(7) == 1, calls


def test_a_compiled_step_warns_of_nothing_of_ours():
    """``torch.compile`` of a step with ``backend="triton"`` (on a GPU, also ``"auto"``): the backend's check read a
    ``functools.cache``d function from the traced code, and Dynamo warned at every compile that tracing it "may
    lead to silent incorrectness" (probe 73). Triton's availability is read once, at import, now."""
    import warnings

    w = torch.nn.Parameter(torch.randn(8))
    opt = fused_ops.FusedAdamW([w], lr=1e-2, backend="triton")
    step = torch.compile(opt.step, backend="aot_eager")
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            w.grad = torch.randn(8)
            step()
    ours = [str(c.message) for c in caught if "lru_cache" in str(c.message) or "silent incorrectness" in str(c.message)]
    assert not ours, ours
