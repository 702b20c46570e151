"""The machinery every fused optimizer shares: :class:`FusedOptimizer`, its step plans and its checks.

An optimizer of the family (``adam.py``, ``sgd.py``, ``lion.py``) is one kernel file in ``kernels/`` with a
prepared launcher (``AdamStep``, ``SGDStep``, ...), one plain-torch reference, and a small subclass here that
declares its hyper-parameters (``_check_hyperparameters``, ``_check_step_values``), its state layout
(``_state_keys``, ``_required_state_keys``, ``_has_step``) and its update (``_make_launcher``, ``_launch``,
``_prepare_reference``; the full contract is :class:`FusedOptimizer`'s docstring). Everything else is here, once,
for every optimizer:

- torch.optim's interface: constructor checks, ``add_param_group``, ``state_dict``/``load_state_dict`` (hooks
  included, everything validated before anything changes, torch's legacy defaults), ``__setstate__``;
- the checked step: every param, grad and state validated on every group before any group changes; params or
  states sharing memory refused; DTensor params (FSDP2, tensor parallel) stepped on their local shards;
- the per-group plan reused while it fits (identity, state version, addresses and metadata of every param and
  grad, checked at every step) and the moved-grad repointing of the prepared launchers;
- ``torch.amp.GradScaler`` (``grad_scale``/``found_inf`` on the device), fp32 master weights for bf16/fp16
  params (state key ``"master_param"``).
"""

from __future__ import annotations

import bisect
import math
import numbers
import operator
import weakref
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from copy import deepcopy
from functools import partial
from itertools import chain, repeat
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._backend import check_backend, no_autocast, resolve_backend
from .._validate import (
    FP32_MAX,
    check_memory,
    first_without_storage,
    has_memory,
    inner_name,
    inner_of,
    loaded_tensor_problem,
    outside_storage,
    real_float,
    self_overlapping,
    wrapped_inner,
)
from ..kernels._checks import (
    _TRUSTED_METAS,
    NoUserCode,
    check_no_overrides,
    class_overrides,
    plain_argument,
    plain_flag,
)

MASTER_KEY = "master_param"
_FP32_TINY = float(torch.finfo(torch.float32).tiny)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _NoValueError(ValueError):
    """A hyper-parameter given as a tensor without values (see :func:`_to_float`)."""


def _to_float(x: Any, name: str = "a hyper-parameter", gi: int | None = None) -> float:
    """A hyper-parameter as a float: a tensor is read on the host (a sync for a CUDA one), which a CUDA graph
    capture forbids: refused there with a clear error, before anything changes (torch's fused AdamW takes
    floats for these too). An int too large for a float is inf (the caller's range check names it). A tensor
    without values (meta, or outside its storage: freed) is a ValueError naming ``name`` (e.g. "lr") and param
    group ``gi`` when given, not torch's bare error from ``item()``."""
    if not isinstance(x, Tensor):
        if not isinstance(x, numbers.Real):  # (float("0.01") would take a string)
            where = "" if gi is None else f" of param group {gi}"
            raise TypeError(f"{name}{where} must be a number or a 1-element tensor, got {type(x).__name__} {x!r}")
        return real_float(x)
    if x.is_meta or outside_storage(x):
        name += "" if gi is None else f" of param group {gi}"
        raise _NoValueError(
            f"Tensor {name} must be a tensor with memory (its value is read on the host), got a "
            f"{type(x).__name__} on {x.device}{' outside its storage' if not x.is_meta else ''}"
        )
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError("a hyper-parameter given as a CUDA tensor (betas, eps, weight_decay, momentum, ...) is read "
                         "on the host at every step, which a CUDA graph capture forbids: give it as a float or a CPU "
                         "tensor (only lr is read on the device)")  # fmt: skip
    return float(x.item())


class _ParamGroup(dict):
    """A param group as this package's optimizers keep it: a dict whose iteration (``for key in group``, ``list``,
    ``sorted``) leaves out this package's own keys (``_own_group_keys``: ``master_weights``, ``backend``, ...) where
    they hold the constructor's value, as ``state_dict()`` leaves them out of its groups (so that torch's checkpoints
    load into these optimizers). They are still there to read and write (``group["master_weights"]``, ``in``,
    ``items()``, ``len``, copies and pickles keep them). torch's flat checkpoint form
    (``StateDictOptions(flatten_optimizer_state_dict=True)``, as torchtitan saves) reads every key a live group
    iterates from the checkpoint, which holds what ``state_dict()`` gave: the two agree."""

    __slots__ = ("_inherited",)

    def __iter__(self):
        inherited = getattr(self, "_inherited", None)
        if not inherited:
            return dict.__iter__(self)
        return iter([k for k in dict.__iter__(self) if not (k in inherited and _same(dict.__getitem__(self, k),
                                                                                      inherited[k]))])  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    """Whether a group's value is the constructor's (plain values: a bool, a str, None)."""
    return type(a) is type(b) and not isinstance(a, Tensor) and a == b


class _StepGroup(dict):
    """A param group as one eager step reads it (see :func:`_step_group`); ``index``: the group's place; ``source``:
    the group's own ``params`` object (a plan compares its identity: a tuple or list subclass is read as a copy)."""

    __slots__ = ("index", "source")


# torch.optim's implementation flags, which a loaded group of an optimizer without them may carry at their defaults
_TORCH_FLAG_KEYS = ("foreach", "fused", "capturable", "differentiable")

# (the keys whose values a step reads as truth values: each made a bool once, before any tensor is checked)
_FLAG_KEYS = frozenset({"amsgrad", "maximize", "decoupled_weight_decay", "nesterov", "master_weights", "foreach",
                        "fused", "capturable", "differentiable"})  # fmt: skip


def _step_group(name: str, gi: int, group: dict[str, Any], read: Collection[str] = ()) -> _StepGroup:
    """``group`` as one eager step reads it, made before any tensor is checked: every value a plain Python object
    (an exact float, int, bool or str; tensors as they are), so that nothing from the first tensor check to the last
    launch runs a caller's Python code through a hyper-parameter. A value's own methods (a ``float`` subclass's
    ``__float__``, an object's ``__bool__``, a list subclass's ``__iter__``) are user code that :class:`NoUserCode`
    cannot turn off: run after a tensor's checks, one could free that tensor's memory before the kernel writes it.
    So they run here, once, first. ``params`` stays the group's own list (a plan compares its identity); another
    sequence is copied into a list. A value the step refuses is kept as it is, for the step's check to name. Only
    the keys the step reads (:data:`_READ_KEYS` and ``read``: the optimizer's defaults) are in the view, as exact
    ``str`` keys, their values made plain; any other (a scheduler's ``initial_lr``, ``param_names``, a user's own
    key: torch.optim keeps them untouched) is left out, never looked at: kept in the view, a key of the caller's
    whose hash equals a read key's would run its ``__eq__`` at every read of that key, down to the launch (probe
    77)."""
    view = _StepGroup()
    view.index = gi
    view.source = group.get("params")
    for key, value in group.items():
        if isinstance(key, str):
            key = str.__str__(key)  # (an exact str: hashed and compared by str's own methods)
            if key in _READ_KEYS or key in read:
                view[key] = _plain(name, key, value, gi)
    return view


# (the keys a step reads, of any optimizer here; with each optimizer's defaults, all that _step_group makes plain)
_READ_KEYS = frozenset({"params", "lr", "betas", "eps", "weight_decay", "momentum", "dampening", "backend",
                        "state_dtype", "stochastic_rounding", "kahan_summation"}) | _FLAG_KEYS  # fmt: skip


# What the step reads of every param in its groups, with a grad or not (whether it has a grad, its hash as a state
# key): a param class that defines one of these in Python would run caller code between the step's checks and its
# launches (a ``grad`` property reading group 1's grads after group 0's were checked could free group 0's states).
# The params with grads, their grads and their states are checked for every tensor attribute (``check_no_overrides``)
# where the step reads them through their methods (the checked step); the reused plan reads them through
# torch.Tensor's own methods only.
_PARAM_READS = frozenset({"grad", "__getattribute__", "__getattr__", "__hash__", "__eq__"})


def _check_param_classes(name: str, views: list[_StepGroup]) -> None:
    """A TypeError, before any tensor is checked, for a param whose class defines :data:`_PARAM_READS` in Python
    (torch's own classes, Parameter and DTensor, are trusted: see ``kernels/_checks.py: class_overrides``)."""
    for gi, view in enumerate(views):
        params = view["params"]
        for cls in set(map(type, params)):
            if cls is torch.nn.Parameter or cls is Tensor or not isinstance(cls, type) or not issubclass(cls, Tensor):
                continue
            found = class_overrides(cls, _PARAM_READS)
            if found:
                i = next(i for i, p in enumerate(params) if type(p) is cls)
                raise TypeError(
                    f"{name}: param {i} of param group {gi} is a {cls.__qualname__}, which defines "
                    f"{', '.join(found)} in Python: the step reads these between its checks and its launches, where "
                    "no caller code may run (it could free memory a launch writes). Use torch.nn.Parameter, or a "
                    "subclass that does not define them"
                )


def _plain(name: str, key: Any, value: Any, gi: int) -> Any:
    """``value`` of ``key`` as a plain Python object (see :func:`_step_group`): as the functional ops make their
    arguments plain (``kernels/_checks.py: plain_argument``, ``plain_flag``: a value whose conversion raises, or a
    tensor that runs code of its own when read, is a TypeError from ``name`` naming it)."""
    if key == "params":  # (the group's own list; another sequence copied, without a list subclass's __iter__)
        return value if type(value) is list else list(list.__iter__(value) if isinstance(value, list) else value)
    if key in _FLAG_KEYS:
        return plain_flag(value, name, f"{key} of param group {gi}")
    return plain_argument(value, name, f"{key} of param group {gi}")


def _to_scalar(x: Any) -> Any:
    """torch.optim's rule for tensor hyper-parameters: a 1-element tensor is kept, as a 0-d tensor."""
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


def _check_betas(betas: Any, group: bool = True) -> tuple:
    """torch.optim.Adam's checks of ``betas`` (a pair of floats, or of 1-element tensors; ints count as floats);
    returns them as torch keeps them (tensors as 0-d tensors). In a param group (``group``), which torch checks no
    further, any real numbers (numpy's) and 1-element tensors, mixed or not; the constructor's (not ``group``) are
    both floats or both tensors, as torch requires."""
    if isinstance(betas, set | frozenset | dict) or not hasattr(betas, "__getitem__"):  # (torch indexes them)
        raise TypeError(f"betas must be a pair (a tuple or list), got {type(betas).__name__}")
    betas = tuple(betas)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {betas}")
    is_float = [isinstance(b, numbers.Real if group else float | int) and not isinstance(b, bool) for b in betas]
    is_tensor = [isinstance(b, Tensor) for b in betas]
    if group and not all(map(operator.or_, is_float, is_tensor)):
        raise ValueError(f"betas must be numbers or 1-element Tensors, got {tuple(type(b).__name__ for b in betas)}")
    if not group and not (all(is_float) or all(is_tensor)):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
    return tuple(_to_scalar(b) if isinstance(b, Tensor) else float(b) for b in betas)


# -- state with a version ----------------------------------------------------------------------------------------
# A step plan (below) is reused while nothing it was built from changed. For the state, "nothing changed" must be
# cheap to tell for 10^4 params: the optimizer's state and every param's state dict are dicts that count their own
# mutations in one shared counter, so a plan compares one integer instead of looking up every state tensor. They
# pickle, copy and save as plain dicts (``state_dict()`` hands out plain dicts), so checkpoints need no fused_ops.


class _Version:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _counting(base: type) -> type:
    """A subclass of ``base`` (dict or defaultdict) whose every mutation bumps ``self._version.n``."""

    def mutator(name: str) -> Callable:
        method = getattr(base, name)

        def wrapped(self, *args, **kwargs):
            self._version.n += 1
            return method(self, *args, **kwargs)

        wrapped.__name__ = name
        return wrapped

    names = ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault", "update", "__ior__")
    return type(f"_Counting{base.__name__.capitalize()}", (base,), {name: mutator(name) for name in names})


class _ParamState(_counting(dict)):  # type: ignore[misc]
    """One param's state: a dict that counts its mutations (see above)."""

    __slots__ = ("_version",)

    def __init__(self, version: _Version, *args, **kwargs) -> None:
        self._version = version
        dict.__init__(self, *args, **kwargs)

    def __reduce__(self):
        return (dict, (dict(self),))

    def __copy__(self) -> dict:
        return dict(self)

    def __deepcopy__(self, memo) -> dict:
        return deepcopy(dict(self), memo)


class _OptimizerState(_counting(defaultdict)):  # type: ignore[misc]
    """``optimizer.state``: a defaultdict of :class:`_ParamState` that counts its own and their mutations."""

    def __init__(self, items: Any = ()) -> None:
        version = _Version()
        self._version = version
        defaultdict.__init__(self, lambda: _ParamState(version))
        for k, v in dict(items).items():
            if type(v) is _ParamState:  # (taken over from another state, e.g. ``opt.state = dict(opt.state)``)
                v._version = version  # counted here from now on, so plans can watch it again
            defaultdict.__setitem__(self, k, v if type(v) is not dict else _ParamState(version, v))

    def tracked(self, st: Any) -> bool:
        """Whether ``st`` (a param's state) counts its mutations in this state's counter."""
        return type(st) is _ParamState and st._version is self._version

    def __reduce__(self):
        return (defaultdict, (dict,), None, None, iter((k, dict(v)) for k, v in self.items()))

    def __copy__(self) -> defaultdict:
        return defaultdict(dict, self)

    def __deepcopy__(self, memo) -> defaultdict:
        return deepcopy(defaultdict(dict, {k: dict(v) if isinstance(v, dict) else v for k, v in self.items()}), memo)


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover (torch without distributed)
    _DTensor = None

# What FusedOptimizer._plain_states takes without a look, by the type's id (no hash, no attribute of the class read)
_TORCH_TENSORS = (Tensor, torch.nn.Parameter) + ((_DTensor,) if _DTensor is not None else ())
_PLAIN_KEY_TYPES = frozenset(map(id, (*_TORCH_TENSORS, int, str)))
_STR_TYPE = frozenset({id(str)})
_PLAIN_VALUE_TYPES = frozenset(map(id, (*_TORCH_TENSORS, int, float, bool, str, type(None))))
_QUALNAME = type.__dict__["__qualname__"].__get__
_MRO = type.__dict__["__mro__"].__get__
_CLASS_DICT = type.__dict__["__dict__"].__get__
_MODULE = type.__dict__["__module__"].__get__


def _qualname(cls: type) -> str:
    """A class's name, read through ``type``'s own descriptor (no metaclass code)."""
    return _QUALNAME(cls) if isinstance(cls, type) else repr(cls)


def _defines(cls: type, names: Collection[str]) -> list[str]:
    """Which of ``names`` a class between ``cls`` and ``object`` (not a builtin) defines, read through ``type``'s own
    descriptors (its MRO and each class's own dict: no metaclass code); for a class whose metaclass is not
    ``type`` or torch's, that metaclass."""
    if id(type(cls)) not in _TRUSTED_METAS:
        return [f"a metaclass of its own ({_qualname(type(cls))})"]
    found = []
    for c in _MRO(cls):
        if c is object or c is Tensor or c is torch._C.TensorBase:
            break
        if _MODULE(c) == "builtins":  # (int, dict, ...: their slots are C, none of the caller's)
            continue
        found += [k for k in _CLASS_DICT(c) if type(k) is str and k in names]
    return sorted(set(found))


def _key_problem(key: Any) -> str | None:
    """Why ``key`` of ``optimizer.state`` would run caller code when the step looks a param up, or None."""
    cls = type(key)
    if id(cls) in _PLAIN_KEY_TYPES:
        return None
    found = _defines(cls, ("__eq__", "__hash__"))
    return f"which defines {', '.join(found)}" if found else None


def _value_problem(cls: type) -> str | None:
    """Why a state value of class ``cls`` (not a tensor) would run caller code when the step reads its type
    (``isinstance`` reads ``__class__`` through the object's attribute lookup: a ``__getattribute__`` or a
    ``__class__`` of the class's own; ``__getattr__`` never runs there, ``object`` has ``__class__``, nor does the
    class's metaclass), or None. Read through ``type``'s own descriptors."""
    found = []
    for c in _MRO(cls):
        if c is object or _MODULE(c) == "builtins":
            continue
        found += [k for k in _CLASS_DICT(c) if type(k) is str and k in ("__getattribute__", "__class__")]
    found = sorted(set(found))
    return f"its class defines {', '.join(found)}, which the step's type checks would run" if found else None


def _is_dtensor(t: Any) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


