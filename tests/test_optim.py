"""FusedAdam / FusedAdamW against torch.optim.Adam / AdamW: training runs, GradScaler, schedulers,
state-dict swaps, param groups, and bad input (which must raise before any state changes).

Backends: "auto" is the CPU path on these CPU tensors; "triton" is the fused kernel under the interpreter.
"""

import copy
import os

import pytest
import torch

import fused_ops
from fused_ops import FusedAdam, FusedAdamW

BACKENDS = ["auto", pytest.param("triton", marks=pytest.mark.interpret)]


def _model(dtype=torch.float32):
    m = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
    return m.to(dtype)


def _loss(m, x):
    return (m(x) - 0.5).pow(2).mean()


def _max_diff(m1, m2):
    pairs = zip(m1.parameters(), m2.parameters())
    return max((a.detach().double() - b.detach().double()).abs().max().item() for a, b in pairs)


def _train(pairs, steps, batch=8, schedulers=()):
    """Train every (model, optimizer) pair on the same batches."""
    for _ in range(steps):
        x = torch.randn(batch, 9)
        for m, o in pairs:
            o.zero_grad()
            _loss(m, x.to(next(m.parameters()).dtype)).backward()
            o.step()
        for s in schedulers:
            s.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
def test_fused_adamw_matches_torch_50_steps(backend, amsgrad, maximize):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    # Gradient ascent (maximize) grows the params; a smaller lr keeps them O(1), where 1e-6 is a few ulp.
    kw = dict(lr=1e-3 if maximize else 1e-2, weight_decay=0.05, amsgrad=amsgrad, maximize=maximize)
    o1 = torch.optim.AdamW(m1.parameters(), **kw)
    o2 = FusedAdamW(m2.parameters(), backend=backend, **kw)
    _train([(m1, o1), (m2, o2)], 50)
    assert _max_diff(m1, m2) < 1e-6
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    for k in s1:
        assert s1[k]["step"].item() == s2[k]["step"].item() == 50
        torch.testing.assert_close(s2[k]["exp_avg_sq"], s1[k]["exp_avg_sq"], atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_adam_l2_matches_torch_adam(backend):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.Adam(m1.parameters(), lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    o2 = FusedAdam(m2.parameters(), lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, backend=backend)
    _train([(m1, o1), (m2, o2)], 50)
    assert _max_diff(m1, m2) < 1e-6


def test_defaults_match_torch():
    p = [torch.nn.Parameter(torch.randn(3))]
    for ours, theirs in ((FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW)):
        d1, d2 = ours(p).defaults, theirs(p).defaults
        for key in d2:
            assert d1[key] == d2[key], key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_params_are_closer_to_float64_than_torch(dtype, backend):
    """bf16/fp16 params, fixed random grads, 50 steps. Tolerance (flash-attn's rule): the error of FusedAdamW
    (low-precision params, fp32 states) against a float64 AdamW run is at most twice torch's own
    low-precision error (AdamW on the same low-precision params, whose states are low-precision too),
    and below one half-ulp rounding per step (the param itself is stored in low precision every step:
    that error is inherent without master weights)."""
    p0 = torch.randn(1000)
    grads = [torch.randn(1000) for _ in range(50)]
    p64 = torch.nn.Parameter(p0.double())
    plo = torch.nn.Parameter(p0.to(dtype))
    pours = torch.nn.Parameter(p0.to(dtype))
    opts = [torch.optim.AdamW([p64], lr=1e-2), torch.optim.AdamW([plo], lr=1e-2),
            FusedAdamW([pours], lr=1e-2, backend=backend)]  # fmt: skip
    for g in grads:
        for p, o in zip((p64, plo, pours), opts):
            p.grad = g.to(p.dtype)
            o.step()
    err_torch = (plo.double() - p64).abs().max().item()
    err_ours = (pours.double() - p64).abs().max().item()
    half_ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype] * p64.abs().max().item()
    assert err_ours <= 2 * err_torch, (err_ours, err_torch)
    assert err_ours <= len(grads) * half_ulp, (err_ours, half_ulp)
    assert opts[2].state[pours]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_with_overflow_step(backend):
    """torch.amp.GradScaler: the fused path gets grad_scale/found_inf (no unscale pass, no host sync);
    an overflowing step is skipped by both optimizers, step counts included."""
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o2 = FusedAdamW(m2.parameters(), lr=1e-2, backend=backend)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    seen = {}
    real_step = o2.step

    def spy(*a, **k):
        seen["grad_scale"] = getattr(o2, "grad_scale", None)
        seen["found_inf"] = getattr(o2, "found_inf", None)
        return real_step(*a, **k)

    o2.step = spy
    for i in range(20):
        x = torch.randn(8, 9)
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            o.zero_grad()
            s.scale(_loss(m, x)).backward()
            if i == 7:
                next(m.parameters()).grad[0, 0] = float("inf")
            s.step(o)
            s.update()
        if i == 7:
            assert seen["found_inf"].item() == 1.0
            assert all(st["step"].item() == 7 for st in o2.state.values())
    assert seen["grad_scale"] is not None
    assert s1.get_scale() == s2.get_scale()
    assert _max_diff(m1, m2) < 1e-6
    assert all(st["step"].item() == 19 for st in o2.state.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_and_tensor_lr(backend):
    m1, m2, m3 = _model(), None, None
    m2, m3 = copy.deepcopy(m1), copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o2 = FusedAdamW(m2.parameters(), lr=1e-2, backend=backend)
    o3 = FusedAdamW(m3.parameters(), lr=torch.tensor(1e-2), backend=backend)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=30) for o in (o1, o2, o3)]
    _train([(m1, o1), (m2, o2), (m3, o3)], 30, schedulers=scheds)
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]
    assert isinstance(o3.param_groups[0]["lr"], torch.Tensor)
    assert _max_diff(m1, m2) < 1e-6
    assert _max_diff(m1, m3) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_swap_both_directions(backend):
    """Torch -> fused mid-run and fused -> torch mid-run; training continues identically."""
    m_ref = _model()
    m_a, m_b = copy.deepcopy(m_ref), copy.deepcopy(m_ref)
    o_ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, amsgrad=True)
    o_a = torch.optim.AdamW(m_a.parameters(), lr=1e-2, amsgrad=True)  # torch, then fused
    o_b = FusedAdamW(m_b.parameters(), lr=1e-2, amsgrad=True, backend=backend)  # fused, then torch
    _train([(m_ref, o_ref), (m_a, o_a), (m_b, o_b)], 20)
    sd_a = copy.deepcopy(o_a.state_dict())
    sd_b = copy.deepcopy(o_b.state_dict())
    assert set(sd_b["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd_b["param_groups"][0].keys() >= sd_a["param_groups"][0].keys()
    o_a = FusedAdamW(m_a.parameters(), lr=1.0, backend=backend)  # lr etc. come from the state dict
    o_a.load_state_dict(sd_a)
    o_b = torch.optim.AdamW(m_b.parameters(), lr=1.0, amsgrad=True)
    o_b.load_state_dict(sd_b)
    assert o_a.param_groups[0]["amsgrad"] and o_a.param_groups[0]["lr"] == 1e-2
    _train([(m_ref, o_ref), (m_a, o_a), (m_b, o_b)], 20)
    assert _max_diff(m_ref, m_a) < 1e-6
    assert _max_diff(m_ref, m_b) < 1e-6
    # a fused state dict round-trips through torch.save bit-exactly
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fused_ops_sd_{os.getpid()}.pt")
    torch.save(o_a.state_dict(), path)
    o_c = FusedAdamW(copy.deepcopy(m_a).parameters(), backend=backend)
    o_c.load_state_dict(torch.load(path))
    os.remove(path)
    for k, st in o_a.state_dict()["state"].items():
        for key, v in st.items():
            assert torch.equal(v, o_c.state_dict()["state"][k][key])


def test_low_precision_states_stay_fp32_on_load():
    """torch.optim would cast loaded moments to the param dtype; fp32 moments must survive the load."""
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    o = FusedAdamW([p])
    p.grad = torch.randn(10).bfloat16()
    o.step()
    sd = copy.deepcopy(o.state_dict())
    o2 = FusedAdamW([p])
    o2.load_state_dict(sd)
    assert o2.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(o2.state[p]["exp_avg"], sd["state"][0]["exp_avg"])
    assert o2.state[p]["exp_avg"].data_ptr() != sd["state"][0]["exp_avg"].data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(backend):
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(7))
    o = FusedAdamW([a, b], lr=1e-2, backend=backend)
    for i in range(3):
        a.grad = torch.randn(5)
        b.grad = torch.randn(7) if i == 0 else None
        b_before = b.detach().clone()
        o.step()
        if i > 0:
            assert torch.equal(b, b_before)
    assert o.state[a]["step"].item() == 3
    assert o.state[b]["step"].item() == 1


def test_param_groups_add_param_group_closure_zero_grad():
    m1 = _model()
    m2 = copy.deepcopy(m1)
    l1, l2 = list(m1.children()), list(m2.children())
    o1 = torch.optim.AdamW([{"params": l1[0].parameters(), "lr": 3e-2}], lr=1e-2, weight_decay=0.0)
    o2 = FusedAdamW([{"params": l2[0].parameters(), "lr": 3e-2}], lr=1e-2, weight_decay=0.0)
    o1.add_param_group({"params": l1[2].parameters(), "betas": (0.5, 0.9)})
    o2.add_param_group({"params": l2[2].parameters(), "betas": (0.5, 0.9)})
    for _ in range(10):
        x = torch.randn(8, 9)
        for m, o in ((m1, o1), (m2, o2)):

            def closure(m=m, o=o, x=x):
                o.zero_grad()
                loss = _loss(m, x)
                loss.backward()
                return loss

            loss = o.step(closure)
            assert loss is not None
    assert _max_diff(m1, m2) < 1e-6
    o2.zero_grad()
    assert all(p.grad is None for p in m2.parameters())


# -- bad input ---------------------------------------------------------------------------------------------


def _stepped_optimizer(n=2):
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n)]
    o = FusedAdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    o.step()
    return params, o


