"""No user code runs between a launch's checks and the launch (``kernels/_checks.py: NoUserCode``).

A check holds for a tensor's memory as it was when checked: user code running after it could free or replace that
memory (``p.data = t``, ``state["exp_avg"].set_(t)``, ``p.grad.set_(t)``) and the kernel would then write or read
freed memory. User code can run there through a torch function mode, a torch dispatch mode, a tensor subclass's
``__torch_function__``, or the garbage collector (``gc.callbacks``, finalizers). Each test installs such a hook that
mutates a checked tensor the first time it runs inside the package's checked region, and asserts that it never runs
there and that the step is bit for bit the step without the hook. Each mutating case runs in a forked child
(``tests/safety.py: isolated``): a launch on freed memory may crash the process.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fused_ops
from fused_ops import functional
from tests.safety import isolated

pytestmark = pytest.mark.safety

_KERNELS = importlib.import_module("fused_ops.kernels")
PACKAGE_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (fused_ops, _KERNELS))
N = 67  # (a prime: a partial block)


def _inside(region: tuple[str, ...]) -> bool:
    """Whether a frame of the package's ``region`` functions (any package frame when empty) is on the stack."""
    f = sys._getframe(2)
    while f is not None:
        name, path = f.f_code.co_name, f.f_code.co_filename
        if path.startswith(PACKAGE_DIRS) and (not region or name in region):
            return True
        f = f.f_back
    return False


class _Hooks:
    """A torch function mode, a torch dispatch mode and a gc callback, each calling ``mutate`` (once) when it runs
    inside ``region``; ``seen`` counts those runs."""

    def __init__(self, region: tuple[str, ...], mutate) -> None:
        self.region, self.mutate, self.seen = region, mutate, []

    def hit(self, what: str) -> None:
        if _inside(self.region):
            self.seen.append(what)
            if len(self.seen) == 1:
                with torch._C.DisableTorchFunction(), torch.utils._python_dispatch._disable_current_modes():
                    self.mutate()

    def __enter__(self) -> _Hooks:
        hooks = self

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                hooks.hit(f"function {func}")
                return func(*args, **(kwargs or {}))

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                hooks.hit(f"dispatch {func}")
                return func(*args, **(kwargs or {}))

        self._callback = lambda phase, info: hooks.hit(f"gc {phase}")
        gc.callbacks.append(self._callback)
        self._threshold = gc.get_threshold()
        gc.set_threshold(1)  # (a collection at almost every allocation)
        self._modes = [Function(), Dispatch()]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        gc.set_threshold(*self._threshold)
        gc.callbacks.remove(self._callback)


def _optimizer(kind: str, p: torch.nn.Parameter):
    if kind == "adamw":
        return fused_ops.FusedAdamW([p], lr=0.1, backend="triton")
    if kind == "adamw_int8":
        return fused_ops.FusedAdamW([p], lr=0.1, state_dtype="int8", backend="triton")
    if kind == "adamw_bf16_master":
        return fused_ops.FusedAdamW([p], lr=0.1, master_weights=True, backend="triton")
    if kind == "sgd":
        return fused_ops.FusedSGD([p], lr=0.1, momentum=0.9, backend="triton")
    assert kind == "lion"
    return fused_ops.FusedLion([p], lr=0.1, backend="triton")


def _stepped(kind: str, mutation: str | None, hooked: bool) -> tuple[torch.Tensor, dict, list[str]]:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if kind == "adamw_bf16_master" else torch.float32
    p = torch.nn.Parameter(torch.randn(N, dtype=dtype))
    opt = _optimizer(kind, p)
    p.grad = torch.randn(N, dtype=dtype)
    opt.step()  # (builds the plan: the next step reuses it)
    p.grad = torch.randn(N, dtype=dtype)
    state = opt.state[p]
    first_state = next(v for k, v in state.items() if torch.is_tensor(v) and v.numel() == N)

    def mutate() -> None:
        if mutation == "p.data":
            p.data = torch.zeros_like(p)
        elif mutation == "state.set_":
            first_state.set_(torch.zeros_like(first_state))
        elif mutation == "grad.set_":
            p.grad.set_(torch.zeros_like(p.grad))
        mutate.junk = [torch.full((N,), 7.0, dtype=dtype) for _ in range(4)]  # (reuses freed memory)

    seen: list[str] = []
    if hooked:
        with _Hooks(("_step_eager",), mutate) as hooks:
            opt.step(grad_scale=1.0)
        seen = hooks.seen
    else:
        opt.step(grad_scale=1.0)
    return p.detach().clone(), {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}, seen


@pytest.mark.parametrize("mutation", ["p.data", "state.set_", "grad.set_"])
@pytest.mark.parametrize("kind", ["adamw", "adamw_int8", "adamw_bf16_master", "sgd", "lion"])
@isolated
def test_optimizer_step_runs_no_user_code_after_its_checks(kind, mutation):
    want_p, want_state, _ = _stepped(kind, None, hooked=False)
    p, state, seen = _stepped(kind, mutation, hooked=True)
    assert seen == [], f"user code ran inside the checked step: {seen[:5]}"
    assert torch.equal(p, want_p)
    assert state.keys() == want_state.keys()
    for k in state:
        assert torch.equal(state[k], want_state[k]), k


