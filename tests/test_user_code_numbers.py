"""A hyper-parameter's own Python methods run before a call's first tensor check, never after it (probe 62).

``NoUserCode`` turns off torch function, dispatch modes and the gc between a call's checks and its launches, but not
a caller's number: a ``float`` subclass's ``__float__``, an object's ``__bool__``. The step read ``float(lr)`` while
it prepared its launches (after a reused plan had accepted every tensor), checked group g+1's values after group g's
tensors, and ``functional.adam_``, ``unscale_`` and a prepared launch (``AdamStep(...)(lr=x)``) converted their
numbers after their checks: a ``__float__`` that freed a state's memory (``untyped_storage().resize_(0)``) made the
Triton launch write freed memory. Every call now makes its numbers and flags plain Python objects first
(``kernels/_checks.py: plain_value``, ``fused_ops/optim/_base.py: _step_group``).

Each case gives a number whose methods count their calls in a dry run of the call, then free a tensor's memory at
the last of them in the same call again. Run before the checks, the checks see the freed storage and refuse the call
with a ValueError; run after them, the launch
would write or read freed memory: in a forked child (``tests/safety.py: isolated``) whose large blocks are served by
``mmap`` (freed memory is unmapped), that is a crash, which fails the one test.
"""

from __future__ import annotations

import pytest
import torch
from fused_ops.kernels.adam import AdamStep

from fused_ops import FusedAdamW, FusedLion, FusedSGD, functional

from .safety import isolated, mmap_large_allocations

pytestmark = pytest.mark.safety

N = 65536  # (256 KiB of fp32: served by mmap in the child, so freed memory is unmapped)
STORAGE = "outside its storage|storage freed or shrunk|changed since the launch"


class _Trap:
    """Counts the calls of the methods it is wired to; once ``at`` is set, frees ``target()``'s memory at call
    number ``at`` (the last call of a counted dry run: the one made latest in the call, after the checks if any is
    made after them). ``fired``: whether it freed."""

    def __init__(self) -> None:
        self.calls, self.at, self.fired, self.target = 0, None, False, None

    def fire(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.fired = True
            self.target().untyped_storage().resize_(0)

    def count(self, call) -> None:
        """Run ``call`` with nothing freed, then set ``at`` to its last call (the next run counts from zero)."""
        self.calls = 0
        call()
        assert self.calls > 0
        self.at, self.calls = self.calls, 0


def _float_type(trap: _Trap) -> type:
    class TrapFloat(float):  # (a numbers.Real that every check accepts)
        def __float__(self) -> float:
            trap.fire()
            return float.__float__(self)

        def __ge__(self, other) -> bool:
            trap.fire()
            return float.__ge__(self, other)

        def __lt__(self, other) -> bool:
            trap.fire()
            return float.__lt__(self, other)

    return TrapFloat


def _flag(trap: _Trap, value: bool) -> object:
    class TrapFlag:
        def __bool__(self) -> bool:
            trap.fire()
            return value

    return TrapFlag()


OPTIMIZERS = {
    "adamw": (lambda ps, lr, backend: FusedAdamW(ps, lr=lr, backend=backend), "exp_avg"),
    "adamw_int8": (lambda ps, lr, backend: FusedAdamW(ps, lr=lr, state_dtype="int8", backend=backend), "exp_avg_sq"),
    "sgd": (lambda ps, lr, backend: FusedSGD(ps, lr=lr, momentum=0.9, backend=backend), "momentum_buffer"),
    "lion": (lambda ps, lr, backend: FusedLion(ps, lr=lr, backend=backend), "exp_avg"),
}


def _state_tensor(opt, p, key: str) -> torch.Tensor:
    st = opt.state[p]
    if key in st:
        return st[key]
    # (8-bit moments are kept under keys of their own: the uint8 codes, one byte an element)
    return next(v for v in st.values() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8)


@pytest.mark.parametrize("what", ["state", "param"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@isolated
def test_lr_read_before_a_reused_plans_checks(name, backend, what):
    """The lr's ``__float__`` frees a state (or the param) on the step that reuses the plan."""
    mmap_large_allocations()
    trap = _Trap()
    make, key = OPTIMIZERS[name]
    p = torch.nn.Parameter(torch.randn(N))
    p.grad = torch.randn(N)
    opt = make([p], _float_type(trap)(1e-3), backend)
    opt.step()  # (builds the plan)
    trap.count(opt.step)  # (a step that reuses it)
    trap.target = (lambda: _state_tensor(opt, p, key)) if what == "state" else p.detach
    with pytest.raises(ValueError, match=STORAGE):
        opt.step()
    assert trap.fired


TWO_GROUP_VALUES = {  # (group 1's value whose method frees group 0's state)
    "adamw": lambda trap: {"eps": _float_type(trap)(1e-8)},
    "adamw_maximize": lambda trap: {"maximize": _flag(trap, False)},
    "sgd": lambda trap: {"momentum": _float_type(trap)(0.9)},
    "lion": lambda trap: {"betas": (_float_type(trap)(0.9), 0.99)},
}


@pytest.mark.parametrize("first", [True, False], ids=["building", "reusing"])
@pytest.mark.parametrize("name", list(TWO_GROUP_VALUES))
@isolated
def test_later_groups_values_read_before_any_groups_tensors(name, first):
    """Group 1's value frees group 0's state: on the step that builds the plans, or on one that reuses them."""
    mmap_large_allocations()
    trap = _Trap()
    base = name.split("_")[0]
    make, key = OPTIMIZERS[base]
    a, b = torch.nn.Parameter(torch.randn(N)), torch.nn.Parameter(torch.randn(N))
    a.grad, b.grad = torch.randn(N), torch.randn(N)
    opt = make([{"params": [a]}, {"params": [b]}], 1e-3, "triton")
    opt.param_groups[1].update(TWO_GROUP_VALUES[name](trap))
    opt.step()  # (the states exist; the plans are built)

    def rebuild():  # (a new group: every plan is built again on the next step)
        if first:
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})

    rebuild()
    trap.count(opt.step)
    rebuild()
    trap.target = lambda: _state_tensor(opt, a, key)
    with pytest.raises(ValueError, match=STORAGE):
        opt.step()
    assert trap.fired


@pytest.mark.parametrize("arg", ["lr", "beta2", "eps", "weight_decay", "maximize"])
@isolated
def test_functional_adam_reads_its_numbers_first(arg):
    mmap_large_allocations()
    trap = _Trap()
    params, grads = [torch.randn(N)], [torch.randn(N)]
    m, v, steps = [torch.zeros(N)], [torch.zeros(N)], [torch.zeros(())]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False)
    kw[arg] = _flag(trap, False) if arg == "maximize" else _float_type(trap)(kw[arg])
    trap.count(lambda: functional.adam_(params, grads, m, v, state_steps=steps, backend="triton", **kw))
    trap.target = lambda: m[0]
    with pytest.raises(ValueError, match=STORAGE):
        functional.adam_(params, grads, m, v, state_steps=steps, backend="triton", **kw)
    assert trap.fired


