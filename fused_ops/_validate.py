"""Checks shared by both backends: what a multi-tensor launch (Triton) or torch's private fused CPU kernels (which
check nothing) rely on, verified before anything is modified, with errors that name the argument and the index."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from itertools import islice
from operator import add as _add
from operator import attrgetter
from operator import le as _le

import torch
import torch.utils._python_dispatch
from torch import Tensor


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
    if not torch.compiler.is_compiling() and (x.is_meta or not has_memory(type(x)) or outside_storage(x)):
        raise ValueError(f"{fn}: {name} must be a tensor with memory: it is a {type(x).__name__} on {x.device} "
                         f"{'(meta)' if x.is_meta else 'outside its storage (freed or shrunk in place)'}")  # fmt: skip
    if device is not None and x.device != device:
        x = x.to(device)
    return x


_PLAIN_DISPATCH = Tensor.__torch_dispatch__


def has_memory(cls) -> bool:
    """Whether tensors of class ``cls`` hold their elements at ``data_ptr()``: not a subclass with a dispatch of its
    own (DTensor, wrapper subclasses, fake tensors), whose address a kernel would read as the elements'."""
    return issubclass(cls, Tensor) and getattr(cls, "__torch_dispatch__", _PLAIN_DISPATCH) is _PLAIN_DISPATCH


_OWN_DICT = Tensor.__dict__["__dict__"].__get__  # (the object's own dict: not a __dict__ its class defines)
_SIZE, _STRIDE = torch._C.TensorBase.size, torch._C.TensorBase.stride
_DTYPE, _DEVICE = torch._C.TensorBase.dtype.__get__, torch._C.TensorBase.device.__get__


def _is_dtensor_class(cls: type) -> bool:
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and issubclass(cls, dtensor)


class _Custom(Exception):
    pass


class _CustomMetadata(torch.utils._python_dispatch.TorchDispatchMode):
    """Raises at the first op dispatched to Python: a tensor's sizes or strides computed by its class's dispatch
    (``dispatch_sizes_strides_policy``) reach a mode before the class."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise _Custom(str(func))


def inner_name(x: Tensor) -> list[str] | None:
    """The attributes under which wrapper subclass ``x`` keeps its inner tensors (``__tensor_flatten__``, the protocol
    of torch's traceable wrapper subclasses), or None where ``x`` is no wrapper the step can launch through: its
    class (not a DTensor) has no dispatch of its own, or computes its sizes or strides in its dispatch (which every
    check after this would run), or does not flatten into a list of names. :func:`inner_of` then picks the one
    tensor that holds the elements. torchao's float8 training weights (``WeightWithDynamicFloat8CastTensor``, FSDP2's
    float8 all-gather) are such wrappers: their dispatch runs each op on the inner tensor, which an in-place update
    through the wrapper (torch.optim's) writes.

    Runs the class's ``__tensor_flatten__`` (caller code; what it raises propagates): call it, for every wrapper a
    call will read, before the first check and before any :func:`inner_of` (a later wrapper's flatten may change an
    earlier one)."""
    cls = type(x)
    if has_memory(cls) or not isinstance(x, Tensor) or _is_dtensor_class(cls):
        return None
    flatten = getattr(cls, "__tensor_flatten__", None)
    if flatten is None or not callable(flatten):
        return None
    try:
        with _CustomMetadata():
            _SIZE(x), _STRIDE(x), x.is_contiguous(), x.storage_offset(), x.dim()
    except Exception:  # noqa: BLE001 - (computed by its dispatch: the checks would run it)
        return None
    names = flatten(x)[0]
    if type(names) not in (list, tuple) or not names or not all(type(n) is str for n in names):
        return None
    return [str.__str__(n) for n in names]


def inner_of(x: Tensor, names: list[str]) -> Tensor | None:
    """The tensor among wrapper ``x``'s inner ones (kept in its own ``__dict__`` under ``names``: see
    :func:`inner_name`) that holds its elements, or None: exactly one of them is of ``x``'s dtype, device, sizes and
    strides, and every other one has at most one element (a scale, as torchao's float8 weights keep once
    ``precompute_float8_dynamic_scale_for_fsdp`` ran), all exact ``torch.Tensor`` s (no subclass, no attribute set on
    them). Runs no caller code (read afresh at every step: ``x`` may hold another tensor by then)."""
    d = _OWN_DICT(x)
    if type(d) is not dict:
        return None
    found = None
    for name in names:
        inner = d.get(name)
        if type(inner) is not Tensor or _OWN_DICT(inner):
            return None
        if (_DTYPE(inner) == _DTYPE(x) and _DEVICE(inner) == _DEVICE(x) and _SIZE(inner) == _SIZE(x)
                and _STRIDE(inner) == _STRIDE(x) and not inner.is_meta):  # fmt: skip
            if found is not None:
                return None  # (two could hold the elements: which one the dispatch writes is not said)
            found = inner
        elif inner.numel() > 1:
            return None
    return found


def wrapped_inner(x: Tensor) -> Tensor | None:
    """:func:`inner_name` then :func:`inner_of`: for one wrapper read alone (a loaded state), never inside a step."""
    names = inner_name(x)
    return None if names is None else inner_of(x, names)


def first_without_storage(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor whose ``data_ptr()`` is not the address of its elements: a tensor subclass with a
    dispatch of its own (DTensor, wrapper subclasses, fake tensors) or a meta tensor; None when there is none.
    A kernel given such an address reads or writes memory that is not the tensor's."""
    if all(map(has_memory, {type(t) for t in tensors})) and not any(t.is_meta for t in tensors):
        return None
    return next(i for i, t in enumerate(tensors) if not has_memory(type(t)) or t.is_meta)


