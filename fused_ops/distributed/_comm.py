"""The collectives ZeroAdamW runs: reduce-scatter and all-gather of flat buckets (with gloo fallbacks), and the
float64 sum of squares of the grad shards."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional

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
