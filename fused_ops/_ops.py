"""torch.library custom ops: one registration per op.

The default implementation is the CPU path (``reference``); the ``cuda`` kernel is the Triton launcher.
A resolved ``backend`` string ("triton" or "reference") travels with each call, so ``backend="reference"``
works on CUDA tensors and ``backend="triton"`` on CPU tensors under the Triton interpreter, through the same
op that ``torch.compile`` sees. ``register_fake`` makes every op traceable.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._validate import finite_fp32
from .kernels import _multi_tensor
from .kernels._checks import no_user_code

# Tables of the Triton launches of the functional ops, keyed by tensor addresses and sizes. Bounded: stale
# layouts are dropped oldest first. Dropping one is safe: a table that a CUDA graph captured was also moved to
# ``kernels._multi_tensor._CAPTURED`` (kept for the process's life), launches on other streams recorded their
# stream on its memory, and the inputs are checked at every call, not only when a table is built.
# Insertions and evictions hold a lock (threads may run ops at once: an unlocked "over the limit, pop the oldest"
# popped one key twice, a KeyError after earlier groups had launched); look-ups are single dict reads.
# Bounded in count and in the memory its tables hold: a table is 8 bytes per tensor and role and 16 per chunk of
# 64Ki elements (about 1.7 MB for a 7B model's grads), on the tensors' device; 256 tables of fresh addresses (grads
# reallocated elsewhere at every step) would hold hundreds of MB of GPU memory (probe 82).
_TABLE_CACHE_LIMIT = 256
_TABLE_CACHE_BYTES = 64 << 20


def _held_bytes(value: object) -> int:
    """The memory a cached chunk table holds (its table and counters; its host copy too: pinned on a GPU)."""
    tensors = (getattr(value, "table", None), getattr(value, "counters", None), getattr(value, "host", None))
    distinct = {id(t): t for t in tensors if isinstance(t, Tensor)}  # (on the CPU the table is its host copy)
    return sum(t.numel() * t.element_size() for t in distinct.values())


class _BoundedCache(dict):
    """A dict that keeps its ``limit`` newest insertions, and drops the oldest while the tables it holds take more
    than ``max_bytes`` (the newest is always kept); insertion and eviction are thread-safe."""

    def __init__(self, limit: int, max_bytes: int | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.max_bytes = max_bytes
        self._keys: dict[int, list] = {}  # id of a value -> [keys holding it, its bytes] (one table, several keys)
        self._held = 0
        self._lock = threading.Lock()

    def _drop(self, key) -> None:
        vid = id(super().pop(key))  # (alive while a key holds it, so its id is its own)
        entry = self._keys[vid]
        entry[0] -= 1
        if entry[0] == 0:
            self._held -= entry[1]
            del self._keys[vid]

    def __setitem__(self, key, value) -> None:
        size = _held_bytes(value)
        with self._lock:
            if key in self:  # (again: the newest now)
                self._drop(key)
            super().__setitem__(key, value)
            entry = self._keys.setdefault(id(value), [0, size])
            if entry[0] == 0:
                self._held += size
            entry[0] += 1
            while len(self) > self.limit or (
                self.max_bytes is not None and self._held > self.max_bytes and len(self) > 1
            ):
                self._drop(next(iter(self)))


_TABLE_CACHE: dict = _BoundedCache(_TABLE_CACHE_LIMIT, _TABLE_CACHE_BYTES)
_multi_tensor.CACHE_TYPES.add(id(_BoundedCache))


def _table_cache() -> dict:
    return _TABLE_CACHE


# The optimizer ops (adam_, adam_lowbit_, sgd_, lion_) are public through ``torch.ops.fused_ops``, and ``torch.compile``
# calls them with the tensors of the run. A call through the dispatcher is checked here, on both backends, with the
# checks of the Triton launch (every list's length, dtype, device, element counts, contiguity, plain tensors; the
# scalars the kernel reads through a pointer) and no written tensor sharing memory with another argument: the CPU
# path's ``torch._fused_adam(w)_`` / ``torch._fused_sgd_`` check nothing (a short grad is read past its end), and
# the plain-torch paths would write some tensors before a broadcast error. The eager optimizer step and
# ``functional.adam_`` call the bodies directly, after checking the same things themselves.
def _check_written_memory(fn: str, written: dict[str, list[Tensor]], read: dict[str, list[Tensor]],
                          **scalars: Optional[Tensor]) -> None:  # fmt: skip
    """``scalars``: the 1-element tensors the kernel reads through a pointer (``lr``, ``grad_scale``, ``found_inf``):
    one inside a written tensor would be read while some program writes it (a half-applied step)."""
    from ._validate import check_memory

    groups = [(name, list(xs), True, True, True) for name, xs in written.items() if len(xs)]
    groups += [(name, list(xs), False, True, True) for name, xs in read.items() if len(xs)]
    groups += [(name, [x], False, False, True) for name, x in scalars.items() if isinstance(x, Tensor)]
    check_memory(fn, groups)


def _check_op_numbers(fn: str, step: Optional[float] = None, **numbers: float) -> None:
    """The numbers of an optimizer op called through the dispatcher: finite (an inf ``lr`` or a NaN beta turns every
    param into NaN), and ``step``, when given, a finite number >= 1 (step 0 divides by a zero bias correction), as
    ``functional.adam_`` and the optimizers refuse them."""
    for name, value in numbers.items():
        if not finite_fp32(value):
            raise ValueError(f"{fn}: {name} must be finite in float32 (|x| <= {_FP32_MAX:.4g}), got {value}")
    if step is not None and not (math.isfinite(step) and step >= 1):
        raise ValueError(f"{fn}: step must be a finite number >= 1, got {step}")


def _check_no_params(fn: str, **lists: list[Tensor]) -> None:
    """An op called with no params: every other list must be empty too (a grad or a state without its param is a
    mismatched call, refused as the checks of a non-empty call refuse it)."""
    for name, xs in lists.items():
        if len(xs):
            raise ValueError(f"{fn}: params is empty but {name} has {len(xs)} tensors")


def _check_layout_op(fn: str, pairs: tuple = (), segments: tuple | None = None, **scalars: Optional[Tensor]) -> None:
    """What the copy ops called through the dispatcher must satisfy on both backends before anything is written
    (the plain-torch path copies tensor by tensor: a bad pair after good ones would be found after those were
    written): ``pairs`` of lists of equal element counts, ``segments`` ``(flat, tensors, offsets, spans)`` inside
    ``flat`` and each tensor within its segment, ``scalars`` of one element. Dtypes are left to each backend (the
    plain-torch path also takes float64)."""
    from .kernels._checks import check_numels

    for a_name, a, b_name, b in pairs:
        check_numels(fn, a_name, a, b_name, b)
    if segments is not None:
        flat, tensors, offsets, spans = segments
        if not (len(offsets) == len(spans) == len(tensors)):
            raise ValueError(f"{fn}: {len(tensors)} tensors, {len(offsets)} offsets and {len(spans)} spans")
        n = flat.numel()
        for i, (x, off, span) in enumerate(zip(tensors, offsets, spans)):
            if off < 0 or span < 0 or off + span > n:
                raise ValueError(f"{fn}: segment {i} [{off}, {off + span}) is outside flat ({n} elements)")
            if x.numel() > span:
                raise ValueError(f"{fn}: tensors[{i}] has {x.numel()} elements, its segment only {span}")
    for name, x in scalars.items():
        if x is not None and (not isinstance(x, Tensor) or x.numel() != 1):
            raise ValueError(f"{fn}: {name} must be a 1-element tensor, got "
                             f"{x.numel() if isinstance(x, Tensor) else type(x).__name__} elements")  # fmt: skip


_COPY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton copy kernels take
_PLAIN_DTYPES = _COPY_DTYPES + (torch.float64,)  # the plain-torch path also takes float64
_FP32_MAX = float(torch.finfo(torch.float32).max)


def _check_lists(fn: str, backend: str, dtypes=None, **lists: list[Tensor]) -> None:
    """Every list of the copy ops: plain dense tensors, contiguous, of one floating dtype and on one device (the
    first list's): what the Triton launch reads, checked on both backends alike. float64 only where the backend
    takes it (``dtypes``: else the plain-torch path's dtypes on "reference", the kernels' on "triton"). Meta
    tensors are refused on "triton" (the launch would read their null addresses)."""
    from .kernels._checks import check_role

    if dtypes is None:
        dtypes = _PLAIN_DTYPES if backend == "reference" else _COPY_DTYPES
    device = None
    for name, xs in lists.items():
        if len(xs):
            check_role(fn, name, xs, dtypes, device)
            device = xs[0].device
    if device is not None and device.type == "meta" and backend != "reference":
        raise TypeError(f"{fn}: backend='triton' cannot run on meta tensors (they have no memory); use "
                        "backend='reference'")  # fmt: skip


def _check_op_scalars(fn: str, device: torch.device, **scalars: Optional[Tensor]) -> None:
    from .kernels._checks import check_scalar as check_device_scalar

    for name, x in scalars.items():
        if x is not None:
            check_device_scalar(fn, name, x, device)


@torch.library.custom_op(
    "fused_ops::adam_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "state_steps"),
)
def adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    master_params: list[Tensor],
    state_steps: list[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    step: Optional[float],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    backend: str,
) -> None:
    """One Adam/AdamW step over tensors of one (device, dtype); see ``fused_ops.functional.adam_``."""
    _adam_checked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr, lr_tensor,
                  beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step, grad_scale, found_inf,
                  backend)  # fmt: skip


@adam_.register_kernel("cuda")
def _adam_cuda(*args) -> None:
    _adam_checked(*args)


@no_user_code
def _adam_checked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr, lr_tensor,
                  beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step, grad_scale, found_inf,
                  backend) -> None:  # fmt: skip
    """``adam_`` called through the dispatcher: checked (see ``_check_written_memory``), then run."""
    if params:
        from .kernels.adam import _check

        if not state_steps and step is None:
            raise ValueError("fused_ops::adam_: pass state_steps or a float step")
        _check_op_numbers("fused_ops::adam_", step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad)
        _check_op_scalars("fused_ops::adam_", params[0].device, lr=lr_tensor, grad_scale=grad_scale,
                          found_inf=found_inf)  # fmt: skip
        _check_written_memory(
            "fused_ops::adam_",
            dict(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                 max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else [], master_params=master_params,
                 state_steps=state_steps),
            dict(grads=grads), lr=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip
    else:
        _check_no_params("fused_ops::adam_", grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                         max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else [], master_params=master_params,
                         state_steps=state_steps)  # fmt: skip
    _adam_body(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr, lr_tensor,
               beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step, grad_scale, found_inf,
               backend, checked=True)  # fmt: skip


def _adam_body(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr, lr_tensor,
               beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step, grad_scale, found_inf,
               backend, checked: bool = False) -> None:  # fmt: skip
    kwargs = _adam_kwargs(lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step,
                          grad_scale, found_inf, master_params)  # fmt: skip
    if backend == "triton":
        _adam_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, checked=checked, **kwargs)
    else:  # the CPU path; on other devices it is the plain-torch reference
        reference._adam_cpu_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)


def adam_eager(*args) -> None:
    """``adam_``'s arguments, run without the dispatcher when not tracing.

    The custom op's Python wrapper costs a few microseconds per tensor (alias checks, a version bump for every
    mutated tensor): 50 ms per step on 10,000 tensors, more than the kernel. Eager calls skip it; under
    ``torch.compile`` the op is what gets traced. The params' version counters are bumped here (on both
    backends: the CPU path's ``torch._fused_adamw_`` bumps none), so autograd still sees that the optimizer
    changed them.
    """
    if torch.compiler.is_compiling():
        adam_(*args)
        return
    _adam_body(*args, checked=True)  # (its callers, functional.adam_ and the optimizers, checked every input)
    bump_versions(args[0])  # torch._fused_adam(w)_, the CPU path's kernel, bumps no version either


def bump_versions(tensors: list[Tensor]) -> None:
    """Bump the autograd version counter of every tensor, in one C++ call.

    ``torch._C._increment_version`` takes a list of tensors: passed a single tensor it iterates it, one ``unbind``
    view per row (half a millisecond for a 1,000-element vector). Never call it on a bare tensor.
    """
    if tensors:
        torch._C._increment_version(list(tensors))


def _check_not_mixed_meta(name: str, args: tuple) -> None:
    """The fake (meta) kernel of an in-place op runs for a call through the dispatcher when any argument is a meta
    tensor. Under tracing (fake tensors) or with every tensor on meta, that is shape propagation: nothing to do. A
    call of real tensors with a meta one among them would silently do nothing (the step never ran): refused, naming
    the first meta argument."""
    from torch._guards import detect_fake_mode

    flat = [(k, x) for k, a in enumerate(args) for x in (a if isinstance(a, list | tuple) else [a])
            if isinstance(x, Tensor)]  # fmt: skip
    if not flat or detect_fake_mode([x for _, x in flat]) is not None:
        return
    if all(x.is_meta for _, x in flat) or not any(x.is_meta for _, x in flat):
        return
    schema = getattr(torch.ops.fused_ops, name).default._schema
    k = next(k for k, x in flat if x.is_meta)
    other = next(x for _, x in flat if not x.is_meta)
    raise ValueError(f"fused_ops::{name}: {schema.arguments[k].name} is a meta tensor (no memory) but other arguments "
                     f"are on {other.device}: the op would do nothing; pass tensors with memory")  # fmt: skip


@adam_.register_fake
def _adam_fake(*args) -> None:
    _check_not_mixed_meta("adam_", args)


def _adam_kwargs(lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step, grad_scale,
                 found_inf, master_params) -> dict:  # fmt: skip
    return dict(
        lr=lr_tensor if lr_tensor is not None else lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, step=step, grad_scale=grad_scale,
        found_inf=found_inf, master_params=master_params,
    )  # fmt: skip


def _adam_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, found_inf, **kwargs) -> None:
    from .kernels.adam import adam_launch

    # One launch: the kernel also moves the step counts (not when found_inf is set).
    adam_launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, found_inf=found_inf,
                cache=_table_cache(), **kwargs)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Flatten / cast / unscale / norm (issue 3). ``backend`` arrives resolved ("triton" or "reference"), so the
# default (CPU) and the "cuda" registrations share one body each.
#
# Each op also has an ``*_eager`` entry point with the op's arguments, for the functional layer (see
# ``adam_eager``): under ``torch.compile`` it calls the op (on detached tensors); otherwise it runs the body under
# ``torch.no_grad()`` (no per-tensor detach, no wrapper) and bumps the versions of the tensors it writes, on both
# backends, as the op's wrapper does: the Triton launches write behind autograd's back, and not every torch op of
# the plain path bumps (``_amp_foreach_non_finite_check_and_unscale_`` does not).


def _flatten_into(flat: Tensor, tensors, offsets, spans, backend: str, scatter: bool = False) -> None:
    if backend == "triton":
        from .kernels.flatten import flatten_launch

        flatten_launch(flat, tensors, offsets, spans, scatter=scatter, cache=_table_cache())
    elif scatter:
        reference.unflatten_copy_(tensors, flat, offsets)
    else:
        reference.flatten_into_(flat, tensors, offsets, spans)


def _check_flatten_align(tensors, align: int) -> None:
    """What the fake kernel checks too (it sees no memory): ``align`` a positive int (a SymInt when traced),
    ``tensors`` not empty."""
    if isinstance(align, bool) or not isinstance(align, int | torch.SymInt) or align < 1:
        raise ValueError(f"fused_ops::flatten: align must be a positive int, got {align!r}")
    if not tensors:
        raise ValueError("fused_ops::flatten: tensors is empty (the new buffer's dtype and device come from it)")


def _check_flatten_args(tensors, align: int, backend: str) -> None:
    """``flatten`` through the dispatcher, on both backends (the eager entry point's caller checked the same)."""
    _check_flatten_align(tensors, align)
    _check_lists("fused_ops::flatten", backend, _PLAIN_DTYPES, tensors=tensors)
    from ._validate import check_storage

    check_storage("fused_ops::flatten", "tensors", tensors)


_MAX_BYTES = 2**63 - 1  # (torch's sizes are int64: a larger buffer cannot even be described)


def flatten_total(fn: str, tensors, align: int) -> tuple[list[int], list[int], int]:
    """``reference.flatten_layout`` of ``tensors``, refusing a buffer larger than a tensor can be (an ``align`` of
    2**62 pads 3 elements to more bytes than int64 counts; torch raises its own overflow error, or a TypeError)."""
    offsets, spans, total = reference.flatten_layout([x.numel() for x in tensors], align)
    if total * tensors[0].element_size() > _MAX_BYTES:
        raise ValueError(f"{fn}: align={align} pads the buffer to {total} elements of {tensors[0].dtype}, more bytes "
                         "than a tensor can hold (2**63 - 1)")  # fmt: skip
    return offsets, spans, total


def _flatten(tensors, align: int, backend: str) -> Tensor:
    offsets, spans, total = flatten_total("fused_ops::flatten", tensors, align)
    flat = tensors[0].new_empty((total,))
    _flatten_into(flat, tensors, offsets, spans, backend)
    return flat


@torch.library.custom_op("fused_ops::flatten", mutates_args=())
def flatten(tensors: list[Tensor], align: int, backend: str) -> Tensor:
    """One new buffer holding every tensor at an ``align``-aligned offset, zero padded; see ``functional.flatten``."""
    return _flatten_checked(tensors, align, backend)


@flatten.register_kernel("cuda")
def _flatten_cuda(tensors, align, backend) -> Tensor:
    return _flatten_checked(tensors, align, "reference" if backend == "reference" else "triton")


@no_user_code
def _flatten_checked(tensors, align: int, backend: str) -> Tensor:
    _check_flatten_args(tensors, align, backend)
    return _flatten(tensors, align, backend)


@flatten.register_fake
def _flatten_fake(tensors, align, backend) -> Tensor:
    _check_flatten_align(tensors, align)  # (the eager op's errors, not an IndexError or a ZeroDivisionError)
    return tensors[0].new_empty((flatten_total("fused_ops::flatten", tensors, align)[2],))


def flatten_eager(tensors: list[Tensor], align: int, backend: str) -> Tensor:
    """``flatten``'s arguments (contiguous tensors, which may require grad), run without the dispatcher when not
    tracing (see ``adam_eager``). Under ``torch.compile`` the op is traced, on detached tensors."""
    if torch.compiler.is_compiling():
        return flatten([x.detach() for x in tensors], align, backend)
    with torch.no_grad():
        return _flatten(tensors, align, backend)


def _check_flatten_op(fn: str, flat: Tensor, tensors, offsets, spans, backend: str, scatter: bool) -> None:
    """``flatten_into_`` / ``unflatten_copy_`` through the dispatcher, on both backends: ``flat`` a contiguous 1-d
    tensor, every tensor of its dtype and device and contiguous (:func:`_check_lists`), every segment inside
    ``flat`` and each tensor within its own, and what is written (``flat``'s segments, or the tensors) sharing no
    memory with anything else (segments overlapping each other included)."""
    _check_layout_op(fn, segments=(flat, tensors, offsets, spans))
    if not isinstance(flat, Tensor) or flat.layout != torch.strided or flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"{fn}: flat must be a contiguous 1-d tensor")
    if not tensors:
        return
    _check_lists(fn, backend, _PLAIN_DTYPES, flat=[flat], tensors=tensors)
    if {x.dtype for x in tensors} != {flat.dtype}:
        i = next(i for i, x in enumerate(tensors) if x.dtype != flat.dtype)
        raise ValueError(f"{fn}: tensors[{i}] is {tensors[i].dtype}, flat is {flat.dtype}: they must match")
    if torch.compiler.is_compiling():
        return
    from ._validate import check_storage

    check_storage(fn, "flat", [flat], indexed=False)  # (before it is cut into segments: torch's error otherwise)
    segments = [flat.narrow(0, off, span) for off, span in zip(offsets, spans)]
    if scatter:
        _check_written_memory(fn, dict(tensors=tensors), dict(flat=segments))
    else:
        _check_written_memory(fn, dict(flat=segments), dict(tensors=tensors))


