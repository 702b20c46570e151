"""Lion: ``lion`` (FusedLion against a plain-torch Lion, for-loop and foreach, since torch.optim has none, and the
installed peers: bitsandbytes ``Lion`` (32-bit states) and ``Lion8bit``, optimi ``Lion``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

import fused_ops

from .._registry import LR, WEIGHT_DECAY, Builder, Runner, Skip, has, register_op
from ._optim import peer_step_builder, step_builder

BETAS = (0.9, 0.99)

LION_BYTES = {
    # Lion, fp32 params and momentum: read p, g, m (3 x 4 B); write p, m (2 x 4 B).
    "fp32": 20,
    # bf16 params, fp32 momentum (fused_ops): read p, g (2 + 2 B), m (4 B); write p (2 B), m (4 B).
    "bf16/fp32-states": 14,
    # bf16 params, bf16 momentum (the plain-torch baseline keeps it in the param's dtype): read 3 x 2 B; write 2 x 2 B.
    "bf16/bf16-states": 10,
    # optimi on bf16 params: + a bf16 Kahan compensation buffer, read and written (2 x 2 B).
    "bf16/bf16-states+kahan": 14,
    # bitsandbytes Lion8bit: the momentum as 1 B codes + one fp32 scale per 256 elements, read and written:
    # read p, g, m codes, scale (4 + 4 + 1 + 4/256 B); write p, m codes, scale (4 + 1 + 4/256 B).
    "fp32/int8-states": 14 + 8 / 256,
    "bf16/int8-states": 8 + 8 / 256,
}


class TorchLion(torch.optim.Optimizer):
    """Lion in plain torch, the baseline of the ``lion`` op (torch.optim has no Lion): ``foreach`` ops (one call per
    op over all params) or a for-loop. The momentum is kept in the param's dtype, as torch.optim does.

    ``p *= 1 - lr * wd; p -= lr * sign(lerp(m, g, 1 - beta1)); m = lerp(m, g, 1 - beta2)``.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-4,
        betas: tuple[float, float] = BETAS,
        weight_decay: float = 0.0,
        foreach: bool = True,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            moms = []
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moms.append(self.state[p]["exp_avg"])
            lr, (beta1, beta2), decay = group["lr"], group["betas"], 1 - group["lr"] * group["weight_decay"]
            if group["foreach"]:
                if decay != 1:
                    torch._foreach_mul_(params, decay)
                update = torch._foreach_lerp(moms, grads, 1 - beta1)
                torch._foreach_sign_(update)
                torch._foreach_add_(params, update, alpha=-lr)
                torch._foreach_lerp_(moms, grads, 1 - beta2)
            else:
                for p, g, m in zip(params, grads, moms, strict=True):
                    if decay != 1:
                        p.mul_(decay)
                    p.add_(torch.lerp(m, g, 1 - beta1).sign_(), alpha=-lr)
                    m.lerp_(g, 1 - beta2)


def _bnb_lion(cls_name: str):
    def factory(params):
        import bitsandbytes as bnb

        return getattr(bnb.optim, cls_name)(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)

    return factory


def _optimi_lion(params):
    import optimi

    return optimi.Lion(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


def _no_torch_fused(shapes, dtype, device) -> Runner:
    raise Skip("torch.optim has no Lion; torch-forloop/torch-foreach are the plain-torch Lion of bench/cases/lion.py")


@register_op("lion", "fused_ops.FusedLion", has("FusedLion"), bytes_per_element=LION_BYTES)
def _lion_providers() -> dict[str, Builder]:
    """Lion step (lr 1e-3, betas (0.9, 0.99), weight decay 1e-2) against a plain-torch Lion and the peers."""
    kw = dict(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    return {
        "fused_ops": step_builder("lion", lambda ps: fused_ops.FusedLion(ps, **kw)),
        "torch-forloop": step_builder("lion", lambda ps: TorchLion(ps, **kw, foreach=False)),
        "torch-foreach": step_builder("lion", lambda ps: TorchLion(ps, **kw, foreach=True)),
        "torch-fused": _no_torch_fused,
        "bitsandbytes": peer_step_builder("lion", "bitsandbytes", _bnb_lion("Lion")),
        "bitsandbytes-8bit": peer_step_builder("lion", "bitsandbytes", _bnb_lion("Lion8bit")),
        "optimi": peer_step_builder("lion", "optimi", _optimi_lion),
    }
