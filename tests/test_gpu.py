"""GPU tier: the compiled Triton kernels on CUDA (skipped without a GPU; run by benchmarks/gpu_check.sh)."""

import copy

import pytest
import torch

from fused_ops import FusedAdamW, functional, reference
from tests.utils import DTYPES, assert_close_list

pytestmark = pytest.mark.gpu


def _state(sizes, dtype, device="cuda"):
    return dict(
        params=[torch.randn(n, device=device).to(dtype) for n in sizes],
        grads=[torch.randn(n, device=device).to(dtype) for n in sizes],
        exp_avgs=[0.1 * torch.randn(n, device=device) for n in sizes],
        exp_avg_sqs=[0.01 * torch.rand(n, device=device) for n in sizes],
        max_exp_avg_sqs=[0.02 * torch.rand(n, device=device) for n in sizes],
        state_steps=[torch.tensor(2.0, device=device) for _ in sizes],
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
def test_kernel_matches_float64_on_cuda(dtype, amsgrad, decoupled):
    sizes = [0, 1, 1023, 1025, 65535, 65537, 200_003] + [7 * i + 1 for i in range(20)]
    t = _state(sizes, dtype)
    ref = {k: [x.cpu().double() if k != "state_steps" else x.cpu().clone() for x in v] for k, v in t.items()}
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False)
    reference.adam_(**ref, decoupled=decoupled, **kw)
    functional.adam_(**t, decoupled_weight_decay=decoupled, backend="triton", **kw)
    assert_close_list([p.cpu() for p in t["params"]], ref["params"], dtype, "params")
    assert_close_list([m.cpu() for m in t["exp_avgs"]], ref["exp_avgs"], torch.float32, "exp_avgs")
    assert [s.item() for s in t["state_steps"]] == [3.0] * len(sizes)


def test_found_inf_skips_on_cuda():
    t = _state([5, 70000], torch.float32)
    before = {k: [x.clone() for x in v] for k, v in t.items()}
    functional.adam_(**t, lr=1e-2, amsgrad=True, grad_scale=torch.tensor(8.0, device="cuda"),
                     found_inf=torch.tensor(1.0, device="cuda"), backend="triton")  # fmt: skip
    for k in before:
        for a, b in zip(t[k], before[k]):
            assert torch.equal(a, b), k


def _model(device="cuda"):
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)).to(device)


def _set_grads(model, grads):
    """Give every param a copy of its grad in ``grads``: new tensors, so the grads move at every call."""
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def _max_diff(m1, m2):
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


def test_fused_adamw_matches_torch_fused_on_cuda():
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-3, fused=True)
    o2 = FusedAdamW(m2.parameters(), lr=1e-3)
    for _ in range(50):
        x = torch.randn(32, 64, device="cuda")
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    assert diff < 1e-6


def test_moved_grads_are_repointed_on_cuda():
    """Grads at new addresses every step (the old ones kept alive): one plan, its table repointed in place."""
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-3, fused=True)
    o2 = FusedAdamW(m2.parameters(), lr=1e-3)
    keep = []
    for i in range(6):
        grads = [torch.randn_like(p) for p in m1.parameters()]
        for m in (m1, m2):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        keep += [p.grad for p in m2.parameters()]
        o1.step()
        o2.step()
        if i == 0:
            plan, table = o2._plans[0], o2._plans[0].parts[0].launcher.table.table
        assert o2._plans[0] is plan and o2._plans[0].parts[0].launcher.table.table is table
    torch.cuda.synchronize()
    diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    assert diff < 1e-6


