"""The optimizer cases beyond Adam (``sgd``, ``lion``, ``adamw8bit``, ``adamw_bf16_sr``) on CPU: each runs through
``bench.run`` on the tiny set with rows and the ``state_bytes_per_param`` field, and that field, measured from the
optimizer's own state tensors, is what each layout holds per parameter. (``test_bench_ops.py`` times every
provider of every registered op; this file checks what the rows say.)"""

from __future__ import annotations

import math

import pytest
import torch

from fused_ops import bench
from fused_ops.bench._registry import state_bytes_per_param
from fused_ops.bench.cases import adam_lowbit, lion

FAMILY = ("sgd", "lion", "adamw8bit", "adamw_bf16_sr")
# block-aligned sizes (multiples of 256), so 8-bit states hold exactly 2 + 2 x 4 / 256 B per element
SHAPES = [(256, 8), (512,), (64, 64)]
N = sum(math.prod(s) for s in SHAPES)
STEP_SLACK = 4 * len(SHAPES) / N  # at most one fp32 step count per tensor (AdamW's; SGD and Lion keep none)


def _need(op: str) -> None:
    why = bench.OPS[op].unavailable()
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("op", FAMILY)
def test_family_op_rows_on_tiny(op):
    _need(op)
    dtypes = bench.OPS[op].dtypes
    config = bench.BenchConfig(ops=(op,), params=("tiny",), dtypes=dtypes, device="cpu", quick=True, rep_ms=1,
                               copy_mb=4, progress=False)  # fmt: skip
    doc = bench.run(config)
    rows = doc["results"]
    assert {(r["dtype"], r["provider"]) for r in rows} >= {(d, "fused_ops") for d in dtypes}, doc["skipped"]
    for r in rows:
        assert r["state_bytes_per_param"] > 0 and r["bytes"] > 0 and r["gbps"] > 0, r
        key = (op, r["layout"])
        if key in bench.BYTES_PER_ELEMENT:
            assert r["bytes"] == round(bench.BYTES_PER_ELEMENT[key] * r["n_params"]), r
    assert all(s.get("why") for s in doc["skipped"])
    table = bench.format_table(doc)
    assert "state B/param" in table and f"{rows[0]['state_bytes_per_param']:.3f}" in table


EXPECTED = [
    # (op, provider, dtype, state bytes per param from the layout, layout)
    ("adamw8bit", "torch-fused", "fp32", 8.0, "fp32"),
    ("adamw8bit", "torch-fused", "bf16", 4.0, "bf16/bf16-states"),
    ("adamw8bit", "fused_ops", "fp32", 2 + 8 / 256, "fp32/int8-states"),
    ("adamw8bit", "fused_ops", "bf16", 2 + 8 / 256, "bf16/int8-states"),
    ("adamw_bf16_sr", "fused_ops", "bf16", 8.0, "bf16/fp32-states"),
    ("adamw_bf16_sr", "fused_ops-bf16-states", "bf16", 4.0, "bf16/bf16-states"),
    ("adamw_bf16_sr", "fused_ops-kahan", "bf16", 6.0, "bf16/bf16-states+kahan"),
    ("adamw_bf16_sr", "torch-fused", "bf16", 4.0, "bf16/bf16-states"),
    ("sgd", "fused_ops", "fp32", 4.0, "fp32"),
    ("sgd", "fused_ops", "bf16", 4.0, "bf16/fp32-states"),  # fp32 momentum buffer for bf16 params
    ("sgd", "torch-foreach", "fp32", 4.0, "fp32"),
    ("sgd", "torch-forloop", "bf16", 2.0, "bf16/bf16-states"),
    ("sgd", "torch-fused", "fp32", 4.0, "fp32"),
    ("lion", "fused_ops", "fp32", 4.0, "fp32"),
    ("lion", "fused_ops", "bf16", 4.0, "bf16/fp32-states"),
    ("lion", "torch-foreach", "fp32", 4.0, "fp32"),
    ("lion", "torch-forloop", "bf16", 2.0, "bf16/bf16-states"),
    ("adam", "fused_ops", "fp32", 8.0, "fp32"),  # the existing ops get the field too (Runner(fn=opt.step))
]


@pytest.mark.parametrize("op,provider,dtype,expected,layout", EXPECTED, ids=[f"{e[0]}-{e[1]}-{e[2]}" for e in EXPECTED])
def test_state_bytes_per_param(op, provider, dtype, expected, layout):
    _need(op)
    try:
        runner = bench.build_runner(op, provider, SHAPES, bench.DTYPES[dtype], torch.device("cpu"))
    except bench.Skip as e:
        pytest.skip(str(e))
    got = runner.state_bytes_per_param
    assert expected <= got <= expected + STEP_SLACK + 1e-12, (got, expected)
    assert runner.layout == layout
    assert runner.bytes == round(bench.BYTES_PER_ELEMENT[(op, layout)] * N)


