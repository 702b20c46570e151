"""torch.library custom ops: one registration per op.

The default implementation is the CPU path (``reference``); the ``cuda`` kernel is the Triton launcher.
A resolved ``backend`` string ("triton" or "reference") travels with each call, so ``backend="reference"``
works on CUDA tensors and ``backend="triton"`` on CPU tensors under the Triton interpreter, through the same
op that ``torch.compile`` sees. ``register_fake`` makes every op traceable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference

# Tables of the Triton launches, keyed by tensor addresses. Owned here (module lifetime), so the table a
# captured CUDA graph reads is never freed under it. Bounded: stale layouts are dropped oldest first.
_TABLE_CACHE: dict = {}
_TABLE_CACHE_LIMIT = 256


def _table_cache() -> dict:
    if len(_TABLE_CACHE) > _TABLE_CACHE_LIMIT:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    return _TABLE_CACHE


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
    kwargs = _adam_kwargs(lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step,
                          grad_scale, found_inf, master_params)  # fmt: skip
    if backend == "triton":
        _adam_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)
    else:
        reference.adam_cpu_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)


@adam_.register_kernel("cuda")
def _adam_cuda(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr, lr_tensor,
               beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step, grad_scale, found_inf,
               backend) -> None:  # fmt: skip
    kwargs = _adam_kwargs(lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step,
                          grad_scale, found_inf, master_params)  # fmt: skip
    if backend == "reference":
        reference.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)
    else:
        _adam_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)


@adam_.register_fake
def _adam_fake(*args, **kwargs) -> None:
    return None


def _adam_kwargs(lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, step, grad_scale,
                 found_inf, master_params) -> dict:  # fmt: skip
    return dict(
        lr=lr_tensor if lr_tensor is not None else lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, step=step, grad_scale=grad_scale,
        found_inf=found_inf, master_params=master_params,
    )  # fmt: skip


def _adam_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, found_inf, **kwargs) -> None:
    from .kernels.adam import adam_launch

    if state_steps:
        # Step counts move with the step, and back when the step is skipped (torch's fused path does the
        # same): two tiny multi-tensor launches, no host sync.
        torch._foreach_add_(state_steps, 1)
    adam_launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, found_inf=found_inf,
                cache=_table_cache(), **kwargs)  # fmt: skip
    if state_steps and found_inf is not None:
        torch._foreach_sub_(state_steps, found_inf.to(state_steps[0].device, torch.float32).reshape(()))
