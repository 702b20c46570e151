"""Safety tier: what a training loop (or a library under it) may do to params, grads and states between steps, once a
step plan is cached: storages freed or shrunk in place, a tensor ``lr`` without memory in a later group, step counts
that share memory, state tensors replaced behind ``optimizer.state``'s back, master weights turned off and on, and
states that are not dicts. Every optimizer of the family, both backends; cases that crashed the process before their
fix run in a forked child (``isolated``).
"""

from __future__ import annotations

import pytest
import torch

import fused_ops
from tests.safety import assert_unchanged, expect_error_unchanged, isolated, snapshot

pytestmark = pytest.mark.safety

BACKENDS = ["triton", "reference"]
VARIANTS = {
    "adamw": lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, weight_decay=0.1, backend=b),
    "adamw_int8": lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, state_dtype="int8", backend=b),
    "sgd": lambda ps, b: fused_ops.FusedSGD(ps, lr=1e-2, momentum=0.9, backend=b),
    "lion": lambda ps, b: fused_ops.FusedLion(ps, lr=1e-3, backend=b),
}
SIZES = [(3, 5), (300,), (7,)]


def _params(sizes=SIZES, dtype=torch.float32):
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _same_grads(ours, theirs):
    """Fresh random grads for ``ours``, the same values for their twins ``theirs``."""
    for p, q in zip(ours, theirs):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()


def _stepped(name, backend, params=None, steps=2):
    params = _params() if params is None else params
    opt = VARIANTS[name](params, backend)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


