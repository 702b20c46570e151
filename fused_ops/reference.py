"""Plain-torch implementations of every fused_ops op: the test oracle and the CPU code path.

Everything here runs on any device and any floating dtype, float64 included (tests compute the oracle
in float64). Nothing here imports triton.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    step: float | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """One Adam / AdamW step in plain torch, with torch.optim.adam's order of operations.

    Same contract as the fused op: ``state_steps`` are incremented here (unless ``found_inf`` is set, in
    which case nothing at all changes), or, when it is empty, ``step`` is the step number to use.
    ``grad_scale`` divides the grads (the grads themselves are not modified). Low-precision params are
    updated in the dtype of the states (fp32 in fused_ops) and rounded to nearest even on store; when
    every tensor is float64 the whole computation is float64 (the test oracle). With ``master_params``
    the update runs on those (fp32) and ``params`` receive the rounded result.

    This reads ``found_inf``, ``lr`` and step counts on the host: cheap on CPU; on a GPU it syncs, which is
    why the GPU path is the Triton kernel.
    """
    if len(params) == 0:
        return
    if found_inf is not None and _scalar(found_inf) != 0:
        return
    lr = _scalar(lr)
    if state_steps:
        torch._foreach_add_(list(state_steps), 1)
        steps = [_scalar(s) for s in state_steps]
    else:
        steps = [float(step)] * len(params)

    compute_dtype = exp_avgs[0].dtype
    if master_params:
        params_c = list(master_params)
    else:
        params_c = [p if p.dtype == compute_dtype else p.to(compute_dtype) for p in params]
    g = [x if x.dtype == compute_dtype else x.to(compute_dtype) for x in grads]
    if grad_scale is not None:
        g = torch._foreach_div(g, _scalar(grad_scale))
    if maximize:
        g = torch._foreach_neg(g)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params_c, 1 - lr * weight_decay)
        else:
            g = torch._foreach_add(g, params_c, alpha=weight_decay)
    torch._foreach_lerp_(list(exp_avgs), g, 1 - beta1)
    torch._foreach_mul_(list(exp_avg_sqs), beta2)
    torch._foreach_addcmul_(list(exp_avg_sqs), g, g, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(list(max_exp_avg_sqs), exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params_c, exp_avgs, denom, [-lr / (1 - beta1**s) for s in steps])
    for p, pc in zip(params, params_c):
        if p is not pc:
            p.copy_(pc)


def adam_cpu_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    step: float | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """The CPU path of the Adam op: :func:`adam_`'s contract, as fast as torch allows on CPU.

    fp32 params with fp32 states and per-tensor step counts go through torch's one-pass vectorised CPU
    kernel (``torch._fused_adam(w)_``, the kernel behind ``torch.optim.AdamW(fused=True)`` on CPU);
    everything else (low-precision params with fp32 states, a float step, grad scaling) goes through
    :func:`adam_`.
    """
    if len(params) == 0:
        return
    fast = (
        grad_scale is None
        and not master_params
        and bool(state_steps)
        and params[0].dtype == torch.float32
        and all(p.device.type == "cpu" for p in params[:1])
    )
    if not fast:
        adam_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            decoupled=decoupled, step=step, grad_scale=grad_scale, found_inf=found_inf, master_params=master_params,
        )  # fmt: skip
        return
    if found_inf is not None and _scalar(found_inf) != 0:
        return
    torch._foreach_add_(list(state_steps), 1)
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fused(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs) if amsgrad else [],
        list(state_steps), lr=_scalar(lr), beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
        amsgrad=amsgrad, maximize=maximize,
    )  # fmt: skip
