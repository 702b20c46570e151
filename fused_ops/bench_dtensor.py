"""Host time of one optimizer step on DTensor params: an FSDP2 model (``fully_shard``, ``Shard(0)`` params).

    python -m fused_ops bench --dtensor                 # 1,000 and 10,000 params, this machine's device
    python -m fused_ops bench --dtensor --dtensor-params 1000 --steps 20

On models of many small tensors an FSDP2 step is bound by the host: torch's ``AdamW(fused=True)`` and
``foreach=True`` go through DTensor dispatch for each of their multi-tensor ops. ``FusedAdamW`` unwraps every
param, grad and state to its local shard once, in its plan, and launches on the shards. Measured here, in one
process (a one-rank mesh: the shards are whole tensors, the dispatch costs are those of any mesh):

- ``fused_ops`` (``backend="auto"``): the whole step, as users run it (on CPU: torch's fused CPU kernel on the
  shards; on CUDA: the Triton launch);
- ``fused_ops host only``: the same step with the Triton launch replaced by a no-op (CPU tensors only), i.e.
  the host work alone;
- ``torch-fused`` and ``torch-foreach``: ``torch.optim.AdamW`` on the same DTensors, the whole step.

The model is built once per size and shared by the four providers (each gets a fresh optimizer): one module
holding all ``n`` params (the bench's small-tensor shapes), ``fully_shard`` once on it, so building a
10,000-param model takes seconds (``fully_shard`` on 10,000 modules would take minutes). Its build time is
reported separately.

The params are split into param groups of ``group_size`` (1,000) for every provider. torch's first step on a
list of ``k`` DTensors is quadratic in ``k``: DTensor's sharding propagation of a multi-tensor op, before it is
cached, scans all ``5k`` argument specs once per output (``_propagate_use_strided_shard_flag``, torch 2.13).
On the 2-core dev machine torch-fused's first step took 7 to 22 s at ``k = 1,000`` (load-dependent) and 87 s at
2,000, torch-foreach's about three times as long, so one group of 10,000 would spend hours in its first step.
Groups of equal shapes share one propagation cache entry, so the first step costs that of one group. The first
step and the warm-up are timed and reported, never mixed into the per-step figures: those are the median and the
minimum of ``steps`` timed steps (ms) after ``warmup`` steps. On a GPU every step is followed by a device
synchronisation, so the figures include the device time too. On a busy CPU, ``--threads 1`` keeps torch's
OpenMP threads from waiting on each other at every one of the thousands of small ops.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
from typing import Any, TextIO

import torch

PROVIDERS = ("fused_ops", "fused_ops host only", "torch-fused", "torch-foreach")


def _small_shapes(n: int) -> list[tuple[int, ...]]:
    from .bench import small_shapes

    return small_shapes(n)


def _ensure_process_group(device: torch.device) -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    store = tempfile.NamedTemporaryFile(delete=False)
    store.close()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store.name}",
                            rank=0, world_size=1)  # fmt: skip
    return True


class _Progress:
    """tqdm when it is installed, else one line per provider; both on ``stream`` (stderr)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO) -> None:
        self.bar, self.stream = None, stream if enabled else None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc="bench --dtensor", unit="step", file=stream, dynamic_ncols=True)

    def label(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.stream is not None:
            print(f"bench --dtensor: {text}", file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_fsdp2_model(n: int, device: torch.device, mesh) -> tuple[list, list, dict[str, float]]:
    """``n`` DTensor params of the small-tensor shapes, made by FSDP2: one module holds them all and is
    ``fully_shard``-ed once. Returns the params, one DTensor grad per param, and the seconds each part took."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = torch.nn.Module()
    model.params = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, device=device)) for s in _small_shapes(n))
    t1 = time.perf_counter()
    fully_shard(model, mesh=mesh)
    t2 = time.perf_counter()
    params = list(model.parameters())
    grads = [DTensor.from_local(torch.randn_like(p.to_local()), p.device_mesh, p.placements, run_check=False,
                                shape=p.shape, stride=p.stride())
             for p in params]  # fmt: skip
    t3 = time.perf_counter()
    return params, grads, {"module_s": t1 - t0, "fully_shard_s": t2 - t1, "grads_s": t3 - t2}


def _time_steps(opt, params, grads, steps: int, warmup: int, device: torch.device, progress: _Progress) -> dict:
    def one_step() -> float:
        for p, g in zip(params, grads):
            p.grad = g
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        progress.update()
        return time.perf_counter() - t0

    warm = [one_step() for _ in range(max(1, warmup))]  # the first creates the states (and plans, caches)
    times = [one_step() for _ in range(steps)]
    for p in params:
        p.grad = None
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "first_step_s": warm[0], "warmup_s": sum(warm), "times_ms": [1e3 * t for t in times]}  # fmt: skip


def _groups(params: list, group_size: int) -> list[dict[str, Any]]:
    return [{"params": params[i : i + group_size]} for i in range(0, len(params), group_size)]


def benchmark_dtensor_host(n_params: list[int] | None = None, steps: int = 10,
                           device: str | torch.device | None = None, warmup: int = 2, group_size: int = 1000,
                           progress: bool | None = None, stream: TextIO | None = None) -> dict[str, Any]:  # fmt: skip
    """ms per optimizer step on an FSDP2 model of ``n`` DTensor params (the bench's small-tensor shapes), per
    provider, after ``warmup`` untimed steps (at least one); params in groups of ``group_size``. ``progress``: a
    bar (tqdm if installed) on ``stream`` (stderr); by default when stderr is a terminal."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import fused_ops

    if steps < 1 or group_size < 1:
        raise ValueError(f"steps and group_size must be at least 1, got {steps} and {group_size}")
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup}")
    stream = stream or sys.stderr
    if progress is None:
        progress = stream.isatty()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = list(n_params or [1000, 10_000])
    providers = [p for p in PROVIDERS if p != "fused_ops host only" or device.type == "cpu"]
    made = _ensure_process_group(device)
    result: dict[str, Any] = {
        "device": str(device), "device_kind": device.type, "torch": torch.__version__, "steps": steps,
        "warmup": max(1, warmup), "group_size": group_size, "threads": torch.get_num_threads(),
        "mesh": f"1 rank ({dist.get_backend()}), FSDP2 fully_shard on one module holding every param",
        "date": time.strftime("%Y-%m-%d"), "cases": [],
    }  # fmt: skip
    bar = _Progress(len(sizes) * len(providers) * (steps + max(1, warmup)), progress, stream)
    t_start = time.perf_counter()
    try:
        mesh = init_device_mesh(device.type, (1,))
        for n in sizes:
            bar.label(f"{n} params: building the FSDP2 model")
            params, grads, build = build_fsdp2_model(n, device, mesh)
            case: dict[str, Any] = {"n_params": n, "param_groups": len(_groups(params, group_size)), "build": build}
            for name in providers:
                bar.label(f"{n} params: {name}")
                groups = _groups(params, group_size)
                if name == "fused_ops":
                    case[name] = _time_steps(fused_ops.FusedAdamW(groups, lr=1e-3), params, grads, steps, warmup,
                                             device, bar)  # fmt: skip
                elif name == "fused_ops host only":
                    case[name] = _host_only(groups, params, grads, steps, warmup, device, bar)
                else:
                    kwargs = {"fused": True} if name == "torch-fused" else {"foreach": True}
                    opt = torch.optim.AdamW(groups, lr=1e-3, **kwargs)
                    case[name] = _time_steps(opt, params, grads, steps, warmup, device, bar)
                    del opt
                gc.collect()  # the last provider's states go before the next one allocates
            fused = case["torch-fused"]["median_ms"]
            case["fused_ops / torch-fused"] = case["fused_ops"]["median_ms"] / fused
            if "fused_ops host only" in case:
                case["host only / torch-fused"] = case["fused_ops host only"]["median_ms"] / fused
            result["cases"].append(case)
            del params, grads
            gc.collect()
    finally:
        bar.close()
        if made:
            dist.destroy_process_group()
    result["total_s"] = time.perf_counter() - t_start
    return result


def _host_only(groups, params, grads, steps: int, warmup: int, device: torch.device, bar: _Progress) -> dict:
    """FusedAdamW(backend="triton") on CPU tensors with the kernel launch replaced by a no-op: the host work."""
    import fused_ops

    from .kernels import adam as kernels_adam

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = kernels_adam._adam_kernel
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # (lets backend="triton" take CPU tensors; nothing runs)
    kernels_adam._adam_kernel = _NoLaunch()
    try:
        opt = fused_ops.FusedAdamW(groups, lr=1e-3, backend="triton")
        return _time_steps(opt, params, grads, steps, warmup, device, bar)
    finally:
        kernels_adam._adam_kernel = saved
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def format_dtensor_report(result: dict[str, Any]) -> str:
    lines = [f"Optimizer step on an FSDP2 model of DTensor params (Shard(0), one-rank mesh), {result['device']}, "
             f"torch {result['torch']}, {result['threads']} threads; param groups of {result['group_size']}; "
             f"{result['warmup']} warm-up + {result['steps']} timed steps: median / min ms "
             f"(first step s)"]  # fmt: skip
    for case in result["cases"]:
        b = case["build"]
        lines.append(f"  {case['n_params']:>6} params ({case['param_groups']} groups); model built in "
                     f"{b['module_s'] + b['fully_shard_s'] + b['grads_s']:.1f} s "
                     f"(fully_shard {b['fully_shard_s']:.1f} s):")  # fmt: skip
        for name in PROVIDERS:
            if name in case:
                c = case[name]
                lines.append(f"    {name:22s} {c['median_ms']:9.2f} / {c['min_ms']:9.2f}   ({c['first_step_s']:.1f} s)")
        lines.append(f"    fused_ops / torch-fused: {case['fused_ops / torch-fused']:.2f}x"
                     + (f"; host only / torch-fused: {case['host only / torch-fused']:.2f}x"
                        if "host only / torch-fused" in case else ""))  # fmt: skip
    if "total_s" in result:
        lines.append(f"  total {result['total_s']:.0f} s")
    return "\n".join(lines)
