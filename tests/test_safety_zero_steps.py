"""Safety tier for ZeroAdamW, part 2: what changes between construction and step on some or all ranks.

Params re-pointed, resized, cast or transposed after backward (checked at every step against their bucket, on both
backends); param_groups edited after construction; rank-local zero_grad / backward / param-group differences that
would change the number of collectives; a refused GradScaler; duplicate params; params unfrozen after
construction. Each raises the same clear error on every rank with nothing changed (or, for unfreezing, works).
One spawn of 2 gloo ranks runs every case (tests/test_safety_zero.py's records and assertions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fused_ops.distributed import ZeroAdamW
from tests.test_distributed import LR, TINY_BUCKET_MB, Net, flat_params, local_loss, spawn
from tests.test_safety_zero import (
    PG_TIMEOUT_S,
    assert_case,
    attempt,
    check,
    make,
    recovers,
    run_cases,
    same_on_all_ranks,
    trained,
    zero_objects,
)

pytestmark = [pytest.mark.safety, pytest.mark.distributed]

SPAWN_DEADLINE_S = 200


def shards_only(opt: ZeroAdamW) -> tuple:
    """What a step may change, without the flat params (whose storage a case frees)."""
    shards = [{"master": b.master, "exp_avg": b.exp_avg, "exp_avg_sq": b.exp_avg_sq, "grad": b.grad}
              for b in opt._buckets]  # fmt: skip
    return (shards, opt._steps, opt.last_grad_norm)


def case_moved_after_backward(rank: int, world: int) -> list[dict]:
    """After backward (stage 2: grads already reduced), on one rank: a param's storage freed (a SIGSEGV in the Triton
    kernel before), its .data cloned, the model cast to bf16, or a param re-pointed at a transposed view of its own
    memory (same address and shape); and the transposed view on every rank (wrong elements updated before). step()
    raises the same RuntimeError on every rank, naming the param, with nothing changed."""
    bad = world - 1
    out = []
    for backend in ("reference", "triton"):
        model, opt = trained(2, rank, world, backend=backend)
        nbytes = model.l1.bias.untyped_storage().nbytes()
        if rank == bad:
            model.l1.bias.untyped_storage().resize_(0)
        out.append(attempt(f"{backend}: storage resized to 0 on one rank", opt.step, shards_only(opt),
                           "RuntimeError", r"storage", r"freed", rf"rank {bad}\b"))  # fmt: skip
        if rank == bad:
            model.l1.bias.untyped_storage().resize_(nbytes)
    edits: list[tuple[str, Callable[[Net], None], bool, str]] = [
        (".data cloned on one rank", lambda m: setattr(m.l1.bias, "data", m.l1.bias.data.clone()), True, r"param 1\b"),
        ("model cast to bf16 on one rank", lambda m: m.to(torch.bfloat16), True, r"param \d"),
        ("transposed view on one rank", lambda m: setattr(m.l1.weight, "data", m.l1.weight.data.as_strided(
            m.l1.weight.shape, (1, m.l1.weight.shape[0]))), True, r"param 0\b.*strides"),
        ("transposed view on every rank", lambda m: setattr(m.l1.weight, "data", m.l1.weight.data.as_strided(
            m.l1.weight.shape, (1, m.l1.weight.shape[0]))), False, r"param 0\b.*strides"),
    ]  # fmt: skip
    for backend in ("reference", "triton"):
        for label, edit, one_rank, pattern in edits:
            if backend == "triton" and label != "transposed view on one rank":
                continue
            model, opt = trained(2, rank, world, backend=backend)
            objs = zero_objects(opt)
            if rank == bad or not one_rank:
                edit(model)
            who = rf"rank {bad}\b" if one_rank else r"rank 0\b"
            out.append(attempt(f"{backend}: {label}", opt.step, objs, "RuntimeError", pattern, r"no longer a view",
                               who))  # fmt: skip
    return out


def case_stage1_moved(rank: int, world: int) -> list[dict]:
    """Stage 1 too: a transposed view on one rank raises on every rank."""
    model, opt = trained(1, rank, world)
    if rank == world - 1:
        w = model.l1.weight
        w.data = w.data.as_strided(w.shape, (1, w.shape[0]))
    return [attempt("stage 1: transposed view on one rank", opt.step, zero_objects(opt), "RuntimeError",
                    r"param 0\b", r"strides")]  # fmt: skip


def case_resized_before_first_step(rank: int, world: int) -> list[dict]:
    """A param given a .data of another size on one rank before the first step (stage 1, after backward) or before
    the first backward (stage 2): the staging views were built in the param's shape now, which failed on that rank
    only (the other rank hung in the reduce-scatter, and that rank's optimizer was broken for good). Now the same
    'no longer a view' RuntimeError on every rank, nothing changed, and the same error again at the next step (the
    optimizer is not broken: the param is still the wrong one)."""
    bad = world - 1
    out = []
    for stage in (1, 2):
        model, opt = make(stage)
        if stage == 1:
            local_loss(model, 0, 0, rank, world).backward()
        if rank == bad:
            model.l1.bias.data = torch.zeros(1)  # (broadcast by the forward: stage 2's backward still runs)
        if stage == 2:
            local_loss(model, 0, 0, rank, world).backward()
            opt._drain()  # (nothing in flight while the snapshot reads the shards)
        for attempt_no in (1, 2):
            out.append(attempt(f"stage {stage}: bias resized on one rank, step {attempt_no}", opt.step,
                               zero_objects(opt), "RuntimeError", r"param 1\b", r"no longer a view",
                               rf"rank {bad}\b"))  # fmt: skip
    return out


class _LoaderError(Exception):
    pass


def case_closure_raises_on_one_rank(rank: int, world: int) -> list[dict]:
    """step(closure) whose closure raises on one rank (before its backward): that rank raises the closure's own
    exception, the others a RuntimeError naming it and the rank (they waited in the step's collectives until the
    process-group timeout before), nothing changed anywhere; a valid step follows."""
    bad = world - 1
    out = []
    for stage in (1, 2):
        model, opt = trained(stage, rank, world, backward=False)

        def closure(model=model):
            if rank == bad:
                raise _LoaderError("the data loader failed")
            loss = local_loss(model, 1, 0, rank, world)
            loss.backward()
            return loss

        exc = "_LoaderError" if rank == bad else "RuntimeError"
        patterns = [r"the data loader failed"] + ([] if rank == bad else [r"the closure raised _LoaderError",
                                                                          rf"rank {bad}\b"])  # fmt: skip
        # (what the step would update: the other rank's closure ran its backward, which changes grads and shards)
        updated = (opt._steps, [(b.param_flat, b.master, b.exp_avg, b.exp_avg_sq) for b in opt._buckets])
        rec = attempt(f"stage {stage}: the closure raises on one rank", lambda opt=opt, c=closure: opt.step(c),
                      updated, exc, *patterns)  # fmt: skip
        out.append({**rec, "same_error": False})  # (that rank raises the closure's own exception)
        out.append(recovers(model, opt, rank, world, f"stage {stage}: a valid step afterwards"))
    return out


def case_failed_step_after_one_rank_skipped_backward(rank: int, world: int) -> list[dict]:
    """Stage 2, rank 1 without backward (allowed: it reduces its p.grad in step(), paired with rank 0's pass), and
    the step fails (a NaN lr on every rank). Before, rank 1 put its shards back and counted no pass while rank 0
    counted one: the retried step, or zero_grad + backward + step, ran other collectives on each rank (a gloo size
    mismatch, SIGABRT). Now rank 1 keeps that reduction as its pass: the retry with a valid lr gives the params of
    a run that never failed, bit for bit, and so does a new backward and step."""
    out = []
    for then in ("retry", "new backward"):
        # (built before either backward: rank 0's backward waits in its reduce-scatters for rank 1's step)
        ref_model, ref = trained(2, rank, world, backward=False)
        model, opt = trained(2, rank, world, backward=False)
        opt.param_groups[0]["lr"] = math.nan
        if rank == 0:
            local_loss(model, 1, 0, rank, world).backward()
        rec = attempt(f"{then}: NaN lr after a backward on rank 0 only", opt.step, zero_objects(opt), "ValueError",
                      r"learning rate", r"rank 0\b")  # fmt: skip
        rec["changed"] = None  # rank 1's reduction of its (absent) grads is its pass now: its grad shards are new
        out.append(rec)
        opt.param_groups[0]["lr"] = LR
        if then == "retry":
            if rank == 0:  # (the run without the failure)
                local_loss(ref_model, 1, 0, rank, world).backward()
            ref.step()
            opt.step()
        else:  # (zero_grad drops the failed step's pass: the run without it is zero_grad, backward, step)
            for m, o in ((model, opt), (ref_model, ref)):
                o.zero_grad()
                local_loss(m, 4, 0, rank, world).backward()
                o.step()
        out.append(check(f"{then}: the params of a run without the failure",
                         torch.equal(flat_params(model), flat_params(ref_model))))  # fmt: skip
    return out


def case_out_of_step_after_a_stand_in(rank: int, world: int) -> list[dict]:
    """Stage 2: two synced passes on rank 0, none on rank 1 (whose step stood in for the first). The out-of-step
    RuntimeError on both ranks; a retried step raises it again on both (it stepped with rank 0's two passes against
    rank 1's one before); zero_grad, backward and step then give the params of a run that never went out of step
    (the ranks counted different passes before, and that backward SIGABRT'd in a gloo size mismatch)."""
    ref_model, ref = trained(2, rank, world, backward=False)
    model, opt = trained(2, rank, world, backward=False)
    if rank == 0:
        for k in range(2):
            local_loss(model, 5 + k, 0, rank, world).backward()
    out = []
    for attempt_no in (1, 2):
        rec = attempt(f"out of step, step {attempt_no}", opt.step, zero_objects(opt), "RuntimeError",
                      r"different numbers of synced backward passes", r"zero_grad")  # fmt: skip
        rec["changed"] = None  # (the passes' reductions, kept until zero_grad)
        out.append(rec)
    for m, o in ((model, opt), (ref_model, ref)):
        o.zero_grad()
        local_loss(m, 4, 0, rank, world).backward()
        o.step()
    out.append(check("zero_grad, backward, step: the params of a run without the mismatch",
                     torch.equal(flat_params(model), flat_params(ref_model))))  # fmt: skip
    return out


def params_and_states(opt: ZeroAdamW) -> tuple:
    """What a failed step must leave alone on every rank, the stand-in included (its grad shards, pass count and
    reduced p.grad change: that reduction is its synced pass): the flat params, masters, moments, step counts and
    logged values."""
    shards = [{"flat": b.param_flat, "master": b.master, "exp_avg": b.exp_avg, "exp_avg_sq": b.exp_avg_sq,
               "max_exp_avg_sq": b.max_exp_avg_sq} for b in opt._buckets]  # fmt: skip
    logged = {"steps": opt._steps, "last_grad_norm": opt.last_grad_norm, "last_found_inf": opt.last_found_inf,
              "skipped_steps": opt.skipped_steps}  # fmt: skip
    return (logged, shards)


def case_late_error_after_a_stand_in(rank: int, world: int) -> list[dict]:
    """Stage 2: rank 0 runs a synced backward and then accumulates another under no_sync, rank 1 runs none (its
    step stands in for the synced pass), and rank 0's accumulated grad of param 0 lost its storage. Only the late
    reduction (of the grads the shards lack, after the first agreement) finds it: the RuntimeError on both ranks,
    params and states unchanged. The late agreement kept rank 1's stand-in finding (it sends no pass counts): before,
    rank 1 put its shards back and counted no pass while rank 0 counted one, and the retry with the grad given its
    memory back (as the message asks), or zero_grad, backward and step, SIGABRT'd in a gloo size mismatch. Now both
    give the params of a run that never failed, bit for bit."""
    out = []
    for then in ("retry", "new backward"):
        # (built before either backward: rank 0's backward waits in its reduce-scatters for rank 1's step)
        ref_model, ref = trained(2, rank, world, backward=False)
        model, opt = trained(2, rank, world, backward=False)
        good = None
        if rank == 0:
            local_loss(model, 1, 0, rank, world).backward()
            with opt.no_sync():
                local_loss(model, 2, 0, rank, world).backward()
            good = model.l1.weight.grad.clone()
            model.l1.weight.grad.untyped_storage().resize_(0)
            opt._drain()  # (waits for rank 1's step, whose reduction pairs with the pass: nothing left in flight)
        objs = zero_objects(opt) if rank == 0 else params_and_states(opt)  # (rank 1: its stand-in pass is kept)
        out.append(attempt(f"{then}: a freed grad found by the late reduction after a stand-in", opt.step, objs,
                           "RuntimeError", r"grad of param 0\b", r"outside its storage", r"rank 0\b"))  # fmt: skip
        if then == "retry":
            if rank == 0:  # what the message asks: give the grad a tensor with memory
                model.l1.weight.grad = good
            opt.step()
            if rank == 0:  # (the run without the failure: the same passes and grads)
                local_loss(ref_model, 1, 0, rank, world).backward()
                with ref.no_sync():
                    local_loss(ref_model, 2, 0, rank, world).backward()
            ref.step()
        else:  # (zero_grad drops the failed step's passes: the run without it is zero_grad, backward, step)
            for m, o in ((model, opt), (ref_model, ref)):
                o.zero_grad()
                local_loss(m, 4, 0, rank, world).backward()
                o.step()
        got, want = flat_params(model), flat_params(ref_model)
        out.append(check(f"{then}: the params of a run without the failure", torch.equal(got, want),
                         f"max abs difference {(got - want).abs().max().item():.3g}"))  # fmt: skip
    return out


def case_stand_in_grad_fixed(rank: int, world: int) -> list[dict]:
    """Stage 2: rank 0 runs a synced backward, rank 1 (whose step stands in for it) holds grads set by hand, and its
    grad of param 0 lost its storage. Rank 1's reduction refuses that grad (sent as zeros: its values reach no
    shard) and the step raises on both ranks, params and states unchanged; rank 1 keeps that reduction as its pass.
    A retry raises it again, with nothing changed (the grad, still refused, is checked again). The fix the message
    asks for (give the grad memory, or set it to None) then lets the retry through: the grad
    given memory is reduced by the retry's late reduction (the refusal was kept until zero_grad() before, and the
    retry raised again). The params equal a run whose rank 1 had that grad (or None) from the start."""
    out = []
    for fix in ("memory", "None"):
        ref_model, ref = trained(2, rank, world, backward=False)
        model, opt = trained(2, rank, world, backward=False)
        good = None
        if rank == 0:
            local_loss(model, 1, 0, rank, world).backward()
            opt._drain()  # (waits for rank 1's step, whose reduction pairs with the pass: nothing left in flight)
        else:
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, 0.01 * (i + 1))
            good = None if fix == "None" else model.l1.weight.grad.clone()
            model.l1.weight.grad.untyped_storage().resize_(0)
        objs = zero_objects(opt) if rank == 0 else params_and_states(opt)  # (rank 1: its stand-in pass is kept)
        out.append(attempt(f"grad fixed ({fix}): a freed grad on the stand-in rank", opt.step, objs, "RuntimeError",
                           r"grad of param 0\b", r"outside its storage", r"rank 1\b"))  # fmt: skip
        out.append(attempt(f"grad fixed ({fix}): a retry before the fix", opt.step, zero_objects(opt),
                           "RuntimeError", r"grad of param 0\b", r"outside its storage", r"rank 1\b"))  # fmt: skip
        if rank == 1:
            model.l1.weight.grad = good
        out.append(attempt(f"grad fixed ({fix}): the retry", opt.step, (), None))
        if rank == 0:  # (the run without the failure)
            local_loss(ref_model, 1, 0, rank, world).backward()
        else:
            for i, p in enumerate(ref_model.parameters()):
                p.grad = torch.full_like(p, 0.01 * (i + 1))
            ref_model.l1.weight.grad = good
        ref.step()
        got, want = flat_params(model), flat_params(ref_model)
        out.append(check(f"grad fixed ({fix}): the params of a run without the failure", torch.equal(got, want),
                         f"max abs difference {(got - want).abs().max().item():.3g}"))  # fmt: skip
    return out


def group_edits(groups: list[dict], g0: dict, extra: torch.Tensor) -> list[tuple[str, Callable[[], Any], str]]:
    return [
        ("group appended", lambda: groups.append({**g0, "params": [extra]}), r"3 groups.*built with 2"),
        ("group popped", lambda: groups.pop(), r"1 groups.*built with 2"),
        ("param appended", lambda: g0["params"].append(extra), r"param group 0 has 4 params"),
        ("param removed", lambda: g0["params"].pop(), r"param group 0 has 2 params"),
        ("param replaced", lambda: g0["params"].__setitem__(1, extra), r"param 1 of param group 0"),
    ]


def case_param_groups_edited(rank: int, world: int) -> list[dict]:
    """param_groups edited after construction on every rank: a group appended directly or popped, a param appended
    to, removed from or replaced in a group's list: the same RuntimeError on every rank, naming the group, with
    nothing changed; restored, the next step works."""
    out = []
    for stage in (1, 2):
        model, opt = trained(stage, rank, world)
        extra = torch.nn.Parameter(torch.ones(3))
        g0 = opt.param_groups[0]
        groups = opt.param_groups
        edits = group_edits(groups, g0, extra)
        for label, edit, pattern in edits:
            saved_groups, saved_params = list(groups), list(g0["params"])
            objs = zero_objects(opt)
            edit()
            out.append(attempt(f"stage {stage}: {label}", opt.step, objs, "RuntimeError", pattern))
            groups[:] = saved_groups
            g0["params"][:] = saved_params
        out.append(recovers(model, opt, rank, world, f"stage {stage}: restored groups, a valid step"))
    return out


def case_out_of_step(rank: int, world: int) -> list[dict]:
    """Stage 2, rank-local call differences that change the number of collectives (a gloo size mismatch and SIGABRT
    before): zero_grad between backward and step on one rank; one or two more synced backward passes on one rank;
    a param group appended on one rank. The same RuntimeError on every rank (nothing changed, except the extra
    passes' reduced grads), then zero_grad and a valid step work. Still fine: one rank without backward, synced
    accumulation on every rank, zero_grad on every rank then grads set by hand."""
    out = []
    model, opt = trained(2, rank, world)
    if rank == 1:
        opt.zero_grad()
    out.append(attempt("zero_grad on one rank", opt.step, zero_objects(opt), "RuntimeError", r"zero_grad",
                       r"1 of 2 ranks"))  # fmt: skip
    out.append(recovers(model, opt, rank, world, "zero_grad on one rank: then a valid step"))
    for extra in (1, 2):
        model, opt = trained(2, rank, world)
        for k in range(extra if rank == 0 else 0):
            local_loss(model, 5 + k, 0, rank, world).backward()
        rec = attempt(f"{extra} more backward pass(es) on rank 0", opt.step, zero_objects(opt), "RuntimeError",
                      r"different numbers of synced backward passes")  # fmt: skip
        rec["changed"] = None  # rank 0's extra passes were reduced (with the other rank's zeros) during backward
        out.append(rec)
        out.append(recovers(model, opt, rank, world, f"{extra} more backward pass(es): zero_grad, a valid step"))
    model, opt = trained(2, rank, world)
    if rank == 1:
        opt.param_groups.append({**opt.param_groups[0], "params": []})
    out.append(attempt("a group appended on one rank", opt.step, zero_objects(opt), "RuntimeError", r"3 groups",
                       r"rank 1\b"))  # fmt: skip
    if rank == 1:
        opt.param_groups.pop()
    out.append(recovers(model, opt, rank, world, "group appended on one rank: removed, a valid step"))

    # What works: rank 1 without backward; two synced passes on every rank; zero_grad then grads by hand.
    model, opt = trained(2, rank, world, backward=rank == 0)
    out.append(attempt("no backward on rank 1", opt.step, (), None))
    out.append(check("no backward on rank 1: same params", same_on_all_ranks(flat_params(model))))
    for mode in ("two synced passes", "zero_grad on every rank, grads by hand"):
        model, opt = trained(2, rank, world)
        ref_model, ref = trained(1, rank, world)
        for m, o in ((model, opt), (ref_model, ref)):
            if mode == "two synced passes":
                local_loss(m, 5, 0, rank, world).backward()
            else:
                o.zero_grad()
                for i, p in enumerate(m.parameters()):
                    p.grad = torch.full_like(p, 0.01 * (i + 1 + rank))
            o.step()
        diff = (flat_params(model) - flat_params(ref_model)).abs().max().item()
        out.append(check(f"{mode}: stage 2 equals stage 1", diff < 1e-6, diff))
    return out


def case_unfrozen(rank: int, world: int) -> list[dict]:
    """Stage 2: params frozen (requires_grad=False) at construction and unfrozen before training get their grads
    reduced (dropped before), and their hooks from the next step on: equal to stage 1."""
    params = []
    for stage in (1, 2):
        model = Net()
        model.l1.requires_grad_(False)
        opt = ZeroAdamW(model.parameters(), stage=stage, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4)
        model.l1.requires_grad_(True)
        for step in range(3):
            local_loss(model, step, 0, rank, world).backward()
            opt.step()
            opt.zero_grad()
        params.append(flat_params(model))
    diff = (params[0] - params[1]).abs().max().item()
    return [check("unfrozen after construction: stage 2 equals stage 1", diff < 1e-6, diff)]


def case_gradscaler_refused(rank: int, world: int) -> list[dict]:
    """A refused torch.amp.GradScaler step leaves no attributes behind: plain steps work afterwards."""
    model, opt = trained(2, rank, world)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # the scale exists, as after scaler.scale(loss).backward()
    out = [attempt("GradScaler step", lambda: scaler.step(opt), (), "RuntimeError", r"GradScaler")]
    left = [k for k in ("grad_scale", "found_inf") if k in opt.__dict__]
    out.append(check("no GradScaler attributes left", not left, left))
    out.append(recovers(model, opt, rank, world, "after GradScaler: a plain step"))
    return out


def case_scaler_unscaled_first(rank: int, world: int) -> list[dict]:
    """Stage 1: DynamicLossScaler.unscale_ of the grads on one rank, then step(loss_scale=scaler), which divides by
    the scale itself (the grads were divided twice before): the same RuntimeError on every rank, nothing changed
    (the scaler neither); after the scaler's update and a new backward, the step works."""
    from fused_ops import DynamicLossScaler

    model, opt = trained(1, rank, world)
    scaler = DynamicLossScaler(init_scale=2.0, device="cpu", warn_after=None)
    if rank == 1:
        scaler.unscale_([p.grad for p in model.parameters() if p.grad is not None])
    out = [attempt("stage 1: grads unscaled by the scaler on one rank", lambda: opt.step(loss_scale=scaler),
                   zero_objects(opt, scaler._scale, scaler._found_inf), "RuntimeError", r"loss_scale",
                   r"already divided grads", r"rank 1\b")]  # fmt: skip
    scaler.update()
    opt.zero_grad()
    out.append(recovers(model, opt, rank, world, "after the refusal: a valid step"))
    return out


def case_duplicate_params(rank: int, world: int) -> list[dict]:
    """The same param twice, in one list or in two groups: the constructor raises ValueError on every rank."""
    model = Net()
    w = model.l1.weight
    make = lambda params: ZeroAdamW(params, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4)  # noqa: E731
    return [
        attempt("twice in one list", lambda: make([*model.parameters(), w]), (), "ValueError", r"param 6\b",
                r"same tensor as param 2\b"),
        attempt("in two groups", lambda: make([{"params": list(model.parameters())}, {"params": [w]}]), (),
                "ValueError", r"more than one parameter group"),
        # a param that is a view of another (tied weights of two shapes): each got its own slot and they were untied
        attempt("a view of another", lambda: make([*model.parameters(), torch.nn.Parameter(w.data.view(-1))]), (),
                "ValueError", r"share memory", r"untied"),
    ]  # fmt: skip


def case_grad_storage_freed(rank: int, world: int) -> list[dict]:
    """A grad whose storage one rank freed (resize_(0)) or shrank (to 16 bytes) before step(): stage 1, and stage 2
    with the grads kept by no_sync (reduced in step()), both backends (SIGSEGV on that rank before, from the copy
    into the staging buffer). The same RuntimeError on every rank, naming the param and the rank, nothing changed;
    after zero_grad a valid step works."""
    bad = world - 1
    out = []
    for backend, stage, nbytes in (("reference", 1, 0), ("reference", 2, 16), ("triton", 1, 16), ("triton", 2, 0)):
        model, opt = trained(stage, rank, world, backward=False, backend=backend)
        with opt.no_sync():
            local_loss(model, 1, 0, rank, world).backward()
        if rank == bad:
            model.l1.weight.grad.untyped_storage().resize_(nbytes)
        label = f"{backend}, stage {stage}: grad storage resized to {nbytes} bytes on one rank"
        out.append(attempt(label, opt.step, zero_objects(opt), "RuntimeError", r"grad of param 0\b",
                           r"outside its storage", rf"rank {bad}\b"))  # fmt: skip
        out.append(recovers(model, opt, rank, world, f"{label}: zero_grad, a valid step"))
    return out


def case_stage1_zero_grad_one_rank(rank: int, world: int) -> list[dict]:
    """Stage 1: zero_grad between backward and step on one rank (its zeroed grads were silently averaged in
    before): the same RuntimeError on every rank, nothing changed; zero_grad, backward and step then work. zero_grad
    after the step, and zero_grad then backward on one rank, stay fine."""
    model, opt = trained(1, rank, world)
    if rank == 1:
        opt.zero_grad()
    out = [attempt("stage 1: zero_grad on one rank", opt.step, zero_objects(opt), "RuntimeError", r"zero_grad",
                   r"1 of 2 ranks")]  # fmt: skip
    out.append(recovers(model, opt, rank, world, "stage 1: zero_grad on one rank: then a valid step"))
    opt.zero_grad(set_to_none=False)  # after the step: nothing lost
    local_loss(model, 3, 0, rank, world).backward()
    if rank == 0:  # zero_grad then another backward: one pass of grads, as on the other rank
        opt.zero_grad()
        local_loss(model, 3, 0, rank, world).backward()
    out.append(attempt("stage 1: zero_grad then backward on one rank", opt.step, (), None))
    out.append(check("stage 1: same params", same_on_all_ranks(flat_params(model))))
    return out


def case_group_count_differs(rank: int, world: int) -> list[dict]:
    """An extra (empty) param group on one rank: a clear ValueError on every rank (a strict-zip error before)."""
    model = Net()
    groups = [{"params": list(model.parameters())}] + ([{"params": []}] if rank == 1 else [])
    make = lambda: ZeroAdamW(groups, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4)  # noqa: E731
    return [attempt("an extra empty group on rank 1", make, (), "ValueError",
                    r"param groups differ between ranks: 1 on rank 0 but 2 on rank 1")]  # fmt: skip


CASES: dict[str, Callable[[int, int], list[dict]]] = {
    "moved_after_backward": case_moved_after_backward,
    "stage1_moved": case_stage1_moved,
    "resized_before_first_step": case_resized_before_first_step,
    "closure_raises_on_one_rank": case_closure_raises_on_one_rank,
    "failed_step_after_one_rank_skipped_backward": case_failed_step_after_one_rank_skipped_backward,
    "out_of_step_after_a_stand_in": case_out_of_step_after_a_stand_in,
    "late_error_after_a_stand_in": case_late_error_after_a_stand_in,
    "stand_in_grad_fixed": case_stand_in_grad_fixed,
    "param_groups_edited": case_param_groups_edited,
    "out_of_step": case_out_of_step,
    "unfrozen": case_unfrozen,
    "gradscaler_refused": case_gradscaler_refused,
    "scaler_unscaled_first": case_scaler_unscaled_first,
    "duplicate_params": case_duplicate_params,
    "grad_storage_freed": case_grad_storage_freed,
    "stage1_zero_grad_one_rank": case_stage1_zero_grad_one_rank,
    "group_count_differs": case_group_count_differs,
}


def task(rank: int, world: int, out_dir: str) -> dict:
    return run_cases(CASES, rank, world)


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("zero_steps"))
    return spawn("tests.test_safety_zero_steps:task", 2, out_dir, timeout=SPAWN_DEADLINE_S, pg_timeout_s=PG_TIMEOUT_S)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks(ranks2, name):
    assert_case(ranks2, name)
