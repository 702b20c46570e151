"""ZeroAdamW when the ranks' grads differ in which params they cover, and after a batch discarded on every rank.

Findings of fuzzing probes, on 2 gloo ranks (one spawn runs every scenario in both stages):

1. Stage 2 keeps the reduced grads after a step (as torch keeps p.grad) in the shards, which hold only their sum over
   the ranks. After a step where a param got a grad on some ranks only (legal: the others add zeros), clearing its
   grad (``p.grad = None``) or setting it by hand, the same call on every rank, then a backward, was refused on every
   rank ("... on 1 of 2 ranks ..."): the ranks without a kept grad of it sent their new grad in the backward's
   reduce-scatter, which the drop of the kept grads would have lost. The ranks now agree at each step which params
   some rank keeps grads of, and such a new grad is reduced by the step instead. Each rank's p.grad is its own, as in
   torch: clearing or setting a grad on the ranks that keep one works; a clear on one of two ranks that both keep
   grads of the param still raises on every rank with nothing changed.
2. After a batch discarded on every rank (``backward(); opt.zero_grad()`` with no step), a step in which one rank ran
   no backward was refused: stage 1 said "zero_grad() was called between backward and step on 1 of 2 ranks"
   (every rank called it), stage 2 that the ranks ran different numbers of synced passes. A zero_grad() on every rank
   after its last pass now leaves that pass out of the count: the rank without backward stands in for the others'
   new pass as it does without the discarded batch.
3. (Probe 46, finding 3.) The README's usual loop ``backward(); step(); model.zero_grad()`` (or ``p.grad = None``),
   then a step in which one rank runs no backward, was refused on every rank in stage 2: the idle rank handled each
   param on its own at the step while the other had dropped its shards at its backward. The idle rank now drops its
   shards in step() as a backward would; model.zero_grad() on one rank only still raises on every rank.

Each loop is compared with torch.optim.AdamW fed the grads averaged over the ranks (p.grad as torch keeps it on each
rank: backward accumulates into it, each zeroing clears it; a param without a grad on any rank is stepped with zeros,
as ZeroAdamW steps it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fused_ops.distributed import ZeroAdamW
from tests.safety import step_messages
from tests.test_distributed import spawn

pytestmark = pytest.mark.distributed

TOL = 1e-6
LR = 0.05
WORLD = 2
SHAPES = {"a": (5,), "b": (3, 4), "c": (6,)}
NAMES = list(SHAPES)

# A script: each rank's calls, as a list of ops. ("B", pos, names): a synced backward of a loss over those params
# (pos and the rank pick its data); ("N", pos, names): the same under no_sync; ("clear", names): p.grad = None;
# ("set", name, value): p.grad = torch.full(shape, value); ("zero",): opt.zero_grad(); ("mzero",): model.zero_grad()
# (a module over the params); ("mzero_keep",): model.zero_grad(set_to_none=False); ("T",): a step that must work;
# ("X",): a step that must raise on every rank (changing nothing: torch's loop has no step there).


def _uses(per_rank: dict[int, str], rank: int) -> str:
    return per_rank.get(rank, "")


def s_clear_partial(rank: int) -> list[tuple]:
    """a gets a grad on rank 1 only; then a.grad = None on every rank drops its kept grads (b's stay)."""
    return [("B", 0, _uses({0: "b", 1: "ab"}, rank)), ("T",), ("clear", "a"), ("B", 1, "ab"), ("T",),
            ("zero",), ("B", 2, _uses({0: "a", 1: "bc"}, rank)), ("T",), ("clear", "c"), ("T",)]  # fmt: skip


def s_set_partial(rank: int) -> list[tuple]:
    """a gets a grad on rank 1 only; then a.grad set by hand to the same tensor on every rank replaces its kept grads,
    and backward accumulates into it."""
    return [("B", 0, _uses({0: "bc", 1: "ab"}, rank)), ("T",), ("set", "a", 0.25), ("B", 1, "b"), ("T",),
            ("set", "a", -0.5), ("B", 2, "abc"), ("T",)]  # fmt: skip


def s_set_and_clear_partial(rank: int) -> list[tuple]:
    """a gets a grad on rank 1 only; then on every rank a.grad set by hand and b.grad = None, a backward over b (the
    probe's v2: rank 0 zeroed every grad it kept, rank 1 set one of them by hand); then both set by hand."""
    return [("B", 0, _uses({0: "b", 1: "ab"}, rank)), ("T",), ("set", "a", 5.0), ("clear", "b"), ("B", 1, "b"),
            ("T",), ("set", "a", -1.0), ("set", "b", 0.5), ("B", 2, "ab"), ("T",)]  # fmt: skip


def s_clear_on_holder_only(rank: int) -> list[tuple]:
    """a gets a grad on rank 1 only; a.grad = None on rank 1 alone (rank 0 keeps no grad of it), then a backward on
    every rank: rank 0's new grad of a is not dropped with rank 1's kept one."""
    return [("B", 0, _uses({0: "b", 1: "ab"}, rank)), ("T",)] + ([("clear", "a")] if rank == 1 else []) + [
        ("B", 1, "ab"), ("T",), ("B", 2, "ab"), ("T",)]  # fmt: skip


def s_set_on_non_holder(rank: int) -> list[tuple]:
    """a gets a grad on rank 1 only; rank 0 sets a.grad by hand (over nothing of its own), rank 1 keeps its grad;
    a backward on every rank accumulates into both."""
    return [("B", 0, _uses({0: "b", 1: "ab"}, rank)), ("T",)] + ([("set", "a", 0.75)] if rank == 0 else []) + [
        ("B", 1, "ab"), ("T",)]  # fmt: skip


def s_clear_then_step(rank: int) -> list[tuple]:
    """a.grad = None on every rank, then a step without backward: the kept grads of b and c are stepped again, a's
    are dropped (torch steps b and c with their kept grads, a with none); then b and c cleared on every rank."""
    return [("B", 0, _uses({0: "b", 1: "ac"}, rank)), ("T",), ("clear", "a"), ("T",), ("clear", "bc"),
            ("B", 1, _uses({0: "c", 1: "a"}, rank)), ("T",)]  # fmt: skip


def s_discarded_then_one_rank(rank: int) -> list[tuple]:
    """A batch discarded on every rank (backward, zero_grad), then a step where rank 1 has no batch (twice)."""
    ops = [("B", 0, "abc"), ("zero",), ("B", 1, _uses({0: "abc"}, rank)), ("T",)]
    return ops + [("zero",), ("B", 2, "ab"), ("zero",), ("B", 3, _uses({0: "bc"}, rank)), ("T",)]


def s_discarded_twice(rank: int) -> list[tuple]:
    """Two batches discarded on every rank, then rank 0 alone runs one."""
    return [("B", 0, "abc"), ("zero",), ("B", 1, "abc"), ("zero",), ("B", 2, _uses({0: "abc"}, rank)), ("T",),
            ("zero",), ("B", 3, "abc"), ("T",)]  # fmt: skip


def s_discarded_then_no_sync(rank: int) -> list[tuple]:
    """A discarded batch, then rank 0 a synced backward and rank 1 one under no_sync (reduced by its step)."""
    second = ("B", 1, "abc") if rank == 0 else ("N", 1, "ab")
    return [("B", 0, "abc"), ("zero",), second, ("T",), ("zero",), ("B", 2, "abc"), ("T",)]


def s_recover_after_refusal(rank: int) -> list[tuple]:
    """zero_grad between backward and step on rank 1 only: refused on every rank; zero_grad on every rank (what the
    error asks), then a step where rank 1 has no batch works."""
    ops = [("B", 0, "abc")] + ([("zero",)] if rank == 1 else []) + [("X",), ("zero",)]
    return ops + [("B", 1, _uses({0: "abc"}, rank)), ("T",)]


def s_discarded_on_one_rank(rank: int) -> list[tuple]:
    """Stage 2: rank 0 discards its pass and runs another, rank 1 steps with its pass: different passes (the ranks'
    shards hold different sums), refused on every rank; zero_grad on every rank, then a valid step."""
    ops = [("B", 0, "abc")] + ([("zero",), ("B", 1, "abc")] if rank == 0 else [])
    return ops + [("X",), ("zero",), ("B", 2, "abc"), ("T",)]


def s_model_zero_grad_then_idle(idle: int, how: tuple) -> Callable[[int], list[tuple]]:
    """Finding 3: the README's usual loop (backward; step; model.zero_grad()), then a step in which rank ``idle`` runs
    no backward (its batch touches no param), twice; ``how`` is the zeroing: model.zero_grad() with or without
    set_to_none, or p.grad = None for every param. Before, the idle rank handled each param on its own at the step
    and asked to drop its kept grads, while the other rank had dropped its shards at its backward and held this
    pass's grads: refused on every rank ("... cleared after the last step ... on 1 of 2 ranks")."""

    def script(rank: int) -> list[tuple]:
        busy = 1 - idle
        # (opt.zero_grad() after each step in which a rank was idle: that rank then keeps no grads of its own, but its
        # shards hold the other rank's; a model.zero_grad() on every rank there is a separate, open problem)
        return [("B", 0, "abc"), ("T",), how, ("B", 1, _uses({busy: "abc"}, rank)), ("T",), ("zero",),
                ("B", 2, "abc"), ("T",), how, ("B", 3, _uses({busy: "ab"}, rank)), ("T",), ("zero",)]  # fmt: skip

    return script


_ZEROINGS = {"model_zero_grad": ("mzero",), "model_zero_grad_keep": ("mzero_keep",), "grad_none": ("clear", "abc")}
IDLE_SCRIPTS = {f"{name}_then_rank{idle}_idle": (idle, how) for name, how in _ZEROINGS.items() for idle in (0, 1)}

SCRIPTS: dict[str, tuple[Callable[[int], list[tuple]], tuple[int, ...]]] = {
    "clear_partial": (s_clear_partial, (2, 1)),
    "set_partial": (s_set_partial, (2, 1)),
    "set_and_clear_partial": (s_set_and_clear_partial, (2, 1)),
    "clear_on_holder_only": (s_clear_on_holder_only, (2, 1)),
    "set_on_non_holder": (s_set_on_non_holder, (2, 1)),
    "clear_then_step": (s_clear_then_step, (2, 1)),
    "discarded_then_one_rank": (s_discarded_then_one_rank, (2, 1)),
    "discarded_twice": (s_discarded_twice, (2, 1)),
    "discarded_then_no_sync": (s_discarded_then_no_sync, (2, 1)),
    "recover_after_refusal": (s_recover_after_refusal, (2, 1)),
    "discarded_on_one_rank": (s_discarded_on_one_rank, (2,)),
    **{name: (s_model_zero_grad_then_idle(idle, how), (2, 1)) for name, (idle, how) in IDLE_SCRIPTS.items()},
}
LAYOUTS = {"one_bucket": 25.0, "bucket_per_param": 1e-5}


def _params() -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in SHAPES.items()}


