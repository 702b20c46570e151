"""The optimizer family on FusedOptimizer: FusedSGD against torch.optim.SGD and FusedLion against a plain-torch
Lion, over 100 steps, on both backends (the Triton kernels under the interpreter on CPU), with schedulers,
closures, skipped params, masters, state dicts both ways, GradScaler's found_inf, bad hyper-parameters, and DTensor
(tensor-parallel) params on 2 gloo ranks."""

from __future__ import annotations

import copy
import operator

import pytest
import torch

import fused_ops
from tests.test_distributed import spawn

BACKENDS = ("reference", "triton")
SHAPES = ((3, 5), (17,), (1,), (0,), (2, 65))
STEPS = 100


def _params(seed: int, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(step: int, params) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _max_err(a, b) -> float:
    """The largest difference, relative to max(1, |b|): "within 1e-6" in fp32 is a few ulp of values near 1 (params
    that grow to 7 after 100 steps differ from torch by an ulp or two of theirs: 5e-7 each)."""
    errs = [((x.detach().double() - y.detach().double()).abs() / y.detach().double().abs().clamp(min=1)).max().item()
            for x, y in zip(a, b) if x.numel()]  # fmt: skip
    return max(errs, default=0.0)


def _lion_reference(params, exp_avgs, lr, beta1, beta2, wd, maximize=False) -> None:
    """lucidrains/lion-pytorch's update, written out independently of fused_ops."""
    for p, m in zip(params, exp_avgs):
        if p.grad is None:
            continue
        g = -p.grad if maximize else p.grad
        p.data.mul_(1 - lr * wd)
        update = (m * beta1 + g * (1 - beta1)).sign_()
        p.data.add_(update, alpha=-lr)
        m.mul_(beta2).add_(g, alpha=1 - beta2)


SGD_CONFIGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.8, nesterov=True, weight_decay=0.05),
    dict(momentum=0.9, maximize=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_sgd_matches_torch_over_100_steps(backend, config):
    """100 steps on the reference backend for every config; on the Triton kernel (interpreted: ~0.1 s a step) 100 for
    the config that uses every term (momentum, dampening, weight decay) and 30 for the others (the kernel equals
    the float64 oracle step by step in tests/test_sgd_kernel.py)."""
    steps = STEPS if backend == "reference" or config.get("dampening") else 30
    ours, theirs = _params(0), _params(0)
    o = fused_ops.FusedSGD(ours, lr=0.05, backend=backend, **config)
    t = torch.optim.SGD(theirs, lr=0.05, foreach=False, **config)
    so = torch.optim.lr_scheduler.StepLR(o, step_size=12, gamma=0.7)
    st = torch.optim.lr_scheduler.StepLR(t, step_size=12, gamma=0.7)
    for k in range(steps):
        for a, b, g in zip(ours, theirs, _grads(k, ours)):
            a.grad, b.grad = g.clone(), g.clone()
        if k % 7 == 3:  # a param without a grad this step (its buffer, if any, waits)
            ours[1].grad = theirs[1].grad = None
        if k == 20:  # a closure, as torch: called under enable_grad, its value returned
            assert o.step(lambda: torch.tensor(1.5)).item() == 1.5
            t.step()
        else:
            o.step()
            t.step()
        so.step()
        st.step()
    assert _max_err(ours, theirs) <= 1e-6
    assert o.param_groups[0]["lr"] == t.param_groups[0]["lr"]
    if config.get("momentum"):
        for a, b in zip(ours, theirs):
            assert _max_err([o.state[a]["momentum_buffer"]], [t.state[b]["momentum_buffer"]]) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_state_dict_both_ways(backend):
    config = dict(momentum=0.9, dampening=0.1, weight_decay=0.01)
    ours, theirs = _params(1), _params(1)
    o = fused_ops.FusedSGD(ours, lr=0.1, backend=backend, **config)
    t = torch.optim.SGD(theirs, lr=0.1, foreach=False, **config)
    for k in range(5):
        for a, b, g in zip(ours, theirs, _grads(k, ours)):
            a.grad, b.grad = g.clone(), g.clone()
        o.step()
        t.step()
    sd, tsd = o.state_dict(), t.state_dict()
    assert sd["param_groups"][0].keys() == tsd["param_groups"][0].keys()
    assert all(set(v) == {"momentum_buffer"} for v in sd["state"].values())
    # torch's dict into ours, ours into torch's: both continue like the originals
    o2 = fused_ops.FusedSGD(_params(1), lr=0.1, backend=backend, **config)
    t2 = torch.optim.SGD(_params(1), lr=0.1, foreach=False, **config)
    for p2, p in zip(o2.param_groups[0]["params"], ours):
        p2.data.copy_(p.data)
    for p2, p in zip(t2.param_groups[0]["params"], theirs):
        p2.data.copy_(p.data)
    o2.load_state_dict(tsd)  # (copies: ours never aliases the source dict)
    t2.load_state_dict(copy.deepcopy(sd))  # (torch keeps the dict's tensors: they would be o's live buffers)
    for k in range(5, 10):
        grads = _grads(k, ours)
        for opt in (o, t, o2, t2):
            for p, g in zip(opt.param_groups[0]["params"], grads):
                p.grad = g.clone()
            opt.step()
    assert _max_err(o2.param_groups[0]["params"], theirs) <= 1e-6
    assert _max_err(t2.param_groups[0]["params"], ours) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [dict(), dict(weight_decay=0.1), dict(weight_decay=0.05, maximize=True)],
                         ids=["plain", "wd", "wd-maximize"])  # fmt: skip
