"""Fault injection in the optimizers' step: an out-of-memory error raised by an allocation in the middle of a step
(state creation, plan building, the reference path's computation) leaves params, states and step counts
bit-identical to before (no half-made state, no new state entry), and the step retried without the fault gives
what a run that never failed gives.

Each test counts the calls a clean step makes to one allocation function from fused_ops' code, then, for every
N, makes the N-th call raise ``torch.OutOfMemoryError`` (monkeypatched, calls from elsewhere untouched).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import fused_ops

_PKG = os.path.dirname(fused_ops.__file__)

# (module, name) of the allocation functions swept
_ALLOCS = {
    "zeros": (torch, "zeros"),
    "zeros_like": (torch, "zeros_like"),
    "empty": (torch, "empty"),
    "tensor": (torch, "tensor"),
    "full": (torch, "full"),
    "cat": (torch, "cat"),
    "stack": (torch, "stack"),
    "to": (torch.Tensor, "to"),
    "clone": (torch.Tensor, "clone"),
    "float": (torch.Tensor, "float"),
    "foreach_add": (torch, "_foreach_add"),
    "foreach_mul": (torch, "_foreach_mul"),
    "foreach_div": (torch, "_foreach_div"),
    "foreach_lerp": (torch, "_foreach_lerp"),
    "foreach_sqrt": (torch, "_foreach_sqrt"),
    "index_select": (torch.Tensor, "index_select"),
    "where": (torch, "where"),
    "repeat_interleave": (torch, "repeat_interleave"),
}


class _Fault:
    """Patch ``obj.name``: count its calls made from fused_ops' code; the ``n``-th raises out of memory (n=0: none)."""

    def __init__(self, obj, name, n=0):
        self.obj, self.name, self.n, self.count = obj, name, n, 0

    def __enter__(self):
        orig = self.orig = getattr(self.obj, self.name)

        def wrapped(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(_PKG):
                self.count += 1
                if self.count == self.n:
                    raise torch.OutOfMemoryError(f"injected: {self.name} call {self.n}")
            return orig(*args, **kwargs)

        setattr(self.obj, self.name, wrapped)
        return self

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.orig)
        return False


def _params(dtype, sizes=(300, 7, 5)):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in sizes]
    for i, p in enumerate(ps):
        p.grad = (torch.randn(p.shape) * (i + 1)).to(dtype)
    return ps


_CONFIGS = {
    "fp32": lambda ps, b: fused_ops.FusedAdamW(_groups(ps), lr=0.1, backend=b),
    "amsgrad": lambda ps, b: fused_ops.FusedAdam(_groups(ps), lr=0.1, amsgrad=True, backend=b),
    "master": lambda ps, b: fused_ops.FusedAdamW(_groups(ps), lr=0.1, master_weights=True, backend=b),
    "int8": lambda ps, b: fused_ops.FusedAdamW(_groups(ps), lr=0.1, state_dtype="int8", backend=b),
    "bf16": lambda ps, b: fused_ops.FusedAdamW(_groups(ps), lr=0.1, state_dtype="bfloat16", backend=b),
    "sr": lambda ps, b: fused_ops.FusedAdamW(_groups(ps), lr=0.1, stochastic_rounding=True, backend=b),
    "kahan": lambda ps, b: fused_ops.FusedAdamW(_groups(ps), lr=0.1, kahan_summation=True, backend=b),
    "sgd": lambda ps, b: fused_ops.FusedSGD(_groups(ps), lr=0.1, momentum=0.9, backend=b),
    "sgd_master": lambda ps, b: fused_ops.FusedSGD(
        _groups(ps), lr=0.1, momentum=0.9, master_weights=True, backend=b
    ),  # fmt: skip
    "lion": lambda ps, b: fused_ops.FusedLion(_groups(ps), lr=0.01, weight_decay=0.1, backend=b),
}
_DTYPES = {"master": torch.bfloat16, "sr": torch.bfloat16, "kahan": torch.bfloat16, "sgd_master": torch.bfloat16}


def _groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}]


def _make(config, backend):
    ps = _params(_DTYPES.get(config, torch.float32))
    return ps, _CONFIGS[config](ps, backend)


def _regrad(ps, k):
    gen = torch.Generator().manual_seed(100 + k)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _snapshot(opt, ps):
    state = {}
    for i, p in enumerate(ps):
        if dict.__contains__(opt.state, p):
            st = dict.__getitem__(opt.state, p)
            state[i] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
    return [p.detach().clone() for p in ps], state


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True)), "params differ"
    assert sa.keys() == sb.keys(), f"params with state: {sorted(sa)} vs {sorted(sb)}"
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), f"state keys of param {i}: {sorted(sa[i])} vs {sorted(sb[i])}"
        for k, v in sa[i].items():
            w = sb[i][k]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and torch.equal(v, w), f"state {k!r} of param {i} differs"
            else:
                assert v == w


