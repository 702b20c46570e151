"""ZeroAdamW under module operations that replace or move its params' tensors (probe 53, findings 3 and 4).

3. Under ``torch.__future__.set_swap_module_params_on_conversion(True)`` the ``nn.Module`` conversions swap each param
   (and its grad) with a new tensor through ``torch.utils.swap_tensors``, which refuses a tensor that has a weak
   reference. Stage 2 kept its grad hooks and its sentinel grads in ``WeakIdKeyDictionary``s keyed by those tensors,
   so every conversion failed, no-ops included (``model.float()`` of an fp32 model, ``model.to("cpu")`` of a CPU
   model), with torch's unrelated "Cannot swap t1 because it has weakref associated with it", and ``model.half()``
   never reached ZeroAdamW's own error. Now a no-op conversion trains on as without it (the params' grad hooks, lost
   with their old tensors, are put back by the next step; that step reduces the grads of the backward in between),
   and ``model.half()`` is refused at the next step: "no longer a view of ZeroAdamW's flat buffer".
4. ``model.share_memory()`` moves each storage into shared memory in place (the same storage object, the same size, a
   new address; the params are still views of it). Every step was refused with "the storage of ZeroAdamW's flat
   buffer ... was freed or resized", where torch.optim and FusedAdamW train on. Now the step reads the new addresses
   and trains on; a param that is no longer its view after the move is refused with "moved (e.g. by
   share_memory())", and a storage freed and allocated again is still refused as freed.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from fused_ops.distributed import ZeroAdamW, _reduce
from tests.test_distributed import one_rank_group, spawn  # noqa: F401 - a fixture

pytestmark = pytest.mark.distributed

STEPS = 4
CONVERT_AT = (1, 2)  # the steps before whose forward the model is converted (after opt.zero_grad())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _loss(model: torch.nn.Module, pos: int, rank: int) -> torch.Tensor:
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1000 * pos + rank))
    return (model(x.to(model[0].weight.dtype)) ** 2).sum()


@contextlib.contextmanager
def _swap_flag(on: bool) -> Iterator[None]:
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(on)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)


def _share(model: torch.nn.Module) -> None:
    model.share_memory()


OPS: dict[str, Callable[[torch.nn.Module], Any] | None] = {
    "none": None,
    "float": lambda m: m.float(),
    "to_cpu": lambda m: m.to("cpu"),
    "share_memory": _share,
}


def _train(rank: int, stage: int, op: str, swap: bool, backend: str = "reference") -> dict[str, Any]:
    """STEPS steps of the usual loop (backward; step; zero_grad), the model converted by ``op`` before the forward of
    the steps in CONVERT_AT. Returns the params after each step, whether each backward reduced every grad (stage 2:
    p.grad None after it, the grad hooks in place), and the error, if any."""
    out: dict[str, Any] = {"params": [], "reduced": [], "error": None}
    with _swap_flag(swap):
        model = _model()
        opt = ZeroAdamW(model.parameters(), stage=stage, lr=0.05, bucket_cap_mb=1e-4, backend=backend)
        try:
            for k in range(STEPS):
                if k in CONVERT_AT and OPS[op] is not None:
                    OPS[op](model)
                _loss(model, k, rank).backward()
                out["reduced"].append(all(p.grad is None for p in model.parameters()))
                opt.step()
                opt.zero_grad()
                out["params"].append([p.detach().clone() for p in model.parameters()])
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["error"] = f"{type(e).__name__}: {e} <- {e.__cause__!r}"
    return out


def _step_error(rank: int, stage: int, edit: Callable[[torch.nn.Module, int], Any], swap: bool = False) -> str:
    """One step, then ``edit(model, rank)`` after zero_grad(), a backward, and the step's error message."""
    with _swap_flag(swap):
        model = _model()
        opt = ZeroAdamW(model.parameters(), stage=stage, lr=0.05, bucket_cap_mb=1e-4, backend="reference")
        _loss(model, 0, rank).backward()
        opt.step()
        opt.zero_grad()
        try:
            held = edit(model, rank)  # noqa: F841 - kept until the step
        except Exception as e:  # noqa: BLE001 - reported to the test
            return f"edit raised {type(e).__name__}: {e} <- {e.__cause__!r}"
        _loss(model, 1, rank).backward()
        try:
            opt.step()
        except RuntimeError as e:
            return str(e)
        return "no error"