# The inner tensors of the wrapper-subclass params a step in progress launches on (see
# FusedOptimizer._resolve_inners), by the wrapper's id (a DTensor's local shard, or the param itself): read afresh by
# every step before its checks, removed when it returns.
_INNERS: dict[int, tuple[Tensor, Tensor]] = {}
_PLAIN_PARAM_TYPES = frozenset({Tensor, torch.nn.Parameter})
_LOCAL_TENSOR = operator.attrgetter("_local_tensor")


def _wrapper_shards(views: list) -> Iterable[Tensor]:
    """The params with grads of ``views`` (or their DTensor local shards) whose class has a dispatch of its own and
    is neither a Parameter nor a plain tensor: the candidates of ``FusedOptimizer._resolve_inners``."""
    for view in views:
        params = view["params"]
        kinds = set(map(type, params))
        if kinds <= _PLAIN_PARAM_TYPES:  # (in C: the common case costs one pass over the list)
            continue
        if _DTensor is not None and all(issubclass(k, _DTensor) for k in kinds):  # (FSDP2: in C, as a rule)
            xs = list(map(_LOCAL_TENSOR, params))
            if set(map(type, xs)) <= _PLAIN_PARAM_TYPES:
                continue
        else:
            xs = [p._local_tensor if _is_dtensor(p) else p for p in params]
        for p, x in zip(params, xs):
            if type(x) not in _PLAIN_PARAM_TYPES and not has_memory(type(x)) and p.grad is not None:
                yield x


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (its ``_local_tensor``: no DTensor dispatch), or the tensor itself; during a step, a
    wrapper subclass's inner tensor in its place (see :func:`fused_ops._validate.inner_name`)."""
    x = t._local_tensor if _is_dtensor(t) else t
    if _INNERS:
        entry = _INNERS.get(id(x))
        if entry is not None and entry[0] is x:
            return entry[1]
    return x


def _resolved(p: Tensor) -> bool:
    """Whether the step in progress launches on the inner tensor of ``p`` (or of its local shard)."""
    if not _INNERS:
        return False
    x = p._local_tensor if _is_dtensor(p) else p
    entry = _INNERS.get(id(x))
    return entry is not None and entry[0] is x


def _unwrapped(value: Tensor) -> Tensor:
    """A loaded state tensor that is a wrapper subclass holding its elements in one plain tensor (or a DTensor with
    such a local shard: see ``_validate.wrapped_inner``) as that plain tensor (a DTensor with it as its shard): what
    the load copies. Anything else as it is."""
    x = value._local_tensor if _is_dtensor(value) else value
    inner = None if has_memory(type(x)) else wrapped_inner(x)
    if inner is None:
        return value
    if x is value:
        return inner
    return type(value).from_local(inner, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                                  stride=value.stride())  # fmt: skip


def _like_param(p: Tensor, local: Tensor) -> Tensor:
    """``local`` (a tensor made from ``_local(p)``, contiguous) as a state of ``p``: a DTensor with ``p``'s mesh and
    placements when ``p`` is one (no communication)."""
    if not _is_dtensor(p):
        return local
    return type(p).from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=torch.empty(p.shape, device="meta").stride())  # fmt: skip


def _same_ranks(a: Any, b: Any) -> bool:
    """Whether DeviceMeshes ``a`` and ``b`` put the same ranks at the same coordinates (equal but for their dim
    names): a DTensor's local shard means the same on both. Read from what every rank holds alike (the root rank
    map and the layout, not this rank's slice)."""
    if a == b:
        return True
    try:
        return (a.device_type == b.device_type and a._flatten_rank_map == b._flatten_rank_map
                and a._layout == b._layout)  # fmt: skip
    except Exception:  # noqa: BLE001 - (a torch whose DeviceMesh keeps these otherwise: only equal meshes)
        return False


