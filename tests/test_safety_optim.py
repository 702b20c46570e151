"""Safety tier for the Adam step: FusedAdam/FusedAdamW and functional.adam_, on both backends.

Bad input gets a clear error (type, and a message naming the argument and the index) with every tensor, state and
step count bit-identical to before; ordinary training-loop changes (``p.data = ...``, a param replaced in its
group, ``opt.state[p] = {}``, a replaced state tensor, a state dict swap) give torch.optim's result. Cases that
crashed the process before are run in a forked child (``isolated``), so a crash fails one test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_ops
from fused_ops import functional
from tests.safety import assert_unchanged, expect_error_unchanged, isolated, message_names, snapshot

pytestmark = pytest.mark.safety

BACKENDS = ["triton", "reference"]
SIZES = [(3, 5), (7,), (2, 2, 3)]


def _model(dtype=torch.float32, sizes=SIZES):
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _pair(backend, opt_kwargs=None, sizes=SIZES):
    """The same params for FusedAdamW (``backend``) and torch.optim.AdamW (for-loop, the reference)."""
    opt_kwargs = opt_kwargs or {}
    ours = _model(sizes=sizes)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        b.grad = a.grad.clone()
    o = fused_ops.FusedAdamW(ours, lr=1e-2, backend=backend, **opt_kwargs)
    t = torch.optim.AdamW(theirs, lr=1e-2, foreach=False, **opt_kwargs)
    return ours, o, theirs, t


def _regrad(ours, theirs):
    for a, b in zip(ours, theirs):
        if a.grad is not None:
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()


def _assert_match(ours, theirs, atol=1e-6):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"param {i}"
        torch.testing.assert_close(a.detach(), b.detach(), atol=atol, rtol=1e-6, msg=f"param {i}")


# ---------------------------------------------------------------------------------------------------------
# 1. functional.adam_: the same checks on both backends, before anything changes


def _adam_args(n=3, dtype=torch.float32, amsgrad=False):
    sizes = [5, 17, 1][:n]
    params = [torch.randn(s, dtype=dtype) for s in sizes]
    return dict(
        params=params,
        grads=[torch.randn_like(p) for p in params],
        exp_avgs=[torch.rand(s) for s in sizes],
        exp_avg_sqs=[torch.rand(s) for s in sizes],
        max_exp_avg_sqs=[torch.rand(s) for s in sizes] if amsgrad else None,
        state_steps=[torch.tensor(float(k + 1)) for k in range(n)],
    )


def _bad_cases():
    """(name, mutate(args) -> kwargs for adam_, exception type, words the message must name)."""

    def set_(key, i, value):
        def mutate(a):
            a[key][i] = value(a)
            return {}

        return mutate

    return [
        ("short grad", set_("grads", 1, lambda a: torch.randn(16)), ValueError, ["grads[1]", "16"]),
        ("long grad", set_("grads", 2, lambda a: torch.randn(4)), ValueError, ["grads[2]"]),
        ("float64 param", set_("params", 0, lambda a: torch.randn(5, dtype=torch.float64)), TypeError, ["params[0]"]),
        ("bf16 state", set_("exp_avgs", 1, lambda a: torch.zeros(17, dtype=torch.bfloat16)), TypeError,
         ["exp_avgs[1]"]),
        ("fp64 state", set_("exp_avg_sqs", 2, lambda a: torch.zeros(1, dtype=torch.float64)), TypeError,
         ["exp_avg_sqs[2]"]),
        ("strided state", set_("exp_avgs", 1, lambda a: torch.zeros(34)[::2]), ValueError, ["exp_avgs[1]"]),
        ("strided param", set_("params", 1, lambda a: torch.zeros(34)[::2]), ValueError, ["params[1]"]),
        ("strided grad", set_("grads", 1, lambda a: torch.zeros(34)[::2]), ValueError, ["grads[1]"]),
        ("int64 step", set_("state_steps", 2, lambda a: torch.tensor(3)), TypeError, ["state_steps[2]"]),
        ("2-element step", set_("state_steps", 0, lambda a: torch.ones(2)), TypeError, ["state_steps[0]"]),
        ("not a tensor", set_("grads", 1, lambda a: [1.0] * 17), TypeError, ["grads[1]"]),
        ("state aliases state", set_("exp_avg_sqs", 1, lambda a: a["exp_avgs"][1]), ValueError,
         ["exp_avgs[1]", "exp_avg_sqs[1]"]),
        ("state aliases param", set_("exp_avgs", 0, lambda a: a["params"][0]), ValueError,
         ["params[0]", "exp_avgs[0]"]),
        ("grad aliases a state", set_("grads", 1, lambda a: a["exp_avg_sqs"][1]), ValueError, ["grads[1]"]),
        ("overlapping states", set_("exp_avgs", 2, lambda a: a["exp_avgs"][1][3:4]), ValueError, ["exp_avgs[1]"]),
        ("step aliases state", set_("state_steps", 0, lambda a: a["exp_avgs"][0][0]), ValueError, ["state_steps[0]"]),
        ("2-element lr", lambda a: {"lr": torch.tensor([1e-3, 1.0])}, ValueError, ["lr"]),
        ("2-element grad_scale", lambda a: {"grad_scale": torch.ones(2)}, ValueError, ["grad_scale"]),
        ("2-element found_inf", lambda a: {"found_inf": torch.zeros(2)}, ValueError, ["found_inf"]),
        ("int found_inf", lambda a: {"found_inf": torch.zeros(1, dtype=torch.int32)}, ValueError, ["found_inf"]),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@isolated
def test_functional_adam_refuses_bad_input(backend, case):
    _, mutate, exc, words = case
    args = _adam_args()
    extra = mutate(args)
    kwargs = {"lr": 1e-3, "weight_decay": 0.1, "backend": backend, **extra}
    err = expect_error_unchanged(lambda: functional.adam_(**args, **kwargs), exc, "adam_", args)
    message_names(err, *words)


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_functional_adam_checks_every_call_after_a_cached_one(backend):
    """A valid call caches the chunk table by address; a shorter, other-dtype or strided tensor at the same address
    must still be refused (the cache key has no dtype nor strides)."""
    args = _adam_args()
    functional.adam_(**args, lr=1e-3, backend=backend)
    base = args["exp_avgs"][1]
    for bad, exc in ((base[:-1], ValueError), (base.view(torch.int32), TypeError), (base[::2], ValueError)):
        again = dict(args, exp_avgs=[args["exp_avgs"][0], bad, args["exp_avgs"][2]])
        expect_error_unchanged(lambda a=again: functional.adam_(**a, lr=1e-3, backend=backend), exc, "exp_avgs",
                               args)  # fmt: skip
    p = args["params"][1]  # the param itself, re-viewed as another dtype at the same address
    again = dict(args, params=[args["params"][0], p.view(torch.bfloat16), args["params"][2]])
    expect_error_unchanged(lambda: functional.adam_(**again, lr=1e-3, backend=backend), (TypeError, ValueError),
                           "adam_", args)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_functional_adam_steps_move_only_after_every_check(backend):
    """Errors found late used to come after torch._foreach_add_ had moved the step counts (reference path)."""
    args = _adam_args()
    args["grads"][2] = torch.randn(1, dtype=torch.float64)  # the last group fails
    expect_error_unchanged(lambda: functional.adam_(**args, lr=1e-3, backend=backend), TypeError, "grads\\[2\\]",
                           args)  # fmt: skip


# Property-based: shapes, dtypes, strides, storage offsets, aliasing. Each example either raises a clear error
# with nothing changed, or gives the same result on both backends and as torch.optim's for-loop AdamW.

_DT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64}


@st.composite
def _adam_inputs(draw):
    n = draw(st.integers(1, 3))
    numels = [draw(st.sampled_from([0, 1, 2, 5, 17, 33])) for _ in range(n)]
    pool = torch.randn(sum(numels) * 2 + 64)
    roles = {}
    for role in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        tensors = []
        for i, k in enumerate(numels):
            how = draw(st.sampled_from(["fresh"] * 6 + ["offset", "strided", "dtype", "short", "alias", "shared"]))
            dtype = torch.float32
            if how == "dtype":
                dtype = _DT[draw(st.sampled_from(list(_DT)))]
            if how == "fresh" or how == "dtype":
                t = torch.randn(k).to(dtype)
            elif how == "offset":
                off = draw(st.integers(0, 7))
                t = pool[off : off + k]
            elif how == "strided":
                t = pool[: 2 * k : 2] if k else pool[:0]
            elif how == "short":
                t = torch.randn(max(k - 1, 0) if k else 1)
            elif how == "alias" and roles:
                other = draw(st.sampled_from(sorted(roles)))
                t = roles[other][i]
            else:  # "shared": the same offset window of the pool as another index may use
                t = pool[:k]
            if role != "grads" and role != "params" and t.dtype != torch.float32 and how != "dtype":
                t = t.float()
            tensors.append(t.abs() if role == "exp_avg_sqs" and how == "fresh" else t)
        roles[role] = tensors
    roles["state_steps"] = [torch.tensor(float(draw(st.integers(0, 5)))) for _ in range(n)]
    return roles


def _clone_all(roles):
    return {k: [t.clone() for t in v] for k, v in roles.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(roles=_adam_inputs())
def test_functional_adam_property(backend, roles):
    before = snapshot(roles)
    originals = {k: [t.detach().clone() for t in ts] for k, ts in roles.items()}  # (values as they were)
    try:
        functional.adam_(**roles, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, backend=backend)
    except (TypeError, ValueError) as e:
        assert "adam_" in str(e) and "[" in str(e), f"the message names no argument: {e}"
        assert_unchanged(before, snapshot(roles))
        return
    # Accepted: then it must equal torch.optim.AdamW's for-loop on clean copies of the inputs as they were.
    expected = originals
    for i, p in enumerate(expected["params"]):
        if p.dtype != torch.float32:
            continue  # (bf16/fp16: covered by the kernel tests' tolerance rule)
        q = torch.nn.Parameter(p.clone())
        q.grad = expected["grads"][i].float()
        o = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, foreach=False)
        o.state[q] = {"step": expected["state_steps"][i].clone(), "exp_avg": expected["exp_avgs"][i].clone(),
                      "exp_avg_sq": expected["exp_avg_sqs"][i].clone()}  # fmt: skip
        o.step()
        torch.testing.assert_close(roles["params"][i], q.detach(), atol=1e-6, rtol=1e-5, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# 2. Stale plans: ordinary changes between steps give torch's result, or a clear error with nothing changed


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_param_data_viewed_as_another_dtype(backend):
    """``p.data = p.data.view(torch.bfloat16)`` kept the old plan (segfault on CPU, NaN with the kernel)."""
    ours, o, _, _ = _pair(backend)
    o.step()
    p = ours[0]
    p.data = p.data.view(torch.bfloat16)  # same address, another dtype and twice the elements
    err = expect_error_unchanged(o.step, (TypeError, ValueError), "param 0", o)
    message_names(err, "param 0")


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_param_data_shrunk_at_the_same_address(backend):
    ours, o, _, _ = _pair(backend)
    o.step()
    p = ours[1]
    p.data = p.data[:3]  # same address, fewer elements
    p.grad = torch.randn(3)
    err = expect_error_unchanged(o.step, ValueError, "exp_avg", o)
    message_names(err, "param 1")


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_param_data_transposed_at_the_same_address(backend):
    """``p.data = p.data.t()`` (same address and size, not contiguous now): the plan's metadata check sees it. A
    square param steps as torch steps it (its states pair with the transposed view element by element; through a
    contiguous copy written back); a non-square one, whose states keep the old shape, is refused as torch refuses
    it (before: every non-contiguous param was refused)."""
    ours, o, theirs, t = _pair(backend, sizes=[(4, 4), (3, 5), (7,)])
    for _ in range(2):
        o.step()
        t.step()
        _regrad(ours, theirs)
    ours[0].data, theirs[0].data = ours[0].data.t(), theirs[0].data.t()
    for _ in range(2):
        ours[0].grad, theirs[0].grad = ours[0].grad.t(), theirs[0].grad.t()  # (autograd gives the param's strides)
        o.step()
        t.step()
        _regrad(ours, theirs)
    assert ours[0].stride() == (1, 4)
    _assert_match(ours, theirs)
    ours[1].data = ours[1].data.t()
    ours[1].grad = torch.randn_like(ours[1])
    err = expect_error_unchanged(o.step, ValueError, "state 'exp_avg'.* has shape \\(3, 5\\), but the param has "
                                 "shape \\(5, 3\\) and is not contiguous", o)  # fmt: skip
    message_names(err, "param 1")


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_param_data_replaced_like_torch(backend):
    """``p.data = new`` (same shape, new memory: weight loading, EMA swaps) steps the new memory, as torch."""
    ours, o, theirs, t = _pair(backend)
    for k in range(4):
        if k == 2:
            new = torch.randn_like(ours[1])
            ours[1].data = new
            theirs[1].data = new.clone()
        o.step()
        t.step()
        _regrad(ours, theirs)
    _assert_match(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_grad_data_changed_at_the_same_address(backend):
    """``g.data = ...`` on a grad (what ``module.half()`` does) is seen although the grad object is the same."""
    ours, o, _, _ = _pair(backend)
    o.step()
    g = ours[2].grad
    g.data = g.data.view(-1)[:5]  # same object, same address, fewer elements
    expect_error_unchanged(o.step, ValueError, "grad of param 2", o)


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_param_replaced_in_its_group_like_torch(backend):
    """The old param kept being stepped with the new one's grad, and the new one never got state."""
    ours, o, theirs, t = _pair(backend)
    o.step()
    t.step()
    new = torch.nn.Parameter(torch.randn(7))
    new.grad = torch.randn(7)
    new_t = torch.nn.Parameter(new.detach().clone())
    new_t.grad = new.grad.clone()
    old = ours[1].detach().clone()
    o.param_groups[0]["params"][1] = new
    t.param_groups[0]["params"][1] = new_t
    for _ in range(3):
        o.step()
        t.step()
    torch.testing.assert_close(new.detach(), new_t.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(ours[1].detach(), old), "the replaced param was stepped"
    assert o.state[new]["step"].item() == t.state[new_t]["step"].item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_state_reset_like_torch(backend):
    """``opt.state[p] = {}``: the old moments kept being updated and state_dict() lost them."""
    ours, o, theirs, t = _pair(backend)
    for k in range(4):
        if k == 2:
            o.state[ours[0]] = {}
            t.state[theirs[0]] = {}
        o.step()
        t.step()
        _regrad(ours, theirs)
    _assert_match(ours, theirs)
    sd, sd_t = o.state_dict(), t.state_dict()
    assert float(sd["state"][0]["step"]) == float(sd_t["state"][0]["step"]) == 2
    torch.testing.assert_close(sd["state"][0]["exp_avg"], sd_t["state"][0]["exp_avg"].float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "step"])
