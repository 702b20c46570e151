"""The public functional API: multi-tensor ops over lists of tensors.

Each function checks its arguments, groups tensors by (device, dtype) and calls one custom op per group
(``fused_ops._ops``), which runs the Triton kernel (one launch per group) or the plain-torch path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor

from . import _ops
from ._backend import resolve_backend


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None = None,
    state_steps: Sequence[Tensor] | None = None,
    *,
    lr: float | Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    step: float | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] | None = None,
    backend: str | None = None,
) -> None:
    """Apply one Adam (``decoupled_weight_decay=False``) or AdamW step to every tensor, in place.

    Args:
        params: fp32, bf16 or fp16 tensors, contiguous. Updated in place.
        grads: one per param, same dtype and shape.
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs: fp32 states, one per param (``max_exp_avg_sqs`` only with
            ``amsgrad``). Updated in place.
        state_steps: fp32 0-d step counts, one per param, on the params' device; incremented here (as in
            torch.optim). Leave out and pass ``step`` to use one step number (>= 1) for every tensor.
        lr: float, or a 1-element tensor on the params' device (no recompilation, no host sync).
        grad_scale: optional 1-element tensor; grads are divided by it inside the kernel.
        found_inf: optional 1-element tensor; when non-zero the step is a no-op on the device: params,
            states and step counts are unchanged (no host sync).
        master_params: optional fp32 master weights, one per (bf16/fp16) param: the update runs on them in
            fp32 and the params receive the result rounded to nearest even, in the same single pass.
        backend: "auto" (Triton on CUDA, plain torch on CPU), "triton" or "reference"; default from
            ``FUSED_OPS_BACKEND``.

    One kernel launch per (device, dtype) group on the Triton backend, whatever the number of tensors.
    """
    n = len(params)
    max_exp_avg_sqs = list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else []
    state_steps = list(state_steps) if state_steps is not None else []
    master_params = list(master_params) if master_params is not None else []
    if master_params and len(master_params) != n:
        raise ValueError(f"adam_: master_params has {len(master_params)} tensors but params has {n}")
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        if len(lst) != n:
            raise ValueError(f"adam_: {name} has {len(lst)} tensors but params has {n}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(f"adam_: amsgrad needs one max_exp_avg_sqs tensor per param, got {len(max_exp_avg_sqs)}")
    if state_steps and len(state_steps) != n:
        raise ValueError(f"adam_: state_steps has {len(state_steps)} tensors but params has {n}")
    if not state_steps and step is None:
        raise ValueError("adam_: pass state_steps (step counts) or step (a step number >= 1)")
    if step is not None and not (math.isfinite(step) and step >= 1):
        raise ValueError(f"adam_: step must be a finite number >= 1, got {step}")
    for name, value in (("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay)):
        _check_finite(name, value)
    lr_tensor = lr if isinstance(lr, Tensor) else None
    if lr_tensor is None:
        _check_finite("lr", lr)
    if n == 0:
        return

    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    for (device, _), idx in groups.items():
        backend_name = resolve_backend(backend, device)
        pick = (lambda lst: [lst[i] for i in idx]) if len(groups) > 1 else list
        _ops.adam_(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
            pick(max_exp_avg_sqs) if amsgrad else [], pick(master_params) if master_params else [],
            pick(state_steps) if state_steps else [],
            0.0 if lr_tensor is not None else float(lr), lr_tensor, float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(amsgrad), bool(maximize), bool(decoupled_weight_decay),
            None if step is None else float(step), grad_scale, found_inf, backend_name,
        )  # fmt: skip