def test_lion_matches_plain_torch_over_100_steps(backend, config):
    """100 steps on the reference backend; on the interpreted kernel 100 with weight decay and 30 otherwise. A StepLR
    schedule (the plain-torch Lion takes the lr the scheduler set) and a closure at step 20."""
    steps = STEPS if backend == "reference" or config == dict(weight_decay=0.1) else 30
    ours, theirs = _params(2), _params(2)
    o = fused_ops.FusedLion(ours, lr=1e-3, betas=(0.9, 0.99), backend=backend, **config)
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=11, gamma=0.6)
    exp_avgs = [torch.zeros_like(p) for p in theirs]
    for k in range(steps):
        for a, b, g in zip(ours, theirs, _grads(k, ours)):
            a.grad, b.grad = g.clone(), g.clone()
        if k % 9 == 4:
            ours[0].grad = theirs[0].grad = None
        lr = o.param_groups[0]["lr"]
        if k == 20:  # a closure, as torch: called under enable_grad, its value returned
            assert o.step(lambda: torch.tensor(2.5)).item() == 2.5
        else:
            o.step()
        wd, maximize = config.get("weight_decay", 0.0), config.get("maximize", False)
        _lion_reference(theirs, exp_avgs, lr, 0.9, 0.99, wd, maximize)
        sched.step()
    assert o.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.6 ** (steps // 11))
    assert _max_err(ours, theirs) <= 1e-6
    assert _max_err([o.state[p]["exp_avg"] for p in ours], exp_avgs) <= 1e-6
    # state dict round trip into a fresh optimizer continues identically
    o2 = fused_ops.FusedLion(_params(2), lr=1e-3, backend=backend, **config)
    for p2, p in zip(o2.param_groups[0]["params"], ours):
        p2.data.copy_(p.data)
    o2.load_state_dict(o.state_dict())
    grads = _grads(steps, ours)
    for opt in (o, o2):
        for p, g in zip(opt.param_groups[0]["params"], grads):
            p.grad = g.clone()
        opt.step()
    assert _max_err(o2.param_groups[0]["params"], ours) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", [(fused_ops.FusedSGD, dict(lr=0.1, momentum=0.9)),
                                        (fused_ops.FusedLion, dict(lr=1e-2, weight_decay=0.1))],
                         ids=["sgd", "lion"])  # fmt: skip