def _on_mesh(t: Tensor, mesh: Any) -> Tensor:
    """DTensor ``t`` on ``mesh``: itself, or (a mesh of the same ranks at the same coordinates, see
    :func:`_same_ranks`) the same local shard on ``mesh``, no communication."""
    if t.device_mesh == mesh:
        return t
    return type(t).from_local(t._local_tensor, mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


def _mesh_problem(t: Tensor, p: Tensor) -> str | None:
    """Why loaded state ``t`` (a DTensor) cannot be laid out on DTensor param ``p``'s mesh, or None. The same on
    every rank (meshes are compared by what every rank holds alike): every rank refuses, or none."""
    if _same_ranks(t.device_mesh, p.device_mesh):
        return None
    return (
        f"is a DTensor on {t.device_mesh} but the param is on {p.device_mesh} (other ranks or coordinates): "
        "moving it would need communication between meshes, which DTensor does not do; save it as a full "
        "tensor, or load it with DCP, which reshards onto the param's mesh"
    )


def _spec(t: Tensor) -> tuple:
    """What must agree between a DTensor param and its grads and states: the mesh and the placements."""
    return (t.device_mesh, tuple(t.placements)) if _is_dtensor(t) else ()


try:  # torch's C++ check of tensor metadata, the one torch.compile's guards use: ~100 ns a tensor
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover (every torch this package supports has it)
    _TensorGuards = None


class _MetaGuard:
    """Tells whether tensors still have the type, dtype, device, requires_grad, sizes and strides they had.

    One C++ call (torch.compile's ``TensorGuards``) for a list of tensors; the plain-Python comparison when that
    is missing or refuses the tensors. Addresses are compared separately (the guard does not read them).
    """

    __slots__ = ("guard", "meta")

    def __init__(self, tensors: list[Tensor]) -> None:
        self.guard = None
        if _TensorGuards is not None:
            try:
                guard = _TensorGuards(
                    *tensors,
                    dynamic_dims_sizes=[list(t.shape) for t in tensors],
                    dynamic_dims_strides=[list(t.stride()) for t in tensors],
                )
                if guard.check(*tensors):
                    self.guard = guard
            except Exception:  # noqa: BLE001 (an API that moved: fall back)
                self.guard = None
        self.meta = None if self.guard is not None else _python_meta(tensors)

    def check(self, tensors: list[Tensor]) -> bool:
        if self.guard is not None:
            return self.guard.check(*tensors)
        return _python_meta(tensors) == self.meta


def _python_meta(tensors: list[Tensor]) -> tuple:
    return (
        [type(t) for t in tensors],
        [t.dtype for t in tensors],
        [t.device for t in tensors],
        [t.requires_grad for t in tensors],
        [t.shape for t in tensors],
        [t.stride() for t in tensors],
    )


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the fused optimizers: torch.optim's interface over one prepared multi-tensor launch per part.

    Not used directly. A subclass declares (see the module docstring):

    - ``_state_keys(group)``: the fp32, param-shaped state tensors its update reads and writes, in launch order;
      ``_required_state_keys``: those a non-empty state must hold (the others are created when missing);
      ``_has_step``: whether every param keeps an fp32 ``step`` count (moved by the kernel);
      ``_foreign_state_keys``: other optimizers' states, refused by ``load_state_dict`` (another optimizer's dict);
    - ``_check_hyperparameters(group)`` (constructor, ``add_param_group``, ``load_state_dict``) and
      ``_check_step_values(gi, group)`` (every step: returns the values the launch needs, as floats);
    - ``_normalize_group(group)``: torch's conversions of loaded or added groups (betas as a tuple, ...);
    - ``_make_launcher(group, part, grads)``: the prepared Triton launch of a part (``part.roles`` holds the state
      lists by key); ``_launch(part, group, lr, values, grad_scale, found_inf)`` calls it. The kernel moves the
      step counts itself (once per tensor however many programs it spans, not when ``found_inf`` is set): see the
      arrival counters of ``kernels/adam.py`` (``with_counters=True``);
    - the CPU path in two phases, which is what keeps a failed step all-or-nothing across groups:
      ``_prepare_reference(part, grads, group, lr, values, grad_scale, found_inf)`` computes every new value out of
      place (it may allocate, it writes nothing) and returns the call that copies them in. Its default runs
      ``_run_reference`` (same arguments) in the write phase, so a subclass that only has ``_run_reference`` loses
      that guarantee (a later group's out-of-memory leaves earlier groups stepped): see ``sgd.py``;
    - ``_new_state_tensor(group, key, p)`` when a state does not start at zeros; states are made by the step
      (``_init_state``, which also makes the fp32 masters from the params): a state torch.optim makes in its
      constructor (Adagrad's ``sum``) is made there by hand, never through ``_init_state`` (masters made then would
      be the weights of construction time; see ``_refresh_masters`` for what follows writes since);
    - ``_traced_group_calls(gi, group)`` and ``_step_traced``: the step under ``torch.compile`` (one custom op per
      part, registered in ``fused_ops/_ops.py``, on plain tensors, see :meth:`_traced_calls`). ``_step_traced``
      must copy the staged params back after its ops (``_write_back(staged)``, as ``adam.py`` does): a param that is
      not contiguous is stepped as a contiguous copy, and without the write-back only its states would move.

    Defaults should hold torch's ``foreach``, ``differentiable`` and ``fused`` keys (the groups then have
    torch.optim's keys; ``_LEGACY_DEFAULTS`` fills them in older dicts). Sparse and complex params are refused by
    the base for every optimizer.

    Extra group keys of this package (``master_weights``, ``backend``) are left out of ``state_dict()`` where they
    hold the constructor's value, so a dict has torch.optim's keys (DCP loads a checkpoint only into a dict whose
    keys it has).
    """

    _step_supports_amp_scaling = True
    _has_step = True
    _required_state_keys: tuple[str, ...] = ()
    _unshaped_state_keys: tuple[str, ...] = ()  # state tensors not shaped like the param (e.g. 8-bit block scales)
    _own_group_keys = ("master_weights", "backend")
    _absent_if_none: tuple[str, ...] = ()  # state keys that torch.optim reads as "no state yet" when they hold None
    _transient_state_keys: tuple[str, ...] = ()  # state dropped when its group stops using it (e.g. Kahan buffers)
    _rebuilt_state_keys: tuple[str, ...] = (MASTER_KEY,)  # state a load rebuilds where a dict lacks it
    # states of the family's other optimizers (and torch's): a loaded dict holding one is another optimizer's, which
    # would load silently where its other states share this one's names (an AdamW dict's exp_avg into FusedLion)
    _foreign_state_keys: tuple[str, ...] = ()
    # torch.optim's defaults for keys that older state dicts lack (its __setstate__)
    _LEGACY_DEFAULTS: dict[str, Any] = dict(maximize=False, foreach=None, differentiable=False, fused=None)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        self._refuse_differentiable(defaults)
        lr = defaults["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if isinstance(lr, Tensor) and not lr.is_floating_point():  # (torch takes an integer one; the kernels read fp)
            raise ValueError(f"Tensor lr must be 1-element and floating-point, got {lr.dtype}")
        defaults = {**defaults, "master_weights": bool(defaults.get("master_weights", False)),
                    "backend": check_backend(defaults.get("backend"))}  # fmt: skip
        self._normalize_group(defaults)
        self._check_hyperparameters(defaults)
        self._plans: dict[int, _GroupPlan] = {}
        self._master_marks: dict[int, tuple[int, int]] = {}  # see _refresh_masters
        super().__init__(params, defaults)
        self.state = _OptimizerState(self.state)

    # -- what a subclass declares ----------------------------------------------------------------------------
    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        """The fp32 state tensors (param-shaped) the update of ``group`` reads and writes, in launch order."""
        raise NotImplementedError

    @staticmethod
    def _check_hyperparameters(group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _refuse_differentiable(self, group: dict[str, Any], where: str = "") -> None:
        """``differentiable=True`` refused where it is given (the constructor, ``add_param_group``, a loaded state
        dict: torch.optim would step differentiably, the fused step would ignore it)."""
        if group.get("differentiable"):
            raise ValueError(f"{where}{type(self).__name__} does not support differentiable=True (the fused step is "
                             "not differentiable)")  # fmt: skip

    @staticmethod
    def _check_step_values(gi: int, group: dict[str, Any]) -> tuple:
        raise NotImplementedError

    @staticmethod
    def _normalize_group(group: dict[str, Any]) -> None:
        """Convert a group's values in place as torch.optim keeps them (e.g. betas as a tuple)."""

    def _plan_structure(self, group: dict[str, Any]) -> tuple:
        """The group settings a plan is built for (the other values are read at every step)."""
        return (tuple(self._state_keys(group)), group["master_weights"], group["backend"])

    def _part_key(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> tuple:
        """More than (device, dtype, grad dtype, master) that splits a group's launches (e.g. new buffers)."""
        return ()

    def _make_launcher(self, group: dict[str, Any], part: _Part, grads: list[Tensor]) -> Any:
        raise NotImplementedError

    def _launch(self, part: _Part, group: dict[str, Any], lr: Any, values: tuple, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:  # fmt: skip
        raise NotImplementedError

    def _run_reference(self, part: _Part, grads: list[Tensor], group: dict[str, Any], lr: Any, values: tuple,
                       grad_scale: Tensor | None, found_inf: Tensor | None) -> None:  # fmt: skip
        raise NotImplementedError

    def _prepare_reference(self, part: _Part, grads: list[Tensor], group: dict[str, Any], lr: Any, values: tuple,
                           grad_scale: Tensor | None, found_inf: Tensor | None) -> Callable[[], None]:  # fmt: skip
        """The reference (CPU) path of a part in two phases: what it allocates (its new values, computed out of place)
        done here, nothing written; returns the call that writes them (copies into the existing tensors) and bumps
        the params' versions. By default the whole ``_run_reference`` is the call."""
        return partial(self._run_reference, part, grads, group, lr, values, grad_scale, found_inf)

    def _step_traced(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The step under ``torch.compile``: the calls :meth:`_traced_calls` prepares, handed to a module-level
        function that Dynamo traces (its graph holds one custom op per part)."""
        raise NotImplementedError

    def _traced_group_calls(self, gi: int, group: dict[str, Any]) -> list[tuple]:
        """The custom-op calls of ``group`` (after every check, its states created): plain tensors and values."""
        raise NotImplementedError

    @torch.compiler.disable
    def _traced_calls(self, found_inf: Tensor | None = None,
                      read: tuple = (None, None)) -> tuple[list[tuple], list[tuple[Tensor, Tensor]]]:  # fmt: skip
        """For ``_step_traced``, run eagerly (Dynamo does not trace it, it breaks the graph around it): every group's
        params, grads, states and values checked (``_check_all_groups``, and no two params or states sharing memory)
        before any state is created, then every group's states created and its calls built on plain tensors (the
        local shards of DTensors). A bad group raises with nothing changed; what the traced graph receives are plain
        tensors, so it never traces DTensor unwrapping or the creation of states (which Dynamo could half do).
        ``read``: the step's ``(grad_scale, found_inf)``, checked for memory shared with what the step writes.

        Returns the calls and the staged params: ``(param, contiguous copy)`` of every param (local shard) that is not
        contiguous, whose copy the calls step (the custom ops take contiguous params, as the eager step's launches):
        the traced frame copies each back after its ops (:func:`_write_back`). So a DTensor param whose local shard is
        contiguous on some ranks only is stepped on every rank, as in the eager step."""
        if type(self.state) is not _OptimizerState:  # (``opt.state = ...`` by hand: as the eager step)
            self.state = _OptimizerState(self.state)
        swapped = self._grads_to_param_placements()  # (the calls keep the redistributed grads' shards)
        self._staged: list[tuple[Tensor, Tensor]] | None = []
        # (compiled steps write the params in the graph, unnoted: an eager step after one compares every master with
        # its param, see _refresh_masters)
        self._master_marks.clear()
        for plan in self._plans.values():
            plan.master_versions = None
        try:
            groups = self._check_all_groups()
            self._check_no_shared_memory(self._step_scalars(*read))
            if self._skipped_on_host(groups, found_inf):
                return [], []
            undo = self._state_undo = []
            version = self.state._version.n if isinstance(self.state, _OptimizerState) else None
            try:
                calls = []
                for gi, group in enumerate(self.param_groups):
                    calls += self._traced_group_calls(gi, group)
            except BaseException:
                self._undo_states(undo, version)  # (e.g. out of memory creating states: no state half made)
                self._abort_step()
                raise
            staged = self._staged
        finally:
            for p, g in swapped:
                p.grad = g
            self.__dict__.pop("_staged", None)
            self.__dict__.pop("_state_undo", None)
        return calls, staged

    def _check_all_groups(self) -> list[tuple[int, dict[str, Any], tuple, list[Tensor]]]:
        """For ``_step_traced``: every group's params, grads, states and step values checked before any group is
        stepped (the eager step does the same through its plans), so a bad group raises with nothing changed.
        Returns ``(index, group, step values, params with grads)`` per group."""
        self._complete_groups()
        groups = []
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            self._check_params(gi, params, group, traced=True)
            groups.append((gi, group, self._check_step_values(gi, group), params))
            _check_lr_memory(gi, group["lr"])
        return groups

    def _traced_parts(self, gi: int, group: dict[str, Any], part_key: Callable | None = None) -> list[_Part]:
        """For ``_step_traced``, after ``_check_all_groups`` (which checked these params, grads and states; checking
        them again here would break Dynamo's graph at every step: a data-pointer comparison): the group's params with
        grads, their states created, and split into parts as the eager plan splits them (device, dtype, master or not,
        ``part_key(p)``); local shards, and each part's grads (contiguous) in ``part.launcher``'s place (no launcher
        under tracing)."""
        params = [p for p in group["params"] if p.grad is not None]
        keys = [part_key(p) if part_key is not None else () for p in params]  # (before the states exist)
        states = [self._init_state(group, p) for p in params]
        split: dict[tuple, list[int]] = {}
        for i, (p, st) in enumerate(zip(params, states)):
            master = self._uses_master(group, p) and MASTER_KEY in st
            split.setdefault((p.device, p.dtype, master, keys[i]), []).append(i)
        parts = []
        staged = self.__dict__.get("_staged")
        for (_, _, master, key), idx in split.items():
            part = _Part.__new__(_Part)
            part.idx, part.key = idx, key
            part.params = [_local(params[i]) for i in idx]
            for j, q in enumerate(part.params):
                if not q.is_contiguous():  # (stepped as a contiguous copy, copied back after the ops: _write_back)
                    if staged is None:  # (only _traced_calls copies the staged params back)
                        raise RuntimeError("_traced_parts stages params that are not contiguous for _traced_calls")
                    copy = q.contiguous()
                    staged.append((q, copy))
                    part.params[j] = copy
            ss = [{k: _local(v) if isinstance(v, Tensor) else v for k, v in states[i].items()} for i in idx]
            flat = self._unshaped_state_keys
            part.roles = {k: [s[k] if k in flat else _shaped_like(s[k], p) for s, p in zip(ss, part.params)]
                          for k in self._state_keys(group) if all(k in s for s in ss)}  # fmt: skip
            part.steps = [s["step"] for s in ss] if self._has_step else []
            part.masters = [_shaped_like(s[MASTER_KEY], p) for s, p in zip(ss, part.params)] if master else []
            part.device = part.params[0].device
            part.backend = resolve_backend(group["backend"], part.device)
            part.launcher = [_local(params[i].grad).contiguous() for i in idx]
            parts.append(part)
        return parts

    def _after_run(self, plan: _GroupPlan) -> None:
        """Called after each plan's launches (e.g. new buffers are not new any more)."""

    def _skipped_on_host(self, groups: list[tuple[int, dict[str, Any], tuple, list[Tensor]]],
                         found_inf: Tensor | None) -> bool:  # fmt: skip
        """After every check, before any state is created: whether this step is known skipped (``found_inf`` read on
        the host) and returns with nothing created. ``groups``: ``(index, group, step values, params with grads)`` of
        the groups whose states may be created now. False by default: ``found_inf`` is never read on the host."""
        return False

    # -- validation -------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as torch.optim), validating its hyper-parameters first."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._refuse_differentiable(merged)
        param_group = self._as_group(dict(param_group))
        self._normalize_group(merged)
        for key in param_group:
            if key != "params" and key in merged:
                param_group[key] = merged[key]
        try:
            self._check_hyperparameters(merged)
        except _NoValueError as e:  # (torch's messages name no group; this one names the group it would be)
            raise ValueError(f"{e} (param group {len(self.param_groups)})") from None
        params = param_group.get("params")
        if params is not None and not isinstance(params, Tensor | set):  # (torch's own errors for those)
            param_group["params"] = params = list(params)
            _refuse_duplicates(len(self.param_groups), params)
        super().add_param_group(param_group)
        for plan in self._plans.values():
            self._flush_marks(plan)
        self._plans.clear()

    def _check_params(self, group_index: int, params: list[Tensor], group: dict[str, Any] | None = None, *,
                      traced: bool = False) -> None:  # fmt: skip
        """Raise a clear error for any param (or its state, when ``group`` is given) the fused step cannot update.
        Touches no state. A param of any layout is stepped, as torch steps it (a non-contiguous one through a
        contiguous copy, eagerly and under ``torch.compile`` (``traced``) alike: no layout that only some ranks'
        DTensor shards have makes one rank raise), except an expanded one."""
        name = type(self).__name__
        for i, p in enumerate(params):
            for what, t in (("", p), ("the grad of ", p.grad)):
                if t is not None and t.is_nested:  # (its layout reads strided; it has no shape)
                    raise TypeError(f"{name} needs dense (strided) params and grads; {what}param {i} of param group "
                                    f"{group_index} is a nested tensor")  # fmt: skip
            where = f"param {i} of param group {group_index} (shape {tuple(p.shape)})"
            g = p.grad
            if _is_dtensor(p) or _is_dtensor(g):
                self._check_dtensor(where, p, g)
                if _has_partial(p):  # (placements are the same on every rank)
                    problem = self._partial_problem(group, p)
                    if problem is not None:
                        raise ValueError(f"{name}: {where} is a DTensor with placements {tuple(p.placements)}: "
                                         f"{problem}; redistribute the param to Shard or Replicate placements "
                                         "first (torch.optim refuses it too)")  # fmt: skip
                p, g = _local(p), _local(g)
                where += " (its local shard)"
            elif _resolved(p):
                p = _local(p)
                where += " (its inner tensor)"
            if g.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients ({where})")
            if torch.is_complex(p):
                raise TypeError(f"{name} does not support complex parameters ({where} is {p.dtype})")
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"{name} supports float32, bfloat16 and float16 params; {where} is {p.dtype}")
            if p.is_sparse or p.layout != torch.strided:
                raise TypeError(f"{name} needs dense (strided) params; {where} is {p.layout}")
            if g.device != p.device:
                raise ValueError(f"{name}: the grad of {where} is on {g.device} but the param is on {p.device}")
            if first_without_storage([p, g]) is not None:
                raise TypeError(f"{name}: {where} or its grad is a {type(p).__name__}/{type(g).__name__} on "
                                f"{p.device}, not a tensor with memory of its own (a DTensor, a plain tensor "
                                "or a Parameter is needed; the eager step also takes a wrapper subclass of one "
                                "plain inner tensor, see the README)")  # fmt: skip
            for what, t in (("", p), ("the grad of ", g)):
                if outside_storage(t):
                    raise ValueError(f"{name}: {what}{where} lies outside its storage (a storage freed or shrunk in "
                                     "place, e.g. by untyped_storage().resize_(0))")  # fmt: skip
            if g.dtype != p.dtype:
                raise TypeError(f"{name}: the grad of {where} is {g.dtype} but the param is {p.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"{name}: the grad of {where} has shape {tuple(g.shape)}")
            if g.layout != torch.strided:
                raise TypeError(f"{name}: the grad of {where} is {g.layout}, not a dense tensor")
            if not p.is_contiguous():
                # (the custom ops and launches write contiguous params: the eager step stages a copy, see _GroupPlan,
                # and so does the traced one, see _traced_calls)
                if self_overlapping(p):
                    raise ValueError(f"{name}: {where} has elements that share memory (an expanded view, stride 0, or "
                                     "overlapping strides)")  # fmt: skip
            if group is not None:
                self._check_state(where, params[i], self.state.get(params[i], {}), group)

    def _check_dtensor(self, where: str, p: Tensor, g: Tensor) -> None:
        """A DTensor param needs a DTensor grad on the same mesh with the same placements (a grad of other placements
        on the param's mesh was redistributed by :meth:`_grads_to_param_placements` before the checks): the step then
        runs on the local shards, which hold matching elements."""
        name = type(self).__name__
        if not (_is_dtensor(p) and _is_dtensor(g)):
            raise TypeError(f"{name}: {where} is a {type(p).__name__} but its grad is a {type(g).__name__}: both must "
                            "be DTensors, or neither")  # fmt: skip
        if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
            raise ValueError(
                f"{name}: the grad of {where} has placements {tuple(g.placements)} on {g.device_mesh} but the param "
                f"has {tuple(p.placements)} on {p.device_mesh}; redistribute the grad to the param's placements "
                "(a Partial grad must be reduced) before the step"
            )
        if p._local_tensor.shape != g._local_tensor.shape:
            raise ValueError(f"{name}: the local shard of the grad of {where} has shape "
                             f"{tuple(g._local_tensor.shape)}, the param's {tuple(p._local_tensor.shape)}")  # fmt: skip

    def _partial_problem(self, group: dict[str, Any] | None, p: Tensor) -> str | None:
        """Why DTensor param ``p``, which has a ``Partial`` placement (each rank holds a summand of it, not a part),
        cannot be stepped rank by rank, or None when it can (an update linear in the param and the grad, e.g. SGD's:
        the summands' updates sum to the update of the sum). Decided from what every rank sees alike."""
        return (
            f"{type(self).__name__}'s update is not linear in the param and the grad, so stepping each rank's "
            "summand is not stepping their sum"
        )

    def _absent(self, st: dict[str, Any], key: str) -> bool:
        """Whether state ``key`` holds None where torch.optim reads None as "no state yet" (SGD's
        ``momentum_buffer``): created afresh at the step, as torch does."""
        return st.get(key, 0) is None and key in self._absent_if_none

    def _uses_master(self, group: dict[str, Any], p: Tensor) -> bool:
        return bool(group["master_weights"]) and p.dtype != torch.float32

    def _check_state(self, where: str, p: Tensor, st: Any, group: dict[str, Any]) -> None:
        """The state of ``p`` (None or empty: created at this step) is one the step can use: every tensor it will
        read is fp32, on the param's device, contiguous, with the param's number of elements (DTensors: distributed
        like the param; their local shards are what is checked)."""
        name = type(self).__name__
        if not isinstance(st, dict):
            raise TypeError(f"{name}: the state of {where} must be a dict, got {type(st).__name__}")
        if not st:
            return
        p_wrapper, p = p, _local(p)
        for key in (("step",) if self._has_step else ()) + tuple(self._required_state_keys):
            if key not in st:
                raise ValueError(f"{name}: the state of {where} has no {key!r} (give it every key, or empty it)")
        # (a state the param does not keep, e.g. the Kahan buffer of a param that became fp32, is not read: the step
        # drops it, as it drops the master of a param that needs none)
        needed = [k for k in self._state_keys(group) if k in st and not self._absent(st, k)
                  and self._wants_state(group, k, p_wrapper)]  # fmt: skip
        spec = {k: self._state_spec(group, k, p_wrapper) for k in needed}
        if self._uses_master(group, p_wrapper) and MASTER_KEY in st:
            needed.append(MASTER_KEY)
        for key in needed:
            t = st[key]
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: state {key!r} of {where} must be a tensor, got {type(t).__name__}")
            want = self._state_distribution(group, key, p_wrapper)
            shape = spec[key][2] if key in spec else p_wrapper.shape
            if _spec(t) != want or (want and t.shape != shape):
                if _spec(t) == want:  # (laid out like the param, of another shape)
                    raise ValueError(f"{name}: state {key!r} of {where} has shape {tuple(t.shape)}, its param "
                                     f"{tuple(shape)}")  # fmt: skip
                got = f"placements {_spec(t)[1]} of shape {tuple(t.shape)}" if _is_dtensor(t) else "a plain tensor"
                where_to = f"placements {want[1]}, shape {tuple(shape)}" if want else "a plain tensor"
                raise ValueError(f"{name}: state {key!r} of {where} must be distributed like its param ({where_to}), "
                                 f"got {got}")  # fmt: skip
            t = _local(t)
            if first_without_storage([t]) is not None:
                raise TypeError(f"{name}: state {key!r} of {where} is a {type(t).__name__}, not a tensor with memory")
            dtype, numel, _ = spec.get(key, (torch.float32, p.numel(), None))
            if t.is_nested:  # (its layout reads strided)
                raise TypeError(f"{name}: state {key!r} of {where} must be a dense {dtype} tensor, got a nested tensor")
            if t.dtype != dtype or t.layout != torch.strided:
                raise TypeError(f"{name}: state {key!r} of {where} must be a dense {dtype} tensor, got {t.dtype}"
                                + self._state_dtype_hint(group, key, t))  # fmt: skip
            if t.device != p.device:
                raise ValueError(f"{name}: state {key!r} of {where} is on {t.device} but the param is on {p.device}")
            if t.numel() != numel:
                raise ValueError(f"{name}: state {key!r} of {where} has {t.numel()} elements; the param has "
                                 f"{p.numel()}, so it must have {numel}")  # fmt: skip
            if not t.is_contiguous():
                raise ValueError(f"{name}: state {key!r} of {where} must be contiguous")
            if (t.shape != p.shape and key not in self._unshaped_state_keys
                    and (not p.is_contiguous() or (t.dim() != 1 and p.dim() != 1))):  # fmt: skip
                # (a state pairs with its param element by element in the param's logical order: a state of another
                # shape, made before ``p.data = p.data.t().contiguous()`` or a parametrization that stores the
                # weight transposed, would pair with other elements; torch's elementwise ops refuse it too. A flat
                # state, or a flat param, of a contiguous one pairs in the one order both have)
                raise ValueError(f"{name}: state {key!r} of {where} has shape {tuple(t.shape)}, but the param has "
                                 f"shape {tuple(p.shape)}{'' if p.is_contiguous() else ' and is not contiguous'}: the "
                                 "param changed shape since its states were made? Reset them (optimizer.state[p] = "
                                 "{}) or load states of this shape")  # fmt: skip
            if outside_storage(t):
                raise ValueError(f"{name}: state {key!r} of {where} lies outside its storage (a storage freed or "
                                 "shrunk in place, e.g. by untyped_storage().resize_(0))")  # fmt: skip
            if t is p.grad:
                raise ValueError(f"{name}: state {key!r} of {where} is the param's grad")
            if t is p or t.data_ptr() == p.data_ptr() and t.numel():
                raise ValueError(f"{name}: state {key!r} of {where} shares memory with the param")
        if self._has_step:
            step = st["step"]
            if isinstance(step, Tensor):
                if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
                    raise ValueError(f"{name}: state 'step' of {where} must be a real 1-element tensor or a number")
                step = _local(step)
                if first_without_storage([step]) is not None or outside_storage(step):
                    raise TypeError(f"{name}: state 'step' of {where} must be a tensor with memory, got a "
                                    f"{type(step).__name__} on {step.device}")  # fmt: skip
                if step.device not in (p.device, torch.device("cpu")):
                    raise ValueError(f"{name}: state 'step' of {where} is on {step.device}; it must be on the param's "
                                     f"device ({p.device}) or the CPU")  # fmt: skip
                if step.device.type == "cpu":  # (read without a device sync; load_state_dict checks every count)
                    count = float(step.detach().reshape(()))
                    if not (math.isfinite(count) and 0 <= count <= FP32_MAX):
                        raise ValueError(f"{name}: state 'step' of {where} must be a finite number >= 0 that float32 "
                                         f"holds (the count is kept in float32), got {count}")  # fmt: skip
            elif (
                isinstance(step, bool)
                or not isinstance(step, numbers.Real)
                or not (0 <= (step if type(step) in (int, float) else float(step)) <= FP32_MAX)
            ):  # fmt: skip  (a NaN fails it; an int of any size compares; a numpy number (_plain_states) as a float)
                raise ValueError(f"{name}: state 'step' of {where} must be a finite number >= 0 that float32 holds "
                                 f"(the count is kept in float32), got {step!r}")  # fmt: skip

    # -- state ------------------------------------------------------------------------------------------
    def _fill_group_defaults(self, group: dict[str, Any]) -> None:
        """Keys an older or foreign state dict lacks: torch's historical defaults, this package's constructor's."""
        for key, value in self._LEGACY_DEFAULTS.items():
            if key in self.defaults:  # (only the keys this optimizer's groups have: FusedLion has no foreach)
                group.setdefault(key, value)
        for key in self._own_group_keys:
            group.setdefault(key, self.defaults[key])

    def _as_group(self, group: dict[str, Any]) -> _ParamGroup:
        """``group`` as a :class:`_ParamGroup` of this optimizer (the same dict when it is one)."""
        if type(group) is not _ParamGroup:
            group = _ParamGroup(group)
        group._inherited = {k: self.defaults[k] for k in self._own_group_keys if k in self.defaults}
        return group

    def _complete_groups(self) -> None:
        """At every step, before any check: a group appended to ``param_groups`` by hand (torch.optim steps one that
        has its own keys) gets this package's keys and torch's historical defaults (as a loaded one does); a key
        that has no default is refused, naming the group, before any group gets a key."""
        incomplete = []
        for gi, group in enumerate(self.param_groups):
            if not isinstance(group, dict) or not isinstance(group.get("params"), list | tuple):
                raise ValueError(f"param group {gi} must be a dict with a 'params' list (add groups with "
                                 "add_param_group)")  # fmt: skip
            self._refuse_differentiable(group, f"param group {gi}: ")  # (set in a group by hand since)
            if all(key in group for key in self.defaults):
                continue
            fillable = {*self._LEGACY_DEFAULTS, *self._own_group_keys}
            missing = [key for key in self.defaults if key not in group and key not in fillable]
            if missing:
                raise ValueError(f"param group {gi} has no {missing[0]!r} (add groups with add_param_group, which "
                                 "fills in the defaults)")  # fmt: skip
            state = self.state
            if any(state.get(p) for p in group["params"] if isinstance(p, Tensor)):
                # (a group that has stepped lost a key: filling in a default would turn amsgrad, maximize, nesterov,
                # masters... off without a word; torch.optim raises a KeyError)
                key = next(key for key in self.defaults if key not in group)
                raise ValueError(f"param group {gi} has no {key!r}, and its params have states (a key deleted from a "
                                 "group that stepped, or a group appended by hand for params that stepped in "
                                 "another): set it; only a group of new params gets the defaults filled in, as "
                                 "add_param_group fills them")  # fmt: skip
            incomplete.append(group)
        for group in incomplete:
            self._fill_group_defaults(group)

    # Instance attributes beyond torch.optim's (defaults, state, param_groups) that a copy or a pickle must keep
    # (``copy.deepcopy(opt)``, ``torch.save(opt)``): torch's ``__getstate__`` keeps only its own three.
    _pickled_attrs: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._pickled_attrs if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # (first: an interruption inside torch's __setstate__, after it has swapped in the new state, must not leave
        # the old marks, which would make the next step trust the loaded masters over the params)
        self._plans = {}
        self._master_marks = {}
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        own_differentiable = not isinstance(defaults, dict) or "differentiable" in defaults
        super().__setstate__(state)
        if not own_differentiable:  # (torch's __setstate__ adds it to the defaults, and so to every group loaded
            # after: an optimizer without the key, FusedLion, would then save groups a fresh one cannot load)
            self.defaults.pop("differentiable", None)
        self._plans = {}
        self._master_marks = {}  # (load_state_dict too: loaded masters are compared with their params at the next step)
        self.param_groups = [self._as_group(group) for group in self.param_groups]
        for group in self.param_groups:
            self._fill_group_defaults(group)
            self._normalize_group(group)
        if not isinstance(self.state, _OptimizerState):
            self.state = _OptimizerState(self.state)
        if self._has_step:
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and "step" in st:
                        step = st["step"]
                        if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == p.device
                                and step.dim() == 0):  # fmt: skip
                            st["step"] = self._as_step(step, p)

    @staticmethod
    def _as_step(step: Any, p: Tensor) -> Tensor:
        if isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == p.device and step.dim() == 0:
            return step
        return torch.as_tensor(step).detach().to(device=p.device, dtype=torch.float32).reshape(()).clone()

    def _state_dtype_hint(self, group: dict[str, Any], key: str, t: Tensor) -> str:
        """More for the error of a state tensor of the wrong dtype (e.g. how to convert states after a change of the
        group's storage format); empty by default."""
        return ""

    def _state_spec(self, group: dict[str, Any], key: str, p: Tensor) -> tuple[torch.dtype, int, torch.Size]:
        """The dtype, local element count and (DTensor) global shape of state tensor ``key`` of param ``p`` in
        ``group``: fp32, the count of the param's local shard and the param's shape, unless an optimizer stores a
        state otherwise (8-bit codes and their block scales)."""
        return torch.float32, _local(p).numel(), p.shape

    def _state_distribution(self, group: dict[str, Any], key: str, p: Tensor) -> tuple:
        """The mesh and placements (``_spec``) state ``key`` of ``p`` must have: the param's, unless an optimizer
        lays a state out otherwise (the block scales of 8-bit states)."""
        return _spec(p)

    def _wants_state(self, group: dict[str, Any], key: str, p: Tensor) -> bool:
        """Whether ``p`` keeps state ``key`` of ``group`` (e.g. no Kahan buffer for an fp32 param)."""
        return True

    def _keeps(self, group: dict[str, Any], key: str, p: Tensor) -> bool:
        """Whether ``p`` in ``group`` keeps state ``key``: one of the group's state keys that ``p`` wants."""
        return key in self._state_keys(group) and self._wants_state(group, key, p)

    def _new_state_tensor(self, group: dict[str, Any], key: str, p: Tensor) -> Tensor:
        """A new state tensor ``key`` of ``p`` (fp32 zeros shaped like the param; DTensors like the param)."""
        return _zeros_like(p, torch.float32)

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        """``p``'s state, completed for ``group``: every new tensor is made first, then installed at once (an error,
        e.g. out of memory, leaves the state as it was: no half-made state). Inside a step, what is changed is
        logged (``_state_undo``) so that the step can put it back when a later allocation fails."""
        state = self.state.get(p)
        old = state if state is not None else {}
        new: dict[str, Any] = {}
        drop = []
        if self._has_step:
            if "step" not in old:
                new["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                step = old["step"]
                if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == p.device
                        and step.dim() == 0):  # fmt: skip
                    new["step"] = self._as_step(step, p)
        for key in self._state_keys(group):
            if (key not in old or self._absent(old, key)) and self._wants_state(group, key, p):
                new[key] = self._new_state_tensor(group, key, p)
        for key in self._transient_state_keys:
            if key in old and not self._keeps(group, key, p):
                # Turned off for this group: dropped (as masters below), so turning it on again starts afresh
                # instead of carrying what it held before.
                drop.append(key)
        if self._uses_master(group, p):
            if MASTER_KEY not in old:
                # New state, or a state dict without masters (e.g. torch.optim's): start from the param.
                if _resolved(p):  # (from the inner tensor the step launches on: never the wrapper's dispatch)
                    local = _local(p).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                    new[MASTER_KEY] = _like_param(p, local)
                else:
                    new[MASTER_KEY] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                fresh = self.__dict__.get("_fresh_masters")
                if fresh is not None:  # (made from the param by this step: nothing to refresh, see _refresh_masters)
                    fresh.add(new[MASTER_KEY].data_ptr())
        elif MASTER_KEY in old:
            # Masters turned off for this group: the param is updated as it is and is the truth from now on; a master
            # kept would be stale, and would rewind the param if masters were turned on again.
            drop.append(MASTER_KEY)
        # Every tensor exists: install (nothing below allocates a tensor).
        undo = self.__dict__.get("_state_undo")
        if undo is not None and (state is None or new or drop):
            undo.append((p, None if state is None else dict(state)))
        if state is None:
            state = self.state[p]
        if new:
            state.update(new)
        for key in drop:
            del state[key]
        return state

    def _undo_states(self, undo: list[tuple[Tensor, dict | None]], version: int | None) -> None:
        """Put back the param states that :meth:`_init_state` changed (logged in ``undo``) as they were: a param
        that had none has none again, a state dict holds what it held (the same dict and tensors); and the state's
        version counter, so that the plans built before still fit. Nothing here allocates a tensor."""
        for p, old in reversed(undo):
            if old is None:
                dict.pop(self.state, p, None)
            else:
                st = self.state.get(p)
                if st is not None:
                    dict.clear(st)
                    dict.update(st, old)
        if version is not None and isinstance(self.state, _OptimizerState):
            self.state._version.n = version

    def _abort_step(self) -> None:
        """Called when a step fails before it changed anything (its new states were put back): e.g. to forget the
        step's new buffers."""

    # -- fp32 masters that follow writes into the params ------------------------------------------------------
    # A param with an fp32 master is the master rounded: the step computes from the master and overwrites the param.
    # A write into the param by anything else (``model.load_state_dict`` after the optimizer was built, an in-place
    # re-init, an EMA swap, ``p.data = ...``) would be lost at the next step. So every eager step notes each such
    # param's version counter and address once it has written it (``_master_marks``, by the id of the tensor the user
    # writes: a DTensor's local shard), and the next step, before anything else is written, takes into the master
    # every element of a param whose version or address moved since that no longer equals the master rounded (the
    # update then starts from what the user wrote, as torch.optim would; elements written with their own value keep
    # the master's precision). A master with no mark (loaded by ``load_state_dict``, or last written by a compiled
    # step) is compared with its param the same way; one this step makes from its param is not. Writes through
    # ``p.data`` (which has a version counter of its own) are not seen.

    def _refresh_masters(self, plans: list[_GroupPlan], refreshed: list[tuple[Tensor, Tensor]]) -> list[tuple]:
        """Find each param written since this optimizer's last step, to take into its master. A plan reused from the
        last step compares versions only (``current_grads`` checked the addresses); a new plan, versions and
        addresses against the marks its predecessors left (``_flush_marks``).

        The reference path computes its new values from the masters before anything is written, so its masters are
        refreshed here, each kept in ``refreshed`` ``(master, old value)`` to put back if the step then fails before
        it writes. The Triton path's are returned, ``(master, param)``, to refresh once every part is prepared,
        right before the launches (no copy of the old masters: a model loaded whole would double their memory)."""
        marks = self._master_marks
        fresh = self.__dict__.get("_fresh_masters", ())
        later = []
        for plan in plans:
            if plan.master_versions is not None:
                nows = plan.versions_now()
                thens = plan.master_versions
            else:
                nows = [list(zip(versions, map(_DATA_PTR, visible), map(_view_meta, visible)))
                        for versions, (visible, _) in zip(plan.versions_now(), plan.master_pairs)]  # fmt: skip
                thens = [list(map(marks.get, map(id, visible))) for visible, _ in plan.master_pairs]
            for (visible, masters), part, now, then in zip(plan.master_pairs, plan.master_parts, nows, thens):
                if now == then:
                    continue
                for i, (a, b) in enumerate(zip(now, then)):
                    # (no mark: a master made by this very step from its param needs nothing; any other, loaded or
                    # last written by a compiled step, is compared with its param: elements equal to it rounded are
                    # kept, so a matching model, e.g. of the same checkpoint, leaves it bit for bit)
                    if a != b and (b is not None or masters[i].data_ptr() not in fresh):
                        if part.launcher is not None:
                            later.append((masters[i], visible[i]))
                        else:
                            refreshed.append((masters[i], masters[i].clone()))
                            _refresh_master(masters[i], visible[i])
        return later

    def _mark_masters(self, plans: list[_GroupPlan]) -> None:
        """After a step's writes: note the version (and address) of every param of ``plans`` that has a master."""
        for plan in plans:
            if plan.master_pairs:
                plan.master_versions = plan.versions_now()
                if not plan.reusable:  # (a reused plan's launches are on the params themselves: its param_addrs)
                    plan.master_addrs = [list(map(_DATA_PTR, visible)) for visible, _ in plan.master_pairs]

    def _flush_marks(self, plan: _GroupPlan | None) -> None:
        """Keep the marks of a plan about to be replaced or dropped, by param, for the plan that follows it."""
        if plan is not None and plan.master_versions is not None:
            addrs = plan.master_addrs or [[plan.param_addrs[i] for i in idx] for idx in plan.master_index]
            for (visible, _), versions, where, metas in zip(plan.master_pairs, plan.master_versions, addrs,
                                                            plan.master_metas):  # fmt: skip
                self._master_marks.update(zip(map(id, visible), zip(versions, where, metas)))

    def _tensor_state_keys(self, groups: list | None = None) -> set[str]:
        """Every state key that holds a param-shaped tensor (loaded as fp32 copies shaped like the param)."""
        keys = {MASTER_KEY, *self._required_state_keys}
        for group in self.param_groups if groups is None else groups:
            keys.update(self._state_keys(group))
        return keys

    def _loaded_key(self, key: Any, value: Any, src: dict[Any, Any], where: str) -> Any:
        """The state key a loaded entry is kept under (a state dict may name a state otherwise than the optimizer,
        e.g. 8-bit codes); raises if the entry cannot be that state."""
        return key

    def _load_as_is(self, key: str, value: Any) -> bool:
        """Whether a loaded state tensor is taken by :meth:`_load_state_value` rather than converted to an fp32 copy
        shaped like the param (e.g. 8-bit codes and their block scales)."""
        return False

    def _load_state_value(self, key: str, value: Tensor, p: Tensor, where: str) -> Tensor:
        raise NotImplementedError

    def _convert_loaded_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any], where: str) -> dict:
        """A loaded param state (its tensors already copies) as ``group`` keeps it: e.g. fp32 moments quantised for
        8-bit states, 8-bit ones dequantised for fp32 states. Raises for what cannot be converted; changes nothing
        else (the load swaps everything in once every state converted)."""
        return st

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's ``state_dict`` (hooks included), with plain dicts: a checkpoint needs no fused_ops."""
        return self._state_dict_post_hooks(self._state_dict_unhooked())

    def _state_dict_unhooked(self) -> dict[str, Any]:
        """torch.optim's ``state_dict`` with this package's group keys left out where they hold the constructor's
        values, before the post hooks: they run on the dict ``state_dict`` returns, after every rewrite of it
        (:meth:`_state_dict_post_hooks`). The pre hooks run first, as in torch."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        # torch's state_dict with no hooks of its own to run (the pre hooks ran above: one they register runs too)
        pre_hooks, post_hooks = self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = (
            type(pre_hooks)(),
            type(post_hooks)(),
        )
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = pre_hooks, post_hooks
        # (a param with nothing to keep, e.g. under FusedSGD with momentum 0, has an empty entry here that torch's
        # optimizers never make: left out, so that the dict has torch's layout)
        sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()
                       if not (isinstance(v, dict) and not v)}  # fmt: skip
        # (left out exactly where the live group's iteration leaves them out (_ParamGroup): torch's flat checkpoint
        # form reads every key a live group iterates from what this dict held)
        for g, live in zip(sd["param_groups"], self.param_groups):
            shown = set(live)
            for key in self._own_group_keys:
                if key in g and key not in shown:
                    del g[key]
        return sd

    def _state_dict_post_hooks(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The state dict the post hooks leave, run on the finished dict as torch runs them (a hook that returns a
        value replaces the dict)."""
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    def _load_state_tensor(self, value: Tensor, p: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """A loaded state tensor as this optimizer keeps it: a ``dtype`` (fp32) copy on the param's device, shaped like
        the param; for a DTensor param, a DTensor with the param's mesh and placements (a full tensor is cut into
        this rank's shard locally, no communication: a full dict is the same on every rank; a DTensor of other
        placements is redistributed, after the ranks agreed that every one of them gets there)."""
        value = value.detach()
        if _is_dtensor(p):
            if _off_mesh(p):  # (a rank outside the param's mesh: an empty shard, whatever this rank was given)
                local = torch.empty(tuple(p._local_tensor.shape), dtype=dtype, device=p._local_tensor.device)
                return type(p).from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                          stride=p.stride())  # fmt: skip
            if not _is_dtensor(value):
                value = _shard_locally(value.to(device=p.device, dtype=dtype).reshape(p.shape), p)
                if not _has_partial(p):
                    return value
            value = _on_mesh(value, p.device_mesh)  # (the load checked that it can be: _mesh_problem)
            if tuple(value.placements) != tuple(p.placements):
                if _load_agreement is not None and tuple(value.placements) != _reduced(p.placements):
                    _load_agreement.before_collective(p)
                value = _as_partial(value, p) if _has_partial(p) else value.redistribute(p.device_mesh, p.placements)
            # (contiguous local shards, as the step needs and as new states are: a state saved like a param whose
            # shards are not contiguous on every rank, e.g. torch's zeros_like of a transposed DTensor, would pass
            # on some ranks only)
            out = value.to(dtype=dtype, copy=True, memory_format=torch.contiguous_format)
            return out if out.shape == p.shape else out.reshape(p.shape).contiguous()
        if _is_dtensor(value):
            if _load_agreement is not None:
                _load_agreement.before_collective(p)
            value = value.full_tensor()
        return value.to(device=p.device, dtype=dtype, copy=True, memory_format=torch.contiguous_format).reshape(p.shape)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of its torch.optim counterpart: torch.optim's ``load_state_dict``
        (pre-hooks, then the load, then post-hooks), with everything validated before anything changes.

        torch.optim would cast the states to the param dtype; here they stay (or become) fp32, and step counts
        become fp32 tensors on the param's device. The source dict is never aliased. A state dict without the keys
        that newer versions added takes torch's historical defaults for them.
        """
        global _load_agreement
        agreement = _LoadAgreement.of(self.param_groups)
        if agreement is None:
            return self._load_state_dict(state_dict)
        # DTensor params: every rank loads or none does. Every rank's checks and local conversions run, then one tiny
        # all-reduce over the params' meshes agrees on the outcome; a conversion that communicates (a DTensor
        # state of other placements) is preceded by one too. A rank that raises takes part in the next such
        # all-reduce as failed, so the others raise there too rather than wait in a collective it never joins.
        outer, _load_agreement = _load_agreement, agreement  # (a load inside a load, from a hook: restored after)
        try:
            self._load_state_dict(state_dict, agreement)
        except BaseException:
            agreement.fail()
            raise
        finally:
            _load_agreement = outer

    def _load_state_dict(self, state_dict: dict[str, Any], agreement: _LoadAgreement | None = None) -> None:
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("loaded state dict must be a dict with 'state' and 'param_groups'")
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if not isinstance(sg, dict) or not isinstance(sg.get("params"), list | tuple):
                raise ValueError(f"loaded state dict: param group {gi} is not a dict with a 'params' list")
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))  # fmt: skip
        # The groups as they will be, checked like the constructor's.
        new_groups = []
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            ng = dict(sg)
            ng["params"] = g["params"]
            if "param_names" in g and "param_names" not in ng:
                ng["param_names"] = g["param_names"]
            self._fill_group_defaults(ng)
            self._refuse_differentiable(ng, f"loaded state dict: param group {gi}: ")
            for key in _TORCH_FLAG_KEYS:  # (torch's flags, at their defaults, in the groups of an optimizer that has
                # none, e.g. a FusedLion checkpoint saved after a resume by a version that added them: dropped, or a
                # fresh FusedLion's flat DCP form would not load into this one; probe 87)
                if key not in self.defaults and key in ng and (ng[key] is None or ng[key] is False):
                    del ng[key]
            for key in self.defaults:
                if key not in ng and key not in self._LEGACY_DEFAULTS and key not in self._own_group_keys:
                    raise ValueError(f"loaded state dict: param group {gi} has no {key!r}")
            try:
                self._normalize_group(ng)
                self._check_hyperparameters(ng)
            except (TypeError, ValueError) as e:
                raise ValueError(f"loaded state dict: param group {gi}: {e}") from e
            new_groups.append(ng)
        tensor_keys = self._tensor_state_keys()
        for ng in new_groups:
            tensor_keys.update(self._state_keys(ng))
        group_of = {id(p): ng for ng in new_groups for p in ng["params"]}
        # The states, converted (copies: the source is never aliased) and checked.
        new_state = _OptimizerState()
        saved_state = state_dict["state"]
        if not isinstance(saved_state, dict):
            raise ValueError("loaded state dict: 'state' must be a dict")
        for k, src in saved_state.items():
            p = id_map.get(k)
            if p is None:
                new_state[k] = src
                continue
            where = f"param {k} (shape {tuple(p.shape)})"
            if not isinstance(src, dict):
                raise ValueError(f"loaded state dict: the state of {where} must be a dict")
            st = {}
            for key, value in src.items():
                if type(key) is str and key in self._foreign_state_keys:
                    raise ValueError(
                        f"loaded state dict: the state of {where} holds {key!r}, a state of another "
                        f"optimizer, which {type(self).__name__} does not keep: a checkpoint of another "
                        "optimizer (drop that state from the dict to start from its other states)"
                    )
                if isinstance(value, Tensor):  # (copied or read below by torch's ops, which do not check memory)
                    value = _unwrapped(value)  # (torch.optim's state of a wrapper-subclass param is such a wrapper)
                    problem = loaded_tensor_problem(value)
                    if problem is not None:
                        raise ValueError(f"loaded state dict: state {key!r} of {where} {problem}")
                elif value is None and key in self._absent_if_none:
                    continue  # (as torch.optim reads it: no state yet)
                elif type(value) is dict and not value:  # (torch's flat form: a key of the live state the checkpoint
                    # lacks: left out where the load rebuilds it (the masters in a torch AdamW checkpoint, 8-bit scales
                    # of fp32 moments), else refused, as its nested form refuses a param's missing state)
                    if key in self._rebuilt_state_keys:
                        continue
                    raise ValueError(
                        f"loaded state dict: state {key!r} of {where} is missing (torch's flattened "
                        "form found no such key in the checkpoint: an empty dict in its place)"
                    )
                key = self._loaded_key(key, value, src, where)
                if key in self._transient_state_keys and not self._keeps(group_of[id(p)], key, p):
                    continue  # (a state this param's group does not keep, e.g. a Kahan buffer for an fp32 param)
                if key in tensor_keys and _is_dtensor(value) and _is_dtensor(p):
                    problem = _mesh_problem(value, p)  # (before any is redistributed: one that cannot be raises)
                    if problem is not None:
                        raise ValueError(f"loaded state dict: state {key!r} of {where} {problem}")
                if key in tensor_keys and self._load_as_is(key, value):
                    st[key] = self._load_state_value(key, value, p, where)
                elif key in tensor_keys:
                    if not isinstance(value, Tensor) or not (value.is_floating_point()):
                        raise ValueError(f"loaded state dict: state {key!r} of {where} must be a floating-point "
                                         f"tensor")  # fmt: skip
                    if value.numel() != p.numel() and not (value.numel() == 0 and _off_mesh(p)):
                        raise ValueError(
                            f"loaded state dict: state {key!r} of {where} has {value.numel()} elements but the "
                            f"param has {p.numel()} (shape {tuple(p.shape)})"
                        )
                    _check_state_shape(key, value, p, where)
                    st[key] = self._load_state_tensor(value, p)
                elif key == "step" and self._has_step:
                    if isinstance(value, Tensor):
                        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                            raise ValueError(f"loaded state dict: state 'step' of {where} must be a real number")
                        if _is_dtensor(value) and not _is_dtensor(p):
                            raise ValueError(f"loaded state dict: state 'step' of {where} is a DTensor but the param "
                                             "is not: step counts are plain tensors (as torch.optim's)")  # fmt: skip
                        count = float(_local(value).detach().reshape(()))  # (a load reads it on the host anyway)
                    elif isinstance(value, bool) or not isinstance(value, int | float):
                        raise ValueError(f"loaded state dict: state 'step' of {where} must be a number")
                    else:
                        count = float(value) if value <= FP32_MAX else math.inf  # (an int of any size: no overflow)
                    if not (math.isfinite(count) and 0 <= count <= FP32_MAX):
                        raise ValueError(f"loaded state dict: state 'step' of {where} must be a finite number >= 0 "
                                         f"that float32 holds (the count is kept in float32), got {count}")  # fmt: skip
                    step = self._as_step(value, p)
                    st[key] = step.detach().clone() if step is value else step  # (a leaf, never the caller's)
                else:
                    st[key] = deepcopy(value)
            if st:
                for key in (("step",) if self._has_step else ()) + tuple(self._required_state_keys):
                    if key not in st:
                        raise ValueError(f"loaded state dict: the state of {where} has no {key!r}")
            new_state[p] = self._convert_loaded_state(group_of[id(p)], p, st, where)
        if agreement is not None:
            agreement.agree()  # (every rank's dict valid: else every rank raises here)
        # Everything is valid: now change.
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._plans.clear()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Any:
        """Perform one optimisation step. Params without a grad are skipped (their step does not move).

        ``grad_scale`` (1-element tensor) divides every grad inside the kernel and ``found_inf`` (1-element
        tensor) makes the step a no-op on the device when non-zero; both default to the attributes that
        ``torch.amp.GradScaler`` sets. With ``fused_ops.DynamicLossScaler.grad_scale_and_norm`` the grad
        scale also carries the clip coefficient, so unscale + clip + update is one pass over the grads.
        A number ``grad_scale`` (a normal float32 > 0: 1e39 and 1e-46 are refused) works as a tensor holding it.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        grad_scale, found_inf = self._check_scaling(grad_scale, found_inf)
        if not torch.compiler.is_compiling():  # (fake tensors have no memory; the eager call checks them)
            for what, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
                if isinstance(t, Tensor) and (first_without_storage([t]) is not None or outside_storage(t)):
                    raise ValueError(f"{what} must be a tensor with memory (the step reads it on the device), got "
                                     f"a {type(t).__name__} on {t.device}")  # fmt: skip

        if torch.compiler.is_compiling():
            self._step_traced(grad_scale, found_inf)
            return loss
        swapped = self._grads_to_param_placements()
        try:
            # (no user code from the first check to the last launch: see NoUserCode)
            with no_autocast(), NoUserCode():
                self._step_eager(grad_scale, found_inf)
        finally:
            self._forget_inners()
            for p, g in swapped:
                p.grad = g
        return loss

    def _grads_to_param_placements(self) -> list[tuple[Tensor, Tensor]]:
        """DTensor grads whose placements differ from their param's on the same mesh (a ``Partial`` grad of a
        ``Replicate`` param, as tensor parallelism's ``SequenceParallel`` norms give): redistributed to the param's
        placements for this step (what torch.optim's DTensor ops do implicitly: a ``Partial`` grad is all-reduced),
        set as the param's grad until the step returns; returns the (param, original grad) pairs to put back.

        Run first, before any check: every rank holds the same placements, so every rank runs the same collectives,
        and a check that fails on one rank afterwards leaves no rank waiting in one."""
        if _DTensor is None:
            return []
        swapped, where = [], []
        for gi, group in enumerate(self.param_groups):
            # (only a DTensor param's grad is redistributed: a pass over the params' classes, not their grads, whose
            # reads cost ten times as much, ~0.6 us each on 10^4 params)
            if not any(issubclass(cls, _DTensor) for cls in set(map(type, group["params"]))):
                continue
            k = 0  # (the param's index among those with a grad, as the step's checks name it)
            for p in group["params"]:
                g = p.grad
                if (type(g) is _DTensor and _is_dtensor(p) and g.device_mesh == p.device_mesh
                        and tuple(g.placements) != tuple(p.placements) and g.shape == p.shape):  # fmt: skip
                    swapped.append((p, g))
                    where.append(f"param {k} of param group {gi} (shape {tuple(p.shape)})")
                k += g is not None
        if swapped:
            # The redistribution is a collective that reads and writes the local shards through their addresses:
            # each shard checked first (dense, with memory, inside its storage: not freed or shrunk in place), and
            # the outcome agreed over each grad's mesh, one tiny all-reduce (MAX) per mesh (per mesh dim where it
            # neither spans every rank nor is 1-D) on a step that communicates anyway, so that a shard bad on one
            # rank raises the same ValueError on every rank of the mesh before anything is sent or written. Every
            # rank holds the same params and placements, so every rank of a mesh reaches its all-reduce.
            from .. import _dtensor

            bad = []
            for _, g in swapped:
                local = g._local_tensor
                if local.layout != torch.strided or local.is_meta or first_without_storage([local]) is not None:
                    bad.append(1.0)
                else:
                    bad.append(2.0 if outside_storage(local) else 0.0)
            by_mesh: dict = {}
            for i, (p, _) in enumerate(swapped):
                by_mesh.setdefault(p.device_mesh, []).append(i)
            for mesh, idx in by_mesh.items():
                if mesh.get_coordinate() is None:  # (not on this mesh: its ranks agree without this one)
                    continue
                kind = mesh.device_type
                module = torch.get_device_module(kind) if kind != "cpu" else None
                device = torch.device(kind) if module is None else torch.device(kind, module.current_device())
                vec = torch.tensor([bad[i] for i in idx], dtype=torch.float32, device=device)
                for pg in _dtensor._groups(mesh, list(range(mesh.ndim)), device):
                    torch.distributed.all_reduce(vec, torch.distributed.ReduceOp.MAX, group=pg)
                for i, code in zip(idx, vec.tolist()):
                    bad[i] = max(bad[i], code)
            if any(bad):
                i = next(i for i, b in enumerate(bad) if b)
                p, g = swapped[i]
                problem = ("is not a dense tensor with memory (meta, or a tensor subclass)" if bad[i] == 1.0 else
                           "lies outside its storage (a storage freed or shrunk in place, e.g. by "
                           "untyped_storage().resize_(0))")  # fmt: skip
                raise ValueError(f"{type(self).__name__}: the grad of {where[i]}, a DTensor with placements "
                                 f"{tuple(g.placements)} to be redistributed to the param's {tuple(p.placements)}: "
                                 f"its local shard {problem} on some rank of its mesh; nothing was sent or "
                                 "changed")  # fmt: skip
        for i, (p, g) in enumerate(swapped):
            try:
                # (a Partial param, which FusedSGD steps: its grad made into summands locally, see _as_partial)
                p.grad = _as_partial(g, p) if _has_partial(p) else g.redistribute(p.device_mesh, p.placements)
            except BaseException:
                for q, h in swapped[:i]:
                    q.grad = h
                raise
        return swapped

    def _step_eager(self, grad_scale: Tensor | float | None, found_inf: Tensor | None) -> None:
        """The eager step: every group checked (or its plan found to fit), then every group's launches."""
        if type(self.state) is not _OptimizerState:  # (``opt.state = ...`` by hand: watch it again)
            self.state = _OptimizerState(self.state)
        self._complete_groups()
        # Every group is checked before any group is stepped, so bad input raises with nothing changed. A group whose
        # plan still fits (see _GroupPlan.current_grads: same params, same state, and every param and grad checked
        # against what the plan's launch was built for) skips the per-param checks and the list building.
        for gi in [gi for gi in self._plans if gi >= len(self.param_groups)]:
            # (a group removed from param_groups: its plan would keep its tensors alive; its marks stay, as the
            # groups after it moved down a place and their plans are rebuilt)
            self._flush_marks(self._plans.pop(gi))
        # Every group's values first, as plain Python objects, then checked: from the first tensor check on, the step
        # reads the groups only through these views, so no hyper-parameter's own Python code runs there (see
        # _step_group), and a bad value of a later group raises before any tensor is looked at.
        read = self.defaults.keys()
        views = [_step_group(type(self).__name__, gi, group, read) for gi, group in enumerate(self.param_groups)]
        _check_param_classes(type(self).__name__, views)
        self._resolve_inners(views)  # (runs wrapper classes' own code: before the first check)
        self._plain_states(views)
        checked = [self._check_step_values(gi, view) for gi, view in enumerate(views)]
        lrs = [view["lr"] for view in views]  # (each group's lr as checked: what its launches read)
        work = []
        read: set[int] = set()  # (the groups whose tensors were checked to run no code of their own when read)
        for gi, group in enumerate(views):
            values = checked[gi]
            _check_lr_memory(gi, lrs[gi])
            plan = self._plans.get(gi)
            current = plan.current_grads(self, group, self.state) if plan is not None else None
            if current is None:
                params = [p for p in group["params"] if p.grad is not None]
                self._check_overrides(gi, params)  # (before the checks read them through their methods)
                read.add(gi)
                self._check_params(gi, params, group)
                for device in {p.device for p in params}:
                    resolve_backend(group["backend"], device)  # (raises for "triton" on CPU without the interpreter)
                work.append((gi, group, values, params, None))
            else:
                work.append((gi, group, values, plan, current))
        scalars = self._step_scalars(grad_scale, found_inf, lrs)
        for gi, group, _, plan, current in work:
            # (a reused plan reads its tensors through torch.Tensor's own methods, but the reference path's torch
            # code calls theirs: checked before it runs, as the checked step does)
            if current is not None and gi not in read and any(part.launcher is None for part in plan.parts):
                self._check_overrides(gi, [p for p in group["params"] if p.grad is not None])
                read.add(gi)
        rebuilding = any(current is None for *_, current in work)
        # (a rebuilt plan, or a scalar inside a reused plan's writes: every group's tensors are read below through their
        # methods, those of the reused plans too; the hit is then named, and one across devices is no sharing)
        if rebuilding or scalars and _inside_written(self._plans.values(), [t for _, t in scalars]):
            for gi, group in enumerate(views):
                if gi not in read:
                    self._check_overrides(gi, [p for p in group["params"] if p.grad is not None])
            self._check_no_shared_memory(scalars, views)
        if rebuilding:
            rebuilt = [(gi, group, values, params) for gi, group, values, params, current in work if current is None]
            if self._skipped_on_host(rebuilt, found_inf):
                return

        # Then the step in two phases. First everything that allocates, for every group: new states, plans, and each
        # part's prepared run (the reference path computes its new values out of place here). An error there (out of
        # memory) puts back the states and plans as they were: nothing changed. Then the writes: the launches, and
        # the reference path's copies into the existing tensors.
        undo = self._state_undo = []
        self._fresh_masters: set[int] = set()  # (addresses of the masters this step makes: see _refresh_masters)
        version = self.state._version.n if isinstance(self.state, _OptimizerState) else None
        saved_plans = dict(self._plans)
        refreshed: list[tuple[Tensor, Tensor]] = []
        try:
            runs = []
            for gi, group, values, params_or_plan, current in work:
                if current is None:
                    params = params_or_plan
                    self._flush_marks(self._plans.get(gi))
                    if not params:
                        self._plans.pop(gi, None)
                        continue
                    plan = _GroupPlan(self, group, params, [self._init_state(group, p) for p in params], self.state)
                    current, plan.first_grads = plan.first_grads, None  # (the plan must not keep old grads alive)
                    self._plans[gi] = plan
                else:
                    plan = params_or_plan
                runs.append((plan, group, current, values, lrs[gi]))
            later = self._refresh_masters([plan for plan, *_ in runs], refreshed)
            prepared = [(plan, plan.prepare(self, group, current, values, grad_scale=grad_scale, found_inf=found_inf,
                                            lr=lr))
                        for plan, group, current, values, lr in runs]  # fmt: skip
        except BaseException:
            for master, old in refreshed:
                master.copy_(old)
            self._plans.clear()
            self._plans.update(saved_plans)
            self._undo_states(undo, version)
            self._abort_step()
            raise
        finally:
            self.__dict__.pop("_state_undo", None)
            self.__dict__.pop("_fresh_masters", None)
        version = self.state._version.n if isinstance(self.state, _OptimizerState) else None
        for plan, _ in prepared:
            plan.state_version = version  # (after every plan's states exist: building one changes the state)
        for master, param in later:  # (the Triton parts' masters, see _refresh_masters)
            _refresh_master(master, param)
        for plan, calls in prepared:
            for call in calls:
                call()
            plan.finish()
            self._after_run(plan)
        self._mark_masters([plan for plan, _ in prepared])
        if isinstance(self.state, _OptimizerState):  # (the step's own changes: nothing of the caller's since the read)
            self.__dict__["_states_read"] = (self.state._version, self.state._version.n)

    def _resolve_inners(self, views: list[_StepGroup]) -> None:
        """The params with grads (or their DTensor local shards) that are wrapper subclasses holding their elements in
        one plain inner tensor (``_validate.inner_name``: torchao's float8 training weights): the step launches on that
        tensor in the wrapper's place (``_local``), read now, afresh at every step, before any check, in two passes:
        every wrapper's ``__tensor_flatten__`` (the class's own code) first, then, with no caller code left to run,
        each wrapper's inner tensor read and matched (a flatten that changed another wrapper is seen; a wrapper that
        appeared meanwhile is not resolved: refused). Kept in ``_INNERS``, each with its wrapper (alive: its id is
        not reused), until the step returns (``step``'s ``finally``). A wrapper that is not such is left as it is: the
        checks refuse it as a tensor without memory of its own."""
        names: dict[int, tuple[Tensor, list[str]]] = {}
        for x in _wrapper_shards(views):
            if id(x) not in names:
                found = inner_name(x)  # (caller code)
                if found is not None:
                    names[id(x)] = (x, found)
        if not names:  # (no wrapper: the common case reads the params once)
            return
        for x in _wrapper_shards(views):  # (read again: the flattens above may have changed the groups)
            known = names.get(id(x))
            if known is None or known[0] is not x:
                continue
            inner = inner_of(x, known[1])
            if inner is not None:
                _INNERS[id(x)] = (x, inner)
                self.__dict__.setdefault("_inner_ids", []).append(id(x))

    def _plain_states(self, views: list[_StepGroup]) -> None:
        """Before the first check: ``optimizer.state`` and the states of the params with grads read by the step with no
        caller code of their own (probe 77: a key whose hash equals one the step looks up runs its ``__eq__`` at that
        lookup, a non-tensor value's ``__class__`` runs at an ``isinstance``, a dict subclass's methods at every read,
        a ``step`` held by an int subclass at its comparisons, all of it after earlier groups were checked). So:
        ``optimizer.state``'s keys are params (tensors whose class defines no ``__eq__``/``__hash__`` of its own),
        ints or strs; a param's state that is a dict subclass is replaced by a plain copy, here (torch.optim's
        ``load_state_dict`` makes such copies too); its keys are strs; its values tensors, numbers, strs, None or
        objects whose class reads attributes as ``object`` does; a ``step`` a tensor or an exact int or float. A
        TypeError names what is not, nothing changed. Run when ``optimizer.state`` changed since the last step
        (its mutation counter: changes made behind it, ``dict.__setitem__(state, ...)``, are not seen). Runs no caller
        code itself (types compared by identity, classes read through ``type``'s descriptors, dicts through
        ``dict``'s methods): after ``_resolve_inners``, whose wrappers' code could change the state."""
        state = self.state
        version = state._version
        if self.__dict__.get("_states_read") == (version, version.n):
            return
        name = type(self).__name__
        if not set(map(id, map(type, state))) <= _PLAIN_KEY_TYPES:
            for key in list(dict.__iter__(state)):
                problem = _key_problem(key)
                if problem is not None:
                    raise TypeError(f"{name}: optimizer.state has a key of type {_qualname(type(key))}, "
                                    f"{problem}: the step's state lookups would run it (keys are params, ints or "
                                    "strs)")  # fmt: skip
        copies = []  # (dict-subclass states, replaced once every state passed: a refusal changes nothing)
        for gi, view in enumerate(views):
            for i, p in enumerate(view["params"]):
                if p.grad is None:
                    continue
                st = state.get(p)
                if st is None or type(st) is _ParamState or type(st) is dict:
                    pass
                elif issubclass(type(st), dict):  # (a dict subclass: its own methods would run at every read)
                    st = _ParamState(version, dict.items(st))
                    copies.append((p, st))
                else:
                    continue  # (the checks refuse it: "must be a dict")
                if not st:
                    continue
                where = f"param {i} of param group {gi}"
                if not set(map(id, map(type, dict.__iter__(st)))) <= _STR_TYPE:
                    bad = next(k for k in dict.__iter__(st) if type(k) is not str)
                    raise TypeError(f"{name}: the state of {where} has a key of type {_qualname(type(bad))}: state "
                                    "keys must be strs (as torch.optim's are)")  # fmt: skip
                for key, value in dict.items(st):
                    cls = type(value)
                    if id(cls) in _PLAIN_VALUE_TYPES:
                        continue
                    problem = None if issubclass(cls, Tensor) else _value_problem(cls)
                    if key == "step" and problem is None and not issubclass(cls, Tensor) and _MODULE(cls) != "numpy":
                        problem = "a step count must be a tensor, an exact int or float, or a numpy number"
                    if problem is not None:
                        raise TypeError(f"{name}: state {key!r} of {where} is a {_qualname(cls)}: {problem}")
        for p, st in copies:
            state[p] = st
        self.__dict__["_states_read"] = (version, version.n)

    def _forget_inners(self) -> None:
        """After a step: its wrappers' inner tensors are read afresh by the next one."""
        for key in self.__dict__.pop("_inner_ids", ()):
            _INNERS.pop(key, None)

    def _check_overrides(self, gi: int, params: list[Tensor]) -> None:
        """A TypeError naming it for a param with a grad, its grad, or a state tensor of it, that runs Python code of
        its own when read through its methods (``kernels/_checks.py: check_no_overrides``; a DTensor's local shard
        included): the checked step reads them so, after other tensors were checked. ``params``: those with a grad,
        named by their index among them, as the step's other checks name them."""
        name = type(self).__name__

        def where(i: int) -> str:
            return f"param {i} of param group {gi}"

        check_no_overrides(name, "", params, label=where)
        check_no_overrides(name, "", [p.grad for p in params], label=lambda i: f"the grad of {where(i)}")
        states, keys = [], []  # (one check for all: ~0.1 us a tensor, not a call each)
        for i, p in enumerate(params):
            st = self.state.get(p)
            for k, v in st.items() if st else ():
                if issubclass(type(v), Tensor):
                    states.append(v)
                    keys.append((i, k))
        if states:
            check_no_overrides(name, "", states, label=lambda j: f"state {keys[j][1]!r} of {where(keys[j][0])}")

    def _step_scalars(self, grad_scale: Any, found_inf: Any, lrs: list | None = None) -> list[tuple[str, Tensor]]:
        """The 1-element tensors a step reads through a pointer while it writes params and states: every tensor
        ``lr`` (``lrs``: each group's, as the step read it) and the ``grad_scale`` / ``found_inf`` tensors, named for
        :meth:`_check_no_shared_memory`."""
        lrs = [group["lr"] for group in self.param_groups] if lrs is None else lrs
        scalars = [(f"lr of param group {gi}", lr) for gi, lr in enumerate(lrs) if isinstance(lr, Tensor)]
        scalars += [(name, t) for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf))
                    if isinstance(t, Tensor)]  # fmt: skip
        return scalars

    def _check_no_shared_memory(self, scalars: list[tuple[str, Tensor]] = (), groups: list | None = None) -> None:
        """No two params with grads, nor any of their state tensors, share memory (the step writes them all in one
        launch: overlapping tensors would race), and none of them shares memory with ``scalars`` (see
        :meth:`_step_scalars`: read by every program while some program writes it, the step would be half applied).
        Run when a plan is (re)built, and when a scalar lies in a reused plan's written memory. ``groups``: the
        param groups as the step reads them (see :func:`_step_group`), by default ``param_groups``."""
        groups = self.param_groups if groups is None else groups
        seen: dict[int, tuple[int, int]] = {}
        for gi, group in enumerate(groups):  # (one param twice, by hand since: named by its places)
            _refuse_duplicates(gi, group["params"], seen)
        params, states, steps, grads = [], [], [], []
        keys = self._tensor_state_keys(groups)
        for group in groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(_local(p))
                    grads.append(_local(p.grad))
                    st = self.state.get(p)
                    if st:
                        states.extend(_local(v) for k, v in st.items() if k in keys and isinstance(v, Tensor))
                        if isinstance(st.get("step"), Tensor):
                            steps.append(_local(st["step"]))
        # (params and states are contiguous: the checked step verified it before this runs; a step count is one
        # element, which the launch reads and writes: shared by two params, or inside a moment, it would race)
        # (grads are read, so they may share memory with each other, not with anything the step writes; a negated
        # view is refused: the kernels would read its memory, which holds the other sign)
        dense_params, dense_grads = all(p.is_contiguous() for p in params), all(g.is_contiguous() for g in grads)
        read = [(name, [t], False, False, True) for name, t in scalars]
        check_memory(f"{type(self).__name__} (params with grads of every group, in order, their states, their step "
                     "counts and their grads)", [("params", params, True, True, dense_params),
                                                 ("states", states, True, True, True),
                                                 ("step counts", steps, True, True, False),
                                                 ("grads", grads, False, True, dense_grads), *read])  # fmt: skip

    @staticmethod
    def _check_scaling(grad_scale: Any, found_inf: Any) -> tuple[Tensor | float | None, Tensor | None]:
        """``grad_scale``: None, a finite number > 0, or a 1-element floating-point tensor; ``found_inf``: None or a
        1-element floating-point tensor. (The kernel reads element 0 of a tensor: more elements are refused.)"""
        if grad_scale is not None:
            if isinstance(grad_scale, Tensor):
                if grad_scale.numel() != 1 or not grad_scale.is_floating_point() or grad_scale.layout != torch.strided:
                    raise ValueError(f"grad_scale must be a 1-element floating-point tensor, got shape "
                                     f"{tuple(grad_scale.shape)} and dtype {grad_scale.dtype}")  # fmt: skip
            elif isinstance(grad_scale, int | float) and not isinstance(grad_scale, bool):
                # (used as a float32 divisor: 1e39 is inf there, 1e-46 is 0, and the reciprocal of a subnormal
                # overflows; the same range as ZeroAdamW's loss_scale on one rank)
                grad_scale = real_float(grad_scale)
                if not (_FP32_TINY <= grad_scale <= FP32_MAX):
                    raise ValueError(
                        f"grad_scale must be a finite number > 0 that float32 holds as a normal number (between "
                        f"{_FP32_TINY:.4g} and {FP32_MAX:.4g}), got {grad_scale}"
                    )
            else:
                raise TypeError(f"grad_scale must be a 1-element tensor or a number, got {type(grad_scale).__name__}")
        if found_inf is not None:
            if not isinstance(found_inf, Tensor):
                raise TypeError(f"found_inf must be a 1-element tensor, got {type(found_inf).__name__}")
            if found_inf.numel() != 1 or not found_inf.is_floating_point() or found_inf.layout != torch.strided:
                raise ValueError(f"found_inf must be a 1-element floating-point tensor, got shape "
                                 f"{tuple(found_inf.shape)} and dtype {found_inf.dtype}")  # fmt: skip
        return grad_scale, found_inf