def _snapshot(params, o):
    return [p.detach().clone() for p in params], copy.deepcopy(o.state_dict())


def _assert_unchanged(params, o, snap):
    ps, sd = snap
    for p, q in zip(params, ps):
        assert torch.equal(p, q)
    now = o.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k in sd["state"]:
        for key, v in sd["state"][k].items():
            assert torch.equal(now["state"][k][key], v), key


@pytest.mark.parametrize(
    "make_bad, exc, match",
    [
        (lambda p: setattr(p[1], "grad", torch.randn(4, 3).to_sparse()), RuntimeError, "sparse"),
        (lambda p: setattr(p[1].grad, "data", torch.randn(4, 3, dtype=torch.float64)), TypeError, "float64"),
        (lambda p: setattr(p[1].grad, "data", torch.randn(3, 4)), ValueError, "shape"),
    ],
    ids=["sparse", "grad-dtype", "grad-shape"],
)
def test_bad_grads_raise_before_any_change(make_bad, exc, match):
    params, o = _stepped_optimizer()
    for p in params:
        p.grad = torch.randn_like(p)
    snap = _snapshot(params, o)
    make_bad(params)
    with pytest.raises(exc, match=match):
        o.step()
    _assert_unchanged(params, o, snap)


def test_grad_on_another_device_raises_before_any_change(monkeypatch):
    # autograd refuses to attach a grad on another device, so present one through the property.
    params, o = _stepped_optimizer()
    grads = {id(p): torch.randn_like(p) for p in params}
    grads[id(params[1])] = torch.empty(4, 3, device="meta")
    snap = _snapshot(params, o)
    monkeypatch.setattr(torch.nn.Parameter, "grad", property(lambda self: grads[id(self)]), raising=False)
    with pytest.raises(ValueError, match="meta"):
        o.step()
    monkeypatch.undo()
    _assert_unchanged(params, o, snap)