def test_bf16_params_with_fp32_masters(backend, cls, kwargs):
    ref = _params(3)
    ours = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in ref]
    ref = [torch.nn.Parameter(p.detach().to(torch.bfloat16).float()) for p in ref]  # the same start values
    o = cls(ours, master_weights=True, backend=backend, **kwargs)
    r = cls(ref, backend=backend, **kwargs)
    for k in range(10):
        for a, b, g in zip(ours, ref, _grads(k, ref)):
            a.grad, b.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        o.step()
        r.step()
    masters = [o.state[p]["master_param"] for p in ours]
    assert all(m.dtype == torch.float32 for m in masters)
    assert _max_err(masters, ref) <= 1e-6  # the fp32 update of the same grads
    for p, m in zip(ours, masters):
        assert torch.equal(p.detach(), m.to(torch.bfloat16))  # params are the masters rounded to nearest even


@pytest.mark.parametrize("cls", [fused_ops.FusedSGD, fused_ops.FusedLion, fused_ops.FusedAdamW])
def test_a_tensor_lr_is_not_read_on_the_host_at_each_step(cls, monkeypatch):
    """A tensor lr kept on the device costs no host sync: the step checks its shape and dtype, not its value (the
    constructor checks the value once), as FusedAdam does; the launch reads it on the device."""
    p = torch.nn.Parameter(torch.randn(300))
    opt = cls([p], lr=torch.tensor(0.01), backend="triton", **({"momentum": 0.9} if cls is fused_ops.FusedSGD else {}))
    twin = torch.nn.Parameter(p.detach().clone())
    ref = cls([twin], lr=0.01, backend="triton", **({"momentum": 0.9} if cls is fused_ops.FusedSGD else {}))

    def no_item(self):
        raise AssertionError("Tensor.item() called during the step")

    for k in range(2):
        p.grad = torch.randn(300, generator=torch.Generator().manual_seed(k))
        twin.grad = p.grad.clone()
        ref.step()
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", no_item)
            opt.step()
    assert torch.equal(p, twin)
    opt.param_groups[0]["lr"] = torch.tensor([0.01, 0.02])  # (its shape is still checked: before any change)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="1-element"):
        opt.step()
    assert torch.equal(p, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", [(fused_ops.FusedSGD, dict(lr=0.1, momentum=0.9)),
                                        (fused_ops.FusedLion, dict(lr=1e-2))], ids=["sgd", "lion"])  # fmt: skip
def test_found_inf_skips_the_step_and_grad_scale_unscales(backend, cls, kwargs):
    ours, theirs = _params(4), _params(4)
    o, t = cls(ours, backend=backend, **kwargs), cls(theirs, backend=backend, **kwargs)
    for k in range(3):
        grads = _grads(k, ours)
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g * 8.0, g.clone()
        o.step(grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([0.0]))
        t.step()
    assert _max_err(ours, theirs) <= 1e-6
    before = [p.detach().clone() for p in ours]
    states = [{k: v.clone() for k, v in o.state[p].items()} for p in ours]
    for p in ours:
        p.grad = torch.full_like(p, float("inf"))
    o.step(found_inf=torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(ours, before))
    assert all(torch.equal(o.state[p][k], v) for p, st in zip(ours, states) for k, v in st.items())


