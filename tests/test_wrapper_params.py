"""Params that are wrapper subclasses holding their elements in one plain inner tensor (torchao's float8 training
weights, ``WeightWithDynamicFloat8CastTensor``, which FSDP2's float8 all-gather shards): the optimizers step the
inner tensor (what torch.optim's in-place ops reach through the wrapper's dispatch), read afresh at every step
before any check, and never run the wrapper's dispatch (``fused_ops/_validate.py: wrapped_inner``,
``fused_ops/optim/_base.py: _resolve_inners``). Before, such params were refused with a TypeError.

``Wrapped`` below is a test-local copy of that pattern (CI has no torchao): its dispatch runs every op on the inner
tensor and wraps the results of the ops torchao's does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._pytree import tree_map, tree_map_only

import fused_ops

from .safety import isolated

aten = torch.ops.aten
_PRESERVED = {aten.empty_like.default, aten.new_zeros.default, aten.slice.Tensor, aten.copy_.default,
              aten.view.default, aten.as_strided.default, aten._to_copy.default, aten.split.Tensor,
              aten.clone.default, aten.detach.default, aten.alias.default, aten.t.default}  # fmt: skip


class Wrapped(torch.Tensor):
    """A wrapper subclass in torchao's float8-weight pattern: one inner tensor ``_tensor``, every op run on it."""

    @staticmethod
    def __new__(cls, t: torch.Tensor, tag: str = "w"):
        return torch.Tensor._make_wrapper_subclass(cls, t.shape, strides=t.stride(), storage_offset=t.storage_offset(),
                                                   dtype=t.dtype, layout=t.layout, device=t.device,
                                                   requires_grad=t.requires_grad)  # fmt: skip

    def __init__(self, t: torch.Tensor, tag: str = "w"):
        self._tensor = t
        self._tag = tag

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x._tensor if isinstance(x, Wrapped) else x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func not in _PRESERVED:
            return out
        return tree_map_only(torch.Tensor, lambda x: cls(x), out)

    def __tensor_flatten__(self):
        return ["_tensor"], {"tag": self._tag}

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Wrapped(inner["_tensor"], meta["tag"])

    def __repr__(self):
        return f"Wrapped({self._tensor!r})"


class TwoInner(Wrapped):
    """Flattens into two inner tensors: which of them holds the elements is not said, so it is refused."""

    def __init__(self, t: torch.Tensor, tag: str = "w"):
        super().__init__(t, tag)
        self._other = t.clone()

    def __tensor_flatten__(self):
        return ["_tensor", "_other"], {"tag": self._tag}


def _param(t: torch.Tensor, cls: type = Wrapped) -> torch.nn.Parameter:
    return torch.nn.Parameter(cls(t.clone()))


OPTIMIZERS = {
    "adamw": (lambda ps, b: fused_ops.FusedAdamW(ps, lr=1e-2, weight_decay=0.1, backend=b),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False)),
    "adam": (lambda ps, b: fused_ops.FusedAdam(ps, lr=1e-2, weight_decay=0.1, backend=b),
             lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, foreach=False)),
    "sgd": (lambda ps, b: fused_ops.FusedSGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, backend=b),
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, foreach=False)),
}  # fmt: skip
SHAPES = [(5, 3), (17,), (1,), (0, 4)]


