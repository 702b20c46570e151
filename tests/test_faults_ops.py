"""Fault injection on the ops outside the optimizers: an error part-way (out of memory from an allocator, or a launch
that fails) must leave params, grads, buffers and the loss scaler bit-identical to before, and the retry must give
what a run that never faulted gives (or, where a launch itself failed after an earlier group was written, be refused
rather than applied twice).

Each sweep wraps the allocating torch functions and tensor methods that fused_ops' own code calls (``functional``,
``precision``, ``buffers``, ``_ops`` and the kernels' launchers; not ``reference``, whose single-launch internals are
not part of these guarantees) and raises ``torch.OutOfMemoryError`` on the N-th such call, for N = 1, 2, ... until a
call completes without reaching N. Both backends: "reference", and "triton" under the interpreter.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import pytest
import torch

import fused_ops
from fused_ops import DynamicLossScaler, FlatBuffer, _ops, buffers, functional, kernels, precision

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]

# (the files whose calls count: where the kernels are installed from, too)
_OURS = tuple(os.path.abspath(m.__file__) for m in (functional, precision, buffers, _ops)) + (
    os.path.dirname(os.path.abspath(kernels.__file__)),
)
_TORCH_FNS = ("empty", "zeros", "ones", "full", "tensor", "empty_strided", "empty_like", "zeros_like", "ones_like",
              "full_like", "where", "cat", "stack", "ne", "maximum", "randint")  # fmt: skip
_TENSOR_METHODS = ("to", "clone", "contiguous", "reshape", "view", "narrow", "double", "float", "long", "clamp_min",
                   "clamp_max", "pin_memory")  # fmt: skip
# (every arithmetic step of the scaler's update allocates its result)
_OPERATORS = ("__add__", "__sub__", "__mul__", "__truediv__", "__and__", "__or__", "__invert__", "__ne__", "__le__",
              "__ge__", "__gt__", "__lt__")  # fmt: skip
_ALLOCATORS = [(torch, f) for f in _TORCH_FNS] + [(torch.Tensor, m) for m in _TENSOR_METHODS]


class _Faults:
    """Raise ``torch.OutOfMemoryError`` on the ``n``-th call, from fused_ops' own code, of any wrapped function."""

    def __init__(self, n: int, targets) -> None:
        self.n, self.calls, self.targets = n, 0, targets

    @contextlib.contextmanager
    def armed(self):
        saved = [(obj, name, vars(obj).get(name)) for obj, name in self.targets]  # (None: inherited)
        for obj, name, _ in saved:
            setattr(obj, name, self._wrap(name, getattr(obj, name)))
        try:
            yield self
        finally:
            for obj, name, own in saved:
                if own is None:
                    delattr(obj, name)
                else:
                    setattr(obj, name, own)

    def _wrap(self, name, orig):
        def wrapped(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(_OURS):
                self.calls += 1
                if self.calls == self.n:
                    raise torch.OutOfMemoryError(f"injected: {name} (call {self.n})")
            return orig(*args, **kwargs)

        return wrapped


def _bits(x):
    """A tensor as every bit of it: dtype, shape, strides, device and the bytes of its elements (nan included)."""
    if x is None:
        return None
    x = x.detach()
    return x.dtype, tuple(x.shape), x.stride(), x.device, x.reshape(-1).clone().view(torch.uint8)


def _same(a, b) -> bool:
    """Two items of a snapshot equal: :func:`_bits` tuples bit for bit, anything else by ``==``."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return a[:4] == b[:4] and torch.equal(a[4], b[4])
    return a is b if a is None or b is None else type(a) is type(b) and a == b


def _all_same(xs: list, ys: list) -> bool:
    return len(xs) == len(ys) and all(map(_same, xs, ys))


def _sweep(make, run, snapshot, retry=None, targets=_ALLOCATORS, limit: int = 400) -> int:
    """For N = 1, 2, ...: ``state = make()``, ``run(state)`` with the N-th allocation failing; when it raised, the
    ``snapshot`` of the state must equal the one taken before, and a retry (``retry(state)``, default ``run``) must
    leave the snapshot that a run that never faulted leaves. Stops at the first N that is not reached; returns the
    number of faults injected."""
    retry = retry or run
    clean = make()
    retry(clean)
    expected = snapshot(clean)
    for n in range(1, limit):
        state = make()
        before = snapshot(state)
        faults = _Faults(n, targets)
        try:
            with faults.armed():
                run(state)
        except torch.OutOfMemoryError:
            after = snapshot(state)
            assert len(after) == len(before)
            for k, (a, b) in enumerate(zip(before, after)):
                assert _same(a, b), f"fault {n}: item {k} of the state changed"
            retry(state)
            assert _all_same(snapshot(state), expected), f"fault {n}: the retry differs from a clean run"
            continue
        assert faults.calls < n
        return n - 1
    raise AssertionError("the sweep did not end")


# -- DynamicLossScaler.update ---------------------------------------------------------------------------------------


def _scaler_snapshot(s: DynamicLossScaler) -> list:
    return [_bits(t) for t in (s._scale, s._found_inf, s._growth_tracker, s._hysteresis_tracker, s._skipped,
                               s._consecutive, s._min_scale_overflows)] + [
        s._n_updates, s._pending is None, s._warned_skipped, s._warned_min_scale, len(s._unscaled)]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["overflow", "grow", "back_off"])
def test_update_fault_leaves_scaler_unchanged(backend, case):
    """Every allocation of ``update`` (its arithmetic too), the lazy check's snapshot included (every update here)."""

    def make():
        kw = dict(init_scale=1024.0, hysteresis=2, growth_interval=1, warn_after=1, check_interval=1, device="cpu")
        s = DynamicLossScaler(backend=backend, **kw)
        if case == "back_off":
            s._hysteresis_tracker.fill_(1)
            s._min_scale_overflows.fill_(3)
        if case != "grow":
            s._found_inf.fill_(1.0)
        s._n_updates = 4
        return s

    def run(s):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s.update()

    targets = _ALLOCATORS + [(torch.Tensor, m) for m in _OPERATORS]
    assert _sweep(make, run, _scaler_snapshot, targets=targets) >= 15


# -- DynamicLossScaler.unscale_ and fused_ops.unscale_ over several dtype groups ------------------------------------


def _grads(strided: bool):
    g = [torch.randn(40) * 1024, (torch.randn(33) * 1024).bfloat16(), (torch.randn(7, 3) * 1024).half()]
    if strided:  # (a non-contiguous fp32 grad: unscaled through a contiguous copy)
        g.append((torch.randn(6, 4) * 1024).t())
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_out", [False, True])
def test_scaler_unscale_fault_leaves_grads_unchanged(backend, with_out):
    seed = torch.randint(0, 2**31, ()).item()

    def make():
        torch.manual_seed(seed)
        s = DynamicLossScaler(init_scale=1024.0, device="cpu", backend=backend, warn_after=None)
        g = _grads(strided=not with_out)
        out = [torch.full(x.shape, 7.0) for x in g] if with_out else None
        return s, g, out

    def run(state):
        s, g, out = state
        s.unscale_(g, out=out)

    def snapshot(state):
        s, g, out = state
        return _scaler_snapshot(s) + [_bits(x) for x in g + (out or [])]

    assert _sweep(make, run, snapshot) >= 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaler_unscale_failed_launch_is_not_applied_twice(backend, monkeypatch):
    """A launch that fails after an earlier group was written: the written grads are recorded, and the retry is
    refused (it would divide them twice) instead of silently applied."""
    g = _grads(strided=False)
    g0 = [x.clone() for x in g]
    s = DynamicLossScaler(init_scale=1024.0, device="cpu", backend=backend, warn_after=None)
    orig, calls = _ops.unscale_eager, [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise torch.OutOfMemoryError("injected: second launch")
        return orig(*args)

    monkeypatch.setattr(_ops, "unscale_eager", failing)
    with pytest.raises(torch.OutOfMemoryError):
        s.unscale_(g)
    monkeypatch.setattr(_ops, "unscale_eager", orig)
    assert torch.equal(g[0], g0[0] / 1024) and torch.equal(g[1], g0[1]) and torch.equal(g[2], g0[2])
    with pytest.raises(RuntimeError, match="already unscaled"):
        s.unscale_(g)
    assert torch.equal(g[0], g0[0] / 1024) and torch.equal(g[1], g0[1])
    s.update()  # (a new step: may be unscaled again)
    s.unscale_([g[1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_unscale_fault_leaves_grads_unchanged(backend):
    seed = torch.randint(0, 2**31, ()).item()

    def make():
        torch.manual_seed(seed)
        g = _grads(strided=True)
        g[1][3] = float("inf")
        return g, torch.zeros(1), torch.tensor([1.0 / 1024])

    def run(state):
        g, flag, inv = state
        fused_ops.unscale_(g, inv, flag, backend=backend)

    def snapshot(state):
        return [_bits(x) for x in state[0] + [state[1], state[2]]]

    assert _sweep(make, run, snapshot) >= 3


# -- clip_grad_norm_ ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, layout",
    [
        pytest.param("triton", "dtypes", marks=pytest.mark.interpret),
        ("reference", "dtypes"),
        ("reference", "twice_and_strided"),
    ],  # fmt: skip
)
def test_clip_grad_norm_fault_leaves_grads_unchanged(backend, layout):
    """Dtype groups (three; two under the interpreter, which is slow); or two, a grad listed twice (two rounds) and a
    non-contiguous grad (torch's multiply; the rounds' launches are the dtype groups': reference backend only)."""
    seed = torch.randint(0, 2**31, ()).item()

    def make():
        torch.manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(15)), torch.nn.Parameter(torch.randn(4).bfloat16())]
        if layout == "dtypes" and backend == "reference":  # (two groups under the interpreter: it is slow)
            ps.append(torch.nn.Parameter(torch.randn(3, 2).half()))
        for p in ps:
            p.grad = torch.randn_like(p) * 10
        if layout == "twice_and_strided":
            ps.append(torch.nn.Parameter(torch.randn(5, 3)))
            ps[-1].grad = (torch.randn(3, 5) * 10).t()
            ps.append(ps[1])  # (listed twice: multiplied twice, as torch does)
        return ps

    def run(ps):
        functional.clip_grad_norm_(ps, 1.0, backend=backend)

    def snapshot(ps):
        return [_bits(p.grad) for p in ps] + [_bits(p.data) for p in ps]

    assert _sweep(make, run, snapshot) >= 4


# -- FlatBuffer -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage_on_host, hold", [(True, True), (True, False), (False, False)])
def test_from_params_fault_puts_params_back(backend, stage_on_host, hold):
    """A fault anywhere in ``from_params`` (a host buffer, the device storage, a copy, the binding) leaves every param
    on its original device, dtype, shape, strides and values; on its original memory when something still holds it
    (``hold``). Three buckets (a tiny cap)."""
    seed = torch.randint(0, 2**31, ()).item()
    held = []

    def make():
        torch.manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(7, 3)),
              torch.nn.Parameter(torch.randn(4, 6).t())]  # fmt: skip
        held[:] = [p.data for p in ps] if hold else []
        return ps, []

    def run(state):
        ps, built = state
        kw = dict(align=4, bucket_cap_mb=1e-4, stage_on_host=stage_on_host, backend=backend)
        built.append(FlatBuffer.from_params(ps, **kw))

    def snapshot(state):
        ps, built = state
        where = [p.data_ptr() for p in ps] if hold else []
        if built:  # (after the retry: each param a view of the buffer's data)
            buf = built[0]
            where = [len(buf.buckets), _bits(buf.data)] + [p.data_ptr() - buf.data.data_ptr() for p in ps]
        return [_bits(p.data) for p in ps] + [p.requires_grad for p in ps] + where

    assert _sweep(make, run, snapshot) >= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_for_grads_fault_leaves_grads_unchanged(backend):
    seed = torch.randint(0, 2**31, ()).item()

    def make():
        torch.manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(9)), torch.nn.Parameter(torch.randn(3, 5)),
              torch.nn.Parameter(torch.randn(12))]  # fmt: skip
        ps[0].grad, ps[2].grad = torch.randn(9), torch.randn(12)
        return ps, [p.grad for p in ps], []

    def run(state):
        state[2].append(FlatBuffer.for_grads(state[0], align=4, bucket_cap_mb=1e-4, backend=backend))

    def snapshot(state):
        ps, grads, built = state
        if built:
            buf = built[0]
            return [_bits(buf.data)] + [p.grad.data_ptr() - buf.data.data_ptr() for p in ps]
        return [p.grad is g for p, g in zip(ps, grads)] + [_bits(p.grad) for p in ps]

    assert _sweep(make, run, snapshot) >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_bind_grads_interrupted_puts_grads_back(backend, monkeypatch):
    ps = [torch.nn.Parameter(torch.randn(9)) for _ in range(4)]
    ps[1].grad = torch.randn(9)
    grads = [p.grad for p in ps]
    buf = FlatBuffer([p.detach() for p in ps], align=4, backend=backend)
    orig, calls = torch.Tensor.view, [0]

    def failing(self, *args):
        if sys._getframe(1).f_code.co_filename.endswith("buffers.py"):
            calls[0] += 1
            if calls[0] == 3:
                raise torch.OutOfMemoryError("injected: third grad view")
        return orig(self, *args)

    monkeypatch.setattr(torch.Tensor, "view", failing)
    with pytest.raises(torch.OutOfMemoryError):
        buf.bind_grads_(ps)
    monkeypatch.setattr(torch.Tensor, "view", orig)
    assert calls[0] == 3
    assert all(p.grad is g for p, g in zip(ps, grads))
    buf.bind_grads_(ps)
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(ps, buf.views))


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_from_cast_fault_leaves_data_unchanged(backend):
    """``copy_from_`` with a cast over two source dtypes (two cast groups) and padding: a fault leaves ``data`` as it
    was."""
    seed = torch.randint(0, 2**31, ()).item()

    def make():
        torch.manual_seed(seed)
        buf = FlatBuffer([torch.randn(5), torch.randn(3, 3), torch.randn(6)], align=4, backend=backend)
        return buf, [torch.randn(5).bfloat16(), torch.randn(3, 3).half(), torch.randn(6).bfloat16()]

    def run(state):
        state[0].copy_from_(state[1])

    def snapshot(state):
        return [_bits(state[0].data)] + [_bits(x) for x in state[1]]

    assert _sweep(make, run, snapshot) >= 2


