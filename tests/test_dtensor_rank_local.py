"""Faults in ONE rank's local shards of DTensor grads (storage freed or shrunk in place, two grads sharing memory, a
shard that is empty on one rank), on 2 gloo CPU ranks, both backends.

Where the op communicates, every rank must raise (no rank left waiting in a collective, no rank stepping alone) and
nothing may change: a Partial grad that FusedAdamW redistributes; DynamicLossScaler's refusal of a second unscale_
when a shard is empty on one rank; clip_grad_norm_ / grad_norm / unscale_ with a check that fails on one rank. The
process group's timeout is short, so a rank left in a collective fails the test instead of blocking it.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.test_distributed import one_rank_group, spawn  # noqa: F401 - a fixture

pytestmark = pytest.mark.distributed

BACKENDS = ("triton", "reference")
PG_TIMEOUT_S = 15


def _outcome(call, *args, **kwargs) -> tuple[str, str, float]:
    t0 = time.monotonic()
    try:
        call(*args, **kwargs)
    except Exception as e:  # (a collective left waiting raises after the process group's timeout: seen as slow)
        return type(e).__name__, str(e), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


def run_optimizer(rank: int, world: int, out_dir: str) -> dict:
    """FusedAdamW: a Replicate param's Partial grad (redistributed by the step) freed or shrunk on rank 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    import fused_ops

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for backend in BACKENDS:
        for fault in ("freed", "shrunk"):
            p = torch.nn.Parameter(distribute_tensor(torch.ones(64), mesh, [Replicate()]))
            q = torch.nn.Parameter(distribute_tensor(torch.ones(8), mesh, [Replicate()]))
            opt = fused_ops.FusedAdamW([q, p], lr=0.1, backend=backend)
            p.grad = DTensor.from_local(torch.full((64,), 0.5), mesh, [Partial()], run_check=False)
            q.grad = distribute_tensor(torch.full((8,), 0.25), mesh, [Replicate()])
            opt.step()
            p.grad = DTensor.from_local(torch.full((64,), 0.5), mesh, [Partial()], run_check=False)
            if rank == 1:
                p.grad._local_tensor.untyped_storage().resize_(0 if fault == "freed" else 16)
            before = [p.to_local().clone(), q.to_local().clone()]
            kind, msg, dt = _outcome(opt.step)
            unchanged = torch.equal(before[0], p.to_local()) and torch.equal(before[1], q.to_local())
            out[(backend, fault)] = (kind, msg, dt, unchanged)
    return out


def run_scaler(rank: int, world: int, out_dir: str) -> dict:
    """DynamicLossScaler: a second unscale_ / grad_scale_and_norm before update() of a grad whose shard is empty on
    rank 1 ((1, 4) rows over 2 ranks, as FSDP2 shards a small param)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fused_ops.precision import DynamicLossScaler

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for backend in BACKENDS:
        for second in ("unscale_", "grad_scale_and_norm"):
            g = distribute_tensor(torch.randn(1, 4, generator=torch.Generator().manual_seed(0)), mesh, [Shard(0)])
            h = distribute_tensor(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), mesh, [Shard(0)])
            s = DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
            first = _outcome(s.unscale_, [g])
            before = [g.to_local().clone(), h.to_local().clone(), s.found_inf.clone()]
            kind, msg, dt = _outcome(getattr(s, second), [h, g])
            unchanged = all(torch.equal(a, b) for a, b in zip(before, [g.to_local(), h.to_local(), s.found_inf]))
            out[(backend, second)] = (first[0], kind, msg, dt, unchanged)
    return out


def run_functional(rank: int, world: int, out_dir: str) -> dict:
    """clip_grad_norm_ / grad_norm / unscale_ / DynamicLossScaler.unscale_ and grad_scale_and_norm with a check that
    fails on rank 1 only: a grad's shard freed, or sharing another's memory, or a method set on rank 1's object (the
    shard, the DTensor, the found_inf flag: refused as code of its own, see kernels/_checks.py: no_user_code)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import fused_ops
    from fused_ops.precision import DynamicLossScaler

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for backend in BACKENDS:
        for case in ("clip", "clip_partial", "grad_norm", "grad_norm_partial", "unscale", "scaler", "scaler_norm"):
            for fault in ("freed", "alias", "shard_method", "dtensor_method", "found_inf_method"):
                if case.startswith(("grad_norm", "scaler_norm")) and fault == "alias":  # (read only: may share)
                    continue
                if fault == "found_inf_method" and case != "unscale":
                    continue
                gen = torch.Generator().manual_seed(0)
                ps = [torch.nn.Parameter(distribute_tensor(torch.randn(4, 3, generator=gen), mesh, [Shard(0)]))
                      for _ in range(2)]  # fmt: skip
                for p in ps:
                    p.grad = distribute_tensor(torch.randn(4, 3, generator=gen), mesh, [Shard(0)])
                if case.endswith("partial"):  # (a Partial grad, reduced before the norm: agreed before that)
                    r = torch.nn.Parameter(distribute_tensor(torch.zeros(5), mesh, [Replicate()]))
                    r.grad = DTensor.from_local(torch.full((5,), 1.0 + rank), mesh, [Partial()], run_check=False)
                    ps.append(r)
                found = torch.zeros(1)
                if rank == 1:
                    if fault == "freed":
                        ps[1].grad._local_tensor.untyped_storage().resize_(0)
                    elif fault.endswith("method"):  # (harmless methods: refused all the same, and agreed)
                        obj = {"shard": ps[1].grad._local_tensor, "dtensor": ps[1].grad, "found": found}[
                            fault.split("_")[0]]  # fmt: skip
                        obj.numel = lambda obj=obj: torch.Tensor.numel(obj)
                    else:  # (grad 1's shard is grad 0's memory, on rank 1 only)
                        ps[1].grad = DTensor.from_local(ps[0].grad._local_tensor, mesh, [Shard(0)], run_check=False,
                                                        shape=ps[1].shape, stride=ps[1].stride())  # fmt: skip
                grads = [p.grad for p in ps]
                before = [t._local_tensor.clone() for t in [*ps, *grads] if t._local_tensor.untyped_storage().nbytes()]
                if case.startswith("clip"):
                    kind, msg, dt = _outcome(fused_ops.clip_grad_norm_, ps, 0.1, backend=backend)
                elif case.startswith("grad_norm"):
                    kind, msg, dt = _outcome(fused_ops.grad_norm, grads, backend=backend)
                elif case == "unscale":
                    kind, msg, dt = _outcome(fused_ops.unscale_, grads, 0.5, found, backend=backend)
                else:
                    scaler = DynamicLossScaler(init_scale=2.0, device="cpu", backend=backend)
                    found = scaler.found_inf
                    call = scaler.unscale_ if case == "scaler" else scaler.grad_scale_and_norm
                    kind, msg, dt = _outcome(call, grads)
                after = [t._local_tensor for t in [*ps, *grads] if t._local_tensor.untyped_storage().nbytes()]
                unchanged = all(torch.equal(a, b) for a, b in zip(before, after)) and found.item() == 0
                out[(backend, case, fault)] = (kind, msg, dt, unchanged)
    return out


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dtensor_rank_local"))