@isolated
def test_state_tensor_replaced_like_torch(backend, key):
    ours, o, theirs, t = _pair(backend)
    for k in range(4):
        if k == 2:
            value = (torch.tensor(10.0) if key == "step" else torch.full_like(ours[2], 0.5, dtype=torch.float32))
            o.state[ours[2]][key] = value.clone()
            t.state[theirs[2]][key] = value.clone()
        o.step()
        t.step()
        _regrad(ours, theirs)
    _assert_match(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_bad_state_tensor_put_by_hand(backend):
    ours, o, _, _ = _pair(backend)
    o.step()
    o.state[ours[1]]["exp_avg"] = torch.zeros(3)  # too short
    err = expect_error_unchanged(o.step, ValueError, "exp_avg", o)
    message_names(err, "param 1")
    o.state[ours[1]]["exp_avg"] = torch.zeros(7, dtype=torch.float64)
    expect_error_unchanged(o.step, TypeError, "exp_avg", o)
    o.state[ours[1]]["exp_avg"] = torch.zeros(14)[::2]
    expect_error_unchanged(o.step, ValueError, "contiguous", o)
    o.state[ours[1]] = {"step": torch.tensor(1.0)}  # partial
    expect_error_unchanged(o.step, ValueError, "exp_avg", o)


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_a_later_group_fails_before_the_first_is_stepped(backend):
    ps = _model()
    o = fused_ops.FusedAdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, backend=backend)
    o.step()
    o.state[ps[2]]["exp_avg_sq"] = torch.zeros(ps[2].numel(), dtype=torch.float64)
    expect_error_unchanged(o.step, TypeError, "param group 1", o)
    o.state[ps[2]]["exp_avg_sq"] = torch.zeros(ps[2].numel())
    o.param_groups[1]["backend"] = "nonsense"
    expect_error_unchanged(o.step, ValueError, "backend", o)


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_params_sharing_memory_are_refused(backend):
    base = torch.randn(20)
    a = torch.nn.Parameter(base[:10])
    b = torch.nn.Parameter(base[5:15])  # overlaps a
    for p in (a, b):
        p.grad = torch.randn_like(p)
    o = fused_ops.FusedAdamW([a, b], lr=1e-2, backend=backend)
    expect_error_unchanged(o.step, ValueError, "share memory", o)


