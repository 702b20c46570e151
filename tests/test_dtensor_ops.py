"""DTensor grads in the mixed-precision ops (grad_norm, clip_grad_norm_, unscale_, cast_, DynamicLossScaler), on gloo
CPU ranks, both backends.

Norms are compared with torch.nn.utils.get_total_norm / clip_grad_norm_ on the same DTensors (tensor-parallel
Shard(0)/Shard(1)/Replicate placements, FSDP2 grads, FSDP2 + TP on a 2 x 2 mesh); found_inf must agree on every rank
when only one rank holds an inf; cast_ runs on the shards; bad placements raise the same error on every rank and
change nothing. One spawn per world size runs every scenario and returns what it measured; the tests assert on it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import fused_ops
from tests.test_distributed import spawn

pytestmark = pytest.mark.distributed

BACKENDS = ("triton", "reference")
NORMS = (2.0, 1.0, math.inf)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not (torch.isfinite(a) and torch.isfinite(b)):
        return 0.0 if torch.equal(a.isnan(), b.isnan()) and (a.isnan() or a == b) else math.inf
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).item()


def _full(x) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def _error(call) -> str:
    try:
        call()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _tp_grads(mesh, seed: int) -> list:
    """DTensors of every 1-D placement: even and uneven Shard(0), Shard(1), Replicate, a shard empty on rank 1."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    spec = [((4, 6), Shard(0)), ((6, 4), Shard(1)), ((5,), Replicate()), ((5, 3), Shard(0)), ((1, 4), Shard(0))]
    return [distribute_tensor(torch.randn(shape, generator=g), mesh, [pl]) for shape, pl in spec]


def _params_with(grads) -> list:
    from torch.distributed.tensor import DTensor, Replicate

    ps = []
    for g in grads:
        if any(pl.is_partial() for pl in g.placements):  # (a Replicate param with a Partial grad, as SequenceParallel)
            p = torch.nn.Parameter(DTensor.from_local(torch.zeros(g.shape), g.device_mesh, [Replicate()]))
            p.grad = DTensor.from_local(g.to_local().clone(), g.device_mesh, g.placements, run_check=False,
                                        shape=g.shape, stride=g.stride())  # fmt: skip
        else:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
        ps.append(p)
    return ps


def _partial_grads(mesh, rank: int) -> list:
    """Partial(sum) and Partial(avg) grads (each rank's summand differs: a SequenceParallel norm's weight grads) among
    Shard and Replicate ones."""
    from torch.distributed.tensor import DTensor, Partial

    g = torch.Generator().manual_seed(20 + rank)
    return [*_tp_grads(mesh, 3)[:3],
            DTensor.from_local(torch.randn(7, generator=g), mesh, [Partial()], run_check=False),
            DTensor.from_local(torch.randn(3, 2, generator=g), mesh, [Partial("avg")], run_check=False)]  # fmt: skip


def _torch_fails(grads, p: float) -> bool:
    """Whether torch's inf norm raises on some rank (it cannot take the inf norm of an empty local shard)."""
    empty = torch.tensor([float(any(g.to_local().numel() == 0 for g in grads))])
    dist.all_reduce(empty, dist.ReduceOp.MAX)
    return math.isinf(p) and empty.item() > 0


def _torch_norm(grads, p: float) -> torch.Tensor:
    """torch.nn.utils.get_total_norm of each mesh's grads (torch cannot stack norms of several meshes), combined as
    torch combines per-tensor norms; where torch cannot (:func:`_torch_fails`), the float64 norm of the full tensors."""
    if _torch_fails(grads, p):
        return torch.linalg.vector_norm(torch.cat([_full(g).double().flatten() for g in grads]), p).float()
    meshes: dict = {}
    for g in grads:
        meshes.setdefault(g.device_mesh, []).append(g)
    norms = [_full(torch.nn.utils.get_total_norm(gs, p)) for gs in meshes.values()]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), p)


