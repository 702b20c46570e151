"""DTensor params in FusedAdam/FusedAdamW (tensor-parallel placements, FSDP2), on 2 gloo ranks, both backends.

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
    from torch.distributed.tensor import DTensor, Partial, Replicate

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
        # a grad with other placements, and a Partial grad: the same clear error on every rank, nothing changed
        before = [p.to_local().clone() for p in ours]
        errors = []
        for bad in (Replicate(), Partial()):
            ours[0].grad = DTensor.from_local(torch.zeros_like(ours[0].to_local()), mesh, [bad], run_check=False,
                                              shape=ours[0].shape, stride=ours[0].stride())  # fmt: skip
            try:
                o.step()
                errors.append("no error")
            except ValueError as e:
                errors.append(str(e))
        unchanged = all(torch.equal(a.to_local(), b) for a, b in zip(ours, before))
        out[backend] = dict(err=err, placements_ok=placements_ok, resume_exact=resume_exact, dcp_exact=dcp_exact,
                            errors=errors, unchanged=unchanged)  # fmt: skip
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
def test_dtensor_state_dict_round_trips(tp_results, backend):
    for rank, res in enumerate(tp_results):
        assert res[backend]["resume_exact"], f"rank {rank}: load_state_dict(state_dict()) did not resume exactly"
        assert res[backend]["dcp_exact"], f"rank {rank}: get/set_optimizer_state_dict did not resume exactly"


@pytest.mark.safety
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_grad_of_other_placements_refused_on_every_rank(tp_results, backend):
    for rank, res in enumerate(tp_results):
        r = res[backend]
        assert len(r["errors"]) == 2 and all("placements" in e and "param 0" in e for e in r["errors"]), r["errors"]
        assert r["unchanged"], f"rank {rank}: a refused step changed a param"
    assert tp_results[0][backend]["errors"] == tp_results[1][backend]["errors"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_matches_torch(out_dir, backend):
    results = _fsdp2_results(out_dir)
    for rank, res in enumerate(results):
        assert res[backend]["err"] < 1e-6, f"rank {rank}: {res[backend]['err']}"


_FSDP2: dict = {}


def _fsdp2_results(out_dir):
    if "r" not in _FSDP2:
        _FSDP2["r"] = spawn("tests.test_dtensor:run_fsdp2", 2, out_dir, timeout=400)
    return _FSDP2["r"]