def _spawn(task: str, out_dir: str) -> list[dict]:
    return spawn(f"tests.test_dtensor_rank_local:{task}", 2, out_dir, timeout=240, pg_timeout_s=PG_TIMEOUT_S)


def test_optimizer_partial_grad_bad_on_one_rank(out_dir):
    """The Partial grad's storage is checked and the outcome agreed before it is all-reduced: both ranks raise the
    same ValueError naming the param, no param changes (before: gloo read freed memory, a segfault or a hang)."""
    r0, r1 = _spawn("run_optimizer", out_dir)
    for key in r0:
        (k0, m0, t0, u0), (k1, m1, t1, u1) = r0[key], r1[key]
        assert k0 == k1 == "ValueError", (key, r0[key], r1[key])
        assert m0 == m1 and "param 1 of param group 0" in m0 and "outside its storage" in m0, (key, m0)
        assert u0 and u1, key
        assert max(t0, t1) < PG_TIMEOUT_S * 0.9, (key, t0, t1)


def test_scaler_second_unscale_with_empty_shard(out_dir):
    """A grad whose shard is empty on rank 1 is remembered by identity: the second unscale_ / grad_scale_and_norm is
    refused on both ranks alike, nothing changed (before: rank 0 refused, rank 1 waited in the all-reduce)."""
    r0, r1 = _spawn("run_scaler", out_dir)
    for key in r0:
        for r in (r0[key], r1[key]):
            first, kind, msg, dt, unchanged = r
            assert first == "no error", (key, r)
            assert kind == "RuntimeError" and "already unscaled" in msg, (key, r)
            assert unchanged, key
            assert dt < PG_TIMEOUT_S * 0.9, (key, dt)


def test_functional_ops_check_failing_on_one_rank(out_dir):
    """Rank 1's check fails (freed shard, or two grads sharing memory there, or a method set on its object): it raises
    its own error, rank 0 a RuntimeError saying another rank refused, no rank waits, and nothing is written on either
    (before: rank 0 waited in the all-reduce until the timeout; unscale_ wrote rank 0's grads first; a method was
    refused on entry, on rank 1 alone)."""
    r0, r1 = _spawn("run_functional", out_dir)
    assert len(r0) == 2 * 26, sorted(r0)
    for key in r0:
        (k0, m0, t0, u0), (k1, m1, t1, u1) = r0[key], r1[key]
        if key[2].endswith("method"):
            what = "found_inf" if key[2] == "found_inf_method" else "].grad" if key[1].startswith("clip") else "s[1]"
            assert k1 == "TypeError" and "runs Python code of its own" in m1 and what in m1, (key, r1[key])
        else:
            assert k1 == "ValueError" and ("outside its storage" in m1 or "share memory" in m1), (key, r1[key])
        assert k0 == "RuntimeError" and "another rank refused its input" in m0, (key, r0[key])
        assert u0 and u1, (key, u0, u1)
        assert max(t0, t1) < PG_TIMEOUT_S * 0.9, (key, t0, t1)


@pytest.mark.usefixtures("one_rank_group")
def test_one_rank_mesh_agrees_nothing():
    """On a mesh of one rank (one GPU) there is nobody to tell: a failing local check raises at once, no refusal
    collective and no device read of it (a host sync on a GPU). unscale_ with found_inf runs only the found_inf
    agreement; clip_grad_norm_ on a freed shard raises its own error, nothing written."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fused_ops

    mesh = init_device_mesh("cpu", (1,))
    grads = [
        distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)]),
        distribute_tensor(torch.randn(5), mesh, [Shard(0)]),
    ]
    calls, real = [], dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        found_inf = torch.zeros(1)
        fused_ops.unscale_(grads, 0.5, found_inf, backend="reference")
        assert len(calls) == 1  # (the found_inf agreement alone)
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        before = grads[0].to_local().clone()
        grads[1].to_local().untyped_storage().resize_(0)
        calls.clear()
        with pytest.raises(ValueError, match="outside its storage"):
            fused_ops.clip_grad_norm_(params, 1.0, backend="reference")
        assert torch.equal(grads[0].to_local(), before)
    finally:
        dist.all_reduce = real
