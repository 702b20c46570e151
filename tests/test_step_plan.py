"""The optimizer's prepared step (``_GroupPlan``): reused while it fits, rebuilt when it does not.

A plan is built by a checked step and reused by later ones; these tests change, between steps, everything a
plan depends on (grads that move, params that lose or regain a grad, a param that moves, non-contiguous grads,
a state reset, a loaded state dict, a mixed-dtype group) and compare every step with torch.optim.AdamW.
"""

import copy
import os

import pytest
import torch
from fused_ops.kernels import adam as kernels_adam

from fused_ops import FusedAdamW

BACKENDS = ["auto", pytest.param("triton", marks=pytest.mark.interpret)]


def _pair(backend, **kw):
    m1 = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    m2 = copy.deepcopy(m1)
    kw = dict(lr=1e-2, weight_decay=0.05, **kw)
    return (m1, torch.optim.AdamW(m1.parameters(), **kw)), (m2, FusedAdamW(m2.parameters(), backend=backend, **kw))


def _backward(m, x):
    (m(x) - 0.5).pow(2).mean().backward()


def _assert_same(m1, m2, atol=1e-6):
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)


def _step_both(pairs, before_step=None):
    x = torch.randn(4, 6)
    for m, o in pairs:
        o.zero_grad(set_to_none=True)
        _backward(m, x)
        if before_step is not None:
            before_step(m)
        o.step()


