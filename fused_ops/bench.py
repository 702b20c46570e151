"""The benchmark suite behind ``python -m fused_ops bench`` and ``benchmarks/test_bench_*.py``.

Every op is a registered :class:`Op`: a name, the ``fused_ops`` attribute whose presence enables it, the bytes it
moves per element (``BYTES_PER_ELEMENT``, counted from its definition) and one builder per provider. A builder
takes a list of shapes, a dtype and a device, allocates fresh inputs and returns a :class:`Runner`: the call that
is timed, plus a ``reset`` that restores in-place inputs outside the timed region. Providers are ``fused_ops``,
``torch-forloop``, ``torch-foreach``, ``torch-fused`` and, for Adam on CUDA, the peers that are installed
(torchao, bitsandbytes, apex, DeepSpeed), each detected at run time and never installed.

Timing: on CUDA ``triton.testing.do_bench`` medians with the (0.5, 0.2, 0.8) quantiles (for the one op with an
in-place input that must be reset, a loop of CUDA events built the same way: L2 flush, reset, event, call,
event); next to it the host time of one call without synchronising (the CPU time spent launching) and the number
of device activities in one call, counted with ``torch.profiler``. On CPU, ``time.perf_counter`` medians and
20/80 quantiles over repeats; launches and host time are n/a there. The device's copy bandwidth is measured in
the same run (a large tensor copy, bytes read + written) and every GB/s figure is also given as a fraction of it.

Robustness (the GPU run has a hard time limit): each case is built, timed and freed on its own (a CUDA OOM or a
broken peer becomes a ``skipped`` note and the run goes on); peers run after every op's own cases; SIGTERM ends
the run like Ctrl-C with the finished cases kept; ``BenchConfig.checkpoint`` (the CLI: the JSON file) receives
the document after every case, so even a killed run leaves its figures on disk. On CUDA each row also has
``peak_mem_gb`` (peak allocated memory of the case) and the header the device's memory and compute capability.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import torch
from torch import Tensor

import fused_ops

PROVIDERS = ("fused_ops", "torch-forloop", "torch-foreach", "torch-fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_PARAMS = ("gpt2-124m", "llama-1b", "small-10k")
DEFAULT_DTYPES = ("fp32", "bf16")
QUANTILES = (0.5, 0.2, 0.8)
LR, WEIGHT_DECAY = 1e-3, 1e-2

# Bytes each op moves per element (per parameter), counted from its definition: every tensor it must read, once,
# plus every tensor it must write, once. GB/s = these bytes x elements / median time, so it compares directly
# with the copy bandwidth, which counts bytes read + written the same way. Keys: (op, layout).
BYTES_PER_ELEMENT: dict[tuple[str, str], int] = {
    # AdamW, fp32 params and states: read p, g, m, v (4 x 4 B); write p, m, v (3 x 4 B).
    ("adam", "fp32"): 28,
    # bf16 params, fp32 states (fused_ops): read p, g (2 + 2 B), m, v (4 + 4 B); write p (2 B), m, v (4 + 4 B).
    ("adam", "bf16/fp32-states"): 22,
    # bf16 params, bf16 states (torch.optim keeps the states in the param's dtype): read 4 x 2 B; write 3 x 2 B.
    ("adam", "bf16/bf16-states"): 14,
    ("adam", "fp16/fp32-states"): 22,
    ("adam", "fp16/fp16-states"): 14,
    # amsgrad adds max_exp_avg_sq, read and written: + 8 B with fp32 states (not in the default cases).
    ("adam", "amsgrad-extra/fp32-states"): 8,
    # Master-weight AdamW in one pass: read g bf16 (2 B), master, m, v fp32 (12 B); write master, m, v (12 B) and
    # the bf16 param (2 B). The bf16 param is never read.
    ("adamw_master", "bf16"): 28,
    # The same step unfused in torch: master.grad = g.float() (read 2, write 4 B), fp32 AdamW on the master
    # weights (28 B), p.copy_(master) (read 4, write 2 B).
    ("adamw_master", "bf16/unfused"): 40,
    # cast: read the source, write the destination. "bf16" = fp32 -> bf16 (4 + 2 B), "fp32" = bf16 -> fp32 (2 + 4 B).
    ("cast", "bf16"): 6,
    ("cast", "fp32"): 6,
    # flatten: read every tensor, write the flat buffer (padding not counted): 2 x element size.
    ("flatten", "fp32"): 8,
    ("flatten", "bf16"): 4,
    # unscale: read and write every grad (the found_inf flag is negligible): 2 x element size.
    ("unscale", "fp32"): 8,
    ("unscale", "bf16"): 4,
    # grad_norm: read every grad once: element size.
    ("grad_norm", "fp32"): 4,
    ("grad_norm", "bf16"): 2,
    # ZeRO step on a one-rank group (collectives move nothing): the partitioned AdamW step. fp32: the fp32 Adam
    # step; bf16: the master-weight step (fp32 master, m, v shards), as in the ZeRO paper's 2 + 2 + 12 B layout.
    ("zero", "fp32"): 28,
    ("zero", "bf16"): 28,
}


class Skip(Exception):
    """A provider or case that cannot run here; the message says why (it lands in the JSON's ``skipped``)."""


@dataclasses.dataclass
class Runner:
    """One provider's prepared call.

    Attributes:
        fn: the call that is timed (one optimizer step, one op call).
        reset: restores in-place inputs; run before each timed call, outside the timed region. None when no
            input drifts in a way that changes the timing.
        bytes: bytes one call moves, counted from the op's definition (``BYTES_PER_ELEMENT``).
        layout: the ``BYTES_PER_ELEMENT`` key used (e.g. ``bf16/fp32-states``).
    """

    fn: Callable[[], Any]
    reset: Callable[[], None] | None
    bytes: int
    layout: str


Builder = Callable[[list[tuple[int, ...]], torch.dtype, torch.device], Runner]


@dataclasses.dataclass
class Op:
    """A registered benchmark case: an op of fused_ops and its providers."""

    name: str
    requires: str  # what must exist in fused_ops for the case to run, for the skip note
    available: Callable[[], bool]
    dtypes: tuple[str, ...]
    providers: dict[str, Builder]
    peers: bool = False  # the Adam peers (torchao, bitsandbytes, apex, DeepSpeed) are providers too

    def unavailable(self) -> str | None:
        """None when the op exists in this fused_ops, else the note for ``skipped``."""
        try:
            ok = self.available()
        except Exception as e:  # an op half-written by someone else must not break the suite
            return f"{self.requires} failed to load: {type(e).__name__}: {e}"
        return None if ok else f"{self.requires} is not in this version of fused_ops"


OPS: dict[str, Op] = {}


def register_op(
    name: str, requires: str, available: Callable[[], bool], dtypes: Sequence[str] = DEFAULT_DTYPES, peers: bool = False
) -> Callable[[Callable[[], dict[str, Builder]]], Callable[[], dict[str, Builder]]]:
    """Register an op: the decorated function returns its ``{provider: builder}`` table."""

    def deco(make: Callable[[], dict[str, Builder]]) -> Callable[[], dict[str, Builder]]:
        OPS[name] = Op(name, requires, available, tuple(dtypes), make(), peers)
        return make

    return deco


def _has(name: str) -> Callable[[], bool]:
    return lambda: hasattr(fused_ops, name)


# ---------------------------------------------------------------------------------------------------------------
# Parameter sets


@dataclasses.dataclass
class ParamSet:
    """A named list of tensor shapes: ``shapes(quick, device_kind)`` returns (shapes, note on any scaling)."""

    name: str
    description: str
    shapes: Callable[[bool, str], tuple[list[tuple[int, ...]], str]]


def gpt2_shapes(vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> list[tuple[int, ...]]:
    """GPT-2 parameter shapes (Hugging Face layout, tied lm_head): 124,439,808 parameters in 148 tensors."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def llama_shapes(
    vocab: int = 32000, d: int = 2048, layers: int = 22, ffn: int = 5632, kv: int = 256
) -> list[tuple[int, ...]]:
    """Llama parameter shapes (defaults: TinyLlama-1.1B, grouped-query attention): 1.1B parameters."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d)]  # input norm, q, k, v, o
        shapes += [(d,), (ffn, d), (ffn, d), (d, ffn)]  # post-attention norm, gate, up, down
    return shapes + [(d,), (vocab, d)]  # final norm, lm_head


_SMALL_NUMELS = (64, 128, 256, 768, 1024, 2048, 4096, (32, 32), (48, 64), (3, 256))


def small_shapes(n: int = 10_000) -> list[tuple[int, ...]]:
    """``n`` small tensors (biases, norms, small matrices; 1,325 elements on average): the launch-overhead case."""
    return [s if isinstance(s, tuple) else (s,) for s in (_SMALL_NUMELS[i % len(_SMALL_NUMELS)] for i in range(n))]


def _gpt2(quick: bool, kind: str) -> tuple[list[tuple[int, ...]], str]:
    if kind == "cpu" and quick:
        return gpt2_shapes(vocab=4096, ctx=256, d=96), "scaled for a quick CPU run: vocab 4096, ctx 256, d 96"
    return gpt2_shapes(), ""


def _llama(quick: bool, kind: str) -> tuple[list[tuple[int, ...]], str]:
    if kind == "cpu" and quick:
        return llama_shapes(vocab=4000, d=128, layers=4, ffn=352, kv=32), "scaled for a quick CPU run: d 128, 4 layers"
    if kind == "cpu":
        return llama_shapes(layers=2), "2 of 22 layers on CPU"
    if quick:
        return llama_shapes(layers=4), "4 of 22 layers (--quick)"
    return llama_shapes(), ""


def _small(quick: bool, kind: str) -> tuple[list[tuple[int, ...]], str]:
    if kind == "cpu" and quick:
        return small_shapes(1000), "1,000 of the 10,000 tensors (quick CPU run)"
    return small_shapes(), ""


PARAM_SETS: dict[str, ParamSet] = {
    p.name: p
    for p in (
        ParamSet("gpt2-124m", "GPT-2 124M: 148 tensors, 124.4M parameters", _gpt2),
        ParamSet("llama-1b", "Llama-like 1.1B (TinyLlama shapes): 201 tensors", _llama),
        ParamSet("small-10k", "10,000 small tensors (launch overhead)", _small),
        ParamSet("tiny", "8 small odd-sized tensors (tests)", lambda q, k: ([(17, 5), (64,), (3, 7, 11), (1,),
                                                                           (128, 33), (255,), (2, 2), (1000,)], "")),
    )
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def make_tensors(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device, seed: int
) -> list[Tensor]:
    """Fresh, separately allocated tensors with normal(0, 1) values; same values for the same seed."""
    sizes = [math.prod(s) for s in shapes]
    gen = torch.Generator(device=device).manual_seed(seed)
    flat = torch.randn(sum(sizes), generator=gen, device=device, dtype=torch.float32)
    return [chunk.view(s).to(dtype, copy=True) for chunk, s in zip(flat.split(sizes), shapes, strict=True)]


def _params_with_grads(shapes, dtype, device) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(t * 0.02) for t in make_tensors(shapes, dtype, device, seed=0)]
    for p, g in zip(params, make_tensors(shapes, dtype, device, seed=1), strict=True):
        p.grad = g * 1e-2
    return params


def _numel(shapes: Sequence[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _adam_layout(opt: Any, params: Sequence[Tensor]) -> tuple[str, int]:
    """(layout, bytes per param) of an Adam-like optimizer, from the dtypes of the states it created.

    Table entry when the layout is in ``BYTES_PER_ELEMENT``; otherwise the same rule, generalised: read + write
    p and every per-element state, read g.
    """
    p = max(params, key=lambda t: t.numel())  # per-element states have its numel; 0-d step counts do not
    state = getattr(opt, "state", {}).get(p) or {}
    states = [t for t in state.values() if isinstance(t, Tensor) and t.numel() == p.numel() and t.numel() > 1]
    pname = _dtype_name(p.dtype) if p.dtype in DTYPES.values() else str(p.dtype)
    if p.dtype == torch.float32 and all(t.dtype == torch.float32 for t in states) and len(states) == 2:
        layout = "fp32"
    elif len(states) == 2 and len({t.dtype for t in states}) == 1 and states[0].dtype in DTYPES.values():
        layout = f"{pname}/{_dtype_name(states[0].dtype)}-states"
    else:
        layout = f"{pname}/{'+'.join(str(t.dtype).replace('torch.', '') for t in states) or 'no'}-states"
    generic = 2 * p.element_size() + p.grad.element_size() + 2 * sum(t.element_size() for t in states)
    return layout, BYTES_PER_ELEMENT.get(("adam", layout), generic)


def _adam_optimizer_builder(factory: Callable[[list[torch.nn.Parameter]], Any]) -> Builder:
    def build(shapes, dtype, device) -> Runner:
        params = _params_with_grads(shapes, dtype, device)
        opt = factory(params)
        opt.step()  # creates the state (not timed); its dtypes give the bytes moved
        layout, bpe = _adam_layout(opt, params)
        return Runner(fn=opt.step, reset=None, bytes=bpe * _numel(shapes), layout=layout)

    return build


# ---------------------------------------------------------------------------------------------------------------
# Ops


@register_op("adam", "fused_ops.FusedAdamW", _has("FusedAdamW"), peers=True)
def _adam_providers() -> dict[str, Builder]:
    """AdamW step (lr 1e-3, weight decay 1e-2) against torch.optim.AdamW's three implementations."""
    return {
        "fused_ops": _adam_optimizer_builder(lambda ps: fused_ops.FusedAdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY)),
        "torch-forloop": _adam_optimizer_builder(
            lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
        ),
        "torch-foreach": _adam_optimizer_builder(
            lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
        ),
        "torch-fused": _adam_optimizer_builder(
            lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        ),
    }


def _master_weights_supported() -> bool:
    return "master_weights" in inspect.signature(fused_ops.FusedAdamW.__init__).parameters


def _torch_master_builder(variant: str) -> Builder:
    """The unfused torch master-weight sequence: grads to fp32, fp32 AdamW on master copies, copy back to bf16."""

    def build(shapes, dtype, device) -> Runner:
        params = _params_with_grads(shapes, dtype, device)
        masters = [torch.nn.Parameter(p.detach().float()) for p in params]
        for m in masters:
            m.grad = torch.empty_like(m)
        kwargs = {"fused": True} if variant == "fused" else {"foreach": variant == "foreach"}
        opt = torch.optim.AdamW(masters, lr=LR, weight_decay=WEIGHT_DECAY, **kwargs)
        grads = [p.grad for p in params]
        mgrads = [m.grad for m in masters]
        pdata = [p.detach() for p in params]
        mdata = [m.detach() for m in masters]

        if variant == "forloop":

            def step() -> None:
                for mg, g in zip(mgrads, grads, strict=True):
                    mg.copy_(g)
                opt.step()
                for p, m in zip(pdata, mdata, strict=True):
                    p.copy_(m)
        else:

            def step() -> None:
                torch._foreach_copy_(mgrads, grads)
                opt.step()
                torch._foreach_copy_(pdata, mdata)

        step()
        layout = "bf16/unfused"
        return Runner(fn=step, reset=None, bytes=BYTES_PER_ELEMENT[("adamw_master", layout)] * _numel(shapes),
                      layout=layout)  # fmt: skip

    return build


@register_op("adamw_master", "fused_ops.FusedAdamW(master_weights=True)", _master_weights_supported, dtypes=("bf16",))
def _master_providers() -> dict[str, Builder]:
    """Master-weight AdamW on bf16 params (fp32 master, m, v) against the unfused torch sequence."""

    def fused(shapes, dtype, device) -> Runner:
        params = _params_with_grads(shapes, dtype, device)
        opt = fused_ops.FusedAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, master_weights=True)
        opt.step()
        layout = _dtype_name(dtype)
        return Runner(fn=opt.step, reset=None, bytes=BYTES_PER_ELEMENT[("adamw_master", layout)] * _numel(shapes),
                      layout=layout)  # fmt: skip

    return {"fused_ops": fused, **{f"torch-{v}": _torch_master_builder(v) for v in ("forloop", "foreach", "fused")}}


def _simple_runner(op: str, dtype: torch.dtype, shapes, fn: Callable[[], Any], reset=None) -> Runner:
    layout = _dtype_name(dtype)
    return Runner(fn=fn, reset=reset, bytes=BYTES_PER_ELEMENT[(op, layout)] * _numel(shapes), layout=layout)


@register_op("flatten", "fused_ops.flatten", _has("flatten"))
def _flatten_providers() -> dict[str, Builder]:
    """Gather many tensors into one new flat buffer."""

    def fused(shapes, dtype, device) -> Runner:
        ts = make_tensors(shapes, dtype, device, seed=0)
        return _simple_runner("flatten", dtype, shapes, lambda: fused_ops.flatten(ts))

    def forloop(shapes, dtype, device) -> Runner:
        ts = make_tensors(shapes, dtype, device, seed=0)
        sizes = [t.numel() for t in ts]

        def fn() -> Tensor:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            for view, t in zip(flat.split(sizes), ts, strict=True):
                view.copy_(t.view(-1))
            return flat

        return _simple_runner("flatten", dtype, shapes, fn)

    def foreach(shapes, dtype, device) -> Runner:
        ts = make_tensors(shapes, dtype, device, seed=0)
        sizes = [t.numel() for t in ts]
        flat_ts = [t.view(-1) for t in ts]

        def fn() -> Tensor:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            torch._foreach_copy_(list(flat.split(sizes)), flat_ts)
            return flat

        return _simple_runner("flatten", dtype, shapes, fn)

    def fused_torch(shapes, dtype, device) -> Runner:
        ts = make_tensors(shapes, dtype, device, seed=0)
        return _simple_runner("flatten", dtype, shapes, lambda: torch._utils._flatten_dense_tensors(ts))

    return {"fused_ops": fused, "torch-forloop": forloop, "torch-foreach": foreach, "torch-fused": fused_torch}


@register_op("cast", "fused_ops.cast_", _has("cast_"))
def _cast_providers() -> dict[str, Builder]:
    """Multi-tensor dtype copy; dtype names the destination: bf16 = fp32 -> bf16, fp32 = bf16 -> fp32."""

    def tensors(shapes, dtype, device) -> tuple[list[Tensor], list[Tensor]]:
        src_dtype = torch.float32 if dtype != torch.float32 else torch.bfloat16
        src = make_tensors(shapes, src_dtype, device, seed=0)
        return [torch.empty_like(s, dtype=dtype) for s in src], src

    def fused(shapes, dtype, device) -> Runner:
        dst, src = tensors(shapes, dtype, device)
        return _simple_runner("cast", dtype, shapes, lambda: fused_ops.cast_(dst, src))

    def forloop(shapes, dtype, device) -> Runner:
        dst, src = tensors(shapes, dtype, device)

        def fn() -> None:
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)

        return _simple_runner("cast", dtype, shapes, fn)

    def foreach(shapes, dtype, device) -> Runner:
        dst, src = tensors(shapes, dtype, device)
        return _simple_runner("cast", dtype, shapes, lambda: torch._foreach_copy_(dst, src))

    def fused_torch(shapes, dtype, device) -> Runner:
        raise Skip("torch has no single-kernel multi-tensor cast (torch-foreach's _foreach_copy_ is its best)")

    return {"fused_ops": fused, "torch-forloop": forloop, "torch-foreach": foreach, "torch-fused": fused_torch}


@register_op("unscale", "fused_ops.unscale_", _has("unscale_"))
def _unscale_providers() -> dict[str, Builder]:
    """Multiply grads by 1/scale in place and raise found_inf on any non-finite value (GradScaler.unscale_)."""

    def setup(shapes, dtype, device):
        grads = make_tensors(shapes, dtype, device, seed=1)
        saved = [g.clone() for g in grads]
        inv_scale = torch.full((1,), 1.0 / 1024, device=device)
        found_inf = torch.zeros(1, device=device)

        def reset() -> None:  # repeated unscaling would drift the grads towards denormals (slow on CPU)
            torch._foreach_copy_(grads, saved)
            found_inf.zero_()

        return grads, inv_scale, found_inf, reset

    def fused(shapes, dtype, device) -> Runner:
        grads, inv, found, reset = setup(shapes, dtype, device)
        return _simple_runner("unscale", dtype, shapes, lambda: fused_ops.unscale_(grads, inv, found), reset)

    def forloop(shapes, dtype, device) -> Runner:
        grads, inv, found, reset = setup(shapes, dtype, device)

        def fn() -> None:
            for g in grads:
                torch._amp_foreach_non_finite_check_and_unscale_([g], found, inv)

        return _simple_runner("unscale", dtype, shapes, fn, reset)

    def foreach(shapes, dtype, device) -> Runner:
        grads, inv, found, reset = setup(shapes, dtype, device)
        return _simple_runner(
            "unscale", dtype, shapes, lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv), reset
        )

    def fused_torch(shapes, dtype, device) -> Runner:
        raise Skip("torch's unscale is its foreach kernel (torch-foreach, what GradScaler.unscale_ runs)")

    return {"fused_ops": fused, "torch-forloop": forloop, "torch-foreach": foreach, "torch-fused": fused_torch}


