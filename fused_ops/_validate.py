"""Checks shared by both backends: what a multi-tensor launch (Triton) or torch's private fused CPU kernels (which
check nothing) rely on, verified before anything is modified, with errors that name the argument and the index."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def first_overlap(named: Sequence[tuple[str, Sequence[Tensor]]], read_only: Sequence[str] = ()) -> str | None:
    """``None`` when no two of the tensors share a byte of memory, else a sentence naming the first pair found.

    ``named``: (argument name, tensors) pairs; the tensors must be dense. Tensors of the names in ``read_only`` may
    share memory with each other (they are only read), not with the others. One sort of the byte ranges (in C++);
    empty tensors take no memory and never overlap.
    """
    names, index, starts, ends, devices = [], [], [], [], []
    for name, tensors in named:
        for i, t in enumerate(tensors):
            n = t.numel()
            if n == 0:
                continue
            start = t.data_ptr()
            if t.is_contiguous():
                span = n
            else:  # the last element the tensor can reach, from its strides
                span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
            names.append(name)
            index.append(i)
            starts.append(start)
            ends.append(start + span * t.element_size())
            devices.append(t.device)
    if len(starts) < 2:
        return None
    if len(starts) <= 512 and len(set(devices)) == 1:  # few ranges: a plain sort and sweep beats torch's overheads
        order = sorted(range(len(starts)), key=starts.__getitem__)
        end_all = end_written = -1
        who_all = who_written = -1
        for k in order:
            ro = names[k] in read_only
            if starts[k] < (end_written if ro else end_all):
                other = who_written if ro else who_all
                a, b = sorted((other, k))
                return f"{names[a]}[{index[a]}] and {names[b]}[{index[b]}] share memory"
            if ends[k] > end_all:
                end_all, who_all = ends[k], k
            if not ro and ends[k] > end_written:
                end_written, who_written = ends[k], k
        return None
    device_ids = {d: k for k, d in enumerate(dict.fromkeys(devices))}
    # (CUDA's unified addressing keeps devices apart already; the device key makes it hold everywhere)
    key = torch.tensor([device_ids[d] for d in devices], dtype=torch.int64)
    ro = torch.tensor([n in read_only for n in names], dtype=torch.bool)
    s = torch.tensor(starts, dtype=torch.int64)
    e = torch.tensor(ends, dtype=torch.int64)
    # Devices apart (a large offset per device: addresses are below 2^56), then by start.
    s_key = s + (key << 56) if len(device_ids) > 1 else s
    e_key = e + (key << 56) if len(device_ids) > 1 else e
    order = torch.argsort(s_key, stable=True)
    s_key, e_key, ro_o = s_key[order], e_key[order], ro[order]
    # Running maxima of the earlier ends: of every interval, and of the written ones. A written interval overlaps
    # an earlier one iff it starts before the first maximum; a read-only one iff before the second.
    floor = torch.iinfo(torch.int64).min
    all_max = torch.cummax(e_key, 0).values
    written_max = torch.cummax(torch.where(ro_o, torch.full_like(e_key, floor), e_key), 0).values
    limit = torch.where(ro_o[1:], written_max[:-1], all_max[:-1])
    bad = s_key[1:] < limit
    if not bool(bad.any()):
        return None
    k = int(torch.nonzero(bad)[0]) + 1
    later = int(order[k])
    candidates = (e_key[:k] > s_key[k]) & (~ro_o[:k] if bool(ro_o[k]) else torch.ones(k, dtype=torch.bool))
    earlier = int(order[:k][candidates][0])
    a, b = sorted((earlier, later))
    return f"{names[a]}[{index[a]}] and {names[b]}[{index[b]}] share memory"


def check_scalar(fn: str, name: str, x, device: torch.device | None = None) -> Tensor | None:
    """``x`` (None, or a 1-element floating-point tensor) as a 1-element tensor on ``device`` (moved when it lives
    elsewhere: a kernel reads it through a raw pointer on ``device``). Raises ``ValueError`` naming ``name``."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a 1-element floating-point tensor, got {type(x).__name__}")
    if x.numel() != 1 or not x.is_floating_point() or x.layout != torch.strided:
        raise ValueError(f"{fn}: {name} must be a 1-element floating-point tensor, got shape {tuple(x.shape)} and "
                         f"dtype {x.dtype}")  # fmt: skip
    if device is not None and x.device != device:
        x = x.to(device)
    return x


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def first_without_storage(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor whose ``data_ptr()`` is not the address of its elements: a tensor subclass with a
    dispatch of its own (DTensor, wrapper subclasses, fake tensors) or a meta tensor; None when there is none.
    A kernel given such an address reads or writes memory that is not the tensor's."""
    types = {type(t) for t in tensors}
    if all(getattr(cls, "__torch_dispatch__", _PLAIN_DISPATCH) is _PLAIN_DISPATCH for cls in types):
        if not any(t.is_meta for t in tensors):
            return None
    for i, t in enumerate(tensors):
        if getattr(type(t), "__torch_dispatch__", _PLAIN_DISPATCH) is not _PLAIN_DISPATCH or t.is_meta:
            return i
    return None  # pragma: no cover