def _loss(params: dict[str, torch.Tensor], pos: int, rank: int, names: str) -> torch.Tensor:
    total = torch.zeros(())
    for k, n in enumerate(NAMES):
        if n in names:
            x = torch.randn(SHAPES[n], generator=torch.Generator().manual_seed(1000 * pos + 100 * rank + k))
            total = total + ((params[n] * x).tanh() ** 2).sum() + 0.1 * (params[n] * x).sum()
    return total


def run_zero(script: list[tuple], rank: int, stage: int, bucket_cap_mb: float) -> list[Any]:
    """The script on this rank's ZeroAdamW: after each step, the params and which p.grad read None (or the error)."""
    params = _params()
    opt = ZeroAdamW(list(params.values()), stage=stage, lr=LR, backend="reference", bucket_cap_mb=bucket_cap_mb)
    out: list[Any] = []
    for op in script:
        kind = op[0]
        if kind in ("B", "N"):
            with opt.no_sync() if kind == "N" else contextlib.nullcontext():
                if op[2]:
                    _loss(params, op[1], rank, op[2]).backward()
        elif kind == "clear":
            for n in op[1]:
                params[n].grad = None
        elif kind == "set":
            params[op[1]].grad = torch.full(SHAPES[op[1]], op[2])
        elif kind == "zero":
            opt.zero_grad()
        elif kind in ("mzero", "mzero_keep"):
            torch.nn.ParameterDict(params).zero_grad(set_to_none=kind == "mzero")  # (the same Parameter objects)
        else:
            try:
                opt.step()
            except RuntimeError as e:
                out.append({"error": str(e)})
                continue
            out.append({"params": [p.detach().clone() for p in params.values()],
                        "none": [p.grad is None for p in params.values()]})  # fmt: skip
    return out


