"""Safety of the family on DTensor params, continued (2 gloo ranks): layouts that only some ranks' shards have, params
and states whose placements or meshes a step or a load cannot take rank by rank.

1. A param with a ``Partial`` placement (each rank holds a summand): FusedAdamW (fp32, 8-bit, bf16 states) and
   FusedLion refuse it on every rank with nothing changed (their updates are not linear: stepping each summand is
   not stepping the sum; torch.optim.AdamW refuses it too); FusedSGD steps it as torch.optim.SGD does (momentum,
   Nesterov, weight decay, dampening, maximize: linear), except with fp32 masters or a ``Partial("max")``.
2. 8-bit states of a param on a mesh that leaves a rank out: that rank holds no scales; a state dict round trip and
   the next steps agree with an untouched twin on every rank.
3. ``torch.compile(opt.step)`` on a param whose local shard is contiguous on one rank only (a ``.t()`` of a
   ``Shard(0)`` DTensor): stepped on every rank, bit for bit the eager step.
4. torch.optim.AdamW's states of that param (``zeros_like``: the param's strides) loaded, plain and through DCP:
   contiguous local states on every rank, and the resumed step is torch's.
5. States saved on another mesh: on a mesh of other ranks or coordinates the load raises a ValueError on every rank
   with nothing replaced; on a mesh equal but for its dim names it loads (no communication) and steps as the twin.

Every case runs inside one spawn of the ranks; each records, per rank, what happened, and the tests assert the same
outcome on both ranks.
"""

from __future__ import annotations

import re

import pytest
import torch

import fused_ops
from tests.test_distributed import spawn
from tests.test_safety_family_dtensor import _first_diff, _snapshot, _values

pytestmark = [pytest.mark.distributed, pytest.mark.safety]

WORLD = 2
BACKENDS = ("reference", "triton")
SPAWN_TIMEOUT_S = 400
PG_TIMEOUT_S = 30

PARTIAL_REFUSED = {
    "adamw": lambda ps, b: fused_ops.FusedAdamW(ps, lr=0.1, backend=b),
    "adamw int8": lambda ps, b: fused_ops.FusedAdamW(ps, lr=0.1, state_dtype="int8", backend=b),
    "adamw bf16 states": lambda ps, b: fused_ops.FusedAdamW(ps, lr=0.1, state_dtype="bfloat16", backend=b),
    "lion": lambda ps, b: fused_ops.FusedLion(ps, lr=0.1, weight_decay=0.5, backend=b),
}
SGD_OPTIONS = {
    "momentum nesterov wd": dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    "dampening maximize": dict(momentum=0.9, dampening=0.3, maximize=True),
    "plain": dict(),
}


def _outcome(call) -> dict:
    try:
        call()
        return {"raised": None}
    except Exception as e:  # noqa: BLE001 (recorded: the tests assert on it)
        return {"raised": type(e).__name__, "message": str(e)}


def _partial(rank: int, mesh, value: torch.Tensor, op: str = "sum"):
    """A ``Partial`` DTensor whose summand on rank ``r`` is ``value * (r + 1)`` (a sum of ``3 * value``)."""
    from torch.distributed.tensor import DTensor, Partial

    if op == "norm":  # (a private Partial subclass whose reduce_op reads "sum": a 2-norm's partial squares)
        from torch.distributed.tensor._ops._math_ops import _NormPartial

        placement = _NormPartial(2)
    else:
        placement = Partial(op)
    return DTensor.from_local(value * (rank + 1), mesh, [placement], run_check=False)


def _guarded(out: dict, key: tuple, body) -> None:
    """``out[key] = body()``; an exception that ``body`` did not expect is recorded (the next case runs)."""
    try:
        out[key] = body()
    except Exception as e:  # noqa: BLE001 (recorded: the test of that case fails with it)
        out[key] = {"raised": None, "harness_error": f"{type(e).__name__}: {e}"}


