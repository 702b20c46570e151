"""Helpers of the optimizer cases beyond Adam (``sgd``, ``lion``, ``adamw8bit``, ``adamw_bf16_sr``): a step builder
whose layout names low-bit and Kahan states too, and providers from other libraries (bitsandbytes, torchao, optimi)
detected at run time, never installed, and benchmarked on CUDA only, as the Adam peers of ``bench/peers.py``."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._registry import BYTES_PER_ELEMENT, DTYPES, Builder, Runner, Skip, dtype_name, peers_run_on, state_tensors
from ..params import params_with_grads
from ._common import per_element_states, step_bytes

Factory = Callable[[list[torch.nn.Parameter]], Any]


def param_state_layout(opt: Any, p: Tensor) -> str:
    """The layout of one param's step, from its per-element states (tensor subclasses unwrapped).

    ``fp32`` (fp32 param and states), ``<param>/<state>-states`` with ``int8`` for 8-bit codes (uint8 or int8; their
    block scales are part of the layout's bytes), ``+kahan`` when a Kahan compensation buffer is kept (optimi).
    """
    state = getattr(opt, "state", {}).get(p) or {}
    kahan = any("kahan" in str(k) and any(True for _ in state_tensors(v)) for k, v in state.items())  # optimi: None
    kinds = {
        "int8" if t.dtype in (torch.uint8, torch.int8) else dtype_name(t.dtype) if t.dtype in DTYPES.values()
        else str(t.dtype).replace("torch.", "")
        for k, t in per_element_states(opt, p) if "kahan" not in k
    }  # fmt: skip
    pname = dtype_name(p.dtype)
    if kinds == {"fp32"} and pname == "fp32" and not kahan:
        return "fp32"
    return f"{pname}/{'+'.join(sorted(kinds)) or 'no'}-states" + ("+kahan" if kahan else "")


def step_builder(op: str, factory: Factory) -> Builder:
    """A builder that times ``factory(params).step()`` on fresh params with grads (state created by one untimed
    step). Bytes, param by param (``step_bytes``: a peer that quantises only its large tensors has two layouts): the
    op's ``BYTES_PER_ELEMENT`` entry for the param's layout, else read + write p and each per-element state, read g;
    the state bytes per param are measured from the optimizer's state (``Runner``)."""

    def build(shapes, dtype, device) -> Runner:
        params = params_with_grads(shapes, dtype, device)
        opt = factory(params)
        opt.step()

        def layout_of(p: Tensor) -> tuple[str, float]:
            layout = param_state_layout(opt, p)
            per_element = [t for _, t in per_element_states(opt, p)]
            generic = 2 * p.element_size() + p.grad.element_size() + 2 * sum(t.element_size() for t in per_element)
            return layout, BYTES_PER_ELEMENT.get((op, layout), generic)

        layout, nbytes = step_bytes(params, layout_of)
        return Runner(fn=opt.step, reset=None, bytes=nbytes, layout=layout)

    return build


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def peer_step_builder(op: str, module: str, factory: Factory) -> Builder:
    """``step_builder`` of another library's optimizer: a ``Skip`` when ``module`` is missing or off CUDA."""
    inner = step_builder(op, factory)

    def build(shapes, dtype, device) -> Runner:
        if not installed(module):
            raise Skip(f"{module} is not installed")
        if not peers_run_on(device.type):
            raise Skip(f"{module} is installed; peers are benchmarked on CUDA only")
        return inner(shapes, dtype, device)

    build.peer_module = module  # (the suite runs peers after every op's own cases: see suite._run)
    return build


def torch_step_builder(op: str, cls: type, variant: str, **kwargs: Any) -> Builder:
    """``step_builder`` of a torch.optim class with ``foreach=False``/``True`` or ``fused=True`` (``variant``:
    forloop, foreach, fused); a ``Skip`` when this torch refuses the variant (no fused kernel for the device)."""
    flag = {"fused": True} if variant == "fused" else {"foreach": variant == "foreach"}

    def factory(params):
        try:
            return cls(params, **kwargs, **flag)
        except (RuntimeError, TypeError, ValueError) as e:  # e.g. fused=True on a device torch has no kernel for
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise Skip(f"torch.optim.{cls.__name__} has no {variant} path here: {why}") from e

    return step_builder(op, factory)
