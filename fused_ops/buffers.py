"""FlatBuffer: one contiguous storage holding many tensors, handed out as per-tensor views, split into buckets.

Params and/or grads can live inside a FlatBuffer: ``param.data`` and ``param.grad`` become views of it, so
backward accumulates straight into flat storage (as DeepSpeed's contiguous gradients and DDP's
``gradient_as_bucket_view``) and a whole-model op (a norm, a cast, a reduce-scatter of a bucket) runs over
one or a few large tensors.

Layout: tensor ``i`` starts at an element offset that is a multiple of ``align``; tensors are packed, in the
order given, into buckets of at most ``bucket_cap_mb`` (a tensor larger than the cap gets a bucket of its own),
and each bucket is padded so that its length is a multiple of ``lcm(align, world_size)``: every bucket
starts aligned and splits into ``world_size`` equal shards (ZeRO). All padding is zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import NamedTuple

import torch
from torch import Tensor

from . import _ops, functional
from ._backend import check_backend
from ._validate import check_storage, has_memory, outside_storage
from .kernels._checks import check_no_overrides, no_user_code

__all__ = ["Bucket", "FlatBuffer"]


@dataclass(frozen=True)
class Bucket:
    """A slice ``[offset, offset + numel)`` of a FlatBuffer's storage holding tensors ``indices``."""

    index: int
    offset: int  # first element in ``FlatBuffer.data``
    numel: int  # padded length: a multiple of lcm(align, world_size)
    indices: tuple[int, ...]  # the tensors in this bucket, in order
    data: Tensor  # view of FlatBuffer.data[offset : offset + numel]
    world_size: int

    def shard(self, rank: int) -> Tensor:
        """The ``rank``-th of ``world_size`` equal slices of this bucket (a view); ``rank`` an int (not a bool)."""
        if isinstance(rank, bool) or not isinstance(rank, Integral):
            raise TypeError(f"Bucket.shard: rank must be an int, got {rank!r}")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"Bucket.shard: rank must be in [0, {self.world_size}), got {rank}")
        size = self.numel // self.world_size
        return self.data.narrow(0, int(rank) * size, size)