class _Changes:
    """Random ordinary training-loop changes, applied to both optimizers."""

    kinds = ["regrad", "none_grad", "data", "state_reset", "state_tensor", "replace_param", "zero_grad", "lr"]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=st.lists(st.tuples(st.sampled_from(_Changes.kinds), st.integers(0, 2)), min_size=1, max_size=5))
def test_training_loop_changes_property(backend, changes):
    """Any sequence of ordinary changes between steps gives torch.optim.AdamW's result (fp32: 1e-6)."""
    ours, o, theirs, t = _pair(backend, sizes=[(4, 3), (5,), (1,)])
    o.step()
    t.step()
    for kind, i in changes:
        if kind == "regrad":
            _regrad(ours, theirs)
        elif kind == "none_grad":
            ours[i].grad = theirs[i].grad = None
        elif kind == "data":
            new = torch.randn_like(ours[i])
            ours[i].data, theirs[i].data = new, new.clone()
        elif kind == "state_reset":
            o.state[ours[i]] = {}
            t.state[theirs[i]] = {}
        elif kind == "state_tensor" and t.state.get(theirs[i]):
            value = torch.rand_like(ours[i], dtype=torch.float32)
            o.state[ours[i]]["exp_avg_sq"] = value.clone()
            t.state[theirs[i]]["exp_avg_sq"] = value.clone()
        elif kind == "replace_param":
            new = torch.nn.Parameter(torch.randn_like(ours[i]))
            new.grad = torch.randn_like(new)
            new_t = torch.nn.Parameter(new.detach().clone())
            new_t.grad = new.grad.clone()
            o.param_groups[0]["params"][i] = ours[i] = new
            t.param_groups[0]["params"][i] = theirs[i] = new_t
        elif kind == "zero_grad":
            o.zero_grad(set_to_none=True)
            t.zero_grad(set_to_none=True)
            _regrad_all(ours, theirs)
        elif kind == "lr":
            o.param_groups[0]["lr"] = t.param_groups[0]["lr"] = 10.0 ** -(i + 1)
        o.step()
        t.step()
    _assert_match(ours, theirs)