@torch.library.custom_op("fused_ops::flatten_into_", mutates_args=("flat",))
def flatten_into_(flat: Tensor, tensors: list[Tensor], offsets: list[int], spans: list[int], backend: str) -> None:
    """Gather ``tensors`` into ``flat[offsets[i] : offsets[i] + spans[i]]`` (zero padded), one launch."""
    _flatten_into_checked(flat, tensors, offsets, spans, backend)


@flatten_into_.register_kernel("cuda")
def _flatten_into_cuda(flat, tensors, offsets, spans, backend) -> None:
    _flatten_into_checked(flat, tensors, offsets, spans, "reference" if backend == "reference" else "triton")


@no_user_code
def _flatten_into_checked(flat, tensors, offsets, spans, backend: str) -> None:
    _check_flatten_op("fused_ops::flatten_into_", flat, tensors, offsets, spans, backend, scatter=False)
    _flatten_into(flat, tensors, offsets, spans, backend)


@flatten_into_.register_fake
def _flatten_into_fake(flat, tensors, offsets, spans, backend) -> None:
    _check_not_mixed_meta("flatten_into_", (flat, tensors, offsets, spans, backend))


def flatten_into_eager(flat: Tensor, tensors: list[Tensor], offsets: list[int], spans: list[int], backend: str) -> None:
    """``flatten_into_``'s arguments, run without the dispatcher when not tracing (see ``adam_eager``)."""
    if torch.compiler.is_compiling():
        flatten_into_(flat, [x.detach() for x in tensors], offsets, spans, backend)
        return
    with torch.no_grad():
        _flatten_into(flat, tensors, offsets, spans, backend)
    bump_versions([flat])


