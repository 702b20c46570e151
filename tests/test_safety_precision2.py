"""Safety regressions of DynamicLossScaler and FlatBuffer (second file), on both backends ("triton" under the
interpreter, "reference"): grads or ``out`` that are the scaler's own state refused before anything is written, the
double-unscale guard seeing any shared memory (a FlatBuffer's ``data``, a bucket, a slice) rather than only the same
tensor, a pickled FlatBuffer's views still views of its data, ``Bucket.shard`` taking int ranks only, and numpy
integers taken for every integer setting of the scaler. Each case failed before its fix (but the ``found_inf``
cases, refused by ``fused_ops.unscale_`` itself before, kept to pin that split)."""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import random
import time

import numpy as np
import pytest
import torch

from fused_ops import DynamicLossScaler, FlatBuffer, precision
from fused_ops.precision import _grad_keys, _Spans
from tests.safety import expect_error_unchanged, message_names

pytestmark = [pytest.mark.safety]

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]
NAN = float("nan")


def _scaler(backend, **kw):
    kw = {"init_scale": 1024.0, "device": "cpu", "warn_after": None, **kw}
    return DynamicLossScaler(backend=backend, **kw)


def _ref_update_ok(s: DynamicLossScaler) -> None:
    """After a refused call the scaler still works: an update with no overflow keeps a valid state."""
    s.update()
    assert s.get_scale() >= s.min_scale
    s2 = DynamicLossScaler(device="cpu")
    s2.load_state_dict(s.state_dict())


# -- 1. grads / out that are the scaler's own state ------------------------------------------------------------------


# label: (the scaler's state, or a view of it sharing its memory; the state's name in the message)
STATE = {
    "scale": (lambda s: s.scale, "scale"),
    "scale 0-d view": (lambda s: s.scale.view(()), "scale"),
    "found_inf": (lambda s: s.found_inf, "found_inf"),
    "growth_tracker as fp32": (lambda s: s._growth_tracker.view(torch.float32), "growth_tracker"),
    "hysteresis_tracker as fp32": (lambda s: s._hysteresis_tracker.view(torch.float32), "hysteresis_tracker"),
    # (float64: the reference backend only)
    "skipped_steps as fp64": (lambda s: s.skipped_steps_tensor.view(torch.float64), "skipped_steps"),
    "consecutive as fp64": (lambda s: s._consecutive.view(torch.float64), "consecutive_skipped"),
    "min_scale_overflows as fp64": (lambda s: s._min_scale_overflows.view(torch.float64), "min_scale_overflows"),
}
STATE_CASES = [
    pytest.param("triton", label, marks=pytest.mark.interpret, id=f"triton-{label}")
    for label in STATE
    if "fp64" not in label
] + [pytest.param("reference", label, id=f"reference-{label}") for label in STATE]


@pytest.mark.parametrize(("backend", "label"), STATE_CASES)
def test_unscale_out_into_scaler_state_refused(backend, label):
    """``unscale_(grads, out=[scaler.scale])`` wrote the scale (0 or negative after update(), a state_dict that
    load_state_dict refuses): now a ValueError naming out[i] and the state, before anything is written (a NaN grad
    would have set found_inf)."""
    s = _scaler(backend)
    get, name = STATE[label]
    own = get(s)
    grads = [torch.full((1,), NAN, dtype=own.dtype), torch.tensor([-5.0e6], dtype=own.dtype).reshape(own.shape)]
    outs = [torch.full((1,), NAN, dtype=own.dtype), own]
    if name == "found_inf":  # (written by fused_ops.unscale_, which names it itself)
        match = "^unscale_: out\\[1\\] and found_inf share memory"
        expect_error_unchanged(lambda: s.unscale_(grads, out=outs), ValueError, match, s, grads, outs)
        return
    err = expect_error_unchanged(lambda: s.unscale_(grads, out=outs), ValueError,
                                 "^DynamicLossScaler.unscale_: out\\[1\\] shares memory with the scaler's own",
                                 s, grads, outs)  # fmt: skip
    message_names(err, f"own {name} tensor")
    _ref_update_ok(s)
    assert s.get_scale() == 1024.0


