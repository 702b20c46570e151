"""Groups and states edited by hand between steps (probe 58): what torch.optim does, or a clear error with
everything unchanged.

- ``opt.state`` replaced by a plain mapping is taken over at the next step (eager or compiled) and watched again:
  plans are reused afterwards (they were rebuilt at every step: 10x the host time);
- a step count that float32 cannot hold is refused (it became inf silently);
- hyper-parameters of the wrong type are TypeErrors naming the key and the group;
- a key deleted from a group that has stepped is refused (it was filled with the legacy default, turning amsgrad,
  maximize or nesterov off silently); ``differentiable=True`` set by hand is refused as in the constructor.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fused_ops import FusedAdamW, FusedLion, FusedSGD

from .safety import expect_error_unchanged

pytestmark = pytest.mark.safety

BACKENDS = ["reference", "triton"]


def _trained(make, n_params: int = 3, steps: int = 2):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5 + i)) for i in range(n_params)]
    opt = make(ps)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("replace", ["dict", "copy", "setstate"])
def test_replaced_state_is_watched_again(backend, replace):
    ps, opt = _trained(lambda ps: FusedAdamW(ps, lr=1e-2, backend=backend))
    twin_ps, twin = _trained(lambda ps: FusedAdamW(ps, lr=1e-2, backend=backend))
    if replace == "dict":
        opt.state = dict(opt.state)
    elif replace == "copy":
        opt.state = copy.copy(opt.state)
    else:
        opt.__setstate__({"state": dict(opt.state)})
    plans = []
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ps]
        for p, q, g in zip(ps, twin_ps, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        twin.step()
        plans.append(opt._plans[0])
    assert plans[1] is plans[2] and plans[2].reusable, "the plan is rebuilt at every step after opt.state = ..."
    for p, q in zip(ps, twin_ps):
        assert torch.equal(p, q)


def test_compiled_step_takes_over_a_plain_state():
    ps, opt = _trained(lambda ps: FusedAdamW(ps, lr=1e-2, backend="reference"), steps=1)
    twin_ps, twin = _trained(lambda ps: FusedAdamW(ps, lr=1e-2, backend="reference"), steps=1)
    opt.state = {}
    twin.state = {}
    step = torch.compile(opt.step, backend="eager", fullgraph=False)
    for p, q in zip(ps, twin_ps):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    step()
    twin.step()
    for p, q in zip(ps, twin_ps):
        assert float(opt.state[p]["step"]) == 1.0
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "count", [1e39, 2**200, float("inf"), "f64 tensor 1e39"], ids=["float", "int", "inf", "f64-tensor"]
)
def test_step_count_float32_cannot_hold_is_refused(backend, count):
    ps, opt = _trained(lambda ps: FusedAdamW(ps, lr=1e-2, backend=backend))
    opt.state[ps[1]]["step"] = torch.tensor(1e39, dtype=torch.float64) if isinstance(count, str) else count
    for p in ps:
        p.grad = torch.randn_like(p)
    err = expect_error_unchanged(opt.step, ValueError, "float32 holds", opt)
    assert "state 'step' of param 1" in str(err)


@pytest.mark.parametrize(
    "make, key, value, words",
    [
        (lambda ps: FusedAdamW(ps, lr=1e-2), "eps", "1e-8", ["eps of param group 0", "str"]),
        (lambda ps: FusedAdamW(ps, lr=1e-2), "weight_decay", None, ["weight_decay of param group 0"]),
        (lambda ps: FusedAdamW(ps, lr=1e-2), "betas", ("0.9", 0.999), ["betas[0] of param group 0"]),
        (lambda ps: FusedAdamW(ps, lr=1e-2), "betas", None, ["betas of param group 0", "NoneType"]),
        (lambda ps: FusedAdamW(ps, lr=1e-2), "lr", np.array(0.003), ["lr of param group 0", "ndarray"]),
        (lambda ps: FusedLion(ps, lr=1e-3), "betas", ("0.9", 0.99), ["betas[0]", "param group 0"]),
        (lambda ps: FusedSGD(ps, lr=1e-2, momentum=0.9), "momentum", "0.9", ["momentum", "param group 0"]),
    ],
)
def test_wrong_type_names_the_key_and_group(make, key, value, words):
    ps, opt = _trained(lambda ps: make(ps))
    opt.param_groups[0][key] = value
    for p in ps:
        p.grad = torch.randn_like(p)
    err = expect_error_unchanged(opt.step, TypeError, "must be", opt)
    for w in words:
        assert w in str(err), f"{err} does not name {w!r}"


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda ps: FusedAdamW(ps, lr=1e-2, amsgrad=True), "amsgrad"),
        (lambda ps: FusedAdamW(ps, lr=1e-2, maximize=True), "maximize"),
        (lambda ps: FusedSGD(ps, lr=1e-2, momentum=0.9, nesterov=True), "nesterov"),
        (lambda ps: FusedLion(ps, lr=1e-3, maximize=True), "maximize"),
    ],
)
def test_key_deleted_from_a_stepped_group_is_refused(make, key):
    ps, opt = _trained(make)
    del opt.param_groups[0][key]
    for p in ps:
        p.grad = torch.randn_like(p)
    err = expect_error_unchanged(opt.step, ValueError, "and its params have states", opt)
    assert repr(key) in str(err) and "param group 0" in str(err)


def test_group_appended_by_hand_still_gets_defaults():
    ps, opt = _trained(lambda ps: FusedAdamW(ps, lr=1e-2, amsgrad=True))
    q = torch.nn.Parameter(torch.randn(4))
    group = {"params": [q], "lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    opt.param_groups.append({**group, "decoupled_weight_decay": True})
    q.grad = torch.randn(4)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.param_groups[1]["amsgrad"] is False and float(opt.state[q]["step"]) == 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: FusedAdamW(ps, lr=1e-2),
        lambda ps: FusedSGD(ps, lr=1e-2, momentum=0.9),
        lambda ps: FusedLion(ps, lr=1e-3),
    ],  # fmt: skip
    ids=["adamw", "sgd", "lion"],
)
def test_differentiable_set_by_hand_is_refused(make):
    ps, opt = _trained(make)
    opt.param_groups[0]["differentiable"] = True
    for p in ps:
        p.grad = torch.randn_like(p)
    expect_error_unchanged(opt.step, ValueError, "differentiable=True", opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, b: FusedAdamW(ps, lr=1e-2, backend=b),
        lambda ps, b: FusedAdamW(ps, lr=1e-2, state_dtype="int8", backend=b),
        lambda ps, b: FusedSGD(ps, lr=1e-2, momentum=0.9, backend=b),
        lambda ps, b: FusedLion(ps, lr=1e-3, backend=b),
    ],
    ids=["adamw", "adamw_int8", "sgd", "lion"],
)
def test_param_of_another_shape_keeps_no_stale_states(backend, make):
    """(probe 57) A param given another shape of the same element count (``p.data = p.data.t().contiguous()``, a
    parametrization storing the weight transposed) would pair its old states with other elements: refused, as
    torch.optim's elementwise ops refuse it."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, 5))
    opt = make([p], backend)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    p.data = p.data.t().contiguous()
    p.grad = torch.randn_like(p)
    err = expect_error_unchanged(opt.step, ValueError, "changed shape", opt)
    assert "(7, 5)" in str(err) and "(5, 7)" in str(err)
    opt.state[p] = {}  # (the fix the message names)
    opt.step()


