"""The public functional API: multi-tensor ops over lists of tensors.

Each function checks its arguments, groups tensors by (device, dtype) and calls one custom op per group
(``fused_ops._ops``), which runs the Triton kernel (one launch per group) or the plain-torch path.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ops
from ._backend import resolve_backend
from ._validate import check_memory as _check_memory
from ._validate import check_scalar, check_storage, finite_fp32, first_without_storage, self_overlapping
from ._validate import has_memory as _has_memory
from ._validate import outside_storage as _outside_storage
from .kernels._checks import check_no_overrides, class_overrides, no_user_code, plain_value

__all__ = ["adam_", "flatten", "unflatten", "unflatten_copy_", "cast_", "unscale_", "grad_norm", "clip_grad_norm_"]


def _check_finite(name: str, value: float) -> None:
    """A finite float32 (the kernels compute in float32, where 1e39 is inf; torch's fused kernels refuse it)."""
    if not finite_fp32(value):
        raise ValueError(f"{name} must be finite in float32 (|x| <= {_FP32_MAX:.4g}), got {value}")


def _check_adam_number(name: str, value, bools: bool = False) -> None:
    """A number argument of :func:`adam_` (a bool only where ``bools``: torch.optim.AdamW takes ``lr=True``, ``eps``
    and ``weight_decay`` too, and refuses a bool beta), or a 1-element tensor, finite in float32."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"adam_: {name} must be a number or a 1-element tensor, got a tensor of {value.numel()} "
                             "elements")  # fmt: skip
    elif not isinstance(value, numbers.Real) or isinstance(value, bool) and not bools:
        raise TypeError(f"adam_: {name} must be a number, got {type(value).__name__} {value!r}")
    _check_finite(f"adam_: {name}", value)


@no_user_code
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
        grads: one per param, same shape; the param's dtype, or fp32 (e.g. fp32-accumulated grads of bf16
            params).
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs: fp32 states, one per param (``max_exp_avg_sqs`` only with
            ``amsgrad``). Updated in place.
        state_steps: fp32 0-d step counts, one per param, on the params' device; incremented here (as in
            torch.optim). Leave out and pass ``step`` to use one step number (>= 1) for every tensor.
        lr: float, or a 1-element tensor on the params' device (no recompilation, no host sync).
        beta1, beta2, eps, weight_decay, amsgrad, maximize: as torch.optim.Adam's (floats; ``beta1``/``beta2`` in
            [0, 1), ``eps`` and ``weight_decay`` >= 0, all finite in float32).
        decoupled_weight_decay: AdamW's decay (``param *= 1 - lr * weight_decay``) instead of Adam's L2 term
            added to the grad.
        step: with no ``state_steps``, the step number (>= 1) of every tensor, for the bias corrections;
            ignored when ``state_steps`` are given.
        grad_scale: optional 1-element tensor; grads are divided by it inside the kernel.
        found_inf: optional 1-element tensor; when non-zero the step is a no-op on the device: params,
            states and step counts are unchanged (no host sync).
        master_params: optional fp32 master weights, one per (bf16/fp16) param: the update runs on them in
            fp32 and the params receive the result rounded to nearest even, in the same single pass.
        backend: "auto" (Triton on CUDA, plain torch on CPU), "triton" or "reference"; default from
            ``FUSED_OPS_BACKEND``.

    One kernel launch per (device, dtype) group on the Triton backend, whatever the number of tensors.
    """
    # (the numbers and flags as plain Python objects before the first check: see kernels/_checks.py plain_value)
    names = ("lr", "beta1", "beta2", "eps", "weight_decay", "step")
    lr, beta1, beta2, eps, weight_decay, step = (plain_value(x, f"adam_: {name}") for name, x in
                                                 zip(names, (lr, beta1, beta2, eps, weight_decay, step)))  # fmt: skip
    params, grads = _as_list("adam_", "params", params), _as_list("adam_", "grads", grads)
    exp_avgs, exp_avg_sqs = _as_list("adam_", "exp_avgs", exp_avgs), _as_list("adam_", "exp_avg_sqs", exp_avg_sqs)
    n = len(params)
    max_exp_avg_sqs = _as_list("adam_", "max_exp_avg_sqs", max_exp_avg_sqs) if max_exp_avg_sqs is not None else []
    state_steps = _as_list("adam_", "state_steps", state_steps) if state_steps is not None else []
    master_params = _as_list("adam_", "master_params", master_params) if master_params is not None else []
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
    if step is not None:
        _check_adam_number("step", step)
        if not (math.isfinite(step) and step >= 1):
            raise ValueError(f"adam_: step must be a finite number >= 1, got {step}")
    for name, value in (("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay)):
        _check_adam_number(name, value, bools=name in ("eps", "weight_decay"))
    lr_tensor = lr if isinstance(lr, Tensor) else None
    if lr_tensor is None:
        _check_adam_number("lr", lr, bools=True)
    for name, x in (("lr", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        check_scalar("adam_", name, x)
    if n == 0:
        return
    scalars = (("lr", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf))
    _check_adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps,
                        master_params, scalars)  # fmt: skip

    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype, grads[i].dtype)].append(i)
    work = []
    for (device, _, _), idx in groups.items():
        work.append((device, idx, resolve_backend(backend, device)))  # (raises before any group runs)
    for device, idx, backend_name in work:
        pick = (lambda lst, idx=idx: [lst[i] for i in idx]) if len(groups) > 1 else list
        _ops.adam_eager(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
            pick(max_exp_avg_sqs) if amsgrad else [], pick(master_params) if master_params else [],
            pick(state_steps) if state_steps else [],
            0.0 if lr_tensor is not None else float(lr), check_scalar("adam_", "lr", lr_tensor, device),
            float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad), bool(maximize),
            bool(decoupled_weight_decay), None if step is None else float(step),
            check_scalar("adam_", "grad_scale", grad_scale, device),
            check_scalar("adam_", "found_inf", found_inf, device),
            backend_name,
        )  # fmt: skip


_ADAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                        scalars=()) -> None:  # fmt: skip
    """What both backends rely on, for every tensor (the kernel reads raw addresses; the CPU path's
    ``torch._fused_adam(w)_`` checks nothing): dense tensors; params fp32/bf16/fp16; grads of the param's dtype or
    fp32; fp32 states and masters; 1-element fp32 step counts; each on its param's device, with its param's number
    of elements, contiguous; no written tensor sharing memory with another argument, ``scalars`` (``(name, tensor
    or None)``: what the kernel reads through a pointer) included. Raises naming the argument and the index."""
    lists = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    if max_exp_avg_sqs:
        lists.append(("max_exp_avg_sqs", max_exp_avg_sqs))
    if master_params:
        lists.append(("master_params", master_params))
    every = [("params", params), *lists] + ([("state_steps", state_steps)] if state_steps else [])
    for name, lst in every:
        if not _all_tensors(lst):
            i = next(i for i, x in enumerate(lst) if not isinstance(x, Tensor))
            raise TypeError(f"adam_: {name}[{i}] must be a Tensor, got {type(lst[i]).__name__}")
    compiling = torch.compiler.is_compiling()  # (traced: fake tensors have no memory; eager calls check it)
    for name, lst in every if not compiling else ():
        i = first_without_storage(lst)
        if i is not None:
            t = lst[i]
            raise TypeError(f"adam_: {name}[{i}] is a {type(t).__name__} on {t.device}, not a plain tensor with "
                            "memory of its own; pass the local shard of a DTensor (to_local())")  # fmt: skip
    for i, p in enumerate(params):
        if p.layout != torch.strided or p.is_nested or p.dtype not in _ADAM_DTYPES:
            raise TypeError(f"adam_: params[{i}] must be a dense float32, bfloat16 or float16 tensor, got {p.dtype} "
                            f"({_layout_name(p)})")  # fmt: skip
        if not p.is_contiguous():
            raise ValueError(f"adam_: params[{i}] must be contiguous (it is updated in place)")
        device, numel = p.device, p.numel()
        for name, lst in lists:
            t = lst[i]
            if t.layout != torch.strided or t.is_nested:
                raise TypeError(f"adam_: {name}[{i}] must be a dense tensor, got {_layout_name(t)}")
            if name == "grads":
                if t.dtype != p.dtype and t.dtype != torch.float32:
                    raise TypeError(f"adam_: grads[{i}] is {t.dtype}; it must have the param's dtype ({p.dtype}) or "
                                    "be float32")  # fmt: skip
            elif t.dtype != torch.float32:
                raise TypeError(f"adam_: {name}[{i}] must be float32, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"adam_: {name}[{i}] is on {t.device} but params[{i}] is on {device}")
            if t.numel() != numel:
                raise ValueError(f"adam_: {name}[{i}] has {t.numel()} elements but params[{i}] has {numel}")
            if name == "master_params" and t.shape != p.shape:  # (the plain-torch path copies it into the param)
                raise ValueError(f"adam_: master_params[{i}] has shape {tuple(t.shape)} but params[{i}] has "
                                 f"{tuple(p.shape)}")  # fmt: skip
            if not t.is_contiguous():
                raise ValueError(f"adam_: {name}[{i}] must be contiguous")
        if state_steps:
            s = state_steps[i]
            if s.dtype != torch.float32 or s.numel() != 1 or s.layout != torch.strided or s.is_nested:
                raise TypeError(f"adam_: state_steps[{i}] must be a 1-element float32 tensor, got {s.dtype} with "
                                f"{s.numel()} elements")  # fmt: skip
            if s.device != device:
                raise ValueError(f"adam_: state_steps[{i}] is on {s.device} but params[{i}] is on {device}")
    if compiling:
        return
    written = [("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    if max_exp_avg_sqs:
        written.append(("max_exp_avg_sqs", max_exp_avg_sqs))
    if master_params:
        written.append(("master_params", master_params))
    if state_steps:
        written.append(("state_steps", state_steps))
    # (every tensor is contiguous here: checked above)
    groups = [(name, ts, True, True, True) for name, ts in written] + [("grads", grads, False, True, True)]
    groups += [(name, [x], False, False, True) for name, x in scalars if isinstance(x, Tensor)]
    _check_memory("adam_", groups)


# ---------------------------------------------------------------------------------------------------------
# Flatten / cast / unscale / grad norm (issue 3). Arguments are checked before anything is modified, the same on
# both backends (the plain-torch path hands tensors to torch's private kernels, which check little or nothing):
# types, dense floating-point tensors, counts, shapes, devices, contiguity of what is written, 1-element scalars,
# and no memory shared between a tensor that is written and any other argument (the kernel runs programs in
# parallel where torch's loops run one tensor after another: only a tensor that is exactly its own source, as in
# ``copy_``, is allowed). Then tensors are grouped by (device, dtype) and each group is one op (one launch on the
# Triton backend); every group's backend is resolved before the first one runs.
#
# Host time matters here: on a GPU, an op over 10,000 small tensors is bound by Python. The checks therefore
# run as a few tight passes (the sets of types, dtypes, layouts and devices; one pass comparing shapes, one reading
# contiguity; the memory check sorts start and end addresses once) and fall back to the per-tensor loops, which
# name the first offending tensor, only when a fast check fails; one (device, dtype) group skips the grouping.
# Nothing is detached per tensor: the ``_ops.*_eager`` entry points run under ``torch.no_grad()`` (under
# ``torch.compile`` they call the custom op, which is what gets traced). Lists of new Python objects (shapes,
# views) are avoided: thousands of them alive at once cost as much again in garbage-collector passes.
# Comprehensions, not ``map`` over module-level ``attrgetter``s: as fast, and Dynamo traces them.

import numbers  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from operator import attrgetter  # noqa: E402

from . import _dtensor, reference  # noqa: E402
from ._backend import check_backend  # noqa: E402

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP32_MAX = float(torch.finfo(torch.float32).max)
_STRIDED = {torch.strided}
_data_ptr = Tensor.data_ptr
_nbytes = attrgetter("nbytes")


def _all_tensors(xs: list) -> bool:
    return all(issubclass(cls, Tensor) for cls in {type(x) for x in xs})


def _float_tensors_and_dtypes(fn: str, name: str, tensors) -> tuple[list[Tensor], set[torch.dtype]]:
    """``tensors`` as a list of dense floating-point tensors with memory of their own (else a TypeError naming the
    first offender), and the set of their dtypes."""
    if isinstance(tensors, Tensor) or not isinstance(tensors, Iterable):
        got = "a Tensor" if isinstance(tensors, Tensor) else type(tensors).__name__
        raise TypeError(f"{fn}: {name} must be a sequence of tensors, got {got}")
    tensors = list(tensors)
    compiling = torch.compiler.is_compiling()  # (traced: fake tensors; the eager call checks the classes)
    if all(_has_memory(cls) or compiling and issubclass(cls, Tensor) for cls in {type(x) for x in tensors}):
        dtypes = {x.dtype for x in tensors}
        if (all(d.is_floating_point for d in dtypes) and {x.layout for x in tensors} <= _STRIDED
                and not any(x.is_nested for x in tensors)):  # fmt: skip
            return tensors, dtypes
    for i, x in enumerate(tensors):
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: {name}[{i}] must be a Tensor, got {type(x).__name__}")
        if not (compiling or _has_memory(type(x))):
            raise TypeError(f"{fn}: {name}[{i}] is a {type(x).__name__}, not a plain tensor with memory of its own; "
                            "pass its local tensor (a DTensor's to_local())")  # fmt: skip
        if x.layout != torch.strided or x.is_nested:  # (a nested tensor's layout reads strided)
            raise TypeError(f"{fn}: {name}[{i}] must be a dense tensor, got {_layout_name(x)}")
        if not x.is_floating_point():
            raise TypeError(f"{fn}: {name}[{i}] must be a floating-point tensor, got {x.dtype}")
    raise AssertionError("unreachable")  # pragma: no cover


def _layout_name(x: Tensor) -> str:
    """``x``'s layout as an error names it: a nested tensor reports ``torch.strided``."""
    return "a nested tensor" if x.is_nested else str(x.layout)


def _float_tensors(fn: str, name: str, tensors) -> list[Tensor]:
    return _float_tensors_and_dtypes(fn, name, tensors)[0]


def _as_list(fn: str, name: str, tensors) -> list:
    if isinstance(tensors, Tensor) or not isinstance(tensors, Iterable):
        got = "a Tensor" if isinstance(tensors, Tensor) else type(tensors).__name__
        raise TypeError(f"{fn}: {name} must be a sequence of tensors, got {got}")
    return list(tensors)


def _float_locals(
    fn: str, name: str, tensors: list, partial: str = "refuse", refused: list | None = None
) -> tuple[list[Tensor], set[torch.dtype], list | None]:
    """:func:`_float_tensors_and_dtypes` with each DTensor taken as its local shard, and each entry's ``(mesh,
    placements)`` (None for a plain tensor; the list is None when there is no DTensor). A ``Partial`` DTensor is
    refused (``partial="refuse"``), taken as its summand (``"keep"``: a linear op), or reduced first (``"reduce"``:
    a norm; its storage checked, then one all-reduce each). ``refused``: see ``_dtensor.unwrap``."""
    local, specs = _dtensor.unwrap(fn, tensors, lambda i: f"{name}[{i}]", partial=partial != "refuse",
                                   refused=refused)  # fmt: skip
    local, dtypes = _float_tensors_and_dtypes(fn, name, local)
    if partial == "reduce" and specs is not None:
        local, specs = _reduced(fn, name, tensors, local, specs)
    return local, dtypes, specs


def _reduced(fn: str, name: str, xs: list, local: list[Tensor], specs: list) -> tuple[list[Tensor], list]:
    """``_dtensor.reduce_partials`` after checking the Partial shards' storage (torch's collectives read them
    unchecked)."""
    idx = [i for i, s in enumerate(specs) if _dtensor.is_partial(s)]
    if idx:
        for i in idx:
            check_storage(fn, f"{name}[{i}]", [local[i]], indexed=False)
        local, specs = _dtensor.reduce_partials(xs, local, specs)
    return local, specs


def _norm_locals(fn: str, name: str, tensors: list, err: BaseException | None = None, checked: bool = False) -> tuple:
    """For a norm: ``_float_locals(..., partial="reduce")`` where the local shards' storage (a check that may fail on
    some ranks only) is checked before any collective. Returns ``(local, dtypes, specs, err)``: with DTensors, the
    error of this rank's check (or ``err``, one the caller found) is returned, for :func:`_global_grad_norm` to agree
    in its reduction; where a ``Partial`` DTensor is reduced first, it is agreed before (one tiny all-reduce) and
    raised on every rank. The tensors are checked here to run no code of their own (``grad_norm`` leaves them to
    this: a refusal on one rank is agreed with the others, see ``_dtensor.unwrap``), unless the caller has
    (``checked``)."""
    refused: list = []
    local, specs = _dtensor.unwrap(fn, tensors, lambda i: f"{name}[{i}]", partial=True,
                                   refused=None if checked else refused)  # fmt: skip
    err = err or (refused[0] if refused else None)
    local, dtypes = _float_tensors_and_dtypes(fn, name, local)
    if specs is None:
        if err is not None:
            raise err
        return local, dtypes, specs, None
    err = err or _dtensor.local_error(specs, lambda: check_storage(fn, name, local))
    if any(map(_dtensor.is_partial, specs)):
        span = _dtensor.span_plan(fn, _dtensor.meshes_of(specs, local))
        _dtensor.agree_refusal(fn, err, _dtensor.meshes_of(specs, local), span)
        local, specs = _dtensor.reduce_partials(tensors, local, specs)
    return local, dtypes, specs, err


def _check_dtensor_pairs(fn: str, a: tuple[str, list, list | None], b: tuple[str, list, list | None]) -> None:
    """Entry ``i`` of lists ``a`` and ``b`` (``(name, tensors as passed, specs)``) are both DTensors with the same
    mesh, placements and (global) shape, or both plain tensors: then their local shards match on every rank. Reads
    only what is the same on every rank, so the error is too."""
    (a_name, a_xs, a_specs), (b_name, b_xs, b_specs) = a, b
    a_specs = a_specs or [None] * len(a_xs)
    b_specs = b_specs or [None] * len(b_xs)
    for i, (sa, sb) in enumerate(zip(a_specs, b_specs)):
        if sa != sb:
            raise ValueError(f"{fn}: {a_name}[{i}] is {_dtensor.describe(sa)} but {b_name}[{i}] is "
                             f"{_dtensor.describe(sb)}: both must be DTensors with the same mesh and placements, or "
                             "both plain tensors")  # fmt: skip
        if sa is not None and a_xs[i].shape != b_xs[i].shape:
            raise ValueError(f"{fn}: {a_name}[{i}] has shape {tuple(a_xs[i].shape)} but {b_name}[{i}] has "
                             f"{tuple(b_xs[i].shape)}")  # fmt: skip


def _all_contiguous(tensors: list[Tensor]) -> bool:
    return all(x.is_contiguous() for x in tensors)


def _same_shapes(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(x.shape == y.shape for x, y in zip(a, b))


def _check_not_tracked(fn: str, name: str, tensors: list[Tensor], hint: str = "") -> None:
    """A tensor written in place while autograd records (grad mode on) that requires grad must be a leaf (a param,
    written as an optimizer writes it: its version is bumped, so a backward that saved it refuses). Not the result
    of an op nor a view: the op is not differentiable, so autograd would not see the write (``y = x * 2;
    cast_([y], [z])``: backward gave x the grad of ``y = x * 2`` and z none), and a non-contiguous view of a leaf
    (``W.t()``, written through a contiguous copy) raised in the copy back, after the other tensors were written."""
    if not torch.is_grad_enabled():
        return
    for i, x in enumerate(tensors):
        if x.requires_grad and not x.is_leaf:
            raise RuntimeError(f"{fn}: {name}[{i}] requires grad and is not a leaf (the result of an op, or a view): "
                               f"{fn} writes it in place and is not differentiable, so autograd would not see the "
                               f"write; call it under torch.no_grad(), or write the leaf itself{hint}")  # fmt: skip


def _check_writable(fn: str, name: str, tensors: list[Tensor]) -> None:
    """Written tensors of any layout are taken, as torch's in-place ops take them (a non-contiguous one is written
    through a contiguous copy, :func:`_staged`), except one whose elements share memory (an expanded view), which
    torch refuses too. Reads only metadata that a DTensor's shards may not share (contiguity): never raises for
    a layout that only some ranks' shards have."""
    for i, x in enumerate(tensors):
        if not x.is_contiguous() and self_overlapping(x):
            raise ValueError(f"{fn}: {name}[{i}] has elements that share memory (an expanded view, stride 0, or "
                             "overlapping strides); it is written in place")  # fmt: skip


def _staged(tensors: list[Tensor], values: bool) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """``tensors`` for a kernel that writes contiguous tensors: each non-contiguous one replaced by a contiguous
    copy (holding its values when ``values``), with the ``(tensor, copy)`` pairs to copy back after the launch."""
    if _all_contiguous(tensors):
        return tensors, []
    staged, back = [], []
    for x in tensors:
        if not x.is_contiguous():
            y = x.contiguous() if values else torch.empty(x.shape, dtype=x.dtype, device=x.device)
            back.append((x, y))
            x = y
        staged.append(x)
    return staged, back


def _write_back(back: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in back:
        x.copy_(y)


def _contiguous(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` made contiguous: the list itself when they already are (one cheap pass)."""
    return tensors if _all_contiguous(tensors) else [x.contiguous() for x in tensors]


def _op_backend(fn: str, backend: str | None, device: torch.device, dtypes, supported=_KERNEL_DTYPES,
                named=()) -> str:  # fmt: skip
    """The resolved backend for one group; ``auto`` falls back to plain torch for dtypes the kernels lack.
    ``named``: the (name, tensors) lists of the call, to name the first tensor of a dtype the kernels lack."""
    name = resolve_backend(backend, device)
    if name == "triton" and device.type == "meta":  # (a meta tensor's null address, read by the launch)
        raise TypeError(f"{fn}: backend='triton' cannot run on meta tensors (they have no memory); use "
                        "backend='reference'")  # fmt: skip
    unsupported = sorted({str(d) for d in dtypes if d not in supported})
    if name == "triton" and unsupported:
        if check_backend(backend) == "triton":  # asked for by name (or by FUSED_OPS_BACKEND): no fallback
            first = next((f"{arg}[{i}] is {x.dtype}" for arg, xs in named for i, x in enumerate(xs)
                          if x.dtype not in supported), None)  # fmt: skip
            raise TypeError(f"{fn}: backend='triton' does not support {', '.join(unsupported)} tensors"
                            + (f" ({first}); use backend='auto' or 'reference'" if first else ""))  # fmt: skip
        return "reference"
    return name


def _check_align(fn: str, align: int) -> int:
    return _positive_int(fn, "align", align)


def _positive_int(fn: str, name: str, x) -> int:
    """``x`` as an exact int >= 1: an int or another integer type (numpy's), not a bool; else a ValueError naming
    ``name``."""
    if not isinstance(x, bool) and isinstance(x, numbers.Integral):
        try:
            x = operator.index(x)
        except Exception:  # noqa: BLE001 - (named below)
            pass
    if type(x) is not int or x < 1:
        raise ValueError(f"{fn}: {name} must be a positive int, got {x!r}")
    return x


def _check_norm_type(fn: str, norm_type: float | str) -> float:
    """``norm_type`` as a float: inf (also the string ``"inf"``, as torch takes it) or any number > 0."""
    try:
        value = float(norm_type) if not isinstance(norm_type, bool) else math.nan
    except (TypeError, ValueError, RuntimeError, NotImplementedError):  # (a meta or many-element tensor too)
        value = math.nan
    if not value > 0:
        raise ValueError(f"{fn}: norm_type must be inf or a number > 0, got {norm_type!r}")
    return value


def _one_group(fn: str, name: str, tensors: list[Tensor], dtypes: set) -> tuple[torch.dtype, torch.device]:
    dtype, device = tensors[0].dtype, tensors[0].device
    if len(dtypes) == 1 and len({x.device for x in tensors}) == 1:
        return dtype, device
    for i, x in enumerate(tensors):
        if x.dtype != dtype or x.device != device:
            raise ValueError(
                f"{fn}: {name}[{i}] is {x.dtype} on {x.device} but {name}[0] is {dtype} on {device}: "
                f"{name} must share one dtype and device"
            )
    return dtype, device


def _groups(key, n: int) -> list[tuple[tuple, list[int]]]:
    """Indices ``0..n-1`` grouped by ``key(i)``, groups in order of first appearance (the slow path of grouping:
    callers check first whether everything is one group)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n):
        groups[key(i)].append(i)
    return list(groups.items())


@no_user_code
def flatten(tensors: Sequence[Tensor], align: int = 64, *, backend: str | None = None) -> Tensor:
    """Gather ``tensors`` (one dtype and device, any shapes) into one new contiguous 1-d buffer, in one launch.

    Tensor ``i`` starts at an offset that is a multiple of ``align`` elements and is followed by zeros up to
    the next multiple (so the buffer's length divides by ``align`` too); ``unflatten(flat, tensors, align)``
    returns the views. The buffer is written once, padding included (no zero-fill pass). Not
    differentiable: see ``fused_ops.autograd.flatten``. An empty list gives an empty float32 tensor.
    """
    align = _check_align("flatten", align)
    tensors, dtypes = _float_tensors_and_dtypes("flatten", "tensors", tensors)
    if not tensors:
        return torch.empty(0)
    dtype, device = _one_group("flatten", "tensors", tensors, dtypes)
    backend_name = _op_backend("flatten", backend, device, [dtype], _KERNEL_DTYPES + (torch.float64,))
    check_storage("flatten", "tensors", tensors)
    _ops.flatten_total("flatten", tensors, align)
    return _ops.flatten_eager(_contiguous(tensors), align, backend_name)


def _check_flat(fn: str, flat: Tensor, align: int) -> int:
    align = _check_align(fn, align)
    if not isinstance(flat, Tensor) or flat.layout != torch.strided or flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"{fn}: flat must be a contiguous 1-d tensor")
    return align


def _offsets(fn: str, flat: Tensor, numels: list[int], align: int) -> list[int]:
    offsets, _, total = reference.flatten_layout(numels, align)
    if flat.numel() < total:
        raise ValueError(f"{fn}: flat has {flat.numel()} elements but the layout of like (align={align}) needs {total}")
    return offsets


def _shape(fn: str, i: int, x) -> torch.Size:
    """Entry ``i`` of unflatten's ``like``: a tensor's shape, or a shape of ints >= 0."""
    if isinstance(x, Tensor):
        return x.shape
    try:
        shape = torch.Size(x)
    except (TypeError, ValueError, RuntimeError):
        shape = None
    if shape is None or any(n < 0 for n in shape):
        raise TypeError(f"{fn}: like[{i}] must be a tensor or a shape of ints >= 0, got {x!r}")
    return shape


# Contiguous strides by shape, for unflatten's views (models have few distinct shapes; bounded all the same).
_STRIDES: dict[torch.Size, tuple[int, ...]] = {}


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides = _STRIDES.get(shape)
    if strides is None:
        rev, step = [], 1
        for n in reversed(shape):
            rev.append(step)
            step *= max(n, 1)
        strides = tuple(reversed(rev))
        if len(_STRIDES) < 4096:
            _STRIDES[shape] = strides
    return strides


def unflatten(flat: Tensor, like: Sequence[Tensor | Sequence[int]], align: int = 64) -> list[Tensor]:
    """Views of ``flat`` shaped like each entry of ``like`` (tensors or shapes), in ``flatten``'s layout.

    No copy: writing to a view writes to ``flat``. ``align`` must be the one ``flat`` was built with.
    """
    align = _check_flat("unflatten", flat, align)
    if isinstance(like, Tensor) or not isinstance(like, Iterable):
        raise TypeError(f"unflatten: like must be a sequence of tensors or shapes, got {type(like).__name__}")
    like = list(like)
    if _all_tensors(like):
        shapes = None  # read one at a time below: no list of 10^4 shapes kept alive for the garbage collector
        numels = [x.numel() for x in like]
    else:
        shapes = [_shape("unflatten", i, x) for i, x in enumerate(like)]
        numels = [math.prod(s) for s in shapes]
    offsets = _offsets("unflatten", flat, numels, align)
    if (
        type(flat) is Tensor
        and not (flat.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
    ):
        # One as_strided per view instead of narrow + view: the same sizes, strides and storage offsets (the
        # views record no autograd history either way), in half the host time.
        base = flat.storage_offset()
        view = flat.as_strided
        shaped = (x.shape for x in like) if shapes is None else shapes
        return [view(s, _contiguous_strides(s), base + off) for s, off in zip(shaped, offsets, strict=True)]
    if shapes is None:
        shapes = [x.shape for x in like]
    return [flat.narrow(0, off, n).view(s) for s, off, n in zip(shapes, offsets, numels, strict=True)]


@no_user_code
def unflatten_copy_(tensors: Sequence[Tensor], flat: Tensor, align: int = 64, *, backend: str | None = None) -> None:
    """Copy each segment of ``flat`` (``flatten``'s layout) back into ``tensors[i]``, in one launch.

    ``tensors`` share ``flat``'s dtype and device, are contiguous (they are written in place) and share no memory
    with each other or with ``flat``.
    """
    tensors, dtypes = _float_tensors_and_dtypes("unflatten_copy_", "tensors", tensors)
    align = _check_flat("unflatten_copy_", flat, align)
    check_storage("unflatten_copy_", "flat", [flat], indexed=False)  # (freed or shrunk in place: read next)
    numels = [x.numel() for x in tensors]
    offsets = _offsets("unflatten_copy_", flat, numels, align)
    if not (dtypes <= {flat.dtype} and {x.device for x in tensors} <= {flat.device} and _all_contiguous(tensors)):
        for i, x in enumerate(tensors):
            if x.dtype != flat.dtype or x.device != flat.device:
                raise ValueError(f"unflatten_copy_: tensors[{i}] is {x.dtype} on {x.device}, flat is {flat.dtype} "
                                 f"on {flat.device}")  # fmt: skip
            if not x.is_contiguous():
                raise ValueError(f"unflatten_copy_: tensors[{i}] must be contiguous (it is written in place)")
    _check_not_tracked("unflatten_copy_", "tensors", tensors)
    if not tensors:
        return
    total = offsets[-1] + numels[-1]
    _check_memory("unflatten_copy_", [("tensors", tensors, True, True, True),
                                      ("flat", [flat.narrow(0, 0, total)], False, False, True)])  # fmt: skip
    backend_name = _op_backend("unflatten_copy_", backend, flat.device, [flat.dtype],
                               _KERNEL_DTYPES + (torch.float64,))  # fmt: skip
    _ops.unflatten_copy_eager(tensors, flat, offsets, backend_name)


def _check_stochastic(fn: str, stochastic) -> None:
    if not isinstance(stochastic, bool):
        raise TypeError(f"{fn}: stochastic must be a bool, got {stochastic!r}")


@no_user_code
def cast_(
    dst: Sequence[Tensor],
    src: Sequence[Tensor],
    stochastic: bool = False,
    *,
    seed: int | None = None,
    backend: str | None = None,
) -> None:
    """Copy ``src[i]`` into ``dst[i]`` converting the dtype (fp32 <-> bf16/fp16, any mix), one launch per
    (device, dst dtype, src dtype) group.

    Rounding is to nearest even, bit-exact with ``dst.copy_(src)`` / ``src.to(dtype)`` (inf, nan, subnormals,
    fp16 overflow to inf). With ``stochastic=True`` narrowing conversions round up or down with probability
    proportional to the distance (unbiased); ``seed`` (an int in [0, 2^31)) makes them reproducible; None
    draws a key on each group's device from torch's generator (reproducible with ``torch.manual_seed``; no host
    sync; a captured CUDA graph draws a new key at every replay). ``dst[i]`` must have ``src[i]``'s shape and
    device (any layout: a non-contiguous one is written through a contiguous copy; not an expanded view); it may be
    ``src[i]`` itself (the same memory, contiguous) but share no memory with any other tensor of either list.
    float64 tensors go through plain torch.

    DTensors: ``dst[i]`` and ``src[i]`` are both DTensors with the same mesh, placements and shape (or both plain
    tensors); the cast runs on the local shards, no communication (a mismatch, or a ``Partial`` DTensor, raises the
    same ValueError on every rank, naming the argument). With ``stochastic=True`` a DTensor replicated over some mesh
    dim needs ``seed`` (the same on every rank: its replicas then round alike); each shard's random stream is the
    seed mixed with the shard's coordinates on the sharded mesh dims, so shards round independently.
    """
    dst_in, src_in = _as_list("cast_", "dst", dst), _as_list("cast_", "src", src)
    dst, dst_dtypes, d_specs = _float_locals("cast_", "dst", dst_in)
    src, src_dtypes, s_specs = _float_locals("cast_", "src", src_in)
    if len(dst) != len(src):
        raise ValueError(f"cast_: dst has {len(dst)} tensors but src has {len(src)}")
    _check_stochastic("cast_", stochastic)
    if d_specs is not None or s_specs is not None:
        _check_dtensor_pairs("cast_", ("src", src_in, s_specs), ("dst", dst_in, d_specs))
    devices = {x.device for x in dst} | {x.device for x in src}
    if not (len(devices) <= 1 and _same_shapes(dst, src)):
        for i, (d, s) in enumerate(zip(dst, src, strict=True)):
            if d.shape != s.shape:
                raise ValueError(f"cast_: dst[{i}] has shape {tuple(d.shape)} but src[{i}] has {tuple(s.shape)}")
            if d.device != s.device:
                raise ValueError(f"cast_: dst[{i}] is on {d.device} but src[{i}] is on {s.device}")
    _check_not_tracked("cast_", "dst", dst, ", or use fused_ops.autograd.cast for a differentiable cast")
    _check_writable("cast_", "dst", dst)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise ValueError(f"cast_: seed must be an int in [0, 2^31), got {seed!r}")
    if stochastic and seed is None and d_specs is not None:
        i = next((i for i, sp in enumerate(d_specs) if sp is not None and any(p.is_replicate() for p in sp[1])), None)
        if i is not None:
            raise ValueError(f"cast_: dst[{i}] is {_dtensor.describe(d_specs[i])}: stochastic rounding of a "
                             "replicated DTensor needs seed= (the same int on every rank), so that its replicas round "
                             "alike")  # fmt: skip
    if not dst:
        return
    src_dense = _all_contiguous(src)
    _check_memory("cast_", [("dst", dst, True, True, _all_contiguous(dst)), ("src", src, False, True, src_dense)],
                  same=(0, 1))  # fmt: skip
    if not src_dense:
        src = [x.contiguous() for x in src]
    dst, back = _staged(dst, values=False)
    shards = d_specs is not None and stochastic and seed is not None  # (streams per shard: see the docstring)
    if len(devices) == 1 and len(dst_dtypes) == 1 and len(src_dtypes) == 1 and not shards:
        groups = [((dst[0].device, dst[0].dtype, src[0].dtype), dst, src)]
    else:
        keys = [_dtensor.norm_key(sp) for sp in d_specs] if shards else None
        groups = [
            (key, [dst[i] for i in idx], [src[i] for i in idx])
            for key, idx in _groups(lambda i: (dst[i].device, dst[i].dtype, src[i].dtype, keys[i] if shards else None),
                                    len(dst))
        ]  # fmt: skip
    named = (("dst", dst), ("src", src))
    backends = [_op_backend("cast_", backend, key[0], key[1:3], named=named) for key, _, _ in groups]
    if len(groups) > 1 and not torch.compiler.is_compiling():
        # (every group's chunk table built before the first group writes, see _prepare_unscale; traced, the ops are
        # opaque and build their own at run time)
        from .kernels._multi_tensor import build_chunk_table

        for (_, d_group, s_group), backend_name in zip(groups, backends, strict=True):
            if backend_name == "triton":
                build_chunk_table([d_group, s_group], _CHUNK_SIZE, _ops._table_cache())
    for k, (key, d_group, s_group) in enumerate(groups):
        # Distinct random streams per group: derived from an explicit seed, else each group draws its key on its
        # device (graph-safe; see _ops._cast).
        group_seed = None if seed is None else (seed + 0x9E3779B9 * k) % 2**31
        if shards and key[3] is not None:
            group_seed = (group_seed + 0x85EBCA6B * _dtensor.shard_index(key[3])) % 2**31
        _ops.cast_eager(d_group, s_group, stochastic, group_seed, backends[k])
    _write_back(back)


def _scalar_tensor(fn: str, name: str, x) -> None:
    if (not isinstance(x, Tensor) or x.numel() != 1 or not x.is_floating_point() or x.layout != torch.strided
            or not _has_memory(type(x)) and not torch.compiler.is_compiling()):  # fmt: skip
        got = f"{x.numel()} elements of {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{fn}: {name} must be a 1-element floating-point tensor, got {got}")
    if not torch.compiler.is_compiling() and (x.is_meta or _outside_storage(x)):  # (read by torch ops: unchecked)
        raise ValueError(f"{fn}: {name} must be a tensor with memory: it is on {x.device} "
                         f"{'(meta)' if x.is_meta else 'outside its storage (freed or shrunk in place)'}")  # fmt: skip


def _check_inv_scale(fn: str, inv_scale) -> None:
    if isinstance(inv_scale, Tensor):
        _scalar_tensor(fn, "inv_scale", inv_scale)
    elif isinstance(inv_scale, bool) or not isinstance(inv_scale, numbers.Real):
        raise TypeError(f"{fn}: inv_scale must be a number or a 1-element floating-point tensor, got "
                        f"{type(inv_scale).__name__}")  # fmt: skip
    else:
        _check_finite(f"{fn}: inv_scale", float(inv_scale))  # (the kernels and torch's unscale: float32)


@no_user_code(agreed=("grads", "inv_scale", "found_inf", "out"))  # (checked by _unscale: a refusal is agreed)
def unscale_(
    grads: Sequence[Tensor],
    inv_scale: float | Tensor,
    found_inf: Tensor | None = None,
    *,
    out: Sequence[Tensor] | None = None,
    backend: str | None = None,
) -> None:
    """Multiply every grad by ``inv_scale`` and set ``found_inf`` to 1 if any result is inf or nan: one launch
    per (device, dtype) group, no host sync.

    Args:
        grads: fp32/bf16/fp16 tensors; updated in place (no memory shared; a non-contiguous one through a contiguous
            copy) unless ``out`` is given.
        inv_scale: a finite number, or a 1-element float tensor (e.g. ``1 / loss_scale``; read on the device,
            moved to each group's device).
        found_inf: None, or a 1-element float tensor (0-d too, as torch's ``GradScaler`` takes it) that is set to 1
            (never cleared) when any result is inf or nan. The check is on the stored result, so it also catches a
            finite grad that overflows after the multiplication.
        out: optional tensors, one per grad, same shapes, one float dtype (e.g. fp32 copies of bf16 grads):
            receive the results; ``grads`` are then left unchanged. ``out[i]`` may be ``grads[i]`` itself.

    The product is computed in fp32 and rounded to nearest even into the destination (torch's
    ``_amp_foreach_non_finite_check_and_unscale_``).

    DTensors (FSDP2, tensor parallel): the grads' local shards are unscaled, then ``found_inf`` is all-reduced (MAX)
    over every mesh the grads live on, so that it agrees on every rank (no host sync; one all-reduce per mesh when
    it is 1-D or spans every rank, else one per mesh dim). ``out[i]`` is then a DTensor with ``grads[i]``'s mesh,
    placements and shape. A ``Partial`` grad's summands are unscaled and checked, as torch's ``GradScaler`` does on
    DTensors (a sum of finite summands that overflows is not seen, there as here). A mismatched ``out`` raises the
    same ValueError on every rank before anything changes. A list without DTensors never communicates. With
    ``found_inf``, a check of the local shards that fails on some ranks only (storage freed, memory shared) is agreed
    in one tiny all-reduce before anything is written (read on the host): that rank raises its error, the others a
    RuntimeError, nothing changed.

    Everything every group needs (its chunk table, the scalars moved to its device) is allocated before the first
    group runs: an error there (out of memory) leaves every tensor as it was.
    """
    _unscale(grads, inv_scale, found_inf, out, backend)


def _unscale(grads, inv_scale, found_inf, out, backend, done: list[int] | None = None, err=None,
             checked: bool = False) -> None:  # fmt: skip
    """:func:`unscale_`; ``done`` (a list) receives the index of each tensor written in place (the grad, or its
    ``out``) by a group that ran, also when a later group's launch raised (what :class:`DynamicLossScaler` records as
    unscaled, so that a retry is refused rather than dividing those twice). ``err``: an error the caller found on
    this rank (raised, or with DTensor grads agreed with the other ranks' checks, as those of the local shards).
    ``checked``: the caller has checked ``grads`` and ``out`` to run no code of their own (not again here)."""
    inv_scale = plain_value(inv_scale, "unscale_: inv_scale")  # (before the first check: see plain_value)
    grads_in = _as_list("unscale_", "grads", grads)
    # (the tensors are checked here to run no code of their own, not on entry (``unscale_``'s no_user_code leaves
    # them to this): a refusal on one rank is agreed as the checks below, see _dtensor.unwrap)
    refused: list = []
    grads, g_dtypes, g_specs = _float_locals("unscale_", "grads", grads_in, partial="keep",
                                             refused=None if checked else refused)  # fmt: skip
    err = err or (refused[0] if refused else None)
    if err is not None and g_specs is None:
        raise err

    # (with DTensor grads, the checks of what may differ between ranks (memory: storage freed on one rank, shared
    # memory, a scalar without memory) are agreed before anything is written, where the op communicates: see below)
    def local(check: Callable[[], None]) -> BaseException | None:
        return _dtensor.local_error(g_specs, check)

    for scalar_name, scalar in (("found_inf", found_inf), ("inv_scale", inv_scale)):
        if isinstance(scalar, Tensor) and not torch.compiler.is_compiling():  # (traced: see overrides_refusal)
            err = err or local(lambda n=scalar_name, x=scalar: check_no_overrides("unscale_", n, [x], indexed=False))
    err = err or local(lambda: _check_inv_scale("unscale_", inv_scale))
    if found_inf is not None:
        err = err or local(lambda: _scalar_tensor("unscale_", "found_inf", found_inf))
    out_in = _as_list("unscale_", "out", out) if out is not None else []
    outs, o_dtypes, o_specs = (_float_locals("unscale_", "out", out_in, partial="keep",
                                             refused=None if checked else refused)
                               if out is not None else ([], set(), None))  # fmt: skip
    err = err or (refused[0] if refused else None)
    if out is not None and len(outs) != len(grads):
        raise ValueError(f"unscale_: out has {len(outs)} tensors but grads has {len(grads)}")
    if outs and (g_specs is not None or o_specs is not None):
        _check_dtensor_pairs("unscale_", ("out", out_in, o_specs), ("grads", grads_in, g_specs))
    devices = {x.device for x in grads}
    if outs:
        devices |= {x.device for x in outs}
        if not (len(devices) <= 1 and _same_shapes(outs, grads)):
            for i, (g, o) in enumerate(zip(grads, outs)):
                if o.shape != g.shape or o.device != g.device:
                    raise ValueError(f"unscale_: out[{i}] is {tuple(o.shape)} on {o.device} but grads[{i}] is "
                                     f"{tuple(g.shape)} on {g.device}")  # fmt: skip
    _check_kinds("unscale_", (("grads", grads), ("out", outs)), g_dtypes | o_dtypes, devices)
    # (any layout is written, as torch's unscale takes it: through a contiguous copy, so that no DTensor shard's
    # layout, which may differ between ranks, makes one rank raise while the others wait in the found_inf agreement)
    err = err or local(lambda: (_check_not_tracked("unscale_", "out" if outs else "grads", outs or grads),
                                _check_writable("unscale_", "out" if outs else "grads", outs or grads)))  # fmt: skip
    meshes = _dtensor.meshes_of(g_specs, grads) if g_specs is not None and found_inf is not None else []
    span = _dtensor.span_plan("unscale_", meshes)  # (meshes on different ranks: refused before anything is written)
    if not grads:
        if err is not None:
            raise err
        return
    scalars = [(name, [x], written, False, True) for name, x, written in
               (("found_inf", found_inf, True), ("inv_scale", inv_scale, False)) if isinstance(x, Tensor)]  # fmt: skip
    grads_dense = _all_contiguous(grads)
    outs_dense = _all_contiguous(outs)
    if outs:
        err = err or local(lambda: _check_memory("unscale_", [("grads", grads, False, True, grads_dense),
                                                              ("out", outs, True, True, outs_dense), *scalars],
                                                 same=(1, 0)))  # fmt: skip
    else:
        err = err or local(lambda: _check_memory("unscale_", [("grads", grads, True, True, grads_dense), *scalars]))
    # (a check that failed on some ranks only raises on every rank, nothing written: one tiny all-reduce where the op
    # agrees found_inf anyway; without found_inf it does not communicate, and a failing rank raises alone)
    if meshes:
        _dtensor.agree_refusal("unscale_", err, meshes, span)
    elif err is not None:
        raise err
    if outs:
        if not grads_dense:
            grads = [x.contiguous() for x in grads]
        written = outs
        outs, back = _staged(outs, values=False)
    else:
        written = grads
        grads, back = _staged(grads, values=True)
    launches = _prepare_unscale("unscale_", grads, outs, inv_scale, found_inf, backend, devices, g_dtypes, o_dtypes,
                                (("grads", grads), ("out", outs)))  # fmt: skip
    ran: list[int] | None = [] if done is not None else None
    try:
        _run_unscale(launches, ran)
    finally:
        if ran:  # (a staged tensor is written back only once every group ran: not written if one raised)
            done.extend(i for i in ran if not back or written[i].is_contiguous())
    _write_back(back)
    if meshes:
        _dtensor.agree_flag(found_inf, meshes, span)


def _check_kinds(fn: str, named, dtypes: set, devices: set) -> None:
    """Float8 (every 1-byte float dtype) and meta tensors refused for every group before any group runs, on both
    backends: the reference unscale divided the first groups' grads, then torch raised on the float8 or meta one (its
    unscale has no float8 kernel; a meta tensor has no memory), and the reference norm returned a meta tensor or
    torch's promotion error; the Triton launch refuses them too."""
    if not any(d.itemsize == 1 for d in dtypes) and all(d.type != "meta" for d in devices):
        return
    for name, xs in named:
        for i, x in enumerate(xs):
            if x.dtype.itemsize == 1:
                raise TypeError(f"{fn}: does not support {x.dtype} tensors ({name}[{i}] is {x.dtype}); pass a "
                                "float32, bfloat16 or float16 copy")  # fmt: skip
            if x.is_meta:
                raise TypeError(f"{fn}: {name}[{i}] is on meta: {fn} cannot run on meta tensors (they have no "
                                "memory)")  # fmt: skip


def _prepare_unscale(fn, grads, outs, inv_scale, found_inf, backend, devices, g_dtypes, o_dtypes, named=()) -> list:
    """What :func:`_run_unscale` launches, one entry per (device, grad dtype, out dtype) group: everything a group
    needs that allocates (the scalars moved to its device, a flag of its own and the buffers that merge it into
    ``found_inf`` when that is on another device, its chunk table) is made here, for every group, before the first
    runs: an error (out of memory) while preparing the second group leaves the first group's tensors unwritten."""
    if len(devices) == 1 and len(g_dtypes) == 1 and len(o_dtypes) <= 1:
        groups = [((grads[0].device, grads[0].dtype, outs[0].dtype if outs else grads[0].dtype), None, grads, outs)]
    else:
        groups = [
            (key, idx, [grads[i] for i in idx], [outs[i] for i in idx] if outs else [])
            for key, idx in _groups(lambda i: (grads[i].device, grads[i].dtype, (outs or grads)[i].dtype), len(grads))
        ]
    backends = [_op_backend(fn, backend, device, [g, o], named=named) for (device, g, o), _, _, _ in groups]
    launches = []
    for ((device, _, _), idx, g_group, o_group), backend_name in zip(groups, backends, strict=True):
        scale_t = None
        if isinstance(inv_scale, Tensor):
            # (moved, not read through a raw pointer on another device; to the host with a blocking copy: the
            # host reads it at once, and a non-blocking copy to the host returns before the value has landed)
            scale_t = inv_scale.detach().reshape(1)
            if scale_t.device != device:
                scale_t = scale_t.to(device, non_blocking=device.type != "cpu")
        flag, merge = found_inf, None
        if found_inf is not None and found_inf.device != device:
            flag = torch.zeros(1, dtype=torch.float32, device=device)
            merge = (torch.empty(1, dtype=torch.bool, device=device),
                     torch.empty(found_inf.shape, dtype=torch.bool, device=found_inf.device),
                     torch.ones_like(found_inf), torch.empty_like(found_inf))  # fmt: skip
        if backend_name == "triton" and g_group and not torch.compiler.is_compiling():
            # (built into the cache the launch looks in: found there; traced, the op builds it at run time)
            from .kernels._multi_tensor import build_chunk_table

            build_chunk_table([g_group, o_group] if o_group else [g_group], _CHUNK_SIZE, _ops._table_cache())
        launches.append((idx, len(grads), g_group, scale_t, 0.0 if scale_t is not None else float(inv_scale), flag,
                         o_group, backend_name, found_inf, merge))  # fmt: skip
    return launches


_CHUNK_SIZE = 65536  # (``unscale_launch``'s and ``cast_launch``'s chunk size: the key of the tables they look up)


def _run_unscale(launches: list, done: list[int] | None = None) -> None:
    """Run :func:`_prepare_unscale`'s launches in order; ``done`` receives the indices of each group that ran. Then
    each flag of a group on another device than ``found_inf`` is merged into it, in the buffers prepared for it (1.0
    where found, as torch's unscale and the kernel store it)."""
    for idx, n, g_group, scale_t, value, flag, o_group, backend_name, _, _ in launches:
        _ops.unscale_eager(g_group, scale_t, value, flag, o_group, backend_name)
        if done is not None:
            done.extend(range(n) if idx is None else idx)
    for _, _, _, _, _, flag, _, _, found_inf, merge in launches:
        if merge is not None:
            found_here, found_there, ones, merged = merge
            torch.ne(flag, 0, out=found_here)
            found_there.copy_(found_here.reshape(found_there.shape))
            torch.where(found_there, ones, found_inf, out=merged)
            found_inf.copy_(merged)


@no_user_code(agreed=("tensors",))  # (checked by _norm_locals: a refusal is agreed)
def grad_norm(tensors: Sequence[Tensor], norm_type: float = 2.0, *, backend: str | None = None) -> Tensor:
    """The ``norm_type``-norm of all elements of all ``tensors`` together, as a 0-d tensor on the first
    tensor's device: one launch per (device, dtype) group (two for a p other than 1, 2 and inf) plus a tiny
    reduction, no host sync.

    Same value as ``torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]), norm_type)`` computed in
    float64, returned as float32 (float64 if a tensor is float64), whatever the tensors' dtype. Deterministic:
    the same inputs give the same bits. ``norm_type`` is ``inf`` (or ``"inf"``) or any p > 0. An empty list
    gives 0.

    DTensors (FSDP2, tensor parallel, 2-D meshes): the GLOBAL norm over the mesh, as
    ``torch.nn.utils.get_total_norm`` gives it, as a plain 0-d tensor with the same value on every rank (torch
    returns a DTensor: ``Replicate()``, or ``Partial(max)`` for inf; its ``full_tensor()`` is this value). Each rank
    computes its local shards' partial norm with the kernels above, then one all-reduce per mesh (SUM of p-th
    powers, MAX for inf; over the mesh dims where some tensor is sharded, replicas counted once) adds the other
    ranks' partials; no host sync but one read of whether a rank's check of its shards failed (a slot of the same
    all-reduce: that rank raises its error, the others a RuntimeError). DTensors on several meshes and plain
    tensors may be mixed: each mesh is reduced
    on its own, plain tensors count as they are on this rank, and the parts combine. Meshes on different ranks (a
    sub-mesh next to a mesh of all ranks) add one all-reduce over all their ranks, so that every rank has every
    mesh's part; where neither a mesh nor the default group spans them all, the same ValueError is raised on every
    rank, nothing changed. A ``Partial`` DTensor counts as its reduced value (one all-reduce each, as torch's DTensor
    norm redistributes it). For a p other than 1, 2 and inf the elements are divided by the largest |x| before the
    power (one more pass over them), so the p-th powers neither overflow nor underflow where the norm does not
    (``[1e30, 1e30]`` with p = 100 is 1.0069e30; torch's float64 sum of p-th powers gives inf there, its float32 one
    already for p = 3); across the ranks of a mesh the local norms' p-th powers are summed in float64, and may
    overflow there for a large p.
    """
    norm_type = _check_norm_type("grad_norm", norm_type)
    tensors, dtypes, specs, err = _norm_locals("grad_norm", "tensors", _as_list("grad_norm", "tensors", tensors))
    if specs is not None:
        return _global_grad_norm("grad_norm", tensors, dtypes, norm_type, backend, "tensors", specs, err=err)[0]
    return _grad_norm("grad_norm", tensors, dtypes, norm_type, backend)


def _grad_norm(fn, tensors, dtypes, norm_type, backend, name="tensors", checked=False) -> Tensor:
    if not tensors:
        return torch.zeros(())
    _check_kinds(fn, ((name, tensors),), dtypes, {x.device for x in tensors})
    if len(dtypes) == 1 and len({x.device for x in tensors}) == 1:
        groups = [((tensors[0].device, tensors[0].dtype), tensors)]
    else:
        groups = [
            (key, [tensors[i] for i in idx])
            for key, idx in _groups(lambda i: (tensors[i].device, tensors[i].dtype), len(tensors))
        ]
    backends = [_op_backend(fn, backend, device, [dtype], named=((name, tensors),)) for (device, dtype), _ in groups]
    if not checked:
        check_storage(fn, name, tensors)
    norms = [_ops.grad_norm_eager(_contiguous(group), norm_type, b) for (_, group), b in zip(groups, backends)]
    if len(norms) == 1:
        return norms[0]
    first = tensors[0].device
    out_dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    stacked = torch.stack([n.to(first, torch.float64) for n in norms])
    if norm_type in (1.0, 2.0) or math.isinf(norm_type):
        return torch.linalg.vector_norm(stacked, norm_type).to(out_dtype)
    # (a general p: the groups' norms divided by their max first, as within a group: (1e30^100) would overflow)
    m = stacked.max()
    scale = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
    return (torch.linalg.vector_norm(stacked / scale, norm_type) * scale).to(out_dtype)


def _global_grad_norm(
    fn, tensors, dtypes, norm_type, backend, name, specs, flag=None, err=None
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """The norm over every rank of local shards ``tensors`` (DTensors' ``specs``; see :func:`grad_norm`), and,
    with ``flag`` (a 1-element found-inf flag), that flag agreed over the meshes (see ``_dtensor.global_norm``).

    ``err``: this rank's error from a check of its local shards (which may fail on some ranks only): its local norms
    are then zeros, the refusal is agreed in the norm's reduction, and every rank raises (this one ``err``, the
    others a RuntimeError) before the caller writes anything. A host read of the agreed refusal."""
    _check_kinds(fn, ((name, tensors),), dtypes, {x.device for x in tensors})
    for device, dtype in {(x.device, x.dtype) for x in tensors}:  # (all resolved before anything runs)
        _op_backend(fn, backend, device, [dtype], named=((name, tensors),))
    span = _dtensor.span_plan(fn, _dtensor.meshes_of(specs, tensors))  # (meshes on different ranks: refused here)
    if err is None:
        err = _dtensor.local_error(specs, lambda: check_storage(fn, name, tensors))
    keys = [_dtensor.norm_key(s) for s in specs]
    local = [(key, torch.zeros((), dtype=torch.float64, device=tensors[idx[0]].device) if err is not None else
              _grad_norm(fn, [tensors[i] for i in idx], {tensors[i].dtype for i in idx}, norm_type, backend, name,
                         checked=True))
             for key, idx in _groups(keys.__getitem__, len(tensors))]  # fmt: skip
    out_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    total, agreed, refused = _dtensor.global_norm(local, norm_type, tensors[0].device, out_dtype, flag, span,
                                                  refused=err is not None)  # fmt: skip
    _dtensor.raise_refused(fn, err, refused)
    return total, agreed


def _check_max_norm(fn: str, max_norm) -> float:
    """``max_norm`` as a float: any number torch's clip takes (``inf``: "norm only", the coefficient is 1), not
    nan (every grad would become nan); a 1-element real tensor, as torch takes it, read on the host (read before any
    other argument is checked: a sync for a CUDA tensor)."""
    if isinstance(max_norm, Tensor):
        if (max_norm.numel() != 1 or max_norm.is_complex() or max_norm.dtype == torch.bool or max_norm.is_meta
                or max_norm.layout != torch.strided or _outside_storage(max_norm)):  # fmt: skip
            raise ValueError(f"{fn}: max_norm must be a number or a 1-element real tensor with a value, got a tensor "
                             f"of shape {tuple(max_norm.shape)} and dtype {max_norm.dtype}")  # fmt: skip
        max_norm = max_norm.item()
    elif type(max_norm).__module__ == "numpy" and getattr(max_norm, "shape", None) == ():
        max_norm = plain_value(max_norm.item(), f"{fn}: max_norm")  # (a numpy 0-d array, as torch's clip takes it)
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or math.isnan(max_norm):
        raise ValueError(f"{fn}: max_norm must be a number, got {max_norm!r}")
    return float(max_norm)


def clip_coef(total_norm: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / (total_norm + 1e-6))`` on the device (``torch.nn.utils.clip_grad_norm_``'s factor).

    Multiply grads by it to clip; or fold it into the optimizer's ``grad_scale`` (grads are divided by
    ``grad_scale``): ``grad_scale = loss_scale / clip_coef(norm, max_norm)``, with no extra pass over grads.
    ``max_norm=inf`` gives 1 (torch's "norm only" idiom), or nan when the norm is inf, as in torch.
    """
    max_norm = _check_max_norm("clip_coef", max_norm)
    _scalar_tensor("clip_coef", "total_norm", total_norm)
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


_GRAD_READS = frozenset({"grad", "__getattribute__", "__getattr__"})


def _param_grads(fn: str, parameters) -> tuple[list[Tensor], list | None, list[Tensor], BaseException | None]:
    """The grads of ``parameters`` (a tensor or an iterable of tensors) that have one, checked by the parameter's
    index: dense floating-point tensors; DTensor grads as their local shards (a ``Partial`` one as its summand),
    with each grad's ``(mesh, placements)`` (None for a plain grad; the list is None when there is no DTensor
    grad); the grads as they are; and the error of the check that they run no code of their own (which may fail on
    one rank only: for the caller to agree, or raise without DTensors; the grads are then stand-ins, see
    ``_dtensor.unwrap``). A param class that runs code when its grad is read is a TypeError at once."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    elif not isinstance(parameters, Iterable):
        raise TypeError(f"{fn}: parameters must be a tensor or an iterable of tensors, got "
                        f"{type(parameters).__name__}")  # fmt: skip
    parameters = list(parameters)
    if not _all_tensors(parameters):
        i = next(i for i, p in enumerate(parameters) if not isinstance(p, Tensor))
        raise TypeError(f"{fn}: parameters[{i}] must be a Tensor, got {type(parameters[i]).__name__}")
    # (a param is read for its grad alone, which a method set on the object cannot shadow: its class (the same on
    # every rank) must not define the read in Python)
    for cls in () if torch.compiler.is_compiling() else set(map(type, parameters)) - {Tensor, torch.nn.Parameter}:
        found = class_overrides(cls, _GRAD_READS)
        if found:
            i = next(i for i, p in enumerate(parameters) if type(p) is cls)
            raise TypeError(f"{fn}: parameters[{i}] is a {cls.__qualname__}, which defines {', '.join(found)} in "
                            "Python: its grad is read between the checks and the launches, where no caller code may "
                            "run (it could free memory a launch writes)")  # fmt: skip
    grads_in = grads = [p.grad for p in parameters if p.grad is not None]
    where = [i for i, p in enumerate(parameters) if p.grad is not None]
    refused: list = []  # (read below through their methods: none may run code of its own, see check_no_overrides)
    grads, specs = _dtensor.unwrap(fn, grads, lambda k: f"parameters[{where[k]}].grad", partial=True, refused=refused)
    err = refused[0] if refused else None
    if {g.layout for g in grads} <= _STRIDED and all(map(_has_memory, {type(g) for g in grads})):
        return grads, specs, grads_in, err  # (grads are floating point: torch checks the param's dtype)
    where = [i for i, p in enumerate(parameters) if p.grad is not None]
    for i, g in zip(where, grads):
        if g.layout != torch.strided:
            raise TypeError(f"{fn}: parameters[{i}].grad must be a dense tensor, got {g.layout}")
        if not _has_memory(type(g)):
            raise TypeError(f"{fn}: parameters[{i}].grad is a {type(g).__name__}, not a plain tensor with "
                            "memory of its own")  # fmt: skip
    raise AssertionError("unreachable")  # pragma: no cover


@no_user_code(agreed=("parameters",))  # (checked by _param_grads: a refusal is agreed)
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` in two passes and no host sync: the grads' total norm
    (:func:`grad_norm`), then one multiply by ``clip_coef`` per (device, dtype) group, on the device.

    Returns the total norm (0-d float32 on the first grad's device, also for bf16/fp16 grads, where torch
    returns the grads' dtype). ``max_norm=inf`` returns the norm and leaves the grads as they are (multiplied by
    1, as torch does). ``error_if_nonfinite=True`` reads the norm on the host (one sync), as torch does.
    ``foreach`` is accepted and ignored. Params without a grad are skipped; none gives ``tensor(0.)``. A grad
    listed twice counts twice and is multiplied twice, as in torch; grads that partly share memory are refused.

    DTensor grads (FSDP2, tensor parallel, 2-D meshes, several meshes, mixed with plain grads): the total is the
    global norm across the mesh (:func:`grad_norm`: one all-reduce per mesh, no host sync), a plain 0-d tensor equal
    on every rank where torch returns a DTensor (``Replicate()``; ``Partial(max)`` for inf) whose ``full_tensor()``
    is this value; the local shards are scaled in place. A ``Partial`` grad (a ``SequenceParallel`` norm's weight)
    counts as its reduced value (one all-reduce each, as torch's DTensor norm does) and stays ``Partial``: its
    summands are scaled, as torch does.
    """
    max_norm = _check_max_norm("clip_grad_norm_", max_norm)
    norm_type = _check_norm_type("clip_grad_norm_", norm_type)
    grads, specs, grads_in, err = _param_grads("clip_grad_norm_", parameters)
    if err is not None and specs is None:
        raise err
    if not grads:
        return torch.tensor(0.0)
    # A grad listed more than once (a param listed twice) is multiplied once per listing, as torch's loop does:
    # in rounds, each a set of distinct grads.
    rounds = [grads]
    if len({id(g) for g in grads}) != len(grads):
        seen: dict[int, int] = {}
        rounds = []
        for g in grads:
            k = seen[id(g)] = seen.get(id(g), -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(g)
    dense = _all_contiguous(rounds[0])

    def check() -> None:
        if not dense:  # (before anything is written: torch's _foreach_mul_ refuses one after scaling the others)
            _check_writable("clip_grad_norm_", "grads", rounds[0])
        _check_memory("clip_grad_norm_", [("grads", rounds[0], True, True, dense)])

    # (with DTensor grads a check that fails on some ranks only is agreed before anything is sent or written: in the
    # norm's reduction, or first, in one tiny all-reduce, where a Partial grad is reduced before it)
    err = err or _dtensor.local_error(specs, check)
    if specs is not None:
        # (a Partial grad's norm is its reduced value's; its summands are then scaled in place, which scales the sum)
        if any(map(_dtensor.is_partial, specs)):
            meshes = _dtensor.meshes_of(specs, grads)
            _dtensor.agree_refusal("clip_grad_norm_", err, meshes, _dtensor.span_plan("clip_grad_norm_", meshes))
        n_local, n_specs = _dtensor.reduce_partials(grads_in, grads, specs)
        total = _global_grad_norm("clip_grad_norm_", n_local, {g.dtype for g in grads}, norm_type, backend, "grads",
                                  n_specs, err=err)[0]  # fmt: skip
    else:
        total = _grad_norm("clip_grad_norm_", grads, {g.dtype for g in grads}, norm_type, backend, "grads")
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    coef = clip_coef(total, max_norm)
    # Every launch of every round is prepared (chunk tables, the coefficient on each device) before the first grad is
    # scaled: an error there (out of memory) leaves every grad as it was.
    plans = []
    for part in rounds:
        strided = [g for g in part if not g.is_contiguous()] if not dense else []
        flat = [g for g in part if g.is_contiguous()] if strided else part
        plans.append((strided, coef.to(strided[0].device) if strided else None,
                      _prepare_unscale("clip_grad_norm_", flat, [], coef.reshape(1), None, backend,
                                       {g.device for g in flat}, {g.dtype for g in flat}, set(), (("grads", flat),))
                      if flat else []))  # fmt: skip
    with torch.no_grad():  # (as torch's clip: a grad that requires grad, e.g. a view of a leaf, is scaled too)
        for strided, coef_there, launches in plans:
            if strided:
                torch._foreach_mul_(strided, coef_there)
            _run_unscale(launches)
    return total
