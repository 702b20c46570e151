"""Checkpoints through ``torch.distributed.checkpoint`` (DCP): sharded on save, resharded by DCP on load.

ZeRO's shards are slices of flat buckets, which cut params at arbitrary offsets: not a DTensor placement. The DCP
view is torch's instead, the one FSDP2 uses for optimizer states: every moment and master of a param is a DTensor
of the param's shape, ``Shard(0)`` over a 1-D mesh of the ZeRO process group (rank ``r`` holds rows
``[r * c, (r + 1) * c)``, ``c = ceil(rows / world_size)``, as ``torch.chunk``; a 0-d param is ``Replicate()``).
``dcp_state_dict()`` builds them from an all-gather of each bucket (one bucket at a time, like
``consolidated_state_dict``); ``load_dcp_state_dict()`` sends the rows back to the ranks that own them with one
reduce-scatter per bucket and state (each element is contributed by exactly one rank, the others add zeros).
DCP itself saves each rank's rows and, on load, reads whichever saved pieces cover the rows asked for, so a
checkpoint saved on N ranks loads on M.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._ref_lowbit import QUANT_BLOCK, n_scales
from ._agree import _check_state_step
from ._checkpoint import (
    _MASTER_KEY,
    _MOMENT_KEYS,
    _SCALE_SUFFIX,
    _SIGNED,
    _Codes,
    _codes_as_moments,
    _LoadPlan,
    _range_of,
    _saved_name,
)
from ._comm import _all_gather, _reduce_scatter
from ._layout import _Bucket


def _rows(n_rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) that ``Shard(0)`` gives ``rank`` of ``world`` (``torch.chunk``'s split: ceil-sized chunks, the
    last ones short or empty)."""
    chunk = -(-n_rows // world)
    lo = min(rank * chunk, n_rows)
    return lo, min(lo + chunk, n_rows)


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


@dataclass
class _Piece:
    """This rank's piece of one state tensor of one param: elements [lo, hi) of the flattened param."""

    kind: str  # "shard" (Shard(0): the ranks' pieces tile the param) or "full" (every rank holds all of it)
    flat: Tensor  # the piece, flattened
    lo: int
    hi: int


class _DCPMixin:
    """``dcp_state_dict`` and ``load_dcp_state_dict`` (see the module docstring)."""

    def dcp_state_dict(self, names: Any = None) -> dict[str, Any]:
        """The state as DTensors for ``torch.distributed.checkpoint`` (DCP). Collective: call it on every rank.

        Layout: torch.optim's, with FSDP2's DTensors::

            {"state": {key: {"step": 0-d fp32 tensor,
                             "exp_avg", "exp_avg_sq" (, "max_exp_avg_sq", "master_param"): fp32 DTensor
                             (bf16 moments: bf16; 8-bit moments: uint8 codes under "exp_avg_codes",
                             "exp_avg_sq_codes" and fp32 block scales under "exp_avg_scale", "exp_avg_sq_scale",
                             so that an fp32 template refuses them)}},
             "param_groups": [{..., "params": [key, ...]}]}

        Each state DTensor has the param's shape and is ``Shard(0)`` over a 1-D ``DeviceMesh`` of this
        optimizer's process group (``Replicate()`` for a 0-d param): rank ``r`` holds ``torch.chunk``'s rows of
        it. The keys are the param indices (as ``state_dict()``), or, with ``names``, the names given: a list of
        one distinct string per param (in the optimizer's order), or an ``nn.Module`` whose
        ``named_parameters()`` names them (then the checkpoint is keyed as
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keys torch's optimizers).

        Save with ``dcp.save({"model": model.state_dict(), "optim": opt.dcp_state_dict()}, checkpoint_id=...)``
        on every rank, adding ``process_group=opt.process_group`` when that is not the default group. To load
        (any world size): build the same dict from the new model and optimizer, ``dcp.load`` it, then
        ``model.load_state_dict(sd["model"])`` and ``opt.load_dcp_state_dict(sd["optim"])``. Pass the returned
        dict to DCP, not the optimizer: DCP would call ``state_dict()`` (this rank's shard), keep rank 0's only.

        Costs an all-gather of each bucket per state (a bucket at a time); the returned tensors are copies, about
        this rank's share of the state. Runs the state-dict hooks, as ``state_dict()`` (pre-hooks on every rank
        before the first gather, agreed: see ``_CheckpointMixin``), and ``load_dcp_state_dict`` the load hooks.
        """
        from torch.distributed.tensor import DTensor, Replicate, Shard

        error, keys, hook_error = None, None, None
        try:  # checked on every rank and agreed on before the first gather
            keys = self._dcp_keys(names)
            try:
                self._state_dict_pre_hooks()
            except Exception as e:
                hook_error = e
                raise
        except Exception as e:  # noqa: BLE001 - agreed on with the other ranks, then raised on every rank
            error = f"{type(e).__name__}: {e}"
            if hook_error is not None:
                error = f"a state_dict pre-hook raised {error}"
        digest = None if keys is None else hashlib.sha1(repr(keys).encode()).hexdigest()[:12]
        self._agree_hooks(error, hook_error, "dcp_state_dict", same=("names (their digest)", digest))
        assert keys is not None
        self._drain()
        mesh = self._dcp_mesh()
        state: dict[Any, dict[str, Tensor]] = {keys[i]: {"step": t.clone()} for i, t in enumerate(self._steps)}
        for b in self._buckets:
            for name in self._state_names(b):
                t = self._bucket_tensor(b, name)
                full = torch.empty(b.numel, dtype=t.dtype, device=self._device)
                _all_gather(full, t, self.process_group, async_op=False)
                scales = getattr(b, name + _SCALE_SUFFIX, None)
                if scales is not None:  # one per 256-element block of the bucket (params start on blocks)
                    full_scales = torch.empty(b.numel // QUANT_BLOCK, dtype=scales.dtype, device=self._device)
                    _all_gather(full_scales, scales, self.process_group, async_op=False)
                for s in b.slots:
                    shape = s.param.shape
                    flat = full.narrow(0, s.offset, s.numel)
                    if len(shape) == 0:
                        local, placement = flat.view(()).clone(), Replicate()
                    else:
                        lo, hi = _rows(shape[0], self.world_size, self.rank)
                        row = math.prod(shape[1:])
                        local = flat[lo * row : hi * row].view(hi - lo, *shape[1:]).clone()
                        placement = Shard(0)
                    state[keys[s.index]][_saved_name(name, t)] = DTensor.from_local(
                        local, mesh, [placement], run_check=False, shape=shape, stride=_contiguous_stride(shape)
                    )
                    if scales is not None:
                        blocks = n_scales(s.numel)
                        lo, hi = _rows(blocks, self.world_size, self.rank)
                        local = full_scales.narrow(0, s.offset // QUANT_BLOCK + lo, hi - lo).clone()
                        state[keys[s.index]][name + _SCALE_SUFFIX] = DTensor.from_local(
                            local, mesh, [Shard(0)], run_check=False, shape=(blocks,), stride=(1,)
                        )
        groups = self._groups_for_save()
        for g in groups:
            g["params"] = [keys[i] for i in g["params"]]
        return self._state_dict_post_hooks({"state": state, "param_groups": groups})

    def load_dcp_state_dict(self, state_dict: dict[str, Any], names: Any = None) -> None:
        """Load a ``dcp_state_dict()`` that ``torch.distributed.checkpoint.load`` filled (saved with any world size).
        Collective: call it on every rank, with the ``names`` the dict was made with.

        Load the model's params first (master weights that do not round to them are replaced by the params,
        with a warning). Every rank checks the whole dict before changing anything: its param groups (as
        ``load_state_dict``), and for every param a state with ``step`` (a finite count >= 0), ``exp_avg``,
        ``exp_avg_sq`` (and with amsgrad ``max_exp_avg_sq``): fp32-convertible DTensors of the param's shape,
        ``Shard(0)`` (or ``Replicate()``) over this optimizer's process group with this rank's rows (or plain
        tensors holding the whole state). ``master_param`` is optional. The ranks then agree (one collective)
        that every rank's dict is valid and gives the same hyper-parameters, step counts, keys and kinds of
        pieces; otherwise every rank raises the same ValueError (naming the rank, the param and the key) and
        nothing is loaded on any rank. A checkpoint that lacks a key, or holds a tensor of another shape, makes
        ``dcp.load`` itself raise on every rank (``CheckpointException``, a ``BaseException``) before this.
        """
        self._load(state_dict, "load_dcp_state_dict", dcp=True, names=names)

    # -- helpers --------------------------------------------------------------------------------------------
    def _dcp_keys(self, names: Any) -> list[Any]:
        """The state dict's key of each param: its index, or its name (see ``dcp_state_dict``)."""
        n = len(self._params)
        if names is None:
            return list(range(n))
        if isinstance(names, torch.nn.Module):
            by_param = {}
            for name, p in names.named_parameters():
                by_param.setdefault(id(p), name)
            missing = [i for i, p in enumerate(self._params) if id(p) not in by_param]
            if missing:
                raise ValueError(
                    f"names: param {missing[0]} (shape {tuple(self._params[missing[0]].shape)}) is not a parameter "
                    "of the module given"
                )
            return [by_param[id(p)] for p in self._params]
        if isinstance(names, (str, bytes)) or not hasattr(names, "__len__"):
            raise TypeError(f"names must be None, a list of strings or an nn.Module, got {type(names).__name__}")
        keys = list(names)
        if len(keys) != n:
            raise ValueError(f"names has {len(keys)} entries, this optimizer has {n} params")
        bad = next((i for i, k in enumerate(keys) if not isinstance(k, str)), None)
        if bad is not None:
            raise TypeError(f"names[{bad}] is a {type(keys[bad]).__name__}, not a string")
        if len(set(keys)) != n:
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"names lists {dup!r} more than once")
        return keys

    def _dcp_ranks(self) -> list[int]:
        """The global ranks of this optimizer's process group, in group order (the mesh's)."""
        return [dist.get_global_rank(self.process_group, r) for r in range(self.world_size)]

    def _dcp_mesh(self) -> Any:
        """A 1-D DeviceMesh over the process group (made once; no new process group)."""
        mesh = getattr(self, "_dcp_mesh_cache", None)
        if mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            mesh = self._dcp_mesh_cache = DeviceMesh.from_group(self.process_group, self._device.type)
        return mesh

    @staticmethod
    def _is_dcp_state_dict(state_dict: Any) -> bool:
        """Whether ``state_dict`` holds DTensors in its per-param state (a filled ``dcp_state_dict()``)."""
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover (torch without DTensor)
            return False
        state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(state, dict):
            return False
        return any(isinstance(v, DTensor) for st in state.values() if isinstance(st, dict) for v in st.values())

    def _dcp_piece(self, st: dict, i: int, key: Any, name: str) -> _Piece:
        """Check state ``name`` of param ``i`` (key ``key``) and return this rank's piece of it. Moments and masters
        have the param's shape; the block scales of 8-bit moments (``exp_avg_scale``, ``exp_avg_sq_scale``) are
        1-D, one per 256 elements of the param."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        p = self._params[i]
        where = f"state {name!r} of param {i} (key {key!r})"
        if name not in st:
            raise ValueError(f"{where} is missing (the param has state: {sorted(map(str, st))})")
        t = st[name]
        scale = name.endswith(_SCALE_SUFFIX)
        shape = torch.Size([n_scales(p.numel())]) if scale else p.shape
        n = shape.numel()
        what = "8-bit block scales" if scale else "the param"
        if isinstance(t, DTensor):
            ranks = self._dcp_ranks()
            mesh = t.device_mesh
            if mesh.ndim != 1 or mesh.mesh.flatten().tolist() != ranks:
                raise ValueError(
                    f"{where} is a DTensor on the mesh {mesh.mesh.tolist()}, not on a 1-D mesh of this optimizer's "
                    f"process group (ranks {ranks}): load into the dict dcp_state_dict() makes"
                )
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{where} has shape {tuple(t.shape)} but {what} has shape {tuple(shape)}")
            placement, local = t.placements[0], t.to_local()
            if type(placement) is Shard and placement.dim == 0 and len(shape) > 0:
                lo, hi = _rows(shape[0], self.world_size, self.rank)
                expected, kind = (hi - lo, *shape[1:]), "shard"
                row = math.prod(shape[1:])
                lo, hi = lo * row, hi * row
            elif isinstance(placement, Replicate):
                expected, kind, lo, hi = tuple(shape), "full", 0, n
            else:
                raise ValueError(
                    f"{where} is a DTensor placed {tuple(t.placements)}; expected (Shard(0),) (or (Replicate(),)), "
                    "as dcp_state_dict() makes"
                )
            if tuple(local.shape) != tuple(expected):
                raise ValueError(
                    f"{where}: this rank's piece has shape {tuple(local.shape)} but {placement} over "
                    f"{self.world_size} ranks gives it {tuple(expected)}"
                )
        elif isinstance(t, Tensor):
            if t.numel() != n:
                raise ValueError(f"{where} has {t.numel()} elements but {what} has {n} (shape {tuple(shape)})")
            local, kind, lo, hi = t, "full", 0, n
        else:
            raise ValueError(
                f"{where} must be a DTensor (as dcp_state_dict() makes) or a tensor, got {type(t).__name__}"
            )
        if local.layout != torch.strided or local.is_meta:
            raise ValueError(f"{where} must be dense with data, got {local.layout} on {local.device}")
        codes = name in _SIGNED and local.dtype == torch.uint8
        if not (local.is_floating_point() or codes):
            raise ValueError(f"{where} must be floating point (or, for exp_avg/exp_avg_sq, uint8 8-bit codes), got "
                             f"{local.dtype}")  # fmt: skip
        if scale and local.dtype != torch.float32:
            raise ValueError(f"{where} must be float32 block scales, got {local.dtype}")
        if codes and kind == "shard" and self.state_dtype != "int8":
            raise ValueError(f"{where} holds sharded 8-bit codes but this ZeroAdamW keeps {self.state_dtype} moments: "
                             "load a DCP checkpoint into a ZeroAdamW with the same state_dtype (or convert through "
                             "consolidated_state_dict and load_state_dict)")  # fmt: skip
        return _Piece(kind, local.detach().reshape(-1), lo, hi)

    def _plan_dcp_load(self, state_dict: Any, names: Any) -> _LoadPlan:
        """Check a filled ``dcp_state_dict()`` (raising the first problem) and return what loading it sets. Changes
        nothing; the plan's ``prepare`` runs the reduce-scatters, bucket by bucket, once every rank has agreed."""
        keys = self._dcp_keys(names)
        if not isinstance(state_dict, dict):
            raise TypeError(f"expected a state dict, got {type(state_dict).__name__}")
        state, groups = state_dict.get("state"), state_dict.get("param_groups")
        if not isinstance(state, dict) or not isinstance(groups, (list, tuple)):
            raise ValueError("not an optimizer state dict (needs a 'state' dict and a 'param_groups' list)")
        new_groups, summary_groups = self._check_groups(groups)
        amsgrad = [new_groups[gi]["amsgrad"] for gi in self._group_of]
        pieces: list[dict[str, _Piece]] = []
        steps: list[float] = []
        described: list[tuple[str, str]] = [("the checkpoint", "a state dict of DTensors (dcp_state_dict)")]
        for i, key in enumerate(keys):
            st = state.get(key)
            if not isinstance(st, dict):
                got = "missing" if st is None else f"a {type(st).__name__}, not a dict"
                raise ValueError(f"the state of param {i} (key {key!r}) is {got}")
            st = _codes_as_moments(st, i)
            steps.append(_check_state_step(st, i))
            required = _MOMENT_KEYS if amsgrad[i] else _MOMENT_KEYS[:2]
            optional = (*_MOMENT_KEYS[len(required) :], _MASTER_KEY)
            mine = {name: self._dcp_piece(st, i, key, name) for name in required}
            mine.update({name: self._dcp_piece(st, i, key, name) for name in optional if name in st})
            for name in _SIGNED:  # 8-bit codes come with their block scales
                if mine[name].flat.dtype == torch.uint8:
                    mine[name + _SCALE_SUFFIX] = self._dcp_piece(st, i, key, name + _SCALE_SUFFIX)
            pieces.append(mine)
            kinds = ", ".join(
                f"{name} {pc.kind}{' codes' if pc.flat.dtype == torch.uint8 else ''}"
                for name, pc in sorted(mine.items())
            )
            described.append((f"the state of param {i}", f"{key!r}: {kinds}"))
        outs: dict[str, Tensor] = {}

        def prepare(b: _Bucket) -> None:
            """Reduce-scatter the rows of the bucket's params: every rank gets the elements of its shard (8-bit
            codes as their values 0..255 in fp32, exact; block scales by blocks: params start on blocks)."""
            outs.clear()
            names = self._state_names(b)
            for name in (*names, *(n + _SCALE_SUFFIX for n in _SIGNED if n in names)):
                sharded = [(s, pieces[s.index][name]) for s in b.slots if name in pieces[s.index]]
                sharded = [(s, pc) for s, pc in sharded if pc.kind == "shard"]
                if not sharded:  # the same on every rank: the kinds were agreed on
                    continue
                per = QUANT_BLOCK if name.endswith(_SCALE_SUFFIX) else 1  # elements per entry
                flat = torch.zeros(b.numel // per, dtype=torch.float32, device=self._device)
                for s, pc in sharded:
                    flat.narrow(0, s.offset // per + pc.lo, pc.hi - pc.lo).copy_(pc.flat)
                out = torch.empty(b.shard_numel // per, dtype=torch.float32, device=self._device)
                _reduce_scatter(out, flat, self.process_group, async_op=False)
                outs[name] = out

        def fetch(i: int, name: str, lo: int, hi: int) -> Tensor | _Codes | None:
            pc = pieces[i].get(name)
            if pc is None:
                return None
            if pc.flat.dtype == torch.uint8:  # 8-bit codes (lo: on a block, this ZeroAdamW keeps int8 states)
                spc = pieces[i][name + _SCALE_SUFFIX]
                if pc.kind == "full" and spc.kind == "full":
                    return _range_of({name: pc.flat, name + _SCALE_SUFFIX: spc.flat}, name, 0, lo, hi, self._device)
                seg = self._segment_of[i]
                if pc.kind == "full":
                    codes = pc.flat[lo:hi].to(self._device)
                else:
                    codes = outs[name].narrow(0, seg.start + lo - seg.lo, hi - lo).to(torch.uint8)
                first, count = lo // QUANT_BLOCK, n_scales(hi - lo)
                if spc.kind == "full":
                    scales = spc.flat[first : first + count].to(self._device)
                else:
                    scales = outs[name + _SCALE_SUFFIX].narrow(0, seg.start // QUANT_BLOCK, count)
                return _Codes(codes, scales)
            if pc.kind == "full":
                return pc.flat[lo:hi].to(self._device, torch.float32)
            seg = self._segment_of[i]
            return outs[name].narrow(0, seg.start + lo - seg.lo, hi - lo)

        return _LoadPlan(new_groups, steps, fetch, (summary_groups, steps, described), prepare)