@torch.library.custom_op("fused_ops::unflatten_copy_", mutates_args=("tensors",))
def unflatten_copy_(tensors: list[Tensor], flat: Tensor, offsets: list[int], backend: str) -> None:
    """Scatter ``flat[offsets[i] : offsets[i] + numel]`` back into ``tensors[i]``, one launch."""
    _unflatten_copy_checked(tensors, flat, offsets, backend)


@unflatten_copy_.register_kernel("cuda")
def _unflatten_copy_cuda(tensors, flat, offsets, backend) -> None:
    _unflatten_copy_checked(tensors, flat, offsets, "reference" if backend == "reference" else "triton")


@no_user_code
def _unflatten_copy_checked(tensors, flat, offsets, backend: str) -> None:
    spans = [x.numel() for x in tensors]
    _check_flatten_op("fused_ops::unflatten_copy_", flat, tensors, offsets, spans, backend, scatter=True)
    _flatten_into(flat, tensors, offsets, spans, backend, scatter=True)


@unflatten_copy_.register_fake
def _unflatten_copy_fake(tensors, flat, offsets, backend) -> None:
    _check_not_mixed_meta("unflatten_copy_", (tensors, flat, offsets, backend))


def unflatten_copy_eager(tensors: list[Tensor], flat: Tensor, offsets: list[int], backend: str) -> None:
    """``unflatten_copy_``'s arguments, run without the dispatcher when not tracing (see ``adam_eager``)."""
    if torch.compiler.is_compiling():
        unflatten_copy_([x.detach() for x in tensors], flat.detach(), offsets, backend)
        return
    with torch.no_grad():
        _flatten_into(flat, tensors, offsets, [x.numel() for x in tensors], backend, scatter=True)
    bump_versions(tensors)