def run_torch(script: Callable[[int], list[tuple]]) -> list[dict]:
    """torch.optim.AdamW fed the average over the ranks of each rank's p.grad as torch keeps it; "X" is no step."""
    params = _params()
    opt = torch.optim.AdamW(list(params.values()), lr=LR)
    grads: list[dict[str, torch.Tensor | None]] = [dict.fromkeys(NAMES) for _ in range(WORLD)]
    per_rank = [script(r) for r in range(WORLD)]
    segments: list[list[list[tuple]]] = []  # per rank: the ops before each step, and the step
    for ops in per_rank:
        segs, cur = [], []
        for op in ops:
            cur.append(op)
            if op[0] in ("T", "X"):
                segs.append(cur)
                cur = []
        segments.append(segs)
    assert len({len(s) for s in segments}) == 1
    out = []
    for k in range(len(segments[0])):
        for r in range(WORLD):
            for op in segments[r][k]:
                if op[0] in ("B", "N") and op[2]:
                    used = [n for n in NAMES if n in op[2]]
                    gs = torch.autograd.grad(_loss(params, op[1], r, op[2]), [params[n] for n in used])
                    for n, g in zip(used, gs, strict=True):
                        grads[r][n] = g if grads[r][n] is None else grads[r][n] + g
                elif op[0] == "clear":
                    for n in op[1]:
                        grads[r][n] = None
                elif op[0] == "set":
                    grads[r][op[1]] = torch.full(SHAPES[op[1]], op[2])
                elif op[0] in ("zero", "mzero", "mzero_keep"):
                    # (zeros in torch after set_to_none=False: the same sum; ZeroAdamW drops them as zero_grad() does)
                    grads[r] = dict.fromkeys(NAMES)
        step = segments[0][k][-1][0]
        assert all(segments[r][k][-1][0] == step for r in range(WORLD))
        if step == "X":
            out.append({"error": True})
            continue
        for n, p in params.items():
            p.grad = sum(g[n] if g[n] is not None else torch.zeros_like(p) for g in grads) / WORLD
        opt.step()
        out.append({"params": [p.detach().clone() for p in params.values()],
                    "none": [[g[n] is None for n in NAMES] for g in grads]})  # fmt: skip
    return out


