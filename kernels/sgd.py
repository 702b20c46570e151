"""Fused multi-tensor SGD step (momentum, dampening, nesterov, weight decay): one launch for any number of tensors
of one (device, dtype).

The launcher takes lists of same-sized contiguous tensors (params, grads, momentum buffers, optional fp32 masters)
and runs the update of ``torch.optim.SGD`` (single-tensor path, same order of operations) over all of them in one
launch through a chunk table (``_multi_tensor.py``). Like ``torch._fused_sgd_``, the first step of new momentum
buffers is its own launch (``first_step``): the buffers are then written, never read. ``first_step`` is a runtime
argument, not a compile-time one: the second step (the first a CUDA graph usually captures, after one warm-up step)
must not be the first launch of a new kernel variant, whose loading a stream capture forbids.
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping, Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_numels, check_role, check_roles_memory, check_scalar, no_user_code
from ._multi_tensor import TABLE_INTS, ChunkTable, PreparedLaunch, build_chunk_table, use_on_current_stream
from ._numerics import load_fp32, store_fp32
from .adam import _chunk_pointer

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit(do_not_specialize=[*TABLE_INTS, "first_step"])  # (first_step: one variant for both values, see above)
def _sgd_kernel(
    table_ptr,  # int64 chunk table: addresses per role, numels, per-program tensor index and chunk start
    n_tensors,
    numel_offset,
    chunk_tensor_offset,
    chunk_start_offset,
    lr,  # learning rate (runtime float), unless LR_IS_TENSOR
    lr_ptr,  # 1-element device tensor holding the learning rate, read when LR_IS_TENSOR
    momentum,
    one_minus_dampening,  # 1 - dampening, computed in float64 on the host (torch's alpha)
    weight_decay,
    grad_scale_ptr,  # 1-element float tensor: grads are divided by it when HAS_GRAD_SCALE
    found_inf_ptr,  # 1-element float tensor: when non-zero the whole step is a no-op (HAS_FOUND_INF)
    first_step,  # int: non-zero when the buffers are new: buf = g (written, not read)
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,  # the momentum buffers' dtype: fp32, or the params' dtype
    MOMENTUM: tl.constexpr,  # momentum != 0: the table has the momentum buffers (role 2)
    NESTEROV: tl.constexpr,
    MASTER: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor starts on a 16-byte boundary: lets the compiler vectorise
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One SGD step on one chunk of one tensor (torch.optim.sgd._single_tensor_sgd order):

        g = grad / grad_scale;  g = -g if maximize
        g = g + wd * p                                   (wd != 0)
        first step:  buf = g                             (momentum != 0; torch clones the grad, no dampening)
        later steps: buf = buf * momentum + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf      (momentum != 0)
        p = p - lr * g

    Roles in the table: 0 param, 1 grad, then the momentum buffers (MOMENTUM), then the fp32 master weights
    (MASTER). Computed in fp32; buffers of the params' dtype are stored rounded to nearest even, and the update
    uses the fp32 value before that rounding. With MASTER, p is read from and written to the fp32 master and the
    (bf16/fp16) param only receives the rounded result.
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
    next_role = 2
    buf_ptr = None
    master_ptr = None
    if MOMENTUM:
        buf_ptr = _chunk_pointer(table_ptr, 2, n_tensors, t, chunk_start, STATE_DTYPE, ALIGNED)
        next_role = 3
    if MASTER:
        master_ptr = _chunk_pointer(table_ptr, next_role, n_tensors, t, chunk_start, tl.float32, ALIGNED)

    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = tl.cast(lr, tl.float32)
    momentum = tl.cast(momentum, tl.float32)
    one_minus_dampening = tl.cast(one_minus_dampening, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    grad_scale = None
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)

    for block_start in tl.range(0, CHUNK_SIZE, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        # Full blocks get a mask the compiler can prove uniform per 16 lanes (vectorised accesses); only the
        # tail block of a tensor is masked element by element (see _adam_kernel).
        if block_start + BLOCK_SIZE <= n_here:
            _sgd_block(param_ptr, grad_ptr, buf_ptr, master_ptr, offsets, offsets < block_start + BLOCK_SIZE, lr,
                       momentum, one_minus_dampening, weight_decay, grad_scale, PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE,
                       first_step, MOMENTUM, NESTEROV, MASTER, MAXIMIZE, HAS_GRAD_SCALE)  # fmt: skip
        elif block_start < n_here:
            _sgd_block(param_ptr, grad_ptr, buf_ptr, master_ptr, offsets, offsets < n_here, lr, momentum,
                       one_minus_dampening, weight_decay, grad_scale, PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE,
                       first_step, MOMENTUM, NESTEROV, MASTER, MAXIMIZE, HAS_GRAD_SCALE)  # fmt: skip


@triton.jit
def _sgd_block(
    param_ptr, grad_ptr, buf_ptr, master_ptr, offsets, mask, lr, momentum, one_minus_dampening, weight_decay,
    grad_scale, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, first_step,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MASTER: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
):  # fmt: skip
    """The update of one block (see ``_sgd_kernel``)."""
    g = load_fp32(grad_ptr + offsets, mask, GRAD_DTYPE)
    if MASTER:
        p = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    else:
        p = load_fp32(param_ptr + offsets, mask, PARAM_DTYPE)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)  # `/` is div.full.f32 on the GPU (2 ulp); torch's division is rounded
    if MAXIMIZE:
        g = -g
    if weight_decay != 0.0:  # not g + 0 * p: an inf param would make the grad NaN
        g = g + weight_decay * p
    if MOMENTUM:
        if first_step != 0:
            buf = g
        else:
            buf = load_fp32(buf_ptr + offsets, mask, STATE_DTYPE)
            buf = buf * momentum + one_minus_dampening * g
        store_fp32(buf_ptr + offsets, buf, mask, STATE_DTYPE)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    if MASTER:
        tl.store(master_ptr + offsets, p, mask=mask)
    store_fp32(param_ptr + offsets, p, mask, PARAM_DTYPE)


def _check(fn, params, grads, momentum_buffers, master_params, momentum, lr, grad_scale, found_inf) -> None:
    """Everything the kernel relies on, for every tensor; raises before anything is written."""
    check_role(fn, "params", params, _TL_DTYPES)
    dtype, device = params[0].dtype, params[0].device
    check_like(fn, "grads", grads, params, (dtype, torch.float32), device)  # the params' dtype, or fp32 accumulation
    if momentum != 0:
        if len(momentum_buffers) == 0:
            raise ValueError(f"{fn}: momentum is {momentum}, so momentum_buffers must hold one tensor per param")
        check_like(fn, "momentum_buffers", momentum_buffers, params, (torch.float32, dtype), device)
    elif len(momentum_buffers) != 0:
        raise ValueError(f"{fn}: momentum is 0, so momentum_buffers must be empty (got {len(momentum_buffers)})")
    if master_params:
        check_like(fn, "master_params", master_params, params, (torch.float32,), device)
    check_scalars(fn, device, lr, grad_scale, found_inf)


def check_like(fn: str, name: str, tensors: Sequence, params: Sequence[torch.Tensor], dtypes, device) -> None:
    """One tensor of ``tensors`` per param, with its element count; dense, contiguous, all of one dtype among
    ``dtypes``, on ``device``."""
    if len(tensors) != len(params):
        raise ValueError(f"{fn}: {name} has {len(tensors)} tensors, params has {len(params)}")
    check_role(fn, name, tensors, dtypes, device)
    check_numels(fn, name, tensors, "params", params)


def check_scalars(fn: str, device: torch.device, lr, grad_scale, found_inf) -> None:
    """The kernels read element 0 of these through a raw pointer on ``device``: each, when a tensor, must be exactly
    one floating-point element there (a tensor on another device would be read at a foreign address)."""
    if isinstance(lr, torch.Tensor):
        check_scalar(fn, "lr", lr, device)
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise TypeError(f"{fn}: lr must be a float or a 1-element tensor, got {type(lr).__name__}")
    for name, x in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if x is not None:
            check_scalar(fn, name, x, device)


@no_user_code
def sgd_launch(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    master_params: Sequence[torch.Tensor] = (),
    chunk_size: int = 65536,
    block_size: int = 1024,
    cache: MutableMapping | None = None,
    checked: bool = False,
) -> None:
    """Launch one fused SGD step over all tensors (one launch; no host synchronisation).

    ``momentum_buffers``: one per param when ``momentum != 0`` (fp32 or the params' dtype), empty when it is 0.
    ``first_step``: the buffers are new (torch's ``momentum_buffer is None``): they receive the (decayed) grad and
    are not read, so they may be uninitialised; launch new and existing buffers separately. ``lr`` may be a
    1-element device tensor; ``grad_scale`` divides the grads (which are not modified); a non-zero ``found_inf``
    makes the launch change nothing. ``master_params`` (optional, fp32): the update runs on them and ``params``
    receive the rounded values. Grads have the params' dtype, or are all fp32. Every input is checked on every
    call (the chunk table is cached by address; the check never is).
    ``checked=True``: the caller has just run this launcher's checks on these very inputs (the ``fused_ops::`` custom
    ops do, before their own memory check), so the table look-up does not run them again.
    """
    if len(params) == 0:
        return
    fn = "sgd_launch"
    roles = [params, grads] + ([momentum_buffers] if momentum != 0 else []) + ([master_params] if master_params else [])

    def check() -> None:
        _check(fn, params, grads, momentum_buffers, master_params, momentum, lr, grad_scale, found_inf)
        check_roles_memory(fn, roles, _role_names(momentum != 0, bool(master_params)), _GRAD_ROLE)

    table = build_chunk_table(roles, chunk_size, cache, check=None if checked else check)
    state_dtype = momentum_buffers[0].dtype if momentum != 0 else torch.float32
    _launch(table, params[0], grads[0].dtype, state_dtype, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
            grad_scale=grad_scale, found_inf=found_inf, master=bool(master_params), chunk_size=chunk_size,
            block_size=block_size)  # fmt: skip


_GRAD_ROLE = 1


def _role_names(buffers: bool, master: bool) -> list[str]:
    """The names of the launch's roles, for messages."""
    return ["params", "grads"] + (["momentum_buffers"] if buffers else []) + (["master_params"] if master else [])


def _launch(
    table: ChunkTable,
    param0: torch.Tensor,
    grad_dtype: torch.dtype,
    state_dtype: torch.dtype,
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    master: bool,
    chunk_size: int,
    block_size: int,
) -> None:
    if table.n_chunks == 0:
        return
    lr_is_tensor = isinstance(lr, torch.Tensor)
    has_momentum = momentum != 0
    use_on_current_stream(table)
    dummy = table.table  # any device pointer for arguments a flag switches off
    with torch.cuda.device(param0.device) if param0.is_cuda else contextlib.nullcontext():
        _sgd_kernel[(table.n_chunks,)](
            table.table,
            table.n_tensors,
            table.numel_offset,
            table.chunk_tensor_offset,
            table.chunk_start_offset,
            0.0 if lr_is_tensor else float(lr),
            lr if lr_is_tensor else dummy,
            float(momentum),
            1.0 - float(dampening),
            float(weight_decay),
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            int(bool(first_step) and has_momentum),
            PARAM_DTYPE=_TL_DTYPES[param0.dtype],
            GRAD_DTYPE=_TL_DTYPES[grad_dtype],
            STATE_DTYPE=_TL_DTYPES[state_dtype],
            MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov) and has_momentum,
            MASTER=master,
            MAXIMIZE=bool(maximize),
            LR_IS_TENSOR=lr_is_tensor,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=table.aligned,
            CHUNK_SIZE=chunk_size,
            BLOCK_SIZE=block_size,
        )


