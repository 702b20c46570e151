"""What the bench's rows say, beyond the op cases themselves: state bytes where the states live outside
``opt.state`` (ZeRO) or behind a closure (torch's master-weight sequence), the bytes that rows of one op are counted
by, the CUDA timer's order of reset and L2 flush and the peak memory it reports (both with recorders in place of
the CUDA calls), torch's thread count during a CPU run, duplicate names and cells without a baseline. CPU, small."""

from __future__ import annotations

import math
import types

import pytest
import torch

from fused_ops import bench
from fused_ops.bench import suite, timing
from fused_ops.bench._registry import Runner, state_bytes_per_param

SHAPES = [(256, 8), (512,), (64, 64), (100,)]
N = sum(math.prod(s) for s in SHAPES)
STEP_SLACK = 4 * len(SHAPES) / N  # one fp32 step count per tensor at most
CPU = torch.device("cpu")


def _need(op: str) -> None:
    why = bench.OPS[op].unavailable()
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("dtype, ours, theirs", [("fp32", 8, 8), ("bf16", 12, 4)])
def test_zero_rows_report_their_state_bytes(dtype, ours, theirs):
    """ZeroAdamW keeps its states in flat shards and torch's ZeroRedundancyOptimizer in its inner optimizer: both
    left ``opt.state`` empty, and the rows said 0.000 B/param. Ours: master + moments + steps of memory_report()
    (fp32: the param shard is the master, 8; bf16: an fp32 master too, 12); torch's: its inner AdamW's states
    (bf16 moments on bf16 params: 4)."""
    _need("zero")
    try:
        mine = bench.build_runner("zero", "fused_ops", SHAPES, bench.DTYPES[dtype], CPU)
        report = mine.fn.__self__.memory_report()
        torch_zero = bench.build_runner("zero", "torch-foreach", SHAPES, bench.DTYPES[dtype], CPU)
    finally:
        bench.release_process_group()
    assert mine.state_bytes_per_param == (report["master"] + report["states"]) / N
    assert ours <= mine.state_bytes_per_param <= ours + STEP_SLACK
    assert torch_zero.state_bytes_per_param == state_bytes_per_param(torch_zero.fn.__self__.optim)
    assert theirs <= torch_zero.state_bytes_per_param <= theirs + STEP_SLACK


def test_no_state_tensors_is_not_zero_bytes():
    """An optimizer whose ``opt.state`` holds no tensor is not measured (None, shown n/a), not 0.0 B/param."""
    p = torch.nn.Parameter(torch.zeros(8))
    opt = types.SimpleNamespace(param_groups=[{"params": [p]}], state={}, step=lambda: None)
    assert state_bytes_per_param(opt) is None
    opt.state = {p: {"step": 3}}  # numbers only
    assert state_bytes_per_param(opt) is None
    assert Runner(fn=opt.step, reset=None, bytes=8, layout="fp32").state_bytes_per_param is None
    opt.state = {p: {"m": torch.zeros(8)}}
    assert state_bytes_per_param(opt) == 4.0


def test_master_weight_torch_rows_count_the_same_work_and_their_state():
    """torch's unfused master-weight rows: counted at the op's 28 B like ours (their own 40 B made their GB/s 1.43x
    too high next to ours), and their state bytes given: fp32 masters, their fp32 grads, moments and steps (16),
    against ours (master + moments + steps: 12)."""
    _need("adamw_master")
    ours = bench.build_runner("adamw_master", "fused_ops", SHAPES, torch.bfloat16, CPU)
    assert ours.bytes == 28 * N and 12 <= ours.state_bytes_per_param <= 12 + STEP_SLACK
    for provider in ("torch-forloop", "torch-foreach"):
        theirs = bench.build_runner("adamw_master", provider, SHAPES, torch.bfloat16, CPU)
        assert theirs.layout == "bf16/unfused" and theirs.bytes == ours.bytes
        assert 16 <= theirs.state_bytes_per_param <= 16 + STEP_SLACK