def _grads(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_wrapper_params_step_as_torch_steps_them(name, backend):
    """Wrapper params (with a plain one among them) step as torch.optim steps them through their dispatch; the
    wrapper keeps its inner tensor (written in place) and the states are plain tensors."""
    ours_cls, theirs_cls = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [_param(t) for t in init[:-1]] + [torch.nn.Parameter(init[-1].clone())]
    theirs = [_param(t) for t in init[:-1]] + [torch.nn.Parameter(init[-1].clone())]
    inners = [p._tensor for p in ours[:-1]]
    opt, ref = ours_cls(ours, backend), theirs_cls(theirs)
    for step in range(3):
        for a, b, g in zip(ours, theirs, _grads(10 + step), strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        got = a._tensor if isinstance(a, Wrapped) else a.detach()
        want = b._tensor if isinstance(b, Wrapped) else b.detach()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"param {i}")
    assert all(a._tensor is t for a, t in zip(ours, inners))  # (stepped in place)
    for p in ours:
        for k, v in opt.state[p].items():
            assert type(v) is torch.Tensor, (k, type(v))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bf16_wrapper_params_with_masters_and_int8_states(backend):
    """bf16 wrapper params with fp32 masters, and int8 states: the masters and states are made from the inner
    tensors (plain), and the result equals plain params stepped alike."""
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen).bfloat16() for s in SHAPES[:3]]
    for kwargs in ({"master_weights": True}, {"state_dtype": "int8", "master_weights": True}):
        wrapped = [_param(t) for t in init]
        plain = [torch.nn.Parameter(t.clone()) for t in init]
        opt = fused_ops.FusedAdamW(wrapped, lr=1e-2, backend=backend, **kwargs)
        twin = fused_ops.FusedAdamW(plain, lr=1e-2, backend=backend, **kwargs)
        for step in range(3):
            for a, b, g in zip(wrapped, plain, _grads(20 + step), strict=False):
                a.grad, b.grad = g.bfloat16(), g.bfloat16()
            opt.step()
            twin.step()
        for a, b in zip(wrapped, plain, strict=True):
            assert torch.equal(a._tensor, b.detach()), kwargs
            st, st_twin = opt.state[a], twin.state[b]
            assert sorted(st) == sorted(st_twin)
            for k in st:
                assert type(st[k]) is torch.Tensor and torch.equal(st[k], st_twin[k]), (kwargs, k)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inner_tensor_read_afresh_at_every_step(backend):
    """The inner tensor is read at every step, never cached: a wrapper given another inner tensor between steps
    has that one stepped (the old one is left as it was); given one that does not match the wrapper (another dtype,
    shape or strides, a subclass), the step refuses it naming the param, nothing changed."""
    p = _param(torch.randn(6))
    q = torch.nn.Parameter(torch.randn(4))
    opt = fused_ops.FusedAdamW([p, q], lr=1e-2, backend=backend)
    for _ in range(2):
        p.grad, q.grad = torch.randn(6), torch.randn(4)
        opt.step()
    old = p._tensor
    kept = old.clone()
    new = torch.randn(6)
    before = new.clone()
    p._tensor = new
    p.grad = torch.ones(6)
    opt.step()
    assert torch.equal(old, kept) and not torch.equal(new, before)
    for bad in (torch.randn(6).double(), torch.randn(7), torch.randn(12)[::2], torch.nn.Parameter(torch.randn(6))):
        p._tensor = bad
        state = {k: v.clone() for k, v in opt.state[p].items()}
        q_before, bad_before = q.detach().clone(), bad.detach().clone()
        with pytest.raises(TypeError, match="param 0 of param group 0"):
            opt.step()
        assert torch.equal(q.detach(), q_before) and torch.equal(bad.detach(), bad_before)
        assert all(torch.equal(v, state[k]) for k, v in opt.state[p].items())


