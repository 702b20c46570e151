"""Master weights: FusedAdamW(master_weights=True) on bf16/fp16 params keeps fp32 masters and updates them
in the same single pass that writes the rounded low-precision param."""

import copy

import pytest
import torch
from fused_ops.kernels import adam as adam_kernels

import fused_ops
from fused_ops import FusedAdamW
from fused_ops.reference import adam_ as reference_adam_
from tests.test_distributed import one_rank_group  # noqa: F401 - a fixture
from tests.utils import assert_close_list, f64

BACKENDS = ["auto", pytest.param("triton", marks=pytest.mark.interpret)]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_kernel_with_master_weights(dtype, amsgrad):
    sizes = [1, 31, 33, 65, 130]
    masters = [torch.randn(n) for n in sizes]
    params = [torch.full((n,), float("nan"), dtype=dtype) for n in sizes]  # poisoned: must be written
    t = dict(
        params=params,
        grads=[torch.randn(n).to(dtype) for n in sizes],
        exp_avgs=[0.1 * torch.randn(n) for n in sizes],
        exp_avg_sqs=[0.01 * torch.rand(n) for n in sizes],
        max_exp_avg_sqs=[0.02 * torch.rand(n) for n in sizes] if amsgrad else [],
        state_steps=[torch.tensor(5.0) for _ in sizes],
    )
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False,
              decoupled=True)  # fmt: skip
    ref = {k: f64(v) if k != "state_steps" else [s.clone() for s in v] for k, v in t.items()}
    ref_masters = f64(masters)
    reference_adam_(**ref, master_params=ref_masters, **kw)
    adam_kernels.adam_launch(**t, master_params=masters, chunk_size=64, block_size=32, **kw)
    assert_close_list(masters, ref_masters, torch.float32, "masters")
    assert_close_list(t["exp_avg_sqs"], ref["exp_avg_sqs"], torch.float32, "exp_avg_sqs")
    for p, m in zip(params, masters):
        assert torch.equal(p, m.to(dtype)), "param must be the master rounded to nearest even"