def _cast(dst, src, stochastic, seed, backend) -> None:
    if backend == "triton":
        from .kernels.cast import cast_launch

        if stochastic and seed is None:
            # The key is drawn on the device by torch's generator and read by the kernel when it runs: a device
            # op, so a captured CUDA graph draws a new key at every replay (a host int would be baked into the
            # launch), and torch.manual_seed makes it reproducible.
            narrowing = dst and dst[0].dtype != torch.float32  # (to fp32 nothing is rounded: no key needed)
            seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=dst[0].device) if narrowing else 0
        cast_launch(dst, src, stochastic=stochastic, seed=0 if seed is None else seed, cache=_table_cache())
    else:
        reference.cast_(dst, src, stochastic=stochastic, seed=seed)


def _check_cast_op(dst, src, seed, backend: str) -> None:
    """``cast_`` through the dispatcher, on both backends: pairs of equal element counts, each list of one dtype and
    contiguous on one device (:func:`_check_lists`), a seed in [0, 2^31), and no ``dst[i]`` sharing memory with
    another argument (``dst[i]`` may be exactly ``src[i]``)."""
    fn = "fused_ops::cast_"
    _check_layout_op(fn, pairs=(("dst", dst, "src", src),))
    if seed is not None and not 0 <= seed < 2**31:
        raise ValueError(f"{fn}: seed must be an int in [0, 2^31), got {seed!r}")
    if not dst:
        return
    _check_lists(fn, backend, dst=dst, src=src)
    if not torch.compiler.is_compiling():
        from ._validate import check_memory

        check_memory(fn, [("dst", list(dst), True, True, True), ("src", list(src), False, True, True)], same=(0, 1))


