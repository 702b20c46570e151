"""Mixed precision: DynamicLossScaler, a loss scaler whose state lives on the device.

The scaler follows torch's ``GradScaler`` growth rule and DeepSpeed's / Megatron's hysteresis
(``delayed_shift``), keeps every counter in device tensors so that ``update`` never synchronises with the
host, and counts skipped steps loudly: the count can be read at any time, and a warning is raised when steps
keep being skipped (checked lazily, see :class:`DynamicLossScaler`).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate, compress, islice, repeat
from operator import add, attrgetter, gt, le

import torch
from torch import Tensor

from . import functional
from ._backend import check_backend
from ._validate import _interleaved, _reach, has_memory, outside_storage, real_float
from .kernels._checks import no_user_code, overrides_refusal

__all__ = ["DynamicLossScaler", "LossScalerWarning"]

# The scale lives in a float32 tensor and the counters in int32 (growth, hysteresis) and int64 (skips) tensors: a
# value outside their range would become 0 or inf, or raise half-way through an update or a load.
_FP32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32
_FP32_MAX = float(torch.finfo(torch.float32).max)
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter))
_DATA_PTR = Tensor.data_ptr
# Each scaler's state spans (addresses of its own tensors, their _grad_keys), outside the scaler: a cache, not state.
_STATE_SPANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_DEVICE, _NBYTES, _CONTIGUOUS = attrgetter("device"), attrgetter("nbytes"), Tensor.is_contiguous
_STORAGE, _STORAGE_PTR, _STORAGE_NBYTES = (
    Tensor.untyped_storage,
    torch.UntypedStorage.data_ptr,
    torch.UntypedStorage.nbytes,
)
_CALL, _RESIZABLE = weakref.ref.__call__, torch.UntypedStorage.resizable
_ERRORS = (RuntimeError, TypeError, NotImplementedError)  # (a tensor without storage: it has no span, the op names it)


class _Footprint:
    """What ``_validate._interleaved`` reads of a tensor (address, element size, dtype, shape, strides), kept without
    the tensor (a span does not keep a grad's memory alive)."""

    __slots__ = ("_ptr", "_size", "dtype", "shape", "_stride")

    def __init__(self, ptr: int, layout: tuple) -> None:
        self._ptr = ptr
        self._size, self.dtype, self.shape, self._stride = layout

    def data_ptr(self) -> int:
        return self._ptr

    def element_size(self) -> int:
        return self._size

    def stride(self) -> tuple[int, ...]:
        return self._stride

    def dim(self) -> int:
        return len(self.shape)


def _layout(x: Tensor) -> tuple | None:
    """None for a contiguous tensor (it holds every byte of its span), else what :class:`_Footprint` keeps."""
    return None if x.is_contiguous() else (x.element_size(), x.dtype, tuple(x.shape), x.stride())


def _apart(a: int, a_layout: tuple | None, b: int, b_layout: tuple | None) -> bool:
    """Whether two tensors (first byte, :func:`_layout`) whose byte ranges overlap provably share no element: two
    strided views that interleave (``_validate._interleaved``). A contiguous tensor holds every byte of its span."""
    return a_layout is not None and b_layout is not None and _interleaved(_Footprint(a, a_layout),
                                                                        _Footprint(b, b_layout))  # fmt: skip


class _Spans:
    """Where tensors keep their elements: per device, the byte spans ``[start, end)`` of each tensor and its layout
    (:func:`_layout`). :meth:`isdisjoint` is true iff no span shares memory with one of another ``_Spans``: byte
    ranges that overlap on one device, unless two strided views provably interleave (``W[:, :3]`` and ``W[:, 3:]``,
    ``x[0::2]`` and ``x[1::2]``), as ``check_memory`` lets them be. The spans, sorted by start with the running
    maximum of their ends, answer each query by one bisection (and a walk back over the spans that reach past its
    start: one, when the spans are disjoint); the index is built once per content."""

    __slots__ = ("_parts", "_index")

    def __init__(self, parts: dict | None = None) -> None:
        self._parts = {} if parts is None else parts  # device -> (starts, ends, layouts or None: all contiguous)
        self._index: dict | None = None

    def __len__(self) -> int:
        return sum(len(starts) for starts, _, _ in self._parts.values())

    def __bool__(self) -> bool:
        return any(starts for starts, _, _ in self._parts.values())

    def __iter__(self):
        for dev, (starts, ends, layouts) in self._parts.items():
            yield from zip(repeat(dev), starts, ends, repeat(None) if layouts is None else layouts)

    def __repr__(self) -> str:
        return f"_Spans({list(self)!r})"

    def __ior__(self, other):
        if not isinstance(other, _Spans):
            return NotImplemented
        for dev, (starts, ends, layouts) in other._parts.items():
            mine = self._parts.get(dev)
            if mine is None:
                self._parts[dev] = (list(starts), list(ends), None if layouts is None else list(layouts))
                continue
            if mine[2] is None and layouts is not None:
                mine = self._parts[dev] = (mine[0], mine[1], [None] * len(mine[0]))
            if mine[2] is not None:
                mine[2].extend([None] * len(starts) if layouts is None else layouts)
            mine[0].extend(starts)
            mine[1].extend(ends)
        self._index = None
        return self

    def _lookup(self) -> dict:
        if self._index is None:
            index = {}
            for dev, (starts, ends, layouts) in self._parts.items():
                if not all(map(le, starts, islice(starts, 1, None))):
                    order = sorted(range(len(starts)), key=starts.__getitem__)
                    starts, ends = list(map(starts.__getitem__, order)), list(map(ends.__getitem__, order))
                    layouts = None if layouts is None else list(map(layouts.__getitem__, order))
                index[dev] = (starts, ends, layouts, list(accumulate(ends, max)))
            self._index = index
        return self._index

    def first_overlap(self, other: _Spans) -> tuple[tuple, tuple] | None:
        """A span of ``other`` and one of ``self`` that share memory (``(device, start, end, layout)``, the first
        found), or None."""
        index = self._lookup()
        for dev in index.keys() & other._parts.keys():
            starts, ends, layouts, reach = index[dev]
            q_starts, q_ends, q_layouts = other._parts[dev]
            js = list(map(bisect_left, repeat(starts), q_ends))  # (spans [0, j) start before the query ends)
            before = [0, *reach]  # (the furthest end among spans [0, j); addresses are > 0)
            if not any(map(gt, map(before.__getitem__, js), q_starts)):
                continue
            for k, (q_start, j) in enumerate(zip(q_starts, js)):
                i = j - 1
                while i >= 0 and reach[i] > q_start:
                    mine = None if layouts is None else layouts[i]
                    theirs = None if q_layouts is None else q_layouts[k]
                    if ends[i] > q_start and not _apart(starts[i], mine, q_start, theirs):
                        return (dev, q_start, q_ends[k], theirs), (dev, starts[i], ends[i], mine)
                    i -= 1
        return None

    def isdisjoint(self, other) -> bool:
        if isinstance(other, _Spans):
            return self.first_overlap(other) is None
        raise TypeError(f"_Spans.isdisjoint takes another _Spans (from _grad_keys), got {type(other).__name__}")

    def __reduce__(self):  # (copies and pickles of a scaler keep the spans, in lists of their own)
        parts = {dev: (list(a), list(e), None if n is None else list(n)) for dev, (a, e, n) in self._parts.items()}
        return _Spans, (parts,)


def _grad_keys(xs) -> _Spans:
    """Where each tensor of ``xs`` keeps its elements (a DTensor's local shard), as :class:`_Spans`: what
    :class:`DynamicLossScaler` remembers of the grads it unscaled, and compares with the grads it is given (any
    shared memory, not only the same tensor: a grad and a flat buffer holding it). Empty tensors, tensors without
    memory (meta, freed) and non-tensors have none. (About 0.25 us a plain tensor: it runs at every ``unscale_``.)"""
    if not set(map(type, xs)) <= _PLAIN_TYPES:
        xs = [getattr(x, "_local_tensor", x) for x in xs]
        xs = [x for x in xs if type(x) in _PLAIN_TYPES or isinstance(x, Tensor) and has_memory(type(x))]
    try:  # (a sparse or other tensor without strided memory raises: the loop below leaves it out)
        starts = list(map(_DATA_PTR, xs))
        if all(map(_CONTIGUOUS, xs)):
            sizes, layouts = list(map(_NBYTES, xs)), None
        else:
            sizes, layouts = list(map(_reach, xs)), list(map(_layout, xs))
        devices = set(map(_DEVICE, xs))
    except _ERRORS:
        kept, starts, sizes, layouts, devices = [], [], [], [], set()
        for x in xs:
            try:
                if x.layout != torch.strided:
                    continue
                start, size, layout, device = x.data_ptr(), _reach(x), _layout(x), x.device
            except _ERRORS:
                continue
            kept.append(x)
            starts.append(start)
            sizes.append(size)
            layouts.append(layout)
            devices.add(device)
        xs = kept
    if 0 in starts or 0 in sizes:  # (no memory: meta, freed or empty)
        keep = [bool(a and n) for a, n in zip(starts, sizes)]
        xs, starts, sizes = list(compress(xs, keep)), list(compress(starts, keep)), list(compress(sizes, keep))
        layouts = None if layouts is None else list(compress(layouts, keep))
    if not starts:
        return _Spans()
    ends = list(map(add, starts, sizes))
    if len(devices) == 1:
        return _Spans({devices.pop(): (starts, ends, layouts)})
    parts: dict = {}
    for i, x in enumerate(xs):
        part = parts.setdefault(x.device, ([], [], []))
        part[0].append(starts[i])
        part[1].append(ends[i])
        part[2].append(None if layouts is None else layouts[i])
    return _Spans(parts)


def _has_dtensor(xs: list) -> bool:
    return not set(map(type, xs)) <= _PLAIN_TYPES and functional._dtensor.has_dtensor(xs)


def _is_dtensor(x) -> bool:
    return functional._dtensor.DTensor is not None and isinstance(x, functional._dtensor.DTensor)


def _some_outside_storage(xs) -> bool:
    """Whether a tensor of ``xs`` (a DTensor: its local shard) lies outside its storage (freed or shrunk in place):
    its span then says nothing about the memory it shares, and the op refuses it by that name, before anything is
    written. Checked only where an overlap was found (an error path)."""
    for x in xs:
        x = getattr(x, "_local_tensor", x)
        if isinstance(x, Tensor) and x.layout == torch.strided and has_memory(type(x)) and outside_storage(x):
            return True
    return False


def _overrides_refusal(fn: str, args: tuple) -> BaseException | None:
    """The first refusal of a tensor among the lists of ``args`` (``(name, xs)`` pairs) that runs Python code of its own
    when read (``kernels/_checks.py: overrides_refusal``), for the op to agree with the other ranks (or raise)."""
    for name, xs in args:
        if isinstance(xs, list):
            err = overrides_refusal(fn, xs, lambda i, name=name: f"{name}[{i}]")
            if err is not None:
                return err
    return None


def _listed(xs):
    """``xs`` as a list when it is an iterable other than a tensor (else as it is, for the op to refuse)."""
    return list(xs) if isinstance(xs, Iterable) and not isinstance(xs, (Tensor, str, bytes)) else xs


def _fp32(value: float) -> float:
    """``value`` rounded to float32, as the scale tensor holds it."""
    return float(torch.tensor(value, dtype=torch.float32))


def _check_scale(fn: str, name: str, value: float) -> None:
    """A finite number > 0 that is a normal float32 (not 0, a subnormal or inf once stored in the scale tensor)."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value}")
    if not _FP32_TINY <= value <= _FP32_MAX:
        raise ValueError(f"{fn}: {name} must be a normal float32 number (in [{_FP32_TINY:.4g}, {_FP32_MAX:.4g}]: the "
                         f"scale is kept in float32), got {value}")  # fmt: skip


def _check_hyper(fn: str, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale) -> None:
    """The constructor's hyper-parameters (also what ``load_state_dict`` restores)."""
    growth_factor = _number(fn, "growth_factor", growth_factor)
    if not (math.isfinite(growth_factor) and growth_factor > 1):
        raise ValueError(f"{fn}: growth_factor must be a finite number > 1, got {growth_factor}")
    backoff_factor = _number(fn, "backoff_factor", backoff_factor)
    if not 0 < backoff_factor < 1:
        raise ValueError(f"{fn}: backoff_factor must be in (0, 1), got {backoff_factor}")
    _positive_int("growth_interval", growth_interval, fn=fn, high=_INT32_MAX)
    _positive_int("hysteresis", hysteresis, fn=fn, high=_INT32_MAX)
    min_scale = _number(fn, "min_scale", min_scale)
    _check_scale(fn, "min_scale", min_scale)
    if max_scale is not None:
        max_scale = _number(fn, "max_scale", max_scale)
        if not (math.isfinite(max_scale) and max_scale >= min_scale):
            raise ValueError(f"{fn}: max_scale must be None or a finite number >= min_scale, got {max_scale}")
        _check_scale(fn, "max_scale", max_scale)


class LossScalerWarning(RuntimeWarning):
    """Steps keep being skipped because of inf/nan gradients (filter it with ``warnings`` if intended)."""


def _positive_int(name: str, value, allow_none: bool = False, fn: str = "DynamicLossScaler",
                  high: int | None = None) -> None:  # fmt: skip
    if value is None and allow_none:
        return
    # (any integer but a bool, as the counters take them: numpy's too; not a 0-d tensor)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{fn}: {name} must be a positive int at most {high} (it is kept in an int32 tensor), got "
                         f"{value!r}")  # fmt: skip


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current CUDA stream is being captured into a CUDA graph (never for a CPU device)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


