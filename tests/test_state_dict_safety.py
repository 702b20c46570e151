"""State dicts that must leave the optimizer they are refused by unchanged, or that must load.

- A compact int8 checkpoint loaded through ``torch.distributed.checkpoint`` onto another layout whose scale sizes
  match (FSDP2 ``Shard(0)`` -> ``Shard(1)``, or a plain model, which before took it silently): refused on every rank
  with the way to reshard (DCP has written into the live states by then, as into torch.optim's: README; probe 54,
  finding 1). On the same layout it resumes bit for bit.
- A compact int8 full state dict gathered from FSDP2 and loaded into a plain model: the package's layout error, not
  torch's bare ``KeyError: 'state.0.weight.int8_layout'`` (probe 54, finding 2).
- A Kahan buffer of the other low-precision dtype (a bf16 model made fp16): dropped at the step and left out by
  ``load_state_dict``, as the buffer of a param made fp32 is; nothing else changes (probe 53, finding 5).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fused_ops
from tests.safety import expect_error_unchanged, isolated
from tests.test_distributed import spawn

BACKENDS = ("triton", "reference")


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))  # fmt: skip


def _grads(params, k: int) -> None:
    g = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


# -- 1. compact int8 state dicts are snapshots ----------------------------------------------------------------


def _mixed_int8_optimizer():
    """Every kind of state an 8-bit dict can hold: codes and scales (fp32 params), with fp32 masters (bf16 params),
    with a Kahan buffer (fp16 params), and a group of fp32 moments next to them."""
    torch.manual_seed(0)
    groups = [
        ([300, 5], torch.float32, {}),
        ([257], torch.bfloat16, dict(master_weights=True)),
        ([9], torch.float16, dict(kahan_summation=True)),
        ([7], torch.float32, dict(state_dtype=None)),
    ]
    params, param_groups = [], []
    for sizes, dtype, kw in groups:
        ps = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in sizes]
        params += ps
        param_groups.append({"params": ps, **kw})
    opt = fused_ops.FusedAdamW(param_groups, lr=1e-2, state_dtype="int8", backend="reference")
    for k in range(2):
        _grads(params, k)
        opt.step()
    return params, opt


def test_plain_compact_dict_names_its_layout_and_a_dtensor_one_is_refused_for_it():
    """A plain param's compact dict records ``int8_layout: None`` (so that torch's full-dict load finds the key a
    DTensor checkpoint writes its layout to); codes and scales gathered from DTensor shards, whose scale count is
    the shards' and not the plain param's, are refused for their layout, with the way to reshard, and nothing
    changes."""
    params, opt = _mixed_int8_optimizer()
    sd = opt.state_dict()
    assert sd["state"][0]["int8_layout"] is None and "int8_layout" not in sd["state"][len(params) - 1]
    # a full dict of the 300-element param gathered from 2 ranks (Shard(0)): one padded block per shard
    sd["state"][0]["int8_layout"] = "shape (300,), mesh (2,), placements (Shard(dim=0),)"
    for key in ("exp_avg_scale", "exp_avg_sq_scale"):
        sd["state"][0][key] = torch.ones(4)
    expect_error_unchanged(lambda: opt.load_state_dict(sd), ValueError, r"saved on DTensor shards.*plain tensor.*"
                           r"dequantize=True", opt)  # fmt: skip
    # (a plain dict with a wrong count of scales is still refused for it)
    sd["state"][0]["int8_layout"] = None
    expect_error_unchanged(lambda: opt.load_state_dict(sd), ValueError, r"exp_avg_scale.*2 elements", opt)


# -- 2. through DCP: another layout refused on every rank; a full dict into a plain model, with nothing changed ---


def _model(mesh, dim: int):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    # (a 32 x 16 weight: 256 elements per shard in Shard(0) and Shard(1), so its scales have 2 entries in either
    # layout and on the plain model: DCP loads them, only the recorded layout tells)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.Tanh(), torch.nn.Linear(32, 4, bias=False))
    if mesh is not None:
        fully_shard(m, mesh=mesh, shard_placement_fn=lambda p: Shard(dim))
    return m


def _opt(m):
    return fused_ops.FusedAdamW([{"params": [m[0].weight], "state_dtype": "int8"}, {"params": [m[2].weight]}],
                                lr=1e-2, backend="reference")  # fmt: skip


def _train(m, opt, first: int, steps: int) -> None:
    for k in range(first, first + steps):
        m(torch.randn(4, 16, generator=torch.Generator().manual_seed(k))).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _live(opt) -> list:
    return [(st, key, v, _local(v).clone()) for st in opt.state.values() for key, v in st.items()]


def _unchanged(opt, before) -> bool:
    after = {(id(st), key): v for st in opt.state.values() for key, v in st.items()}
    return len(after) == len(before) and all(after.get((id(st), key)) is v and _equal(_local(v), bits)
                                             for st, key, v, bits in before)  # fmt: skip


def _full(m) -> list:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in m.parameters()]


def run_int8_checkpoints(rank: int, world: int, out_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    ckpt = os.path.join(out_dir, "ckpt")
    src = _model(mesh, 0)
    o = _opt(src)
    _train(src, o, 0, 2)
    dcp.save({"model": get_model_state_dict(src), "optim": get_optimizer_state_dict(src, o)}, checkpoint_id=ckpt)
    full = copy.deepcopy(get_optimizer_state_dict(src, o, options=StateDictOptions(full_state_dict=True)))
    _train(src, o, 2, 2)
    expected = _full(src)
    res = {}

    def load(m, opt, options=None, sd=None):
        try:
            if sd is None:
                sd = {"optim": get_optimizer_state_dict(m, opt)}
                dcp.load(sd, checkpoint_id=ckpt)
                sd = sd["optim"]
            set_optimizer_state_dict(m, opt, sd, options=options)
            return None
        except Exception as e:  # noqa: BLE001 (the type is part of the result)
            return f"{type(e).__name__}: {e}"

    # the same layout: resumes bit for bit (the model and its optimizer, which had states of its own)
    same = _model(mesh, 0)
    os_ = _opt(same)
    _train(same, os_, 50, 1)
    sd = {"model": get_model_state_dict(same)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(same, sd["model"])
    res["same_error"] = load(same, os_)
    _train(same, os_, 2, 2)
    res["same_resumes"] = all(_equal(a, b) for a, b in zip(_full(same), expected))
    # another layout (Shard(1)): DCP accepts the files, we refuse, nothing changed: it steps as a twin
    dst, twin = _model(mesh, 1), _model(mesh, 1)
    od, ot = _opt(dst), _opt(twin)
    _train(dst, od, 40, 2)
    _train(twin, ot, 40, 2)
    before = _live(od)
    res["other_layout_error"] = load(dst, od)  # (DCP wrote into the live states first: see README)
    # a plain model: the sharded checkpoint through DCP, then the gathered full dict
    plain = _model(None, 0)
    op = _opt(plain)
    _train(plain, op, 40, 1)
    before = _live(op)
    res["plain_full_error"] = load(plain, op, StateDictOptions(full_state_dict=True), copy.deepcopy(full))
    res["plain_full_unchanged"] = _unchanged(op, before)
    res["plain_dcp_error"] = load(plain, op)  # (before: accepted silently when the scale counts matched)
    torch.distributed.barrier()
    return res


@pytest.mark.distributed
def test_int8_checkpoint_of_another_layout_is_refused_on_every_rank(tmp_path):
    for rank, r in enumerate(spawn("tests.test_state_dict_safety:run_int8_checkpoints", 2, str(tmp_path),
                                   timeout=300)):  # fmt: skip
        assert r["same_error"] is None and r["same_resumes"], (rank, r)
        for case in ("other_layout", "plain_dcp", "plain_full"):
            err = r[f"{case}_error"]
            assert err is not None and err.startswith("ValueError") and "saved on DTensor shards" in err, (rank, r)
            assert "dequantize=True" in err, (rank, case, r)
        assert "Shard(dim=1)" in r["other_layout_error"] and "plain tensor" in r["plain_full_error"], (rank, r)
        assert r["plain_full_unchanged"], (rank, r)


# -- 3. a Kahan buffer of the other low-precision dtype ---------------------------------------------------------


def _kahan_run(backend):
    """bf16 params stepped twice with Kahan summation, then made fp16 as ``model.half()`` makes them."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (5, 300)]
    opt = fused_ops.FusedAdamW(params, lr=1e-2, kahan_summation=True, backend=backend)
    for k in range(2):
        _grads(params, k)
        opt.step()
    sd = opt.state_dict()
    for p in params:
        p.data = p.data.half()
    return params, opt, sd