def _mlp(dtype):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_training_with_master_weights_follows_fp32(backend):
    """60 steps of a small regression, small lr: plain bf16 AdamW loses updates below half an ulp, master
    weights do not. The loss curve with master weights must follow the fp32 run more closely (measured: its mean
    gap is 1.6% of plain bf16's after 60 steps, 0.4% after 200; 60 keep the interpreter run short)."""
    x = torch.randn(256, 16)
    y = torch.sin(x.sum(1, keepdim=True))
    runs = {
        "fp32": (_mlp(torch.float32), torch.optim.AdamW, {}),
        "bf16": (_mlp(torch.bfloat16), FusedAdamW, {"backend": backend}),
        "bf16_master": (_mlp(torch.bfloat16), FusedAdamW, {"backend": backend, "master_weights": True}),
    }
    opts = {k: cls(m.parameters(), lr=2e-4, **kw) for k, (m, cls, kw) in runs.items()}
    curves = {k: [] for k in runs}
    for _ in range(60):
        for k, (m, _, _) in runs.items():
            dt = next(m.parameters()).dtype
            loss = (m(x.to(dt)).float() - y).pow(2).mean()
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            curves[k].append(loss.item())
    fp32 = torch.tensor(curves["fp32"])
    gap_plain = (torch.tensor(curves["bf16"]) - fp32).abs().mean().item()
    gap_master = (torch.tensor(curves["bf16_master"]) - fp32).abs().mean().item()
    assert curves["fp32"][-1] < curves["fp32"][0]  # it trains
    assert gap_master < 0.5 * gap_plain, (gap_master, gap_plain)
    st = opts["bf16_master"].state[next(runs["bf16_master"][0].parameters())]
    assert st["master_param"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_state_dict_is_bit_exact(backend):
    m = _mlp(torch.bfloat16)
    o = FusedAdamW(m.parameters(), lr=1e-3, master_weights=True, backend=backend)
    batches = [torch.randn(8, 16).bfloat16() for _ in range(10)]

    def run(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()

    run(m, o, batches[:5])
    saved_model = copy.deepcopy(m.state_dict())
    saved_opt = copy.deepcopy(o.state_dict())
    assert "master_param" in saved_opt["state"][0]
    run(m, o, batches[5:])
    m2 = _mlp(torch.bfloat16)
    m2.load_state_dict(saved_model)
    o2 = FusedAdamW(m2.parameters(), lr=1e-3, master_weights=True, backend=backend)
    o2.load_state_dict(saved_opt)
    run(m2, o2, batches[5:])
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for (_, s1), (_, s2) in zip(o.state_dict()["state"].items(), o2.state_dict()["state"].items()):
        for key in s1:
            assert torch.equal(s1[key], s2[key]), key


def test_torch_state_dict_loads_and_masters_are_rebuilt():
    m = _mlp(torch.bfloat16)
    o_torch = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randn(8, 16).bfloat16()
    m(x).float().pow(2).mean().backward()
    o_torch.step()
    o = FusedAdamW(m.parameters(), lr=1e-3, master_weights=True)
    o.load_state_dict(o_torch.state_dict())
    o.step()
    for p in m.parameters():
        st = o.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["step"].item() == 2
        assert torch.equal(st["master_param"].to(torch.bfloat16), p.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_step_leaves_masters_untouched(backend):
    p = torch.nn.Parameter(torch.randn(40).half())
    o = FusedAdamW([p], lr=1e-2, master_weights=True, backend=backend)
    p.grad = torch.randn(40).half()
    o.step()
    before = {k: v.clone() for k, v in o.state[p].items()}
    p_before = p.detach().clone()
    o.grad_scale, o.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    p.grad = torch.full((40,), float("inf")).half()
    o.step()
    del o.grad_scale, o.found_inf
    assert torch.equal(p, p_before)
    for k, v in before.items():
        assert torch.equal(o.state[p][k], v), k


def test_fp32_params_get_no_master():
    p = torch.nn.Parameter(torch.randn(4))
    o = FusedAdamW([p], master_weights=True)
    p.grad = torch.randn(4)
    o.step()
    assert "master_param" not in o.state[p]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_pass_mixed_precision_step_matches_unfused_torch_sequence(backend):
    """bf16 model, fp32 masters, loss scaling and clipping: fused_ops reads the grads twice (norm, then the
    Adam pass with unscale and clip folded into grad_scale); torch's sequence upcasts, unscales, clips,
    steps AdamW on fp32 masters and copies back. Same result; the overflow step is skipped by both."""
    from fused_ops import DynamicLossScaler

    model = _mlp(torch.bfloat16)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    torch_opt = torch.optim.AdamW(masters, lr=1e-3)
    ours = _mlp(torch.bfloat16)
    ours.load_state_dict(model.state_dict())
    opt = FusedAdamW(ours.parameters(), lr=1e-3, master_weights=True, backend=backend)
    scaler = DynamicLossScaler(init_scale=2.0**8, growth_interval=4, backend=backend, device="cpu")
    x = torch.randn(32, 16).bfloat16()
    for i in range(12):
        scale = scaler.get_scale()  # the same scale on both sides (a host read, fine in a test)
        # torch: unfused master-weight sequence with a host-side scale
        model.zero_grad()
        (model(x).float().pow(2).mean() * scale).backward()
        grads32 = [p.grad.float() / scale for p in model.parameters()]
        if i == 5:
            grads32[0][0, 0] = float("inf")
        if all(torch.isfinite(g).all() for g in grads32):
            for m, g in zip(masters, grads32):
                m.grad = g
            torch.nn.utils.clip_grad_norm_(masters, max_norm=0.05)
            torch_opt.step()
            with torch.no_grad():
                for p, m in zip(model.parameters(), masters):
                    p.copy_(m)
        # fused_ops: two passes over the bf16 grads, no host sync
        opt.zero_grad()
        scaler.scale_loss(ours(x).float().pow(2).mean()).backward()
        if i == 5:
            next(ours.parameters()).grad[0, 0] = float("inf")
        grads = [p.grad for p in ours.parameters()]
        grad_scale, _ = scaler.grad_scale_and_norm(grads, max_norm=0.05)
        opt.step(grad_scale=grad_scale, found_inf=scaler.found_inf)
        scaler.update()
    for m, p in zip(masters, ours.parameters()):
        torch.testing.assert_close(opt.state[p]["master_param"], m.detach(), atol=2e-6, rtol=1e-5)
        assert opt.state[p]["step"].item() == 11


# -- writes into params that have masters ---------------------------------------------------------------------
_MASTER_OPTS = {
    "FusedAdamW": lambda ps, backend: FusedAdamW(ps, lr=1e-3, weight_decay=0.1, master_weights=True, backend=backend),
    "FusedSGD": lambda ps, backend: fused_ops.FusedSGD(
        ps, lr=0.01, momentum=0.9, master_weights=True, backend=backend
    ),  # fmt: skip
    "FusedLion": lambda ps, backend: fused_ops.FusedLion(ps, lr=1e-3, master_weights=True, backend=backend),
    "FusedAdamW-int8": lambda ps, backend: FusedAdamW(
        ps, lr=1e-3, master_weights=True, state_dtype="int8", backend=backend
    ),  # fmt: skip
}


def _bf16_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)).to(torch.bfloat16)
    model[1].weight = torch.nn.Parameter(model[1].weight.detach().t().contiguous().t())  # (not contiguous)
    return model


def _grads(model, k):
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * k + i)).to(p.dtype)