# -- a clear that differs between ranks still raises on every rank, with nothing changed ----------------------------
def _snapshot(opt: ZeroAdamW, params: dict[str, torch.Tensor]) -> list:
    shards = [t.clone() for b in opt._buckets for t in (b.param_flat, b.grad, b.exp_avg, b.exp_avg_sq)]
    grads = [(p.grad, None if p.grad is None else p.grad._version) for p in params.values()]
    return [shards, [s.clone() for s in opt._steps], opt.last_grad_norm.clone(), grads]


def _same(a: list, b: list) -> bool:
    shards_a, steps_a, norm_a, grads_a = a
    shards_b, steps_b, norm_b, grads_b = b
    return (
        all(torch.equal(x, y) for x, y in zip(shards_a, shards_b, strict=True))
        and all(torch.equal(x, y) for x, y in zip(steps_a, steps_b, strict=True))
        and torch.equal(norm_a, norm_b)
        and grads_a == grads_b
    )


def run_disagreement(rank: int, who: int) -> dict[str, Any]:
    """a gets a grad on rank 1 only, b on both; then b.grad = None on rank ``who`` only, a backward on every rank:
    the shards hold only the sum of the ranks' kept grads of b, so one rank's cannot be dropped: the step raises on
    every rank, again on a retry, with nothing changed; opt.zero_grad() on every rank, a backward and a step then
    work."""
    params = _params()
    opt = ZeroAdamW(list(params.values()), stage=2, lr=LR, backend="reference")
    _loss(params, 0, rank, _uses({0: "b", 1: "ab"}, rank)).backward()
    opt.step()
    if rank == who:
        params["b"].grad = None
    _loss(params, 1, rank, "abc").backward()
    errors, unchanged = _step_twice(opt, params, stood_in=False)
    opt.zero_grad()
    _loss(params, 2, rank, "ab").backward()
    opt.step()
    return {"errors": errors, "unchanged": unchanged, "after": [p.detach().clone() for p in params.values()]}


