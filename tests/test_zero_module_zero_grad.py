"""ZeroAdamW against torch.optim.AdamW when the grads are zeroed by the model, not the optimizer.

Stage 2 keeps each param's reduced grads in the grad shards (p.grad is freed), and keeps them after ``step()`` for
the next step, as torch keeps p.grad until it is zeroed. ``model.zero_grad()`` (with or without ``set_to_none``) and
``p.grad = None`` must clear them as they clear torch's grads: before, p.grad already read None after a step, so
these calls changed nothing and every step used the running sum of all earlier grads. Here the usual loops
(``backward; step; model.zero_grad()``, with no_sync accumulation, a closure that zeroes) match torch.optim.AdamW fed
the grads averaged over the ranks, in stage 2 and stage 1, on 1 rank in process and on 2 gloo ranks in one spawn; a
rank that zeroes where another does not raises the same error on every rank, with nothing changed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from fused_ops.distributed import ZeroAdamW
from tests.safety import step_messages
from tests.test_distributed import one_rank_group, spawn  # noqa: F401 - a fixture

pytestmark = pytest.mark.distributed

TOL = 1e-6

# Tokens: "B" backward (synced), "N" backward under no_sync, "T" step, "C" step(closure) whose closure calls
# model.zero_grad() and backward; the zeroing: "Zo" opt.zero_grad(), "Zm" model.zero_grad(), "Zf"
# model.zero_grad(set_to_none=False), "Zn" p.grad = None for every param, "Zw" p.grad = None for the weight only.
# A "@r" suffix: on rank r only (the others do nothing).
SCRIPTS = {
    "no_zeroing": "B T B T B T",  # accumulates across steps, as torch does
    "opt_zero_grad": "B T Zo B T Zo B T",
    "model_zero_grad": "B T Zm B T Zm B T Zm B T",
    "model_zero_grad_keep": "B T Zf B T Zf B T Zf B T",
    "grad_none_by_hand": "B T Zn B T Zn B T",
    "weight_only": "B T Zw B T B T Zw B T",
    "no_sync_micro_batches": "N B T Zm N N B T Zf N B T Zm N B T",
    "mixed": "B T Zm B T B T Zf N B T Zo B T Zn B B T",
    "zeroed_after_no_sync": "B T N Zn B T N Zw B T",
    "zeroed_twice": "B T Zm Zm B T Zf Zm B T",
}
SCRIPTS_1RANK = {**SCRIPTS, "closure": "B T C C B T C"}


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 5)


def _data(pos: int, rank: int) -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(1000 * pos + rank))


def _loss(model: _Model, x: torch.Tensor) -> torch.Tensor:
    return (model.lin(x).tanh() ** 2).sum()


def _parse(tok: str) -> tuple[str, int | None]:
    if "@" in tok:
        op, r = tok.split("@")
        return op, int(r)
    return tok, None


def _zero(model: _Model, opt: Any, op: str) -> None:
    if op == "Zo":
        opt.zero_grad()
    elif op == "Zm":
        model.zero_grad()
    elif op == "Zf":
        model.zero_grad(set_to_none=False)
    elif op == "Zn":
        for p in model.parameters():
            p.grad = None
    elif op == "Zw":
        model.lin.weight.grad = None
    else:
        raise ValueError(op)


def run_zero(script: str, rank: int, stage: int, backend: str = "reference") -> list[list[torch.Tensor]]:
    """The script on this rank's ZeroAdamW (a bucket per param); the params after each step."""
    torch.manual_seed(0)
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=stage, lr=0.05, backend=backend, bucket_cap_mb=1e-5)
    out = []
    for pos, tok in enumerate(script.split()):
        op, only = _parse(tok)
        if only is not None and only != rank:
            continue
        if op in ("B", "N"):
            with opt.no_sync() if op == "N" else contextlib.nullcontext():
                _loss(model, _data(pos, rank)).backward()
        elif op[0] == "Z":
            _zero(model, opt, op)
        elif op in ("T", "C"):

            def closure(pos: int = pos) -> torch.Tensor:
                model.zero_grad()
                loss = _loss(model, _data(pos, rank))
                loss.backward()
                return loss

            opt.step(closure if op == "C" else None)
            out.append([p.detach().clone() for p in model.parameters()])
    return out


