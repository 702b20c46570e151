"""``load_state_dict`` of DTensor params on 2 gloo ranks: every rank loads, or every rank raises (probe 56).

The load converted and checked the dict param by param, and the conversion of a full (plain) state was a scatter
from rank 0 (``distribute_tensor``'s default): a dict bad on one rank only made that rank raise while the others
waited in the next scatter until the process group's timeout (30 min by default), after which every collective
failed; dicts that differ between ranks in which params have states paired the scatters across params (rank 1
loaded param 0's moments as param 1's, silently). Now a full state is cut into this rank's shard locally, the
outcome is agreed in one all-reduce over the params' meshes before anything changes, and a conversion that
communicates (a DTensor state of other placements) is preceded by one too.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.test_distributed import one_rank_group, spawn  # noqa: F401 - a fixture

pytestmark = pytest.mark.distributed

PG_TIMEOUT_S = 15
OPTIMIZERS = ("adamw", "adamw_int8", "sgd", "lion")


def _make(name: str, params, backend: str):
    import fused_ops

    if name == "adamw":
        return fused_ops.FusedAdamW(params, lr=1e-2, backend=backend)
    if name == "adamw_int8":
        return fused_ops.FusedAdamW(params, lr=1e-2, state_dtype="int8", backend=backend)
    if name == "sgd":
        return fused_ops.FusedSGD(params, lr=1e-2, momentum=0.9, backend=backend)
    return fused_ops.FusedLion(params, lr=1e-3, backend=backend)


def _full_dict(opt) -> dict:
    """``opt.state_dict(dequantize=True)`` (fp32 moments) with every DTensor made a full plain tensor, as a
    consolidated checkpoint holds it."""
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict(dequantize=True) if "dequantize" in type(opt).state_dict.__code__.co_varnames else None
    sd = sd if sd is not None else opt.state_dict()
    state = {k: {kk: (v.full_tensor() if isinstance(v, DTensor) else v) for kk, v in st.items()}
             for k, st in sd["state"].items()}  # fmt: skip
    return {"state": state, "param_groups": sd["param_groups"]}


def _locals(opt) -> list[tuple[str, torch.Tensor]]:
    from torch.distributed.tensor import DTensor

    out = []
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out.append((f"{i}.{k}", (v._local_tensor if isinstance(v, DTensor) else v).clone()))
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(x, y) for (ka, x), (kb, y) in zip(a, b))


def _timed_load(opt, sd) -> tuple[str, str, float]:
    """``opt.load_state_dict(sd)``: ("loaded" or the error's type, its message, seconds)."""
    t0 = time.monotonic()
    try:
        opt.load_state_dict(sd)
        kind, msg = "loaded", ""
    except Exception as e:
        kind, msg = type(e).__name__, str(e)
    return kind, msg, time.monotonic() - t0


def run_load(rank: int, world: int, out_dir: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for backend in ("reference", "triton"):
        for name in OPTIMIZERS if backend == "reference" else ("adamw",):
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(distribute_tensor(torch.randn(8, 4, generator=gen), mesh, [Shard(0)]))
                      for _ in range(2)]  # fmt: skip
            opt = _make(name, params, backend)
            for p in params:
                p.grad = distribute_tensor(torch.randn(8, 4, generator=gen), mesh, [Shard(0)])
            opt.step()
            full = _full_dict(opt)
            key = next(k for k in full["state"][1] if k != "step")
            cases = {
                "valid": lambda sd: None,
                "short": lambda sd, key=key: sd["state"][1].__setitem__(key, sd["state"][1][key][:-1].reshape(-1)),
                "missing": lambda sd, key=key: sd["state"][1].pop(key),
                "nan_lr": lambda sd: sd["param_groups"][0].__setitem__("lr", float("nan")),
            }
            if "step" in full["state"][1]:
                cases["negative_step"] = lambda sd: sd["state"][1].__setitem__("step", torch.tensor(-1.0))
            for case, corrupt in cases.items():
                sd = {"state": {k: dict(v) for k, v in full["state"].items()},
                      "param_groups": [dict(g) for g in full["param_groups"]]}  # fmt: skip
                if rank == 1:
                    corrupt(sd)
                before = _locals(opt)
                kind, msg, dt = _timed_load(opt, sd)
                try:
                    dist.barrier()
                    after_ok = True
                except Exception:
                    after_ok = False
                changed = not _same(before, _locals(opt))
                out[(backend, name, case)] = (kind, msg, dt, after_ok, changed)
    # Dicts that differ between ranks in which params have states: each rank loads its own (no pairing across).
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(8, 4, generator=gen), mesh, [Shard(0)]))
              for _ in range(2)]  # fmt: skip
    opt = _make("adamw", params, "reference")
    for p in params:
        p.grad = distribute_tensor(torch.randn(8, 4, generator=gen), mesh, [Shard(0)])
    opt.step()
    sd = _full_dict(opt)
    mine = rank  # (rank 0 keeps param 0's state only, rank 1 param 1's)
    for i in (0, 1):
        sd["state"][i]["exp_avg"] = 100.0 * (i + 1) + torch.arange(32.0).reshape(8, 4)
    sd["state"] = {mine: sd["state"][mine]}
    opt.load_state_dict(sd)
    shard = opt.state[params[mine]]["exp_avg"]._local_tensor
    expected = (100.0 * (mine + 1) + torch.arange(32.0).reshape(8, 4)).chunk(world)[rank]
    out["own_dict"] = (
        torch.equal(shard, expected),
        sorted(i for i, p in enumerate(params) if any(p is q for q in opt.state)),
    )
    # A DTensor state of other placements (Replicate, redistributed: a collective) then a bad later param on rank 1.
    sd = {"param_groups": opt.state_dict()["param_groups"], "state": {}}
    for i in (0, 1):
        full = {"exp_avg": torch.full((8, 4), 0.5 + i), "exp_avg_sq": torch.full((8, 4), 0.25 + i)}
        sd["state"][i] = {"step": torch.tensor(1.0)}
        sd["state"][i].update({k: distribute_tensor(v, mesh, [Replicate()], src_data_rank=None)
                               for k, v in full.items()})  # fmt: skip
    good = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    try:
        opt.load_state_dict(good)
        replicated = ("loaded", opt.state[params[0]]["exp_avg"].placements == (Shard(0),))
    except Exception as e:
        replicated = (type(e).__name__, str(e))
    if rank == 1:
        sd["state"][1]["exp_avg_sq"] = torch.zeros(3)
    before = _locals(opt)
    kind, msg, dt = _timed_load(opt, sd)
    out["replicate_then_bad"] = (replicated, kind, msg, dt, not _same(before, _locals(opt)))
    # A Replicate param's full state: copied (the caller's tensor neither kept nor written). A param on a mesh of
    # rank 0 only: rank 1 gets empty states for it, as get_optimizer_state_dict(full_state_dict=True) gives.
    from torch.distributed.device_mesh import DeviceMesh

    sub = DeviceMesh("cpu", [0])
    r = torch.nn.Parameter(distribute_tensor(torch.ones(3, 3), mesh, [Replicate()], src_data_rank=None))
    s = torch.nn.Parameter(distribute_tensor(torch.ones(3, 3), sub, [Replicate()], src_data_rank=None))
    opt = _make("adamw", [r, s], "reference")
    own = torch.full((3, 3), float(rank))
    on_sub = torch.full((3, 3), 2.0) if rank == 0 else torch.empty(0)
    sd = {"param_groups": opt.state_dict()["param_groups"],
          "state": {0: {"step": torch.tensor(1.0), "exp_avg": own, "exp_avg_sq": own.clone()},
                    1: {"step": torch.tensor(1.0), "exp_avg": on_sub, "exp_avg_sq": on_sub.clone()}}}  # fmt: skip
    try:
        opt.load_state_dict(sd)
        m = opt.state[r]["exp_avg"]._local_tensor
        out["copied"] = ("loaded", m.data_ptr() != own.data_ptr() and torch.equal(own, torch.full((3, 3), rank * 1.0))
                         and torch.equal(m, own), tuple(opt.state[s]["exp_avg"]._local_tensor.shape))  # fmt: skip
    except Exception as e:
        out["copied"] = (type(e).__name__, str(e), None)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dtensor_load"))
    return spawn("tests.test_dtensor_load_agreement:run_load", 2, out_dir, timeout=400, pg_timeout_s=PG_TIMEOUT_S)


