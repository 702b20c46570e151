"""Launch checks shared by the multi-tensor launchers of cast.py, scale.py and flatten.py.

A multi-tensor kernel reads (and writes) ``numel`` elements of its compiled dtype from each address of its chunk
table: every tensor must be dense (strided), contiguous, of its role's dtype, on the launch device, with the element
count of its table entry; a scalar argument (a scale, a flag, a key) must be one element of the expected kind on
the launch device, because the kernel reads it through a raw pointer. The table is cached by address, so these run
on every call, not once per layout: a cached address may hold another tensor now.

Host time counts (10,000 tensors per launch): each check is a few passes over the list (sets of dtypes, devices
and layouts; one contiguity pass) and falls back to a loop that names the first offending tensor only when a pass
fails.
"""

from __future__ import annotations

import functools
import gc
import inspect
import math
import numbers
import operator
import sys
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import torch

_F = TypeVar("_F", bound=Callable[..., Any])


class _Depth(threading.local):
    n = 0


_DEPTH = _Depth()
_len_pre_dispatch = torch._ops._len_torch_dispatch_stack_pre_dispatch


class NoUserCode:
    """Between a launch's checks and the launch, no user code runs on this thread: a check holds for the tensor's
    memory as it was when checked, and user code could free or replace that memory before the kernel writes it
    (``p.data = t``, ``p.grad = None``, ``state["exp_avg"].set_(t)``). Inside: no ``__torch_function__`` (torch
    function modes, tensor subclasses' overrides), no torch dispatch modes (a mode's handler sees every aten op: a
    profiler's or a memory tracker's mode does not see this package's, as it does not see the Triton launches they
    surround), and no automatic garbage collection (``gc.callbacks``, finalizers of collected cycles). Another thread
    changing a tensor during the call is a data race, as it is for torch.optim's fused kernels.

    Re-entrant (an inner use on the same thread is free); :func:`no_user_code` wraps a function in it."""

    __slots__ = ("_gc", "_tf", "_modes")

    def __enter__(self) -> NoUserCode:
        _DEPTH.n += 1
        if _DEPTH.n > 1:
            return self
        self._gc = gc.isenabled()
        self._tf = self._modes = None
        try:
            gc.disable()
            self._tf = torch._C.DisableTorchFunction()
            self._tf.__enter__()
            if torch._C._len_torch_dispatch_stack() or _len_pre_dispatch():
                from torch.utils._python_dispatch import _disable_current_modes

                modes = _disable_current_modes()
                modes.__enter__()
                self._modes = modes
        except BaseException:  # (nothing entered stays entered: __exit__ does not run)
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        _DEPTH.n -= 1
        if _DEPTH.n:
            return
        try:
            if self._modes is not None:
                self._modes.__exit__(*exc)
        finally:
            try:
                if self._tf is not None:
                    self._tf.__exit__(*exc)
            finally:
                if self._gc:
                    gc.enable()