def run_torch(script: str, world: int) -> list[list[torch.Tensor]]:
    """torch.optim.AdamW fed the average over the ranks of each rank's own torch grads (p.grad as torch keeps it on
    that rank: backward accumulates into it, each zeroing clears it)."""
    torch.manual_seed(0)
    model = _Model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    params = list(model.parameters())
    grads: list[list[torch.Tensor | None]] = [[None, None] for _ in range(world)]
    out = []
    for pos, tok in enumerate(script.split()):
        op, only = _parse(tok)
        for r in range(world):
            if only is not None and only != r:
                continue
            if op in ("B", "N") or op == "C":
                if op == "C":
                    grads[r] = [None, None]
                for p in params:
                    p.grad = None
                _loss(model, _data(pos, r)).backward()
                for k, p in enumerate(params):
                    grads[r][k] = p.grad if grads[r][k] is None else grads[r][k] + p.grad
            elif op in ("Zo", "Zm", "Zf", "Zn"):
                grads[r] = [None, None]
            elif op == "Zw":
                grads[r][0] = None
        if op in ("T", "C"):
            for k, p in enumerate(params):
                per_rank = [g[k] for g in grads if g[k] is not None]
                assert per_rank, "a param without a grad on every rank (ZeroAdamW steps it, torch skips it)"
                p.grad = sum(per_rank) / world
            opt.step()
            out.append([p.detach().clone() for p in params])
    return out


def _assert_close(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=TOL, atol=TOL, msg=lambda m, s=step: f"after step {s}: {m}")


# -- 1 rank, in process -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 1])
@pytest.mark.parametrize("name", list(SCRIPTS_1RANK))
@pytest.mark.usefixtures("one_rank_group")
def test_model_zero_grad_matches_torch(name, stage):
    script = SCRIPTS_1RANK[name]
    _assert_close(run_zero(script, 0, stage), run_torch(script, 1))


@pytest.mark.interpret
@pytest.mark.usefixtures("one_rank_group")
def test_model_zero_grad_matches_torch_triton():
    script = SCRIPTS["mixed"]
    _assert_close(run_zero(script, 0, 2, backend="triton"), run_torch(script, 1))


@pytest.mark.usefixtures("one_rank_group")
def test_grad_after_step_reads_zeros_and_backward_accumulates():
    """After a step, a param with held grads reads a zero-stride zero tensor, not a grad: backward replaces it, the
    optimizer's own zero_grad() clears it, and its memory is one element."""
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    _loss(model, _data(0, 0)).backward()
    assert all(p.grad is None for p in model.parameters())  # (freed by the synced pass, as before)
    opt.step()
    params = list(model.parameters())
    for p in params:
        assert p.grad is not None and p.grad.shape == p.shape and set(p.grad.stride()) == {0}
        assert p.grad.untyped_storage().nbytes() == len(params) * p.element_size() and not p.grad.any()
    assert len({p.grad.data_ptr() for p in params}) == len(params)  # (one element each)
    sentinels = [p.grad for p in model.parameters()]
    opt.step()  # (no backward: the held grads are stepped again, the sentinels stay)
    assert all(p.grad is s for p, s in zip(model.parameters(), sentinels, strict=True))
    with opt.no_sync():
        _loss(model, _data(1, 0)).backward()
    assert all(p.grad is not None and p.grad.stride() == p.stride() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.usefixtures("one_rank_group")
def test_writing_into_one_sentinel_never_shows_in_another():
    """fill_ (allowed on a zero-stride tensor) or any write into a one-element param's sentinel lands in that
    sentinel's own element: the other params' grads still read zeros, and the written one counts as zeroed (its
    kept grads are dropped, as for model.zero_grad(set_to_none=False)). They shared one element before."""
    model = _Model()
    scale = torch.nn.Parameter(torch.tensor(1.5))
    opt = ZeroAdamW([*model.parameters(), scale], stage=2, lr=0.05, backend="reference")
    (_loss(model, _data(0, 0)) * scale).backward()
    opt.step()
    scale.grad.add_(3.0)
    model.lin.bias.grad.fill_(7.0)
    assert not model.lin.weight.grad.any()
    assert scale.grad.item() == 3.0 and bool((model.lin.bias.grad == 7.0).all())
    opt.zero_grad()
    assert all(p.grad is None for p in [*model.parameters(), scale])


@pytest.mark.parametrize("zero", ["Zm", "Zf", "Zn"])
@pytest.mark.usefixtures("one_rank_group")
def test_failed_step_after_model_zero_grad_changes_nothing(zero):
    """A step that fails after the model zeroed the grads leaves p.grad as it was (the same tensor, the same
    version) and the shards; fixed and retried after a backward, it matches torch."""
    torch.manual_seed(0)
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    _loss(model, _data(0, 0)).backward()
    opt.step()
    _zero(model, opt, zero)
    before = [(p.grad, None if p.grad is None else p.grad._version) for p in model.parameters()]
    shards = [(b.grad.clone(), b.exp_avg.clone()) for b in opt._buckets]
    params = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = -1.0
    for _ in range(2):
        with pytest.raises(ValueError, match="learning rate"):
            opt.step()
        assert [(p.grad, None if p.grad is None else p.grad._version) for p in model.parameters()] == before
        for (g, m), b in zip(shards, opt._buckets, strict=True):
            assert torch.equal(g, b.grad) and torch.equal(m, b.exp_avg)
        assert all(torch.equal(x, p) for x, p in zip(params, model.parameters(), strict=True))
    opt.param_groups[0]["lr"] = 0.05
    _loss(model, _data(3, 0)).backward()  # (the positions of "B T Zm B T")
    opt.step()
    got = [p.detach().clone() for p in model.parameters()]
    _assert_close([got], run_torch("B T Zm B T", 1)[1:])


@pytest.mark.usefixtures("one_rank_group")
def test_loss_scale_and_state_dict_unchanged():
    """step(loss_scale=scaler) and the state dict are as without sentinels: the same params after a loop that zeroes
    through the model and through the optimizer, and state dicts that load into each other."""
    from fused_ops import DynamicLossScaler

    results, states = [], []
    for zero in ("Zm", "Zo"):
        torch.manual_seed(0)
        model = _Model()
        opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
        scaler = DynamicLossScaler(init_scale=2.0**4)
        for pos in range(3):
            (_loss(model, _data(pos, 0)) * scaler.scale).backward()
            opt.step(loss_scale=scaler)
            scaler.update()
            _zero(model, opt, zero)
        results.append([p.detach().clone() for p in model.parameters()])
        states.append(opt.state_dict())
        opt.load_state_dict(states[0])
    _assert_close([results[0]], [results[1]])
    for k in states[0]["state"]:
        for key, v in states[0]["state"][k].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, states[1]["state"][k][key]), (k, key)