def test_wrappers_that_are_not_one_plain_tensor_are_refused():
    """A wrapper with two inner tensors that could hold its elements (of its dtype, sizes and strides), or with
    another inner tensor of more than one element, is refused as before (a TypeError naming the param, nothing
    written); what a wrapper's flatten raises propagates (before any check: nothing written)."""

    class WithMask(Wrapped):
        def __init__(self, t, tag="w"):
            super().__init__(t, tag)
            self._mask = torch.ones(t.shape, dtype=torch.bool)

        def __tensor_flatten__(self):
            return ["_tensor", "_mask"], {"tag": self._tag}

    class Failing(Wrapped):
        def __tensor_flatten__(self):
            raise RuntimeError("flatten failed")

    for cls, error, match in ((TwoInner, TypeError, "param 1 of param group 0"), (WithMask, TypeError,
                              "param 1 of param group 0"), (Failing, RuntimeError, "flatten failed")):  # fmt: skip
        p, q = _param(torch.randn(5), cls), torch.nn.Parameter(torch.randn(3))
        p.grad, q.grad = torch.randn(5), torch.randn(3)
        q_before = q.detach().clone()
        opt = fused_ops.FusedAdamW([q, p], lr=1e-2, backend="reference")
        with pytest.raises(error, match=match):
            opt.step()
        assert torch.equal(q.detach(), q_before) and not opt.state


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_wrapper_with_a_scale_beside_its_tensor(backend):
    """torchao's float8 weights, once ``precompute_float8_dynamic_scale_for_fsdp`` ran (its FSDP2 recipe: after
    every step), flatten into their tensor and a 0-d scale: stepped on the tensor, as torch.optim steps them (probe
    75: they were refused from the second step on)."""

    class Scaled(Wrapped):
        def __init__(self, t, tag="w"):
            super().__init__(t, tag)
            self._scale = torch.ones(())

        def __tensor_flatten__(self):
            return ["_tensor", "_scale"], {"tag": self._tag}

    init = torch.randn(6)
    ours, theirs = _param(init, Scaled), _param(init, Scaled)
    opt = fused_ops.FusedAdamW([ours], lr=1e-2, backend=backend)
    ref = torch.optim.AdamW([theirs], lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(60)
    for g in (torch.randn(6, generator=gen), torch.randn(6, generator=gen)):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours._tensor, theirs._tensor, rtol=0, atol=1e-6)
    assert torch.equal(ours._scale, torch.ones(()))


def test_a_tensor_class_with_a_metaclass_of_its_own_is_refused_first():
    """Probe 75: a param class whose metaclass defines ``__getattribute__`` ran it when group 1's check read the
    class (its ``__mro__``), after group 0's grads were checked: there it shrank group 0's checked grad (SIGSEGV on
    the reference backend). A tensor class with another metaclass than torch's is refused now, read by identity
    alone, before anything of its class is looked up; nothing changed."""
    q = torch.nn.Parameter(torch.zeros(4096))
    ran = []

    class Meta(type(torch.nn.Parameter)):
        def __getattribute__(cls, name):
            if ran is not None:
                ran.append(name)
            return super().__getattribute__(name)

    class MetaParam(torch.nn.Parameter, metaclass=Meta):
        pass

    w = MetaParam(torch.zeros(8))
    for backend in ("reference", "triton"):
        q.grad, w.grad = torch.arange(4096.0), torch.ones(8)
        opt = fused_ops.FusedSGD([{"params": [q]}, {"params": [w]}], lr=1.0, backend=backend)
        with pytest.raises(TypeError, match="param 0 of param group 1 .*metaclass of its own"):
            opt.step()
        assert not q.detach().any() and not w.detach().any()