@pytest.mark.parametrize(("backend", "label"), STATE_CASES)
def test_unscale_grads_that_are_scaler_state_refused(backend, label):
    """``unscale_([scaler.scale])`` divided the scale by itself in place (and read as grads, with out given, it is
    not a grad either): a ValueError naming grads[i], nothing written."""
    s = _scaler(backend)
    get, name = STATE[label]
    own = get(s)
    grads = [torch.full((3,), NAN, dtype=own.dtype), own]
    match = f"^DynamicLossScaler.unscale_: grads\\[1\\] shares memory with the scaler's own {name} "
    if name == "found_inf":  # (written by fused_ops.unscale_, which names it itself)
        match = "^unscale_: grads\\[1\\] and found_inf share memory"
    expect_error_unchanged(lambda: s.unscale_(grads), ValueError, match, s, grads)
    outs = [torch.full((3,), NAN, dtype=own.dtype), torch.full(own.shape, NAN, dtype=own.dtype)]
    expect_error_unchanged(lambda: s.unscale_(grads, out=outs), ValueError, match, s, grads, outs)
    # nothing was remembered as unscaled: the same grads, less the state, are taken
    s.unscale_(grads[:1])
    assert s.found_inf.item() == 1.0
    _ref_update_ok(s)
    assert s.get_scale() == 512.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_next_to_scaler_state_taken(backend):
    """Tensors next to the state (not sharing a byte) are unscaled as before."""
    s = _scaler(backend)
    g = torch.full((4,), 2048.0)
    s.unscale_([g])
    assert g.tolist() == [2.0] * 4 and s.found_inf.item() == 0.0
    s.update()
    assert s.get_scale() == 1024.0


# -- 2. the double-unscale guard sees shared memory, not only the same tensor ----------------------------------------


def _flat_grads(backend, align=4, world_size=1, cap=None):
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2))]
    buf = FlatBuffer.for_grads(ps, align=align, bucket_cap_mb=cap, world_size=world_size, backend=backend)
    for p in ps:
        p.grad.fill_(1024.0)
    return ps, buf


