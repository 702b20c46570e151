"""DTensor params in FusedAdam/FusedAdamW (tensor-parallel placements, FSDP2), on 2 and 4 gloo ranks, both backends.

The step unwraps every param, grad and state to its local shard and launches on the shards (no DTensor dispatch);
states are DTensors with the param's mesh and placements, as torch.optim makes them. Each rank's result is
compared with torch.optim.AdamW's for-loop on the same DTensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fused_ops
from tests.test_distributed import spawn

pytestmark = pytest.mark.distributed

BACKENDS = ("triton", "reference")
STEPS = 20


def _placements():
    from torch.distributed.tensor import Replicate, Shard

    # (shape, placement): even and uneven shards, a shard that is empty on rank 1, a replicated bias
    return [((4, 6), Shard(0)), ((6, 4), Shard(1)), ((5,), Replicate()), ((5, 3), Shard(0)), ((1, 4), Shard(0))]


def _dtensor_params(mesh, seed: int):
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=g), mesh, [pl]))
            for shape, pl in _placements()]  # fmt: skip


def _set_grads(params_a, params_b, mesh, step: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(1000 + step)
    for a, b in zip(params_a, params_b):
        full = torch.randn(a.shape, generator=g)
        a.grad = distribute_tensor(full, mesh, a.placements)
        b.grad = distribute_tensor(full.clone(), mesh, b.placements)


def run_tp(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for backend in BACKENDS:
        ours, theirs = _dtensor_params(mesh, 0), _dtensor_params(mesh, 0)
        o = fused_ops.FusedAdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
        t = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
        for k in range(STEPS):
            _set_grads(ours, theirs, mesh, k)
            o.step()
            t.step()
        err = max((a.full_tensor() - b.full_tensor()).abs().max().item() for a, b in zip(ours, theirs))
        placements_ok = all(
            isinstance(o.state[p][key], DTensor) and o.state[p][key].placements == p.placements
            for p in ours for key in ("exp_avg", "exp_avg_sq")
        )  # fmt: skip
        # state_dict round trip (torch's layout) into a fresh optimizer; both continue identically
        twin = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        o2 = fused_ops.FusedAdamW(twin, lr=1e-2, weight_decay=0.1, backend=backend)
        o2.load_state_dict(o.state_dict())
        # and through torch.distributed.checkpoint's helpers
        twin3 = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        model3 = torch.nn.ParameterList(twin3)
        o3 = fused_ops.FusedAdamW(twin3, lr=1e-2, weight_decay=0.1, backend=backend)
        model = torch.nn.ParameterList(ours)
        dcp_sd = get_optimizer_state_dict(model, o)
        set_optimizer_state_dict(model3, o3, dcp_sd)
        for k in range(STEPS, STEPS + 2):
            _set_grads(ours, twin, mesh, k)
            for a, b in zip(twin3, twin):
                a.grad = b.grad.clone()
            o.step()
            o2.step()
            o3.step()
        resume_exact = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(ours, twin))
        dcp_exact = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(ours, twin3))
        # grads of other placements on the param's mesh (Replicate for a Shard param; Partial, rank 0 holding the
        # whole sum): redistributed to the param's placements for the step, as torch's DTensor ops do, and put back
        _set_grads(ours, twin, mesh, STEPS + 2)
        full = ours[0].grad.full_tensor()
        for bad in (Replicate(), Partial()):
            local = full if isinstance(bad, Replicate) or rank == 0 else torch.zeros_like(full)  # (sums to full)
            ours[0].grad = given = DTensor.from_local(local, mesh, [bad], run_check=False, shape=ours[0].shape,
                                                      stride=ours[0].stride())  # fmt: skip
            o.step()
            o2.step()
            placements_ok &= ours[0].grad is given
        other_placements_exact = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(ours, twin))
        # a grad that cannot be redistributed (a plain tensor): the same clear error on every rank, nothing changed
        before = [p.to_local().clone() for p in ours]
        errors = []
        ours[0].grad = torch.zeros(ours[0].shape)
        try:
            o.step()
            errors.append("no error")
        except (TypeError, ValueError) as e:
            errors.append(str(e))
        unchanged = all(torch.equal(a.to_local(), b) for a, b in zip(ours, before))
        out[backend] = dict(err=err, placements_ok=placements_ok, resume_exact=resume_exact, dcp_exact=dcp_exact,
                            errors=errors, unchanged=unchanged,
                            other_placements_exact=other_placements_exact)  # fmt: skip
        # a shard layout of one rank only: a (3, 4) Shard(0) param whose shards are transposed views is a
        # non-contiguous (2, 4) shard on rank 0 and a contiguous (1, 4) one on rank 1. Rank 0 refused it while
        # rank 1 stepped; every rank steps now, as torch's AdamW (through a contiguous copy of the shard)
        full_t = torch.randn(4, 3, generator=torch.Generator().manual_seed(30))
        pair = []
        for _ in range(2):
            local = (full_t[:, :2] if rank == 0 else full_t[:, 2:]).contiguous().t()
            pair.append(torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                              shape=torch.Size([3, 4]), stride=(4, 1))))  # fmt: skip
        o4 = fused_ops.FusedAdamW(pair[:1], lr=1e-2, weight_decay=0.1, backend=backend)
        t4 = torch.optim.AdamW(pair[1:], lr=1e-2, weight_decay=0.1, foreach=False)
        for k in range(2):
            g = torch.randn(pair[0].to_local().shape, generator=torch.Generator().manual_seed(40 + k + 10 * rank))
            for q in pair:
                q.grad = DTensor.from_local(g.clone(), mesh, [Shard(0)], run_check=False, shape=q.shape,
                                            stride=q.stride())  # fmt: skip
            o4.step()
            t4.step()
        out[backend]["rank_local_layout"] = ((pair[0].to_local() - pair[1].to_local()).abs().max().item(),
                                             pair[0].to_local().stride())  # fmt: skip
    dist.barrier()
    return out


def run_fsdp2(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for backend in BACKENDS:
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            for layer in (m[0], m[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(m, mesh=mesh)
            models.append(m)
        ours, theirs = models
        o = fused_ops.FusedAdamW(ours.parameters(), lr=1e-2, backend=backend)
        t = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
        for k in range(10):
            g = torch.Generator().manual_seed(100 * k + rank)
            x = torch.randn(4, 8, generator=g)
            for m, opt in ((ours, o), (theirs, t)):
                m(x).square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        err = max((a.full_tensor() - b.full_tensor()).abs().max().item()
                  for a, b in zip(ours.parameters(), theirs.parameters()))  # fmt: skip
        out[backend] = dict(err=err)
    # FSDP2's CPUOffloadPolicy: the shards, their grads and the optimizer states live on the host. Its default pins
    # that memory, which needs an accelerator; pin_memory=False runs on CPU ranks with gloo (the GPU case, with
    # pinned memory and CUDA compute, is test_cpu_offload_policy_on_cuda_matches_torch).
    from torch.distributed.fsdp import CPUOffloadPolicy

    for backend in BACKENDS:
        ours, theirs = (_fsdp(mesh, offload_policy=CPUOffloadPolicy(pin_memory=False)) for _ in range(2))
        o = fused_ops.FusedAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
        t = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        _train(ours, o, STEPS)
        _train(theirs, t, STEPS)
        on_cpu = all(p.to_local().device.type == "cpu" and o.state[p]["exp_avg"].to_local().device.type == "cpu"
                     for p in ours.parameters())  # fmt: skip
        out[f"offload {backend}"] = dict(err=_max_err(ours, theirs), on_cpu=on_cpu)
    # torch.compile(opt.step) on FSDP2 params: the checks, the states and the unwrapping to local shards run eagerly,
    # the traced graph holds the custom ops on the shards; bit for bit the eager step, every optimizer of the family.
    configs = {
        "adamw": lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, weight_decay=0.1, backend=b),
        "adamw int8": lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, state_dtype="int8", backend=b),
        "sgd": lambda ps, b: fused_ops.FusedSGD(ps, lr=1e-2, momentum=0.9, nesterov=True, backend=b),
        "lion": lambda ps, b: fused_ops.FusedLion(ps, lr=1e-3, weight_decay=0.1, backend=b),
    }
    # (each optimizer on one backend, the backends alternating: what failed was Dynamo tracing, not a backend)
    for (name, make), backend in zip(configs.items(), BACKENDS * 2):
        torch._dynamo.reset()
        eager_model, compiled_model = _fsdp(mesh), _fsdp(mesh)
        eager_opt = make(eager_model.parameters(), backend)
        compiled_opt = make(compiled_model.parameters(), backend)
        compiled_step = torch.compile(compiled_opt.step, backend="eager")
        for k in range(2):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(k))
            for m, step in ((eager_model, eager_opt.step), (compiled_model, compiled_step)):
                m(x).square().mean().backward()
                step()
                m.zero_grad(set_to_none=True)
        same = all(torch.equal(a.to_local(), b.to_local())
                   for a, b in zip(eager_model.parameters(), compiled_model.parameters()))  # fmt: skip
        keys = all(sorted(eager_opt.state[a]) == sorted(compiled_opt.state[b])
                   for a, b in zip(eager_model.parameters(), compiled_model.parameters()))  # fmt: skip
        moved = any(not torch.equal(a.to_local(), b.to_local())
                    for a, b in zip(eager_model.parameters(), _fsdp(mesh).parameters()))  # fmt: skip
        out[f"compile {name}"] = dict(same=same, keys=keys, moved=moved, backend=backend)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dtensor"))


@pytest.fixture(scope="module")
def tp_results(out_dir):
    return spawn("tests.test_dtensor:run_tp", 2, out_dir, timeout=400)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_placements_match_torch(tp_results, backend):
    for rank, res in enumerate(tp_results):
        r = res[backend]
        assert r["err"] < 1e-6, f"rank {rank}: {r['err']}"
        assert r["placements_ok"], f"rank {rank}: states are not DTensors with the params' placements"


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_layout_of_one_rank_only_steps_on_every_rank(tp_results, backend):
    for rank, res in enumerate(tp_results):
        err, stride = res[backend]["rank_local_layout"]
        assert err < 1e-6, (rank, err)
    assert tp_results[0][backend]["rank_local_layout"][1] == (1, 2)  # (the shard stepped in place, layout kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_state_dict_round_trips(tp_results, backend):
    for rank, res in enumerate(tp_results):
        assert res[backend]["resume_exact"], f"rank {rank}: load_state_dict(state_dict()) did not resume exactly"
        assert res[backend]["dcp_exact"], f"rank {rank}: get/set_optimizer_state_dict did not resume exactly"


@pytest.mark.safety
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_grads_of_other_placements(tp_results, backend):
    """A grad of other placements on the param's mesh (Replicate for a Shard(0) param, a Partial grad of which each
    rank holds a share) steps as its redistributed value would (torch's DTensor ops redistribute it implicitly), and
    the param keeps the grad it was given; a plain-tensor grad raises the same clear error on every rank."""
    for rank, res in enumerate(tp_results):
        r = res[backend]
        assert r["other_placements_exact"] and r["placements_ok"], (rank, r)
        assert len(r["errors"]) == 1 and "DTensor" in r["errors"][0] and "param 0" in r["errors"][0], r["errors"]
        assert r["unchanged"], f"rank {rank}: a refused step changed a param"
    assert tp_results[0][backend]["errors"] == tp_results[1][backend]["errors"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_matches_torch(out_dir, backend):
    results = _fsdp2_results(out_dir)
    for rank, res in enumerate(results):
        assert res[backend]["err"] < 1e-6, f"rank {rank}: {res[backend]['err']}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_cpu_offload_policy_matches_torch_fused(out_dir, backend):
    """FSDP2 with CPUOffloadPolicy(pin_memory=False) on 2 gloo ranks: FusedAdamW steps the host shards; 20 steps
    match torch.optim.AdamW(fused=True) within 1e-6, and the shards and states stay on the host."""
    for rank, res in enumerate(_fsdp2_results(out_dir)):
        r = res[f"offload {backend}"]
        assert r["err"] < 1e-6, f"rank {rank}: {r['err']}"
        assert r["on_cpu"], f"rank {rank}: a shard or a state left the host"


def test_fsdp2_compiled_step_equals_the_eager_step(out_dir):
    """``torch.compile(opt.step)`` on FSDP2 params (FusedAdamW, int8 states, Nesterov FusedSGD, FusedLion; the
    backends alternating): 2 steps bit for bit the eager step's, with the same state keys (Dynamo had failed tracing
    the DTensor unwrapping and left half-created states behind)."""
    for rank, res in enumerate(_fsdp2_results(out_dir)):
        for name in ("adamw", "adamw int8", "sgd", "lion"):
            r = res[f"compile {name}"]
            assert r["same"] and r["keys"] and r["moved"], (rank, name, r)


_FSDP2: dict = {}


def _fsdp2_results(out_dir):
    if "r" not in _FSDP2:
        _FSDP2["r"] = spawn("tests.test_dtensor:run_fsdp2", 2, out_dir, timeout=400)
    return _FSDP2["r"]


def run_offload_cuda(rank: int, world: int, out_dir: str) -> dict:
    """FSDP2 with the default CPUOffloadPolicy() (pinned host shards) and CUDA compute, on one GPU."""
    import os

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy

    # spawn() made a gloo group; FSDP2's collectives on CUDA tensors need NCCL
    dist.destroy_process_group()
    store = os.path.join(out_dir, f"pg_offload_cuda_{os.getpid()}")
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    mesh = init_device_mesh("cuda", (world,))
    out = {}
    models = [_fsdp(mesh, offload_policy=CPUOffloadPolicy()) for _ in range(2)]
    ours, theirs = models
    o = fused_ops.FusedAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)  # backend "auto": the CPU path
    t = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    for k in range(STEPS):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(k)).cuda()
        for m, opt in ((ours, o), (theirs, t)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    out["err"] = max((a.full_tensor().cpu() - b.full_tensor().cpu()).abs().max().item()
                     for a, b in zip(ours.parameters(), theirs.parameters()))  # fmt: skip
    shards = [p.to_local() for p in ours.parameters()]
    out["pinned_on_cpu"] = all(s.device.type == "cpu" and s.is_pinned() for s in shards)
    out["states_on_cpu"] = all(o.state[p]["exp_avg"].to_local().device.type == "cpu" for p in ours.parameters())
    dist.barrier()
    return out


@pytest.mark.gpu
def test_cpu_offload_policy_on_cuda_matches_torch(out_dir):
    """FSDP2 with the default CPUOffloadPolicy() (pinned memory needs an accelerator, so this runs on the GPU tier):
    forward and backward on CUDA, shards and grads on the host; FusedAdamW (backend "auto" takes the CPU path)
    steps the host shards: 20 steps match torch.optim.AdamW(fused=True) within 1e-6."""
    (res,) = spawn("tests.test_dtensor:run_offload_cuda", 1, out_dir, timeout=300)
    assert res["err"] < 1e-6, res
    assert res["pinned_on_cpu"] and res["states_on_cpu"], res


# ---------------------------------------------------------------------------------------------------------
# 4 ranks: FSDP2 + tensor parallel on a 2-D mesh; DCP checkpoints saved with 4 ranks and loaded with 2, ours and
# torch.optim.AdamW's both ways.


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))  # fmt: skip


def _fsdp(mesh, **kwargs):
    from torch.distributed.fsdp import fully_shard

    m = _mlp()
    for layer in (m[0], m[2], m[4]):
        fully_shard(layer, mesh=mesh, **kwargs)
    return fully_shard(m, mesh=mesh, **kwargs)


def _train(model, opt, steps, first=0):
    for k in range(first, first + steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(k))  # the same batch on every rank
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _full(model):
    return [p.full_tensor().clone() for p in model.parameters()]


def _max_err(ours, theirs) -> float:
    return max((a - b).abs().max().item() for a, b in zip(_full(ours), _full(theirs)))


def run_world4(rank: int, world: int, out_dir: str) -> dict:
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    out = {}
    # FSDP2 over dp + tensor parallel over tp, on a 2 x 2 mesh
    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    errs = {}
    for backend in BACKENDS:
        models = []
        for _ in range(2):
            m = _mlp()
            parallelize_module(m, mesh2d["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
            for layer in (m[0], m[2], m[4]):
                fully_shard(layer, mesh=mesh2d["dp"])
            models.append(fully_shard(m, mesh=mesh2d["dp"]))
        ours, theirs = models
        o = fused_ops.FusedAdamW(ours.parameters(), lr=1e-2, backend=backend)
        t = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
        _train(ours, o, 20)
        _train(theirs, t, 20)
        errs[backend] = max((a - b).abs().max().item() for a, b in zip(_full(ours), _full(theirs)))
        out["placements_2d"] = sorted({str(tuple(p.placements)) for p in ours.parameters()})
    out["err_2d"] = errs

    # FSDP2 only, on a 1-D mesh of 4 ranks (the bias of 3 leaves rank 3 an empty shard), against torch's fused AdamW
    mesh = init_device_mesh("cpu", (world,))
    out["err_fsdp"] = {}
    for backend in BACKENDS:
        ours, theirs = _fsdp(mesh), _fsdp(mesh)
        o = fused_ops.FusedAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
        t = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        _train(ours, o, STEPS)
        _train(theirs, t, STEPS)
        out["err_fsdp"][backend] = _max_err(ours, theirs)

    # DCP: save ours and torch's after 3 steps (4 ranks); record where 3 more steps lead
    for name, make in (("ours", lambda ps: fused_ops.FusedAdamW(ps, lr=1e-2)),
                       ("torch", lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False))):  # fmt: skip
        model = _fsdp(mesh)
        opt = make(model.parameters())
        _train(model, opt, 3)
        dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=os.path.join(out_dir, f"ckpt_{name}"))  # fmt: skip
        _train(model, opt, 3, first=3)
        full = _full(model)  # (collectives: on every rank)
        if rank == 0:
            torch.save(full, os.path.join(out_dir, f"after_{name}.pt"))
    dist.barrier()
    return out


def run_world2_load(rank: int, world: int, out_dir: str) -> dict:
    """Load the 4-rank checkpoints with 2 ranks: ours into FusedAdamW, torch's into FusedAdamW (and ours into torch's
    AdamW); every continuation must reach what the 4-rank run reached."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for saved, load_into in (("ours", "ours"), ("torch", "ours"), ("ours", "torch")):
        model = _fsdp(mesh)
        opt = (fused_ops.FusedAdamW(model.parameters(), lr=1e-2) if load_into == "ours"
               else torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False))  # fmt: skip
        if load_into == "ours":
            _train(model, opt, 1, first=100)  # (a step, so that loading must replace existing state)
        sd = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=os.path.join(out_dir, f"ckpt_{saved}"))
        model.load_state_dict(sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        _train(model, opt, 3, first=3)
        expected = torch.load(os.path.join(out_dir, f"after_{saved}.pt"))
        out[f"{saved}->{load_into}"] = max((a - b).abs().max().item() for a, b in zip(_full(model), expected))
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def world4_results(out_dir):
    return spawn("tests.test_dtensor:run_world4", 4, out_dir, timeout=500)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_with_tensor_parallel_2d_mesh_matches_torch(world4_results, backend):
    for rank, res in enumerate(world4_results):
        assert res["err_2d"][backend] < 1e-6, f"rank {rank}: {res['err_2d'][backend]}"
    assert any("Shard(dim=0), Shard(dim=1)" in p or "Shard(dim=1)" in p for p in world4_results[0]["placements_2d"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_only_4_ranks_matches_torch_fused(world4_results, backend):
    """FSDP2 alone on a 1-D mesh of 4 gloo ranks: 20 steps match torch.optim.AdamW(fused=True) within 1e-6 (fp32)."""
    for rank, res in enumerate(world4_results):
        assert res["err_fsdp"][backend] < 1e-6, f"rank {rank}: {res['err_fsdp'][backend]}"


def test_dcp_checkpoint_saved_with_4_ranks_loads_with_2(world4_results, out_dir):
    results = spawn("tests.test_dtensor:run_world2_load", 2, out_dir, timeout=400)
    for rank, res in enumerate(results):
        for case, err in res.items():
            assert err < 1e-6, f"rank {rank}, {case}: {err}"


# ---------------------------------------------------------------------------------------------------------
# master weights on bf16 DTensor shards; host memory over 1,000 steps


def run_master_and_memory(rank: int, world: int, out_dir: str) -> dict:
    import gc
    import tracemalloc

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    # bf16 params with fp32 masters: the masters follow torch's fp32 AdamW driven by the same (bf16) grads, and the
    # params are the masters rounded to nearest even.
    for backend in BACKENDS:
        ours = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _dtensor_params(mesh, 0)]
        ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
        o = fused_ops.FusedAdamW(ours, lr=1e-2, master_weights=True, backend=backend)
        t = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
        for k in range(10):
            g = torch.Generator().manual_seed(500 + k)
            for a, b in zip(ours, ref):
                full = torch.randn(a.shape, generator=g).to(torch.bfloat16)
                a.grad = distribute_tensor(full, mesh, a.placements)
                b.grad = distribute_tensor(full.float(), mesh, b.placements)
            o.step()
            t.step()
        master_err = max((o.state[a]["master_param"].full_tensor() - b.full_tensor()).abs().max().item()
                         for a, b in zip(ours, ref))  # fmt: skip
        rounded = all(torch.equal(a.full_tensor(), o.state[a]["master_param"].full_tensor().to(torch.bfloat16))
                      for a in ours)  # fmt: skip
        out[backend] = dict(master_err=master_err, rounded=rounded)
    # host memory: no Python allocation left behind per step (pytorch #188174 leaked DTensor specs per param)
    ps = _dtensor_params(mesh, 1)
    o = fused_ops.FusedAdamW(ps, lr=1e-3, backend="reference")
    grads = [distribute_tensor(torch.randn(p.shape), mesh, p.placements) for p in ps]

    def steps(n):
        for _ in range(n):
            for p, g in zip(ps, grads):
                p.grad = g
            o.step()

    steps(50)
    gc.collect()
    tracemalloc.start()
    steps(100)
    gc.collect()
    first = tracemalloc.get_traced_memory()[0]
    steps(1000)
    gc.collect()
    out["growth_bytes"] = tracemalloc.get_traced_memory()[0] - first
    tracemalloc.stop()
    dist.barrier()
    return out


def test_master_weights_on_bf16_dtensor_shards_and_no_host_memory_growth(out_dir):
    """Rule for master weights: the fp32 masters match torch's fp32 AdamW driven by the same bf16 grads (1e-6), and
    every bf16 param is exactly its master rounded to nearest even."""
    results = spawn("tests.test_dtensor:run_master_and_memory", 2, out_dir, timeout=400)
    for rank, res in enumerate(results):
        for backend in BACKENDS:
            assert res[backend]["master_err"] < 1e-6, (rank, backend, res[backend])
            assert res[backend]["rounded"], (rank, backend)
        assert res["growth_bytes"] < 64 * 1024, f"rank {rank}: {res['growth_bytes']} bytes more after 1,000 steps"


def test_bench_dtensor_runs(tmp_path):
    """``python -m fused_ops bench --dtensor`` (tiny): every provider timed, the ratios written."""
    import json
    import subprocess
    import sys

    out = tmp_path / "d.json"
    proc = subprocess.run([sys.executable, "-m", "fused_ops", "bench", "--dtensor", "--dtensor-params", "20",
                           "--steps", "2", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    case = json.loads(out.read_text())["cases"][0]
    for name in ("fused_ops", "fused_ops host only", "torch-fused", "torch-foreach"):
        assert case[name]["median_ms"] > 0 and case[name]["first_step_s"] > 0, name
        assert len(case[name]["times_ms"]) == 2, name
    assert case["n_params"] == 20 and case["param_groups"] == 1 and case["build"]["fully_shard_s"] > 0
    assert case["fused_ops / torch-fused"] > 0 and "fused_ops" in proc.stdout