def test_bad_params_raise():
    c = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    c.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        FusedAdamW([c]).step()
    nc = torch.nn.Parameter(torch.zeros(1, 6).expand(4, 6))  # (a transposed param steps, as in torch)
    nc.grad = torch.randn(4, 6)
    good = torch.nn.Parameter(torch.randn(3))
    good.grad = torch.randn(3)
    o = FusedAdamW([good, nc])
    before = good.detach().clone()
    with pytest.raises(ValueError, match="expanded view"):
        o.step()
    assert torch.equal(good, before) and len(o.state) == 0
    i = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    i.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        FusedAdamW([i]).step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(lr=float("nan")), "Invalid learning rate"),
        (dict(lr=float("inf")), "Invalid learning rate"),
        (dict(eps=float("nan")), "Invalid epsilon"),
        (dict(eps=-1.0), "Invalid epsilon"),
        (dict(betas=(1.0, 0.999)), "index 0"),
        (dict(betas=(0.9, float("nan"))), "index 1"),
        (dict(betas=(0.9, -0.1)), "index 1"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "1-element"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=match):
        FusedAdamW(p, **kwargs)
    with pytest.raises(ValueError, match=match):
        FusedAdam(p, **kwargs)


def test_bad_param_group_and_scheduled_lr_raise_before_any_change():
    params, o = _stepped_optimizer()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        o.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": float("nan")})
    assert len(o.param_groups) == 1
    for p in params:
        p.grad = torch.randn_like(p)
    snap = _snapshot(params, o)
    o.param_groups[0]["lr"] = float("inf")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        o.step()
    o.param_groups[0]["lr"] = 1e-2
    _assert_unchanged(params, o, snap)


def test_differentiable_is_rejected():
    with pytest.raises(ValueError, match="differentiable"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3))], differentiable=True)


def test_triton_backend_on_cpu_without_interpreter_fails_clearly(monkeypatch):
    params, o = _stepped_optimizer()
    for g in o.param_groups:
        g["backend"] = "triton"
    for p in params:
        p.grad = torch.randn_like(p)
    snap = _snapshot(params, o)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        o.step()
    _assert_unchanged(params, o, snap)