ALREADY = "already unscaled by unscale_\\(\\) since the last update\\(\\)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscaled_views_then_flat_buffer_refused(backend):
    """Grads unscaled through ``p.grad`` views of a FlatBuffer, then normed or unscaled through ``buf.data``, a slice
    or a bucket, were divided twice (norm too small by the scale, grads 1/1024): the RuntimeError of a second
    unscale_ now, nothing changed."""
    ps, buf = _flat_grads(backend, cap=16 / 2**20)
    s = _scaler(backend)
    s.unscale_([p.grad for p in ps])
    assert all(p.grad.tolist() == [1.0] * p.numel() for p in ps)
    whole = [buf.data]
    calls = {
        "grad_scale_and_norm(data)": lambda: s.grad_scale_and_norm(whole),
        "grad_scale_and_norm(data, max_norm)": lambda: s.grad_scale_and_norm(whole, max_norm=1.0),
        "grad_scale_and_norm(bucket)": lambda: s.grad_scale_and_norm([buf.buckets[-1].data]),
        "unscale_(data[1:])": lambda: s.unscale_([buf.data[1:]]),
        "unscale_(data[2:3])": lambda: s.unscale_([buf.data[2:3]]),
        "unscale_(data, out)": lambda: s.unscale_(whole, out=[torch.full_like(buf.data, NAN)]),
        "unscale_(data as bf16)": lambda: s.unscale_([buf.data.view(torch.bfloat16)]),
        "unscale_(2-d view)": lambda: s.unscale_([buf.data.view(-1, 2)[:, 1]]),
        "unscale_(shard)": lambda: s.unscale_([buf.buckets[0].shard(0)]),
    }
    for call in calls.values():
        expect_error_unchanged(call, RuntimeError, ALREADY, s, ps, buf)
    # (what ZeroAdamW's step(loss_scale=scaler) asks of the scaler: the same answer)
    assert isinstance(s._unscaled, _Spans) and s._unscaled
    assert not s._unscaled.isdisjoint(_grad_keys([buf.data]))
    _ref_update_ok(s)
    _, norm = s.grad_scale_and_norm([buf.data])  # (after update(): taken)
    assert math.isclose(norm.item(), math.sqrt(10) / s.get_scale(), rel_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscaled_flat_buffer_then_views_refused(backend):
    """The other way round: ``buf.data`` unscaled, then a param's grad view (inside it) refused."""
    ps, buf = _flat_grads(backend)
    s = _scaler(backend)
    s.unscale_([buf.data])
    for p in ps:
        expect_error_unchanged(lambda p=p: s.unscale_([p.grad]), RuntimeError, ALREADY, s, ps, buf)
        expect_error_unchanged(lambda p=p: s.grad_scale_and_norm([p.grad]), RuntimeError, ALREADY, s, ps, buf)
    assert [p.grad.tolist() for p in ps] == [[1.0] * 3, [1.0] * 5, [1.0] * 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_guard_partial_overlap_and_neighbours(backend):
    """A slice overlapping by one element is refused; adjacent slices, and the still-scaled sources of an ``out``
    unscale, are taken (no memory shared with what was unscaled)."""
    s = _scaler(backend)
    x = torch.full((16,), 1024.0)
    s.unscale_([x[:4]])
    expect_error_unchanged(lambda: s.unscale_([x[3:8]]), RuntimeError, ALREADY, s, x)
    expect_error_unchanged(lambda: s.unscale_([x[8:], x[:1]]), RuntimeError, ALREADY, s, x)
    s.unscale_([x[4:8]])  # adjacent: no byte shared
    s.unscale_([x[8:]])
    assert x.tolist() == [1.0] * 16
    # out=: the written copies are remembered, the sources (still scaled) are not
    g, o = torch.full((6,), 2048.0), torch.full((6,), NAN)
    s.unscale_([g], out=[o])
    expect_error_unchanged(lambda: s.grad_scale_and_norm([o[2:]]), RuntimeError, ALREADY, s, g, o)
    _, norm = s.grad_scale_and_norm([g[1:]])
    assert math.isclose(norm.item(), math.sqrt(5) * 2.0, rel_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_guard_interleaved_views_taken(backend):
    """Strided views that share no element (even and odd columns, column blocks) are not the same grads: the second
    is unscaled, as before; a view that shares one element with them is refused."""
    s = _scaler(backend)
    w = torch.full((6, 8), 1024.0)
    s.unscale_([w[:, 0::2]])
    s.unscale_([w[:, 1::2][:, :2]])
    s.unscale_([w[:, 5::2]])
    assert w.eq(1.0).all()
    expect_error_unchanged(lambda: s.unscale_([w[2:4, 3]]), RuntimeError, ALREADY, s, w)
    expect_error_unchanged(lambda: s.unscale_([w[5]]), RuntimeError, ALREADY, s, w)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_scaler_copies_keep_what_was_unscaled(how):
    """A pickled or copied scaler remembers the spans unscaled since the last update (its own ``_unscaled``)."""
    s = _scaler("reference")
    x = torch.full((8,), 1024.0)
    s.unscale_([x[:4]])
    c = pickle.loads(pickle.dumps(s)) if how == "pickle" else copy.deepcopy(s)
    assert isinstance(c._unscaled, _Spans) and len(c._unscaled) == 1
    with pytest.raises(RuntimeError, match=ALREADY):
        c.unscale_([x[2:3]])
    c.unscale_([x[4:]])
    c.update()
    c.unscale_([x])


def _brute_shared(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether a byte of a tensor of ``a`` is a byte of one of ``b`` (every element enumerated)."""

    def bytes_of(xs):
        out = set()
        for x in xs:
            if x.numel() == 0:
                continue
            base, size = x.data_ptr(), x.element_size()
            idx = torch.as_strided(torch.arange(x.untyped_storage().nbytes() // size), x.shape, x.stride(), 0)
            for k in idx.reshape(-1).tolist():
                out.update(range(base + k * size, base + (k + 1) * size))
        return out

    return not bytes_of(a).isdisjoint(bytes_of(b))


def test_spans_against_brute_force():
    """The sorted-spans check against an element-by-element comparison, on random slices of one storage (1-d
    ranges, and 2-d blocks that interleave)."""
    rng = random.Random(0)
    base = torch.zeros(256)
    grid = torch.zeros(16, 16)
    for _ in range(300):

        def pick():
            if rng.random() < 0.5:
                i = rng.randrange(0, 256)
                return base[i : i + rng.randrange(0, 12)]
            r, c = rng.randrange(0, 16), rng.randrange(0, 16)
            v = grid[r : r + rng.randrange(1, 5), c : c + rng.randrange(1, 5)]
            return v[:, :: rng.choice([1, 2])]

        a = [pick() for _ in range(rng.randrange(1, 6))]
        b = [pick() for _ in range(rng.randrange(1, 6))]
        shared = _brute_shared(a, b)
        got = not _grad_keys(a).isdisjoint(_grad_keys(b))
        if shared:
            assert got, (a, b)  # never missed
        elif got:  # (conservative only where the layouts differ: never for two 1-d ranges)
            assert not all(x.is_contiguous() for x in a + b), (a, b)


def test_spans_cost_is_not_quadratic():
    """20,000 grads unscaled, then 20,000 others compared with them: a bisection each (an O(n^2) comparison took
    minutes); and a refusal found among them."""
    base = torch.zeros(40_000 * 4)
    done = [base[8 * i : 8 * i + 4] for i in range(20_000)]
    other = [base[8 * i + 4 : 8 * i + 8] for i in range(20_000)]
    t0 = time.perf_counter()
    kept = _grad_keys(done)
    assert kept.isdisjoint(_grad_keys(other))
    assert not kept.isdisjoint(_grad_keys(other[:-1] + [base[-13:-11]]))
    assert time.perf_counter() - t0 < 5.0


# -- 3. FlatBuffer pickled; Bucket.shard ------------------------------------------------------------------------------


def _tied(fb: FlatBuffer) -> bool:
    ptr = fb.data.untyped_storage().data_ptr()
    return all(v.untyped_storage().data_ptr() == ptr for v in [*fb.views, *(b.data for b in fb.buckets)])


def _roundtrips(fb):
    yield "pickle", pickle.loads(pickle.dumps(fb))
    yield "deepcopy", copy.deepcopy(fb)
    f = io.BytesIO()
    torch.save(fb, f)
    f.seek(0)
    yield "torch.save", torch.load(f, weights_only=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickled_flat_buffer_keeps_views_tied(backend):
    """After ``pickle.loads(pickle.dumps(fb))`` the views and buckets were copies of their own (writes through the
    buffer's methods did not show in ``buf[i]`` nor the buckets): tied to ``data`` now, as deepcopy and torch.save
    keep them, with the same values, offsets and shapes."""
    fb = FlatBuffer([torch.arange(3.0), torch.arange(5.0) + 10, torch.ones(2, 2)], align=4, world_size=2,
                    bucket_cap_mb=24 / 2**20, backend=backend)  # fmt: skip
    assert len(fb.buckets) > 1
    for how, c in _roundtrips(fb):
        assert _tied(c), how
        assert c.data.untyped_storage().data_ptr() != fb.data.untyped_storage().data_ptr(), how
        assert torch.equal(c.data, fb.data), how
        assert [v.shape for v in c.views] == [v.shape for v in fb.views], how
        layout = [(b.offset, b.numel, b.indices) for b in fb.buckets]
        assert [(b.offset, b.numel, b.indices) for b in c.buckets] == layout, how
        c.copy_from_([torch.full((3,), 2.0), torch.full((5,), 3.0), torch.full((2, 2), 4.0)])
        assert c[0].tolist() == [2.0] * 3 and c[1].tolist() == [3.0] * 5 and c[2].eq(4.0).all(), how
        assert c.buckets[0].shard(0).tolist() == [2.0, 2.0] and c.buckets[1].data[:5].tolist() == [3.0] * 5, how
        c.zero_()
        assert all(v.eq(0).all() for v in c.views), how
        assert fb[0].tolist() == [0.0, 1.0, 2.0], how  # (the original untouched)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickled_grad_buffer_binds_its_views(backend):
    """A pickled ``for_grads`` buffer binds views of its own data (bind_grads_ of the copy: backward writes where
    the copy's norm reads)."""
    ps = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))]
    fb = FlatBuffer.for_grads(ps, align=4, backend=backend)
    c = pickle.loads(pickle.dumps(fb))
    qs = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))]
    c.bind_grads_(qs)
    (qs[0].sum() * 2 + qs[1].sum()).backward()
    assert c.data[:3].tolist() == [2.0] * 3 and c[1].tolist() == [1.0] * 4


