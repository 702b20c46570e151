"""Caller code that ran inside an optimizer step after its first check (probe 77), through what the step read of
``optimizer.state`` and of the param groups without making it plain first:

- a group key of the caller's whose hash equals a key the step reads (its ``__eq__`` ran at every read, down to the
  launch): the step's view of a group holds only the keys it reads, as exact strs;
- a key of ``optimizer.state`` with an ``__eq__``/``__hash__`` of its own (run at every ``state.get(p)``): refused;
- a param's state that is a dict subclass (its methods ran throughout the step): replaced by a plain copy first;
- a state value whose class defines ``__class__`` (run by ``isinstance``), a non-str state key, a ``step`` held by
  an int subclass: refused, naming the param, nothing changed.

Each case arms a flag at the step's first tensor check (``FusedOptimizer._check_params``) and asserts that the
caller's code did not run once it was armed."""

from __future__ import annotations

import pytest
import torch

import fused_ops
from fused_ops.optim import _base

BACKENDS = ["reference", "triton"]


@pytest.fixture
def armed(monkeypatch):
    """A list that holds True once a step's first tensor check began (False again when the step returns)."""
    flag = [False]
    original = _base.FusedOptimizer._check_params
    step = _base.FusedOptimizer._step_eager

    def check_params(self, *args, **kwargs):
        flag[0] = True
        return original(self, *args, **kwargs)

    def step_eager(self, *args, **kwargs):
        try:
            return step(self, *args, **kwargs)
        finally:
            flag[0] = False

    monkeypatch.setattr(_base.FusedOptimizer, "_check_params", check_params)
    monkeypatch.setattr(_base.FusedOptimizer, "_step_eager", step_eager)
    return flag


def _params():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.ones(4), torch.ones(3)
    return a, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_key_of_the_callers_is_never_compared(armed, backend):
    ran = []

    class Tag:
        def __hash__(self):
            return hash("maximize")

        def __eq__(self, other):
            ran.append(armed[0])
            return False

    a, b = _params()
    opt = fused_ops.FusedAdamW([{"params": [a]}, {"params": [b], Tag(): "the caller's own"}], lr=0.1,
                               backend=backend)  # fmt: skip
    ran.clear()
    opt.step()
    assert not any(ran), ran
    assert torch.all(a.detach() < 0) and torch.all(b.detach() < 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_key_with_an_eq_of_its_own_is_refused(armed, backend):
    ran = []

    class Key:
        def __hash__(self):
            return 7

        def __eq__(self, other):
            ran.append(armed[0])
            return False

    a, b = _params()
    opt = fused_ops.FusedAdamW([a, b], lr=0.1, backend=backend)
    opt.step()
    opt.state[Key()] = {"note": 1}
    before = a.detach().clone()
    a.grad, b.grad = torch.ones(4), torch.ones(3)
    with pytest.raises(TypeError, match="optimizer.state has a key of type .*Key, which defines __eq__, __hash__"):
        opt.step()
    assert not any(ran) and torch.equal(a.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dict_subclass_state_is_read_as_a_plain_copy(armed, backend):
    ran = []

    class Tracing(dict):
        def __getitem__(self, key):
            ran.append(armed[0])
            return super().__getitem__(key)

        def __contains__(self, key):
            ran.append(armed[0])
            return super().__contains__(key)

        def get(self, key, default=None):
            ran.append(armed[0])
            return super().get(key, default)

    a, b = _params()
    opt = fused_ops.FusedAdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    opt.step()
    twin_a, twin_b = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    twin = fused_ops.FusedAdamW([{"params": [twin_a]}, {"params": [twin_b]}], lr=0.1, backend=backend)
    twin.load_state_dict(opt.state_dict())
    opt.state[b] = Tracing(opt.state[b])
    for p in (a, b, twin_a, twin_b):
        p.grad = torch.full(p.shape, 0.5)
    opt.step()
    twin.step()
    assert not any(ran), ran
    assert type(opt.state[b]) is not Tracing
    assert torch.equal(a.detach(), twin_a.detach()) and torch.equal(b.detach(), twin_b.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_values_keys_and_steps_that_would_run_code_are_refused(armed, backend):
    ran = []

    class Lazy:
        @property
        def __class__(self):
            ran.append(armed[0])
            return object

    class Count(int):
        def __ge__(self, other):
            ran.append(armed[0])
            return int.__ge__(self, other)

        def __le__(self, other):
            ran.append(armed[0])
            return int.__le__(self, other)

    cases = [("note", Lazy(), "state 'note' of param 0 of param group 1 is a .*Lazy: its class defines __class__"),
             ("step", Count(1), "state 'step' of param 0 of param group 1 is a .*Count: a step count must be"),
             (3, "x", "the state of param 0 of param group 1 has a key of type int: state keys must be")]  # fmt: skip
    for key, value, match in cases:
        a, b = _params()
        opt = fused_ops.FusedAdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
        opt.step()
        a.grad, b.grad = torch.ones(4), torch.ones(3)
        opt.state[b][key] = value
        before = [a.detach().clone(), b.detach().clone(), *(v.clone() for v in opt.state[a].values())]
        with pytest.raises(TypeError, match=match):
            opt.step()
        after = [a.detach(), b.detach(), *opt.state[a].values()]
        assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True)), key
    assert not any(ran), ran


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_extra_state_values_are_kept(backend):
    """A caller's own plain values in a param's state (a number, a str, None, an object of a plain class) are kept
    and stepped past, as torch.optim keeps them."""

    class Note:
        def __init__(self):
            self.text = "mine"

    a, b = _params()
    opt = fused_ops.FusedAdamW([a, b], lr=0.1, backend=backend)
    opt.step()
    note = Note()
    opt.state[a].update({"count": 3, "label": "w", "none": None, "note": note})
    a.grad, b.grad = torch.ones(4), torch.ones(3)
    opt.step()
    assert opt.state[a]["note"] is note and opt.state[a]["count"] == 3
