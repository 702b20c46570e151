"""pytest-benchmark tests: every registered op x provider of ``fused_ops.bench``, small enough for a CPU.

    pytest benchmarks/ --benchmark-only                                  # time them (CPU; CUDA too when present)
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group       # one table per op and dtype
    FUSED_OPS_BENCH_PARAMS=gpt2-124m pytest benchmarks/ --benchmark-only # another parameter set

Same cases, inputs and providers as ``python -m fused_ops bench`` (which adds bytes moved, GB/s, the copy
bandwidth and the JSON/plot); an op that fused_ops does not have yet is skipped with the reason. In a plain
``pytest benchmarks/`` run each case runs as a test (a few rounds), so the suite also checks that every provider
builds and runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_ops import bench

PARAMS = os.environ.get("FUSED_OPS_BENCH_PARAMS", "tiny")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]
CASES = [
    pytest.param(op.name, provider, dtype, id=f"{op.name}-{dtype}-{provider}")
    for op in bench.OPS.values()
    for dtype in bench.DEFAULT_DTYPES
    for provider in op.providers
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,provider,dtype", CASES)
def test_bench(benchmark, op: str, provider: str, dtype: str, device: str) -> None:
    why = bench.OPS[op].unavailable()
    if why is not None:
        pytest.skip(why)
    if dtype not in bench.OPS[op].dtypes:
        pytest.skip(f"{op} runs on {', '.join(bench.OPS[op].dtypes)}")
    dev = bench.pick_device(device)
    shapes, _ = bench.PARAM_SETS[PARAMS].shapes(True, dev.type)
    try:
        runner = bench.build_runner(op, provider, shapes, bench.DTYPES[dtype], dev)
    except bench.Skip as e:
        pytest.skip(str(e))
    fn, setup = runner.fn, runner.reset
    if dev.type == "cuda":  # time the work, not the launch: nothing queued before the timer starts, all done after

        def fn() -> None:
            runner.fn()
            torch.cuda.synchronize()

        def setup() -> None:  # pedantic reads a non-None return as (args, kwargs): return nothing
            if runner.reset is not None:
                runner.reset()
            torch.cuda.synchronize()

    benchmark.group = f"{op}-{dtype}-{PARAMS}-{device}"
    benchmark.extra_info.update(bytes=runner.bytes, layout=runner.layout, n_params=sum(map(_numel, shapes)))
    try:
        benchmark.pedantic(fn, setup=setup, rounds=10, warmup_rounds=1)
    finally:
        bench.release_process_group()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