def _partial_cases(rank: int, mesh, out: dict) -> None:
    """Case 1."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    p0, g0 = torch.randn(6, generator=g), torch.randn(6, generator=g)

    def param(dtype=torch.float32, op="sum"):
        p = torch.nn.Parameter(_partial(rank, mesh, p0.to(dtype), op))
        p.grad = _partial(rank, mesh, g0.to(dtype), op)
        return p

    def refused(make, p=None):
        p = param() if p is None else p
        opt = make([p])
        before = _snapshot(opt, [p])
        rec = _outcome(opt.step)
        rec["changed"] = _first_diff(before, _snapshot(opt, [p]))
        return rec

    def sgd_like_torch(kwargs, dtype, backend):
        p, q = param(dtype), param(dtype)
        opt = fused_ops.FusedSGD([p], lr=0.1, backend=backend, **kwargs)
        theirs = torch.optim.SGD([q], lr=0.1, **{k: v for k, v in kwargs.items() if k != "master_weights"})
        before = _snapshot(opt, [p])
        rec = {}
        for k in range(2):  # (the second step after a state dict round trip: old buffers, reloaded)
            rec = _outcome(opt.step)
            if rec["raised"]:
                rec["changed"] = _first_diff(before, _snapshot(opt, [p]))
                return rec
            theirs.step()
            if k == 0:
                opt.load_state_dict(opt.state_dict())
        # (torch reduces some of its results, e.g. the buffer: the local summands differ, their sums agree)
        rec["err"] = (p.detach().full_tensor() - q.detach().full_tensor()).abs().max().item()
        rec["moved"] = not torch.equal(p._local_tensor, (p0 * (rank + 1)).to(dtype))
        if "momentum" in kwargs:
            rec["buffer"] = tuple(map(repr, opt.state[p]["momentum_buffer"].placements))
        return rec

    kwargs = SGD_OPTIONS["momentum nesterov wd"]

    def sgd_load(source, backend):
        """torch.optim.SGD's state dict of a Partial param (torch keeps its buffer reduced: Replicate) or of a plain
        one (a full buffer) loaded into FusedSGD on a Partial param (each rank's summand made locally), then a step."""
        if source == "torch":
            q = param()
            theirs = torch.optim.SGD([q], lr=0.1, **kwargs)
            theirs.step()
            p = torch.nn.Parameter(_partial(0, mesh, q._local_tensor.detach().clone()))  # (q's summands)
        else:  # (rank 0 holds the whole value, the others zeros: the sum is the plain param, exactly)
            q = torch.nn.Parameter(p0.clone())
            q.grad = g0.clone()
            theirs = torch.optim.SGD([q], lr=0.1, **kwargs)
            theirs.step()
            p = torch.nn.Parameter(_partial(0, mesh, q.detach() * (rank == 0)))
        ours = fused_ops.FusedSGD([p], lr=0.1, backend=backend, **kwargs)
        rec = _outcome(lambda: ours.load_state_dict(theirs.state_dict()))
        if rec["raised"] is None:
            rec["buffer"] = tuple(map(repr, ours.state[p]["momentum_buffer"].placements))
            p.grad = _partial(rank, mesh, g0 * 2) if source == "torch" else _partial(0, mesh, g0 * 2 * (rank == 0))
            q.grad = _partial(rank, mesh, g0 * 2) if source == "torch" else g0 * 2
            rec.update(_outcome(ours.step))
            theirs.step()
            full = q.detach().full_tensor() if source == "torch" else q.detach()
            rec["err"] = (p.detach().full_tensor() - full).abs().max().item()
        return rec

    def sgd_other_grad(placement, backend):
        """A grad of other placements than the Partial param's (the full grad, replicated or sharded): made into
        summands, and stepped as torch.optim.SGD steps the reduced param."""
        p = param()
        p.grad = distribute_tensor(g0 * 3, mesh, [placement])
        opt = fused_ops.FusedSGD([p], lr=0.1, backend=backend, **kwargs)
        q = torch.nn.Parameter(p0 * 3)
        theirs = torch.optim.SGD([q], lr=0.1, **kwargs)
        rec = {}
        for _ in range(2):
            q.grad = g0 * 3
            theirs.step()
            rec = _outcome(opt.step)
            if rec["raised"]:
                break
        rec["grad kept"] = tuple(map(repr, p.grad.placements)) == (repr(placement),)
        if rec["raised"] is None:
            rec["err"] = (p.detach().full_tensor() - q.detach()).abs().max().item()
        return rec

    def other_grad(placement):
        p = param()
        p.grad = distribute_tensor(g0 * 3, mesh, [placement])
        return p

    for backend in BACKENDS:
        for name, make in PARTIAL_REFUSED.items():
            _guarded(out, ("partial refused", name, backend), lambda m=make, b=backend: refused(lambda ps: m(ps, b)))
        for name, kw in {**SGD_OPTIONS, "masters": dict(momentum=0.9, master_weights=True)}.items():
            dtype = torch.bfloat16 if name == "masters" else torch.float32
            _guarded(out, ("partial sgd", name, backend), lambda kw=kw, d=dtype, b=backend: sgd_like_torch(kw, d, b))
        for source in ("torch", "plain"):
            _guarded(out, ("partial sgd load", source, backend), lambda s=source, b=backend: sgd_load(s, b))
        for placement in (Replicate(), Shard(0)):
            _guarded(out, ("partial sgd grad", repr(placement), backend),
                     lambda pl=placement, b=backend: sgd_other_grad(pl, b))  # fmt: skip
            _guarded(out, ("partial adamw grad", repr(placement), backend),
                     lambda pl=placement, b=backend: refused(lambda ps: fused_ops.FusedAdamW(ps, lr=0.1, backend=b),
                                                             other_grad(pl)))  # fmt: skip
        for name, op in (("Partial(max)", "max"), ("_NormPartial", "norm")):
            make = lambda ps, b=backend: fused_ops.FusedSGD(ps, lr=0.1, momentum=0.9, backend=b)  # noqa: E731
            _guarded(out, ("partial sgd", name, backend), lambda m=make, op=op: refused(m, param(op=op)))


def _submesh_cases(rank: int, world: int, out: dict) -> None:
    """Case 2: a param on a mesh of rank 0 only, next to one on both ranks."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full, sub = init_device_mesh("cpu", (world,)), DeviceMesh("cpu", [0])

    def make(backend):
        g = torch.Generator().manual_seed(0)
        a = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3, generator=g), full, [Shard(0)]))
        b = torch.nn.Parameter(distribute_tensor(torch.randn(3, 2, generator=g), sub, [Replicate()]))
        return fused_ops.FusedAdamW([a, b], lr=0.1, state_dtype="int8", backend=backend), [a, b]

    def grads(params, k):
        g = torch.Generator().manual_seed(100 + k)
        for p in params:
            p.grad = distribute_tensor(torch.randn(p.shape, generator=g), p.device_mesh, p.placements)

    for backend in BACKENDS:
        (opt, params), (twin, twin_params) = make(backend), make(backend)
        rec = {}
        for k in range(3):
            grads(params, k)
            grads(twin_params, k)
            rec = _outcome(opt.step)
            if rec["raised"]:
                break
            twin.step()
            if k < 2:
                opt.load_state_dict(opt.state_dict())
        rec["diff"] = _first_diff(_values(opt, params), _values(twin, twin_params))
        rec["scales"] = opt.state[params[1]]["exp_avg_scale"]._local_tensor.numel()
        out[("submesh int8", backend)] = rec


def _transposed(mesh):
    """A (4, 3) ``Shard(1)`` param, a ``.t()`` of a (3, 4) ``Shard(0)`` DTensor: its local shard is (4, 2) and not
    contiguous on rank 0, (4, 1) and contiguous on rank 1."""
    from torch.distributed.tensor import Shard, distribute_tensor

    base = distribute_tensor(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), mesh, [Shard(0)])
    return torch.nn.Parameter(base.detach().clone().t())


def _set_grad(p, k: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    full = torch.randn(p.shape, generator=torch.Generator().manual_seed(50 + k))
    p.grad = distribute_tensor(full, p.device_mesh, p.placements)


def _compile_cases(rank: int, mesh, out: dict) -> None:
    """Case 3."""
    makers = {
        "adamw": lambda ps, b: fused_ops.FusedAdamW(ps, lr=0.1, backend=b),
        "sgd": lambda ps, b: fused_ops.FusedSGD(ps, lr=0.1, momentum=0.9, backend=b),
    }
    for (name, make), backend in zip(makers.items(), BACKENDS):
        torch._dynamo.reset()
        p, q = _transposed(mesh), _transposed(mesh)
        eager, compiled = make([p], backend), make([q], backend)
        step = torch.compile(compiled.step, backend="eager")
        rec = {"contiguous": q._local_tensor.is_contiguous()}
        for k in range(2):
            _set_grad(p, k)
            _set_grad(q, k)
            eager.step()
            rec.update(_outcome(step))
            if rec["raised"]:
                break
        rec["diff"] = _first_diff(_values(eager, [p]), _values(compiled, [q]))
        rec["moved"] = not torch.equal(p._local_tensor, _transposed(mesh)._local_tensor)
        out[("compile transposed", name, backend)] = rec


def _torch_state_cases(rank: int, mesh, out: dict) -> None:
    """Case 4."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    for how in ("plain", "dcp"):
        for backend in BACKENDS:
            p = _transposed(mesh)
            theirs = torch.optim.AdamW([p], lr=0.1, foreach=True)
            _set_grad(p, 0)
            theirs.step()
            q = torch.nn.Parameter(p.detach().clone())
            ours = fused_ops.FusedAdamW([q], lr=0.1, backend=backend)
            if how == "plain":
                ours.load_state_dict(theirs.state_dict())
            else:
                sd = get_optimizer_state_dict(torch.nn.ParameterList([p]), theirs)
                set_optimizer_state_dict(torch.nn.ParameterList([q]), ours, sd)
            rec = {"states contiguous": all(v._local_tensor.is_contiguous() for k, v in ours.state[q].items()
                                            if k != "step")}  # fmt: skip
            _set_grad(p, 1)
            _set_grad(q, 1)
            rec.update(_outcome(ours.step))
            theirs.step()
            rec["err"] = (p._local_tensor - q._local_tensor).abs().max().item()
            out[("torch states of a transposed param", how, backend)] = rec


def _mesh_cases(rank: int, world: int, out: dict) -> None:
    """Case 5."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    m1 = init_device_mesh("cpu", (world,), mesh_dim_names=("a",))
    renamed = init_device_mesh("cpu", (world,), mesh_dim_names=("b",))
    two_d = init_device_mesh("cpu", (1, world), mesh_dim_names=("x", "y"))
    full = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))

    def grads(p, k):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(200 + k))
        p.grad = distribute_tensor(g, p.device_mesh, p.placements)

    for state_dtype in (None, "int8"):
        for backend in BACKENDS:
            src = torch.nn.Parameter(distribute_tensor(full, m1, [Shard(0)]))
            saved = fused_ops.FusedAdamW([src], lr=0.1, state_dtype=state_dtype, backend=backend)
            grads(src, 0)
            saved.step()
            sd = saved.state_dict()
            # (a) a mesh of another shape: refused on every rank, the target's states (one step) unchanged
            q = torch.nn.Parameter(distribute_tensor(full, two_d, [Replicate(), Shard(0)]))
            target = fused_ops.FusedAdamW([q], lr=0.1, state_dtype=state_dtype, backend=backend)
            grads(q, 0)
            target.step()
            before = _snapshot(target, [q])
            rec = _outcome(lambda t=target, sd=sd: t.load_state_dict(sd))
            rec["changed"] = _first_diff(before, _snapshot(target, [q]))
            out[("load from another mesh", state_dtype, backend)] = rec
            # (b) a mesh equal but for its dim name: loaded, then stepped as the source optimizer steps
            r = torch.nn.Parameter(distribute_tensor(src.detach().full_tensor(), renamed, [Shard(0)]))
            moved = fused_ops.FusedAdamW([r], lr=0.1, state_dtype=state_dtype, backend=backend)
            rec = _outcome(lambda m=moved, sd=sd: m.load_state_dict(sd))
            if rec["raised"] is None:
                rec["on the param's mesh"] = all(v.device_mesh == renamed for v in moved.state[r].values()
                                                 if hasattr(v, "device_mesh"))  # fmt: skip
                grads(src, 1)
                grads(r, 1)
                saved.step()
                rec.update(_outcome(moved.step))
                rec["diff"] = _first_diff(_values(saved, [src]), _values(moved, [r]))
            out[("load from a renamed mesh", state_dtype, backend)] = rec


def run_cases(rank: int, world: int, out_dir: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}
    for fn, args in ((_partial_cases, (rank, mesh)), (_submesh_cases, (rank, world)), (_compile_cases, (rank, mesh)),
                     (_torch_state_cases, (rank, mesh)), (_mesh_cases, (rank, world))):  # fmt: skip
        try:
            fn(*args, out)
        except Exception as e:  # noqa: BLE001 (a harness failure: recorded, the next family runs)
            out[("harness", fn.__name__)] = {"harness_error": f"{type(e).__name__}: {e}"}
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return spawn("tests.test_safety_family_dtensor2:run_cases", WORLD, str(tmp_path_factory.mktemp("dtensor2")),
                 timeout=SPAWN_TIMEOUT_S, pg_timeout_s=PG_TIMEOUT_S)  # fmt: skip


def _recs(results, key) -> list[dict]:
    for rank, res in enumerate(results):
        assert key in res, f"rank {rank}: {[v for k, v in res.items() if k[0] == 'harness']}"
    recs = [res[key] for res in results]
    for rank, rec in enumerate(recs):
        assert "harness_error" not in rec, (rank, rec["harness_error"])
    outcomes = [(r["raised"], r.get("message")) for r in recs]
    assert len({r["raised"] for r in recs}) == 1, f"the ranks disagree: {outcomes}"
    assert len({re.sub(r"\d+", "N", r.get("message", "")) for r in recs}) == 1, outcomes
    return recs


def _refused(recs, *words) -> None:
    for rank, rec in enumerate(recs):
        assert rec["raised"] == "ValueError", (rank, rec)
        assert rec["changed"] is None, f"rank {rank}: {rec['changed']} changed"
        for w in words:
            assert w in rec["message"], f"rank {rank}: the message does not name {w!r}: {rec['message']}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PARTIAL_REFUSED))
def test_partial_param_is_refused_on_every_rank(results, name, backend):
    _refused(_recs(results, ("partial refused", name, backend)), "param 0 of param group 0", "Partial", "not linear")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SGD_OPTIONS))
def test_partial_param_steps_like_torch_sgd(results, name, backend):
    for rank, rec in enumerate(_recs(results, ("partial sgd", name, backend))):
        assert rec["raised"] is None, (rank, rec)
        assert rec["moved"] and rec["err"] < 1e-5, (rank, rec)
        assert rec.get("buffer", ("Partial(sum)",)) == ("Partial(sum)",), (rank, rec)  # (laid out like the param)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", ["Replicate()", "Shard(dim=0)"])
def test_partial_param_with_a_grad_of_other_placements(results, placement, backend):
    """FusedSGD steps it as torch.optim.SGD steps the reduced param (the grad put back afterwards); FusedAdamW
    refuses it with its named error (not DTensor's "redistributing to Partial is for internal use only")."""
    for rank, rec in enumerate(_recs(results, ("partial sgd grad", placement, backend))):
        assert rec["raised"] is None, (rank, rec)
        assert rec["grad kept"] and rec["err"] < 1e-5, (rank, rec)
    _refused(_recs(results, ("partial adamw grad", placement, backend)), "param 0 of param group 0", "Partial")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["torch", "plain"])
def test_partial_param_sgd_loads_torch_and_plain_buffers(results, source, backend):
    for rank, rec in enumerate(_recs(results, ("partial sgd load", source, backend))):
        assert rec["raised"] is None, (rank, rec)
        assert rec["buffer"] == ("Partial(sum)",), (rank, rec)
        assert rec["err"] < 1e-5, (rank, rec)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["masters", "Partial(max)", "_NormPartial"])
