"""ZeroAdamW against torch.optim.AdamW where torch defines the behaviour:

- stage 2, grads set by hand (``p.grad = g``): the step uses what is in p.grad, as torch's does; a grad set by hand
  replaces the grads reduced before (by backward, or kept from before the last step without zero_grad), while
  backward without zero_grad still accumulates (1 rank in process; 2 gloo ranks in one spawn);
- the state-dict hooks inherited from ``torch.optim.Optimizer`` run in ``state_dict`` / ``load_state_dict`` (and
  the consolidated and DCP forms), as torch runs them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from fused_ops.distributed import ZeroAdamW
from tests.test_distributed import one_rank_group, spawn  # noqa: F401 - a fixture

pytestmark = pytest.mark.distributed

TOL = 1e-6
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpret)]


# -- the scripts ------------------------------------------------------------------------------------------------
# Tokens: "B" backward (synced), "N" backward under no_sync, "Sw" / "Sb" / "Sa" set the grad of the weight / the
# bias / both by hand, "Z" zero_grad, "T" step. A "@r" suffix: on rank r only (the others do nothing).
SCRIPTS = {
    "set_every_step": "Sa T Sa T Sa T",  # the reproducer: p.grad = g each step, no zero_grad
    "set_some_params": "B T Sw T B T Sb T",  # the bias keeps its grad (torch keeps p.grad), the weight is replaced
    "backward_then_set": "B Sw T B N Sb T",
    "set_then_backward": "B T Sw B T Sa N T Sb B B T",  # backward accumulates into the grad set by hand
    "accumulate_micro_steps": "B B T B N T N N T N B T",  # no zero_grad: accumulated across steps, as torch
    "no_sync_then_set": "N T N Sw B T",
    "zero_grad_and_set": "Z Sa T Z Sw B T Z B Sb T",
}
SCRIPTS_2RANKS = {
    "set_every_step": "Sa T Sa T Sa T",
    "set_some_params": "B T Sw T Sb B T",
    "set_then_backward": "B T Sa B T Sw N B T",
    "one_rank_sets_a_param_no_other_holds": "Sw@0 Sb T Sw@0 Sb T Sw@0 N@0 Sb T",
}


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 5)


def _data(pos: int, rank: int) -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(1000 * pos + rank))


def _hand_grad(p: torch.Tensor, pos: int, rank: int, k: int) -> torch.Tensor:
    return torch.randn(p.shape, generator=torch.Generator().manual_seed(7 + 1000 * pos + 100 * k + rank))


def _loss(model: _Model, x: torch.Tensor) -> torch.Tensor:
    return (model.lin(x).tanh() ** 2).sum()


def _params(model: _Model, what: str) -> list[tuple[int, torch.Tensor]]:
    ps = [model.lin.weight, model.lin.bias]
    return [(k, p) for k, p in enumerate(ps) if what == "a" or "wb"[k] == what]


def _parse(tok: str) -> tuple[str, int | None]:
    if "@" in tok:
        op, r = tok.split("@")
        return op, int(r)
    return tok, None


def run_zero(script: str, rank: int, world: int, stage: int, backend: str) -> list[list[torch.Tensor]]:
    """The script on this rank's ZeroAdamW; the params after each step."""
    torch.manual_seed(0)
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=stage, lr=0.05, backend=backend, bucket_cap_mb=1e-5)  # a bucket each
    out = []
    for pos, tok in enumerate(script.split()):
        op, only = _parse(tok)
        if only is not None and only != rank:
            continue
        if op in ("B", "N"):
            with opt.no_sync() if op == "N" else contextlib.nullcontext():
                _loss(model, _data(pos, rank)).backward()
        elif op[0] == "S":
            for k, p in _params(model, op[1]):
                p.grad = _hand_grad(p, pos, rank, k)
        elif op == "Z":
            opt.zero_grad()
        elif op == "T":
            opt.step()
            out.append([p.detach().clone() for p in model.parameters()])
    return out


def run_torch(script: str, world: int) -> list[list[torch.Tensor]]:
    """torch.optim.AdamW fed the average over the ranks of each rank's own torch grads (p.grad as torch keeps it
    on that rank: backward accumulates into it, a grad set by hand replaces it, zero_grad clears it)."""
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
            if op in ("B", "N"):
                for p in params:
                    p.grad = None
                _loss(model, _data(pos, r)).backward()
                for k, p in enumerate(params):
                    grads[r][k] = p.grad if grads[r][k] is None else grads[r][k] + p.grad
            elif op[0] == "S":
                for k, p in _params(model, op[1]):
                    grads[r][k] = _hand_grad(p, pos, r, k)
            elif op == "Z":
                grads[r] = [None, None]
        if op == "T":
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
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCRIPTS))
@pytest.mark.usefixtures("one_rank_group")
def test_stage2_grads_set_by_hand_match_torch(name, backend):
    script = SCRIPTS[name]
    want = run_torch(script, 1)
    for stage in (2, 1):
        _assert_close(run_zero(script, 0, 1, stage, backend), want)