def _regrad_all(ours, theirs):
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()


# ---------------------------------------------------------------------------------------------------------
# 4. load_state_dict: validate everything, then change; torch's hooks respected


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_load_state_dict_bad_dict_changes_nothing(backend):
    ours, o, _, _ = _pair(backend)
    o.step()
    sd = o.state_dict()
    o.step()  # (so that a half-load would show)
    bad = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    bad["state"][2]["exp_avg"] = torch.zeros(2)  # the last param's moment is truncated
    err = expect_error_unchanged(lambda: o.load_state_dict(bad), ValueError, "exp_avg", o)
    message_names(err, "param 2")
    bad["state"][2]["exp_avg"] = sd["state"][2]["exp_avg"]
    bad["state"][2]["step"] = "three"
    expect_error_unchanged(lambda: o.load_state_dict(bad), ValueError, "step", o)
    bad["state"][2]["step"] = sd["state"][2]["step"]
    bad["param_groups"] = [dict(sd["param_groups"][0], lr=-1.0)]
    expect_error_unchanged(lambda: o.load_state_dict(bad), ValueError, "learning rate", o)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_hooks_like_torch(backend):
    """A pre-hook's returned dict is what loads; a post-hook's changes stay (they were overwritten)."""
    ours, o, _, _ = _pair(backend)
    o.step()
    sd = o.state_dict()

    def pre(opt, state_dict):
        new = {"state": {k: dict(v) for k, v in state_dict["state"].items()},
               "param_groups": state_dict["param_groups"]}
        new["state"][0]["exp_avg"] = torch.full_like(new["state"][0]["exp_avg"], 3.0)
        return new

    def post(opt):
        opt.state[ours[1]]["exp_avg_sq"].fill_(7.0)
        opt.state[ours[2]]["exp_avg"] = torch.full_like(ours[2], 5.0, dtype=torch.float32)

    o.register_load_state_dict_pre_hook(pre)
    o.register_load_state_dict_post_hook(post)
    o.load_state_dict(sd)
    assert torch.all(o.state[ours[0]]["exp_avg"] == 3.0)
    assert torch.all(o.state[ours[1]]["exp_avg_sq"] == 7.0)
    assert torch.all(o.state[ours[2]]["exp_avg"] == 5.0)
    assert sd["state"][0]["exp_avg"].ne(3.0).any(), "the source dict was aliased"
    o.step()  # and the loaded state is stepped (a plan built on it)
    assert torch.isfinite(ours[0]).all()