def no_user_code(fn: _F | None = None, *, agreed: Collection[str] = ()) -> Any:
    """``fn`` run inside :class:`NoUserCode`, from its first check to its last launch; as it is while
    ``torch.compile`` traces it (no memory is read then: the compiled graph calls the custom ops, which check).

    Its arguments are made plain first (:func:`plain_arguments`): numbers exact ints and floats, the arguments
    annotated ``bool`` bools (or plain values), lists and tuples (and other sequences) exact lists and tuples of
    plain values, so that nothing ``fn`` does after its first check runs a caller's Python code through them.

    ``agreed`` (with ``@no_user_code(agreed=(...))``): the arguments whose tensors ``fn`` checks itself for code of
    their own (:func:`overrides_refusal`) before reading them, an op that agrees its checks of DTensor shards with
    the other ranks: a refusal that may be one rank's only (a method set on one rank's shard) is then agreed too,
    where raised here it would leave the other ranks waiting in the op's collective."""
    if fn is None:
        return functools.partial(no_user_code, agreed=agreed)
    sig = inspect.signature(fn)
    flags = {name for name, p in sig.parameters.items() if p.annotation in ("bool", bool)}
    positions = {i: name for i, (name, p) in enumerate(sig.parameters.items())
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}  # fmt: skip
    flag_positions = frozenset(i for i, name in positions.items() if name in flags)
    names = [positions[i] for i in sorted(positions)]
    name = fn.__qualname__

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        with NoUserCode():
            args, kwargs = plain_arguments(args, kwargs, flag_positions, flags, name, names, agreed)
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def plain_arguments(args: tuple, kwargs: dict, flag_positions: Collection[int] = (), flags: Collection[str] = (),
                    fn: str = "", names: Sequence[str] = (),
                    unchecked: Collection[str] = ()) -> tuple[tuple, dict]:  # fmt: skip
    """``args`` and ``kwargs`` with no Python code of the caller's left to run in them: see :func:`plain_value`
    (numbers), :func:`plain_argument` (sequences) and :func:`plain_flag` (the arguments at ``flag_positions`` or
    named in ``flags``). A tensor, or a list or tuple of tensors, that runs code of its own when read (see
    :func:`python_overrides`) is a TypeError from ``fn`` naming the argument (``names``: the positional ones'),
    except in the arguments named in ``unchecked`` (``fn`` checks them itself: see :func:`no_user_code`)."""
    # Every argument made plain first (the caller's code runs there), then every tensor checked: checked one by one,
    # a later argument's code (a float subclass's __float__) could set a method on a tensor already checked (probe 78).
    args = tuple(
        plain_flag(a, fn, nm) if i in flag_positions else plain_argument(a, fn, nm, False)
        for i, a in enumerate(args)
        for nm in (_name(names, i),)
    )
    kwargs = {k: plain_flag(v, fn, k) if k in flags else plain_argument(v, fn, k, False)
              for k, v in kwargs.items()}  # fmt: skip
    for i, a in enumerate(args):
        nm = _name(names, i)
        if i not in flag_positions and nm not in unchecked:
            _check_plain(a, fn, nm)
    for k, v in kwargs.items():
        if k not in flags and k not in unchecked:
            _check_plain(v, fn, k)
    return args, kwargs


def _check_plain(x: Any, fn: str, name: str) -> None:
    """:func:`check_no_overrides` of the tensors in ``x``, an argument :func:`plain_argument` made plain (a tensor,
    an exact list or tuple, nested, or a value with no tensor in it: walking it runs no caller code)."""
    # (tensors told by their type alone: ``isinstance`` would read another object's ``__class__``, caller code, after
    # the tensors before it were checked; probe 80)
    cls = type(x)
    if cls is list or cls is tuple:
        if x and all(issubclass(type(v), torch.Tensor) for v in x):
            check_no_overrides(fn, name, x)
            return
        for i, v in enumerate(x):
            if issubclass(type(v), torch.Tensor):
                check_no_overrides(fn, f"{name}[{i}]", [v], indexed=False)
            elif type(v) is list or type(v) is tuple:
                _check_plain(v, fn, f"{name}[{i}]")
    elif issubclass(cls, torch.Tensor):
        check_no_overrides(fn, name, [x], indexed=False)


def _name(names: Sequence[str], i: int) -> str:
    return names[i] if i < len(names) else f"argument {i}"


def plain_flag(x: Any, fn: str = "", name: str = "") -> Any:
    """A flag argument: a bool, a plain number or str as it is (the callee may refuse all but a bool; their truth
    values run no caller code); a tensor or any other object (numpy's bool, an object with ``__bool__``) as its
    truth value, read here."""
    if type(x) in _KEEP:
        return x
    if isinstance(x, numbers.Number):
        return plain_value(x, f"{fn}: {name}")
    if isinstance(x, torch.Tensor):
        check_no_overrides(fn, name, [x], indexed=False)
    try:
        return bool(x)
    except Exception as e:  # (a truth value read once, here: never kept to be read again after the checks)
        raise TypeError(f"{fn}: {name} must be a bool, got {type(x).__name__} without one ({e})") from None


_KEEP = frozenset({bool, int, float, str, bytes, type(None), torch.dtype, torch.device})


