"""Fused multi-tensor Adam / AdamW step: one launch for any number of tensors of one (device, dtype).

The launcher takes lists of same-shaped contiguous tensors (params, grads, fp32 states, fp32 step counts)
and runs the update of ``torch.optim.Adam`` / ``AdamW`` (single-tensor path, same order of operations)
over all of them in one launch through a chunk table (``_multi_tensor.py``). The per-tensor step counts move
in the same launch (torch's fused path needs two more multi-tensor launches for them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import MutableMapping, Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_roles_memory, no_user_code
from ._multi_tensor import (
    TABLE_INTS,
    ChunkTable,
    PreparedLaunch,
    aligned_except,
    build_chunk_table,
    counters_reset_on_error,
    tensor_pointer,
    use_on_current_stream,
)
from ._numerics import load_fp32, store_fp32

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _neg_expm1(y):
    """-(exp(y) - 1) for scalar fp32 ``y <= 0``, accurate for tiny ``y`` (Kahan's trick).

    1 - beta2**step cancels catastrophically at small steps; this keeps the bias corrections within a
    few ulp of torch's float64 host arithmetic.
    """
    u = tl.exp(y)
    um1 = u - 1.0
    safe_log = tl.where(um1 == 0.0, 1.0, tl.log(u))
    return -tl.where(um1 == 0.0, y, tl.where(um1 == -1.0, -1.0, tl.div_rn(um1 * y, safe_log)))


@triton.jit
def _chunk_pointer(table_ptr, role, n_tensors, t, chunk_start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s pointer (``role`` of the chunk table) at ``chunk_start``, promising 4-element accesses.

    With ALIGNED a 16-bit tensor is promised 8 bytes, not the 16 it has: 4 elements per access, as the fp32
    tensors' 16 bytes. Promised 16, the compiler gives 16-bit loads and stores 8 elements per thread and fp32
    stores 4 (the widest store), two layouts in one block, and converts every block between them through
    shared memory (bar.sync after bar.sync). One layout keeps a block in registers; a warp's 16-bit access
    still covers 256 contiguous bytes.
    """
    if DTYPE == tl.float32:
        ptr = tensor_pointer(table_ptr, role, n_tensors, t, DTYPE, ALIGNED) + chunk_start
    else:
        ptr = tensor_pointer(table_ptr, role, n_tensors, t, DTYPE, False) + chunk_start
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 8)  # bytes; chunk starts are multiples of 16 elements
    return ptr