def test_legacy_state_dict_takes_torch_defaults():
    """A state dict without ``maximize``/``amsgrad`` keys takes torch's historical defaults (False), as torch."""
    ps = _model()
    o = fused_ops.FusedAdam(ps, lr=1e-2, amsgrad=True, maximize=True)
    t = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2, amsgrad=True, maximize=True)
    sd = o.state_dict()
    for g in sd["param_groups"]:
        del g["maximize"], g["amsgrad"]
    sd_t = t.state_dict()
    for g in sd_t["param_groups"]:
        del g["maximize"], g["amsgrad"]
    o.load_state_dict(sd)
    t.load_state_dict(sd_t)
    for key in ("maximize", "amsgrad"):
        assert o.param_groups[0][key] is t.param_groups[0][key] is False


def test_state_dict_is_plain_dicts_and_pickles_without_fused_ops(tmp_path):
    ps = _model()
    o = fused_ops.FusedAdamW(ps, lr=1e-2)
    o.step()
    sd = o.state_dict()
    assert all(type(v) is dict for v in sd["state"].values())
    torch.save(sd, tmp_path / "o.pt")
    loaded = torch.load(tmp_path / "o.pt", weights_only=True)
    assert loaded["state"][0]["exp_avg"].shape == ps[0].shape
    import copy
    import pickle

    o2 = pickle.loads(pickle.dumps(o))
    assert isinstance(o2.state, type(o.state))
    o3 = copy.deepcopy(o)
    o3.step()


