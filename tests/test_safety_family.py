"""Safety tier for the newer optimizers of the family: FusedSGD, FusedLion and FusedAdamW with 8-bit states, bf16
states, stochastic rounding or Kahan summation, on both backends, and the machinery they share (``_GroupPlan``,
``PreparedLaunch``).

Every case runs after one or two good steps, so that a cached step plan exists (the plan is reused while it fits),
and checks that the step either gives the right result, or raises a clear TypeError/ValueError/RuntimeError with
every param, grad, state tensor (codes, scales, Kahan buffers, momentum buffers, moments, masters, step counts) and
group value bit-identical to before (identity, dtype, shape, strides, device, address, version counter and bytes;
meta tensors by their metadata). Cases that crashed the process or wrote freed memory before their fix run in a
forked child (``isolated``), so a crash fails one test.
"""

from __future__ import annotations

import re

import pytest
import torch

import fused_ops
from tests.safety import isolated

pytestmark = pytest.mark.safety

BACKENDS = ["triton", "reference"]
BF16 = torch.bfloat16
SIZES = [(3, 5), (7,), (300,)]  # (300: two blocks of 8-bit scales)

# name -> (class, param dtype, constructor kwargs)
VARIANTS = {
    "sgd": (fused_ops.FusedSGD, torch.float32, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "lion_master": (fused_ops.FusedLion, BF16, dict(lr=1e-3, weight_decay=0.1, master_weights=True)),
    "adamw_int8_master": (fused_ops.FusedAdamW, BF16, dict(lr=1e-2, state_dtype="int8", master_weights=True)),
    "adamw_bf16_states": (fused_ops.FusedAdamW, BF16, dict(lr=1e-2, state_dtype="bfloat16")),
    "adamw_sr": (fused_ops.FusedAdamW, BF16, dict(lr=1e-2, stochastic_rounding=True)),
    "adamw_kahan": (fused_ops.FusedAdamW, BF16, dict(lr=1e-2, kahan_summation=True)),
}
NAMES = list(VARIANTS)
# Variants whose steps draw random bits that depend on a tensor's index in its launch (stochastic rounding).
RANDOM = {"adamw_bf16_states", "adamw_sr"}
ERRORS = (TypeError, ValueError, RuntimeError)


def _params(dtype, sizes=SIZES):
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _clone_params(params):
    out = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for a, b in zip(params, out):
        b.grad = a.grad.clone()
    return out


def _make(name, backend, params=None, steps=1, groups=None):
    cls, dtype, kwargs = VARIANTS[name]
    params = _params(dtype) if params is None else params
    opt = cls(params if groups is None else groups(params), backend=backend, **kwargs)
    for _ in range(steps):
        opt.step()
    return params, opt


@pytest.fixture(scope="module", autouse=True)
def _warm_up():
    """One step of every variant on both backends in this process first, so that each forked child (``isolated``)
    does not pay the lazy initialisation of a first step again (half a second each)."""
    for name in NAMES:
        for backend in BACKENDS:
            _make(name, backend)


# ---------------------------------------------------------------------------------------------------------
# snapshots (meta tensors included: compared by their metadata)


def _record(t):
    """(the tensor, its metadata, a copy of its bytes); a meta tensor has no bytes, a sparse one is compared dense."""
    if t.layout != torch.strided:
        return t, (t.layout, t.dtype, tuple(t.shape), str(t.device), t._version), t.detach().to_dense().clone()
    bits = None
    if not t.is_meta:
        flat = torch.empty(t.numel(), dtype=t.dtype)
        flat.copy_(t.detach().reshape(-1))
        bits = flat.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    ptr = None if t.is_meta else t.data_ptr()
    return t, (t.dtype, tuple(t.shape), t.stride(), str(t.device), ptr, t._version), bits


def _value(v):
    return ("tensor", _record(v)) if isinstance(v, torch.Tensor) else ("value", repr(v))


def _snapshot(opt):
    """Every param, grad, state entry and group value of ``opt``, with its bytes."""
    out = {"state params": sorted(id(p) for p in opt.state)}
    for gi, group in enumerate(opt.param_groups):
        out[f"group {gi} params"] = [id(p) for p in group["params"]]
        for key, v in group.items():
            if key != "params":
                out[f"group {gi} {key}"] = _value(v)
        for pi, p in enumerate(group["params"]):
            where = f"group {gi} param {pi}"
            out[where] = _value(p)
            out[where + " grad"] = None if p.grad is None else _value(p.grad)
            st = opt.state.get(p)
            out[where + " state keys"] = None if st is None else sorted(st)
            for key, v in (st or {}).items():
                out[f"{where} state {key!r}"] = _value(v)
    return out


def _assert_same(before, after):
    assert before.keys() == after.keys()
    for key, b in before.items():
        a = after[key]
        if not (isinstance(b, tuple) and b and b[0] == "tensor"):
            assert a == b, f"{key} changed: {b!r} -> {a!r}"
            continue
        (t0, meta0, bits0), (t1, meta1, bits1) = b[1], a[1]
        assert t0 is t1, f"{key} is another tensor now"
        assert meta0 == meta1, f"{key} metadata changed: {meta0} -> {meta1}"
        assert (bits0 is None) == (bits1 is None) and (bits0 is None or torch.equal(bits0, bits1)), (
            f"{key} values changed"
        )


def _refused(opt, call=None, exc=ERRORS, match=None):
    """``call()`` (default: ``opt.step()``) raises ``exc`` (message matching ``match``) and changes nothing."""
    before = _snapshot(opt)
    with pytest.raises(exc, match=match) as info:
        (call or opt.step)()
    _assert_same(before, _snapshot(opt))
    return info.value


def _equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), what


