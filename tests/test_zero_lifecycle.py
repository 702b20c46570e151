"""ZeroAdamW's lifetime: what is left behind once it is freed, and copies of the whole object.

Stage 2 gives each param whose reduced grads it keeps a zero-stride sentinel as p.grad after a step, and keeps each
param's grad hooks (with its AccumulateGrad node, which holds the param) in ``_reduce._HOOKS``. Before, both outlived
the optimizer: after ``del opt`` (before ``zero_grad()``) the next backward raised torch's "more than one element of
the written-to tensor refers to a single memory location", and after ``del model, opt`` the params and the flat buffers
stayed alive for good (the ``_HOOKS`` entry kept its own weak key alive). Now, once it is freed, its hooks go and a
sentinel still in p.grad reads None (the kept grads were its shards, gone with it); other grads stay. And
``copy.copy``/``copy.deepcopy``/``pickle``/``torch.save`` of the whole optimizer, which gave an object without any of
its state that failed in every method, raise a TypeError pointing to the state dicts.
"""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import subprocess
import sys
import textwrap
import time
import weakref
from collections.abc import Callable

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from fused_ops.distributed import ZeroAdamW, _reduce
from tests.test_distributed import one_rank_group  # noqa: F401 - a fixture
from tests.test_zero_module_zero_grad import SCRIPTS, _assert_close, _data, _loss, _Model, run_torch, run_zero

pytestmark = pytest.mark.distributed

TOL = 1e-6


def _zero_strides(t: torch.Tensor | None) -> bool:
    return t is not None and t.dim() > 0 and set(t.stride()) == {0}


def _has_hooks(p: torch.Tensor) -> bool:
    return bool(getattr(p, "_post_accumulate_grad_hooks", None)) or p in _reduce._HOOKS