def _torch_clip(params, max_norm: float, p: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ where torch can (one mesh, :func:`_torch_fails`), else torch's rule (the norm
    of :func:`_torch_norm`) on the local shards."""
    grads = [q.grad for q in params]
    if not _torch_fails(grads, p) and len({g.device_mesh for g in grads}) == 1:
        return _full(torch.nn.utils.clip_grad_norm_(params, max_norm, p))
    total = _torch_norm(grads, p)
    for g in grads:
        g.to_local().mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def _norm_checks(grads, params_fn, backend: str, norms=NORMS) -> dict:
    """grad_norm and clip_grad_norm_ against torch's on the same DTensors, for each norm type: relative errors of the
    norms, max abs error of the clipped local shards, and the norms' bits (to compare across ranks)."""
    out = {}
    for p in norms:
        theirs = _torch_norm(grads, p)
        ours = fused_ops.grad_norm(grads, p, backend=backend)
        a, b = params_fn(), params_fn()
        max_norm = 0.5 * theirs.item()  # (clips: the coefficient is below 1)
        t_total = _torch_clip(a, max_norm, p)
        o_total = fused_ops.clip_grad_norm_(b, max_norm, p, backend=backend)
        out[p] = dict(
            norm_err=_rel(ours, theirs), plain=type(ours) is torch.Tensor and ours.dim() == 0,
            clip_norm_err=_rel(o_total, t_total), clip_plain=type(o_total) is torch.Tensor,
            clip_err=max((x.grad.to_local() - y.grad.to_local()).abs().max().item() if x.grad.to_local().numel()
                         else 0.0 for x, y in zip(a, b)),
            bits=[ours.item(), o_total.item()],
        )  # fmt: skip
    return out


