"""Scalar tensors a step reads through a pointer (a tensor ``lr``, ``grad_scale``, ``found_inf``) that share memory
with what the step writes (a param, a state, a step count): refused, with everything bit-identical, by the
optimizers (first step and reused plans), ``functional.adam_`` and the custom ops, on both backends. Every program
of a launch reads the scalar while some program writes it, so the step was half applied (the Triton backend) or
applied with a value that changed part way (torch's fused CPU kernels). A scalar inside a grad (read, never
written) is allowed and gives the result of its copy.

Also: the custom ops called directly refuse the numbers ``functional.adam_`` refuses (step 0, inf lr, NaN betas).
"""

from __future__ import annotations

import pytest
import torch

import fused_ops
from tests.safety import expect_error_unchanged, isolated, message_names

pytestmark = pytest.mark.safety

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpret)]
KINDS = ["adamw", "adamw_int8", "sgd", "lion"]
SCALARS = ["lr", "grad_scale", "found_inf"]
SIZES = (37, 300)  # (the int8 states' blocks are 256 elements: the second param has two)


def _optimizer(kind: str, params: list[torch.Tensor], backend: str) -> torch.optim.Optimizer:
    if kind == "adamw":
        return fused_ops.FusedAdamW(params, lr=1e-2, backend=backend)
    if kind == "adamw_int8":
        return fused_ops.FusedAdamW(params, lr=1e-2, state_dtype="int8", backend=backend)
    if kind == "sgd":
        return fused_ops.FusedSGD(params, lr=0.1, momentum=0.9, backend=backend)
    return fused_ops.FusedLion(params, lr=1e-3, backend=backend)


def _model(kind: str, backend: str) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = [torch.randn(n, requires_grad=True) for n in SIZES]
    for p in params:
        p.grad = torch.randn_like(p)
    return params, _optimizer(kind, params, backend)


def _step_with(opt: torch.optim.Optimizer, which: str, scalar: torch.Tensor):
    """The step call with ``scalar`` as ``which`` (an ``lr`` is set in the group now: a snapshot taken after this
    holds it)."""
    if which == "lr":
        opt.param_groups[0]["lr"] = scalar
        return opt.step
    return lambda: opt.step(**{which: scalar})


def _inside(t: torch.Tensor, value: float) -> torch.Tensor:
    """A 1-element view of ``t``'s memory, holding ``value`` (a scale > 0 or a found_inf of 0, so that only the
    sharing makes the step wrong)."""
    view = t.detach().view(-1)[t.numel() // 2 :][:1]
    with torch.no_grad():
        view.fill_(value)
    return view


def _value(which: str) -> float:
    return 0.0 if which == "found_inf" else 0.5


def _floating_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return sorted((k, v) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.is_floating_point())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@isolated
def test_optimizer_refuses_a_scalar_inside_written_memory(kind, backend):
    for which in SCALARS:
        # the first step (the plan is built): inside the second param
        params, opt = _model(kind, backend)
        scalar = _inside(params[1], _value(which))
        err = expect_error_unchanged(_step_with(opt, which, scalar), ValueError, "share memory", opt)
        message_names(err, "lr of param group 0" if which == "lr" else which, "params[1]")
        assert not opt.state[params[0]], "a refused first step created states"

        # a reused plan (a good step first): inside each floating state tensor of the first param, step count
        # included, and inside the second param
        params, opt = _model(kind, backend)
        opt.step()
        targets = [*_floating_state(opt, params[0]), ("param", params[1])]
        for key, target in targets:
            scalar = _inside(target, _value(which))
            if which == "lr":
                lr = opt.param_groups[0]["lr"]
            err = expect_error_unchanged(_step_with(opt, which, scalar), ValueError, "share memory", opt)
            message_names(err, "lr of param group 0" if which == "lr" else which)
            assert key == "param" or "states" in str(err) or "step counts" in str(err), str(err)
            if which == "lr":
                opt.param_groups[0]["lr"] = lr
        opt.step()  # (the optimizer still steps with its own scalars)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@isolated
def test_optimizer_takes_a_scalar_inside_a_grad(kind, backend):
    """Grads are read, never written: a scalar inside one is allowed and gives the step of its copy."""
    for which in SCALARS:
        params, opt = _model(kind, backend)
        twin_params, twin = _model(kind, backend)
        with torch.no_grad():
            for p, q in zip(params, twin_params):
                q.copy_(p)
                q.grad.copy_(p.grad)
        opt.step()
        twin.step()  # (both plans are built: the next step reuses them)
        scalar = _inside(params[1].grad, _value(which))
        _inside(twin_params[1].grad, _value(which))
        _step_with(opt, which, scalar)()
        _step_with(twin, which, scalar.clone())()
        for p, q in zip(params, twin_params):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# functional.adam_ and the custom ops


def _adam_tensors(n: int = 41) -> dict:
    return dict(params=[torch.randn(n), torch.randn(n)], grads=[torch.randn(n), torch.randn(n)],
                exp_avgs=[torch.zeros(n), torch.zeros(n)], exp_avg_sqs=[torch.zeros(n), torch.zeros(n)],
                state_steps=[torch.zeros(()), torch.zeros(())])  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["params", "exp_avgs", "state_steps"])
