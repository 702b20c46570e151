"""The run: ``BenchConfig``, ``run`` (plan the cases, build, time and free each on its own, peers last, a time
budget, SIGTERM as Ctrl-C, a checkpoint after every case) and the ratios added to its rows."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import torch

from ._registry import _PEERS_ON_CPU, BYTES_PER_ELEMENT, DEFAULT_DTYPES, DTYPES, OPS, Runner, Skip
from .cases._common import release_process_group  # importing cases registers every op, before BenchConfig reads OPS
from .env import environment, pick_device
from .params import DEFAULT_PARAMS, PARAM_SETS, numel
from .peers import PEERS, peer_builder, peer_status
from .timing import copy_bandwidth, count_launches_cuda, host_time_cuda, time_cpu, time_cuda


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
    return peer_builder(op, peer)(shapes, dtype, device)


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
    threads: int | None = None  # torch's CPU threads during the run (None: 1 on CPU, torch's own on CUDA)
    peers_on_cpu: bool = False  # installed peers on CPU too (a dry run of their providers; see _registry.py)
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

    ``peak_mem_gb`` (CUDA) is read after the warm-up, before the timer: the build, the state and the calls, without
    the timer's 256 MiB L2-flush buffer (do_bench's and ``time_cuda``'s), which is not the case's memory. The timed
    calls are the warm-up calls repeated, so they allocate nothing more.
    """
    for _ in range(2 if device.type == "cuda" else 1):
        if runner.reset is not None:
            runner.reset()
        runner.fn()
    peak_gb = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_gb = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)  # since the case's build (run() resets)
        median, p20, p80 = time_cuda(runner.fn, runner.reset, warmup_ms=warmup_ms, rep_ms=rep_ms)
        host = host_time_cuda(runner.fn, runner.reset)
        launches = count_launches_cuda(runner.fn, runner.reset)
    else:
        median, p20, p80 = time_cpu(runner.fn, runner.reset, rep_ms=rep_ms)
        host, launches = None, None
    gbps = runner.bytes / (median * 1e-3) / 1e9 if median > 0 else None
    row = {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "bytes": runner.bytes, "gbps": gbps,
           "host_ms": host, "launches": launches, "layout": runner.layout}  # fmt: skip
    if runner.state_bytes_per_param is not None:  # optimizer steps: measured from the optimizer's state tensors
        row["state_bytes_per_param"] = runner.state_bytes_per_param
    if peak_gb is not None:
        row["peak_mem_gb"] = peak_gb
    return row