def _step_twice(opt: ZeroAdamW, params: dict[str, torch.Tensor], stood_in: bool) -> tuple[list, bool]:
    """Two steps that may raise: their messages (None where one worked), and whether nothing changed. A rank that
    stood in for the others' pass keeps that reduction as its pass (the README, of a failed step): its grad shards
    (b.grad, the second of each bucket's four tensors) and p.grad are left out of the comparison."""
    before = _snapshot(opt, params)
    errors = step_messages(opt)
    after = _snapshot(opt, params)
    if stood_in:
        for snap in (before, after):
            snap[0] = [t for k, t in enumerate(snap[0]) if k % 4 != 1]
            snap[3] = []
    return errors, _same(before, after)


def run_zeroed_on_one_rank_idle(rank: int, zeroer: int, idle: int) -> dict[str, Any]:
    """Finding 3's real disagreement: a step, model.zero_grad() on rank ``zeroer`` only (the other keeps its grads,
    as torch keeps p.grad), then a step in which rank ``idle`` runs no backward: the shards hold only the sum of the
    kept grads, so one rank's share cannot be dropped: raised on every rank, again on a retry, with nothing changed
    (params, moments, step counts, the grad norm; on the rank that ran the backward its shards and p.grad too: the
    idle rank keeps its reduction as its pass, as the README says of a failed step that it stood in for). Then
    opt.zero_grad() on every rank, a backward and a step as torch."""
    params = _params()
    opt = ZeroAdamW(list(params.values()), stage=2, lr=LR, backend="reference")
    _loss(params, 0, rank, "abc").backward()
    opt.step()
    if rank == zeroer:
        torch.nn.ParameterDict(params).zero_grad()
    if rank != idle:
        _loss(params, 1, rank, "abc").backward()
    errors, unchanged = _step_twice(opt, params, stood_in=rank == idle)
    opt.zero_grad()
    _loss(params, 2, rank, "ab").backward()
    opt.step()
    return {"errors": errors, "unchanged": unchanged, "after": [p.detach().clone() for p in params.values()]}


def run_idle_then_model_zero_grad(rank: int, idle: int, again: bool) -> dict[str, Any]:
    """A step in which rank ``idle`` had no batch (after opt.zero_grad()), then model.zero_grad() on every rank and a
    step in which both ranks (or, ``again``, the other rank only) ran a backward. The idle rank held no grads of its
    own, yet its shards held the other's kept ones, which it cannot see cleared: it used to add the new pass to them
    on its shards only (a silent wrong step, about 8e-3 off at lr 0.05). Now raised on every rank, twice, with
    nothing changed; then opt.zero_grad(), backward and step as torch."""
    params = _params()
    opt = ZeroAdamW(list(params.values()), stage=2, lr=LR, backend="reference", bucket_cap_mb=25.0)
    _loss(params, 0, rank, "abc").backward()
    opt.step()
    opt.zero_grad()
    if rank != idle:
        _loss(params, 1, rank, "abc").backward()
    opt.step()
    torch.nn.ParameterDict(params).zero_grad()
    if rank != idle or not again:
        _loss(params, 2, rank, "abc").backward()
    errors, unchanged = _step_twice(opt, params, stood_in=rank == idle and again)
    opt.zero_grad()
    _loss(params, 3, rank, "abc").backward()
    opt.step()
    return {"errors": errors, "unchanged": unchanged, "after": [p.detach().clone() for p in params.values()]}


