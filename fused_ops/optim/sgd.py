"""FusedSGD: drop-in ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize), fused.

One launch per (device, dtype) part (``kernels/sgd.py``); the CPU path is the plain-torch reference
(``fused_ops/_ref_sgd_lion.py``). State and ``state_dict`` as torch.optim.SGD: ``{"momentum_buffer": tensor}``
per param when ``momentum != 0``, nothing else (no step count). Differences, by design: buffers are fp32 for
bf16/fp16 params (torch keeps the param's dtype), and with ``master_weights=True`` bf16/fp16 params get an fp32
master (state key ``"master_param"``).

torch creates a param's buffer at its first step as a copy of the (decayed) grad: ``buf = g``, not
``momentum * 0 + (1 - dampening) * g``. Here a new buffer is launched with ``first_step`` once, in a launch of
its own when the group has old buffers too. A first step skipped on the device (``found_inf`` set) would leave a
zero buffer that the next step updates as an old one; that is ``buf = g`` too when ``dampening == 0``. With
``dampening != 0`` a step that would create buffers reads ``found_inf`` on the host (a sync, at a buffer's first
step only; refused inside a CUDA graph capture) and, when it is set, creates nothing: the next step starts the
buffers, as torch's (``GradScaler`` does not call torch's ``step()`` after an overflow).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._backend import check_backend
from .._ref_sgd_lion import sgd_cpu_ as _cpu_sgd
from .._ref_sgd_lion import sgd_cpu_prepare as _cpu_sgd_prepare
from .._validate import finite_fp32 as _finite_fp32
from ._base import FusedOptimizer, _GroupPlan, _local, _Part, _stored, _to_float, _write_back


def _check_number(name: str, value: Any, message: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = _to_float(value, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = _to_float(value, name)  # (an int too large for a float: inf)
    if not (_finite_fp32(value) and value >= 0):
        raise ValueError(f"{message}: {value}")
    return value


class FusedSGD(FusedOptimizer):
    """SGD with momentum, fused; drop-in ``torch.optim.SGD`` (same arguments and ``state_dict``; torch's checks,
    plus a refusal of non-finite or negative hyper-parameters, ``dampening`` included, which torch accepts).

    Args:
        params: iterable of parameters or of param-group dicts.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD (``lr`` may be a 1-element
            tensor; keep it on the params' device to avoid a host read each step).
        foreach, fused: accepted for drop-in compatibility and ignored (the step is always fused).
        differentiable: must be False.
        master_weights: an fp32 master copy of every bf16/fp16 param (see :class:`FusedAdam`).
        backend: "auto" (Triton on CUDA, plain torch on CPU), "triton" or "reference".
    """

    _has_step = False
    _foreign_state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _absent_if_none = ("momentum_buffer",)  # (torch.optim.SGD's dicts before torch 2.2 hold None without momentum)
    _LEGACY_DEFAULTS = dict(nesterov=False, maximize=False, foreach=None, differentiable=False, fused=None)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        backend: str | None = None,
    ) -> None:
        if fused and foreach:  # (torch's check and message)
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
            master_weights=master_weights, backend=backend,
        )  # fmt: skip
        self._new_buffers: set[int] = set()
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._new_buffers = set()  # (empty between steps; a copy's ids would name other tensors)

    # -- what FusedOptimizer asks of an optimizer -------------------------------------------------------------
    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["momentum_buffer"] if _to_float(group["momentum"], "momentum") != 0 else []

    @staticmethod
    def _check_hyperparameters(group: dict[str, Any]) -> None:
        """torch.optim.SGD's checks and messages, plus: every value must be finite."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if isinstance(lr, Tensor) and not lr.is_floating_point():  # (torch takes an integer one; the kernels read fp)
            raise ValueError(f"Tensor lr must be 1-element and floating-point, got {lr.dtype}")
        lr = _to_float(lr, "lr")
        if not (0.0 <= lr and _finite_fp32(lr)):
            raise ValueError(f"Invalid learning rate: {lr}")
        momentum = _check_number("momentum", group["momentum"], "Invalid momentum value")
        dampening = _check_number("dampening", group["dampening"], "Invalid dampening value")
        _check_number("weight_decay", group["weight_decay"], "Invalid weight_decay value")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_backend(group.get("backend", "auto"))

    @classmethod
    def _check_step_values(cls, gi: int, group: dict[str, Any]) -> tuple[float, float, float]:
        """The values a user or scheduler may have changed since the constructor: ``(momentum, dampening,
        weight_decay)`` as floats."""
        lr = group["lr"]  # (the launch reads a tensor lr through a typed pointer: refused here, before any group runs)
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point() or lr.layout != torch.strided:
                raise ValueError(f"Tensor lr must be 1-element and floating-point (param group {gi})")
            group = {**group, "lr": 0.0}  # (its value is not read: no host sync at each step, as in FusedAdam)
        try:
            cls._check_hyperparameters(group)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (param group {gi})") from None
        return (
            _to_float(group["momentum"], "momentum", gi),
            _to_float(group["dampening"], "dampening", gi),
            _to_float(group["weight_decay"], "weight_decay", gi),
        )

    def _partial_problem(self, group: dict[str, Any] | None, p: Tensor) -> str | None:
        """SGD's update (weight decay, momentum, Nesterov, maximize, the grad scale) is linear in the param, the grad
        and the buffer: each rank's summand stepped with its grad's summand and its buffer's (buffers are laid out
        like the param) sums to the step of the sum, as torch.optim.SGD steps a ``Partial`` DTensor param. Not so
        for a reduction that is not a sum or a mean (max, min), nor with an fp32 master: the param would be the sum
        of each rank's rounded master, not the rounding of the master."""
        from torch.distributed.tensor import Partial  # (a DTensor param: torch.distributed is there)

        # (torch's own Partial only: a private subclass, e.g. a norm's _NormPartial, reports "sum" but is not one)
        ops = {getattr(pl, "reduce_op", None) if type(pl) is Partial else type(pl).__name__
               for pl in p.placements if pl.is_partial()}  # fmt: skip
        if not ops <= {"sum", "avg"}:
            return f"a Partial reduction by {sorted(map(str, ops))} is not linear: stepping each rank's part is wrong"
        if group is not None and self._uses_master(group, p):
            return (
                "with master_weights=True its param would be the sum of each rank's rounded fp32 master, not the "
                "rounding of the master (use master_weights=False for it, or an fp32 param)"
            )
        return None

    def _new_state_tensor(self, group: dict[str, Any], key: str, p: Tensor) -> Tensor:
        t = super()._new_state_tensor(group, key, p)
        self._new_buffers.update((id(t), id(_local(t))))  # (a plan sees a DTensor's local shard)
        return t

    def _part_key(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> tuple:
        return (id(st.get("momentum_buffer")) in self._new_buffers,)  # (first step of a new buffer)

    def _skipped_on_host(self, groups: list[tuple[int, dict[str, Any], tuple, list[Tensor]]],
                         found_inf: Tensor | None) -> bool:  # fmt: skip
        """With ``dampening != 0`` a first step skipped on the device would make a zero buffer that the next step
        treats as old (``(1 - dampening) * g`` where torch has ``g``): when such buffers would be created, read
        ``found_inf`` and create nothing if it is set (see the module docstring)."""
        if found_inf is None:
            return False
        creates = any(
            momentum != 0 and dampening != 0 and any(self._buffer_of(p) is None for p in params)
            for _, _, (momentum, dampening, _), params in groups
        )
        if not creates:
            return False
        if found_inf.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError("FusedSGD: a step with dampening != 0 that creates momentum buffers reads found_inf on "
                             "the host (a buffer starts at its first applied step, as torch's), which a CUDA graph "
                             "capture forbids: take one applied step before the capture")  # fmt: skip
        return bool(_local(found_inf).detach().reshape(()).item() != 0)  # (NaN counts as set)

    def _buffer_of(self, p: Tensor) -> Tensor | None:
        st = self.state.get(p)
        return st.get("momentum_buffer") if st else None

    def _after_run(self, plan: _GroupPlan) -> None:
        # Every plan of this step was built (its parts keyed) before any ran: the new buffers are all known.
        for part in plan.parts:
            part.key = (False,)
        self._new_buffers.clear()

    def _make_launcher(self, group: dict[str, Any], part: _Part, grads: list[Tensor]) -> Any:
        from ..kernels.sgd import SGDStep

        return SGDStep(part.params, grads, part.roles.get("momentum_buffer", []), part.masters)

    def _launch(self, part: _Part, group: dict[str, Any], lr: Any, values: tuple, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:  # fmt: skip
        momentum, dampening, weight_decay = values
        part.launcher._run(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]), first_step=part.key[0],
                      grad_scale=grad_scale, found_inf=found_inf)  # fmt: skip

    def _abort_step(self) -> None:
        self._new_buffers.clear()  # (the step's new buffers were dropped: their ids may name other tensors later)

    def _prepare_reference(self, part: _Part, grads: list[Tensor], group: dict[str, Any], lr: Any, values: tuple,
                           grad_scale: Tensor | None, found_inf: Tensor | None) -> Callable[[], None]:  # fmt: skip
        """The reference path in two phases (see ``FusedOptimizer._prepare_reference``)."""
        momentum, dampening, weight_decay = values
        store = _cpu_sgd_prepare(part.params, grads, part.roles.get("momentum_buffer", []), lr=lr, momentum=momentum,
                                 dampening=dampening, weight_decay=weight_decay, nesterov=bool(group["nesterov"]),
                                 maximize=bool(group["maximize"]), first_step=part.key[0], grad_scale=grad_scale,
                                 found_inf=found_inf, master_params=part.masters)  # fmt: skip
        return partial(_stored, store, part.params)

    def _run_reference(self, part: _Part, grads: list[Tensor], group: dict[str, Any], lr: Any, values: tuple,
                       grad_scale: Tensor | None, found_inf: Tensor | None) -> None:  # fmt: skip
        momentum, dampening, weight_decay = values
        _cpu_sgd(part.params, grads, part.roles.get("momentum_buffer", []), lr=lr, momentum=momentum,
                       dampening=dampening, weight_decay=weight_decay, nesterov=bool(group["nesterov"]),
                       maximize=bool(group["maximize"]), first_step=part.key[0], grad_scale=grad_scale,
                       found_inf=found_inf, master_params=part.masters)  # fmt: skip
        _ops.bump_versions(part.params)

    def _step_traced(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        _sgd_calls(*self._traced_calls(found_inf, read=(grad_scale, found_inf)), grad_scale, found_inf)

    def _traced_group_calls(self, gi: int, group: dict[str, Any]) -> list[tuple]:
        """One ``fused_ops::sgd_`` call per part (new buffers apart)."""
        momentum, dampening, weight_decay = self._check_step_values(gi, group)
        flags = (bool(group["nesterov"]), bool(group["maximize"]))
        calls = []
        for part in self._traced_parts(gi, group, lambda p, m=momentum: (m != 0 and self._buffer_of(p) is None,)):
            values = (momentum, dampening, weight_decay, *flags, part.key[0])
            calls.append((part.params, part.launcher, part.roles.get("momentum_buffer", []), part.masters,
                          group["lr"], values, part.device, part.backend))  # fmt: skip
        self._new_buffers.clear()
        return calls


def _sgd_calls(calls: list[tuple], staged: list, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """The ``fused_ops::sgd_`` calls of a traced step (one per part), in a frame of their own that Dynamo captures:
    :meth:`FusedOptimizer._traced_calls` ran eagerly (the checks compare data pointers; states are created), and this
    frame, whose arguments hold plain tensors and which never breaks the graph, is compiled with the ops in its
    graph."""
    for params, grads, buffers, masters, lr, values, device, backend in calls:
        lr, lr_tensor, scale, inf = _traced_scalars(lr, grad_scale, found_inf, device)
        _ops.sgd_(params, grads, buffers, masters, lr, lr_tensor, *values, scale, inf, backend)
    _write_back(staged)


def _traced_scalars(lr: Any, grad_scale: Any, found_inf: Any, device: torch.device) -> tuple:
    """``lr`` (float, or a tensor on ``device``), ``grad_scale`` and ``found_inf`` as the custom ops take them."""
    lr_tensor = (lr if lr.device == device else lr.to(device)) if isinstance(lr, Tensor) else None
    scale = None if grad_scale is None else torch.as_tensor(grad_scale, dtype=torch.float32, device=device).reshape(1)
    inf = None if found_inf is None else found_inf.to(device)
    return (0.0 if lr_tensor is not None else float(lr)), lr_tensor, scale, inf