def test_flatten_runs_before_the_checks():
    """The wrapper's ``__tensor_flatten__`` (caller code) runs before any check: what it does to other params
    (here: drops another param's grad) is what the checks see (the other param is skipped, not launched on)."""
    q = torch.nn.Parameter(torch.randn(3))

    class Meddling(Wrapped):
        def __tensor_flatten__(self):
            q.grad = None
            return super().__tensor_flatten__()

    p = _param(torch.randn(5), Meddling)
    opt = fused_ops.FusedAdamW([q, p], lr=1e-2, backend="triton")
    q.grad, p.grad = torch.randn(3), torch.randn(5)
    q_before = q.detach().clone()
    opt.step()
    assert torch.equal(q.detach(), q_before) and q not in opt.state and p in opt.state


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_state_dicts_of_wrapper_params(backend):
    """Ours saved and loaded into a fresh optimizer continues as the saved one; torch.optim.AdamW's dict (whose
    states its ``zeros_like`` made through the wrapper's dispatch) loads into ours, and ours into torch's."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in SHAPES[:3]]

    def train(ps, opt, seeds):
        for s in seeds:
            for p, g in zip(ps, _grads(s), strict=False):
                p.grad = g.clone()
            opt.step()

    a = [_param(t) for t in init]
    opt_a = fused_ops.FusedAdamW(a, lr=1e-2, backend=backend)
    train(a, opt_a, [30, 31])
    b = [_param(p._tensor) for p in a]
    opt_b = fused_ops.FusedAdamW(b, lr=1e-2, backend=backend)
    opt_b.load_state_dict(opt_a.state_dict())
    train(a, opt_a, [32])
    train(b, opt_b, [32])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x._tensor, y._tensor)

    t = [_param(x) for x in init]
    torch_opt = torch.optim.AdamW(t, lr=1e-2)
    train(t, torch_opt, [30, 31])
    c = [_param(p._tensor) for p in t]
    opt_c = fused_ops.FusedAdamW(c, lr=1e-2, backend=backend)
    opt_c.load_state_dict(torch_opt.state_dict())
    assert all(type(v) is torch.Tensor for st in opt_c.state.values() for v in st.values())
    train(t, torch_opt, [32])
    train(c, opt_c, [32])
    for x, y in zip(t, c, strict=True):
        torch.testing.assert_close(y._tensor, x._tensor, rtol=0, atol=1e-6)
    d = [_param(p._tensor) for p in c]
    torch_d = torch.optim.AdamW(d, lr=1e-2)
    torch_d.load_state_dict(copy.deepcopy(opt_c.state_dict()))  # (torch's load keeps the dict's tensors)
    train(c, opt_c, [33])
    train(d, torch_d, [33])
    for x, y in zip(c, d, strict=True):
        torch.testing.assert_close(y._tensor, x._tensor, rtol=0, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["reference", "triton"])
@isolated
def test_dtensor_params_with_wrapper_shards(tmp_path, backend):
    """DTensor params whose local shards are wrappers (FSDP2's float8 all-gather: ``WeightWithDynamicFloat8CastTensor``
    shards), on a mesh of one gloo rank: stepped as torch.optim.AdamW steps them; states are DTensors with plain
    local shards; a wrapper shard given another inner tensor has that one stepped."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(4)
        init = [torch.randn(s, generator=gen) for s in SHAPES[:3]]

        def params():
            return [torch.nn.Parameter(DTensor.from_local(Wrapped(t.clone()), mesh, [Shard(0)], run_check=False))
                    for t in init]  # fmt: skip

        def train(xs, ys, opts, seeds, dtype=torch.float32):
            for seed in seeds:
                for a, b, g in zip(xs, ys, _grads(seed), strict=False):
                    a.grad = DTensor.from_local(g.to(dtype, copy=True), mesh, [Shard(0)], run_check=False)
                    b.grad = DTensor.from_local(g.to(dtype, copy=True), mesh, [Shard(0)], run_check=False)
                for o in opts:
                    o.step()

        ours, theirs = params(), params()
        opt = fused_ops.FusedAdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
        ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
        train(ours, theirs, (opt, ref), (40, 41, 42))
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a._local_tensor._tensor, b._local_tensor._tensor, rtol=0, atol=1e-6)
            for v in opt.state[a].values():
                if isinstance(v, DTensor):
                    assert type(v._local_tensor) is torch.Tensor
        new = torch.zeros(5, 3)
        ours[0]._local_tensor._tensor = new
        ours[0].grad = DTensor.from_local(torch.ones(5, 3), mesh, [Shard(0)], run_check=False)
        opt.step()
        assert new.abs().sum() > 0

        # The family, low-bit states and masters: as the same optimizer steps plain shards, bit for bit.
        variants = [
            lambda ps: fused_ops.FusedAdamW(ps, lr=1e-2, state_dtype="int8", master_weights=True, backend=backend),
            lambda ps: fused_ops.FusedSGD(ps, lr=1e-2, momentum=0.9, backend=backend),
            lambda ps: fused_ops.FusedLion(ps, lr=1e-3, backend=backend),
        ]
        for make in variants:
            bf16 = [t.bfloat16() for t in init]
            wrapped = [torch.nn.Parameter(DTensor.from_local(Wrapped(t.clone()), mesh, [Shard(0)], run_check=False))
                       for t in bf16]  # fmt: skip
            plain = [torch.nn.Parameter(DTensor.from_local(t.clone(), mesh, [Shard(0)], run_check=False)) for t in bf16]
            opt, twin = make(wrapped), make(plain)
            train(wrapped, plain, (opt, twin), (50, 51), torch.bfloat16)
            for a, b in zip(wrapped, plain, strict=True):
                assert torch.equal(a._local_tensor._tensor, b._local_tensor), type(opt).__name__
                for k, v in opt.state[a].items():
                    w = twin.state[b][k]
                    if isinstance(v, DTensor):
                        assert type(v._local_tensor) is torch.Tensor and torch.equal(v._local_tensor, w._local_tensor)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inner_tensors_are_checked_as_params_are(backend):
    """The inner tensor is checked as a plain param is: shared with another param (two wrappers of one tensor, or
    a wrapper of a plain param's tensor) or freed in place, the step refuses it, nothing changed."""
    t = torch.randn(6)
    cases = {
        "two wrappers of one tensor": lambda: [torch.nn.Parameter(Wrapped(t)), torch.nn.Parameter(Wrapped(t))],
        "a wrapper of a param": lambda: [p := torch.nn.Parameter(t.clone()), torch.nn.Parameter(Wrapped(p.data))],
    }
    for label, make in cases.items():
        ps = make()
        for p in ps:
            p.grad = torch.randn(6)
        before = [(p._tensor if isinstance(p, Wrapped) else p.detach()).clone() for p in ps]
        opt = fused_ops.FusedAdamW(ps, lr=1e-2, backend=backend)
        with pytest.raises(ValueError, match="share memory|overlap"):
            opt.step()
        for p, b in zip(ps, before, strict=True):
            assert torch.equal(p._tensor if isinstance(p, Wrapped) else p.detach(), b), label
        assert not opt.state, label
    p, q = _param(torch.randn(6)), torch.nn.Parameter(torch.randn(3))
    opt = fused_ops.FusedAdamW([q, p], lr=1e-2, backend=backend)
    p.grad, q.grad = torch.randn(6), torch.randn(3)
    opt.step()
    p._tensor.untyped_storage().resize_(0)
    q_before = q.detach().clone()
    with pytest.raises(ValueError, match="outside its storage"):
        opt.step()
    assert torch.equal(q.detach(), q_before)