@register_op("grad_norm", "fused_ops.grad_norm", _has("grad_norm"))
def _grad_norm_providers() -> dict[str, Builder]:
    """Total L2 norm over many tensors (what clip_grad_norm_ computes first)."""

    def fused(shapes, dtype, device) -> Runner:
        grads = make_tensors(shapes, dtype, device, seed=1)
        return _simple_runner("grad_norm", dtype, shapes, lambda: fused_ops.grad_norm(grads))

    def forloop(shapes, dtype, device) -> Runner:
        grads = make_tensors(shapes, dtype, device, seed=1)
        fn = lambda: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return _simple_runner("grad_norm", dtype, shapes, fn)

    def foreach(shapes, dtype, device) -> Runner:
        grads = make_tensors(shapes, dtype, device, seed=1)
        get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: clip_grad_norm_'s first half
        if get_total_norm is not None:
            fn = lambda: get_total_norm(grads, 2.0, foreach=True)
        else:  # pragma: no cover - older torch
            fn = lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)))
        return _simple_runner("grad_norm", dtype, shapes, fn)

    def fused_torch(shapes, dtype, device) -> Runner:
        raise Skip("torch has no single-kernel multi-tensor norm (torch-foreach is clip_grad_norm_(foreach=True))")

    return {"fused_ops": fused, "torch-forloop": forloop, "torch-foreach": foreach, "torch-fused": fused_torch}


