"""DTensor arguments of the mixed-precision ops (grad_norm, clip_grad_norm_, unscale_, cast_, DynamicLossScaler).

The ops run on the local shards (``_local_tensor``: no DTensor dispatch) with the plain-tensor code path; this
module unwraps them, refuses what the shards cannot stand for, and runs the collectives that turn local results
into global ones:

- a norm: each rank's partial (sum of p-th powers, or max for inf) per (mesh, sharded mesh dims), all-reduced once
  per mesh over the mesh dims where some tensor is sharded. A tensor replicated over a reduced dim contributes only
  from the ranks at coordinate 0 of that dim (zeros elsewhere, unless not finite: an inf or NaN in any replica
  makes the norm so on every rank of a reduction), so replicas are not counted twice. Where no tensor of a mesh is
  sharded, nothing is reduced over it: each rank's norm is its own, as torch's norm of a replicated DTensor is
  (replicas that disagree then give ranks different norms; ``DynamicLossScaler.grad_scale_and_norm`` reduces over
  every mesh dim for its flag, so its ``found_inf`` is agreed even there). A ``Partial``
  tensor (e.g. the grads of a ``SequenceParallel`` norm's weights) is reduced first, one all-reduce each, as
  torch's DTensor norm does.
- a linear op (unscale, the clip's multiply) on a ``Partial`` tensor scales each rank's summand, as torch's
  DTensor ops do.
- a ``found_inf`` flag: all-reduced (MAX) over every mesh the tensors live on, so every rank skips the same steps.
- meshes over different ranks (a mesh on some of the ranks only, next to one on all of them): what the ranks of one
  mesh reduced is added once more over every rank of all the meshes (:func:`span_plan`), so that the ranks outside
  it have it too; the flag is agreed in that reduction alone.

Every check here reads only what is the same on every rank (classes, meshes, placements, global shapes), and runs
before any collective: a bad argument raises the same error on every rank instead of leaving the others waiting in
a collective. No value is read on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ._exit import settle_at_exit
from .kernels._checks import overrides_refusal, stand_in

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover (torch without distributed)
    DTensor = Replicate = None


def has_dtensor(xs: Sequence) -> bool:
    return DTensor is not None and any(issubclass(cls, DTensor) for cls in {type(x) for x in xs})


def spec(x) -> tuple | None:
    """``(mesh, placements)`` of a DTensor, None for anything else."""
    return (x.device_mesh, tuple(x.placements)) if DTensor is not None and isinstance(x, DTensor) else None


def describe(s: tuple | None) -> str:
    return "a plain tensor" if s is None else f"a DTensor with placements {s[1]} on {s[0]}"


def is_partial(s: tuple | None) -> bool:
    """Whether :func:`spec` ``s`` has a ``Partial`` placement (unreduced: the shards are summands, not parts)."""
    return s is not None and any(p.is_partial() for p in s[1])


def unwrap(fn: str, xs: list, label: Callable[[int], str], partial: bool = False,
           refused: list | None = None) -> tuple[list, list | None]:  # fmt: skip
    """``xs`` with each DTensor replaced by its local shard, and each entry's :func:`spec` (None for a plain entry);
    ``(xs, None)`` when there is no DTensor. A ``Partial`` DTensor raises a ValueError naming ``label(i)``, unless
    ``partial`` (an op that is linear in each element, or that reduces it first: :func:`reduce_partials`).

    ``refused`` (a list; for an op whose ``no_user_code`` leaves ``xs`` to it: see ``kernels/_checks.py``): the
    entries (a DTensor, its local shard) are checked to run no Python code of their own when read, which may fail on
    one rank only; the error is appended to ``refused``, for the op to agree with the other ranks (or raise, where
    it does not communicate), and the entries are returned as stand-ins (plain tensors of their shapes, read by the
    op's checks until the agreement, where it raises)."""
    specs = [spec(x) for x in xs] if has_dtensor(xs) else None
    if specs is not None and not partial:
        for i, s in enumerate(specs):
            if is_partial(s):
                raise ValueError(f"{fn}: {label(i)} is {describe(s)}: a Partial DTensor must be reduced first "
                                 "(redistribute it to Shard or Replicate placements)")  # fmt: skip
    local = xs if specs is None else [x if s is None else x._local_tensor for x, s in zip(xs, specs)]
    if refused is not None:
        err = overrides_refusal(fn, xs, label)
        if err is not None:
            refused.append(err)
            local = [stand_in(x) if isinstance(x, Tensor) else x for x in local]
    return local, specs


def reduce_partials(xs: list, local: list, specs: list) -> tuple[list, list]:
    """For a norm: ``local`` and ``specs`` (from :func:`unwrap` of ``xs``) with each ``Partial`` DTensor of ``xs``
    replaced by its reduced value (its Partial mesh dims made ``Replicate``: one all-reduce each, as torch's DTensor
    norm redistributes it), shard and spec; the lists themselves when there is none. The caller has checked the
    shards (their storage: torch's ops read them unchecked). Every rank has the same specs, so the same
    collectives."""
    idx = [i for i, s in enumerate(specs) if is_partial(s)]
    if not idx:
        return local, specs
    local, specs = list(local), list(specs)
    with torch.no_grad():
        for i in idx:
            mesh, placements = specs[i]
            reduced = tuple(Replicate() if p.is_partial() else p for p in placements)
            local[i] = DTensor.redistribute(xs[i], mesh, reduced)._local_tensor  # (not a method set on xs[i])
            specs[i] = (mesh, reduced)
    return local, specs


def sharded_dims(placements: tuple) -> tuple[int, ...]:
    """The mesh dims over which a tensor's elements are split: every placement but Replicate (Shard, _StridedShard;
    a Partial one is reduced or refused before)."""
    return tuple(d for d, p in enumerate(placements) if not p.is_replicate())


def norm_key(s: tuple | None) -> tuple | None:
    """What a tensor's share of a norm is reduced by: None (a plain tensor: counted as it is on this rank), or
    ``(mesh, sharded mesh dims)``."""
    return None if s is None else (s[0], sharded_dims(s[1]))


def shard_index(key: tuple) -> int:
    """For a :func:`norm_key` ``(mesh, dims)``: 0 when no dim is sharded, else 1 + this rank's shard's index on the
    sharded mesh dims (the same on the ranks that hold the same shard)."""
    mesh, dims = key
    coord = mesh.get_coordinate()
    if not dims or coord is None:
        return 0
    index = 0
    for d in dims:
        index = index * mesh.size(d) + coord[d]
    return 1 + index


def _world_serves(device: torch.device) -> bool:
    try:
        return device.type in {d.type for d in dist.group.WORLD._device_types}
    except Exception:  # (a private property: fall back to the mesh's own groups)
        return False


def _groups(mesh, dims: list[int], device: torch.device) -> list:
    """The process groups to all-reduce over, in turn, to reduce over mesh dims ``dims``: one group per dim, or the
    default group once when ``dims`` are all of a mesh that spans every rank."""
    settle_at_exit()
    if len(dims) > 1 and len(dims) == mesh.ndim and mesh.size() == dist.get_world_size() and _world_serves(device):
        return [dist.group.WORLD]
    return [mesh.get_group(d) for d in dims]


def _root(mesh):
    """The mesh ``mesh`` was sliced from (``mesh`` itself when it was not)."""
    try:
        root = mesh._get_root_mesh()
    except AttributeError:  # (older torch)
        from torch.distributed.device_mesh import _mesh_resources

        root = _mesh_resources.get_root_mesh(mesh)
    return mesh if root is None else root


def _span(mesh) -> frozenset:
    """The ranks a mesh's tensors stand for: its own, or, for a slice (``mesh["tp"]``: each rank has the one it is
    on), its root mesh's. The same on every rank (read from the mesh's CPU tensor: no device sync)."""
    return frozenset(_root(mesh).mesh.flatten().tolist())


def span_plan(fn: str, meshes: list[tuple]) -> tuple | None:
    """How to combine the reductions of ``meshes`` (``(mesh, device)`` pairs, each mesh once, from
    :func:`meshes_of`): None when every mesh stands for the same ranks (each is reduced over its own groups, and
    every rank is on each); else ``(groups, device, ranks)``: all-reducing over ``groups`` in turn, on ``device``,
    reduces over ``ranks``, the union of the meshes' ranks, each of which calls the op. Those are the groups of a
    mesh over all of ``ranks``, or the default group when ``ranks`` are all ranks. Raises the same ValueError on
    every rank when there is none (a ``dist.new_group`` would need the ranks outside ``ranks`` to call it too)."""
    if len(meshes) < 2:
        return None
    spans = [_span(mesh) for mesh, _ in meshes]
    ranks = frozenset().union(*spans)
    if all(s == ranks for s in spans):
        return None
    if dist.get_rank() not in ranks:
        raise ValueError(f"{fn}: this rank ({dist.get_rank()}) is on none of the tensors' meshes")
    for (mesh, device), s in zip(meshes, spans):
        if s == ranks:
            root = _root(mesh)  # (this rank is on it: it is in ``ranks``)
            return _groups(root, list(range(root.ndim)), device), device, ranks
    if len(ranks) == dist.get_world_size():
        device = next((d for _, d in meshes if _world_serves(d)), None)
        if device is not None:
            return [dist.group.WORLD], device, ranks
    listed = ", ".join(str(sorted(s)) for s in dict.fromkeys(spans))
    raise ValueError(f"{fn}: the tensors' meshes are on different ranks ({listed}) and no mesh, nor the default "
                     f"group, is on all of them ({sorted(ranks)}): their norm and found_inf cannot be agreed on "
                     "every rank; put the tensors on meshes over the same ranks, or on a mesh over all")  # fmt: skip


def global_norm(
    local: list[tuple[tuple | None, Tensor]], norm_type: float, device: torch.device, out_dtype: torch.dtype,
    flag: Tensor | None = None, span: tuple | None = None, refused: bool | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """The norm of all tensors of all ranks from each rank's local norms, and, with ``flag`` (a 1-element tensor,
    non-zero meaning "found inf"), that flag agreed over the meshes (1.0 where any rank's was set; fp32 on ``device``;
    None when there is no mesh).

    ``local``: ``(norm_key, 0-d local norm)`` pairs, keys distinct. One all-reduce of a small float64 vector per mesh
    and reduced mesh dim (one per mesh when it spans every rank or only one dim needs reducing): SUM of p-th powers
    for a finite p, MAX for inf, plus a NaN count (a MAX reduction may drop a NaN) and the flag.

    ``span``: :func:`span_plan` of the meshes, when they are on different ranks. Then the total of each mesh that is
    not on all of those ranks, from one of its ranks (zeros from the others), and the flag go into one more
    all-reduce over all of them; the flag is agreed there alone, so every rank of every mesh has the same values.

    ``refused``: whether a check of this rank's local shards failed (its local norms are then zeros): one more slot
    of the same vectors, agreed as the flag is (over every dim of each mesh that communicates), returned third
    (non-zero where any rank refused; None when ``refused`` is None), for :func:`raise_refused`.
    """
    inf = math.isinf(norm_type)
    plain: list[Tensor] = []
    by_mesh: dict = {}
    for key, n in local:
        v = n.to(torch.float64)
        v = v if inf else v.pow(norm_type)
        if key is None:
            plain.append(v.to(device))
        else:
            by_mesh.setdefault(key[0], []).append((key[1], v))
    op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
    totals, nans = list(plain), [v.isnan() for v in plain]
    agreed = agreed_refused = None
    chain = flag if span is None else None  # (the flag chained through the meshes' reductions)
    own = None if refused is None else torch.tensor([1.0 if refused else 0.0], dtype=torch.float64)
    shared: list[Tensor] = []  # (with span) each mesh not on all its ranks: its total and NaN count, in mesh order
    for mesh, entries in by_mesh.items():
        alone = span is not None and _span(mesh) != span[2]
        coord = mesh.get_coordinate()
        if coord is None:  # this rank holds no shard of this mesh's tensors (and is in none of its groups)
            if alone:
                shared.append(torch.zeros(2, dtype=torch.float64, device=span[1]))
            continue
        mesh_device = entries[0][1].device
        dims = sorted({d for dd, _ in entries for d in dd}) if flag is None else list(range(mesh.ndim))
        # (a refusal travels where the mesh has other ranks to tell; on a mesh of one rank it stays a host value: no
        # device read, so no sync, on one GPU)
        slot = own is not None and mesh.size() > 1
        if dims and slot:  # (every rank of the mesh learns of a refusal: the same collectives)
            dims = list(range(mesh.ndim))
        # (a replica's local norm counts from coordinate 0 only, except when it is not finite: an inf or NaN in
        # another rank's replica, where replicas disagree, makes the norm non-finite on every rank, so that a clip
        # raises or a scaler skips the step everywhere, not only the rank that holds it; probes 85 and 88)
        vals = [v if all(coord[d] == 0 for d in dims if d not in dd) else torch.where(torch.isfinite(v), 0.0, v)
                for dd, v in entries]  # fmt: skip
        vec = torch.stack(vals)
        bad = vec.isnan()
        parts = [torch.where(bad, 0.0, vec), bad.sum().to(torch.float64).reshape(1)]
        if chain is not None:
            f = chain if agreed is None else agreed
            parts.append((f.detach().reshape(1) != 0).to(mesh_device, torch.float64))
        if slot:
            parts.append((own if agreed_refused is None else agreed_refused).to(mesh_device, torch.float64))
        vec = torch.cat(parts)
        for group in _groups(mesh, dims, mesh_device):
            dist.all_reduce(vec, op, group=group)
        k = len(entries)
        if alone:
            total_k = vec[:k].max() if inf else vec[:k].sum()
            if dist.get_rank() != min(_span(mesh)):  # (the mesh's total from its lowest rank only, but a non-finite
                # one and a NaN count from every rank: a replica's inf held there alone; probe 89)
                total_k = torch.where(torch.isfinite(total_k), 0.0, total_k)
            shared.append(torch.stack([total_k, vec[k]]).to(span[1]))
            continue
        vec = vec.to(device)
        totals.append(vec[:k].max() if inf else vec[:k].sum())
        nans.append(vec[k] > 0)
        if chain is not None:
            agreed = (vec[k + 1] > 0).to(torch.float32).reshape(1)
        if slot:
            agreed_refused = vec[-1].reshape(1)
    if span is not None:
        groups, span_device, _ = span
        parts = shared if flag is None else [*shared, (flag.detach().reshape(1) != 0).to(span_device, torch.float64)]
        if own is not None:
            mine = own if agreed_refused is None else torch.maximum(own, agreed_refused.cpu())
            parts = [*parts, mine.to(span_device)]
        vec = torch.cat(parts)
        for group in groups:
            dist.all_reduce(vec, op, group=group)
        vec = vec.to(device)
        m = 2 * len(shared)
        totals.append(vec[0:m:2].max() if inf else vec[0:m:2].sum())
        nans.append((vec[1:m:2] > 0).any())
        if flag is not None:
            agreed = (vec[m] > 0).to(torch.float32).reshape(1)
        if own is not None:
            agreed_refused = vec[-1].reshape(1)
    stacked = torch.stack(totals)
    total = stacked.max() if inf else stacked.sum().pow(1.0 / norm_type)
    total = torch.where(torch.stack(nans).any(), math.nan, total) if nans else total
    return total.to(out_dtype), agreed, (own if agreed_refused is None else agreed_refused)


def agree_flag(found_inf: Tensor, meshes: list[tuple], span: tuple | None = None) -> None:
    """Set ``found_inf`` (1 element, non-zero = found) to 1 on every rank of ``meshes`` (``(mesh, device)`` pairs,
    each mesh once) where any rank's is set: an all-reduce MAX, no host read. With ``span`` (:func:`span_plan` of
    ``meshes``, when they are on different ranks): one over all of their ranks. Else over each mesh in turn (one per
    mesh when it spans every rank or is 1-D): every rank is then on each mesh, and the result is global when one of
    them is on all the ranks, or they are slices that factor one another (``mesh["dp"]``, ``mesh["tp"]``)."""
    flag = None
    steps = [(span[1], span[0])] if span is not None else [
        (device, _groups(mesh, list(range(mesh.ndim)), device)) for mesh, device in meshes
        if mesh.get_coordinate() is not None
    ]  # fmt: skip
    for device, groups in steps:
        f = (found_inf.detach().reshape(1) != 0) if flag is None else flag
        f = f.to(device, torch.float32)
        for group in groups:
            dist.all_reduce(f, dist.ReduceOp.MAX, group=group)
        flag = f
    if flag is not None:
        flag = flag.to(found_inf.device, found_inf.dtype).reshape(found_inf.shape)
        found_inf.copy_(torch.where(found_inf != 0, found_inf, flag))


def local_error(specs: list | None, check: Callable[[], None]) -> BaseException | None:
    """Run ``check`` (a check of this rank's local shards, which may fail on some ranks only: freed storage, shared
    memory); with DTensors (``specs`` not None) return its error instead of raising it, for :func:`agree_refusal` or
    the norm's reduction (:func:`global_norm`'s ``refused``) to raise on every rank before anything is written. Without
    DTensors it raises."""
    if specs is None:
        check()
        return None
    try:
        check()
    except (ValueError, TypeError, RuntimeError) as e:
        return e
    return None


def raise_refused(fn: str, err: BaseException | None, refused: Tensor | None) -> None:
    """After the agreement: this rank's own error, else a RuntimeError when another rank refused its input
    (``refused``: the agreed flag, read on the host; None when nothing was agreed)."""
    if err is not None:
        raise err
    if refused is not None and bool(refused.reshape(-1)[0] != 0):
        raise RuntimeError(f"{fn}: another rank refused its input (a check of its local shards failed there, see its "
                           "error); nothing was changed on this rank either")  # fmt: skip


def agree_refusal(fn: str, err: BaseException | None, meshes: list[tuple], span: tuple | None = None) -> None:
    """One tiny all-reduce (MAX, see :func:`agree_flag`) of "a local check failed" over ``meshes``, before anything
    is written or sent; then this rank's own error, or, where another rank's check failed, a RuntimeError: every
    rank raises. A host read of the agreed flag."""
    if not meshes or span is None and all(mesh.size() == 1 for mesh, _ in meshes):  # (nobody else to tell)
        if err is not None:
            raise err
        return
    flag = torch.full((1,), 0.0 if err is None else 1.0, dtype=torch.float32, device=meshes[0][1])
    agree_flag(flag, meshes, span)
    raise_refused(fn, err, flag)


def meshes_of(specs: list, tensors: list[Tensor]) -> list[tuple]:
    """The distinct meshes of ``specs`` in order of first appearance, each with the device of its first local
    tensor."""
    seen: dict = {}
    for s, x in zip(specs, tensors):
        if s is not None and s[0] not in seen:
            seen[s[0]] = x.device
    return list(seen.items())