def _no_entries_left():
    from fused_ops.optim import _base

    return not _base._INNERS


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_flatten_runs_before_any_inner_tensor_is_read(backend):
    """Probe 74: a later wrapper's ``__tensor_flatten__`` gave an earlier wrapper another inner tensor after the
    earlier one's was read: the step wrote the old, detached tensor and the param kept its value. Every flatten runs
    first now, then the inner tensors are read: the new one is stepped."""
    a = _param(torch.zeros(4))
    new = torch.ones(4)

    class Swapper(Wrapped):
        def __tensor_flatten__(self):
            a._tensor = new
            return super().__tensor_flatten__()

    c = torch.nn.Parameter(Swapper(torch.zeros(3)))
    opt = fused_ops.FusedAdamW([a, c], lr=0.1, backend=backend)
    old = a._tensor
    a.grad, c.grad = torch.ones(4), torch.ones(3)
    opt.step()
    assert a._tensor is new and not torch.equal(new, torch.ones(4)) and torch.equal(old, torch.zeros(4))
    assert _no_entries_left()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_wrapper_dropped_by_a_later_flatten_is_not_written(backend):
    """Probe 74: ``_INNERS`` was keyed by ``id()`` without holding the wrapper: a later flatten that removed a
    resolved wrapper param from the group (its last reference) let a state tensor made after the checks take its id,
    and the step wrote the dead wrapper's unchecked inner tensor (SIGSEGV once freed). Entries hold their wrapper
    now, and are matched by identity: the dropped param is not stepped, the others are, as a fresh step would."""
    for _ in range(10):
        kept = torch.nn.Parameter(torch.zeros(5))
        group = [None, kept, None]
        group[0] = _param(torch.zeros(5))
        inner = group[0]._tensor

        class Dropper(Wrapped):
            target = group

            def __tensor_flatten__(self):
                if self.target[0] is not None:
                    self.target[0] = None
                    del self.target[0]
                return super().__tensor_flatten__()

        group[2] = torch.nn.Parameter(Dropper(torch.zeros(5)))
        for p in group:
            if p is not None:
                p.grad = torch.ones(5)
        opt = fused_ops.FusedAdamW([p for p in group if p is not None], lr=0.1, backend=backend)
        group[:] = opt.param_groups[0]["params"]
        opt.param_groups[0]["params"] = group
        opt.step()
        assert torch.equal(inner, torch.zeros(5))
        for p in group:
            value = p._tensor if isinstance(p, Wrapped) else p.detach()
            torch.testing.assert_close(value, torch.full((5,), -0.1), rtol=0, atol=1e-6)
        assert _no_entries_left()


