"""Safety tier of the family on DTensor params (tensor parallel / FSDP2 shards), on 2 gloo ranks.

FusedSGD (momentum), FusedLion, FusedAdamW with 8-bit states and FusedAdamW with stochastic rounding (bf16 params),
both backends, on a 1-D mesh of 2 ranks: a ``Shard(0)`` param with uneven shards (5 rows: 3 and 2) and a
``Replicate`` one. After one good step (the plan built), every case changes one thing and steps:

1. grads: other placements than the param's, ``Partial``, another mesh, a plain tensor, a local shard of another size,
   dtype or strides;
2. a DTensor state replaced by a plain tensor or by a DTensor of other placements or of another global shape;
3. a DTensor state's local shard resized in place, reallocated, ``set_()`` or given another ``.data`` (the 8-bit
   codes and scales included), and the step counts;
4. a param's local shard given another ``.data`` (size, dtype, memory), resized, and ``p.data = `` a DTensor;
5. a state dict round trip (the same optimizer, a deep copy, a fresh optimizer).

Each rank records whether the step raised (type, message) and whether every param's and grad's local shard, every
state tensor's local shard (identity, placements, address, metadata and bytes) and step count stayed bit-identical;
then the case is undone where it raised, and the run continues two steps. The tests assert: the same outcome on both
ranks, and either a clear TypeError/ValueError naming what is wrong with nothing changed, or (a legal change) a step
bit-identical to an untouched twin's; and after the case, steps bit-identical to the twin's.

Every case runs on the reference backend; the triton backend (under the interpreter: ~0.1 s a launch) runs those that
reach a launch and one error of each kind (see ``_cases``). Every case runs inside the spawned ranks (one spawn for the
module): a crash or a hang fails the spawn.
"""

from __future__ import annotations

import copy
import re
import types

import pytest
import torch

import fused_ops
from tests.test_distributed import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.safety]

WORLD = 2
BACKENDS = ("reference", "triton")
BF16 = torch.bfloat16
ROWS, COLS = 5, 120  # Shard(0) on 2 ranks: 3 and 2 rows (360 and 240 elements: 2 and 1 blocks of 8-bit scales)
REPLICATED = 4

# name -> (class, param dtype, constructor kwargs, DTensor state keys probed one by one)
VARIANTS = {
    "sgd": (fused_ops.FusedSGD, torch.float32, dict(lr=0.05, momentum=0.9, weight_decay=0.01), ("momentum_buffer",)),
    "lion": (fused_ops.FusedLion, torch.float32, dict(lr=1e-2, weight_decay=0.1), ("exp_avg",)),
    "adamw_int8": (
        fused_ops.FusedAdamW, torch.float32, dict(lr=1e-2, state_dtype="int8"),
        ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"),
    ),
    "adamw_sr": (fused_ops.FusedAdamW, BF16, dict(lr=1e-2, stochastic_rounding=True), ("exp_avg", "exp_avg_sq")),
}  # fmt: skip
HAS_STEP = {"adamw_int8", "adamw_sr"}
ERRORS = (TypeError, ValueError)
SPAWN_TIMEOUT_S = 300
PG_TIMEOUT_S = 30


# -- helpers run on each rank -----------------------------------------------------------------------------------
def _placements():
    from torch.distributed.tensor import Replicate, Shard

    return [((ROWS, COLS), Shard(0)), ((REPLICATED,), Replicate())]


def _is_dt(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _dist(full: torch.Tensor, mesh, placement):
    """``full`` as a DTensor of ``placement`` on ``mesh``, built locally (no collective: ``torch.chunk``'s split, as
    DTensor's ``Shard`` does)."""
    from torch.distributed.tensor import DTensor

    rank, world = mesh.get_local_rank(), mesh.size()
    if placement.is_shard():
        chunks = list(full.chunk(world, dim=placement.dim))
        while len(chunks) < world:  # (torch.chunk may give fewer chunks than ranks)
            chunks.append(full.narrow(placement.dim, 0, 0))
        local = chunks[rank].clone()
    else:
        local = full.clone()
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=full.shape, stride=full.stride())


def _full_grads(dtype, k: int) -> list[torch.Tensor]:
    """The global grads of step ``k`` (the same on every rank)."""
    g = torch.Generator().manual_seed(1000 + k)
    return [torch.randn(shape, generator=g).to(dtype) for shape, _ in _placements()]


def _set_grads(params, mesh, k: int) -> None:
    for p, full in zip(params, _full_grads(params[0].dtype, k)):
        p.grad = _dist(full, mesh, p.placements[0])