def _two_ranks(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    assert world == WORLD
    results: dict[str, Any] = {}
    for name, (script, stages) in SCRIPTS.items():
        for stage in stages:
            for layout, cap in LAYOUTS.items():
                results[f"{name}/stage{stage}/{layout}"] = run_zero(script(rank), rank, stage, cap)
    for who in (0, 1):
        results[f"disagreement/{who}"] = run_disagreement(rank, who)
    for idle in (0, 1):
        for again in (False, True):
            results[f"idle_then_mzero/{idle}/{again}"] = run_idle_then_model_zero_grad(rank, idle, again)
    for zeroer in (0, 1):
        for idle in (0, 1):
            results[f"zeroed_idle/{zeroer}/{idle}"] = run_zeroed_on_one_rank_idle(rank, zeroer, idle)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn("tests.test_zero_partial_grads:_two_ranks", WORLD, str(tmp_path_factory.mktemp("partial")),
                 timeout=240, pg_timeout_s=30)  # fmt: skip


def _check_script(two_ranks: list[dict], name: str) -> None:
    script, stages = SCRIPTS[name]
    want = run_torch(script)
    for stage in stages:
        for layout in LAYOUTS:
            key = f"{name}/stage{stage}/{layout}"
            got = [r[key] for r in two_ranks]
            assert len(got[0]) == len(want), (key, got[0])
            for k, w in enumerate(want):
                for rank, steps in enumerate(got):
                    g, where = steps[k], f"{key}, step {k}, rank {rank}"
                    if "error" in w:
                        assert "error" in g, f"{where}: the step should have raised"
                        assert g["error"] == got[0][k]["error"], f"{where}: not the same error on every rank"
                        continue
                    assert "error" not in g, f"{where}: {g['error']}"
                    for n, x, y in zip(NAMES, g["params"], w["params"], strict=True):
                        msg = lambda m, at=f"{where}, {n}": f"{at}: {m}"  # noqa: E731
                        torch.testing.assert_close(x, y, rtol=TOL, atol=TOL, msg=msg)
                    if stage == 2:  # (a rank's kept grad reads a sentinel there, no kept grad None)
                        want_none = w["none"][rank]
                        assert g["none"] == want_none, f"{where}: p.grad is None {g['none']}, want {want_none}"


@pytest.mark.parametrize("name", ["clear_partial", "set_partial", "set_and_clear_partial", "clear_on_holder_only"])
def test_grads_cleared_or_set_on_every_rank_after_partial_grads(two_ranks, name):
    """Finding 1: a param's kept grads cleared or replaced by the same call on every rank, or on the only rank that
    keeps them, after a step where it got grads on some ranks only: as torch.optim.AdamW on the averaged grads
    (refused on every rank before)."""
    _check_script(two_ranks, name)


@pytest.mark.parametrize("name", ["set_on_non_holder", "clear_then_step"])
def test_grads_kept_on_some_ranks_still_match_torch(two_ranks, name):
    """Loops that worked before and go through the same paths: a grad set by hand on a rank that keeps none of that
    param while another keeps one; a param's kept grads dropped by a step without backward."""
    _check_script(two_ranks, name)


@pytest.mark.parametrize("name", ["discarded_then_one_rank", "discarded_twice", "discarded_then_no_sync",
                                  "recover_after_refusal"])  # fmt: skip
def test_rank_without_backward_after_a_batch_discarded_on_every_rank(two_ranks, name):
    """Finding 2: a batch discarded on every rank (backward, zero_grad), then a step where one rank runs no synced
    backward: as torch.optim.AdamW on the averaged grads of the batches kept (refused on every rank before)."""
    _check_script(two_ranks, name)


def test_discarded_on_one_rank_is_refused_with_a_message_that_says_so(two_ranks):
    """Stage 2: a pass discarded on one rank only, which then runs another while the other rank steps: still refused
    on every rank (the ranks' shards hold different passes), with a message naming what happened and the fix."""
    _check_script(two_ranks, "discarded_on_one_rank")
    err = two_ranks[0]["discarded_on_one_rank/stage2/one_bucket"][0]["error"]
    assert "1 of 2 ranks began another" in err and "zero_grad() after its last synced pass: 1 of 2" in err, err
    assert "call zero_grad() on every rank" in err


@pytest.mark.parametrize("who", [0, 1])
def test_clear_on_one_rank_raises_everywhere_with_nothing_changed(two_ranks, who):
    """b.grad = None on one rank only, after a step where both ranks kept grads of b (and rank 1 of a): raised on
    every rank, naming b, nothing changed (params, shards, moments, step counts, p.grad), twice; then opt.zero_grad(),
    backward and step as torch."""
    results = [r[f"disagreement/{who}"] for r in two_ranks]
    errors = [r["errors"] for r in results]
    assert errors[0][0] is not None and errors[0] == errors[1] and errors[0][0] == errors[0][1], errors
    if who == 1:  # (rank 1 keeps a: b on its own is dropped where the backward reaches it)
        assert "param 1" in errors[0][0] and "on 1 of 2 ranks" in errors[0][0], errors[0][0]
    else:  # (every grad rank 0 kept: its shards dropped them as zero_grad() does, at the backward)
        assert "zeroed after the last step on 1 of 2 ranks" in errors[0][0], errors[0][0]
    assert all(r["unchanged"] for r in results)

    def script(rank: int) -> list[tuple]:
        return [("B", 0, _uses({0: "b", 1: "ab"}, rank)), ("T",), ("zero",), ("B", 2, "ab"), ("T",)]

    want = run_torch(script)[-1]["params"]
    for r in results:
        for x, y in zip(r["after"], want, strict=True):
            torch.testing.assert_close(x, y, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", list(IDLE_SCRIPTS))
def test_model_zero_grad_then_a_rank_without_backward(two_ranks, name):
    """Finding 3: backward; step; model.zero_grad() (or p.grad = None), then a step in which one rank runs no backward
    (either rank): as torch.optim.AdamW on the grads averaged over the ranks, the idle rank adding zeros (refused on
    every rank in stage 2 before)."""
    _check_script(two_ranks, name)


@pytest.mark.parametrize(("zeroer", "idle"), [(0, 0), (1, 1), (0, 1), (1, 0)])
def test_model_zero_grad_on_one_rank_then_a_rank_without_backward_raises(two_ranks, zeroer, idle):
    """model.zero_grad() on one rank only, the other keeping its grads, then a step in which one rank runs no
    backward: still raised on every rank, the same message naming the zeroing on 1 of 2 ranks and the fix, twice,
    with nothing changed; then opt.zero_grad(), backward and step as torch."""
    results = [r[f"zeroed_idle/{zeroer}/{idle}"] for r in two_ranks]
    errors = [r["errors"] for r in results]
    assert errors[0][0] is not None and errors[0] == errors[1] and errors[0][0] == errors[0][1], errors
    assert "zeroed after the last step on 1 of 2 ranks (" in errors[0][0], errors[0][0]
    assert "call zero_grad() on every rank" in errors[0][0], errors[0][0]
    assert all(r["unchanged"] for r in results)

    def script(rank: int) -> list[tuple]:
        return [("B", 0, "abc"), ("T",), ("zero",), ("B", 2, "ab"), ("T",)]

    want = run_torch(script)[-1]["params"]
    for r in results:
        for x, y in zip(r["after"], want, strict=True):
            torch.testing.assert_close(x, y, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("idle", [0, 1])
@pytest.mark.parametrize("again", [False, True])
def test_model_zero_grad_after_a_step_with_an_idle_rank_raises_instead_of_a_wrong_step(two_ranks, idle, again):
    """After a step in which one rank had no batch, model.zero_grad() and a backward: raised on every rank (the
    same message, naming the idle rank's case and opt.zero_grad()), twice, nothing changed; then as torch."""
    results = [r[f"idle_then_mzero/{idle}/{again}"] for r in two_ranks]
    errors = [r["errors"] for r in results]
    assert errors[0][0] is not None and errors[0] == errors[1] and errors[0][0] == errors[0][1], errors
    assert "had no grads in the last step" in errors[0][0] and "opt.zero_grad()" in errors[0][0], errors[0][0]
    assert all(r["unchanged"] for r in results)
    ref = _params()
    opt = torch.optim.AdamW(list(ref.values()), lr=LR)
    for pos, ranks in ((0, (0, 1)), (1, (1 - idle,)), (3, (0, 1))):
        grads = [torch.autograd.grad(_loss(ref, pos, r, "abc"), list(ref.values())) for r in ranks]
        for k, p in enumerate(ref.values()):
            p.grad = sum(g[k] for g in grads) / WORLD
        opt.step()
    for r in results:
        for x, y in zip(r["after"], ref.values(), strict=True):
            torch.testing.assert_close(x, y.detach(), rtol=TOL, atol=TOL)