def test_modes_still_see_the_ops_outside_the_step():
    """Only the checked region is hidden from the modes: the user's own ops around the step are seen as before."""
    p = torch.nn.Parameter(torch.randn(N))
    opt = fused_ops.FusedAdamW([p], lr=0.1, backend="triton")
    p.grad = torch.randn(N)
    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func, _inside(("_step_eager",))))
            return func(*args, **(kwargs or {}))

    with Count():
        opt.step()
        p.detach().mul(2)
    assert (torch.ops.aten.mul.Tensor, False) in seen
    assert not any(inside for _, inside in seen)


def _functional_cases():
    def adam(mutate_target):
        torch.manual_seed(1)
        p, g, m, v = (torch.randn(N) for _ in range(4))
        v = v.abs()
        step = torch.zeros(())
        tensors = dict(p=p, g=g, m=m, v=v)

        def run():
            functional.adam_([p], [g], [m], [v], None, [step], lr=0.1, backend="triton")

        return tensors, run

    def cast(mutate_target):
        torch.manual_seed(2)
        src, dst = torch.randn(N), torch.full((N,), float("nan"), dtype=torch.bfloat16)
        return dict(src=src, dst=dst), lambda: functional.cast_([dst], [src], backend="triton")

    def unscale(mutate_target):
        torch.manual_seed(3)
        g, found = torch.randn(N), torch.zeros(1)
        return dict(g=g, found=found), lambda: functional.unscale_([g], torch.tensor([0.5]), found, backend="triton")

    def flat_buffer(mutate_target):
        torch.manual_seed(4)
        xs = [torch.randn(N), torch.randn(5)]
        buf = fused_ops.FlatBuffer.from_params([torch.zeros(N), torch.zeros(5)], backend="triton")
        return dict(x0=xs[0], data=buf.data), lambda: buf.copy_from_(xs)

    # (each with the function whose frame is the checked region: entered inside the guard, whose first lines check)
    return {"adam_": (adam, "adam_"), "cast_": (cast, "cast_"), "unscale_": (unscale, "unscale_"),
            "FlatBuffer.copy_from_": (flat_buffer, "copy_from_")}  # fmt: skip


@pytest.mark.parametrize("name", list(_functional_cases()))
@isolated
def test_functional_ops_run_no_user_code_after_their_checks(name):
    make, region = _functional_cases()[name]
    want, run = make(None)
    run()
    want = {k: v.clone() for k, v in want.items()}
    tensors, run = make(None)
    first = next(iter(tensors.values()))

    def mutate():
        first.set_(torch.zeros(4, dtype=first.dtype))  # (a smaller tensor: a launch on the old size overflows it)
        mutate.junk = [torch.full((N,), 7.0) for _ in range(4)]

    with _Hooks((region,), mutate) as hooks:
        run()
    assert hooks.seen == [], f"user code ran inside {name}: {hooks.seen[:5]}"
    for k, v in tensors.items():
        assert torch.equal(v, want[k]), k


@isolated
def test_prepared_launch_holds_the_grads_it_checked():
    """A direct call of a prepared launch (``AdamStep``) watches its grads through weak references: the grads it
    checked are held until the launch, and no user code runs in between."""
    from fused_ops.kernels.adam import AdamStep

    torch.manual_seed(5)
    p, m, v = torch.randn(N), torch.zeros(N), torch.zeros(N)
    step = torch.zeros(())
    holder = {"g": torch.ones(N)}
    launch = AdamStep([p], [holder["g"]], [m], [v], [], [step], amsgrad=False)
    want = torch.ones(N) * 0.1  # exp_avg after one step from zero: (1 - beta1) * grad

    def mutate():
        holder.pop("g", None)  # the only strong reference: the grad would be freed
        mutate.junk = [torch.full((N,), 7.0) for _ in range(4)]

    with _Hooks(("check_current", "check_scalar", "_check_not_written", "_run", "_launch"), mutate) as hooks:
        launch(
            lr=torch.tensor([0.1]), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True
        )
    assert hooks.seen == []
    torch.testing.assert_close(m, want)
    assert [id(g) for g in launch.check_current()] == [id(holder["g"])]  # (the checked grads, held by the call)


def test_gc_and_modes_are_restored_after_the_step_and_after_an_error():
    p = torch.nn.Parameter(torch.randn(N))
    opt = fused_ops.FusedAdamW([p], lr=0.1, backend="triton")
    p.grad = torch.randn(N)
    assert gc.isenabled()
    opt.step()
    assert gc.isenabled()
    opt.param_groups[0]["lr"] = -1.0  # (the step raises)
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.1
    assert gc.isenabled()
    assert torch._C._len_torch_dispatch_stack() == 0
    assert torch._C._is_torch_function_enabled()
    gc.disable()  # the user's choice stays
    try:
        p.grad = torch.randn(N)
        opt.step()
        assert not gc.isenabled()
    finally:
        gc.enable()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode() as mode:
        p.grad = torch.randn(N)
        opt.step()
        assert torch._C._len_torch_dispatch_stack() == 1
        assert torch.utils._python_dispatch._get_current_dispatch_mode() is mode


def test_a_failure_entering_the_guard_leaves_nothing_entered(monkeypatch):
    from fused_ops.kernels._checks import _DEPTH, NoUserCode

    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(torch._C, "DisableTorchFunction", boom)
    with pytest.raises(RuntimeError, match="boom"):
        with NoUserCode():
            pass
    monkeypatch.undo()
    assert gc.isenabled() and _DEPTH.n == 0 and torch._C._is_torch_function_enabled()
    with NoUserCode():
        assert not gc.isenabled() and _DEPTH.n == 1 and not torch._C._is_torch_function_enabled()
    assert gc.isenabled() and _DEPTH.n == 0