def test_state_dict_hooks_run_as_torch_runs_them():
    """``state_dict()``'s hooks as torch.optim runs them: the pre hooks first (a post hook one of them registers
    runs too), then the post hooks, in order, on the dict ``state_dict`` returns (this package's group keys left
    out: the same keys as torch's), each one's return value replacing it."""

    def run(opt):
        calls, seen, handles = [], {}, []

        def pre(o):
            calls.append("pre")
            if not handles:
                handles.append(o.register_state_dict_post_hook(lambda o, sd: calls.append("registered by pre")))

        def look(o, sd):
            calls.append("look")
            seen["group"] = sorted(sd["param_groups"][0])
            seen["state"] = {k: sorted(v) for k, v in sd["state"].items()}

        def by_name(o, sd):
            calls.append("by_name")
            return {**sd, "state": {f"p{k}": v for k, v in sd["state"].items()}}

        opt.register_state_dict_pre_hook(pre)
        opt.register_state_dict_post_hook(look)
        opt.register_state_dict_post_hook(by_name)
        sd = opt.state_dict()
        handles[0].remove()
        return calls, seen, sd

    config = dict(momentum=0.9, dampening=0.1, weight_decay=0.01)
    ours, theirs = _params(1), _params(1)
    o = fused_ops.FusedSGD(ours, lr=0.1, backend="reference", **config)
    t = torch.optim.SGD(theirs, lr=0.1, foreach=False, **config)
    for a, b, g in zip(ours, theirs, _grads(0, ours)):
        a.grad, b.grad = g.clone(), g.clone()
    o.step()
    t.step()
    (calls, seen, sd), (t_calls, t_seen, t_sd) = run(o), run(t)
    assert calls == t_calls == ["pre", "look", "by_name", "registered by pre"]
    assert seen == t_seen
    assert set(sd["state"]) == set(t_sd["state"]) == {f"p{k}" for k in range(len(SHAPES))}
    assert sd["param_groups"][0].keys() == t_sd["param_groups"][0].keys()
    for k, st in t_sd["state"].items():
        assert torch.equal(sd["state"][k]["momentum_buffer"], st["momentum_buffer"])


def test_bad_hyperparameters_raise_torch_messages():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for kwargs in (dict(lr=-1.0), dict(momentum=-0.5), dict(weight_decay=-1.0), dict(nesterov=True),
                   dict(nesterov=True, momentum=0.9, dampening=0.1)):  # fmt: skip
        with pytest.raises(ValueError) as ours:
            fused_ops.FusedSGD(p, **{"lr": 0.1, **kwargs})
        with pytest.raises(ValueError) as theirs:
            torch.optim.SGD(p, **{"lr": 0.1, **kwargs})
        assert str(ours.value) == str(theirs.value)
    for ours_cls, torch_cls in ((fused_ops.FusedSGD, torch.optim.SGD), (fused_ops.FusedAdamW, torch.optim.AdamW)):
        with pytest.raises(RuntimeError) as ours:
            ours_cls(p, lr=0.1, foreach=True, fused=True)
        with pytest.raises(RuntimeError) as theirs:
            torch_cls(p, lr=0.1, foreach=True, fused=True)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        fused_ops.FusedLion(p, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="learning rate"):
        fused_ops.FusedLion(p, lr=float("nan"))
    o = fused_ops.FusedSGD(p, lr=0.1, momentum=0.9)
    p[0].grad = torch.ones(3)
    o.param_groups[0]["momentum"] = -1.0  # a scheduler's bad value: refused at the step, nothing changed
    with pytest.raises(ValueError, match="momentum.*param group 0"):
        o.step()
    assert torch.equal(p[0].detach(), torch.zeros(3)) and not o.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_momentum_switched_on_and_plan_rebuilt(backend):
    """A group whose momentum goes from 0 to non-zero gets buffers (first step: buf = g), as torch."""
    ours, theirs = _params(5), _params(5)
    o = fused_ops.FusedSGD(ours, lr=0.1, backend=backend)
    t = torch.optim.SGD(theirs, lr=0.1, foreach=False)
    for k in range(6):
        if k == 3:
            o.param_groups[0]["momentum"] = t.param_groups[0]["momentum"] = 0.9
            o.param_groups[0]["dampening"] = t.param_groups[0]["dampening"] = 0.2
        for a, b, g in zip(ours, theirs, _grads(k, ours)):
            a.grad, b.grad = g.clone(), g.clone()
        o.step()
        t.step()
    assert _max_err(ours, theirs) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_replaced_param_and_state_are_seen(backend):
    """The plan machinery of FusedOptimizer: a param replaced in the group, or its state emptied, is seen."""
    ours, theirs = _params(6), _params(6)
    o = fused_ops.FusedSGD(ours, lr=0.1, momentum=0.9, backend=backend)
    t = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, foreach=False)
    for k in range(6):
        if k == 2:
            new_o, new_t = torch.nn.Parameter(torch.ones(3, 5)), torch.nn.Parameter(torch.ones(3, 5))
            o.param_groups[0]["params"][0] = new_o
            t.param_groups[0]["params"][0] = new_t
            ours[0], theirs[0] = new_o, new_t
        if k == 4:
            o.state[ours[2]] = {}
            t.state[theirs[2]] = {}
        for a, b, g in zip(ours, theirs, _grads(k, ours)):
            a.grad, b.grad = g.clone(), g.clone()
        o.step()
        t.step()
    assert _max_err(ours, theirs) <= 1e-6