def _has_partial(t: Tensor) -> bool:
    """Whether DTensor ``t`` has a ``Partial`` placement (each rank holds a summand, not a part)."""
    return any(pl.is_partial() for pl in t.placements)


def _reduced(placements: Any) -> tuple:
    """``placements`` with every ``Partial`` one made ``Replicate``."""
    from torch.distributed.tensor import Replicate

    return tuple(Replicate() if pl.is_partial() else pl for pl in placements)


def _refuse_duplicates(gi: int, params: list, seen: dict[int, tuple[int, int]] | None = None) -> None:
    """A ValueError naming both places when one param object is twice in group ``gi`` (or, with ``seen``: the ids of
    earlier groups' params, in another group too). torch.optim warns of the first and steps the param twice, and
    refuses the second; the fused step writes every param once per launch, so both are refused."""
    seen = {} if seen is None else seen
    for i, p in enumerate(params):
        first = seen.setdefault(id(p), (gi, i))
        if first != (gi, i):
            where = f"at positions {first[1]} and {i}" if first[0] == gi else f"(position {i}), and param group "
            where = where if first[0] == gi else f"{where}{first[0]} (position {first[1]})"
            raise ValueError(f"param group {gi} holds the same param {where} (e.g. tied weights collected from two "
                             "modules): pass each param once (model.parameters() lists a tied one once); "
                             "torch.optim would step it twice")  # fmt: skip