class SGDStep(PreparedLaunch):
    """A prepared SGD launch over one fixed set of tensors (see ``PreparedLaunch``), for optimizers that step the
    same tensors often: ``sgd_launch`` finds its table by every tensor's address at every call; this builds it
    once. Built with momentum buffers, it steps with momentum != 0; without, with momentum == 0."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        momentum_buffers: Sequence[torch.Tensor],
        master_params: Sequence[torch.Tensor] = (),
        *,
        chunk_size: int = 65536,
        block_size: int = 1024,
    ) -> None:
        if len(params) == 0:
            raise ValueError("SGDStep: no tensors")
        _check("SGDStep", params, grads, momentum_buffers, master_params, 1.0 if momentum_buffers else 0.0, 0.0,
               None, None)  # fmt: skip
        roles = [params, grads] + ([momentum_buffers] if momentum_buffers else []) + (
            [master_params] if master_params else [])  # fmt: skip
        super().__init__(roles, _GRAD_ROLE, chunk_size, block_size,
                         names=_role_names(bool(momentum_buffers), bool(master_params)))  # fmt: skip
        self.has_buffers = bool(momentum_buffers)
        self.state_dtype = momentum_buffers[0].dtype if momentum_buffers else torch.float32
        self.master = bool(master_params)

    def _run(
        self,
        *,
        lr: float | torch.Tensor,
        momentum: float,
        dampening: float,
        weight_decay: float,
        nesterov: bool,
        maximize: bool,
        first_step: bool,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> None:
        """One step (one launch). ``first_step``: the buffers are new (written, not read)."""
        if (momentum != 0) != self.has_buffers:
            raise ValueError(f"SGDStep: built {'with' if self.has_buffers else 'without'} momentum buffers, "
                             f"stepped with momentum {momentum}")  # fmt: skip
        check_scalars("SGDStep", self.device, lr, grad_scale, found_inf)
        _launch(self.launch_table(), self.param0, self.grad_dtype, self.state_dtype, lr=lr, momentum=momentum,
                dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                first_step=first_step, grad_scale=grad_scale, found_inf=found_inf, master=self.master,
                chunk_size=self.chunk_size, block_size=self.block_size)  # fmt: skip
