"""FusedAdam and FusedAdamW: drop-in ``torch.optim.Adam`` / ``AdamW`` over the fused multi-tensor step.

Same constructor, defaults, validation messages and ``state_dict`` layout as torch.optim, so code,
lr schedulers, ``torch.amp.GradScaler`` and checkpoints move between them. Differences, by design:
states are fp32 whatever the param dtype (bf16 params keep fp32 moments), per-param ``step`` counts are
fp32 tensors on the param's device (as in torch's fused/capturable modes), and a whole step is one kernel
launch per (device, dtype) group with no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from . import _ops, functional
from ._backend import check_backend, resolve_backend

MASTER_KEY = "master_param"
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", MASTER_KEY)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _to_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class FusedAdam(torch.optim.Optimizer):
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

    _step_supports_amp_scaling = True
    _default_decoupled = False

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
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        betas = tuple(betas)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas}")
        for i, b in enumerate(betas):
            if isinstance(b, Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        betas = (_to_float(betas[0]), _to_float(betas[1]))
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._default_decoupled
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=False, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, master_weights=bool(master_weights),
            backend=check_backend(backend),
        )  # fmt: skip
        self._check_hyperparameters(defaults)
        self._plans: dict[int, _GroupPlan] = {}
        super().__init__(params, defaults)

    # -- validation -------------------------------------------------------------------------------------
    @staticmethod
    def _check_hyperparameters(group: dict[str, Any]) -> None:
        """torch.optim.Adam's checks and messages, plus: every value must be finite."""
        lr = _to_float(group["lr"])
        if not 0.0 <= lr or not math.isfinite(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        eps = group["eps"]
        if not 0.0 <= eps or not math.isfinite(eps):
            raise ValueError(f"Invalid epsilon value: {eps}")
        beta1, beta2 = group["betas"]
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        wd = group["weight_decay"]
        if not 0.0 <= wd or not math.isfinite(wd):
            raise ValueError(f"Invalid weight_decay value: {wd}")
        check_backend(group.get("backend", "auto"))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as torch.optim), validating its hyper-parameters first."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if "betas" in param_group:
            merged["betas"] = tuple(_to_float(b) for b in param_group["betas"])
            param_group = {**param_group, "betas": merged["betas"]}
        self._check_hyperparameters(merged)
        super().add_param_group(param_group)
        self._plans.clear()

    def _check_params(self, group_index: int, params: list[Tensor]) -> None:
        """Raise a clear error for any param the fused step cannot update. Touches no state."""
        name = type(self).__name__
        for i, p in enumerate(params):
            where = f"param {i} of param group {group_index} (shape {tuple(p.shape)})"
            g = p.grad
            if g.is_sparse:
                raise RuntimeError(
                    f"{name} does not support sparse gradients ({where}), please consider SparseAdam instead"
                )
            if torch.is_complex(p):
                raise TypeError(f"{name} does not support complex parameters ({where} is {p.dtype})")
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"{name} supports float32, bfloat16 and float16 params; {where} is {p.dtype}")
            if g.device != p.device:
                raise ValueError(f"{name}: the grad of {where} is on {g.device} but the param is on {p.device}")
            if g.dtype != p.dtype:
                raise TypeError(f"{name}: the grad of {where} is {g.dtype} but the param is {p.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"{name}: the grad of {where} has shape {tuple(g.shape)}")
            if not p.is_contiguous():
                raise ValueError(f"{name} needs contiguous params; {where} is not contiguous")

    # -- state ------------------------------------------------------------------------------------------
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans = {}
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != "params":
                    group.setdefault(key, value)
            group.setdefault("decoupled_weight_decay", self._default_decoupled)
            group["betas"] = tuple(_to_float(b) for b in group["betas"])
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = self._as_step(st["step"], p)

    @staticmethod
    def _as_step(step: Any, p: Tensor) -> Tensor:
        if isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == p.device and step.dim() == 0:
            return step
        return torch.as_tensor(step).detach().to(device=p.device, dtype=torch.float32).reshape(()).clone()

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if group["master_weights"] and p.dtype != torch.float32 and MASTER_KEY not in state:
            # New state, or a state dict without masters (e.g. torch.optim.AdamW's): start from the param.
            state[MASTER_KEY] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of FusedAdam(W) or torch.optim.Adam(W).

        torch.optim would cast the moments to the param dtype; here they stay (or become) fp32, and step
        counts become fp32 tensors on the param's device. The source dict is never aliased.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, sg in zip(self.param_groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))  # fmt: skip
        for k, src in state_dict["state"].items():
            p = id_map.get(k)
            if p is None:
                continue
            for key in _STATE_KEYS:
                if key in src and src[key].numel() != p.numel():
                    raise ValueError(
                        f"loaded state dict: state {key!r} of param {k} has {src[key].numel()} elements but the "
                        f"param has {p.numel()} (shape {tuple(p.shape)})"
                    )
        super().load_state_dict(state_dict)
        self._plans.clear()
        for k, src in state_dict["state"].items():
            p = id_map.get(k)
            if p is None:
                continue
            st = self.state[p]
            for key in _STATE_KEYS:
                if key in src:
                    st[key] = src[key].detach().to(device=p.device, dtype=torch.float32, copy=True).view(p.shape)
            if "step" in src:
                step = torch.as_tensor(src["step"]).detach()
                st["step"] = step.to(device=p.device, dtype=torch.float32, copy=True).reshape(())

    # -- step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Any:
        """Perform one optimisation step. Params without a grad are skipped (their step does not move).

        ``grad_scale`` (1-element tensor) divides every grad inside the kernel and ``found_inf`` (1-element
        tensor) makes the step a no-op on the device when non-zero; both default to the attributes that
        ``torch.amp.GradScaler`` sets. With ``fused_ops.DynamicLossScaler.grad_scale_and_norm`` the grad
        scale also carries the clip coefficient, so unscale + clip + update is one pass over the grads.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        if torch.compiler.is_compiling():
            self._step_traced(grad_scale, found_inf)
            return loss

        # Check everything first, so that bad input raises before any state is created or changed. A group whose
        # plan still fits (same params, same places, grads that fit) skips the per-param checks and list building.
        work = []
        for gi, group in enumerate(self.param_groups):
            values = self._check_step_values(gi, group)
            plan = self._plans.get(gi)
            current = plan.current_grads(group, self.state) if plan is not None else None
            if current is None:
                params = [p for p in group["params"] if p.grad is not None]
                self._check_params(gi, params)
                work.append((gi, group, values, params, None))
            else:
                work.append((gi, group, values, plan, current))

        for gi, group, values, params_or_plan, current in work:
            if current is None:
                params = params_or_plan
                if not params:
                    self._plans.pop(gi, None)
                    continue
                plan = _GroupPlan(group, params, [self._init_state(group, p) for p in params], self.state)
                self._plans[gi] = plan
                current, plan.first_grads = plan.first_grads, None  # (the plan must not keep old grads alive)
            else:
                plan = params_or_plan
            plan.run(group, current, values, grad_scale=grad_scale, found_inf=found_inf)
        return loss

    @staticmethod
    def _check_step_values(gi: int, group: dict[str, Any]) -> tuple[float, float, float, float]:
        """Check the values a user or scheduler may have changed since the constructor checked them (tensor betas,
        eps or weight decay included); return ``(beta1, beta2, eps, weight_decay)`` as floats."""
        lr = group["lr"]
        if not isinstance(lr, Tensor) and not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"Invalid learning rate: {lr} (param group {gi})")
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

    def _step_traced(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The step under ``torch.compile``: the functional API, so the traced graph holds the custom op."""
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            self._check_params(gi, params)
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
                    grad_scale=None if grad_scale is None else grad_scale.to(device),
                    found_inf=None if found_inf is None else found_inf.to(device),
                    master_params=[s[MASTER_KEY] for s in ss] if master else None,
                    backend=group["backend"],
                )  # fmt: skip