@pytest.mark.parametrize("which", SCALARS)
@isolated
def test_functional_adam_refuses_a_scalar_inside_written_memory(which, where, backend):
    t = _adam_tensors()
    scalar = _inside(t[where][1], _value(which))
    kwargs = dict(lr=scalar) if which == "lr" else {which: scalar}
    kwargs.setdefault("lr", 1e-3)
    err = expect_error_unchanged(lambda: fused_ops.functional.adam_(**t, **kwargs, backend=backend), ValueError,
                                 "share memory", t)  # fmt: skip
    message_names(err, which, f"{where}[1]")


def _op_call(op: str, t: dict, backend: str, lr=1e-3, lr_tensor=None, grad_scale=None, found_inf=None, step=None,
             beta1=0.9, beta2=0.999, eps=1e-8):  # fmt: skip
    ops = torch.ops.fused_ops
    if op == "adam_":
        steps = [] if step is not None else t["state_steps"]
        ops.adam_(t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], [], [], steps, lr, lr_tensor, beta1, beta2,
                  eps, 0.01, False, False, True, step, grad_scale, found_inf, backend)  # fmt: skip
    elif op == "adam_lowbit_":
        ops.adam_lowbit_(t["params"], t["grads"], t["codes_m"], t["codes_v"], t["state_steps"], t["scales_m"],
                         t["scales_v"], [], [], "int8", False, 0, lr, lr_tensor, beta1, beta2, eps, 0.01, False, True,
                         grad_scale, found_inf, backend)  # fmt: skip
    elif op == "sgd_":
        ops.sgd_(t["params"], t["grads"], t["exp_avgs"], [], lr, lr_tensor, beta1, 0.0, 0.01, False, False, False,
                 grad_scale, found_inf, backend)  # fmt: skip
    else:
        ops.lion_(t["params"], t["grads"], t["exp_avgs"], [], lr, lr_tensor, beta1, beta2, 0.1, False, grad_scale,
                  found_inf, backend)  # fmt: skip


def _op_tensors(op: str) -> dict:
    t = _adam_tensors()
    if op == "adam_lowbit_":
        n = t["params"][0].numel()
        t["codes_m"] = [torch.zeros(n, dtype=torch.uint8) for _ in range(2)]
        t["codes_v"] = [torch.zeros(n, dtype=torch.uint8) for _ in range(2)]
        t["scales_m"] = [torch.zeros(1) for _ in range(2)]
        t["scales_v"] = [torch.zeros(1) for _ in range(2)]
    return t


OPS = ["adam_", "adam_lowbit_", "sgd_", "lion_"]


