"""ZeroAdamW's fp32 master shards follow writes into the bf16 params, as FusedAdamW's masters do.

The step updates the master shards and the all-gather overwrites the params with them rounded. Before, a write into
the params after the optimizer was built (the fine-tuning order: build the optimizer, then
``model.load_state_dict(pretrained)``) was lost at the first step: training went on from the constructor's weights.
Now each rank copies its segment of every param written since (its version counter moved) into its master first.
One rank, in process (the refresh is rank-local: each rank's masters follow its own params).
"""

from __future__ import annotations

import pytest
import torch

from fused_ops.distributed import ZeroAdamW
from tests.test_distributed import one_rank_group  # noqa: F401 - a fixture

pytestmark = pytest.mark.distributed


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(torch.bfloat16)


def _grads(model, k):
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * k + i)).to(p.dtype)


def _opt(model, stage, **kw):
    return ZeroAdamW(model.parameters(), lr=1e-3, stage=stage, master_weights=True, backend="reference", **kw)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("write", ["load_state_dict", "in_place"])
@pytest.mark.usefixtures("one_rank_group")
def test_weights_written_after_construction_are_trained_from(stage, steps_before, write):
    model = _model()
    opt = _opt(model, stage)
    for k in range(steps_before):
        _grads(model, k)
        opt.step()
        opt.zero_grad()
    loaded = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    if write == "load_state_dict":
        model.load_state_dict(loaded)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)
    masters_before = opt.state_dict()
    _grads(model, 9)
    opt.step()
    for p in model.parameters():
        assert (p.float() - 0.5).abs().max() < 0.01  # (before: the constructor's weights, 0.7 and more away)
    assert masters_before is not None


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.usefixtures("one_rank_group")
def test_resume_loading_the_model_after_the_optimizer_is_built(stage):
    """Model state first, then the optimizer's (into a ZeroAdamW built before both): the checkpoint's masters are
    the truth, the resumed run equals the uninterrupted one bit for bit. The other order warns at the optimizer's
    load (its masters do not round to the params of then, so the params are taken) and now trains from the model
    loaded after it (before, from the weights the model had when the optimizer was built)."""
    model = _model()
    opt = _opt(model, stage)
    for k in range(3):
        _grads(model, k)
        opt.step()
        opt.zero_grad()
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    for order in ("model_first", "optimizer_first"):
        resumed = _model(seed=1)
        ropt = _opt(resumed, stage)
        if order == "model_first":
            resumed.load_state_dict(model_sd)
            ropt.load_state_dict(opt_sd)
        else:
            with pytest.warns(UserWarning, match="do not round to the current params"):
                ropt.load_state_dict(opt_sd)
            resumed.load_state_dict(model_sd)
        for k in range(3, 6):
            _grads(resumed, k)
            ropt.step()
            ropt.zero_grad()
        if order == "model_first":
            for k in range(3, 6):
                _grads(model, k)
                opt.step()
                opt.zero_grad()
        for p, q in zip(model.parameters(), resumed.parameters()):
            if order == "model_first":
                assert torch.equal(p, q)
            else:  # (the masters restart from the bf16 params: within a few bf16 ulps)
                torch.testing.assert_close(p, q, rtol=0.02, atol=1e-3)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.usefixtures("one_rank_group")
def test_training_never_refreshes_a_master_from_its_param(stage, monkeypatch):
    """The optimizer's own writes (steps, skipped steps, all-gathers, zero_grad, state dict round trips) leave the
    masters alone: the same bits as with the refresh turned off."""
    runs = []
    for refresh in (True, False):
        if not refresh:
            monkeypatch.setattr(ZeroAdamW, "_refreshed_masters", lambda self: ([], [p._version for p in self._params]))
        model = _model()
        opt = _opt(model, stage)
        for k in range(6):
            _grads(model, k)
            if k == 2:  # (an overflow: the step is skipped)
                next(model.parameters()).grad[0, 0] = float("inf")
            opt.step(loss_scale=torch.tensor([1.0]) if k in (1, 2) else None)
            opt.zero_grad()
            if k == 4:
                opt.load_state_dict(opt.state_dict())
        runs.append([p.detach().clone() for p in model.parameters()] + [b.master.clone() for b in opt._buckets])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert any(not torch.equal(b.master, b.master.to(torch.bfloat16).float()) for b in opt._buckets)