@pytest.mark.parametrize("arg", ["lr", "beta1", "eps", "maximize", "decoupled"])
@isolated
def test_prepared_launch_reads_its_numbers_first(arg):
    mmap_large_allocations()
    trap = _Trap()
    params, grads = [torch.randn(N)], [torch.randn(N)]
    m, v, steps = [torch.zeros(N)], [torch.zeros(N)], [torch.zeros(())]
    launch = AdamStep(params, grads, m, v, [], steps, amsgrad=False)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
    kw[arg] = _flag(trap, kw[arg]) if arg in ("maximize", "decoupled") else _float_type(trap)(kw[arg])
    trap.count(lambda: launch(**kw))
    trap.target = lambda: m[0]
    with pytest.raises(ValueError, match=STORAGE):
        launch(**kw)
    assert trap.fired


def test_prepared_launch_refuses_an_argument_that_is_no_number():
    params, grads = [torch.randn(5)], [torch.randn(5)]
    launch = AdamStep(params, grads, [torch.zeros(5)], [torch.zeros(5)], [], [torch.zeros(())], amsgrad=False)
    with pytest.raises(TypeError, match="AdamStep: eps must be a number"):
        launch(lr=1e-2, beta1=0.9, beta2=0.999, eps="1e-8", weight_decay=0.0, maximize=False, decoupled=True)


