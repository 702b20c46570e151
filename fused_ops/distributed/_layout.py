"""Layout: params packed into flat buckets, each split into ``world_size`` equal, aligned shards.

``build_layout`` decides where each param goes (from shapes, dtypes, world size and options only); ``_LayoutMixin``
builds the buckets (the model's params become views of them), this rank's shards of the master weights, moments
and reduced grads, and the staging buffers of the reduce-scatters, and reports their memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .._ref_lowbit import QUANT_BLOCK, n_scales
from .._validate import has_memory

_MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# -- layout -------------------------------------------------------------------------------------------------
@dataclass
class BucketSpec:
    """Where params go in one flat bucket. Depends only on shapes, dtypes, world size and the options."""

    group: int  # param group index
    dtype: torch.dtype
    slots: list[tuple[int, int, int]]  # (global param index, offset in the bucket, numel)
    numel: int  # padded: a multiple of world_size * align


def build_layout(
    params: Sequence[tuple[int, int, torch.dtype]], world_size: int, bucket_cap_bytes: int, align: int
) -> list[BucketSpec]:
    """Pack params into buckets.

    Args:
        params: one ``(group index, numel, dtype)`` per param, in registration order.
        world_size: number of shards each bucket splits into.
        bucket_cap_bytes: a bucket closes once it holds this many bytes (a larger param gets its own bucket).
        align: every param starts at a multiple of ``align`` elements; every shard is a multiple of it too.

    Returns buckets in the order backward is expected to complete them: params are walked in reverse
    registration order and a bucket is placed where its last param (in that walk) is seen.
    """
    open_buckets: dict[tuple[int, torch.dtype], BucketSpec] = {}
    sizes: dict[int, int] = {}
    done: list[tuple[int, BucketSpec]] = []  # (position of the bucket's last param in the reverse walk, spec)
    last_seen: dict[int, int] = {}
    for pos, index in enumerate(reversed(range(len(params)))):
        group, numel, dtype = params[index]
        key = (group, dtype)
        spec = open_buckets.get(key)
        if spec is None:
            spec = open_buckets[key] = BucketSpec(group, dtype, [], 0)
            sizes[id(spec)] = 0
        offset = _round_up(sizes[id(spec)], align)
        spec.slots.append((index, offset, numel))
        sizes[id(spec)] = offset + numel
        last_seen[id(spec)] = pos
        if sizes[id(spec)] * dtype.itemsize >= bucket_cap_bytes:
            done.append((pos, spec))
            del open_buckets[key]
    done.extend((last_seen[id(s)], s) for s in open_buckets.values())
    done.sort(key=lambda item: item[0])
    out = []
    for _, spec in done:
        spec.numel = max(_round_up(sizes[id(spec)], world_size * align), world_size * align)
        out.append(spec)
    return out


# -- runtime structures ---------------------------------------------------------------------------------------
@dataclass
class _Slot:
    index: int  # global param index
    param: Tensor
    offset: int  # in the bucket
    numel: int
    ptr: int = 0  # the param's address: a view of the bucket (a param whose .data was replaced is refused)
    shape: torch.Size = torch.Size()  # the param's shape and strides as laid out (a re-pointed param is refused)
    stride: tuple[int, ...] = ()


@dataclass
class _Segment:
    """The part of one param that this rank owns: elements [lo, hi) of the flattened param."""

    index: int
    lo: int
    hi: int
    start: int  # in the shard
    bucket: _Bucket


@dataclass
class _Bucket:
    index: int
    group: int
    dtype: torch.dtype
    slots: list[_Slot]
    numel: int
    shard_numel: int
    param_flat: Tensor
    param_shard: Tensor
    master: Tensor | None
    grad: Tensor  # the shard's reduced grads (accumulated across synced backward passes): _grad_dtype()
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None
    gaps: list[tuple[int, int]]  # padding ranges in the flat bucket
    # state_dtype="int8": exp_avg / exp_avg_sq hold uint8 codes and these the fp32 absmax of each 256-element
    # block of the shard (shards and params start on blocks: align is a multiple of 256)
    exp_avg_scale: Tensor | None = None
    exp_avg_sq_scale: Tensor | None = None
    n_hooked: int = 0
    ready: set = field(default_factory=set)
    grad_valid: bool = False
    inflight: int = 0
    staging_views: dict = field(default_factory=dict)  # staging buffer index -> (gap views, per-slot views)
    # param_flat's address (re-read when its storage moves in place, see _bucket_moved) and its storage's size in
    # bytes (a freed storage is refused)
    flat_ptr: int = 0
    flat_nbytes: int = 0


def _slot_moved(s: _Slot, b: _Bucket) -> str | None:
    """What makes param ``s.param`` no longer its view of bucket ``b`` (None when it still is): its address,
    dtype, shape, strides or device (attribute reads only: no device sync). The bucket's own storage is checked
    by ``_bucket_moved``, which re-reads the addresses of a storage moved in place."""
    why = _slot_changed(s, b)  # (first: a model cast or moved says so)
    if why is None and s.param.data_ptr() != s.ptr:
        return "its address changed"
    return why


def _slot_changed(s: _Slot, b: _Bucket) -> str | None:
    """``_slot_moved`` but the address: the param's dtype, shape, strides or device."""
    p = s.param
    if p.dtype != b.dtype:
        return f"it is {p.dtype}, its bucket {b.dtype}"
    if p.shape != s.shape:
        return f"its shape is {tuple(p.shape)}, laid out as {tuple(s.shape)}"
    if p.stride() != s.stride:
        return f"its strides are {p.stride()}, laid out as {s.stride} (e.g. a transposed view of its memory)"
    if p.device != b.param_flat.device:
        return f"it is on {p.device}"
    return None


