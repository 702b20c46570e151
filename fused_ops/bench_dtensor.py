"""Host time of one optimizer step on DTensor params (FSDP2's sharded params: ``Shard(0)`` on a device mesh).

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

Figures are the median and the minimum of the per-step wall times (ms). On a GPU every step is followed by a
device synchronisation, so the figures include the device time too.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import torch


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


def _time_steps(opt, params, grads, steps: int, device: torch.device) -> dict[str, float]:
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # warm-up: states, plans
    times = []
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def benchmark_dtensor_host(n_params: list[int] | None = None, steps: int = 10,
                           device: str | torch.device | None = None) -> dict[str, Any]:  # fmt: skip
    """ms per optimizer step on ``n`` DTensor params (the bench's small-tensor shapes), per provider."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fused_ops

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    made = _ensure_process_group(device)
    result: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "steps": steps, "cases": []}
    try:
        mesh = init_device_mesh(device.type, (1,))
        for n in n_params or [1000, 10_000]:
            torch.manual_seed(0)
            shapes = _small_shapes(n)

            def make(shapes=shapes):
                ps = [torch.nn.Parameter(distribute_tensor(torch.randn(s, device=device), mesh, [Shard(0)]))
                      for s in shapes]  # fmt: skip
                gs = [distribute_tensor(torch.randn(s, device=device), mesh, [Shard(0)]) for s in shapes]
                return ps, gs

            case: dict[str, Any] = {"n_params": n}
            ps, gs = make()
            case["fused_ops"] = _time_steps(fused_ops.FusedAdamW(ps, lr=1e-3), ps, gs, steps, device)
            if device.type == "cpu":
                from .kernels import adam as kernels_adam

                saved = kernels_adam._adam_kernel

                class _NoLaunch:
                    def __getitem__(self, grid):
                        return lambda *args, **kwargs: None

                interpret = os.environ.get("TRITON_INTERPRET")
                os.environ["TRITON_INTERPRET"] = "1"  # (lets backend="triton" take CPU tensors; nothing runs)
                kernels_adam._adam_kernel = _NoLaunch()
                try:
                    ps, gs = make()
                    opt = fused_ops.FusedAdamW(ps, lr=1e-3, backend="triton")
                    case["fused_ops host only"] = _time_steps(opt, ps, gs, steps, device)
                finally:
                    kernels_adam._adam_kernel = saved
                    if interpret is None:
                        os.environ.pop("TRITON_INTERPRET", None)
                    else:
                        os.environ["TRITON_INTERPRET"] = interpret
            for name, kwargs in (("torch-fused", {"fused": True}), ("torch-foreach", {"foreach": True})):
                ps, gs = make()
                case[name] = _time_steps(torch.optim.AdamW(ps, lr=1e-3, **kwargs), ps, gs, steps, device)
            fused = case["torch-fused"]["median_ms"]
            case["fused_ops / torch-fused"] = case["fused_ops"]["median_ms"] / fused
            if "fused_ops host only" in case:
                case["host only / torch-fused"] = case["fused_ops host only"]["median_ms"] / fused
            result["cases"].append(case)
    finally:
        if made:
            dist.destroy_process_group()
    return result


def format_dtensor_report(result: dict[str, Any]) -> str:
    lines = [f"Optimizer step on DTensor params (Shard(0), one-rank mesh), {result['device']}, torch "
             f"{result['torch']}, {result['steps']} steps: median / min ms"]  # fmt: skip
    for case in result["cases"]:
        lines.append(f"  {case['n_params']:>6} params:")
        for name in ("fused_ops", "fused_ops host only", "torch-fused", "torch-foreach"):
            if name in case:
                lines.append(f"    {name:22s} {case[name]['median_ms']:9.2f} / {case[name]['min_ms']:9.2f}")
        lines.append(f"    fused_ops / torch-fused: {case['fused_ops / torch-fused']:.2f}x"
                     + (f"; host only / torch-fused: {case['host only / torch-fused']:.2f}x"
                        if "host only / torch-fused" in case else ""))  # fmt: skip
    return "\n".join(lines)
