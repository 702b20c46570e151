"""ZeroAdamW: ZeRO stage 1/2 partitioned AdamW on ``torch.distributed`` collectives.

Layout. Params are grouped by (param group, dtype) and packed, in reverse registration order (the order in
which backward produces their grads), into flat buckets of at most ``bucket_cap_mb``. Each param starts at a
multiple of ``align`` elements and each bucket is padded to a multiple of ``world_size * align``, so it splits
into ``world_size`` equal, aligned shards. The model's params become views into their bucket's flat buffer,
so the all-gather after the step writes straight into them. Rank ``r`` owns shard ``r`` of every bucket and
keeps, for that shard only: the fp32 master copy (low-precision params with ``master_weights``), the fp32
Adam moments and the reduced-gradient shard, in the reduce dtype (by default the param dtype: bf16 for bf16
params, so a bf16 model with fp32 masters holds 2 + 14/N bytes per param in stage 2; ``reduce_dtype=
torch.float32`` reduces and accumulates in fp32, 2 + 16/N). The fused Adam op reads either directly.

Per step::

    backward  --(stage 2: per bucket, as soon as its grads exist)-->  reduce-scatter (sum) into the grad shard
    step()    --(stage 1: all buckets now)--------------------------->  reduce-scatter (sum) into the grad shard
              all-reduce(sum) of the shard's squared norm (accumulated in float64, whatever the shard's dtype)
                                                          -> global grad norm, found_inf (on the device)
                 ... and, in the same all-reduce, the ranks' agreement: how many ranks found a bad value or grad,
                 and the bits of every step value (each rank's must be identical): read on the host, the step's
                 one sync; on a problem every rank raises the same error, before anything has changed
              fused Adam (fused_ops.functional.adam_) on the shard; 1/world, 1/loss_scale and the clip
              coefficient are one device-side grad_scale
              (with fp32 masters, the same pass writes the rounded low-precision params)
              all-gather of every bucket into the params

Collectives are launched in bucket order on every rank (a bucket whose grads are ready waits for the buckets
before it), so ranks whose backward produces grads in different orders, or not at all for some params, still
issue the same sequence of collectives. At the end of each backward pass every bucket not yet reduced is
reduced, with zeros for params that got no grad.

Checkpoints: ``state_dict()`` is this rank's shard, ``consolidated_state_dict(to=0)`` is torch.optim.AdamW's
layout; ``load_state_dict`` takes either (or the list of all ranks' shards) with any world size.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import statistics
import tempfile
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import functional
from ._backend import check_backend

__all__ = ["ZeroAdamW", "benchmark_zero"]

_FORMAT = "fused_ops.zero/1"
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_MASTER_KEY = "master_param"

# The grad hook each param carries (at most one ZeroAdamW drives a param: the newest one built over it).
_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


# Set when the process group's backend lacks the single-tensor collective (older gloo builds): then gloo runs
# an all-reduce and keeps this rank's slice / an all-gather into a list of views. NCCL always has them.
_FALLBACK = {"reduce_scatter": False, "all_gather": False}


class _Deferred:
    """A collective's work handle plus what to do once it has completed."""

    def __init__(self, work: Any, after: Callable[[], None] | None = None) -> None:
        self.work, self.after = work, after

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.after is not None:
            self.after()
            self.after = None


def _unsupported(err: Exception, group: Any) -> bool:
    return dist.get_backend(group) == "gloo" and "support" in str(err).lower()


def _reduce_scatter(output: Tensor, input: Tensor, group: Any, async_op: bool) -> Any:
    """Sum ``input`` over ranks, this rank's slice into ``output`` (which may be that slice: in place)."""
    if not _FALLBACK["reduce_scatter"]:
        # torch 2.13 renames reduce_scatter_tensor to reduce_scatter_single (the old name warns); 2.11 has
        # only the old one.
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        try:
            return fn(output, input, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
        except (RuntimeError, NotImplementedError) as e:
            if not _unsupported(e, group):
                raise
            _FALLBACK["reduce_scatter"] = True
            warnings.warn(f"gloo lacks reduce_scatter_tensor ({e}); ZeroAdamW uses all_reduce instead", stacklevel=2)
    n = output.numel()
    mine = input.narrow(0, dist.get_rank(group) * n, n)
    work = dist.all_reduce(input, op=dist.ReduceOp.SUM, group=group, async_op=True)
    done = _Deferred(work, None if mine.data_ptr() == output.data_ptr() else lambda: output.copy_(mine))
    if not async_op:
        done.wait()
    return done


def _all_gather(output: Tensor, input: Tensor, group: Any, async_op: bool) -> Any:
    """Concatenate every rank's ``input`` into ``output`` (``input`` may be this rank's slice of it)."""
    if not _FALLBACK["all_gather"]:
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        try:
            return fn(output, input, group=group, async_op=async_op)
        except (RuntimeError, NotImplementedError) as e:
            if not _unsupported(e, group):
                raise
            _FALLBACK["all_gather"] = True
            warnings.warn(f"gloo lacks all_gather_into_tensor ({e}); ZeroAdamW uses all_gather", stacklevel=2)
    views = list(output.chunk(dist.get_world_size(group)))
    return dist.all_gather(views, input, group=group, async_op=async_op)


def _sum_of_squares(tensors: list[Tensor]) -> Tensor:
    """Sum of squares of all elements, as a float64 0-d tensor on the tensors' device (no host sync).

    Accumulated in float64 whatever the tensors' dtype (bf16/fp16 grad shards too): never in low precision.
    """
    grad_norm = getattr(functional, "grad_norm", None)
    if grad_norm is not None:  # one launch per dtype, accumulated in float64
        return grad_norm(tensors).to(torch.float64).square()
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square().sum()


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# -- validation -----------------------------------------------------------------------------------------------
# Rule: validate everything, on every rank, then change anything. A rank never raises alone where the other ranks
# would go on into a collective: local errors are agreed on first (in the constructor and load_state_dict with one
# all_gather_object, in step() inside the all-reduce the step runs anyway), and every rank raises the same error.
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
        return float(value)
    raise TypeError(f"{name} must be a number or a 1-element tensor, got {type(value).__name__}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of {value.numel()} elements"
    return f"{type(value).__name__} {value!r}"


def _check_lr_tensor(lr: Tensor, where: str) -> None:
    if lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element (lr of {where} has {lr.numel()} elements)")
    if not lr.is_floating_point():
        raise TypeError(f"a tensor lr must be floating point (lr of {where} is a {lr.dtype} tensor)")


def _check_lr_value(lr: float, where: str) -> None:
    if not (math.isfinite(lr) and lr >= 0):
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
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"Invalid epsilon value: {eps} (eps of {where})")
    weight_decay = _real(f"weight_decay of {where}", group["weight_decay"])
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (weight_decay of {where})")
    check_backend(group.get("backend"))
    return lr, beta1, beta2, eps, weight_decay


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
    if not (math.isfinite(step) and step >= 0):
        raise ValueError(f"{where} must be a finite count >= 0, got {step}")
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
_NONE = -1.0  # max_grad_norm / loss scale None in the compared values (valid ones are > 0)


@dataclass
class _StepInputs:
    """A step's values, checked on this rank (tensor values are checked on the device, in the all-reduce)."""

    lrs: list[float | Tensor]  # per group: a float, or a 1-element tensor on the params' device
    floats: list[tuple[float, float, float, float]]  # per group: beta1, beta2, eps, weight_decay
    max_grad_norm: float | None
    loss_scale: float | Tensor | None  # a float, or a 0-d float64 tensor on the params' device
    scaler_found_inf: Tensor | None  # the loss scaler's flag, set when a step is skipped
    values: list[float]  # compared between ranks (0.0 where the value is a tensor: see ``tensors``)
    tensors: list[tuple[int, Tensor, str]]  # (index in values, 0-d float64 tensor on the device, its name)


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


# -- layout -------------------------------------------------------------------------------------------------
@dataclass
class BucketSpec:
    """Where params go in one flat bucket. Depends only on shapes, dtypes, world size and the options."""

    group: int  # param group index
    dtype: torch.dtype
    slots: list[tuple[int, int, int]]  # (global param index, offset in the bucket, numel)
    numel: int  # padded: a multiple of world_size * align


def build_layout(
    params: Sequence[tuple[int, int, torch.dtype]], world_size: int, bucket_cap_bytes: int, align: int
) -> list[BucketSpec]:
    """Pack params into buckets.

    Args:
        params: one ``(group index, numel, dtype)`` per param, in registration order.
        world_size: number of shards each bucket splits into.
        bucket_cap_bytes: a bucket closes once it holds this many bytes (a larger param gets its own bucket).
        align: every param starts at a multiple of ``align`` elements; every shard is a multiple of it too.

    Returns buckets in the order backward is expected to complete them: params are walked in reverse
    registration order and a bucket is placed where its last param (in that walk) is seen.
    """
    open_buckets: dict[tuple[int, torch.dtype], BucketSpec] = {}
    sizes: dict[int, int] = {}
    done: list[tuple[int, BucketSpec]] = []  # (position of the bucket's last param in the reverse walk, spec)
    last_seen: dict[int, int] = {}
    for pos, index in enumerate(reversed(range(len(params)))):
        group, numel, dtype = params[index]
        key = (group, dtype)
        spec = open_buckets.get(key)
        if spec is None:
            spec = open_buckets[key] = BucketSpec(group, dtype, [], 0)
            sizes[id(spec)] = 0
        offset = _round_up(sizes[id(spec)], align)
        spec.slots.append((index, offset, numel))
        sizes[id(spec)] = offset + numel
        last_seen[id(spec)] = pos
        if sizes[id(spec)] * dtype.itemsize >= bucket_cap_bytes:
            done.append((pos, spec))
            del open_buckets[key]
    done.extend((last_seen[id(s)], s) for s in open_buckets.values())
    done.sort(key=lambda item: item[0])
    out = []
    for _, spec in done:
        spec.numel = max(_round_up(sizes[id(spec)], world_size * align), world_size * align)
        out.append(spec)
    return out


# -- runtime structures ---------------------------------------------------------------------------------------
@dataclass
class _Slot:
    index: int  # global param index
    param: Tensor
    offset: int  # in the bucket
    numel: int
    ptr: int = 0  # the param's address: a view of the bucket (a param whose .data was replaced is refused)


@dataclass
class _Segment:
    """The part of one param that this rank owns: elements [lo, hi) of the flattened param."""

    index: int
    lo: int
    hi: int
    start: int  # in the shard
    bucket: _Bucket


@dataclass
class _Bucket:
    index: int
    group: int
    dtype: torch.dtype
    slots: list[_Slot]
    numel: int
    shard_numel: int
    param_flat: Tensor
    param_shard: Tensor
    master: Tensor | None
    grad: Tensor  # the shard's reduced grads (accumulated across synced backward passes): _grad_dtype()
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None
    gaps: list[tuple[int, int]]  # padding ranges in the flat bucket
    n_hooked: int = 0
    ready: set = field(default_factory=set)
    grad_valid: bool = False
    inflight: int = 0
    staging_views: dict = field(default_factory=dict)  # staging buffer index -> (gap views, per-slot views)


class _StagingPool:
    """Flat buffers the reduce-scatters run in, reused bucket after bucket (two to overlap, else one)."""

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device):
        self.flat = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]
        self.free = list(range(count))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat)