CASES = [("reference", n, c) for n in OPTIMIZERS for c in ("valid", "short", "missing", "nan_lr", "negative_step")]
CASES += [("triton", "adamw", c) for c in ("valid", "short", "missing", "nan_lr", "negative_step")]


@pytest.mark.parametrize("backend, name, case", CASES)
def test_every_rank_loads_or_every_rank_raises(results, backend, name, case):
    key = (backend, name, case)
    if key not in results[0]:
        assert name in ("sgd", "lion") and case == "negative_step", key  # (no step counts kept)
        return
    r0, r1 = results[0][key], results[1][key]
    for kind, msg, dt, after_ok, _ in (r0, r1):
        assert dt < PG_TIMEOUT_S * 0.9, f"a rank waited {dt:.1f} s in load_state_dict ({kind}: {msg})"
        assert after_ok, "the process group broke"
    # (SGD, Lion: a param state without its one buffer is a valid empty state, as torch.optim.SGD's)
    if case == "valid" or (name in ("sgd", "lion") and case == "missing"):
        assert r0[0] == r1[0] == "loaded", (r0, r1)
        return
    assert r1[0] == "ValueError" and "loaded state dict" in r1[1], r1
    assert r0[0] == "RuntimeError" and "another rank refused" in r0[1], r0
    assert not r0[4] and not r1[4], "a state changed on a rank that raised"


def test_each_rank_loads_its_own_dict(results):
    for rank in (0, 1):
        equal, which = results[rank]["own_dict"]
        assert equal, f"rank {rank} loaded another param's moments"
        assert which == [rank]