def test_load_state_dict_of_wrong_shape_raises_before_any_change():
    params, o = _stepped_optimizer()
    snap = _snapshot(params, o)
    other = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    o_other = torch.optim.AdamW(other)
    for p in other:
        p.grad = torch.randn_like(p)
    o_other.step()
    with pytest.raises(ValueError, match="elements"):
        o.load_state_dict(o_other.state_dict())
    _assert_unchanged(params, o, snap)


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("FUSED_OPS_BACKEND", "reference")
    assert FusedAdamW([torch.nn.Parameter(torch.randn(2))]).defaults["backend"] == "reference"
    monkeypatch.setenv("FUSED_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FUSED_OPS_BACKEND"):
        FusedAdamW([torch.nn.Parameter(torch.randn(2))])
    assert fused_ops.resolve_backend("auto", torch.device("cpu")) == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_bumps_param_versions(backend, dtype):
    """The eager path skips the custom op's wrapper; autograd must still see that the params changed."""
    ps = [torch.nn.Parameter(torch.randn(5, dtype=dtype)), torch.nn.Parameter(torch.randn(7, 3, dtype=dtype))]
    for p in ps:
        p.grad = torch.randn_like(p)
    o = FusedAdamW(ps, backend=backend)
    for _ in range(2):  # the checked step, then the planned one
        before = [p._version for p in ps]
        o.step()
        bumps = [p._version - b for p, b in zip(ps, before)]
        if backend == "triton":
            # Exactly one per param: a bump that iterates a tensor (one view per row) would add 5 and 7 here, and
            # cost milliseconds per step (regression: torch._C._increment_version given a bare tensor).
            assert bumps == [1, 1]
        else:  # torch's copies back into bf16 params bump too
            assert min(bumps) >= 1
    x = torch.randn(3, dtype=dtype, requires_grad=True)
    y = (ps[0][:3] * x).sum()  # saves the param for x's grad
    o.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("master_weights", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_reference_bf16_params_larger_than_a_batch_match_torchs_fused_step(master_weights, amsgrad):
    """The CPU path's fp32 copies of bf16 params and grads are made a batch of 2^18 elements at a time; a param
    larger than that is taken in slices of one (its scratch buffers were as large as the largest param, 8 bytes per
    element of it: probe 82). Each step equals torch's fused AdamW on fp32 copies, rounded to bf16, bit for bit:
    a large contiguous param (sliced), a large transposed one (not contiguous: taken whole) and a small one."""
    torch.manual_seed(0)
    shapes = [((1 << 19) + 7,), (1021,)]
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(700, 401).bfloat16().t()))  # (280,700 elements, not contiguous)
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, master_weights=master_weights,
                     backend="reference")  # fmt: skip
    ref = torch.optim.AdamW(fp32, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, fused=True)
    for _ in range(3):
        for p, q in zip(params, fp32):
            g = torch.randn_like(p)  # (the param's strides, as autograd gives: torch's fused kernel pairs elements
            p.grad, q.grad = g, g.float()  # by memory order, and mispairs a grad of other strides; ours does not)
            if not master_weights:
                q.data.copy_(p.detach().float())  # (the step starts from the bf16 param itself)
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, fp32)):
            for key in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ())):
                # (the transposed param's moments to an ulp: torch's kernel vectorises another layout otherwise)
                tol = dict(rtol=0, atol=0) if p.is_contiguous() else dict(rtol=1e-6, atol=1e-9)
                torch.testing.assert_close(opt.state[p][key], ref.state[q][key], **tol, msg=f"{key} of param {i}")
            if p.is_contiguous():
                assert torch.equal(p.detach(), q.detach().bfloat16())
            else:
                torch.testing.assert_close(p.detach(), q.detach().bfloat16(), rtol=1e-2, atol=1e-2)


def test_reference_bf16_step_scratch_is_bounded_by_a_batch_not_by_the_largest_param():
    """Peak of the allocations less frees inside one CPU-path step on a bf16 param of 4Mi elements (torch's profiler):
    the fp32 copies of the param and grad take at most two batches of 2^18 elements each (4 MiB), where they took
    8 bytes per element of the param (32 MiB; probe 82)."""
    from torch.profiler import ProfilerActivity, profile

    n = 1 << 22
    p = torch.nn.Parameter(torch.randn(n).bfloat16())
    opt = FusedAdamW([p], lr=1e-3, backend="reference")
    p.grad = torch.randn(n).bfloat16()
    opt.step()  # (the states made)
    p.grad = torch.randn(n).bfloat16()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    assert events, "the profiler recorded no allocation"
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    assert peak <= 2 * 4 * 2 * (1 << 18), peak