def _bucket_moved(b: _Bucket) -> str | None:
    """What happened to the bucket's flat storage since its address was last read (None: nothing, or it moved into
    shared memory with its params, see below): it "was freed or resized" (``p.untyped_storage().resize_(0)``, say),
    or it "moved ..., and param i ..." where it moved and some param is no longer its view of it.

    ``share_memory_()`` (``model.share_memory()``) moves a CPU storage into shared memory in place: the same storage
    object, the same size, a new address, which its views (the params, ``param_flat``) follow. When every param is
    still a view of that storage at its offset, with its dtype, shape, strides and device, the new addresses are
    read here (``flat_ptr`` and each slot's ``ptr``) and the checks go on from them: no launch uses an address that
    was not checked in this step against the tensor it stands for. A storage moved otherwise (not into shared memory,
    or not on the CPU: freed and allocated again by ``resize_()``, its contents lost) is refused as freed. Attribute
    reads only, but a storage object per param once the buffer moved."""
    flat = b.param_flat
    storage = flat.untyped_storage()
    if storage.nbytes() != b.flat_nbytes:
        return "was freed or resized (e.g. by untyped_storage().resize_() on one of them)"
    ptr = flat.data_ptr()
    if ptr == b.flat_ptr:
        return None
    if flat.device.type != "cpu" or not storage.is_shared():  # (a shared CPU storage cannot be resized: only
        # share_memory_() moves one; on other devices it moves nothing, and is_shared() holds for every CUDA storage)
        return "was freed and allocated again, or resized (e.g. by untyped_storage().resize_() on one of them)"
    base = flat.storage_offset()  # (0: the buffer is its storage)
    for s in b.slots:
        p = s.param
        if not has_memory(type(p)) or p.untyped_storage()._cdata != storage._cdata:
            why = "it lies in another storage (its .data was replaced, say)"
        else:
            why = _slot_changed(s, b)
            if why is None and p.storage_offset() != base + s.offset:
                why = f"it starts at element {p.storage_offset() - base} of it, laid out at {s.offset}"
        if why is not None:
            return f"moved (e.g. by share_memory()), and param {s.index} is no longer its view of it: {why}"
    b.flat_ptr = ptr
    for s in b.slots:
        s.ptr = s.param.data_ptr()
    return None


class _StagingPool:
    """Flat buffers the reduce-scatters run in, reused bucket after bucket (two to overlap, else one)."""

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device):
        self.flat = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]
        self.free = list(range(count))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat)