def _assert_opts_equal(o1, p1, o2, p2):
    for i, (a, b) in enumerate(zip(p1, p2)):
        _equal(a.detach(), b.detach(), f"param {i}")
        s1, s2 = o1.state[a], o2.state[b]
        assert sorted(s1) == sorted(s2), f"state keys of param {i}"
        for key in s1:
            _equal(s1[key], s2[key], f"state {key!r} of param {i}")


def _plan_fits(opt):
    """Whether the cached plan of every group would be reused by the next step (no checked step)."""
    return all(
        gi in opt._plans and opt._plans[gi].current_grads(opt, g, opt.state) is not None
        for gi, g in enumerate(opt.param_groups)
    )


def _tensor_keys(opt, p):
    return [k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------------------------------------------------
# 1. A state tensor changed in place (resize_, set_, .data) after a plan was cached. Before the plans checked their
#    state tensors at every step, the launch kept their old addresses: memory that was freed (resize_ larger: the
#    Kahan variant aborted with "corrupted double-linked list", the 8-bit scales segfaulted) or a shorter tensor
#    (the reference SGD wrote past it: "munmap_chunk(): invalid pointer"), or the reference path raised halfway
#    through a step with params already changed.


def _grow(t):
    t.resize_(t.numel() + 4096)  # (a new, larger storage: the old address is freed)


def _set_short(t):
    t.set_(torch.zeros(1, dtype=t.dtype))


def _data_short(t):
    t.data = torch.zeros(1, dtype=t.dtype)


def _shrink(t):
    t.resize_(max(t.numel() - 1, 0) if t.dim() else 4)  # (a 0-d step count grows to 4 elements instead)


MUTATIONS = [_grow, _set_short, _data_short, _shrink]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@isolated
def test_state_changed_in_place_is_refused(name, backend):
    ps, opt = _make(name, backend)
    p = ps[2]  # (300 elements: every state, the 2-element 8-bit scales included, is longer than one)
    keys = _tensor_keys(opt, p)
    for i in range(max(len(keys), len(MUTATIONS))):
        key, mutate = keys[i % len(keys)], MUTATIONS[i % len(MUTATIONS)]
        if key == "step" and mutate in (_set_short, _data_short):
            mutate = _grow  # (a 1-element count is a valid count)
        st = opt.state[p]
        saved = st[key].clone()
        assert _plan_fits(opt)
        mutate(st[key])
        assert not _plan_fits(opt), f"{mutate.__name__} of {key!r} not seen by the plan"
        err = _refused(opt, exc=(TypeError, ValueError))
        assert repr(key) in str(err) or "step" in str(err), f"{mutate.__name__} of {key!r}: {err}"
        st[key] = saved
        opt.step()  # (a plan cached again, on the restored tensor)
    assert opt._plans[0].reusable


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sgd", "lion_master", "adamw_int8_master"])
@isolated
def test_state_data_swapped_for_new_memory_is_stepped(name, backend):
    """``st[key].data = t`` of the right size moves the state to new memory: the step must update that memory, as it
    does after ``st[key] = t`` (e.g. ``st["exp_avg_scale"].data = torch.zeros(1)`` on a 7-element param)."""
    cls, dtype, kwargs = VARIANTS[name]
    ps = _params(dtype)
    twin = _clone_params(ps)
    o1 = cls(ps, backend=backend, **kwargs)
    o2 = cls(twin, backend=backend, **kwargs)
    o1.step()
    plan = o1._plans[0]
    o1.step()
    o2.step()
    o2.step()
    assert o1._plans[0] is plan, "the plan was not reused while nothing changed"
    key = {"sgd": "momentum_buffer", "lion_master": "exp_avg", "adamw_int8_master": "exp_avg_scale"}[name]
    new = torch.zeros_like(o1.state[ps[1]][key]) if key.endswith("scale") else torch.randn_like(o1.state[ps[1]][key])
    o1.state[ps[1]][key].data = new.clone()
    o2.state[twin[1]][key] = new.clone()
    o1.step()
    o2.step()
    _assert_opts_equal(o1, ps, o2, twin)
    assert o1._plans[0] is not plan
    if name == "adamw_int8_master":  # a 1-scale tensor where 2 are needed: refused
        o1.state[ps[2]][key].data = torch.zeros(1)
        _refused(o1, exc=ValueError, match="exp_avg_scale")


# ---------------------------------------------------------------------------------------------------------
# 2. A state tensor replaced by a bad one, or deleted


def _bad_replacements(opt, ps, i, key):
    """(what, tensor) pairs that must be refused as state ``key`` of ``ps[i]``."""
    t = opt.state[ps[i]][key]
    other = torch.float64 if t.dtype != torch.float64 else torch.float32
    out = [
        ("another dtype", torch.zeros(t.shape, dtype=other)),
        ("one element more", torch.zeros(t.numel() + 1, dtype=t.dtype)),
        ("on the meta device", torch.zeros(t.shape, dtype=t.dtype, device="meta")),
    ]
    if t.numel() > 1:  # (a 1-element tensor is contiguous whatever its stride)
        out.append(("not contiguous", torch.zeros(2 * t.numel(), dtype=t.dtype)[::2]))
    big = opt.state[ps[2]].get(key)
    if i != 2 and big is not None and big.numel() >= t.numel():
        out.append(("a view of another param's state", big.view(-1)[: t.numel()]))
    if t.dtype == ps[i].dtype:
        out.append(("a view of its param", ps[i].detach().view(-1)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@isolated
def test_state_replaced_by_a_bad_tensor_is_refused(name, backend):
    ps, opt = _make(name, backend, steps=1)
    for i in (1, 2):
        for key in _tensor_keys(opt, ps[i]):
            if key == "step":
                continue
            saved = opt.state[ps[i]][key]
            for what, bad in _bad_replacements(opt, ps, i, key):
                opt.state[ps[i]][key] = bad
                err = _refused(opt, exc=(TypeError, ValueError))
                assert repr(key) in str(err) or "share memory" in str(err), f"{key!r} of param {i} as {what}: {err}"
            opt.state[ps[i]][key] = saved
    if "step" in opt.state[ps[1]]:
        opt.state[ps[1]]["step"] = torch.ones(2)
        _refused(opt, exc=ValueError, match="step")
        opt.state[ps[1]]["step"] = torch.tensor(5, dtype=torch.int64)  # (a count of another type: taken, as torch)
        opt.step()
        assert opt.state[ps[1]]["step"].dtype == torch.float32 and opt.state[ps[1]]["step"].item() == 6.0


# Keys whose deletion must be refused: the moments, the step, and the scales of 8-bit codes (without them, the
# codes stepped as moments of zeros: the state was silently lost). Others are created afresh, as torch creates a
# missing momentum buffer.
_REQUIRED = {"exp_avg", "exp_avg_sq", "step", "exp_avg_scale", "exp_avg_sq_scale"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@isolated
def test_state_key_deleted(name, backend):
    ps, opt = _make(name, backend, steps=1)
    for key in _tensor_keys(opt, ps[1]):
        st = opt.state[ps[1]]
        saved = st[key]
        del st[key]
        if key in _REQUIRED and len(st):
            _refused(opt, exc=ValueError, match=repr(key))
            st[key] = saved
            continue
        opt.step()  # created afresh, with the dtype and size the step needs
        new = opt.state[ps[1]][key]
        assert new is not saved and new.dtype == saved.dtype and new.shape == saved.shape
        assert all(torch.isfinite(p.detach()).all() for p in ps)


def test_sgd_deleted_buffer_restarts_like_torch():
    ps, opt = _make("sgd", "reference", steps=1)
    theirs = _clone_params(ps)
    ref = torch.optim.SGD(theirs, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)
    for p, q in zip(ps, theirs):
        q.data.copy_(p.detach())
        ref.state[q]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
    del opt.state[ps[1]]["momentum_buffer"]
    del ref.state[theirs[1]]["momentum_buffer"]
    opt.step()
    ref.step()
    for a, b in zip(ps, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_codes_or_scales_swapped_between_params(backend):
    ps, opt = _make("adamw_int8_master", backend, steps=1)
    a, b = opt.state[ps[1]], opt.state[ps[2]]  # 7 and 300 elements: 1 and 2 scales
    for key in ("exp_avg", "exp_avg_sq_scale"):
        a[key], b[key] = b[key], a[key]
        _refused(opt, exc=ValueError, match=repr(key))
        a[key], b[key] = b[key], a[key]
    opt.step()


# ---------------------------------------------------------------------------------------------------------
# 3. Params and grads changed between steps


_OTHER_DTYPE = {torch.float32: BF16, BF16: torch.float32}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@isolated
def test_param_data_changed(name, backend):
    ps, opt = _make(name, backend)
    p = ps[1]
    p.data = torch.randn(9, dtype=p.dtype)  # another size, the grad's stays
    _refused(opt, exc=ValueError, match="param 1")
    p.data = torch.randn(7, dtype=p.dtype)
    p.data = p.data.view(torch.float16 if p.dtype == BF16 else BF16)  # the same memory seen as another dtype
    _refused(opt, exc=TypeError, match="param 1")
    p.data = torch.randn(7, dtype=p.grad.dtype)[:3]  # fewer elements: the states are too long now
    p.grad = torch.randn(3, dtype=p.dtype)
    _refused(opt, exc=ValueError, match="param 1")
    # param and grad of the other float dtype: the states made for the old one are refused, or they fit
    p.data = torch.randn(7, dtype=_OTHER_DTYPE[p.dtype])
    p.grad = torch.randn_like(p)
    before = _snapshot(opt)
    try:
        opt.step()
    except (TypeError, ValueError):
        _assert_same(before, _snapshot(opt))
    else:
        assert all(torch.isfinite(q.detach()).all() for q in ps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@isolated
def test_bad_grads_are_refused(name, backend):
    ps, opt = _make(name, backend)
    g = ps[1].grad
    cases = [
        (torch.randn(7, dtype=torch.float64), TypeError),
        (torch.randn(6, dtype=g.dtype), ValueError),
        (torch.randn(7).view(torch.int32) if g.dtype == torch.float32 else g.clone().view(torch.int16), TypeError),
        (torch.randn(7, dtype=_OTHER_DTYPE[g.dtype]), TypeError),
    ]
    for bad, exc in cases:
        g.data = bad  # (``.data`` skips the grad setter's checks, as ``module.half()`` does)
        err = _refused(opt, exc=exc)
        assert "grad of param 1" in str(err), err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_strided_and_expanded_grads_step_like_contiguous_ones(name, backend):
    """Transposed, strided and stride-0 (expanded) grads are read through contiguous copies: the same result as the
    contiguous grads, bit for bit."""
    cls, dtype, kwargs = VARIANTS[name]
    ps = _params(dtype)
    twin = _clone_params(ps)
    o1 = cls(ps, backend=backend, **kwargs)
    o2 = cls(twin, backend=backend, **kwargs)
    o1.step()
    o2.step()
    ps[0].grad = torch.randn(5, 3).to(dtype).t()
    ps[1].grad = torch.randn(1).to(dtype).expand(7)
    ps[2].grad = torch.randn(600).to(dtype)[::2]
    assert not any(p.grad.is_contiguous() for p in ps)
    for a, b in zip(ps, twin):
        b.grad = a.grad.contiguous()
    o1.step()
    o2.step()
    _assert_opts_equal(o1, ps, o2, twin)


# ---------------------------------------------------------------------------------------------------------
# 4. Step values: scaler tensors, learning rates


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_scaler_tensors_and_lr_are_refused(name, backend):
    ps, opt = _make(name, backend, steps=1, groups=lambda ps: [{"params": ps[:2]}, {"params": ps[2:]}])
    for kw in (dict(grad_scale=torch.ones(2)), dict(grad_scale=torch.ones(1, dtype=torch.int32)),
               dict(found_inf=torch.zeros(2)), dict(found_inf=torch.zeros(1, dtype=torch.int32)),
               dict(found_inf=torch.zeros(1, dtype=torch.bool)), dict(grad_scale="2")):  # fmt: skip
        _refused(opt, lambda kw=kw: opt.step(**kw), exc=(TypeError, ValueError), match="grad_scale|found_inf")
    # Tensor learning rates set on the LAST group: refused before the first group is stepped (an integer lr was
    # refused by FusedSGD's and FusedLion's launchers only, after the first group had been stepped; the reference
    # backend took it)
    for lr in (torch.tensor([1e-3, 1.0]), torch.tensor(1), torch.tensor(True), torch.tensor([1e-2]).to_sparse()):
        opt.param_groups[1]["lr"] = lr
        _refused(opt, exc=ValueError, match="lr|learning rate")
    opt.param_groups[1]["lr"] = torch.tensor(1e-2, dtype=torch.float64)  # (a floating-point tensor of any dtype)
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_found_inf_skips_and_grad_scale_dtypes_agree(name, backend):
    ps, opt = _make(name, backend, steps=1)
    values = [t.clone() for p in ps for t in [p.detach(), *opt.state[p].values()]]
    opt.step(found_inf=torch.ones(1))
    after = [t for p in ps for t in [p.detach(), *opt.state[p].values()]]
    for i, (a, b) in enumerate(zip(values, after)):
        _equal(a, b, f"tensor {i} moved although found_inf was set")
    cls, dtype, kwargs = VARIANTS[name]
    results = []
    for scale in (torch.tensor([2.0]), torch.tensor(2.0, dtype=torch.float64), 2.0):
        torch.manual_seed(1)
        qs = _params(dtype)
        o = cls(qs, backend=backend, **kwargs)
        for q in qs:
            q.grad.mul_(2.0)
        o.step(grad_scale=scale)
        results.append((qs, o))
    for qs, o in results[1:]:
        _assert_opts_equal(results[0][1], results[0][0], o, qs)


# ---------------------------------------------------------------------------------------------------------
# 5. Group membership, zero-element params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sgd", "lion_master", "adamw_int8_master", "adamw_kahan"])
def test_param_in_two_groups_is_refused(name, backend):
    ps, opt = _make(name, backend, steps=1, groups=lambda ps: [{"params": ps[:2]}, {"params": ps[2:]}])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [ps[0]]})
    opt.param_groups[1]["params"].append(ps[0])  # by hand: the same param in two launches
    _refused(opt, exc=ValueError, match=r"param group 1 holds the same param \(position 1\), and param group 0")
    opt.param_groups[1]["params"].pop()
    opt.param_groups[0]["params"].append(ps[0])  # twice in one group: written twice by one launch
    _refused(opt, exc=ValueError, match="param group 0 holds the same param at positions 0 and 2")
    opt.param_groups[0]["params"].pop()
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_zero_element_params_mixed_with_others(name, backend):
    cls, dtype, kwargs = VARIANTS[name]
    ps = _params(dtype, [(0,), (3, 5), (0, 4), (7,), (300,)])
    nonempty = [ps[1], ps[3], ps[4]]
    twin = _clone_params(nonempty)
    o1 = cls(ps, backend=backend, **kwargs)
    o2 = cls(twin, backend=backend, **kwargs)
    for _ in range(2):
        o1.step()
        o2.step()
    if name in RANDOM:  # (the random bits depend on a tensor's index in its launch)
        for a, b in zip(nonempty, twin):
            torch.testing.assert_close(a.detach().float(), b.detach().float(), atol=2e-2, rtol=2e-2)
    else:
        _assert_opts_equal(o1, nonempty, o2, twin)
    for p in (ps[0], ps[2]):
        st = o1.state[p]
        assert all(v.numel() == (1 if k == "step" else 0) for k, v in st.items()), st
        if "step" in st:
            assert st["step"].item() == 2.0


# ---------------------------------------------------------------------------------------------------------
# 6. load_state_dict: a malformed dict raises before anything changes; a dict of another state layout loads


def _sd_copy(sd):
    return {
        "state": {k: dict(v) for k, v in sd["state"].items()},
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }


def _set(k, key, fn):
    def mutate(sd):
        if fn is None:
            del sd["state"][k][key]
        else:
            sd["state"][k][key] = fn(sd["state"][k][key])

    return mutate


_MALFORMED = {
    "adamw_int8_master": [
        ("too many scales", _set(2, "exp_avg_scale", lambda t: torch.ones(5))),
        ("too few scales", _set(2, "exp_avg_sq_scale", lambda t: torch.ones(1))),
        ("integer scales", _set(1, "exp_avg_scale", lambda t: t.int())),
        ("codes as floats", _set(1, "exp_avg_codes", lambda t: t.float())),
        ("both codes as floats, as moments", lambda sd: sd["state"][1].update(
            exp_avg=sd["state"][1].pop("exp_avg_codes").float(),
            exp_avg_sq=sd["state"][1].pop("exp_avg_sq_codes").float())),
        ("codes and moments both", lambda sd: sd["state"][1].update(exp_avg=sd["state"][1]["exp_avg_codes"].float())),
        ("a missing scale", _set(1, "exp_avg_scale", None)),
        ("codes of another param", lambda sd: sd["state"][1].update(exp_avg_codes=sd["state"][2]["exp_avg_codes"])),
        ("codes on the meta device",
         _set(1, "exp_avg_codes", lambda t: torch.zeros(t.shape, dtype=t.dtype, device="meta"))),
        ("no step", _set(0, "step", None)),
        ("a short master", _set(2, "master_param", lambda t: t[:10])),
    ],
    "adamw_kahan": [
        ("an fp32 Kahan buffer", _set(1, "kahan_comp", lambda t: t.float())),
        ("a short Kahan buffer", _set(1, "kahan_comp", lambda t: t[:3])),
        ("short bf16 moments", _set(1, "exp_avg", lambda t: t[:3])),
        ("integer moments", _set(1, "exp_avg_sq", lambda t: t.int())),
    ],
    "sgd": [
        ("a short buffer", _set(2, "momentum_buffer", lambda t: t[:10])),
        ("an integer buffer", _set(1, "momentum_buffer", lambda t: t.int())),
        ("a buffer that is no tensor", _set(1, "momentum_buffer", lambda t: t.tolist())),
    ],
    "lion_master": [
        ("a missing momentum", _set(1, "exp_avg", None)),
        ("a short master", _set(2, "master_param", lambda t: t[:10])),
        ("a long momentum", _set(0, "exp_avg", lambda t: torch.zeros(t.numel() + 1))),
    ],
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(_MALFORMED))
@isolated
def test_load_state_dict_malformed_changes_nothing(name, backend):
    ps, src = _make(name, "reference", steps=1)
    sd = src.state_dict()
    qs, opt = _make(name, backend, params=_clone_params(ps), steps=1)
    for what, mutate in _MALFORMED[name]:
        bad = _sd_copy(sd)
        mutate(bad)
        err = _refused(opt, lambda b=bad: opt.load_state_dict(b), exc=ERRORS)
        assert "loaded state dict" in str(err) or "meta" in str(err), f"{what}: {err}"
    opt.load_state_dict(sd)
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("src", "dst"), [("int8", "bfloat16"), ("bfloat16", "int8"), ("int8", None)])
def test_load_state_dict_across_state_dtypes(backend, src, dst):
    """A dict of one state layout loads into an optimizer of another (8-bit codes dequantised, moments quantised or
    rounded), and the optimizer steps on it."""
    ps = _params(BF16)
    o_src = fused_ops.FusedAdamW(ps, lr=1e-2, state_dtype=src, backend="reference")
    o_src.step()
    sd = o_src.state_dict()
    full = o_src.state_dict(dequantize=True)  # fp32 moments
    qs = _clone_params(ps)
    o_dst = fused_ops.FusedAdamW(qs, lr=1e-2, state_dtype=dst, backend=backend)
    o_dst.step()
    o_dst.load_state_dict(sd)
    got = o_dst.state_dict(dequantize=True)
    for k, st in full["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = st[key], got["state"][k][key]
            tol = 0.02 * a.abs().max().item() + 1e-12  # (8-bit codes and bf16 both lose some precision)
            torch.testing.assert_close(b.float(), a.float(), atol=tol, rtol=0.02)
        assert float(got["state"][k]["step"]) == 1.0
    o_dst.step()
    assert all(torch.isfinite(q.detach()).all() for q in qs)


# -- a state flattened in place (same memory, same element count, another shape) -----------------------------------
_FLAT_CASES = [
    ("sgd", lambda ps, b: fused_ops.FusedSGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, backend=b),
     "momentum_buffer"),
    ("sgd-masters", lambda ps, b: fused_ops.FusedSGD(ps, lr=1e-2, momentum=0.9, master_weights=True, backend=b),
     "master_param"),
    ("lion", lambda ps, b: fused_ops.FusedLion(ps, lr=1e-2, weight_decay=0.1, backend=b), "exp_avg"),
    ("adamw", lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, backend=b), "exp_avg_sq"),
    ("adamw-int8", lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, state_dtype="int8", backend=b), "exp_avg"),
    ("adamw-kahan", lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, kahan_summation=True, backend=b), "kahan_comp"),
    ("adamw-masters", lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, master_weights=True, backend=b),
     "master_param"),
]  # fmt: skip