def test_pickled_flat_buffer_after_data_replaced():
    """``data`` given other memory: pickled, it keeps its own storage and the views theirs (as deepcopy)."""
    fb = FlatBuffer([torch.ones(3), torch.ones(5)], align=4)
    fb.data = torch.zeros(fb.numel + 4)[4:]
    for how, c in _roundtrips(fb):
        assert c.data.storage_offset() == 4 and c.data.eq(0).all(), how
        assert c[0].untyped_storage().data_ptr() == c[1].untyped_storage().data_ptr(), how
        assert c[0].untyped_storage().data_ptr() != c.data.untyped_storage().data_ptr(), how
        assert c[0].tolist() == [1.0] * 3, how


@pytest.mark.parametrize("rank", [True, False, 1.0, 0.0, "0", None, torch.tensor(0), np.float64(0)])
def test_bucket_shard_takes_int_ranks_only(rank):
    """``shard(1.0)`` raised narrow()'s own TypeError and ``shard(True)`` was rank 1: a TypeError naming rank."""
    fb = FlatBuffer([torch.ones(3), torch.ones(5)], align=4, world_size=2)
    with pytest.raises(TypeError, match="^Bucket.shard: rank must be an int, got "):
        fb.buckets[0].shard(rank)


def test_bucket_shard_ranks():
    fb = FlatBuffer([torch.arange(3.0), torch.arange(5.0)], align=4, world_size=2)
    b = fb.buckets[0]
    assert b.shard(np.int64(1)).tolist() == b.shard(1).tolist() == b.data[b.numel // 2 :].tolist()
    for bad in (-1, 2, np.int32(2)):
        with pytest.raises(ValueError, match="^Bucket.shard: rank must be in \\[0, 2\\)"):
            b.shard(bad)


# -- 4. numpy integers for every integer setting ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint16])
def test_numpy_int_settings_accepted(kind):
    """np.int64 growth_interval / hysteresis were refused ("must be a positive int, got np.int64(10)") by the
    constructor and load_state_dict, while an np.int64 growth_tracker loaded: every integer setting takes any
    integer but a bool now, kept as a Python int (state_dict), and the scaler runs as with ints."""
    a = DynamicLossScaler(init_scale=8.0, growth_interval=kind(2), hysteresis=kind(2), warn_after=kind(3),
                          check_interval=kind(1), device="cpu")  # fmt: skip
    b = DynamicLossScaler(init_scale=8.0, growth_interval=2, hysteresis=2, warn_after=3, check_interval=1, device="cpu")
    for x in (a, b):
        for flag in (1, 1, 0, 0, 0, 1):
            x.found_inf.fill_(flag)
            x.update()
    assert a.state_dict() == b.state_dict()
    assert all(type(v) is int for k, v in a.state_dict().items() if k in ("growth_interval", "hysteresis"))
    assert type(a.warn_after) is int and type(a.check_interval) is int
    d = b.state_dict()
    d.update(growth_interval=kind(5), hysteresis=kind(3), hysteresis_tracker=kind(3), growth_tracker=kind(1),
             skipped_steps=kind(4), consecutive_skipped=kind(1), min_scale_overflows=kind(0))  # fmt: skip
    c = DynamicLossScaler(device="cpu")
    c.load_state_dict(d)
    sd = c.state_dict()
    assert (sd["growth_interval"], sd["hysteresis"], sd["hysteresis_tracker"]) == (5, 3, 3)
    assert type(sd["growth_interval"]) is int and type(sd["hysteresis"]) is int


@pytest.mark.parametrize("name", ["growth_interval", "hysteresis"])
def test_numpy_int_settings_still_checked(name):
    """Numpy integers go through the same checks as ints: 0, a bool and a value past int32 refused, nothing
    changed."""
    cases = [(np.int64(0), ""), (np.bool_(True), ""), (np.int64(2**31), " at most 2147483647"), (np.float64(2.0), "")]
    for bad, more in cases:
        match = "must be a positive int" + more
        with pytest.raises(ValueError, match=f"^DynamicLossScaler: {name} {match}"):
            DynamicLossScaler(device="cpu", **{name: bad})
        s = DynamicLossScaler(device="cpu", hysteresis=2)
        d = s.state_dict()
        d[name] = bad
        expect_error_unchanged(lambda s=s, d=d: s.load_state_dict(d), ValueError,
                               f"^DynamicLossScaler.load_state_dict: {name} {match}", s)  # fmt: skip
        assert s.state_dict()[name] == (2 if name == "hysteresis" else 2000)


def test_torch_save_of_a_module_holding_its_flat_buffer():
    # (the buffer's storage pickled as bytes next to the float32 params that view it: torch.save refused one storage
    # seen as two dtypes; a module keeping its FlatBuffer, and a dict of a buffer and its views, saved before)
    m = torch.nn.Linear(4, 3)
    m.flat = FlatBuffer.from_params(list(m.parameters()), align=4)
    f = io.BytesIO()
    torch.save(m, f)
    f.seek(0)
    m2 = torch.load(f, weights_only=False)
    m2.flat.data.fill_(7.0)
    assert (m2.weight == 7).all() and (m2.bias == 7).all() and all((v == 7).all() for v in m2.flat.views)
    f = io.BytesIO()
    torch.save({"buf": m.flat, "view": m.flat.views[0]}, f)
    f.seek(0)
    d = torch.load(f, weights_only=False)
    d["buf"].data.fill_(3.0)
    assert (d["view"] == 3).all()


def test_spans_compare_with_spans_only():
    keys = _grad_keys([torch.ones(3)])
    with pytest.raises(TypeError, match="_Spans.isdisjoint takes another _Spans"):
        keys.isdisjoint(set(keys))


# -- grads freed after their unscale_, and new grads at their memory (several models, one scaler) -----------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_grads_at_freed_unscaled_memory_are_not_refused(backend, monkeypatch):
    """torch's GradScaler docs step several models with one scaler: unscale_ D's grads, step D, free them
    (``zero_grad(set_to_none=True)``), then G's backward allocates grads that may get D's memory. The scaler remembered
    D's spans until update() and refused G's grads there as "already unscaled" (torch's GradScaler, which tracks per
    optimizer, takes them). Spans whose storage was freed are forgotten now; grads still alive stay refused."""
    s = _scaler(backend)
    # The CPU allocator (malloc) gives freed memory back only by chance: simulated by storages over fixed bytes,
    # counted as memory torch owns (what the scaler tracks; see the next test for memory it does not own).
    monkeypatch.setattr(precision, "_RESIZABLE", lambda st: True)
    memory = [bytearray(64 * 4), bytearray(8 * 4)]  # (what an allocator hands out again: the same bytes each time)

    def grads(*values):
        return [torch.frombuffer(m, dtype=torch.float32).fill_(v) for m, v in zip(memory, values)]

    d = grads(1024.0, 2048.0)
    s.unscale_(d)
    where = [x.data_ptr() for x in d]
    del d  # (their storages are freed; the memory comes back to the next grads)
    g = grads(4096.0, 1024.0)
    assert [x.data_ptr() for x in g] == where
    s.unscale_(g)
    assert g[0].tolist() == [4.0] * 64 and g[1].tolist() == [1.0] * 8
    with pytest.raises(RuntimeError, match="already unscaled by unscale_"):  # (alive: still refused)
        s.unscale_([g[1]])
    buf = torch.full((16,), 1024.0)
    s.unscale_([buf[:8]])  # (a temporary view: its storage lives on in buf, so its span is kept)
    with pytest.raises(RuntimeError, match="already unscaled by unscale_"):
        s.unscale_([buf[4:12]])
    twin = copy.deepcopy(s)  # (copies keep the spans, conservatively: their storages count as alive)
    assert twin._unscaled and all(ref is None for *_, ref in twin._unscaled_storages)
    pickle.loads(pickle.dumps(s))
    s.update()
    s.unscale_(g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscaled_memory_torch_does_not_own_is_never_forgotten(backend):
    """Storages wrapping memory torch does not own (``torch.from_numpy``, ``frombuffer``, DLPack) may die while the
    memory, and the unscaled values in it, live on: wrapping it again and unscaling was accepted (divided twice) once
    the spans of dead storages were forgotten. Their spans are kept until update()."""
    np_ = pytest.importorskip("numpy")
    s = _scaler(backend)
    host = np_.full(4, 4096.0, np_.float32)
    raw = bytearray(np_.full(8, 2048.0, np_.float32).tobytes())
    s.unscale_([torch.from_numpy(host), torch.frombuffer(raw, dtype=torch.float32)])
    gc.collect()
    for again in ([torch.from_numpy(host)], [torch.frombuffer(raw, dtype=torch.float32)]):
        with pytest.raises(RuntimeError, match="already unscaled by unscale_"):
            s.unscale_(again)
    assert host.tolist() == [4.0] * 4 and torch.frombuffer(raw, dtype=torch.float32).tolist() == [2.0] * 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_outside_their_storage_are_named_as_such_first(backend):
    """A grad whose storage was shrunk in place keeps a span past its storage, anywhere in memory: where that span
    met the scaler's own tensors or unscaled spans (the allocator's choice: CI saw it once), unscale_ named the
    overlap instead of the freed memory. The op's "lies outside its storage" comes first now."""
    s = _scaler(backend)
    s._unscaled = _Spans({torch.device("cpu"): ([1], [2**62], None)})  # (every address counts as unscaled)
    g = torch.ones(1000)
    g.untyped_storage().resize_(16)
    with pytest.raises(ValueError, match="grads\\[0\\] lies outside its storage"):
        s.unscale_([g])
    with pytest.raises(RuntimeError, match="already unscaled by unscale_"):  # (a grad inside its storage: refused)
        s.unscale_([torch.ones(3)])
