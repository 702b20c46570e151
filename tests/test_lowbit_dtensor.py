"""8-bit Adam states on DTensor params (tensor parallel, FSDP2), on 2 gloo ranks and 1, both backends.

Every shard has its own blocks of 256 elements, so the oracle is exact: on each rank, the step on DTensor params must
equal, bit for bit, the same optimizer stepping plain tensors that hold the local shards. Checkpoints: compact ones
(codes + per-shard scales, DCP included) resume exactly on the same layout and are refused, on every rank and with
nothing changed, on another; dequantized ones load onto any layout (DCP reshards them from 2 ranks to 1).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import fused_ops
from tests.test_distributed import spawn

pytestmark = pytest.mark.distributed

BACKENDS = ("triton", "reference")
STEPS = 4
KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")
SD_KEYS = ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_scale", "exp_avg_sq_scale")  # (the codes' keys in state dicts)


def _placements():
    from torch.distributed.tensor import Replicate, Shard

    # (shape, placement): even and uneven shards over several blocks, a shard that is empty on rank 1, a replicated
    # bias, a column shard (Shard(1)) of a matrix whose rows span blocks
    return [((600, 3), Shard(0)), ((7, 300), Shard(1)), ((5,), Replicate()), ((259,), Shard(0)), ((1, 4), Shard(0))]


def _grads(shapes, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=g) * (1 + 10 * (i % 2)) for i, shape in enumerate(shapes)]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def run_tp(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    shapes = [s for s, _ in _placements()]
    out = {}
    for backend in BACKENDS:
        gen = torch.Generator().manual_seed(0)
        fulls = [torch.randn(s, generator=gen) for s in shapes]
        ours = [
            torch.nn.Parameter(distribute_tensor(f.clone(), mesh, [pl])) for f, (_, pl) in zip(fulls, _placements())
        ]
        plain = [torch.nn.Parameter(p.to_local().clone()) for p in ours]  # the oracle: the local shards, plain
        kw = dict(lr=1e-2, weight_decay=0.1, state_dtype="int8", backend=backend)
        o, t = fused_ops.FusedAdamW(ours, **kw), fused_ops.FusedAdamW(plain, **kw)

        for k in range(STEPS):
            for p, q, g in zip(ours, plain, _grads(shapes, k)):
                p.grad = distribute_tensor(g, mesh, p.placements)
                q.grad = p.grad.to_local().clone()  # the plain twin: the local shard of the same grad
            o.step()
            t.step()
        res = {"exact": _equal([p.to_local() for p in ours], plain)}
        res["states_exact"] = all(torch.equal(o.state[p][key].to_local(), t.state[q][key]) for p, q in zip(ours, plain)
                                  for key in KEYS if key.endswith("avg") or key.endswith("sq"))  # fmt: skip
        res["scales_exact"] = all(
            torch.equal(o.state[p][key].to_local()[: t.state[q][key].numel()], t.state[q][key])
            for p, q in zip(ours, plain) for key in ("exp_avg_scale", "exp_avg_sq_scale")
        )  # fmt: skip
        res["layout"] = [
            (o.state[p]["exp_avg"].placements == p.placements and o.state[p]["exp_avg"].dtype == torch.uint8,
             str(tuple(o.state[p]["exp_avg_scale"].placements)), tuple(o.state[p]["exp_avg_scale"].shape))
            for p in ours
        ]  # fmt: skip
        res["bytes"] = sum(v.to_local().numel() * v.to_local().element_size() for p in ours for key, v in
                           o.state[p].items() if key in KEYS)  # fmt: skip

        # compact state dict: DTensors and the layout; a fresh optimizer loads it and continues exactly
        sd = o.state_dict()
        res["compact"] = all(isinstance(sd["state"][i][k], DTensor) and "int8_layout" in sd["state"][i]
                             for i in range(len(ours)) for k in SD_KEYS)  # fmt: skip
        twin = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        o2 = fused_ops.FusedAdamW(twin, **kw)
        o2.load_state_dict(sd)
        # through DCP's helpers (same layout)
        twin3 = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        o3 = fused_ops.FusedAdamW(twin3, **kw)
        dcp_sd = get_optimizer_state_dict(torch.nn.ParameterList(ours), o)
        set_optimizer_state_dict(torch.nn.ParameterList(twin3), o3, dcp_sd)
        # the dequantized dict: torch AdamW's layout (fp32 DTensors), loaded by torch and quantised back by ours
        dq = o.state_dict(dequantize=True)
        res["dequantized_fp32"] = all(isinstance(dq["state"][i][k], DTensor) and dq["state"][i][k].dtype == torch.float
                                      and "exp_avg_scale" not in dq["state"][i] for i in range(len(ours))
                                      for k in ("exp_avg", "exp_avg_sq"))  # fmt: skip
        torch_twin = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        torch.optim.AdamW(torch_twin, lr=1e-2, weight_decay=0.1).load_state_dict(dq)
        o4 = fused_ops.FusedAdamW([torch.nn.Parameter(p.detach().clone()) for p in ours], **kw)
        o4.load_state_dict(dq)
        res["requantized_close"] = max(
            _maxdiff(o4.state[p4][key].to_local(), o.state[p][key].to_local())
            for p4, p in zip(o4.param_groups[0]["params"], ours)
            for key in ("exp_avg", "exp_avg_sq")
        )  # fmt: skip  (codes: requantising dequantized values gives back the same codes, or a neighbour)
        for k in range(STEPS, STEPS + 2):
            for params, opt in ((ours, o), (twin, o2), (twin3, o3)):
                for p, g in zip(params, _grads(shapes, k)):
                    p.grad = distribute_tensor(g, mesh, p.placements)
                opt.step()
        res["resume_exact"] = _equal([p.to_local() for p in ours], [p.to_local() for p in twin])
        res["dcp_exact"] = _equal([p.to_local() for p in ours], [p.to_local() for p in twin3])

        # a compact dict of another layout (the matrix sharded on dim 0 instead of 1): the same error on every rank,
        # nothing changed; a dequantized one loads
        other = [torch.nn.Parameter(distribute_tensor(f.clone(), mesh, [Shard(0) if i == 1 else pl]))
                 for i, (f, (_, pl)) in enumerate(zip(fulls, _placements()))]  # fmt: skip
        o5 = fused_ops.FusedAdamW(other, **kw)
        for p, g in zip(other, _grads(shapes, 0)):
            p.grad = distribute_tensor(g, mesh, p.placements)
        o5.step()
        before = {k: v.to_local().clone() for k, v in o5.state[other[1]].items() if k in KEYS}
        try:
            o5.load_state_dict(o.state_dict())
            res["other_layout_error"] = None
        except ValueError as e:
            res["other_layout_error"] = str(e)
        res["other_layout_unchanged"] = all(torch.equal(o5.state[other[1]][k].to_local(), v) for k, v in before.items())
        o5.load_state_dict(o.state_dict(dequantize=True))
        res["other_layout_dequantized_loads"] = o5.state[other[1]]["exp_avg_scale"].placements == (Shard(0),)
        # a replicated param keeps replicated scales
        res["replicate_scales"] = o.state[ours[2]]["exp_avg_scale"].placements == (Replicate(),)
        # a DTensor whose local shard is larger than its placements allow (made with run_check=False): refused before
        # any state is made
        odd = torch.nn.Parameter(DTensor.from_local(torch.zeros(600), mesh, [Shard(0)], run_check=False, shape=(4,),
                                                    stride=(1,)))  # fmt: skip
        odd.grad = DTensor.from_local(torch.zeros(600), mesh, [Shard(0)], run_check=False, shape=(4,), stride=(1,))
        o6 = fused_ops.FusedAdamW([odd], **kw)
        try:
            o6.step()
            res["odd_error"] = None
        except TypeError as e:
            res["odd_error"] = str(e)
        res["odd_no_state"] = len(o6.state) == 0
        out[backend] = res
    dist.barrier()
    return out


def _fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.ReLU(), torch.nn.Linear(300, 3))
    for layer in (m[0], m[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)


def _train(model, opt, first: int, steps: int) -> None:
    for k in range(first, first + steps):
        x = torch.randn(8, 40, generator=torch.Generator().manual_seed(k))  # the same batch on every rank
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def run_fsdp2_save(rank: int, world: int, out_dir: str) -> dict:
    """FSDP2 on 2 ranks with 8-bit states: each step equals the plain optimizer on the local shards with the same
    grads; DCP checkpoints saved compact and dequantized; where 3 more steps lead."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for backend in BACKENDS:
        model = _fsdp_model(mesh)
        o = fused_ops.FusedAdamW(model.parameters(), lr=1e-2, state_dtype="int8", backend=backend)
        plain = [torch.nn.Parameter(p.to_local().clone()) for p in model.parameters()]
        t = fused_ops.FusedAdamW(plain, lr=1e-2, state_dtype="int8", backend=backend)
        exact = True
        for k in range(3):
            x = torch.randn(8, 40, generator=torch.Generator().manual_seed(k))
            model(x).square().mean().backward()
            for p, q in zip(model.parameters(), plain):
                q.grad = p.grad.to_local().clone()
            o.step()
            t.step()
            o.zero_grad(set_to_none=True)
            exact &= _equal([p.to_local() for p in model.parameters()], plain)
        out[f"exact {backend}"] = exact
    model = _fsdp_model(mesh)
    opt = fused_ops.FusedAdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    _train(model, opt, 0, 3)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=os.path.join(out_dir, "compact"))
    opt.dequantize_state_dict = True
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=os.path.join(out_dir, "dequantized"))  # fmt: skip
    opt.dequantize_state_dict = False
    _train(model, opt, 3, 3)
    full = [p.full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "after.pt"))
    dist.barrier()
    return out