def plain_argument(x: Any, fn: str = "", name: str = "", check: bool = True) -> Any:
    """``x`` for :func:`plain_arguments`: a tensor, an exact bool/int/float/str, or a list or tuple of those, as it
    is (the same object); a number as :func:`plain_value` makes it; a list or tuple holding other values, a list or
    tuple subclass or another sequence (its ``__iter__``/``__getitem__`` would run again each time the callee reads
    it) as an exact list or tuple of plain values. Anything else (a dict, a process group) as it is. Tensors are
    checked to run no code of their own when read (:func:`check_no_overrides`), unless not ``check``."""
    cls = type(x)
    if cls in _KEEP:
        return x
    if isinstance(x, torch.Tensor):
        if check:
            check_no_overrides(fn, name, [x], indexed=False)
        return x
    if cls is list or cls is tuple:  # (the element types first: a set built in C, ~15 ns an element)
        kinds = set(map(type, x))
        if all(issubclass(k, torch.Tensor) for k in kinds):
            if check:
                check_no_overrides(fn, name, x)
            return x
        if all(k in _KEEP or issubclass(k, torch.Tensor) for k in kinds):
            if check:
                check_no_overrides(fn, name, [v for v in x if isinstance(v, torch.Tensor)])
            return x
        return cls(plain_argument(v, fn, f"{name}[{i}]", check) for i, v in enumerate(x))
    if isinstance(x, numbers.Number):
        return plain_value(x, f"{fn}: {name}")
    if isinstance(x, str):
        return str.__str__(x)  # (an exact str copy of a str subclass)
    if isinstance(x, bytes):
        return bytes(x)
    if isinstance(x, tuple):  # (a tuple subclass: torch.Size, a named tuple)
        return plain_argument(tuple(x), fn, name, check)
    if isinstance(x, list | Sequence):
        return plain_argument(list(x), fn, name, check)
    return x


# -- tensors that run Python code of their own -------------------------------------------------------------------
# The checks and launches read a tensor through its attributes (``data_ptr()``, ``numel()``, ``untyped_storage()``,
# ``grad``, ...). A tensor class that defines one of them in Python, or a tensor whose own ``__dict__`` holds one (a
# method set on the object: ``t.data_ptr = f``), runs caller code at each read: after another tensor's checks it
# could free that tensor's memory before the launch writes it. Such tensors are refused before any check.
_TENSOR_NAMES = frozenset(dir(torch.Tensor))
# (what a class may define without changing how a tensor is read: construction, copying, pickling, printing, its
# torch function (off inside NoUserCode) and dispatch (a dispatch of its own is refused as a tensor without memory);
# ``to``, ``detach`` and ``clone`` are not among them: the step calls them on params and grads)
_HARMLESS = frozenset({
    "__init__", "__new__", "__repr__", "__str__", "__format__", "__torch_function__", "__torch_dispatch__",
    "__deepcopy__", "__copy__", "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__", "__module__", "__doc__",
    "__dict__", "__weakref__", "__slots__", "__annotations__", "__init_subclass__", "__class_getitem__",
    "__subclasshook__", "__qualname__", "__dir__", "__sizeof__", "__array__", "__array_wrap__", "__array_priority__",
    "__firstlineno__", "__static_attributes__",
    # (moving a module or a param, which no call here does to a tensor it was given: quantised param classes define
    # these)
    "cuda", "cpu", "share_memory_", "pin_memory", "requires_grad_",
})  # fmt: skip
_READ_NAMES = _TENSOR_NAMES - _HARMLESS


def _trusted(cls: type) -> bool:
    """torch's own tensor classes (Parameter, DTensor, ...): the class its module names, under ``torch``."""
    module = cls.__module__
    return (module == "torch" or module.startswith("torch.")) and vars(sys.modules.get(module, torch)).get(
        cls.__name__) is cls  # fmt: skip


def class_overrides(cls: type, names: Collection[str] = _READ_NAMES) -> list[str]:
    """The ``names`` that tensor class ``cls``, or a class between it and ``torch.Tensor`` that is not torch's own,
    defines in Python (read afresh: a class can change)."""
    found: set[str] = set()
    for c in cls.__mro__:
        if c is torch.Tensor or c is torch._C.TensorBase:
            break
        if not _trusted(c):
            found.update(k for k in vars(c) if k in names)
    return sorted(found)