def run(config: BenchConfig, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Run the benchmark and return the results document (the JSON's content). torch's thread count is set for
    the run (``BenchConfig.threads``; 1 on CPU when None) and put back afterwards."""
    _PEERS_ON_CPU[0] = config.peers_on_cpu
    threads_before = torch.get_num_threads()
    try:
        return _run(config, log)
    finally:
        _PEERS_ON_CPU[0] = False
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _load_note(cpu_threads: int) -> str | None:
    """A note when the machine's load average is above its core count: other processes then compete for the
    cores, and CPU times swing with them (the p20-p80 spread of one run need not show it)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"load average {load:.1f} on {cores} cores while running ({cpu_threads} torch thread"
            f"{'s' if cpu_threads != 1 else ''}): other processes compete for the CPU, so these CPU times are "
            "contended and can swing between runs")  # fmt: skip


def _run(config: BenchConfig, log: TextIO) -> dict[str, Any]:
    for name, known, what in ((config.ops, OPS, "op"), (config.params, PARAM_SETS, "parameter set"),
                              (config.dtypes, DTYPES, "dtype")):  # fmt: skip
        unknown = [n for n in name if n not in known]
        if unknown:
            raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    for field, kind, low in (("threads", int, 1), ("copy_mb", int, 1), ("rep_ms", float, None),
                             ("budget_s", float, 0)):  # fmt: skip
        value = getattr(config, field)
        kinds = (int,) if kind is int else (int, float)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)
                                  or not (value > 0 if low is None else value >= low)):  # fmt: skip
            need = f"an int >= {low}" if kind is int else "a number > 0" if low is None else f"a number >= {low}"
            raise ValueError(f"BenchConfig.{field} must be None or {need}, got {value!r}")
    device = pick_device(config.device)
    kind = device.type
    # One thread on CPU unless asked: with more, each of a step's many small ops waits on the other threads, and on a
    # busy machine the medians swing by orders of magnitude (bench --dtensor and host_overhead.py do the same).
    threads = config.threads if config.threads is not None else 1 if kind == "cpu" else None
    if threads is not None:
        torch.set_num_threads(threads)
    # each name once: a name given twice would time its cases twice
    ops, sets, dtypes = (list(dict.fromkeys(x)) for x in (config.ops, config.params, config.dtypes))
    only = None if config.providers is None else list(dict.fromkeys(config.providers))
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
        threads=torch.get_num_threads(),
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
    wants_peers = any(OPS[o].peers for o in ops)
    if wants_peers:
        for name, why in peers.items():
            if why is not None and (only is None or name in only):
                skipped.append({"provider": name, "why": why})

    # The peers go last, after every op's own cases: importing one (and torchao's torch.compile on its first step)
    # can take long, and the fused_ops-vs-torch figures matter most when the time budget runs out.
    plan: list[tuple[str, str, str, list[str]]] = []
    peer_plan: list[tuple[str, str, str, list[str]]] = []
    for op_name in ops:
        op = OPS[op_name]
        why = op.unavailable()
        if why is not None:
            skipped.append({"op": op_name, "why": why})
            continue
        # (an op's own providers that are another library's optimizer, the family's peers, go last too)
        own = [p for p, b in op.providers.items() if getattr(b, "peer_module", None) is None]
        extra = [p for p, b in op.providers.items() if getattr(b, "peer_module", None) is not None]
        extra += [p for p, w in peers.items() if w is None and op.peers and p not in extra]
        if only is not None:
            own = [p for p in own if p in only]
            extra = [p for p in extra if p in only]
        for dtype in dtypes:
            if dtype not in op.dtypes:
                skipped.append({"op": op_name, "dtype": dtype, "why": f"{op_name} runs on {', '.join(op.dtypes)}"})
        cases = [(p, d) for p in sets for d in dtypes if d in op.dtypes]
        plan += [(op_name, p, d, own) for p, d in cases if own]
        peer_plan += [(op_name, p, d, extra) for p, d in cases if extra]
    plan += peer_plan

    busy_at_start = _load_note(torch.get_num_threads()) if kind == "cpu" else None
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
                    doc["param_sets"][params] = {"n_params": numel(shapes), "n_tensors": len(shapes), "note": note}
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
                               "n_params": numel(shapes), "n_tensors": len(shapes), **row}  # fmt: skip
                        results.append(row)
                        handled.add((op_name, params, dtype, provider))
                    finally:
                        # the exception (and its traceback, which holds the builder's tensors) is gone here
                        del runner
                        _free(device, big=numel(shapes) > 20_000_000)
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
    if kind == "cpu" and doc.get("backend") == "triton":
        doc["notes"].append("CPU run with backend triton: fused_ops ran its Triton kernels in the interpreter "
                            "(TRITON_INTERPRET=1), a correctness path, not a performance figure.")  # fmt: skip
    elif kind == "cpu":
        doc["notes"].append("CPU run: no GPU was used; the CPU path is timed against torch's CPU implementations.")
        if any((r.get("frac_of_copy") or 0) > 1 for r in results):
            doc["notes"].append("Some sets fit in the CPU caches, so their GB/s can exceed the (DRAM) copy bandwidth.")
        busy = _load_note(torch.get_num_threads()) or busy_at_start
        if busy:
            doc["notes"].append(busy[0].upper() + busy[1:] + ".")
    return doc


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _add_all_ratios(doc: dict[str, Any]) -> None:
    """``_add_ratios`` for every (op, params, dtype) group of the results so far, then ``doc["targets"]``."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in doc["results"]:
        groups.setdefault((r["op"], r["params"], r["dtype"]), []).append(r)
    for rows in groups.values():
        _add_ratios(rows, doc.get("copy_bandwidth_gbps"))
    doc["targets"] = family_targets(doc["results"])


# Issue 11's targets for 8-bit AdamW (on the GPU): at least as fast as fp32 FusedAdamW, at least 5x the 8-bit peers on
# the 10,000-small-tensor set, and at most 2.1 state bytes per param.
_INT8_PEERS = ("torchao", "bitsandbytes")


def family_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of the optimizer family, from the rows there are: one entry per comparison that both rows exist
    for, with its ``value`` (a speed-up is the other row's median over ours), ``goal`` (``>= x`` or ``<= x``) and
    ``met``. Speed targets are GPU targets: on a CPU run they are computed all the same (``device`` says where)."""
    rows = {(r["op"], r["params"], r["dtype"], r["provider"]): r for r in results}
    out = []

    def add(target: str, params: str, dtype: str, value: float | None, goal: str) -> None:
        if value is None or not math.isfinite(value):
            return
        bound = float(goal.split()[1])
        met = value >= bound if goal.startswith(">=") else value <= bound
        out.append(dict(target=target, params=params, dtype=dtype, value=value, goal=goal, met=met))

    for (op, params, dtype, provider), r in rows.items():
        if op != "adamw8bit" or provider != "fused_ops" or not r["median_ms"] > 0:
            continue
        fp32 = rows.get(("adam", params, dtype, "fused_ops"))
        if fp32 is not None:
            add("8-bit AdamW speed-up over fp32 FusedAdamW", params, dtype, fp32["median_ms"] / r["median_ms"], ">= 1")
        if params == "small-10k":
            for peer in _INT8_PEERS:
                other = rows.get((op, params, dtype, peer))
                if other is not None:
                    add(f"8-bit AdamW speed-up over {peer} AdamW8bit", params, dtype,
                        other["median_ms"] / r["median_ms"], ">= 5")  # fmt: skip
        add("8-bit AdamW state bytes per param", params, dtype, r.get("state_bytes_per_param"), "<= 2.1")
    return out


def _add_ratios(rows: list[dict[str, Any]], copy_gbps: float | None) -> None:
    """Fraction of copy bandwidth, and speed-up over torch-fused (torch-foreach where torch has no fused path)."""
    by_provider = {r["provider"]: r for r in rows}
    base = by_provider.get("torch-fused") or by_provider.get("torch-foreach")
    for r in rows:
        r["frac_of_copy"] = r["gbps"] / copy_gbps if r["gbps"] and copy_gbps else None
        r["speedup_vs_torch_fused"] = base["median_ms"] / r["median_ms"] if base and r["median_ms"] > 0 else None
        r["speedup_baseline"] = base["provider"] if base else None