class _CudaRecorder:
    """Stands in for the ``torch`` of ``timing.py`` in ``time_cuda``: events, synchronize and the flush buffer
    record what they are asked to do, in order."""

    def __init__(self, log: list[str]) -> None:
        class Event:
            def __init__(self, enable_timing: bool = True) -> None:
                pass

            def record(self) -> None:
                log.append("record")

            def elapsed_time(self, other) -> float:
                return 1.0

        class Flush:
            def zero_(self) -> None:
                log.append("flush")

        self.int8 = torch.int8
        self.empty = lambda *args, **kwargs: Flush()
        self.cuda = types.SimpleNamespace(Event=Event, synchronize=lambda: None)


def test_time_cuda_flushes_l2_after_the_reset(monkeypatch):
    """Each timed repeat with a reset is: reset, L2 flush, start event, call, end event. A flush before the reset
    left the reset's freshly written inputs in L2 for the timed call (``unscale`` timed cache-hot)."""
    log: list[str] = []
    monkeypatch.setattr(timing, "torch", _CudaRecorder(log))
    timing.time_cuda(lambda: log.append("fn"), lambda: log.append("reset"), warmup_ms=0.0, rep_ms=3.0)
    first = log.index("flush") - 1  # the estimate and warm-up calls come first, without a flush
    # 3 repeats: rep_ms over 1 ms per call (the recorder's elapsed time)
    assert log[first:] == ["reset", "flush", "record", "fn", "record"] * 3


def test_peak_memory_leaves_out_the_timers_flush_buffer(monkeypatch):
    """peak_mem_gb is the case's (build, state, warm-up calls): read before the timer allocates its 256 MiB L2
    flush buffer (do_bench's and time_cuda's), which is not the case's memory."""
    allocated = {"peak": 3 * 10**9}

    def fake_time_cuda(fn, reset, warmup_ms, rep_ms):
        allocated["peak"] += 256 * 2**20  # the flush buffer
        fn()
        return 1.0, 0.9, 1.1

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    monkeypatch.setattr(suite, "time_cuda", fake_time_cuda)
    monkeypatch.setattr(suite, "host_time_cuda", lambda fn, reset: 0.1)
    monkeypatch.setattr(suite, "count_launches_cuda", lambda fn, reset: 1)
    calls = []
    row = suite.measure(Runner(fn=lambda: calls.append(1), reset=None, bytes=10**9, layout="fp32"),
                        torch.device("cuda"), rep_ms=1.0, warmup_ms=0.0)  # fmt: skip
    assert row["peak_mem_gb"] == 3.0 and row["median_ms"] == 1.0 and len(calls) == 3  # 2 warm-up calls + timing


def _tiny(**kw) -> bench.BenchConfig:
    base = dict(ops=["flatten"], params=["tiny"], dtypes=["fp32"], providers=["torch-foreach"], device="cpu",
                quick=True, rep_ms=1, copy_mb=1, progress=False)  # fmt: skip
    return bench.BenchConfig(**{**base, **kw})


def test_cpu_run_takes_one_thread_unless_asked_and_notes_a_busy_machine(monkeypatch):
    """On CPU, more threads made a step's many small ops wait on each other (98 ms against 0.06 ms on a busy
    machine): a CPU run takes one unless ``threads`` says otherwise, records it, and leaves torch as it was; a
    load average above the core count is noted (the p20-p80 spread of one run does not show it)."""
    import os

    threads = [3]
    seen = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), threads.__setitem__(0, n)))
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    doc = bench.run(_tiny())
    assert doc["threads"] == 1 and seen == [1, 3] and threads == [3]
    assert doc["device"].endswith("(1 thread)") and "(1 thread)" in bench.format_table(doc)
    assert any(n.startswith("Load average 99.0 on ") and "contended" in n for n in doc["notes"]), doc["notes"]
    seen.clear()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    doc = bench.run(_tiny(threads=2))
    assert doc["threads"] == 2 and seen == [2, 3] and not any("Load average" in n for n in doc["notes"])


def test_duplicate_names_run_once():
    doc = bench.run(_tiny(ops=["flatten", "flatten"], params=["tiny", "tiny"], dtypes=["fp32", "fp32"],
                          providers=["torch-foreach", "torch-foreach"]))  # fmt: skip
    assert [(r["op"], r["params"], r["dtype"], r["provider"]) for r in doc["results"]] == [
        ("flatten", "tiny", "fp32", "torch-foreach")
    ]