@isolated
def test_unscale_reads_inv_scale_first():
    mmap_large_allocations()
    trap = _Trap()
    grads = [torch.randn(N)]
    found_inf = torch.zeros(1)
    inv_scale = _float_type(trap)(0.5)
    trap.count(lambda: functional.unscale_(grads, inv_scale, found_inf, backend="triton"))
    trap.target = lambda: grads[0]
    with pytest.raises(ValueError, match=STORAGE):
        functional.unscale_(grads, inv_scale, found_inf, backend="triton")
    assert trap.fired


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_odd_numbers_step_as_plain_ones(backend):
    """Number subclasses, numpy scalars and non-bool flags step exactly as the plain values they stand for, and the
    groups keep what the caller put there (the step reads plain copies, it does not rewrite the groups)."""
    np = pytest.importorskip("numpy")

    class F(float):
        pass

    class Flag:
        def __bool__(self) -> bool:
            return True

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(67)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    odd = FusedAdamW(ps, lr=F(1e-2), betas=(np.float64(0.9), F(0.99)), eps=np.float64(1e-8), weight_decay=F(0.1),
                     maximize=Flag(), backend=backend)  # fmt: skip
    plain = FusedAdamW(qs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, maximize=True,
                       backend=backend)  # fmt: skip
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(67)
            q.grad = p.grad.clone()
        odd.step()
        plain.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    group = odd.param_groups[0]
    assert type(group["lr"]) is F and type(group["maximize"]) is Flag and type(group["eps"]) is np.float64


def _list_type(trap: _Trap) -> type:
    class TrapList(list):  # (its __iter__ and __getitem__ are caller code)
        def __iter__(self):
            trap.fire()
            return list.__iter__(self)

        def __getitem__(self, i):
            trap.fire()
            return list.__getitem__(self, i)

    return TrapList


def _launcher_case(name: str, trap: _Trap):
    """``(call, tensor the call writes)`` for launcher ``name``, its arguments wired to ``trap``."""
    from fused_ops.kernels import adam, adam_lowbit, cast, flatten, lion, scale, sgd

    num, seq = _float_type(trap), _list_type(trap)
    p, g = torch.zeros(N), torch.ones(N)
    if name == "cast_stochastic":
        dst = torch.zeros(N, dtype=torch.bfloat16)
        return (lambda: cast.cast_launch([dst], [g], stochastic=_flag(trap, False))), dst
    if name == "cast_list":
        dst = torch.zeros(N)
        return (lambda: cast.cast_launch(seq([dst]), [g])), dst
    if name == "unscale":
        return (lambda: scale.unscale_launch([g], num(0.5), None)), g
    if name == "norm_list":
        return (lambda: scale.norm_launch(seq([g]))), g
    if name == "adam":
        m, v = torch.zeros(N), torch.zeros(N)
        kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=True)
        return (lambda: adam.adam_launch([p], [g], [m], [v], [], [], lr=num(1e-3), step=1.0, **kw)), m
    if name == "adam_lowbit":
        m, v = torch.zeros(N, dtype=torch.bfloat16), torch.zeros(N, dtype=torch.bfloat16)
        kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
        return (lambda: adam_lowbit.adam_lowbit_launch([p], [g], [m], [v], [torch.zeros(())], state="bf16",
                                                       lr=num(1e-3), **kw)), m  # fmt: skip
    if name == "sgd":
        buf = torch.zeros(N)
        kw = dict(lr=0.1, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=False)
        return (lambda: sgd.sgd_launch([p], [g], [buf], momentum=num(0.9), **kw)), buf
    if name == "lion":
        m = torch.zeros(N)
        kw = dict(beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False)
        return (lambda: lion.lion_launch([p], [g], [m], lr=num(1e-3), **kw)), m
    if name == "flatten_offsets":
        flat, cache = torch.zeros(N), {}
        flatten.flatten_launch(flat, [g], [0], [N], cache=cache)  # (the segments' table cached by flat's address)
        return (lambda: flatten.flatten_launch(flat, [g], seq([0]), [N], cache=cache)), flat
    raise AssertionError(name)


LAUNCHERS = ["cast_stochastic", "cast_list", "unscale", "norm_list", "adam", "adam_lowbit", "sgd", "lion",
             "flatten_offsets"]  # fmt: skip


@pytest.mark.parametrize("name", LAUNCHERS)
@isolated
def test_launchers_read_their_arguments_first(name):
    """The public launchers (``@no_user_code``) make their numbers, flags and sequences plain before their checks
    (probe 63): a number's ``__float__``, a flag's ``__bool__``, a list subclass's ``__iter__``/``__getitem__``."""
    mmap_large_allocations()
    trap = _Trap()
    call, written = _launcher_case(name, trap)
    trap.count(call)
    trap.target = lambda: written
    with pytest.raises(ValueError, match="outside its storage"):
        call()
    assert trap.fired