def python_overrides(tensors: Sequence[torch.Tensor],
                     names: Collection[str] = _READ_NAMES) -> tuple[int, list[str], str]:  # fmt: skip
    """``(i, names, where)`` for the first of ``tensors`` whose class defines (see :func:`class_overrides`), or whose
    own ``__dict__`` holds anything under a ``torch.Tensor`` attribute's name (a method set on the object shadows
    the class's; so does a plain value, which the code that calls it fails on) or a key that is not a str
    (``names``: the class attributes looked for); a DTensor's
    local shard (what the checks and launches read of it) likewise; ``(-1, [], "")`` when none does. ``where`` says
    which it is. About 0.1 us a tensor (its ``__dict__`` read: one attribute lookup in C)."""
    # (first, by identity alone: a class whose metaclass is not torch's runs the metaclass's code at every class
    # attribute read and every hash of the class, which the checks below and all later checks do)
    if not set(map(id, map(type, map(type, tensors)))) <= _TRUSTED_METAS:
        for i, t in enumerate(tensors):
            meta = type(type(t))
            if id(meta) not in _TRUSTED_METAS:
                return i, [f"a metaclass of its own ({type.__dict__['__qualname__'].__get__(meta)})"], "its class"
    kinds = set(map(type, tensors))
    bad = {cls: found for cls in kinds if cls is not torch.Tensor
           for found in [class_overrides(cls, names)] if found}  # fmt: skip
    for i, t in enumerate(tensors) if bad else ():
        found = bad.get(type(t))
        if found:
            return i, found, f"its class {type(t).__qualname__}"
    dicts = list(map(_DICT, tensors))
    plain = set(map(type, dicts)) <= {dict} and not any(dicts)  # (the common case, in C: no attribute set on any)
    for i, d in enumerate(() if plain else dicts):
        if type(d) is not dict:  # (a dict subclass could hide its keys from the checks, not from attribute lookup)
            return i, [f"a __dict__ of type {type(d).__name__}"], "the tensor object itself"
        if not d:
            continue
        if not all(type(k) is str for k in d):  # (a key of another type would run its __hash__/__eq__ below)
            return i, sorted(f"an attribute keyed by a {type(k).__name__}" for k in d if type(k) is not str), (
                "the tensor object itself")  # fmt: skip
        # (any value under a torch.Tensor attribute's name, also a plain one: the checks or torch's code call it, and
        # a tag such as ``p.copy_ = "w"`` would fail there after other groups stepped; so refused first, named)
        if not _TENSOR_NAMES.isdisjoint(d):
            return i, sorted(k for k in d if k in _TENSOR_NAMES), "the tensor object itself"
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and any(issubclass(k, dtensor) for k in kinds):
        for i, t in enumerate(tensors):
            if isinstance(t, dtensor):
                j, found, where = python_overrides([t._local_tensor], names)
                if j >= 0:
                    return i, found, f"its local shard ({where.replace('the tensor object itself', 'the object')})"
    return -1, [], ""


_DICT = torch.Tensor.__dict__["__dict__"].__get__  # (the object's own dict: not a __dict__ its class defines)
# torch's tensor metaclasses (Tensor's, DTensor's, Parameter's), by id: a tensor class with another metaclass is
# refused first (see python_overrides; the optimizers' read of optimizer.state's keys uses it too)
_TRUSTED_METAS = frozenset(map(id, (type, type(torch.Tensor), type(torch.nn.Parameter))))


def check_no_overrides(fn: str, name: str, tensors: Sequence[torch.Tensor], names: Collection[str] = _READ_NAMES,
                       indexed: bool = True, label: Callable[[int], str] | None = None) -> None:  # fmt: skip
    """A TypeError naming ``name[i]`` (``name`` unless ``indexed``; ``label(i)`` when given) for the first of
    ``tensors`` that runs Python code of its own when the checks or the launch read it (see
    :func:`python_overrides`)."""
    i, found, where = python_overrides(tensors, names)
    if i >= 0:
        raise _overrides_error(fn, label(i) if label is not None else f"{name}[{i}]" if indexed else name, found, where)