# -- the optimizer --------------------------------------------------------------------------------------------
class ZeroAdamW(torch.optim.Optimizer):
    """AdamW with ZeRO stage 1 or 2 partitioning over a ``torch.distributed`` process group.

    Args:
        params: iterable of params or param-group dicts (as torch.optim.AdamW). All on one device; fp32,
            bf16 or fp16; identical in number, shape, dtype, group and order on every rank (checked,
            collectively). Their values may differ: every rank takes rank 0's at construction, as DDP does.
        process_group: the data-parallel group (default: the world group). Must be initialised.
        stage: 1 (shard optimizer states; grads reduce-scattered in ``step()``) or 2 (also shard grads: each
            bucket is reduce-scattered during backward as soon as its grads exist, and the full grads are freed).
        bucket_cap_mb: bucket size in MiB of param-dtype elements.
        overlap_comm: launch collectives asynchronously (two staging buffers), overlapping them with backward
            and with each other; ``False`` waits for each one.
        master_weights: keep an fp32 master shard for bf16/fp16 params (no effect on fp32 params).
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.AdamW.
        max_grad_norm: clip the global grad norm (over all ranks and param groups) to this, as
            ``torch.nn.utils.clip_grad_norm_`` would; ``None`` disables clipping.
        reduce_dtype: dtype of the reduce-scatter and of this rank's reduced-grad shard, which accumulates the
            grads of several synced backward passes (default: each bucket's param dtype). With bf16/fp16 params,
            ``torch.float32`` costs 2 more bytes per param / N and sums in fp32: more accurate over many ranks or
            micro-batches accumulated without ``no_sync``. (A low-precision reduce dtype other than the params'
            reduces in that dtype into an fp32 shard.) The grad norm is accumulated in float64 either way.
        align: params start, and shards split, at multiples of this many elements.
        backend: fused-op backend ("auto", "triton", "reference"), as in FusedAdamW.

    Memory, bytes per param on each of N ranks (``memory_report()`` lists what this object holds; ``p.grad``
    is autograd's)::

        params            stage  param  p.grad  shard: master + m + v + grad   total
        fp32                1      4      4        (0 + 4 + 4 + 4) / N         8 + 12/N
        fp32                2      4      0        (0 + 4 + 4 + 4) / N         4 + 12/N
        bf16 + fp32 master  1      2      2        (4 + 4 + 4 + 2) / N         4 + 14/N
        bf16 + fp32 master  2      2      0        (4 + 4 + 4 + 2) / N         2 + 14/N
          reduce_dtype=fp32 1      2      2        (4 + 4 + 4 + 4) / N         4 + 16/N
          reduce_dtype=fp32 2      2      0        (4 + 4 + 4 + 4) / N         2 + 16/N

    fp16 is as bf16; bf16 without master weights saves the 4/N of the master; amsgrad adds 4/N. On top: the
    staging buffers of the reduce-scatters (two with ``overlap_comm`` and several buckets, else one; each holds
    the largest bucket, about ``bucket_cap_mb`` of param-dtype elements, in the reduce dtype: twice those bytes
    for bf16 params reduced in fp32), the padding of buckets to ``world_size * align``, 4 bytes per param
    tensor for step counts, and in stage 2 the grads of the buckets not yet launched during backward (stage 2
    frees ``p.grad`` as each bucket is launched).

    Differences from torch.optim.AdamW: params that get no grad in a step are stepped with a zero grad
    (weight decay and momentum apply), on every rank alike; in stage 2 ``p.grad`` is freed during backward
    (use ``last_grad_norm`` for logging); the model's params become views into flat buffers owned here.
    Use ``step(loss_scale=...)`` for loss scaling (``torch.amp.GradScaler`` checks overflow per rank, which
    cannot work with sharded grads, so it is refused).

    Ranks agree before anything changes. The constructor checks its arguments and params on each rank, then one
    all_gather_object compares every rank's arguments, hyper-parameters and param signatures: an error on any
    rank, or a difference, raises the same exception on every rank (never one rank alone, which would leave the
    others waiting in a collective), before any param is touched. Then, like DDP at construction, rank 0's params
    are broadcast into every rank's buckets (ranks may have initialised the model with different seeds; the
    user's param tensors hold rank 0's values afterwards, and fp32 master weights are made from them): ranks
    start from bit-identical params. ``step()`` checks its values and grads on every rank and agrees inside the
    all-reduce it runs anyway, including that the step values (lr, betas, eps, weight_decay, amsgrad, maximize,
    max_grad_norm, loss_scale) are bit-identical on every rank; ``load_state_dict`` checks the whole checkpoint and
    agrees in one all_gather_object. A failed call raises the same exception on every rank and leaves params,
    grads, states, step counts and the loss scaler as they were.
    """

    _step_supports_amp_scaling = True  # so that GradScaler always calls step(), where it is refused clearly

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        process_group: Any = None,
        stage: int = 2,
        bucket_cap_mb: float = 25,
        overlap_comm: bool = True,
        master_weights: bool = True,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        reduce_dtype: torch.dtype | None = None,
        align: int = 64,
        backend: str | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ZeroAdamW needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group(backend='nccl' or 'gloo', ...) on every rank first"
            )
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        if self.rank < 0:
            raise ValueError("ZeroAdamW: this process is not a member of process_group")
        # Every argument is checked on this rank first, then the ranks agree (one all_gather_object) before
        # anything changes: a rank raising alone would leave the others waiting in that collective.
        self._built = False
        error: Exception | None = None
        config, group_values = None, None
        try:
            if stage not in (1, 2):
                raise ValueError(f"stage must be 1 or 2, got {stage!r}")
            if not (isinstance(bucket_cap_mb, numbers.Real) and bucket_cap_mb > 0 and math.isfinite(bucket_cap_mb)):
                raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
            if not (isinstance(align, int) and align >= 1):
                raise ValueError(f"align must be a positive int, got {align!r}")
            max_grad_norm = _check_max_grad_norm(max_grad_norm)
            if reduce_dtype is not None and reduce_dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"reduce_dtype must be one of {_SUPPORTED_DTYPES}, got {reduce_dtype}")
            if differentiable:
                raise ValueError("differentiable=True is not supported")
            if isinstance(betas, (tuple, list)) and len(betas) == 2:
                betas = (_real("betas[0]", betas[0]), _real("betas[1]", betas[1]))
            defaults = dict(
                lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                foreach=foreach, capturable=capturable, differentiable=False, fused=fused,
                decoupled_weight_decay=True, backend=check_backend(backend),
            )  # fmt: skip
            _check_group(0, defaults, read_lr=True)
            super().__init__(params, defaults)
            self._params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
            self._group_of: list[int] = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
            bad_params = self._local_param_error()
            if bad_params is not None:
                raise ValueError(f"bad params: {bad_params}")
            config = (stage, float(bucket_cap_mb), align, bool(master_weights), str(reduce_dtype), self.world_size,
                      max_grad_norm)  # fmt: skip
            group_values = []
            for gi, g in enumerate(self.param_groups):
                lr_, beta1, beta2, eps_, weight_decay_ = _check_group(gi, g, read_lr=True)
                lr_ = float(lr_.item()) if isinstance(lr_, Tensor) else lr_
                group_values.append((lr_, beta1, beta2, eps_, weight_decay_, bool(g["amsgrad"]), bool(g["maximize"])))
        except Exception as e:  # noqa: BLE001 - agreed on with the other ranks, then raised on every rank
            error = e
        self._check_same_on_all_ranks(config, group_values, error)

        self.stage = stage
        self.bucket_cap_mb = bucket_cap_mb
        self.overlap_comm = bool(overlap_comm)
        self.master_weights = bool(master_weights)
        self.max_grad_norm = max_grad_norm
        self.reduce_dtype = reduce_dtype
        self.align = align

        self._device = self._params[0].device if self._params else torch.device("cpu")
        self._build()
        self._built = True

        # Step counts: one per param, kept (identically) on every rank, like torch's per-param 'step'.
        self._steps = [torch.zeros((), dtype=torch.float32, device=self._device) for _ in self._params]
        self.last_grad_norm = torch.zeros((), dtype=torch.float32, device=self._device)
        self.last_found_inf = torch.zeros((), dtype=torch.float32, device=self._device)
        self.skipped_steps = torch.zeros((), dtype=torch.float32, device=self._device)
        self._shifts = torch.arange(0, 64, 16, dtype=torch.int64, device=self._device)  # see _bit_pieces

        self._sync_grads = True
        self._grad_errors: dict[int, tuple[str, str]] = {}  # param index -> (type, message), raised by step()
        self._round_open = False
        self._next_bucket = 0
        self._rounds_since_step = 0
        self._unsynced_grads = False
        self._inflight: deque = deque()
        self._hook_handles: list[Any] = []
        if stage == 2:
            self._register_hooks()

    # -- construction ---------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group while constructing; afterwards the flat layout is fixed and this raises."""
        if getattr(self, "_built", False):
            raise NotImplementedError("ZeroAdamW: param groups cannot be added after construction")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _, beta1, beta2, _, _ = _check_group(len(self.param_groups), merged, read_lr=True)
        if "betas" in param_group:
            param_group = {**param_group, "betas": (beta1, beta2)}
        super().add_param_group(param_group)

    def _local_param_error(self) -> str | None:
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            return f"all params must be on one device, got {sorted(str(d) for d in devices)}"
        for i, p in enumerate(self._params):
            if p.dtype not in _SUPPORTED_DTYPES:
                return f"param {i} (shape {tuple(p.shape)}) is {p.dtype}; supported: fp32, bf16, fp16"
            if p.is_sparse:
                return f"param {i} is sparse"
        return None

    def _check_same_on_all_ranks(
        self, config: tuple | None, group_values: list[tuple] | None, local_error: Exception | None
    ) -> None:
        """One all_gather_object of every rank's arguments, hyper-parameters, param signature and error: every
        rank raises the same exception if any rank had an error or anything differs between ranks."""
        err = None if local_error is None else (type(local_error).__name__, str(local_error))
        sig = None
        if err is None:
            sig = [(g, tuple(p.shape), str(p.dtype)) for g, p in zip(self._group_of, self._params, strict=True)]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (config, group_values, sig, err), group=self.process_group)
        for r, (_, _, _, e) in enumerate(gathered):
            if e is not None:
                raise _ERROR_TYPES.get(e[0], RuntimeError)(f"ZeroAdamW: {e[1]} (on rank {r}; every rank raises this)")
        cfg0, values0, sig0, _ = gathered[0]
        for r, (cfg, values, s, _) in enumerate(gathered[1:], start=1):
            if cfg != cfg0:
                names = ("stage", "bucket_cap_mb", "align", "master_weights", "reduce_dtype", "world_size",
                         "max_grad_norm")  # fmt: skip
                pairs = zip(names, cfg0, cfg, strict=True)
                diff = [f"{n}={a!r} on rank 0 but {b!r} on rank {r}" for n, a, b in pairs if a != b]
                raise ValueError("ZeroAdamW: constructor arguments differ between ranks: " + "; ".join(diff))
            if len(s) != len(sig0):
                raise ValueError(
                    f"ZeroAdamW: params differ between ranks: rank 0 has {len(sig0)} params, rank {r} has {len(s)}"
                )
            for i, (a, b) in enumerate(zip(sig0, s, strict=True)):
                if a != b:
                    raise ValueError(
                        f"ZeroAdamW: params differ between ranks: param {i} is (group {a[0]}, shape {a[1]}, "
                        f"{a[2]}) on rank 0 but (group {b[0]}, shape {b[1]}, {b[2]}) on rank {r}; every rank "
                        "must pass the same params in the same order"
                    )
            for gi, (a, b) in enumerate(zip(values0, values, strict=True)):
                for name, x, y in zip(_GROUP_VALUES, a, b, strict=True):
                    if x != y:
                        raise ValueError(
                            f"ZeroAdamW: {name} of param group {gi} differs between ranks ({x!r} on rank 0 but "
                            f"{y!r} on rank {r}): every rank must pass the same hyper-parameters"
                        )

    def _build(self) -> None:
        specs = build_layout(
            [(g, p.numel(), p.dtype) for g, p in zip(self._group_of, self._params, strict=True)],
            self.world_size,
            int(self.bucket_cap_mb * 2**20),
            self.align,
        )
        dev, rank, world = self._device, self.rank, self.world_size
        self._buckets: list[_Bucket] = []
        self._bucket_of: list[int] = [0] * len(self._params)
        self._segments: list[list[_Segment]] = [[] for _ in self.param_groups]
        self._segment_of: dict[int, _Segment] = {}
        for bi, spec in enumerate(specs):
            shard = spec.numel // world
            flat = torch.zeros(spec.numel, dtype=spec.dtype, device=dev)
            slots, gaps, end = [], [], 0
            for index, offset, numel in sorted(spec.slots, key=lambda s: s[1]):
                p = self._params[index]
                view = flat.narrow(0, offset, numel)
                with torch.no_grad():
                    view.copy_(p.detach().reshape(-1))
                p.data = view.view(p.shape)  # the model's param now lives in the bucket
                slots.append(_Slot(index, p, offset, numel, p.data_ptr()))
                self._bucket_of[index] = bi
                if offset > end:
                    gaps.append((end, offset))
                end = offset + numel
            if spec.numel > end:
                gaps.append((end, spec.numel))
            if world > 1:  # every rank starts from rank 0's params, as DDP does (before masters are made of them)
                dist.broadcast(flat, src=dist.get_global_rank(self.process_group, 0), group=self.process_group)
            param_shard = flat.narrow(0, rank * shard, shard)
            lowp = spec.dtype != torch.float32
            group = self.param_groups[spec.group]
            b = _Bucket(
                index=bi, group=spec.group, dtype=spec.dtype, slots=slots, numel=spec.numel, shard_numel=shard,
                param_flat=flat, param_shard=param_shard,
                master=param_shard.float() if lowp and self.master_weights else None,
                grad=torch.zeros(shard, dtype=self._grad_dtype(spec.dtype), device=dev),
                exp_avg=torch.zeros(shard, dtype=torch.float32, device=dev),
                exp_avg_sq=torch.zeros(shard, dtype=torch.float32, device=dev),
                max_exp_avg_sq=torch.zeros(shard, dtype=torch.float32, device=dev) if group["amsgrad"] else None,
                gaps=gaps,
            )  # fmt: skip
            self._buckets.append(b)
            lo_s, hi_s = rank * shard, (rank + 1) * shard
            for s in slots:
                lo, hi = max(s.offset, lo_s), min(s.offset + s.numel, hi_s)
                if lo < hi:
                    seg = _Segment(s.index, lo - s.offset, hi - s.offset, lo - lo_s, b)
                    self._segments[spec.group].append(seg)
                    self._segment_of[s.index] = seg
        self._unowned = [i for i in range(len(self._params)) if i not in self._segment_of]
        self._adam_view_cache: dict[tuple[int, bool], tuple[list[Tensor], ...]] = {}
        sizes: dict[tuple, int] = {}
        for b in self._buckets:
            key = (self._reduce_dtype(b), dev)
            sizes[key] = max(sizes.get(key, 0), b.numel)
        count = 2 if self.overlap_comm and len(self._buckets) > 1 else 1
        self._pools: dict[tuple, _StagingPool] = {
            key: _StagingPool(count, numel, key[0], key[1]) for key, numel in sizes.items()
        }

    def _reduce_dtype(self, b: _Bucket) -> torch.dtype:
        return self.reduce_dtype if self.reduce_dtype is not None else b.dtype

    def _grad_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """The reduced-grad shard's dtype: the reduce dtype when the fused Adam op takes it with these params
        (the params' dtype, or fp32), else fp32 (e.g. fp16 params reduced in bf16)."""
        reduce_dtype = self.reduce_dtype if self.reduce_dtype is not None else param_dtype
        return reduce_dtype if reduce_dtype in (param_dtype, torch.float32) else torch.float32

    def _register_hooks(self) -> None:
        ref = weakref.ref(self)
        for b in self._buckets:
            for s in b.slots:
                if not s.param.requires_grad:
                    continue

                def hook(_p: Tensor, index: int = s.index) -> None:
                    opt = ref()
                    if opt is not None:
                        opt._on_grad_ready(index)

                old = _HOOKS.pop(s.param, None)
                if old is not None:  # an earlier ZeroAdamW over this param must not launch collectives any more
                    old.remove()
                handle = s.param.register_post_accumulate_grad_hook(hook)
                _HOOKS[s.param] = handle
                self._hook_handles.append(handle)
                b.n_hooked += 1

    # -- gradient reduction ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate grads locally (in ``p.grad``) in backward passes run inside; no communication.

        The next backward outside the context (or ``step()``) reduces the accumulated grads. In stage 1 grads
        are reduced in ``step()`` anyway, so this changes nothing there. Same as setting ``sync_grads``.
        """
        previous = self._sync_grads
        self._sync_grads = False
        try:
            yield
        finally:
            self._sync_grads = previous

    @property
    def sync_grads(self) -> bool:
        """False while grads are accumulated locally without communication (see :meth:`no_sync`)."""
        return self._sync_grads

    @sync_grads.setter
    def sync_grads(self, value: bool) -> None:
        self._sync_grads = bool(value)

    def _on_grad_ready(self, index: int) -> None:
        if not self._sync_grads:
            self._unsynced_grads = True
            return
        if not self._round_open:
            self._round_open = True
            self._unsynced_grads = False
            self._next_bucket = 0
            torch.autograd.Variable._execution_engine.queue_callback(self._end_round)
        self._buckets[self._bucket_of[index]].ready.add(index)
        with torch.no_grad():
            while self._next_bucket < len(self._buckets):
                b = self._buckets[self._next_bucket]
                if len(b.ready) < b.n_hooked:
                    break
                self._launch(b)
                self._next_bucket += 1

    def _end_round(self) -> None:
        """End of a backward pass: reduce every bucket not reduced yet (zeros for params without grads)."""
        with torch.no_grad():
            while self._next_bucket < len(self._buckets):
                self._launch(self._buckets[self._next_bucket])
                self._next_bucket += 1
        self._round_open = False
        self._next_bucket = 0
        self._rounds_since_step += 1

    def _grad_error(self, s: _Slot, view: Tensor) -> tuple[str, str]:
        p, g = s.param, s.param.grad
        where = f"param {s.index} (shape {tuple(view.shape)})"
        if p.data_ptr() != s.ptr or p.dtype != self._buckets[self._bucket_of[s.index]].dtype or p.shape != view.shape:
            return "RuntimeError", (
                f"{where} is no longer a view of ZeroAdamW's flat buffer (its .data was replaced, or the model was "
                "moved or cast after the optimizer was built), so its updates would not reach it: build ZeroAdamW "
                "after the model has its final device and dtype"
            )
        if g.is_sparse:
            return "RuntimeError", f"ZeroAdamW does not support sparse gradients; the grad of {where} is sparse"
        if not g.is_floating_point():
            return "RuntimeError", f"the grad of {where} is {g.dtype}"
        return "RuntimeError", f"the grad of {where} has shape {tuple(g.shape)}"

    def _launch(self, b: _Bucket, free_grads: bool = True) -> None:
        """Copy the bucket's grads into a staging buffer and start its reduce-scatter (stage 2 frees the grads
        unless ``free_grads`` is False: step() frees them once it has succeeded)."""
        b.ready.clear()
        key = (self._reduce_dtype(b), self._device)
        pool = self._pools[key]
        while not pool.free:
            self._finish_oldest()
        si = pool.free.pop()
        flat = pool.flat[si].narrow(0, 0, b.numel)
        views = b.staging_views.get(si)
        if views is None:  # built once per (bucket, staging buffer): the launch path stays cheap on the host
            views = b.staging_views[si] = (
                [flat.narrow(0, lo, hi - lo) for lo, hi in b.gaps],
                [flat.narrow(0, s.offset, s.numel).view(s.param.shape) for s in b.slots],
            )
        dst, src, zero, bad = [], [], list(views[0]), False
        for s, view in zip(b.slots, views[1], strict=True):
            p = s.param
            g = p.grad
            if p.data_ptr() != s.ptr or p.dtype != b.dtype or p.shape != view.shape or (
                g is not None and (g.shape != view.shape or g.is_sparse or not g.is_floating_point())
            ):
                # Never raised here (only this rank would, mid-sequence of collectives): reduced as zeros, and
                # step() raises the error on every rank.
                self._grad_errors.setdefault(s.index, self._grad_error(s, view))
                zero.append(view)
                bad = True
            elif g is None:
                zero.append(view)
            else:
                dst.append(view)
                src.append(g)
        if dst:
            torch._foreach_copy_(dst, src)
        if zero:
            torch._foreach_zero_(zero)
        if self.stage == 2 and free_grads:
            for s in b.slots:
                if not bad or s.index not in self._grad_errors:
                    s.param.grad = None
        # Straight into the grad shard when nothing is there yet (and the dtypes agree); otherwise in place (into
        # this rank's slice of the staging buffer: NCCL and gloo support it), added to the shard when it lands.
        direct = key[0] == b.grad.dtype and not b.grad_valid and b.inflight == 0
        out = b.grad if direct else flat.narrow(0, self.rank * b.shard_numel, b.shard_numel)
        work = _reduce_scatter(out, flat, self.process_group, async_op=True)
        b.inflight += 1
        self._inflight.append((b, pool, si, out, direct, work))
        if not self.overlap_comm:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        b, pool, si, out, direct, work = self._inflight.popleft()
        work.wait()
        if not direct:
            if b.grad_valid:
                b.grad.add_(out)
            else:
                b.grad.copy_(out)
        b.grad_valid = True
        b.inflight -= 1
        pool.free.append(si)

    def _drain(self) -> None:
        if self._round_open:  # a backward pass that failed half-way: finish its round so ranks stay in step
            self._end_round()
        while self._inflight:
            self._finish_oldest()

    def _reduce_all(self) -> tuple | None:
        """Make every bucket's grad shard final for this step.

        Returns what a failed step puts back (see ``_undo_reduce``), None when there is nothing to put back: stage
        1 recomputes its shards from ``p.grad`` at every step, and in stage 2 after a synced backward they are
        final already.
        """
        self._drain()
        undo = None
        if self.stage == 1 or self._rounds_since_step == 0 or self._unsynced_grads:
            # Stage 1, or stage 2 without a synced backward since the last step (grads set by hand, or
            # accumulated under no_sync after the last synced backward): reduce what p.grad holds now. Stage 1's
            # p.grad holds the whole accumulation, so its shards are replaced, not added to.
            if self.stage == 1:
                self._grad_errors.clear()
                for b in self._buckets:
                    b.grad_valid = False
            else:
                # Into new shards, and p.grad is kept until the step succeeds: a failed step puts the old shards
                # back and leaves p.grad as it was, so that nothing is reduced twice.
                undo = ([(b, b.grad, b.grad_valid) for b in self._buckets], dict(self._grad_errors))
                for b in self._buckets:
                    b.grad = b.grad.clone() if b.grad_valid else torch.empty_like(b.grad)
                self._adam_view_cache.clear()
            with torch.no_grad():
                for b in self._buckets:
                    self._launch(b, free_grads=False)
            self._drain()
        for b in self._buckets:
            if not b.grad_valid:
                b.grad.zero_()
                b.grad_valid = True
        return undo

    def _undo_reduce(self, undo: tuple | None) -> None:
        if undo is None:
            return
        shards, errors = undo
        for b, grad, valid in shards:
            b.grad, b.grad_valid = grad, valid
        self._grad_errors = errors
        self._adam_view_cache.clear()

    def _commit_reduce(self, undo: tuple | None) -> None:
        self._rounds_since_step = 0
        self._unsynced_grads = False
        if undo is not None:  # stage 2 reduced p.grad in step(): free it now, as backward would have
            for p in self._params:
                p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset grads: ``p.grad`` (as torch) and this rank's reduced-grad shards."""
        self._drain()
        for p in self._params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()
        for b in self._buckets:
            b.grad_valid = False
        self._rounds_since_step = 0
        self._unsynced_grads = False
        self._grad_errors.clear()

    # -- step -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss_scale: float | Tensor | Any = None, **unexpected: Any
    ) -> Any:
        """Reduce grads, clip, unscale, update this rank's shard with the fused Adam op, all-gather the params.

        Args:
            closure: re-evaluates the model and returns the loss (as torch.optim).
            loss_scale: the factor the loss was multiplied by before backward: a float, a 1-element device
                tensor, or a loss scaler with ``scale`` and ``found_inf`` tensors (``fused_ops.DynamicLossScaler``).
                Grads are divided by it inside the fused step, and a step whose grads hold an inf or NaN on
                any rank is skipped on every rank (params, moments and step counts unchanged); ``last_found_inf``
                then holds 1, and a scaler's ``found_inf`` is set too, so that ``scaler.update()`` follows the
                global decision on every rank.

        After the step, ``last_grad_norm`` holds the global L2 norm of the averaged, unscaled grads before
        clipping, and ``skipped_steps`` counts skipped steps (both device tensors). Without ``loss_scale``
        nothing is skipped: inf/NaN grads go into the update, as with torch.optim.

        Checked before anything changes, on every rank: the step values of every param group (lr, betas, eps,
        weight_decay; a tensor lr must be 1-element and floating point, its value is checked on the device),
        ``max_grad_norm``, ``loss_scale`` (finite and > 0; a tensor or a scaler's ``scale`` and ``found_inf``
        1-element and floating point), the grads (dense, the param's shape) and that every param is still a view
        of its bucket; and that every rank steps with bit-identical values (lr, betas, eps, weight_decay, amsgrad,
        maximize, max_grad_norm, loss_scale). A problem on any rank raises the same exception on every rank, and
        leaves params, grads, moments, master weights, step counts, the scaler and the logged values as they were.
        The check rides on the all-reduce of the grad norm (no extra collective); reading its outcome is the
        step's one host synchronisation (torch's GradScaler syncs once per step too).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        error: Exception | None = None
        inputs: _StepInputs | None = None
        try:
            inputs = self._step_inputs(loss_scale, unexpected)
        except Exception as e:  # noqa: BLE001 - agreed on with the other ranks, then raised on every rank
            error = e
        if not self._buckets:  # no params on any rank (checked at construction): no collective, nothing to change
            if error is not None:
                raise error
            return loss
        undo = self._reduce_all()
        if error is None and self._grad_errors:
            index = min(self._grad_errors)
            kind, msg = self._grad_errors[index]
            error = _ERROR_TYPES[kind](msg)
        try:
            sumsq = self._agree_on_step(_sum_of_squares([b.grad for b in self._buckets]), inputs, error)
        except BaseException:
            self._undo_reduce(undo)
            raise
        assert inputs is not None
        self._commit_reduce(undo)
        dev = self._device

        # One all-reduce gave both the global norm and the overflow flag (inf/NaN propagate through the sum).
        divisor: float | Tensor = float(self.world_size)
        if inputs.loss_scale is not None:
            divisor = inputs.loss_scale * self.world_size
        total_norm = sumsq.sqrt() / divisor
        self.last_grad_norm = total_norm.float()
        if inputs.max_grad_norm is not None:
            # torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1; folded into the divisor.
            clip_coef = (inputs.max_grad_norm / (total_norm.float() + 1e-6)).clamp(max=1.0)
            grad_scale = (divisor / clip_coef.double()).float().reshape(1)
        elif isinstance(divisor, Tensor):
            grad_scale = divisor.float().reshape(1)
        else:
            grad_scale = torch.full((1,), divisor, dtype=torch.float32, device=dev)
        if inputs.loss_scale is not None:
            found_inf = (~torch.isfinite(sumsq)).float().reshape(1)
            self.last_found_inf = found_inf.reshape(())
            self.skipped_steps += self.last_found_inf
            flag = inputs.scaler_found_inf
            if flag is not None:
                flag.copy_(torch.maximum(flag, found_inf.to(flag).reshape(flag.shape)))
        else:
            found_inf = None
            self.last_found_inf = torch.zeros((), dtype=torch.float32, device=dev)

        self._ensure_amsgrad_buffers()
        for gi, group in enumerate(self.param_groups):
            # Segments with an fp32 master (bf16/fp16 buckets) and without (fp32, or master_weights=False) are
            # two calls: with masters, one pass updates them in fp32 and writes the rounded params.
            for with_master in (False, True):
                segs = [s for s in self._segments[gi] if (s.bucket.master is not None) == with_master]
                if segs:
                    lr, floats = inputs.lrs[gi], inputs.floats[gi]
                    self._adam(group, segs, lr, floats, grad_scale, found_inf, (gi, with_master))
        # Params with no element on this rank still count the step, as their owners do.
        others = [self._steps[i] for i in self._unowned]
        if others:
            torch._foreach_add_(others, 1)
            if found_inf is not None:
                torch._foreach_sub_(others, [found_inf.reshape(())] * len(others))

        works = []
        for b in self._buckets:
            works.append(_all_gather(b.param_flat, b.param_shard, self.process_group, async_op=self.overlap_comm))
        for w in works:
            if w is not None:
                w.wait()
        return loss

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
            raise RuntimeError(
                "ZeroAdamW does not work with torch.amp.GradScaler (its overflow check reads the full local "
                "grads of one rank, which ZeRO does not keep): call optimizer.step(loss_scale=scale) and update "
                "the scale from optimizer.last_found_inf"
            )
        dev = self._device
        values: list[float] = []
        tensors: list[tuple[int, Tensor, str]] = []
        lrs: list[float | Tensor] = []
        floats: list[tuple[float, float, float, float]] = []
        for gi, group in enumerate(self.param_groups):
            lr, beta1, beta2, eps, weight_decay = _check_group(gi, group, read_lr=False)
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
            values += [beta1, beta2, eps, weight_decay, float(bool(group["amsgrad"])), float(bool(group["maximize"]))]
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
            if scaler_found_inf is not None and not (
                isinstance(scaler_found_inf, Tensor) and scaler_found_inf.numel() == 1
                and scaler_found_inf.is_floating_point()
            ):  # fmt: skip
                raise ValueError(
                    "loss_scale.found_inf (the loss scaler's overflow flag) must be a 1-element floating-point "
                    f"tensor, got {_describe(scaler_found_inf)}"
                )
        else:
            raise TypeError(
                "loss_scale must be None, a number, a 1-element tensor or a loss scaler with a `scale` tensor, got "
                f"{type(loss_scale).__name__}"
            )
        values.append(float(kind))
        if isinstance(scale, Tensor):
            name = "loss_scale" if kind == 2 else "loss_scale.scale"
            if scale.numel() != 1:
                raise ValueError(f"{name} must be a number or a 1-element tensor, got {scale.numel()} elements")
            if not scale.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {scale.dtype}")
            scale = scale.detach().to(dev, torch.float64).reshape(())
            tensors.append((len(values), scale, "loss_scale"))
            values.append(0.0)
        elif scale is not None:
            scale = float(scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"loss_scale must be a finite number > 0, got {scale}")
            values.append(scale)
        else:
            values.append(_NONE)
        return _StepInputs(lrs, floats, max_grad_norm, scale, scaler_found_inf, values, tensors)

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

    def _agree_on_step(self, sumsq: Tensor, inputs: _StepInputs | None, error: Exception | None) -> Tensor:
        """The step's all-reduce: the grad shards' sum of squares, the number of ranks with a problem (found on the
        host, or in a tensor value checked on the device), and the bits of every compared value (``_bit_pieces``).
        Raises on every rank alike (they all read the same sums) if a rank had a problem or the values differ;
        returns the global sum of squares (a 0-d float64 device tensor)."""
        n_values = len(_GROUP_VALUES) * len(self.param_groups) + 3
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
            ok = torch.isfinite(given) & ((given > 0) | ((given == 0) & (positive == 0)))
            flag = flag + (~ok).sum(dtype=torch.float64)
        vec = torch.cat([sumsq.reshape(1).to(torch.float64), flag, _bit_pieces(values, self._shifts)])
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.process_group)
        sums = vec[1:].tolist()  # the step's one host read
        if sums[0] > 0:
            self._raise_step_error(inputs, error)
        differ = _differing(sums[1:], self.world_size)
        if differ:
            self._raise_step_values_differ(inputs, differ)
        return vec[0]

    def _raise_step_error(self, inputs: _StepInputs | None, error: Exception | None) -> None:
        """Some rank had a problem: every rank gets every rank's description (the error path's own collective,
        which every rank reaches) and raises the first one."""
        local = None if error is None else (type(error).__name__, str(error))
        if local is None and inputs is not None:
            for _, t, name in inputs.tensors:
                v = float(t.item())
                if name == "loss_scale" and not (math.isfinite(v) and v > 0):
                    local = ("ValueError", f"loss_scale must be a finite number > 0, got {v}")
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
    def _adam_views(self, key: tuple[int, bool], segs: list[_Segment]) -> tuple[list[Tensor], ...]:
        """Per-segment views of the shards (cached: same addresses every step, so the kernel's table is too)."""
        cached = self._adam_view_cache.get(key)
        if cached is not None:
            return cached
        views: tuple[list[Tensor], ...] = ([], [], [], [], [], [], [])
        params, masters, grads, ms, vs, maxvs, steps = views
        for s in segs:
            n, b = s.hi - s.lo, s.bucket
            params.append(b.param_shard.narrow(0, s.start, n))
            if b.master is not None:
                masters.append(b.master.narrow(0, s.start, n))
            grads.append(b.grad.narrow(0, s.start, n))
            ms.append(b.exp_avg.narrow(0, s.start, n))
            vs.append(b.exp_avg_sq.narrow(0, s.start, n))
            if b.max_exp_avg_sq is not None:
                maxvs.append(b.max_exp_avg_sq.narrow(0, s.start, n))
            steps.append(self._steps[s.index])
        self._adam_view_cache[key] = views
        return views

    def _adam(self, group: dict[str, Any], segs: list[_Segment], lr: float | Tensor,
              floats: tuple[float, float, float, float], grad_scale: Tensor, found_inf: Tensor | None,
              key: tuple[int, bool]) -> None:  # fmt: skip
        """The fused Adam op over the given segments of this rank's shards (one launch per dtype), with the step
        values ``step()`` checked (``floats``: beta1, beta2, eps, weight_decay)."""
        # Grad shards are the params' dtype or fp32; the op takes both as they are, divides by grad_scale in fp32
        # (in the Triton kernel, or into fp32 copies on the CPU path) and leaves the shards as reduced.
        params, masters, grads, ms, vs, maxvs, steps = self._adam_views(key, segs)
        beta1, beta2, eps, weight_decay = floats
        amsgrad = bool(group["amsgrad"])
        functional.adam_(
            params, grads, ms, vs, maxvs if amsgrad else None, steps,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=bool(group["maximize"]), decoupled_weight_decay=True,
            grad_scale=grad_scale, found_inf=found_inf, master_params=masters or None, backend=group["backend"],
        )  # fmt: skip

    def _ensure_amsgrad_buffers(self) -> None:
        for b in self._buckets:
            if self.param_groups[b.group]["amsgrad"] and b.max_exp_avg_sq is None:
                b.max_exp_avg_sq = torch.zeros_like(b.exp_avg)
                self._adam_view_cache.clear()

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _groups_for_save(self) -> list[dict[str, Any]]:
        groups, start = [], 0
        for g in self.param_groups:
            saved = {k: v for k, v in g.items() if k != "params"}
            saved["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(saved)
        return groups

    def _state_names(self, b: _Bucket) -> list[str]:
        names = ["exp_avg", "exp_avg_sq"]
        if b.max_exp_avg_sq is not None:
            names.append("max_exp_avg_sq")
        if b.master is not None:
            names.append(_MASTER_KEY)
        return names

    @staticmethod
    def _bucket_tensor(b: _Bucket, name: str) -> Tensor:
        return b.master if name == _MASTER_KEY else getattr(b, name)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the state (tensors are copies; save one file per rank).

        ``state[i]`` holds param ``i``'s ``step`` and, for the elements ``ranges[i] = (lo, hi)`` of the
        flattened param that this rank owns, 1-D ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``,
        ``master_param``). ``load_state_dict`` accepts the list of all ranks' dicts, with any world size.
        """
        self._drain()
        state: dict[int, dict[str, Tensor]] = {i: {"step": t.clone()} for i, t in enumerate(self._steps)}
        ranges: dict[int, tuple[int, int]] = {}
        for seg in self._segment_of.values():
            b, n = seg.bucket, seg.hi - seg.lo
            for name in self._state_names(b):
                state[seg.index][name] = self._bucket_tensor(b, name).narrow(0, seg.start, n).clone()
            ranges[seg.index] = (seg.lo, seg.hi)
        meta = {
            "format": _FORMAT, "rank": self.rank, "world_size": self.world_size, "stage": self.stage,
            "numels": [p.numel() for p in self._params], "shapes": [tuple(p.shape) for p in self._params],
            "ranges": ranges,
        }  # fmt: skip
        return {"state": state, "param_groups": self._groups_for_save(), "zero": meta}

    def consolidated_state_dict(self, to: int | None = 0, device: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The whole state in torch.optim.AdamW's layout, assembled on rank ``to`` (every rank if None).

        Collective: call it on every rank. Other ranks get None. Tensors are put on ``device`` (CPU by default,
        so the full state never has to fit on one GPU); the transient cost on each rank is one bucket.
        Master weights, when kept, are under the extra key ``master_param`` (torch.optim ignores it).
        """
        error = None
        try:  # checked on every rank and agreed on before the first gather: no rank fails alone half-way
            if to is not None and not (isinstance(to, int) and 0 <= to < self.world_size):
                raise ValueError(f"to must be a rank in [0, {self.world_size}) or None, got {to!r}")
            torch.empty(0, device=device)  # a device that does not exist (or a bad name) fails here
        except Exception as e:  # noqa: BLE001 - agreed on with the other ranks, then raised on every rank
            error = f"{type(e).__name__}: {e}"
        self._raise_if_any_rank_failed(error, "consolidated_state_dict", same=("to", to))
        self._drain()
        keep = to is None or to == self.rank
        state: dict[int, dict[str, Tensor]] = {}
        if keep:
            for i, t in enumerate(self._steps):
                state[i] = {"step": t.detach().to(device, copy=True)}
        for b in self._buckets:
            for name in self._state_names(b):
                full = torch.empty(b.numel, dtype=torch.float32, device=self._device)
                _all_gather(full, self._bucket_tensor(b, name), self.process_group, async_op=False)
                if keep:
                    for s in b.slots:
                        part = full.narrow(0, s.offset, s.numel).view(s.param.shape)
                        state[s.index][name] = part.to(device, copy=True)
        if not keep:
            return None
        return {"state": state, "param_groups": self._groups_for_save()}

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

    def load_state_dict(self, state_dict: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Load a checkpoint saved with any world size. Collective: call it on every rank.

        Accepts a torch.optim.AdamW / FusedAdamW / ``consolidated_state_dict`` dict, one rank's
        ``state_dict()`` (enough when the world size and rank are the same), or the list of every rank's
        ``state_dict()`` (resharded here). Each rank copies out only the elements it owns. Load the model's
        params first: master weights that do not round to the current params are replaced by the params (with a
        warning).

        Every rank checks the whole checkpoint before changing anything: group count and sizes, each group's
        hyper-parameters, every param's state (none at all: a param never stepped, zeros; else ``step``, a
        finite count >= 0, and ``exp_avg``, ``exp_avg_sq``, with amsgrad ``max_exp_avg_sq``, floating-point
        tensors of the param's size, or of the shard range's size in a shard list) and, for a shard list, each
        shard's ranges, step counts agreeing between shards, and that the elements this rank owns are covered.
        The ranks then agree (one collective) that every rank's checkpoint is valid and gives the same
        hyper-parameters and step counts; otherwise every rank raises the same ValueError (naming the rank, the
        param index and the key) and nothing is loaded on any rank. Keys missing from a legacy checkpoint's groups
        take torch.optim's defaults (``amsgrad``, ``maximize``: False), as torch.optim loads them.
        """
        self._drain()
        error, plan = None, None
        try:
            plan = self._plan_load(state_dict)
        except Exception as e:  # noqa: BLE001 - any problem is agreed on with the other ranks, then raised
            error = f"{type(e).__name__}: {e}"
        self._agree_on_load(error, None if plan is None else plan[-1])
        assert plan is not None
        groups, steps, fetch, _ = plan
        for g, ng in zip(self.param_groups, groups, strict=True):
            for k, v in ng.items():
                g[k] = v
        for b in self._buckets:  # no amsgrad any more: no max_exp_avg_sq (as torch.optim's state)
            if b.max_exp_avg_sq is not None and not self.param_groups[b.group]["amsgrad"]:
                b.max_exp_avg_sq = None
                self._adam_view_cache.clear()
        self._ensure_amsgrad_buffers()
        for i, s in enumerate(steps):
            self._steps[i].fill_(s)
        stale_master = False
        with torch.no_grad():
            for seg in self._segment_of.values():
                b, n = seg.bucket, seg.hi - seg.lo
                for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    dst = getattr(b, name)
                    if dst is None:
                        continue
                    src = fetch(seg.index, name, seg.lo, seg.hi)  # None: a param without state (never stepped)
                    view = dst.narrow(0, seg.start, n)
                    view.zero_() if src is None else view.copy_(src)
                if b.master is not None:
                    current = b.param_shard.narrow(0, seg.start, n)
                    src = fetch(seg.index, _MASTER_KEY, seg.lo, seg.hi)
                    if src is not None and not torch.equal(src.to(device=current.device, dtype=b.dtype), current):
                        stale_master, src = True, None
                    b.master.narrow(0, seg.start, n).copy_(current if src is None else src)
        if stale_master:
            warnings.warn(
                "ZeroAdamW.load_state_dict: the checkpoint's master weights do not round to the current params; "
                "using the params instead (load the model's state before the optimizer's)",
                stacklevel=2,
            )

    def _agree_on_load(self, error: str | None, summary: tuple | None) -> None:
        """One all_gather_object: any rank's error, else any difference between the ranks' hyper-parameters and
        step counts, raises the same ValueError on every rank."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (error, summary), group=self.process_group)
        for r, (err, _) in enumerate(gathered):
            if err is not None:
                raise ValueError(
                    f"ZeroAdamW.load_state_dict failed on rank {r} (nothing was loaded on any rank): {err}"
                )
        groups0, steps0 = gathered[0][1]
        for r, (_, (groups, steps)) in enumerate(gathered[1:], start=1):
            diff = None
            for gi, (a, b) in enumerate(zip(groups0, groups, strict=True)):
                for name, x, y in zip(_GROUP_VALUES, a, b, strict=True):
                    if x != y and diff is None:
                        diff = f"{name} of param group {gi} is {x!r} on rank 0 but {y!r} on rank {r}"
            for i, (x, y) in enumerate(zip(steps0, steps, strict=True)):
                if x != y and diff is None:
                    diff = f"state 'step' of param {i} is {x!r} on rank 0 but {y!r} on rank {r}"
            if diff is not None:
                raise ValueError(
                    f"ZeroAdamW.load_state_dict: the checkpoints given to the ranks differ: {diff}; every rank must "
                    "load the same hyper-parameters and step counts (nothing was loaded on any rank)"
                )

    def _plan_load(self, state_dict: Any) -> tuple[list[dict], list[float], Callable, tuple]:
        """Check the whole checkpoint (raising the first problem) and return what loading it sets: each group's
        values (without ``params``), each param's step count, ``fetch(param, key, lo, hi)`` (elements [lo, hi)
        of a param's flattened state as fp32 on this device, None when the param has no such state), and the
        summary the ranks compare. Changes nothing."""
        numels = [p.numel() for p in self._params]
        n = len(numels)
        if isinstance(state_dict, (list, tuple)):
            shards = list(state_dict)
            if not shards:
                raise ValueError("got an empty list of state dicts")
            for k, sd in enumerate(shards):
                if not isinstance(sd, dict):
                    raise TypeError(f"state dict {k} of the list is a {type(sd).__name__}, not a dict")
        elif isinstance(state_dict, dict) and "zero" in state_dict:
            shards = [state_dict]
        elif isinstance(state_dict, dict):
            shards = None
        else:
            raise TypeError(f"expected a state dict or a list of them, got {type(state_dict).__name__}")

        base = shards[0] if shards else state_dict
        if not isinstance(base.get("state"), dict) or not isinstance(base.get("param_groups"), (list, tuple)):
            raise ValueError("not an optimizer state dict (needs a 'state' dict and a 'param_groups' list)")
        groups = base["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the checkpoint has {len(groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        new_groups, summary_groups = [], []
        for gi, (g, sg) in enumerate(zip(self.param_groups, groups, strict=True)):
            if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)):
                raise ValueError(f"param group {gi} of the checkpoint is not a dict with a 'params' list")
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {gi} of the checkpoint has {len(sg['params'])} params, this optimizer's has "
                    f"{len(g['params'])}"
                )
            merged = {k: v for k, v in g.items() if k != "params"}
            merged.update(amsgrad=False, maximize=False)  # torch.optim's defaults for legacy checkpoints
            merged.update({k: v for k, v in sg.items() if k != "params"})
            if merged.get("differentiable"):
                raise ValueError(f"param group {gi} of the checkpoint has differentiable=True (not supported)")
            lr, beta1, beta2, eps, weight_decay = _check_group(gi, merged, read_lr=True)
            merged["betas"] = (beta1, beta2)
            merged["amsgrad"], merged["maximize"] = bool(merged["amsgrad"]), bool(merged["maximize"])
            new_groups.append(merged)
            lr_value = float(lr.item()) if isinstance(lr, Tensor) else lr
            summary_groups.append((lr_value, beta1, beta2, eps, weight_decay, merged["amsgrad"], merged["maximize"]))
        amsgrad = [new_groups[gi]["amsgrad"] for gi in self._group_of]

        def required(i: int) -> tuple[str, ...]:
            return _MOMENT_KEYS if amsgrad[i] else _MOMENT_KEYS[:2]

        if shards is None:
            saved_ids = [pid for g in groups for pid in g["params"]]
            index_of = {pid: i for i, pid in enumerate(saved_ids)}
            if len(index_of) != len(saved_ids):
                raise ValueError("the checkpoint's param groups list a param id more than once")
            by_index: dict[int, dict] = {}
            for pid, st in base["state"].items():
                if pid not in index_of:
                    raise ValueError(f"the checkpoint has state for param id {pid!r}, which no param group lists")
                i = index_of[pid]
                if not isinstance(st, dict):
                    raise ValueError(f"the state of param {i} is a {type(st).__name__}, not a dict")
                if not st:  # no state: a param never stepped
                    continue
                shape = f"the param has {numels[i]} (shape {tuple(self._params[i].shape)})"
                for key in required(i):
                    _check_state_tensor(st, i, key, numels[i], shape)
                for key in (*_MOMENT_KEYS[len(required(i)) :], _MASTER_KEY):
                    if key in st:
                        _check_state_tensor(st, i, key, numels[i], shape)
                by_index[i] = st
            steps = [_check_state_step(by_index[i], i) if i in by_index else 0.0 for i in range(n)]

            def fetch(i: int, name: str, lo: int, hi: int) -> Tensor | None:
                st = by_index.get(i)
                if st is None or name not in st:
                    return None
                return st[name].detach().reshape(-1)[lo:hi].to(self._device, torch.float32)

            return new_groups, steps, fetch, (summary_groups, steps)

        # Sharded: collect every shard's pieces per param, then check they cover what this rank owns.
        pieces: list[list[tuple[int, int, dict]]] = [[] for _ in range(n)]
        shard_steps: list[float | None] = [None] * n
        for k, sd in enumerate(shards):
            meta = sd.get("zero")
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                raise ValueError(f"state dict {k} of the list is not a ZeroAdamW.state_dict() shard")
            state, ranges = sd.get("state"), meta.get("ranges")
            if not isinstance(state, dict) or not isinstance(ranges, dict):
                raise ValueError(f"shard {k} of the list has no 'state' or no 'ranges' dict")
            saved_numels = list(meta.get("numels", ()))
            if saved_numels != numels:
                if len(saved_numels) != n:
                    raise ValueError(f"the checkpoint has {len(saved_numels)} params, this optimizer has {n}")
                bad = next(i for i in range(n) if saved_numels[i] != numels[i])
                raise ValueError(
                    f"param {bad} has {saved_numels[bad]} elements in the checkpoint but {numels[bad]} here "
                    f"(shape {tuple(self._params[bad].shape)})"
                )
            for i in range(n):
                st = state.get(i)
                if not isinstance(st, dict) or "step" not in st:
                    raise ValueError(f"shard {k} of the list has no state 'step' for param {i}")
                step = _check_state_step(st, i)
                if shard_steps[i] is None:
                    shard_steps[i] = step
                elif step != shard_steps[i]:
                    raise ValueError(
                        f"state 'step' of param {i} is {shard_steps[i]} in shard 0 but {step} in shard {k} of the list"
                    )
            for i, rng in ranges.items():
                if not (isinstance(i, int) and 0 <= i < n):
                    raise ValueError(f"shard {k} of the list has a range for param {i!r}, which does not exist")
                if not (
                    isinstance(rng, (tuple, list)) and len(rng) == 2 and all(isinstance(x, int) for x in rng)
                    and 0 <= rng[0] <= rng[1] <= numels[i]
                ):  # fmt: skip
                    raise ValueError(
                        f"shard {k} of the list has the range {rng!r} for param {i}, which has {numels[i]} elements"
                    )
                lo, hi = rng
                size = f"its range [{lo}, {hi}) in shard {k} of the list has {hi - lo}"
                for key in required(i):
                    _check_state_tensor(state[i], i, key, hi - lo, size)
                for key in (*_MOMENT_KEYS[len(required(i)) :], _MASTER_KEY):
                    if key in state[i]:
                        _check_state_tensor(state[i], i, key, hi - lo, size)
                pieces[i].append((lo, hi, state[i]))
        for seg in self._segment_of.values():
            covered = seg.lo
            for lo, hi, _ in sorted(pieces[seg.index], key=lambda x: x[0]):
                if lo <= covered < hi:
                    covered = hi
            if covered < seg.hi:
                world = shards[0]["zero"].get("world_size", "?")
                raise ValueError(
                    f"the shards given cover elements up to {covered} of param {seg.index} but this rank needs "
                    f"[{seg.lo}, {seg.hi}); pass the list of all {world} ranks' state dicts"
                )
        steps = [float(s) for s in shard_steps]  # every shard has every param's step (checked)

        def fetch_sharded(i: int, name: str, lo: int, hi: int) -> Tensor | None:
            out = torch.empty(hi - lo, dtype=torch.float32, device=self._device)
            for plo, phi, st in pieces[i]:
                a, z = max(lo, plo), min(hi, phi)
                if a >= z:
                    continue
                if name not in st:  # an optional key (master weights) some shard lacks: none for this param
                    return None
                out[a - lo : z - lo].copy_(st[name].detach().reshape(-1)[a - plo : z - plo])
            return out

        return new_groups, steps, fetch_sharded, (summary_groups, steps)

    # -- introspection --------------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds, per category (padding counted once, under ``padding`` only).

        - ``master``: fp32 master shard (0 for fp32 params, whose shard of the param buffer is the master);
        - ``states``: Adam moments of the shard (fp32) and the step counts;
        - ``grad_shards``: the reduced-grad shards, in the reduce dtype (see the class docstring);
        - ``staging``: the staging buffers of the reduce-scatters (the buckets in flight);
        - ``grad_buckets``: ``grad_shards + staging``;
        - ``padding``: padded elements in the master, moment and grad shards and in the flat param buffers;
        - ``total``: ``master + states + grad_buckets + padding``.

        Not counted: the params' own elements (the flat buffers the model's params are views of; their padding
        is counted) and ``p.grad``.
        """
        report = {"master": 0, "states": 4 * len(self._steps), "grad_shards": 0, "staging": 0, "padding": 0}
        for b in self._buckets:
            pad = self._bucket_pad(b)
            useful = b.shard_numel - pad
            fp32_shards = 2 + (b.max_exp_avg_sq is not None) + (b.master is not None)  # moments, master
            report["master"] += 4 * useful if b.master is not None else 0
            report["states"] += 4 * useful * (2 + (b.max_exp_avg_sq is not None))
            report["grad_shards"] += b.grad.element_size() * useful
            report["padding"] += pad * (4 * fp32_shards + b.grad.element_size())
            report["padding"] += (b.numel - sum(s.numel for s in b.slots)) * b.param_flat.element_size()
        report["staging"] = sum(pool.nbytes() for pool in self._pools.values())
        report["grad_buckets"] = report["grad_shards"] + report["staging"]
        report["total"] = report["master"] + report["states"] + report["grad_buckets"] + report["padding"]
        return report

    def _bucket_pad(self, b: _Bucket) -> int:
        """Padded elements in this rank's shard of bucket ``b``."""
        lo_s, hi_s = self.rank * b.shard_numel, (self.rank + 1) * b.shard_numel
        used = sum(max(0, min(s.offset + s.numel, hi_s) - max(s.offset, lo_s)) for s in b.slots)
        return b.shard_numel - used