def test_cast_seed_is_read_before_any_group_is_written():
    """An int subclass seed: its ``__add__`` ran between the groups (each group's seed), after group 0 was written;
    one that raised left group 0 written (probe 63). The seed is read once, first: the call runs no caller code."""

    class Seed(int):
        def __add__(self, other):
            raise RuntimeError("caller code ran inside cast_")

        __radd__ = __add__

    dst = [torch.zeros(5, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.float16)]
    src = [torch.full((5,), 1.5), torch.full((3,), 2.5)]
    functional.cast_(dst, src, stochastic=True, seed=Seed(7), backend="triton")
    torch.testing.assert_close(dst[0], torch.full((5,), 1.5, dtype=torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(dst[1], torch.full((3,), 2.5, dtype=torch.float16), rtol=0, atol=0)


class _GradProperty(torch.nn.Parameter):
    @property
    def grad(self):
        return torch.Tensor.grad.__get__(self)

    @grad.setter
    def grad(self, value):
        torch.Tensor.grad.__set__(self, value)


class _Tagged(torch.nn.Parameter):  # (a subclass that only adds what the step does not read: fine)
    def describe(self) -> str:
        return "tagged"


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("make", [FusedAdamW, FusedSGD, FusedLion])
def test_param_classes_that_define_what_the_step_reads_are_refused(make, backend):
    """A param class with a Python ``grad`` property (or ``__hash__``, ``data``, ...) ran caller code from inside the
    step, after other groups' checks (probe 63: group 1's ``grad`` freed group 0's state before its launch). Refused
    before anything changes; a subclass that defines none of them steps as a Parameter."""
    from .safety import expect_error_unchanged

    a, b = torch.nn.Parameter(torch.randn(7)), _GradProperty(torch.randn(5))
    c = _Tagged(torch.randn(3))
    opt = make([{"params": [a, c]}, {"params": [b]}], lr=1e-2, backend=backend)
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    expect_error_unchanged(opt.step, TypeError, "param 0 of param group 1 is a _GradProperty, which defines grad",
                           opt, [a, b, c])  # fmt: skip
    opt.param_groups.pop(1)
    before = c.detach().clone()
    opt.step()
    assert not torch.equal(c.detach(), before)


# -- tensors that run Python code of their own when read (probe 64) ----------------------------------------------
# A method set on one tensor object (``t.data_ptr = f``: torch's methods are non-data descriptors, the object's
# ``__dict__`` shadows them), a tensor subclass defining one in Python, a param class defining ``__getattribute__``:
# each ran caller code inside the checked region. The checked step and every ``no_user_code`` call refuse them with a
# TypeError before any check reads them; the reused plan reads tensors through torch.Tensor's own methods only.

_WIRED = ("data_ptr", "numel", "is_contiguous", "untyped_storage", "storage_offset", "element_size", "stride", "size",
          "dim", "is_floating_point", "detach", "reshape", "view", "copy_", "to", "float")  # fmt: skip


def _wire(t: torch.Tensor, trap: _Trap) -> None:
    """Set ``_WIRED`` methods on the tensor object itself, each calling ``trap.fire`` then torch's own method."""
    for name in _WIRED:
        real = getattr(torch.Tensor, name)
        setattr(t, name, lambda *a, _real=real, **k: (trap.fire(), _real(t, *a, **k))[1])


def _two_params(make, n: int = 67):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n)) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn(n)
    opt = make(ps)
    opt.step()  # (states and plans built)
    return ps, opt


WHO = {
    "grad": lambda ps, opt: ps[1].grad,
    "param": lambda ps, opt: ps[1],
    "state": lambda ps, opt: next(v for v in opt.state[ps[1]].values() if isinstance(v, torch.Tensor) and v.dim()),
}


