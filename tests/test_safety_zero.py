"""Safety tier for ZeroAdamW (issue 9, parts 4 and 5): input that is bad on any rank, or that differs between
ranks, raises the same clear error on every rank, and params, grads, step counts, shards (master weights,
moments, reduced grads), scaler and flags stay bit-identical to before, with no rank left waiting in a collective.

One spawn per world size (2 and 4 gloo ranks, tests/test_distributed.py's harness) runs every case in sequence.
Each attempt records, on every rank, the exception (type and message), the time it took, and whether everything
it could have changed is bit-identical (tests/safety.py's ``snapshot`` / ``assert_unchanged``, called directly in
the worker: no fork inside a gloo process). The process group times out after ``PG_TIMEOUT_S``, so a collective
that only some ranks reach fails the attempt (its type and elapsed time show it), and the spawn's deadline bounds
the whole file. ``ZERO_SAFETY_CASES=name,name`` runs only those cases.
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
import struct
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from fused_ops.distributed import ZeroAdamW
from tests.safety import assert_unchanged, snapshot
from tests.test_distributed import LR, TINY_BUCKET_MB, Net, flat_params, local_loss, spawn, tensors_equal

pytestmark = [pytest.mark.safety, pytest.mark.distributed]

PG_TIMEOUT_S = 15  # a rank left waiting in a collective gets gloo's timeout error after this long
ATTEMPT_LIMIT_S = 8  # an attempt that takes longer waited for another rank
SPAWN_DEADLINE_S = 240


# -- worker side ------------------------------------------------------------------------------------------------
def two_groups(model: Net) -> list[dict]:
    """Params 0-2 in group 0, params 3-5 in group 1 (l1.weight, l1.bias, extra | l2.weight, l2.bias, unused)."""
    return [
        {"params": [model.l1.weight, model.l1.bias, model.extra]},
        {"params": [model.l2.weight, model.l2.bias, model.unused], "lr": 2 * LR},
    ]


def make(stage: int, **kw: Any) -> tuple[Net, ZeroAdamW]:
    model = Net()
    opt = ZeroAdamW(two_groups(model), stage=stage, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4, **kw)
    return model, opt


def trained(stage: int, rank: int, world: int, backward: bool = True, **kw: Any) -> tuple[Net, ZeroAdamW]:
    """A model and its ZeroAdamW after one step (moments and step counts non-zero), with the grads of the next
    backward in place (in stage 2 already reduced, as after any backward)."""
    model, opt = make(stage, **kw)
    local_loss(model, 0, 0, rank, world).backward()
    opt.step()
    opt.zero_grad()
    if backward:
        local_loss(model, 1, 0, rank, world).backward()
    opt._drain()  # nothing in flight while the snapshot reads the shards
    return model, opt


def zero_objects(opt: ZeroAdamW, *extra: Any) -> tuple:
    """Everything a ZeroAdamW call may change on this rank, for ``snapshot``: the optimizer (groups, params and
    their grads), step counts, the flat params and this rank's shards (masters, moments), the logged values, the
    flags, and in stage 2 the reduced-grad shards (they carry the grads from backward to step; stage 1 recomputes
    them from ``p.grad`` at every step, so there they are scratch)."""
    shards = []
    for b in opt._buckets:
        d = {"flat": b.param_flat, "master": b.master, "exp_avg": b.exp_avg, "exp_avg_sq": b.exp_avg_sq,
             "max_exp_avg_sq": b.max_exp_avg_sq}  # fmt: skip
        if opt.stage == 2:
            d["grad"], d["grad_valid"] = b.grad, b.grad_valid
        shards.append(d)
    inner = {
        "steps": opt._steps, "last_grad_norm": opt.last_grad_norm, "last_found_inf": opt.last_found_inf,
        "skipped_steps": opt.skipped_steps, "shards": shards, "rounds": opt._rounds_since_step,
        "unsynced": opt._unsynced_grads, "max_grad_norm": opt.max_grad_norm,
    }  # fmt: skip
    return (opt, inner, *extra)


def attempt(label: str, call: Callable[[], Any], objs: tuple, exc: str | None, *patterns: str) -> dict:
    """Run ``call``; record its exception, the time it took and whether ``objs`` stayed bit-identical (``exc``:
    the exception expected, None for none)."""
    before = snapshot(*objs)
    t0 = time.monotonic()
    error = None
    try:
        call()
    except Exception as e:  # noqa: BLE001 - recorded for the parent to assert on
        error = (type(e).__name__, str(e))
    elapsed = time.monotonic() - t0
    try:
        assert_unchanged(before, snapshot(*objs))
        changed = None
    except AssertionError as e:
        changed = str(e)
    return {"label": label, "error": error, "changed": changed, "elapsed": elapsed, "expect": (exc, patterns)}


def check(label: str, ok: bool, detail: Any = "") -> dict:
    return {"label": label, "ok": bool(ok), "detail": str(detail)}


def same_on_all_ranks(t: torch.Tensor) -> bool:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def recovers(model: Net, opt: ZeroAdamW, rank: int, world: int, label: str) -> dict:
    """After the errors: a valid step works on every rank and leaves the same params everywhere."""
    opt.zero_grad()
    local_loss(model, 2, 0, rank, world).backward()
    before = flat_params(model)
    opt.step()
    after = flat_params(model)
    return check(label, same_on_all_ranks(after) and not torch.equal(before, after), "params differ or unchanged")


def restore_groups(opt: ZeroAdamW, saved: list[dict], max_grad_norm: Any) -> None:
    for g, s in zip(opt.param_groups, saved, strict=True):
        g.clear()
        g.update(s)
    opt.max_grad_norm = max_grad_norm


def _freed(t: torch.Tensor, nbytes: int = 0) -> torch.Tensor:
    """A copy of ``t`` whose storage is then freed (or shrunk to ``nbytes``) in place: its sizes stay."""
    t = t.clone()
    t.untyped_storage().resize_(nbytes)
    return t


def _inference_zeros() -> torch.Tensor:
    with torch.inference_mode():
        return torch.zeros(1)


def set_group(gi: int, key: str, value: Any) -> Callable[[ZeroAdamW], None]:
    return lambda opt: opt.param_groups[gi].__setitem__(key, value)


def set_max_grad_norm(value: Any) -> Callable[[ZeroAdamW], None]:
    return lambda opt: setattr(opt, "max_grad_norm", value)


BAD_STEP_VALUES = [  # (label, change, exception, patterns)
    ("lr nan", set_group(1, "lr", math.nan), "ValueError", r"learning rate", r"param group 1"),
    ("lr negative", set_group(1, "lr", -1.0), "ValueError", r"learning rate", r"param group 1"),
    ("eps nan", set_group(1, "eps", math.nan), "ValueError", r"eps", r"param group 1"),
    ("beta1 = 1", set_group(1, "betas", (1.0, 0.999)), "ValueError", r"beta parameter at index 0", r"param group 1"),
    ("beta2 < 0", set_group(0, "betas", (0.9, -0.5)), "ValueError", r"beta parameter at index 1", r"param group 0"),
    ("weight_decay -1", set_group(1, "weight_decay", -1.0), "ValueError", r"weight_decay", r"param group 1"),
    ("weight_decay inf", set_group(1, "weight_decay", math.inf), "ValueError", r"weight_decay", r"param group 1"),
    # (finite in float64, inf in the kernels' float32: torch's fused kernels refuse them)
    ("lr 1e39", set_group(1, "lr", 1e39), "ValueError", r"learning rate", r"param group 1"),
    ("lr 10**400", set_group(0, "lr", 10**400), "ValueError", r"learning rate", r"param group 0"),
    ("eps 1e39", set_group(1, "eps", 1e39), "ValueError", r"eps", r"param group 1"),
    ("weight_decay 1e39", set_group(1, "weight_decay", 1e39), "ValueError", r"weight_decay", r"param group 1"),
    ("max_grad_norm -1", set_max_grad_norm(-1.0), "ValueError", r"max_grad_norm"),
    ("max_grad_norm nan", set_max_grad_norm(math.nan), "ValueError", r"max_grad_norm"),
    (
        "lr 2-element tensor",
        set_group(1, "lr", torch.tensor([LR, LR])),
        "ValueError",
        r"1-element",
        r"lr",
        r"param group 1",
    ),
    ("lr tensor nan", set_group(1, "lr", torch.tensor(math.nan)), "ValueError", r"learning rate", r"param group 1"),
    ("lr int tensor", set_group(0, "lr", torch.tensor(1)), "TypeError", r"lr", r"param group 0"),
    # (read with torch ops after the checks: a freed one crashed the process, SIGSEGV)
    ("lr tensor freed", lambda opt: set_group(1, "lr", _freed(torch.tensor(LR)))(opt), "ValueError",
     r"lr of param group 1", r"outside its storage"),
    ("lr tensor meta", set_group(0, "lr", torch.tensor(LR, device="meta")), "ValueError", r"lr of param group 0",
     r"meta"),
]  # fmt: skip


def case_step_values(rank: int, world: int) -> list[dict]:
    """Invalid step values (set after construction, as a scheduler or a user might), on the last rank only and on
    every rank: the same ValueError everywhere, before any shard is updated (group 0's included)."""
    bad = world - 1
    out = []
    for stage in (1, 2):
        model, opt = trained(stage, rank, world)
        for label, change, exc, *patterns in BAD_STEP_VALUES:
            for where in ("one rank", "every rank"):
                saved, mgn = [dict(g) for g in opt.param_groups], opt.max_grad_norm
                if where == "every rank" or rank == bad:
                    change(opt)
                extra = [f"rank {bad}"] if where == "one rank" else []
                out.append(attempt(f"stage {stage}: {label} on {where}", opt.step, zero_objects(opt), exc,
                                   *patterns, *extra))  # fmt: skip
                restore_groups(opt, saved, mgn)
        out.append(recovers(model, opt, rank, world, f"stage {stage}: a valid step afterwards"))
    return out


def scaler(scale: Any, found_inf: Any = None) -> types.SimpleNamespace:
    return types.SimpleNamespace(scale=scale, found_inf=torch.zeros(1) if found_inf is None else found_inf)


BAD_LOSS_SCALES = [  # (label, value, exception, patterns)
    ("0.0", 0.0, "ValueError", r"loss_scale"),
    ("nan", math.nan, "ValueError", r"loss_scale"),
    ("-1.0", -1.0, "ValueError", r"loss_scale"),
    ("inf", math.inf, "ValueError", r"loss_scale"),
    ("tensor 0", torch.zeros(1), "ValueError", r"loss_scale"),
    ("tensor nan", torch.tensor(math.nan), "ValueError", r"loss_scale"),
    ("tensor -inf", torch.tensor([-math.inf]), "ValueError", r"loss_scale"),
    ("2-element tensor", torch.tensor([2.0, 2.0]), "ValueError", r"loss_scale", r"1-element"),
    ("int tensor", torch.tensor([2]), "TypeError", r"loss_scale"),
    ("a string", "2.0", "TypeError", r"loss_scale"),
    ("scaler with scale 0", scaler(torch.zeros(1)), "ValueError", r"loss_scale"),
    ("scaler with 2-element scale", scaler(torch.ones(2)), "ValueError", r"loss_scale", r"1-element"),
    (
        "scaler with 2-element found_inf",
        scaler(torch.ones(1), torch.zeros(2)),
        "ValueError",
        r"found_inf",
        r"1-element",
    ),
    # float32 cannot hold loss_scale * world_size: the grads were divided by 0 (NaN params) or it raised late
    ("1e-46", 1e-46, "ValueError", r"loss_scale", r"float32"),
    ("1e39", 1e39, "ValueError", r"loss_scale", r"float32"),
    ("float64 tensor 1e39", torch.tensor([1e39], dtype=torch.float64), "ValueError", r"loss_scale", r"float32"),
    ("float32 max (times the world size)", float(torch.finfo(torch.float32).max), "ValueError", r"float32"),
    # read or written with torch ops after the checks: a freed one crashed the process (SIGSEGV), an inference
    # found_inf raised on one rank after the ranks agreed (the others stepped)
    ("tensor freed", _freed(torch.tensor([2.0])), "ValueError", r"loss_scale", r"outside its storage"),
    ("scaler with freed scale", scaler(_freed(torch.tensor([2.0]))), "ValueError", r"loss_scale.scale",
     r"outside its storage"),
    ("scaler with freed found_inf", scaler(torch.ones(1), _freed(torch.zeros(1))), "ValueError", r"found_inf",
     r"outside its storage"),
    ("scaler with meta found_inf", scaler(torch.ones(1), torch.zeros(1, device="meta")), "ValueError",
     r"found_inf", r"meta"),
    ("scaler with inference found_inf", scaler(torch.ones(1), _inference_zeros()), "ValueError", r"found_inf",
     r"inference tensor"),
]  # fmt: skip


def case_loss_scale(rank: int, world: int) -> list[dict]:
    """loss_scale 0, NaN, negative, inf, a 2-element or int tensor, a bad scaler: on one rank (the others pass
    a valid 1.0) and on every rank."""
    bad = world - 1
    out = []
    for stage in (1, 2):
        model, opt = trained(stage, rank, world)
        for label, value, exc, *patterns in BAD_LOSS_SCALES:
            for where in ("one rank", "every rank"):
                mine = value if where == "every rank" or rank == bad else 1.0
                extra = [f"rank {bad}"] if where == "one rank" else []
                call = lambda v=mine, opt=opt: opt.step(loss_scale=v)  # noqa: E731
                out.append(attempt(f"stage {stage}: loss_scale {label} on {where}", call, zero_objects(opt, value),
                                   exc, *patterns, *extra))  # fmt: skip
        out.append(recovers(model, opt, rank, world, f"stage {stage}: a valid step afterwards"))
    return out


def case_grad_scale_keyword(rank: int, world: int) -> list[dict]:
    """step(grad_scale=2.0): a clear TypeError (pointing to loss_scale) on every rank, also when only one rank
    passes it; step(loss_scale=2.0), a float, gives the same params as a 1-element tensor 2.0."""
    bad = world - 1
    out = []
    model, opt = trained(2, rank, world)
    for where in ("one rank", "every rank"):
        kwargs = {"grad_scale": 2.0} if where == "every rank" or rank == bad else {"loss_scale": 2.0}
        out.append(attempt(f"grad_scale=2.0 on {where}", lambda kw=kwargs: opt.step(**kw), zero_objects(opt),
                           "TypeError", r"grad_scale", r"loss_scale"))  # fmt: skip
    out.append(recovers(model, opt, rank, world, "a valid step afterwards"))
    results = []
    for scale in (2.0, torch.tensor([2.0])):
        model, opt = trained(2, rank, world)
        opt.step(loss_scale=scale)
        results.append(flat_params(model))
    out.append(check("float loss_scale = tensor loss_scale", torch.equal(*results)))
    return out


def case_step_values_differ(rank: int, world: int) -> list[dict]:
    """Valid step values that differ between ranks (one rank in the middle): the same ValueError on every rank,
    naming the value and the ranks, before anything changes."""
    odd = world // 2
    out = []
    changes = [  # (label, change on rank `odd`, step kwargs there, patterns)
        ("lr", set_group(0, "lr", 3 * LR), {}, [r"\blr\b", r"param group 0"]),
        ("tensor lr", set_group(1, "lr", torch.tensor(3 * LR if rank == odd else 2 * LR)), {}, [r"\blr\b", "group 1"]),
        ("betas", set_group(1, "betas", (0.8, 0.999)), {}, [r"betas", r"param group 1"]),
        ("eps", set_group(0, "eps", 1e-6), {}, [r"eps", r"param group 0"]),
        ("weight_decay", set_group(1, "weight_decay", 0.5), {}, [r"weight_decay", r"param group 1"]),
        ("amsgrad", set_group(0, "amsgrad", True), {}, [r"amsgrad", r"param group 0"]),
        ("maximize", set_group(1, "maximize", True), {}, [r"maximize", r"param group 1"]),
        ("max_grad_norm", set_max_grad_norm(0.5), {}, [r"max_grad_norm"]),
        ("loss_scale", None, {"loss_scale": 4.0}, [r"loss_scale"]),
        ("tensor loss_scale", None, {"loss_scale": torch.tensor([4.0])}, [r"loss_scale"]),
        ("loss_scale None on one rank", None, {"loss_scale": None}, [r"loss_scale"]),
    ]
    for stage in (1, 2):
        model, opt = trained(stage, rank, world, max_grad_norm=1.0)
        for label, change, kwargs, patterns in changes:
            saved, mgn = [dict(g) for g in opt.param_groups], opt.max_grad_norm
            if label == "tensor lr":
                change(opt)  # a tensor lr on every rank, its value differs on rank `odd`
            elif change is not None and rank == odd:
                change(opt)
            kw = {"loss_scale": torch.tensor([2.0]) if label == "tensor loss_scale" else 2.0}
            if rank == odd:
                kw.update(kwargs)
            out.append(attempt(f"stage {stage}: {label} differs", lambda kw=kw, opt=opt: opt.step(**kw),
                               zero_objects(opt), "ValueError", r"differ", rf"rank {odd}", *patterns))  # fmt: skip
            restore_groups(opt, saved, mgn)
        out.append(recovers(model, opt, rank, world, f"stage {stage}: a valid step afterwards"))
    return out


def case_retry_is_exact(rank: int, world: int) -> list[dict]:
    """A failed step (bad loss_scale on one rank) then a valid one gives bit for bit what the valid one alone
    gives: stage 1, stage 2 after a backward, and stage 2 with grads set by hand (reduced in step())."""
    bad = world - 1
    out = []
    for stage, by_hand in ((1, False), (2, False), (2, True)):
        twins = []
        for _ in range(2):
            model, opt = trained(stage, rank, world, backward=not by_hand)
            if by_hand:
                for i, p in enumerate(model.parameters()):
                    p.grad = torch.full_like(p, 0.01 * (rank + 1) * (i + 1))
            twins.append((model, opt))
        (model, opt), (twin, twin_opt) = twins
        where = f"stage {stage}" + (", grads set by hand" if by_hand else "")
        out.append(attempt(f"{where}: failed step", lambda opt=opt: opt.step(loss_scale=0.0 if rank == bad else 1.0),
                           zero_objects(opt), "ValueError", r"loss_scale", rf"rank {bad}"))  # fmt: skip
        opt.step(loss_scale=1.0)
        twin_opt.step(loss_scale=1.0)
        same = torch.equal(flat_params(model), flat_params(twin)) and tensors_equal(
            opt.consolidated_state_dict(to=None), twin_opt.consolidated_state_dict(to=None)
        )
        out.append(check(f"{where}: the retry matches a step without the failed one", same))
        # (None, or the zero sentinel that stands for the held grads until the next backward: zero strides over one
        # element of a storage of one element per param)
        n_params = len(list(model.parameters()))
        grads_freed = stage == 1 or all(
            p.grad is None
            or (set(p.grad.stride()) <= {0} and p.grad.untyped_storage().nbytes() <= n_params * p.element_size())
            for p in model.parameters()
        )
        out.append(check(f"{where}: stage 2 frees p.grad once the step succeeds", grads_freed))
    return out


def _set(d: dict, key: Any, value: Any) -> None:
    d[key] = value


def _move_first_param(sd: dict) -> None:
    """Param group sizes 4 and 2 instead of 3 and 3 (same ids)."""
    sd["param_groups"][0]["params"].append(sd["param_groups"][1]["params"].pop(0))


def _owned(shards: list[dict]) -> int:
    """The first param of shard 0 with at least 2 elements there (the same on every rank: shards are gathered)."""
    return next(i for i, (lo, hi) in sorted(shards[0]["zero"]["ranges"].items()) if hi - lo >= 2)


def case_load_state_dict(rank: int, world: int) -> list[dict]:
    """Checkpoints with a truncated, missing, int or non-tensor moment, a bad step count, bad hyper-parameters,
    wrong group count or sizes, a bad shard range: on one rank and on every rank, as a torch.optim-layout dict and
    as the list of every rank's shards. The same ValueError everywhere, naming the param index and the key, and
    nothing loaded on any rank; a dict whose groups or steps differ between ranks too. Valid loads then work."""
    bad = world - 1
    model = Net()
    groups = two_groups(model)
    groups[1]["amsgrad"] = True
    opt = ZeroAdamW(groups, stage=2, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4)
    for step in range(2):
        local_loss(model, step, 0, rank, world).backward()
        opt.step()
        opt.zero_grad()
    full = opt.consolidated_state_dict(to=None)
    shards: list[Any] = [None] * world
    dist.all_gather_object(shards, opt.state_dict())
    local_loss(model, 2, 0, rank, world).backward()  # another state to load over: a half-done load would show
    opt.step()
    opt.zero_grad()
    i = _owned(shards)
    n_i = shards[0]["zero"]["ranges"][i][1] - shards[0]["zero"]["ranges"][i][0]
    corruptions = [  # (label, which dict, change, patterns)
        ("exp_avg truncated", "full", lambda sd: _set(sd["state"][2], "exp_avg", sd["state"][2]["exp_avg"][:-1]),
         [r"param 2\b", r"'exp_avg'"]),
        ("exp_avg_sq missing", "full", lambda sd: sd["state"][3].pop("exp_avg_sq"), [r"param 3\b", r"'exp_avg_sq'"]),
        ("max_exp_avg_sq missing (amsgrad group)", "full", lambda sd: sd["state"][4].pop("max_exp_avg_sq"),
         [r"param 4\b", r"'max_exp_avg_sq'"]),
        ("exp_avg int64", "full", lambda sd: _set(sd["state"][1], "exp_avg", sd["state"][1]["exp_avg"].long()),
         [r"param 1\b", r"'exp_avg'", r"int64"]),
        ("exp_avg a list", "full", lambda sd: _set(sd["state"][0], "exp_avg", sd["state"][0]["exp_avg"].tolist()),
         [r"param 0\b", r"'exp_avg'"]),
        ("step nan", "full", lambda sd: _set(sd["state"][4], "step", torch.tensor(math.nan)), [r"param 4\b", "'step'"]),
        ("step negative", "full", lambda sd: _set(sd["state"][4], "step", torch.tensor(-1.0)), [r"param 4\b", "step"]),
        ("step 2 elements", "full", lambda sd: _set(sd["state"][1], "step", torch.ones(2)), [r"param 1\b", "'step'"]),
        ("step missing", "full", lambda sd: sd["state"][5].pop("step"), [r"param 5\b", r"'step'"]),
        ("state not a dict", "full", lambda sd: _set(sd["state"], 0, 5), [r"param 0\b"]),
        ("lr -1", "full", lambda sd: _set(sd["param_groups"][1], "lr", -1.0), [r"learning rate", r"param group 1"]),
        ("betas 1.5", "full", lambda sd: _set(sd["param_groups"][0], "betas", (1.5, 0.9)), [r"beta", r"group 0"]),
        ("lr 2-element tensor", "full", lambda sd: _set(sd["param_groups"][0], "lr", torch.tensor([LR, LR])),
         [r"1-element", r"param group 0"]),
        ("backend 'nope'", "full", lambda sd: _set(sd["param_groups"][0], "backend", "nope"), [r"backend"]),
        ("one param group", "full", lambda sd: sd["param_groups"].pop(), [r"param groups"]),
        ("group sizes", "full", _move_first_param, [r"param group 0"]),
        ("shard: exp_avg of 1 element", "shards", lambda sd: _set(sd[0]["state"][i], "exp_avg", torch.ones(1)),
         [rf"param {i}\b", "'exp_avg'"]),
        ("shard: exp_avg truncated", "shards", lambda sd: _set(sd[0]["state"][i], "exp_avg", torch.ones(n_i - 1)),
         [rf"param {i}\b", "'exp_avg'"]),
        ("shard: exp_avg_sq missing", "shards", lambda sd: sd[0]["state"][i].pop("exp_avg_sq"),
         [rf"param {i}\b", r"'exp_avg_sq'"]),
        ("shard: exp_avg float64 list", "shards", lambda sd: _set(sd[0]["state"][i], "exp_avg", [0.0] * n_i),
         [rf"param {i}\b", r"'exp_avg'"]),
        ("shard: step missing", "shards", lambda sd: sd[0]["state"][i].pop("step"), [rf"param {i}\b", r"'step'"]),
        ("shard: range past the end", "shards",
         lambda sd: _set(sd[0]["zero"]["ranges"], i, (0, 10**6)), [rf"param {i}\b", r"range"]),
        # storage freed or shrunk in place: was read unchecked (SIGSEGV on that rank, or bytes past the allocation)
        ("exp_avg freed", "full", lambda sd: _set(sd["state"][2], "exp_avg", _freed(sd["state"][2]["exp_avg"])),
         [r"param 2\b", r"'exp_avg'", "outside its storage"]),
        ("shard: exp_avg_sq shrunk", "shards",
         lambda sd: _set(sd[0]["state"][i], "exp_avg_sq", _freed(sd[0]["state"][i]["exp_avg_sq"], 8)),
         [rf"param {i}\b", r"'exp_avg_sq'", "outside its storage"]),
        ("step freed", "full", lambda sd: _set(sd["state"][1], "step", _freed(sd["state"][1]["step"])),
         [r"param 1\b", "'step'", "outside its storage"]),
        ("lr tensor freed", "full", lambda sd: _set(sd["param_groups"][0], "lr", _freed(torch.tensor(LR))),
         [r"'lr' of param group 0", "outside its storage"]),
        ("step 1e300", "full", lambda sd: _set(sd["state"][4], "step", 1e300), [r"param 4\b", "'step'", "float32"]),
    ]  # fmt: skip
    out = []
    for label, which, change, patterns in corruptions:
        for where in ("one rank", "every rank"):
            sd = copy.deepcopy(full if which == "full" else shards)
            if where == "every rank" or rank == bad:
                change(sd)
            extra = [rf"rank {bad}\b"] if where == "one rank" else []
            out.append(attempt(f"{label} on {where}", lambda sd=sd: opt.load_state_dict(sd), zero_objects(opt),
                               "ValueError", *patterns, *extra))  # fmt: skip
    differ = [  # valid dicts, but not the same on every rank
        ("lr", lambda sd: _set(sd["param_groups"][0], "lr", 3 * LR), [r"\blr\b", r"param group 0", r"differ"]),
        ("step", lambda sd: _set(sd["state"][2], "step", sd["state"][2]["step"] + 1), ["step", r"param 2\b", "differ"]),
    ]  # fmt: skip
    for label, change, patterns in differ:
        sd = copy.deepcopy(full)
        if rank == bad:
            change(sd)
        out.append(attempt(f"{label} differs between ranks", lambda sd=sd: opt.load_state_dict(sd), zero_objects(opt),
                           "ValueError", *patterns))  # fmt: skip
    opt.load_state_dict(copy.deepcopy(full))
    out.append(check("the full dict loads afterwards", tensors_equal(opt.consolidated_state_dict(to=None), full)))
    # the loaded groups are copies (torch.optim deep-copies them): the caller's tensor lr is not the optimizer's
    with_lr = copy.deepcopy(full)
    with_lr["param_groups"][0]["lr"] = torch.tensor(LR)
    opt.load_state_dict(with_lr)
    with_lr["param_groups"][0]["lr"].fill_(0.5)
    out.append(check("a loaded tensor lr is a copy", float(opt.param_groups[0]["lr"]) == float(torch.tensor(LR))))
    opt.load_state_dict(copy.deepcopy(full))
    opt.load_state_dict(copy.deepcopy(shards))
    out.append(check("the shards load afterwards", tensors_equal(opt.state_dict(), shards[rank])))
    # A legacy dict without 'maximize' / 'amsgrad': torch.optim's defaults (False), not the constructor's values.
    legacy = copy.deepcopy(full)
    for g in legacy["param_groups"]:
        del g["maximize"], g["amsgrad"]
    for st in legacy["state"].values():
        st.pop("max_exp_avg_sq", None)
    model2 = Net()
    opt2 = ZeroAdamW(two_groups(model2), stage=1, lr=LR, maximize=True, amsgrad=True)
    opt2.load_state_dict(legacy)
    flags = [(g["maximize"], g["amsgrad"]) for g in opt2.param_groups]
    out.append(check("a legacy dict takes torch's defaults", flags == [(False, False)] * 2, flags))
    return out


BAD_CONSTRUCTOR_ARGS = [  # (label, kwargs, exception, patterns)
    ("lr -1", dict(lr=-1.0), "ValueError", [r"learning rate"]),
    ("weight_decay nan", dict(weight_decay=math.nan), "ValueError", [r"weight_decay"]),
    ("betas (1, 0.9)", dict(betas=(1.0, 0.9)), "ValueError", [r"beta parameter at index 0"]),
    ("eps -1", dict(eps=-1.0), "ValueError", [r"epsilon"]),
    ("lr 2-element tensor", dict(lr=torch.tensor([LR, LR])), "ValueError", [r"1-element"]),
    ("stage 3", dict(stage=3), "ValueError", [r"stage"]),
    ("bucket_cap_mb 0", dict(bucket_cap_mb=0), "ValueError", [r"bucket_cap_mb"]),
    ("align 0", dict(align=0), "ValueError", [r"align"]),
    ("max_grad_norm -1", dict(max_grad_norm=-1.0), "ValueError", [r"max_grad_norm"]),
    ("reduce_dtype int32", dict(reduce_dtype=torch.int32), "ValueError", [r"reduce_dtype"]),
    ("differentiable", dict(differentiable=True), "ValueError", [r"differentiable"]),
    ("backend 'nope'", dict(backend="nope"), "ValueError", [r"backend"]),
    ("no params", dict(params=[]), "ValueError", [r"empty parameter list"]),
    ("an int64 param", dict(params="int64"), "ValueError", [r"param 6\b", r"int64"]),
]
DIFFERENT_CONSTRUCTOR_ARGS = [  # (label, kwargs on the odd rank, patterns)
    ("lr", dict(lr=2 * LR), [r"\blr\b", r"param group 0"]),
    ("betas", dict(betas=(0.8, 0.999)), [r"betas", r"param group 0"]),
    ("weight_decay", dict(weight_decay=0.5), [r"weight_decay"]),
    ("amsgrad", dict(amsgrad=True), [r"amsgrad"]),
    ("max_grad_norm", dict(max_grad_norm=1.0), [r"max_grad_norm"]),
    ("stage", dict(stage=1), [r"stage"]),
]


def case_constructor(rank: int, world: int) -> list[dict]:
    """Constructor arguments bad on one rank, or valid but different between ranks: the same error on every rank
    (no rank waits in the constructor's collective), and the model's params untouched (still the tensors they
    were: the optimizer did not move them into its buffers)."""
    bad, odd = world - 1, world // 2
    out = []
    for label, kwargs, exc, patterns in BAD_CONSTRUCTOR_ARGS:
        for where in ("one rank", "every rank"):
            model = Net()
            params: Any = list(model.parameters())
            kw = dict(stage=2, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4)
            if where == "every rank" or rank == bad:
                kw.update(kwargs)
            if kw.get("params") == "int64":
                kw["params"] = params + [torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)]
            params = kw.pop("params", params)
            extra = [rf"rank {bad}\b"] if where == "one rank" else []
            out.append(attempt(f"{label} on {where}", lambda p=params, kw=kw: ZeroAdamW(p, **kw),
                               (list(model.parameters()),), exc, *patterns, *extra))  # fmt: skip
    for label, kwargs, patterns in DIFFERENT_CONSTRUCTOR_ARGS:
        model = Net()
        kw = dict(stage=2, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4)
        if rank == odd:
            kw.update(kwargs)
        make = lambda kw=kw, model=model: ZeroAdamW(model.parameters(), **kw)
        out.append(attempt(f"{label} differs between ranks", make, (list(model.parameters()),), "ValueError",
                           r"differ", rf"rank {odd}\b", *patterns))  # fmt: skip
    return out


