"""Timing: ``triton.testing.do_bench`` on CUDA (or the same method by hand when an input must be reset),
``time.perf_counter`` repeats on CPU, the host time of a call, its device activities (``torch.profiler``) and the
device's copy bandwidth."""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

QUANTILES = (0.5, 0.2, 0.8)


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

    do_bench has no hook for restoring inputs, so with ``reset`` each repeat is: reset, L2 flush, start event,
    ``fn``, end event. The flush comes after the reset (which rewrites the inputs, leaving them in L2) and right
    before the timed call, as in do_bench: ``fn`` starts on a cold cache, like every other op's.
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
        reset()
        flush.zero_()
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
