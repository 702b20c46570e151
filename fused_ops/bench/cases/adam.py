"""AdamW: ``adam`` (FusedAdamW against torch.optim.AdamW's three implementations and the installed peers) and
``adamw_master`` (master-weight AdamW on bf16 params against the unfused torch sequence)."""

from __future__ import annotations

import inspect

import torch

import fused_ops

from .._registry import (
    BYTES_PER_ELEMENT,
    LR,
    WEIGHT_DECAY,
    Builder,
    Runner,
    dtype_name,
    has,
    register_op,
    state_bytes_per_param,
)
from ..params import numel, params_with_grads
from ._common import TORCH_VARIANTS, optimizer_builder, torch_optimizer_builders, torch_variant_kwargs

ADAM_BYTES = {
    # AdamW, fp32 params and states: read p, g, m, v (4 x 4 B); write p, m, v (3 x 4 B).
    "fp32": 28,
    # bf16 params, fp32 states (fused_ops): read p, g (2 + 2 B), m, v (4 + 4 B); write p (2 B), m, v (4 + 4 B).
    "bf16/fp32-states": 22,
    # bf16 params, bf16 states (torch.optim keeps the states in the param's dtype): read 4 x 2 B; write 3 x 2 B.
    "bf16/bf16-states": 14,
    "fp16/fp32-states": 22,
    "fp16/fp16-states": 14,
    # amsgrad adds max_exp_avg_sq, read and written: + 8 B with fp32 states (not in the default cases).
    "amsgrad-extra/fp32-states": 8,
}

MASTER_BYTES = {
    # Master-weight AdamW in one pass: read g bf16 (2 B), master, m, v fp32 (12 B); write master, m, v (12 B) and
    # the bf16 param (2 B). The bf16 param is never read.
    "bf16": 28,
    # The same step unfused in torch, counted by the same rule: the op's minimum, 28 B, so that GB/s and % of copy
    # compare the same work (effective bandwidth) and the speed-up is the ratio of GB/s. Its own traffic is 40 B:
    # master.grad = g.float() (read 2, write 4 B), fp32 AdamW on the master weights (28 B), p.copy_(master) (read
    # 4, write 2 B).
    "bf16/unfused": 28,
}


@register_op("adam", "fused_ops.FusedAdamW", has("FusedAdamW"), peers=True, bytes_per_element=ADAM_BYTES)
def _adam_providers() -> dict[str, Builder]:
    """AdamW step (lr 1e-3, weight decay 1e-2) against torch.optim.AdamW's three implementations."""
    return {
        "fused_ops": optimizer_builder("adam", lambda ps: fused_ops.FusedAdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY)),
        **torch_optimizer_builders("adam", torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY),
    }


def _master_weights_supported() -> bool:
    return "master_weights" in inspect.signature(fused_ops.FusedAdamW.__init__).parameters


def _torch_master_builder(variant: str) -> Builder:
    """The unfused torch master-weight sequence: grads to fp32, fp32 AdamW on master copies, copy back to bf16."""

    def build(shapes, dtype, device) -> Runner:
        params = params_with_grads(shapes, dtype, device)
        masters = [torch.nn.Parameter(p.detach().float()) for p in params]
        for m in masters:
            m.grad = torch.empty_like(m)
        opt = torch.optim.AdamW(masters, lr=LR, weight_decay=WEIGHT_DECAY, **torch_variant_kwargs(variant))
        grads = [p.grad for p in params]
        mgrads = [m.grad for m in masters]
        pdata = [p.detach() for p in params]
        mdata = [m.detach() for m in masters]

        if variant == "forloop":

            def step() -> None:
                for mg, g in zip(mgrads, grads, strict=True):
                    mg.copy_(g)
                opt.step()
                for p, m in zip(pdata, mdata, strict=True):
                    p.copy_(m)
        else:

            def step() -> None:
                torch._foreach_copy_(mgrads, grads)
                opt.step()
                torch._foreach_copy_(pdata, mdata)

        step()
        layout = "bf16/unfused"
        # What it holds beyond the bf16 params and grads (fn is a closure, so the Runner cannot measure it): the
        # fp32 masters and their fp32 grads, plus AdamW's states (moments, steps). Ours holds master + moments.
        held = sum(m.nbytes + m.grad.nbytes for m in masters) / numel(shapes) + (state_bytes_per_param(opt) or 0.0)
        return Runner(fn=step, reset=None, bytes=BYTES_PER_ELEMENT[("adamw_master", layout)] * numel(shapes),
                      layout=layout, state_bytes_per_param=held)  # fmt: skip

    return build


@register_op("adamw_master", "fused_ops.FusedAdamW(master_weights=True)", _master_weights_supported,
             dtypes=("bf16",), bytes_per_element=MASTER_BYTES)  # fmt: skip
def _master_providers() -> dict[str, Builder]:
    """Master-weight AdamW on bf16 params (fp32 master, m, v) against the unfused torch sequence."""

    def fused(shapes, dtype, device) -> Runner:
        params = params_with_grads(shapes, dtype, device)
        opt = fused_ops.FusedAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, master_weights=True)
        opt.step()
        layout = dtype_name(dtype)
        return Runner(fn=opt.step, reset=None, bytes=BYTES_PER_ELEMENT[("adamw_master", layout)] * numel(shapes),
                      layout=layout)  # fmt: skip

    return {"fused_ops": fused, **{f"torch-{v}": _torch_master_builder(v) for v in TORCH_VARIANTS}}