class _Tied(NamedTuple):
    """A tensor of a pickled FlatBuffer, as a view of one of the storages pickled with it (see
    :meth:`FlatBuffer.__getstate__`)."""

    base: int  # index in the pickled storages
    dtype: torch.dtype
    offset: int  # storage offset, in elements of ``dtype``
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _layout(numels: Sequence[int], align: int, cap: int | None, pad_to: int):
    """Offsets, spans (up to the next tensor or the bucket's end), bucket (start, length, indices), total."""
    offsets: list[int] = []
    buckets: list[tuple[int, int, tuple[int, ...]]] = []
    start = pos = 0
    members: list[int] = []

    def close() -> None:
        nonlocal start, pos, members
        end = start + -(-(pos - start) // pad_to) * pad_to
        buckets.append((start, end - start, tuple(members)))
        start = pos = end
        members = []

    for i, n in enumerate(numels):
        span = -(-n // align) * align
        if cap is not None and members and pos + span - start > cap:
            close()
        offsets.append(pos)
        members.append(i)
        pos += span
    if members:
        close()
    spans = [0] * len(numels)
    for b_start, b_len, idx in buckets:
        ends = [offsets[j] for j in idx[1:]] + [b_start + b_len]
        for j, end in zip(idx, ends, strict=True):
            spans[j] = end - offsets[j]
    return offsets, spans, buckets, start


class FlatBuffer:
    """One contiguous storage (``data``) with a view per tensor (``views``) and aligned ``buckets``.

    Args:
        tensors: the tensors to lay out (any shapes). Their values are copied in (one launch) when ``copy``;
            meta tensors (shapes only) are allowed with ``copy=False``.
        dtype: the storage's dtype; default the tensors' (which must then share one). Copying into another
            dtype rounds to nearest even (``fused_ops.cast_``), e.g. fp32 master copies of bf16 params.
        align: every tensor starts at a multiple of ``align`` elements (64: 128-byte lines for bf16).
        bucket_cap_mb: at most this many MiB per bucket (None: one bucket).
        world_size: each bucket's length divides by it (and by ``align``), so it shards evenly.
        device: default the tensors' device.
        copy: copy the tensors' values in; otherwise the storage is zero.
        backend: as everywhere in fused_ops ("auto", "triton", "reference").

    Use :meth:`from_params` to move params into flat storage (``param.data`` becomes a view) without holding
    two full copies on the device, and :meth:`for_grads` to make ``param.grad`` views. Storage is allocated
    once with ``torch.empty`` and written once (the copy zero-fills the padding in the same launch).

    ``data`` may later be given other memory (``buf.data = t`` or ``buf.data.set_(t)``): every method then copies,
    zeroes and binds ``data`` as it is now (``views`` and ``buckets`` keep the old memory), after checking that it
    is still a contiguous 1-d tensor of the buffer's dtype and device, of at least ``numel`` elements, inside its
    storage (else a ValueError or TypeError naming ``data``, nothing changed).
    """

    def __init__(
        self,
        tensors: Iterable[Tensor],
        dtype: torch.dtype | None = None,
        align: int = 64,
        bucket_cap_mb: float | None = None,
        world_size: int = 1,
        *,
        device: torch.device | str | None = None,
        copy: bool = True,
        backend: str | None = None,
    ) -> None:
        if not isinstance(copy, bool):
            raise TypeError(f"FlatBuffer: copy must be a bool, got {copy!r}")
        tensors = self._plan(tensors, dtype, align, bucket_cap_mb, world_size, device, backend)
        if copy:  # (what copy_from_ checks; the new storage shares memory with nothing)
            self._check_sources("FlatBuffer", tensors)
            check_storage("FlatBuffer", "tensors", tensors)
        self._allocate()
        if copy:
            self._copy_from(tensors)
        else:
            self.data.zero_()

    def _plan(self, tensors, dtype, align, bucket_cap_mb, world_size, device, backend, fn="FlatBuffer",
              name="tensors") -> list[Tensor]:  # fmt: skip
        tensors = functional._float_tensors(fn, name, tensors)
        align = functional._positive_int(fn, "align", align)
        world_size = functional._positive_int(fn, "world_size", world_size)
        if bucket_cap_mb is not None and (isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, Real)
                                          or not (math.isfinite(bucket_cap_mb) and bucket_cap_mb > 0)):  # fmt: skip
            raise ValueError(f"{fn}: bucket_cap_mb must be a positive number or None, got {bucket_cap_mb!r}")
        if dtype is None:
            if not tensors:
                raise ValueError(f"{fn}: pass dtype when {name} is empty")
            dtype = tensors[0].dtype
            for i, x in enumerate(tensors):
                if x.dtype != dtype:
                    raise ValueError(f"{fn}: {name}[{i}] is {x.dtype} but {name}[0] is {dtype}: pass dtype")
        elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{fn}: dtype must be a floating-point torch.dtype, got {dtype!r}")
        if device is None:
            devices = {x.device for x in tensors}
            if len(devices) > 1:
                raise ValueError(f"{fn}: {name} are on several devices {sorted(map(str, devices))}: pass device")
            device = devices.pop() if devices else torch.device("cpu")
        if backend is not None:
            check_backend(backend)
        self.dtype = dtype
        self.device = torch.device(device)
        self.align = align
        self.world_size = world_size
        self.backend = backend
        self.shapes = [x.shape for x in tensors]
        self.numels = [x.numel() for x in tensors]
        cap = None
        if bucket_cap_mb is not None:
            cap = max(1, int(bucket_cap_mb * 2**20) // dtype.itemsize)
        pad_to = math.lcm(align, world_size)
        self.offsets, self._spans, self._bucket_layout, self.numel = _layout(self.numels, align, cap, pad_to)
        if self.numel * dtype.itemsize > 2**63 - 1:  # (torch's sizes are int64; it raised its own overflow error)
            raise ValueError(f"{fn}: align={align} (world_size={world_size}) pads the buffer to {self.numel} elements "
                             f"of {dtype}, more bytes than a tensor can hold (2**63 - 1)")  # fmt: skip
        return tensors

    def _views_of(self, data: Tensor) -> list[Tensor]:
        return [data.narrow(0, off, n).view(shape)
                for off, n, shape in zip(self.offsets, self.numels, self.shapes, strict=True)]  # fmt: skip

    def _allocate(self) -> None:
        self._set_storage(torch.empty(self.numel, dtype=self.dtype, device=self.device))

    def _set_storage(self, data: Tensor) -> None:
        self.data = data
        self.views = self._views_of(data)
        # (the views every method reads and writes through: the public ``views`` are the user's to rebind or
        # reshape, e.g. ``buf[1].set_(t)``, so they are never trusted; these are never handed out)
        self._views = self._views_of(data)
        self.buckets = [
            Bucket(k, start, length, idx, data.narrow(0, start, length), self.world_size)
            for k, (start, length, idx) in enumerate(self._bucket_layout)
        ]

    # -- pickling -------------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Pickled, ``data``, ``views`` and ``buckets`` stay views of one storage (as ``copy.deepcopy`` and
        ``torch.save`` keep them; plain ``pickle`` would copy each tensor's storage on its own): each storage they
        lie in is pickled once, as a tensor of the first tied tensor's dtype, and each tensor as its place in it."""
        state = self.__dict__.copy()
        bases: list[Tensor] = []
        seen: dict = {}

        def tie(x):
            if (type(x) is not Tensor or x.layout != torch.strided or x.requires_grad or x.is_neg() or x.is_conj()
                    or not x.data_ptr()):  # fmt: skip
                return x  # (pickled as it is: nothing to share, or more to it than a place in a storage)
            storage = x.untyped_storage()
            key = (x.device, storage.data_ptr())
            if key not in seen:
                seen[key] = len(bases)
                # (in the dtype of the first tensor tied to it, normally ``data``'s: torch.save refuses one storage
                # seen as two dtypes, and the params and views saved next to the buffer are of that dtype)
                dtype = x.dtype if storage.nbytes() % x.element_size() == 0 else torch.uint8
                bases.append(torch.empty(0, dtype=dtype, device=x.device).set_(storage))
            return _Tied(seen[key], x.dtype, x.storage_offset(), tuple(x.shape), x.stride())

        _map_tensors(state, tie)
        state["_tied_storages"] = bases
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        bases = state.pop("_tied_storages", [])

        def untie(x):
            if not isinstance(x, _Tied):
                return x
            base = bases[x.base]
            return torch.empty(0, dtype=x.dtype, device=base.device).set_(base.untyped_storage(), x.offset, x.size,
                                                                          x.stride)  # fmt: skip

        _map_tensors(state, untie)
        self.__dict__.update(state)
        if "_views" not in state and isinstance(state.get("data"), Tensor):  # (pickled before it had them)
            self._views = self._views_of(state["data"])

    # -- construction helpers ---------------------------------------------------------------------------------

    @classmethod
    @no_user_code
    def from_params(
        cls,
        params: Iterable[Tensor],
        align: int = 64,
        bucket_cap_mb: float | None = None,
        world_size: int = 1,
        *,
        stage_on_host: bool | None = None,
        backend: str | None = None,
    ) -> FlatBuffer:
        """Move ``params`` into one flat storage: afterwards each ``param.data`` is a view of ``buffer.data``.

        Memory: the device never holds two full copies of the params. With ``stage_on_host`` (default: when
        the params are on a GPU) each param is first copied to (pinned) host memory and rebound there, which
        frees its device memory as it goes; then the storage is allocated and filled with one host-to-device
        copy per bucket. Peak device memory is about one copy of the params (plus padding), at the cost of a
        round trip over PCIe, once. Without staging the copy is one gather launch, with the originals and the
        storage alive together. Memory is only freed if nothing else holds a reference to the old tensors.
        Params must share one dtype and device (group them and make one buffer per group otherwise).
        """
        fn = "FlatBuffer.from_params"
        self = cls.__new__(cls)
        params = self._plan(params, None, align, bucket_cap_mb, world_size, None, backend, fn, "params")
        if stage_on_host is not None and not isinstance(stage_on_host, bool):
            raise TypeError(f"{fn}: stage_on_host must be a bool or None, got {stage_on_host!r}")
        # Each param gets memory of its own in the buffer: params sharing memory (tied weights, one tensor listed
        # twice) would be untied without a word.
        functional._check_memory(fn, [("params", params, True, True, functional._all_contiguous(params))])
        if stage_on_host is None:
            stage_on_host = self.device.type == "cuda"
        if not stage_on_host:
            self._allocate()
            self._copy_from(params)
            self.bind_data_(params)
            return self
        pin = torch.cuda.is_available()
        # Every host buffer first (an error leaves every param as it was); then each param is rebound to its host
        # copy as it goes. An error after that (out of memory allocating the storage) puts every param back on its
        # device before it is raised (see _unstage).
        hosts = [torch.zeros(length, dtype=self.dtype, device="cpu", pin_memory=pin)
                 for _, length, _ in self._bucket_layout]  # fmt: skip
        staged: list[tuple[int, Tensor, tuple]] = []
        try:
            # (the device copies are released together once every param is staged, not one by one: releasing one
            # can run caller code (a finalizer of its storage) that would free or shrink a param not yet copied,
            # probe 78; the device peak is the same, the params' own memory)
            released = []
            for (start, _, idx), host in zip(self._bucket_layout, hosts, strict=True):
                for i in idx:
                    view = host.narrow(0, self.offsets[i] - start, self.numels[i]).view(self.shapes[i])
                    view.copy_(params[i].data, non_blocking=pin)
                    staged.append((i, view, _where(params[i])))
                    released.append(params[i].data)
                    params[i].data = view
            del released  # the device copies are released here (if nothing else holds them)
            if any(outside_storage(h) for h in hosts):  # (a finalizer freed a host copy through its param)
                staged.clear()  # (nothing to put back from: the params keep what they hold)
                raise RuntimeError(f"{fn}: a param's host copy was freed while the device copies were released (by "
                                   "a finalizer of a param's storage): nothing was copied into the buffer")  # fmt: skip
            self._allocate()
            for bucket, host in zip(self.buckets, hosts, strict=True):
                bucket.data.copy_(host, non_blocking=pin)
            self.bind_data_(params)
        except BaseException as e:
            _unstage(params, staged, e)
            raise
        return self

    @classmethod
    @no_user_code
    def for_grads(
        cls,
        params: Iterable[Tensor],
        align: int = 64,
        bucket_cap_mb: float | None = None,
        world_size: int = 1,
        *,
        backend: str | None = None,
    ) -> FlatBuffer:
        """A buffer shaped like ``params`` whose views become the params' ``.grad`` (existing grads copied in,
        the rest zero), so that backward accumulates straight into it.

        Keep the views: zero the grads with :meth:`zero_` or ``optimizer.zero_grad(set_to_none=False)``;
        ``set_to_none=True`` (torch's default) detaches the grads from the buffer.
        """
        fn = "FlatBuffer.for_grads"
        self = cls.__new__(cls)
        params = self._plan(params, None, align, bucket_cap_mb, world_size, None, backend, fn, "params")
        _check_distinct(fn, "params", params)
        have = [i for i, p in enumerate(params) if p.grad is not None]
        # (the grads are read below through their methods: none may run code of its own, see check_no_overrides)
        check_no_overrides(fn, "", [params[i].grad for i in have], label=lambda k: f"params[{have[k]}].grad")
        for i in have:
            g = params[i].grad
            if g.layout != torch.strided:
                raise TypeError(f"{fn}: params[{i}].grad must be a dense tensor, got {g.layout}")
            if not functional._has_memory(type(g)):
                raise TypeError(f"{fn}: params[{i}].grad is a {type(g).__name__}, not a plain tensor with memory of "
                                "its own")  # fmt: skip
            if g.device != self.device:
                raise ValueError(f"{fn}: params[{i}].grad is on {g.device}, the params on {self.device}")
            check_storage(fn, f"params[{i}].grad", [g], indexed=False)  # (read by cast_, which would name itself)
        self._allocate()
        self.data.zero_()
        if have:
            functional.cast_([self._views[i] for i in have], [params[i].grad for i in have], backend=backend)
        self.bind_grads_(params)
        return self

    # -- views and copies ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> Tensor:
        return self.views[i]

    def __iter__(self):
        return iter(self.views)

    def __repr__(self) -> str:
        return (f"FlatBuffer({len(self)} tensors, {self.numel} elements of {self.dtype} on {self.device}, "
                f"{len(self.buckets)} buckets, align={self.align}, world_size={self.world_size})")  # fmt: skip

    def _check_like(self, fn: str, tensors, name: str = "tensors", floating: bool = True) -> list:
        """``tensors`` as a list of one dense tensor per view, each with its view's shape."""
        if floating:
            tensors = functional._float_tensors(fn, name, tensors)
        else:
            if isinstance(tensors, Tensor) or not isinstance(tensors, Iterable):
                raise TypeError(f"{fn}: {name} must be a sequence of tensors, got {type(tensors).__name__}")
            tensors = list(tensors)
            if not functional._all_tensors(tensors):
                i = next(i for i, x in enumerate(tensors) if not isinstance(x, Tensor))
                raise TypeError(f"{fn}: {name}[{i}] must be a Tensor, got {type(tensors[i]).__name__}")
            if any(x.is_nested for x in tensors):  # (its layout reads strided; it has no shape to compare)
                i = next(i for i, x in enumerate(tensors) if x.is_nested)
                raise TypeError(f"{fn}: {name}[{i}] must be a dense tensor, got a nested tensor")
        if len(tensors) != len(self.views):
            raise ValueError(f"{fn}: got {len(tensors)} tensors, the buffer holds {len(self.views)}")
        if all(x.shape == shape for x, shape in zip(tensors, self.shapes)):  # the loop below names the offender
            return tensors
        for i, x in enumerate(tensors):
            if x.shape != self.shapes[i]:
                raise ValueError(f"{fn}: {name}[{i}] has shape {tuple(x.shape)}, expected {tuple(self.shapes[i])}")
        return tensors

    def _check_data(self, fn: str) -> Tensor:
        """``data`` as every method uses it (it may have been given other memory, by ``buf.data = t`` or
        ``buf.data.set_(t)``): a dense contiguous 1-d tensor of the buffer's dtype and device, with at least the
        layout's ``numel`` elements, inside its storage (not freed or shrunk in place), not a negated view."""
        data = self.data
        if not isinstance(data, Tensor) or not has_memory(type(data)):
            raise TypeError(f"{fn}: data (FlatBuffer.data) must be a plain tensor with memory of its own, got a "
                            f"{type(data).__name__}")  # fmt: skip
        if data.layout != torch.strided:
            raise TypeError(f"{fn}: data (FlatBuffer.data) must be a dense tensor, got {data.layout}")
        if (data.dtype != self.dtype or data.device != self.device or data.dim() != 1 or data.numel() < self.numel
                or not data.is_contiguous()):  # fmt: skip
            raise ValueError(f"{fn}: data (FlatBuffer.data) must be a contiguous 1-d tensor of {self.dtype} on "
                             f"{self.device} with at least {self.numel} elements (the buffer's layout), got "
                             f"{'a contiguous' if data.is_contiguous() else 'a non-contiguous'} {data.dim()}-d tensor "
                             f"of {data.numel()} elements of {data.dtype} on {data.device}")  # fmt: skip
        check_storage(fn, "data", [data], indexed=False)
        return data

    def _check_sources(self, fn: str, tensors: list[Tensor]) -> None:
        """What :meth:`copy_from_` reads is on the buffer's device."""
        if {x.device for x in tensors} - {self.device}:
            for i, x in enumerate(tensors):
                if x.device != self.device:
                    raise ValueError(f"{fn}: tensors[{i}] is on {x.device}, the buffer on {self.device}")

    @no_user_code
    def copy_from_(self, tensors: Sequence[Tensor]) -> FlatBuffer:
        """Copy ``tensors`` into the buffer (one launch; padding written as zeros). Other dtypes are rounded to
        nearest even. The tensors must share no memory with the buffer."""
        fn = "FlatBuffer.copy_from_"
        tensors = self._check_like(fn, tensors)
        data = self._check_data(fn)
        self._check_sources(fn, tensors)
        functional._check_memory(fn, [("tensors", tensors, False, True, functional._all_contiguous(tensors)),
                                      ("the buffer", [data], True, False, True)])  # fmt: skip
        self._copy_from(tensors)
        return self

    def _copy_from(self, tensors: list[Tensor]) -> None:
        """:meth:`copy_from_` once checked (``data`` too), into ``data`` as it is now."""
        if not tensors:
            self.data.zero_()
            return
        if {x.dtype for x in tensors} == {self.dtype}:
            self._gather(tensors)
        else:
            # (the padding's views first: after the cast only an in-place zero, which allocates nothing)
            layout = zip(self.offsets, self.numels, self._spans, strict=True)
            gaps = [self.data.narrow(0, off + n, span - n) for off, n, span in layout if span > n]
            functional.cast_(self._read_views(), tensors, backend=self.backend)
            if gaps:
                torch._foreach_zero_(gaps)

    def _backend(self) -> str:
        from .functional import _op_backend

        return _op_backend("FlatBuffer", self.backend, self.device, [self.dtype],
                           (torch.float32, torch.bfloat16, torch.float16, torch.float64))  # fmt: skip

    def _gather(self, tensors: list[Tensor]) -> None:
        srcs = functional._contiguous(tensors)
        _ops.flatten_into_eager(self.data, srcs, self.offsets, self._spans, self._backend())

    @no_user_code
    def copy_to_(self, tensors: Sequence[Tensor]) -> None:
        """Copy each view back into ``tensors[i]`` (one launch; other dtypes rounded to nearest even). The tensors
        are written in place: contiguous, on the buffer's device, sharing no memory with each other or with the
        buffer (``tensors[i]`` may be view ``i`` itself)."""
        fn = "FlatBuffer.copy_to_"
        tensors = self._check_like(fn, tensors)
        self._check_data(fn)
        if not tensors:
            return
        if not functional._all_contiguous(tensors) or {x.device for x in tensors} - {self.device}:
            for i, x in enumerate(tensors):
                if not x.is_contiguous():
                    raise ValueError(f"{fn}: tensors[{i}] must be contiguous (it is written in place)")
                if x.device != self.device:
                    raise ValueError(f"{fn}: tensors[{i}] is on {x.device}, the buffer on {self.device}")
        views = self._read_views()
        functional._check_memory(fn, [("tensors", tensors, True, True, True), ("view", views, False, True, True)],
                                 same=(0, 1))  # fmt: skip
        if {x.dtype for x in tensors} == {self.dtype}:
            _ops.unflatten_copy_eager(tensors, self.data, self.offsets, self._backend())
        else:
            with torch.no_grad():  # (params are written as an optimizer writes them)
                functional.cast_(tensors, views, backend=self.backend)

    def _read_views(self) -> list[Tensor]:
        """The segments of ``data`` as it is now, which the methods read and write: the buffer's own views (never
        handed out, so only ``data`` can have moved) while they still lie there (two address comparisons), else new
        views (``data`` was given other memory by ``set_()`` or ``buf.data = t``)."""
        views, data = self._views, self.data
        size = data.element_size()
        if not views or (
            views[0].data_ptr() == data.data_ptr() + self.offsets[0] * size
            and views[-1].data_ptr() == data.data_ptr() + self.offsets[-1] * size
        ):
            return views
        layout = zip(self.offsets, self.numels, views, strict=True)
        return [data.narrow(0, off, n).view(v.shape) for off, n, v in layout]

    @no_user_code
    def zero_(self) -> FlatBuffer:
        """Zero the whole storage (e.g. grads before the next accumulation), keeping the views bound."""
        data = self._check_data("FlatBuffer.zero_")
        functional._check_memory("FlatBuffer.zero_", [("the buffer", [data], True, False, True)])  # (inference data)
        data.zero_()
        return self

    def bind_data_(self, tensors: Sequence[Tensor]) -> None:
        """Make each ``tensors[i].data`` the buffer's view ``i`` of ``data`` as it is now (plain dense tensors of the
        buffer's shape, dtype and device required; each tensor once). Everything is checked before the first is
        bound."""
        fn = "FlatBuffer.bind_data_"
        tensors = self._check_like(fn, tensors, floating=False)
        self._check_data(fn)
        if self._unlike(tensors):
            for i, x in enumerate(tensors):
                self._check_bindable(fn, f"tensors[{i}]", x)
                if x.dtype != self.dtype:
                    raise ValueError(f"{fn}: tensors[{i}] is {x.dtype}, the buffer {self.dtype}")
                if x.device != self.device:
                    raise ValueError(f"{fn}: tensors[{i}] is on {x.device}, the buffer on {self.device}")
        _check_distinct(fn, "tensors", tensors)
        views = self._read_views()
        olds: list[Tensor] = []
        try:
            for x, view in zip(tensors, views, strict=True):
                olds.append(x.data)
                x.data = view
        except BaseException:  # (every tensor bound as it was)
            for x, old in zip(tensors, olds):
                x.data = old
            raise

    def bind_grads_(self, params: Sequence[Tensor]) -> None:
        """Make each ``params[i].grad`` the buffer's view ``i`` of ``data`` as it is now (plain dense params of the
        buffer's shape, dtype and device; each param once). Everything is checked before the first is bound."""
        fn = "FlatBuffer.bind_grads_"
        params = self._check_like(fn, params, "params", floating=False)
        self._check_data(fn)
        if self._unlike(params):
            for i, p in enumerate(params):
                self._check_bindable(fn, f"params[{i}]", p)
                if p.dtype != self.dtype or p.device != self.device:
                    raise ValueError(f"{fn}: params[{i}] is {p.dtype} on {p.device}, the buffer is {self.dtype} on "
                                     f"{self.device}")  # fmt: skip
        for i, p in enumerate(params):  # (torch refuses a grad of another dtype than a param's ``grad_dtype``)
            grad_dtype = getattr(p, "grad_dtype", p.dtype)
            if grad_dtype is not None and grad_dtype != self.dtype:
                raise ValueError(f"{fn}: params[{i}] takes {grad_dtype} grads (its grad_dtype), the buffer is "
                                 f"{self.dtype}")  # fmt: skip
        _check_distinct(fn, "params", params)
        views = self._read_views()
        olds: list[Tensor | None] = []
        try:
            for p, view in zip(params, views, strict=True):
                olds.append(p.grad)
                p.grad = view.view(view.shape)  # (an alias of its own: the buffer's views are never handed out)
        except BaseException:  # (every grad as it was)
            for p, old in zip(params, olds):
                p.grad = old
            raise

    def _unlike(self, tensors: list[Tensor]) -> bool:
        """Whether some tensor is not a plain dense tensor of the buffer's dtype and device (one pass over each
        attribute; the caller's loop then names the first)."""
        return bool(
            not all(map(has_memory, {type(x) for x in tensors}))
            or {x.layout for x in tensors} - {torch.strided}
            or any(x.is_nested for x in tensors)
            or {x.dtype for x in tensors} - {self.dtype}
            or {x.device for x in tensors} - {self.device}
        )

    @staticmethod
    def _check_bindable(fn: str, label: str, x: Tensor) -> None:
        """A tensor whose ``.data`` or ``.grad`` a plain dense view can become (torch refuses the others only on
        assignment, after the earlier tensors of the list were bound)."""
        if not has_memory(type(x)):
            raise TypeError(f"{fn}: {label} is a {type(x).__name__}, not a plain tensor with memory of its own")
        if x.layout != torch.strided or x.is_nested:  # (a nested tensor's layout reads strided)
            got = "a nested tensor" if x.is_nested else x.layout
            raise TypeError(f"{fn}: {label} must be a dense tensor, got {got}")


def _where(x: Tensor) -> tuple:
    """Where ``x.data`` lies, to put it back (:func:`_unstage`): a weak reference to its storage (None if it has
    none), its storage offset, shape, strides, dtype and device."""
    data = x.data
    try:
        ref = weakref.ref(data.untyped_storage())
    except (RuntimeError, TypeError, NotImplementedError):
        ref = None
    return ref, data.storage_offset(), data.shape, data.stride(), data.dtype, data.device


def _unstage(params: list[Tensor], staged: list[tuple[int, Tensor, tuple]], error: BaseException) -> None:
    """Put each staged param of :meth:`FlatBuffer.from_params` back as it was, after ``error``: on its original
    memory if something still holds it (the values there were not written), else on a new tensor of its original
    device, dtype, shape and strides holding its values (from its host copy, ``view``). A param whose new tensor
    cannot be allocated stays on its host copy (named in a note on ``error``)."""
    failed = []
    for i, view, (ref, offset, size, stride, dtype, device) in staged:
        storage = ref() if ref is not None else None
        try:
            if storage is not None:
                params[i].data = torch.empty(0, dtype=dtype, device=device).set_(storage, offset, size, stride)
            else:
                fresh = torch.empty_strided(size, stride, dtype=dtype, device=device)
                fresh.copy_(view)
                params[i].data = fresh
        except Exception:  # (out of memory again: the others are still put back)
            failed.append(i)
    if failed and staged[0][2][5].type == "cuda":
        # (those params stay on their pinned host copies, written by non-blocking copies that may still be running)
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(staged[0][2][5])
    if failed and hasattr(error, "add_note"):
        error.add_note(f"FlatBuffer.from_params: params {failed} could not be put back on {staged[0][2][5]}: they "
                       "hold their values in host memory")  # fmt: skip


def _check_distinct(fn: str, name: str, tensors: list[Tensor]) -> None:
    """Each tensor object once (binding one twice would leave it on the last view, the first one orphaned)."""
    if len({id(x) for x in tensors}) == len(tensors):
        return
    first: dict[int, int] = {}
    for i, x in enumerate(tensors):
        if id(x) in first:
            raise ValueError(f"{fn}: {name}[{i}] is {name}[{first[id(x)]}] (each tensor may be listed once)")
        first[id(x)] = i


def _map_tensors(state: dict, fn) -> None:
    """Apply ``fn`` in place to the tensors of a FlatBuffer's pickled ``state`` that share its storage: ``data``, each
    view and each bucket's data."""
    if "data" in state:
        state["data"] = fn(state["data"])
    for key in ("views", "_views"):
        if key in state:
            state[key] = [fn(v) for v in state[key]]
    if "buckets" in state:
        state["buckets"] = [dataclasses.replace(b, data=fn(b.data)) if isinstance(b, Bucket) else b
                            for b in state["buckets"]]  # fmt: skip