# -- 2 ranks, one spawn ---------------------------------------------------------------------------------------
def _two_ranks(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, script in SCRIPTS.items():
        for stage in (2, 1):
            results[f"{name}/stage{stage}"] = run_zero(script, rank, stage)
    for zero in ("Zm", "Zf", "Zn", "Zo"):
        results[f"conflict/{zero}"] = _conflict(rank, zero)
    results["conflict_backward"] = _conflict_backward(rank)
    results["conflict_backward/Zo"] = _conflict_backward(rank, "Zo")
    results["discarded_one_rank_batch"] = _discarded_one_rank_batch(rank)
    return results


def _conflict_backward(rank: int, zero: str = "Zm") -> dict[str, Any]:
    """A step, rank 0 alone calls model.zero_grad() (or opt.zero_grad(): ``zero``), a backward on every rank: rank 0
    dropped its shards (every held grad zeroed, as zero_grad() drops them), rank 1 kept them: the step raises the same
    error on every rank, the params unchanged, and again until opt.zero_grad() on every rank; then it steps as torch
    does. (With opt.zero_grad() the step took rank 1's kept grads on the half it owns and not on rank 0's, no rank
    raising: probe 76.)"""
    torch.manual_seed(0)
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    _loss(model, _data(0, rank)).backward()
    opt.step()
    if rank == 0:
        _zero(model, opt, zero)
    _loss(model, _data(1, rank)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    errors = step_messages(opt)
    unchanged = all(torch.equal(x, y) for x, y in zip(before, model.parameters(), strict=True))
    opt.zero_grad()
    _loss(model, _data(3, rank)).backward()
    opt.step()
    return {"errors": errors, "unchanged": unchanged, "after": [p.detach().clone() for p in model.parameters()]}


def _discarded_one_rank_batch(rank: int) -> dict[str, Any]:
    """Stage 1: after a step, only rank 1 has a batch (rank 0 none: legal), every rank discards it with
    opt.zero_grad() (a NaN loss, a closure that failed), then every rank steps: every p.grad is None on every rank,
    nothing to mix. It was refused ("zero_grad() was called between backward and step on 1 of 2 ranks"), and again
    after another zero_grad() on every rank, until a backward on every rank (probe 76); it steps now."""
    torch.manual_seed(0)
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=1, lr=0.05, backend="reference")
    _loss(model, _data(0, rank)).backward()
    opt.step()
    opt.zero_grad()
    if rank == 1:
        _loss(model, _data(1, rank)).backward()
    opt.zero_grad()
    errors = step_messages(opt, times=1)
    _loss(model, _data(2, rank)).backward()
    errors += step_messages(opt, times=1)
    return {"errors": errors, "after": [p.detach().clone() for p in model.parameters()]}


def _conflict(rank: int, zero: str) -> dict[str, Any]:
    """A step, then rank 0 alone zeroes its grads through the model, and a step without backward: rank 1's share of
    the held grads cannot be dropped alone (the shards hold their sum), so every rank raises the same error with
    nothing changed (p.grad included), again on a retry; opt.zero_grad() on every rank and a backward then step as
    torch does."""
    torch.manual_seed(0)
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    _loss(model, _data(0, rank)).backward()
    opt.step()
    if rank == 0:
        _zero(model, opt, zero)
    grads = [(p.grad, None if p.grad is None else p.grad._version) for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    state = [t.clone() for b in opt._buckets for t in (b.grad, b.exp_avg, b.exp_avg_sq)]
    errors = step_messages(opt)  # (raised again, the same)
    unchanged = (
        all(torch.equal(x, y) for x, y in zip(before, model.parameters(), strict=True))
        and all(
            torch.equal(x, y)
            for x, y in zip(state, [t for b in opt._buckets for t in (b.grad, b.exp_avg, b.exp_avg_sq)], strict=True)
        )
        and [(p.grad, None if p.grad is None else p.grad._version) for p in model.parameters()] == grads
    )
    opt.zero_grad()
    _loss(model, _data(3, rank)).backward()
    opt.step()
    return {"errors": errors, "unchanged": unchanged, "after": [p.detach().clone() for p in model.parameters()]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn("tests.test_zero_module_zero_grad:_two_ranks", 2, str(tmp_path_factory.mktemp("zg")), timeout=240)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_model_zero_grad_matches_torch_2ranks(two_ranks, name):
    want = run_torch(SCRIPTS[name], 2)
    for r in two_ranks:
        for stage in (2, 1):
            _assert_close(r[f"{name}/stage{stage}"], want)


@pytest.mark.parametrize("zero", ["Zm", "Zf", "Zn", "Zo"])
def test_zero_grad_on_one_rank_raises_everywhere(two_ranks, zero):
    results = [r[f"conflict/{zero}"] for r in two_ranks]
    errors = [r["errors"] for r in results]
    assert errors[0][0] is not None and errors[0] == errors[1], errors
    assert errors[0][0] == errors[0][1]
    # (rank 0 zeroed every grad it kept, rank 1 none: refused as after a backward, see _conflict_backward; before,
    # the step handled each param on its own and named the first one, "param 0")
    assert "zeroed after the last step on 1 of 2 ranks (" in errors[0][0], errors[0][0]
    assert "1 rank(s) kept reduced grads" in errors[0][0] and "call zero_grad() on every rank" in errors[0][0]
    assert all(r["unchanged"] for r in results)
    want = run_torch("B T Zo B T", 2)[1]
    for r in results:
        _assert_close([r["after"]], [want])


@pytest.mark.parametrize("key", ["conflict_backward", "conflict_backward/Zo"])
def test_model_zero_grad_on_one_rank_then_backward_raises_everywhere(two_ranks, key):
    results = [r[key] for r in two_ranks]
    errors = [r["errors"] for r in results]
    assert errors[0][0] is not None and errors[0] == errors[1] and errors[0][0] == errors[0][1], errors
    assert "on 1 of 2 ranks" in errors[0][0] and "zero_grad() on every rank" in errors[0][0]
    assert all(r["unchanged"] for r in results)
    want = run_torch("B T Zo B T", 2)[1]
    for r in results:
        _assert_close([r["after"]], [want])


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("overlap_comm", [True, False])
def test_backward_leaves_no_collective_pending(overlap_comm):
    """A synced backward waits for its collectives at its end (as DDP does): none is left pending after backward()
    returns, so a run that ends after a backward (then destroy_process_group() and exit) has nothing for gloo to abort
    on at exit ('terminate called without an active exception'). The next step steps what the pass reduced."""
    model = _Model()
    ref = _Model()
    ref.load_state_dict(model.state_dict())
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference", overlap_comm=overlap_comm,
                    bucket_cap_mb=64 / 2**20)  # fmt: skip
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    for k in range(2):
        _loss(model, _data(k, 0)).backward()
        assert not opt._inflight and (opt._round_header is None or opt._round_header[1] is None)
        opt.step()
        model.zero_grad()
        _loss(ref, _data(k, 0)).backward()
        torch_opt.step()
        torch_opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.usefixtures("one_rank_group")
def test_autograd_grad_after_step_leaves_the_sentinel():
    """torch.autograd.grad over the params between a step and model.zero_grad() accumulates nothing, so it must not
    take the sentinel out (it did, from a hook on the param: model.zero_grad() then found nothing to zero and the
    kept grads were stepped again). The hook before accumulation is on the AccumulateGrad node now."""
    model = _Model()
    ref = _Model()
    ref.load_state_dict(model.state_dict())
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    for k in range(3):
        for m, o in ((model, opt), (ref, torch_opt)):
            _loss(m, _data(k, 0)).backward()
            o.step()
            torch.autograd.grad(_loss(m, _data(10 + k, 0)), list(m.parameters()))
            m.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_a_batch_one_rank_had_discarded_everywhere_steps_in_stage_1(two_ranks):
    results = [r["discarded_one_rank_batch"] for r in two_ranks]
    assert all(r["errors"] == [None, None] for r in results), [r["errors"] for r in results]
    for a, b in zip(results[0]["after"], results[1]["after"], strict=True):
        assert torch.equal(a, b)
