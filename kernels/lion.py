"""Fused multi-tensor Lion step: one launch for any number of tensors of one (device, dtype).

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Program 1; the order of operations of
lucidrains/lion-pytorch): one state per parameter (the momentum ``exp_avg``, zeros at first) and an update of
+-lr per element. The launcher takes lists of same-sized contiguous tensors (params, grads, exp_avgs, optional
fp32 masters) and runs the step over all of them in one launch through a chunk table (``_multi_tensor.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping, Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_role, check_roles_memory, no_user_code
from ._multi_tensor import TABLE_INTS, ChunkTable, PreparedLaunch, build_chunk_table, use_on_current_stream
from ._numerics import load_fp32, store_fp32
from .adam import _chunk_pointer
from .sgd import check_like, check_scalars

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit(do_not_specialize=TABLE_INTS)
def _lion_kernel(
    table_ptr,  # int64 chunk table: addresses per role, numels, per-program tensor index and chunk start
    n_tensors,
    numel_offset,
    chunk_tensor_offset,
    chunk_start_offset,
    lr,  # learning rate (runtime float), unless LR_IS_TENSOR
    lr_ptr,  # 1-element device tensor holding the learning rate, read when LR_IS_TENSOR
    beta1,
    one_minus_beta1,  # 1 - beta1, computed in float64 on the host (torch's alpha)
    beta2,
    one_minus_beta2,
    weight_decay,
    grad_scale_ptr,  # 1-element float tensor: grads are divided by it when HAS_GRAD_SCALE
    found_inf_ptr,  # 1-element float tensor: when non-zero the whole step is a no-op (HAS_FOUND_INF)
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,  # the exp_avgs' dtype: fp32, or the params' dtype
    MASTER: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor starts on a 16-byte boundary: lets the compiler vectorise
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One Lion step on one chunk of one tensor:

        g = grad / grad_scale;  g = -g if maximize
        p = p * (1 - lr * wd)                                 (wd != 0)
        p = p - lr * sign(m * beta1 + (1 - beta1) * g)
        m = m * beta2 + (1 - beta2) * g

    sign is torch.sign's: (c > 0) - (c < 0), so sign(0) = 0 and sign(NaN) = 0 (a NaN grad makes m NaN and the
    update 0, exactly as the plain-torch reference). Roles in the table: 0 param, 1 grad, 2 exp_avg, then the fp32
    master weights (MASTER). Computed in fp32; an exp_avg of the params' dtype is stored rounded to nearest even.
    With MASTER, p is read from and written to the fp32 master and the (bf16/fp16) param only receives the
    rounded result.
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
    exp_avg_ptr = _chunk_pointer(table_ptr, 2, n_tensors, t, chunk_start, STATE_DTYPE, ALIGNED)
    master_ptr = None
    if MASTER:
        master_ptr = _chunk_pointer(table_ptr, 3, n_tensors, t, chunk_start, tl.float32, ALIGNED)

    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = tl.cast(lr, tl.float32)
    beta1 = tl.cast(beta1, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    decay = 1.0 - lr * weight_decay
    grad_scale = None
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)

    for block_start in tl.range(0, CHUNK_SIZE, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        # Full blocks get a mask the compiler can prove uniform per 16 lanes (vectorised accesses); only the
        # tail block of a tensor is masked element by element (see _adam_kernel).
        if block_start + BLOCK_SIZE <= n_here:
            _lion_block(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, offsets, offsets < block_start + BLOCK_SIZE,
                        lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, decay, grad_scale,
                        PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE, MASTER, MAXIMIZE, HAS_GRAD_SCALE)  # fmt: skip
        elif block_start < n_here:
            _lion_block(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, offsets, offsets < n_here, lr, beta1,
                        one_minus_beta1, beta2, one_minus_beta2, weight_decay, decay, grad_scale, PARAM_DTYPE,
                        GRAD_DTYPE, STATE_DTYPE, MASTER, MAXIMIZE, HAS_GRAD_SCALE)  # fmt: skip


@triton.jit
def _lion_block(
    param_ptr, grad_ptr, exp_avg_ptr, master_ptr, offsets, mask, lr, beta1, one_minus_beta1, beta2,
    one_minus_beta2, weight_decay, decay, grad_scale, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr, MASTER: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
):  # fmt: skip
    """The update of one block (see ``_lion_kernel``)."""
    g = load_fp32(grad_ptr + offsets, mask, GRAD_DTYPE)
    if MASTER:
        p = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    else:
        p = load_fp32(param_ptr + offsets, mask, PARAM_DTYPE)
    m = load_fp32(exp_avg_ptr + offsets, mask, STATE_DTYPE)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)  # `/` is div.full.f32 on the GPU (2 ulp); torch's division is rounded
    if MAXIMIZE:
        g = -g
    if weight_decay != 0.0:
        p = p * decay
    c = m * beta1 + one_minus_beta1 * g
    # lr * sign(c), with torch.sign's sign: 0 for 0 and NaN (p - 0 keeps p bit for bit, -0 included, as torch's)
    p = p - tl.where(c > 0.0, lr, tl.where(c < 0.0, -lr, 0.0))
    m = m * beta2 + one_minus_beta2 * g
    store_fp32(exp_avg_ptr + offsets, m, mask, STATE_DTYPE)
    if MASTER:
        tl.store(master_ptr + offsets, p, mask=mask)
    store_fp32(param_ptr + offsets, p, mask, PARAM_DTYPE)


def _check(fn, params, grads, exp_avgs, master_params, lr, grad_scale, found_inf) -> None:
    """Everything the kernel relies on, for every tensor; raises before anything is written."""
    check_role(fn, "params", params, _TL_DTYPES)
    dtype, device = params[0].dtype, params[0].device
    check_like(fn, "grads", grads, params, (dtype, torch.float32), device)  # the params' dtype, or fp32 accumulation
    check_like(fn, "exp_avgs", exp_avgs, params, (torch.float32, dtype), device)
    if master_params:
        check_like(fn, "master_params", master_params, params, (torch.float32,), device)
    check_scalars(fn, device, lr, grad_scale, found_inf)


@no_user_code
def lion_launch(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    master_params: Sequence[torch.Tensor] = (),
    chunk_size: int = 65536,
    block_size: int = 1024,
    cache: MutableMapping | None = None,
    checked: bool = False,
) -> None:
    """Launch one fused Lion step over all tensors (one launch; no host synchronisation).

    ``exp_avgs``: fp32 or the params' dtype (zeros before the first step). ``lr`` may be a 1-element device tensor;
    ``grad_scale`` divides the grads (which are not modified); a non-zero ``found_inf`` makes the launch change
    nothing. ``master_params`` (optional, fp32): the update runs on them and ``params`` receive the rounded values.
    Grads have the params' dtype, or are all fp32. Every input is checked on every call (the chunk table is cached
    by address; the check never is).
    ``checked=True``: the caller has just run this launcher's checks on these very inputs (the ``fused_ops::`` custom
    ops do, before their own memory check), so the table look-up does not run them again.
    """
    if len(params) == 0:
        return
    fn = "lion_launch"
    roles = [params, grads, exp_avgs] + ([master_params] if master_params else [])

    def check() -> None:
        _check(fn, params, grads, exp_avgs, master_params, lr, grad_scale, found_inf)
        check_roles_memory(fn, roles, _role_names(bool(master_params)), _GRAD_ROLE)

    table = build_chunk_table(roles, chunk_size, cache, check=None if checked else check)
    _launch(table, params[0], grads[0].dtype, exp_avgs[0].dtype, lr=lr, beta1=beta1, beta2=beta2,
            weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
            master=bool(master_params), chunk_size=chunk_size, block_size=block_size)  # fmt: skip


_GRAD_ROLE = 1


def _role_names(master: bool) -> list[str]:
    """The names of the launch's roles, for messages."""
    return ["params", "grads", "exp_avgs"] + (["master_params"] if master else [])