@pytest.mark.interpret
def test_plan_is_reused_and_moved_grads_are_repointed(monkeypatch):
    built = []
    real = kernels_adam.AdamStep

    class Counting(real):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kernels_adam, "AdamStep", Counting)
    (m1, o1), (m2, o2) = _pair("triton")
    _step_both([(m1, o1), (m2, o2)])
    plan = o2._plans[0]
    launcher = plan.parts[0].launcher
    table_storage = launcher.table.table.data_ptr()
    keep = []  # hold the old grads, so that the new ones cannot reuse their memory: every step moves them
    for _ in range(4):
        keep += [p.grad for p in m2.parameters()]
        _step_both([(m1, o1), (m2, o2)])
        assert o2._plans[0] is plan and built == [1]
        assert launcher.grad_addrs == [p.grad.data_ptr() for p in m2.parameters()]
        assert launcher.table.table.data_ptr() == table_storage  # repointed in place, not rebuilt
    _assert_same(m1, m2)
    assert all(s["step"].item() == 5 for s in o2.state.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_losing_and_regaining_grads(backend):
    (m1, o1), (m2, o2) = _pair(backend)
    first = lambda m: setattr(m[0].weight, "grad", None)  # noqa: E731
    for step in range(6):
        _step_both([(m1, o1), (m2, o2)], first if step in (2, 3) else None)
        _assert_same(m1, m2)
    assert o2.state[m2[0].weight]["step"].item() == 4 and o2.state[m2[0].bias]["step"].item() == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_moved_by_data_assignment(backend):
    (m1, o1), (m2, o2) = _pair(backend)
    _step_both([(m1, o1), (m2, o2)])
    for m in (m1, m2):
        m[2].weight.data = m[2].weight.data.clone()  # same values at a new address
    _step_both([(m1, o1), (m2, o2)])
    _step_both([(m1, o1), (m2, o2)])
    _assert_same(m1, m2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_grads_after_a_plan(backend):
    (m1, o1), (m2, o2) = _pair(backend)
    _step_both([(m1, o1), (m2, o2)])

    def transpose_grad(m):
        g = m[0].weight.grad
        m[0].weight.grad = g.t().contiguous().t()  # same values, column-major
        assert not m[0].weight.grad.is_contiguous()

    _step_both([(m1, o1), (m2, o2)], transpose_grad)
    _step_both([(m1, o1), (m2, o2)])
    _assert_same(m1, m2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_reset_and_load_state_dict_rebuild_the_plan(backend):
    (m1, o1), (m2, o2) = _pair(backend)
    _step_both([(m1, o1), (m2, o2)])
    saved = copy.deepcopy(o1.state_dict())
    _step_both([(m1, o1), (m2, o2)])
    o1.state.clear()
    o2.state.clear()
    _step_both([(m1, o1), (m2, o2)])
    _assert_same(m1, m2)
    assert all(s["step"].item() == 1 for s in o2.state.values())
    o1.load_state_dict(saved)
    o2.load_state_dict(saved)
    _step_both([(m1, o1), (m2, o2)])
    _assert_same(m1, m2)
    assert all(s["step"].item() == 2 for s in o2.state.values())


@pytest.mark.interpret
def test_mixed_dtype_group_matches_reference_backend_with_moving_grads():
    """One group, fp32 and bf16 params, master weights: two launches (parts) per step, grads new every step."""
    shapes = [(7, 3), (5,), (33,), (2, 9)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    base = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
    runs = []
    for backend in ("reference", "triton"):
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        o = FusedAdamW(ps, lr=1e-2, master_weights=True, backend=backend)
        runs.append((ps, o))
    for _ in range(4):
        grads = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
        for ps, o in runs:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    (ref, _), (tri, o) = runs
    assert len(o._plans[0].parts) == 2
    for a, b in zip(ref, tri):
        torch.testing.assert_close(b.float(), a.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.interpret
def test_adam_step_set_grads_checks_before_repointing():
    ps = [torch.randn(5), torch.randn(3, 4)]
    gs = [torch.randn_like(p) for p in ps]
    states = [[torch.zeros_like(p) for p in ps] for _ in range(2)]
    steps = [torch.zeros(()) for _ in ps]
    launch = kernels_adam.AdamStep(ps, gs, *states, [], steps, amsgrad=False)
    before = launch.table.table.clone()
    bad = [
        [gs[0], torch.randn(3, 4, dtype=torch.float64)],
        [gs[0], torch.randn(13)],
        [gs[0], torch.randn(4, 3).t()],
        [gs[0]],
    ]
    for grads in bad:
        with pytest.raises(ValueError, match="grads"):
            launch.set_grads(grads)
        assert torch.equal(launch.table.table, before)
    new = [torch.randn_like(p) for p in ps]
    launch.set_grads(new)
    assert launch.grad_addrs == [g.data_ptr() for g in new]
    ref = [p.clone() for p in ps]
    launch(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
    expected = [r - 0.1 * torch.sign(g) for r, g in zip(ref, new)]  # Adam's first step: lr * g / |g| (eps aside)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p, e, atol=1e-5, rtol=0)
    assert [s.item() for s in steps] == [1.0, 1.0]


def test_compiled_step_takes_the_traced_path():
    """torch.compile(opt.step): the functional path with the custom op is traced (no plan); matches torch."""
    (m1, o1), (m2, o2) = _pair("auto")
    step = torch.compile(o2.step)
    for _ in range(3):
        x = torch.randn(4, 6)
        for m, o, s in ((m1, o1, o1.step), (m2, o2, step)):
            o.zero_grad()
            _backward(m, x)
            s()
    _assert_same(m1, m2)
    assert o2._plans == {}
    assert all(s["step"].item() == 3 for s in o2.state.values())


def test_host_overhead_script_runs():
    """benchmarks/host_overhead.py (in a subprocess: it stubs the kernel launch) prints its three figures."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = os.path.join(root, "benchmarks", "host_overhead.py")
    run = subprocess.run([sys.executable, script, "--n", "300", "--steps", "2"], env=env, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    out = run.stdout
    for name in ("fused_ops, grads still", "fused_ops, grads moved", "torch AdamW _init_group"):
        line = next(x for x in out.splitlines() if name in x)
        assert float(line.split()[-1]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_changed_between_steps(backend):
    """Betas, eps and weight decay set after construction (tensor betas too) are read at every step and checked."""
    (_, _), (m1, o1) = _pair(backend)
    (_, _), (m2, o2) = _pair(backend)
    m2.load_state_dict(m1.state_dict())
    _step_both([(m1, o1), (m2, o2)])
    o1.param_groups[0].update(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)
    f64 = dict(dtype=torch.float64)  # the same values as the floats
    o2.param_groups[0].update(betas=(torch.tensor(0.8, **f64), torch.tensor(0.95, **f64)), eps=1e-6, weight_decay=0.2)
    for _ in range(2):
        _step_both([(m1, o1), (m2, o2)])
    _assert_same(m1, m2, atol=0)
    before = [p.detach().clone() for p in m2.parameters()]
    for key, bad, match in (("betas", (0.9, 1.0), "beta parameter at index 1"), ("eps", float("nan"), "epsilon"),
                            ("weight_decay", -0.1, "weight_decay")):  # fmt: skip
        good = o2.param_groups[0][key]
        o2.param_groups[0][key] = bad
        with pytest.raises(ValueError, match=match):
            o2.step()
        o2.param_groups[0][key] = good
    for a, b in zip(m2.parameters(), before):
        assert torch.equal(a, b)


def test_repoint_role_and_capture_copy():
    """repoint_role rewrites one role in place (and the host copy); capture_copy gives a table of its own, filled
    from the staging buffer, that later repoints do not reach (the CUDA-graph path, run on CPU tensors)."""
    from fused_ops.kernels._multi_tensor import build_chunk_table, capture_copy, repoint_role

    base = torch.zeros(64)
    a, b = [base[:5], base[16:21]], [torch.zeros(5), torch.zeros(5)]
    table = build_chunk_table([a, b], 16, cache={}, with_counters=True)
    assert table.aligned
    staging = torch.full((table.table.numel(),), -1, dtype=torch.int64)
    captured = capture_copy(table, staging)
    assert captured.table is not table.table and captured.counters is not table.counters
    assert torch.equal(captured.table, table.table) and torch.equal(staging, table.table)
    moved = [base[1:6], base[32:37]]  # the first is 4 bytes off a 16-byte boundary
    new = repoint_role(table, 0, [t.data_ptr() for t in moved])
    assert new.table is table.table
    assert table.table[:2].tolist() == [t.data_ptr() for t in moved]
    assert table.table[2:4].tolist() == [t.data_ptr() for t in b]
    assert captured.table[:2].tolist() == [t.data_ptr() for t in a]  # the capture's table is untouched
    assert not new.aligned and new.role_aligned == (False, True)
    with pytest.raises(ValueError, match="3 addresses"):
        repoint_role(new, 0, [1, 2, 3])
    with pytest.raises(ValueError, match="length"):
        capture_copy(table, torch.empty(3, dtype=torch.int64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_keeps_no_grad_alive(backend):
    """After zero_grad(set_to_none=True) nothing of the optimizer's holds the old grads (memory)."""
    import weakref

    (m1, o1), (m2, o2) = _pair(backend)
    for _ in range(2):
        _step_both([(m1, o1), (m2, o2)])
        refs = [weakref.ref(p.grad) for p in m2.parameters()]
        o2.zero_grad(set_to_none=True)
        assert all(r() is None for r in refs)


def test_capture_launches_on_a_table_of_its_own(monkeypatch):
    """The CUDA-graph logic of AdamStep, on CPU tensors with "capturing" simulated: a capture whose grads moved
    launches on a copy of the table (with the capture's grads), which later eager repoints never reach; a second
    capture without an eager launch in between raises; the eager table keeps the eager grads."""
    from fused_ops.kernels import _multi_tensor, adam

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the kernel on CPU tensors")
    params = [torch.randn(5), torch.randn(17)]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    grads = [torch.randn_like(p) for p in params]
    launcher = adam.AdamStep(params, grads, states[0], states[1], [], steps, amsgrad=False)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
    launcher(**hyper)
    eager_table = launcher.table.table.clone()

    capturing = [True]
    monkeypatch.setattr(_multi_tensor, "is_capturing", lambda device: capturing[0])  # (PreparedLaunch's look-up)
    moved = [torch.randn_like(p) for p in params]
    launcher.set_grads(moved)
    assert torch.equal(launcher.table.table, eager_table), "the eager table was rewritten during a capture"
    launcher(**hyper)
    captured = launcher._captured[-1][0]
    assert captured.table is not launcher.table.table
    assert captured.table[2:4].tolist() == [g.data_ptr() for g in moved]
    assert id(captured.table) in _multi_tensor._CAPTURED
    with pytest.raises(RuntimeError, match="eager step"):
        launcher(**hyper)  # a second capture with no eager launch in between

    capturing[0] = False
    again = [torch.randn_like(p) for p in params]
    launcher.set_grads(again)
    launcher(**hyper)
    assert launcher.table.table[2:4].tolist() == [g.data_ptr() for g in again]
    assert captured.table[2:4].tolist() == [g.data_ptr() for g in moved], "the captured table was rewritten"


def test_chunk_tables_during_capture(monkeypatch):
    """A table seen first during a capture cannot be built there (clear error); a cached one is kept for life."""
    from fused_ops.kernels import _multi_tensor

    xs = [torch.zeros(5), torch.zeros(7)]
    cache: dict = {}
    table = _multi_tensor.build_chunk_table([xs], 16, cache)
    monkeypatch.setattr(_multi_tensor, "is_capturing", lambda device: True)
    assert _multi_tensor.build_chunk_table([xs], 16, cache) is table
    assert _multi_tensor._CAPTURED[id(table.table)] is table
    with pytest.raises(RuntimeError, match="warm-up"):
        _multi_tensor.build_chunk_table([[torch.zeros(3)]], 16, cache)
    calls = []
    _multi_tensor.build_chunk_table([xs], 16, cache, check=lambda: calls.append(1))
    assert calls == [1], "the check must run on a cache hit too"


def test_eager_launch_after_a_capture_whose_grads_moved_reads_those_grads(monkeypatch):
    """Grads set during a capture reach the capture's copy of the table; the eager table learns them at the next
    eager launch (it used to keep the grads from before the capture, which an eager step would then read, freed or
    not, when the optimizer saw no new grads)."""
    from fused_ops.kernels import _multi_tensor, adam

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the kernel on CPU tensors")
    params = [torch.randn(5), torch.randn(17)]
    twin = [p.clone() for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    steps = [[torch.zeros(()) for _ in params] for _ in range(2)]
    grads = [torch.randn_like(p) for p in params]
    first = [g.clone() for g in grads]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
    launcher = adam.AdamStep(params, grads, states[0], states[1], [], steps[0], amsgrad=False)
    launcher(**hyper)
    capturing = [True]
    monkeypatch.setattr(_multi_tensor, "is_capturing", lambda device: capturing[0])
    moved = [torch.randn_like(p) for p in params]
    launcher.set_grads(moved)
    launcher(**hyper)  # "captured" (under the interpreter it also runs)
    capturing[0] = False
    del grads  # the grads from before the capture are gone
    launcher(**hyper)  # eager, no set_grads: the grads of the capture
    assert launcher.table.table[2:4].tolist() == [g.data_ptr() for g in moved]
    # the same three steps on a launch that was given the right grads each time
    ref = adam.AdamStep(twin, first, states[2], states[3], [], steps[1], amsgrad=False)
    ref(**hyper)
    ref.set_grads(moved)
    ref(**hyper)
    ref(**hyper)
    for a, b in zip(params, twin):
        assert torch.equal(a, b)


@pytest.mark.parametrize("what", ["state resized", "state set_", "param .data", "grads freed", "master resized"])
def test_a_prepared_launch_called_directly_checks_its_tensors(what):
    """AdamStep/SGDStep/LionStep/AdamLowbitStep are public: called directly, they check that every tensor of their
    table is still what it was (the optimizers check that in their step plans and launch through ``_run``)."""
    import gc

    from fused_ops.kernels import adam, adam_lowbit, lion, sgd

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the kernels on CPU tensors")
    for kind in ("adam", "lowbit", "sgd", "lion"):
        params = [torch.randn(300, dtype=torch.bfloat16), torch.randn(17, dtype=torch.bfloat16)]
        grads = [torch.randn_like(p) for p in params]
        masters = [p.float() for p in params]
        if kind == "adam":
            states = [[torch.zeros(p.numel()) for p in params] for _ in range(2)]
            launcher = adam.AdamStep(params, grads, *states, [], [torch.zeros(()) for _ in params], masters,
                                     amsgrad=False)  # fmt: skip
            call = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
        elif kind == "lowbit":
            states = [[torch.zeros(p.numel(), dtype=torch.uint8) for p in params] for _ in range(2)]
            scales = [[torch.zeros(-(-p.numel() // 256)) for p in params] for _ in range(2)]
            launcher = adam_lowbit.AdamLowbitStep(params, grads, *states, [torch.zeros(()) for _ in params],
                                                  exp_avg_scales=scales[0], exp_avg_sq_scales=scales[1],
                                                  master_params=masters, state="int8")  # fmt: skip
            call = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
        elif kind == "sgd":
            states = [[torch.zeros(p.numel()) for p in params]]
            launcher = sgd.SGDStep(params, grads, states[0], masters)
            call = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                        first_step=True)  # fmt: skip
        else:
            states = [[torch.zeros(p.numel()) for p in params]]
            launcher = lion.LionStep(params, grads, states[0], masters)
            call = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False)
        launcher(**call)  # fine
        if what == "state resized":
            states[0][1].resize_(10_000)
        elif what == "state set_":
            states[-1][0].set_(torch.zeros(300, dtype=states[-1][0].dtype))
        elif what == "param .data":
            params[0].data = torch.randn(300, dtype=torch.bfloat16)
        elif what == "grads freed":
            del grads
            gc.collect()
        else:
            masters[1].resize_(3)
        before = [p.clone() for p in params]
        with pytest.raises(ValueError, match="set_grads|prepare a new launch"):
            launcher(**call)
        assert all(torch.equal(a, b) for a, b in zip(params, before)), kind


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
def test_a_removed_param_group_is_freed_as_in_torch(backend):
    """``opt.param_groups.pop()`` and its params' states deleted: torch.optim frees them; before, the group's step
    plan kept its params, states and launch tables alive for the optimizer's lifetime."""
    import gc
    import weakref

    keep, gone = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(300))
    opt = FusedAdamW([{"params": [keep]}, {"params": [gone]}], lr=1e-3, backend=backend)
    keep.grad, gone.grad = torch.randn_like(keep), torch.randn_like(gone)
    opt.step()
    refs = [weakref.ref(t) for t in (gone, *opt.state[gone].values())]
    opt.param_groups.pop()
    del opt.state[gone]
    del gone
    opt.step()
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
