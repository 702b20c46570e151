"""Plain-torch SGD and Lion steps: the test oracle of kernels/sgd.py and kernels/lion.py, and their CPU path.

Same contracts as the launchers (``sgd_launch``, ``lion_launch``) minus the kernel-only arguments. Any device, any
floating dtype: bf16/fp16/fp32 tensors are computed in fp32 and stored rounded to nearest even (as the kernels do);
when the params (or the masters) are float64 the whole computation is float64 (the test oracle). Nothing here
imports triton. ``found_inf`` and a tensor ``lr`` are read on the host: cheap on CPU, a sync on a GPU.

Each step runs in two phases (``*_prepare``): every new value is computed out of place first (all the allocations,
nothing the step writes changed), then stored by copies into the existing tensors (or torch's fused CPU kernel, in
place), so an error such as running out of memory leaves every tensor as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _compute_dtype(params: Sequence[Tensor], master_params: Sequence[Tensor]) -> torch.dtype:
    return master_params[0].dtype if master_params else torch.promote_types(params[0].dtype, torch.float32)


def _work(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``tensors`` themselves when of ``dtype`` (updated in place), else copies in ``dtype`` (copied back)."""
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _noop() -> None:
    pass


def _store(dst: Sequence[Tensor], work: Sequence[Tensor]) -> None:
    for d, w in zip(dst, work):
        if d is not w:
            d.copy_(w)  # rounded to nearest even


def _grads(grads: Sequence[Tensor], dtype: torch.dtype, grad_scale, maximize: bool) -> list[Tensor]:
    """The grads in ``dtype``, divided by ``grad_scale``, negated if ``maximize``: new tensors (grads unchanged)."""
    g = [x.to(dtype, copy=True) for x in grads]
    if grad_scale is not None:
        torch._foreach_div_(g, _scalar(grad_scale))
    if maximize:
        torch._foreach_neg_(g)
    return g


def _check_lengths(fn: str, params: Sequence[Tensor], **lists: Sequence[Tensor]) -> None:
    for name, lst in lists.items():
        if len(lst) != len(params):
            raise ValueError(f"{fn}: {name} has {len(lst)} tensors, params has {len(params)}")


def sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """One SGD step in plain torch, with torch.optim.sgd._single_tensor_sgd's order of operations.

        g = grad / grad_scale;  g = -g if maximize;  g = g + wd * p (wd != 0)
        momentum != 0:  buf = g (first_step)  or  buf = buf * momentum + (1 - dampening) * g
                        g = g + momentum * buf (nesterov)  or  g = buf
        p = p - lr * g

    ``momentum_buffers``: one per param when ``momentum != 0``, empty when it is 0. With ``first_step`` the buffers
    are written, not read (torch's ``momentum_buffer is None``). A non-zero ``found_inf`` changes nothing. With
    ``master_params`` the update runs on those and ``params`` receive the rounded result. The update uses the
    buffer's value before it is rounded to a low-precision buffer's dtype (as the kernel does).
    """
    sgd_prepare(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                grad_scale=grad_scale, found_inf=found_inf, master_params=master_params)()  # fmt: skip


def sgd_prepare(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
):
    """:func:`sgd_` in two phases: every new value computed here (nothing written), returned with the function that
    stores them."""
    if len(params) == 0:
        return _noop
    _check_lengths("sgd_", params, grads=grads, **({"master_params": master_params} if master_params else {}))
    if momentum != 0:
        _check_lengths("sgd_", params, momentum_buffers=momentum_buffers)
    elif len(momentum_buffers) != 0:
        raise ValueError(f"sgd_: momentum is 0, so momentum_buffers must be empty (got {len(momentum_buffers)})")
    if found_inf is not None and _scalar(found_inf) != 0:
        return _noop
    lr = _scalar(lr)
    dtype = _compute_dtype(params, master_params)
    work = list(master_params) if master_params else _work(params, dtype)
    g = _grads(grads, dtype, grad_scale, maximize)
    if weight_decay != 0:
        torch._foreach_add_(g, work, alpha=weight_decay)
    bufs = []
    if momentum != 0:
        if first_step:
            bufs = [x.clone() for x in g]
        else:
            bufs = torch._foreach_mul(_work(momentum_buffers, dtype), momentum)
            torch._foreach_add_(bufs, g, alpha=1 - dampening)
        if nesterov:
            torch._foreach_add_(g, bufs, alpha=momentum)
        else:
            g = bufs
    new_work = torch._foreach_add(work, g, alpha=-lr)
    del g

    def commit() -> None:
        if momentum != 0:
            _store(momentum_buffers, bufs)
        if master_params:
            _store(master_params, new_work)
        _store(params, new_work)

    return commit


