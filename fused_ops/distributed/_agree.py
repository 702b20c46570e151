"""Validation and agreement between ranks.

Rule: validate everything, on every rank, then change anything. A rank never raises alone where the other ranks
would go on into a collective: local errors are agreed on first (in the constructor and load_state_dict with one
all_gather_object, in step() inside the all-reduce the step runs anyway), and every rank raises the same error.
The module-level functions check one value on this rank; ``_AgreementMixin`` runs the collectives that agree.
"""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._backend import check_backend, resolve_backend
from .._validate import FP32_MAX, has_memory, loaded_tensor_problem, real_float
from .._validate import finite_fp32 as _finite_fp32
from ..kernels._checks import check_no_overrides
from ..precision import _grad_keys, _Spans
from ._comm import _sum_of_squares
from ._layout import _bucket_moved, _slot_moved
from ._reduce import _moved_message

_ERROR_TYPES: dict[str, type[Exception]] = {
    t.__name__: t for t in (ValueError, TypeError, RuntimeError, KeyError, IndexError, NotImplementedError)
}


def _real(name: str, value: Any) -> float:
    """A real number or a 1-element real tensor as a float; TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got a tensor of {value.numel()} elements")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        return float(value.item())
    if isinstance(value, numbers.Real):
        return real_float(value)  # (an int too large for a float: inf, which the range check names)
    raise TypeError(f"{name} must be a number or a 1-element tensor, got {type(value).__name__}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of {value.numel()} elements"
    return f"{type(value).__name__} {value!r}"


def _check_lr_tensor(lr: Tensor, where: str) -> None:
    # (read through its methods here and by the launch after the ranks agree: it may run no code of its own)
    check_no_overrides("ZeroAdamW", f"lr of {where}", [lr], indexed=False)
    if lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element (lr of {where} has {lr.numel()} elements)")
    if not lr.is_floating_point():
        raise TypeError(f"a tensor lr must be floating point (lr of {where} is a {lr.dtype} tensor)")
    _check_step_tensor(f"lr of {where}", lr)


def _check_step_tensor(name: str, t: Tensor, written: bool = False) -> None:
    """A tensor the step reads (or, ``written``, writes) with torch ops: dense, with memory of its own (not meta,
    not a tensor subclass, not freed or shrunk in place: torch's ops would read it unchecked and crash), and, when
    written, not an inference tensor (the write would raise after the ranks agreed, on this rank only)."""
    why = f"is a {type(t).__name__}" if not has_memory(type(t)) else loaded_tensor_problem(t)
    if why is not None:
        raise ValueError(f"{name} must be a dense tensor with memory of its own, got one that {why}")
    if written and t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} is an inference tensor: step() writes it, which torch allows only inside "
                         "torch.inference_mode(); make it outside inference mode")  # fmt: skip


def _resolve_group_backend(gi: int, group: dict[str, Any], device: torch.device) -> str:
    """The backend param group ``gi`` runs on ``device`` ("triton" or "reference"), as ``functional.adam_`` resolves
    it; the RuntimeError FusedAdamW's step raises (``backend="triton"`` on CPU tensors without the Triton
    interpreter, or without triton), naming the group, when it cannot run there."""
    try:
        return resolve_backend(group.get("backend"), device)
    except RuntimeError as e:
        raise RuntimeError(f"{e} (backend of param group {gi})") from None


def _check_lr_value(lr: float, where: str) -> None:
    if not (_finite_fp32(lr) and lr >= 0):  # (a finite float32: the kernels compute in float32)
        raise ValueError(f"Invalid learning rate: {lr} (lr of {where})")


def _check_group(gi: int, group: dict[str, Any], read_lr: bool) -> tuple[float | Tensor, float, float, float, float]:
    """Check param group ``gi``'s step values, with torch.optim's messages plus the value's name and the group.

    Returns ``(lr, beta1, beta2, eps, weight_decay)``: the rest as floats, ``lr`` as a float or, when it is a
    tensor, as given (1-element, floating point; its value is read and checked here with ``read_lr``, else on the
    device by ``step()``, which would otherwise need a host sync).
    """
    where = f"param group {gi}"
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        if key not in group:
            raise ValueError(f"{where} has no {key!r}")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        _check_lr_tensor(lr, where)
        if read_lr:
            _check_lr_value(float(lr.item()), where)
    else:
        lr = _real(f"lr of {where}", lr)
        _check_lr_value(lr, where)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas of {where} must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (_real(f"betas[{i}] of {where}", b) for i, b in enumerate(betas))
    for i, beta in enumerate((beta1, beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (betas of {where})")
    eps = _real(f"eps of {where}", group["eps"])
    if not (_finite_fp32(eps) and eps >= 0):
        raise ValueError(f"Invalid epsilon value: {eps} (eps of {where})")
    weight_decay = _real(f"weight_decay of {where}", group["weight_decay"])
    if not (_finite_fp32(weight_decay) and weight_decay >= 0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (weight_decay of {where})")
    check_backend(group.get("backend"))
    return lr, beta1, beta2, eps, weight_decay


_STATE_NAMES = {None: "fp32", "fp32": "fp32", "float32": "fp32", torch.float32: "fp32", "int8": "int8",
                "bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16"}  # fmt: skip


def _state_name(state_dtype: Any) -> str:
    """``state_dtype`` as "fp32", "bf16" or "int8" (FusedAdamW's spellings); ValueError otherwise."""
    try:
        return _STATE_NAMES[state_dtype]
    except (KeyError, TypeError):
        raise ValueError(f"state_dtype must be None/'float32', 'bfloat16' or 'int8', got {state_dtype!r}") from None


def _check_lowbit_amsgrad(gi: int, group: dict[str, Any], state: str) -> None:
    """amsgrad keeps an fp32 running max of exp_avg_sq: refused with low-bit moments (as FusedAdamW refuses it)."""
    if state != "fp32" and group.get("amsgrad"):
        raise ValueError(f"amsgrad needs fp32 states (state_dtype={state!r} was given; amsgrad of param group {gi})")


def _check_state_tensor(st: dict, i: int, key: str, numel: int, expected: str) -> None:
    """``st[key]`` must be a dense floating-point tensor of ``numel`` elements (``expected`` says whence)."""
    where = f"state {key!r} of param {i}"
    if key not in st:
        raise ValueError(f"{where} is missing (the param has state: {sorted(map(str, st))})")
    t = st[key]
    if not isinstance(t, Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_meta:
        raise ValueError(f"{where} must be a dense tensor with data, got {t.layout} on {t.device}")
    if not t.is_floating_point():
        raise ValueError(f"{where} must be a floating-point tensor, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{where} has {t.numel()} elements but {expected}")


def _check_state_step(st: dict, i: int) -> float:
    """``st["step"]`` as a float: a finite count >= 0 (a number or a 1-element real tensor)."""
    where = f"state 'step' of param {i}"
    if "step" not in st:
        raise ValueError(f"{where} is missing (the param has state: {sorted(map(str, st))})")
    value = st["step"]
    if isinstance(value, Tensor) and value.numel() == 1 and not (value.is_complex() or value.dtype == torch.bool):
        step = float(value.item())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        step = float(value)
    else:
        raise ValueError(f"{where} must be a number or a 1-element real tensor, got {_describe(value)}")
    if not (math.isfinite(step) and 0 <= step <= FP32_MAX):
        raise ValueError(f"{where} must be a finite count >= 0 that float32 holds (the count is kept in float32), got "
                         f"{step}")  # fmt: skip
    return step


def _check_max_grad_norm(value: Any) -> float | None:
    if value is None:
        return None
    norm = _real("max_grad_norm", value)
    if not (norm > 0 and math.isfinite(norm)):
        raise ValueError(f"max_grad_norm must be a positive finite number or None, got {norm}")
    return norm


# Step values compared between ranks, per param group (then max_grad_norm, the loss scale's kind and value).
_GROUP_VALUES = ("lr", "betas[0]", "betas[1]", "eps", "weight_decay", "amsgrad", "maximize")
_LOSS_SCALE_KINDS = ("None", "a number", "a tensor", "a loss scaler")
_FP32_TINY = float(torch.finfo(torch.float32).tiny)
# (the grads are divided by loss_scale * world_size in float32: outside float32's normal range it would round to 0
# or inf, and the step would write non-finite params, or fail after the ranks agreed)
_LOSS_SCALE_RANGE = ("loss_scale must be at least float32's smallest normal number ({2:.4g}) and at most "
                     "float32's largest divided by the world size ({3:.4g} / {1}), got {0}")  # fmt: skip
_NONE = -1.0  # max_grad_norm / loss scale None in the compared values (valid ones are > 0)
_FOUND_INF = "loss_scale.found_inf (the loss scaler's overflow flag)"


@dataclass
class _StepInputs:
    """A step's values, checked on this rank (tensor values are checked on the device, in the all-reduce)."""

    lrs: list[float | Tensor]  # per group: a float, or a 1-element tensor on the params' device
    backends: list[str]  # per group: "triton" or "reference", resolved for the params' device
    floats: list[tuple[float, float, float, float]]  # per group: beta1, beta2, eps, weight_decay
    max_grad_norm: float | None
    loss_scale: float | Tensor | None  # a float, or a 0-d float64 tensor on the params' device
    scaler_found_inf: Tensor | None  # the loss scaler's flag, set when a step is skipped
    values: list[float]  # compared between ranks (0.0 where the value is a tensor: see ``tensors``)
    tensors: list[tuple[int, Tensor, str]]  # (index in values, 0-d float64 tensor on the device, its name)
    flags: list[tuple[bool, bool]]  # per group: amsgrad, maximize (read once, here: the launches read these)


def _bit_pieces(values: Tensor, shifts: Tensor) -> Tensor:
    """float64 values -> the four 16-bit pieces of each one's bits, then their squares (float64, exact).

    Summed over W ranks by an all-reduce, the values were bit-identical on every rank iff ``W * sum(p^2) ==
    sum(p)^2`` for each piece (equality in Cauchy-Schwarz); the sums are integers below 2^53 for W < 2^21.
    """
    bits = values.contiguous().view(torch.int64).unsqueeze(-1)
    pieces = ((bits >> shifts) & 0xFFFF).to(torch.float64).reshape(-1)
    return torch.cat([pieces, pieces * pieces])


def _differing(sums: list[float], world: int) -> list[int]:
    """Indices of the values that were not bit-identical on every rank, from the all-reduced ``_bit_pieces``."""
    n = len(sums) // 2
    return sorted({k // 4 for k in range(n) if int(sums[k]) ** 2 != world * int(sums[n + k])})


def _by_rank(values: list[str]) -> str:
    """'0.001 on ranks 0, 1, 3 but 0.003 on rank 2' (more than two values: separated by '; ')."""
    groups: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    parts = [f"{v} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}" for v, rs in groups.items()]
    return " but ".join(parts) if len(parts) <= 2 else "; ".join(parts)


def _out_of_step_message(n_passes: int, n_zeroed: int, world: int) -> str:
    """The out-of-step error: ``n_passes`` ranks began another synced pass while the others stepped, and ``n_zeroed``
    ranks had called zero_grad() after their last synced pass. Built from the counts of one all-reduce (the step's
    agreement, paired with the pass's opening all-reduce), so every rank raises the same message."""
    why = f"{n_passes} of {world} ranks began another one while the others stepped"
    if n_zeroed:
        why += (
            "; a pass discarded with zero_grad() is left out of the count only when every rank calls zero_grad() "
            f"after its last synced pass: {n_zeroed} of {world} did"
        )
    return (
        f"ZeroAdamW.step: the ranks ran different numbers of synced backward passes since the last step ({why}): "
        "every rank must make the same backward, no_sync, zero_grad and step calls. The grads of these passes are "
        "not all reduced and no step was taken: call zero_grad() on every rank"
    )


_CLEARED_ON_SOME = (
    "ZeroAdamW.step: the grads were zeroed after the last step on {} of {} ranks (opt.zero_grad(), "
    "model.zero_grad(), p.grad = None, or set by hand: this rank's grad shards dropped them, as zero_grad() does) but "
    "{} rank(s) kept reduced grads "
    "from before the last step: every rank must make the same zero_grad calls. The ranks' grad shards no longer "
    "belong to one step and no step was taken: call zero_grad() on every rank (a rank that had no grads in the last "
    "step holds the others' kept grads in its shards: after such a step, clear grads with opt.zero_grad())"
)


class _AgreementMixin:
    """The ranks' agreement: on the constructor's arguments, on each step's values and on checkpoints."""

    def _check_same_on_all_ranks(
        self, config: tuple | None, group_values: list[tuple] | None, local_error: Exception | None
    ) -> None:
        """One all_gather_object of every rank's arguments, hyper-parameters, param signature and error: every
        rank raises the same exception if any rank had an error or anything differs between ranks."""
        err = None if local_error is None else (type(local_error).__name__, str(local_error))
        sig = None
        if err is None:
            sig = [(g, tuple(p.shape), str(p.dtype), p.device.type)
                   for g, p in zip(self._group_of, self._params, strict=True)]  # fmt: skip
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (config, group_values, sig, err), group=self.process_group)
        for r, (_, _, _, e) in enumerate(gathered):
            if e is not None:
                raise _ERROR_TYPES.get(e[0], RuntimeError)(f"ZeroAdamW: {e[1]} (on rank {r}; every rank raises this)")
        cfg0, values0, sig0, _ = gathered[0]
        for r, (cfg, values, s, _) in enumerate(gathered[1:], start=1):
            if cfg != cfg0:
                names = ("stage", "bucket_cap_mb", "align", "master_weights", "reduce_dtype", "world_size",
                         "max_grad_norm", "state_dtype")  # fmt: skip
                pairs = zip(names, cfg0, cfg, strict=True)
                diff = [f"{n}={a!r} on rank 0 but {b!r} on rank {r}" for n, a, b in pairs if a != b]
                raise ValueError("ZeroAdamW: constructor arguments differ between ranks: " + "; ".join(diff))
            if len(values) != len(values0):
                raise ValueError(
                    f"ZeroAdamW: param groups differ between ranks: {len(values0)} on rank 0 but {len(values)} on "
                    f"rank {r}; every rank must pass the same param groups"
                )
            if len(s) != len(sig0):
                raise ValueError(
                    f"ZeroAdamW: params differ between ranks: rank 0 has {len(sig0)} params, rank {r} has {len(s)}"
                )
            for i, (a, b) in enumerate(zip(sig0, s, strict=True)):
                if a != b:
                    raise ValueError(
                        f"ZeroAdamW: params differ between ranks: param {i} is (group {a[0]}, shape {a[1]}, "
                        f"{a[2]}, on {a[3]}) on rank 0 but (group {b[0]}, shape {b[1]}, {b[2]}, on {b[3]}) on rank "
                        f"{r}; every rank must pass the same params in the same order, on the same kind of device"
                    )
            for gi, (a, b) in enumerate(zip(values0, values, strict=True)):
                for name, x, y in zip(_GROUP_VALUES, a, b, strict=True):
                    if x != y:
                        raise ValueError(
                            f"ZeroAdamW: {name} of param group {gi} differs between ranks ({x!r} on rank 0 but "
                            f"{y!r} on rank {r}): every rank must pass the same hyper-parameters"
                        )

    def _loss_scale_fits(self, scale: float) -> bool:
        return _FP32_TINY <= scale and scale * self.world_size <= FP32_MAX

    def _step_inputs(self, loss_scale: Any, unexpected: dict[str, Any]) -> _StepInputs:
        """Check this rank's step values (raising the first problem) and collect what the ranks compare."""
        if unexpected:
            key = sorted(unexpected)[0]
            hint = ""
            if key in ("grad_scale", "found_inf"):
                hint = (
                    ": ZeroAdamW unscales and skips steps itself, from the global grad norm; pass the loss scale as "
                    "step(loss_scale=...) (a float, a 1-element tensor or a loss scaler such as "
                    "fused_ops.DynamicLossScaler)"
                )
            raise TypeError(f"got an unexpected keyword argument {key!r}{hint}")
        if "grad_scale" in self.__dict__ or "found_inf" in self.__dict__:
            # GradScaler set them and deletes them only after a step that returns: removed here, so that once the
            # user drops GradScaler, plain steps work again.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise RuntimeError(
                "ZeroAdamW does not work with torch.amp.GradScaler (its overflow check reads the full local "
                "grads of one rank, which ZeRO does not keep): call optimizer.step(loss_scale=scale) and update "
                "the scale from optimizer.last_found_inf"
            )
        dev = self._device
        values: list[float] = []
        tensors: list[tuple[int, Tensor, str]] = []
        lrs: list[float | Tensor] = []
        backends: list[str] = []
        floats: list[tuple[float, float, float, float]] = []
        flags: list[tuple[bool, bool]] = []
        for gi, group in enumerate(self.param_groups):
            lr, beta1, beta2, eps, weight_decay = _check_group(gi, group, read_lr=False)
            _check_lowbit_amsgrad(gi, group, self.state_dtype)
            backends.append(_resolve_group_backend(gi, group, dev))
            if isinstance(lr, Tensor) and lr.device != dev:
                if lr.device.type == "cpu":  # read on the host (no sync); a tensor elsewhere is copied over
                    lr = float(lr.item())
                    _check_lr_value(lr, f"param group {gi}")
                else:
                    lr = lr.to(dev)
            if isinstance(lr, Tensor):
                tensors.append((len(values), lr.detach().to(torch.float64).reshape(()), f"lr of param group {gi}"))
                values.append(0.0)
            else:
                values.append(lr)
            # (each flag's truth value read once, here, before any group is stepped: the launches read these)
            flags.append((bool(group["amsgrad"]), bool(group["maximize"])))
            values += [beta1, beta2, eps, weight_decay, float(flags[-1][0]), float(flags[-1][1])]
            lrs.append(lr)
            floats.append((beta1, beta2, eps, weight_decay))
        max_grad_norm = _check_max_grad_norm(self.max_grad_norm)
        values.append(_NONE if max_grad_norm is None else max_grad_norm)

        scale: Any = loss_scale
        scaler_found_inf = None
        if loss_scale is None:
            kind = 0
        elif isinstance(loss_scale, Tensor):
            kind = 2
        elif isinstance(loss_scale, numbers.Real) and not isinstance(loss_scale, bool):
            kind = 1
        elif isinstance(getattr(loss_scale, "scale", None), Tensor):
            kind, scale = 3, loss_scale.scale
            scaler_found_inf = getattr(loss_scale, "found_inf", None)
            unscaled = getattr(loss_scale, "_unscaled", None)  # (DynamicLossScaler: what its unscale_ divided)
            grads = [p.grad for group in self.param_groups for p in group["params"]]
            if self._sentinels:  # (no grads: see _give_sentinels)
                grads = [None if g is s else g for g, s in zip(grads, self._sentinels, strict=True)]
            keys = _grad_keys(grads) if isinstance(unscaled, _Spans) and unscaled else None
            if (
                keys is not None
                and not unscaled.isdisjoint(keys)
                and not (
                    getattr(loss_scale, "_forget_freed", lambda: False)() and loss_scale._unscaled.isdisjoint(keys)
                )
            ):  # (the spans of grads freed since they were unscaled are forgotten first: see DynamicLossScaler)
                raise RuntimeError(
                    "loss_scale: the loss scaler's unscale_() already divided grads of this optimizer's params by "
                    "the scale since its last update(); step(loss_scale=scaler) divides them itself (do not unscale "
                    "them first)"
                )
            if scaler_found_inf is not None and not (
                isinstance(scaler_found_inf, Tensor) and scaler_found_inf.numel() == 1
                and scaler_found_inf.is_floating_point()
            ):  # fmt: skip
                raise ValueError(
                    "loss_scale.found_inf (the loss scaler's overflow flag) must be a 1-element floating-point "
                    f"tensor, got {_describe(scaler_found_inf)}"
                )
            if scaler_found_inf is not None:
                _check_step_tensor(_FOUND_INF, scaler_found_inf, written=True)
        else:
            raise TypeError(
                "loss_scale must be None, a number, a 1-element tensor or a loss scaler with a `scale` tensor, got "
                f"{type(loss_scale).__name__}"
            )
        values.append(float(kind))
        # (tensors the step reads or writes besides its own: they may share no memory with what it writes)
        given = [(f"lr of param group {gi}", lr) for gi, lr in enumerate(lrs) if isinstance(lr, Tensor)]
        if isinstance(scale, Tensor):
            name = "loss_scale" if kind == 2 else "loss_scale.scale"
            if scale.numel() != 1:
                raise ValueError(f"{name} must be a number or a 1-element tensor, got {scale.numel()} elements")
            if not scale.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {scale.dtype}")
            _check_step_tensor(name, scale)
            given.append((name, scale))
            scale = scale.detach().to(dev, torch.float64).reshape(())
            tensors.append((len(values), scale, "loss_scale"))
            values.append(0.0)
        elif scale is not None:
            scale = float(scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"loss_scale must be a finite number > 0, got {scale}")
            if not self._loss_scale_fits(scale):
                raise ValueError(_LOSS_SCALE_RANGE.format(scale, self.world_size, _FP32_TINY, FP32_MAX))
            values.append(scale)
        else:
            values.append(_NONE)
        if scaler_found_inf is not None:
            given.append((_FOUND_INF, scaler_found_inf))
        if given:
            self._check_apart(given)
        return _StepInputs(lrs, backends, floats, max_grad_norm, scale, scaler_found_inf, values, tensors, flags)

    def _check_apart(self, given: list[tuple[str, Tensor]]) -> None:
        """The step's tensors from outside (a tensor lr, loss_scale, a scaler's scale and found_inf: one element each,
        with memory, checked before) share no memory with what the step writes: the params' flat buffers, the master,
        moment and reduced-grad shards, the staging buffers, the step counts and ``skipped_steps`` (the fused op
        would refuse an lr there on the ranks whose shard holds it only, after the ranks agreed; a torch op would
        read a value the step already changed); and the scaler's ``found_inf``, which the step writes, none with the
        others. Host reads only: a pass over the buckets' buffers and a bisection in the step counts' addresses."""
        dev = self._device
        spans = [(name, t, t.data_ptr(), t.data_ptr() + t.element_size()) for name, t in given]
        for name, t, lo, hi in spans:
            if t.device == dev:  # (on another device it is copied over, or read on the host)
                what = self._own_memory_at(lo, hi)
                if what is not None:
                    raise ValueError(
                        f"{name} shares memory with {what} of this ZeroAdamW, which the step writes: pass a tensor "
                        f"of its own (e.g. a clone())"
                    )
        if given[-1][0] == _FOUND_INF:
            _, flag, lo, hi = spans[-1]
            for name, t, a, e in spans[:-1]:
                if t.device == flag.device and a < hi and lo < e:
                    raise ValueError(
                        f"{_FOUND_INF} shares memory with {name}: the step writes the flag after reading {name}; "
                        "pass tensors of their own"
                    )

    def _own_memory_at(self, lo: int, hi: int) -> str | None:
        """What this ZeroAdamW's step writes in the bytes ``[lo, hi)`` of its device, or None."""
        for b in self._buckets:
            for what, t in (
                (f"the params (the flat buffer of bucket {b.index})", b.param_flat), ("the master weights", b.master),
                ("the reduced grads", b.grad), ("the exp_avg shard", b.exp_avg), ("the exp_avg_sq shard", b.exp_avg_sq),
                ("the max_exp_avg_sq shard", b.max_exp_avg_sq), ("the exp_avg scales", b.exp_avg_scale),
                ("the exp_avg_sq scales", b.exp_avg_sq_scale),
            ):  # fmt: skip
                if t is not None and t.data_ptr() < hi and lo < t.data_ptr() + t.nbytes:
                    what = what if what.startswith("the params") else f"{what} of bucket {b.index}"
                    return what
        for pool in self._pools.values():
            for t in pool.flat:
                if t.data_ptr() < hi and lo < t.data_ptr() + t.nbytes:
                    return "a staging buffer of the reduce-scatters"
        t = self.skipped_steps
        if t.data_ptr() < hi and lo < t.data_ptr() + t.nbytes:
            return "skipped_steps"
        # The step counts: one 4-byte tensor each, written in place; their addresses are read now (cheap), the sort of
        # them kept while they are the same.
        ptrs = [s.data_ptr() for s in self._steps]
        table = self.__dict__.get("_step_addresses")
        if table is None or table[2] != ptrs:
            order = sorted(range(len(ptrs)), key=ptrs.__getitem__)
            table = self._step_addresses = ([ptrs[i] for i in order], order, ptrs)
        starts, order, _ = table
        k = bisect.bisect_right(starts, lo) - 1  # the last count starting at or before lo
        for j in (k, k + 1):  # (that one, or the next one, starting inside [lo, hi))
            if 0 <= j < len(starts) and starts[j] < hi and lo < starts[j] + 4:
                return f"the step count of param {order[j]}"
        return None

    def _check_layout(self) -> bool:
        """The param groups still hold exactly the params laid out at construction, and every param is still its
        view of its bucket (address, dtype, shape, strides, device; the bucket's storage alive): checked at every
        step, attribute reads only. Raises the first problem (RuntimeError). Returns whether this rank holds grads
        its stage-2 shards lack (``p.grad`` set after the last synced backward reduced its bucket: by hand, under
        no_sync, for a param unfrozen after construction, or after zero_grad)."""
        groups = self.param_groups
        if len(groups) != len(self._group_params):
            raise RuntimeError(
                f"param_groups has {len(groups)} groups but ZeroAdamW was built with {len(self._group_params)}: its "
                "flat layout is fixed at construction, so groups cannot be added to or removed from param_groups "
                "(build a new ZeroAdamW instead)"
            )
        for gi, (g, laid_out) in enumerate(zip(groups, self._group_params, strict=True)):
            params = g.get("params") if isinstance(g, dict) else None
            if not isinstance(params, (list, tuple)) or len(params) != len(laid_out):
                n = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
                raise RuntimeError(
                    f"param group {gi} has {n} params but ZeroAdamW laid out {len(laid_out)}: params cannot be "
                    "added to or removed from a group after construction (build a new ZeroAdamW instead)"
                )
            for j, (p, q) in enumerate(zip(params, laid_out, strict=True)):
                if p is not q:
                    raise RuntimeError(
                        f"param {j} of param group {gi} is not the tensor ZeroAdamW was built with: params cannot "
                        "be replaced in param_groups after construction (build a new ZeroAdamW instead)"
                    )
        unreduced = self._unsynced_grads or self._zeroed
        stage2 = self.stage == 2 and self._rounds_since_step > 0
        for b in self._buckets:
            what = _bucket_moved(b)  # (a buffer moved into shared memory with its params: its addresses re-read)
            if what is not None:
                raise RuntimeError(
                    f"the storage of ZeroAdamW's flat buffer holding params {[s.index for s in b.slots]} {what}: "
                    "ZeroAdamW owns the params' storage; build ZeroAdamW after the model has its final device and "
                    "dtype, and leave the params' storage to it"
                )
            for s in b.slots:
                why = _slot_moved(s, b)
                if why is not None:
                    raise RuntimeError(_moved_message(f"param {s.index} (shape {tuple(s.shape)})", why))
                if stage2 and s.param.grad is not None and s.param.grad is not self._sentinels[s.index]:
                    unreduced = True
        return unreduced and stage2

    def _agreement_size(self) -> int:
        """Elements of the step's all-reduce (and of the one opening a second synced pass): the sum of squares, the
        error count, eight counts of ranks (beginning a pass, zero_grad after backward, grads not reduced, a synced
        pass since the last step, grads set by hand over held grads, all held grads zeroed by the user since the
        last step, some kept: see ``_clear_if_all_zeroed``; stage 1, zero_grad after a backward since the last step),
        in stage 2 the count of ranks whose shards will hold grads of each param (``_held_after_step``), and the bits
        of the compared values; fixed at construction (the group count is checked before it is used)."""
        held = len(self._params) if self.stage == 2 else 0
        return 10 + held + 8 * (len(_GROUP_VALUES) * len(self._group_params) + 3)

    def _step_value_names(self) -> list[str]:
        names = [f"{v} of param group {gi}" for gi in range(len(self.param_groups)) for v in _GROUP_VALUES]
        return names + ["max_grad_norm", "loss_scale", "loss_scale"]

    def _format_step_value(self, k: int, value: float) -> str:
        n = len(_GROUP_VALUES) * len(self.param_groups)
        if k < n and _GROUP_VALUES[k % len(_GROUP_VALUES)] in ("amsgrad", "maximize"):
            return str(bool(value))
        if k == n + 1:  # the loss scale's kind
            return _LOSS_SCALE_KINDS[int(value)] if value in range(len(_LOSS_SCALE_KINDS)) else repr(value)
        if k >= n and value == _NONE:
            return "None"
        return repr(value)

    def _agree_on_step(
        self,
        shards: list[Tensor],
        inputs: _StepInputs | None,
        error: Exception | None,
        zeroed: bool,
        unreduced: bool,
        had_pass: bool = False,
        replacing: bool = False,
        fault: Exception | None = None,
        zeroed_since_step: bool = False,
    ) -> tuple[Tensor, bool, bool] | None:
        """The step's all-reduce: the grad shards' sum of squares, the number of ranks with a problem (found on the
        host, or in a tensor value checked on the device), the facts that decide the collectives still to come
        (ranks beginning another synced pass instead of stepping, ranks that called zero_grad after backward,
        ranks holding grads not reduced yet, ranks with grads set by hand over held grads), and the bits of every
        compared value (``_bit_pieces``). Its size is fixed at construction. Raises on every rank alike (they all
        read the same sums) if a rank had a problem, the ranks are out of step, or the values differ; returns the
        global sum of squares (a 0-d float64 device tensor), whether every rank reduces its unreduced grads now
        (``_reduce_all(late=True)``) and whether some rank set grads by hand over held grads (``_agree_on_drops``
        then says which params' reduced grads every rank drops first). Stage 2 also sends, per param, whether this
        rank will hold grads of it once the step commits (``_held_after_step``): the params some rank holds grads of
        (``_held_agreed``, the same on every rank; ``_commit_reduce`` keeps it as ``_held_any``).

        Returns None, without raising, when this all-reduce paired with the opening all-reduce of a synced pass that
        other ranks began after a zero_grad() that every rank called after its last synced pass (``zeroed`` here):
        step() then stands in for that pass and agrees again (see ``_read_agreement``).

        ``zeroed_since_step`` (stage 1): zero_grad() was called after a backward since the last step; ``zeroed`` then
        says whether no backward came since.

        ``fault``: an exception this rank met since the step began (an allocation of the reduction, say). Such a
        fault, or one met here while computing the sum of squares or building the vector (out of memory), is sent
        as this rank's problem, in the buffer allocated at construction (no allocation): every rank raises, this
        rank its own exception, the others the agreed error, and nothing has changed (a rank raising alone would
        leave the others waiting in this all-reduce, and its retry would pair with a collective of another size)."""
        cleared = (float(getattr(self, "_cleared_all", False)), float(getattr(self, "_kept_old", False)))
        try:
            if fault is not None:
                raise fault
            sumsq = _sum_of_squares(shards)
            n_values = len(_GROUP_VALUES) * len(self._group_params) + 3
            tensors = inputs.tensors if error is None and inputs is not None else []
            host = [1.0 if error is not None else 0.0] + ([0.0] * n_values if inputs is None else inputs.values)
            # Where the tensor values go, and which must be > 0 (a loss scale) rather than >= 0 (an lr): one copy.
            host += [float(k) for k, _, _ in tensors] + [float(name == "loss_scale") for _, _, name in tensors]
            flat = torch.tensor(host, dtype=torch.float64, device=self._device)
            flag, values = flat[:1], flat[1 : 1 + n_values]
            if tensors:
                where, positive = flat[1 + n_values :].view(2, -1)
                given = torch.stack([t for _, t, _ in tensors])
                values = values.index_copy(0, where.long(), given)
                scale_ok = (given >= _FP32_TINY) & (given * self.world_size <= FP32_MAX)  # (a loss scale: as above)
                ok = torch.isfinite(given) & torch.where(positive == 1, scale_ok, given >= 0)
                flag = flag + (~ok).sum(dtype=torch.float64)
            facts = torch.tensor([0.0, float(zeroed), float(unreduced), float(had_pass), float(replacing), *cleared,
                                  float(zeroed_since_step), *self._held_after_step()],
                                 dtype=torch.float64, device=self._device)  # fmt: skip
            vec = torch.cat([sumsq.reshape(1).to(torch.float64), flag, facts, _bit_pieces(values, self._shifts)])
        except Exception as e:  # noqa: BLE001 - this rank's problem, agreed on below, then raised on every rank
            fault = e
            if error is None:
                error = e
            vec = self._agree_buf  # (in place only: the flag and the facts; the compared bits are not read)
            vec.zero_()
            # (the held counts stay 0: the step fails on every rank)
            facts_ = (1.0, 0.0, float(zeroed), float(unreduced), float(had_pass), float(replacing), *cleared,
                      float(zeroed_since_step))  # fmt: skip
            for k, v in enumerate(facts_):
                vec[1 + k] = v
        try:
            return self._read_agreement(vec, inputs, error, had_pass)
        except Exception:
            if fault is not None:  # (its own exception on the rank that met it; the agreed one is its context)
                raise fault  # noqa: B904
            raise

    def _read_agreement(
        self, vec: Tensor, inputs: _StepInputs | None, error: Exception | None, had_pass: bool
    ) -> tuple[Tensor, bool, bool] | None:
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.process_group)
        sums = vec[1:].tolist()  # the step's one host read
        counts = (int(v) for v in sums[1:9])
        n_passes, n_zeroed, n_unreduced, n_had_pass, n_replacing, n_cleared, n_kept, n_zeroed_since = counts
        n_held = len(self._params) if self.stage == 2 else 0
        if n_passes:  # paired with the opening all-reduce of a pass other ranks began
            if n_zeroed == self.world_size:
                # Every rank called zero_grad() after its last synced pass (this one: ``zeroed``; those beginning the
                # pass: in its opening all-reduce), e.g. a batch discarded on every rank. The passes before it ran the
                # same reduce-scatters on every rank and every rank dropped their shards, so only the passes since
                # count, as after a step: this rank has none, and stands in for the new one as a rank without a
                # backward does (step() reduces its p.grad, paired with that pass's reduce-scatters, then agrees
                # again, with their step). Nothing was read from these sums (they mix a step with a pass).
                return None
            self._match_other_ranks_round()  # (its reduce-scatters, then raise, as the ranks in that pass will)
            # (a rank that stood in for the others' first pass keeps it as its own: every rank then counts passes,
            # and every rank refuses to step until zero_grad(), the shards holding different passes)
            self._stood_in = not had_pass
            self._out_of_step = _out_of_step_message(n_passes, n_zeroed, self.world_size)
            raise RuntimeError(self._out_of_step)
        # Stage 2, some ranks ran a synced pass and the others stood in for it (reduced p.grad before this
        # all-reduce): should the step fail, the stand-ins keep that reduction as their pass (see step()), so that
        # every rank counts one pass and a retry or the next backward runs the same collectives everywhere.
        # (the late agreement, after every rank reduced, sends no pass counts: it keeps what the first one found)
        self._stood_in = self._stood_in or (not had_pass and 0 < n_had_pass < self.world_size)
        if sums[0] > 0:
            self._raise_step_error(inputs, error)
        # Some rank emptied its grads with zero_grad() after its last backward while another made no such call since
        # the last step. (Stage 1, a rank that zeroed and ran another backward since, like a batch discarded on
        # every rank, is fine: its p.grad, read at step(), holds what came after. Stage 2 sends ``zeroed`` for both:
        # there the shards of a rank that ran another pass since still hold both passes' sums, see _zeroed_since_step.)
        if n_zeroed and n_zeroed_since < self.world_size:
            raise RuntimeError(
                f"ZeroAdamW.step: zero_grad() was called between backward and step on {n_zeroed} of "
                f"{self.world_size} ranks: the ranks' reduced grads no longer belong to one step; every rank must "
                "make the same zero_grad, backward and no_sync calls (the step changed nothing on any rank)"
            )
        if n_cleared and n_kept:
            # (the ranks that cleared dropped their shards, as zero_grad() does: only zero_grad() on every rank
            # brings the shards back into one state)
            self._out_of_step = _CLEARED_ON_SOME.format(n_cleared, self.world_size, n_kept)
            raise RuntimeError(self._out_of_step)
        differ = _differing(sums[9 + n_held :], self.world_size)
        if differ:
            self._raise_step_values_differ(inputs, differ)
        self._held_agreed = [v > 0 for v in sums[9 : 9 + n_held]]  # (stage 2: see _held_after_step)
        # (whether each param some rank holds grads of is held by every rank: see _note_hand_set_grads)
        self._held_alike_agreed = all(v == 0 or v >= self.world_size for v in sums[9 : 9 + n_held])
        # (Stage 1 reduces p.grad before the agreement anyway: nothing to reduce late.)
        return vec[0], self.stage == 2 and (n_unreduced > 0 or n_zeroed == self.world_size), n_replacing > 0

    def _agree_on_drops(self) -> tuple[frozenset, str | None]:
        """Stage 2, some rank set grads by hand over grads its shards hold (``_note_hand_set``; agreed by the step's
        all-reduce): one all-reduce of two counts per param, the ranks that replace its held grads and the ranks
        that hold grads of it without replacing them. Returns the params whose reduced grads every rank drops (the
        shards hold only their sum over the ranks, so one rank's share cannot be taken out): those replaced on some
        rank; and the same message on every rank if one of them has held grads on a rank that did not replace them
        (those grads would be lost): step() raises it as a RuntimeError after the late reduction's agreement, so
        that a grad error found there comes first."""
        n = len(self._params)
        counts = self._drop_buf  # (allocated at construction: a problem here is agreed on, see below)
        fault = None
        try:
            mine = self._drop_host
            mine.zero_()
            for i in self._replaced:
                mine[i] = 1.0
            for i, held in enumerate(self._held):
                if held and i not in self._replaced:
                    mine[n + i] = 1.0
            counts.copy_(mine)
        except Exception as e:  # noqa: BLE001 - agreed on: every rank raises
            fault = e
            counts.zero_()
            counts[2 * n] = 1.0  # (the count of ranks with a problem)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.process_group)
        sums = counts.tolist()
        if sums[2 * n] > 0:
            try:
                self._raise_step_error(None, fault)
            except Exception:
                if fault is not None:
                    raise fault  # noqa: B904 - its own exception on the rank that met it
                raise
        replaced, kept = [int(v) for v in sums[:n]], [int(v) for v in sums[n : 2 * n]]
        conflict = None
        for i in range(n):
            if replaced[i] and kept[i] and conflict is None:
                p = self._params[i]
                conflict = (
                    f"ZeroAdamW.step: the grad of param {i} (shape {tuple(p.shape)}) was set by hand (p.grad = ...), "
                    "or cleared after the last step (model.zero_grad(), p.grad = None), "
                    f"on {replaced[i]} of {self.world_size} ranks over grads reduced there before (by a synced "
                    "backward, or kept from before the last step without zero_grad(), as torch keeps p.grad), which "
                    f"it replaces, as in torch; but {kept[i]} rank(s) hold reduced grads of it that they did not "
                    "replace, and stage 2 keeps only their sum over the ranks, so one rank's share cannot be replaced: "
                    "set or clear it on every rank that holds reduced grads of it, or call zero_grad() before (the "
                    "step changed nothing on any rank)"
                )
        return frozenset(i for i in range(n) if replaced[i]), conflict

    def _raise_step_error(self, inputs: _StepInputs | None, error: Exception | None) -> None:
        """Some rank had a problem: every rank gets every rank's description (the error path's own collective,
        which every rank reaches) and raises the first one."""
        local = None if error is None else (type(error).__name__, str(error))
        if local is None and inputs is not None:
            for _, t, name in inputs.tensors:
                v = float(t.item())
                if name == "loss_scale" and not (math.isfinite(v) and v > 0):
                    local = ("ValueError", f"loss_scale must be a finite number > 0, got {v}")
                elif name == "loss_scale" and not self._loss_scale_fits(v):
                    local = ("ValueError", _LOSS_SCALE_RANGE.format(v, self.world_size, _FP32_TINY, FP32_MAX))
                elif name != "loss_scale" and not (math.isfinite(v) and v >= 0):
                    local = ("ValueError", f"Invalid learning rate: {v} ({name})")
                if local is not None:
                    break
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local, group=self.process_group)
        for r, err in enumerate(gathered):
            if err is not None:
                kind, msg = err
                raise _ERROR_TYPES.get(kind, RuntimeError)(
                    f"ZeroAdamW.step: {msg} (on rank {r}; the step changed nothing on any rank)"
                )
        raise RuntimeError("ZeroAdamW.step: a rank found an invalid step value but could not describe it")

    def _raise_step_values_differ(self, inputs: _StepInputs | None, differ: list[int]) -> None:
        mine = list(inputs.values) if inputs is not None else []
        if inputs is not None:
            for k, t, _ in inputs.tensors:
                mine[k] = float(t.item())
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.process_group)
        names = self._step_value_names()
        k = differ[0]
        desc = _by_rank([self._format_step_value(k, v[k]) if v else "?" for v in gathered])
        also = sorted({names[j] for j in differ[1:]} - {names[k]})
        raise ValueError(
            f"ZeroAdamW.step: {names[k]} differs between ranks ({desc})"
            + (f"; so do {', '.join(also)}" if also else "")
            + ": every rank must step with the same values (the step changed nothing on any rank)"
        )

    def _raise_if_any_rank_failed(self, error: str | None, what: str, same: tuple[str, Any] | None = None) -> None:
        """One all_gather_object: every rank raises the same ValueError if any rank had an error, or if the
        argument ``same = (name, value)`` differs between ranks."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (error, same), group=self.process_group)
        for r, (err, _) in enumerate(gathered):
            if err is not None:
                raise ValueError(f"ZeroAdamW.{what} failed on rank {r}: {err}")
        values = [repr(v[1]) for _, v in gathered] if same is not None else []
        if any(v != values[0] for v in values):
            raise ValueError(f"ZeroAdamW.{what}: {same[0]} differs between ranks ({_by_rank(values)})")

    def _agree_on_load(self, error: str | None, summary: tuple | None, what: str = "load_state_dict") -> None:
        """One all_gather_object: any rank's error, else any difference between the ranks' hyper-parameters, step
        counts and checkpoint descriptions, raises the same ValueError on every rank.

        ``summary`` is ``(groups, steps, described)``: ``described`` lists ``(what, description)`` pairs that must
        be the same on every rank (the checkpoint's kind; for a DCP state dict, each param's key and pieces)."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (error, summary), group=self.process_group)
        for r, (err, _) in enumerate(gathered):
            if err is not None:
                raise ValueError(f"ZeroAdamW.{what} failed on rank {r} (nothing was loaded on any rank): {err}")
        groups0, steps0, described0 = gathered[0][1]
        for r, (_, (groups, steps, described)) in enumerate(gathered[1:], start=1):
            diff = None
            for gi, (a, b) in enumerate(zip(groups0, groups, strict=True)):
                for name, x, y in zip(_GROUP_VALUES, a, b, strict=True):
                    if x != y and diff is None:
                        diff = f"{name} of param group {gi} is {x!r} on rank 0 but {y!r} on rank {r}"
            for i, (x, y) in enumerate(zip(steps0, steps, strict=True)):
                if x != y and diff is None:
                    diff = f"state 'step' of param {i} is {x!r} on rank 0 but {y!r} on rank {r}"
            for (label, x), (_, y) in zip(described0, described):
                if x != y and diff is None:
                    diff = f"{label} is {x} on rank 0 but {y} on rank {r}"
            if diff is None and len(described0) != len(described):
                diff = f"the checkpoint on rank 0 is not of the same kind as on rank {r}"
            if diff is not None:
                raise ValueError(
                    f"ZeroAdamW.{what}: the checkpoints given to the ranks differ: {diff}; every rank must "
                    "load the same hyper-parameters and step counts (nothing was loaded on any rank)"
                )