# -- DTensor (tensor parallel) on 2 gloo ranks --------------------------------------------------------------------
def run_family_dtensor(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    shapes = [((4, 6), Shard(0)), ((6, 5), Shard(1)), ((5,), Replicate()), ((1, 4), Shard(0))]
    out = {}
    for backend in BACKENDS:
        for name in ("sgd", "lion"):
            gen = torch.Generator().manual_seed(0)
            fulls = [torch.randn(s, generator=gen) for s, _ in shapes]
            ours = [torch.nn.Parameter(distribute_tensor(f.clone(), mesh, [pl])) for f, (_, pl) in zip(fulls, shapes)]
            plain = [torch.nn.Parameter(f.clone()) for f in fulls]
            if name == "sgd":
                o = fused_ops.FusedSGD(ours, lr=0.05, momentum=0.9, weight_decay=0.01, backend=backend)
                t = torch.optim.SGD(plain, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False)
            else:
                o = fused_ops.FusedLion(ours, lr=1e-2, weight_decay=0.1, backend=backend)
                exp_avgs = [torch.zeros_like(p) for p in plain]
            for k in range(10):
                gg = torch.Generator().manual_seed(100 + k)
                for a, b in zip(ours, plain):
                    full = torch.randn(b.shape, generator=gg)
                    a.grad = distribute_tensor(full, mesh, a.placements)
                    b.grad = full.clone()
                o.step()
                if name == "sgd":
                    t.step()
                else:
                    _lion_reference(plain, exp_avgs, 1e-2, 0.9, 0.99, 0.1)
            key = "momentum_buffer" if name == "sgd" else "exp_avg"
            out[f"{backend}-{name}"] = {
                "err": max((a.full_tensor() - b.detach()).abs().max().item() for a, b in zip(ours, plain)),
                "states_are_dtensors": all(
                    isinstance(o.state[p][key], DTensor) and o.state[p][key].placements == p.placements for p in ours
                ),  # fmt: skip
            }
        # bf16 moments (stochastic rounding) on DTensor shards: close to torch's fp32 AdamW (8-bit states on DTensor
        # shards: tests/test_lowbit_dtensor.py)
        gen = torch.Generator().manual_seed(0)
        fulls = [torch.randn(s, generator=gen) for s, _ in shapes]
        ours = [torch.nn.Parameter(distribute_tensor(f.clone(), mesh, [pl])) for f, (_, pl) in zip(fulls, shapes)]
        plain = [torch.nn.Parameter(f.clone()) for f in fulls]
        o = fused_ops.FusedAdamW(ours, lr=1e-2, state_dtype="bfloat16", backend=backend)
        t = torch.optim.AdamW(plain, lr=1e-2, foreach=False)
        for k in range(10):
            gg = torch.Generator().manual_seed(100 + k)
            for a, b in zip(ours, plain):
                full = torch.randn(b.shape, generator=gg)
                a.grad = distribute_tensor(full, mesh, a.placements)
                b.grad = full.clone()
            o.step()
            t.step()
        out[f"{backend}-adamw-bf16"] = {
            "err": max((a.full_tensor() - b.detach()).abs().max().item() for a, b in zip(ours, plain)),
            "states_are_dtensors": all(
                isinstance(o.state[p]["exp_avg"], DTensor) and o.state[p]["exp_avg"].dtype == torch.bfloat16
                for p in ours
            ),  # fmt: skip
        }
    return out


@pytest.mark.distributed
def test_sgd_and_lion_on_dtensor_params(tmp_path):
    results = spawn("tests.test_optim_family:run_family_dtensor", 2, str(tmp_path), timeout=400)
    for rank, res in enumerate(results):
        for key, r in res.items():
            # bf16 moments: 10 steps of lr 1e-2 within 1e-3 of fp32 moments (bf16 keeps 8 bits: the update's
            # relative error is ~2^-9, times lr 1e-2, times 10 steps)
            assert r["err"] <= (1e-3 if key.endswith("bf16") else 1e-6), (rank, key, r)
            assert r["states_are_dtensors"], (rank, key)


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
@pytest.mark.parametrize("cls,kwargs,op", [
    (fused_ops.FusedSGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01), "sgd_"),
    (fused_ops.FusedSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), "sgd_"),
    (fused_ops.FusedLion, dict(lr=1e-2, weight_decay=0.1), "lion_"),
], ids=["sgd", "sgd-nesterov", "lion"])  # fmt: skip
def test_compiled_step_matches_eager(cls, kwargs, op):
    """``torch.compile(opt.step)`` takes the traced path: one ``fused_ops::sgd_`` / ``fused_ops::lion_`` call per
    part (fp32 and bf16-with-master params in one group are two parts), each run inside a graph Dynamo captured, at
    the first step (states created) and at the next (states existing); and it equals the eager step bit for bit
    (reference backend), new SGD buffers included. (Dynamo still breaks the graph at the step's checks,
    ``_check_all_groups``, as for Adam: they compare data pointers.)"""
    target = getattr(torch.ops.fused_ops, op).default
    in_graphs = []  # for every run of a captured graph: how many of the ops it holds

    def recorder(gm, example_inputs):  # (Dynamo alone, as EagerAndRecordGraphs, counting what each run executes)
        n = sum(node.target is target for node in gm.graph.nodes)

        def run(*args):
            in_graphs.append(n)
            return gm.forward(*args)

        return run

    def make():
        gen = torch.Generator().manual_seed(7)
        return [torch.nn.Parameter(torch.randn(5, 3, generator=gen)),
                torch.nn.Parameter(torch.randn(17, generator=gen).to(torch.bfloat16))]  # fmt: skip

    ours, theirs = make(), make()
    eager = cls(ours, master_weights=True, backend="reference", **kwargs)
    compiled_opt = cls(theirs, master_weights=True, backend="reference", **kwargs)
    for k, backend in enumerate((recorder, recorder, "inductor", "inductor")):
        if k % 2 == 0:
            torch._dynamo.reset()
            step = torch.compile(compiled_opt.step, backend=backend)
        for a, b, g in zip(ours, theirs, _grads(k, ours)):
            a.grad, b.grad = g.clone(), g.clone()
        eager.step()
        start = len(in_graphs)
        step()
        if backend is recorder:  # (a graph compiled at the first step may run again at the second)
            assert sum(in_graphs[start:]) == 2, f"step {k}: {op} calls run in captured graphs: {in_graphs[start:]}"
    assert compiled_opt._plans == {}  # (the traced path)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.detach(), b.detach())
        for key, v in eager.state[a].items():
            assert torch.equal(compiled_opt.state[b][key], v), key


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
@pytest.mark.parametrize("cls", [fused_ops.FusedSGD, fused_ops.FusedLion, fused_ops.FusedAdamW],
                         ids=["sgd", "lion", "adamw"])  # fmt: skip