def _fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    for layer in (m[0], m[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)


def _error_cases(mesh, mesh_b, backend: str) -> dict:
    """Each bad call's message (the same on every rank expected) and whether every tensor was left as it was."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    good = _tp_grads(mesh, 2)
    partial = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
    ints = distribute_tensor(torch.ones(3, dtype=torch.int64), mesh, [Replicate()])
    before = [t.to_local().clone() for t in good] + [partial.to_local().clone()]
    found = torch.zeros(1)
    bf = [distribute_tensor(torch.zeros(t.shape, dtype=torch.bfloat16), mesh, t.placements) for t in good]
    bf_rep = DTensor.from_local(torch.zeros(3, dtype=torch.bfloat16), mesh, [Replicate()])
    e = {
        "grad_norm": _error(lambda: fused_ops.grad_norm([good[0], ints], backend=backend)),
        "unscale": _error(lambda: fused_ops.unscale_([*good, partial, ints], 0.5, found, backend=backend)),
        "unscale_partial_out": _error(lambda: fused_ops.unscale_([partial], 0.5, found, out=[bf_rep],
                                                                 backend=backend)),
        "cast_partial": _error(lambda: fused_ops.cast_([bf_rep], [partial], backend=backend)),
        "unscale_out": _error(lambda: fused_ops.unscale_(good[:2], 0.5, found, out=[good[0].clone(),
                              distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)])], backend=backend)),
        "cast_placements": _error(lambda: fused_ops.cast_(
            bf[:2], [good[0], distribute_tensor(good[1].full_tensor(), mesh, [Replicate()])], backend=backend)),
        "cast_mesh": _error(lambda: fused_ops.cast_(
            [bf[3]], [distribute_tensor(good[3].full_tensor(), mesh_b, [Replicate(), Shard(0)])],
            backend=backend)),
        "cast_plain": _error(lambda: fused_ops.cast_([bf[0]], [good[0].to_local()], backend=backend)),
        "cast_shape": _error(lambda: fused_ops.cast_(
            [bf[3]], [distribute_tensor(torch.zeros(6, 3), mesh, [Shard(0)])], backend=backend)),
        "cast_stochastic": _error(lambda: fused_ops.cast_(bf, good, stochastic=True, backend=backend)),
        "scaler": _error(lambda: fused_ops.DynamicLossScaler(device="cpu", backend=backend).grad_scale_and_norm(
            [partial, ints])),
    }  # fmt: skip
    after = [t.to_local() for t in good] + [partial.to_local()]
    e["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after)) and found.item() == 0
    e["cast_untouched"] = all(not t.to_local().any() for t in bf)
    return e


def run_world2(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    # -- norms: tensor parallel placements, FSDP2 grads ----------------------------------------------------------
    tp = _tp_grads(mesh, 0)
    model = _fsdp_model(mesh)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1 + rank))  # (FSDP2: a different batch per rank)
    model(x).square().mean().backward()
    fsdp_grads = [p.grad.detach().clone() for p in model.parameters()]
    partial = _partial_grads(mesh, rank)
    for backend in BACKENDS:
        out[("tp", backend)] = _norm_checks(tp, lambda: _params_with(tp), backend)
        out[("fsdp2", backend)] = _norm_checks(fsdp_grads, lambda: _params_with(fsdp_grads), backend)
        out[("partial", backend)] = _norm_checks(partial, lambda: _params_with(partial), backend)
        clipped = _params_with(partial)
        fused_ops.clip_grad_norm_(clipped, 1e-3, backend=backend)
        out[("partial_kept", backend)] = [str(q.grad.placements) for q in clipped[3:]]
    out["fsdp2_placements"] = sorted({str(g.placements) for g in fsdp_grads})

    # -- mixed: a DTensor on the 1-D mesh, a plain tensor (different on each rank), a DTensor on a 1 x 2 mesh -------
    mesh_b = DeviceMesh("cpu", [list(range(world))], mesh_dim_names=("r", "s"))
    plain = torch.randn(7, generator=torch.Generator().manual_seed(10 + rank))
    on_b = distribute_tensor(torch.randn(6, 3, generator=torch.Generator().manual_seed(3)), mesh_b,
                             [Replicate(), Shard(0)])  # fmt: skip
    mixed = [tp[0], plain, on_b, tp[2]]
    for backend in BACKENDS:
        for p in NORMS:
            expect = torch.linalg.vector_norm(torch.cat([_full(t).double().flatten() for t in mixed]), p)
            out[("mixed", backend, p)] = _rel(fused_ops.grad_norm(mixed, p, backend=backend), expect)

    # -- found_inf agrees on every rank when only one rank holds an inf ------------------------------------------
    for backend in BACKENDS:
        res = {}
        for holder in range(world):
            g = [distribute_tensor(torch.randn(6, 2, generator=torch.Generator().manual_seed(5)), mesh, [Shard(0)]),
                 distribute_tensor(torch.randn(3), mesh, [Replicate()])]  # fmt: skip
            if rank == holder:
                g[0].to_local()[0, 0] = math.inf
            found = torch.zeros(1)
            fused_ops.unscale_(g, 0.5, found, backend=backend)
            scaler = fused_ops.DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
            scaler.unscale_([t.clone() for t in g])
            s2 = fused_ops.DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
            s2.grad_scale_and_norm(g)
            # an inf in one rank's replica of a Replicate grad: the norm counts replicas from rank 0 only, so the
            # flag missed it on rank 1 (which alone then stepped on it; unscale_ caught it: probe 85)
            rep = [distribute_tensor(torch.ones(3), mesh, [Replicate()])]
            if rank == holder:
                rep[0].to_local()[1] = math.inf
            s5 = fused_ops.DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
            s5.grad_scale_and_norm(rep)
            # the same in grad_norm and clip_grad_norm_ over a sharded grad and such a replica: the norm is inf on
            # every rank and error_if_nonfinite raises on every rank (the norm was finite everywhere; probe 88)
            both = [distribute_tensor(torch.ones(6, 2), mesh, [Shard(0)]), rep[0]]
            norm_inf = math.isinf(fused_ops.grad_norm(both, backend=backend).item())
            params = [torch.nn.Parameter(torch.zeros_like(t)) for t in both]
            for q, t in zip(params, both):
                q.grad = t.clone()
            try:
                fused_ops.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, backend=backend)
                clip_raised = False
            except RuntimeError:
                clip_raised = True
            res[holder] = [found.item(), scaler.found_inf.item(), s2.found_inf.item(), s5.found_inf.item(),
                           norm_inf, clip_raised]  # fmt: skip
        finite = [distribute_tensor(torch.randn(6, 2, generator=torch.Generator().manual_seed(6)), mesh, [Shard(0)])]
        found = torch.zeros(1)
        fused_ops.unscale_(finite, 0.5, found, backend=backend)
        res["finite"] = found.item()
        # a flag already set on one rank only (say by an unscale_ of plain grads) is agreed by grad_scale_and_norm
        s3 = fused_ops.DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
        if rank == 1:
            s3.found_inf.fill_(1.0)
        scale, norm = s3.grad_scale_and_norm(finite, max_norm=1.0)
        res["prior_flag"] = s3.found_inf.item()
        res["scaler_norm_err"] = _rel(norm, torch.linalg.vector_norm(finite[0].full_tensor().double()) / 4.0)
        # unscale_ with out= (fp32 DTensor copies of bf16 DTensor grads)
        bf = distribute_tensor(torch.randn(6, 2, generator=torch.Generator().manual_seed(7)), mesh, [Shard(0)])
        bf16 = bf.to(torch.bfloat16)
        o = distribute_tensor(torch.zeros(6, 2), mesh, [Shard(0)])
        fused_ops.unscale_([bf16], 0.25, None, out=[o], backend=backend)
        res["out_exact"] = torch.equal(o.to_local(), bf16.to_local().float() * 0.25)
        # Partial grads: each rank's summand unscaled (torch's GradScaler on DTensors); an inf summand on one rank
        # sets the flag on every rank; the scaler's norm is the reduced grads'
        pg = _partial_grads(mesh, rank)
        summands = [t.to_local().clone() for t in pg]
        if rank == 1:
            pg[4].to_local()[0, 1] = math.inf
        found = torch.zeros(1)
        fused_ops.unscale_(pg[:4], 0.5, found, backend=backend)
        res["partial_unscaled"] = all(torch.equal(t.to_local(), s * 0.5) for t, s in zip(pg[:4], summands[:4]))
        res["partial_finite"] = found.item()
        fused_ops.unscale_(pg[4:], 0.5, found, backend=backend)
        res["partial_inf"] = found.item()
        s4 = fused_ops.DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
        _, norm = s4.grad_scale_and_norm(pg[:4])
        res["partial_scaler_norm_err"] = _rel(
            norm, torch.linalg.vector_norm(torch.cat([t.full_tensor().double().flatten() for t in pg[:4]])) / 4.0
        )
        out[("found_inf", backend)] = res

    # -- cast_ on shards -----------------------------------------------------------------------------------------
    for backend in BACKENDS:
        src = _tp_grads(mesh, 1)
        dst = [distribute_tensor(torch.zeros(s.shape, dtype=torch.bfloat16), mesh, s.placements) for s in src]
        fused_ops.cast_(dst, src, backend=backend)
        exact = all(torch.equal(d.to_local(), s.to_local().to(torch.bfloat16)) for d, s in zip(dst, src))
        fused_ops.cast_(dst, src, stochastic=True, seed=123, backend=backend)
        near = all((d.to_local().float() - s.to_local()).abs().max().item() <= 2 ** -7 * s.to_local().abs().max()
                   for d, s in zip(dst, src) if s.to_local().numel())  # fmt: skip
        # the replicated tensor (index 2) rounds alike on every rank; shards of one tensor draw independent bits
        out[("cast", backend)] = dict(exact=exact, near=near, replicated=dst[2].to_local().float().tolist())

    # -- a shard layout only some ranks have: a (3, 4) Shard(0) grad made through a transpose is a non-contiguous
    # (2, 4) shard on rank 0 and a contiguous (1, 4) one on rank 1. Rank 0 refused it while rank 1 unscaled and
    # waited in the found_inf all-reduce (a hang); written through a contiguous copy now, as torch's unscale takes it
    from torch.distributed.tensor import DTensor

    def transposed_grad(seed):
        full_t = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
        local = full_t[:, :2].contiguous().t() if rank == 0 else full_t[:, 2:].contiguous().t()
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size([3, 4]), stride=(4, 1))

    for backend in BACKENDS:
        res = {}
        g = transposed_grad(20)
        expected = g.to_local() * 0.5
        if rank == 1:
            g.to_local()[0, 0] = math.inf
            expected[0, 0] = math.inf
        found = torch.zeros(1)
        fused_ops.unscale_([g], 0.5, found, backend=backend)
        res["unscale"] = (torch.equal(g.to_local(), expected), g.to_local().stride(), found.item())
        scaler = fused_ops.DynamicLossScaler(init_scale=2.0, device="cpu", backend=backend)
        g2 = transposed_grad(21)
        expected2 = g2.to_local() * 0.5
        scaler.unscale_([g2])
        res["scaler"] = (torch.equal(g2.to_local(), expected2), scaler.found_inf.item())
        src = transposed_grad(22).to_local().contiguous()
        dst = DTensor.from_local(torch.zeros(4, src.shape[0], dtype=torch.bfloat16).t()[: src.shape[0]], mesh,
                                 [Shard(0)], run_check=False, shape=torch.Size([3, 4]), stride=(4, 1))  # fmt: skip
        srcd = DTensor.from_local(src, mesh, [Shard(0)], run_check=False, shape=torch.Size([3, 4]), stride=(4, 1))
        fused_ops.cast_([dst], [srcd], backend=backend)
        res["cast"] = torch.equal(dst.to_local(), src.to(torch.bfloat16))
        out[("rank_local_layout", backend)] = res

    # -- errors: the same on every rank, nothing changed ---------------------------------------------------------
    errors = {backend: _error_cases(mesh, mesh_b, backend) for backend in BACKENDS}
    out["errors"] = errors
    t = torch.ones(1)
    dist.all_reduce(t)  # the process group still works: no rank is left inside a collective
    out["pg_alive"] = t.item() == world
    return out


def run_world4(rank: int, world: int, out_dir: str) -> dict:
    """A 2 x 2 (dp, tp) mesh: FSDP2 + tensor parallel grads, 2-D placements with replicated dims, found_inf."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = {}
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                            torch.nn.Linear(8, 3))  # fmt: skip
    parallelize_module(m, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for layer in (m[0], m[2], m[4]):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(m, mesh=mesh["dp"])
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1 + rank // 2))  # (one batch per dp rank)
    m(x).square().mean().backward()
    grads = [p.grad.detach().clone() for p in m.parameters()]
    out["placements"] = sorted({str(g.placements) for g in grads})
    g = torch.Generator().manual_seed(4)
    spec = [((4, 6), (Shard(0), Replicate())), ((6, 4), (Replicate(), Shard(1))), ((5, 3), (Shard(0), Shard(1))),
            ((3,), (Replicate(), Replicate())), ((4, 6), (Shard(1), Shard(0)))]  # fmt: skip
    placed = [distribute_tensor(torch.randn(shape, generator=g), mesh, list(pl)) for shape, pl in spec]
    for backend in BACKENDS:
        # (the interpreter is slow on 4 ranks and 2 cores: the Triton path runs one norm type here, every norm type
        # on 2 ranks; what the 2-D mesh adds, the reduction, does not depend on the backend)
        norms = NORMS if backend == "reference" else (2.0,)
        out[("fsdp_tp", backend)] = _norm_checks(grads, lambda: _params_with(grads), backend, norms)
        out[("placed", backend)] = {p: _rel(fused_ops.grad_norm(placed, p, backend=backend), _torch_norm(placed, p))
                                    for p in NORMS}  # fmt: skip
        flags = []
        for holder in (0, 3):
            t = [distribute_tensor(torch.randn(4, 4, generator=torch.Generator().manual_seed(8)), mesh,
                                   [Shard(0), Shard(1)])]  # fmt: skip
            if rank == holder:
                t[0].to_local()[0, 0] = math.nan
            found = torch.zeros(1)
            fused_ops.unscale_(t, 0.5, found, backend=backend)
            s = fused_ops.DynamicLossScaler(device="cpu", backend=backend)
            s.grad_scale_and_norm(t, norm_type=math.inf)
            flags.append([found.item(), s.found_inf.item()])
        out[("found_inf", backend)] = flags
        out[("submesh", backend)] = _submesh_checks(rank, world, backend)
    return out


def _submesh_checks(rank: int, world: int, backend: str) -> dict:
    """Grads on a mesh of ranks 0 and 1 only, next to grads on meshes of all ranks: grad_norm, clip_grad_norm_ and
    grad_scale_and_norm against the float64 norm of the full tensors, on every rank (ranks 2 and 3 hold no shard of
    the sub-mesh's grad but call the ops: they hold the others). Meshes on different ranks that no mesh (nor the
    default group) spans: the same error on every rank of theirs, nothing changed."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    sub, line = DeviceMesh("cpu", [0, 1]), init_device_mesh("cpu", (world,))
    grid = DeviceMesh("cpu", [[0, 1], [2, 3]])
    gen = torch.Generator().manual_seed(9)
    full = [torch.randn(5, 3, generator=gen), torch.randn(6, generator=gen), torch.randn(4, 2, generator=gen)]
    where = [(sub, [Shard(0)]), (line, [Shard(0)]), (grid, [Shard(0), Replicate()])]

    def grads():
        return [distribute_tensor(t.clone(), m, pl) for t, (m, pl) in zip(full, where)]

    out = {}
    for p in (2.0, math.inf):
        expect = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in full]), p)
        ours = fused_ops.grad_norm(grads(), p, backend=backend)
        params = _params_with(grads())
        before = [q.grad.to_local().clone() for q in params]
        max_norm = 0.5 * expect.item()
        total = fused_ops.clip_grad_norm_(params, max_norm, p, backend=backend)
        coef = min(1.0, max_norm / (expect.item() + 1e-6))
        clip_err = max(((q.grad.to_local().double() - b.double() * coef).abs().max().item() if b.numel() else 0.0)
                       for q, b in zip(params, before))  # fmt: skip
        scaler = fused_ops.DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
        if rank == 3:  # (a flag set on rank 3 only is agreed too)
            scaler.found_inf.fill_(1.0)
        _, s_norm = scaler.grad_scale_and_norm(grads(), norm_type=p)
        out[p] = dict(norm_err=_rel(ours, expect), clip_norm_err=_rel(total, expect), clip_err=clip_err,
                      scaler_norm_err=_rel(s_norm, expect / 4.0), scaler_flag=scaler.found_inf.item(),
                      bits=[ours.item(), total.item(), s_norm.item()])  # fmt: skip
    # a nan in the sub-mesh's grad (on rank 1): every rank's norm is nan and every rank's found_inf is set
    g = grads()
    if rank == 1:
        g[0].to_local()[0, 0] = math.nan
    scaler = fused_ops.DynamicLossScaler(device="cpu", backend=backend)
    _, s_norm = scaler.grad_scale_and_norm(g)
    found = torch.zeros(1)
    fused_ops.unscale_(g, 0.5, found, backend=backend)
    out["nan"] = [math.isnan(fused_ops.grad_norm(g, backend=backend).item()), math.isnan(s_norm.item()),
                  scaler.found_inf.item(), found.item()]  # fmt: skip
    # an inf in rank 1's replica of a grad replicated on the sub-mesh (nothing sharded there: not reduced over it),
    # next to a grad sharded over all: the norm is inf on every rank (only the sub-mesh's lowest rank's total was
    # taken, so the inf was dropped everywhere, rank 1 included; probe 89)
    rep = [distribute_tensor(torch.ones(3), sub, [Replicate()]), distribute_tensor(full[1].clone(), line, [Shard(0)])]
    if rank == 1:
        rep[0].to_local()[0] = math.inf
    out["replica_inf"] = math.isinf(fused_ops.grad_norm(rep, backend=backend).item())
    # meshes of ranks [0, 1] and [1, 2]: no mesh spans both, and not every rank is on one: refused
    sub12 = DeviceMesh("cpu", [1, 2])
    bad = [distribute_tensor(full[0].clone(), sub, [Shard(0)]), distribute_tensor(full[1].clone(), sub12, [Shard(0)])]
    params = _params_with(bad)
    before = [t.to_local().clone() for t in bad] + [q.grad.to_local().clone() for q in params]
    found = torch.zeros(1)
    out["refused"] = [
        _error(lambda: fused_ops.grad_norm(bad, backend=backend)),
        _error(lambda: fused_ops.clip_grad_norm_(params, 1e-3, backend=backend)),
        _error(lambda: fused_ops.DynamicLossScaler(device="cpu", backend=backend).grad_scale_and_norm(bad)),
        _error(lambda: fused_ops.unscale_(bad, 0.5, found, backend=backend)),
    ]
    after = [t.to_local() for t in bad] + [q.grad.to_local() for q in params]
    out["refused_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after)) and found.item() == 0
    return out


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dtensor_ops"))


@pytest.fixture(scope="module")
def world2(out_dir):
    return spawn("tests.test_dtensor_ops:run_world2", 2, out_dir, timeout=300)


@pytest.fixture(scope="module")
def world4(out_dir):
    return spawn("tests.test_dtensor_ops:run_world4", 4, out_dir, timeout=300)


def _check_norms(res: dict, where: str) -> None:
    for p, r in res.items():
        assert r["plain"] and r["clip_plain"], f"{where}, p={p}: not a plain tensor"
        assert r["norm_err"] < 1e-6, f"{where}, p={p}: grad_norm off by {r['norm_err']}"
        assert r["clip_norm_err"] < 1e-6, f"{where}, p={p}: clip_grad_norm_'s norm off by {r['clip_norm_err']}"
        assert r["clip_err"] < 1e-6, f"{where}, p={p}: clipped grads off by {r['clip_err']}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["tp", "fsdp2", "partial"])
def test_global_norm_and_clip_match_torch(world2, case, backend):
    """``partial``: Partial(sum)/Partial(avg) grads (SequenceParallel) count as their reduced values, and keep their
    placements with their summands scaled, as torch's clip_grad_norm_ does."""
    for rank, res in enumerate(world2):
        _check_norms(res[(case, backend)], f"rank {rank}, {case}")
    for p in NORMS:  # the same norm, to the bit, on every rank
        assert world2[0][(case, backend)][p]["bits"] == world2[1][(case, backend)][p]["bits"]
    assert world2[0]["fsdp2_placements"] == ["(Shard(dim=0),)"]
    assert world2[0][("partial_kept", backend)] == ["(Partial(sum),)", "(Partial(avg),)"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_meshes_and_plain_tensors(world2, backend):
    for rank, res in enumerate(world2):
        for p in NORMS:
            assert res[("mixed", backend, p)] < 1e-6, (rank, p, res[("mixed", backend, p)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_agrees_on_every_rank(world2, backend):
    for rank, res in enumerate(world2):
        r = res[("found_inf", backend)]
        for holder in (0, 1):
            assert r[holder] == [1.0, 1.0, 1.0, 1.0, True, True], f"rank {rank}, inf on rank {holder}: {r[holder]}"
        assert r["finite"] == 0.0
        assert r["prior_flag"] == 1.0, f"rank {rank}: a flag set on rank 1 only was not agreed"
        assert r["scaler_norm_err"] < 1e-6
        assert r["out_exact"]
        assert r["partial_unscaled"] and r["partial_finite"] == 0.0 and r["partial_inf"] == 1.0, r
        assert r["partial_scaler_norm_err"] < 1e-6, r


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_layout_of_one_rank_only(world2, backend):
    """A non-contiguous local shard on rank 0 only: unscale_ (also through DynamicLossScaler) and cast_ work on
    every rank as torch's unscale and copy_ do; before, rank 0 raised and rank 1 hung in the found_inf all-reduce."""
    for rank, res in enumerate(world2):
        r = res[("rank_local_layout", backend)]
        assert r["unscale"][0] and r["unscale"][2] == 1.0, (rank, r)  # (the inf on rank 1 agreed on rank 0 too)
        assert r["scaler"] == (True, 0.0) and r["cast"], (rank, r)
    assert world2[0][("rank_local_layout", backend)]["unscale"][1] == (1, 2)  # (written in place: layout kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cast_on_shards(world2, backend):
    for rank, res in enumerate(world2):
        r = res[("cast", backend)]
        assert r["exact"] and r["near"], (rank, r)
    assert world2[0][("cast", backend)]["replicated"] == world2[1][("cast", backend)]["replicated"]


@pytest.mark.safety
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_placements_raise_the_same_error_on_every_rank(world2, backend):
    e0, e1 = world2[0]["errors"][backend], world2[1]["errors"][backend]
    assert e0 == e1
    assert e0["unchanged"] and e0["cast_untouched"]
    assert e0["grad_norm"].startswith("TypeError: grad_norm: tensors[1] must be a floating-point tensor")
    assert e0["unscale"].startswith("TypeError: unscale_: grads[6] must be a floating-point tensor")
    assert e0["unscale_partial_out"].startswith("ValueError: unscale_: out[0] is a DTensor with placements "
                                                "(Replicate(),)")  # fmt: skip
    assert e0["cast_partial"].startswith("ValueError: cast_: src[0] is a DTensor with placements (Partial(sum),)")
    assert "must be reduced first" in e0["cast_partial"]
    assert e0["unscale_out"].startswith("ValueError: unscale_: out[1] is a DTensor with placements (Shard(dim=0),)")
    assert e0["cast_placements"].startswith("ValueError: cast_: src[1] is a DTensor with placements (Replicate(),)")
    assert e0["cast_mesh"].startswith("ValueError: cast_: src[0] is a DTensor with placements (Replicate(), "
                                      "Shard(dim=0))")  # fmt: skip
    assert e0["cast_plain"].startswith("ValueError: cast_: src[0] is a plain tensor but dst[0] is a DTensor")
    assert e0["cast_shape"].startswith("ValueError: cast_: src[0] has shape (6, 3) but dst[0] has (5, 3)")
    assert e0["cast_stochastic"].startswith("ValueError: cast_: dst[2] is a DTensor with placements (Replicate(),)")
    assert e0["scaler"].startswith("TypeError: DynamicLossScaler.grad_scale_and_norm: grads[1] must be a "
                                   "floating-point tensor")  # fmt: skip
    assert all(r["pg_alive"] for r in world2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_2d_mesh_fsdp2_with_tensor_parallel(world4, backend):
    assert any("Shard(dim=0), Shard(dim=1)" in p or "_StridedShard" in p for p in world4[0]["placements"])
    for rank, res in enumerate(world4):
        _check_norms(res[("fsdp_tp", backend)], f"rank {rank}, fsdp2+tp")
        for p, err in res[("placed", backend)].items():
            assert err < 1e-6, (rank, p, err)
        assert res[("found_inf", backend)] == [[1.0, 1.0], [1.0, 1.0]], (rank, res[("found_inf", backend)])
    for p in world4[0][("fsdp_tp", backend)]:
        assert len({tuple(r[("fsdp_tp", backend)][p]["bits"]) for r in world4}) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_meshes_on_different_ranks(world4, backend):
    """A grad on a mesh of ranks 0 and 1 next to grads on meshes of all 4 ranks: the norm (grad_norm, clip_grad_norm_,
    grad_scale_and_norm) is the full tensors' on every rank, and every rank clips by it. Before, ranks 2 and 3 left
    the sub-mesh's part out, so the shards of one grad were scaled by different factors. Meshes that no process group
    spans ([0, 1] and [1, 2] of 4 ranks) raise the same error on every rank of theirs and change nothing."""
    for rank, res in enumerate(world4):
        r = res[("submesh", backend)]
        for p in (2.0, math.inf):
            assert r[p]["norm_err"] < 1e-6 and r[p]["clip_norm_err"] < 1e-6, (rank, p, r[p])
            assert r[p]["clip_err"] < 1e-6 and r[p]["scaler_norm_err"] < 1e-6, (rank, p, r[p])
            assert r[p]["scaler_flag"] == 1.0, (rank, p, r[p])
        assert r["nan"] == [True, True, 1.0, 1.0], (rank, r["nan"])
        assert r["replica_inf"], rank
        assert r["refused_unchanged"], rank
    for p in (2.0, math.inf):  # the same bits on every rank
        assert len({tuple(res[("submesh", backend)][p]["bits"]) for res in world4}) == 1
    refused = [res[("submesh", backend)]["refused"] for res in world4[:3]]
    assert refused[0] == refused[1] == refused[2], refused
    for msg, fn in zip(refused[0], ["grad_norm", "clip_grad_norm_", "DynamicLossScaler.grad_scale_and_norm",
                                    "unscale_"]):  # fmt: skip
        assert msg.startswith(f"ValueError: {fn}: the tensors' meshes are on different ranks ([0, 1], [1, 2])"), msg