# -- benchmark ------------------------------------------------------------------------------------------------
def _bench_worker(rank: int, nproc: int, port: int, cfg: dict, out_dir: str) -> None:
    import datetime
    import json

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        results = {}
        torch.manual_seed(0)
        hidden, layers, batch = cfg["hidden"], cfg["layers"], cfg["batch"]

        def make_model() -> torch.nn.Module:
            torch.manual_seed(0)
            mods: list[torch.nn.Module] = []
            for _ in range(layers):
                mods += [torch.nn.Linear(hidden, hidden), torch.nn.GELU()]
            return torch.nn.Sequential(*mods)

        x = torch.randn(batch, hidden)

        def timed(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[float, int]:
            """Median ms per iteration, and the bytes of p.grad still held after backward (last iteration)."""
            times, grad_bytes = [], 0
            for it in range(cfg["warmup"] + cfg["steps"]):
                dist.barrier()
                t0 = time.perf_counter()
                loss = model(x).square().mean()
                loss.backward()
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                grad_bytes = sum(g.numel() * g.element_size() for g in grads)
                opt.step()
                opt.zero_grad()
                t1 = time.perf_counter()
                if it >= cfg["warmup"]:
                    times.append(t1 - t0)
            return statistics.median(times) * 1e3, grad_bytes

        n_params = sum(p.numel() for p in make_model().parameters())
        for stage in cfg["stages"]:
            model = make_model()
            opt = ZeroAdamW(model.parameters(), stage=stage, bucket_cap_mb=cfg["bucket_cap_mb"], lr=1e-4)
            ms, grad_bytes = timed(model, opt)
            memory = opt.memory_report()
            memory["param_grads"] = grad_bytes  # stage 1: the full local grads; stage 2: freed during backward
            memory["total"] += grad_bytes
            results[f"zero{stage}"] = {"step_ms": ms, "memory": memory}
            del opt, model

        model = make_model()
        # gradient_as_bucket_view: grads are views of DDP's buckets (its lowest-memory setting), counted once.
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg["bucket_cap_mb"],
                                                        gradient_as_bucket_view=True)  # fmt: skip
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
        ms, grad_bytes = timed(ddp, opt)
        states = sum(
            t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if isinstance(t, Tensor)
        )
        memory = {"master": 0, "states": states, "grad_buckets": 0, "padding": 0, "param_grads": grad_bytes}
        memory["total"] = sum(memory.values())
        results["ddp_adamw"] = {"step_ms": ms, "memory": memory}
        results["params"] = n_params
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()
    # Results are written: skip the interpreter's teardown, where gloo's threads can abort the process.
    os._exit(0)


