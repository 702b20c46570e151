"""A reused plan checks its params, grads and states chunk by chunk (``_base._CHUNK`` params at a time): a change in
any chunk, first, middle or last, is seen as the whole-list check saw it.

The oracle is the same optimizer with its plans dropped (what ``add_param_group`` does): the checked step. After
the same change, the reused plan must give bit for bit what the checked step gives, or raise the same error with
nothing changed. Then the plan-reuse tests of test_step_plan.py run again with chunks of 2 params, so that their
params spread over several chunks.
"""

import pytest
import torch

from fused_ops import FusedAdamW, FusedSGD
from fused_ops.optim import _base

from .test_step_plan import *  # noqa: F403 (run again with chunks of 2 params)

pytestmark = pytest.mark.interpret


@pytest.fixture(autouse=True)
def _chunks_of_two(monkeypatch):
    monkeypatch.setattr(_base, "_CHUNK", 2)


N = 9  # params: chunks [0, 1] [2, 3] [4, 5] [6, 7] [8]
WITHOUT_GRAD = 5  # (a param without a grad when the plan is built)


def _first_key(opt):
    return next(iter(opt._state_keys(opt.param_groups[0])))


def _first_state(p, opt):
    return opt.state[p][_first_key(opt)]


def _grad_storage_freed(p, opt):
    p.grad.untyped_storage().resize_(0)


def _state_dict_behind(p, opt):
    dict.__setitem__(opt.state, p, dict(opt.state[p]))


MUTATIONS = {
    "grad moved": lambda p, opt: setattr(p, "grad", p.grad.clone()),
    "grad dropped": lambda p, opt: setattr(p, "grad", None),
    "grad strided": lambda p, opt: setattr(p, "grad", torch.randn(p.numel() * 2)[::2]),
    "grad storage freed": _grad_storage_freed,
    "param .data": lambda p, opt: setattr(p, "data", p.data.clone()),
    "state set_": lambda p, opt: _first_state(p, opt).set_(torch.full_like(_first_state(p, opt), 1)),
    "state .data": lambda p, opt: setattr(_first_state(p, opt), "data", torch.full_like(_first_state(p, opt), 2)),
    "state behind the counter": lambda p, opt: dict.update(
        opt.state[p], {_first_key(opt): torch.full_like(_first_state(p, opt), 3)}
    ),
    "state dict behind the counter": _state_dict_behind,
    "step count set_": lambda p, opt: opt.state[p]["step"].set_(torch.tensor(7.0)),
}


def _build(make):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3 + i % 4)) for i in range(N)]
    opt = make(params)
    for _ in range(2):
        for i, p in enumerate(params):
            p.grad = None if i == WITHOUT_GRAD else torch.randn_like(p)
        opt.step()
    for i, p in enumerate(params):
        p.grad = None if i == WITHOUT_GRAD else torch.randn_like(p)
    return params, opt


def _snapshot(params, opt):
    out = [p.detach().clone() for p in params]
    for p in params:
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor):
                out.append(v.detach().clone())
    return out


def _step(opt):
    try:
        opt.step()
        return None
    except Exception as e:  # noqa: BLE001 (compared with the checked step's)
        return type(e), str(e)


OPTIMIZERS = {
    "adamw": lambda ps: FusedAdamW(ps, lr=0.05, weight_decay=0.1, backend="triton"),
    "adamw int8": lambda ps: FusedAdamW(ps, lr=0.05, backend="triton", state_dtype="int8"),
    "sgd": lambda ps: FusedSGD(ps, lr=0.05, momentum=0.9, backend="triton"),
}


CASES = [("adamw", 8, m) for m in MUTATIONS] + [
    ("adamw", 3, "state set_"),
    ("adamw", WITHOUT_GRAD, "grad moved"),
    *[(make, 8, m) for make in ("adamw int8", "sgd") for m in ("grad moved", "state set_")],
]


@pytest.mark.parametrize(("make", "where", "mutation"), CASES)
def test_change_in_any_chunk_is_seen_as_the_checked_step_sees_it(make, where, mutation):
    reused, opt = _build(OPTIMIZERS[make])
    checked, opt_c = _build(OPTIMIZERS[make])
    plan = opt._plans[0]
    assert len(plan.chunks) == 4  # (8 params with grads)
    if where == WITHOUT_GRAD:  # give the param without a grad one (its chunk: none, it had no grad)
        for ps in (reused, checked):
            ps[where].grad = torch.full_like(ps[where], 0.125)
    else:
        for ps, o in ((reused, opt), (checked, opt_c)):
            torch.manual_seed(1)
            MUTATIONS[mutation](ps[where], o)
    for p in opt_c._plans.values():
        opt_c._flush_marks(p)
    opt_c._plans.clear()  # (what add_param_group does: the next step is checked)
    before = _snapshot(reused, opt)
    err, err_c = _step(opt), _step(opt_c)
    assert err == err_c
    after, after_c = _snapshot(reused, opt), _snapshot(checked, opt_c)
    assert len(after) == len(after_c)
    for a, b in zip(after, after_c):
        assert torch.equal(a, b)
    if err is not None:  # nothing changed
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    # And the step after it, on fresh grads, agrees as well (the plan the changed step left, or built)
    for ps in (reused, checked):
        gen = torch.Generator().manual_seed(2)
        for p in ps:
            if p.grad is not None:
                p.grad = torch.randn(p.shape, generator=gen)
    assert _step(opt) == _step(opt_c) is None
    for a, b in zip(_snapshot(reused, opt), _snapshot(checked, opt_c)):
        assert torch.equal(a, b)