def _zero_available() -> bool:
    try:
        module = importlib.import_module("fused_ops.distributed")
    except ModuleNotFoundError:
        return False
    return hasattr(module, "ZeroAdamW")


_PG_STATE: dict[str, Any] = {"created": False}


def _one_rank_group(device: torch.device) -> Any:
    """The default process group, initialised here with one rank (in-process store) when there is none."""
    import torch.distributed as dist

    if not dist.is_available():
        raise Skip("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _PG_STATE["created"] = True
    return dist.group.WORLD


def release_process_group() -> None:
    """Destroy the one-rank process group if this module created it."""
    if _PG_STATE["created"]:
        import torch.distributed as dist

        dist.destroy_process_group()
        _PG_STATE["created"] = False


@register_op("zero", "fused_ops.distributed.ZeroAdamW", _zero_available)
def _zero_providers() -> dict[str, Builder]:
    """ZeroAdamW on a one-rank group (reduce-scatter, fused Adam on the shard, all-gather) against torch's
    ZeroRedundancyOptimizer(AdamW). Stage 1: the benchmark sets grads directly, with no backward for stage 2's
    hooks to reduce them during."""

    def fused(shapes, dtype, device) -> Runner:
        from fused_ops.distributed import ZeroAdamW

        params = _params_with_grads(shapes, dtype, device)
        opt = ZeroAdamW(params, process_group=_one_rank_group(device), stage=1, lr=LR, weight_decay=WEIGHT_DECAY)
        opt.step()
        layout = _dtype_name(dtype)
        return Runner(fn=opt.step, reset=None, bytes=BYTES_PER_ELEMENT[("zero", layout)] * _numel(shapes),
                      layout=layout)  # fmt: skip

    def torch_zero(variant: str) -> Builder:
        def build(shapes, dtype, device) -> Runner:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            params = _params_with_grads(shapes, dtype, device)
            kwargs = {"fused": True} if variant == "fused" else {"foreach": variant == "foreach"}
            opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=_one_rank_group(
                device), lr=LR, weight_decay=WEIGHT_DECAY, **kwargs)  # fmt: skip
            opt.step()
            layout, bpe = _adam_layout(opt.optim, params)
            return Runner(fn=opt.step, reset=None, bytes=bpe * _numel(shapes), layout=layout)

        return build

    return {"fused_ops": fused, **{f"torch-{v}": torch_zero(v) for v in ("forloop", "foreach", "fused")}}