def test_flat_state_of_a_contiguous_param_still_steps():
    torch.manual_seed(0)
    w = torch.randn(7, 5)
    ps = [torch.nn.Parameter(w.clone()) for _ in range(2)]
    opts = [FusedAdamW([p], lr=1e-2, backend="reference") for p in ps]
    for step in range(3):
        g = torch.randn(7, 5)
        for p, opt in zip(ps, opts):
            p.grad = g.clone()
            opt.step()
        if step == 0:
            st = opts[1].state[ps[1]]
            st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].reshape(-1), st["exp_avg_sq"].reshape(-1)
    assert torch.equal(ps[0], ps[1])


def test_same_param_twice_is_refused_naming_both_places():
    """(probe 57) One param twice in a group (tied weights collected by hand): torch.optim warns and steps it
    twice; refused here at construction, naming both positions (it was refused only at the first step, as two
    tensors sharing memory, with indices among the params with grads)."""
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    with pytest.raises(ValueError, match="param group 0 holds the same param at positions 1 and 3"):
        FusedAdamW([a, b, c, b], lr=1e-2)
    opt = FusedAdamW([a], lr=1e-2)
    with pytest.raises(ValueError, match="param group 1 holds the same param at positions 0 and 1"):
        opt.add_param_group({"params": [c, c]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b]})
    for p in (a, b, c):
        p.grad = torch.randn(3)
    opt.step()
    opt.param_groups[1]["params"].append(a)  # (by hand: in group 0 too)
    expect_error_unchanged(opt.step, ValueError, r"param group 1 holds the same param \(position 1\), and param "
                           r"group 0 \(position 0\)", opt)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["amsgrad", "maximize", "decoupled_weight_decay"])
def test_flags_the_launch_reads_as_bools(backend, key):
    """A flag that has no truth value (a numpy array of two elements) is refused before any group steps; a numpy
    bool steps as the bool (the Triton launch takes ``bool(...)``, never the object itself)."""
    ps, opt = _trained(lambda ps: FusedAdamW(ps, lr=1e-2, backend=backend))
    twin_ps, twin = _trained(lambda ps: FusedAdamW(ps, lr=1e-2, backend=backend))
    opt.param_groups[0][key] = np.array([1, 0])
    for p in ps:
        p.grad = torch.randn_like(p)
    expect_error_unchanged(opt.step, TypeError, f"{key} of param group 0 must be a bool", opt)
    opt.param_groups[0][key] = np.array(key == "decoupled_weight_decay")
    twin.param_groups[0][key] = key == "decoupled_weight_decay"
    for p, q in zip(ps, twin_ps):
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(ps, twin_ps):
        assert torch.equal(p, q)