def _fresh_kahan_twin(params, sd, backend):
    """The oracle: an optimizer on copies of the fp16 params, resumed from ``sd`` without its Kahan buffers (the
    step makes new ones, zeros)."""
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    t = fused_ops.FusedAdamW(twin, lr=1e-2, kahan_summation=True, backend=backend)
    t.load_state_dict({"state": {k: {key: v for key, v in st.items() if key != "kahan_comp"}
                                 for k, st in sd["state"].items()}, "param_groups": sd["param_groups"]})  # fmt: skip
    return twin, t


def _assert_same(opt, params, t, twin):
    for p, q in zip(params, twin):
        assert _equal(p.detach(), q.detach())
        assert set(opt.state[p]) == set(t.state[q]) == {"step", "exp_avg", "exp_avg_sq", "kahan_comp"}
        assert all(_equal(v, t.state[q][key]) for key, v in opt.state[p].items())
        assert opt.state[p]["kahan_comp"].dtype == torch.float16


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_buffer_of_the_old_low_precision_dtype_is_dropped_at_the_step(backend):
    """bf16 model made fp16: the step drops the bf16 buffer and makes an fp16 one (it was refused with a TypeError
    at every step); moments and step counts go on as they were: the step equals a twin resumed without buffers."""
    params, opt, sd = _kahan_run(backend)
    twin, t = _fresh_kahan_twin(params, sd, backend)
    for k in range(2, 4):
        _grads(params, k)
        _grads(twin, k)
        opt.step()
        t.step()
    _assert_same(opt, params, t, twin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_buffer_of_the_old_low_precision_dtype_is_left_out_by_load_state_dict(backend):
    """``opt.load_state_dict(opt.state_dict())`` after the cast loads (it was refused): the bf16 buffers are left
    out, everything else is loaded as it was, and the steps equal the twin's."""
    params, opt, sd = _kahan_run(backend)
    kept = {(i, key): v.clone() for i, p in enumerate(params) for key, v in opt.state[p].items()}
    opt.load_state_dict(opt.state_dict())
    for i, p in enumerate(params):
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(_equal(v, kept[i, key]) for key, v in opt.state[p].items())
    twin, t = _fresh_kahan_twin(params, sd, backend)
    _grads(params, 2)
    _grads(twin, 2)
    opt.step()
    t.step()
    _assert_same(opt, params, t, twin)


def test_kahan_buffer_of_the_old_dtype_is_put_back_when_the_step_fails():
    """A step that fails while it makes the new buffer (out of memory) leaves the state as it was, the old buffer
    included; an fp32 buffer of a bf16 param is no stale one and is still refused."""
    params, opt, _ = _kahan_run("reference")
    _grads(params, 2)
    make = opt._new_state_tensor

    def failing(group, key, p):
        if key == "kahan_comp":
            raise torch.OutOfMemoryError("no memory (test)")
        return make(group, key, p)

    opt._new_state_tensor = failing
    expect_error_unchanged(opt.step, torch.OutOfMemoryError, "no memory", opt)
    assert all(opt.state[p]["kahan_comp"].dtype == torch.bfloat16 for p in params)
    del opt._new_state_tensor
    opt.step()
    assert all(opt.state[p]["kahan_comp"].dtype == torch.float16 for p in params)
    for p in params:
        p.data = p.data.bfloat16()
    _grads(params, 3)
    opt.state[params[0]]["kahan_comp"] = opt.state[params[0]]["kahan_comp"].float()
    expect_error_unchanged(opt.step, TypeError, "kahan_comp.*bfloat16", opt)


# -- states of another shape or another optimizer (probe 83) ----------------------------------------------------

_SHAPED = {
    "adamw exp_avg": (lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, backend=b), "exp_avg", torch.float32),
    "adamw int8 codes": (
        lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, state_dtype="int8", backend=b),
        "exp_avg_codes",
        torch.float32,
    ),  # fmt: skip
    "adamw kahan": (
        lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, kahan_summation=True, backend=b),
        "kahan_comp",
        torch.bfloat16,
    ),  # fmt: skip
    "sgd": (lambda ps, b: fused_ops.FusedSGD(ps, lr=1e-2, momentum=0.9, backend=b), "momentum_buffer", torch.float32),
    "lion": (lambda ps, b: fused_ops.FusedLion(ps, lr=1e-3, backend=b), "exp_avg", torch.float32),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_SHAPED))