@pytest.mark.parametrize("what,nbytes", [("param", 0), ("grad", 0), ("grad", 16), ("state", 16)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
@isolated
def test_storage_freed_or_shrunk_in_place(name, backend, what, nbytes):
    """``untyped_storage().resize_(0)`` (how FSDP frees a param) or to 16 bytes leaves the tensor's sizes: the step
    launched on a null or a 16-byte buffer (SIGSEGV, or heap corruption: ``free(): invalid size``). Now a clear
    ValueError naming the tensor, with every other tensor unchanged."""
    params, opt = _stepped(name, backend)
    p = params[1]
    for q in params:
        q.grad = torch.randn_like(q)
    victim = {"param": p, "grad": p.grad, "state": next(v for k, v in sorted(opt.state[p].items()) if k != "step")}
    with torch.no_grad():
        victim[what].untyped_storage().resize_(nbytes)
    err = expect_error_unchanged(opt.step, ValueError, "outside its storage", opt)
    assert "param 1 of param group 0" in str(err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_tensor_lr_without_memory_in_a_later_group(name, backend):
    """A tensor lr on the meta device in group 1: refused naming the group before group 0 is stepped (it had been
    stepped, then ``Cannot copy out of meta tensor``)."""
    a, b = _params([(5,)]), _params([(6,)])
    opt = VARIANTS[name]([{"params": a}, {"params": b}], backend)
    opt.step()
    opt.param_groups[1]["lr"] = torch.tensor(1e-2, device="meta")
    expect_error_unchanged(opt.step, ValueError, "lr of param group 1", opt)
    opt.param_groups[1]["lr"] = 1e-3
    opt.step()
    for what in ("grad_scale", "found_inf"):
        meta = {what: torch.ones(1, device="meta")}
        expect_error_unchanged(lambda: opt.step(**meta), ValueError, what, opt)  # noqa: B023 (called at once)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "adamw_int8"])
def test_step_counts_sharing_memory(name, backend):
    """A step count shared by two params, or a view into a moment: the launch reads and writes it (the kernel's
    programs race on it). Refused like any shared memory, with nothing changed."""
    for case in ("shared", "in a moment"):
        params, opt = _stepped(name, backend)
        st0, st1 = opt.state[params[0]], opt.state[params[1]]
        if case == "shared":
            st1["step"] = st0["step"]
        else:
            st1["step"] = torch.zeros(300, dtype=torch.float32)
            st1["exp_avg_sq"] = st1["step"] if name == "adamw" else st1["exp_avg_sq"]
            st0["step"] = st1["step"][3] if name == "adamw" else st1["exp_avg_sq_scale"][1]
            st1["step"] = torch.tensor(2.0)
        expect_error_unchanged(opt.step, ValueError, "share memory|shares memory", opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_tensor_replaced_behind_the_counter(name, backend):
    """``dict.update(opt.state[p], {...})`` (or ``dict.__setitem__``) replaces state tensors without the state's
    mutation counter seeing it: the cached plan kept updating the old tensors. Now the step updates what
    ``optimizer.state`` holds: the same as a twin whose state was replaced through ``opt.state[p][key] = ...``."""
    params, opt = _stepped(name, backend)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = VARIANTS[name](twin_params, backend)
    twin.load_state_dict(opt.state_dict())
    for p, q in zip(params, twin_params):
        for key, v in sorted(opt.state[p].items()):
            if key != "step" and v.is_floating_point():
                new = torch.full_like(v, 0.5) if key != "exp_avg_sq" else torch.full_like(v, 0.25)
                dict.update(opt.state[p], {key: new})
                twin.state[q][key] = new.clone()
    _same_grads(params, twin_params)
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())
        for key, v in opt.state[p].items():
            assert torch.equal(v, twin.state[q][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_master_weights_turned_off_then_on_again(name, backend):
    """bf16 params with masters; masters off for some steps (the param is updated as it is, the master dropped);
    on again: the master is rebuilt from the param. A master kept from before would rewind the param by the steps
    taken without it."""
    params = _params([(64,)], torch.bfloat16)
    opt = VARIANTS[name](params, backend)
    opt.param_groups[0]["master_weights"] = True
    opt.step()
    assert "master_param" in opt.state[params[0]]
    opt.param_groups[0]["master_weights"] = False
    for _ in range(3):
        params[0].grad = torch.ones_like(params[0])
        opt.step()
    assert "master_param" not in opt.state[params[0]]
    before = params[0].detach().float().clone()
    opt.param_groups[0]["master_weights"] = True
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    lr = opt.param_groups[0]["lr"]
    assert (params[0].detach().float() - before).abs().max() <= 2 * lr + 2**-7 * before.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_states_that_are_not_dicts(name, backend):
    """``opt.state[b] = None`` or ``[]``, or a step count on the meta device: refused naming the state, before any
    state is created for a param that gets its first grad at this step (it had been created, then a TypeError from
    inside the step)."""
    a, b = _params([(5,)]), _params([(6,)])
    c = torch.nn.Parameter(torch.randn(4))
    opt = VARIANTS[name]([{"params": a + [c]}, {"params": b}], backend)
    opt.step()
    c.grad = torch.randn_like(c)
    for bad in (None, []):
        opt.state[b[0]] = bad
        err = expect_error_unchanged(opt.step, TypeError, "must be a dict", opt)
        assert "param group 1" in str(err) and c not in opt.state
        del opt.state[b[0]]
    if name.startswith("adamw"):
        opt.step()
        opt.state[b[0]]["step"] = torch.tensor(1.0, device="meta")
        before = snapshot(opt)
        with pytest.raises(TypeError, match="'step'"):
            opt.step()
        assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [*VARIANTS, "adamw_sr"])
def test_copies_step_like_the_original(name, backend):
    """``copy.deepcopy(opt)`` and a pickle round trip mid-training step bit for bit like the original (torch's
    ``__getstate__`` keeps only defaults, state and groups: the low-bit step's random-bit seed was lost and the
    copy's first step raised AttributeError, after the first group had been stepped on the reference backend)."""
    import copy
    import pickle

    if name == "adamw_sr":
        params = _params([(5,), (300,)], torch.bfloat16)
        opt = fused_ops.FusedAdamW([{"params": params[:1], "state_dtype": None}, {"params": params[1:]}], lr=1e-2,
                                   stochastic_rounding=True, state_dtype="int8", seed=11, backend=backend)  # fmt: skip
        opt.step()
    else:
        params, opt = _stepped(name, backend)
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for o in [opt, *copies]:
            for p, g in zip([p for grp in o.param_groups for p in grp["params"]], grads):
                p.grad = g.clone()
            o.step()
    for c in copies:
        for group, cgroup in zip(opt.param_groups, c.param_groups):
            for p, q in zip(group["params"], cgroup["params"]):
                assert torch.equal(p.detach(), q.detach())
                assert sorted(opt.state[p]) == sorted(c.state[q])
                for key, v in opt.state[p].items():
                    assert torch.equal(v, c.state[q][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_step_counts(backend):
    """A step count of -5 (a tensor, set by hand or in a loaded dict): refused, as a number already was (the step
    had written NaN into the param; torch raises)."""
    params, opt = _stepped("adamw", backend)
    good = opt.state[params[0]]["step"]
    opt.state[params[0]]["step"] = torch.tensor(-5.0)
    expect_error_unchanged(opt.step, ValueError, "'step'.*>= 0", opt)
    opt.state[params[0]]["step"] = good
    for bad in (torch.tensor(-5.0), torch.tensor(float("nan")), -5):
        sd = opt.state_dict()
        sd["state"][0]["step"] = bad
        expect_error_unchanged(lambda: opt.load_state_dict(sd), ValueError, "'step'.*>= 0", opt)  # noqa: B023


@pytest.mark.parametrize("nbytes", [0, 8, "meta"])
@pytest.mark.parametrize("name", list(VARIANTS))
@isolated
def test_loaded_state_tensor_without_memory(name, nbytes):
    """A state dict whose state tensor was freed or shrunk in place (or is a meta tensor): ``load_state_dict`` copied
    it with torch's ``.to(copy=True)``, which reads it unchecked (SIGSEGV, or the bytes past a shrunk allocation loaded
    as state). Every tensor of every key (moments, 8-bit codes and scales, step counts) is refused first, naming the
    key and the param, with the optimizer unchanged."""
    params, opt = _stepped(name, "reference")
    sd = opt.state_dict()
    for key in sorted(sd["state"][1]):
        bad = {k: dict(v) for k, v in sd["state"].items()}
        t = bad[1][key]
        if not isinstance(t, torch.Tensor):
            continue  # (a compact 8-bit dict's int8_layout)
        if nbytes != "meta" and t.untyped_storage().nbytes() <= nbytes:
            continue  # (a 0-d step count fits in 8 bytes: not shrunk)
        if nbytes == "meta":
            t = torch.empty_like(t, device="meta")
        else:
            t = t.clone()
            t.untyped_storage().resize_(nbytes)
        bad[1][key] = t
        expect_error_unchanged(
            lambda b=bad: opt.load_state_dict({"state": b, "param_groups": sd["param_groups"]}),
            ValueError,
            f"state '{key}' of param 1 .*(outside its storage|meta tensor)",
            opt,
        )


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_loads_torch_dicts_with_a_none_momentum_buffer(momentum):
    """torch.optim.SGD's dicts before torch 2.2 hold ``{"momentum_buffer": None}`` (no buffer yet): torch loads and
    steps them (the first step makes the buffer); so does FusedSGD, with torch's result."""
    sd = {"state": {0: {"momentum_buffer": None}},
          "param_groups": [dict(lr=0.1, momentum=momentum, dampening=0, weight_decay=0, nesterov=False, maximize=False,
                                foreach=None, differentiable=False, fused=None, params=[0])]}  # fmt: skip
    ours, theirs = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    o, t = fused_ops.FusedSGD([ours], lr=1.0), torch.optim.SGD([theirs], lr=1.0)
    o.load_state_dict(sd)
    t.load_state_dict(sd)
    for g in (torch.full((4,), 1.0), torch.full((4,), 2.0)):
        ours.grad, theirs.grad = g.clone(), g.clone()
        o.step()
        t.step()
    assert torch.equal(ours, theirs)


def _bad_entry(case):
    def change(sd):
        st, groups = sd["state"][0], sd["param_groups"]
        if case == "sparse exp_avg":
            st["exp_avg"] = st["exp_avg"].to_sparse()
        elif case == "uint8 master_param":
            st["master_param"] = torch.zeros(st["exp_avg"].shape, dtype=torch.uint8)
        elif case == "uint8 max_exp_avg_sq":
            st["max_exp_avg_sq"] = torch.zeros(st["exp_avg"].shape, dtype=torch.uint8)
        elif case == "step 1e300":
            st["step"] = 1e300
        elif case == "lr a string":
            groups[0]["lr"] = "0.01"
        elif case == "group a list":
            groups[0] = list(groups[0]["params"])

    return change


@pytest.mark.parametrize("case, match", [
    ("sparse exp_avg", "'exp_avg' of param 0 .* must be a dense tensor"),
    ("uint8 master_param", "'master_param' of param 0 .* must be a floating-point tensor"),
    ("uint8 max_exp_avg_sq", "'max_exp_avg_sq' of param 0 .* must be a floating-point tensor"),
    ("step 1e300", "'step' of param 0 .* that float32 holds"),
    ("lr a string", "param group 0: .* must be a number or a 1-element tensor, got str"),
    ("group a list", "param group 0 is not a dict"),
])  # fmt: skip
def test_load_refuses_what_the_step_would_refuse(case, match):
    """Entries a load used to take (then ``step()`` refused them, with the loaded state already in place), or refused
    with an error naming nothing: refused by the load itself, naming the key, with nothing changed."""
    params = _params()
    opt = fused_ops.FusedAdamW(params, lr=1e-2, amsgrad=case == "uint8 max_exp_avg_sq", backend="reference")
    opt.step()
    sd = opt.state_dict()
    _bad_entry(case)(sd)
    expect_error_unchanged(lambda: opt.load_state_dict(sd), ValueError, match, opt)


# --- ordinary training-loop changes that torch.optim takes (probe 10) ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_numpy_lr_in_a_later_group(name, backend):
    """A numpy float32 ``lr`` (``LambdaLR`` with a lambda returning numpy scalars: NumPy 2 keeps ``0.1 *
    np.float32(1)`` a float32) steps like the same float, as in torch. Triton FusedSGD/FusedLion stepped group 0,
    then raised from group 1's launch; FusedAdam(W) refused the value its own constructor took."""
    np = pytest.importorskip("numpy")
    runs = []
    for lr in (np.float32(0.03125), 0.03125):
        torch.manual_seed(0)
        a, b = _params([(5,)]), _params([(300,)])
        opt = VARIANTS[name]([{"params": a}, {"params": b}], backend)
        for step in range(3):
            if step == 2:
                opt.param_groups[1]["lr"] = lr
            for p in a + b:
                p.grad = torch.randn_like(p)
            opt.step()
        runs.append([p.detach().clone() for p in a + b])
    for x, y in zip(*runs):
        assert torch.equal(x, y)
    params = _params([(7,)])
    opt = VARIANTS[name](params, backend)
    opt.param_groups[0]["lr"] = np.float32(0.01)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: np.float32(0.5) ** epoch)
    opt.step()


@pytest.mark.parametrize("dampening", [0.5, 0.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_first_step_skipped_by_found_inf(backend, dampening, monkeypatch):
    """GradScaler's usual first step overflows (``init_scale`` 2^16): torch's GradScaler does not call torch SGD's
    ``step()``, so the buffer starts at the next step as ``buf = g``. FusedSGD took the skipped step as the buffer's
    first, and with ``dampening != 0`` every later update differed from torch's. Now such a step creates nothing;
    with ``dampening == 0`` (where a zero buffer gives ``g`` too) ``found_inf`` is still never read on the host."""
    from tests.utils import no_host_reads

    torch.manual_seed(1)
    ours, theirs = _params([(5,), (300,)]), _params([(5,), (300,)])
    for p, q in zip(ours, theirs):
        q.data.copy_(p.data)
    opt = fused_ops.FusedSGD(ours, lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.01, backend=backend)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.01, foreach=False)
    for step, inf in enumerate([1.0, float("nan"), 0.0, 1.0, 0.0, 0.0]):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        found_inf = torch.tensor([inf])
        if dampening == 0 and backend == "triton":  # (the reference backend reads found_inf on the host anyway)
            with no_host_reads(monkeypatch):
                opt.step(found_inf=found_inf)
        else:
            opt.step(found_inf=found_inf)
        if inf == 0:
            ref.step()
        if step < 2:
            assert all("momentum_buffer" not in opt.state[p] for p in ours) or dampening == 0
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=1e-6,
                                   atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_turned_off_then_on_starts_a_fresh_buffer(backend):
    """Kahan summation off for some steps, then on: the compensation buffer is dropped when it is turned off (as
    masters are), so the first step after turning it on does not add the old rounding residue."""
    runs = []
    for drop_by_hand in (False, True):
        torch.manual_seed(2)
        params = _params([(64,)], torch.bfloat16)
        opt = fused_ops.FusedAdamW(params, lr=1e-2, kahan_summation=True, backend=backend)
        for step in range(6):
            group = opt.param_groups[0]
            group["kahan_summation"] = step not in (2, 3)
            if step == 4 and drop_by_hand:
                opt.state[params[0]].pop("kahan_comp", None)
            params[0].grad = torch.randn_like(params[0])
            opt.step()
            if step == 3:
                assert "kahan_comp" not in opt.state[params[0]]
        runs.append(params[0].detach().clone())
    assert torch.equal(*runs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_momentum_buffer_set_to_none_restarts_it(backend):
    """``state[p]["momentum_buffer"] = None`` is how torch.optim.SGD is told "no buffer yet" (it restarts as
    ``buf = g``); FusedSGD refused it with a TypeError."""
    torch.manual_seed(3)
    ours, theirs = _params([(5,), (33,)]), _params([(5,), (33,)])
    for p, q in zip(ours, theirs):
        q.data.copy_(p.data)
    opt = fused_ops.FusedSGD(ours, lr=0.1, momentum=0.9, dampening=0.3, backend=backend)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, dampening=0.3, foreach=False)
    for step in range(4):
        if step == 2:
            opt.state[ours[1]]["momentum_buffer"] = None
            ref.state[theirs[1]]["momentum_buffer"] = None
        _same_grads(ours, theirs)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_group_appended_by_hand(name, backend):
    """``opt.param_groups.append(dict(...))`` with torch's keys only (torch.optim steps it): this package's keys take
    the constructor's values, as in a loaded group (a bare ``KeyError: 'backend'`` before); a group without a key
    that has no default is refused naming the group and the key, with nothing changed."""
    a, b = _params([(5,)]), _params([(6,)])
    opt = VARIANTS[name](a, backend)
    torch_group = {k: v for k, v in opt.param_groups[0].items() if k not in fused_ops.FusedAdamW._own_group_keys}
    opt.step()
    opt.param_groups.append({**torch_group, "params": b})
    before = b[0].detach().clone()
    opt.step()
    assert not torch.equal(before, b[0]) and opt.param_groups[1]["backend"] == backend
    c = _params([(4,)])
    opt.param_groups.append({"params": c, **{k: v for k, v in torch_group.items() if k not in ("params", "lr")}})
    expect_error_unchanged(opt.step, ValueError, "param group 2 has no 'lr'", opt)


def _torch_twin(name, params):
    if name.startswith("adamw"):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1 if name == "adamw" else 0.01, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=False)
    return None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_params_of_any_layout(name, backend):
    """Transposed, channels_last and strided-slice params (and one made so between steps) step as torch steps them,
    through a contiguous copy written back (before: refused, which a DTensor shard non-contiguous on one rank only
    turned into a step on the other ranks alone); an expanded param is refused with nothing changed."""
    torch.manual_seed(4)
    base = torch.randn(6, 10)
    layouts = [torch.randn(5, 3).t(), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
               base[:, ::2], torch.randn(7)]  # fmt: skip
    ours = [torch.nn.Parameter(x.clone(memory_format=torch.preserve_format) if x is not layouts[2] else x.detach())
            for x in layouts]  # fmt: skip
    ours[2] = torch.nn.Parameter(base.clone()[:, ::2])
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    flat = [torch.nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format)) for p in ours]  # (same opt)
    opt, twin = VARIANTS[name](ours, backend), VARIANTS[name](flat, backend)
    ref = _torch_twin(name, theirs)
    strides = [p.stride() for p in ours]
    for step in range(3):
        if step == 2:  # a param made non-contiguous between steps
            ours[3].data = ours[3].data.repeat(2)[::2]
            theirs[3].data = theirs[3].data.repeat(2)[::2]
            flat[3].data = flat[3].data.repeat(2)[::2].contiguous()
            strides[3] = (2,)
        for p, q, f in zip(ours, theirs, flat):
            p.grad = torch.randn_like(p)
            q.grad, f.grad = p.grad.clone(), p.grad.contiguous()
        for o in (opt, twin, ref):
            if o is not None:
                o.step()
    assert [p.stride() for p in ours] == strides
    for p, f in zip(ours, flat):
        assert torch.equal(p.detach(), f.detach())
    if ref is not None:
        atol = 2e-2 if name == "adamw_int8" else 1e-6
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=atol)
    expanded = torch.nn.Parameter(torch.zeros(1).expand(4))
    expanded.grad = torch.ones(4)
    opt.add_param_group({"params": [expanded]})
    expect_error_unchanged(opt.step, ValueError, "share memory \\(an expanded view", opt)


@pytest.mark.parametrize("groups", ["one group", "a group each"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
@isolated
def test_grads_inside_written_memory_or_negated(name, backend, groups):
    """A grad that is another param, another param's state or its own param (read by the launch that writes them:
    a race between programs on a GPU), or a negated view (whose memory holds the other sign): refused on both
    backends, at the first step and once a plan is reused (a moved grad only repointed the launch there), with
    nothing changed. Before: the reused plan launched, the reference backend took them, a fresh Triton plan refused
    them after creating the states, and a negated grad stepped with the wrong sign. With a group each, the reused
    plans took a grad inside another group's param or state (the checked step refused it)."""
    for when in ("first step", "reused plan"):
        params = _params()
        opt = VARIANTS[name](params if groups == "one group" else [{"params": [p]} for p in params], backend)
        if when == "reused plan":
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
        # another param, its own param, a negated view, another param's state (its largest: 8-bit codes too)
        cases = [params[1].detach()[:15].view(3, 5), params[0].detach()[:], torch.randn(3, 5)._neg_view()]
        if opt.state.get(params[1]):
            state = max(opt.state[params[1]].values(), key=lambda t: t.nbytes)
            cases.append(state.view(-1).view(torch.uint8)[:60].view(torch.float32).view(3, 5))
        for grad in cases:
            for p in params:
                p.grad = torch.randn_like(p)
            params[0].grad = grad
            expect_error_unchanged(opt.step, ValueError, "share memory|negated", opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_with_overlapping_strides_refused(backend):
    """``as_strided((3, 3), (2, 1))``: nine elements in seven places. Stepping a contiguous copy and writing it back
    would let the last writer win: refused, as an expanded param is."""
    base = torch.randn(8)
    p = torch.nn.Parameter(base.as_strided((3, 3), (2, 1)))
    p.grad = torch.randn(3, 3)
    opt = fused_ops.FusedAdamW([p], lr=1e-2, backend=backend)
    expect_error_unchanged(opt.step, ValueError, "overlapping strides", opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["column blocks", "row interleave"])
def test_disjoint_slices_of_one_matrix(backend, split):
    """``W[:, :3]`` and ``W[:, 3:]`` (a fused QKV weight split into params), or ``W[0::2]`` and ``W[1::2]``: their
    byte ranges overlap but they share no element; torch steps them, and so do we (refused as sharing memory
    before). A third param overlapping one of them is still refused."""
    torch.manual_seed(5)
    w, v = torch.randn(6, 10), None
    cut = (lambda m: (m[:, :3], m[:, 3:])) if split == "column blocks" else (lambda m: (m[0::2], m[1::2]))
    v = w.clone()
    ours, theirs = [torch.nn.Parameter(t) for t in cut(w)], [torch.nn.Parameter(t) for t in cut(v)]
    opt = fused_ops.FusedAdamW(ours, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for _ in range(3):
        _same_grads(ours, theirs)
        opt.step()
        ref.step()
    torch.testing.assert_close(w, v, rtol=1e-6, atol=1e-6)
    third = torch.nn.Parameter(w[1:3, 2:5])
    third.grad = torch.randn_like(third)
    opt.add_param_group({"params": [third]})
    expect_error_unchanged(opt.step, ValueError, "share memory", opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moved_grads_of_many_groups_search_one_union_of_written_spans(backend, monkeypatch):
    """Grads that moved are checked against the bytes every group's launches write. Each group searched every
    group's spans (host time growing with the square of the group count: 40 groups, 1,600 searches a step); they now
    search one union, merged once per set of plans (40 a step), and still find a grad inside another group's state."""
    params = [torch.nn.Parameter(torch.randn(7)) for _ in range(40)]
    opt = fused_ops.FusedAdamW([{"params": [p]} for p in params], lr=1e-2, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    calls = []
    real = torch.searchsorted
    monkeypatch.setattr(torch, "searchsorted", lambda *a, **k: calls.append(1) or real(*a, **k))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert len(calls) == len(params)
    monkeypatch.setattr(torch, "searchsorted", real)
    for p in params:
        p.grad = torch.randn_like(p)
    params[3].grad = opt.state[params[30]]["exp_avg_sq"].view(7)  # (group 30's state, read by group 3's launch)
    expect_error_unchanged(opt.step, ValueError, "share memory", opt)
