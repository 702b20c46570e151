"""SGD with momentum: ``sgd`` (FusedSGD against torch.optim.SGD's for-loop, foreach and, where this torch has it
for the device, fused implementations)."""

from __future__ import annotations

import torch

import fused_ops

from .._registry import LR, Builder, has, register_op
from ._optim import step_builder, torch_step_builder

MOMENTUM = 0.9

SGD_BYTES = {
    # SGD with momentum, fp32 params and buffer: read p, g, buf (3 x 4 B); write p, buf (2 x 4 B).
    "fp32": 20,
    # bf16 params, fp32 buffer (fused_ops): read p, g (2 + 2 B), buf (4 B); write p (2 B), buf (4 B).
    "bf16/fp32-states": 14,
    # bf16 params, bf16 buffer (torch.optim keeps the buffer in the param's dtype): read 3 x 2 B; write 2 x 2 B.
    "bf16/bf16-states": 10,
}


@register_op("sgd", "fused_ops.FusedSGD", has("FusedSGD"), bytes_per_element=SGD_BYTES)
def _sgd_providers() -> dict[str, Builder]:
    """SGD step (lr 1e-3, momentum 0.9) against torch.optim.SGD's three implementations."""
    return {
        "fused_ops": step_builder("sgd", lambda ps: fused_ops.FusedSGD(ps, lr=LR, momentum=MOMENTUM)),
        **{f"torch-{v}": torch_step_builder("sgd", torch.optim.SGD, v, lr=LR, momentum=MOMENTUM)
           for v in ("forloop", "foreach", "fused")},
    }  # fmt: skip
