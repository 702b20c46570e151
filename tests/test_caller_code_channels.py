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

import collections
import enum
import fractions

import numpy as np
import pytest
import torch

import fused_ops
from fused_ops.optim import _base

from .safety import isolated

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
@isolated
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
@isolated
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
@isolated
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
@isolated
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
        mine = opt.state[a] = collections.OrderedDict(opt.state[a])  # (replaced by a plain copy only by a step)
        before = [a.detach().clone(), b.detach().clone(), *(v.clone() for v in opt.state[a].values())]
        with pytest.raises(TypeError, match=match):
            opt.step()
        after = [a.detach(), b.detach(), *opt.state[a].values()]
        assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True)), key
        assert opt.state[a] is mine, key
    assert not any(ran), ran


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_plain_extra_state_values_are_kept(backend):
    """A caller's own plain values in a param's state (a number, a str, None, an object of a plain class) are kept
    and stepped past, as torch.optim keeps them."""

    class Note:
        def __init__(self):
            self.text = "mine"

    class Fallback:  # (``__getattr__`` never runs for ``__class__``, which ``object`` has; nor does a metaclass)
        def __getattr__(self, name):
            raise AssertionError(name)

    class Kind(enum.Enum):
        A = 1

    a, b = _params()
    opt = fused_ops.FusedAdamW([a, b], lr=0.1, backend=backend)
    opt.step()
    note = Note()
    extra = {"count": 3, "label": "w", "none": None, "note": note, "fallback": Fallback(), "kind": Kind.A,
             "ratio": fractions.Fraction(1, 3), "module": torch.nn.Linear(2, 2), "np": np.float32(2)}  # fmt: skip
    opt.state[a].update(extra)
    a.grad, b.grad = torch.ones(4), torch.ones(3)
    for n, kind in enumerate((np.float64, np.float32, np.int64)):  # (numpy step counts, as older dicts hold)
        opt.state[b]["step"] = kind(float(opt.state[b]["step"]))
        opt.step()
        assert float(opt.state[b]["step"]) == 2 + n, kind
    assert all(opt.state[a][k] is v for k, v in extra.items())


# -- the functional ops, the launchers, prepared launches and FlatBuffer (probe 78) -------------------------------


def _adam_lists(n: int = 64):
    return [torch.zeros(n)], [torch.ones(n)], [torch.zeros(n)], [torch.zeros(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_arguments_are_all_made_plain_before_any_tensor_is_checked(backend):
    """A later argument's conversion (a float subclass's ``__float__``) set a method on a tensor argument already
    checked, and the op called it after its checks (the reference backend's ``p.numel()``: a shrunk grad read past
    its end). Every argument is made plain first now, then every tensor checked: refused, nothing written."""
    from fused_ops import functional

    p, g, m, v = _adam_lists()

    class LR(float):
        def __float__(self):
            p[0].numel = lambda: 64
            return 0.001

    with pytest.raises(TypeError, match=r"params\[0\] runs Python code of its own"):
        functional.adam_(p, g, m, v, lr=LR(0.001), step=1, backend=backend)
    assert not p[0].any() and not m[0].any()

    from fused_ops.kernels import _checks

    reads = []

    class Sneaky:  # (an object whose __class__ is caller code: isinstance reads it)
        @property
        def __class__(self):
            reads.append(1)
            p[0].numel = lambda: 64
            return object

    p, *_ = _adam_lists()
    with pytest.raises(TypeError, match="a runs Python code of its own"):  # (set in the first pass, refused after)
        _checks.plain_arguments((p[0], Sneaky()), {}, fn="f", names=("a", "b"))
    reads.clear()
    _checks._check_plain([torch.zeros(2), Sneaky()], "f", "b")  # (the second pass: types only, probe 80)
    assert not reads


@isolated
def test_a_launchers_arguments_and_cache():
    """The same for a kernel launcher (``adam_launch``: its chunk table read ``data_ptr()`` through the object), and
    its ``cache``: a mapping of the caller's ran its ``get``/``__setitem__`` after the checks (a freed param written:
    abort); only a dict (or this package's caches) is taken."""
    from fused_ops.kernels.adam import adam_launch

    p, g, m, v = _adam_lists()
    steps = [torch.zeros(())]
    kwargs = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=True)

    class LR(float):
        def __float__(self):
            p[0].data_ptr = lambda: 0
            return 0.001

    with pytest.raises(TypeError, match=r"params\[0\] runs Python code of its own"):
        adam_launch(p, g, m, v, [], steps, lr=LR(0.001), **kwargs)
    del p[0].data_ptr

    class Cache(dict):
        def get(self, key, default=None):
            raise AssertionError("ran")

    with pytest.raises(TypeError, match="cache must be a dict or None, got Cache"):
        adam_launch(p, g, m, v, [], steps, lr=0.001, cache=Cache(), **kwargs)
    assert not p[0].any() and not steps[0].any()
    adam_launch(p, g, m, v, [], steps, lr=0.001, cache={}, **kwargs)
    assert p[0].ne(0).all() and float(steps[0]) == 1


@isolated
def test_a_prepared_launch_reads_addresses_through_torchs_methods():
    """``AdamStep`` called with a tensor ``lr`` compared its addresses with the params' through the objects' own
    ``data_ptr`` (a method set on a param after the step was built ran after the checks); it reads them through
    ``torch.Tensor.data_ptr`` now."""
    from fused_ops.kernels.adam import AdamStep

    p, g, m, v = _adam_lists()
    steps = [torch.zeros(())]
    step = AdamStep(p, g, m, v, [], steps, amsgrad=False)
    ran = []
    p[0].data_ptr = lambda: ran.append(1) or torch.Tensor.data_ptr(p[0])
    step(lr=torch.tensor([1e-3]), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
    assert not ran and p[0].ne(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_from_params_staging_releases_the_device_copies_after_every_copy(backend):
    """``FlatBuffer.from_params(stage_on_host=True)`` released each param's old memory as it went: a finalizer of
    one param's storage ran before the next param was copied, and could free it (a segfault in the copy). The old
    memory is released once every param is staged now; a host copy freed there is refused, nothing read from it."""
    import weakref

    from fused_ops import FlatBuffer

    ps = [torch.nn.Parameter(torch.full((4096,), float(i + 1))) for i in range(2)]
    order = []
    weakref.finalize(ps[0].untyped_storage(), lambda: order.append(ps[1].untyped_storage().nbytes()))
    buf = FlatBuffer.from_params(ps, stage_on_host=True, backend=backend)
    assert len(order) == 1 and order[0] >= 2 * 4096 * 4  # (ps[1] was staged already: a view of the host copy)
    assert torch.equal(ps[1].detach(), torch.full((4096,), 2.0)) and buf.data.numel() >= 8192

    qs = [torch.nn.Parameter(torch.full((4096,), float(i + 1))) for i in range(2)]
    weakref.finalize(qs[0].untyped_storage(), lambda: qs[1].untyped_storage().resize_(0))
    with pytest.raises(RuntimeError, match="host copy was freed while the device copies were released"):
        FlatBuffer.from_params(qs, stage_on_host=True, backend=backend)