@pytest.mark.parametrize("who", list(WHO))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tensor_methods_set_on_the_object_are_refused_by_the_checked_step(name, who):
    trap = _Trap()
    make, _ = OPTIMIZERS[name]
    ps, opt = _two_params(lambda ps: make(ps, 1e-3, "triton"))
    st = opt.state[ps[1]]
    key = next(iter(st))
    st[key] = st[key]  # (a state write: the next step takes the checked path)
    before = [torch.Tensor.clone(t) for p in ps for t in (p, *opt.state[p].values()) if isinstance(t, torch.Tensor)]
    _wire(WHO[who](ps, opt), trap)
    with pytest.raises(TypeError, match="runs Python code of its own when it is read: the tensor object itself"):
        opt.step()
    assert trap.calls == 0
    after = [t for p in ps for t in (p, *opt.state[p].values()) if isinstance(t, torch.Tensor)]
    assert all(torch.equal(torch.Tensor.detach(a), b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("who", list(WHO))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_the_reused_plan_calls_no_method_set_on_a_tensor(name, who, backend):
    """On a step that reuses its plan, the Triton path reads the tensors through torch.Tensor's own methods: a method
    set on the object is never called (it cannot run between the checks and the launch), and the step is the plain
    one. The reference path's torch code calls the tensors' methods: such a tensor is refused there, as by the
    checked step."""
    trap = _Trap()
    make, _ = OPTIMIZERS[name]
    ps, opt = _two_params(lambda ps: make(ps, 1e-3, backend))
    qs, twin = _two_params(lambda qs: make(qs, 1e-3, backend))
    _wire(WHO[who](ps, opt), trap)
    plan = opt._plans[0]
    if backend == "reference":
        with pytest.raises(TypeError, match="runs Python code of its own when it is read: the tensor object itself"):
            opt.step()
        assert trap.calls == 0
        return
    opt.step()
    twin.step()
    assert opt._plans[0] is plan and trap.calls == 0
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())


class _GradSubclass(torch.Tensor):
    def data_ptr(self):
        return torch.Tensor.data_ptr(self)


class _Attribute(torch.nn.Parameter):
    def __getattribute__(self, name):
        return super().__getattribute__(name)


def test_tensor_subclasses_defining_what_is_read_are_refused():
    from .safety import expect_error_unchanged

    ps, opt = _two_params(lambda ps: FusedAdamW(ps, lr=1e-3, backend="triton"))
    g = ps[1].grad
    ps[1].grad = g.as_subclass(_GradSubclass)  # (a new grad: the step checks it through its methods)
    expect_error_unchanged(opt.step, TypeError, r"the grad of param 1 .* its class _GradSubclass defines "
                           "data_ptr", opt, ps)  # fmt: skip
    ps[1].grad = g
    lr = torch.tensor(1e-3)
    lr.data_ptr = lambda: torch.Tensor.data_ptr(lr)
    opt.param_groups[0]["lr"] = lr
    expect_error_unchanged(opt.step, TypeError, "lr of param group 0 runs Python code", opt, ps)
    q = _Attribute(torch.randn(3))
    q.grad = torch.randn(3)
    opt.add_param_group({"params": [q]})
    opt.param_groups[0]["lr"] = 1e-3
    with pytest.raises(TypeError, match="param 0 of param group 1 is a _Attribute, which defines __getattribute__"):
        opt.step()


def test_param_classes_are_read_afresh_and_by_identity():
    """A class checked once and given a ``grad`` property later, and a class claiming a torch module, are refused
    (the verdict is not cached; torch's own classes are trusted by identity, not by their ``__module__``)."""

    class Late(torch.nn.Parameter):
        pass

    class Claims(torch.nn.Parameter):
        __module__ = "torch.my_extension"

        @property
        def grad(self):
            return torch.Tensor.grad.__get__(self)

    p = Late(torch.randn(4))
    p.grad = torch.ones(4)
    opt = FusedAdamW([p], lr=1e-3, backend="triton")
    opt.step()
    Late.grad = property(lambda self: torch.Tensor.grad.__get__(self))
    with pytest.raises(TypeError, match="is a .*Late, which defines grad"):
        opt.step()
    q = Claims(torch.randn(4))
    with pytest.raises(TypeError, match="is a .*Claims, which defines grad"):
        FusedAdamW([q], lr=1e-3, backend="triton").step()


def test_functional_ops_refuse_tensors_with_methods_of_their_own():
    params, grads = [torch.randn(5), torch.randn(5)], [torch.randn(5), torch.randn(5)]
    m, v, steps = [torch.zeros(5), torch.zeros(5)], [torch.zeros(5), torch.zeros(5)], [torch.zeros(()), torch.zeros(())]
    grads[1].numel = lambda: 5
    with pytest.raises(
        TypeError, match=r"adam_: grads\[1\] runs Python code .* the tensor object itself defines numel"
    ):
        functional.adam_(params, grads, m, v, state_steps=steps, lr=1e-3, backend="triton")
    assert not any(map(torch.count_nonzero, m))

    class Flag(torch.Tensor):
        def __bool__(self):
            return False

    from fused_ops.kernels.cast import cast_launch

    dst = [torch.zeros(5, dtype=torch.bfloat16)]
    with pytest.raises(TypeError, match="cast_launch: stochastic runs Python code .* defines __bool__"):
        cast_launch(dst, [torch.randn(5)], stochastic=torch.tensor(False).as_subclass(Flag))


@pytest.mark.parametrize("kind", ["tuple", "list subclass"])
def test_params_as_a_tuple_or_list_subclass_keep_their_plan(kind):
    """``group["params"]`` replaced by a tuple or a list subclass: read as a plain copy at each step, before any
    check, and the plan is still reused (it compares the group's own object; probe 64: it was rebuilt every step)."""

    class Params(list):
        pass

    ps, opt = _two_params(lambda ps: FusedAdamW(ps, lr=1e-3, backend="triton"))
    opt.param_groups[0]["params"] = tuple(ps) if kind == "tuple" else Params(ps)
    opt.step()
    plan = opt._plans[0]
    opt.step()
    assert opt._plans[0] is plan


def test_grads_read_from_params_are_checked_first():
    """``clip_grad_norm_`` and ``FlatBuffer.for_grads`` read ``p.grad`` themselves: a grad with a method set on the
    object is refused, named by its param, before anything is read or written (probe 65: the reference backend's
    torch norm read a grad freed by such a method: SIGSEGV)."""
    from fused_ops import FlatBuffer, clip_grad_norm_

    ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    for p in ps[::2]:
        p.grad = torch.randn(5)
    before = [torch.Tensor.clone(p.grad) for p in ps[::2]]
    ps[2].grad.numel = lambda: 5
    for backend in ("triton", "reference"):
        with pytest.raises(TypeError, match=r"clip_grad_norm_: parameters\[2\]\.grad runs Python code .* numel"):
            clip_grad_norm_(ps, 0.1, backend=backend)
    with pytest.raises(TypeError, match=r"FlatBuffer.for_grads: params\[2\]\.grad runs Python code"):
        FlatBuffer.for_grads(ps)
    assert all(torch.equal(torch.Tensor.detach(p.grad), b) for p, b in zip(ps[::2], before))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ops_that_agree_their_checks_refuse_methods_themselves(backend):
    """``unscale_``, ``grad_norm``, ``clip_grad_norm_`` and the scaler's ``unscale_`` / ``grad_scale_and_norm`` check
    their tensors for methods of their own inside the op (where a refusal on one rank is agreed with the others, see
    test_dtensor_rank_local.py), not on entry: with plain tensors each is still a TypeError naming the tensor, before
    anything is read or written; a param class with a ``grad`` property is refused by clip_grad_norm_."""
    from fused_ops import DynamicLossScaler, clip_grad_norm_

    calls = []

    def with_method(t):
        t.numel = lambda: calls.append(1) or torch.Tensor.numel(t)
        return t

    grads = [torch.randn(5), torch.randn(3)]
    before = [torch.Tensor.clone(g) for g in grads]
    cases = {
        r"unscale_: grads\[1\]": lambda: functional.unscale_(
            [grads[0], with_method(torch.randn(3))], 0.5, backend=backend
        ),
        r"unscale_: out\[0\]": lambda: functional.unscale_(
            grads, 0.5, out=[with_method(torch.randn(5)), torch.randn(3)], backend=backend
        ),
        r"unscale_: found_inf": lambda: functional.unscale_(grads, 0.5, with_method(torch.zeros(1)), backend=backend),
        r"unscale_: inv_scale": lambda: functional.unscale_(grads, with_method(torch.full((1,), 0.5)), backend=backend),
        r"grad_norm: tensors\[0\]": lambda: functional.grad_norm([with_method(torch.randn(2))], backend=backend),
    }
    for pattern, call in cases.items():
        with pytest.raises(TypeError, match=pattern + " runs Python code of its own"):
            call()
    # (the scaler reads its grads' spans before the op's checks: a non-contiguous grad's through numel(), stride(),
    # ...; probe 69: a method there ran before the refusal, and one that deleted itself got past the scaler's own
    # refusals, dividing grads twice. Refused first now, nothing read.)
    scaler = DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
    with pytest.raises(TypeError, match=r"^DynamicLossScaler.unscale_: grads\[1\] runs Python code of its own"):
        scaler.unscale_([grads[0], with_method(torch.randn(3, 2).t())])
    with pytest.raises(TypeError, match=r"^DynamicLossScaler.unscale_: out\[0\] runs Python code of its own"):
        scaler.unscale_(grads, out=[with_method(torch.randn(5, 1).t()), torch.randn(3)])
    with pytest.raises(
        TypeError, match=r"^DynamicLossScaler.grad_scale_and_norm: grads\[1\] runs Python code of its own"
    ):
        scaler.grad_scale_and_norm([grads[0], with_method(torch.randn(3, 2).t())])
    assert scaler.found_inf.item() == 0 and all(torch.equal(g, b) for g, b in zip(grads, before))
    assert not calls  # (no method of a refused tensor ran)

    class GradProperty(torch.nn.Parameter):
        @property
        def grad(self):
            return torch.Tensor.grad.__get__(self)

    ps = [torch.nn.Parameter(torch.randn(5)), GradProperty(torch.randn(3))]
    ps[0].grad = grads[0]
    with pytest.raises(TypeError, match=r"clip_grad_norm_: parameters\[1\] is a .*GradProperty, which defines grad"):
        clip_grad_norm_(ps, 0.1, backend=backend)
    assert torch.equal(grads[0], before[0])


class _Movable(torch.nn.Parameter):  # (as quantised param classes do: moving methods of its own)
    def cuda(self, *args, **kwargs):
        return super().cuda(*args, **kwargs)

    def cpu(self):
        return super().cpu()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_param_classes_with_moving_methods_of_their_own_step(backend):
    p = _Movable(torch.randn(7))
    p.grad = torch.randn(7)
    opt = FusedAdamW([p], lr=1e-2, backend=backend)
    before = torch.Tensor.clone(p)
    opt.step()
    opt.step()
    assert not torch.equal(torch.Tensor.detach(p), before)


@isolated
def test_dtensor_local_shards_with_methods_of_their_own_are_refused(tmp_path):
    """What the checks and launches read of a DTensor is its local shard: a method set on it is refused like one
    set on a plain tensor, by the optimizer's checked step and by the functional ops (probe 65: SIGSEGV)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        mesh = init_device_mesh("cpu", (1,))
        ps = [torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])) for _ in range(2)]
        for p in ps:
            p.grad = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
        opt = FusedAdamW(ps, lr=1e-2, backend="triton")
        opt.step()
        st = opt.state[ps[1]]
        st["exp_avg"] = st["exp_avg"]  # (a state write: the next step takes the checked path)
        ps[1].grad._local_tensor.data_ptr = lambda: torch.Tensor.data_ptr(ps[1].grad._local_tensor)
        with pytest.raises(
            TypeError, match=r"the grad of param 1 of param group 0 runs Python code .* its local shard"
        ):
            opt.step()
        with pytest.raises(TypeError, match=r"grad_norm: tensors\[1\] runs Python code .* its local shard"):
            functional.grad_norm([p.grad for p in ps], backend="reference")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("where", ["optimizer lr", "optimizer maximize", "adam_ eps", "launcher lr", "flag"])
@isolated
def test_a_number_that_fails_to_convert_is_refused_not_kept(where):
    """A value whose first conversion raised was kept as it was and read again after the checks (probe 66), where a
    second read could succeed and free a checked tensor: now a TypeError naming it, before any check."""
    mmap_large_allocations()
    from fused_ops.kernels.cast import cast_launch

    victim = {}

    class Flaky(float):
        calls = 0

        def __float__(self):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise ValueError("not yet")
            victim["t"].untyped_storage().resize_(0)
            return float.__float__(self)

    class FlakyFlag:
        calls = 0

        def __bool__(self):
            FlakyFlag.calls += 1
            if FlakyFlag.calls == 1:
                raise ValueError("not yet")
            victim["t"].untyped_storage().resize_(0)
            return False

    p = torch.nn.Parameter(torch.randn(N))
    p.grad = torch.randn(N)
    if where.startswith("optimizer"):
        opt = FusedAdamW([p], lr=1e-3, backend="triton")
        opt.step()
        victim["t"] = opt.state[p]["exp_avg"]
        opt.param_groups[0].update(lr=Flaky(1e-3)) if where.endswith("lr") else opt.param_groups[0].update(
            maximize=FlakyFlag()
        )
        with pytest.raises(TypeError, match="of param group 0 "):
            opt.step()
    elif where == "adam_ eps":
        m, v = torch.zeros(N), torch.zeros(N)
        victim["t"] = m
        with pytest.raises(TypeError, match="adam_: eps .* cannot be read as a float"):
            functional.adam_([p.detach()], [p.grad], [m], [v], state_steps=[torch.zeros(())], lr=1e-3,
                             eps=Flaky(1e-8), backend="triton")  # fmt: skip
    elif where == "launcher lr":
        m, v = torch.zeros(N), torch.zeros(N)
        victim["t"] = m
        launch = AdamStep([p.detach()], [p.grad], [m], [v], [], [torch.zeros(())], amsgrad=False)
        with pytest.raises(TypeError, match="AdamStep: lr .* cannot be read as a float"):
            launch(lr=Flaky(1e-3), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
    else:
        dst = torch.zeros(N, dtype=torch.bfloat16)
        victim["t"] = dst
        with pytest.raises(TypeError, match="cast_launch: stochastic must be a bool"):
            cast_launch([dst], [p.grad], stochastic=FlakyFlag())
    assert Flaky.calls + FlakyFlag.calls == 1  # (read once, refused: never read again)


@pytest.mark.parametrize("op", ["unscale_", "grad_norm", "grad_scale_and_norm"])
def test_ops_checking_their_own_tensors_compile_without_a_graph_break(op):
    """The checks that moved into the ops (see test_ops_that_agree_their_checks_refuse_methods_themselves) are not
    traced: ``torch.compile(fullgraph=True)`` of each op compiles as before (probe 69), and gives the eager result."""
    import torch._dynamo

    from fused_ops import DynamicLossScaler

    def run(grads):
        if op == "unscale_":
            found = torch.zeros(1)
            functional.unscale_(grads, 0.5, found, backend="reference")
            return grads, found
        if op == "grad_norm":
            return functional.grad_norm(grads, backend="reference")
        return DynamicLossScaler(init_scale=2.0, device="cpu", backend="reference").grad_scale_and_norm(grads)

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=gen), torch.randn(3, generator=gen)]
    twins = [g.clone() for g in grads]
    got = torch.compile(run, backend="eager", fullgraph=True)(grads)
    torch.testing.assert_close(got, run(twins), rtol=0, atol=0)


def test_a_stand_in_has_the_metadata_and_no_memory_of_its_own():
    """What a refusing rank's checks read until the agreement: the refused tensor's shape, dtype and device, one
    element expanded (probe 69: a full copy of every tensor in the list, whose allocation failure then raised a
    shape error on that rank alone, before the agreement)."""
    from fused_ops.kernels._checks import stand_in

    x = torch.empty(1000, 300, dtype=torch.bfloat16).t()
    x.numel = lambda: 0
    s = stand_in(x)
    assert type(s) is torch.Tensor and s.shape == (300, 1000) and s.dtype == torch.bfloat16 and s.device == x.device
    assert s.untyped_storage().nbytes() <= 8


@pytest.mark.parametrize("how", ["dict subclass", "__dict__ property"])
def test_a_hidden_instance_dict_is_refused(how):
    """The check reads the object's own ``__dict__`` through ``torch.Tensor``'s descriptor and refuses one that is not
    an exact dict (probe 71: a dict subclass whose ``__iter__`` hides its keys, or a class whose ``__dict__`` property
    returns ``{}``, let methods set on the object through, and they ran between the checks and the launch:
    SIGSEGV in ``unscale_``, ``clip_grad_norm_`` and the step)."""
    from fused_ops.kernels._checks import python_overrides

    class Hidden(dict):
        def __iter__(self):
            return iter(())

    class Masked(torch.Tensor):
        @property
        def __dict__(self):
            return {}

    calls = []
    g = torch.randn(5)
    if how == "dict subclass":
        d = Hidden()
        d["numel"] = lambda: calls.append(1) or 5
        g.__dict__ = d
    else:
        g = g.as_subclass(Masked)
        g.numel = lambda: calls.append(1) or 5
    assert python_overrides([g])[0] == 0
    with pytest.raises(TypeError, match=r"unscale_: grads\[0\] runs Python code of its own"):
        functional.unscale_([g], 0.5, backend="reference")
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = g
    with pytest.raises(TypeError, match=r"the grad of param 0 of param group 0 runs Python code of its own"):
        FusedAdamW([p], lr=1e-2, backend="triton").step()
    assert not calls


def test_the_scaler_reads_its_numbers_before_any_check():
    """``grad_scale_and_norm`` converts ``max_norm`` and ``norm_type`` (a numpy 0-d array's item included) before its
    refusal of unscaled grads, not after (probe 71: a ``__float__`` there re-entered ``unscale_``)."""
    import numpy as np

    from fused_ops import DynamicLossScaler

    order = []

    class Traced(float):
        def __float__(self):
            order.append("max_norm")
            return float.__float__(self)

    scaler = DynamicLossScaler(init_scale=4.0, device="cpu", backend="reference")
    real = scaler._refuse_unscaled
    scaler._refuse_unscaled = lambda *a, **k: (order.append("check"), real(*a, **k))[1]
    box = np.empty((), dtype=object)
    box[()] = Traced(0.5)
    grad_scale, norm = scaler.grad_scale_and_norm([torch.ones(4)], max_norm=box)
    assert order[0] == "max_norm" and "check" in order, order
    torch.testing.assert_close(norm, torch.tensor(0.5))  # (|ones(4)| / 4)