# ---------------------------------------------------------------------------------------------------------
# 5. Values torch checks (and we did not), or the reverse


def test_tensor_betas_kept_and_mixed_betas_refused():
    ps = _model()
    o = fused_ops.FusedAdamW(ps, betas=(torch.tensor(0.9), torch.tensor(0.99)))
    assert all(isinstance(b, torch.Tensor) for b in o.param_groups[0]["betas"])
    t = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps],
                          betas=(torch.tensor(0.9), torch.tensor(0.99)))  # fmt: skip
    assert [type(b) for b in o.param_groups[0]["betas"]] == [type(b) for b in t.param_groups[0]["betas"]]
    for betas in ((0.9, torch.tensor(0.99)), (torch.tensor(0.9), 0.99)):
        with pytest.raises(ValueError, match="both floats or both Tensors"):
            fused_ops.FusedAdamW(ps, betas=betas)
        with pytest.raises(ValueError, match="both floats or both Tensors"):
            torch.optim.AdamW(ps, betas=betas)
    o.step()
    # (a param group's betas torch checks no further: mixed, or numpy's numbers, step as torch steps them)
    for betas in ((0.9, torch.tensor(0.9)), (np.float32(0.8), np.float64(0.99))):
        q = torch.nn.Parameter(torch.randn(3))
        twin = torch.nn.Parameter(q.detach().clone())
        o.add_param_group({"params": [q], "betas": betas})
        t.add_param_group({"params": [twin], "betas": betas})
        q.grad, twin.grad = torch.ones(3), torch.ones(3)
        o.step()
        t.step()
        torch.testing.assert_close(q.detach(), twin.detach(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="betas must be numbers or 1-element Tensors"):
        o.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "betas": (0.9, "0.99")})


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_a_float_grad_scale(backend):
    ours, o, theirs, t = _pair(backend)
    for a in ours:
        a.grad.mul_(2.0)
    o.step(grad_scale=2.0)
    t.step()
    _assert_match(ours, theirs)
    # (1e39 is inf in float32, 1e-46 is 0 there and 1e-39 a subnormal whose reciprocal overflows: the step divides
    # by it in float32)
    bads = ((0.0, ValueError), (math.inf, ValueError), (-1.0, ValueError), ("2", TypeError), (1e39, ValueError),
            (1e-46, ValueError), (1e-39, ValueError), (10**400, ValueError))  # fmt: skip
    for bad, exc in bads:
        expect_error_unchanged(lambda b=bad: o.step(grad_scale=b), exc, "grad_scale", o)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["grad_scale", "found_inf"])