# ---------------------------------------------------------------------------------------------------------
# Shared memory between arguments (every entry point that writes through addresses checks it)

_data_ptr = Tensor.data_ptr
_nbytes = attrgetter("nbytes")
_is_inference = Tensor.is_inference


def _reach(x: Tensor) -> int:
    """Bytes from ``x``'s first element to just past the last one it can address (its strides included)."""
    if x.numel() == 0:
        return 0
    if x.is_contiguous():
        return x.nbytes
    return (sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride())) + 1) * x.element_size()


def self_overlapping(x: Tensor) -> bool:
    """Whether two elements of ``x`` may share memory: its dims (size > 1) sorted by stride, each stride must pass
    the reach of the smaller ones (every non-overlapping layout torch makes: contiguous, transposed, channels_last,
    strided slices). An expanded view (stride 0), ``as_strided`` with overlapping strides, and the rare layouts that
    interleave without overlapping are refused by its callers: writing one through a contiguous copy would make
    the last of the elements that share memory win."""
    reach = 0
    for stride, size in sorted((abs(st), n) for st, n in zip(x.stride(), x.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


_storage = Tensor.untyped_storage
_is_neg = Tensor.is_neg
_is_conj = Tensor.is_conj
_storage_ptr = torch.UntypedStorage.data_ptr
_storage_nbytes = torch.UntypedStorage.nbytes


FP32_MAX = float(torch.finfo(torch.float32).max)


def real_float(x) -> float:
    """A real number as a float; an int too large for one (``10**400``) is inf, which the caller's range check
    names (``float()`` raises a bare OverflowError)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def finite_fp32(x: float) -> bool:
    """Whether ``x`` is a finite float32: the kernels compute in float32, where 1e39 is inf (torch's fused and
    foreach kernels refuse it: "value cannot be converted to type float without overflow")."""
    return abs(real_float(x)) <= FP32_MAX  # (NaN compares False)


def loaded_tensor_problem(x: Tensor) -> str | None:
    """What keeps a tensor of a loaded state dict from being read (copied, or a count taken from it), or None: not
    dense, meta (no values), or outside its storage (freed or shrunk in place: torch's ops would read it unchecked).
    A DTensor is judged by its local shard."""
    local = x._local_tensor if not has_memory(type(x)) and hasattr(x, "_local_tensor") else x
    if local.layout != torch.strided or local.is_nested:  # (a nested tensor's layout reads strided)
        return f"must be a dense tensor, got {'a nested tensor' if local.is_nested else local.layout}"
    if local.is_meta:
        return "is a meta tensor (no values)"
    if outside_storage(local):
        return "lies outside its storage (freed or shrunk in place)"
    return None


def outside_storage(x: Tensor) -> bool:
    """Whether an element of ``x`` lies outside its storage: a storage freed or shrunk in place
    (``x.untyped_storage().resize_(0)``, as FSDP frees params) leaves the tensor's sizes as they were, and a kernel
    would read or write freed memory (torch's own ops on such a tensor crash too). Empty and meta tensors, and
    tensors without memory of their own (checked elsewhere), are not."""
    if x.numel() == 0 or x.is_meta or not has_memory(type(x)):
        return False
    if x.data_ptr() == 0:
        return True
    lo = hi = x.storage_offset()
    for n, st in zip(x.shape, x.stride()):
        lo, hi = (lo + (n - 1) * st, hi) if st < 0 else (lo, hi + (n - 1) * st)
    return lo < 0 or (hi + 1) * x.element_size() > x.untyped_storage().nbytes()


def _check_inside_storage(fn: str, name: str, indexed: bool, tensors: Sequence[Tensor], starts: list[int],
                          sizes: list[int]) -> None:  # fmt: skip
    """Every tensor's bytes (``starts``, ``sizes``: as :func:`check_memory` reads them) inside its storage; the
    exact test (:func:`outside_storage`) only where the bytes seem not to be (a view with negative strides starts at
    its highest element)."""
    if any(map(_is_neg, tensors)) or any(map(_is_conj, tensors)):
        i = next(i for i, x in enumerate(tensors) if x.is_neg() or x.is_conj())
        label = f"{name}[{i}]" if indexed else name
        raise ValueError(f"{fn}: {label} is a negated or conjugated view (its memory holds other values than it "
                         "reads as); pass x.resolve_neg() / x.resolve_conj()")  # fmt: skip
    try:
        storages = list(map(_storage, tensors))
        lows = list(map(_storage_ptr, storages))
        if all(map(_le, lows, starts)) and all(
            map(_le, map(_add, starts, sizes), map(_add, lows, map(_storage_nbytes, storages)))
        ):
            return
    except (RuntimeError, TypeError, NotImplementedError):  # (a tensor without a plain storage: the exact test)
        pass
    for i, x in enumerate(tensors):
        if x._is_zerotensor():
            label = f"{name}[{i}]" if indexed else name
            raise ValueError(f"{fn}: {label} is a ZeroTensor (torch._efficientzerotensor: no memory of its own); "
                             "pass a real tensor, e.g. torch.zeros(...)")  # fmt: skip
        if outside_storage(x):
            label = f"{name}[{i}]" if indexed else name
            raise ValueError(f"{fn}: {label} lies outside its storage (a storage freed or shrunk in place, e.g. by "
                             "untyped_storage().resize_(0)): its elements are not there to read or write")  # fmt: skip


def check_storage(fn: str, name: str, tensors: Sequence[Tensor], indexed: bool = True) -> None:
    """Raise a ValueError naming the first of ``tensors`` (read-only inputs: :func:`check_memory` checks those it
    is given) that lies outside its storage (freed or shrunk in place); ``name[i]``, or ``name`` alone when not
    ``indexed``."""
    if torch.compiler.is_compiling():  # (fake tensors; the eager call checks the real ones)
        return
    _check_inside_storage(fn, name, indexed, tensors, list(map(_data_ptr, tensors)), [_reach(x) for x in tensors])


def check_memory(fn: str, groups: list[tuple], same: tuple[int, int] | None = None) -> None:
    """Raise a ValueError naming the first pair when a written tensor shares memory with any other argument, or the
    first tensor that lies outside its storage (freed or shrunk in place).

    ``groups``: ``(name, tensors, written, indexed, contiguous)`` in the order the message names them (``indexed``:
    name them ``name[i]``; ``contiguous``: every tensor is, so its bytes are ``nbytes`` from ``data_ptr``; else
    each tensor's reach through its strides is taken, conservatively). Read-only tensors may share memory with each
    other. ``same = (w, r)``: tensor ``i`` of written group ``w`` may be exactly tensor ``i`` of read group ``r``
    (same first byte and size, both contiguous: element ``k`` is read and written by the same program, as torch's
    ``copy_`` allows a full overlap).

    Fast path: intervals are disjoint iff, after sorting starts and ends separately, every end is at most the next
    start (empty tensors take no memory). A shared byte only then falls back to a sweep that names the pair and
    lets read-only tensors overlap.
    """
    if torch.compiler.is_compiling():  # fake tensors have no addresses; the eager call checked the same layout
        return
    if not torch.is_inference_mode_enabled():
        for name, tensors, written, indexed, _ in groups:
            if written and any(map(_is_inference, tensors)):
                i = next(i for i, x in enumerate(tensors) if x.is_inference())
                label = f"{name}[{i}]" if indexed else name
                raise TypeError(
                    f"{fn}: {label} is an inference tensor (made under torch.inference_mode()); it cannot "
                    "be written outside inference mode: pass a normal tensor (e.g. its clone())"
                )
    starts, sizes = [], []
    for name, tensors, _, indexed, contiguous in groups:  # (``map`` over the C methods: never traced, see above)
        starts.append(list(map(_data_ptr, tensors)))
        sizes.append(list(map(_nbytes, tensors)) if contiguous else [_reach(x) for x in tensors])
        _check_inside_storage(fn, name, indexed, tensors, starts[-1], sizes[-1])
    skip: set = set()
    if same is not None:
        w, r = same
        if any(map(int.__eq__, starts[w], starts[r])):
            w_tensors, r_tensors = groups[w][1], groups[r][1]
            # (both contiguous: element k of one is element k of the other; ``x.t()`` written from ``x`` is not)
            skip = {i for i, (a, b, m, n) in enumerate(zip(starts[w], starts[r], sizes[w], sizes[r]))
                    if a == b and m == n and r_tensors[i].is_contiguous() and w_tensors[i].is_contiguous()}  # fmt: skip
    all_starts, all_ends = [], []
    for g, (s, n) in enumerate(zip(starts, sizes)):
        if skip and g == same[1]:
            s = [a for i, a in enumerate(s) if i not in skip]
            n = [m for i, m in enumerate(n) if i not in skip]
        all_starts += s
        all_ends += map(_add, s, n)
    if any(0 in n for n in sizes):  # empty tensors take no memory
        pairs = [(a, e) for a, e in zip(all_starts, all_ends) if e > a]
        all_starts, all_ends = [a for a, _ in pairs], [e for _, e in pairs]
    if len(all_starts) < 2:
        return
    ss, es = sorted(all_starts), sorted(all_ends)
    if all(map(_le, es, islice(ss, 1, None))):
        return
    _name_shared_memory(fn, groups, starts, sizes, same, skip)


def _name_shared_memory(fn, groups, starts, sizes, same, skip) -> None:
    """The slow path of :func:`check_memory`: one sweep per device over the intervals sorted by start, each compared
    with every earlier interval it overlaps (a pair whose byte ranges overlap may still share no element: see
    :func:`_interleaved`)."""
    entries = []
    for g, (_, tensors, written, _, _) in enumerate(groups):
        is_read_pair = same is not None and g == same[1]
        for i, (x, a, n) in enumerate(zip(tensors, starts[g], sizes[g])):
            if n == 0 or x.device.type == "meta" or (is_read_pair and i in skip):
                continue
            entries.append(((x.device.type, x.device.index or 0), a, a + n, written, g, i))
    entries.sort(key=lambda e: (e[0], e[1]))
    active: list = []
    for e in entries:
        active = [o for o in active if o[0] == e[0] and o[2] > e[1]]
        for other in active:
            if not (e[3] or other[3]):
                continue
            if _interleaved(groups[e[4]][1][e[5]], groups[other[4]][1][other[5]]):
                continue
            first, second = sorted((other, e), key=lambda x: (x[4], x[5]))
            raise ValueError(
                f"{fn}: {_label(groups, first)} and {_label(groups, second)} share memory: a tensor that is written "
                "may share no memory with another argument (except when it is exactly its own source, e.g. "
                "dst[i] is src[i]); pass separate tensors or clone() one"
            )
        active.append(e)


def _interleaved(x: Tensor, y: Tensor) -> bool:
    """Whether ``x`` and ``y``, whose byte ranges overlap, share no element for a reason cheap to see: the same
    element size and strides, every stride a multiple of the smallest one (``s`` bytes, over dims of more than one
    element), and starts that differ by at least one element modulo ``s`` (``base[0::2]`` and ``base[1::2]``). A
    dim of stride 0 (an expanded view) adds no element, only repeats them: it is left out (a zero stride would
    divide by zero); with no other dim left, the two are single elements whose bytes overlap: they share."""
    if x.element_size() != y.element_size() or x.stride() != y.stride() or x.dtype != y.dtype:
        return False
    size = x.element_size()
    strides = [abs(s) * size for s, n in zip(x.stride(), x.shape) if n > 1 and s != 0]
    strides += [abs(s) * size for s, n in zip(y.stride(), y.shape) if n > 1 and s != 0]
    if not strides:
        return False
    step = min(strides)
    if any(s % step for s in strides):
        return False
    r = (y.data_ptr() - x.data_ptr()) % step
    return size <= r <= step - size or _disjoint_views(x, y)


def _disjoint_views(x: Tensor, y: Tensor, budget: int = 4096) -> bool:
    """Whether two views with the same strides and element size (``W[:, :3]`` and ``W[:, 3:]``, ``W[0::2]`` and
    ``W[1::2]``) provably share no element: ``x`` holds ``x0 + sum(i_k * s_k)``, ``y`` holds ``y0 + sum(j_k * s_k)``,
    so they share one iff ``y0 - x0 = sum(d_k * s_k)`` for some ``d_k = i_k - j_k`` in its range; searched from the
    largest stride down, each digit bounded by what the smaller strides can still reach. False (not proven) past
    ``budget`` steps of the search."""
    size = x.element_size()
    diff = y.data_ptr() - x.data_ptr()
    if diff % size or x.dim() != y.dim():
        return False
    # (a stride-0 dim repeats elements: it adds none)
    dims = sorted(((st, nx, ny) for st, nx, ny in zip(x.stride(), x.shape, y.shape) if max(nx, ny) > 1 and st != 0),
                  reverse=True)  # fmt: skip
    if any(st <= 0 for st, _, _ in dims):
        return False
    reach = [0] * (len(dims) + 1)
    for k in range(len(dims) - 1, -1, -1):
        st, nx, ny = dims[k]
        reach[k] = reach[k + 1] + st * (max(nx, ny) - 1)
    steps = [0]

    def shared(k: int, rem: int) -> bool:
        steps[0] += 1
        if steps[0] > budget:
            raise OverflowError
        if k == len(dims):
            return rem == 0
        st, nx, ny = dims[k]
        lo, hi = max(-(ny - 1), -((reach[k + 1] - rem) // st)), min(nx - 1, (rem + reach[k + 1]) // st)
        return any(shared(k + 1, rem - d * st) for d in range(lo, hi + 1))

    try:
        return not shared(0, diff // size)
    except OverflowError:
        return False


def _label(groups, entry) -> str:
    name, _, _, indexed, _ = groups[entry[4]]
    return f"{name}[{entry[5]}]" if indexed else name