def _clone_on_rank1(model: torch.nn.Module, rank: int) -> None:
    model.share_memory()
    if rank == 1:
        model[0].bias.data = model[0].bias.data.clone()


def _realloc_on_rank0(model: torch.nn.Module, rank: int) -> list[torch.Tensor]:
    """Rank 0 frees param 1's storage and allocates it again at its size (contents lost), at another address: the
    freed block is taken first (malloc could give it back)."""
    held = []
    if rank == 0:
        storage = model[0].bias.untyped_storage()
        nbytes, old = storage.nbytes(), storage.data_ptr()
        for _ in range(8):
            storage.resize_(0)
            held.append(torch.empty(nbytes, dtype=torch.uint8))
            storage.resize_(nbytes)
            if storage.data_ptr() != old:
                break
        assert storage.data_ptr() != old
    return held


def _two_ranks(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for stage in (1, 2):
        for op, swap in (("none", False), ("float", True), ("to_cpu", True), ("share_memory", True),
                         ("share_memory", False)):  # fmt: skip
            res[(stage, op, swap)] = _train(rank, stage, op, swap)
        res[(stage, "half")] = _step_error(rank, stage, lambda m, r: m.half(), swap=True)
        res[(stage, "clone")] = _step_error(rank, stage, _clone_on_rank1)
        res[(stage, "realloc")] = _step_error(rank, stage, _realloc_on_rank0)
    res["triton"] = [_train(rank, 1, op, False, backend="triton") for op in ("none", "share_memory")]
    return res


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn("tests.test_zero_module_ops:_two_ranks", 2, str(tmp_path_factory.mktemp("zmo")), timeout=240)


def _same_training(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["error"] is None and want["error"] is None, (got["error"], want["error"])
    for step, (a, b) in enumerate(zip(got["params"], want["params"], strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m, s=step: f"after step {s}: {m}")


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("op", ["float", "to_cpu", "share_memory"])
def test_noop_conversion_under_swap_flag_trains_on(two_ranks, op, stage):
    """A no-op conversion under the swap flag (a raised "has weakref" error in stage 2 before; share_memory() was
    refused as freed in both stages): the same params, bit for bit, as without it. In stage 2 the backward after a
    conversion leaves its grads in p.grad (the hooks went with the old tensors) and the step reduces them; the step
    hooks the params again, so the next backward reduces during backward."""
    for r in two_ranks:
        _same_training(r[(stage, op, True)], r[(stage, "none", False)])
        if stage == 2:
            assert r[(stage, op, True)]["reduced"] == [k not in CONVERT_AT for k in range(STEPS)]


@pytest.mark.parametrize("stage", [1, 2])
def test_share_memory_trains_on(two_ranks, stage):
    """model.share_memory() (swap flag off): the step reads the buffer's new address and trains on, bit for bit;
    the params' grad hooks stay (share_memory_() moves the storage, not the params' tensors)."""
    for r in two_ranks:
        _same_training(r[(stage, "share_memory", False)], r[(stage, "none", False)])
        if stage == 2:
            assert r[(stage, "share_memory", False)]["reduced"] == [True] * STEPS


def test_share_memory_trains_on_triton(two_ranks):
    """The same on the Triton backend (stage 1): its chunk tables are rebuilt for the new addresses."""
    for r in two_ranks:
        _same_training(r["triton"][1], r["triton"][0])


@pytest.mark.parametrize("stage", [1, 2])
def test_half_under_swap_flag_is_refused_by_zero(two_ranks, stage):
    """model.half() under the swap flag converts the model (stage 2 raised torch's "has weakref" error before), and
    the next step raises ZeroAdamW's own error on every rank."""
    for r in two_ranks:
        msg = r[(stage, "half")]
        assert "no longer a view of ZeroAdamW's flat buffer" in msg, msg
        assert "torch.float16" in msg and "final device and dtype" in msg, msg


@pytest.mark.parametrize("stage", [1, 2])
def test_param_replaced_after_share_memory_says_moved(two_ranks, stage):
    """share_memory() on every rank, then rank 1 gives a param another .data: every rank raises, and the message
    says that the buffer moved (e.g. by share_memory()) and which param is no longer its view."""
    for r in two_ranks:
        msg = r[(stage, "clone")]
        assert "moved (e.g. by share_memory())" in msg and "param 1 is no longer its view" in msg, msg
        assert "rank 1" in msg and "freed" not in msg, msg


@pytest.mark.parametrize("stage", [1, 2])
def test_storage_freed_and_allocated_again_is_refused(two_ranks, stage):
    """A storage freed and allocated again at its size (resize_(0), then resize_(n): a new address, contents lost)
    did not move into shared memory: still refused as freed, on every rank."""
    for r in two_ranks:
        msg = r[(stage, "realloc")]
        assert "freed and allocated again" in msg and "rank 0" in msg, msg


# -- 1 rank, in process -----------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_rank_group")
def test_one_rank_no_weakrefs_and_hooks_follow_swaps():
    """Stage 2 takes no weak reference to the params or to the sentinels it puts in p.grad (swap_tensors refuses
    such tensors). A no-op conversion under the swap flag leaves the newest optimizer's _HOOKS entries for the
    params; its next step replaces them with hooks on the new tensors (the newest optimizer still owns them), and
    once both optimizers are freed their _HOOKS and _SENTINELS entries are gone."""
    gc.collect()
    before = (len(_reduce._HOOKS), len(_reduce._SENTINELS))
    with _swap_flag(True):
        model = _model()
        params = list(model.parameters())
        first = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
        with pytest.warns(UserWarning, match="larger storage"):  # (the params are views of first's buffers)
            second = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
        _loss(model, 0, 0).backward()
        second.step()  # (sentinels in p.grad)
        assert all(p.grad is not None and set(p.grad.stride()) == {0} for p in params)
        assert not any(weakref.getweakrefs(t) for p in params for t in (p, p.grad))
        second.zero_grad()
        hooks = [_reduce._HOOKS[p] for p in params]
        model.float()  # (raised "Cannot swap t1 because it has weakref associated with it" before)
        model.to("cpu")
        assert [_reduce._HOOKS[p] for p in params] == hooks
        _loss(model, 1, 0).backward()
        assert all(p.grad is not None for p in params)  # (no hooks on the new tensors: reduced by the step)
        second.step()
        new = [_reduce._HOOKS[p] for p in params]
        assert all(h is not old for h, old in zip(new, hooks, strict=True))
        assert {id(h) for h in second._hook_handles} == {id(h) for h in new}
        second.zero_grad()
        _loss(model, 2, 0).backward()
        assert all(p.grad is None for p in params)  # (reduced during backward: hooked again)
        second.step()
    del first, second
    gc.collect()
    assert (len(_reduce._HOOKS), len(_reduce._SENTINELS)) == before
    assert all(p.grad is None for p in params)


def _kept_then_no_sync(convert: bool) -> list[torch.Tensor]:
    """A step that keeps its grads (no zero_grad), a no_sync backward (p.grad holds its grads, which the hooks saw),
    a no-op conversion or not, a synced backward and a step."""
    with _swap_flag(True):
        model = _model()
        opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
        _loss(model, 0, 0).backward()
        opt.step()
        with opt.no_sync():
            _loss(model, 1, 0).backward()
        grads = [p.grad for p in model.parameters()]
        if convert:
            assert not any(weakref.getweakrefs(g) for g in grads)
            model.float()  # (raised "Couldn't swap Linear.weight.grad" before, and left weight.grad None)
            assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
        _loss(model, 2, 0).backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()]


@pytest.mark.usefixtures("one_rank_group")
def test_one_rank_conversion_with_kept_and_no_sync_grads():
    """The grads a no_sync backward accumulated over kept ones are told from grads set by hand without a weak
    reference to them: a no-op conversion there keeps them, and the step gives what it gives without it."""
    for x, y in zip(_kept_then_no_sync(True), _kept_then_no_sync(False), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