@torch.library.custom_op("fused_ops::cast_", mutates_args=("dst",))
def cast_(dst: list[Tensor], src: list[Tensor], stochastic: bool, seed: Optional[int], backend: str) -> None:
    """``dst[i] = src[i]`` in ``dst``'s dtype (nearest even or stochastic rounding), one launch. ``seed=None``:
    stochastic rounding draws its key on the device (see ``_cast``)."""
    _cast_checked(dst, src, stochastic, seed, backend)


@cast_.register_kernel("cuda")
def _cast_cuda(dst, src, stochastic, seed, backend) -> None:
    _cast_checked(dst, src, stochastic, seed, "reference" if backend == "reference" else "triton")


@no_user_code
def _cast_checked(dst, src, stochastic, seed, backend: str) -> None:
    _check_cast_op(dst, src, seed, backend)
    _cast(dst, src, stochastic, seed, backend)


@cast_.register_fake
def _cast_fake(dst, src, stochastic, seed, backend) -> None:
    _check_not_mixed_meta("cast_", (dst, src, stochastic, seed, backend))


def cast_eager(dst: list[Tensor], src: list[Tensor], stochastic: bool, seed: Optional[int], backend: str) -> None:
    """``cast_``'s arguments, run without the dispatcher when not tracing (see ``adam_eager``)."""
    if torch.compiler.is_compiling():
        cast_([x.detach() for x in dst], [x.detach() for x in src], stochastic, seed, backend)
        return
    with torch.no_grad():
        _cast(dst, src, stochastic, seed, backend)
    bump_versions(dst)


