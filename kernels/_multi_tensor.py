"""Chunk tables: many tensors -> one launch.

A multi-tensor launch covers ``n_tensors`` tensors, each seen through ``n_roles`` same-sized tensors (for
Adam: param, grad, exp_avg, exp_avg_sq, ...). The launcher packs, into ONE int64 device tensor:

    [ addr[role 0][0..T) | addr[role 1][0..T) | ... | numel[0..T) | chunk_tensor[0..C) | chunk_start[0..C) ]

``addr`` are ``data_ptr()`` values (the kernel casts them to typed pointers), ``numel`` the element counts,
and for each of the ``C`` programs the tensor it works on and the element where its chunk starts. One
program handles at most ``chunk_size`` elements of one tensor, so a 10-element tensor costs one small
program and a 10^9-element tensor ``10^9 / chunk_size`` programs. All entries are int64, so tensors and
offsets past 2^31 elements are addressed correctly.

Building the table is host work proportional to the number of tensors; it is cached by the tuple of
addresses and sizes, so a training loop pays it once (and a CUDA graph can replay the launch, because
the cached table stays alive in the cache the caller owns).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class ChunkTable:
    """A packed chunk table on the tensors' device, with the offsets of its sections."""

    table: torch.Tensor  # int64, on the tensors' device
    n_tensors: int
    n_chunks: int
    numel_offset: int  # index of numel[0] in ``table``
    chunk_tensor_offset: int  # index of chunk_tensor[0]
    chunk_start_offset: int  # index of chunk_start[0]
    aligned: bool  # every address is a multiple of 16 bytes (the kernels may then use 128-bit accesses)
    counters: torch.Tensor | None = None  # int32 zeros, one per tensor (``with_counters``): see below
    role_aligned: tuple[bool, ...] = ()  # ``aligned`` per role (``aligned`` is their conjunction)


class _LRU(OrderedDict):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


# Used when the caller does not pass a cache of its own. Optimizers pass their own dict, so that the
# tables a captured CUDA graph reads stay alive as long as the optimizer does.
_DEFAULT_CACHE: MutableMapping = _LRU(capacity=32)


def build_chunk_table(
    roles: Sequence[Sequence[torch.Tensor]],
    chunk_size: int,
    cache: MutableMapping | None = None,
    check: Callable[[], None] | None = None,
    with_counters: bool = False,
) -> ChunkTable:
    """Return the chunk table of ``roles`` (a list of same-length tensor lists), cached by address.

    Every tensor of tensor index ``t`` must have the same number of elements in every role and be
    contiguous; all tensors must be on one device. Tensors with no elements get no chunk, unless
    ``with_counters``: then every tensor gets at least one program, and the table carries one int32 arrival
    counter per tensor (zeros) with which the last program of a tensor can tell it is last (kernels that do
    per-tensor work once per launch, such as incrementing a step count, and reset the counter). ``check`` is
    called before a table is built (not on a cache hit), so launchers validate inputs once per layout.
    """
    if chunk_size <= 0 or chunk_size % 16:
        # Kernels tell the compiler that chunk starts are multiples of 16 elements (vectorised accesses).
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size}")
    first = roles[0]
    n_tensors = len(first)
    numels = [t.numel() for t in first]
    addrs = [t.data_ptr() for role in roles for t in role]
    key = (tuple(addrs), tuple(numels), chunk_size, first[0].device if n_tensors else None, with_counters)
    if cache is None:
        cache = _DEFAULT_CACHE
    hit = cache.get(key)
    if hit is not None:
        return hit
    if check is not None:
        check()

    chunk_tensor: list[int] = []
    chunk_start: list[int] = []
    for t, n in enumerate(numels):
        starts = range(0, max(n, 1) if with_counters else n, chunk_size)
        chunk_tensor.extend([t] * len(starts))
        chunk_start.extend(starts)
    n_chunks = len(chunk_tensor)
    host = torch.tensor(addrs + numels + chunk_tensor + chunk_start, dtype=torch.int64)
    device = first[0].device if n_tensors else torch.device("cpu")
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    numel_offset = len(addrs)
    result = ChunkTable(
        table=table,
        n_tensors=n_tensors,
        n_chunks=n_chunks,
        numel_offset=numel_offset,
        chunk_tensor_offset=numel_offset + n_tensors,
        chunk_start_offset=numel_offset + n_tensors + n_chunks,
        aligned=all(a % 16 == 0 for a in addrs),
        counters=torch.zeros(n_tensors, dtype=torch.int32, device=device) if with_counters else None,
        role_aligned=tuple(all(a % 16 == 0 for a in addrs[r * n_tensors : (r + 1) * n_tensors])
                           for r in range(len(roles))),
    )  # fmt: skip
    cache[key] = result
    return result


def repoint_role(table: ChunkTable, role: int, addrs: list[int], staging: torch.Tensor | None = None) -> ChunkTable:
    """Write new addresses for every tensor of ``role`` into ``table`` (in place); return the updated table.

    For a table that a caller owns (built with a private ``cache``, never shared: a shared table is found by
    its old addresses) whose tensors of one role moved, e.g. gradients that backward allocates afresh every
    step, with the same sizes (the caller checks). Costs one small host-to-device copy instead of a rebuild;
    the copy is ordered on the current stream after the launches that read the old addresses.

    CUDA tables: the copy's source is pinned host memory, a new block each call, or ``staging`` (int64 pinned,
    ``n_tensors`` long) when given. During CUDA graph capture pass a staging buffer allocated before the
    capture began (pinning memory during capture is not safe on every torch version) and keep it alive, never
    writing it again, as long as the graph: every replay copies from it.
    """
    n = table.n_tensors
    if len(addrs) != n:
        raise ValueError(f"repoint_role: {len(addrs)} addresses for a table of {n} tensors")
    host = torch.tensor(addrs, dtype=torch.int64)
    dst = table.table[role * n : (role + 1) * n]
    if staging is not None:
        staging.copy_(host)
        host = staging
    if dst.device.type == "cuda":
        dst.copy_(host if staging is not None else host.pin_memory(), non_blocking=True)
    else:
        dst.copy_(host)
    role_aligned = list(table.role_aligned)
    role_aligned[role] = all(a % 16 == 0 for a in addrs)
    return dataclasses.replace(table, aligned=all(role_aligned), role_aligned=tuple(role_aligned))


@triton.jit
def tensor_pointer(table_ptr, role, n_tensors, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed base pointer of tensor ``t`` in ``role`` of a chunk table.

    With ALIGNED (the launcher checked that every address is a multiple of 16 bytes) the compiler is told so:
    with chunk starts that are multiples of 16 elements, full blocks then load and store 128 bits at a time.
    """
    ptr = tl.load(table_ptr + role * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # on the pointer: a hint on the integer does not survive the cast
    return ptr
