"""Low-memory AdamW: ``adamw8bit`` (FusedAdamW with 8-bit block-wise states against torch's fused AdamW and the
installed 8-bit peers, torchao ``AdamW8bit`` and bitsandbytes ``AdamW8bit``) and ``adamw_bf16_sr`` (pure-bf16
AdamW without master weights, stochastic rounding of the params, against torch's fused AdamW on bf16 params and
the installed peers: optimi ``AdamW`` with Kahan summation, torchao ``AdamW(bf16_stochastic_round=True)``).

torch's for-loop and foreach AdamW are timed on the same sets by the ``adam`` op; here torch-fused is the baseline.
"""

from __future__ import annotations

import inspect

import torch

import fused_ops

from .._registry import LR, WEIGHT_DECAY, Builder, Runner, Skip, register_op
from ._optim import Factory, peer_step_builder, step_builder, torch_step_builder

LOWBIT_BYTES = {
    # 8-bit states: each moment is 1 B of code per element plus one fp32 scale per 256 elements, all read and
    # written. fp32 params: read p, g (4 + 4 B), m, v codes (1 + 1 B), 2 scales (2 x 4/256 B); write p (4 B), m, v
    # codes (1 + 1 B), 2 scales (2 x 4/256 B): 16 + 16/256 B.
    "fp32/int8-states": 16 + 16 / 256,
    # bf16 params: the same with p and g at 2 B: 10 + 16/256 B.
    "bf16/int8-states": 10 + 16 / 256,
    # torch's fused AdamW (and a peer's fp32 fallback), fp32: read p, g, m, v (4 x 4 B); write p, m, v (3 x 4 B).
    "fp32": 28,
    # bf16 params, bf16 states (torch.optim keeps the states in the param's dtype): read 4 x 2 B; write 3 x 2 B.
    "bf16/bf16-states": 14,
    # bf16 params, fp32 states: read p, g (2 + 2 B), m, v (4 + 4 B); write p (2 B), m, v (4 + 4 B).
    "bf16/fp32-states": 22,
}

SR_BYTES = {
    # bf16 params rounded stochastically (random bits are drawn, not read), fp32 states: read p, g (2 + 2 B), m, v
    # (4 + 4 B); write p (2 B), m, v (4 + 4 B).
    "bf16/fp32-states": 22,
    # bf16 states (fused_ops state_dtype="bfloat16", torch.optim, torchao): read 4 x 2 B; write 3 x 2 B.
    "bf16/bf16-states": 14,
    # + a bf16 Kahan compensation buffer (optimi, fused_ops kahan_summation), read and written: + 2 x 2 B.
    "bf16/bf16-states+kahan": 18,
    "bf16/fp32-states+kahan": 26,
}


def _adamw_options() -> set[str]:
    return set(inspect.signature(fused_ops.FusedAdamW.__init__).parameters)


def _has_int8_states() -> bool:
    return "state_dtype" in _adamw_options()


def _has_stochastic_rounding() -> bool:
    return "stochastic_rounding" in _adamw_options()


def _fused(op: str, needs: str, **kwargs) -> Builder:
    """FusedAdamW(lr 1e-3, weight decay 1e-2, **kwargs); a ``Skip`` while FusedAdamW lacks the option ``needs``."""
    inner = step_builder(op, lambda ps: fused_ops.FusedAdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, **kwargs))

    def build(shapes, dtype, device) -> Runner:
        if needs not in _adamw_options():
            raise Skip(f"FusedAdamW has no {needs}= in this version of fused_ops")
        return inner(shapes, dtype, device)

    return build


def _torchao(name: str, **kwargs) -> Factory:
    def factory(params):
        try:
            import torchao.optim as ao
        except ImportError:  # torchao < 0.11
            import torchao.prototype.low_bit_optim as ao
        cls = getattr(ao, name, None) or getattr(ao, f"_{name}")  # the fp32-state AdamW is _AdamW in some versions
        return cls(params, lr=LR, weight_decay=WEIGHT_DECAY, **kwargs)

    return factory


def _bnb_adamw8bit(params):
    import bitsandbytes as bnb

    # bitsandbytes keeps fp32 states for tensors under 4,096 elements (min_8bit_size): its default, kept; the
    # measured state bytes per param show it
    return bnb.optim.AdamW8bit(params, lr=LR, weight_decay=WEIGHT_DECAY)


def _optimi_adamw(params):
    import optimi

    return optimi.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=True)


# Both ops' CPU path is the plain-torch oracle (block quantisation, Philox in int64 arithmetic): seconds per step
# on the quick sets, so a CPU run takes them only when --ops names them.
@register_op("adamw8bit", 'fused_ops.FusedAdamW(state_dtype="int8")', _has_int8_states,
             bytes_per_element=LOWBIT_BYTES, cpu_default=False)  # fmt: skip
def _adamw8bit_providers() -> dict[str, Builder]:
    """AdamW with 8-bit states (lr 1e-3, weight decay 1e-2) against torch's fused AdamW and the 8-bit peers."""
    return {
        "fused_ops": _fused("adamw8bit", "state_dtype", state_dtype="int8"),
        "torch-fused": torch_step_builder("adamw8bit", torch.optim.AdamW, "fused", lr=LR, weight_decay=WEIGHT_DECAY),
        "torchao": peer_step_builder("adamw8bit", "torchao", _torchao("AdamW8bit")),
        "bitsandbytes": peer_step_builder("adamw8bit", "bitsandbytes", _bnb_adamw8bit),
    }


@register_op("adamw_bf16_sr", "fused_ops.FusedAdamW(stochastic_rounding=True)", _has_stochastic_rounding,
             dtypes=("bf16",), bytes_per_element=SR_BYTES, cpu_default=False)  # fmt: skip
def _bf16_sr_providers() -> dict[str, Builder]:
    """Pure-bf16 AdamW (no master weights; lr 1e-3, weight decay 1e-2): fused_ops with stochastic rounding (fp32
    states, then bf16 states) and with Kahan summation, against torch's fused AdamW on bf16 params and the peers."""
    return {
        "fused_ops": _fused("adamw_bf16_sr", "stochastic_rounding", stochastic_rounding=True),
        "fused_ops-bf16-states": _fused("adamw_bf16_sr", "state_dtype", stochastic_rounding=True,
                                        state_dtype="bfloat16"),
        "fused_ops-kahan": _fused("adamw_bf16_sr", "kahan_summation", kahan_summation=True, state_dtype="bfloat16"),
        "torch-fused": torch_step_builder("adamw_bf16_sr", torch.optim.AdamW, "fused", lr=LR,
                                          weight_decay=WEIGHT_DECAY),
        "optimi": peer_step_builder("adamw_bf16_sr", "optimi", _optimi_adamw),
        "torchao": peer_step_builder("adamw_bf16_sr", "torchao", _torchao("AdamW", bf16_stochastic_round=True)),
    }  # fmt: skip
