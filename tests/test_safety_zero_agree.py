"""Safety tier for ZeroAdamW, continued: inputs that passed the ranks' agreement and then failed on some ranks only
(inside the fused op, a copy or a collective), or were silently taken. Each must now raise the same named error on
every rank, from the checks the ranks agree on, before anything changes (params, grads, shards, step counts,
scaler, ``last_grad_norm``), with no rank left waiting in a collective; a valid step works afterwards.

- a tensor ``lr`` (or ``loss_scale``, a scaler's ``scale`` or ``found_inf``) that shares memory with the params,
  shards or counters the step writes (a view of a param: the fused op refused it on the rank owning that param's
  shard only, after the ranks agreed, and the other ranks waited in the all-gather);
- ``backend="triton"`` on CPU without the Triton interpreter (refused by the fused op after the ranks agreed);
- a grad that is a tensor subclass without memory of its own (a DTensor on a plain param: the copy into the staging
  buffer raised on that rank, the others waited in the reduce-scatter);
- DTensor params and meta params given to the constructor (a raw error in the layout, or a rank waiting in the
  broadcast);
- a grad of another dtype than its param (silently cast; torch.optim.AdamW and FusedAdamW refuse it).

Same harness as tests/test_safety_zero.py: one spawn of 2 gloo ranks runs every case; ``ZERO_SAFETY_CASES`` selects
cases by name.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from fused_ops.distributed import ZeroAdamW
from tests.test_distributed import LR, TINY_BUCKET_MB, Net, spawn
from tests.test_safety_zero import (
    PG_TIMEOUT_S,
    SPAWN_DEADLINE_S,
    assert_case,
    attempt,
    recovers,
    run_cases,
    trained,
    two_groups,
    zero_objects,
)

pytestmark = [pytest.mark.safety, pytest.mark.distributed]

WHERE = ("one rank", "every rank")


def _positive_element(p: torch.Tensor) -> int:
    """The index of the first element of ``p`` > 0 (the same on every rank: ranks hold rank 0's params)."""
    return int((p.detach().reshape(-1) > 0).nonzero()[0])


def _view_of(p: torch.Tensor) -> torch.Tensor:
    """A 1-element view of ``p``'s memory holding a positive value (a valid lr or loss scale)."""
    k = _positive_element(p)
    return p.detach().reshape(-1)[k : k + 1]


def _mine(where: str, rank: int, bad: int, alias: torch.Tensor) -> torch.Tensor:
    """``alias`` on the bad rank (or every rank); elsewhere a tensor of its own with the same value (so that the
    values the ranks compare agree)."""
    return alias if where == "every rank" or rank == bad else alias.clone()


def _scaler(scale: torch.Tensor, found_inf: torch.Tensor) -> types.SimpleNamespace:
    return types.SimpleNamespace(scale=scale, found_inf=found_inf)


def case_lr_shares_memory(rank: int, world: int) -> list[dict]:
    """A tensor lr that is a view of one of the optimizer's own params (of group 0 and of group 1, so that each
    rank owns one of them), a tensor loss_scale that is one, a scaler whose found_inf is one, a found_inf that is
    the group's lr, an lr that is ``skipped_steps``: the same ValueError on every rank, naming the value, before
    anything changes; on one rank only and on every rank, stage 1 and 2, both backends."""
    bad = world - 1
    out = []
    for backend in ("reference", "triton"):
        for stage in (1, 2):
            model, opt = trained(stage, rank, world, backend=backend)
            tag = f"{backend}, stage {stage}"
            for where in WHERE:
                extra = [rf"rank {bad}\b"] if where == "one rank" else []
                for gi, p in ((0, model.l1.weight), (1, model.l2.bias)):
                    lr = _mine(where, rank, bad, _view_of(p))
                    saved = opt.param_groups[gi]["lr"]
                    opt.param_groups[gi]["lr"] = lr
                    out.append(attempt(f"{tag}: lr of group {gi} a view of a param on {where}", opt.step,
                                       zero_objects(opt, lr), "ValueError", rf"lr of param group {gi}\b",
                                       r"shares memory", r"params", *extra))  # fmt: skip
                    opt.param_groups[gi]["lr"] = saved
                scale = _mine(where, rank, bad, _view_of(model.l1.bias))
                out.append(attempt(f"{tag}: loss_scale a view of a param on {where}",
                                   lambda s=scale, opt=opt: opt.step(loss_scale=s), zero_objects(opt, scale),
                                   "ValueError", r"loss_scale\b", r"shares memory", *extra))  # fmt: skip
                flag = model.extra.detach()[0:1] if where == "every rank" or rank == bad else torch.zeros(1)
                sc = _scaler(torch.ones(1), flag)
                out.append(attempt(f"{tag}: the scaler's found_inf a view of a param on {where}",
                                   lambda sc=sc, opt=opt: opt.step(loss_scale=sc), zero_objects(opt, sc),
                                   "ValueError", r"found_inf", r"shares memory", *extra))  # fmt: skip
            flag = torch.zeros(1)
            sc = _scaler(torch.ones(1), flag)
            saved = opt.param_groups[1]["lr"]
            opt.param_groups[1]["lr"] = flag if rank == bad else flag.clone()
            out.append(attempt(f"{tag}: the scaler's found_inf is the lr of group 1 on one rank",
                               lambda sc=sc, opt=opt: opt.step(loss_scale=sc), zero_objects(opt, sc),
                               "ValueError", r"found_inf", r"lr of param group 1\b", rf"rank {bad}\b"))  # fmt: skip
            opt.param_groups[1]["lr"] = opt.skipped_steps
            step = lambda opt=opt: opt.step(loss_scale=2.0)  # noqa: E731
            out.append(attempt(f"{tag}: lr of group 1 is skipped_steps", step, zero_objects(opt), "ValueError",
                               r"lr of param group 1\b", r"skipped_steps"))  # fmt: skip
            opt.param_groups[1]["lr"] = saved
            out.append(recovers(model, opt, rank, world, f"{tag}: a valid step afterwards"))
    return out


@contextmanager
def _interpreter_off(on: bool) -> Iterator[None]:
    """``TRITON_INTERPRET=0`` inside (read at each call by fused_ops._backend) when ``on``."""
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def case_backend_unavailable(rank: int, world: int) -> list[dict]:
    """backend='triton' on CPU tensors without the Triton interpreter (on one rank, or every rank): the constructor
    and step() raise FusedAdamW's RuntimeError, naming the backend and the group, on every rank, with nothing
    changed (the constructor leaves the model's params untouched). (The params are CPU tensors on any machine.)"""
    bad = world - 1
    out = []
    patterns = (r"backend='triton'", r"TRITON_INTERPRET")
    for where in WHERE:
        extra = [rf"rank {bad}\b"] if where == "one rank" else []
        model = Net()
        params = list(model.parameters())
        with _interpreter_off(where == "every rank" or rank == bad):
            make = lambda params=params: ZeroAdamW(
                params, stage=2, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4, backend="triton"
            )
            out.append(attempt(f"constructor on {where}", make, (params,), "RuntimeError", *patterns,
                               r"param group 0\b", *extra))  # fmt: skip
    for stage in (1, 2):
        model, opt = trained(stage, rank, world, backend="triton")
        for where in WHERE:
            extra = [rf"rank {bad}\b"] if where == "one rank" else []
            with _interpreter_off(where == "every rank" or rank == bad):
                out.append(attempt(f"stage {stage}: step on {where}", opt.step, zero_objects(opt), "RuntimeError",
                                   *patterns, r"backend of param group 0\b", *extra))  # fmt: skip
        out.append(recovers(model, opt, rank, world, f"stage {stage}: a valid step afterwards (triton)"))
        model, opt = trained(stage, rank, world, backend="reference")
        opt.param_groups[1]["backend"] = "triton"  # (set after construction, on every rank)
        with _interpreter_off(rank == bad):
            out.append(attempt(f"stage {stage}: group 1 set to 'triton', step on one rank", opt.step,
                               zero_objects(opt), "RuntimeError", *patterns, r"backend of param group 1\b",
                               rf"rank {bad}\b"))  # fmt: skip
        out.append(recovers(model, opt, rank, world, f"stage {stage}: a valid step afterwards (group 1 on triton)"))
    return out


def _mesh(world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _replicated(t: torch.Tensor, mesh: Any) -> torch.Tensor:
    """A DTensor holding ``t`` on every rank (no collective: run_check=False)."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t, mesh, [Replicate()], run_check=False)


def _grads_by_hand(model: Net) -> None:
    for i, p in enumerate(model.parameters()):  # (stage 2 reduces grads set by hand in step())
        p.grad = torch.full_like(p, 0.01 * (i + 1))


def case_subclass_grad(rank: int, world: int) -> list[dict]:
    """A DTensor grad on a plain param (no memory of its own), on one rank or every rank: grads set by hand in
    stage 1 and 2, and in stage 2 after a backward (reduced late, in step()): the same TypeError on every rank,
    naming the param, with nothing changed, p.grad included."""
    bad = world - 1
    mesh = _mesh(world)
    out = []
    for stage in (1, 2):
        for by_hand in (True, False):
            if stage == 1 and not by_hand:
                continue
            for where in WHERE:
                extra = [rf"rank {bad}\b"] if where == "one rank" else []
                model, opt = trained(stage, rank, world, backward=not by_hand)
                if by_hand:
                    _grads_by_hand(model)
                if where == "every rank" or rank == bad:
                    model.l2.bias.grad = _replicated(torch.ones_like(model.l2.bias), mesh)
                how = "grads set by hand" if by_hand else "after a backward"
                out.append(attempt(f"stage {stage}, {how}: a DTensor grad on {where}", opt.step, zero_objects(opt),
                                   "TypeError", r"param 4\b", r"DTensor", *extra))  # fmt: skip
                out.append(recovers(model, opt, rank, world, f"stage {stage}, {how}, {where}: a valid step after"))
    return out


def case_grad_dtype(rank: int, world: int) -> list[dict]:
    """A grad of another dtype than its param (``p.grad.data = ...``, which torch allows): float64 and bf16 grads
    of fp32 params, an fp32 grad of a bf16 param; on one rank or every rank, stage 1 and 2. The same TypeError on
    every rank (FusedAdamW's message), nothing changed."""
    bad = world - 1
    out = []
    for stage in (1, 2):
        for param_dtype, grad_dtype in ((torch.float32, torch.float64), (torch.float32, torch.bfloat16),
                                        (torch.bfloat16, torch.float32)):  # fmt: skip
            for where in WHERE:
                extra = [rf"rank {bad}\b"] if where == "one rank" else []
                model = Net(dtype=param_dtype)
                opt = ZeroAdamW(two_groups(model), stage=stage, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4)
                _grads_by_hand(model)
                if where == "every rank" or rank == bad:
                    g = model.l2.weight.grad
                    g.data = g.data.to(grad_dtype)
                label = f"stage {stage}: a {grad_dtype} grad of a {param_dtype} param on {where}"
                out.append(attempt(label, opt.step, zero_objects(opt), "TypeError", r"param 3\b",
                                   rf"grad .* is {grad_dtype} but the param is {param_dtype}", *extra))  # fmt: skip
                out.append(recovers(model, opt, rank, world, f"{label}: a valid step afterwards"))
    return out


def case_param_without_memory(rank: int, world: int) -> list[dict]:
    """A DTensor param, meta params (all of them, or one): on one rank or every rank (same shapes and dtypes, so
    the compared signatures agree). The same TypeError on every rank, naming the param, before any param is touched
    (nothing re-pointed into a flat buffer, no broadcast)."""
    bad = world - 1
    mesh = _mesh(world)
    out = []
    variants: list[tuple[str, Callable[[list], list], str, str]] = [
        ("a DTensor param", lambda ps: ps[:1] + [torch.nn.Parameter(_replicated(ps[1].detach().clone(), mesh))]
         + ps[2:], r"param 1\b", r"DTensor"),
        ("meta params", lambda ps: [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in ps],
         r"param 0\b", r"meta"),
        ("one meta param", lambda ps: ps[:3] + [torch.nn.Parameter(torch.empty_like(ps[3], device="meta"))] + ps[4:],
         r"param 3\b", r"meta"),
    ]  # fmt: skip
    for label, change, index, kind in variants:
        for where in WHERE:
            extra = [rf"rank {bad}\b"] if where == "one rank" else []
            model = Net()
            params = list(model.parameters())
            mine = change(params) if where == "every rank" or rank == bad else params
            make = lambda mine=mine: ZeroAdamW(mine, stage=2, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4)
            out.append(attempt(f"{label} on {where}", make, (mine, params), "TypeError", index, kind, *extra))
    return out


CASES: dict[str, Callable[[int, int], list[dict]]] = {
    "lr_shares_memory": case_lr_shares_memory,
    "backend_unavailable": case_backend_unavailable,
    "subclass_grad": case_subclass_grad,
    "grad_dtype": case_grad_dtype,
    "param_without_memory": case_param_without_memory,
}


def task(rank: int, world: int, out_dir: str) -> dict:
    only = [c for c in os.environ.get("ZERO_SAFETY_CASES", "").split(",") if c]
    return run_cases({name: fn for name, fn in CASES.items() if not only or name in only}, rank, world)


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("zero_safety_agree"))
    return spawn("tests.test_safety_zero_agree:task", 2, out_dir, timeout=SPAWN_DEADLINE_S, pg_timeout_s=PG_TIMEOUT_S)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks(ranks2, name):
    assert_case(ranks2, name)