def test_partial_param_sgd_refuses_what_is_not_linear(results, name, backend):
    _refused(_recs(results, ("partial sgd", name, backend)), "param 0 of param group 0", "Partial")


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_states_on_a_mesh_without_this_rank_reload_and_step(results, backend):
    recs = _recs(results, ("submesh int8", backend))
    for rank, rec in enumerate(recs):
        assert rec["raised"] is None, (rank, rec)
        assert rec["diff"] is None, (rank, rec["diff"])
    assert [rec["scales"] for rec in recs] == [1, 0]  # (rank 1 is outside the param's mesh: no scales)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_compiled_step_of_a_param_contiguous_on_one_rank(results, name):
    backend = BACKENDS[list(("adamw", "sgd")).index(name)]
    recs = _recs(results, ("compile transposed", name, backend))
    assert [rec["contiguous"] for rec in recs] == [False, True]
    for rank, rec in enumerate(recs):
        assert rec["raised"] is None, (rank, rec)
        assert rec["diff"] is None and rec["moved"], (rank, rec)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["plain", "dcp"])
def test_torch_states_of_a_transposed_param_load_contiguous(results, how, backend):
    for rank, rec in enumerate(_recs(results, ("torch states of a transposed param", how, backend))):
        assert rec["states contiguous"], rank
        assert rec["raised"] is None, (rank, rec)
        assert rec["err"] < 1e-6, (rank, rec)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_states_on_another_mesh_are_refused_on_every_rank(results, state_dtype, backend):
    _refused(_recs(results, ("load from another mesh", state_dtype, backend)), "param 0", "mesh")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_states_on_a_renamed_mesh_load_and_step(results, state_dtype, backend):
    for rank, rec in enumerate(_recs(results, ("load from a renamed mesh", state_dtype, backend))):
        assert rec["raised"] is None, (rank, rec)
        assert rec["on the param's mesh"], rank
        assert rec["diff"] is None, (rank, rec["diff"])