def test_cuda_graph_capture_of_step():
    """capturable=True: warm up, capture step() in a CUDA graph, replay; equals eager steps."""
    m_eager = _model()
    m_graph = copy.deepcopy(m_eager)
    o_eager = FusedAdamW(m_eager.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    o_graph = FusedAdamW(m_graph.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    grads = [[torch.randn_like(p) for p in m_eager.parameters()] for _ in range(6)]
    for p, g in zip(m_graph.parameters(), grads[0]):
        p.grad = g.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        o_graph.step()  # warm-up: creates the state and the cached chunk table
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph.step()
    for p, g in zip(m_eager.parameters(), grads[0]):
        p.grad = g.clone()
    o_eager.step()
    for gs in grads[1:]:
        for p, q, g in zip(m_eager.parameters(), m_graph.parameters(), gs):
            p.grad = g.clone()
            q.grad.copy_(g)
        o_eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(m_eager.parameters(), m_graph.parameters()):
        assert torch.equal(a, b)
    assert all(st["step"].item() == 6 for st in o_graph.state.values())


def test_cuda_tensor_hyperparameters_are_refused_inside_a_capture():
    """betas/eps/weight_decay as CUDA tensors are read on the host at every step: eager steps take them (a sync),
    a capture gets a clear ValueError before anything changes, not an invalidated capture."""
    p = torch.nn.Parameter(torch.randn(300, device="cuda"))
    cuda = lambda x: torch.tensor(x, device="cuda")  # noqa: E731
    opt = FusedAdamW([p], lr=cuda(1e-3), betas=(cuda(0.9), cuda(0.999)), weight_decay=cuda(0.01), capturable=True)
    p.grad = torch.randn_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="CUDA graph capture forbids"):
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.synchronize()
    assert torch.equal(p, before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in opt.state[p].items())


def test_cuda_graph_capture_with_grads_moved_since_warm_up():
    """Grads at new addresses when capture starts: the table is repointed inside the capture (its pinned source
    kept alive), so replays read the captured grads."""
    m_eager = _model()
    m_graph = copy.deepcopy(m_eager)
    o_eager = FusedAdamW(m_eager.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    o_graph = FusedAdamW(m_graph.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    grads = [[torch.randn_like(p) for p in m_eager.parameters()] for _ in range(5)]
    warm = [torch.zeros_like(p) for p in m_graph.parameters()]  # the warm-up's grads: zeros (no update of m, v)
    for p, g in zip(m_graph.parameters(), warm):
        p.grad = g
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        o_graph.step()
    torch.cuda.current_stream().wait_stream(s)
    for p in m_eager.parameters():
        p.grad = torch.zeros_like(p)
    o_eager.step()
    static = [g.clone() for g in grads[0]]  # new addresses
    for p, g in zip(m_graph.parameters(), static):
        p.grad = g
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph.step()
    for gs in grads:
        for p, g, st in zip(m_eager.parameters(), gs, static):
            p.grad = g.clone()
            st.copy_(g)
        o_eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(m_eager.parameters(), m_graph.parameters()):
        assert torch.equal(a, b)


def test_compile_on_cuda():
    t = _state([33, 4097], torch.float32)
    t2 = {k: [x.clone() for x in v] for k, v in t.items()}

    def step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        functional.adam_(params, grads, exp_avgs, exp_avg_sqs, None, state_steps, lr=1e-2)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        step(**t)
        compiled(**t2)
    for a, b in zip(t["params"], t2["params"]):
        assert torch.equal(a, b)


def test_grad_scaler_on_cuda():
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-3, fused=True)
    o2 = FusedAdamW(m2.parameters(), lr=1e-3)
    s1, s2 = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    for i in range(10):
        x = torch.randn(32, 64, device="cuda")
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            if i == 4:
                next(m.parameters()).grad[0, 0] = float("nan")
            s.step(o)
            s.update()
    diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    assert diff < 1e-6
    assert all(st["step"].item() == 9 for st in o2.state.values())


def test_offsets_past_2_31_elements():
    """One bf16 tensor of 2^31 + 4099 elements: the tail (past the int32 range) is updated correctly."""
    n = 2**31 + 4099
    need = n * (2 + 2 + 4 + 4) + (1 << 30)
    if torch.cuda.get_device_properties(0).total_memory < need:
        pytest.skip("not enough GPU memory")
    p = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    m = torch.zeros(n, device="cuda")
    v = torch.zeros(n, device="cuda")
    functional.adam_([p], [g], [m], [v], lr=0.5, step=1.0, eps=0.0, backend="triton")
    # First step from zero state with eps=0: update = -lr * sign(g).
    tail = p[-5000:].float()
    assert torch.equal(tail, torch.full_like(tail, -0.5))
    assert torch.equal(p[:5000].float(), torch.full((5000,), -0.5, device="cuda"))
    assert m[-1].item() == pytest.approx(0.1)
    del p, g, m, v
    torch.cuda.empty_cache()


def test_cuda_graph_replays_interleaved_with_eager_steps_whose_grads_move():
    """A captured step() and eager steps in turn, the eager steps on grads at new addresses every time: replays
    must use the grads the graph captured (refilled in place), eager steps their own. (The capture launches on a
    table of its own; repointing the eager table for moved grads must not touch it, nor may a replay rewrite the
    eager one.) The result equals torch's fused AdamW given the same grads in the same order."""
    m_ref = _model()
    m = copy.deepcopy(m_ref)
    o_ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    o = FusedAdamW(m.parameters(), lr=torch.tensor(1e-3, device="cuda"), weight_decay=0.05, capturable=True)

    def new_grads():
        return [torch.randn_like(p) for p in m.parameters()]

    g = new_grads()
    _set_grads(m_ref, g)
    _set_grads(m, g)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        o.step()  # warm-up: state, plan, compiled kernel
    torch.cuda.current_stream().wait_stream(s)
    o_ref.step()

    _set_grads(m, new_grads())  # the capture's grads, at new addresses; refilled in place before each replay
    static = [p.grad for p in m.parameters()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o.step()
    for k in range(8):
        g = new_grads()
        _set_grads(m_ref, g)
        if k % 2:
            _set_grads(m, g)  # eager, on new grad tensors (the static ones stay alive, holding older values)
            o.step()
        else:
            for st, x in zip(static, g):
                st.copy_(x)
            graph.replay()
        o_ref.step()
    torch.cuda.synchronize()
    assert _max_diff(m_ref, m) < 1e-6
    for p_ref, p in zip(m_ref.parameters(), m.parameters()):
        assert o.state[p]["step"].item() == o_ref.state[p_ref]["step"].item() == 9


def test_replay_after_300_calls_on_other_layouts():
    """Chunk tables are cached by layout, and a captured graph keeps reading the ones it captured. 300 calls of
    the functional ops on other layouts (fresh tensors of other sizes, at addresses the allocator recycles)
    between two replays must neither free nor rewrite them: the second replay still unscales, updates and casts
    the captured tensors right (against torch's math in float64)."""
    sizes = [1000, 70_003, 33]
    t = _state(sizes, torch.float32)
    del t["max_exp_avg_sqs"]
    t["state_steps"] = [torch.tensor(0.0, device="cuda") for _ in sizes]
    low = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for n in sizes]
    inv_scale = torch.tensor(1 / 1024, device="cuda")
    found_inf = torch.zeros(1, device="cuda")
    lr = torch.tensor(1e-3, device="cuda")
    ref = {k: [x.cpu().double() if k != "state_steps" else x.cpu().clone() for x in v] for k, v in t.items()}

    def ops():
        functional.unscale_(t["grads"], inv_scale, found_inf, backend="triton")
        functional.adam_(**t, lr=lr, weight_decay=0.01, decoupled_weight_decay=True, backend="triton")
        functional.cast_(low, t["params"], backend="triton")

    def fill_grads():
        scaled = [1024 * torch.randn(n, device="cuda") for n in sizes]
        for g, x in zip(t["grads"], scaled):
            g.copy_(x)
        return scaled

    def ref_step(scaled):
        grads = [x.cpu().double() / 1024 for x in scaled]  # exact: a power of two
        reference.adam_(ref["params"], grads, ref["exp_avgs"], ref["exp_avg_sqs"], [], ref["state_steps"], lr=1e-3,
                        beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False,
                        decoupled=True)  # fmt: skip

    scaled = fill_grads()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops()  # warm-up: compiled kernels, cached tables
    torch.cuda.current_stream().wait_stream(s)
    ref_step(scaled)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops()
    scaled = fill_grads()
    graph.replay()
    ref_step(scaled)

    for i in range(300):
        n = 1 + (i * 7919) % 20_000
        xs = [torch.randn(n + j, device="cuda") for j in range(1 + i % 3)]
        functional.adam_(xs, [torch.randn_like(x) for x in xs], [torch.zeros_like(x) for x in xs],
                         [torch.zeros_like(x) for x in xs], lr=1e-3, step=1.0, backend="triton")  # fmt: skip
        if i % 3 == 0:
            functional.unscale_(xs, 0.5, backend="triton")
            functional.cast_([torch.empty_like(x, dtype=torch.bfloat16) for x in xs], xs, backend="triton")

    scaled = fill_grads()
    graph.replay()
    ref_step(scaled)
    torch.cuda.synchronize()
    assert_close_list([p.cpu() for p in t["params"]], ref["params"], torch.float32, "params")
    assert_close_list([m.cpu() for m in t["exp_avgs"]], ref["exp_avgs"], torch.float32, "exp_avgs")
    assert_close_list([v.cpu() for v in t["exp_avg_sqs"]], ref["exp_avg_sqs"], torch.float32, "exp_avg_sqs")
    assert [x.item() for x in t["state_steps"]] == [3.0] * len(sizes)
    for lo, p in zip(low, t["params"]):
        assert torch.equal(lo, p.to(torch.bfloat16))
    assert found_inf.item() == 0.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_params_on_second_gpu_with_scaler_on_first():
    """Params on cuda:1, grad_scale / found_inf (and lr) on cuda:0, e.g. a scaler made on the default device.
    Expected: the values are moved to the params' device, as torch's fused AdamW does, so the result equals
    torch's, the skipped step included; never a cuda:0 address read from cuda:1 (a crash or garbage)."""
    dev = torch.device("cuda:1")
    m_ref = _model(dev)
    m = copy.deepcopy(m_ref)
    o_ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-3, fused=True)
    o = FusedAdamW(m.parameters(), lr=1e-3)
    for i in range(5):
        scale = torch.tensor(512.0, device="cuda:0")
        found_inf = torch.tensor(1.0 if i == 2 else 0.0, device="cuda:0")
        grads = [512 * torch.randn_like(p) for p in m.parameters()]
        _set_grads(m_ref, grads)
        _set_grads(m, grads)
        o_ref.grad_scale, o_ref.found_inf = scale, found_inf
        o_ref.step()
        o.step(grad_scale=scale, found_inf=found_inf)
    torch.cuda.synchronize(dev)
    assert _max_diff(m_ref, m) < 1e-6
    for p_ref, p in zip(m_ref.parameters(), m.parameters()):
        assert p.device == dev and o.state[p]["step"].device == dev
        assert o.state[p]["step"].item() == o_ref.state[p_ref]["step"].item() == 4

    # functional.adam_: the same contract for lr, grad_scale and found_inf tensors on another device.
    t = _state([1000, 70_001], torch.float32, device=dev)
    ref = {k: [x.cpu().double() if k != "state_steps" else x.cpu().clone() for x in v] for k, v in t.items()}
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False)
    reference.adam_(**ref, lr=1e-2, decoupled=True, grad_scale=torch.tensor(4.0, dtype=torch.float64), **kw)
    zero, four = torch.tensor(0.0, device="cuda:0"), torch.tensor(4.0, device="cuda:0")
    functional.adam_(**t, lr=torch.tensor(1e-2, device="cuda:0"), grad_scale=four, found_inf=zero,
                     decoupled_weight_decay=True, backend="triton", **kw)  # fmt: skip
    torch.cuda.synchronize(dev)
    assert_close_list([p.cpu() for p in t["params"]], ref["params"], torch.float32, "params")
    assert [s.item() for s in t["state_steps"]] == [3.0, 3.0]
    before = {k: [x.clone() for x in v] for k, v in t.items()}
    functional.adam_(**t, lr=torch.tensor(1e-2, device="cuda:0"), grad_scale=four,
                     found_inf=torch.tensor(1.0, device="cuda:0"), decoupled_weight_decay=True, backend="triton",
                     **kw)  # fmt: skip
    torch.cuda.synchronize(dev)
    for k in before:
        for a, b in zip(t[k], before[k]):
            assert torch.equal(a, b), k