def benchmark_zero(
    nproc: int = 2,
    hidden: int = 512,
    layers: int = 4,
    batch: int = 32,
    steps: int = 10,
    warmup: int = 2,
    stages: Sequence[int] = (1, 2),
    bucket_cap_mb: float = 25,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Time ZeroAdamW against DDP + torch.optim.AdamW on CPU, ``nproc`` gloo processes on this machine.

    Each process trains an MLP (``layers`` x Linear(hidden, hidden)) on its own batch. Returns::

        {"nproc": 2, "params": P, "device": "cpu (gloo)",
         "zero1" / "zero2" / "ddp_adamw": {"step_ms": median ms per iteration (fwd+bwd+step, rank 0),
                                           "memory": bytes by category on rank 0 (see below),
                                           "memory_per_rank": [total bytes of each rank]}}

    ``memory`` has ZeroAdamW.memory_report()'s categories plus ``param_grads``, the bytes of ``p.grad`` still
    held after backward (ZeRO-1 and DDP: the full grads, which for DDP with ``gradient_as_bucket_view=True``
    are its buckets; ZeRO-2: none). For DDP + AdamW, ``states`` are AdamW's. CPU timings show the overheads of
    the collectives and of the CPU Adam path, not GPU performance.
    """
    import json
    import socket

    import torch.multiprocessing as mp

    cfg = dict(hidden=hidden, layers=layers, batch=batch, steps=steps, warmup=warmup, stages=list(stages),
               bucket_cap_mb=bucket_cap_mb)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            ctx = mp.start_processes(_bench_worker, args=(nproc, port, cfg, out_dir), nprocs=nproc, join=False,
                                     start_method="spawn")  # fmt: skip
            deadline = time.monotonic() + timeout_s
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.terminate()
                    raise TimeoutError(f"benchmark_zero did not finish within {timeout_s} s")
            per_rank = []
            for r in range(nproc):
                with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                    per_rank.append(json.load(f))
    finally:
        if env["OMP_NUM_THREADS"] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    out: dict[str, Any] = {"nproc": nproc, "params": per_rank[0]["params"], "device": "cpu (gloo)"}
    for key in [f"zero{s}" for s in stages] + ["ddp_adamw"]:
        out[key] = dict(per_rank[0][key])
        out[key]["memory_per_rank"] = [rr[key]["memory"]["total"] for rr in per_rank]
    return out
