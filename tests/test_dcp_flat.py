"""torch's flat optimizer checkpoint form, ``StateDictOptions(flatten_optimizer_state_dict=True)`` (what torchtitan
saves and loads), with FSDP2 params on a mesh of one gloo rank (in a forked child: one process group each).

torch's unflattening reads every key a live param group iterates from the checkpoint, whose keys are those
``state_dict()`` gave: this package's own group keys at the constructor's values are left out of both
(``fused_ops/optim/_base.py: _ParamGroup``). Before, ``set_optimizer_state_dict`` raised ``KeyError:
'param_groups.0.weight.master_weights'`` for every checkpoint, ours or torch's. Each case saves after two steps,
loads into a fresh model and optimizer, and two more steps must equal, bit for bit, two more steps of the saved one.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fused_ops

from .safety import isolated

pytestmark = pytest.mark.distributed


def _dequantizing(opt):
    opt.dequantize_state_dict = True  # (the compact form records the shards' layout as a str: the flat form takes none)
    return opt


VARIANTS = {
    "adamw": lambda ps: fused_ops.FusedAdamW(ps, lr=1e-2, backend="reference"),
    "adamw triton": lambda ps: fused_ops.FusedAdamW(ps, lr=1e-2, backend="triton"),
    "adamw int8": lambda ps: _dequantizing(fused_ops.FusedAdamW(ps, lr=1e-2, state_dtype="int8", backend="reference")),
    "sgd": lambda ps: fused_ops.FusedSGD(ps, lr=1e-2, momentum=0.9, nesterov=True, backend="reference"),
    "lion": lambda ps: fused_ops.FusedLion(ps, lr=1e-3, backend="reference"),
    "torch adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
}
# saved -> loaded: our own checkpoints, torch's into ours and ours into torch's
PAIRS = [(v, v) for v in VARIANTS if v != "torch adamw"] + [("torch adamw", "adamw"), ("adamw", "torch adamw")]


@contextlib.contextmanager
def _one_rank(tmp_path):
    """A process group of one gloo rank (in the forked child of an isolated test); yields torch's flat form options
    and its get/set_optimizer_state_dict."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        yield StateDictOptions(flatten_optimizer_state_dict=True), get_optimizer_state_dict, set_optimizer_state_dict
    finally:
        dist.destroy_process_group()


def _run(tmp_path, saved: str, loaded: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        mesh = init_device_mesh("cpu", (1,))
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(3, 5, generator=gen) for _ in range(4)]

        def model():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
            return fully_shard(m, mesh=mesh)

        def train(m, opt, xs):
            for x in xs:
                opt.zero_grad()
                m(x).square().sum().backward()
                opt.step()

        m, opt = model(), None
        opt = VARIANTS[saved](list(m.parameters()))
        train(m, opt, batches[:2])
        sd = get_optimizer_state_dict(m, opt, options=flat)
        assert any(k.startswith("param_groups.") for k in sd), sorted(sd)[:5]  # (the flat form)
        dcp.save({"model": m.state_dict(), "optim": sd}, checkpoint_id=str(tmp_path / "ckpt"))
        train(m, opt, batches[2:])
        expected = [p.full_tensor().clone() for p in m.parameters()]

        m2 = model()
        opt2 = VARIANTS[loaded](list(m2.parameters()))
        target = {"model": m2.state_dict(), "optim": get_optimizer_state_dict(m2, opt2, options=flat)}
        dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"))
        m2.load_state_dict(target["model"])
        set_optimizer_state_dict(m2, opt2, target["optim"], options=flat)
        train(m2, opt2, batches[2:])
        got = [p.full_tensor() for p in m2.parameters()]
        if saved == loaded or {saved, loaded} == {"adamw", "torch adamw"}:
            tol = 0 if saved == loaded else 1e-6
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=tol)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("saved,loaded", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
@isolated
def test_flat_checkpoints_load_and_continue(tmp_path, saved, loaded):
    _run(tmp_path, saved, loaded)


@isolated
def test_group_iteration_leaves_out_own_keys_at_the_constructors_values(tmp_path):
    """What a live group iterates is what ``state_dict()`` keeps: a group's own ``state_dtype`` (not the
    constructor's) is in both; the inherited ones are in neither, yet read as the constructor's."""
    ps = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]
    opt = fused_ops.FusedAdamW([{"params": [ps[0]]}, {"params": [ps[1]], "state_dtype": "bfloat16"}], lr=1e-2,
                               master_weights=True, backend="reference")  # fmt: skip
    sd = opt.state_dict()
    for group, saved in zip(opt.param_groups, sd["param_groups"], strict=True):
        assert set(group) == set(saved), (sorted(group), sorted(saved))
        assert group["master_weights"] is True and group["backend"] == "reference"
    assert "state_dtype" not in list(opt.param_groups[0]) and opt.param_groups[0]["state_dtype"] == "fp32"
    assert "state_dtype" in list(opt.param_groups[1]) and opt.param_groups[1]["state_dtype"] == "bf16"
    torch_keys = set(torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))]).param_groups[0])
    assert set(opt.param_groups[0]) == torch_keys