# ---------------------------------------------------------------------------------------------------------------
# Peers: other libraries' fused Adam, detected at run time, never installed.


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
        elif device_kind != "cuda":
            out[peer.name] = "installed; peers are benchmarked on CUDA only"
        else:
            out[peer.name] = None
    return out


def build_runner(
    op: str, provider: str, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
) -> Runner:
    """The prepared call of ``provider`` for ``op`` on fresh inputs (state created, not yet timed)."""
    table = OPS[op].providers
    if provider in table:
        return table[provider](shapes, dtype, device)
    peer = next((p for p in PEERS if p.name == provider), None)
    if peer is None or not OPS[op].peers:
        raise Skip(f"no provider {provider!r} for {op}")
    return _adam_optimizer_builder(peer.factory)(shapes, dtype, device)


# ---------------------------------------------------------------------------------------------------------------
# Timing


def _quantile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], Any], reset: Callable[[], None] | None, rep_ms: float, min_reps: int = 3,
             max_reps: int = 10_000) -> tuple[float, float, float]:  # fmt: skip
    """(median, p20, p80) in ms of ``fn`` over repeats (``time.perf_counter``); ``reset`` runs untimed before each."""
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < deadline):
        if reset is not None:
            reset()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return tuple(_quantile(times, q) for q in QUANTILES)  # type: ignore[return-value]


def time_cuda(fn: Callable[[], Any], reset: Callable[[], None] | None, warmup_ms: float,
              rep_ms: float) -> tuple[float, float, float]:  # fmt: skip
    """(median, p20, p80) in ms: ``triton.testing.do_bench``, or with ``reset`` the same method by hand.

    do_bench has no hook for restoring inputs, so with ``reset`` each repeat is: L2 flush, reset, start event,
    ``fn``, end event; as do_bench does, minus the reset between the events.
    """
    import triton.testing

    if reset is None:
        # triton 3.x: with ``quantiles`` the list of those quantiles (one float when only one is asked for)
        out = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        values = [float(v) for v in (out if isinstance(out, (list, tuple)) else [out])]
        if len(values) != len(QUANTILES):
            raise RuntimeError(f"triton.testing.do_bench returned {out!r}, expected {len(QUANTILES)} quantiles")
        return tuple(values)  # type: ignore[return-value]
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    est = []
    for _ in range(5):
        reset()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        est.append(start.elapsed_time(end))
    per_call = max(statistics.median(est), 1e-3)
    for _ in range(max(1, int(warmup_ms / per_call))):
        reset()
        fn()
    n = min(max(1, int(rep_ms / per_call)), 1000)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        reset()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    return tuple(_quantile(times, q) for q in QUANTILES)  # type: ignore[return-value]


