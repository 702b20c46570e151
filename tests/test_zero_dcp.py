"""ZeroAdamW through torch.distributed.checkpoint (DCP): save on N gloo ranks, load on M, training continues.

Two spawns (tests/test_distributed.py's harness): 4 ranks save checkpoint A (and, from ranks 0-1 in their own
process group, a 2-rank checkpoint B) and run the un-checkpointed continuation; B loads on 4 ranks. Then 2 ranks
load A, into ZeroAdamW and into torch.optim.AdamW (get/set_optimizer_state_dict), and try bad checkpoints: each
raises the same error on every rank and changes nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from fused_ops.distributed import ZeroAdamW
from fused_ops.distributed._dcp import _rows
from tests.safety import assert_unchanged, snapshot
from tests.test_distributed import LR, TINY_BUCKET_MB, Net, flat_params, ref_step, spawn, tensors_equal, zero_step
from tests.test_safety_zero import two_groups, zero_objects

pytestmark = pytest.mark.distributed

CKPT_STEPS, CONTINUE_STEPS = 6, 4
TOL = 1e-6  # fp32: a continuation after a checkpoint against the un-checkpointed run
TORCH_TOL = 1e-5  # torch.optim.AdamW continuing a ZeroAdamW checkpoint (other arithmetic; test_distributed's TOL)
SPAWN_TIMEOUT_S = 180
PG_TIMEOUT_S = 30


# -- worker side ------------------------------------------------------------------------------------------------
def make(stage: int = 2, process_group: Any = None, **kw: Any) -> tuple[Net, ZeroAdamW]:
    """Net in two param groups (amsgrad in the second: max_exp_avg_sq is saved too)."""
    model = Net()
    groups = two_groups(model)
    groups[1]["amsgrad"] = True
    return model, ZeroAdamW(groups, process_group=process_group, stage=stage, lr=LR, **kw)


def train(model: Net, opt: ZeroAdamW, rank: int, world: int, steps: range) -> None:
    for step in steps:
        zero_step(model, opt, rank, world, step)


def dcp_load(model: Net, opt: ZeroAdamW, path: str) -> dict:
    """DCP's load recipe: the dict of the new model and optimizer, filled by dcp.load, then loaded into both."""
    import torch.distributed.checkpoint as dcp

    sd = {"model": model.state_dict(), "optim": opt.dcp_state_dict(names=model)}
    dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd["model"])
    opt.load_dcp_state_dict(sd["optim"], names=model)
    return sd


def max_abs(a: dict, b: dict) -> float:
    """Largest difference between two consolidated state dicts (same structure)."""
    return max(
        (a["state"][i][k].float() - b["state"][i][k].float()).abs().max().item()
        for i in a["state"]
        for k in a["state"][i]
    )