def _run(config, backend, steps):
    """The optimizer after ``steps`` clean steps (grads renewed before each later one)."""
    ps, opt = _make(config, backend)
    for k in range(steps):
        if k:
            _regrad(ps, k)
        opt.step()
    return ps, opt


def _sweep(config, backend, when, names, max_n=None):
    """For each allocation function in ``names`` and each N: the N-th call of the step after ``when`` clean steps
    raises; nothing changes, and the retried step equals a clean one."""
    expected = _snapshot(*reversed(_run(config, backend, when + 1)))
    faults = 0
    for name in names:
        obj, attr = _ALLOCS[name]
        ps, opt = _run(config, backend, when)
        if when:
            _regrad(ps, when)
        with _Fault(obj, attr) as counter:
            opt.step()
        calls = counter.count if max_n is None else min(counter.count, max_n)
        for n in range(1, calls + 1):
            ps, opt = _run(config, backend, when)
            if when:
                _regrad(ps, when)
            before = _snapshot(opt, ps)
            with pytest.raises(torch.OutOfMemoryError), _Fault(obj, attr, n):
                opt.step()
            faults += 1
            try:
                _same(_snapshot(opt, ps), before)
                opt.step()  # the retry, without the fault
                _same(_snapshot(opt, ps), expected)
            except AssertionError as e:
                raise AssertionError(f"{config}/{backend}, step {when + 1}, {name} call {n}: {e}") from None
    return faults


_REFERENCE_NAMES = list(_ALLOCS)


@pytest.mark.parametrize("config", list(_CONFIGS))
@pytest.mark.parametrize("when", [0, 1], ids=["first_step", "later_step"])
def test_reference_step_fault_changes_nothing(config, when):
    """backend="reference": an allocation failing anywhere in the step (state creation, the multi-tensor CPU step's
    temporaries) leaves every param, state and step count as it was; the retry equals a clean step."""
    assert _sweep(config, "reference", when, _REFERENCE_NAMES, max_n=3) > 0


@pytest.mark.parametrize("config", ["fp32", "master", "int8", "sgd", "lion"])
def test_triton_first_step_fault_leaves_no_state(config):
    """backend="triton" (interpreted): an allocation failing while the first step creates states or builds its plans
    and launch tables leaves no state behind (no half-made one that every later step refuses)."""
    assert _sweep(config, "triton", 0, ["zeros_like", "zeros", "to", "tensor"], max_n=4) > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_new_param_group_fault_leaves_no_state(backend):
    """A param group added after some steps: a fault while its states are created leaves the other params' states
    and the new params' (none) as they were; the retry equals a clean run."""

    def setup():
        ps, opt = _run("int8", backend, 1)
        extra = _params(torch.float32, sizes=(9,))
        opt.add_param_group({"params": extra, "lr": 0.02})
        _regrad(ps, 1)
        return ps + extra, opt

    ps, opt = setup()
    opt.step()
    expected = _snapshot(opt, ps)
    opt = setup()[1]
    with _Fault(torch, "zeros_like") as counter:
        opt.step()
    assert counter.count >= 2
    for n in range(1, counter.count + 1):
        ps, opt = setup()
        before = _snapshot(opt, ps)
        with pytest.raises(torch.OutOfMemoryError), _Fault(torch, "zeros_like", n):
            opt.step()
        _same(_snapshot(opt, ps), before)
        assert not dict.__contains__(opt.state, ps[-1])
        opt.step()
        _same(_snapshot(opt, ps), expected)


def test_master_weights_turned_on_fault_keeps_state():
    """An existing state that a step completes (masters turned on for a group): a fault while the masters are made
    leaves the state dict (the same object) as it was."""
    ps, opt = _run("master", "reference", 1)
    for g in opt.param_groups:
        g["master_weights"] = False
    _regrad(ps, 1)
    opt.step()
    for g in opt.param_groups:
        g["master_weights"] = True
    _regrad(ps, 2)
    dicts = [opt.state[p] for p in ps]
    before = _snapshot(opt, ps)
    with pytest.raises(torch.OutOfMemoryError), _Fault(torch.Tensor, "to", 2):
        opt.step()
    _same(_snapshot(opt, ps), before)
    assert all(opt.state[p] is d for p, d in zip(ps, dicts))
    assert all("master_param" not in d for d in dicts)
    opt.step()
    assert all("master_param" in opt.state[p] for p in ps if p.dtype == torch.bfloat16)