def test_redistributed_state_then_a_bad_param_on_one_rank(results):
    r0, r1 = results[0]["replicate_then_bad"], results[1]["replicate_then_bad"]
    assert r0[0] == r1[0] == ("loaded", True), (r0[0], r1[0])
    assert r1[1] == "ValueError" and r0[1] == "RuntimeError", (r0, r1)
    assert r0[3] < PG_TIMEOUT_S * 0.9 and r1[3] < PG_TIMEOUT_S * 0.9
    assert not r0[4] and not r1[4]


def test_state_of_another_shape_names_the_shape(one_rank_group):  # noqa: F811 - the fixture
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fused_ops

    mesh = init_device_mesh("cpu", (1,))
    p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    opt = fused_ops.FusedAdamW([p], lr=1e-2, backend="reference")
    opt.step()
    opt.state[p]["exp_avg"] = distribute_tensor(torch.zeros(9), mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"has shape \(9,\), its param \(8, 4\)"):
        opt.step()


def test_full_state_is_copied_and_off_mesh_ranks_take_empty_states(results):
    r0, r1 = results[0]["copied"], results[1]["copied"]
    assert r0[:2] == ("loaded", True) and r1[:2] == ("loaded", True), (r0, r1)
    assert r0[2] == (3, 3) and r1[2] == (0,), (r0[2], r1[2])


def run_meshes3(rank: int, world: int, out_dir: str) -> dict:
    """3 ranks. (a) Pipeline-like: each stage's optimizer holds only its own params (ranks 0 and 1 on their own
    sub-mesh of a (pp, dp) mesh, rank 2 plain): each loads its own dict, no rank waits for another stage. (b) Params
    on overlapping meshes [0, 1] and [1, 2], a dict bad on rank 2 only: every rank raises (rank 0 hears of it
    through rank 1), none loads."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    pp = init_device_mesh("cpu", (3, 1), mesh_dim_names=("pp", "dp"))
    if rank < 2:
        p = torch.nn.Parameter(distribute_tensor(torch.randn(6, 2), pp["dp"], [Shard(0)], src_data_rank=None))
    else:
        p = torch.nn.Parameter(torch.randn(6, 2))
    opt = _make("adamw", [p], "reference")
    sd = {"param_groups": opt.state_dict()["param_groups"],
          "state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.full((6, 2), 0.5),
                        "exp_avg_sq": torch.full((6, 2), 0.25)}}}  # fmt: skip
    t0 = time.monotonic()
    try:
        opt.load_state_dict(sd)
        out["pipeline"] = ("loaded", time.monotonic() - t0)
    except Exception as e:
        out["pipeline"] = (f"{type(e).__name__}: {e}", time.monotonic() - t0)
    gen = torch.Generator().manual_seed(0)
    a_mesh, b_mesh = DeviceMesh("cpu", [0, 1]), DeviceMesh("cpu", [1, 2])
    a = torch.nn.Parameter(distribute_tensor(torch.randn(6, 2, generator=gen), a_mesh, [Shard(0)], src_data_rank=None))
    b = torch.nn.Parameter(distribute_tensor(torch.randn(6, 2, generator=gen), b_mesh, [Shard(0)], src_data_rank=None))
    opt = _make("adamw", [a, b], "reference")
    full = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(6, 2), "exp_avg_sq": torch.zeros(6, 2)}
    sd = {"param_groups": opt.state_dict()["param_groups"], "state": {0: dict(full), 1: dict(full)}}
    if rank == 2:
        sd["state"][1]["step"] = torch.tensor(-1.0)
    t0 = time.monotonic()
    try:
        opt.load_state_dict(sd)
        out["overlap"] = ("loaded", time.monotonic() - t0, len(opt.state))
    except Exception as e:
        out["overlap"] = (type(e).__name__, time.monotonic() - t0, len(opt.state))
    # A loaded int step of any size: the package's error, not an OverflowError.
    try:
        opt.load_state_dict({"param_groups": sd["param_groups"], "state": {0: {**full, "step": 10**400}}})
        out["huge_step"] = "loaded"
    except Exception as e:
        out["huge_step"] = f"{type(e).__name__}: {e}"
    return out


def test_meshes_of_other_stages_and_overlapping_meshes(tmp_path):
    results = spawn("tests.test_dtensor_load_agreement:run_meshes3", 3, str(tmp_path), timeout=300,
                    pg_timeout_s=PG_TIMEOUT_S)  # fmt: skip
    for rank, r in enumerate(results):
        assert r["pipeline"][0] == "loaded" and r["pipeline"][1] < PG_TIMEOUT_S * 0.9, (rank, r["pipeline"])
        kind, dt, n_states = r["overlap"]
        assert kind == ("ValueError" if rank == 2 else "RuntimeError"), (rank, r["overlap"])
        assert dt < PG_TIMEOUT_S * 0.9 and n_states == 0, (rank, r["overlap"])
        assert r["huge_step"].startswith("ValueError") and "float32 holds" in r["huge_step"], r["huge_step"]