_WRITES = ["load_state_dict", "in_place", "p.data ="]


@pytest.mark.parametrize(
    ("name", "backend", "write"),
    [(n, "auto", w) for n in _MASTER_OPTS for w in _WRITES]
    + [pytest.param(n, "triton", "load_state_dict", marks=pytest.mark.interpret) for n in _MASTER_OPTS],
)
def test_a_param_written_after_steps_is_its_masters_new_value(name, backend, write):
    """Before, the step computed from the master and overwrote the param: weights loaded into the model after
    the optimizer had stepped (or re-initialised in place, or given new ``.data``) were lost at the next step
    (0.75 away after one step). Now the step starts from them: bit for bit what a twin optimizer does whose masters
    were set to the written params by hand."""
    model = _bf16_model()
    opt = _MASTER_OPTS[name](model.parameters(), backend)
    for k in range(2):
        _grads(model, k)
        opt.step()
    twin_model = copy.deepcopy(model)
    twin = _MASTER_OPTS[name](twin_model.parameters(), backend)
    twin.load_state_dict(opt.state_dict())
    loaded = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    for m in (model, twin_model):
        if write == "load_state_dict":
            m.load_state_dict(loaded)
        elif write == "in_place":
            with torch.no_grad():
                for p in m.parameters():
                    p.fill_(0.5)
        else:
            for p in m.parameters():
                p.data = torch.full_like(p, 0.5)
    for p in twin_model.parameters():
        twin.state[p]["master_param"].copy_(p)
    _grads(model, 2)
    _grads(twin_model, 2)
    opt.step()
    twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], twin.state[q]["master_param"])
        assert (p.float() - 0.5).abs().max() < 0.2  # (before: 0.75 and more)


