"""FusedLion: the Lion optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), fused.

One momentum (state key ``"exp_avg"``, as lucidrains/lion-pytorch), a sign update, decoupled weight decay; one
launch per (device, dtype) part (``kernels/lion.py``), the plain-torch reference on the CPU path
(``fused_ops/_ref_sgd_lion.py``). No step count. Lion wants a learning rate 3-10x smaller than AdamW's and a
weight decay 3-10x larger (the paper's advice). The defaults follow it for lr and betas (lr 1e-4, betas
(0.9, 0.99)); ``weight_decay`` defaults to 0.0, as lion-pytorch's: set it (e.g. 3-10x your AdamW decay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._backend import check_backend
from .._ref_sgd_lion import lion_ as _reference_lion
from .._ref_sgd_lion import lion_prepare as _reference_lion_prepare
from .._validate import finite_fp32 as _finite_fp32
from ._base import FusedOptimizer, _check_betas, _Part, _stored, _to_float, _write_back
from .sgd import _traced_scalars


class FusedLion(FusedOptimizer):
    """Lion, fused: ``p *= 1 - lr * wd; p -= lr * sign(beta1 * m + (1 - beta1) * g); m = beta2 * m + (1 - beta2) * g``.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate (may be a 1-element tensor).
        betas: (beta1, beta2): interpolation of the update and decay of the momentum.
        weight_decay: decoupled weight decay.
        maximize: ascend instead of descend.
        master_weights: an fp32 master copy of every bf16/fp16 param (see :class:`FusedAdam`).
        backend: "auto" (Triton on CUDA, plain torch on CPU), "triton" or "reference".

    A NaN grad element makes its momentum NaN and, since ``sign(nan)`` is 0 in torch, no update of the param (as
    the reference implementations): pass ``found_inf`` (``torch.amp.GradScaler`` does) to skip such steps.
    """

    _has_step = False
    _required_state_keys = ("exp_avg",)
    _foreign_state_keys = ("exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # (an AdamW dict has an exp_avg too)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        master_weights: bool = False,
        backend: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=_check_betas(betas, group=False), weight_decay=weight_decay, maximize=maximize,
                        master_weights=master_weights, backend=backend)  # fmt: skip
        super().__init__(params, defaults)

    # -- what FusedOptimizer asks of an optimizer -------------------------------------------------------------
    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg"]

    @staticmethod
    def _normalize_group(group: dict[str, Any]) -> None:
        group["betas"] = _check_betas(group["betas"])

    @staticmethod
    def _check_hyperparameters(group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if isinstance(lr, Tensor) and not lr.is_floating_point():  # (torch takes an integer one; the kernels read fp)
            raise ValueError(f"Tensor lr must be 1-element and floating-point, got {lr.dtype}")
        lr = _to_float(lr, "lr")
        if not (0.0 <= lr and _finite_fp32(lr)):
            raise ValueError(f"Invalid learning rate: {lr}")
        betas = group["betas"]  # (the constructor took torch's rule, _normalize_group; a step takes any real pair,
        # as FusedAdam's does: a scheduler or user may set numpy numbers or one tensor)
        if isinstance(betas, Tensor) or not isinstance(betas, Iterable) or len(betas := tuple(betas)) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        for i, b in enumerate(betas):
            if isinstance(b, Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
            b = _to_float(b, ("betas[0]", "betas[1]")[i])
            if not 0.0 <= b <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        wd = _to_float(group["weight_decay"], "weight_decay")
        if not (0.0 <= wd and _finite_fp32(wd)):
            raise ValueError(f"Invalid weight_decay value: {wd}")
        check_backend(group.get("backend", "auto"))

    @classmethod
    def _check_step_values(cls, gi: int, group: dict[str, Any]) -> tuple[float, float, float]:
        """``(beta1, beta2, weight_decay)`` as floats, checked again (a scheduler may have changed them)."""
        lr = group["lr"]  # (the launch reads a tensor lr through a typed pointer: refused here, before any group runs)
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point() or lr.layout != torch.strided:
                raise ValueError(f"Tensor lr must be 1-element and floating-point (param group {gi})")
            group = {**group, "lr": 0.0}  # (its value is not read: no host sync at each step, as in FusedAdam)
        try:
            cls._check_hyperparameters(group)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (param group {gi})") from None
        beta1, beta2 = (_to_float(b, f"betas[{i}]", gi) for i, b in enumerate(group["betas"]))
        return beta1, beta2, _to_float(group["weight_decay"], "weight_decay", gi)

    def _make_launcher(self, group: dict[str, Any], part: _Part, grads: list[Tensor]) -> Any:
        from ..kernels.lion import LionStep

        return LionStep(part.params, grads, part.roles["exp_avg"], part.masters)

    def _launch(self, part: _Part, group: dict[str, Any], lr: Any, values: tuple, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:  # fmt: skip
        beta1, beta2, weight_decay = values
        part.launcher._run(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=bool(group["maximize"]),
                      grad_scale=grad_scale, found_inf=found_inf)  # fmt: skip

    def _prepare_reference(self, part: _Part, grads: list[Tensor], group: dict[str, Any], lr: Any, values: tuple,
                           grad_scale: Tensor | None, found_inf: Tensor | None) -> Callable[[], None]:  # fmt: skip
        """The reference path in two phases (see ``FusedOptimizer._prepare_reference``)."""
        beta1, beta2, weight_decay = values
        store = _reference_lion_prepare(part.params, grads, part.roles["exp_avg"], lr=lr, beta1=beta1, beta2=beta2,
                                        weight_decay=weight_decay, maximize=bool(group["maximize"]),
                                        grad_scale=grad_scale, found_inf=found_inf,
                                        master_params=part.masters)  # fmt: skip
        return partial(_stored, store, part.params)

    def _run_reference(self, part: _Part, grads: list[Tensor], group: dict[str, Any], lr: Any, values: tuple,
                       grad_scale: Tensor | None, found_inf: Tensor | None) -> None:  # fmt: skip
        beta1, beta2, weight_decay = values
        _reference_lion(part.params, grads, part.roles["exp_avg"], lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, maximize=bool(group["maximize"]), grad_scale=grad_scale,
                        found_inf=found_inf, master_params=part.masters)  # fmt: skip
        _ops.bump_versions(part.params)

    def _step_traced(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        _lion_calls(*self._traced_calls(read=(grad_scale, found_inf)), grad_scale, found_inf)

    def _traced_group_calls(self, gi: int, group: dict[str, Any]) -> list[tuple]:
        """One ``fused_ops::lion_`` call per part."""
        values = (*self._check_step_values(gi, group), bool(group["maximize"]))
        return [(part.params, part.launcher, part.roles["exp_avg"], part.masters, group["lr"], values, part.device,
                 part.backend) for part in self._traced_parts(gi, group)]  # fmt: skip


def _lion_calls(calls: list[tuple], staged: list, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """The ``fused_ops::lion_`` calls of a traced step (one per part), in a frame of their own that Dynamo captures
    (see ``fused_ops.optim.sgd._sgd_calls``)."""
    for params, grads, exp_avgs, masters, lr, values, device, backend in calls:
        lr, lr_tensor, scale, inf = _traced_scalars(lr, grad_scale, found_inf, device)
        _ops.lion_(params, grads, exp_avgs, masters, lr, lr_tensor, *values, scale, inf, backend)
    _write_back(staged)