def test_state_bytes_count_scales_of_small_tensors_and_shared_tensors_once():
    class Opt:  # what state_bytes_per_param reads: .state and .param_groups
        def __init__(self, params, state):
            self.param_groups = [{"params": params}]
            self.state = state

    a, b = torch.zeros(1000), torch.zeros(10)
    qmap = torch.zeros(256)  # shared by both params (bitsandbytes' quantisation map): counted once
    state = {
        a: {"codes": torch.zeros(1000, dtype=torch.uint8), "scale": torch.zeros(4), "qmap": qmap, "step": 3},
        b: {"codes": torch.zeros(10, dtype=torch.uint8), "scale": torch.zeros(1), "qmap": qmap},
    }
    assert state_bytes_per_param(Opt([a, b], state)) == (1000 + 16 + 10 + 4 + 1024) / 1010


def test_state_bytes_unwrap_tensor_subclasses():
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    p = torch.zeros(64)
    inner = two_tensor.TwoTensor(torch.zeros(64), torch.zeros(64))  # a wrapper subclass: its inner tensors count
    opt = type("Opt", (), {"param_groups": [{"params": [p]}], "state": {p: {"m": inner}}})()
    assert state_bytes_per_param(opt) == 8.0


@pytest.mark.parametrize("foreach", [True, False])
def test_torch_lion_baseline_is_lion(foreach):
    _need("lion")
    import fused_ops

    torch.manual_seed(0)
    shapes = [(17, 5), (300,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    opt_a, opt_b = lion.TorchLion(ours, **kw, foreach=foreach), fused_ops.FusedLion(theirs, **kw)
    for _ in range(5):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"])


def test_missing_option_skips_with_a_note(monkeypatch):
    with pytest.raises(bench.Skip, match="no_such_option"):
        adam_lowbit._fused("adamw8bit", "no_such_option")(SHAPES, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(bench.OPS["adamw8bit"], "available", lambda: False)
    doc = bench.run(bench.BenchConfig(ops=("adamw8bit",), params=("tiny",), device="cpu", rep_ms=1, copy_mb=4,
                                      progress=False))  # fmt: skip
    assert doc["results"] == []
    assert doc["skipped"] == [{"op": "adamw8bit", "why": 'fused_ops.FusedAdamW(state_dtype="int8") is not in this '
                                                        "version of fused_ops"}]  # fmt: skip


def test_lion_has_no_torch_fused():
    with pytest.raises(bench.Skip, match="torch.optim has no Lion"):
        bench.build_runner("lion", "torch-fused", SHAPES, torch.float32, torch.device("cpu"))


def test_family_targets_from_rows():
    """Issue 11's targets come out of the rows there are: 8-bit AdamW against fp32 FusedAdamW (>= 1), against each
    8-bit peer on the 10k set (>= 5), and its state bytes (<= 2.1); a comparison without both rows is left out."""
    from fused_ops.bench.suite import family_targets

    def row(op, params, provider, ms, state=None):
        return dict(op=op, params=params, dtype="bf16", provider=provider, median_ms=ms, state_bytes_per_param=state)

    rows = [row("adamw8bit", "small-10k", "fused_ops", 2.0, 2.04), row("adam", "small-10k", "fused_ops", 3.0),
            row("adamw8bit", "small-10k", "torchao", 12.0), row("adamw8bit", "small-10k", "bitsandbytes", 8.0),
            row("adamw8bit", "gpt2-124m", "fused_ops", 5.0, 2.2), row("adam", "gpt2-124m", "fused_ops", 4.0),
            row("adamw8bit", "gpt2-124m", "torchao", 50.0)]  # fmt: skip
    got = {(t["target"], t["params"]): (t["value"], t["goal"], t["met"]) for t in family_targets(rows)}
    assert got == {
        ("8-bit AdamW speed-up over fp32 FusedAdamW", "small-10k"): (1.5, ">= 1", True),
        ("8-bit AdamW speed-up over torchao AdamW8bit", "small-10k"): (6.0, ">= 5", True),
        ("8-bit AdamW speed-up over bitsandbytes AdamW8bit", "small-10k"): (4.0, ">= 5", False),
        ("8-bit AdamW state bytes per param", "small-10k"): (2.04, "<= 2.1", True),
        ("8-bit AdamW speed-up over fp32 FusedAdamW", "gpt2-124m"): (0.8, ">= 1", False),
        ("8-bit AdamW state bytes per param", "gpt2-124m"): (2.2, "<= 2.1", False),
    }
    doc = dict(results=[], targets=family_targets(rows), device="cpu", torch="x", date="d", device_kind="cpu")
    table = bench.format_table(doc)
    assert "over bitsandbytes AdamW8bit, small-10k bf16: 4.000 (goal >= 5): NOT met" in table
    assert "a CPU run" in table
