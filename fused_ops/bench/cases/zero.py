"""``zero``: ZeroAdamW (fused_ops.distributed) on a one-rank group against torch's ZeroRedundancyOptimizer."""

from __future__ import annotations

import importlib

import torch

from .._registry import (
    BYTES_PER_ELEMENT,
    LR,
    WEIGHT_DECAY,
    Builder,
    Runner,
    dtype_name,
    register_op,
    state_bytes_per_param,
)
from ..params import numel, params_with_grads
from ._common import TORCH_VARIANTS, one_rank_group, optimizer_layout, torch_variant_kwargs


def _zero_available() -> bool:
    try:
        module = importlib.import_module("fused_ops.distributed")
    except ModuleNotFoundError:
        return False
    return hasattr(module, "ZeroAdamW")


# ZeRO step on a one-rank group (collectives move nothing): the partitioned AdamW step. fp32: the fp32 Adam step;
# bf16: the master-weight step (fp32 master, m, v shards), as in the ZeRO paper's 2 + 2 + 12 B layout.
@register_op("zero", "fused_ops.distributed.ZeroAdamW", _zero_available, bytes_per_element={"fp32": 28, "bf16": 28})
def _zero_providers() -> dict[str, Builder]:
    """ZeroAdamW on a one-rank group (reduce-scatter, fused Adam on the shard, all-gather) against torch's
    ZeroRedundancyOptimizer(AdamW). Stage 1: the benchmark sets grads directly, with no backward for stage 2's
    hooks to reduce them during."""

    def fused(shapes, dtype, device) -> Runner:
        from fused_ops.distributed import ZeroAdamW

        params = params_with_grads(shapes, dtype, device)
        opt = ZeroAdamW(params, process_group=one_rank_group(device), stage=1, lr=LR, weight_decay=WEIGHT_DECAY)
        opt.step()
        layout = dtype_name(dtype)
        # Its states live in flat shards, not in opt.state: the master shard, the moments and the step counts of
        # memory_report() (padding and grad buckets apart), over the params (one rank: the whole of them).
        report = opt.memory_report()
        state_bytes = (report["master"] + report["states"]) / numel(shapes)
        return Runner(fn=opt.step, reset=None, bytes=BYTES_PER_ELEMENT[("zero", layout)] * numel(shapes),
                      layout=layout, state_bytes_per_param=state_bytes)  # fmt: skip

    def torch_zero(variant: str) -> Builder:
        def build(shapes, dtype, device) -> Runner:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            params = params_with_grads(shapes, dtype, device)
            opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=one_rank_group(
                device), lr=LR, weight_decay=WEIGHT_DECAY, **torch_variant_kwargs(variant))  # fmt: skip
            opt.step()
            layout, nbytes = optimizer_layout("adam", opt.optim, params)
            # the wrapped optimizer (opt.optim) holds the states, not opt.state
            return Runner(fn=opt.step, reset=None, bytes=nbytes, layout=layout,
                          state_bytes_per_param=state_bytes_per_param(opt.optim))  # fmt: skip

        return build

    return {"fused_ops": fused, **{f"torch-{v}": torch_zero(v) for v in TORCH_VARIANTS}}