def _check_state_shape(key: Any, value: Tensor, p: Tensor, where: str) -> None:
    """A loaded param-shaped state (of the param's element count, checked before) has the param's shape, or either
    is flat (1-D), as the step takes them (``_check_state``): pairing in the one order both have. Another shape, e.g.
    a transposed weight's moments, would pair its elements with the wrong ones of the param (torch.optim loads it
    and its next step raises). A rank off a DTensor param's mesh may be given an empty one."""
    if (
        tuple(value.shape) != tuple(p.shape)
        and value.dim() != 1
        and p.dim() != 1
        and not (value.numel() == 0 and _off_mesh(p))
    ):
        raise ValueError(
            f"loaded state dict: state {key!r} of {where} has shape {tuple(value.shape)} but the param "
            f"has shape {tuple(p.shape)} (a state pairs with the param's elements in their logical "
            "order: the same element count in another shape would pair them with the wrong ones; a flat state "
            "loads)"
        )


def _off_mesh(p: Tensor) -> bool:
    """Whether DTensor ``p``'s mesh leaves this rank out (its local shard is empty; a full state dict gives this
    rank empty states for it, as ``get_optimizer_state_dict(full_state_dict=True)`` does)."""
    return _is_dtensor(p) and p.device_mesh.get_coordinate() is None