def lion_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """One Lion step in plain torch (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Program 1;
    the order of operations of lucidrains/lion-pytorch):

        g = grad / grad_scale;  g = -g if maximize
        p = p * (1 - lr * wd)
        p = p - lr * sign(m * beta1 + (1 - beta1) * g)
        m = m * beta2 + (1 - beta2) * g

    ``sign`` is ``torch.sign``: sign(0) = 0 and sign(NaN) = 0, so a NaN grad makes ``m`` NaN but leaves that step's
    update 0 (and every later one, while ``m`` stays NaN). ``exp_avgs`` start at zero. A non-zero ``found_inf``
    changes nothing. With ``master_params`` the update runs on those and ``params`` receive the rounded result.
    """
    lion_prepare(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                 maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
                 master_params=master_params)()  # fmt: skip


def lion_prepare(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
):
    """:func:`lion_` in two phases: every new value computed here (nothing written), returned with the function that
    stores them."""
    if len(params) == 0:
        return _noop
    _check_lengths("lion_", params, grads=grads, exp_avgs=exp_avgs,
                   **({"master_params": master_params} if master_params else {}))  # fmt: skip
    if found_inf is not None and _scalar(found_inf) != 0:
        return _noop
    lr = _scalar(lr)
    dtype = _compute_dtype(params, master_params)
    work = list(master_params) if master_params else _work(params, dtype)
    if grad_scale is None and not maximize and all(x.dtype == dtype for x in grads):
        g = list(grads)  # (only read below: no copy)
    else:
        g = _grads(grads, dtype, grad_scale, maximize)
    ms = _work(exp_avgs, dtype)
    if weight_decay != 0:
        work = torch._foreach_mul(work, 1 - lr * weight_decay)
    update = torch._foreach_mul(ms, beta1)
    torch._foreach_add_(update, g, alpha=1 - beta1)
    torch._foreach_sign_(update)
    new_work = torch._foreach_add(work, update, alpha=-lr)
    del update
    new_ms = torch._foreach_mul(ms, beta2)
    torch._foreach_add_(new_ms, g, alpha=1 - beta2)
    del g

    def commit() -> None:
        _store(exp_avgs, new_ms)
        if master_params:
            _store(master_params, new_work)
        _store(params, new_work)

    return commit


def sgd_cpu_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """The CPU path of SGD: :func:`sgd_`'s contract, in torch's one-pass CPU kernel (``torch._fused_sgd_``, the
    kernel behind ``torch.optim.SGD(fused=True)``) when the tensors it updates are fp32 (fp32 params, or the fp32
    masters) with fp32 grads and buffers; otherwise :func:`sgd_`. The caller has checked every tensor (the kernel
    checks nothing). Grads are divided here, never by torch's kernel, which would write them back unscaled."""
    sgd_cpu_prepare(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                    grad_scale=grad_scale, found_inf=found_inf, master_params=master_params)()  # fmt: skip


def sgd_cpu_prepare(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
):
    """:func:`sgd_cpu_` in two phases: the allocations here (the divided grads), nothing written; the returned
    function runs torch's fused kernel (in place) and copies the params from their masters."""
    work = list(master_params) if master_params else list(params)
    fast = (
        len(params) > 0
        and params[0].device.type == "cpu"
        and work[0].dtype == torch.float32
        and grads[0].dtype == torch.float32
        and (momentum == 0 or momentum_buffers[0].dtype == torch.float32)
    )
    if not fast:
        return sgd_prepare(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                           grad_scale=grad_scale, found_inf=found_inf, master_params=master_params)  # fmt: skip
    if found_inf is not None and _scalar(found_inf) != 0:
        return _noop
    g = list(grads) if grad_scale is None else torch._foreach_div(list(grads), _scalar(grad_scale))
    lr = _scalar(lr)

    def commit() -> None:
        torch._fused_sgd_(work, g, list(momentum_buffers) if momentum != 0 else [], weight_decay=weight_decay,
                          momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov, maximize=maximize,
                          is_first_step=bool(first_step and momentum != 0))  # fmt: skip
        if master_params:
            torch._foreach_copy_(list(params), work)  # rounded to nearest even

    return commit
