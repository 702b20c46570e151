"""The eager host path of the non-Adam ops (``functional``, ``FlatBuffer``, ``DynamicLossScaler``).

Eager calls skip the custom op's Python wrapper and the per-tensor ``detach`` (the bodies run under
``torch.no_grad``), check their arguments in a few passes, and fall back to the per-tensor loops only to name
an offender. What that must not change: the results (bit-equal to calling ``torch.ops.fused_ops.*``), the
autograd version counters (exactly one bump per written tensor on the Triton path), the errors, non-contiguous
inputs, unflatten's views, and what ``torch.compile`` traces. No timings are asserted here.
"""

import math
import re

import pytest
import torch

from fused_ops import FlatBuffer, functional, reference
from fused_ops.precision import DynamicLossScaler

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy, in the interpreter

SHAPES = [(5,), (3, 4), (1, 7), (2, 1, 3), (0,), (64,), (33,), (4, 0, 2)]
BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]
ALIGN = 16


def _randn(shapes, dtype=torch.float32):
    return [torch.randn(s).to(dtype) for s in shapes]


def _params(shapes=SHAPES, dtype=torch.float32):
    return [torch.nn.Parameter(x) for x in _randn(shapes, dtype)]


def _versions(tensors):
    return [x._version for x in tensors]


def _bumps(tensors, before):
    return [x._version - b for x, b in zip(tensors, before, strict=True)]


def _assert_bumped(tensors, before, backend):
    """Exactly one bump per written tensor on the Triton path (one C++ call); at least one on the plain-torch
    path, whose torch ops may bump again (as through the custom op's wrapper)."""
    bumps = _bumps(tensors, before)
    if backend == "triton":
        assert bumps == [1] * len(tensors)
    else:
        assert all(b >= 1 for b in bumps), bumps


def _assert_leaf_params(params):
    assert all(p.is_leaf and p.requires_grad and p.grad_fn is None for p in params)


def _transposed(shapes, dtype=torch.float32):
    """Non-contiguous tensors (transposes of 2-d ones, strided slices of 1-d ones) with the given shapes."""
    out = []
    for s in shapes:
        if len(s) == 2:
            out.append(torch.randn(s[1], s[0]).to(dtype).t())
        else:
            out.append(torch.randn(*s[:-1], 2 * s[-1]).to(dtype)[..., ::2] if s else torch.randn(()).to(dtype))
    return out