# -- sentinels after the optimizer is freed ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.usefixtures("one_rank_group")
def test_sentinel_gone_after_del_and_backward_works(backend):
    """A step without zero_grad(), then the optimizer is deleted and training goes on with torch.optim.AdamW: p.grad
    reads None (no sentinel, no hooks), and backward and the torch steps give what a fresh model with these weights
    gives (the same grads, the same params), also after model.zero_grad(set_to_none=False)."""
    torch.manual_seed(0)
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend=backend)
    _loss(model, _data(0, 0)).backward()
    opt.step()
    assert all(_zero_strides(p.grad) for p in model.parameters())  # (the sentinels: this is what is tested)
    del opt
    gc.collect()
    params = list(model.parameters())
    assert all(p.grad is None for p in params)
    assert not any(_has_hooks(p) for p in params)
    ref = _Model()
    ref.load_state_dict(model.state_dict())
    _loss(model, _data(1, 0)).backward()  # (raised before: the sentinel was still p.grad)
    _loss(ref, _data(1, 0)).backward()
    for p, q in zip(params, ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.stride() == p.stride()
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.05) for m in (model, ref)]
    for k in range(3):
        for m, o in zip((model, ref), opts, strict=True):
            o.step()
            if k == 1:
                m.zero_grad(set_to_none=False)
            _loss(m, _data(2 + k, 0)).backward()
    for p, q in zip(params, ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.usefixtures("one_rank_group")
def test_zero_grad_keep_after_del_then_backward():
    """The reproducer's second half: model.zero_grad(set_to_none=False) after the deletion, then backward."""
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    _loss(model, _data(0, 0)).backward()
    opt.step()
    del opt
    model.zero_grad(set_to_none=False)
    _loss(model, _data(1, 0)).backward()
    assert all(p.grad is not None and p.grad.stride() == p.stride() for p in model.parameters())


@pytest.mark.usefixtures("one_rank_group")
def test_real_grads_left_alone_after_del():
    """Only the optimizer's sentinels are taken out: a grad set by hand after the step, and grads a no_sync backward
    accumulated after it, stay in p.grad (the same tensors, the same values) once the optimizer is freed."""
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    _loss(model, _data(0, 0)).backward()
    opt.step()
    hand = torch.full_like(model.lin.weight, 0.25)
    model.lin.weight.grad = hand  # (set by hand; the bias keeps its sentinel)
    assert _zero_strides(model.lin.bias.grad)
    del opt
    gc.collect()
    assert model.lin.weight.grad is hand and bool((hand == 0.25).all())
    assert model.lin.bias.grad is None

    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    _loss(model, _data(0, 0)).backward()
    opt.step()
    with opt.no_sync():
        _loss(model, _data(1, 0)).backward()
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    assert not any(_zero_strides(g) for g in grads)
    del opt
    gc.collect()
    for p, g, v in zip(model.parameters(), grads, values, strict=True):
        assert p.grad is g and torch.equal(g, v)


def _two_optimizers(delete_old: bool) -> list[torch.Tensor]:
    """A ZeroAdamW steps (sentinels given), a second one is built over the same params, steps, and the first is
    deleted (or not); the second trains on. Returns the params at the end."""
    torch.manual_seed(0)
    model = _Model()
    old = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    _loss(model, _data(0, 0)).backward()
    old.step()
    with pytest.warns(UserWarning, match="larger storage"):  # (the params are views of the old one's buffers)
        new = ZeroAdamW(model.parameters(), stage=2, lr=0.02, backend="reference")
    _loss(model, _data(1, 0)).backward()
    new.step()
    params = list(model.parameters())
    grads = [p.grad for p in params]
    assert all(_zero_strides(g) for g in grads)  # (the new optimizer's sentinels)
    hooks = [_reduce._HOOKS[p] for p in params]
    if delete_old:
        del old
        gc.collect()
        # the new optimizer's sentinels, hooks and _HOOKS entries are its own: left alone
        assert all(p.grad is g for p, g in zip(params, grads, strict=True))
        assert all(_reduce._HOOKS[p] is h for p, h in zip(params, hooks, strict=True))
        assert all(p._post_accumulate_grad_hooks for p in params)
    for k in range(3):
        _loss(model, _data(2 + k, 0)).backward()
        assert all(p.grad is None for p in params)  # (the new optimizer's hooks reduced and freed them)
        new.step()
        if k == 1:
            model.zero_grad()
    return [p.detach().clone() for p in params]


@pytest.mark.usefixtures("one_rank_group")
def test_older_optimizer_freed_leaves_newer_alone():
    _assert_close([_two_optimizers(True)], [_two_optimizers(False)])


# -- leak -------------------------------------------------------------------------------------------------------
def _collect_until(freed: Callable[[], bool], seconds: float = 5.0) -> None:
    """gc.collect() until ``freed()`` holds or ``seconds`` pass: gloo's worker thread drops its reference to the
    tensors of a finished collective (the last all-gather's output, a flat buffer) a moment after ``wait()`` returns,
    so on a loaded machine the last buffer may outlive the first collection (a leak outlives them all)."""
    deadline = time.monotonic() + seconds
    gc.collect()
    while not freed() and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()


@pytest.mark.parametrize("zero_grad", [True, False])
@pytest.mark.parametrize("stage", [2, 1])
@pytest.mark.usefixtures("one_rank_group")
def test_model_and_buffers_freed_after_del(stage, zero_grad):
    """After ``del model, opt`` and gc.collect(), the optimizer, the params, the flat buffers (param and grad shard
    storages) and the _HOOKS entries are gone, as with stage 1 and torch.optim (stage 2 kept them all before)."""
    gc.collect()
    before = len(_reduce._HOOKS)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    opt = ZeroAdamW(model.parameters(), stage=stage, lr=1e-3, backend="reference", bucket_cap_mb=1e-5)
    for k in range(2):
        model(torch.randn(3, 16, generator=torch.Generator().manual_seed(k))).sum().backward()
        opt.step()
        if zero_grad:
            opt.zero_grad()
    assert len(opt._buckets) > 1
    refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(opt)]
    refs += [weakref.ref(b.param_flat) for b in opt._buckets]
    storages = [StorageWeakRef(t.untyped_storage()) for b in opt._buckets for t in (b.param_flat, b.grad)]
    del model, opt
    _collect_until(lambda: all(r() is None for r in refs) and all(s.expired() for s in storages))
    assert [r() is None for r in refs] == [True] * len(refs)
    assert all(s.expired() for s in storages)
    assert len(_reduce._HOOKS) == before


@pytest.mark.usefixtures("one_rank_group")
def test_model_kept_opt_freed_drops_hooks():
    """The model kept, the optimizer deleted: the params lose its hooks and _HOOKS entries (the finalizer holds no
    reference to the optimizer: it is freed), and the params are freed once the model goes too."""
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    _loss(model, _data(0, 0)).backward()
    opt.step()
    assert all(_has_hooks(p) for p in model.parameters())
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    assert not any(_has_hooks(p) for p in model.parameters())
    prefs = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert all(r() is None for r in prefs)


