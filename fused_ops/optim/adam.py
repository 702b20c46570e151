"""FusedAdam and FusedAdamW: drop-in ``torch.optim.Adam`` / ``AdamW`` over the fused multi-tensor step.

Same constructor, defaults, validation messages and ``state_dict`` layout as torch.optim, so code,
lr schedulers, ``torch.amp.GradScaler`` and checkpoints move between them. Differences, by design:
states are fp32 whatever the param dtype (bf16 params keep fp32 moments), per-param ``step`` counts are
fp32 tensors on the param's device (as in torch's fused/capturable modes), and a whole step is one kernel
launch per (device, dtype) group with no host synchronisation. The machinery (checks, plans, state dicts) is
:class:`~fused_ops.optim._base.FusedOptimizer`'s; this file holds Adam's hyper-parameters, states and update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _ops, functional
from .._backend import check_backend
from ._base import MASTER_KEY, FusedOptimizer, _check_betas, _Part, _to_float


class FusedAdam(FusedOptimizer):
    """Adam (L2 weight decay) or, with ``decoupled_weight_decay=True``, AdamW, fused.

    Args:
        params: iterable of parameters or of param-group dicts, as for torch.optim.Adam.
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.Adam (``lr`` may be a 1-element
            tensor; keep it on the params' device to avoid a host read each step).
        foreach, fused: accepted for drop-in compatibility and ignored (the step is always fused).
        capturable: accepted; the step never synchronises with the host, so it can always be captured
            in a CUDA graph once the state exists (after one warm-up step).
        differentiable: must be False (not supported).
        decoupled_weight_decay: AdamW's decoupled decay (``FusedAdamW`` sets it).
        master_weights: keep an fp32 master copy of every bf16/fp16 param (state key ``"master_param"``,
            ignored by torch.optim). The whole update is one pass: read the low-precision grad, update
            master and moments in fp32, write the param rounded to nearest even. Without it, bf16 params
            lose updates smaller than half an ulp. fp32 params need no master and get none. The master is
            the source of truth: write new weights into the params through ``load_state_dict`` or
            reset the optimizer, or they are overwritten at the next step.
        backend: "auto" (Triton kernels on CUDA, plain torch on CPU), "triton" or "reference"; default
            from the ``FUSED_OPS_BACKEND`` environment variable.

    Works with ``torch.amp.GradScaler`` without host sync: the scaler hands its scale and inf flag to the
    step, grads are unscaled inside the kernel and an overflowing step changes nothing.
    """

    _default_decoupled = False
    _required_state_keys = ("exp_avg", "exp_avg_sq")
    _LEGACY_DEFAULTS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                            fused=None)  # fmt: skip

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool | None = None,
        master_weights: bool = False,
        backend: str | None = None,
    ) -> None:
        if differentiable:
            raise ValueError(
                f"{type(self).__name__} does not support differentiable=True (the fused step is not "
                "differentiable); use torch.optim.Adam(differentiable=True)"
            )
        betas = _check_betas(betas)
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._default_decoupled
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=False, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, master_weights=bool(master_weights), backend=backend,
        )  # fmt: skip
        super().__init__(params, defaults)

    # -- what FusedOptimizer asks of an optimizer -------------------------------------------------------------
    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] if group["amsgrad"] else ["exp_avg", "exp_avg_sq"]

    @staticmethod
    def _normalize_group(group: dict[str, Any]) -> None:
        group["betas"] = _check_betas(group["betas"])

    def _fill_group_defaults(self, group: dict[str, Any]) -> None:
        super()._fill_group_defaults(group)
        group.setdefault("decoupled_weight_decay", self._default_decoupled)
        if self._default_decoupled:
            group["decoupled_weight_decay"] = True  # (torch.optim.AdamW does the same)

    @staticmethod
    def _check_hyperparameters(group: dict[str, Any]) -> None:
        """torch.optim.Adam's checks and messages, plus: every value must be finite."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = _to_float(lr)
        if not 0.0 <= lr or not math.isfinite(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        eps = _to_float(group["eps"])
        if not 0.0 <= eps or not math.isfinite(eps):
            raise ValueError(f"Invalid epsilon value: {eps}")
        beta1, beta2 = (_to_float(b) for b in _check_betas(group["betas"]))
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        wd = _to_float(group["weight_decay"])
        if not 0.0 <= wd or not math.isfinite(wd):
            raise ValueError(f"Invalid weight_decay value: {wd}")
        check_backend(group.get("backend", "auto"))

    @staticmethod
    def _check_step_values(gi: int, group: dict[str, Any]) -> tuple[float, float, float, float]:
        """Check the values a user or scheduler may have changed since the constructor checked them (tensor betas,
        eps or weight decay included); return ``(beta1, beta2, eps, weight_decay)`` as floats."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point() or lr.layout != torch.strided:
                raise ValueError(f"Tensor lr must be 1-element and floating-point (param group {gi})")
        elif isinstance(lr, bool) or not isinstance(lr, int | float) or not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"Invalid learning rate: {lr} (param group {gi})")
        if len(group["betas"]) != 2:
            raise ValueError(f"betas must be a pair (param group {gi})")
        betas = [_to_float(b) for b in group["betas"]]
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (param group {gi})")
        eps, wd = _to_float(group["eps"]), _to_float(group["weight_decay"])
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"Invalid epsilon value: {eps} (param group {gi})")
        if not (math.isfinite(wd) and wd >= 0):
            raise ValueError(f"Invalid weight_decay value: {wd} (param group {gi})")
        return betas[0], betas[1], eps, wd

    def _make_launcher(self, group: dict[str, Any], part: _Part, grads: list[Tensor]) -> Any:
        from ..kernels.adam import AdamStep

        r = part.roles
        return AdamStep(part.params, grads, r["exp_avg"], r["exp_avg_sq"], r.get("max_exp_avg_sq", []), part.steps,
                        part.masters, amsgrad=group["amsgrad"])  # fmt: skip

    def _launch(self, part: _Part, group: dict[str, Any], lr: Any, values: tuple, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:  # fmt: skip
        beta1, beta2, eps, weight_decay = values
        part.launcher(
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=group["maximize"],
            decoupled=group["decoupled_weight_decay"], grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip

    def _run_reference(self, part: _Part, grads: list[Tensor], group: dict[str, Any], lr: Any, values: tuple,
                       grad_scale: Tensor | None, found_inf: Tensor | None) -> None:  # fmt: skip
        beta1, beta2, eps, weight_decay = values
        lr_tensor = lr if isinstance(lr, Tensor) else None
        r = part.roles
        _ops.adam_eager(
            part.params, grads, r["exp_avg"], r["exp_avg_sq"], r.get("max_exp_avg_sq", []), part.masters, part.steps,
            0.0 if lr_tensor is not None else float(lr), lr_tensor, beta1, beta2, eps, weight_decay,
            bool(group["amsgrad"]), bool(group["maximize"]), bool(group["decoupled_weight_decay"]), None, grad_scale,
            found_inf, part.backend,
        )  # fmt: skip

    def _step_traced(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The step under ``torch.compile``: the functional API, so the traced graph holds the custom op."""
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            self._check_params(gi, params, group)
            beta1, beta2, eps, weight_decay = self._check_step_values(gi, group)
            if not params:
                continue
            states = [self._init_state(group, p) for p in params]
            device = params[0].device
            lr = group["lr"]
            if isinstance(lr, Tensor) and lr.device != device:
                lr = lr.to(device)
            for master in (False, True):
                idx = [i for i, s in enumerate(states) if (MASTER_KEY in s and group["master_weights"]) == master]
                if not idx:
                    continue
                ps = [params[i] for i in idx]
                ss = [states[i] for i in idx]
                functional.adam_(
                    ps,
                    [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in ps],
                    [s["exp_avg"] for s in ss],
                    [s["exp_avg_sq"] for s in ss],
                    [s["max_exp_avg_sq"] for s in ss] if group["amsgrad"] else None,
                    [s["step"] for s in ss],
                    lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    amsgrad=group["amsgrad"], maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    grad_scale=None if grad_scale is None else torch.as_tensor(grad_scale, dtype=torch.float32,
                                                                               device=device).reshape(1),
                    found_inf=None if found_inf is None else found_inf.to(device),
                    master_params=[s[MASTER_KEY] for s in ss] if master else None,
                    backend=group["backend"],
                )  # fmt: skip


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay, default ``weight_decay=1e-2``), fused; drop-in torch.optim.AdamW."""

    _default_decoupled = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            master_weights=master_weights, backend=backend,
        )  # fmt: skip