def _shard_locally(full: Tensor, p: Tensor) -> Tensor:
    """Full tensor ``full`` (the same on every rank, as a full state dict is) as a DTensor laid out like DTensor param
    ``p`` (``Partial`` placements made ``Replicate``): this rank's shard cut here, no communication (a scatter from
    rank 0 would leave the other ranks waiting when one rank's load raises, and pair states across params when the
    ranks' dicts differ), and copied into memory of its own (never the caller's tensor, nor a view that keeps the
    whole full tensor alive)."""
    from torch.distributed.tensor import distribute_tensor

    placements = _reduced(p.placements)
    cut = distribute_tensor(full, p.device_mesh, placements, src_data_rank=None)
    local = cut._local_tensor.clone(memory_format=torch.contiguous_format)
    return type(cut).from_local(local, p.device_mesh, placements, run_check=False, shape=cut.shape,
                                stride=cut.stride())  # fmt: skip


_load_agreement: _LoadAgreement | None = None  # (the one of the load_state_dict running; loads run on one thread)


class _LoadAgreement:
    """``load_state_dict`` of an optimizer with DTensor params: every rank loads, or every rank raises, and no rank
    waits in a collective that another rank never reaches.

    Each round is an all-reduce (MAX) of ``[failed, tag, -tag]`` over every mesh the params are on (each over all
    its dims, in the order the params come: the same on every rank that holds them; the meshes this rank is not on
    are left out, as the step's agreements leave them), repeated once per mesh so that a failure crosses meshes
    that overlap ([0, 1] and [1, 2]: rank 0 hears of rank 2 through rank 1). Only the params' own meshes: ranks
    that hold other params (another pipeline stage) take no part. ``agree()`` ends a load whose checks passed here
    (tag 0), ``before_collective(p)`` precedes a conversion that communicates (tag: its rank among them and the
    param's index), ``fail()`` is the round of a rank whose load raised. A round with a failed rank, or with ranks
    at different points (dicts that differ between ranks), raises on every rank."""

    def __init__(self, meshes: list, index: dict[int, int]) -> None:
        self.meshes = meshes
        self.index = index
        self.count = 0
        self.done = False

    @staticmethod
    def of(groups: list[dict[str, Any]]) -> _LoadAgreement | None:
        """The agreement of a load into ``groups``, or None without DTensor params (nothing to agree on)."""
        if _DTensor is None or not torch.distributed.is_initialized():
            return None
        meshes, index = [], {}
        for p in chain.from_iterable(g["params"] for g in groups if isinstance(g, dict)):
            index.setdefault(id(p), len(index))
            if _is_dtensor(p):
                mesh = p.device_mesh
                if not any(mesh is m or mesh == m for m in meshes):
                    meshes.append(mesh)
        return _LoadAgreement(meshes, index) if meshes else None

    def _round(self, failed: bool, tag: int) -> tuple[bool, bool]:
        from .. import _dtensor

        vec = [int(failed), tag, -tag]
        for _ in range(len(self.meshes)):
            for mesh in self.meshes:
                if mesh.get_coordinate() is None:  # (not on this mesh)
                    continue
                kind = mesh.device_type
                module = torch.get_device_module(kind) if kind != "cpu" else None
                device = torch.device(kind) if module is None else torch.device(kind, module.current_device())
                t = torch.tensor(vec, dtype=torch.int64, device=device)
                for pg in _dtensor._groups(mesh, list(range(mesh.ndim)), device):
                    torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX, group=pg)
                vec = t.tolist()
        return vec[0] > 0, vec[1] != -vec[2]

    def _raise_if(self, failed: bool, apart: bool) -> None:
        if failed or apart:
            self.done = True
            why = ("another rank refused its state dict (its error names the problem)" if failed else
                   "the ranks' state dicts differ (they hold states of other params or placements)")  # fmt: skip
            raise RuntimeError(f"loaded state dict: {why}; nothing was loaded on any rank of the params' meshes")

    def before_collective(self, p: Tensor) -> None:
        self.count += 1
        self._raise_if(*self._round(False, (self.count << 24) | (self.index.get(id(p), 0) & 0xFFFFFF)))

    def agree(self) -> None:
        self._raise_if(*self._round(False, 0))
        self.done = True

    def fail(self) -> None:
        if not self.done:
            self.done = True
            try:
                self._round(True, 0)
            except Exception:  # noqa: BLE001 - (the process group broke: this rank's own error is the one to see)
                pass