def test_compiled_step_checks_every_group_before_any_changes(cls):
    """Under ``torch.compile`` too, a bad group (here a sparse grad in the second) raises before the first group is
    stepped or any state is created."""
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    a.grad, b.grad = torch.randn(4), torch.randn(3).to_sparse()
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.1, backend="reference")
    before = a.detach().clone()
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        torch.compile(opt.step, backend="eager")()
    assert torch.equal(a.detach(), before) and len(opt.state) == 0


# -- torch parity of the API surface (probe 30) ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_without_momentum_state_dict_has_torch_layout(backend):
    """FusedSGD with momentum 0 keeps nothing per param, but its state_dict had an empty entry per stepped param
    (``{0: {}, 1: {}}``) where torch.optim.SGD's is ``{}``: left out now; with momentum the buffers are there."""
    for momentum in (0.0, 0.9):
        ps, qs = _params(0), _params(0)
        ours = fused_ops.FusedSGD(ps, lr=0.1, momentum=momentum, backend=backend)
        theirs = torch.optim.SGD(qs, lr=0.1, momentum=momentum)
        for step in range(2):
            for p, q, g in zip(ps, qs, _grads(step, ps)):
                p.grad, q.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
        a, b = ours.state_dict()["state"], theirs.state_dict()["state"]
        assert a.keys() == b.keys() and all(a[k].keys() == b[k].keys() for k in a)
        assert (a == {}) == (momentum == 0.0)
        assert _max_err(ps, qs) < 1e-6
        theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("cls", [fused_ops.FusedAdam, fused_ops.FusedAdamW, fused_ops.FusedSGD, fused_ops.FusedLion])