def _unscale(grads, inv_scale, inv_scale_value, found_inf, out, backend) -> None:
    scale = inv_scale if inv_scale is not None else inv_scale_value
    if backend == "triton":
        from .kernels.scale import unscale_launch

        unscale_launch(grads, scale, found_inf, out, cache=_table_cache())
    else:
        reference.unscale_(grads, scale, found_inf, out)


def _check_unscale_op(grads, inv_scale, inv_scale_value, found_inf, out, backend: str) -> None:
    """``unscale_`` through the dispatcher, on both backends: ``out`` (when given) one per grad with its element
    count; each list of one dtype and contiguous on one device (:func:`_check_lists`); ``inv_scale`` a 1-element
    floating-point tensor there or ``inv_scale_value`` finite in float32; ``found_inf`` a 1-element floating-point
    tensor there; nothing written (``out``, else ``grads``, and ``found_inf``) sharing memory with another argument
    (``out[i]`` may be exactly ``grads[i]``)."""
    fn = "fused_ops::unscale_"
    _check_layout_op(fn, pairs=(("out", out, "grads", grads),) if out else (), inv_scale=inv_scale,
                     found_inf=found_inf)  # fmt: skip
    if inv_scale is None and not (math.isfinite(inv_scale_value) and abs(inv_scale_value) <= _FP32_MAX):
        raise ValueError(f"{fn}: inv_scale must be finite in float32 (|x| <= {_FP32_MAX:.4g}), got {inv_scale_value}")
    if not grads:
        return
    _check_lists(fn, backend, grads=grads, out=out)
    _check_op_scalars(fn, grads[0].device, inv_scale=inv_scale, found_inf=found_inf)
    if torch.compiler.is_compiling():
        return
    from ._validate import check_memory

    scalars = [(name, [x], written, False, True) for name, x, written in
               (("found_inf", found_inf, True), ("inv_scale", inv_scale, False)) if x is not None]  # fmt: skip
    if out:
        check_memory(fn, [("grads", list(grads), False, True, True), ("out", list(out), True, True, True), *scalars],
                     same=(1, 0))  # fmt: skip
    else:
        check_memory(fn, [("grads", list(grads), True, True, True), *scalars])


@torch.library.custom_op("fused_ops::unscale_", mutates_args=("grads", "found_inf", "out"))
def unscale_(
    grads: list[Tensor],
    inv_scale: Tensor | None,
    inv_scale_value: float,
    found_inf: Tensor | None,
    out: list[Tensor],
    backend: str,
) -> None:
    """``grads`` (or ``out``) ``= grads * inv_scale``; ``found_inf = 1`` on inf/nan; one launch, no sync."""
    _unscale_checked(grads, inv_scale, inv_scale_value, found_inf, out, backend)


@unscale_.register_kernel("cuda")
def _unscale_cuda(grads, inv_scale, inv_scale_value, found_inf, out, backend) -> None:
    backend = "reference" if backend == "reference" else "triton"
    _unscale_checked(grads, inv_scale, inv_scale_value, found_inf, out, backend)


@no_user_code
def _unscale_checked(grads, inv_scale, inv_scale_value, found_inf, out, backend: str) -> None:
    _check_unscale_op(grads, inv_scale, inv_scale_value, found_inf, out, backend)
    _unscale(grads, inv_scale, inv_scale_value, found_inf, out, backend)


@unscale_.register_fake
def _unscale_fake(grads, inv_scale, inv_scale_value, found_inf, out, backend) -> None:
    _check_not_mixed_meta("unscale_", (grads, inv_scale, inv_scale_value, found_inf, out, backend))


def unscale_eager(grads: list[Tensor], inv_scale: Optional[Tensor], inv_scale_value: float, found_inf: Optional[Tensor],
                  out: list[Tensor], backend: str) -> None:  # fmt: skip
    """``unscale_``'s arguments, run without the dispatcher when not tracing (see ``adam_eager``). Bumps the versions
    of what it writes: ``out`` (else ``grads``) and ``found_inf``."""
    if torch.compiler.is_compiling():
        unscale_([x.detach() for x in grads], inv_scale, inv_scale_value, found_inf, [x.detach() for x in out],
                 backend)  # fmt: skip
        return
    with torch.no_grad():
        _unscale(grads, inv_scale, inv_scale_value, found_inf, out, backend)
    bump_versions([*(out or grads), *([found_inf] if found_inf is not None else [])])


def _check_grad_norm_args(tensors, norm_type: float, backend: str) -> None:
    """``grad_norm`` through the dispatcher, on both backends (the eager entry point's caller checked the same)."""
    if not norm_type > 0:  # (p = 0 is no norm: torch's count of non-zeros; negative p and nan neither)
        raise ValueError(f"fused_ops::grad_norm: norm_type must be inf or a number > 0, got {norm_type}")
    if tensors:
        _check_lists("fused_ops::grad_norm", backend, tensors=tensors)
        from ._validate import check_storage

        check_storage("fused_ops::grad_norm", "tensors", tensors)


def _grad_norm(tensors, norm_type: float, backend: str) -> Tensor:
    if backend == "triton":
        from .kernels.scale import norm_launch

        return norm_launch(tensors, norm_type, cache=_table_cache())
    return reference.grad_norm(tensors, norm_type)


@torch.library.custom_op("fused_ops::grad_norm", mutates_args=())
def grad_norm(tensors: list[Tensor], norm_type: float, backend: str) -> Tensor:
    """The ``norm_type``-norm of all of ``tensors`` (one dtype and device) as a new 0-d float32 tensor."""
    return _grad_norm_checked(tensors, norm_type, backend)