def _as_partial(value: Tensor, p: Tensor) -> Tensor:
    """DTensor ``value`` (on ``p``'s mesh) laid out as ``p``, which has ``Partial`` placements (a loaded state of a
    ``Partial`` param, e.g. torch.optim.SGD's buffer, which torch keeps reduced): reduced to ``Replicate`` on those
    mesh dims (DTensor refuses to redistribute to ``Partial``), then each rank's summand made locally, no
    communication and exact: the value on the ranks at coordinate 0 of a ``Partial("sum")`` dim and zeros on the
    others; the value itself for the other reductions (a mean, max or min of equal values)."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    value = value.redistribute(mesh, _reduced(placements))
    local = value._local_tensor
    coord = mesh.get_coordinate()
    if coord is not None and any(pl.is_partial() and getattr(pl, "reduce_op", "sum") == "sum" and coord[d] != 0
                                 for d, pl in enumerate(placements)):  # fmt: skip
        local = torch.zeros_like(local)
    return type(value).from_local(local, mesh, placements, run_check=False, shape=value.shape, stride=value.stride())


def _zeros_like(p: Tensor, dtype: torch.dtype) -> Tensor:
    """Contiguous ``dtype`` zeros like ``p``; for a DTensor, laid out like it: its mesh and placements, ``Partial``
    ones included (DTensor's ``zeros_like`` makes those ``Replicate``, which a state holding each rank's summand of a
    ``Partial`` param's state is not)."""
    if _is_dtensor(p) and _has_partial(p) or _resolved(p):  # (a wrapper's inner tensor: never its dispatch)
        return _like_param(p, torch.zeros_like(_local(p), dtype=dtype, memory_format=torch.contiguous_format))
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)


def _write_back(staged: list[tuple[Tensor, Tensor]]) -> None:
    """After a traced step's custom ops (in the frame Dynamo captures): the contiguous copies that the ops stepped
    in place of params that are not contiguous, copied back into the params (see :meth:`FusedOptimizer._traced_calls`;
    the eager step's plans do the same)."""
    for p, copy in staged:
        p.copy_(copy)


def _view_meta(t: Tensor) -> tuple:
    """How ``t`` views its memory: dtype, sizes, strides, storage offset (with its address, what a master's mark
    records of its param)."""
    return t.dtype, t.shape, t.stride(), t.storage_offset()


def _check_lr_memory(gi: int, lr: Any) -> None:
    """A tensor ``lr`` is read on the device (copied to it, or by the kernel through its address): it must have
    memory (not a meta tensor nor a wrapper subclass), checked with every group's values before any group runs."""
    if isinstance(lr, Tensor) and not torch.compiler.is_compiling():
        if first_without_storage([lr]) is not None or outside_storage(lr):
            raise ValueError(f"Tensor lr of param group {gi} must be a tensor with memory, got a {type(lr).__name__} "
                             f"on {lr.device}")  # fmt: skip


def _shaped_like(t: Tensor, p: Tensor) -> Tensor:
    """State tensor ``t`` (checked: contiguous, ``p``'s element count) as a view of ``p``'s shape, for the plain-torch
    paths, whose elementwise ops broadcast by shape (a state flattened in place, ``resize_(numel)``, is still the
    param's state); the same memory, so the kernels' tables do not change."""
    return t if t.shape == p.shape else t.view(p.shape)


class _Part:
    """The tensors of one launch: params with grads of one (device, dtype, grad dtype, master or not, and the
    optimizer's own part key). ``roles`` holds the state lists by key, in the optimizer's launch order."""

    __slots__ = ("idx", "params", "roles", "steps", "masters", "device", "backend", "launcher", "key")

    def __init__(self, opt: FusedOptimizer, group: dict[str, Any], idx: list[int] | None, params: list[Tensor],
                 grads: list[Tensor], states: list[dict[str, Tensor]], master: bool, key: tuple) -> None:  # fmt: skip
        self.idx = idx  # positions in the plan's params; None: all of them
        self.params = params
        self.key = key  # the optimizer's own part key (``_part_key``)
        flat = opt._unshaped_state_keys
        self.roles = {k: [s[k] if k in flat else _shaped_like(s[k], p) for s, p in zip(states, params)]
                      for k in opt._state_keys(group) if all(k in s for s in states)}  # fmt: skip
        self.steps = [s["step"] for s in states] if opt._has_step else []
        self.masters = [_shaped_like(s[MASTER_KEY], p) for s, p in zip(states, params)] if master else []
        self.device = params[0].device
        self.backend = resolve_backend(group["backend"], self.device)
        self.launcher = opt._make_launcher(group, self, grads) if self.backend == "triton" else None
        if self.launcher is not None:
            # (the plan checks the grads at every step and launches through ``_run``: no weak references to them,
            # which would make torch.utils.swap_tensors refuse the grads, and module conversions with them)
            self.launcher._watch_grads(None)


def _inside_written(plans: Iterable[_GroupPlan], tensors: list, nbytes: Tensor | None = None, owner: Any = None
                    ) -> bool:  # fmt: skip
    """Whether any of ``tensors`` (a few 1-element tensors; or the addresses ``tensors`` with sizes ``nbytes``, of
    many grads) shares a byte with what the launches of ``plans`` write (their sorted, merged spans): a bisection
    per tensor, or one vector search per plan. Addresses of every device are compared alike, so a hit may be on
    another device: callers send it to the checked path."""
    plans = [o for o in plans if o.written_list[0]]
    if not plans or not tensors:
        return False
    if nbytes is None:
        for t in tensors:
            a, e = t.data_ptr(), t.data_ptr() + t.nbytes
            for starts_list, ends_list in (o.written_list for o in plans):
                k = bisect.bisect_left(starts_list, e) - 1  # (the last span starting before the end)
                if k >= 0 and ends_list[k] > a and e > a:
                    return True
        return False
    starts = torch.tensor(tensors, dtype=torch.int64)
    ends = starts + nbytes
    if owner is None or len(plans) == 1:
        spans = [(o.written_starts, o.written_ends) for o in plans]
    else:
        spans = [_written_union(owner, plans)]
    for written_starts, written_ends in spans:
        last = torch.searchsorted(written_starts, ends, side="left") - 1  # (the last span starting before each end)
        if _ANY(((last >= 0) & (written_ends[last.clamp(min=0)] > starts) & (ends > starts)).any()):
            return True
    return False