def test_a_row_without_baseline_says_na_not_na_x(tmp_path):
    row = {"op": "flatten", "params": "tiny", "dtype": "fp32", "provider": "fused_ops", "median_ms": 1.0,
           "p20_ms": 0.9, "p80_ms": 1.1, "bytes": 16_250, "gbps": 0.01625, "frac_of_copy": None,
           "speedup_vs_torch_fused": None, "speedup_baseline": None, "host_ms": None, "launches": None,
           "n_params": 1000, "n_tensors": 8}  # fmt: skip
    doc = {"device": "GPU", "device_kind": "cuda", "torch": "x", "triton": "y", "date": "2026-01-01T00:00:00",
           "copy_bandwidth_gbps": 1.0, "results": [row, {**row, "provider": "other", "speedup_vs_torch_fused": 2.0,
           "speedup_baseline": "torch-foreach"}], "skipped": []}  # fmt: skip
    table = bench.format_table(doc)
    assert "n/ax" not in table and "2.00x (foreach)" in table
    assert " 16.25 " in table  # B/elem of a count that is not whole (8-bit scales, several layouts)
    text = bench.render_performance((str(tmp_path / "r.json"), doc), str(tmp_path))
    assert "n/ax" not in text and "| n/a |" in text and "2.00x (vs foreach)" in text


def test_the_readme_section_says_a_run_was_partial_and_keeps_targets_notes_and_bytes_per_element(tmp_path):
    """``python -m fused_ops report`` made the README section of a run cut short (a budget, a kill: what
    gpu_check.sh's timeouts can leave) without a word, and dropped its targets, notes and bytes per element, without
    which an int8 row's GB/s cannot be set against an fp32 one (probe 86)."""
    row = {"op": "adamw8bit", "params": "tiny", "dtype": "fp32", "provider": "fused_ops", "median_ms": 1.0,
           "p20_ms": 0.9, "p80_ms": 1.1, "bytes": 16_250, "gbps": 0.01625, "frac_of_copy": None,
           "speedup_vs_torch_fused": None, "speedup_baseline": None, "host_ms": None, "launches": None,
           "n_params": 1000, "n_tensors": 8}  # fmt: skip
    target = {"target": "8-bit AdamW state bytes per param", "params": "small-10k", "dtype": "fp32", "value": 2.05,
              "goal": "<= 2.1", "met": True}  # fmt: skip
    doc = {"device": "GPU", "device_kind": "cuda", "torch": "x", "triton": "y", "date": "2026-01-01T00:00:00",
           "copy_bandwidth_gbps": 1.0, "results": [row], "skipped": [], "targets": [target],
           "notes": ["a note of the run"], "stopped": "time budget of 55 s reached"}  # fmt: skip
    text = bench.render_performance((str(tmp_path / "r.json"), doc), str(tmp_path))
    assert "partial run" in text and "time budget of 55 s reached" in text
    assert "| B/elem |" in text and "| 16.25 |" in text
    assert "8-bit AdamW state bytes per param, small-10k fp32: 2.050 (goal <= 2.1): met" in text
    assert "Note: a note of the run" in text
    whole = bench.render_performance((str(tmp_path / "r.json"), {**doc, "stopped": None}), str(tmp_path))
    assert "partial run" not in whole


def test_a_cpu_run_of_the_triton_backend_is_not_called_the_cpu_path(monkeypatch):
    """With ``FUSED_OPS_BACKEND=triton`` on a CPU (the interpreter), the notes called its timings the CPU path."""
    import io

    monkeypatch.setenv("FUSED_OPS_BACKEND", "triton")
    cfg = bench.BenchConfig(ops=["sgd"], params=["tiny"], dtypes=["fp32"], providers=["torch-fused"], quick=True,
                            rep_ms=1, copy_mb=1, progress=False, device="cpu")  # fmt: skip
    doc = bench.run(cfg, log=io.StringIO())
    assert doc["backend"] == "triton"
    assert any("interpreter" in n for n in doc["notes"]) and not any("the CPU path" in n for n in doc["notes"])