@pytest.mark.parametrize("rebind", ["p.data = p.data.t()", "swap_tensors", "p.data = view(float16)"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["FusedAdamW", "FusedSGD", "FusedLion"])
def test_a_param_given_another_view_of_its_memory_is_its_masters_new_value(name, backend, rebind):
    """``p.data = p.data.t()`` keeps the param's address and version counter: the step used to compute from the
    master in the old orientation and write it back, undoing the transposition (silently); likewise a param
    re-viewed as another dtype. The master's mark holds the view too now: the step starts from what was written, as
    a twin optimizer does whose masters were set to the written params by hand (torch.optim keeps the param)."""
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))
    opt = _MASTER_OPTS[name]([w], backend)
    w.grad = torch.randn(4, 4).to(torch.bfloat16)
    opt.step()
    master = opt.state[w]["master_param"].clone()
    if rebind == "swap_tensors":
        torch.utils.swap_tensors(w, torch.nn.Parameter(w.detach().t()))
    elif rebind == "p.data = p.data.t()":
        w.data = w.data.t()
    else:
        w.data = w.data.view(torch.float16)
    written = w.detach().clone()
    twin_w = torch.nn.Parameter(written.clone())
    twin = _MASTER_OPTS[name]([twin_w], backend)
    twin.load_state_dict(opt.state_dict())
    # (an element the write left equal to its master rounded keeps the master's precision: the diagonal of a
    # transposition)
    twin.state[twin_w]["master_param"].copy_(torch.where(master.to(written.dtype) == written, master, written.float()))
    for p in (w, twin_w):
        p.grad = torch.randn(4, 4, generator=torch.Generator().manual_seed(7)).to(p.dtype)
    opt.step()
    twin.step()
    assert torch.equal(opt.state[w]["master_param"], twin.state[twin_w]["master_param"])
    assert torch.equal(w.detach(), twin_w.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_MASTER_OPTS))
def test_masters_are_never_refreshed_by_the_optimizers_own_writes(name, backend, monkeypatch):
    """The masters keep their precision through training: steps (some skipped by found_inf), zero_grad, a state
    dict round trip and a param group added give the same bits as with the refresh turned off."""
    runs = []
    for refresh in (True, False):
        if not refresh:
            monkeypatch.setattr(fused_ops.optim.FusedOptimizer, "_refresh_masters", lambda self, plans, out: [])
        model = _bf16_model()
        extra = torch.nn.Parameter(torch.randn(9).to(torch.bfloat16))
        opt = _MASTER_OPTS[name](model.parameters(), backend)
        for k in range(6):
            _grads(model, k)
            if k == 3:
                opt.add_param_group({"params": [extra]})
            if k >= 3:
                extra.grad = torch.randn(9).to(torch.bfloat16)
            inf = torch.tensor([1.0 if k == 2 else 0.0])
            opt.step(found_inf=inf)
            opt.zero_grad()
            if k == 4:
                opt.load_state_dict(opt.state_dict())
        runs.append([p.detach().clone() for p in [*model.parameters(), extra]]
                    + [opt.state[p]["master_param"].clone() for p in [*model.parameters(), extra]])  # fmt: skip
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    masters = runs[0][len(runs[0]) // 2 :]
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters)  # (they hold more than bf16)


def test_a_step_that_fails_puts_a_refreshed_master_back(monkeypatch):
    """The refresh is a write of the step: a step that fails before its launches leaves the master as it was."""
    model = _bf16_model()
    opt = FusedAdamW(model.parameters(), lr=1e-3, master_weights=True, backend="reference")
    _grads(model, 0)
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    masters = [opt.state[p]["master_param"].clone() for p in model.parameters()]
    from fused_ops.optim import _base

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(_base._GroupPlan, "prepare", fail)
    _grads(model, 1)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    for p, m in zip(model.parameters(), masters):
        assert torch.equal(opt.state[p]["master_param"], m)
    monkeypatch.undo()
    opt.step()
    assert all((p.float() - 0.5).abs().max() < 0.01 for p in model.parameters())