def run_fsdp2_load(rank: int, world: int, out_dir: str) -> dict:
    """The 2-rank checkpoints on 1 rank: the compact one is refused (its blocks are the 2-rank shards'); the
    dequantized one loads (DCP reshards it, ours quantises it per shard) and 3 more steps land near the 2-rank run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = _fsdp_model(mesh)
    opt = fused_ops.FusedAdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    _train(model, opt, 100, 1)
    out = {}
    try:
        sd = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=os.path.join(out_dir, "compact"))
        set_optimizer_state_dict(model, opt, sd["optim"])
        out["compact_error"] = None
    except (ValueError, CheckpointException) as e:  # (DCP: the scales' sizes differ; ours: the layout differs)
        out["compact_error"] = f"{type(e).__name__}: {e}"
    # The compact checkpoint into fp32 moments (ours and torch's): its codes are saved as exp_avg_codes, so DCP
    # finds no exp_avg to fill the template with (it casts what it reads: codes would load as moments 0..255).
    for name, make in (("fp32", lambda ps: fused_ops.FusedAdamW(ps, lr=1e-2)),
                       ("torch", lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False))):  # fmt: skip
        fp32_model = _fsdp_model(mesh)
        fp32_opt = make(fp32_model.parameters())
        _train(fp32_model, fp32_opt, 100, 1)
        before = [_full(v).clone() for st in fp32_opt.state.values() for v in st.values()]
        try:
            sd = {"optim": get_optimizer_state_dict(fp32_model, fp32_opt)}
            dcp.load(sd, checkpoint_id=os.path.join(out_dir, "compact"))
            set_optimizer_state_dict(fp32_model, fp32_opt, sd["optim"])
            out[f"compact_into_{name}_error"] = None
        except (ValueError, CheckpointException) as e:
            out[f"compact_into_{name}_error"] = f"{type(e).__name__}: {e}"
        after = [_full(v) for st in fp32_opt.state.values() for v in st.values()]
        out[f"compact_into_{name}_unchanged"] = _equal(before, after)
    opt.dequantize_state_dict = True
    sd = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=os.path.join(out_dir, "dequantized"))
    model.load_state_dict(sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    opt.dequantize_state_dict = False
    out["codes_after_load"] = str(opt.state[next(iter(model.parameters()))]["exp_avg"].dtype)
    _train(model, opt, 3, 3)
    expected = torch.load(os.path.join(out_dir, "after.pt"))
    out["resharded_err"] = max(_maxdiff(p.full_tensor(), e) for p, e in zip(model.parameters(), expected))
    # the control: the same weights with fresh optimizer states instead of the checkpoint's
    model.load_state_dict(sd["model"])
    fresh = fused_ops.FusedAdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    _train(model, fresh, 3, 3)
    out["fresh_states_err"] = max(_maxdiff(p.full_tensor(), e) for p, e in zip(model.parameters(), expected))
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    return spawn("tests.test_lowbit_dtensor:run_tp", 2, str(tmp_path_factory.mktemp("lowbit_tp")), timeout=400)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_states_on_dtensor_shards_equal_the_plain_step_on_the_shards(tp_results, backend):
    for rank, res in enumerate(tp_results):
        r = res[backend]
        assert r["exact"] and r["states_exact"] and r["scales_exact"], (rank, r)
        assert all(codes_like_param for codes_like_param, _, _ in r["layout"]), (rank, r["layout"])
        # scales: Shard(0) over the sharding mesh dim (2 ranks x the largest shard's block count), Replicate else
        assert [(pl, shape) for _, pl, shape in r["layout"]] == [
            ("(Shard(dim=0),)", (2 * 4,)), ("(Shard(dim=0),)", (2 * 5,)), ("(Replicate(),)", (1,)),
            ("(Shard(dim=0),)", (2,)), ("(Shard(dim=0),)", (2,)),
        ], r["layout"]  # fmt: skip
        assert r["replicate_scales"]
        assert r["odd_error"] is not None and "local shard" in r["odd_error"] and r["odd_no_state"], (rank, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_dtensor_state_dicts(tp_results, backend):
    for rank, res in enumerate(tp_results):
        r = res[backend]
        assert r["compact"] and r["resume_exact"] and r["dcp_exact"], (rank, r)
        assert r["dequantized_fp32"], (rank, r)
        assert r["requantized_close"] <= 1, (rank, r["requantized_close"])
        assert r["other_layout_error"] is not None and "dequantize=True" in r["other_layout_error"], (rank, r)
        assert r["other_layout_unchanged"] and r["other_layout_dequantized_loads"], (rank, r)


def test_int8_states_bytes_on_shards(tp_results):
    """Codes 1 byte per local element, 4 bytes per (padded) block scale, two moments: from the optimizer's tensors."""
    shard = {0: [(300, 3), (7, 150), (5,), (130,), (1, 4)], 1: [(300, 3), (7, 150), (5,), (129,), (0, 4)]}
    blocks = [4, 5, 1, 1, 1]  # the largest shard's blocks (scales are padded to it on every rank)
    for rank, res in enumerate(tp_results):
        numel = sum(torch.Size(s).numel() for s in shard[rank])
        assert res["triton"]["bytes"] == 2 * (numel + 4 * sum(blocks)), (rank, res["triton"]["bytes"])