_STATE_KEYS = ("scale", "growth_tracker", "hysteresis_tracker")
_OPTIONAL_KEYS = ("skipped_steps", "consecutive_skipped", "min_scale_overflows", "growth_factor", "backoff_factor",
                  "growth_interval", "hysteresis", "min_scale", "max_scale", "consecutive_hysteresis")  # fmt: skip


def _number(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a number, got {value!r}")
    return real_float(value)  # (an int too large for a float: inf, which the caller's range check names)


def _count(fn: str, name: str, value, high: int) -> int:
    """A non-negative int, at most ``high`` (the range of its device tensor, or a tighter bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}")
    if value < 0 and high >= _INT32_MAX - 1:  # (a bound of the tensor's range: the message says ">= 0")
        raise ValueError(f"{fn}: {name} must be an int >= 0, got {value!r}")
    if not 0 <= value <= high:
        raise ValueError(f"{fn}: {name} must be an int in [0, {high}], got {value!r}")
    return int(value)


class DynamicLossScaler:
    """Dynamic loss scaling with hysteresis; all state on the device, no host sync in :meth:`update`.

    Each step: ``scaler.scale_loss(loss).backward()``; then either :meth:`unscale_` the grads (one launch,
    sets :attr:`found_inf`), or let the optimizer divide by the scale itself with :meth:`grad_scale_and_norm`
    (one norm pass, no unscale pass); pass :attr:`found_inf` to the optimizer (``found_inf`` makes
    ``fused_ops.functional.adam_`` a no-op on the device); then :meth:`update`.

    Update rule (torch's GradScaler, with DeepSpeed's ``delayed_shift`` / Megatron's ``hysteresis``):

    - a step with inf/nan grads is skipped, resets the growth counter and decrements the hysteresis counter;
      the scale backs off (``scale * backoff_factor``, at least ``min_scale``) once the hysteresis counter
      reaches 0, i.e. on the ``hysteresis``-th overflow, and on every overflow after that until it is reset;
    - after ``growth_interval`` consecutive good steps the scale grows by ``growth_factor`` (at most
      ``max_scale``) and the hysteresis counter is reset to ``hysteresis`` (with ``consecutive_hysteresis``
      it is reset after every good step instead, as DeepSpeed's option of that name does).

    Skipped steps are counted on the device (:attr:`skipped_steps` reads the count). Warnings are checked
    lazily, never blocking: every ``check_interval`` updates the counters are copied to the host
    asynchronously, and the copy is inspected at a later update once it has landed (so a warning comes at
    most about two intervals late); reading :attr:`skipped_steps` checks at once (that read syncs). A
    :class:`LossScalerWarning` is raised when at least ``warn_after`` consecutive steps were skipped (again
    at each check while the skipping goes on) and when grads overflow with the scale already at
    ``min_scale``. ``warn_after=None`` or ``check_interval=None`` turn the checks off.

    Args:
        init_scale: initial scale (2^16, as torch; Megatron uses 2^32).
        growth_factor, backoff_factor, growth_interval: as ``torch.amp.GradScaler``.
        hysteresis: overflows tolerated before the scale backs off (DeepSpeed ``delayed_shift``; 1 = back off
            at once, as torch).
        min_scale, max_scale: bounds on the scale (``max_scale=None``: unbounded).
        consecutive_hysteresis: refill the hysteresis counter after every step without overflow (DeepSpeed's
            option), not only when the scale grows.
        warn_after: warn when at least this many consecutive steps were skipped (``None``: never).
        check_interval: every this many updates the counters are copied to the host, without blocking, for
            those warnings (``None``: never).
        device: where the state lives (default: CUDA if available, else CPU).
        backend: for the unscale / norm ops.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        min_scale: float = 1.0,
        max_scale: float | None = None,
        *,
        consecutive_hysteresis: bool = False,
        warn_after: int | None = 10,
        check_interval: int | None = 100,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        fn = "DynamicLossScaler"
        init_scale = _number(fn, "init_scale", init_scale)
        _check_scale(fn, "init_scale", init_scale)
        _check_hyper(fn, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale)
        if init_scale < min_scale or (max_scale is not None and init_scale > max_scale):
            raise ValueError(f"{fn}: init_scale {init_scale} is outside [min_scale, max_scale]")
        _positive_int("warn_after", warn_after, allow_none=True)
        _positive_int("check_interval", check_interval, allow_none=True)
        if backend is not None:
            try:
                check_backend(backend)
            except ValueError as e:
                raise ValueError(f"{fn}: {e}") from None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "meta":  # (its scale and flags would have no memory: every method would fail)
            raise ValueError(f"{fn}: device must hold memory, got {self.device}")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.min_scale = float(min_scale)
        self.max_scale = None if max_scale is None else float(max_scale)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.warn_after = None if warn_after is None else int(warn_after)
        self.check_interval = None if check_interval is None else int(check_interval)
        self.backend = backend

        def full(value, dtype):
            return torch.full((1,), value, dtype=dtype, device=self.device)

        self._scale = full(float(init_scale), torch.float32)
        self._found_inf = full(0.0, torch.float32)
        self._growth_tracker = full(0, torch.int32)
        self._hysteresis_tracker = full(self.hysteresis, torch.int32)
        self._skipped = full(0, torch.int64)
        self._consecutive = full(0, torch.int64)
        self._min_scale_overflows = full(0, torch.int64)
        self._n_updates = 0
        self._pending = None  # (host snapshot, event or None) of the last asynchronous check
        self._warned_skipped = 0  # total skipped count at the last skip warning
        self._warned_min_scale = 0
        self._unscaled = _Spans()  # _grad_keys of the tensors unscale_ wrote since the last update
        self._unscaled_storages: list = []  # their storages: (device, start, end, weakref or None), see _forget_freed
        self._unscaled_dtensors: dict = {}  # id -> weakref of the DTensors unscale_ wrote since the last update

    # -- device tensors (reading them does not sync) ------------------------------------------------------------

    @property
    def scale(self) -> Tensor:
        """The current scale: a 1-element fp32 device tensor (updated in place)."""
        return self._scale

    @property
    def found_inf(self) -> Tensor:
        """1-element fp32 device flag: 1 when inf/nan grads were seen since the last :meth:`update`."""
        return self._found_inf

    @property
    def inv_scale(self) -> Tensor:
        """1 / scale, computed in float64 and rounded to fp32 (as GradScaler), on the device."""
        return self._scale.double().reciprocal().float()

    @property
    def skipped_steps_tensor(self) -> Tensor:
        """Number of skipped steps so far, as a 1-element int64 device tensor (no sync)."""
        return self._skipped

    # -- one step -----------------------------------------------------------------------------------------------

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss * scale`` (differentiable; call ``.backward()`` on the result)."""
        if not isinstance(loss, Tensor):
            raise TypeError(f"DynamicLossScaler.scale_loss: loss must be a Tensor, got {type(loss).__name__}")
        return loss * self._scale.reshape(()).to(loss.device)

    @no_user_code(agreed=("grads", "out"))  # (checked by functional._unscale: a refusal is agreed)
    def unscale_(self, grads: Sequence[Tensor], out: Sequence[Tensor] | None = None) -> Tensor:
        """Divide ``grads`` by the scale in place (or write to ``out``, e.g. fp32 copies of bf16 grads) and set
        :attr:`found_inf` on inf/nan: one launch per (device, dtype) group, no sync. Returns :attr:`found_inf`.
        DTensor grads: their local shards are unscaled and :attr:`found_inf` is all-reduced (MAX) over their meshes,
        so every rank skips the same steps (see ``fused_ops.unscale_``)."""
        grads, out = _listed(grads), _listed(out)  # (a generator is read once, here)
        # (a tensor that runs code of its own when read is refused before anything reads it (the spans below): the
        # refusal is agreed with the other ranks in functional._unscale, as its checks of the DTensor shards)
        err = _overrides_refusal("DynamicLossScaler.unscale_", (("grads", grads), ("out", out)))
        keys = _grad_keys(grads) if isinstance(grads, list) and err is None else _Spans()
        out_keys = _grad_keys(out) if isinstance(out, list) and err is None else _Spans()
        try:
            if err is None:
                self._refuse_own_state("unscale_", (("grads", grads, keys), ("out", out, out_keys)))
                self._refuse_unscaled("unscale_", grads, keys)
        except (ValueError, RuntimeError) as e:
            # (decided from this rank's memory, where a DTensor's shard may differ between ranks (an empty one has
            # none): agreed with the other ranks before anything is written, so that every rank raises)
            if not (isinstance(grads, list) and _has_dtensor(grads)):
                raise
            err = e
        done: list[int] = []
        try:
            with torch.no_grad():  # (grads of a create_graph backward require grad: unscaled in place, as torch's)
                functional._unscale(
                    grads, self.inv_scale, self._found_inf, out, self.backend, done, err, checked=err is None
                )  # (checked above; on an error, again: its stand-ins)
        except BaseException:
            # (every group's launch is prepared before the first runs, so an error leaves the grads as they were,
            # unless a launch itself failed after an earlier group was written: those grads are recorded, and a
            # retry is refused rather than dividing them twice)
            if done:
                written = grads if out is None else out
                self._remember_dtensors([written[i] for i in done])
                self._record_unscaled([written[i] for i in done], _grad_keys([written[i] for i in done]))
            raise
        self._remember_dtensors(grads if out is None else out)
        self._record_unscaled(grads if out is None else out, keys if out is None else out_keys)
        return self._found_inf

    def _remember_dtensors(self, tensors: list) -> None:
        """The DTensors of ``tensors`` (just unscaled), by identity: a second unscale_ of one is refused on every rank
        alike, also where its local shard is empty (and so has no span, see :func:`_grad_keys`) on some ranks."""
        if _has_dtensor(tensors):
            for x in tensors:
                if _is_dtensor(x):
                    self._unscaled_dtensors[id(x)] = weakref.ref(x)

    def _record_unscaled(self, tensors: list, keys: _Spans) -> None:
        """Remember ``keys`` (what ``tensors`` hold) as unscaled until the next update, and the storages they are in
        (one chunk of parallel lists per call: about 0.2 us a tensor)."""
        if not keys:
            return
        self._forget_freed()
        if not set(map(type, tensors)) <= _PLAIN_TYPES:
            tensors = [getattr(x, "_local_tensor", x) for x in tensors]
        try:
            storages = list(map(_STORAGE, tensors))
            starts = list(map(_STORAGE_PTR, storages))
            ends = list(map(add, starts, map(_STORAGE_NBYTES, storages)))
            devs = next(iter(keys._parts)) if len(keys._parts) == 1 else list(map(_DEVICE, storages))
            own = list(map(_RESIZABLE, storages))
            if not all(own):  # (see _forget_freed: memory torch does not own is never forgotten)
                storages, starts, ends = (list(compress(xs, own)) for xs in (storages, starts, ends))
                devs = devs if isinstance(devs, torch.device) else list(compress(devs, own))
            chunk = (devs, starts, ends, list(map(weakref.ref, storages)))
        except (*_ERRORS, AttributeError):  # (a tensor without storage has no span either: one at a time)
            chunk = ([], [], [], [])
            for x in tensors:
                try:
                    st = x.untyped_storage()
                    if not st.resizable():
                        continue
                    item = (st.device, st.data_ptr(), st.data_ptr() + st.nbytes(), weakref.ref(st))
                except (*_ERRORS, AttributeError):
                    continue
                for part, value in zip(chunk, item):
                    part.append(value)
        self._unscaled_storages.append(chunk)
        self._unscaled |= keys

    def _forget_freed(self, moved: bool = False) -> bool:
        """Drop the spans of unscaled grads whose storage was freed since (``zero_grad(set_to_none=True)`` after one
        optimizer's step, as torch's GradScaler docs do for several models): new grads may get that memory before
        the next update, and are not the grads that were unscaled. Only storages torch allocated (resizable ones)
        are tracked: one wrapping memory it does not own (``torch.from_numpy``, ``frombuffer``, DLPack) may die while
        the memory, and the unscaled values in it, live on. Torch keeps a Python storage object alive as long
        as its memory, so a dead weak reference means freed memory. Run whenever spans are added, so that the spans
        kept all lie in storages alive together (which do not overlap): a freed one's range then holds no live
        one's spans. ``moved`` (when new grads overlap kept spans, before they are refused): a storage freed or
        resized in place (``untyped_storage().resize_(0)``, as FSDP frees buffers), alive but no longer at its
        recorded range, counts as freed too (one attribute read per storage, only then). Returns whether any were
        dropped."""
        dead: dict = {}
        kept = []
        for devs, starts, ends, refs in self._unscaled_storages:
            if refs is not None and moved:
                alive = [(st := r()) is not None and st.data_ptr() == start and st.data_ptr() + st.nbytes() == end
                         for r, start, end in zip(refs, starts, ends)]  # fmt: skip
                if all(alive):
                    kept.append((devs, starts, ends, refs))
                    continue
            elif refs is None or None not in map(_CALL, refs):
                kept.append((devs, starts, ends, refs))
                continue
            else:
                alive = [r() is not None for r in refs]
            if isinstance(devs, torch.device):  # (one device for the chunk)
                devs = [devs] * len(refs)
            for dev, start, end, live in zip(devs, starts, ends, alive):
                if not live:
                    dead.setdefault(dev, []).append((start, end))
            if any(alive):  # (a chunk all of whose storages died goes: no growth per unscale_ between updates)
                kept.append(tuple(list(compress(part, alive)) for part in (devs, starts, ends, refs)))
        if not dead:
            return False
        self._unscaled_storages = kept
        parts: dict = {}
        for dev, start, end, layout in self._unscaled:
            if any(lo <= start < hi for lo, hi in dead.get(dev, ())):
                continue
            part = parts.setdefault(dev, ([], [], []))
            part[0].append(start)
            part[1].append(end)
            part[2].append(layout)
        self._unscaled = _Spans(parts)
        return True

    def __getstate__(self) -> dict:
        """Copies and pickles keep the unscaled spans, and their storages' ranges without the references (a copy's
        grads are copies: its spans are then kept until its next update, as they were before storages were
        tracked)."""
        state = self.__dict__.copy()
        state["_unscaled_storages"] = [(*chunk[:3], None) for chunk in self._unscaled_storages]
        state["_unscaled_dtensors"] = {}  # (weak references: a copy's grads are other objects)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_unscaled_storages", [])
        self.__dict__.setdefault("_unscaled_dtensors", {})

    def _state_tensors(self) -> list[tuple[str, Tensor]]:
        """Every tensor the scaler keeps, by name, but ``found_inf``: ``fused_ops.unscale_`` writes it, so it refuses
        grads and out that share memory with it itself ("unscale_: grads[0] and found_inf share memory")."""
        named = [
            ("scale", self._scale), ("growth_tracker", self._growth_tracker),
            ("hysteresis_tracker", self._hysteresis_tracker), ("skipped_steps", self._skipped),
            ("consecutive_skipped", self._consecutive), ("min_scale_overflows", self._min_scale_overflows),
        ]  # fmt: skip
        if self._pending is not None:
            named.append(("host copy of the counters", self._pending[0]))
        return named

    def _refuse_own_state(self, fn: str, groups) -> None:
        """A ValueError naming the first tensor of ``groups`` (``(name, list, its _grad_keys)``) that shares memory with
        one of the scaler's own tensors (``unscale_(grads, out=[scaler.scale])`` would write the scale), before
        anything is written."""
        named = self._state_tensors()
        # (the state's spans, kept while its tensors stay as they are: their addresses, dtypes, sizes and strides are
        # the key, a cheap check; one given more bytes at its address by set_() has other sizes)
        where = tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for _, t in named)
        cached = _STATE_SPANS.get(self)
        if cached is None or cached[0] != where:
            cached = _STATE_SPANS[self] = (where, _grad_keys([x for _, x in named]))
        state = cached[1]
        if all(state.isdisjoint(keys) for _, _, keys in groups):
            return
        for name, xs, keys in groups:
            if state.isdisjoint(keys):
                continue
            for i, x in enumerate(xs):
                spans = _grad_keys([x])
                what = next((n for n, t in named if not _grad_keys([t]).isdisjoint(spans)), None)
                if what is None:
                    continue
                if _some_outside_storage(xs):  # (its span is past its storage, anywhere: the op names it first)
                    return
                raise ValueError(
                    f"DynamicLossScaler.{fn}: {name}[{i}] shares memory with the scaler's own {what} tensor: grads "
                    "and out may not be (nor overlap) the scaler's state, which unscale_ would overwrite; pass "
                    "separate tensors"
                )

    def _refuse_unscaled(self, fn: str, grads, keys: _Spans | None = None) -> None:
        """As torch's ``GradScaler`` refuses a second ``unscale_`` of one optimizer between updates: grads that
        :meth:`unscale_` already divided by the scale (in place, or the ``out`` it wrote) since the last
        :meth:`update` would be divided twice, or give a norm too small by the scale. Any shared memory counts (a
        grad and a flat buffer or a slice holding it: byte ranges on one device, see :class:`_Spans`)."""
        if not isinstance(grads, list):
            return
        if self._unscaled_dtensors and _has_dtensor(grads):  # (by identity: the same on every rank)
            ids = self._unscaled_dtensors
            if any(_is_dtensor(x) and (r := ids.get(id(x))) is not None and r() is x for x in grads):
                raise RuntimeError(
                    f"DynamicLossScaler.{fn}: grads were already unscaled by unscale_() since the last update() (they "
                    "would be divided by the scale twice); unscale each grad once per step, and call update() after "
                    "the optimizer step"
                )
        if not self._unscaled:
            return
        if keys is None:
            keys = _grad_keys(grads)
        # (a grad outside its storage has a span anywhere: the op names it, before anything is written)
        if (not self._unscaled.isdisjoint(keys) and not (self._forget_freed(moved=True)
                                                         and self._unscaled.isdisjoint(keys))
                and not _some_outside_storage(grads)):  # fmt: skip
            raise RuntimeError(
                f"DynamicLossScaler.{fn}: grads were already unscaled by unscale_() since the last update() (they "
                "would be divided by the scale twice); unscale each grad once per step, and call update() after "
                "the optimizer step"
            )

    @no_user_code(agreed=("grads",))  # (checked by functional._norm_locals: a refusal is agreed)
    def grad_scale_and_norm(
        self, grads: Sequence[Tensor], max_norm: float | None = None, norm_type: float = 2.0
    ) -> tuple[Tensor, Tensor]:
        """For an optimizer that unscales inside its kernel: one read of the (scaled) grads, no write.

        Computes the norm of the scaled grads (one launch), sets :attr:`found_inf` if it is not finite (an inf
        or nan grad, or a norm past float32's range, which also calls for a smaller scale), and
        returns ``(grad_scale, norm)``: ``norm`` is the unscaled grads' norm (0-d fp32), and ``grad_scale``
        (1-element fp32) the number to divide the grads by: the loss scale, divided by the clip coefficient
        ``min(1, max_norm / (norm + 1e-6))`` when ``max_norm`` is given. Pass it as ``grad_scale`` and
        :attr:`found_inf` as ``found_inf`` to ``fused_ops.functional.adam_``: unscale, clip and update are
        then one pass over the grads. No host sync.

        DTensor grads (FSDP2, tensor parallel): ``norm`` is the global norm across the mesh (see
        ``fused_ops.grad_norm``), the same on every rank, and :attr:`found_inf` is agreed across the grads' meshes in
        the same all-reduce (a flag already set on one rank, e.g. by an earlier :meth:`unscale_` of plain grads, is
        set on all): one collective per mesh, no host sync.
        """
        fn = "DynamicLossScaler.grad_scale_and_norm"
        if max_norm is not None:  # (the numbers first, read once: nothing of the caller's runs after a check)
            max_norm = functional._check_max_norm(fn, max_norm)
        norm_type = functional._check_norm_type(fn, norm_type)
        grads = _listed(grads)
        err = _overrides_refusal(fn, (("grads", grads),))  # (before anything reads them: see unscale_)
        try:
            if err is None:
                self._refuse_unscaled("grad_scale_and_norm", grads)
        except RuntimeError as e:  # (with DTensors: agreed in the norm's reduction, see unscale_)
            if not (isinstance(grads, list) and _has_dtensor(grads)):
                raise
            err = e
        local, dtypes, specs, err = functional._norm_locals(
            fn, "grads", functional._as_list(fn, "grads", grads), err, checked=err is None
        )  # (checked above)
        if any(g.is_meta for g in local) and not self._scale.is_meta:  # (the norm is read into the scaler's device)
            i = next(i for i, g in enumerate(local) if g.is_meta)
            raise TypeError(f"{fn}: grads[{i}] is a meta tensor (no memory), the scaler's scale is on "
                            f"{self._scale.device}: pass grads with memory")  # fmt: skip
        if specs is None:
            scaled = functional._grad_norm(fn, local, dtypes, norm_type, self.backend, "grads")
            agreed = None
        else:
            scaled, agreed = functional._global_grad_norm(fn, local, dtypes, norm_type, self.backend, "grads", specs,
                                                          flag=self._found_inf, err=err)  # fmt: skip
        scaled = scaled.to(self.device)
        bad = (~torch.isfinite(scaled)).to(torch.float32).reshape(1)
        if agreed is not None:
            bad = torch.maximum(bad, agreed.to(self.device))
        self._found_inf.copy_(torch.maximum(self._found_inf, bad))
        norm = (scaled.double() / self._scale.double().reshape(())).float()
        grad_scale = self._scale.clone()
        if max_norm is not None:
            grad_scale = grad_scale / functional.clip_coef(norm, max_norm)
        return grad_scale, norm

    def update(self, found_inf: Tensor | None = None) -> None:
        """Advance the scale after a step; ``found_inf`` (default: :attr:`found_inf`) says the step was
        skipped. All on the device: no host sync. Clears :attr:`found_inf`."""
        if found_inf is not None:
            functional._scalar_tensor("DynamicLossScaler.update", "found_inf", found_inf)
        flag = self._found_inf if found_inf is None else found_inf
        # Every new value is computed out of place first, and so is what the lazy check reads (the snapshot of the
        # new counters, its host copy): an error there (out of memory) leaves the scaler as it was, and a retry
        # moves every counter once. The commit below only copies into the scaler's own tensors (no allocation).
        f = (flag.reshape(1).to(self.device) != 0).reshape(1)  # (any non-zero, nan included: as the steps read it)
        ok = ~f
        scale = self._scale
        min_overflows = self._min_scale_overflows + (f & (scale <= self.min_scale)).long()
        hyst = torch.where(f, self._hysteresis_tracker - 1, self._hysteresis_tracker).clamp_min_(0)
        back_off = f & (hyst <= 0)
        growth = torch.where(f, torch.zeros_like(self._growth_tracker), self._growth_tracker + 1)
        grow = ok & (growth >= self.growth_interval)
        # (in float64, rounded once: torch's GradScaler multiplies by the double factor; a growth past float32's
        # range is skipped, as torch skips a non-finite one, so the scale never becomes inf)
        grown = (scale.double() * self.growth_factor).float()
        if self.max_scale is not None:
            grown = grown.clamp_max(self.max_scale)
        backed_off = (scale.double() * self.backoff_factor).float().clamp_min(self.min_scale)
        new_scale = torch.where(back_off, backed_off, torch.where(grow & torch.isfinite(grown), grown, scale))
        reset = (grow | ok) if self.consecutive_hysteresis else grow
        new_hyst = torch.where(reset, torch.full_like(hyst, self.hysteresis), hyst)
        new_growth = torch.where(grow, torch.zeros_like(growth), growth)
        skipped = self._skipped + f.long()
        consecutive = torch.where(f, self._consecutive + 1, torch.zeros_like(self._consecutive))
        n_updates = self._n_updates + 1
        poll = None
        if self.check_interval is not None and self.warn_after is not None:
            # (not while a CUDA graph is captured: the check pins memory and queries an event; the next eager
            # update checks)
            if n_updates % self.check_interval == 0 and not _capturing(self.device):
                poll = self._prepare_poll(skipped, consecutive, min_overflows, new_scale)
        # -- commit: nothing below allocates or can fail on checked state
        self._min_scale_overflows.copy_(min_overflows)
        self._hysteresis_tracker.copy_(new_hyst)
        self._growth_tracker.copy_(new_growth)
        self._scale.copy_(new_scale)
        self._skipped.copy_(skipped)
        self._consecutive.copy_(consecutive)
        self._found_inf.zero_()  # a flag passed in by the caller is the caller's to clear
        self._unscaled = _Spans()
        self._unscaled_storages = []
        self._unscaled_dtensors = {}
        self._n_updates = n_updates
        if poll is not None:
            self._finish_poll(*poll)

    # -- skip accounting ----------------------------------------------------------------------------------------

    def _snapshot(self) -> Tensor:
        return torch.cat([
            self._skipped.double(), self._consecutive.double(), self._min_scale_overflows.double(),
            self._scale.double(),
        ])  # fmt: skip

    def _prepare_poll(self, skipped: Tensor, consecutive: Tensor, min_overflows: Tensor, scale: Tensor) -> tuple:
        """The lazy check, every ``check_interval`` updates: inspect the last asynchronous snapshot if it has landed,
        then take one of the counters given (:meth:`update`'s new values, before they are committed; never blocks).
        Everything that can fail (allocations, a warning turned into an error) is done here, before the commit:
        returns ``(done, pending)`` for :meth:`_finish_poll`, which only stores them. ``done``: the landed snapshot was
        inspected (or none was pending); ``pending``: the new snapshot in flight, or None (inspected at once, on a
        host device, or not taken: the last one is still in flight)."""
        if self._pending is not None:
            host, event = self._pending
            if event is not None and not event.query():
                return False, None  # still in flight: look again at the next check
        snapshot = torch.cat([skipped.double(), consecutive.double(), min_overflows.double(), scale.double()])
        pending = None
        if snapshot.is_cuda:
            host = torch.empty(snapshot.shape, dtype=snapshot.dtype, pin_memory=True)
            host.copy_(snapshot, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(snapshot.device))  # (the copy's stream, not the current device's)
            pending = (host, event)
        if self._pending is not None:
            self._check(self._pending[0])
        if pending is None:
            self._check(snapshot)
        return True, pending

    def _finish_poll(self, done: bool, pending: tuple | None) -> None:
        if done:
            self._pending = pending

    def _check(self, host: Tensor, stacklevel: int = 4) -> None:
        skipped, consecutive, min_overflows, scale = host.tolist()
        if self.warn_after is not None and consecutive >= self.warn_after and skipped > self._warned_skipped:
            self._warned_skipped = skipped
            warnings.warn(
                f"DynamicLossScaler: the last {int(consecutive)} optimizer steps were skipped because of inf/nan "
                f"gradients ({int(skipped)} skipped in total); the loss scale is now {scale:g}. The model may be "
                "diverging, or the data may hold inf/nan.",
                LossScalerWarning,
                stacklevel=stacklevel,
            )
        if min_overflows > self._warned_min_scale:
            self._warned_min_scale = min_overflows
            warnings.warn(
                f"DynamicLossScaler: gradients overflowed with the loss scale already at min_scale "
                f"({self.min_scale:g}) {int(min_overflows)} time(s): those steps were skipped.",
                LossScalerWarning,
                stacklevel=stacklevel,
            )

    @property
    def skipped_steps(self) -> int:
        """The number of steps skipped so far. Reads a device counter (a host sync) and checks for warnings."""
        host = self._snapshot().cpu()
        if self.warn_after is not None:
            self._check(host, stacklevel=3)
        return int(host[0].item())

    def get_scale(self) -> float:
        """The current scale as a Python float (a host sync)."""
        return float(self._scale.item())

    # -- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Scale, counters and hyper-parameters, as Python numbers (reading them syncs once)."""
        skipped, consecutive, min_overflows, scale = self._snapshot().tolist()
        return {
            "scale": scale,
            "growth_tracker": int(self._growth_tracker.item()),
            "hysteresis_tracker": int(self._hysteresis_tracker.item()),
            "skipped_steps": int(skipped),
            "consecutive_skipped": int(consecutive),
            "min_scale_overflows": int(min_overflows),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "hysteresis": self.hysteresis,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "consecutive_hysteresis": self.consecutive_hysteresis,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s output (device tensors are filled in place). Every field is checked first
        (types, a finite scale > 0, counters >= 0, the hysteresis counter within ``[0, hysteresis]``, the
        hyper-parameters as the constructor checks them); on an error nothing has changed."""
        fn = "DynamicLossScaler.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{fn}: state_dict must be a dict, got {type(state_dict).__name__}")
        missing = set(_STATE_KEYS) - set(state_dict)
        if missing:
            raise KeyError(f"{fn}: missing keys {sorted(missing)}")
        unexpected = set(state_dict) - set(_STATE_KEYS) - set(_OPTIONAL_KEYS)
        if unexpected:
            raise KeyError(f"{fn}: unexpected keys {sorted(map(str, unexpected))}")
        hyper = {key: state_dict.get(key, getattr(self, key)) for key in (
            "growth_factor", "backoff_factor", "growth_interval", "hysteresis", "min_scale", "max_scale")}  # fmt: skip
        _check_hyper(fn, **hyper)
        consecutive_hysteresis = state_dict.get("consecutive_hysteresis", self.consecutive_hysteresis)
        if not isinstance(consecutive_hysteresis, bool):
            raise TypeError(f"{fn}: consecutive_hysteresis must be a bool, got {consecutive_hysteresis!r}")
        scale = _number(fn, "scale", state_dict["scale"])
        _check_scale(fn, "scale", scale)
        # (compared as float32, as the scale tensor holds them: a saved scale of min_scale=0.7 reads 0.69999999)
        low, high = _fp32(hyper["min_scale"]), None if hyper["max_scale"] is None else _fp32(hyper["max_scale"])
        if _fp32(scale) < low or (high is not None and _fp32(scale) > high):
            raise ValueError(f"{fn}: scale {scale} is outside [min_scale, max_scale] ([{hyper['min_scale']}, "
                             f"{hyper['max_scale']}])")  # fmt: skip
        # (int32 growth counter: it is incremented before it is compared with growth_interval)
        growth_tracker = _count(fn, "growth_tracker", state_dict["growth_tracker"], _INT32_MAX - 1)
        hysteresis = int(hyper["hysteresis"])
        hysteresis_tracker = _count(fn, "hysteresis_tracker", state_dict["hysteresis_tracker"], hysteresis)
        # (int64 counters, each incremented by a skipped step)
        skipped = _count(fn, "skipped_steps", state_dict.get("skipped_steps", 0), _INT64_MAX - 1)
        consecutive = _count(fn, "consecutive_skipped", state_dict.get("consecutive_skipped", 0), _INT64_MAX - 1)
        if consecutive > skipped:
            raise ValueError(f"{fn}: consecutive_skipped ({consecutive}) exceeds skipped_steps ({skipped})")
        min_overflows = _count(fn, "min_scale_overflows", state_dict.get("min_scale_overflows", 0), _INT64_MAX - 1)

        self.growth_factor = float(hyper["growth_factor"])
        self.backoff_factor = float(hyper["backoff_factor"])
        self.growth_interval = int(hyper["growth_interval"])
        self.hysteresis = int(hyper["hysteresis"])
        self.min_scale = float(hyper["min_scale"])
        self.max_scale = None if hyper["max_scale"] is None else float(hyper["max_scale"])
        self.consecutive_hysteresis = consecutive_hysteresis
        self._scale.fill_(scale)
        self._growth_tracker.fill_(growth_tracker)
        self._hysteresis_tracker.fill_(hysteresis_tracker)
        self._skipped.fill_(skipped)
        self._consecutive.fill_(consecutive)
        self._min_scale_overflows.fill_(min_overflows)
        self._warned_skipped = skipped
        self._warned_min_scale = min_overflows
        self._found_inf.zero_()
        self._pending = None