def _overrides_error(fn: str, what: str, found: list[str], where: str) -> TypeError:
    return TypeError(
        f"{fn}: {what} runs Python code of its own when it is read: {where} defines {', '.join(found)}. The "
        "checks and the launch read it between them, where no caller code may run (it could free memory a "
        "launch writes): use a torch.Tensor / torch.nn.Parameter without them"
    )


def overrides_refusal(fn: str, xs: Sequence, label: Callable[[int], str]) -> TypeError | None:
    """:func:`check_no_overrides` of the tensors among ``xs`` (the other entries are the caller's to refuse; a
    DTensor with its local shard), the error naming ``label(i)`` returned, not raised: for an op that agrees it with
    the other ranks (see :func:`no_user_code`'s ``agreed``); it then reads :func:`stand_in` s, not ``xs``."""
    if torch.compiler.is_compiling():  # (traced: no memory is read; the compiled graph's custom ops check)
        return None
    if all(issubclass(k, torch.Tensor) for k in set(map(type, xs))):
        idx = None
        i, found, where = python_overrides(xs)
    else:
        idx = [i for i, x in enumerate(xs) if isinstance(x, torch.Tensor)]
        i, found, where = python_overrides([xs[k] for k in idx])
    return None if i < 0 else _overrides_error(fn, label(i if idx is None else idx[i]), found, where)