_LOW_PRECISION_ONLY = {"master_param", "kahan_comp"}  # (states that fp32 params do not have)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize(
    "name, make, key, dtype",
    [pytest.param(*c, d, id=f"{c[0]}-{n}") for c in _FLAT_CASES for d, n in ((torch.float32, "fp32"),
     (torch.bfloat16, "bf16")) if not (c[2] in _LOW_PRECISION_ONLY and d == torch.float32)],
)  # fmt: skip
def test_state_flattened_in_place_is_still_the_params_state(name, make, key, dtype, backend):
    """``state.resize_(numel)`` keeps the memory and the element count: the kernels, which address tensors flat,
    and the plain-torch paths, which broadcast by shape, both go on as with the param-shaped state (the reference
    paths had written weight decay into the param, then raised a broadcast error)."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(3, 5).to(dtype)), torch.nn.Parameter(torch.randn(7).to(dtype))]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o, t = make(ours, backend), make(twin, backend)
    for step in range(3):
        for p, q in zip(ours, twin):
            p.grad = torch.randn(p.shape).to(dtype)
            q.grad = p.grad.clone()
        if step == 1:
            o.state[ours[0]][key].resize_(ours[0].numel())
        o.step()
        t.step()
    for p, q in zip(ours, twin):
        assert torch.equal(p, q)
    assert o.state[ours[0]][key].shape == (15,)
    assert torch.equal(o.state[ours[0]][key].view(3, 5), t.state[twin[0]][key])


# ---------------------------------------------------------------------------------------------------------
# 7. What a param that changed dtype, a loaded step count or a hyper-parameter without values leaves behind


def _kahan_model(backend):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3).bfloat16()
    opt = fused_ops.FusedAdamW(m.parameters(), lr=0.1, kahan_summation=True, backend=backend)
    m(torch.randn(2, 4).bfloat16()).sum().backward()
    opt.step()
    opt.zero_grad()
    return m, opt


def _fp32_twin(m, sd, backend):
    """The fp32 model a bf16 one became, with a FusedAdamW (no Kahan buffers: fp32 params keep none) resumed from
    the bf16 run's state dict through a plain fp32 AdamW layout (its moments and step counts)."""
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    plain = {"state": {k: {key: v for key, v in st.items() if key != "kahan_comp"} for k, st in sd["state"].items()},
             "param_groups": sd["param_groups"]}  # fmt: skip
    opt = fused_ops.FusedAdamW(twin.parameters(), lr=0.1, backend=backend)
    opt.load_state_dict(plain)
    return twin, opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_buffer_of_a_param_made_fp32_is_dropped_at_the_step(backend):
    """A bf16 model trained with Kahan summation, then ``model.float()``: fp32 params keep no Kahan buffer, so the
    stale bf16 one is dropped at the next step (as a master that is not needed any more), not refused as a state of
    the wrong dtype; the step is the fp32 step of the same moments."""
    m, opt = _kahan_model(backend)
    sd = opt.state_dict()
    assert all("kahan_comp" in st for st in sd["state"].values())
    m.float()
    twin, t = _fp32_twin(m, sd, backend)
    x = torch.randn(2, 4)
    m(x).sum().backward()
    twin(x).sum().backward()
    opt.step()
    t.step()
    for p, q in zip(m.parameters(), twin.parameters()):
        assert "kahan_comp" not in opt.state[p]
        _equal(p.detach(), q.detach(), "param")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            _equal(opt.state[p][key], t.state[q][key], key)
    assert all("kahan_comp" not in st for st in opt.state_dict()["state"].values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_checkpoint_of_a_bf16_model_loads_into_an_fp32_one(backend):
    """The bf16 run's checkpoint loads into the fp32 model's Kahan optimizer: the bf16 buffers, which fp32 params do
    not keep, are left out (not refused as states of the wrong dtype), and it steps as the fp32 twin."""
    m, opt = _kahan_model(backend)
    sd = opt.state_dict()
    fp32 = torch.nn.Linear(4, 3)
    fp32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    o32 = fused_ops.FusedAdamW(fp32.parameters(), lr=0.1, kahan_summation=True, backend=backend)
    o32.load_state_dict(sd)
    assert all("kahan_comp" not in st for st in o32.state.values())
    assert all("kahan_comp" not in st for st in o32.state_dict()["state"].values())
    twin, t = _fp32_twin(m, sd, backend)
    x = torch.randn(2, 4)
    fp32(x).sum().backward()
    twin(x).sum().backward()
    o32.step()
    t.step()
    for p, q in zip(fp32.parameters(), twin.parameters()):
        assert "kahan_comp" not in o32.state[p]
        _equal(p.detach(), q.detach(), "param")


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaded_step_count_that_requires_grad_is_a_detached_leaf(backend):
    """A loaded fp32 0-d step count that requires grad is kept as a detached copy (it was ``step.clone()``: a
    non-leaf with a grad_fn, which made ``copy.deepcopy(opt.state_dict())`` raise); it counts as torch's."""
    import copy

    p = torch.nn.Parameter(torch.randn(4))
    t = torch.optim.AdamW([p])
    p.grad = torch.randn(4)
    t.step()
    sd = t.state_dict()
    count = torch.tensor(1.0, requires_grad=True)
    sd["state"][0]["step"] = count
    q = torch.nn.Parameter(torch.randn(4))
    opt = fused_ops.FusedAdamW([q], backend=backend)
    opt.load_state_dict(sd)
    step = opt.state[q]["step"]
    assert step is not count and step.is_leaf and step.grad_fn is None and not step.requires_grad
    q.grad = torch.randn(4)
    opt.step()
    assert opt.state[q]["step"].item() == 2.0 and count.item() == 1.0
    copy.deepcopy(opt.state_dict())


def _meta(v):
    return torch.tensor(v, device="meta")


_META_CONSTRUCTORS = {
    "adamw lr": (lambda ps: fused_ops.FusedAdamW(ps, lr=_meta(0.1)), "lr"),
    "adamw betas": (lambda ps: fused_ops.FusedAdamW(ps, betas=(_meta(0.9), _meta(0.99))), "betas[0]"),
    "adamw eps": (lambda ps: fused_ops.FusedAdamW(ps, eps=_meta(1e-8)), "eps"),
    "adamw weight_decay": (lambda ps: fused_ops.FusedAdamW(ps, weight_decay=_meta(0.1)), "weight_decay"),
    "sgd lr": (lambda ps: fused_ops.FusedSGD(ps, lr=_meta(0.1)), "lr"),
    "sgd momentum": (lambda ps: fused_ops.FusedSGD(ps, lr=0.1, momentum=_meta(0.9)), "momentum"),
    "sgd dampening": (lambda ps: fused_ops.FusedSGD(ps, lr=0.1, momentum=0.9, dampening=_meta(0.1)), "dampening"),
    "lion lr": (lambda ps: fused_ops.FusedLion(ps, lr=_meta(0.1)), "lr"),
    "lion weight_decay": (lambda ps: fused_ops.FusedLion(ps, weight_decay=_meta(0.1)), "weight_decay"),
}


@pytest.mark.parametrize("name", sorted(_META_CONSTRUCTORS))
def test_meta_hyperparameter_in_a_constructor_is_a_named_value_error(name):
    make, arg = _META_CONSTRUCTORS[name]
    with pytest.raises(ValueError, match=rf"Tensor {re.escape(arg)} must be a tensor with memory.*meta"):
        make(_params(torch.float32))


# name -> (optimizer class, group key, meta value, the name in the message)
_META_GROUP_VALUES = {
    "adamw lr": ("adamw_kahan", "lr", lambda: _meta(0.1), "lr"),
    "adamw betas": ("adamw_int8_master", "betas", lambda: (_meta(0.9), _meta(0.99)), "betas[0]"),
    "adamw eps": ("adamw_sr", "eps", lambda: _meta(1e-8), "eps"),
    "adamw weight_decay": ("adamw_bf16_states", "weight_decay", lambda: _meta(0.1), "weight_decay"),
    "sgd momentum": ("sgd", "momentum", lambda: _meta(0.9), "momentum"),
    "sgd weight_decay": ("sgd", "weight_decay", lambda: _meta(0.1), "weight_decay"),
    "lion lr": ("lion_master", "lr", lambda: _meta(0.1), "lr"),
    "lion betas": ("lion_master", "betas", lambda: (_meta(0.9), _meta(0.99)), "betas[0]"),
    "lion weight_decay": ("lion_master", "weight_decay", lambda: _meta(0.1), "weight_decay"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(_META_GROUP_VALUES))
def test_meta_hyperparameter_of_a_group_is_a_named_value_error(name, backend):
    """A meta-tensor hyper-parameter in ``add_param_group``, in a loaded dict, or set on a group mid-training: a
    ValueError naming the argument and the group (not torch's bare "Tensor.item() cannot be called on meta
    tensors"), with every param, state and group value unchanged."""
    variant, key, value, arg = _META_GROUP_VALUES[name]
    cls, dtype, _ = VARIANTS[variant]
    ps, opt = _make(variant, backend, steps=2)
    pattern = rf"Tensor {re.escape(arg)}.*must be a tensor with memory.*meta"
    err = _refused(opt, lambda: opt.add_param_group({"params": _params(dtype, [(3,)]), key: value()}), ValueError,
                   pattern)  # fmt: skip
    assert "param group 1" in str(err)
    sd = opt.state_dict()
    sd["param_groups"][0][key] = value()
    err = _refused(opt, lambda: opt.load_state_dict(sd), ValueError, pattern)
    assert "param group 0" in str(err)
    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = value()
    err = _refused(opt, None, ValueError, pattern)
    assert "param group 0" in str(err)
    opt.param_groups[0][key] = good
    opt.step()


# ---------------------------------------------------------------------------------------------------------
# 8. torch.compile(opt.step) on params that are not contiguous: stepped as the eager step steps them (through a
#    contiguous copy, copied back), where it raised "needs contiguous params" (on the DTensor ranks whose local
#    shards are not contiguous only: tests/test_safety_family_dtensor2.py)

_COMPILED = {
    "adamw": lambda ps, b: fused_ops.FusedAdamW(ps, lr=0.1, backend=b),
    "adamw_int8": lambda ps, b: fused_ops.FusedAdamW(ps, lr=0.1, state_dtype="int8", backend=b),
    "sgd": lambda ps, b: fused_ops.FusedSGD(ps, lr=0.1, momentum=0.9, nesterov=True, backend=b),
    "lion": lambda ps, b: fused_ops.FusedLion(ps, lr=0.1, weight_decay=0.1, backend=b),
}


@pytest.mark.parametrize("name", sorted(_COMPILED))
def test_compiled_step_of_a_transposed_param_is_the_eager_step(name):
    backend = "triton" if name == "adamw" else "reference"
    torch._dynamo.reset()
    out = []
    for compiled in (False, True):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(3, 4, generator=g).t()), torch.nn.Parameter(torch.randn(5, generator=g))]
        opt = _COMPILED[name](ps, backend)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            step()
        assert not ps[0].is_contiguous()
        out.append((ps, opt))
    (ps, o1), (qs, o2) = out
    assert not torch.equal(ps[0].detach(), torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).t())
    _assert_opts_equal(o1, ps, o2, qs)