def _merged_spans(spans: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Byte spans ``(start, end)``, sorted and merged where they overlap: ``(starts, ends)``."""
    merged: list[list[int]] = []
    for a, e in sorted(spans):
        if merged and a < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([a, e])
    return [a for a, _ in merged], [e for _, e in merged]


def _written_union(owner: Any, plans: list[_GroupPlan]) -> tuple[Tensor, Tensor]:
    """The union of the written spans of ``plans`` (every group's, checked by each group whose grads moved), merged
    once per set of plan objects and kept on ``owner`` (the optimizer), so that a step over G groups whose grads moved
    runs G searches of it, not G x G (host time grew with the square of the group count). Keyed by weak references
    to the plans (a rebuilt plan is a new object; a dropped one is not kept alive)."""
    cached = owner.__dict__.get("_written_union")
    if cached is not None:
        refs, union = cached
        if len(refs) == len(plans) and all(map(operator.is_, (r() for r in refs), plans)):
            return union
    starts, ends = _merged_spans(zip(chain.from_iterable(o.written_list[0] for o in plans),
                                     chain.from_iterable(o.written_list[1] for o in plans)))  # fmt: skip
    union = (torch.tensor(starts, dtype=torch.int64), torch.tensor(ends, dtype=torch.int64))
    owner.__dict__["_written_union"] = (tuple(map(weakref.ref, plans)), union)
    return union


_GRAD = operator.attrgetter("grad")
_ANY = Tensor.__bool__  # (of a CPU tensor of addresses: host metadata, never a device value)
_DATA_PTR = Tensor.data_ptr
_VERSION = operator.attrgetter("_version")


def _refresh_master(master: Tensor, param: Tensor) -> None:
    """Take into fp32 ``master`` the elements of ``param`` that differ from the master rounded to the param's
    dtype (no host sync; temporaries the size of this one tensor; see FusedOptimizer._refresh_masters)."""
    written = param.ne(master.to(param.dtype))
    torch.where(written, param.to(master.dtype), master, out=master)


_STORAGE_OFFSET = Tensor.storage_offset
_UNTYPED_STORAGE = Tensor.untyped_storage
_STORAGE_NBYTES = torch.UntypedStorage.nbytes


_CHUNK = 256  # params per chunk of the per-step check (their tensors stay in the L2 cache between its passes)


class _Chunk:
    """Up to ``_CHUNK`` params of a plan with their grads' and states' addresses, sizes and one metadata guard."""

    __slots__ = ("params", "param_addrs", "grad_addrs", "grad_itemsizes", "grad_nbytes", "state_dicts", "owners",
                 "keys", "states", "state_addrs", "storages", "storage_addrs", "storage_needs", "guard")  # fmt: skip


def _inside_storages(tensors: list[Tensor], itemsizes: list[int], nbytes: list[int]) -> bool:
    """Whether each tensor's bytes, from its storage offset, fit in its storage: one whose storage was freed or shrunk
    in place keeps its sizes, and may keep its address too (an allocator hands the freed block back for a smaller
    request), so this is read at every step: for the grads of every plan (a plan holds its params' and states'
    storages instead, see :func:`_held_storages`) and for every tensor of a DTensor plan (~0.3 us a tensor). The
    tensors are dense with non-negative strides (the checked step refused others) and of the plan's sizes and
    dtypes (their guards passed): ``nbytes`` from the storage offset is their extent. ``itemsizes`` are 0 for
    empty tensors (no bytes)."""
    return all(map(operator.le, map(operator.add, map(operator.mul, map(_STORAGE_OFFSET, tensors), itemsizes), nbytes),
                   map(_STORAGE_NBYTES, map(_UNTYPED_STORAGE, tensors))))  # fmt: skip


_STORAGE_PTR = torch.UntypedStorage.data_ptr


def _held_storages(tensors: list[Tensor]) -> tuple[list, list[int], list[int]]:
    """The storages of ``tensors`` (params and states, which live as long as the plan anyway), their addresses, and
    the bytes each tensor needs of its storage: what :func:`_storages_hold` reads at every step instead of asking
    each tensor for its storage (a third of the cost). A held storage's memory goes to nothing else unless the
    storage itself is freed or resized in place, which moves its address or its size: a tensor still at its address
    (checked apart) lies in live memory of its own while its storage keeps that address and enough bytes."""
    storages = [t.untyped_storage() for t in tensors]
    needs = [t.storage_offset() * t.element_size() + t.nbytes if t.numel() else 0 for t in tensors]
    return storages, list(map(_STORAGE_PTR, storages)), needs


def _storages_hold(storages: list, addrs: list[int], needs: list[int]) -> bool:
    """Whether every held storage is where it was and still has the bytes its tensor needs (one freed, or resized
    in place, even back to its address but smaller, has not)."""
    return all(map(operator.eq, map(_STORAGE_PTR, storages), addrs)) and all(
        map(operator.le, needs, map(_STORAGE_NBYTES, storages))
    )


def _extents(tensors: list[Tensor]) -> tuple[list[int], list[int]]:
    """The item sizes (0 for an empty tensor) and byte counts that :func:`_inside_storages` reads ``tensors`` by."""
    return [t.element_size() if t.numel() else 0 for t in tensors], [t.nbytes for t in tensors]


def _build_chunks(plan: _GroupPlan, entries: list) -> list[_Chunk]:
    """The plan's params, grads and state tensors cut into chunks of ``_CHUNK`` params (their state entries with
    them), each with one ``TensorGuards`` over its params, grads and states."""
    per_param = {id(st): [] for st in plan.state_dicts}
    for st, k, v in entries:
        per_param[id(st)].append((k, v))
    grads = [p.grad for p in plan.params]
    chunks = []
    for lo in range(0, len(plan.params), _CHUNK):
        hi = min(lo + _CHUNK, len(plan.params))
        ch = _Chunk()
        ch.params = plan.params[lo:hi]
        ch.param_addrs = plan.param_addrs[lo:hi]
        ch.grad_addrs = plan.grad_addrs[lo:hi]
        ch.grad_itemsizes = plan.grad_itemsizes[lo:hi]
        ch.grad_nbytes = plan.grad_nbytes[lo:hi]
        ch.state_dicts = plan.state_dicts[lo:hi]
        ch.owners, ch.keys, ch.states = [], [], []
        for st in ch.state_dicts:
            for k, v in per_param[id(st)]:
                ch.owners.append(st)
                ch.keys.append(k)
                ch.states.append(v)
        ch.state_addrs = [t.data_ptr() for t in ch.states]
        ch.storages, ch.storage_addrs, ch.storage_needs = _held_storages([*ch.params, *ch.states])
        meta = _MetaGuard([*ch.params, *grads[lo:hi], *ch.states])
        ch.guard = meta.guard.check if meta.guard is not None else (lambda *ts, meta=meta: meta.check(list(ts)))
        chunks.append(ch)
    return chunks


class _GroupPlan:
    """One param group's step, prepared: which params have grads, their states, and one launch per part.

    Built by a checked step (every param and state validated, states created); later steps reuse it while it still
    fits, which every step checks again before any launch (``current_grads``):

    - the group holds the same param objects (identity, not addresses) and the same settings (amsgrad, masters,
      backend), and the same params have grads;
    - the optimizer's state is the same object and has not changed since the plan was built (a counter that every
      mutation of ``optimizer.state`` or of a param's state dict moves: ``state[p] = {}``, a replaced state tensor,
      ``load_state_dict``);
    - every param has the address it had and the same type, dtype, device, sizes and strides (one C++ check of
      torch.compile's ``TensorGuards`` per chunk of ``_CHUNK`` params with their grads and states, or for the whole
      list of a DTensor plan): ``p.data = ...`` of any kind is seen;
    - every grad has the dtype, device, sizes and strides the launch was built for (the same C++ check); a grad at
      a new address (backward after ``zero_grad(set_to_none=True)``) is repointed in the launch's table;
    - every state tensor the launches read or write (moments, codes and scales, Kahan buffers, masters, step
      counts) has the address, dtype, device, sizes and strides it had (the same C++ check), and a DTensor state the
      same local shard: replacing one (``state[p]["exp_avg"] = t``) moves the counter, and one resized in place
      (``resize_``, ``set_``) or given another ``.data`` is seen here (the launch would write memory that is not the
      tensor's any more);
    - every param, grad and state tensor lies inside its storage, read at every step: a storage freed or shrunk in
      place (``untyped_storage().resize_()``) keeps the tensor's sizes, and can come back smaller at the same address.

    Anything else sends the group through the checked step again, which raises a clear error or builds a new plan.
    The plan keeps no grad alive.
    """

    def __init__(self, opt: FusedOptimizer, group: dict[str, Any], params: list[Tensor],
                 states: list[dict[str, Tensor]], state: Any) -> None:  # fmt: skip
        all_params = group["params"]
        self.params_list = getattr(group, "source", all_params)  # (the group's own params object: see _StepGroup)
        self.all_params = list(all_params)  # (identities; the optimizer holds these params anyway)
        self.n_all = len(all_params)
        self.structure = opt._plan_structure(group)
        self.state = state
        self.state_version: int | None = None  # set by the step once every group's states exist
        # A param state that does not count its mutations (a plain dict put there by hand) cannot be watched:
        # such a group takes the checked step every time.
        self.reusable = isinstance(state, _OptimizerState) and all(state.tracked(st) for st in states)
        self.keep = None if len(params) == len(all_params) else [p.grad is not None for p in all_params]
        self.without_grads = [] if self.keep is None else [p for p in all_params if p.grad is None]
        self.params = params
        # DTensor params (FSDP2, tensor parallel): the launches run on the local shards, and every step also checks
        # the wrappers' grads' placements and reads the shards afresh (no DTensor dispatch on the way).
        self.dtensor = any(_is_dtensor(p) for p in params)
        if _INNERS and any(map(_resolved, params)):
            # (wrapper-subclass params launch on their inner tensors, read afresh by the checked step at every step:
            # ``_resolve_inners``; the DTensor path reads every param through ``_local``)
            self.dtensor, self.reusable = True, False
        self.wrapper_meta = _MetaGuard(params) if self.dtensor else None
        self.grad_specs = [_spec(p.grad) for p in params] if self.dtensor else None
        watched = {*opt._state_keys(group), "step", MASTER_KEY}
        entries = [(st, k, v) for st in states for k, v in st.items() if k in watched and isinstance(v, Tensor)]
        self.state_wrapped = [v for _, _, v in entries]
        # Where each state tensor is kept: read again at every step, as the launch must use what ``optimizer.state``
        # holds now even when it was changed behind the counter's back (``dict.update(state[p], ...)``).
        self.state_dicts = list(states)
        self.state_owners = [st for st, _, _ in entries]
        self.state_key_names = [k for _, k, _ in entries]
        self.state_tensors = [_local(t) for t in self.state_wrapped] if self.dtensor else self.state_wrapped
        self.state_addrs = [t.data_ptr() for t in self.state_tensors]
        self.state_itemsizes, self.state_nbytes = _extents(self.state_tensors)
        # (the whole-list guards serve DTensor plans; a plan of plain tensors checks by chunks, see _build_chunks)
        self.state_meta = _MetaGuard(self.state_tensors) if self.dtensor else None
        if self.dtensor:
            self.params_wrapped, params = params, [_local(p) for p in params]
            states = [{k: _local(v) if isinstance(v, Tensor) else v for k, v in st.items()} for st in states]
        # A param that is not contiguous (transposed, channels_last, a strided slice) is stepped as a contiguous copy,
        # written back after the launches; such a plan serves one step (the copy is of this step's values).
        self.write_back = [(p, p.contiguous()) for p in params if not p.is_contiguous()]
        if self.write_back:
            self.reusable = False
            copies = {id(p): c for p, c in self.write_back}
            params = [copies.get(id(p), p) for p in params]
        self.local_params = params
        self.param_addrs = [p.data_ptr() for p in params]
        self.param_itemsizes, self.param_nbytes = _extents(params)
        self.param_meta = _MetaGuard(params) if self.dtensor else None
        originals = [_local(p.grad) for p in self.params]
        if not all(g.is_contiguous() for g in originals):
            self.reusable = False  # (the launch reads contiguous copies of this step's grads)
        grads = [g if g.is_contiguous() else g.contiguous() for g in originals]
        self.grad_addrs = [g.data_ptr() for g in grads]
        self.grad_meta = _MetaGuard(originals) if self.dtensor else None
        self.grad_itemsizes, self.grad_nbytes = _extents(originals)
        self.first_grads: list[Tensor] | None = grads  # for the step that builds the plan, then dropped
        # What the launches write (params, every state tensor, step counts): sorted, merged byte spans, so that grads
        # that moved are checked against them (a read grad inside written memory would race) in one vector search.
        # (a plan that serves one step, e.g. of non-contiguous grads, never repoints: no spans to build for it)
        written = chain(params, self.state_tensors) if self.reusable else ()
        # (for a few scalars: bisect)
        self.written_list = _merged_spans((t.data_ptr(), t.data_ptr() + t.nbytes) for t in written if t.numel())
        self.written_starts = torch.tensor(self.written_list[0], dtype=torch.int64)
        self.written_ends = torch.tensor(self.written_list[1], dtype=torch.int64)
        self.grad_nbytes_t = torch.tensor(self.grad_nbytes, dtype=torch.int64)
        master_on = group["master_weights"]
        keys: dict[tuple, list[int]] = {}
        wrapped = self.params
        for i, (p, s) in enumerate(zip(params, states)):
            master = master_on and MASTER_KEY in s
            key = (p.device, p.dtype, grads[i].dtype, master, opt._part_key(group, wrapped[i], s))
            keys.setdefault(key, []).append(i)
        self.parts = [
            _Part(opt, group, None if len(keys) == 1 else idx, [params[i] for i in idx], [grads[i] for i in idx],
                  [states[i] for i in idx], key[3], key[4])
            for key, idx in keys.items()
        ]  # fmt: skip
        # The params as the user writes them (a DTensor's local shard, the param itself where the launch steps a
        # contiguous copy), paired with their fp32 masters: see FusedOptimizer._refresh_masters.
        visible = [_local(p) for p in self.params] if self.dtensor else self.params
        self.master_pairs = [(visible if part.idx is None else [visible[i] for i in part.idx], part.masters)
                             for part in self.parts if part.masters]  # fmt: skip
        self.master_parts = [part for part in self.parts if part.masters]
        self.master_index = [list(range(len(self.params))) if part.idx is None else part.idx
                             for part in self.master_parts]  # fmt: skip
        # (a DTensor's writes through the wrapper, FSDP2's load_state_dict among them, move the wrapper's version
        # but not always its local shard's: both are read)
        self.master_wrappers = [[self.params[i] for i in idx] for idx in self.master_index] if self.dtensor else None
        self.master_versions: list[list[int]] | None = None  # set once a step has written them (_mark_masters)
        self.master_addrs: list[list[int]] | None = None
        # (each such param's view as this plan launches on it, which its guards hold while it is reused: a param given
        # another view of the same memory, ``p.data = p.data.t()``, keeps its address and version but not this)
        self.master_metas = [list(map(_view_meta, visible)) for visible, _ in self.master_pairs]
        # The per-step check, by chunks of params (see current_grads): each chunk's params, grads and states are read
        # together while their TensorImpls are in the cache, rather than in one pass per kind over all 10^4 of them.
        self.chunks = _build_chunks(self, entries) if (self.reusable and not self.dtensor) else None

    def versions_now(self) -> list[list]:
        """The version counters of the params with masters, per master pair (DTensors: the wrapper's and the local
        shard's), for FusedOptimizer._refresh_masters."""
        if self.master_wrappers is None:
            return [list(map(_VERSION, visible)) for visible, _ in self.master_pairs]
        return [list(zip(map(_VERSION, wrappers), map(_VERSION, visible)))
                for wrappers, (visible, _) in zip(self.master_wrappers, self.master_pairs)]  # fmt: skip

    def current_grads(self, opt: FusedOptimizer, group: dict[str, Any], state: Any) -> list[Tensor] | None:
        """The grads of this step (of the params with grads) when the plan still fits the group, else None."""
        params = group["params"]
        if (
            not self.reusable
            or getattr(group, "source", params) is not self.params_list
            or len(params) != self.n_all
            or state is not self.state
            or state._version.n != self.state_version
            or opt._plan_structure(group) != self.structure
            or not all(map(operator.is_, params, self.all_params))
        ):
            return None
        if self.chunks is not None:
            checked = self._check_chunks(state)
            if checked is None:
                return None
            grads, addrs = checked
        else:
            # (``map`` over a getter and an unbound method: a third faster than comprehensions on 10^4 tensors; this
            # path is never traced, torch.compile takes _step_traced)
            grads = list(map(_GRAD, params))
            if self.keep is not None:
                if [g is not None for g in grads] != self.keep:
                    return None
                grads = [g for g in grads if g is not None]
            ps = self.params
            if self.dtensor:
                if not self.wrapper_meta.check(ps) or [_spec(g) for g in grads] != self.grad_specs:
                    return None
                ps = [_local(p) for p in ps]
                grads = [_local(g) for g in grads]
            # Addresses are compared as they are read (no list of 10^4 ints built and freed when nothing moved: that
            # costs more than the reads, in cache misses).
            try:
                if not all(map(operator.eq, map(_DATA_PTR, ps), self.param_addrs)) or not self.param_meta.check(ps):
                    return None  # a param moved or changed (``p.data = ...``): the checked step
                if not self.grad_meta.check(grads):
                    return None  # a grad lost or changed: the checked step raises the error, or copies it
                if not all(map(operator.is_, map(state.get, self.params), self.state_dicts)) or not all(
                    map(operator.is_, map(dict.get, self.state_owners, self.state_key_names), self.state_wrapped)
                ):
                    return None  # a state dict or state tensor replaced without the counter seeing it
                sts = self.state_tensors
                if self.dtensor and not all(map(operator.is_, map(_local, self.state_wrapped), sts)):
                    return None  # a DTensor state holds another local shard now
                if not all(map(operator.eq, map(_DATA_PTR, sts), self.state_addrs)) or not self.state_meta.check(sts):
                    return None  # a state resized in place, ``set_()`` or given another ``.data``: the checked step
                if not (_inside_storages(ps, self.param_itemsizes, self.param_nbytes)
                        and _inside_storages(grads, self.grad_itemsizes, self.grad_nbytes)
                        and _inside_storages(sts, self.state_itemsizes, self.state_nbytes)):  # fmt: skip
                    return None  # a storage freed or shrunk in place (at its address or not): the checked step refuses
                still = all(map(operator.eq, map(_DATA_PTR, grads), self.grad_addrs))
            except (AttributeError, RuntimeError, TypeError):  # a param lost its grad (rebuild), or a sparse grad
                return None
            addrs = None if still else list(map(_DATA_PTR, grads))
        if addrs is not None:
            # New grads (backward after zero_grad(set_to_none=True)), each inside its storage: none may lie inside
            # memory the launches of any group write (a param's, a state's; the groups' plans that the step reuses: a
            # group it rebuilds sends the step through _check_no_shared_memory anyway): the checked step names it
            if addrs and _inside_written(opt._plans.values(), addrs, self.grad_nbytes_t, owner=opt):
                return None
            # ... then the launches are repointed.
            for part in self.parts:
                if part.launcher is not None:
                    if part.idx is None:
                        part.launcher.set_grads(grads, addrs, checked=True)
                    else:
                        part.launcher.set_grads([grads[i] for i in part.idx], [addrs[i] for i in part.idx],
                                                checked=True)  # fmt: skip
            self.grad_addrs = addrs
            lo = 0
            for ch in self.chunks or ():
                ch.grad_addrs = addrs[lo : lo + len(ch.params)]
                lo += len(ch.params)
        return grads

    def _check_chunks(self, state: Any) -> tuple[list[Tensor], list[int] | None] | None:
        """``current_grads``'s checks of a plan of plain tensors, chunk by chunk: every param, grad, state dict and
        state tensor checked as in the whole-list passes (identity, address, type, dtype, device, requires_grad,
        sizes, strides; a moved grad's extent inside its storage), each chunk's in one go while its tensors are in
        the cache (10^4 params: a quarter to a third less host time than one pass per kind, each over tensors the
        previous pass evicted). Returns the grads and, when any moved, their addresses; None when anything changed."""
        grads: list[Tensor] = []
        moved = False
        eq, is_ = operator.eq, operator.is_
        try:
            if self.keep is not None and not all(map(is_, map(_GRAD, self.without_grads), repeat(None))):
                return None  # a param without a grad at plan time has one now (one that lost it fails the guard)
            for ch in self.chunks:
                ps, sts = ch.params, ch.states
                gs = list(map(_GRAD, ps))
                if not (ch.guard(*ps, *gs, *sts)
                        and all(map(eq, map(_DATA_PTR, ps), ch.param_addrs))
                        and all(map(is_, map(state.get, ps), ch.state_dicts))
                        and all(map(is_, map(dict.get, ch.owners, ch.keys), sts))
                        and all(map(eq, map(_DATA_PTR, sts), ch.state_addrs))
                        and _storages_hold(ch.storages, ch.storage_addrs, ch.storage_needs)
                        and _inside_storages(gs, ch.grad_itemsizes, ch.grad_nbytes)):  # fmt: skip
                    return None  # (a storage freed or shrunk in place, even at its old address: the checked step)
                if not all(map(eq, map(_DATA_PTR, gs), ch.grad_addrs)):
                    moved = True
                grads += gs
        except (AttributeError, RuntimeError, TypeError):  # a param lost its grad, or a sparse grad
            return None
        return grads, (list(map(_DATA_PTR, grads)) if moved else None)

    def run(self, opt: FusedOptimizer, group: dict[str, Any], grads: list[Tensor], values: tuple, *,
            grad_scale: Tensor | float | None, found_inf: Tensor | None) -> None:  # fmt: skip
        """One launch per part. ``values``: what the optimizer's ``_check_step_values`` returned for the group."""
        for call in self.prepare(opt, group, grads, values, grad_scale=grad_scale, found_inf=found_inf):
            call()
        self.finish()

    def prepare(self, opt: FusedOptimizer, group: dict[str, Any], grads: list[Tensor], values: tuple, *,
                grad_scale: Tensor | float | None, found_inf: Tensor | None,
                lr: Any = None) -> list[Callable[[], None]]:  # fmt: skip
        """What the step allocates for this group (each part's scalars on its device; the reference path's new
        values, see :meth:`FusedOptimizer._prepare_reference`), nothing written: returns one call per part that
        writes (a launch, or the reference path's copies), then :meth:`finish`. ``lr``: the group's lr as the step
        checked it (None: ``group["lr"]``)."""
        calls = []
        lr = group["lr"] if lr is None else lr
        if not isinstance(lr, Tensor):
            lr = float(lr)  # (checked a real number: numpy's float32 from a scheduler's lambda is one)
        for part in self.parts:
            device = part.device
            part_lr = lr
            if isinstance(lr, Tensor) and lr.device != device:
                if lr.device.type == "cpu" and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise ValueError(
                        "a CPU tensor lr of CUDA params is read on the host when a CUDA graph is captured, so every "
                        "replay would keep that value (a scheduler's later ones unseen): give lr as a CUDA tensor "
                        "on the params' device, which the kernel reads at every replay"
                    )
                part_lr = _to_float(lr) if lr.device.type == "cpu" else lr.to(device)
            if isinstance(grad_scale, float):
                scale = torch.full((1,), grad_scale, dtype=torch.float32, device=device)
            else:
                scale = None if grad_scale is None else grad_scale.to(device)
            inf = None if found_inf is None else found_inf.to(device)
            if part.launcher is not None:
                calls.append(partial(_launch_part, opt, part, group, part_lr, values, scale, inf))
            else:  # (bumps the params' versions itself)
                g = grads if part.idx is None else [grads[i] for i in part.idx]
                calls.append(opt._prepare_reference(part, g, group, part_lr, values, scale, inf))
        return calls

    def finish(self) -> None:
        """After the parts' writes: the staged copies of params that are not contiguous copied back."""
        for p, copy in self.write_back:
            p.copy_(copy)
        if self.dtensor:
            _ops.bump_versions(self.params_wrapped)  # (the shards' versions moved above; the wrappers have their own)


def _launch_part(opt: FusedOptimizer, part: _Part, group: dict[str, Any], lr: Any, values: tuple,
                 grad_scale: Tensor | None, found_inf: Tensor | None) -> None:  # fmt: skip
    opt._launch(part, group, lr, values, grad_scale, found_inf)
    _ops.bump_versions(part.params)


def _stored(store: Callable[[], None], params: list[Tensor]) -> None:
    """The write phase of a reference part (see :meth:`FusedOptimizer._prepare_reference`): its prepared values
    stored, then the params' versions bumped (torch's fused CPU kernels bump none)."""
    store()
    _ops.bump_versions(params)