@isolated
def test_two_element_scaler_tensors_refused(backend, name):
    ours, o, _, _ = _pair(backend)
    o.step()
    bad = torch.tensor([1.0, 0.0])
    expect_error_unchanged(lambda: o.step(**{name: bad}), ValueError, name, o)
    o.param_groups[0]["lr"] = torch.tensor([1e-3, 1.0])
    expect_error_unchanged(o.step, ValueError, "lr", o)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_survives_no_change_and_state_counter_moves(backend):
    """The plan is reused while nothing changed (host cost), and rebuilt after each kind of change."""
    ours, o, _, _ = _pair(backend)
    o.step()
    plan = o._plans[0]
    o.step()
    assert o._plans[0] is plan
    o.state[ours[0]]["exp_avg"] = o.state[ours[0]]["exp_avg"].clone()
    o.step()
    assert o._plans[0] is not plan
    plan = o._plans[0]
    ours[1].data = ours[1].data.clone()
    o.step()
    assert o._plans[0] is not plan


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_replaced_wholesale_like_torch(backend):
    """``opt.state = defaultdict(dict)`` (a reset some training loops do) starts every param afresh, as torch."""
    from collections import defaultdict

    ours, o, theirs, t = _pair(backend)
    for k in range(4):
        if k == 2:
            o.state = defaultdict(dict)
            t.state = defaultdict(dict)
        o.step()
        t.step()
        _regrad(ours, theirs)
    _assert_match(ours, theirs)
    assert o._plans[0].reusable