def _make(variant: str, backend: str, mesh):
    cls, dtype, kwargs, _ = VARIANTS[variant]
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(_dist(torch.randn(shape, generator=gen).to(dtype), mesh, pl)) for shape, pl in _placements()
    ]
    return cls(params, backend=backend, **kwargs), params


def _bits(t: torch.Tensor) -> tuple:
    """A tensor's dtype, element count and bytes (NaN payloads included)."""
    t = t.detach()
    flat = t.reshape(-1).contiguous()
    return (str(t.dtype), flat.numel(), flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def _desc(t) -> tuple:
    """What must not change: the wrapper's type and placements, its local shard's identity, address, strides and
    bits."""
    if not isinstance(t, torch.Tensor):
        return ("value", repr(t))
    if _is_dt(t):
        local = t._local_tensor
        return ("dtensor", tuple(map(str, t.placements)), tuple(t.shape), id(local), local.data_ptr(),
                tuple(local.shape), local.stride(), _bits(local))  # fmt: skip
    return ("tensor", t.data_ptr(), tuple(t.shape), t.stride(), _bits(t))


def _snapshot(opt, params) -> list:
    out = [("state size", len(opt.state))]
    for i, p in enumerate(params):
        out.append((f"param {i}", _desc(p), None if p.grad is None else _desc(p.grad)))
        st = opt.state.get(p, {})
        out.append((f"param {i} state keys", sorted(st)))
        for k in sorted(st):
            out.append((f"param {i} state {k}", id(st[k]), _desc(st[k])))
    return out


def _values(opt, params) -> list:
    """The values a step leads to: every param's and state tensor's local shard (dtype, shape, bits) and placements."""
    out = []
    for p in params:
        out.append(("param", tuple(map(str, p.placements)), _bits(p._local_tensor)))
        st = opt.state.get(p, {})
        for k in sorted(st):
            v = st[k]
            if _is_dt(v):
                out.append((k, tuple(map(str, v.placements)), _bits(v._local_tensor)))
            else:
                out.append((k, "plain", _bits(v) if isinstance(v, torch.Tensor) else repr(v)))
    return out


def _first_diff(a: list, b: list) -> str | None:
    if len(a) != len(b):
        return f"{len(a)} entries vs {len(b)}"
    for x, y in zip(a, b):
        if x != y:
            return f"{x[0]}: {str(x)[:160]} != {str(y)[:160]}"
    return None


# -- the cases: each changes one thing on the optimizer of ``ctx`` and returns how to undo it (None: nothing) ------
def _grad_placed(i: int, which: str):
    def case(ctx):
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        p = ctx.params[i]
        full = _full_grads(p.dtype, ctx.k)[i]
        good = p.grad
        if which == "partial":  # each rank holds half: the reduced grad is the right one
            p.grad = DTensor.from_local(full / 2, ctx.mesh, [Partial()], run_check=False)
        elif which == "plain":
            p.grad = full
        elif which == "mesh":
            p.grad = _dist(full, ctx.other_mesh, p.placements[0])
        elif which == "named mesh":
            p.grad = _dist(full, ctx.named_mesh, p.placements[0])
        else:
            p.grad = _dist(full, ctx.mesh, Replicate() if which == "replicate" else Shard(0))

        def undo():
            p.grad = good

        return undo

    return case


def _grad_local(i: int, which: str):
    def case(ctx):
        local = ctx.params[i].grad._local_tensor
        saved = local.clone()
        if which == "bigger":
            local.data = torch.randn(local.shape[0] + 1, *local.shape[1:]).to(local.dtype)
        elif which == "dtype":
            local.data = local.to(torch.float16 if local.dtype != torch.float16 else torch.float32)
        else:  # a non-contiguous view holding the same values (legal: the step reads a contiguous copy)
            local.data = _noncontiguous(saved)

        def undo():
            local.data = saved

        return undo

    return case


def _noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor equal to ``x`` (for more than one element)."""
    if x.dim() >= 2:
        return x.t().contiguous().t() if x.shape[0] > 1 and x.shape[1] > 1 else x.repeat_interleave(2, dim=-1)[..., ::2]
    wide = torch.zeros(x.numel() * 2, dtype=x.dtype)
    wide[::2] = x
    return wide[::2]


def _state_replaced(i: int, key: str, which: str):
    def case(ctx):
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        st = ctx.opt.state[ctx.params[i]]
        orig = st[key]
        if which == "plain_local":
            st[key] = orig._local_tensor.clone()
        elif which == "plain_full":
            st[key] = orig.full_tensor()
        elif which == "partial":
            st[key] = DTensor.from_local(orig.full_tensor(), ctx.mesh, [Partial()], run_check=False)
        elif which == "shape":  # the right placements and local shard, another global shape
            shape = (orig.shape[0] + 2, *orig.shape[1:])
            stride = torch.empty(shape).stride()
            st[key] = DTensor.from_local(orig._local_tensor, ctx.mesh, orig.placements, run_check=False, shape=shape,
                                         stride=stride)  # fmt: skip
        else:  # another placement: Replicate for a Shard(0) state, Shard(0) for a Replicate one
            other = Shard(0) if orig.placements[0].is_replicate() else Replicate()
            st[key] = orig.redistribute(ctx.mesh, [other])

        def undo():
            st[key] = orig

        return undo

    return case


def _local_changed(get, which: str):
    """The local shard of the tensor ``get(ctx)`` changed in place."""

    def case(ctx):
        local = get(ctx)._local_tensor if _is_dt(get(ctx)) else get(ctx)
        saved = local.clone()
        n = local.numel()
        if which == "grow":
            local.resize_(n + 7)
        elif which == "shrink":
            local.resize_(max(n - 1, 0))
        elif which == "flat":  # the same element count, flattened: the memory the launch reads is the same
            local.resize_(n)
        elif which == "realloc":  # new storage, then the same shape and values: a new address
            local.resize_(n + 100_000)
            local.resize_(saved.shape)
            local.copy_(saved)
        elif which == "set":
            local.set_(saved.clone())
        elif which == "data_same":
            local.data = saved.clone()
        elif which == "noncontiguous":
            local.data = _noncontiguous(saved)
        elif which == "dtype":
            local.data = saved.to(torch.float64 if saved.dtype != torch.float64 else torch.float32)
        elif which == "data_bigger":
            local.data = torch.zeros(saved.numel() + 3).to(saved.dtype)
        elif which == "alias_state":  # the memory of the param's first state (the step would write it twice)
            key = VARIANTS[ctx.variant][3][0]
            local.data = ctx.opt.state[ctx.params[0]][key]._local_tensor

        def undo():
            local.data = saved

        return undo

    return case


def _param_data(i: int, which: str):
    def case(ctx):
        from torch.distributed.tensor import Replicate, Shard

        p = ctx.params[i]
        full = p.full_tensor().detach()
        if which == "same_placements":
            p.data = _dist(full, ctx.mesh, p.placements[0])
        else:
            p.data = _dist(full, ctx.mesh, Shard(0) if p.placements[0].is_replicate() else Replicate())
        return None

    return case


def _roundtrip(which: str):
    def case(ctx):
        if which == "same":
            ctx.opt.load_state_dict(ctx.opt.state_dict())
        elif which == "deepcopy":
            ctx.opt.load_state_dict(copy.deepcopy(ctx.opt.state_dict()))
        else:  # a fresh optimizer on the same params resumes from the dict
            cls, _, kwargs, _ = VARIANTS[ctx.variant]
            fresh = cls(ctx.params, backend=ctx.backend, **kwargs)
            fresh.load_state_dict(ctx.opt.state_dict())
            ctx.opt = fresh
        return None

    return case


def _param(i):
    return lambda ctx: ctx.params[i]


def _state(i, key):
    return lambda ctx: ctx.opt.state[ctx.params[i]][key]


def _cases(variant: str) -> dict:
    """name -> (what must happen: "error", "step" or "any"; what the message must name; the case; whether it also
    runs on the triton backend). Every case runs on the reference backend; under the interpreter a triton step costs
    ~0.1 s, so the triton backend runs the cases that reach a launch (a legal change, a rebuilt plan) and one error of
    each kind (the checks before a launch are the same code for both backends)."""
    keys = VARIANTS[variant][3]
    T, R = True, False
    cases = {
        # 1. grads
        "grad Replicate for a Shard(0) param": ("any", "grad", _grad_placed(0, "replicate"), T),
        "grad Shard(0) for a Replicate param": ("any", "grad", _grad_placed(1, "shard"), R),
        "grad Partial for a Shard(0) param": ("any", "grad", _grad_placed(0, "partial"), T),
        "grad Partial for a Replicate param": ("any", "grad", _grad_placed(1, "partial"), R),
        "grad on another mesh of the same ranks": ("step", "grad", _grad_placed(0, "mesh"), T),
        "grad on a mesh with other dim names": ("any", "grad", _grad_placed(0, "named mesh"), R),
        "grad plain tensor for a DTensor param": ("error", "grad", _grad_placed(0, "plain"), R),
        "grad local shard of another size": ("error", "grad", _grad_local(0, "bigger"), R),
        "grad local shard of another dtype": ("error", "grad", _grad_local(0, "dtype"), R),
        "grad local shard non-contiguous": ("any", "grad", _grad_local(0, "noncontiguous"), T),
        # 4. params
        "param local .data of another size": ("error", "param", _local_changed(_param(0), "data_bigger"), R),
        "param local .data of another dtype": ("error", "param", _local_changed(_param(0), "dtype"), R),
        "param local .data new memory": ("step", "param", _local_changed(_param(0), "data_same"), T),
        "param local .data non-contiguous": ("any", "param", _local_changed(_param(0), "noncontiguous"), T),
        "param local resized bigger": ("error", "param", _local_changed(_param(0), "grow"), R),
        "param local .data = its state's memory": ("error", "param", _local_changed(_param(0), "alias_state"), T),
        "param local reallocated": ("step", "param", _local_changed(_param(0), "realloc"), T),
        "replicated param local .data new memory": ("step", "param", _local_changed(_param(1), "data_same"), T),
        "param .data = DTensor of other placements": ("any", "param", _param_data(0, "other"), T),
        "replicated param .data = DTensor of other placements": ("any", "param", _param_data(1, "other"), R),
        "param .data = DTensor of the same placements": ("any", "param", _param_data(0, "same_placements"), T),
        # 5. state dicts
        "state dict round trip": ("step", "", _roundtrip("same"), T),
        "state dict round trip (deep copy)": ("step", "", _roundtrip("deepcopy"), T),
        "state dict into a fresh optimizer": ("step", "", _roundtrip("fresh"), T),
    }
    for n, key in enumerate(keys):
        full = n == 0 or key == "exp_avg_scale"  # (the full set for the first moment and for the 8-bit scales)
        named, st, rep = f"'{key}'", _state(0, key), _state(1, key)
        # 2. states replaced
        cases[f"state {key} plain local shard"] = ("error", named, _state_replaced(0, key, "plain_local"), n == 0)
        cases[f"state {key} other placements"] = ("error", named, _state_replaced(0, key, "other"), R)
        cases[f"replicated param's state {key} other placements"] = (
            "error", named, _state_replaced(1, key, "other"), R)  # fmt: skip
        cases[f"state {key} of another global shape"] = ("error", named, _state_replaced(0, key, "shape"), R)
        # 3. local shards changed in place
        cases[f"state {key} local resized bigger"] = ("error", named, _local_changed(st, "grow"), n == 0)
        cases[f"state {key} local resized smaller"] = ("error", named, _local_changed(st, "shrink"), R)
        cases[f"state {key} local .data non-contiguous"] = ("any", named, _local_changed(st, "noncontiguous"), full)
        cases[f"state {key} local .data new memory"] = ("step", named, _local_changed(st, "data_same"), T)
        if full:
            cases[f"state {key} plain full tensor"] = ("error", named, _state_replaced(0, key, "plain_full"), R)
            cases[f"replicated param's state {key} Partial"] = ("error", named, _state_replaced(1, key, "partial"), R)
            cases[f"state {key} local resized flat"] = ("any", named, _local_changed(st, "flat"), T)
            cases[f"state {key} local reallocated"] = ("step", named, _local_changed(st, "realloc"), T)
            cases[f"state {key} local set_"] = ("step", named, _local_changed(st, "set"), T)
            cases[f"state {key} local .data of another dtype"] = ("error", named, _local_changed(st, "dtype"), R)
            cases[f"replicated param's state {key} local resized bigger"] = (
                "error", named, _local_changed(rep, "grow"), R)  # fmt: skip
    if variant in HAS_STEP:
        cases["step count resized to 8 elements"] = ("error", "'step'", _local_changed(_state(0, "step"), "grow"), R)
        cases["step count .data new memory"] = ("step", "'step'", _local_changed(_state(0, "step"), "data_same"), T)
    return cases


def _run_case(variant: str, backend: str, name: str, meshes: tuple, expected: list) -> dict:
    import time

    t0 = time.perf_counter()
    case = _cases(variant)[name][2]
    mesh, other_mesh, named_mesh = meshes
    opt, params = _make(variant, backend, mesh)
    _set_grads(params, mesh, 0)
    opt.step()
    _set_grads(params, mesh, 1)
    ctx = types.SimpleNamespace(opt=opt, params=params, mesh=mesh, other_mesh=other_mesh, named_mesh=named_mesh, k=1,
                                variant=variant, backend=backend)  # fmt: skip
    rec: dict = {}
    try:
        undo = case(ctx)
    except Exception as e:  # noqa: BLE001 (torch refused the change itself: nothing to step)
        return {"setup_error": f"{type(e).__name__}: {e}"}
    opt = ctx.opt
    before = _snapshot(opt, params)
    try:
        opt.step()
        rec["raised"] = None
    except Exception as e:  # noqa: BLE001 (recorded: the test asserts on the type)
        rec["raised"], rec["message"] = type(e).__name__, str(e)
        rec["changed"] = _first_diff(before, _snapshot(opt, params))
        if undo is not None:
            undo()
        opt.step()
    rec["after_step"] = _first_diff(_values(opt, params), expected[0])
    _set_grads(params, mesh, 2)
    opt.step()
    rec["after_next_step"] = _first_diff(_values(opt, params), expected[1])
    rec["seconds"] = time.perf_counter() - t0
    return rec


def run_cases(rank: int, world: int, out_dir: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    meshes = (mesh, init_device_mesh("cpu", (world,)), init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
    out = {}
    for variant in VARIANTS:
        for backend in BACKENDS:
            # the untouched twin: the values after steps 1 and 2
            opt, params = _make(variant, backend, mesh)
            expected = []
            for k in range(3):
                _set_grads(params, mesh, k)
                opt.step()
                if k:
                    expected.append(_values(opt, params))
            for name, (*_, on_triton) in _cases(variant).items():
                if backend == "triton" and not on_triton:
                    continue
                try:
                    out[(variant, backend, name)] = _run_case(variant, backend, name, meshes, expected)
                except Exception as e:  # noqa: BLE001 (a failure after the case: recorded, the next case runs)
                    out[(variant, backend, name)] = {"harness_error": f"{type(e).__name__}: {e}"}
    dist.barrier()
    return out


# -- the tests ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return spawn("tests.test_safety_family_dtensor:run_cases", WORLD, str(tmp_path_factory.mktemp("safety_dtensor")),
                 timeout=SPAWN_TIMEOUT_S, pg_timeout_s=PG_TIMEOUT_S)  # fmt: skip


CASES = [
    (variant, backend, name)
    for variant in VARIANTS
    for backend in BACKENDS
    for name, (*_, on_triton) in _cases(variant).items()
    if backend == "reference" or on_triton
]
# (variant, backend, case) -> reason: library bugs this file found
# Cases known to fail, with the reason (strict: one that passes must leave this list). Empty: the last one, a Lion
# state flattened in place on the reference backend (weight decay written, then a broadcast error), is fixed: the
# plain-torch paths see every param-sized state through a view of the param's shape.
XFAIL: dict[tuple[str, str, str], str] = {}


def _params():
    for variant, backend, name in CASES:
        reason = XFAIL.get((variant, backend, name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(variant, backend, name, id=f"{variant}-{backend}-{name}", marks=marks)


@pytest.mark.parametrize("variant,backend,name", list(_params()))
def test_case(results, variant, backend, name):
    must, names = _cases(variant)[name][:2]
    recs = [res[(variant, backend, name)] for res in results]
    for rank, rec in enumerate(recs):
        assert "harness_error" not in rec and "setup_error" not in rec, (rank, rec)
    # the same outcome on every rank
    assert len({rec["raised"] for rec in recs}) == 1, [(r["raised"], r.get("message")) for r in recs]
    # (messages differ only where they quote a rank's own local shard shape)
    assert len({re.sub(r"\d+", "N", rec.get("message", "")) for rec in recs}) == 1, [r.get("message") for r in recs]
    for rank, rec in enumerate(recs):
        if rec["raised"] is not None:
            assert must != "step", f"rank {rank}: a legal change raised {rec['raised']}: {rec['message']}"
            assert rec["raised"] in {e.__name__ for e in ERRORS}, (rank, rec["raised"], rec["message"])
            assert rec["changed"] is None, f"rank {rank}: {rec['raised']} raised but {rec['changed']} changed"
            for word in ("param", names):  # the message names the param, and the grad or the state key
                assert word in rec["message"], f"rank {rank}: the message does not name {word}: {rec['message']}"
        else:
            assert must != "error", f"rank {rank}: no error"
        # a legal change stepped as the untouched twin did; after an error (undone), the next steps did
        assert rec["after_step"] is None, f"rank {rank}: after the step, {rec['after_step']}"
        assert rec["after_next_step"] is None, f"rank {rank}: after the next step, {rec['after_next_step']}"