@pytest.mark.distributed
@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
def test_fsdp2_params_loaded_after_steps_are_their_masters_new_value(backend):
    """FSDP2 (``fully_shard``) bf16 params with fp32 masters: ``model.load_state_dict`` after steps writes the local
    shards without moving their version counters (only the DTensors'): the next step starts from the loaded
    weights (before: 0.9 away after one step, the old masters' values)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(torch.bfloat16)
    for m in model:
        fully_shard(m)
    fully_shard(model)
    opt = FusedAdamW(model.parameters(), lr=1e-3, master_weights=True, backend=backend)
    for _ in range(2):
        model(torch.randn(4, 6, dtype=torch.bfloat16)).sum().backward()
        opt.step()
        opt.zero_grad()
    sd = model.state_dict()
    model.load_state_dict({k: distribute_tensor(torch.full(v.shape, 0.5, dtype=v.dtype), v.device_mesh,
                                                v.placements) for k, v in sd.items()})  # fmt: skip
    model(torch.randn(4, 6, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    for p in model.parameters():
        assert (p.full_tensor().float() - 0.5).abs().max() < 0.01
        assert torch.equal(opt.state[p]["master_param"].to_local().to(torch.bfloat16), p.to_local())


def _write_half(model):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)


def _near_half(model):
    return max((p.float() - 0.5).abs().max().item() for p in model.parameters()) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_around_param_group_removal_and_loads_are_kept(backend):
    """The marks of a removed group's neighbours survive (the groups after it move down a place); a write just
    after or just before ``opt.load_state_dict`` is kept (the loaded masters are compared with the params, as
    ZeroAdamW does and as torch.optim keeps the params), while a model of the same checkpoint resumes bit for bit."""
    model = _bf16_model()
    extra = torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))
    opt = FusedAdamW([{"params": [extra]}, {"params": list(model.parameters())}], lr=1e-3, master_weights=True,
                     backend=backend)  # fmt: skip
    for k in range(2):
        _grads(model, k)
        extra.grad = torch.randn(4).to(torch.bfloat16)
        opt.step()
    del opt.param_groups[0]
    _write_half(model)
    _grads(model, 2)
    opt.step()
    assert _near_half(model)

    for when in ("after", "before"):
        model = _bf16_model()
        opt = FusedAdamW(model.parameters(), lr=1e-3, master_weights=True, backend=backend)
        _grads(model, 0)
        opt.step()
        sd = opt.state_dict()
        if when == "before":
            _write_half(model)
        opt.load_state_dict(sd)
        if when == "after":
            _write_half(model)
        _grads(model, 1)
        opt.step()
        assert _near_half(model), when

    model = _bf16_model()
    opt = FusedAdamW(model.parameters(), lr=1e-3, master_weights=True, backend=backend)
    for k in range(3):
        _grads(model, k)
        opt.step()
    opt_sd, model_sd = opt.state_dict(), copy.deepcopy(model.state_dict())
    resumed = _bf16_model(seed=1)
    ropt = FusedAdamW(resumed.parameters(), lr=1e-3, master_weights=True, backend=backend)
    ropt.load_state_dict(opt_sd)
    resumed.load_state_dict(model_sd)  # (after the optimizer's: the same values as its masters rounded)
    for k in range(3, 5):
        for m, o in ((model, opt), (resumed, ropt)):
            _grads(m, k)
            o.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], ropt.state[q]["master_param"])


def test_a_write_after_a_compiled_step_is_kept_by_the_next_eager_step():
    """A compiled step leaves no marks; the eager step after it compares every master with its param, so a write
    in between is kept (before: overwritten from the old masters)."""
    model = _bf16_model()
    model[1].weight = torch.nn.Parameter(model[1].weight.detach().contiguous())
    opt = FusedAdamW(model.parameters(), lr=1e-3, master_weights=True, backend="reference")
    _grads(model, 0)
    opt.step()
    compiled = torch.compile(opt.step, backend="aot_eager")
    _grads(model, 1)
    compiled()
    _write_half(model)
    _grads(model, 2)
    opt.step()
    assert _near_half(model)