def test_integer_tensor_lr_refused_when_given(cls):
    """An integer tensor lr (torch takes one) passed the constructor and add_param_group, then every step raised:
    refused where it is given now, nothing added."""
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element and floating-point, got torch.int64$"):
        cls(_params(0), lr=torch.tensor(1))
    opt = cls(_params(0), lr=0.1)
    params = list(opt.param_groups[0]["params"])
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element and floating-point, got torch.bool$"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": torch.tensor(True)})
    assert len(opt.param_groups) == 1 and all(map(operator.is_, opt.param_groups[0]["params"], params))
    cls(_params(0), lr=torch.tensor(0.1, dtype=torch.float64))  # (a floating one of any dtype, as before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_takes_numpy_betas_set_between_steps(backend):
    """FusedLion refused betas set by hand as numpy numbers (or a tensor next to a float) at step, where FusedAdam
    takes them: now the same values step the same as floats."""
    np = pytest.importorskip("numpy")
    results = []
    for betas in ((0.9, 0.99), (np.float32(0.9), np.float64(0.99)), (torch.tensor(0.9), 0.99)):
        ps = _params(1)
        opt = fused_ops.FusedLion(ps, lr=0.01, backend=backend)
        for step in range(2):
            for p, g in zip(ps, _grads(step, ps)):
                p.grad = g
            opt.step()
            opt.param_groups[0]["betas"] = betas
        results.append([p.detach().clone() for p in ps])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
def test_step_inside_autocast_is_the_plain_step(backend, autocast_dtype):
    """The reference backend's low-bit/Kahan steps failed inside a ``torch.autocast`` region of the other 16-bit dtype
    (``torch.cat`` of bf16 states through autocast's promotion); torch.optim steps there. The step runs with autocast
    off: the same bits as outside it."""
    configs = [
        (torch.float32, dict(state_dtype="bfloat16", stochastic_rounding=False)),
        (torch.bfloat16, dict(state_dtype="int8")),
        (torch.float16, dict(state_dtype="bfloat16", stochastic_rounding=True)),
        (torch.bfloat16, dict(kahan_summation=True)),
    ]
    for dtype, kw in configs:
        results = []
        for autocast in (False, True):
            torch.manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(40).to(dtype)), torch.nn.Parameter(torch.randn(6, 5).to(dtype))]
            opt = fused_ops.FusedAdamW(ps, lr=1e-2, backend=backend, **kw)
            for _ in range(2):
                for p in ps:
                    p.grad = torch.randn_like(p)
                with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
                    opt.step()
            results.append([p.detach().clone() for p in ps])
        assert all(torch.equal(a, b) for a, b in zip(*results)), (dtype, kw)