@isolated
def test_a_hand_appended_group_and_a_missing_state(tmp_path):
    """A group appended to ``param_groups`` by hand (a plain dict: every key iterated, so every key saved) saves and
    loads in the flat form; a flat dict without a param's state (torch's unflattening gives ``{}`` for each live key)
    is refused naming it, nothing changed, where only the keys a load rebuilds (masters, 8-bit scales) may be absent
    (probe 70: a hand-appended group raised a KeyError; a missing state loaded silently as a fresh one)."""
    with _one_rank(tmp_path) as (flat, get_optimizer_state_dict, set_optimizer_state_dict):
        m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = fused_ops.FusedAdamW(m[0].parameters(), lr=1e-2, backend="reference")
        hand = {**{k: v for k, v in opt.param_groups[0].items() if k != "params"}, "lr": 1e-3}
        opt.param_groups.append({"params": list(m[1].parameters()), **hand})  # (by hand, with every key, as torch's)
        m(torch.randn(5, 4)).sum().backward()
        opt.step()
        sd = get_optimizer_state_dict(m, opt, options=flat)
        set_optimizer_state_dict(m, opt, sd, options=flat)
        assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["master_weights"] is False
        before = {k: v.clone() for k, v in opt.state[m[0].weight].items()}
        missing = {k: v for k, v in sd.items() if not k.startswith("state.0.weight.")}
        with pytest.raises(ValueError, match=r"state 'step' of param 0.weight .* is missing"):
            set_optimizer_state_dict(m, opt, missing, options=flat)
        assert all(torch.equal(v, before[k]) for k, v in opt.state[m[0].weight].items())


@pytest.mark.parametrize("variant", ["adamw", "adamw int8", "sgd", "lion"])
@isolated
def test_a_loaded_optimizer_keeps_its_group_keys_and_takes_a_fresh_ones_flat_form(tmp_path, variant):
    """torch's ``Optimizer.__setstate__`` (run by every load) adds ``differentiable`` to the defaults, and so to the
    groups the load fills in: a FusedLion, which has no such key, then had groups a fresh FusedLion's flat checkpoint
    lacks (``KeyError: 'param_groups.weight.differentiable'``), and saved them (probe 83)."""
    with _one_rank(tmp_path) as (flat, get_optimizer_state_dict, set_optimizer_state_dict):

        def trained():
            torch.manual_seed(0)
            m = torch.nn.Linear(4, 3)
            opt = VARIANTS[variant](list(m.parameters()))
            m(torch.randn(2, 4)).sum().backward()
            opt.step()
            return m, opt

        m, opt = trained()
        keys = [sorted(g) for g in opt.param_groups]
        saved_keys = [sorted(g) for g in opt.state_dict()["param_groups"]]
        opt.load_state_dict(opt.state_dict())
        assert [sorted(g) for g in opt.param_groups] == keys
        assert [sorted(g) for g in opt.state_dict()["param_groups"]] == saved_keys
        m2, opt2 = trained()
        set_optimizer_state_dict(m, opt, get_optimizer_state_dict(m2, opt2, options=flat), options=flat)
        assert [sorted(g) for g in opt.param_groups] == keys
        # a dict whose groups carry torch's flags at their defaults where this optimizer has none (a FusedLion
        # checkpoint saved after a resume by an older version): they are dropped, and the flat form loads after it
        old = opt.state_dict()
        old["param_groups"] = [{"foreach": None, "differentiable": False, "fused": None, "capturable": False, **g}
                               for g in old["param_groups"]]  # fmt: skip
        opt.load_state_dict(old)
        assert [sorted(g) for g in opt.param_groups] == keys
        set_optimizer_state_dict(m, opt, get_optimizer_state_dict(m2, opt2, options=flat), options=flat)