def test_prepared_launch_first_run_on_another_stream():
    """A prepared launch built on one stream (its table uploaded there, its counters zeroed there) and first run
    on another: the run must wait for the upload. Before, a table's first use recorded no stream, so the kernel on
    the other stream could read the table before its copy landed (garbage addresses)."""
    from fused_ops.kernels.adam import AdamStep

    sizes = [1 + 37 * i for i in range(3000)]
    t = _state(sizes, torch.float32)
    ref = {k: [x.cpu().double() if k != "state_steps" else x.cpu().clone() for x in v] for k, v in t.items()}
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False)
    reference.adam_(**ref, amsgrad=False, decoupled=True, **kw)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the data are ready; the table is uploaded after this
    step = AdamStep(t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], [], t["state_steps"], amsgrad=False)
    with torch.cuda.stream(side):
        step(decoupled=True, **kw)
    torch.cuda.current_stream().wait_stream(side)
    assert_close_list([p.cpu() for p in t["params"]], ref["params"], torch.float32, "params")
    assert [s.item() for s in t["state_steps"]] == [3.0] * len(sizes)


def test_capture_refuses_a_cpu_lr_of_cuda_params():
    """A CPU tensor lr is read on the host: captured, every replay would keep the value read at capture. Refused
    in the capture, nothing changed (before, the graph froze it silently)."""
    m = _model()
    opt = FusedAdamW(m.parameters(), lr=torch.tensor(1e-3), capturable=True)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()  # warm-up (eager: the CPU lr is read, as torch's fused AdamW reads it)
    torch.cuda.current_stream().wait_stream(s)
    before = [p.detach().clone() for p in m.parameters()]
    steps = [opt.state[p]["step"].clone() for p in m.parameters()]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="CPU tensor lr"):
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.equal(opt.state[p]["step"], t) for p, t in zip(m.parameters(), steps))
