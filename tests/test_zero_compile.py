"""ZeroAdamW under ``torch.compile``: its step runs eagerly behind a graph break (``torch.compiler.disable``).

A compiled ZeroAdamW step traced its update into an Inductor graph whose views of the shards came out empty on one
rank (``adam_launch: grads[0] has 44 elements, params[0] 0``), after the ranks had agreed: the other rank waited in
the all-gather until the process group timed out, and the ranks ended with different params (probe 48). The step
is collectives, agreement and launches on flat shards, nothing a graph could fuse: ``torch.compile(opt.step)`` and a
compiled training step that calls ``opt.step()`` now run it eagerly, bit for bit as the eager step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fused_ops.distributed import ZeroAdamW
from tests.test_distributed import spawn

pytestmark = pytest.mark.distributed

SHAPES = [(), (3, 5), (300,)]


def _run(rank: int, stage: int, compiled: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    opt = ZeroAdamW(params, lr=1e-2, weight_decay=0.1, stage=stage, backend="reference",
                    master_weights=dtype != torch.float32)  # fmt: skip
    step = torch.compile(opt.step) if compiled else opt.step
    for s in range(3):
        opt.zero_grad()
        g = torch.Generator().manual_seed(100 * rank + s)
        sum((p * torch.randn(p.shape, generator=g).to(p.dtype)).sum() for p in params).backward()
        step()
    return [p.detach().clone() for p in params]


def _two_ranks(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    torch._dynamo.reset()
    results = {}
    for stage in (1, 2):
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{stage}/{dtype}"
            results[key] = {"eager": _run(rank, stage, False, dtype), "compiled": _run(rank, stage, True, dtype)}
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn("tests.test_zero_compile:_two_ranks", 2, str(tmp_path_factory.mktemp("zcompile")), timeout=300,
                 pg_timeout_s=30)  # fmt: skip


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_is_the_eager_step_on_every_rank(two_ranks, stage, dtype):
    key = f"{stage}/{dtype}"
    for rank, res in enumerate(two_ranks):
        for i, (a, b) in enumerate(zip(res[key]["eager"], res[key]["compiled"], strict=True)):
            assert torch.equal(a, b), f"rank {rank} param {i}"
        for a, b in zip(res[key]["compiled"], two_ranks[0][key]["compiled"], strict=True):
            assert torch.equal(a, b), f"rank {rank} differs from rank 0"
