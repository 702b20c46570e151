"""``benchmark_zero``: ZeroAdamW against DDP + torch.optim.AdamW on CPU gloo processes."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._optimizer import ZeroAdamW


def _bench_worker(rank: int, nproc: int, store: str, cfg: dict, out_dir: str) -> None:
    import datetime
    import json

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=nproc,
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

    Raises ValueError, naming the argument, before any process is started: ``nproc``, ``hidden``, ``layers``,
    ``batch`` and ``steps`` must be ints >= 1, ``warmup`` an int >= 0, ``stages`` a non-empty list of 1 and 2,
    ``bucket_cap_mb`` and ``timeout_s`` numbers > 0.
    """
    import json

    for name, value, least in (("nproc", nproc, 1), ("hidden", hidden, 1), ("layers", layers, 1),
                               ("batch", batch, 1), ("steps", steps, 1), ("warmup", warmup, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"benchmark_zero: {name} must be an int >= {least}, got {value!r}")
    stages = list(stages)
    if not stages or any(isinstance(s, bool) or s not in (1, 2) for s in stages):
        raise ValueError(f"benchmark_zero: stages must be a non-empty list of 1 and 2, got {stages!r}")
    for name, value in (("bucket_cap_mb", bucket_cap_mb), ("timeout_s", timeout_s)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:  # (nan is not > 0)
            raise ValueError(f"benchmark_zero: {name} must be a number > 0, got {value!r}")

    import torch.multiprocessing as mp

    cfg = dict(hidden=hidden, layers=layers, batch=batch, steps=steps, warmup=warmup, stages=list(stages),
               bucket_cap_mb=bucket_cap_mb)  # fmt: skip
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            # A file store in a fresh folder: no port to pick, so none another process can take first.
            store = os.path.join(out_dir, "store")
            ctx = mp.start_processes(_bench_worker, args=(nproc, store, cfg, out_dir), nprocs=nproc, join=False,
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