@pytest.mark.parametrize("case", ["in_place", "in_place_growing", "float64", "out"])
def test_reference_unscale_fault_leaves_grads_unchanged(case, monkeypatch):
    """``fused_ops.reference.unscale_`` itself (the reference backend's op): every allocation, its own included,
    comes before the first write, so a fault anywhere leaves grads, outputs and found_inf as they were."""
    monkeypatch.setattr(sys.modules[__name__], "_OURS", _OURS + (os.path.abspath(fused_ops.reference.__file__),))
    seed = torch.randint(0, 2**31, ()).item()

    def make():
        torch.manual_seed(seed)
        g = _grads(strided=True)
        if case == "float64":
            g = [x.double() for x in g]
        g[1][3] = float("inf")
        out = [torch.full(x.shape, 7.0, dtype=torch.float16) for x in g] if case == "out" else []
        inv = torch.tensor([3.0]) if case == "in_place_growing" else 1.0 / 1024
        return g, out, torch.zeros(()), inv

    def run(state):
        g, out, flag, inv = state
        fused_ops.reference.unscale_(g, inv, flag, out)

    def snapshot(state):
        g, out, flag, _ = state
        return [_bits(x) for x in g + out + [flag]]

    assert _sweep(make, run, snapshot) >= 4


def test_reference_stochastic_cast_fault_leaves_dst_unchanged(monkeypatch):
    """``fused_ops.reference.cast_`` with stochastic rounding (one rounding per tensor, then the plain copies): every
    rounded value is computed before the first write, so a fault anywhere leaves every dst as it was."""
    monkeypatch.setattr(sys.modules[__name__], "_OURS", _OURS + (os.path.abspath(fused_ops.reference.__file__),))
    seed = torch.randint(0, 2**31, ()).item()

    def make():
        torch.manual_seed(seed)
        src = [torch.randn(7), torch.randn(3, 5), torch.randn(4).double(), torch.randn(9)]
        dst = [torch.full((7,), 7.0, dtype=torch.bfloat16), torch.full((3, 5), 7.0, dtype=torch.float16),
               torch.full((4,), 7.0), torch.full((9,), 7.0, dtype=torch.bfloat16)]  # fmt: skip
        return dst, src

    def run(state):
        fused_ops.reference.cast_(state[0], state[1], stochastic=True, seed=1234)

    def snapshot(state):
        return [_bits(x) for x in state[0] + state[1]]

    assert _sweep(make, run, snapshot) >= 4