def test_fsdp2_int8_states_and_dcp_checkpoints_across_world_sizes(tmp_path):
    saved = spawn("tests.test_lowbit_dtensor:run_fsdp2_save", 2, str(tmp_path), timeout=400)
    for rank, res in enumerate(saved):
        assert res["exact triton"] and res["exact reference"], (rank, res)
    (loaded,) = spawn("tests.test_lowbit_dtensor:run_fsdp2_load", 1, str(tmp_path), timeout=400)
    assert loaded["compact_error"] is not None and "exp_avg_scale" in loaded["compact_error"], loaded
    assert loaded["codes_after_load"] == "torch.uint8"
    for name in ("fp32", "torch"):  # (DCP: "Missing key in checkpoint state_dict: optim.state.<fqn>.exp_avg")
        err = loaded[f"compact_into_{name}_error"]
        assert err is not None and "exp_avg" in err and loaded[f"compact_into_{name}_unchanged"], (name, loaded)
    # 3 steps of lr 1e-2 after one requantisation on other blocks: Adam's update moves each element by about lr per
    # step whatever the moments' error, so the two runs stay within a fraction of 3 * lr
    assert loaded["resharded_err"] < 1e-2 and loaded["resharded_err"] < loaded["fresh_states_err"] / 3, loaded