def _op_error_unchanged(call, match: str, t: dict) -> BaseException:
    """A ValueError with every tensor of ``t`` bit-identical (not its version counter: the dispatcher bumps it)."""
    return expect_error_unchanged(call, ValueError, match, t, versions=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@isolated
def test_custom_op_refuses_a_scalar_inside_written_memory(op, backend):
    for which in SCALARS:
        for where in ("params", "exp_avgs") if op != "adam_lowbit_" else ("params", "scales_m"):
            t = _op_tensors(op)
            scalar = _inside(t[where][1], _value(which))
            kwargs = dict(lr_tensor=scalar, lr=0.0) if which == "lr" else {which: scalar}
            err = _op_error_unchanged(lambda t=t, k=kwargs: _op_call(op, t, backend, **k), "share memory", t)
            arg = {("sgd_", "exp_avgs"): "momentum_buffers", ("adam_lowbit_", "scales_m"): "exp_avg_scales"}
            message_names(err, f"fused_ops::{op}", which, f"{arg.get((op, where), where)}[1]")


BAD_NUMBERS = [
    ("adam_", dict(step=0.0), "step"),
    ("adam_", dict(step=float("nan")), "step"),
    ("adam_", dict(lr=float("inf")), "lr"),
    ("adam_", dict(beta1=float("nan")), "beta1"),
    ("adam_", dict(beta2=float("-inf")), "beta2"),
    ("adam_", dict(eps=float("nan")), "eps"),
    ("adam_lowbit_", dict(lr=float("nan")), "lr"),
    ("adam_lowbit_", dict(beta2=float("inf")), "beta2"),
    ("sgd_", dict(lr=float("inf")), "lr"),
    ("sgd_", dict(beta1=float("nan")), "momentum"),
    ("lion_", dict(beta1=float("nan")), "beta1"),
    ("lion_", dict(lr=float("-inf")), "lr"),
    ("adam_", dict(lr=1e39), "lr"),  # (finite in float64, inf in the kernels' float32)
    ("adam_lowbit_", dict(eps=1e39), "eps"),
    ("sgd_", dict(lr=-1e39), "lr"),
    ("lion_", dict(beta2=3.5e38), "beta2"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("op", "numbers", "name"), BAD_NUMBERS, ids=[f"{o}-{n}" for o, _, n in BAD_NUMBERS])
@isolated
def test_custom_op_refuses_bad_numbers(op, numbers, name, backend):
    t = _op_tensors(op)
    err = _op_error_unchanged(lambda: _op_call(op, t, backend, **numbers), "must be finite|step must", t)
    message_names(err, f"fused_ops::{op}", name)


@pytest.mark.parametrize("cls", [fused_ops.FusedSGD, fused_ops.FusedLion, fused_ops.FusedAdamW],
                         ids=["sgd", "lion", "adamw"])  # fmt: skip
@isolated
def test_compiled_step_refuses_a_scalar_inside_written_memory(cls):
    """Under ``torch.compile`` the step runs one custom op per group, each checked when it runs: the traced step's
    eager checks must refuse the scalar first, before the first group's op steps."""
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    a.grad, b.grad = torch.randn(4), torch.randn(3)
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.1, backend="reference")
    scale = _inside(b, 0.5)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="eager")
    err = expect_error_unchanged(lambda: step(grad_scale=scale), ValueError, "share memory", opt)
    message_names(err, "grad_scale", "params[1]")
    assert len(opt.state) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_custom_op_with_no_params_refuses_other_tensors(op, backend):
    """No params but a grad or a state: a mismatched call, refused (it was skipped without a check)."""
    t = {k: [] for k in _op_tensors(op)}
    t["grads"] = [torch.randn(3)]
    err = _op_error_unchanged(lambda: _op_call(op, t, backend), "params is empty", t)
    message_names(err, f"fused_ops::{op}", "grads has 1 tensors")
    _op_call(op, {k: [] for k in t}, backend)  # (all empty: a no-op)


@pytest.mark.parametrize("op", OPS)
def test_custom_op_refuses_a_meta_tensor_among_real_ones(op):
    """A meta argument sends a dispatcher call to the op's fake kernel, which did nothing: the step silently never
    ran. Refused, naming the argument; a call of meta tensors only (shape propagation) is still a no-op."""
    for which in ("lr", "grad_scale", "found_inf"):
        t = _op_tensors(op)
        meta = torch.empty(1, device="meta")
        kwargs = dict(lr_tensor=meta, lr=0.0) if which == "lr" else {which: meta}
        err = _op_error_unchanged(lambda t=t, k=kwargs: _op_call(op, t, "reference", **k), "meta tensor", t)
        message_names(err, f"fused_ops::{op}", "lr_tensor" if which == "lr" else which)
    t = {k: [x.to("meta") for x in v] for k, v in _op_tensors(op).items()}
    _op_call(op, t, "reference")


def test_copy_op_refuses_a_meta_tensor_among_real_ones():
    dst, src = [torch.empty(4, dtype=torch.bfloat16)], [torch.empty(4, device="meta")]
    with pytest.raises(ValueError, match="fused_ops::cast_: src is a meta tensor"):
        torch.ops.fused_ops.cast_(dst, src, False, None, "reference")