class _LayoutMixin:
    """Builds and describes ZeroAdamW's buckets and shards (see the module docstring)."""

    def _build(self) -> None:
        specs = build_layout(
            [(g, p.numel(), p.dtype) for g, p in zip(self._group_of, self._params, strict=True)],
            self.world_size,
            int(self.bucket_cap_mb * 2**20),
            self.align,
        )
        dev, rank, world = self._device, self.rank, self.world_size
        self._buckets: list[_Bucket] = []
        self._bucket_of: list[int] = [0] * len(self._params)
        self._segments: list[list[_Segment]] = [[] for _ in self.param_groups]
        self._segment_of: dict[int, _Segment] = {}
        for bi, spec in enumerate(specs):
            shard = spec.numel // world
            flat = torch.zeros(spec.numel, dtype=spec.dtype, device=dev)
            slots, gaps, end = [], [], 0
            for index, offset, numel in sorted(spec.slots, key=lambda s: s[1]):
                p = self._params[index]
                view = flat.narrow(0, offset, numel)
                with torch.no_grad():
                    view.copy_(p.detach().reshape(-1))
                p.data = view.view(p.shape)  # the model's param now lives in the bucket
                slots.append(_Slot(index, p, offset, numel, p.data_ptr(), p.shape, p.stride()))
                self._bucket_of[index] = bi
                if offset > end:
                    gaps.append((end, offset))
                end = offset + numel
            if spec.numel > end:
                gaps.append((end, spec.numel))
            if world > 1:  # every rank starts from rank 0's params, as DDP does (before masters are made of them)
                dist.broadcast(flat, src=dist.get_global_rank(self.process_group, 0), group=self.process_group)
            param_shard = flat.narrow(0, rank * shard, shard)
            lowp = spec.dtype != torch.float32
            group = self.param_groups[spec.group]
            moment_dtype = _MOMENT_DTYPES[self.state_dtype]
            int8 = self.state_dtype == "int8"
            b = _Bucket(
                index=bi, group=spec.group, dtype=spec.dtype, slots=slots, numel=spec.numel, shard_numel=shard,
                param_flat=flat, param_shard=param_shard,
                master=param_shard.float() if lowp and self.master_weights else None,
                grad=torch.zeros(shard, dtype=self._grad_dtype(spec.dtype), device=dev),
                exp_avg=torch.zeros(shard, dtype=moment_dtype, device=dev),
                exp_avg_sq=torch.zeros(shard, dtype=moment_dtype, device=dev),
                max_exp_avg_sq=torch.zeros(shard, dtype=torch.float32, device=dev) if group["amsgrad"] else None,
                gaps=gaps,
                # (codes 0 with scales 0 read as 0.0: zero moments)
                exp_avg_scale=torch.zeros(shard // QUANT_BLOCK, dtype=torch.float32, device=dev) if int8 else None,
                exp_avg_sq_scale=torch.zeros(shard // QUANT_BLOCK, dtype=torch.float32, device=dev) if int8 else None,
            )  # fmt: skip
            b.flat_ptr, b.flat_nbytes = flat.data_ptr(), flat.untyped_storage().nbytes()
            self._buckets.append(b)
            lo_s, hi_s = rank * shard, (rank + 1) * shard
            for s in slots:
                lo, hi = max(s.offset, lo_s), min(s.offset + s.numel, hi_s)
                if lo < hi:
                    seg = _Segment(s.index, lo - s.offset, hi - s.offset, lo - lo_s, b)
                    self._segments[spec.group].append(seg)
                    self._segment_of[s.index] = seg
        self._unowned = [i for i in range(len(self._params)) if i not in self._segment_of]
        self._adam_view_cache: dict[tuple, tuple[list[Tensor], ...]] = {}
        self._lowbit_tables: dict[tuple, dict] = {}  # the low-bit kernel's chunk tables, per launch
        sizes: dict[tuple, int] = {}
        for b in self._buckets:
            key = (self._reduce_dtype(b), dev)
            sizes[key] = max(sizes.get(key, 0), b.numel)
        count = 2 if self.overlap_comm and len(self._buckets) > 1 else 1
        self._pools: dict[tuple, _StagingPool] = {
            key: _StagingPool(count, numel, key[0], key[1]) for key, numel in sizes.items()
        }

    def _reduce_dtype(self, b: _Bucket) -> torch.dtype:
        return self.reduce_dtype if self.reduce_dtype is not None else b.dtype

    def _grad_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """The reduced-grad shard's dtype: the reduce dtype when the fused Adam op takes it with these params
        (the params' dtype, or fp32), else fp32 (e.g. fp16 params reduced in bf16)."""
        reduce_dtype = self.reduce_dtype if self.reduce_dtype is not None else param_dtype
        return reduce_dtype if reduce_dtype in (param_dtype, torch.float32) else torch.float32

    # -- introspection --------------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds, per category (padding counted once, under ``padding`` only).

        - ``master``: fp32 master shard (0 for fp32 params, whose shard of the param buffer is the master);
        - ``states``: Adam moments of the shard (fp32: 4 + 4 bytes per element; ``state_dtype="bfloat16"``: 2 + 2;
          ``"int8"``: 1 + 1 code bytes and, for every 256-element block holding a param element, two fp32 scales:
          2 + 8/256 bytes per element), ``max_exp_avg_sq`` (fp32) and the step counts;
        - ``grad_shards``: the reduced-grad shards, in the reduce dtype (see the class docstring);
        - ``staging``: the staging buffers of the reduce-scatters (the buckets in flight);
        - ``grad_buckets``: ``grad_shards + staging``;
        - ``padding``: padded elements in the master, moment and grad shards (and the scales of blocks holding no
          param element) and in the flat param buffers;
        - ``total``: ``master + states + grad_buckets + padding``.

        Not counted: the params' own elements (the flat buffers the model's params are views of; their padding
        is counted) and ``p.grad``.
        """
        report = {"master": 0, "states": 4 * len(self._steps), "grad_shards": 0, "staging": 0, "padding": 0}
        for b in self._buckets:
            pad = self._bucket_pad(b)
            useful = b.shard_numel - pad
            per_element = 2 * b.exp_avg.element_size() + (4 if b.max_exp_avg_sq is not None else 0)
            report["master"] += 4 * useful if b.master is not None else 0
            report["states"] += per_element * useful
            report["grad_shards"] += b.grad.element_size() * useful
            master = 4 if b.master is not None else 0
            report["padding"] += pad * (per_element + master + b.grad.element_size())
            report["padding"] += (b.numel - sum(s.numel for s in b.slots)) * b.param_flat.element_size()
            if b.exp_avg_scale is not None:
                scale_bytes = b.exp_avg_scale.element_size() + b.exp_avg_sq_scale.element_size()
                used = self._bucket_blocks(b)
                report["states"] += scale_bytes * used
                report["padding"] += scale_bytes * (b.exp_avg_scale.numel() - used)
        report["staging"] = sum(pool.nbytes() for pool in self._pools.values())
        report["grad_buckets"] = report["grad_shards"] + report["staging"]
        report["total"] = report["master"] + report["states"] + report["grad_buckets"] + report["padding"]
        return report

    def _bucket_blocks(self, b: _Bucket) -> int:
        """256-element blocks of this rank's shard of bucket ``b`` that hold a param element (int8 states: params
        start on blocks, so each param's piece of the shard covers ceil(its elements / 256) blocks of its own)."""
        lo_s, hi_s = self.rank * b.shard_numel, (self.rank + 1) * b.shard_numel
        return sum(n_scales(max(0, min(s.offset + s.numel, hi_s) - max(s.offset, lo_s))) for s in b.slots)

    def _bucket_pad(self, b: _Bucket) -> int:
        """Padded elements in this rank's shard of bucket ``b``."""
        lo_s, hi_s = self.rank * b.shard_numel, (self.rank + 1) * b.shard_numel
        used = sum(max(0, min(s.offset + s.numel, hi_s) - max(s.offset, lo_s)) for s in b.slots)
        return b.shard_numel - used