def test_a_state_of_another_shape_with_the_params_element_count_is_refused(case, backend):
    """A (7, 5) state for a (5, 7) param (a transposed weight's moments) was reshaped on load: its elements paired
    with the wrong ones of the param, silently (torch.optim loads it and its next step raises a shape error)."""
    make, key, dtype = _SHAPED[case]
    p = torch.nn.Parameter(torch.randn(5, 7).to(dtype))
    opt = make([p], backend)
    _grads([p], 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0][key].shape == (5, 7), sorted(sd["state"][0])
    sd["state"][0][key] = sd["state"][0][key].t().contiguous()
    err = expect_error_unchanged(lambda: opt.load_state_dict(sd), ValueError, "shape", opt, p)
    assert key.removesuffix("_codes") in str(err) and "(7, 5)" in str(err) and "(5, 7)" in str(err), str(err)
    sd["state"][0][key] = sd["state"][0][key].t()  # (the param's shape, in any strides: loads)
    opt.load_state_dict(sd)
    assert torch.equal(opt.state_dict()["state"][0][key], sd["state"][0][key])
    flat = copy.deepcopy(sd)  # (a flat state loads, as the step takes one: its own dict of a state flattened in place
    flat["state"][0][key] = flat["state"][0][key].reshape(-1)  # reloads; probe 87)
    opt.load_state_dict(flat)
    assert torch.equal(opt.state_dict()["state"][0][key], sd["state"][0][key])
    if key != "exp_avg_codes":  # (a param made flat with states of its old shape: loads too)
        q = torch.nn.Parameter(p.detach().reshape(-1).clone())
        other = make([q], backend)
        other.load_state_dict(sd)
        assert torch.equal(other.state[q][key], sd["state"][0][key].reshape(-1))