@triton.jit(do_not_specialize=TABLE_INTS)
def _adam_kernel(
    table_ptr,  # int64 chunk table: addresses per role, numels, per-program tensor index and chunk start
    n_tensors,
    numel_offset,
    chunk_tensor_offset,
    chunk_start_offset,
    lr,  # learning rate (runtime float), unless LR_IS_TENSOR
    lr_ptr,  # 1-element device tensor holding the learning rate, read when LR_IS_TENSOR
    one_minus_beta1,  # 1 - beta1, computed in float64 on the host
    beta2,
    one_minus_beta2,
    log_beta1,  # ln(beta1) in float64 on the host, for the bias corrections
    log_beta2,
    eps,
    weight_decay,
    step,  # step number (>= 1) when STEP_IS_TENSOR is False
    grad_scale_ptr,  # 1-element fp32 tensor: grads are divided by it when HAS_GRAD_SCALE
    found_inf_ptr,  # 1-element fp32 tensor: when non-zero the whole step is a no-op (HAS_FOUND_INF)
    counters_ptr,  # int32 per tensor, zeros between launches: programs arriving (STEP_IS_TENSOR)
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MASTER: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    STEP_IS_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor starts on a 16-byte boundary: lets the compiler vectorise
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One Adam(W) step on one chunk of one tensor (torch.optim.adam._single_tensor_adam order):

        g = grad / grad_scale;  g = -g if maximize
        AdamW: p = p * (1 - lr * wd)          Adam: g = g + wd * p
        m = m + (1 - beta1) * (g - m)         (torch's lerp_)
        v = v * beta2 + (1 - beta2) * g * g
        v_max = max(v_max, v)                 (amsgrad; v_max replaces v below)
        denom = sqrt(v) / sqrt(1 - beta2^t) + eps
        p = p - lr / (1 - beta1^t) * (m / denom)

    Roles in the table: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, then max_exp_avg_sq (AMSGRAD), then the
    fp32 master weights (MASTER), then the fp32 step count (STEP_IS_TENSOR). States are fp32. With MASTER,
    p is read from and written to the fp32 master and the (bf16/fp16) param only receives the rounded
    result: one pass reads the low-precision grad and writes the low-precision param (28 B/param).
    The param is stored rounded to nearest even.
    """
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(table_ptr + chunk_tensor_offset + pid)
    chunk_start = tl.multiple_of(tl.load(table_ptr + chunk_start_offset + pid), 16)  # CHUNK_SIZE % 16 == 0
    numel_t = tl.load(table_ptr + numel_offset + t)
    n_here = tl.minimum(numel_t - chunk_start, CHUNK_SIZE)

    param_ptr = _chunk_pointer(table_ptr, 0, n_tensors, t, chunk_start, PARAM_DTYPE, ALIGNED)
    grad_ptr = _chunk_pointer(table_ptr, 1, n_tensors, t, chunk_start, GRAD_DTYPE, ALIGNED)
    exp_avg_ptr = tensor_pointer(table_ptr, 2, n_tensors, t, tl.float32, ALIGNED) + chunk_start
    exp_avg_sq_ptr = tensor_pointer(table_ptr, 3, n_tensors, t, tl.float32, ALIGNED) + chunk_start
    next_role = 4
    max_exp_avg_sq_ptr = None
    master_ptr = None
    if AMSGRAD:
        max_exp_avg_sq_ptr = tensor_pointer(table_ptr, 4, n_tensors, t, tl.float32, ALIGNED) + chunk_start
        next_role = 5
    if MASTER:
        master_ptr = tensor_pointer(table_ptr, next_role, n_tensors, t, tl.float32, ALIGNED) + chunk_start
        next_role += 1

    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = tl.cast(lr, tl.float32)
    if STEP_IS_TENSOR:
        step_ptr = tl.load(table_ptr + next_role * n_tensors + t).to(tl.pointer_type(tl.float32))
        step_f = tl.load(step_ptr) + 1.0  # this step's number; written back once the tensor is done (below)
    else:
        step_f = tl.cast(step, tl.float32)
    bias_correction1 = _neg_expm1(step_f * tl.cast(log_beta1, tl.float32))
    bias_correction2_sqrt = tl.sqrt_rn(_neg_expm1(step_f * tl.cast(log_beta2, tl.float32)))
    step_size = tl.div_rn(lr, bias_correction1)  # `/` is div.full.f32 on the GPU (2 ulp), torch's is rounded
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    decay = 1.0 - lr * weight_decay
    grad_scale = None
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)

    for block_start in tl.range(0, CHUNK_SIZE, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        # Chunks are at most CHUNK_SIZE long; skipping empty blocks keeps small tensors cheap. Full blocks get
        # a mask the compiler can prove uniform per 16 lanes (a bound divisible by BLOCK_SIZE), so their loads
        # and stores are vectorised; only the tail block of a tensor is masked element by element.
        if block_start + BLOCK_SIZE <= n_here:
            _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, offsets,
                        offsets < block_start + BLOCK_SIZE, one_minus_beta1, beta2, one_minus_beta2, eps,
                        weight_decay, decay, step_size, bias_correction2_sqrt, grad_scale, PARAM_DTYPE, GRAD_DTYPE,
                        AMSGRAD, MASTER, MAXIMIZE, DECOUPLED, HAS_GRAD_SCALE)  # fmt: skip
        elif block_start < n_here:
            _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, offsets,
                        offsets < n_here, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay,
                        step_size, bias_correction2_sqrt, grad_scale, PARAM_DTYPE, GRAD_DTYPE, AMSGRAD, MASTER,
                        MAXIMIZE, DECOUPLED, HAS_GRAD_SCALE)  # fmt: skip

    if STEP_IS_TENSOR:
        # The step count moves in this launch too, without a race: every program of tensor t read the count
        # above, before its arrival below (acq_rel atomic); the last of the tensor's programs to arrive writes
        # the new count and resets the counter for the next launch.
        # t, the tensor's size and its count's address are read again from the table rather than kept from the
        # top: kept live across the block loop (whose correctly rounded divisions call a slow-path subroutine),
        # they spill to local memory. Only step_f must be kept: it is the count read before the arrival.
        t = tl.load(table_ptr + chunk_tensor_offset + tl.program_id(0).to(tl.int64))
        n_chunks_t = tl.maximum(tl.cdiv(tl.load(table_ptr + numel_offset + t), CHUNK_SIZE), 1)
        # One thread issues the atomic: the barrier orders every warp's read of the count (and its stores)
        # before this program's arrival, so the last arriver cannot overwrite a count another warp still reads.
        tl.debug_barrier()
        arrived = tl.atomic_add(counters_ptr + t, 1, sem="acq_rel")
        if arrived == n_chunks_t - 1:
            step_ptr = tl.load(table_ptr + next_role * n_tensors + t).to(tl.pointer_type(tl.float32))
            tl.store(step_ptr, step_f)
            tl.store(counters_ptr + t, 0)


@triton.jit
def _adam_block(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, offsets, mask,
    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bias_correction2_sqrt,
    grad_scale, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
    MASTER: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
):  # fmt: skip
    """The update of one block (see ``_adam_kernel``)."""
    g = load_fp32(grad_ptr + offsets, mask, GRAD_DTYPE)
    if MASTER:
        p = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    else:
        p = load_fp32(param_ptr + offsets, mask, PARAM_DTYPE)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if MAXIMIZE:
        g = -g
    if weight_decay != 0.0:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        # torch.maximum propagates NaN; the default tl.maximum (max.f32 on the GPU) would return the other operand.
        v_max = tl.maximum(tl.load(max_exp_avg_sq_ptr + offsets, mask=mask, other=0.0), v,
                           propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
        tl.store(max_exp_avg_sq_ptr + offsets, v_max, mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(v_max), bias_correction2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    if MASTER:
        tl.store(master_ptr + offsets, p, mask=mask)
    store_fp32(param_ptr + offsets, p, mask, PARAM_DTYPE)


def _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad) -> None:
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    if master_params:
        lists["master_params"] = master_params
    if state_steps:
        lists["state_steps"] = state_steps
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"adam_launch: {name} has {len(lst)} tensors, params has {n}")
    device, dtype, grad_dtype = params[0].device, params[0].dtype, grads[0].dtype
    if dtype not in _TL_DTYPES:
        raise TypeError(f"adam_launch: params must be float32, bfloat16 or float16, got {dtype}")
    if grad_dtype != dtype and grad_dtype != torch.float32:
        raise TypeError(f"adam_launch: grads must be {dtype} (the params' dtype) or float32, got {grad_dtype}")
    for i in range(n):
        p = params[i]
        if p.device != device or p.dtype != dtype:
            raise ValueError(f"adam_launch: params[{i}] is {p.dtype} on {p.device}, expected {dtype} on {device}")
        if grads[i].dtype != grad_dtype:
            raise TypeError(f"adam_launch: grads[{i}] is {grads[i].dtype}, grads[0] is {grad_dtype}")
        for name, lst in lists.items():
            t = lst[i]
            if t.device != device:
                raise ValueError(f"adam_launch: {name}[{i}] is on {t.device}, params[{i}] on {device}")
            if name == "state_steps":
                if t.dtype != torch.float32 or t.numel() != 1:
                    raise TypeError(f"adam_launch: state_steps[{i}] must be a 1-element float32 tensor")
                continue
            if name != "grads" and t.dtype != torch.float32:
                raise TypeError(f"adam_launch: {name}[{i}] must be float32, got {t.dtype}")
            if t.numel() != p.numel():
                raise ValueError(f"adam_launch: {name}[{i}] has {t.numel()} elements, params[{i}] {p.numel()}")
            if not t.is_contiguous():
                raise ValueError(f"adam_launch: {name}[{i}] must be contiguous")
        if not p.is_contiguous():
            raise ValueError(f"adam_launch: params[{i}] must be contiguous")


def _check_scalars(device: torch.device, lr, grad_scale, found_inf) -> None:
    """The kernel reads element 0 of these through a raw pointer on ``device``: each must be exactly one float
    element there (a tensor on another device would be read at a foreign address)."""
    for name, x in (("lr", lr), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.numel() != 1 or not x.is_floating_point() or x.is_sparse:
            raise ValueError(f"adam_launch: {name} must be a 1-element floating-point tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")  # fmt: skip
        if x.device != device:
            raise ValueError(f"adam_launch: {name} is on {x.device} but the params are on {device}")


@no_user_code
def adam_launch(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    step: float | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    master_params: Sequence[torch.Tensor] = (),
    chunk_size: int = 65536,
    block_size: int = 1024,
    cache: MutableMapping | None = None,
    checked: bool = False,
) -> None:
    """Launch one fused Adam(W) step over all tensors (one launch; no host synchronisation).

    ``state_steps`` are fp32 step counts (steps taken so far): the kernel uses count + 1 and stores it, in the
    same launch, unless ``found_inf`` is set; or pass an empty list and a float ``step`` (>= 1) to use one
    step number for every tensor. ``lr`` may be a 1-element device tensor.
    ``master_params`` (optional, fp32): the update runs on them and ``params`` receive the rounded values.
    Grads have the params' dtype, or are all fp32 (fp32 gradient accumulation, e.g. reduced ZeRO shards).
    Inputs are checked on every call (the chunk table is cached by address).
    ``checked=True``: the caller has just run this launcher's checks on these very inputs (the ``fused_ops::`` custom
    ops do, before their own memory check), so the table look-up does not run them again.
    """
    if len(params) == 0:
        return
    if not state_steps and step is None:
        raise ValueError("adam_launch: pass state_steps or a float step")

    roles = _roles(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad)

    def check() -> None:
        _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad)
        check_roles_memory("adam_launch", roles, _role_names(amsgrad, bool(master_params), bool(state_steps)),
                           _GRAD_ROLE)  # fmt: skip

    table = build_chunk_table(
        roles,
        chunk_size,
        cache,
        check=None if checked else check,
        with_counters=bool(state_steps),
    )
    _launch(table, params[0], grads[0].dtype, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, step=step, grad_scale=grad_scale,
            found_inf=found_inf, master=bool(master_params), step_is_tensor=bool(state_steps),
            chunk_size=chunk_size, block_size=block_size)  # fmt: skip


def _roles(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad) -> list:
    """The chunk table's roles, in the order the kernel reads them (grads are role ``_GRAD_ROLE``)."""
    roles = [params, grads, exp_avgs, exp_avg_sqs]
    if amsgrad:
        roles.append(max_exp_avg_sqs)
    if master_params:
        roles.append(master_params)
    if state_steps:
        roles.append(state_steps)
    return roles


def _role_names(amsgrad: bool, master: bool, steps: bool) -> list[str]:
    """The names of ``_roles``' roles, for messages."""
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs"]
    return (names + (["max_exp_avg_sqs"] if amsgrad else []) + (["master_params"] if master else [])
            + (["state_steps"] if steps else []))  # fmt: skip


_GRAD_ROLE = 1


def _launch(
    table: ChunkTable,
    param0: torch.Tensor,
    grad_dtype: torch.dtype,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    step: float | None,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    master: bool,
    step_is_tensor: bool,
    chunk_size: int,
    block_size: int,
) -> None:
    lr_is_tensor = isinstance(lr, torch.Tensor)
    _check_scalars(param0.device, lr if lr_is_tensor else None, grad_scale, found_inf)
    if table.n_chunks == 0:
        return
    use_on_current_stream(table)
    dummy = table.table  # any device pointer for arguments a flag switches off
    with (
        torch.cuda.device(param0.device) if param0.is_cuda else contextlib.nullcontext(),
        counters_reset_on_error(table),
    ):
        _adam_kernel[(table.n_chunks,)](
            table.table,
            table.n_tensors,
            table.numel_offset,
            table.chunk_tensor_offset,
            table.chunk_start_offset,
            0.0 if lr_is_tensor else float(lr),
            lr if lr_is_tensor else dummy,
            1.0 - beta1,
            float(beta2),  # (floats: an int 0 or 1 would compile another variant, see TABLE_INTS)
            1.0 - beta2,
            math.log(beta1) if beta1 > 0 else -math.inf,
            math.log(beta2) if beta2 > 0 else -math.inf,
            float(eps),
            float(weight_decay),
            1.0 if step is None else float(step),
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            table.counters if table.counters is not None else dummy,
            PARAM_DTYPE=_TL_DTYPES[param0.dtype],
            GRAD_DTYPE=_TL_DTYPES[grad_dtype],
            AMSGRAD=amsgrad,
            MASTER=master,
            MAXIMIZE=maximize,
            DECOUPLED=decoupled,
            LR_IS_TENSOR=lr_is_tensor,
            STEP_IS_TENSOR=step_is_tensor,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=aligned_except(table, (-1,) if step_is_tensor else ()),  # (the step counts: read as scalars)
            CHUNK_SIZE=chunk_size,
            BLOCK_SIZE=block_size,
        )


class AdamStep(PreparedLaunch):
    """A prepared Adam(W) launch over one fixed set of tensors, for optimizers that step the same tensors often.

    ``adam_launch`` finds its chunk table by the addresses of every tensor of every role: 5 to 7 ``data_ptr()``
    calls and a hash per tensor and step, milliseconds on 10,000 tensors. This object builds its table once
    (checking every input once) and owns it; between steps only the grads may change (backward allocates them
    afresh after ``zero_grad(set_to_none=True)``): :meth:`set_grads` checks the new grads and, when they moved,
    rewrites their addresses in the table with one small copy. Params and states must stay where they were
    (the caller checks the params' addresses; states are its own). The grads, the CUDA-graph captures (each on a
    table of its own) and the staging buffers are ``_multi_tensor.PreparedLaunch``'s.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        exp_avg_sqs: Sequence[torch.Tensor],
        max_exp_avg_sqs: Sequence[torch.Tensor],
        state_steps: Sequence[torch.Tensor],
        master_params: Sequence[torch.Tensor] = (),
        *,
        amsgrad: bool,
        chunk_size: int = 65536,
        block_size: int = 1024,
    ) -> None:
        if len(params) == 0:
            raise ValueError("AdamStep: no tensors")
        if not state_steps:
            raise ValueError("AdamStep: needs state_steps (one fp32 step count per tensor)")
        _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad)
        roles = _roles(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad)
        super().__init__(roles, _GRAD_ROLE, chunk_size, block_size, with_counters=True,
                         names=_role_names(amsgrad, bool(master_params), True))  # fmt: skip
        self.amsgrad = amsgrad
        self.master = bool(master_params)

    def _run(
        self,
        *,
        lr: float | torch.Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        maximize: bool,
        decoupled: bool,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> None:
        """One step (one launch); the step counts move in the kernel (not when ``found_inf`` is set)."""
        _launch(self.launch_table(), self.param0, self.grad_dtype, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, amsgrad=self.amsgrad, maximize=maximize, decoupled=decoupled, step=None,
                grad_scale=grad_scale, found_inf=found_inf, master=self.master, step_is_tensor=True,
                chunk_size=self.chunk_size, block_size=self.block_size)  # fmt: skip