@grad_norm.register_kernel("cuda")
def _grad_norm_cuda(tensors, norm_type, backend) -> Tensor:
    return _grad_norm_checked(tensors, norm_type, "reference" if backend == "reference" else "triton")


@no_user_code
def _grad_norm_checked(tensors, norm_type: float, backend: str) -> Tensor:
    _check_grad_norm_args(tensors, norm_type, backend)
    return _grad_norm(tensors, norm_type, backend)


def grad_norm_eager(tensors: list[Tensor], norm_type: float, backend: str) -> Tensor:
    """``grad_norm``'s arguments (contiguous tensors), run without the dispatcher when not tracing (see
    ``adam_eager``)."""
    if torch.compiler.is_compiling():
        return grad_norm([x.detach() for x in tensors], norm_type, backend)
    with torch.no_grad():
        return _grad_norm(tensors, norm_type, backend)


@grad_norm.register_fake
def _grad_norm_fake(tensors, norm_type, backend) -> Tensor:
    if not norm_type > 0:  # (the eager op's error)
        raise ValueError(f"fused_ops::grad_norm: norm_type must be inf or a number > 0, got {norm_type}")
    if not tensors:  # (eager: a 0-d float32 zero on the CPU)
        return torch.empty((), dtype=torch.float32)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return tensors[0].new_empty((), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Low-bit Adam (8-bit / bf16 moments, stochastic-rounding params): the op ``torch.compile`` sees for a step of
# FusedAdam(W) with ``state_dtype``/``stochastic_rounding``/``kahan_summation`` (the eager step calls the
# prepared launcher or the reference directly). The optimizer checked every tensor before the call.
@torch.library.custom_op(
    "fused_ops::adam_lowbit_",
    mutates_args=(
        "params",
        "exp_avgs",
        "exp_avg_sqs",
        "state_steps",
        "exp_avg_scales",
        "exp_avg_sq_scales",
        "master_params",
        "kahan_comps",
    ),  # fmt: skip
)
def adam_lowbit_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    master_params: list[Tensor],
    kahan_comps: list[Tensor],
    state: str,
    param_sr: bool,
    seed: int,
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    decoupled: bool,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    backend: str,
) -> None:
    """One low-bit Adam/AdamW step over tensors of one (device, dtype); see ``kernels/adam_lowbit.py``."""
    _adam_lowbit_checked(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
                         master_params, kahan_comps, state, param_sr, seed, lr, lr_tensor, beta1, beta2, eps,
                         weight_decay, maximize, decoupled, grad_scale, found_inf, backend)  # fmt: skip


@adam_lowbit_.register_kernel("cuda")
def _adam_lowbit_cuda(*args) -> None:
    _adam_lowbit_checked(*args)