def test_exit_with_live_stage2_optimizer(tmp_path):
    """A process that ends with a stage-2 ZeroAdamW alive (its sentinels in p.grad, its hooks on the params), with
    or without destroying the process group first, exits cleanly. The step's all-gather is the script's last
    collective: gloo's worker thread drops its tensors after the script has ended unless it gets the GIL first
    (fused_ops._exit). A long GIL switch interval keeps it waiting to the end: without the pause at exit, 18 of 20
    such scripts aborted (-6, "terminate called without an active exception"); each runs twice here."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    for destroy in (False, True):
        script = tmp_path / f"exit_{destroy}.py"
        script.write_text(
            textwrap.dedent(f"""
            import sys, torch, torch.distributed as dist
            from fused_ops.distributed import ZeroAdamW
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            model = torch.nn.Linear(6, 5)
            opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
            model(torch.randn(3, 6)).sum().backward()
            print("stepping", flush=True)  # (nothing after the step releases the GIL: no output)
            sys.setswitchinterval(5.0)
            opt.step()
            assert model.weight.grad.stride() == (0, 0)
            cycle = [opt]
            cycle.append(cycle)  # (freed, if at all, by the collector at exit)
            if {destroy}:
                dist.destroy_process_group()
            """)
        )
        for _ in range(2):
            r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
            assert r.returncode == 0 and r.stdout.strip() == "stepping", (destroy, r.returncode, r.stdout, r.stderr)
            assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_pause_at_exit_is_registered_once_by_zero_and_dtensor_collectives(tmp_path):
    """ZeroAdamW's constructor and the DTensor reductions register fused_ops._exit's pause, once per process;
    importing the package does not."""
    script = tmp_path / "registered.py"
    script.write_text(
        textwrap.dedent("""
        import atexit, torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from fused_ops import _dtensor, _exit
        from fused_ops.distributed import ZeroAdamW
        n0 = atexit._ncallbacks()
        assert not _exit._registered
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _dtensor._groups(init_device_mesh("cpu", (1,)), [0], torch.device("cpu"))
        assert _exit._registered and atexit._ncallbacks() == n0 + 1
        ZeroAdamW(torch.nn.Linear(2, 2).parameters(), backend="reference")
        assert atexit._ncallbacks() == n0 + 1
        print("ok")
        """)
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr)


# -- copies of the whole optimizer ------------------------------------------------------------------------------
def _torch_save(opt):
    torch.save(opt, io.BytesIO())


COPIES = {
    "deepcopy": copy.deepcopy,
    "copy": copy.copy,
    "pickle": lambda o: pickle.dumps(o),
    "pickle_protocol_2": lambda o: pickle.dumps(o, protocol=2),
    "torch.save": _torch_save,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.usefixtures("one_rank_group")
def test_copy_or_pickle_refused(stage, how):
    """Refused with a TypeError naming ZeroAdamW and the state dicts (it gave an object without state before); the
    optimizer is unchanged and trains on as one never copied does."""
    results = []
    for attempt in (True, False):
        torch.manual_seed(0)
        model = _Model()
        opt = ZeroAdamW(model.parameters(), stage=stage, lr=0.05, backend="reference")
        _loss(model, _data(0, 0)).backward()
        opt.step()
        if attempt:
            with pytest.raises(TypeError, match=r"ZeroAdamW cannot be copied.*state_dict\(\).*consolidated_state_dict"):
                COPIES[how](opt)
        _loss(model, _data(1, 0)).backward()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    _assert_close([results[0]], [results[1]])


@pytest.mark.usefixtures("one_rank_group")
def test_state_dicts_scheduler_still_work():
    """What torch.optim's machinery does with the optimizer is unchanged by the refusal: state_dict() (and deep copies
    and torch.save of it), load_state_dict (which calls torch.optim's __setstate__), consolidated_state_dict, an lr
    scheduler (its own state_dict and load_state_dict too)."""
    torch.manual_seed(0)
    model = _Model()
    opt = ZeroAdamW(model.parameters(), stage=2, lr=0.05, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(2):
        _loss(model, _data(k, 0)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    sd = copy.deepcopy(opt.state_dict())
    buf = io.BytesIO()
    torch.save(sd, buf)
    full = opt.consolidated_state_dict(to=0)
    torch.save(full, io.BytesIO())
    sched_sd = copy.deepcopy(sched.state_dict())
    sched2 = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched2.load_state_dict(sched_sd)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=False))
    opt.load_state_dict(full)
    _loss(model, _data(2, 0)).backward()
    opt.step()
    sched2.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.125)


# -- the usual loops are unchanged ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["no_zeroing", "model_zero_grad", "mixed", "no_sync_micro_batches"])
@pytest.mark.usefixtures("one_rank_group")
def test_stage2_loops_match_torch(name):
    script = SCRIPTS[name]
    _assert_close(run_zero(script, 0, 2), run_torch(script, 1))


@pytest.mark.interpret
@pytest.mark.usefixtures("one_rank_group")
def test_stage2_loop_matches_torch_triton():
    script = SCRIPTS["mixed"]
    _assert_close(run_zero(script, 0, 2, backend="triton"), run_torch(script, 1))