def host_time_cuda(fn: Callable[[], Any], reset: Callable[[], None] | None, budget_s: float = 1.0) -> float:
    """Median ms the Python call takes to return without synchronising: the CPU time spent launching."""
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < 3 or (len(times) < 10 and time.perf_counter() - begin < budget_s):
        if reset is not None:
            reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


_DEVICE_ACTIVITIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
_SYNC_NAME = re.compile(r"^(Context|Stream|Event|Device) (Sync|Wait)")


def _event_attr(event: Any, name: str) -> Any:
    """``event.name()`` for a ``_KinetoEvent`` method, ``event.name`` for a ``FunctionEvent`` attribute; None when
    this torch has neither or it fails."""
    try:
        value = getattr(event, name)
        return value() if callable(value) else value
    except Exception:
        return None


def is_device_activity(event: Any) -> bool:
    """Whether a profiler event is work on the GPU: a kernel, memcpy or memset.

    ``activity_type`` (kineto's "kernel", "gpu_memcpy", ...) where this torch reports it in that form; otherwise
    the device type, minus GPU user annotations (``record_function`` ranges projected onto the GPU) and sync
    events, which are not launches.
    """
    kind = _event_attr(event, "activity_type")
    if isinstance(kind, str) and kind in _DEVICE_ACTIVITIES:
        return True
    if isinstance(kind, str) and re.fullmatch(r"[a-z0-9_]+", kind):  # another kineto category ("cuda_runtime", ...)
        return False
    if _event_attr(event, "is_user_annotation") is True:
        return False
    if _SYNC_NAME.match(str(_event_attr(event, "name") or "")):
        return False
    return str(_event_attr(event, "device_type")).endswith("CUDA")


def count_device_activities(prof: Any) -> int | None:
    """Kernels, memcpys and memsets in a finished ``torch.profiler.profile``: the raw Kineto events (cheap even
    for the ~100k kernels of a for-loop step over 10k tensors), else ``prof.events()``; None if neither reads."""
    for read in (lambda: prof.profiler.kineto_results.events(), lambda: prof.events()):
        try:
            events = read()
            return sum(1 for e in events if is_device_activity(e))
        except Exception:  # attribute renamed or missing in this torch: try the next source
            continue
    return None


def count_launches_cuda(fn: Callable[[], Any], reset: Callable[[], None] | None) -> int | None:
    """Device activities (kernels, memcpys, memsets) one call puts on the GPU, counted with torch.profiler (CUPTI).

    None when nothing could be counted (no CUPTI access in a container, for example): every call here launches at
    least one kernel, so zero means the profiler saw nothing. Never raises (except KeyboardInterrupt): a profiler
    failure must not lose the timing.
    """
    try:
        from torch.profiler import ProfilerActivity, profile

        if reset is not None:
            reset()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        n = count_device_activities(prof)
    except Exception:
        return None
    return n or None


def copy_bandwidth(device: torch.device, nbytes: int, rep_ms: float) -> float:
    """GB/s of a large same-device tensor copy, counting bytes read + written (2 x ``nbytes``)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)
    fn()
    if device.type == "cuda":
        median = time_cuda(fn, None, warmup_ms=rep_ms / 4, rep_ms=rep_ms)[0]
    else:
        median = time_cpu(fn, None, rep_ms=rep_ms, min_reps=5)[0]
    return 2 * n * 4 / (median * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------------------
# Environment


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device found")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def device_label(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` on CUDA; ``CPU: <model> (<n> threads)`` on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device | None = None) -> str:
    """File-name form of the device: ``nvidia-h100-80gb-hbm3``, or ``cpu``."""
    device = device or pick_device()
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def triton_version() -> str | None:
    """The installed triton's version, or None."""
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def environment(device: torch.device) -> dict[str, Any]:
    """The header of a results JSON: device, versions, date."""
    return {
        "device": device_label(device),
        "device_kind": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "fused_ops": getattr(fused_ops, "__version__", None),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": fused_ops.resolve_backend(None, device),
        **(_cuda_properties(device) if device.type == "cuda" else {}),
    }


def _cuda_properties(device: torch.device) -> dict[str, Any]:
    """Memory, compute capability and SM count of a CUDA device (for the JSON header)."""
    try:
        props = torch.cuda.get_device_properties(device)
        return {"device_memory_gb": round(props.total_memory / 1e9, 1), "device_capability": f"{props.major}."
                f"{props.minor}", "device_sms": props.multi_processor_count}  # fmt: skip
    except Exception:  # pragma: no cover - a header field must not stop the run
        return {}


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class BenchConfig:
    """What ``bench`` runs. ``rep_ms``/``copy_mb`` of None pick defaults for the device and ``quick``."""

    ops: Sequence[str] = tuple(OPS)
    params: Sequence[str] = DEFAULT_PARAMS
    dtypes: Sequence[str] = DEFAULT_DTYPES
    providers: Sequence[str] | None = None
    device: str = "auto"
    quick: bool = False
    rep_ms: float | None = None
    copy_mb: int | None = None
    budget_s: float | None = None
    progress: bool = True
    command: str | None = None
    threads: int | None = None  # CPU threads for torch (default: torch's)
    # called with the document so far after the copy bandwidth and after every case (the CLI writes the JSON
    # there, so a run killed outright, e.g. SIGKILL after `timeout -k`, still leaves every finished case on disk)
    checkpoint: Callable[[dict[str, Any]], None] | None = None