def _launch(
    table: ChunkTable,
    param0: torch.Tensor,
    grad_dtype: torch.dtype,
    state_dtype: torch.dtype,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    master: bool,
    chunk_size: int,
    block_size: int,
) -> None:
    if table.n_chunks == 0:
        return
    lr_is_tensor = isinstance(lr, torch.Tensor)
    use_on_current_stream(table)
    dummy = table.table  # any device pointer for arguments a flag switches off
    with torch.cuda.device(param0.device) if param0.is_cuda else contextlib.nullcontext():
        _lion_kernel[(table.n_chunks,)](
            table.table,
            table.n_tensors,
            table.numel_offset,
            table.chunk_tensor_offset,
            table.chunk_start_offset,
            0.0 if lr_is_tensor else float(lr),
            lr if lr_is_tensor else dummy,
            float(beta1),
            1.0 - float(beta1),
            float(beta2),
            1.0 - float(beta2),
            float(weight_decay),
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            PARAM_DTYPE=_TL_DTYPES[param0.dtype],
            GRAD_DTYPE=_TL_DTYPES[grad_dtype],
            STATE_DTYPE=_TL_DTYPES[state_dtype],
            MASTER=master,
            MAXIMIZE=bool(maximize),
            LR_IS_TENSOR=lr_is_tensor,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=table.aligned,
            CHUNK_SIZE=chunk_size,
            BLOCK_SIZE=block_size,
        )


class LionStep(PreparedLaunch):
    """A prepared Lion launch over one fixed set of tensors (see ``_multi_tensor.PreparedLaunch``), for optimizers
    that step the same tensors often: ``lion_launch`` finds its table by every tensor's address at every call; this
    builds it once, and between steps only the grads may move (:meth:`set_grads`)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        master_params: Sequence[torch.Tensor] = (),
        *,
        chunk_size: int = 65536,
        block_size: int = 1024,
    ) -> None:
        if len(params) == 0:
            raise ValueError("LionStep: no tensors")
        _check("LionStep", params, grads, exp_avgs, master_params, 0.0, None, None)
        roles = [params, grads, exp_avgs] + ([master_params] if master_params else [])
        super().__init__(roles, _GRAD_ROLE, chunk_size, block_size, names=_role_names(bool(master_params)))
        self.state_dtype = exp_avgs[0].dtype
        self.master = bool(master_params)

    def _run(
        self,
        *,
        lr: float | torch.Tensor,
        beta1: float,
        beta2: float,
        weight_decay: float,
        maximize: bool,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> None:
        """One step (one launch)."""
        check_scalars("LionStep", self.device, lr, grad_scale, found_inf)
        _launch(self.launch_table(), self.param0, self.grad_dtype, self.state_dtype, lr=lr, beta1=beta1,
                beta2=beta2, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
                found_inf=found_inf, master=self.master, chunk_size=self.chunk_size,
                block_size=self.block_size)  # fmt: skip