def test_a_step_inside_a_flatten_leaves_no_entries():
    """Probe 74: a step re-entered from a wrapper's flatten shared the outer step's list of entries, and the
    entries the outer step added afterwards outlived it (a later param reusing a dead wrapper's id would have been
    launched on that wrapper's inner tensor). Nothing is left after either step now."""
    p = _param(torch.zeros(4))
    calls = []

    class Reentering(Wrapped):
        def __tensor_flatten__(self):
            if not calls:
                calls.append(1)
                opt.step()
            return super().__tensor_flatten__()

    q = torch.nn.Parameter(Reentering(torch.zeros(3)))
    opt = fused_ops.FusedAdamW([p, q], lr=0.1, backend="reference")
    p.grad, q.grad = torch.ones(4), torch.ones(3)
    opt.step()
    assert calls and _no_entries_left()
    assert float(opt.state[p]["step"]) == 2 and float(opt.state[q]["step"]) == 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_wrapper_whose_grad_comes_later_is_stepped(backend):
    """Probe 74: a group whose first step had grads on its plain params only kept a reused plan, which skipped the
    wrappers' reading: the wrapper, given a grad later, was refused at every step. It is stepped, as by a fresh
    optimizer and by torch.optim."""
    w, q = _param(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    opt = fused_ops.FusedAdamW([q, w], lr=0.1, backend=backend)
    for _ in range(2):
        q.grad = torch.ones(3)
        opt.step()
    w.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(w._tensor, torch.full((4,), -0.1), rtol=0, atol=1e-6)


def test_a_wrapper_whose_sizes_its_dispatch_computes_is_refused():
    """A wrapper whose sizes or strides its dispatch computes (``dispatch_sizes_strides_policy``) would run that
    dispatch at every read of its metadata, between the checks and the launch: not stepped, refused as before,
    nothing changed."""
    calls = []

    class Custom(Wrapped):
        @staticmethod
        def __new__(cls, t, tag="w"):
            return torch.Tensor._make_wrapper_subclass(
                cls, t.shape, strides=t.stride(), dtype=t.dtype, device=t.device, dispatch_sizes_strides_policy="sizes"
            )

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            calls.append(func)
            if func is torch.ops.aten.sym_size.default:
                return args[0]._tensor.shape
            if func is torch.ops.aten.sym_numel.default:
                return args[0]._tensor.numel()
            return Wrapped.__torch_dispatch__.__func__(cls, func, types, args, kwargs)

    x = Custom(torch.zeros(4))
    q = torch.nn.Parameter(torch.zeros(3))
    opt = fused_ops.FusedAdamW([q], lr=0.1, backend="reference")
    opt.param_groups[0]["params"].append(x)
    x.grad, q.grad = torch.ones(4), torch.ones(3)
    calls.clear()
    with pytest.raises(TypeError, match="param 1 of param group 0"):
        opt.step()
    assert torch.equal(q.detach(), torch.zeros(3)) and torch.equal(x._tensor, torch.zeros(4)) and not opt.state
