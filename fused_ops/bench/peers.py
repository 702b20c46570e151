"""Peers: other libraries' fused Adam(W) (torchao, bitsandbytes, apex, DeepSpeed), providers of every op
registered with ``peers=True`` on CUDA. Detected at run time, never installed."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from ._registry import LR, WEIGHT_DECAY, Builder, Skip, peers_run_on
from .cases._common import optimizer_builder


@dataclasses.dataclass
class Peer:
    """An installed library's Adam(W), benchmarked as a provider of the ``adam`` op on CUDA."""

    name: str
    module: str  # the import that must succeed
    factory: Callable[[list[torch.nn.Parameter]], Any]


def _torchao_adamw(params):
    import torchao.optim as ao

    cls = getattr(ao, "AdamW", None) or ao._AdamW  # fp32-state AdamW (torch.compile'd per param)
    return cls(params, lr=LR, weight_decay=WEIGHT_DECAY)


def _bnb_adamw(params):
    import bitsandbytes as bnb

    return bnb.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, optim_bits=32)


def _apex_adamw(params):
    from apex.optimizers import FusedAdam

    return FusedAdam(params, lr=LR, weight_decay=WEIGHT_DECAY, adam_w_mode=True)


def _deepspeed_adamw(params):
    try:
        from deepspeed.git_version_info import installed_ops
    except Exception:  # older/newer layout: let FusedAdam decide
        installed_ops = None
    if isinstance(installed_ops, dict) and not installed_ops.get("fused_adam", False):
        # FusedAdam would JIT-build its CUDA extension with ninja here: minutes, and the run has a time budget
        raise Skip("deepspeed is installed without its prebuilt fused_adam op (DS_BUILD_FUSED_ADAM=1); not JIT-built")
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(params, lr=LR, weight_decay=WEIGHT_DECAY, adam_w_mode=True)


PEERS: tuple[Peer, ...] = (
    Peer("torchao", "torchao", _torchao_adamw),
    Peer("bitsandbytes", "bitsandbytes", _bnb_adamw),
    Peer("apex", "apex", _apex_adamw),
    Peer("deepspeed", "deepspeed", _deepspeed_adamw),
)


def peer_status(device_kind: str) -> dict[str, str | None]:
    """``{peer: None}`` for a peer to benchmark, ``{peer: why not}`` otherwise. Finds modules without importing."""
    out: dict[str, str | None] = {}
    for peer in PEERS:
        try:
            found = importlib.util.find_spec(peer.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out[peer.name] = "not installed"
        elif not peers_run_on(device_kind):
            out[peer.name] = "installed; peers are benchmarked on CUDA only"
        else:
            out[peer.name] = None
    return out


def peer_builder(op: str, peer: Peer) -> Builder:
    """The builder of ``peer``'s step as a provider of ``op`` (an Adam-like op: bytes from its states)."""
    return optimizer_builder(op, peer.factory)
