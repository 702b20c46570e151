"""Helpers the cases files share: builders for optimizer steps (fused_ops and torch.optim's three
implementations), the bytes of an optimizer step read from the states it created (param by param), a runner for
one op call, and the one-rank process group of the distributed cases."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._registry import BYTES_PER_ELEMENT, DTYPES, Builder, Runner, Skip, dtype_name, state_tensors
from ..params import numel, params_with_grads

TORCH_VARIANTS = ("forloop", "foreach", "fused")


def torch_variant_kwargs(variant: str) -> dict[str, bool]:
    """The torch.optim keyword that picks an implementation: ``forloop``, ``foreach`` or ``fused``."""
    return {"fused": True} if variant == "fused" else {"foreach": variant == "foreach"}


# State keys that are not per-element states though a tensor under them may have the param's shape (a 1-element
# param's block scale, a 0-d param's step): step counts, 8-bit block scales (fused_ops' ``*_scale``, bitsandbytes'
# ``absmax*``) and code books (bitsandbytes' ``qmap*``). torchao's quantised states are tensor subclasses: their
# inner codes have the param's shape, their scales and code book do not.
_NOT_PER_ELEMENT = ("step", "scale", "absmax", "qmap")


def per_element_states(opt: Any, p: Tensor) -> list[tuple[str, Tensor]]:
    """``(key, tensor)`` of each state of ``p`` that holds one value per element of ``p`` (moments, momentum
    buffers, 8-bit codes, Kahan buffers; tensor subclasses unwrapped to their inner tensors)."""
    state = getattr(opt, "state", {}).get(p) or {}
    return [
        (str(k), t)
        for k, v in state.items()
        if not any(word in str(k) for word in _NOT_PER_ELEMENT)
        for t in state_tensors(v)
        if t.shape == p.shape
    ]


def layout_label(elements: Mapping[str, int]) -> str:
    """The layout of a step whose params have the layouts ``{layout: elements}``: the one layout, or each with its
    share of the elements, largest first (``fp32/int8-states 98% + fp32 2%``)."""
    if len(elements) == 1:
        return next(iter(elements))
    n = sum(elements.values())

    def share(k: int) -> str:
        pct = 100 * k / n
        return "<1%" if pct < 0.5 else ">99%" if pct > 99.5 else f"{pct:.0f}%"

    return " + ".join(f"{layout} {share(k)}" for layout, k in sorted(elements.items(), key=lambda e: (-e[1], e[0])))


def step_bytes(params: Sequence[Tensor], layout_of: Callable[[Tensor], tuple[str, float]]) -> tuple[str, int]:
    """(layout, bytes) of one step, counted tensor by tensor: ``layout_of(p)`` gives a param's layout and bytes per
    element, and each param counts at its own. An optimizer may keep different states for different params
    (bitsandbytes and torchao quantise only tensors of at least 4,096 elements): the largest param's layout times
    every element would undercount the small tensors' full-precision states. The layout is ``layout_label``'s."""
    elements: dict[str, int] = {}
    total = 0.0
    for p in params:
        if p.numel() == 0:
            continue
        layout, bpe = layout_of(p)
        elements[layout] = elements.get(layout, 0) + p.numel()
        total += bpe * p.numel()
    return (layout_label(elements) if elements else "empty"), round(total)


def param_layout(op: str, opt: Any, p: Tensor, n_states: int = 2) -> tuple[str, float]:
    """(layout, bytes per element) of one param's step, from the dtypes of the per-element states it created.

    ``n_states`` is how many per-element states the op's optimizer keeps (Adam: m and v). Layout ``fp32`` when the
    param and its ``n_states`` states are fp32, ``<param>/<state>-states`` when the states share a dtype; the bytes
    are the op's ``BYTES_PER_ELEMENT`` entry for that layout, else the same rule generalised: read + write p and
    every per-element state, read g.
    """
    states = [t for _, t in per_element_states(opt, p)]
    pname = dtype_name(p.dtype) if p.dtype in DTYPES.values() else str(p.dtype)
    if p.dtype == torch.float32 and all(t.dtype == torch.float32 for t in states) and len(states) == n_states:
        layout = "fp32"
    elif len(states) == n_states and len({t.dtype for t in states}) == 1 and states[0].dtype in DTYPES.values():
        layout = f"{pname}/{dtype_name(states[0].dtype)}-states"
    else:
        layout = f"{pname}/{'+'.join(str(t.dtype).replace('torch.', '') for t in states) or 'no'}-states"
    generic = 2 * p.element_size() + p.grad.element_size() + 2 * sum(t.element_size() for t in states)
    return layout, BYTES_PER_ELEMENT.get((op, layout), generic)


def optimizer_layout(op: str, opt: Any, params: Sequence[Tensor], n_states: int = 2) -> tuple[str, int]:
    """(layout, bytes one step moves) of an optimizer step, param by param (``param_layout``, ``step_bytes``)."""
    return step_bytes(params, lambda p: param_layout(op, opt, p, n_states))


def optimizer_builder(op: str, factory: Callable[[list[torch.nn.Parameter]], Any], n_states: int = 2) -> Builder:
    """A builder that times ``factory(params).step()`` on fresh params with grads (state created, not timed)."""

    def build(shapes, dtype, device) -> Runner:
        params = params_with_grads(shapes, dtype, device)
        opt = factory(params)
        opt.step()  # creates the state (not timed); its dtypes give the bytes moved
        layout, nbytes = optimizer_layout(op, opt, params, n_states)
        return Runner(fn=opt.step, reset=None, bytes=nbytes, layout=layout)

    return build


def torch_optimizer_builders(op: str, cls: type, n_states: int = 2, **kwargs: Any) -> dict[str, Builder]:
    """``torch-forloop``, ``torch-foreach`` and ``torch-fused`` builders of a torch.optim class."""
    return {
        f"torch-{v}": optimizer_builder(op, lambda ps, v=v: cls(ps, **kwargs, **torch_variant_kwargs(v)), n_states)
        for v in TORCH_VARIANTS
    }


def simple_runner(op: str, dtype: torch.dtype, shapes, fn: Callable[[], Any], reset=None) -> Runner:
    """A runner for one op call whose bytes are the op's ``BYTES_PER_ELEMENT`` entry for ``dtype``."""
    layout = dtype_name(dtype)
    return Runner(fn=fn, reset=reset, bytes=BYTES_PER_ELEMENT[(op, layout)] * numel(shapes), layout=layout)


_PG_STATE: dict[str, Any] = {"created": False}


def one_rank_group(device: torch.device) -> Any:
    """The default process group, initialised here with one rank (in-process store) when there is none."""
    import torch.distributed as dist

    if not dist.is_available():
        raise Skip("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _PG_STATE["created"] = True
    return dist.group.WORLD


def release_process_group() -> None:
    """Destroy the one-rank process group if this module created it."""
    if _PG_STATE["created"]:
        import torch.distributed as dist

        dist.destroy_process_group()
        _PG_STATE["created"] = False