def task_world4(rank: int, world: int, out_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp

    out: dict[str, Any] = {}
    t0 = time.monotonic()
    # A: saved by 4 ranks at CKPT_STEPS, keyed by the params' names (as torch's get_optimizer_state_dict).
    model, opt = make(stage=2, bucket_cap_mb=TINY_BUCKET_MB, align=4)
    train(model, opt, rank, world, range(CKPT_STEPS))
    sd = opt.dcp_state_dict(names=model)
    st = sd["state"]["l1.weight"]["exp_avg"]
    out["layout"] = (type(st).__name__, tuple(st.shape), str(st.placements), tuple(st.to_local().shape))
    dcp.save({"model": model.state_dict(), "optim": sd}, checkpoint_id=os.path.join(out_dir, "A"))
    saved = opt.consolidated_state_dict(to=None)
    if rank == 0:
        torch.save(saved, os.path.join(out_dir, "saved4.pt"))
    train(model, opt, rank, world, range(CKPT_STEPS, CKPT_STEPS + CONTINUE_STEPS))  # the un-checkpointed run
    final = flat_params(model)
    if rank == 0:
        torch.save(final, os.path.join(out_dir, "final4.pt"))

    # 4 -> 4 into another layout (stage 1, default align and bucket size): the same state, bit for bit.
    model2, opt2 = make(stage=1)
    dcp_load(model2, opt2, os.path.join(out_dir, "A"))
    out["4to4_bit_exact"] = tensors_equal(opt2.consolidated_state_dict(to=None), saved)
    train(model2, opt2, rank, world, range(CKPT_STEPS, CKPT_STEPS + CONTINUE_STEPS))
    out["4to4_err"] = (flat_params(model2) - final).abs().max().item()

    # B: saved by ranks 0 and 1 (a ZeroAdamW over their own process group), loaded by the 4 ranks (2 -> 4).
    pair = dist.new_group([0, 1])
    if rank < 2:
        model3, opt3 = make(stage=2, process_group=pair, bucket_cap_mb=TINY_BUCKET_MB, align=4)
        train(model3, opt3, rank, 2, range(CKPT_STEPS))
        dcp.save({"model": model3.state_dict(), "optim": opt3.dcp_state_dict(names=model3)},
                 checkpoint_id=os.path.join(out_dir, "B"), process_group=pair)  # fmt: skip
    dist.barrier()
    model4, opt4 = make(stage=2, bucket_cap_mb=2 * TINY_BUCKET_MB, align=1)
    dcp_load(model4, opt4, os.path.join(out_dir, "B"))
    out["2to4_state_err"] = max_abs(opt4.consolidated_state_dict(to=None), saved)  # 2 vs 4 ranks of reduction
    train(model4, opt4, rank, world, range(CKPT_STEPS, CKPT_STEPS + CONTINUE_STEPS))
    out["2to4_err"] = (flat_params(model4) - final).abs().max().item()
    out["seconds"] = time.monotonic() - t0
    return out


def attempt(label: str, call: Callable[[], Any], objs: tuple, exc: str, *patterns: str) -> dict:
    """Run ``call``, which must raise ``exc`` (DCP's CheckpointException is a BaseException): its error and
    whether ``objs`` stayed bit-identical."""
    before = snapshot(*objs)
    error = None
    try:
        call()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # DCP's CheckpointException derives from BaseException only
        error = (type(e).__name__, str(e))
    try:
        assert_unchanged(before, snapshot(*objs))
        changed = None
    except AssertionError as e:
        changed = str(e)
    return {"label": label, "error": error, "changed": changed, "expect": (exc, patterns)}


def run_errors(rank: int, world: int, out_dir: str) -> list[dict]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    records = []
    path_a = os.path.join(out_dir, "A")
    # Checkpoints with a key missing (every rank saved without it) and with other shapes (Net(out=6)).
    model, opt = make(stage=2, bucket_cap_mb=TINY_BUCKET_MB, align=4)
    train(model, opt, rank, world, range(2))
    sd = opt.dcp_state_dict(names=model)
    del sd["state"]["l2.weight"]["exp_avg_sq"]
    dcp.save(sd, checkpoint_id=os.path.join(out_dir, "missing"))
    other = Net(out=6)
    other_groups = two_groups(other)
    other_groups[1]["amsgrad"] = True
    other_opt = ZeroAdamW(other_groups, lr=LR)
    dcp.save(other_opt.dcp_state_dict(names=other), checkpoint_id=os.path.join(out_dir, "other_shapes"))

    model, opt = make(stage=2, bucket_cap_mb=TINY_BUCKET_MB, align=4)
    train(model, opt, rank, world, range(1))
    objs = zero_objects(opt, model)
    for label, name, patterns in [
        ("a checkpoint without a key", "missing", (r"Missing key", r"state\.l2\.weight\.exp_avg_sq")),
        ("a checkpoint of other shapes", "other_shapes", (r"Size mismatch", r"l2\.weight")),
    ]:

        def load(name: str = name) -> None:
            target = opt.dcp_state_dict(names=model)
            dcp.load(target, checkpoint_id=os.path.join(out_dir, name))
            opt.load_dcp_state_dict(target, names=model)

        records.append(attempt(label, load, objs, "CheckpointException", *patterns))

    # A valid checkpoint, then bad edits of the filled dict on one rank only: every rank raises the same error.
    filled = opt.dcp_state_dict(names=model)
    dcp.load({"optim": filled}, checkpoint_id=path_a)  # A holds the model too: its optimizer part only

    def edited(edit: Callable[[dict], None], on_rank: int) -> Callable[[], None]:
        def call() -> None:
            sd = {"state": {k: dict(v) for k, v in filled["state"].items()}, "param_groups": filled["param_groups"]}
            if rank == on_rank:
                edit(sd)
            opt.load_dcp_state_dict(sd, names=model)

        return call

    def drop(sd: dict) -> None:
        del sd["state"]["l1.bias"]["exp_avg"]

    def reshape(sd: dict) -> None:
        mesh = filled["state"]["l1.weight"]["exp_avg"].device_mesh
        wrong = torch.zeros(2, 7)
        sd["state"]["l1.weight"]["exp_avg"] = DTensor.from_local(
            wrong, mesh, [Shard(0)], shape=(2 * world, 7), stride=(7, 1), run_check=False
        )

    def step(sd: dict) -> None:
        sd["state"]["extra"]["step"] = torch.tensor(99.0)

    def bad_lr(sd: dict) -> None:
        sd["param_groups"] = [dict(g) for g in sd["param_groups"]]
        sd["param_groups"][1]["lr"] = -1.0

    last = world - 1
    for label, edit, on_rank, patterns in [
        ("a state missing on one rank", drop, last, (rf"on rank {last}", r"'exp_avg'", r"param 1", r"l1\.bias")),
        ("a state of another shape on one rank", reshape, 0, (r"on rank 0", r"shape", r"param 0", r"l1\.weight")),
        ("a step count differing on one rank", step, last, (r"differ", r"'step' of param 2", rf"rank {last}")),
        ("a bad lr on one rank", bad_lr, 0, (r"on rank 0", r"learning rate", r"param group 1")),
    ]:
        records.append(attempt(label, edited(edit, on_rank), objs, "ValueError", *patterns))
    records.append(
        attempt(
            "names of the wrong length on one rank",
            lambda: opt.dcp_state_dict(names=["a"] if rank == 0 else model),
            objs,
            "ValueError",
            r"on rank 0",
            r"names has 1 entries",
        )  # fmt: skip
    )
    # After all of it, the valid dict loads (through load_state_dict too: the same DTensors, keyed by index).
    opt.load_dcp_state_dict(filled, names=model)
    good = opt.consolidated_state_dict(to=None)
    by_index = opt.dcp_state_dict()
    dcp.load(by_index, checkpoint_id=os.path.join(out_dir, "A_by_index"))
    opt.load_state_dict(by_index)
    records.append(
        {
            "label": "the valid dict loads after the errors",
            "ok": tensors_equal(good, opt.consolidated_state_dict(to=None)),
        }
    )
    return records


def run_bf16_odd_shapes(rank: int, world: int, out_dir: str) -> bool:
    """bf16 params with fp32 master weights (saved as master_param), a 0-d param (a Replicate() DTensor) and an
    empty one: saved and loaded into another layout, bit for bit."""
    import torch.distributed.checkpoint as dcp

    def build(**kw: Any) -> tuple[list[torch.nn.Parameter], Net, ZeroAdamW]:
        model = Net(dtype=torch.bfloat16)
        extra = [torch.nn.Parameter(torch.tensor(0.5, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(0, 3))]
        params = list(model.parameters()) + extra
        return params, model, ZeroAdamW(params, lr=LR, **kw)

    params, model, opt = build(stage=2, bucket_cap_mb=TINY_BUCKET_MB, align=4)
    train(model, opt, rank, world, range(2))
    path = os.path.join(out_dir, "bf16")
    dcp.save({"params": params, "optim": opt.dcp_state_dict()}, checkpoint_id=path)
    saved = opt.consolidated_state_dict(to=None)
    params2, _, opt2 = build(stage=1, align=16)
    sd = {"params": params2, "optim": opt2.dcp_state_dict()}
    dcp.load(sd, checkpoint_id=path)  # the params first (in place), then the optimizer (masters round to them)
    opt2.load_dcp_state_dict(sd["optim"])
    return "master_param" in saved["state"][0] and tensors_equal(opt2.consolidated_state_dict(to=None), saved)


def task_world2(rank: int, world: int, out_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    out: dict[str, Any] = {}
    t0 = time.monotonic()
    saved = torch.load(os.path.join(out_dir, "saved4.pt"))
    final = torch.load(os.path.join(out_dir, "final4.pt"))
    # 4 -> 2, into another bucket size and stage.
    model, opt = make(stage=1, bucket_cap_mb=3 * TINY_BUCKET_MB, align=8)
    dcp_load(model, opt, os.path.join(out_dir, "A"))
    out["4to2_bit_exact"] = tensors_equal(opt.consolidated_state_dict(to=None), saved)
    # The same state saved again by index (run_errors loads it through load_state_dict).
    dcp.save(opt.dcp_state_dict(), checkpoint_id=os.path.join(out_dir, "A_by_index"))
    train(model, opt, rank, world, range(CKPT_STEPS, CKPT_STEPS + CONTINUE_STEPS))
    out["4to2_err"] = (flat_params(model) - final).abs().max().item()

    # torch.optim.AdamW (on each rank, the whole model) continues the ZeroAdamW checkpoint: names are torch's keys.
    tmodel = Net()
    groups = two_groups(tmodel)
    groups[1]["amsgrad"] = True
    topt = torch.optim.AdamW(groups, lr=LR)
    sd = {"model": tmodel.state_dict(), "optim": get_optimizer_state_dict(tmodel, topt)}
    dcp.load(sd, checkpoint_id=os.path.join(out_dir, "A"))
    tmodel.load_state_dict(sd["model"])
    set_optimizer_state_dict(tmodel, topt, sd["optim"])
    out["torch_state_err"] = max(
        (topt.state[p][k] - saved["state"][i][k]).abs().max().item()
        for i, p in enumerate(p for g in groups for p in g["params"])
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
        if k in saved["state"][i]
    )
    for step in range(CKPT_STEPS, CKPT_STEPS + CONTINUE_STEPS):
        ref_step(tmodel, topt, step)
    out["torch_err"] = (flat_params(tmodel) - final).abs().max().item()
    out["bf16_bit_exact"] = run_bf16_odd_shapes(rank, world, out_dir)
    out["seconds"] = time.monotonic() - t0
    t1 = time.monotonic()
    out["errors"] = run_errors(rank, world, out_dir)
    out["errors_seconds"] = time.monotonic() - t1
    return out


# -- parent side ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("zero_dcp"))


@pytest.fixture(scope="module")
def world4(dcp_dir) -> list[dict]:
    return spawn("tests.test_zero_dcp:task_world4", 4, dcp_dir, timeout=SPAWN_TIMEOUT_S, pg_timeout_s=PG_TIMEOUT_S)


@pytest.fixture(scope="module")
def world2(dcp_dir, world4) -> list[dict]:  # loads the checkpoint world4 saved
    return spawn("tests.test_zero_dcp:task_world2", 2, dcp_dir, timeout=SPAWN_TIMEOUT_S, pg_timeout_s=PG_TIMEOUT_S)


def test_rows_are_dtensor_shard0_chunks():
    """dcp_state_dict's rows are the ones DTensor (and so DCP) gives each rank for Shard(0)."""
    from torch.distributed.tensor import Shard

    for n_rows in (0, 1, 2, 3, 5, 7, 13, 64):
        for world in (1, 2, 3, 4, 8):
            covered = []
            for rank in range(world):
                lo, hi = _rows(n_rows, world, rank)
                size, offset = Shard.local_shard_size_and_offset(n_rows, world, rank)
                assert (hi - lo, lo) == (size, offset) or (size == 0 and lo == hi)
                covered += range(lo, hi)
            assert covered == list(range(n_rows))


def test_state_is_fsdp2_style_dtensors(world4):
    layouts = [r["layout"] for r in world4]
    assert {k[:3] for k in layouts} == {("DTensor", (13, 7), "(Shard(dim=0),)")}
    assert [k[3] for k in layouts] == [(4, 7), (4, 7), (4, 7), (1, 7)]  # torch.chunk's rows of 13


def test_same_world_size_loads_bit_exact_and_continues(world4):
    for r in world4:
        assert r["4to4_bit_exact"]
        assert r["4to4_err"] <= TOL


def test_4_ranks_load_with_2_and_continue(world2):
    for r in world2:
        assert r["4to2_bit_exact"]
        assert r["4to2_err"] <= TOL, r["4to2_err"]


def test_2_ranks_load_with_4_and_continue(world4):
    for r in world4:
        assert r["2to4_state_err"] <= TOL, r["2to4_state_err"]
        assert r["2to4_err"] <= TOL, r["2to4_err"]


def test_bf16_master_weights_0d_and_empty_params(world2):
    assert all(r["bf16_bit_exact"] for r in world2)


def test_torch_adamw_continues_a_zero_checkpoint(world2):
    for r in world2:
        assert r["torch_state_err"] == 0.0
        assert r["torch_err"] <= TORCH_TOL, r["torch_err"]


def test_bad_checkpoints_raise_on_every_rank_and_change_nothing(world2):
    import re

    per_rank = [r["errors"] for r in world2]
    assert all([rec["label"] for rec in recs] == [rec["label"] for rec in per_rank[0]] for recs in per_rank)
    for i, rec0 in enumerate(per_rank[0]):
        if "ok" in rec0:
            assert all(recs[i]["ok"] for recs in per_rank), rec0["label"]
            continue
        exc, patterns = rec0["expect"]
        errors = [recs[i]["error"] for recs in per_rank]
        for rank, (recs, err) in enumerate(zip(per_rank, errors, strict=True)):
            where = f"rank {rank}, {rec0['label']}"
            assert err is not None, f"{where}: no exception"
            assert err[0] == exc, f"{where}: {err}"
            for p in patterns:
                assert re.search(p, err[1]), f"{where}: the message does not match {p!r}: {err[1][:2000]}"
            assert recs[i]["changed"] is None, f"{where}: {recs[i]['changed']}"
        if exc == "ValueError":
            assert all(e == errors[0] for e in errors), f"{rec0['label']}: the ranks raised different errors"


def test_torch_adamw_dcp_checkpoint_loads_into_zero_adamw(tmp_path):
    """(probe 51) A torch.optim.AdamW checkpoint saved through DCP loads into ZeroAdamW through its
    ``dcp_state_dict(names=model)`` template: the template has no group key the torch checkpoint lacks (``backend``
    is left out at its default), and training continues as torch's does."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(f"""
        import torch, torch.nn as nn, torch.distributed as dist, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from fused_ops.distributed import ZeroAdamW
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        def mk():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        def run(m, o, ks):
            for k in ks:
                x = torch.randn(4, 8, generator=torch.Generator().manual_seed(k))
                m(x).pow(2).mean().backward(); o.step(); o.zero_grad()
        m = mk(); o = torch.optim.AdamW(m.parameters(), lr=1e-2)
        run(m, o, [0, 1])
        msd, osd = get_state_dict(m, o)
        dcp.save({{"model": msd, "optim": osd}}, checkpoint_id={str(tmp_path / "ckpt")!r})
        run(m, o, [2, 3])
        m2 = mk(); z = ZeroAdamW(m2.parameters(), stage=2, lr=1e-2)
        sd = {{"model": m2.state_dict(), "optim": z.dcp_state_dict(names=m2)}}
        assert "backend" not in sd["optim"]["param_groups"][0]
        dcp.load(sd, checkpoint_id={str(tmp_path / "ckpt")!r})
        m2.load_state_dict(sd["model"]); z.load_dcp_state_dict(sd["optim"], names=m2)
        run(m2, z, [2, 3])
        print(max((a - b).abs().max().item() for a, b in zip(m.parameters(), m2.parameters())))
        dist.destroy_process_group()
        """)
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.strip().splitlines()[-1]) <= TORCH_TOL