def run_2d_mesh(rank: int, world: int, out_dir: str) -> dict:
    """FSDP2 over tensor parallel on a 2 x 2 mesh (``_StridedShard`` placements included): exact against the plain
    step on the local shards; a DCP checkpoint written to disk and read back restores every code and scale."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(40, 600), torch.nn.ReLU(), torch.nn.Linear(600, 40),
                                torch.nn.ReLU(), torch.nn.Linear(40, 3))  # fmt: skip
        parallelize_module(m, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for layer in (m[0], m[2], m[4]):
            fully_shard(layer, mesh=mesh["dp"])
        return fully_shard(m, mesh=mesh["dp"])

    m = model()
    o = fused_ops.FusedAdamW(m.parameters(), lr=1e-2, state_dtype="int8")
    plain = [torch.nn.Parameter(p.to_local().clone()) for p in m.parameters()]
    t = fused_ops.FusedAdamW(plain, lr=1e-2, state_dtype="int8")
    exact = True
    for k in range(3):
        m(torch.randn(8, 40, generator=torch.Generator().manual_seed(k))).square().mean().backward()
        for p, q in zip(m.parameters(), plain):
            q.grad = p.grad.to_local().clone()
        o.step()
        t.step()
        o.zero_grad(set_to_none=True)
        exact &= _equal([p.to_local() for p in m.parameters()], plain)
    path = os.path.join(out_dir, "ckpt_2d")
    dcp.save({"optim": get_optimizer_state_dict(m, o)}, checkpoint_id=path)
    m2 = model()
    o2 = fused_ops.FusedAdamW(m2.parameters(), lr=1e-2, state_dtype="int8")
    sd = {"optim": get_optimizer_state_dict(m2, o2)}  # (a zero step creates the states DCP loads into)
    dcp.load(sd, checkpoint_id=path)
    set_optimizer_state_dict(m2, o2, sd["optim"])
    restored = all(torch.equal(o.state[p][key].to_local(), o2.state[q][key].to_local())
                   for p, q in zip(m.parameters(), m2.parameters()) for key in KEYS)  # fmt: skip
    placements = sorted({str(tuple(p.placements)) for p in m.parameters()})
    dist.barrier()
    return dict(exact=exact, restored=restored, placements=placements)


def test_int8_states_on_a_2d_mesh_and_dcp_on_disk(tmp_path):
    for rank, res in enumerate(spawn("tests.test_lowbit_dtensor:run_2d_mesh", 4, str(tmp_path), timeout=400)):
        assert res["exact"] and res["restored"], (rank, res)
        assert any("_StridedShard" in p for p in res["placements"]), res["placements"]