# -- version counters: leaf params that require grad, written eagerly ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cast_into_params_bumps_versions(backend):
    params = _params()
    src = _randn(SHAPES, torch.bfloat16)
    before = _versions(params)
    functional.cast_(params, src, backend=backend)
    _assert_bumped(params, before, backend)
    _assert_leaf_params(params)
    for p, s in zip(params, src, strict=True):
        assert torch.equal(p.detach(), s.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_cast_from_params_leaves_them_alone(backend):
    params = _params()
    dst = [torch.empty(s, dtype=torch.bfloat16) for s in SHAPES]
    before = _versions(params)
    functional.cast_(dst, params, backend=backend)
    assert _bumps(params, before) == [0] * len(params)
    for d, p in zip(dst, params, strict=True):
        assert torch.equal(d, p.detach().bfloat16()) and not d.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_unscale_params_in_place_bumps_versions(backend, scale_kind):
    params = _params()
    expected = [p.detach() * 0.25 for p in params]
    found_inf = torch.zeros(1)
    before, flag_before = _versions(params), found_inf._version
    inv = 0.25 if scale_kind == "float" else torch.tensor(0.25)
    functional.unscale_(params, inv, found_inf, backend=backend)
    _assert_bumped(params, before, backend)
    assert found_inf._version > flag_before
    if backend == "triton":
        assert found_inf._version == flag_before + 1
    _assert_leaf_params(params)
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p.detach(), e)
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_into_out_params_bumps_only_out(backend):
    grads = _randn(SHAPES, torch.bfloat16)
    outs = _params()
    found_inf = torch.zeros(1)
    g_before, o_before = _versions(grads), _versions(outs)
    functional.unscale_(grads, 0.5, found_inf, out=outs, backend=backend)
    _assert_bumped(outs, o_before, backend)
    assert _bumps(grads, g_before) == [0] * len(grads)  # read, not written
    for o, g in zip(outs, grads, strict=True):
        assert torch.equal(o.detach(), g.float() * 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unflatten_copy_into_params_bumps_versions(backend):
    src = _randn(SHAPES)
    flat = functional.flatten(src, ALIGN, backend="reference")
    params = _params()
    before = _versions(params)
    functional.unflatten_copy_(params, flat, ALIGN, backend=backend)
    _assert_bumped(params, before, backend)
    _assert_leaf_params(params)
    for p, s in zip(params, src, strict=True):
        assert torch.equal(p.detach(), s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flatbuffer_copies_bump_versions(backend):
    params = _params()
    buffer = FlatBuffer(params, align=ALIGN, backend=backend)
    p_before, data_before = _versions(params), buffer.data._version
    buffer.copy_from_(params)
    assert buffer.data._version > data_before
    if backend == "triton":
        assert buffer.data._version == data_before + 1
    assert _bumps(params, p_before) == [0] * len(params)
    assert torch.equal(buffer.data, functional.flatten(params, ALIGN, backend="reference"))
    buffer.data.mul_(2.0)
    before = _versions(params)
    buffer.copy_to_(params)
    _assert_bumped(params, before, backend)
    _assert_leaf_params(params)
    for p, v in zip(params, buffer.views, strict=True):
        assert torch.equal(p.detach(), v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_ops_bump_nothing_and_return_no_graph(backend):
    params = _params()
    before = _versions(params)
    flat = functional.flatten(params, ALIGN, backend=backend)
    norm = functional.grad_norm(params, backend=backend)
    assert _bumps(params, before) == [0] * len(params)
    assert not flat.requires_grad and flat.grad_fn is None
    assert not norm.requires_grad and norm.grad_fn is None
    assert torch.equal(flat, torch.ops.fused_ops.flatten([p.detach() for p in params], ALIGN, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_sees_the_write(backend):
    """A param saved for backward and then overwritten: backward must refuse, as for any in-place write."""
    p = torch.nn.Parameter(torch.randn(8))
    loss = (p * p).sum()
    functional.cast_([p], [torch.randn(8, dtype=torch.bfloat16)], backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# -- the eager path gives what the custom op gives ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_flatten_ops_match_the_custom_ops(backend):
    xs = _randn(SHAPES)
    offsets, spans, _ = reference.flatten_layout([x.numel() for x in xs], ALIGN)
    flat = functional.flatten(xs, ALIGN, backend=backend)
    assert torch.equal(flat, torch.ops.fused_ops.flatten(xs, ALIGN, backend))

    a, b = ([torch.full(s, float("nan")) for s in SHAPES] for _ in range(2))
    functional.unflatten_copy_(a, flat, ALIGN, backend=backend)
    torch.ops.fused_ops.unflatten_copy_(b, flat, offsets, backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    buffer = FlatBuffer(xs, align=ALIGN, copy=False, backend=backend)
    buffer.copy_from_(xs)
    other = torch.full_like(buffer.data, float("nan"))
    torch.ops.fused_ops.flatten_into_(other, xs, buffer.offsets, buffer._spans, backend)
    assert torch.equal(buffer.data, other)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_cast_matches_the_custom_op(backend, stochastic):
    src = _randn(SHAPES)
    a, b = ([torch.empty(s, dtype=torch.bfloat16) for s in SHAPES] for _ in range(2))
    functional.cast_(a, src, stochastic, seed=1234, backend=backend)
    torch.ops.fused_ops.cast_(b, src, stochastic, 1234, backend)  # one group: its seed is the seed
    assert all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_out", [False, True])
def test_unscale_matches_the_custom_op(backend, with_out):
    grads = _randn(SHAPES, torch.bfloat16)
    grads[1][1, 2] = float("inf")
    inv = torch.tensor([0.125])
    g1, g2 = [g.clone() for g in grads], [g.clone() for g in grads]
    o1, o2 = ([torch.empty(s) for s in SHAPES] for _ in range(2)) if with_out else ([], [])
    f1, f2 = torch.zeros(1), torch.zeros(1)
    functional.unscale_(g1, inv, f1, out=o1 if with_out else None, backend=backend)
    torch.ops.fused_ops.unscale_(g2, inv, 0.0, f2, o2, backend)
    assert f1.item() == f2.item() == 1.0
    for x, y in zip(g1 + o1, g2 + o2, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_grad_norm_matches_the_custom_op(backend, p):
    xs = _randn(SHAPES)
    got = functional.grad_norm(xs, p, backend=backend)
    want = torch.ops.fused_ops.grad_norm(xs, p, backend)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_grad_scale_and_norm_unchanged():
    """DynamicLossScaler.grad_scale_and_norm on params that require grad: the norm of the scaled grads,
    divided by the scale, and nothing written."""
    params = _params([(3, 4), (7,), (1, 5)])
    scaler = DynamicLossScaler(init_scale=8.0, device="cpu", backend="reference")
    before = _versions(params)
    grad_scale, norm = scaler.grad_scale_and_norm(params, max_norm=1.0)
    expected = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in params]).double()) / 8.0
    torch.testing.assert_close(norm, expected.float())
    torch.testing.assert_close(grad_scale, torch.tensor([8.0]) / functional.clip_coef(norm, 1.0))
    assert _bumps(params, before) == [0, 0, 0] and not norm.requires_grad and scaler.found_inf.item() == 0.0


# -- non-contiguous inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    shapes = [(3, 4), (6,), (5, 2), (9,)]
    xs = _transposed(shapes)
    xs[1] = xs[1].contiguous()  # a mix of contiguous and strided tensors
    assert [x.is_contiguous() for x in xs] == [False, True, False, False]
    dense = [x.contiguous() for x in xs]

    assert torch.equal(functional.flatten(xs, ALIGN, backend=backend),
                       functional.flatten(dense, ALIGN, backend="reference"))  # fmt: skip
    assert torch.equal(functional.grad_norm(xs, backend=backend), functional.grad_norm(dense, backend="reference"))

    dst = [torch.empty(s, dtype=torch.float16) for s in shapes]
    functional.cast_(dst, xs, backend=backend)
    assert all(torch.equal(d, x.half()) for d, x in zip(dst, xs, strict=True))

    outs = [torch.empty(s) for s in shapes]
    functional.unscale_(xs, 0.5, None, out=outs, backend=backend)
    assert all(torch.equal(o, x * 0.5) for o, x in zip(outs, xs, strict=True))

    buffer = FlatBuffer(xs, align=ALIGN, backend=backend)
    assert all(torch.equal(v, x) for v, x in zip(buffer.views, xs, strict=True))
    buffer.copy_from_(xs)
    assert all(torch.equal(v, x) for v, x in zip(buffer.views, xs, strict=True))


# -- unflatten's views --------------------------------------------------------------------------------------------


def _narrow_views(flat, shapes, align):
    offsets, _, _ = reference.flatten_layout([math.prod(s) for s in shapes], align)
    return [flat.narrow(0, off, math.prod(s)).view(s) for s, off in zip(shapes, offsets, strict=True)]


@pytest.mark.parametrize("align", [1, 16, 64])
def test_unflatten_views_are_narrow_views(align):
    shapes = SHAPES + [(1,), (1, 1), (0, 3), (3, 0), (2, 3, 4), ()]
    xs = _randn(shapes)
    total = reference.flatten_layout([x.numel() for x in xs], align)[2]
    storage = torch.randn(total + 5)
    flat = storage[5:]  # a view with a storage offset
    for like in (xs, [tuple(s) for s in shapes], [x if i % 2 else x.shape for i, x in enumerate(xs)]):
        got = functional.unflatten(flat, like, align)
        want = _narrow_views(flat, shapes, align)
        for g, w in zip(got, want, strict=True):
            assert (g.shape, g.stride(), g.storage_offset(), g.dtype) == (w.shape, w.stride(), w.storage_offset(),
                                                                          w.dtype)  # fmt: skip
            assert g._base is storage and g.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
            assert not g.requires_grad
    views = functional.unflatten(flat, xs, align)
    views[1].fill_(3.0)  # writes through to flat
    assert torch.equal(_narrow_views(flat, shapes, align)[1], torch.full((3, 4), 3.0))


def test_unflatten_of_a_flat_that_requires_grad():
    """With grad enabled the views are differentiable (narrow + view, as before); under no_grad they record no
    history, like narrow + view there."""
    shapes = [(3, 4), (5,), (1, 7)]
    flat = torch.randn(reference.flatten_layout([math.prod(s) for s in shapes], ALIGN)[2], requires_grad=True)
    views = functional.unflatten(flat, shapes, ALIGN)
    assert all(v.requires_grad and v.grad_fn is not None for v in views)
    sum(v.sum() * (i + 1) for i, v in enumerate(views)).backward()
    expected = torch.zeros_like(flat)
    for i, v in enumerate(_narrow_views(expected, shapes, ALIGN)):
        v.fill_(i + 1)
    assert torch.equal(flat.grad, expected)
    with torch.no_grad():
        views = functional.unflatten(flat, shapes, ALIGN)
        want = _narrow_views(flat, shapes, ALIGN)
    for v, w in zip(views, want, strict=True):
        assert v.grad_fn is None and v.requires_grad == w.requires_grad
        assert (v.shape, v.stride(), v.storage_offset()) == (w.shape, w.stride(), w.storage_offset())


# -- errors: the same type and message, naming the first offender, and nothing written before ----------------

N = 40
BAD = 29


def _check_error(exc, message, fn, *written):
    """``fn()`` raises ``exc`` with exactly ``message``, and leaves ``written`` untouched."""
    before = [x.clone() for x in written]
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        fn()
    assert all(torch.equal(x, b) for x, b in zip(written, before, strict=True))


def _many(shape=(3, 4), dtype=torch.float32):
    return [torch.randn(shape).to(dtype) for _ in range(N)]


def test_cast_errors():
    dst, src = _many(dtype=torch.bfloat16), _many()
    bad = list(src)
    bad[BAD] = torch.randn(4, 3)
    _check_error(ValueError, f"cast_: dst[{BAD}] has shape (3, 4) but src[{BAD}] has (4, 3)",
                 lambda: functional.cast_(dst, bad), *dst)  # fmt: skip
    bad[BAD] = torch.randn(3, 4, device="meta")
    _check_error(ValueError, f"cast_: dst[{BAD}] is on cpu but src[{BAD}] is on meta",
                 lambda: functional.cast_(dst, bad), *dst)  # fmt: skip
    bad_dst = list(dst)
    bad_dst[BAD] = torch.zeros(1, 4).bfloat16().expand(3, 4)  # (a transposed dst is written, as by copy_)
    _check_error(ValueError, f"cast_: dst[{BAD}] has elements that share memory (an expanded view, stride 0, or "
                 "overlapping strides); it is written in place",
                 lambda: functional.cast_(bad_dst, src), *dst)  # fmt: skip
    bad[BAD] = torch.ones(3, 4, dtype=torch.int64)
    _check_error(TypeError, f"cast_: src[{BAD}] must be a floating-point tensor, got torch.int64",
                 lambda: functional.cast_(dst, bad), *dst)  # fmt: skip
    bad[BAD] = 1.0
    _check_error(TypeError, f"cast_: src[{BAD}] must be a Tensor, got float", lambda: functional.cast_(dst, bad), *dst)
    _check_error(ValueError, f"cast_: dst has {N} tensors but src has {N - 1}", lambda: functional.cast_(dst, src[1:]))
    # Equal numel and equal strides, different shapes (size-1 and empty dims): still a shape mismatch.
    for a, b, strides in [((2, 1), (1, 2), (1, 1)), ((0, 3), (3, 0), None), ((1, 0), (0, 1), None)]:
        d = torch.empty(a, dtype=torch.bfloat16) if strides is None else torch.empty_strided(a, strides)
        s = torch.empty(b) if strides is None else torch.empty_strided(b, strides)
        assert d.is_contiguous() and s.is_contiguous() and d.numel() == s.numel()
        _check_error(ValueError, f"cast_: dst[0] has shape {a} but src[0] has {b}",
                     lambda d=d, s=s: functional.cast_([d], [s]))  # fmt: skip


def test_unscale_errors():
    grads, outs = _many(), _many()
    bad = list(outs)
    bad[BAD] = torch.randn(4, 3)
    _check_error(ValueError, f"unscale_: out[{BAD}] is (4, 3) on cpu but grads[{BAD}] is (3, 4) on cpu",
                 lambda: functional.unscale_(grads, 0.5, out=bad), *grads, *outs)  # fmt: skip
    bad[BAD] = torch.randn(3, 4, device="meta")
    _check_error(ValueError, f"unscale_: out[{BAD}] is (3, 4) on meta but grads[{BAD}] is (3, 4) on cpu",
                 lambda: functional.unscale_(grads, 0.5, out=bad), *grads, *outs)  # fmt: skip
    bad[BAD] = torch.zeros(1, 4).expand(3, 4)  # (a transposed one is written, as torch's unscale writes it)
    _check_error(ValueError, f"unscale_: out[{BAD}] has elements that share memory (an expanded view, stride 0, or "
                 "overlapping strides); it is written in place",
                 lambda: functional.unscale_(grads, 0.5, out=bad), *grads, *outs)  # fmt: skip
    bad_grads = list(grads)
    bad_grads[BAD] = torch.zeros(1, 4).expand(3, 4)
    _check_error(ValueError, f"unscale_: grads[{BAD}] has elements that share memory (an expanded view, stride 0, or "
                 "overlapping strides); it is written in place",
                 lambda: functional.unscale_(bad_grads, 0.5), *grads)  # fmt: skip
    bad_grads[BAD] = torch.ones(3, 4, dtype=torch.int32)
    _check_error(TypeError, f"unscale_: grads[{BAD}] must be a floating-point tensor, got torch.int32",
                 lambda: functional.unscale_(bad_grads, 0.5), *grads)  # fmt: skip


def test_flatten_unflatten_copy_and_norm_errors():
    xs = _many()
    bad = list(xs)
    bad[BAD] = bad[BAD].half()
    _check_error(ValueError, f"flatten: tensors[{BAD}] is torch.float16 on cpu but tensors[0] is torch.float32 on "
                 "cpu: tensors must share one dtype and device", lambda: functional.flatten(bad))  # fmt: skip
    bad[BAD] = torch.ones(3, 4, dtype=torch.int32)
    _check_error(TypeError, f"grad_norm: tensors[{BAD}] must be a floating-point tensor, got torch.int32",
                 lambda: functional.grad_norm(bad))  # fmt: skip
    flat = functional.flatten(xs, backend="reference")
    bad[BAD] = torch.ones(3, 4, dtype=torch.float16)
    _check_error(ValueError, f"unflatten_copy_: tensors[{BAD}] is torch.float16 on cpu, flat is torch.float32 on cpu",
                 lambda: functional.unflatten_copy_(bad, flat), *xs)  # fmt: skip
    bad[BAD] = torch.ones(4, 3).t()
    _check_error(ValueError, f"unflatten_copy_: tensors[{BAD}] must be contiguous (it is written in place)",
                 lambda: functional.unflatten_copy_(bad, flat), *xs)  # fmt: skip


def test_flatbuffer_errors():
    xs = _many()
    buffer = FlatBuffer(xs, backend="reference")
    data = buffer.data.clone()
    bad = list(xs)
    bad[BAD] = torch.randn(4, 3)
    _check_error(ValueError, f"FlatBuffer.copy_from_: tensors[{BAD}] has shape (4, 3), expected (3, 4)",
                 lambda: buffer.copy_from_(bad), buffer.data)  # fmt: skip
    bad[BAD] = torch.randn(3, 4, device="meta")
    _check_error(ValueError, f"FlatBuffer.copy_from_: tensors[{BAD}] is on meta, the buffer on cpu",
                 lambda: buffer.copy_from_(bad), buffer.data)  # fmt: skip
    bad[BAD] = torch.randn(4, 3).t()
    _check_error(ValueError, f"FlatBuffer.copy_to_: tensors[{BAD}] must be contiguous (it is written in place)",
                 lambda: buffer.copy_to_(bad), *xs)  # fmt: skip
    bad[BAD] = torch.randn(3, 4).half()
    _check_error(ValueError, f"FlatBuffer.bind_data_: tensors[{BAD}] is torch.float16, the buffer torch.float32",
                 lambda: buffer.bind_data_(bad))  # fmt: skip
    _check_error(ValueError, f"FlatBuffer.bind_grads_: params[{BAD}] is torch.float16 on cpu, the buffer is "
                 "torch.float32 on cpu", lambda: buffer.bind_grads_(bad))  # fmt: skip
    assert torch.equal(buffer.data, data)


# -- torch.compile still traces the custom ops ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_traces_the_custom_ops(backend):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(grads, dst, found_inf):
        norm = functional.grad_norm(grads, backend=backend)
        functional.unscale_(grads, 0.5, found_inf, backend=backend)
        functional.cast_(dst, grads, backend=backend)
        return norm, functional.flatten(grads, ALIGN, backend=backend)

    grads = _randn([(3, 4), (7,), (2, 1, 5)])
    dst = [torch.empty(g.shape, dtype=torch.bfloat16) for g in grads]
    eager_args = ([g.clone() for g in grads], [d.clone() for d in dst], torch.zeros(1))
    comp_args = ([g.clone() for g in grads], [d.clone() for d in dst], torch.zeros(1))
    want = step(*eager_args)
    got = torch.compile(step, backend=record, fullgraph=True)(*comp_args)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes}
    for op in ("grad_norm", "unscale_", "cast_", "flatten"):
        assert f"fused_ops.{op}.default" in targets, (op, targets)
    for a, b in zip([*want, *eager_args[0], *eager_args[1]], [*got, *comp_args[0], *comp_args[1]], strict=True):
        assert torch.equal(a, b)