class _Progress:
    """tqdm when it is installed, else one printed line per case."""

    def __init__(self, total: int, enabled: bool, stream: TextIO) -> None:
        self.bar = None
        self.stream = stream if enabled else None
        self.done, self.total = 0, total
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc="bench", unit="case", file=stream, dynamic_ncols=True)

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.stream is not None:
            print(f"[{self.done}/{self.total}] {label}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let ``timeout`` (SIGTERM) stop a run like Ctrl-C, so the finished cases are still written."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _free(device: torch.device, big: bool) -> None:
    """Release the last provider's tensors before the next one allocates. gc.collect takes ~0.2 s, so it runs only
    where memory matters: on CUDA, or for big CPU sets (refcounting frees the rest)."""
    if device.type == "cuda" or big:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(runner: Runner, device: torch.device, rep_ms: float, warmup_ms: float) -> dict[str, Any]:
    """Time one prepared runner: median/p20/p80, plus host time and launches on CUDA.

    Warm-up outside the timing: the builder already made one call (optimizer state creation); one more here on
    CPU, two on CUDA (Triton compilation, cached launch tables), then do_bench's own warm-up.
    """
    for _ in range(2 if device.type == "cuda" else 1):
        if runner.reset is not None:
            runner.reset()
        runner.fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        median, p20, p80 = time_cuda(runner.fn, runner.reset, warmup_ms=warmup_ms, rep_ms=rep_ms)
        host = host_time_cuda(runner.fn, runner.reset)
        launches = count_launches_cuda(runner.fn, runner.reset)
    else:
        median, p20, p80 = time_cpu(runner.fn, runner.reset, rep_ms=rep_ms)
        host, launches = None, None
    gbps = runner.bytes / (median * 1e-3) / 1e9 if median > 0 else None
    row = {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "bytes": runner.bytes, "gbps": gbps,
           "host_ms": host, "launches": launches, "layout": runner.layout}  # fmt: skip
    if device.type == "cuda":  # peak since the case's build (run() resets the peak before building)
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    return row


def run(config: BenchConfig, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Run the benchmark and return the results document (the JSON's content)."""
    for name, known, what in ((config.ops, OPS, "op"), (config.params, PARAM_SETS, "parameter set"),
                              (config.dtypes, DTYPES, "dtype")):  # fmt: skip
        unknown = [n for n in name if n not in known]
        if unknown:
            raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    kind = device.type
    if kind == "cuda":
        rep_ms = config.rep_ms or (40.0 if config.quick else 100.0)
        warmup_ms = rep_ms / 4
        copy_mb = config.copy_mb or (512 if config.quick else 1024)
    else:
        rep_ms = config.rep_ms or (50.0 if config.quick else 400.0)
        warmup_ms = 0.0
        copy_mb = config.copy_mb or (256 if config.quick else 512)  # well past the last-level cache

    doc = environment(device)
    doc.update(
        label="CUDA" if kind == "cuda" else "CPU",
        timer=("triton.testing.do_bench" if kind == "cuda" else "time.perf_counter") + " (median, p20, p80)",
        quick=config.quick,
        launches_method="torch.profiler CUDA activities per call" if kind == "cuda" else None,
        command=config.command,
        bytes_per_element={f"{op}:{layout}": v for (op, layout), v in BYTES_PER_ELEMENT.items()},
        copy_bandwidth_gbps=None,
        notes=[],
        param_sets={},
        results=[],
        skipped=[],
    )
    results: list[dict[str, Any]] = doc["results"]
    skipped: list[dict[str, Any]] = doc["skipped"]

    peers = peer_status(kind)
    wants_peers = any(OPS[o].peers for o in config.ops)
    if wants_peers:
        for name, why in peers.items():
            if why is not None and (config.providers is None or name in config.providers):
                skipped.append({"provider": name, "why": why})

    # The peers go last, after every op's own cases: importing one (and torchao's torch.compile on its first step)
    # can take long, and the fused_ops-vs-torch figures matter most when the time budget runs out.
    plan: list[tuple[str, str, str, list[str]]] = []
    peer_plan: list[tuple[str, str, str, list[str]]] = []
    for op_name in config.ops:
        op = OPS[op_name]
        why = op.unavailable()
        if why is not None:
            skipped.append({"op": op_name, "why": why})
            continue
        own = list(op.providers)
        extra = [p for p, w in peers.items() if w is None and op.peers]
        if config.providers is not None:
            own = [p for p in own if p in config.providers]
            extra = [p for p in extra if p in config.providers]
        for dtype in config.dtypes:
            if dtype not in op.dtypes:
                skipped.append({"op": op_name, "dtype": dtype, "why": f"{op_name} runs on {', '.join(op.dtypes)}"})
        cases = [(p, d) for p in config.params for d in config.dtypes if d in op.dtypes]
        plan += [(op_name, p, d, own) for p, d in cases if own]
        peer_plan += [(op_name, p, d, extra) for p, d in cases if extra]
    plan += peer_plan

    begin = time.perf_counter()
    progress = _Progress(sum(len(p[3]) for p in plan), config.progress, log)
    shapes_cache: dict[str, tuple[list[tuple[int, ...]], str]] = {}
    handled: set[tuple[str, str, str, str]] = set()  # cases with a result or a skip note
    stopped: str | None = None

    def checkpoint() -> None:
        if config.checkpoint is None:
            return
        _add_all_ratios(doc)
        doc["stopped"] = stopped or "killed before the end of the run (JSON written after each case)"
        doc["wall_s"] = round(time.perf_counter() - begin, 2)
        try:
            config.checkpoint(doc)
        except Exception as e:  # pragma: no cover - a full disk must not stop the measurements
            print(f"bench: checkpoint failed: {type(e).__name__}: {e}", file=log)

    try:
        with _sigterm_as_interrupt():
            try:
                doc["copy_bandwidth_gbps"] = copy_bandwidth(device, copy_mb * 2**20, rep_ms=max(rep_ms, 20.0))
            except Exception as e:  # e.g. out of memory on a busy GPU: the op figures are still worth having
                doc["notes"].append(f"copy bandwidth not measured: {type(e).__name__}: {_first_line(e)}")
            _free(device, big=True)
            checkpoint()
            for op_name, params, dtype, providers in plan:
                if params not in shapes_cache:
                    shapes_cache[params] = PARAM_SETS[params].shapes(config.quick, kind)
                    shapes, note = shapes_cache[params]
                    doc["param_sets"][params] = {"n_params": _numel(shapes), "n_tensors": len(shapes), "note": note}
                shapes, note = shapes_cache[params]
                for provider in providers:
                    label = f"{op_name} {params} {dtype} {provider}"
                    over = config.budget_s is not None and time.perf_counter() - begin > config.budget_s
                    if stopped is None and over:
                        stopped = f"time budget of {config.budget_s:g} s reached"
                    if stopped is not None:
                        skipped.append({"op": op_name, "params": params, "dtype": dtype, "provider": provider,
                                        "why": stopped})  # fmt: skip
                        handled.add((op_name, params, dtype, provider))
                        progress.step(label)
                        continue
                    runner = None
                    t_case = time.perf_counter()
                    try:
                        if kind == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        runner = build_runner(op_name, provider, shapes, DTYPES[dtype], device)
                        row = measure(runner, device, rep_ms, warmup_ms)
                        row["wall_s"] = round(time.perf_counter() - t_case, 3)  # build + warm-up + timing
                    except Skip as e:  # a provider that does not exist for this op: one note, not one per case
                        note = {"op": op_name, "provider": provider, "why": str(e)}
                        if note not in skipped:
                            skipped.append(note)
                        handled.add((op_name, params, dtype, provider))
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # one broken provider (or a CUDA OOM) must not lose the rest of the run
                        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
                        skipped.append({"op": op_name, "params": params, "dtype": dtype, "provider": provider,
                                        "why": f"{'out of memory' if oom else 'failed'}: {type(e).__name__}: "
                                               f"{_first_line(e)}"})  # fmt: skip
                        handled.add((op_name, params, dtype, provider))
                        print(f"bench: {label}: {skipped[-1]['why']}", file=log, flush=True)
                    else:
                        row = {"op": op_name, "params": params, "dtype": dtype, "provider": provider,
                               "n_params": _numel(shapes), "n_tensors": len(shapes), **row}  # fmt: skip
                        results.append(row)
                        handled.add((op_name, params, dtype, provider))
                    finally:
                        # the exception (and its traceback, which holds the builder's tensors) is gone here
                        del runner
                        _free(device, big=_numel(shapes) > 20_000_000)
                        progress.step(label)
                    checkpoint()
    except KeyboardInterrupt:
        stopped = "interrupted"
        for op_name, params, dtype, providers in plan:
            for provider in providers:
                if (op_name, params, dtype, provider) not in handled:
                    skipped.append({"op": op_name, "params": params, "dtype": dtype, "provider": provider,
                                    "why": "interrupted"})  # fmt: skip
    finally:
        progress.close()
        with contextlib.suppress(Exception):
            release_process_group()
    _add_all_ratios(doc)
    doc["stopped"] = stopped
    doc["wall_s"] = round(time.perf_counter() - begin, 2)
    if kind == "cpu":
        doc["notes"].append("CPU run: no GPU was used; the CPU path is timed against torch's CPU implementations.")
        if any((r.get("frac_of_copy") or 0) > 1 for r in results):
            doc["notes"].append("Some sets fit in the CPU caches, so their GB/s can exceed the (DRAM) copy bandwidth.")
    return doc


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _add_all_ratios(doc: dict[str, Any]) -> None:
    """``_add_ratios`` for every (op, params, dtype) group of the results so far."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in doc["results"]:
        groups.setdefault((r["op"], r["params"], r["dtype"]), []).append(r)
    for rows in groups.values():
        _add_ratios(rows, doc.get("copy_bandwidth_gbps"))


def _add_ratios(rows: list[dict[str, Any]], copy_gbps: float | None) -> None:
    """Fraction of copy bandwidth, and speed-up over torch-fused (torch-foreach where torch has no fused path)."""
    by_provider = {r["provider"]: r for r in rows}
    base = by_provider.get("torch-fused") or by_provider.get("torch-foreach")
    for r in rows:
        r["frac_of_copy"] = r["gbps"] / copy_gbps if r["gbps"] and copy_gbps else None
        r["speedup_vs_torch_fused"] = base["median_ms"] / r["median_ms"] if base and r["median_ms"] > 0 else None
        r["speedup_baseline"] = base["provider"] if base else None


# ---------------------------------------------------------------------------------------------------------------
# Output: table, JSON, plot


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(doc: dict[str, Any]) -> str:
    """The terminal table: one row per (op, params, dtype, provider), then the skip notes."""
    label = doc.get("label", "CPU" if doc.get("device_kind") == "cpu" else "CUDA")
    lines = [
        f"fused_ops bench [{label}] on {doc['device']}: torch {doc['torch']}, triton {doc.get('triton') or 'n/a'}, "
        f"{doc['date']}",
        f"copy bandwidth ({label}, measured in this run, bytes read + written): "
        f"{_fmt(doc.get('copy_bandwidth_gbps'), '.1f')} GB/s; timer: {doc.get('timer', '')}",
    ]
    for name, info in doc.get("param_sets", {}).items():
        note = f" ({info['note']})" if info.get("note") else ""
        lines.append(f"  {name}: {info['n_params']:,} params in {info['n_tensors']:,} tensors{note}")
    header = ("op", "params", "dtype", "provider", "median ms", "p20-p80 ms", "B/elem", "GB/s", "% copy",
              "vs torch-fused", "host ms", "launches")  # fmt: skip
    rows = []
    for r in doc["results"]:
        speed = _fmt(r.get("speedup_vs_torch_fused"), ".2f") + "x"
        if r.get("speedup_baseline") == "torch-foreach":
            speed += " (foreach)"
        frac = r.get("frac_of_copy")
        rows.append((
            r["op"], r["params"], r["dtype"], r["provider"], _fmt(r["median_ms"], ".3f"),
            f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}", str(round(r["bytes"] / max(r["n_params"], 1))),
            _fmt(r["gbps"], ".1f"), _fmt(None if frac is None else 100 * frac, ".1f"), speed,
            _fmt(r.get("host_ms"), ".3f"), "n/a" if r.get("launches") is None else str(r["launches"]),
        ))  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {4, 5, 6, 7, 8, 9, 10, 11}
    fmt_row = lambda row: "  ".join(
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
    )
    lines += ["", fmt_row(header), fmt_row(tuple("-" * w for w in widths)), *map(fmt_row, rows)]
    if not rows:
        lines.append("(no results)")
    if doc.get("notes"):
        lines += ["", *(f"note: {n}" for n in doc["notes"])]
    if doc.get("skipped"):
        lines.append("")
        lines.append("skipped:")
        for s in doc["skipped"]:
            what = " ".join(str(s[k]) for k in ("op", "params", "dtype", "provider") if k in s)
            lines.append(f"  {what}: {s['why']}")
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: str) -> None:
    """Write the results document (non-finite numbers become null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:  # then renamed: a run killed mid-write never leaves half a JSON
        json.dump(clean(doc), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def write_plot(doc: dict[str, Any], path: str) -> None:
    """PNG: GB/s per provider for every (params, dtype), one panel per op, copy bandwidth drawn as the ceiling.

    The GB/s axis is logarithmic: a for-loop over 10,000 tensors and a fused kernel differ by orders of magnitude.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in doc["results"])) or ["(no results)"]
    providers = list(dict.fromkeys(r["provider"] for r in doc["results"]))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    n_groups = max([len({(r["params"], r["dtype"]) for r in doc["results"] if r["op"] == op}) for op in ops] + [1])
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8.0, 2.0 * n_groups + 2), 3.2 * len(ops)), squeeze=False)
    copy_gbps = doc.get("copy_bandwidth_gbps")
    label = doc.get("label", "CPU" if doc.get("device_kind") == "cpu" else "CUDA")
    values = [r["gbps"] for r in doc["results"] if r.get("gbps")]
    low = min([*values, copy_gbps or 1.0]) / 3
    high = max([*values, copy_gbps or 1.0]) * 3
    for ax, op in zip(axes[:, 0], ops, strict=True):
        rows = [r for r in doc["results"] if r["op"] == op]
        groups = list(dict.fromkeys((r["params"], r["dtype"]) for r in rows))
        width = 0.8 / max(len(providers), 1)
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, g in enumerate(groups):
                r = next((r for r in rows if (r["params"], r["dtype"]) == g and r["provider"] == prov), None)
                if r is not None and r["gbps"]:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["gbps"])
            if xs:
                ax.bar(xs, ys, width=width, color=colors[prov], label=prov)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.set_xlim(-0.6, max(len(groups), 1) - 0.4)
        if copy_gbps:
            ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1)
            ax.text(max(len(groups), 1) - 0.45, copy_gbps * 1.05, f"copy {copy_gbps:.1f} GB/s (ceiling)",
                    ha="right", va="bottom", fontsize=8)  # fmt: skip
        sets = doc.get("param_sets", {})
        ticks = [f"{p} ({_count(sets[p]['n_params'])})\n{d}" if p in sets else f"{p}\n{d}" for p, d in groups]
        ax.set_xticks(range(len(groups)), ticks, fontsize=8)
        ax.set_ylabel("GB/s (log)")
        ax.set_title(op, fontsize=10, loc="left")
        if providers and rows:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"fused_ops bench [{label}]: {doc['device']}\ntorch {doc['torch']}, triton {doc.get('triton')}, "
                 f"{doc['date'][:10]}; dashed: copy bandwidth measured in the same run", fontsize=9)  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# README Performance section

PERF_BEGIN = "<!-- perf:begin -->"
PERF_END = "<!-- perf:end -->"


def load_results(results_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """Every readable results JSON in ``results_dir`` as (path, document), oldest first by their ``date``."""
    out = []
    if os.path.isdir(results_dir):
        for name in sorted(os.listdir(results_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(results_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and "results" in doc and "date" in doc:
                out.append((path, doc))
    return sorted(out, key=lambda pd: (str(pd[1]["date"]), pd[0]))


def newest_gpu_result(results_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest results JSON measured on CUDA, or None."""
    gpu = [pd for pd in load_results(results_dir) if pd[1].get("device_kind") == "cuda"]
    return gpu[-1] if gpu else None


def render_performance(found: tuple[str, dict[str, Any]] | None, readme_dir: str) -> str:
    """The Markdown between the perf markers, from a results JSON (or the note that there is none yet)."""
    gen = "Generated by `python -m fused_ops report`; do not edit by hand."
    if found is None:
        return (
            "No GPU measurement has been committed yet. On a GPU machine, `bash benchmarks/gpu_check.sh` writes\n"
            "`bench_<device>_<date>.json` and `.png`; commit them under `benchmarks/results/` and run\n"
            f"`python -m fused_ops report`. {gen}"
        )
    path, doc = found
    rel = os.path.relpath(path, readme_dir).replace(os.sep, "/")
    lines = [
        f"Measured on **{doc['device']}** on {doc['date'][:10]} (torch {doc['torch']}, triton {doc.get('triton')}), "
        f"from [`{rel}`]({rel}). {gen}",
        "",
        f"Copy bandwidth measured in the same run (bytes read + written): {_fmt(doc.get('copy_bandwidth_gbps'), '.0f')}"
        " GB/s. Times are `triton.testing.do_bench` medians (p20-p80); bytes are counted from each op's definition "
        "(e.g. 28 B per fp32 AdamW parameter); host ms is the time the Python call takes to return without "
        "synchronising; launches are device activities per call.",
        "",
    ]
    for name, info in doc.get("param_sets", {}).items():
        note = f" ({info['note']})" if info.get("note") else ""
        lines.append(f"- `{name}`: {info['n_params']:,} parameters in {info['n_tensors']:,} tensors{note}")
    lines += [
        "",
        "| op | params | dtype | provider | median ms (p20-p80) | GB/s | % of copy | vs torch-fused | host ms "
        "| launches |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        frac = r.get("frac_of_copy")
        speed = _fmt(r.get("speedup_vs_torch_fused"), ".2f") + "x"
        if r.get("speedup_baseline") == "torch-foreach":
            speed += " (vs foreach)"
        prov = f"**{r['provider']}**" if r["provider"] == "fused_ops" else r["provider"]
        lines.append(
            f"| {r['op']} | {r['params']} | {r['dtype']} | {prov} | {_fmt(r['median_ms'], '.3f')} "
            f"({_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}) | {_fmt(r['gbps'], '.0f')} | "
            f"{_fmt(None if frac is None else 100 * frac, '.1f')} | {speed} | {_fmt(r.get('host_ms'), '.3f')} | "
            f"{'n/a' if r.get('launches') is None else r['launches']} |"
        )
    png = os.path.splitext(path)[0] + ".png"
    if os.path.exists(png):
        prel = os.path.relpath(png, readme_dir).replace(os.sep, "/")
        lines += ["", f"![GB/s per op and provider on {doc['device']}]({prel})"]
    skipped = doc.get("skipped") or []
    if skipped:
        notes = "; ".join(
            " ".join(str(s[k]) for k in ("op", "params", "dtype", "provider") if k in s) + f": {s['why']}"
            for s in skipped[:12]
        )
        more = f" (and {len(skipped) - 12} more)" if len(skipped) > 12 else ""
        lines += ["", f"Skipped: {notes}{more}."]
    return "\n".join(lines)


def update_readme(readme: str, results_dir: str) -> tuple[str, str, bool]:
    """Rewrite the section between the perf markers of ``readme`` (adding ``## Performance`` and the markers at
    the end when absent). Returns (new text, source description, changed)."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    found = newest_gpu_result(results_dir)
    body = render_performance(found, os.path.dirname(os.path.abspath(readme)))
    block = f"{PERF_BEGIN}\n{body}\n{PERF_END}"
    if PERF_BEGIN in text and PERF_END in text and text.index(PERF_BEGIN) < text.index(PERF_END):
        start, end = text.index(PERF_BEGIN), text.index(PERF_END) + len(PERF_END)
        new = text[:start] + block + text[end:]
    else:
        new = text.rstrip("\n") + "\n\n## Performance\n\n" + block + "\n"
    source = found[0] if found else "no GPU result"
    return new, source, new != text


# -- ZeRO (python -m fused_ops bench --zero) ------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def format_zero_report(result: dict) -> str:
    """A table of ``benchmark_zero``'s result."""
    lines = [
        f"ZeRO benchmark: {result['nproc']} ranks, {result['device']}, {result['params']:,} params",
        f"{'optimizer':<12}{'step ms':>9}  {'per-rank MiB: master':>21}{'states':>9}{'buckets':>9}{'p.grad':>9}"
        f"{'padding':>9}{'total':>9}  totals of all ranks (MiB)",
    ]
    for key in [k for k in result if k.startswith("zero")] + ["ddp_adamw"]:
        r = result[key]
        m = r["memory"]
        per_rank = ", ".join(f"{t / 2**20:.2f}" for t in r["memory_per_rank"])
        lines.append(
            f"{key:<12}{r['step_ms']:9.2f}  {_mib(m['master']):>21}{_mib(m['states']):>9}{_mib(m['grad_buckets']):>9}"
            f"{_mib(m['param_grads']):>9}{_mib(m['padding']):>9}{_mib(m['total']):>9}  [{per_rank}]"
        )
    lines.append(
        "buckets: ZeRO's reduced-grad shards + reduce-scatter staging; p.grad: grads still held after backward "
        "(ZeRO-1 and DDP keep full grads; ZeRO-2 frees them as their buckets are reduced)"
    )
    return "\n".join(lines)