_FOREIGN = [
    ("adamw", "lion", "holds 'exp_avg_sq'"),  # (the same group keys: only the states tell)
    ("adamw", "sgd", "no 'momentum'"),
    ("sgd", "adamw", "no 'betas'"),
    ("sgd", "lion", "no 'betas'"),
]


@pytest.mark.parametrize("saved,loaded,match", _FOREIGN, ids=[f"{a}->{b}" for a, b, _ in _FOREIGN])
def test_a_state_dict_of_another_optimizer_is_refused(saved, loaded, match):
    """An AdamW dict loaded into FusedLion silently (its groups have Lion's keys: its exp_avg was taken as Lion's
    momentum, its exp_avg_sq and step kept and saved again): now refused naming the foreign state, nothing changed,
    as the other pairs are for their group keys."""
    make = {k: _SHAPED[v][0] for k, v in (("adamw", "adamw exp_avg"), ("sgd", "sgd"), ("lion", "lion"))}
    p, q = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3, 4))
    src, dst = make[saved]([p], "reference"), make[loaded]([q], "reference")
    for opt in (src, dst):
        _grads(opt.param_groups[0]["params"], 1)
        opt.step()
    expect_error_unchanged(lambda: dst.load_state_dict(src.state_dict()), ValueError, match, dst, q)


@isolated
def test_zero_refuses_a_state_of_another_shape_as_fused_adamw_does(tmp_path):
    """ZeroAdamW checked a loaded moment's element count only: a torch AdamW dict with a transposed weight's
    moments loaded onto the wrong elements (probe 87). Refused on every rank, nothing changed; a flat one loads."""
    import torch.distributed as dist

    from fused_ops.distributed import ZeroAdamW

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        w = torch.randn(5, 7)
        ref = torch.nn.Parameter(w.clone())
        topt = torch.optim.AdamW([ref], lr=1e-2)
        ref.grad = torch.randn(5, 7)
        topt.step()
        sd = copy.deepcopy(topt.state_dict())
        q = torch.nn.Parameter(w.clone())
        zo = ZeroAdamW([q], lr=1e-2, backend="reference")
        q.grad = torch.randn(5, 7)
        zo.step()
        bad = copy.deepcopy(sd)
        bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].t().contiguous()
        expect_error_unchanged(lambda: zo.load_state_dict(bad), ValueError, r"shape \(7, 5\)", zo, q)
        flat = copy.deepcopy(sd)
        flat["state"][0]["exp_avg"] = flat["state"][0]["exp_avg"].reshape(-1)
        zo.load_state_dict(flat)
    finally:
        dist.destroy_process_group()