def case_params_differ(rank: int, world: int) -> list[dict]:
    """Ranks that start from different params (another seed per rank): ZeroAdamW does what DDP does, every rank
    takes rank 0's params at construction (bit for bit, fp32 and bf16 with fp32 masters made from them)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        model = Net(dtype=dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(rank)
        opt = ZeroAdamW(model.parameters(), stage=2, bucket_cap_mb=TINY_BUCKET_MB, lr=LR, align=4)
        rank0 = flat_params(Net(dtype=dtype))
        out.append(check(f"{dtype}: every rank holds rank 0's params", torch.equal(flat_params(model), rank0)))
        if dtype != torch.float32:
            cons = opt.consolidated_state_dict(to=None)
            masters = torch.cat([cons["state"][i]["master_param"].reshape(-1) for i in range(len(cons["state"]))])
            out.append(check(f"{dtype}: the masters are rank 0's params", torch.equal(masters, rank0)))
        out.append(recovers(model, opt, rank, world, f"{dtype}: a step leaves the same params on every rank"))
    return out


def case_bad_grads(rank: int, world: int) -> list[dict]:
    """On one rank, a sparse grad, or a param whose .data was replaced (the step could not reach it): the same
    RuntimeError on every rank, naming the param, from step() (never from the reduce-scatter of that rank alone,
    which would leave the other ranks in the collective); nothing changed, p.grad included."""
    bad = world - 1
    out = []
    for stage in (1, 2):
        model, opt = trained(stage, rank, world, backward=False)
        for i, p in enumerate(model.parameters()):  # set by hand: stage 2 reduces them in step()
            p.grad = torch.full_like(p, 0.01 * (i + 1))
        if rank == bad:
            model.l1.weight.grad = torch.zeros_like(model.l1.weight).to_sparse()
        out.append(attempt(f"stage {stage}: a sparse grad on one rank", opt.step, zero_objects(opt), "RuntimeError",
                           r"param 0\b", r"sparse", rf"rank {bad}\b"))  # fmt: skip
        out.append(recovers(model, opt, rank, world, f"stage {stage}: zero_grad, then a valid step"))

        model, opt = trained(stage, rank, world, backward=False)
        if rank == bad:
            model.l1.bias.data = model.l1.bias.data.clone()
        local_loss(model, 1, 0, rank, world).backward()  # stage 2: reduced here, the replaced param noticed here
        opt._drain()
        out.append(attempt(f"stage {stage}: a param's .data replaced on one rank", opt.step, zero_objects(opt),
                           "RuntimeError", r"param 1\b", r"\.data", rf"rank {bad}\b"))  # fmt: skip
    return out


def case_consolidated_state_dict(rank: int, world: int) -> list[dict]:
    """consolidated_state_dict with a bad `to` or device on one rank, or `to` differing between ranks: the same
    ValueError on every rank before any collective of the gather (no rank waits)."""
    bad, odd = world - 1, world // 2
    out = []
    model, opt = trained(2, rank, world)
    for label, kwargs, patterns in [
        ("to = world size", dict(to=world), [r"\bto\b"]),
        ("to = -1", dict(to=-1), [r"\bto\b"]),
        ("device 'nonsense'", dict(device="nonsense"), [r"device", r"nonsense"]),
    ]:
        kw = kwargs if rank == bad else {}
        out.append(attempt(f"{label} on one rank", lambda kw=kw: opt.consolidated_state_dict(**kw), zero_objects(opt),
                           "ValueError", *patterns, rf"rank {bad}\b"))  # fmt: skip
    to = 1 if rank == odd else 0
    out.append(attempt("to differs between ranks", lambda: opt.consolidated_state_dict(to=to), zero_objects(opt),
                       "ValueError", r"\bto\b", r"differ", rf"rank {odd}\b"))  # fmt: skip
    cons = opt.consolidated_state_dict(to=None)
    out.append(check("a valid call afterwards", cons is not None and len(cons["state"]) == 6))
    return out


# Value pools for the generated cases: (value, the exception it raises or None when valid).
NAN, INF = math.nan, math.inf
POOLS: dict[str, list[tuple[Any, str | None]]] = {
    "lr": [(1e-3, None), (0.0, None), (2e-3, None), (torch.tensor(1e-3), None), (-1.0, "ValueError"),
           (NAN, "ValueError"), (INF, "ValueError"), (torch.tensor([1e-3, 1e-3]), "ValueError"),
           (torch.tensor(1), "TypeError"), (torch.tensor(NAN), "ValueError")],
    "betas": [((0.9, 0.999), None), ((0.0, 0.5), None), ((1.0, 0.9), "ValueError"), ((0.9, -0.1), "ValueError"),
              ((0.9,), "TypeError")],
    "eps": [(1e-8, None), (0.0, None), (-1.0, "ValueError"), (NAN, "ValueError")],
    "weight_decay": [(1e-2, None), (0.0, None), (-0.1, "ValueError"), (INF, "ValueError")],
    "max_grad_norm": [(None, None), (1.0, None), (0.0, "ValueError"), (-1.0, "ValueError"), (NAN, "ValueError")],
    "loss_scale": [(None, None), (1.0, None), (8.0, None), (torch.tensor([4.0]), None), (0.0, "ValueError"),
                   (NAN, "ValueError"), (-2.0, "ValueError"), (torch.tensor([2.0, 2.0]), "ValueError"),
                   ("x", "TypeError")],
}  # fmt: skip
DEFAULTS = {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "max_grad_norm": None,
            "loss_scale": None}  # fmt: skip
NAMES = {"lr": r"learning rate|\blr\b", "betas": r"beta", "eps": r"eps", "weight_decay": r"weight_decay",
         "max_grad_norm": r"max_grad_norm", "loss_scale": r"loss_scale"}  # fmt: skip


def _bits(value: Any) -> Any:
    """What the ranks compare: float64 bits (a tensor's value as float64), the loss scale's kind apart."""
    if isinstance(value, tuple):
        return tuple(_bits(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", struct.pack("<d", float(value.item())))
    return (type(value).__name__ if value is None else "number", struct.pack("<d", float(value or 0)))


def case_generated_step_values(rank: int, world: int) -> list[dict]:
    """Generated (seeded, identical on every rank): one to three ranks each get a random value, valid or not, for
    a random step value (lr, betas, eps, weight_decay of group 0 or 1, max_grad_norm, loss_scale). Expected, from
    an oracle independent of the implementation: the first rank with an invalid value raises its error on every
    rank; else values that differ raise 'differs' on every rank; else the step succeeds with the same params
    everywhere. Failed steps change nothing."""
    rng = random.Random(1234 + world)
    out = []
    for stage in (1, 2):
        model, opt = trained(stage, rank, world)
        for example in range(20):
            chosen: dict[int, dict[tuple, tuple[Any, str | None]]] = {r: {} for r in range(world)}
            for _ in range(rng.randint(1, 3)):
                r, key = rng.randrange(world), rng.choice(sorted(POOLS))
                gi = rng.randrange(2) if key in ("lr", "betas", "eps", "weight_decay") else None
                chosen[r][(key, gi)] = rng.choice(POOLS[key])
            order = [(k, gi) for gi in (0, 1) for k in ("lr", "betas", "eps", "weight_decay")]
            order += [("max_grad_norm", None), ("loss_scale", None)]

            def value(r: int, slot: tuple, chosen=chosen) -> Any:
                if slot in chosen[r]:
                    return chosen[r][slot][0]
                return 2 * LR if slot == ("lr", 1) else DEFAULTS[slot[0]]

            def first_bad(r: int, chosen=chosen, order=order) -> tuple | None:
                """The check that fails first on rank r: those on the host in order, then the tensor values
                checked on the device (a 1-element float tensor's value)."""
                bad = [slot for slot in order if slot in chosen[r] and chosen[r][slot][1] is not None]
                on_device = [s for s in bad if isinstance(v := chosen[r][s][0], torch.Tensor) and v.numel() == 1
                             and v.is_floating_point()]  # fmt: skip
                return next((s for s in bad if s not in on_device), None) or next(iter(on_device), None)

            failing = next((r for r in range(world) if first_bad(r) is not None), None)
            if failing is not None:
                slot = first_bad(failing)
                exc, patterns = chosen[failing][slot][1], [NAMES[slot[0]], rf"rank {failing}\b"]
            else:
                differ = next((slot for slot in order if len({_bits(value(q, slot)) for q in range(world)}) > 1), None)
                exc, patterns = ("ValueError", [r"differ", NAMES[differ[0]]]) if differ else (None, [])
            saved, mgn = [dict(g) for g in opt.param_groups], opt.max_grad_norm
            for (key, gi), (v, _) in chosen[rank].items():
                if key == "max_grad_norm":
                    opt.max_grad_norm = v
                elif key != "loss_scale":
                    opt.param_groups[gi][key] = v
            loss_scale = value(rank, ("loss_scale", None))
            label = f"stage {stage}, example {example}: " + ", ".join(
                f"rank {r} {key}{'' if gi is None else f'[group {gi}]'}={v!r}"
                for r in chosen
                for (key, gi), (v, _) in chosen[r].items()
            )
            call = lambda ls=loss_scale, opt=opt: opt.step(loss_scale=ls)
            rec = attempt(label, call, zero_objects(opt), exc, *patterns)
            restore_groups(opt, saved, mgn)
            if exc is None:
                rec["changed"] = None  # a step that succeeds changes the params, on every rank alike:
                out.append(check(f"{label}: same params everywhere", same_on_all_ranks(flat_params(model))))
            out.append(rec)
            opt.zero_grad()
            local_loss(model, 3 + example, 0, rank, world).backward()
            opt._drain()
    return out


CASES: dict[str, tuple[Callable[[int, int], list[dict]], tuple[int, ...]]] = {
    "step_values": (case_step_values, (2,)),
    "loss_scale": (case_loss_scale, (2,)),
    "grad_scale_keyword": (case_grad_scale_keyword, (2,)),
    "step_values_differ": (case_step_values_differ, (2, 4)),
    "retry_is_exact": (case_retry_is_exact, (2,)),
    "load_state_dict": (case_load_state_dict, (2, 4)),
    "constructor": (case_constructor, (2, 4)),
    "params_differ": (case_params_differ, (2, 4)),
    "bad_grads": (case_bad_grads, (2,)),
    "consolidated_state_dict": (case_consolidated_state_dict, (2,)),
    "generated_step_values": (case_generated_step_values, (2, 4)),
}


def run_cases(cases: dict[str, Callable], rank: int, world: int) -> dict:
    """Every case's checks on this rank (a case that raises is reported as crashed; the next cases still run), each
    with its time."""
    out: dict[str, Any] = {}
    for name, fn in cases.items():
        t0 = time.monotonic()
        try:
            out[name] = fn(rank, world)
        except Exception:  # noqa: BLE001 - the parent reports it; the next cases still run
            out[name] = [{"label": "the case itself", "crashed": traceback.format_exc()}]
        out[name].append({"label": "time", "seconds": time.monotonic() - t0})
    return out


def task(rank: int, world: int, out_dir: str) -> dict:
    only = [c for c in os.environ.get("ZERO_SAFETY_CASES", "").split(",") if c]
    cases = {name: fn for name, (fn, worlds) in CASES.items() if world in worlds and (not only or name in only)}
    return run_cases(cases, rank, world)


# -- parent side ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("zero_safety"))


@pytest.fixture(scope="module")
def ranks2(zero_dir) -> list[dict]:
    return spawn("tests.test_safety_zero:task", 2, zero_dir, timeout=SPAWN_DEADLINE_S, pg_timeout_s=PG_TIMEOUT_S)


@pytest.fixture(scope="module")
def ranks4(zero_dir) -> list[dict]:
    return spawn("tests.test_safety_zero:task", 4, zero_dir, timeout=SPAWN_DEADLINE_S, pg_timeout_s=PG_TIMEOUT_S)


def assert_case(results: list[dict], name: str) -> None:
    """Every attempt of the case: on every rank the expected exception (type, and a message naming the
    argument, index and rank), the same message on every rank, everything bit-identical, no waiting."""
    only = [c for c in os.environ.get("ZERO_SAFETY_CASES", "").split(",") if c]
    if only and name not in only:
        pytest.skip("not in ZERO_SAFETY_CASES")
    per_rank = [r[name] for r in results]
    failures = []
    for rank, records in enumerate(per_rank):
        for rec in records:
            where = f"rank {rank}, {rec['label']}"
            if "crashed" in rec:
                failures.append(f"{where}: the case raised\n{rec['crashed']}")
            elif "ok" in rec and not rec["ok"]:
                failures.append(f"{where}: {rec['detail']}")
            elif "error" in rec:
                exc, patterns = rec["expect"]
                if exc is None:
                    if rec["error"] is not None:
                        failures.append(f"{where}: raised {rec['error']} (expected no exception)")
                elif rec["error"] is None:
                    failures.append(f"{where}: no exception (expected {exc})")
                else:
                    typ, msg = rec["error"]
                    if typ != exc:
                        failures.append(f"{where}: {typ} instead of {exc}: {msg}")
                    missing = [p for p in patterns if not re.search(p, msg)]
                    if missing:
                        failures.append(f"{where}: the message does not name {missing}: {msg!r}")
                if rec["changed"] is not None:
                    failures.append(f"{where}: changed something: {rec['changed']}")
                if rec["elapsed"] > ATTEMPT_LIMIT_S:
                    failures.append(f"{where}: took {rec['elapsed']:.1f} s (a rank waited for another)")
    labels = [[rec["label"] for rec in records] for records in per_rank]
    if any(lab != labels[0] for lab in labels):
        failures.append(f"the ranks ran different attempts: {labels}")
    else:
        for i, rec in enumerate(per_rank[0]):
            if "error" in rec and rec.get("same_error", True):  # (False: a rank re-raises its own, as intended)
                errors = [records[i]["error"] for records in per_rank]
                if any(e != errors[0] for e in errors):
                    failures.append(f"{rec['label']}: the ranks raised different errors: {errors}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:40])


@pytest.mark.parametrize("name", [n for n, (_, worlds) in CASES.items() if 2 in worlds])
def test_two_ranks(ranks2, name):
    assert_case(ranks2, name)


@pytest.mark.parametrize("name", [n for n, (_, worlds) in CASES.items() if 4 in worlds])
def test_four_ranks(ranks4, name):
    assert_case(ranks4, name)