def stand_in(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``x``'s shape, dtype and device (read through torch's own methods, none of ``x``'s), one
    element expanded (no memory of ``x``'s size): what an op reads in the place of a tensor it has refused
    (:func:`overrides_refusal`) on its way to the agreement with the other ranks, where it raises. Nothing is ever
    written to it."""
    base = torch._C.TensorBase
    dtype, device = base.dtype.__get__(x), base.device.__get__(x)
    try:
        size = base.size(x)
    except (RuntimeError, TypeError, ValueError):  # (no sizes: a nested tensor)
        size = (0,)
    return torch.zeros((), dtype=dtype, device=device).expand(size)


def plain_value(x: Any, name: str = "a number argument") -> Any:
    """``x`` with no Python code of its own left to run: a number as an exact ``int`` or ``float`` (a ``bool`` as it
    is; one too large for a float as inf), a tensor or ``None`` as it is, anything else unchanged (for the caller's
    check to refuse). A number whose conversion raises is a TypeError naming ``name``: kept as it is, it would be
    read again after the checks (where a second read could succeed and run code).

    Run on a call's number arguments before its first check: a number's own methods (a ``float`` subclass's
    ``__float__``, ``__gt__``) are user code that :class:`NoUserCode` cannot turn off. Run after the checks (the
    launch reading ``float(lr)``), one could free a checked tensor's memory before the kernel writes it."""
    cls = type(x)
    if cls is float or cls is int or cls is bool or x is None or isinstance(x, torch.Tensor):
        return x
    if isinstance(x, numbers.Integral):
        try:
            return operator.index(x)  # (an exact int, without calling an int subclass's __index__)
        except Exception as e:  # (never kept as it is: the callee would read it again, after its checks)
            raise TypeError(f"{name} ({type(x).__name__}) cannot be read as an int: {type(e).__name__}: {e}") from None
    if isinstance(x, numbers.Real):
        try:
            return float(x)
        except OverflowError:
            return math.inf if x > 0 else -math.inf  # (the caller's range check names it)
        except Exception as e:  # (never kept as it is: the callee would read it again, after its checks)
            raise TypeError(f"{name} ({type(x).__name__}) cannot be read as a float: {type(e).__name__}: {e}") from None
    return x


# A kernel reads a tensor's elements at ``data_ptr()``: not so for a subclass with a dispatch of its own (DTensor,
# wrapper subclasses), whose address may be null or another tensor's.
_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def check_role(fn: str, name: str, tensors: Sequence, dtypes: Collection[torch.dtype],
               device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """Every tensor of ``tensors`` dense, contiguous, of one dtype (one of ``dtypes``: ``dtype`` when given, else
    the first tensor's), on one device (``device`` when given, else the first tensor's), and inside its storage
    (not freed nor shrunk in place: the launch goes through its address)."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"{fn}: {name}[0] must be a Tensor, got {type(first).__name__}")
    dtype = first.dtype if dtype is None else dtype
    device = first.device if device is None else device
    try:
        if (
            all(getattr(cls, "__torch_dispatch__", None) is _PLAIN_DISPATCH for cls in {type(x) for x in tensors})
            and dtype in dtypes
            and {x.dtype for x in tensors} == {dtype}
            and {x.device for x in tensors} == {device}
            and {x.layout for x in tensors} == {torch.strided}
            and not any(x.is_nested for x in tensors)  # (a nested tensor's layout reads strided)
            and all(map(torch.Tensor.is_contiguous, tensors))
            and all(map(inside_storage, tensors))
        ):
            return
    except AttributeError:  # not a tensor: named below
        pass
    for i, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name}[{i}] must be a Tensor, got {type(x).__name__}")
        if getattr(type(x), "__torch_dispatch__", None) is not _PLAIN_DISPATCH:  # DTensor, wrapper subclasses
            raise TypeError(f"{fn}: {name}[{i}] is a {type(x).__name__}, not a plain tensor with memory of its own")
        if x.layout != torch.strided or x.is_nested:
            got = "a nested tensor" if x.is_nested else x.layout
            raise TypeError(f"{fn}: {name}[{i}] must be a dense tensor, got {got}")
        if x.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            allowed = allowed.rsplit(", ", 1)[0] + " or " + allowed.rsplit(", ", 1)[1] if len(dtypes) > 1 else allowed
            raise TypeError(f"{fn}: {name}[{i}] must be {allowed}, got {x.dtype}")
        if x.dtype != dtype or x.device != device:
            raise ValueError(f"{fn}: {name}[{i}] is {x.dtype} on {x.device}, expected {dtype} on {device}")
        if not x.is_contiguous():
            raise ValueError(f"{fn}: {name}[{i}] must be contiguous")
        if not inside_storage(x):
            raise ValueError(f"{fn}: {name}[{i}] lies outside its storage (a storage freed or shrunk in place, e.g. "
                             "by untyped_storage().resize_(0)): its elements are not there")  # fmt: skip


def inside_storage(x: torch.Tensor) -> bool:
    """Whether contiguous tensor ``x``'s bytes lie inside its storage (an empty one always does): a storage freed or
    shrunk in place keeps the tensor's sizes, and may keep its address."""
    # (torch.Tensor's own methods, unbound: a method set on the object or defined by its class is not called)
    return not _T.numel(x) or (
        _T.data_ptr(x) != 0
        and _T.storage_offset(x) * _T.element_size(x) + _T.nbytes.__get__(x) <= _STORAGE_NBYTES(_T.untyped_storage(x))
    )


_T = torch.Tensor
_STORAGE_NBYTES = torch.UntypedStorage.nbytes


def check_numels(fn: str, name: str, tensors: Sequence[torch.Tensor], like_name: str,
                 like: Sequence[torch.Tensor]) -> None:  # fmt: skip
    """``tensors[i]`` has as many elements as ``like[i]``, for every i (same lengths)."""
    if len(tensors) != len(like):
        raise ValueError(f"{fn}: {name} has {len(tensors)} tensors, {like_name} has {len(like)}")
    if list(map(torch.Tensor.numel, tensors)) == list(map(torch.Tensor.numel, like)):
        return
    for i, (x, y) in enumerate(zip(tensors, like, strict=True)):
        if x.numel() != y.numel():
            raise ValueError(f"{fn}: {name}[{i}] has {x.numel()} elements, {like_name}[{i}] has {y.numel()}")


def check_scalar(fn: str, name: str, x, device: torch.device, dtypes: Collection[torch.dtype] | None = None) -> None:
    """``x`` is a dense 1-element tensor on ``device``, floating point (or of one of ``dtypes``)."""
    ok_dtype = (isinstance(x, torch.Tensor) and getattr(type(x), "__torch_dispatch__", None) is _PLAIN_DISPATCH
                and (x.dtype in dtypes if dtypes is not None else x.is_floating_point()))  # fmt: skip
    if not ok_dtype or x.layout != torch.strided or x.numel() != 1 or x.device != device:
        kind = "floating-point" if dtypes is None else "/".join(str(d).removeprefix("torch.") for d in dtypes)
        got = (f"{x.numel()} elements of {x.dtype} on {x.device}" if isinstance(x, torch.Tensor)
               else type(x).__name__)  # fmt: skip
        raise ValueError(f"{fn}: {name} must be a 1-element {kind} tensor on {device}, got {got}")
    storage = x.untyped_storage()
    if x.data_ptr() == 0 or not storage.data_ptr() <= x.data_ptr() <= storage.data_ptr() + storage.nbytes() - x.nbytes:
        raise ValueError(f"{fn}: {name} lies outside its storage (a storage freed or shrunk in place, e.g. by "
                         "untyped_storage().resize_(0)): the kernel reads it through its address")  # fmt: skip


def check_shared_memory(fn: str, groups: Sequence[tuple[str, Sequence[torch.Tensor], bool]]) -> None:
    """Raise a ValueError naming the first pair when a tensor of a written group (``(name, tensors, written)``)
    shares memory with any other tensor of any group; read-only tensors may share memory with each other. Every
    tensor is contiguous (a launch's roles are): its bytes are ``nbytes`` from ``data_ptr()``. A written inference
    tensor is refused as torch refuses an in-place update of one outside inference mode.

    Fast path: the intervals are disjoint iff, with starts and ends sorted separately, every end is at most the next
    start (empty tensors take no memory); only a shared byte sorts the intervals to name the pair."""
    if not torch.is_inference_mode_enabled():
        for name, tensors, written in groups:
            if written and any(x is not None and x.is_inference() for x in tensors):
                i = next(i for i, x in enumerate(tensors) if x is not None and x.is_inference())
                raise TypeError(f"{fn}: {name}[{i}] is an inference tensor (made under torch.inference_mode()); it "
                                "cannot be written outside inference mode")  # fmt: skip
    entries = [
        (x.data_ptr(), x.data_ptr() + x.nbytes, written, name, i)
        for name, tensors, written in groups
        for i, x in enumerate(tensors)
        if x is not None and x.nbytes
    ]
    for name, tensors, _ in groups:  # every tensor inside its storage (not freed nor shrunk in place)
        for i, x in enumerate(tensors):
            if x is None or not x.nbytes:
                continue
            if not inside_storage(x):
                raise ValueError(f"{fn}: {name}[{i}] lies outside its storage (a storage freed or shrunk in place, "
                                 "e.g. by untyped_storage().resize_(0)): its elements are not there")  # fmt: skip
    starts = sorted(e[0] for e in entries)
    ends = sorted(e[1] for e in entries)
    if all(e <= s for e, s in zip(ends, starts[1:])):
        return
    entries.sort()
    all_end, all_owner, w_end, w_owner = -1, None, -1, None
    for e in entries:
        other = all_owner if e[2] and e[0] < all_end else w_owner if e[0] < w_end else None
        if other is not None:
            raise ValueError(
                f"{fn}: {other[3]}[{other[4]}] and {e[3]}[{e[4]}] share memory: a tensor the launch writes may share "
                "no memory with another of its tensors; pass separate tensors or clone() one"
            )
        if e[1] > all_end:
            all_end, all_owner = e[1], e
        if e[2] and e[1] > w_end:
            w_end, w_owner = e[1], e


def check_roles_memory(fn: str, roles: Sequence[Sequence[torch.Tensor]], names: Sequence[str], read: int) -> None:
    """:func:`check_shared_memory` over a launch's roles: every role is written but role ``read`` (the grads).
    ``master_params[i]`` may be exactly ``params[i]`` (an fp32 param that is its own master: each element is read
    and written by one program, and both receive the same value)."""
    groups = [(name, role, r != read) for r, (name, role) in enumerate(zip(names, roles, strict=True))]
    if "master_params" in names:
        m = names.index("master_params")
        params, masters = roles[0], roles[m]
        if any(x.data_ptr() == p.data_ptr() for x, p in zip(masters, params)):
            same = [x.data_ptr() == p.data_ptr() and x.nbytes == p.nbytes for x, p in zip(masters, params)]
            kept = [None if s else x for x, s in zip(masters, same)]
            groups[m] = ("master_params", kept, True)  # (None: left out, the other indices kept)
    check_shared_memory(fn, groups)