@no_user_code
def _adam_lowbit_checked(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
                         master_params, kahan_comps, state, param_sr, seed, lr, lr_tensor, beta1, beta2, eps,
                         weight_decay, maximize, decoupled, grad_scale, found_inf, backend) -> None:  # fmt: skip
    """``adam_lowbit_`` called through the dispatcher: checked (see ``_check_written_memory``), then run."""
    if params:
        from .kernels.adam_lowbit import _check, _check_options

        fn = "fused_ops::adam_lowbit_"
        _check_op_numbers(fn, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        _check_options(fn, params, state, param_sr, seed, False, bool(master_params), bool(kahan_comps), 65536, 1024)
        _check(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales, master_params,
               kahan_comps, state)  # fmt: skip
        _check_op_scalars(fn, params[0].device, lr=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
        _check_written_memory(
            fn,
            dict(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps,
                 exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales, master_params=master_params,
                 kahan_comps=kahan_comps),
            dict(grads=grads), lr=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip
    else:
        _check_no_params("fused_ops::adam_lowbit_", grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                         state_steps=state_steps, exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
                         master_params=master_params, kahan_comps=kahan_comps)  # fmt: skip
    _adam_lowbit_body(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
                      master_params, kahan_comps, state, param_sr, seed, lr, lr_tensor, beta1, beta2, eps,
                      weight_decay, maximize, decoupled, grad_scale, found_inf, backend, checked=True)  # fmt: skip


@adam_lowbit_.register_fake
def _adam_lowbit_fake(*args) -> None:
    _check_not_mixed_meta("adam_lowbit_", args)


def _adam_lowbit_body(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
                      master_params, kahan_comps, state, param_sr, seed, lr, lr_tensor, beta1, beta2, eps,
                      weight_decay, maximize, decoupled, grad_scale, found_inf, backend,
                      checked: bool = False) -> None:  # fmt: skip
    kwargs = dict(exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales, master_params=master_params,
                  kahan_comps=kahan_comps, state=state, param_sr=param_sr, seed=seed,
                  lr=lr_tensor if lr_tensor is not None else lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, maximize=maximize, decoupled=decoupled, grad_scale=grad_scale,
                  found_inf=found_inf)  # fmt: skip
    if backend == "triton":
        from .kernels.adam_lowbit import adam_lowbit_launch

        adam_lowbit_launch(params, grads, exp_avgs, exp_avg_sqs, state_steps, cache=_table_cache(), checked=checked,
                           **kwargs)  # fmt: skip
    else:
        from . import _cpu_lowbit  # (the oracle's bits; off the CPU it runs the oracle)

        _cpu_lowbit.adam_lowbit_cpu_(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# SGD and Lion: the ops ``torch.compile`` sees for a step of FusedSGD / FusedLion (one per part: one device, dtype
# and master-or-not; the eager step calls the prepared launcher or the CPU path directly). Checked by the optimizer.
@torch.library.custom_op("fused_ops::sgd_", mutates_args=("params", "momentum_buffers", "master_params"))
def sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    master_params: list[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    backend: str,
) -> None:
    """One SGD step over tensors of one (device, dtype); see ``kernels/sgd.py``."""
    _sgd_checked(params, grads, momentum_buffers, master_params, lr, lr_tensor, momentum, dampening, weight_decay,
                 nesterov, maximize, first_step, grad_scale, found_inf, backend)  # fmt: skip


@sgd_.register_kernel("cuda")
def _sgd_cuda(*args) -> None:
    _sgd_checked(*args)


@no_user_code
def _sgd_checked(params, grads, momentum_buffers, master_params, lr, lr_tensor, momentum, dampening, weight_decay,
                 nesterov, maximize, first_step, grad_scale, found_inf, backend) -> None:  # fmt: skip
    """``sgd_`` called through the dispatcher: checked (see ``_check_written_memory``), then run."""
    if params:
        from .kernels.sgd import _check

        fn = "fused_ops::sgd_"
        _check_op_numbers(fn, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        _check(fn, params, grads, momentum_buffers, master_params, momentum,
               lr_tensor if lr_tensor is not None else lr, grad_scale, found_inf)  # fmt: skip
        _check_written_memory(fn, dict(params=params, momentum_buffers=momentum_buffers, master_params=master_params),
                              dict(grads=grads), lr=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)  # fmt: skip
    else:
        _check_no_params("fused_ops::sgd_", grads=grads, momentum_buffers=momentum_buffers, master_params=master_params)
    _sgd_body(params, grads, momentum_buffers, master_params, lr, lr_tensor, momentum, dampening, weight_decay,
              nesterov, maximize, first_step, grad_scale, found_inf, backend, checked=True)  # fmt: skip


@sgd_.register_fake
def _sgd_fake(*args) -> None:
    _check_not_mixed_meta("sgd_", args)


def _sgd_body(params, grads, momentum_buffers, master_params, lr, lr_tensor, momentum, dampening, weight_decay,
              nesterov, maximize, first_step, grad_scale, found_inf, backend,
              checked: bool = False) -> None:  # fmt: skip
    kwargs = dict(lr=lr_tensor if lr_tensor is not None else lr, momentum=momentum, dampening=dampening,
                  weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                  grad_scale=grad_scale, found_inf=found_inf, master_params=master_params)  # fmt: skip
    if backend == "triton":
        from .kernels.sgd import sgd_launch

        sgd_launch(params, grads, momentum_buffers, cache=_table_cache(), checked=checked, **kwargs)
    else:
        from ._ref_sgd_lion import sgd_cpu_

        sgd_cpu_(params, grads, momentum_buffers, **kwargs)


@torch.library.custom_op("fused_ops::lion_", mutates_args=("params", "exp_avgs", "master_params"))
def lion_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    master_params: list[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    backend: str,
) -> None:
    """One Lion step over tensors of one (device, dtype); see ``kernels/lion.py``."""
    _lion_checked(params, grads, exp_avgs, master_params, lr, lr_tensor, beta1, beta2, weight_decay, maximize,
                  grad_scale, found_inf, backend)  # fmt: skip


@lion_.register_kernel("cuda")
def _lion_cuda(*args) -> None:
    _lion_checked(*args)


@no_user_code
def _lion_checked(params, grads, exp_avgs, master_params, lr, lr_tensor, beta1, beta2, weight_decay, maximize,
                  grad_scale, found_inf, backend) -> None:  # fmt: skip
    """``lion_`` called through the dispatcher: checked (see ``_check_written_memory``), then run."""
    if params:
        from .kernels.lion import _check

        fn = "fused_ops::lion_"
        _check_op_numbers(fn, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
        _check(fn, params, grads, exp_avgs, master_params, lr_tensor if lr_tensor is not None else lr, grad_scale,
               found_inf)  # fmt: skip
        _check_written_memory(fn, dict(params=params, exp_avgs=exp_avgs, master_params=master_params),
                              dict(grads=grads), lr=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)  # fmt: skip
    else:
        _check_no_params("fused_ops::lion_", grads=grads, exp_avgs=exp_avgs, master_params=master_params)
    _lion_body(params, grads, exp_avgs, master_params, lr, lr_tensor, beta1, beta2, weight_decay, maximize,
               grad_scale, found_inf, backend, checked=True)  # fmt: skip


@lion_.register_fake
def _lion_fake(*args) -> None:
    _check_not_mixed_meta("lion_", args)


def _lion_body(params, grads, exp_avgs, master_params, lr, lr_tensor, beta1, beta2, weight_decay, maximize,
               grad_scale, found_inf, backend, checked: bool = False) -> None:  # fmt: skip
    kwargs = dict(
        lr=lr_tensor if lr_tensor is not None else lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
        master_params=master_params,
    )
    if backend == "triton":
        from .kernels.lion import lion_launch

        lion_launch(params, grads, exp_avgs, cache=_table_cache(), checked=checked, **kwargs)
    else:
        from ._ref_sgd_lion import lion_ as lion_reference

        lion_reference(params, grads, exp_avgs, **kwargs)