# -- 2 ranks, one spawn ---------------------------------------------------------------------------------------
def _two_ranks(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for backend in ("reference", "triton"):
        for name, script in SCRIPTS_2RANKS.items():
            for stage in (2, 1):
                results[f"{name}/{backend}/stage{stage}"] = run_zero(script, rank, world, stage, backend)
    results["conflict"] = _conflict(rank)
    return results


def _conflict(rank: int) -> dict[str, Any]:
    """Both ranks set the weight's grad, step; then rank 0 alone sets it again: rank 1's share of the reduced grads
    cannot be replaced, so every rank raises the same error with nothing changed; zero_grad() and setting it again
    steps."""
    torch.manual_seed(0)
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    w, b = model.lin.weight, model.lin.bias
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = [t.clone() for t in (opt._buckets[0].grad, opt._buckets[0].exp_avg)]
    if rank == 0:
        w.grad = torch.full_like(w, 2.0)
    error = None
    try:
        opt.step()
    except RuntimeError as e:
        error = str(e)
    unchanged = all(torch.equal(x, y) for x, y in zip(before, model.parameters(), strict=True)) and all(
        torch.equal(x, y) for x, y in zip(state, (opt._buckets[0].grad, opt._buckets[0].exp_avg), strict=True)
    )
    opt.zero_grad()
    w.grad, b.grad = torch.full_like(w, 2.0), torch.ones_like(b)
    opt.step()
    return {"error": error, "unchanged": unchanged, "after": [p.detach().clone() for p in model.parameters()]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn("tests.test_zero_parity:_two_ranks", 2, str(tmp_path_factory.mktemp("parity")), timeout=240)


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(SCRIPTS_2RANKS))
def test_stage2_grads_set_by_hand_match_torch_2ranks(two_ranks, name):
    want = run_torch(SCRIPTS_2RANKS[name], 2)
    for r in two_ranks:
        for backend in ("reference", "triton"):
            for stage in (2, 1):
                _assert_close(r[f"{name}/{backend}/stage{stage}"], want)


@pytest.mark.interpret
def test_stage2_grad_set_on_one_rank_over_shared_grads_raises_everywhere(two_ranks):
    errors = [r["conflict"]["error"] for r in two_ranks]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert "set by hand" in errors[0] and "param 0" in errors[0]
    assert all(r["conflict"]["unchanged"] for r in two_ranks)
    for x, y in zip(two_ranks[0]["conflict"]["after"], two_ranks[1]["conflict"]["after"], strict=True):
        assert torch.equal(x, y)


# -- state-dict hooks -------------------------------------------------------------------------------------------
def _hooked(opt: Any, log: list) -> None:
    opt.register_state_dict_pre_hook(lambda o: log.append(("sd_pre", o is opt)))

    def post(o, sd):
        log.append(("sd_post", o is opt))
        return {**sd, "extra": 1}

    opt.register_state_dict_post_hook(post)

    def load_pre(o, sd):
        log.append(("load_pre", o is opt, sd.get("extra")))
        sd = dict(sd)
        sd.pop("extra")
        sd["param_groups"] = [{**g, "lr": 0.5} for g in sd["param_groups"]]  # honoured: what is loaded
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: log.append(("load_post", o.param_groups[0]["lr"])))


@pytest.mark.usefixtures("one_rank_group")
def test_state_dict_hooks_run_as_torch():
    logs = {}
    for kind in ("torch", "zero"):
        p = torch.nn.Parameter(torch.ones(8))
        opt = torch.optim.AdamW([p], lr=0.01) if kind == "torch" else ZeroAdamW([p], lr=0.01, backend="reference")
        log: list = []
        _hooked(opt, log)
        p.grad = torch.ones(8)
        opt.step()
        sd = opt.state_dict()
        assert sd["extra"] == 1
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.5
        logs[kind] = log
    assert logs["zero"] == logs["torch"]
    assert logs["zero"] == [("sd_pre", True), ("sd_post", True), ("load_pre", True, 1), ("load_post", 0.5)]

    # The consolidated and DCP forms run the same hooks.
    p = torch.nn.Parameter(torch.ones(8))
    opt = ZeroAdamW([p], lr=0.01, backend="reference")
    log = []
    _hooked(opt, log)
    full = opt.consolidated_state_dict()
    assert full["extra"] == 1
    opt.load_state_dict(full)
    dcp_sd = opt.dcp_state_dict()
    assert dcp_sd["extra"] == 1
    opt.load_dcp_state_dict(dcp_sd)
    assert [e[0] for e in log] == ["sd_pre", "sd_post", "load_pre", "load_post"] * 2


@pytest.mark.usefixtures("one_rank_group")
def test_state_dict_hook_that_raises_changes_nothing():
    p = torch.nn.Parameter(torch.ones(8))
    opt = ZeroAdamW([p], lr=0.01, backend="reference")
    p.grad = torch.ones(8)
    opt.step()
    sd = opt.state_dict()

    class Boom(Exception):
        pass

    def boom(*args):
        raise Boom("hook")

    h = opt.register_load_state_dict_pre_hook(boom)
    sd["param_groups"][0]["lr"] = 0.7
    exp_avg = opt._buckets[0].exp_avg.clone()
    with pytest.raises(Boom):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.01 and torch.equal(opt._buckets[0].exp_avg, exp_avg)
    h.remove()
    for register in (opt.register_state_dict_pre_hook, opt.register_state_dict_post_hook):
        h = register(boom)
        for call in (opt.state_dict, opt.consolidated_state_dict, opt.dcp_state_dict):
            with pytest.raises(Boom):
                call()
        h.remove()
    opt.load_state_dict(sd)  # without the hooks: loads
    assert opt.param_groups[0]["lr"] == 0.7