def _structure(group: dict[str, Any]) -> tuple:
    """The group settings a plan is built for (the other values are read at every step)."""
    return (group["amsgrad"], group["master_weights"], group["backend"])


class _Part:
    """The tensors of one launch: params with grads of one (device, dtype, grad dtype, master or not)."""

    __slots__ = ("idx", "params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "masters", "device",
                 "backend", "launcher")  # fmt: skip

    def __init__(self, group: dict[str, Any], idx: list[int] | None, params: list[Tensor], grads: list[Tensor],
                 states: list[dict[str, Tensor]], master: bool) -> None:  # fmt: skip
        self.idx = idx  # positions in the plan's params; None: all of them
        self.params = params
        self.exp_avgs = [s["exp_avg"] for s in states]
        self.exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        self.max_exp_avg_sqs = [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else []
        self.steps = [s["step"] for s in states]
        self.masters = [s[MASTER_KEY] for s in states] if master else []
        self.device = params[0].device
        self.backend = resolve_backend(group["backend"], self.device)
        self.launcher = None
        if self.backend == "triton":
            from .kernels.adam import AdamStep

            self.launcher = AdamStep(params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                                     self.steps, self.masters, amsgrad=group["amsgrad"])  # fmt: skip


class _GroupPlan:
    """One param group's step, prepared: which params have grads, their states, and one launch per part.

    Built by a checked step (every param validated, states created); later steps reuse it while it fits, i.e.
    while the group holds the same params (same list, same addresses), the same params have grads, and the
    grads fit (dtype, device, shape, contiguous and dense: checked again only when a grad moved). Then a step
    costs a few list comprehensions over the group instead of per-param checks, dict look-ups and a chunk
    table look-up by every tensor's address. Replacing a state tensor by hand (not through ``load_state_dict``)
    is not seen: states are the optimizer's own.
    """

    def __init__(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]],
                 state: Any) -> None:  # fmt: skip
        all_params = group["params"]
        self.params_list = all_params
        self.n_all = len(all_params)
        self.structure = _structure(group)
        self.state = state
        self.n_state = len(state)
        self.keep = None if len(params) == len(all_params) else [p.grad is not None for p in all_params]
        self.params = params
        self.param_addrs = [p.data_ptr() for p in params]
        grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
        self.grad_addrs = [g.data_ptr() for g in grads]
        self.grad_dtypes = [g.dtype for g in grads]
        self.devices = [p.device for p in params]
        self.numels = [p.numel() for p in params]
        # Moved grads are compared by strides, 10x cheaper to read than shapes. With equal element counts, equal
        # strides of contiguous tensors mean equal shapes, except where size-1 dims carry unusual strides (a (1, 2)
        # tensor with strides (1, 1) against a (2, 1) param). torch's grad setter refuses another shape, so only a
        # ``grad.data = ...`` assignment gets there; such a grad is read as the flat sequence of its elements (the
        # update is elementwise and stays within both tensors). Other strides take the checked step.
        self.strides = [p.stride() for p in params]
        self.first_grads: list[Tensor] | None = grads  # for the step that builds the plan, then dropped
        master_on = group["master_weights"]
        keys: dict[tuple, list[int]] = {}
        for i, (p, s) in enumerate(zip(params, states)):
            keys.setdefault((p.device, p.dtype, grads[i].dtype, master_on and MASTER_KEY in s), []).append(i)
        self.parts = [
            _Part(group, None if len(keys) == 1 else idx, [params[i] for i in idx], [grads[i] for i in idx],
                  [states[i] for i in idx], key[3])
            for key, idx in keys.items()
        ]  # fmt: skip

    def current_grads(self, group: dict[str, Any], state: Any) -> list[Tensor] | None:
        """The grads of this step (of the params with grads) when the plan still fits the group, else None."""
        params = group["params"]
        if (params is not self.params_list or len(params) != self.n_all or state is not self.state
                or len(state) != self.n_state or _structure(group) != self.structure):  # fmt: skip
            return None
        grads = [p.grad for p in params]
        if self.keep is not None:
            if [g is not None for g in grads] != self.keep:
                return None
            grads = [g for g in grads if g is not None]
        try:
            addrs = [g.data_ptr() for g in grads]
        except (AttributeError, RuntimeError):  # a param lost its grad (rebuild: skip it), or a sparse grad (raise)
            return None
        if [p.data_ptr() for p in self.params] != self.param_addrs:
            return None  # a param moved (``p.data = ...``): rebuild
        if addrs != self.grad_addrs:
            # New grads (backward after zero_grad(set_to_none=True)): check what the launch relies on.
            if (
                [g.dtype for g in grads] != self.grad_dtypes
                or [g.device for g in grads] != self.devices
                or [g.numel() for g in grads] != self.numels
                or [g.stride() for g in grads] != self.strides
                or not all(g.is_contiguous() for g in grads)
            ):  # (sparse grads have no data_ptr: they were sent to the checked step above)
                return None  # the checked step raises the error, or copies non-contiguous grads
            for part in self.parts:
                if part.launcher is not None:
                    if part.idx is None:
                        part.launcher.set_grads(grads, addrs, checked=True)
                    else:
                        part.launcher.set_grads([grads[i] for i in part.idx], [addrs[i] for i in part.idx],
                                                checked=True)  # fmt: skip
            self.grad_addrs = addrs
        return grads

    def run(self, group: dict[str, Any], grads: list[Tensor], values: tuple[float, float, float, float], *,
            grad_scale: Tensor | None, found_inf: Tensor | None) -> None:  # fmt: skip
        """One launch per part. ``values``: the group's (beta1, beta2, eps, weight_decay), checked, as floats."""
        lr = group["lr"]
        beta1, beta2, eps, weight_decay = values
        for part in self.parts:
            device = part.device
            part_lr = lr
            if isinstance(lr, Tensor) and lr.device != device:
                part_lr = _to_float(lr) if lr.device.type == "cpu" else lr.to(device)
            scale = None if grad_scale is None else grad_scale.to(device)
            inf = None if found_inf is None else found_inf.to(device)
            if part.launcher is not None:
                part.launcher(
                    lr=part_lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    maximize=group["maximize"], decoupled=group["decoupled_weight_decay"], grad_scale=scale,
                    found_inf=inf,
                )  # fmt: skip
                _ops.bump_versions(part.params)
            else:  # (bumps the params' versions itself)
                g = grads if part.idx is None else [grads[i] for i in part.idx]
                lr_tensor = part_lr if isinstance(part_lr, Tensor) else None
                _ops.adam_eager(
                    part.params, g, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs, part.masters, part.steps,
                    0.0 if lr_tensor is not None else float(part_lr), lr_tensor, beta1, beta2, eps, weight_decay,
                    bool(group["amsgrad"]), bool(group["maximize"]),
                    bool(group["decoupled_weight_decay"]), None, scale, inf, part.backend,
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
