"""The registry every benchmark case goes through: :class:`Op`, :class:`Runner`, :class:`Skip`, ``register_op``
and the bytes table (``BYTES_PER_ELEMENT``) that each op fills in when it registers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import fused_ops

PROVIDERS = ("fused_ops", "torch-forloop", "torch-foreach", "torch-fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPES = ("fp32", "bf16")
LR, WEIGHT_DECAY = 1e-3, 1e-2

# Bytes each op moves per element (per parameter), counted from its definition: every tensor it must read, once,
# plus every tensor it must write, once. GB/s = these bytes x elements / median time, so it compares directly
# with the copy bandwidth, which counts bytes read + written the same way. Keys: (op, layout). Each op adds its own
# entries, with the count explained, through ``register_op(..., bytes_per_element=...)`` in its cases file.
BYTES_PER_ELEMENT: dict[tuple[str, str], float] = {}  # int, except block scales (8-bit states: + 16/256 B)


# Peers (other libraries' optimizers) are timed on CUDA only: their CPU figures compare nothing. ``--peers-on-cpu``
# (``BenchConfig.peers_on_cpu``) runs them on CPU too, while ``run`` lasts: a dry run of their providers (factories,
# layouts, state bytes) on a machine without a GPU, before a GPU run depends on them.
_PEERS_ON_CPU = [False]


def peers_run_on(device_kind: str) -> bool:
    """Whether installed peers are benchmarked on a device of this kind (CUDA; CPU too under ``--peers-on-cpu``)."""
    return device_kind == "cuda" or _PEERS_ON_CPU[0]


class Skip(Exception):
    """A provider or case that cannot run here; the message says why (it lands in the JSON's ``skipped``)."""


@dataclasses.dataclass
class Runner:
    """One provider's prepared call.

    Attributes:
        fn: the call that is timed (one optimizer step, one op call).
        reset: restores in-place inputs; run before each timed call, outside the timed region. None when no
            input drifts in a way that changes the timing.
        bytes: bytes one call moves, counted from the op's definition (``BYTES_PER_ELEMENT``), tensor by tensor:
            each param at the bytes of its own layout.
        layout: the ``BYTES_PER_ELEMENT`` key used (e.g. ``bf16/fp32-states``); when the params have different
            layouts (the 8-bit peers keep full-precision states for small tensors), each with its share of the
            elements, largest first (``fp32/int8-states 98% + fp32 2%``).
        state_bytes_per_param: bytes of the optimizer's own state tensors per parameter (``state_bytes_per_param``);
            None for an op that is not an optimizer step. Left None, it is measured here when ``fn`` is the bound
            ``step`` of an optimizer (``Runner(fn=opt.step, ...)``, after the step that created the state); a
            builder whose optimizer keeps its states outside ``opt.state`` (ZeRO), or whose ``fn`` is a closure,
            passes it.
    """

    fn: Callable[[], Any]
    reset: Callable[[], None] | None
    bytes: int
    layout: str
    state_bytes_per_param: float | None = None

    def __post_init__(self) -> None:
        opt = getattr(self.fn, "__self__", None)
        if self.state_bytes_per_param is None and isinstance(getattr(opt, "state", None), Mapping):
            self.state_bytes_per_param = state_bytes_per_param(opt)


Builder = Callable[[list[tuple[int, ...]], torch.dtype, torch.device], Runner]


@dataclasses.dataclass
class Op:
    """A registered benchmark case: an op of fused_ops and its providers."""

    name: str
    requires: str  # what must exist in fused_ops for the case to run, for the skip note
    available: Callable[[], bool]
    dtypes: tuple[str, ...]
    providers: dict[str, Builder]
    peers: bool = False  # the Adam peers (torchao, bitsandbytes, apex, DeepSpeed) are providers too
    # In a CPU run without --ops: False for ops whose CPU path is a slow oracle (seconds per step on the quick sets)
    cpu_default: bool = True

    def unavailable(self) -> str | None:
        """None when the op exists in this fused_ops, else the note for ``skipped``."""
        try:
            ok = self.available()
        except Exception as e:  # an op half-written by someone else must not break the suite
            return f"{self.requires} failed to load: {type(e).__name__}: {e}"
        return None if ok else f"{self.requires} is not in this version of fused_ops"


OPS: dict[str, Op] = {}


def register_op(
    name: str,
    requires: str,
    available: Callable[[], bool],
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    peers: bool = False,
    bytes_per_element: Mapping[str, float] | None = None,
    cpu_default: bool = True,
) -> Callable[[Callable[[], dict[str, Builder]]], Callable[[], dict[str, Builder]]]:
    """Register an op: the decorated function returns its ``{provider: builder}`` table.

    ``bytes_per_element`` maps each layout of the op (``fp32``, ``bf16/fp32-states``, ...) to the bytes one element
    moves; it lands in ``BYTES_PER_ELEMENT`` under ``(name, layout)``. Registering a name twice is an error: two
    cases files would otherwise silently replace each other. ``cpu_default=False``: a CPU run runs the op only when
    ``--ops`` names it (its CPU path is a plain-torch oracle, not a fast path).
    """

    def deco(make: Callable[[], dict[str, Builder]]) -> Callable[[], dict[str, Builder]]:
        if name in OPS:
            raise ValueError(f"bench op {name!r} is registered twice")
        OPS[name] = Op(name, requires, available, tuple(dtypes), make(), peers, cpu_default)
        for layout, nbytes in (bytes_per_element or {}).items():
            BYTES_PER_ELEMENT[(name, layout)] = nbytes
        return make

    return deco


def has(name: str) -> Callable[[], bool]:
    """The ``available`` check of an op that is a top-level name of fused_ops (``has("FusedAdamW")``)."""
    return lambda: hasattr(fused_ops, name)


def state_tensors(value: Any) -> Iterator[torch.Tensor]:
    """The plain tensors in a state value: tensors, tensor subclasses (their inner tensors: torchao's quantised
    states, DTensors' local shards) and dicts/lists/tuples of them."""
    if isinstance(value, torch.Tensor):
        if is_traceable_wrapper_subclass(value):
            for attr in value.__tensor_flatten__()[0]:
                yield from state_tensors(getattr(value, attr))
        else:
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from state_tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from state_tensors(v)


def state_bytes_per_param(opt: Any) -> float | None:
    """Bytes of every tensor in ``opt.state`` (per-element states, block scales, step counts, master copies; a
    tensor that several params share, like bitsandbytes' quantisation maps, once) over the optimizer's params.

    Measured, not counted from a definition: fp32 AdamW holds 8 B per param plus a 4 B step per tensor; 8-bit
    states 2 B of codes plus 2 x 4 B of scales per 256 elements (and per started block of a small tensor).
    None (shown as n/a) when ``opt.state`` holds no tensor at all or there are no params: an optimizer that keeps
    its states elsewhere (ZeroAdamW's flat shards, the inner optimizer of torch's ZeroRedundancyOptimizer) is not
    measured here, and must not read as holding nothing; its builder passes the figure itself.
    """
    seen: set[tuple[int, int, torch.dtype, torch.device]] = set()
    total = 0
    for t in state_tensors(list(opt.state.values())):
        key = (t.data_ptr(), t.nbytes, t.dtype, t.device)
        if t.nbytes and key not in seen:
            seen.add(key)
            total += t.nbytes
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return total / n if n and seen else None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bf16`` (the names of ``DTYPES``)."""
    return next(k for k, v in DTYPES.items() if v == dtype)
