"""Gather many tensors into one flat buffer, or scatter it back: one launch for any number of tensors.

Tensor ``i`` owns the segment ``flat[offsets[i] : offsets[i] + spans[i]]`` of the flat buffer, with
``spans[i] >= numel(tensor i)``. Gathering writes the tensor's elements at the start of its segment and
zeros over the rest (the alignment padding), so every element of the flat buffer is written exactly once
and the buffer can be allocated with ``torch.empty`` (no separate zero-fill pass). Scattering copies the
first ``numel`` elements of each segment back into the tensor.

The chunk table (``_multi_tensor.py``) is built over the flat segments (one role); the tensors' own
addresses and element counts travel in a second chunk table (only its address and size sections are read),
built over the tensors. Both are cached by address; the checks run on every call.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import MutableMapping, Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_role, inside_storage, no_user_code
from ._multi_tensor import (
    _DEFAULT_CACHE,
    TABLE_INTS,
    build_chunk_table,
    is_capturing,
    keep_for_capture,
    tensor_pointer,
    use_on_current_stream,
)

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


@triton.jit(do_not_specialize=TABLE_INTS)
def _flatten_kernel(
    table_ptr,  # int64 chunk table over the flat segments: addresses, spans, per-program segment and start
    n_tensors,
    numel_offset,
    chunk_tensor_offset,
    chunk_start_offset,
    tensors_ptr,  # int64 chunk table over the tensors: [addr[0..T) | numel[0..T) | ...] (numel[t] <= span[t])
    DTYPE: tl.constexpr,
    SCATTER: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor and segment starts on a 16-byte boundary: lets the compiler vectorise
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Copy one chunk between a tensor and its segment of the flat buffer (a bit copy, no arithmetic):

    gather  (SCATTER=False): segment[i] = tensor[i] if i < numel else 0,   for i < span
    scatter (SCATTER=True):  tensor[i]  = segment[i],                      for i < numel
    """
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(table_ptr + chunk_tensor_offset + pid)
    chunk_start = tl.multiple_of(tl.load(table_ptr + chunk_start_offset + pid), 16)  # CHUNK_SIZE % 16 == 0
    span_here = tl.minimum(tl.load(table_ptr + numel_offset + t) - chunk_start, CHUNK_SIZE)
    n_valid = tl.minimum(tl.load(tensors_ptr + n_tensors + t) - chunk_start, CHUNK_SIZE)
    segment_ptr = tensor_pointer(table_ptr, 0, n_tensors, t, DTYPE, ALIGNED) + chunk_start
    tensor_ptr = tensor_pointer(tensors_ptr, 0, n_tensors, t, DTYPE, ALIGNED) + chunk_start
    if SCATTER:
        n_here = n_valid
    else:
        n_here = span_here

    for block_start in tl.range(0, CHUNK_SIZE, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        # Blocks inside the tensor: a mask provably uniform per 16 lanes, so accesses are vectorised.
        if block_start + BLOCK_SIZE <= n_valid:
            full = offsets < block_start + BLOCK_SIZE
            _copy_block(segment_ptr, tensor_ptr, offsets, full, full, SCATTER)
        elif block_start < n_here:
            # Padding past the tensor's end is written as zeros, so the buffer never holds garbage.
            _copy_block(segment_ptr, tensor_ptr, offsets, offsets < n_valid, offsets < span_here, SCATTER)


@triton.jit
def _copy_block(segment_ptr, tensor_ptr, offsets, valid, in_span, SCATTER: tl.constexpr):
    if SCATTER:
        tl.store(tensor_ptr + offsets, tl.load(segment_ptr + offsets, mask=valid), mask=valid)
    else:
        x = tl.load(tensor_ptr + offsets, mask=valid, other=0.0)
        tl.store(segment_ptr + offsets, x, mask=in_span)


def _check_flat(flat) -> None:
    if not isinstance(flat, torch.Tensor) or flat.layout != torch.strided:
        raise TypeError("flatten_launch: flat must be a dense tensor")
    if flat.dtype not in _TL_DTYPES:
        raise TypeError(f"flatten_launch: flat must be float32, bfloat16, float16 or float64, got {flat.dtype}")
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError("flatten_launch: flat must be a contiguous 1-d tensor")
    if not inside_storage(flat):  # (at every call: the segments' table is cached by flat's address)
        raise ValueError("flatten_launch: flat lies outside its storage (a storage freed or shrunk in place, e.g. by "
                         "untyped_storage().resize_(0))")  # fmt: skip


def _check(flat, tensors, spans) -> None:
    """Every tensor of flat's dtype, on flat's device, contiguous, and no longer than its segment."""
    check_role("flatten_launch", "tensors", tensors, _TL_DTYPES, flat.device, flat.dtype)
    numels = [x.numel() for x in tensors]
    if all(n <= span for n, span in zip(numels, spans, strict=True)):
        return
    i = next(i for i, (n, span) in enumerate(zip(numels, spans, strict=True)) if n > span)
    raise ValueError(f"flatten_launch: tensors[{i}] has {numels[i]} elements, its segment only {spans[i]}")


def _segments(flat: torch.Tensor, offsets: Sequence[int], spans: Sequence[int]) -> list[torch.Tensor]:
    """1-d views ``flat[offsets[i] : offsets[i] + spans[i]]``."""
    if list(offsets) == list(itertools.accumulate(spans[:-1], initial=offsets[0])):
        # Adjacent segments (the layouts of fused_ops.flatten and FlatBuffer): one split, views made in C++.
        return list(flat.narrow(0, offsets[0], offsets[-1] + spans[-1] - offsets[0]).split_with_sizes(list(spans)))
    base = flat.storage_offset()
    return [flat.as_strided((int(span),), (1,), base + int(off)) for off, span in zip(offsets, spans, strict=True)]


@no_user_code
def flatten_launch(
    flat: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int],
    spans: Sequence[int],
    *,
    scatter: bool = False,
    chunk_size: int = 65536,
    block_size: int = 1024,
    cache: MutableMapping | None = None,
) -> None:
    """Gather ``tensors`` into ``flat`` (``scatter=False``) or scatter ``flat`` back into them, in one launch.

    ``flat[offsets[i] : offsets[i] + spans[i]]`` is tensor ``i``'s segment; a gather zero-fills the part of
    each segment past the tensor's end. Segments must not overlap (not checked: the layout comes from
    ``fused_ops``). Inputs are checked on every call; the tables are cached by address.
    """
    if len(tensors) == 0:
        return
    if cache is None:
        cache = _DEFAULT_CACHE
    _check_flat(flat)
    if len(offsets) != len(tensors) or len(spans) != len(tensors):
        raise ValueError(f"flatten_launch: {len(tensors)} tensors but {len(offsets)} offsets and {len(spans)} spans")
    _check(flat, tensors, spans)
    n_flat = flat.numel()
    # The segments' chunk table, by flat's address and the layout (which is all it depends on, so the bounds are
    # checked once per key): no view per segment on the next call.
    segments_key = ("flatten_segments", flat.data_ptr(), n_flat, flat.dtype, flat.device, tuple(offsets),
                    tuple(spans), chunk_size)  # fmt: skip
    table = cache.get(segments_key)
    if table is None:
        for i, (off, span) in enumerate(zip(offsets, spans, strict=True)):
            if off < 0 or span < 0 or off + span > n_flat:
                raise ValueError(
                    f"flatten_launch: segment {i} [{off}, {off + span}) is outside flat ({n_flat} elements)"
                )
        table = build_chunk_table([_segments(flat, offsets, spans)], chunk_size, cache)
        cache[segments_key] = table
    elif is_capturing(flat.device):
        keep_for_capture(table)  # a captured graph reads it: never freed, whatever the cache evicts
    # The tensors' addresses and sizes: a chunk table of their own (cached by address, kept for a capture), of
    # which the kernel reads the first two sections.
    info = build_chunk_table([tensors], chunk_size, cache)
    if table.n_chunks == 0:
        return
    use_on_current_stream(table)
    use_on_current_stream(info)
    with torch.cuda.device(flat.device) if flat.is_cuda else contextlib.nullcontext():
        _flatten_kernel[(table.n_chunks,)](
            table.table,
            table.n_tensors,
            table.numel_offset,
            table.chunk_tensor_offset,
            table.chunk_start_offset,
            info.table,
            DTYPE=_TL_DTYPES[flat.dtype],
            SCATTER=scatter,
            ALIGNED=table.aligned and info.aligned,
            CHUNK_SIZE=chunk_size,
            BLOCK_SIZE=block_size,
        )
