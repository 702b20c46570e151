"""Safety tier of the mixed-precision ops (``pytest -m safety``): flatten, unflatten, unflatten_copy_, cast_, unscale_,
grad_norm, clip_grad_norm_, FlatBuffer, the autograd ops and DynamicLossScaler, driven with bad and changed inputs
on both backends ("triton" under the interpreter, "reference").

Every case either raises a clear error (type, and a message naming the function, the argument and the index) with
every tensor bit-identical to before (``tests/safety.py``), or gives the plain-torch reference's result. Property
tests (hypothesis) draw shapes, dtypes, strides, storage offsets and aliasing (tensors that are views of shared
buffers); "stale" cases call once with a tensor, then with another tensor at the same address (shorter, strided,
of another dtype). Bodies run in a forked child where a crash is possible (``isolated``).
"""

from __future__ import annotations

import math

import pytest
import torch

import fused_ops
from fused_ops import DynamicLossScaler, FlatBuffer, functional
from tests.safety import expect_error_unchanged, isolated

pytestmark = [pytest.mark.safety, pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]


def _params(shapes, dtype=torch.float32):
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s).to(dtype))
        p.grad = torch.randn(s).to(dtype)
        params.append(p)
    return params


# =====================================================================================================================
# Regression cases (each failed before its fix)
# =====================================================================================================================

# -- memory shared between a written tensor and another argument -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_refuses_grads_that_share_memory(backend):
    """In place, two grads sharing memory were unscaled twice (or raced on a GPU): refused, nothing changed."""
    base = torch.randn(64)
    for grads, match in [
        ([base[:10], base[:10]], "grads\\[0\\] and grads\\[1\\] share memory"),
        ([base[:10], base[5:20]], "grads\\[0\\] and grads\\[1\\] share memory"),
        ([base[30:40], torch.randn(3), base[35:36]], "grads\\[0\\] and grads\\[2\\] share memory"),
    ]:
        expect_error_unchanged(lambda grads=grads: fused_ops.unscale_(grads, 0.5, None, backend=backend),
                               ValueError, f"^unscale_: {match}", base, grads)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_refuses_scalars_that_share_memory_with_grads(backend):
    """found_inf (written by every program that sees an inf) or inv_scale (read by every program) inside a grad
    that is written: refused."""
    base = torch.randn(64)
    grads = [base[:32], base[32:48]]
    expect_error_unchanged(lambda: fused_ops.unscale_(grads, 0.5, base[40:41], backend=backend), ValueError,
                           "^unscale_: grads\\[1\\] and found_inf share memory", base)  # fmt: skip
    expect_error_unchanged(lambda: fused_ops.unscale_(grads, base[3:4], None, backend=backend), ValueError,
                           "^unscale_: grads\\[0\\] and inv_scale share memory", base)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_out_may_be_its_own_grad_only(backend):
    """out[i] may be grads[i] itself (the same memory: an in-place unscale); out[i] overlapping another grad, or
    part of its own, is refused."""
    base = torch.randn(64)
    grads = [base[:16], base[16:48]]
    expected = [g * 0.5 for g in grads]
    fused_ops.unscale_(grads, 0.5, None, out=list(grads), backend=backend)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))
    for outs, match in [
        ([base[16:32], torch.empty(32)], "grads\\[1\\] and out\\[0\\] share memory"),
        ([base[8:24], torch.empty(32)], "grads\\[0\\] and out\\[0\\] share memory"),
    ]:
        expect_error_unchanged(lambda outs=outs: fused_ops.unscale_(grads, 0.5, None, out=outs, backend=backend),
                               ValueError, f"^unscale_: {match}", base, outs)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_cast_refuses_dst_sharing_memory(backend):
    """dst[i] may be src[i] (same memory and size); dst sharing memory with another dst, or partly with a src, is
    refused on both backends (torch raised on one, the kernel raced on the other)."""
    base = torch.randn(64)
    half = torch.randn(64).to(torch.bfloat16)
    square = torch.randn(5, 5)
    for dst, src, match in [
        ([half[:8], half[:8]], [torch.randn(8), torch.randn(8)], "dst\\[0\\] and dst\\[1\\] share memory"),
        ([base[:8].view(torch.bfloat16)[:8]], [base[:8]], "dst\\[0\\] and src\\[0\\] share memory"),
        ([half[:8], half[8:16]], [torch.randn(8), half[4:12].float()], None),  # a copy: fine
        ([half[:8], half[8:16]], [torch.randn(8), half[:8]], "dst\\[0\\] and src\\[1\\] share memory"),
        # the same bytes in another order (torch's copy_ refuses it too): element k of dst is not element k of src
        ([square.t()], [square], "dst\\[0\\] and src\\[0\\] share memory"),
        ([square], [square.t()], "dst\\[0\\] and src\\[0\\] share memory"),
    ]:
        if match is None:
            fused_ops.cast_(dst, src, backend=backend)
            continue
        expect_error_unchanged(lambda dst=dst, src=src: fused_ops.cast_(dst, src, backend=backend), ValueError,
                               f"^cast_: {match}", base, half, square, src)  # fmt: skip
    x = torch.randn(8)
    fused_ops.cast_([x], [x], backend=backend)  # itself: a no-op
    y = torch.randn(8).to(torch.float16)
    expected = y.view(torch.bfloat16).to(torch.float16)
    fused_ops.cast_([y], [y.view(torch.bfloat16)], backend=backend)  # the same bytes, converted in place
    assert torch.equal(y, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unflatten_copy_refuses_tensors_inside_flat(backend):
    flat = fused_ops.flatten([torch.randn(5), torch.randn(3)], align=8)
    views = functional.unflatten(flat, [(5,), (3,)], align=8)
    for tensors, match in [
        ([views[1].new_empty(5), flat[2:5]], "tensors\\[1\\] and flat share memory"),
        ([torch.empty(5), torch.empty(3)], None),
    ]:
        if match is None:
            functional.unflatten_copy_(tensors, flat, 8, backend=backend)
            continue
        expect_error_unchanged(lambda tensors=tensors: functional.unflatten_copy_(tensors, flat, 8, backend=backend),
                               ValueError, f"^unflatten_copy_: {match}", flat, tensors)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_flatbuffer_copies_refuse_tensors_inside_the_buffer(backend):
    xs = [torch.randn(5), torch.randn(3, 2)]
    buf = FlatBuffer(xs, align=8, backend=backend)
    expect_error_unchanged(lambda: buf.copy_from_([buf.views[0], buf.data[8:14].view(3, 2)]), ValueError,
                           "^FlatBuffer.copy_from_: tensors\\[0\\] and the buffer share memory", buf)  # fmt: skip
    expect_error_unchanged(lambda: buf.copy_to_([buf.data[1:6], torch.empty(3, 2)]), ValueError,
                           "^FlatBuffer.copy_to_: tensors\\[0\\] and view\\[0\\] share memory", buf)  # fmt: skip
    two = FlatBuffer([torch.randn(4), torch.randn(4)], align=8, backend=backend)
    dup = torch.empty(4)
    expect_error_unchanged(
        lambda: two.copy_to_([dup, dup]),
        ValueError,
        "^FlatBuffer.copy_to_: tensors\\[0\\] and tensors\\[1\\] share memory",
        two,
        dup,
    )
    buf.copy_to_(buf.views)  # every view onto itself: nothing moves
    assert all(torch.equal(v, x) for v, x in zip(buf.views, xs, strict=True))


def test_flatbuffer_errors_name_the_method():
    """Errors from the ops FlatBuffer calls used to name those ops (cast_: src[0], dst[0]); each method names
    itself and checks everything first."""
    buf = FlatBuffer([torch.randn(4)], align=8)
    expect_error_unchanged(
        lambda: buf.copy_from_([torch.zeros(4, dtype=torch.int32)]),
        TypeError,
        "^FlatBuffer.copy_from_: tensors\\[0\\] must be a floating-point tensor",
        buf,
    )
    expect_error_unchanged(
        lambda: buf.copy_to_([torch.zeros(4, device="meta")]),
        ValueError,
        "^FlatBuffer.copy_to_: tensors\\[0\\] is on meta, the buffer on cpu",
        buf,
    )
    expect_error_unchanged(
        lambda: buf.copy_to_([torch.zeros(4, dtype=torch.int64)]),
        TypeError,
        "^FlatBuffer.copy_to_: tensors\\[0\\] must be a floating-point tensor",
        buf,
    )
    expect_error_unchanged(
        lambda: buf.copy_from_([1.0]), TypeError, "^FlatBuffer.copy_from_: tensors\\[0\\] must be a Tensor", buf
    )
    p = torch.nn.Parameter(torch.randn(4))
    expect_error_unchanged(
        lambda: buf.bind_data_([p, p]), ValueError, "^FlatBuffer.bind_data_: got 2 tensors, the buffer holds 1", buf, p
    )
    expect_error_unchanged(
        lambda: buf.bind_grads_(["x"]), TypeError, "^FlatBuffer.bind_grads_: params\\[0\\] must be a Tensor", buf
    )
    expect_error_unchanged(
        lambda: FlatBuffer([torch.randn(3)], dtype="float32"),
        TypeError,
        "^FlatBuffer: dtype must be a floating-point torch.dtype",
    )


def test_flatbuffer_from_params_refuses_shared_params():
    """Tied params (the same tensor twice, or views of one storage) would be untied silently: refused, with every
    param still bound to its own memory."""
    a = torch.nn.Parameter(torch.randn(8))
    b = torch.nn.Parameter(torch.randn(3))
    for params, match in [
        ([a, b, a], "params\\[0\\] and params\\[2\\] share memory"),
        ([a, torch.nn.Parameter(a.data[2:5])], "params\\[0\\] and params\\[1\\] share memory"),
    ]:
        expect_error_unchanged(lambda params=params: FlatBuffer.from_params(params, align=8), ValueError,
                               f"^FlatBuffer.from_params: {match}", params)  # fmt: skip
    expect_error_unchanged(lambda: FlatBuffer.for_grads([a, b, a], align=8), ValueError,
                           "^FlatBuffer.for_grads: params\\[2\\] is params\\[0\\]", [a, b])  # fmt: skip


# -- layouts torch's kernels reject with unclear errors ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_tensors_are_refused_by_name(backend):
    sparse = torch.eye(3).to_sparse()
    dense = torch.randn(3, 3)
    for call, fn, name in [
        (lambda: fused_ops.flatten([dense, sparse], backend=backend), "flatten", "tensors\\[1\\]"),
        (lambda: fused_ops.grad_norm([sparse], backend=backend), "grad_norm", "tensors\\[0\\]"),
        (lambda: fused_ops.cast_([torch.empty(3, 3)], [sparse], backend=backend), "cast_", "src\\[0\\]"),
        (lambda: fused_ops.unscale_([dense, sparse], 0.5, None, backend=backend), "unscale_", "grads\\[1\\]"),
        (lambda: fused_ops.autograd.cast(sparse, torch.bfloat16, backend=backend), "cast", "x"),
        (lambda: FlatBuffer([sparse]), "FlatBuffer", "tensors\\[0\\]"),
    ]:
        expect_error_unchanged(call, TypeError, f"^{fn}: {name} must be a dense", dense, sparse)


def test_unflatten_refuses_bad_shapes_by_name():
    flat = torch.zeros(64)
    for like, match in [
        ([(2,), (-1, 2)], "like\\[1\\] must be a tensor or a shape of ints >= 0"),
        ([(2.5,)], "like\\[0\\] must be a tensor or a shape of ints >= 0"),
        ([None], "like\\[0\\] must be a tensor or a shape of ints >= 0"),
    ]:
        with pytest.raises((ValueError, TypeError), match=f"^unflatten: {match}"):
            functional.unflatten(flat, like, align=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_type_and_parameters_are_checked_by_name(backend):
    params = _params([(4,)])
    expect_error_unchanged(
        lambda: fused_ops.grad_norm([params[0].grad], "two", backend=backend),
        ValueError,
        "^grad_norm: norm_type must be inf or a number > 0, got 'two'",
        params,
    )
    expect_error_unchanged(
        lambda: fused_ops.clip_grad_norm_([params[0], "x"], 1.0, backend=backend),
        TypeError,
        "^clip_grad_norm_: parameters\\[1\\] must be a Tensor",
        params,
    )
    assert fused_ops.grad_norm([params[0].grad], "inf", backend=backend) == params[0].grad.abs().max()  # as torch


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grad_norm_with_a_param_listed_twice_matches_torch(backend):
    """torch counts a grad listed twice twice in the norm and multiplies it twice: so do we (the grads written
    have memory of their own, the repeats are applied one after the other)."""
    ours, theirs = _params([(5,), (3,)]), _params([(5,), (3,)])
    for a, b in zip(ours, theirs, strict=True):
        b.grad.copy_(a.grad)
    norm = fused_ops.clip_grad_norm_([ours[0], ours[1], ours[0]], 0.5, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_([theirs[0], theirs[1], theirs[0]], 0.5)
    torch.testing.assert_close(norm, expected)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_autograd_ops_check_their_arguments():
    x = torch.randn(4, requires_grad=True)
    for call, exc, match in [
        (
            lambda: fused_ops.autograd.cast(x, torch.bfloat16, stochastic="yes"),
            TypeError,
            "^cast: stochastic must be a bool",
        ),
        (lambda: fused_ops.autograd.cast(x, torch.bfloat16, backend="cuda"), ValueError, "backend must be one of"),
        (lambda: fused_ops.autograd.flatten(x), TypeError, "^flatten: tensors must be a sequence of tensors"),
        (lambda: fused_ops.autograd.flatten([x, 3]), TypeError, "^flatten: tensors\\[1\\] must be a Tensor"),
    ]:
        expect_error_unchanged(call, exc, match, x)


# =====================================================================================================================
# Property tests: tensors drawn as views of one byte pool (so that they may share memory), any layout
# =====================================================================================================================

import os  # noqa: E402
import re  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.safety import assert_unchanged, snapshot  # noqa: E402

# SAFETY_EXAMPLES=N draws N examples per property test, randomly (a deeper search than the tier's fixed ones)
_EXAMPLES = os.environ.get("SAFETY_EXAMPLES")
PROPERTY = settings(max_examples=int(_EXAMPLES or 14), deadline=None, derandomize=_EXAMPLES is None, database=None,
                    suppress_health_check=list(HealthCheck))  # fmt: skip
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-9}
POOL_BYTES = 4096
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@st.composite
def _layout(draw, dtypes=tuple(FLOATS), max_numel=40):
    """(dtype, shape, kind): kind is how the tensor sits in memory (contiguous, every other element, transposed)."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.sampled_from([(0,), (1,), (5,), (13,), (33,), (2, 3), (4, 7), (3, 1, 5)]))
    kind = draw(st.sampled_from(["contiguous", "contiguous", "strided", "transposed"]))
    if kind == "transposed" and len(shape) != 2:
        kind = "contiguous"
    return dtype, shape, kind


def _bytes_needed(dtype, shape, kind) -> int:
    n = math.prod(shape) * dtype.itemsize
    return 2 * n if kind == "strided" else n


class Pool:
    """Tensors placed in one uint8 buffer at drawn byte offsets: disjoint, or anywhere (then they may share bytes,
    fully or in part, also across dtypes)."""

    def __init__(self):
        self.data = torch.zeros(POOL_BYTES, dtype=torch.uint8)
        self.next = 0

    def place(self, draw, dtype, shape, kind, shared: bool) -> torch.Tensor:
        need = _bytes_needed(dtype, shape, kind)
        if shared:
            offset = draw(st.integers(0, (POOL_BYTES - need) // 8)) * 8
        else:
            offset = self.next + 16 * draw(st.integers(0, 2))
            self.next = offset + -(-need // 16) * 16
        assert offset + need <= POOL_BYTES
        return _view(self.data, offset, dtype, shape, kind)


def _view(data, offset, dtype, shape, kind) -> torch.Tensor:
    n = math.prod(shape)
    base = data[offset : offset + _bytes_needed(dtype, shape, kind)].view(dtype)
    if kind == "strided":
        contiguous = torch.empty(shape).stride()
        return base.as_strided(shape, [2 * s for s in contiguous])
    if kind == "transposed":
        return base.view(shape[1], shape[0]).t()
    return base[:n].view(shape)


def _fill(tensors) -> None:
    for x in tensors:
        x.copy_(torch.randn(x.shape) * 3 if x.is_floating_point() else torch.randint(-5, 5, x.shape))


@st.composite
def _tensor_lists(draw, names, n_max=3, dtypes=(tuple(FLOATS),), paired=True):
    """Lists of tensors named ``names`` (the same length; tensor ``i`` of each list with the same shape when
    ``paired``), drawn into one pool: disjoint, or placed anywhere; sometimes a tensor is another list's tensor
    ``i`` itself, or a view of the same memory in another dtype of the same size."""
    pool = Pool()
    shared = draw(st.booleans())
    n = draw(st.integers(0, n_max))
    lists = {name: [] for name in names}
    for i in range(n):
        dtype, shape, kind = draw(_layout(dtypes[0]))
        for k, name in enumerate(names):
            d = draw(st.sampled_from(dtypes[min(k, len(dtypes) - 1)]))
            if not paired:
                d, shape, kind = draw(_layout(dtypes[min(k, len(dtypes) - 1)]))
            alias = draw(st.sampled_from(["none"] * 6 + ["same", "reinterpret"])) if k and shared else "none"
            prev = lists[names[0]][i] if k else None
            if alias == "same" and prev.dtype == d and prev.shape == torch.Size(shape):
                lists[name].append(prev)
            elif alias == "reinterpret" and prev.is_contiguous() and prev.dtype.itemsize == d.itemsize == 2:
                lists[name].append(prev.view(d))
            else:
                lists[name].append(pool.place(draw, d, shape, kind, shared))
    torch.manual_seed(draw(st.integers(0, 2**16)))  # values drawn by hypothesis too: a failure replays
    _fill([x for name in names for x in lists[name]])
    return pool, lists


def _extent(x):
    if x.numel() == 0:
        return None
    reach = (sum((n - 1) * s for n, s in zip(x.shape, x.stride())) + 1) * x.element_size()
    return (x.data_ptr(), x.data_ptr() + reach)


def _bytes(x) -> set:
    """Every byte address an element of ``x`` occupies (the drawn tensors are small)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for n, stride in zip(x.shape, x.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * stride
    starts = (x.data_ptr() + offsets.flatten() * x.element_size()).tolist()
    return {a + k for a in starts for k in range(x.element_size())}


def _shares(a, b) -> bool:
    """Whether ``a`` and ``b`` share a byte (exactly: two strided views whose ranges overlap may share none)."""
    ea, eb = _extent(a), _extent(b)
    if ea is None or eb is None or not (ea[0] < eb[1] and eb[0] < ea[1]):
        return False
    return bool(_bytes(a) & _bytes(b))


def _memory_ok(written, read=(), same=None) -> bool:
    """The rule the ops promise (their own implementation aside): a written tensor shares no byte with any other
    argument, except ``same[0][i]`` being exactly ``same[1][i]`` (same start and size, contiguous)."""
    every = [(x, True) for x in written] + [(x, False) for x in read]
    pairs = set()
    if same is not None:
        for w, r in zip(*same):
            if _extent(w) == _extent(r) and w.is_contiguous() and r.is_contiguous():
                pairs.add((id(w), id(r)))
    for i, (a, wa) in enumerate(every):
        for b, wb in every[i + 1 :]:
            if (wa or wb) and _shares(a, b) and (id(a), id(b)) not in pairs and (id(b), id(a)) not in pairs:
                if a is b and wa and not wb and same is not None:  # dst[i] is src[i]: counted as a pair above
                    continue
                return False
    return True


def _clone_pool(pool, lists):
    """The pool copied, with every tensor of ``lists`` re-made at the same place in the copy."""
    data = pool.data.clone()
    base = pool.data.data_ptr()

    def again(x):
        if x.numel() == 0 or not (base <= x.data_ptr() < base + POOL_BYTES):
            return x.detach().clone()
        return data[x.data_ptr() - base :].view(x.dtype).as_strided(x.shape, x.stride())

    return data, {k: [again(x) for x in v] for k, v in lists.items()}


def _same_values(a, b) -> bool:
    """Equal bit for bit, except that nans compare equal to nans (payloads may differ between torch and numpy)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan = torch.isnan(a)
        if not torch.equal(nan, torch.isnan(b)):
            return False
        a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    return torch.equal(a.view(_INT_VIEW[a.element_size()]), b.view(_INT_VIEW[b.element_size()]))


def _attempt(call, fn, names, *objs):
    """Run ``call``; on an error check that it is clear (type, ``fn: `` prefix, one of ``names``) and that nothing
    changed. Returns (result, error)."""
    before = snapshot(*objs)
    try:
        return call(), None
    except (TypeError, ValueError) as e:
        text = str(e)
        assert re.match(rf"{re.escape(fn)}: ", text), f"unclear error: {text!r}"
        assert any(n in text for n in names), f"the message names no argument: {text!r}"
        assert_unchanged(before, snapshot(*objs))
        return None, e


# -- cast_ --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
@PROPERTY
@given(drawn=_tensor_lists(["dst", "src"], dtypes=(tuple(FLOATS) + (torch.float64,),) * 2))
def test_cast_property(backend, drawn):
    pool, lists = drawn
    dst, src = lists["dst"], lists["src"]
    fp64 = any(x.dtype == torch.float64 for x in dst + src)
    valid = _memory_ok(dst, src, same=(dst, src)) and not (fp64 and backend == "triton")  # (asked for by name: no
    # plain-torch fallback; a dst of any layout is written, through a contiguous copy when it is not contiguous)
    data, expected = _clone_pool(pool, lists)
    for d, s in zip(expected["dst"], expected["src"], strict=True) if valid else ():
        d.copy_(s)
    _, err = _attempt(lambda: fused_ops.cast_(dst, src, backend=backend), "cast_", ["dst[", "src["], pool.data)
    assert (err is None) == valid, f"valid={valid}, error={err}"
    if err is None:
        assert all(_same_values(a, b) for a, b in zip(dst, expected["dst"], strict=True))


# -- unscale_ -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
@PROPERTY
@given(drawn=_tensor_lists(["grads", "out"], dtypes=(tuple(FLOATS),) * 2), data=st.data())
def test_unscale_property(backend, drawn, data):
    pool, lists = drawn
    grads, outs = lists["grads"], lists["out"]
    with_out = data.draw(st.booleans())
    # The scalars: fresh, or inside the pool (where they may share memory with a grad), 0-d or (1,)
    where = data.draw(st.sampled_from(["fresh", "fresh", "pool"]))
    shape = data.draw(st.sampled_from([(), (1,)]))
    found_inf = (torch.zeros(shape) if where == "fresh" else
                 pool.place(data.draw, torch.float32, (1,), "contiguous", True).view(shape))  # fmt: skip
    found_inf.zero_()
    inv = data.draw(st.sampled_from([0.5, 2.0**-12, "tensor"]))
    if inv == "tensor":
        inv = torch.tensor([0.25]) if where == "fresh" else pool.place(data.draw, torch.float32, (1,), "contiguous",
                                                                       True)  # fmt: skip
        if where == "pool":
            inv.fill_(0.25)
    # found_inf placed after inv_scale: if they share memory, both read 0 / 0.25 as drawn
    written = (outs if with_out else grads) + [found_inf]
    read = (grads if with_out else []) + ([inv] if isinstance(inv, torch.Tensor) else [])
    valid = not grads or _memory_ok(written, read, same=(outs, grads) if with_out else None)  # (no grads: nothing
    # is written; written tensors of any layout, through a contiguous copy when they are not contiguous)
    _, expected = _clone_pool(pool, {"grads": grads, "out": outs, "found_inf": [found_inf],
                                     "inv": [inv] if isinstance(inv, torch.Tensor) else []})  # fmt: skip
    factor = float(inv) if not isinstance(inv, torch.Tensor) else expected["inv"][0].item()
    bad = False
    results = expected["out"] if with_out else expected["grads"]
    for g, o in zip(expected["grads"], results, strict=True) if valid else ():
        o.copy_((g.float() * torch.tensor(factor, dtype=torch.float32)).to(o.dtype))
        bad |= bool((~torch.isfinite(o)).any())
    call = lambda: fused_ops.unscale_(grads, inv, found_inf, out=outs if with_out else None, backend=backend)  # noqa: E731
    _, err = _attempt(call, "unscale_", ["grads[", "out[", "found_inf", "inv_scale"], pool.data, found_inf, inv)
    assert (err is None) == valid, f"valid={valid}, error={err}"
    if err is None:
        results, expected_results = (outs, expected["out"]) if with_out else (grads, expected["grads"])
        assert all(_same_values(a, b) for a, b in zip(results, expected_results, strict=True))
        assert found_inf.item() == float(bad) or not grads  # (no grads: found_inf untouched, maybe inv_scale's)


# -- flatten, unflatten_copy_ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
@PROPERTY
@given(drawn=_tensor_lists(["src", "dst"], dtypes=((torch.float32, torch.float64),) * 2), data=st.data())
def test_flatten_and_unflatten_copy_property(backend, drawn, data):
    pool, lists = drawn
    src, dst = lists["src"], [d.to(s.dtype) if d.dtype != s.dtype else d for d, s in zip(lists["dst"], lists["src"])]
    align = data.draw(st.sampled_from([1, 8, 64]))
    dtypes = {x.dtype for x in src}
    before = snapshot(pool.data)
    flat, err = _attempt(lambda: fused_ops.flatten(src, align, backend=backend), "flatten", ["tensors["], pool.data)
    assert (err is None) == (len(dtypes) <= 1), err
    assert_unchanged(before, snapshot(pool.data))  # flatten reads only
    if err is not None:
        return
    offsets, spans, total = fused_ops.reference.flatten_layout([x.numel() for x in src], align)
    assert flat.shape == (total,) and flat.is_contiguous()
    for x, off, span in zip(src, offsets, spans, strict=True):
        assert _same_values(flat[off : off + x.numel()], x.reshape(-1))
        assert not flat[off + x.numel() : off + span].any(), "padding is zero"
    if not src:
        return
    # Scatter back into dst (any place in the pool), or into views of flat itself
    if data.draw(st.booleans()):
        flat_views = functional.unflatten(flat, src, align)
        dst = [flat_views[i] if data.draw(st.booleans()) else d for i, d in enumerate(dst)]
    ok_dtype = all(d.dtype == flat.dtype for d in dst)
    valid = ok_dtype and all(d.is_contiguous() for d in dst) and _memory_ok(dst, [flat])
    _, expected = _clone_pool(pool, {"dst": dst})
    for d, x, off in zip(expected["dst"], src, offsets, strict=True) if valid else ():
        d.copy_(flat[off : off + x.numel()].view(x.shape))
    _, err = _attempt(lambda: functional.unflatten_copy_(dst, flat, align, backend=backend), "unflatten_copy_",
                      ["tensors[", "flat"], pool.data, flat)  # fmt: skip
    assert (err is None) == valid, f"valid={valid}, error={err}"
    if err is None:
        assert all(_same_values(a, b) for a, b in zip(dst, expected["dst"], strict=True))


# -- grad_norm, clip_grad_norm_ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
@PROPERTY
@given(drawn=_tensor_lists(["grads"], n_max=4), data=st.data())
def test_grad_norm_and_clip_property(backend, drawn, data):
    pool, lists = drawn
    grads = lists["grads"]
    norm_type = data.draw(st.sampled_from([2.0, 1.0, math.inf, 3.0]))
    norm, err = _attempt(lambda: fused_ops.grad_norm(grads, norm_type, backend=backend), "grad_norm", [], pool.data)
    assert err is None, err  # any dense floating-point tensors, sharing memory or not (only read)
    if sum(g.numel() for g in grads):
        expected = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]), norm_type)
    else:  # (torch's inf norm of no element raises: ours is 0, as for an empty list)
        expected = torch.tensor(0.0, dtype=torch.float64)
    if backend == "triton" and norm_type != math.inf and expected.item() ** norm_type > torch.finfo().max:
        assert norm.item() == math.inf  # the kernel accumulates |x|^p in fp32 per chunk (as torch's own norm)
    else:
        torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    # clip_grad_norm_ against torch on params whose grads are these tensors (a param may be listed twice)
    params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    if params and data.draw(st.booleans()):
        params.append(params[0])
    max_norm = data.draw(st.sampled_from([0.5, 1e3, math.inf]))
    distinct = list({id(p): p for p in params}.values())
    valid = _memory_ok([p.grad for p in distinct])
    theirs = [torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype)) for p in distinct]
    for p, q in zip(distinct, theirs, strict=True):
        q.grad = p.grad.detach().clone()
    twin = {id(p): q for p, q in zip(distinct, theirs, strict=True)}
    total, err = _attempt(lambda: fused_ops.clip_grad_norm_(params, max_norm, norm_type, backend=backend),
                          "clip_grad_norm_", ["grads[", "parameters["], pool.data)  # fmt: skip
    assert (err is None) == valid, f"valid={valid}, error={err}"
    if err is None and not (norm_type == math.inf and any(p.grad.numel() == 0 for p in params)):
        expected = torch.nn.utils.clip_grad_norm_([twin[id(p)] for p in params], max_norm, norm_type)
        # torch sums each dtype's norm in that dtype: its coefficient is as coarse as the coarsest grad dtype
        tol = max((_TOL[p.dtype] for p in distinct), default=1e-5)
        torch.testing.assert_close(total.double(), expected.double(), rtol=tol, atol=1e-5)
        for p in distinct:
            a, b = p.grad.double(), twin[id(p)].grad.double()
            torch.testing.assert_close(a, b, rtol=2 * tol, atol=2 * tol, equal_nan=True)


# -- FlatBuffer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
@PROPERTY
@given(drawn=_tensor_lists(["src", "dst"], n_max=3, dtypes=(tuple(FLOATS),) * 2), data=st.data())
def test_flatbuffer_copies_property(backend, drawn, data):
    pool, lists = drawn
    src, dst = lists["src"], lists["dst"]
    if not src:
        return
    dtype = data.draw(st.sampled_from(FLOATS))
    buf, err = _attempt(lambda: FlatBuffer(src, dtype=dtype, align=data.draw(st.sampled_from([1, 8])),
                                           backend=backend), "FlatBuffer", ["tensors["], pool.data)  # fmt: skip
    assert err is None, err
    assert all(_same_values(v, x.to(dtype)) for v, x in zip(buf.views, src, strict=True))
    # copy_to_: into dst (anywhere in the pool), or into the buffer's own views
    if data.draw(st.booleans()):
        dst = [buf.views[i] if data.draw(st.booleans()) else d for i, d in enumerate(dst)]
    valid = all(d.is_contiguous() for d in dst) and _memory_ok(dst, buf.views, same=(dst, buf.views))
    _, expected = _clone_pool(pool, {"dst": dst})
    for d, v in zip(expected["dst"], buf.views, strict=True) if valid else ():
        d.copy_(v)
    _, err = _attempt(lambda: buf.copy_to_(dst), "FlatBuffer.copy_to_", ["tensors[", "view["], pool.data, buf)
    assert (err is None) == valid, f"valid={valid}, error={err}"
    if err is None:
        assert all(_same_values(a, b) for a, b in zip(dst, expected["dst"], strict=True))
    # copy_from_: from the pool's tensors (never inside the buffer), or from the buffer's views (refused)
    srcs = list(dst) if err is None else list(src)
    inside = any(_shares(x, buf.data) for x in srcs)
    _, err = _attempt(lambda: buf.copy_from_(srcs), "FlatBuffer.copy_from_", ["tensors["], pool.data, buf)
    assert (err is None) == (not inside), err
    if err is None:
        assert all(_same_values(v, x.to(dtype)) for v, x in zip(buf.views, srcs, strict=True))


# =====================================================================================================================
# Stale addresses: after one valid call, another tensor at the same address (shorter, of another dtype, strided, ...)
# =====================================================================================================================


def _variants(base):
    """Tensors that start where ``base[:64]`` starts (the first call's tensor), each different in one way."""
    return {
        "shorter": base[:63],
        "other dtype, same element count": base[:32].view(torch.bfloat16),
        "strided, same element count": base.as_strided((64,), (2,)),
        "integer, same size": base[:64].view(torch.int32),
        "2-d": base[:64].view(8, 8),
        "transposed 2-d": base[:64].view(8, 8).t(),
        "longer": base[:100],
    }


def _case(op, x, backend):
    """(call, function name, argument names, check on success, tensors that must be unchanged on an error)."""
    floating = x.is_floating_point()
    if op == "cast_ dst":
        src = torch.randn(x.shape)
        expected = src.to(x.dtype) if floating else None
        return lambda: fused_ops.cast_([x], [src], backend=backend), "cast_", ["dst["], \
            lambda: _same_values(x, expected), [x, src]  # fmt: skip
    if op == "cast_ src":
        dst = torch.empty(x.shape, dtype=torch.float16)
        expected = x.to(torch.float16) if floating else None
        return lambda: fused_ops.cast_([dst], [x], backend=backend), "cast_", ["src["], \
            lambda: _same_values(dst, expected), [x, dst]  # fmt: skip
    if op == "unscale_ grads":
        found = torch.zeros(1)
        expected = (x.float() * 0.5).to(x.dtype) if floating else None
        return lambda: fused_ops.unscale_([x], 0.5, found, backend=backend), "unscale_", ["grads["], \
            lambda: _same_values(x, expected), [x, found]  # fmt: skip
    if op == "unscale_ out":
        grads = [torch.randn(x.shape)]
        expected = (grads[0] * 0.5).to(x.dtype) if floating else None
        return lambda: fused_ops.unscale_(grads, torch.tensor([0.5]), None, out=[x], backend=backend), "unscale_", \
            ["out["], lambda: _same_values(x, expected), [x, grads]  # fmt: skip
    if op == "grad_norm":
        out = []
        expected = torch.linalg.vector_norm(x.double()) if floating else None
        return lambda: out.append(fused_ops.grad_norm([x], backend=backend)), "grad_norm", ["tensors["], \
            lambda: torch.allclose(out[0].double(), expected, rtol=1e-5), [x]  # fmt: skip
    if op == "flatten":
        out = []
        expected = x.reshape(-1).clone() if floating else None
        return lambda: out.append(fused_ops.flatten([x], 8, backend=backend)), "flatten", ["tensors["], \
            lambda: _same_values(out[0][: x.numel()], expected), [x]  # fmt: skip
    if op == "unflatten_copy_":
        flat = torch.randn(128).to(x.dtype) if floating else torch.randn(128)
        expected = flat[: x.numel()].view(x.shape).clone()
        return lambda: functional.unflatten_copy_([x], flat, 8, backend=backend), "unflatten_copy_", ["tensors["], \
            lambda: _same_values(x, expected), [x, flat]  # fmt: skip
    if op == "clip_grad_norm_":
        p = torch.zeros(x.shape, dtype=x.dtype)
        p.grad = x
        twin = torch.zeros(x.shape, dtype=x.dtype)
        twin.grad = x.detach().clone()
        if floating:
            torch.nn.utils.clip_grad_norm_([twin], 1.0)
        return lambda: fused_ops.clip_grad_norm_([p], 1.0, backend=backend), "clip_grad_norm_", ["grads[", "param"], \
            lambda: torch.allclose(x.double(), twin.grad.double(), rtol=2e-2), [x]  # fmt: skip
    if op == "FlatBuffer.copy_from_":
        buf = FlatBuffer([torch.zeros(64)], align=8, backend=backend)
        expected = x.to(torch.float32) if floating else None
        return lambda: buf.copy_from_([x]), "FlatBuffer.copy_from_", ["tensors["], \
            lambda: _same_values(buf.views[0], expected), [x, buf]  # fmt: skip
    if op == "FlatBuffer.copy_to_":
        buf = FlatBuffer([torch.randn(64)], align=8, backend=backend)
        expected = buf.views[0].to(x.dtype) if floating else None
        return lambda: buf.copy_to_([x]), "FlatBuffer.copy_to_", ["tensors["], \
            lambda: _same_values(x, expected), [x, buf]  # fmt: skip
    if op == "DynamicLossScaler.unscale_":
        scaler = DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
        expected = (x.float() * 0.25).to(x.dtype) if floating else None
        return lambda: scaler.unscale_([x]), "unscale_", ["grads["], lambda: _same_values(x, expected), [x, scaler]
    raise AssertionError(op)


STALE_OPS = [
    "cast_ dst",
    "cast_ src",
    "unscale_ grads",
    "unscale_ out",
    "grad_norm",
    "flatten",
    "unflatten_copy_",
    "clip_grad_norm_",
    "FlatBuffer.copy_from_",
    "FlatBuffer.copy_to_",
    "DynamicLossScaler.unscale_",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STALE_OPS)
@isolated
def test_stale_address_after_a_valid_call(op, backend):
    """Each op once on ``x``, then on tensors at ``x``'s address that differ (cached chunk tables are keyed by
    address): each raises a clear error with nothing changed, or gives the plain-torch result."""
    base = torch.randn(256)
    call, fn, names, check, objs = _case(op, base[:64], backend)
    call()
    assert check(), "the first call"
    for what, x in _variants(base).items():
        if op == "clip_grad_norm_" and not x.is_floating_point():
            continue  # (torch refuses an integer grad on assignment)
        base.copy_(torch.randn(256))
        if x.is_floating_point():
            x.copy_(torch.randn(x.shape))  # (sane values in x's own dtype)
        call, fn, names, check, objs = _case(op, x, backend)
        _, err = _attempt(call, fn, names, base, *objs)
        assert err is not None or check(), f"{what}: accepted with a wrong result"
        if not x.is_floating_point():
            assert err is not None, f"{what}: an integer tensor was accepted"


# =====================================================================================================================
# DynamicLossScaler: state dicts and flags drawn at random
# =====================================================================================================================

_GOOD_OR_BAD = {
    "scale": (st.sampled_from([1.0, 0.1, 2.0**24, 3]), st.sampled_from([0.0, -1.0, math.nan, math.inf, "1", None])),
    "growth_tracker": (st.integers(0, 10), st.sampled_from([-1, 1.5, True, "0"])),
    "hysteresis_tracker": (st.integers(0, 2), st.sampled_from([-1, 3, 2.0, None])),
    "skipped_steps": (st.integers(5, 9), st.sampled_from([-2, 1.0, False])),
    "consecutive_skipped": (st.integers(0, 5), st.sampled_from([-1, 10, 0.5])),
    "min_scale_overflows": (st.integers(0, 3), st.sampled_from([-1, "x"])),
    "growth_factor": (st.sampled_from([2.0, 1.5]), st.sampled_from([1.0, 0.5, math.inf, math.nan])),
    "backoff_factor": (st.sampled_from([0.5, 0.25]), st.sampled_from([0.0, 1.0, -0.5, math.nan])),
    "growth_interval": (st.sampled_from([1, 100]), st.sampled_from([0, -3, 2.0, True])),
    "hysteresis": (st.sampled_from([2, 4]), st.sampled_from([0, 1.5, None])),
    "min_scale": (st.sampled_from([1.0, 2.0**-4]), st.sampled_from([0.0, -1.0, math.inf])),
    "max_scale": (st.sampled_from([None, 2.0**30, 0.5]), st.sampled_from([math.inf, math.nan, "2"])),
    "consecutive_hysteresis": (st.booleans(), st.sampled_from([1, "yes", None])),
}


@st.composite
def _state_dicts(draw):
    sd, bad = {}, []
    for key, (good, wrong) in _GOOD_OR_BAD.items():
        if key not in ("scale", "growth_tracker", "hysteresis_tracker") and draw(st.integers(0, 4)) == 0:
            continue  # an older dict without the key: the scaler's own value (counters: 0)
        if draw(st.integers(0, 9)) == 0:
            sd[key] = draw(wrong)
            bad.append(key)
        else:
            sd[key] = draw(good)
    if draw(st.integers(0, 14)) == 0:
        sd["typo_key"] = 1
        bad.append("typo_key")
    if draw(st.integers(0, 14)) == 0:
        del sd["growth_tracker"]
        bad.append("growth_tracker")
    return sd, bad


@isolated
@PROPERTY
@given(drawn=_state_dicts())
def test_scaler_load_state_dict_property(drawn):
    """A dict with any bad field raises naming it with the scaler unchanged; a good one loads exactly, after which
    the scaler updates to finite scales."""
    sd, bad = drawn
    scaler = DynamicLossScaler(init_scale=8.0, hysteresis=2, warn_after=None, device="cpu")
    scaler.update(torch.ones(1))
    before = snapshot(scaler)
    hysteresis = sd.get("hysteresis", 2) if "hysteresis" not in bad else 2
    relations_ok = (
        ("hysteresis_tracker" in bad or not isinstance(sd["hysteresis_tracker"], int)
         or sd["hysteresis_tracker"] <= hysteresis)
        and ("consecutive_skipped" in bad or sd.get("consecutive_skipped", 0) <= sd.get("skipped_steps", 0))
        and ("max_scale" in bad or sd.get("max_scale") is None or sd["max_scale"] >= sd.get("min_scale", 1.0))
        and ("scale" in bad or "min_scale" in bad or "max_scale" in bad
             or sd.get("min_scale", 1.0) <= sd["scale"] <= (sd.get("max_scale") or math.inf))
    )  # fmt: skip
    try:
        scaler.load_state_dict(sd)
    except (TypeError, ValueError, KeyError) as e:
        assert str(e).strip("'\"").startswith("DynamicLossScaler.load_state_dict: "), e
        assert bad or not relations_ok, f"a good state dict was refused: {e}"
        if bad:
            related = ["hysteresis_tracker", "consecutive_skipped", "max_scale", "scale"]
            assert any(k in str(e) for k in bad + related), e
        assert_unchanged(before, snapshot(scaler))
        return
    assert not bad and relations_ok, f"a bad state dict was loaded: {bad}"
    got = scaler.state_dict()
    assert got["scale"] == float(torch.tensor(float(sd["scale"]), dtype=torch.float32))
    for key in ("growth_tracker", "hysteresis_tracker", "skipped_steps", "consecutive_skipped"):
        assert got[key] == sd.get(key, 0)
    for flag in (0.0, 1.0, 1.0, 0.0):
        scaler.update(torch.tensor([flag]))
        assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_scaler_methods_refuse_bad_arguments(backend):
    scaler = DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
    grads = [torch.randn(5), torch.randn(7)]
    for call, exc, match in [
        (lambda: scaler.unscale_([grads[0], grads[0]]), ValueError, "^unscale_: grads\\[0\\] and grads\\[1\\] share"),
        (lambda: scaler.unscale_([grads[0], torch.eye(2).to_sparse()]), TypeError,
         "^unscale_: grads\\[1\\] must be a dense"),
        (lambda: scaler.unscale_(grads, out=[torch.empty(5)]), ValueError, "^unscale_: out has 1 tensors"),
        (lambda: scaler.unscale_([scaler.found_inf]), ValueError, "^unscale_: grads\\[0\\] and found_inf share memory"),
        (lambda: scaler.grad_scale_and_norm(grads, max_norm=math.nan), ValueError, "max_norm must be a number"),
        (lambda: scaler.grad_scale_and_norm([1.0]), TypeError,
         "^DynamicLossScaler.grad_scale_and_norm: grads\\[0\\] must be a Tensor"),
        (lambda: scaler.update(torch.zeros(2)), TypeError, "^DynamicLossScaler.update: found_inf must be a 1-element"),
        (lambda: scaler.update(torch.zeros(1, dtype=torch.bool)), TypeError, "^DynamicLossScaler.update: found_inf"),
    ]:  # fmt: skip
        expect_error_unchanged(call, exc, match, scaler, grads)


# =====================================================================================================================
# Autograd ops and unflatten: bad arguments drawn at random
# =====================================================================================================================


@isolated
@PROPERTY
@given(like=st.lists(st.one_of(st.tuples(st.integers(-2, 5), st.integers(-1, 4)), st.tuples(st.integers(0, 9)),
                               st.just(None), st.just("ab"), st.tuples(st.floats(0, 3))), max_size=4),
       flat_len=st.integers(0, 200), align=st.sampled_from([1, 8, 0, -1, True, 2.5]))  # fmt: skip
def test_unflatten_property(like, flat_len, align):
    """Any ``like``: views of the right sizes at the right offsets, or a clear error (nothing is written)."""
    flat = torch.randn(flat_len)
    try:
        views = functional.unflatten(flat, like, align)
    except (TypeError, ValueError) as e:
        assert str(e).startswith("unflatten: "), e
        return
    assert isinstance(align, int) and not isinstance(align, bool) and align >= 1
    offsets, _, total = fused_ops.reference.flatten_layout([math.prod(s) for s in like], align)
    assert total <= flat_len
    for v, s, off in zip(views, like, offsets, strict=True):
        assert v.shape == torch.Size(s) and v.is_contiguous()
        assert v.numel() == 0 or v.data_ptr() == flat.data_ptr() + off * flat.element_size()


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_autograd_ops_round_trip_and_refuse(backend):
    x = torch.randn(5, 3, requires_grad=True)
    y = fused_ops.autograd.cast(x, torch.bfloat16, backend=backend)
    y.float().sum().backward()
    assert torch.equal(x.grad, torch.ones(5, 3))
    xs = [torch.randn(4, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    flat = fused_ops.autograd.flatten(xs, 8, backend=backend)
    (flat * torch.arange(flat.numel())).sum().backward()
    assert torch.equal(xs[0].grad, torch.arange(4.0)) and torch.equal(xs[1].grad, torch.arange(8.0, 12).view(2, 2))
    for call, exc, match in [
        (lambda: fused_ops.autograd.flatten([xs[0], xs[1].double()], backend=backend), ValueError,
         "^flatten: tensors\\[1\\] is torch.float64"),
        (lambda: fused_ops.autograd.flatten(xs, 0, backend=backend), ValueError, "^flatten: align must be"),
        (lambda: fused_ops.autograd.cast(x, torch.int8, backend=backend), TypeError, "^cast: dtype must be"),
        (lambda: fused_ops.autograd.cast(x.detach().int(), torch.float32, backend=backend), TypeError,
         "^cast: x must be a floating-point tensor"),
    ]:  # fmt: skip
        expect_error_unchanged(call, exc, match, x, xs)


# -- tensors without memory of their own (DTensor-like wrapper subclasses) ----------------------------------------


class _Wrapper(torch.Tensor):
    """A wrapper subclass (as DTensor is): its ``data_ptr`` is not the address of its elements."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.elem if isinstance(x, _Wrapper) else x  # noqa: E731
        return func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_wrapper_subclasses_are_refused_by_name(backend):
    """A kernel handed a wrapper's address reads memory that is not the tensor's (a segfault with DTensor params in
    the Adam step): every entry point refuses such tensors by name, before anything changes."""
    plain = [torch.randn(5), torch.randn(3)]
    wrapped = _Wrapper(torch.randn(3))
    buf = FlatBuffer([torch.randn(3)], align=8, backend=backend)
    for call, fn, name in [
        (lambda: fused_ops.cast_([plain[0], wrapped], [torch.randn(5), torch.randn(3)], backend=backend), "cast_",
         "dst\\[1\\]"),
        (lambda: fused_ops.cast_([torch.empty(3)], [wrapped], backend=backend), "cast_", "src\\[0\\]"),
        (lambda: fused_ops.unscale_([plain[0], wrapped], 0.5, None, backend=backend), "unscale_", "grads\\[1\\]"),
        (lambda: fused_ops.grad_norm([wrapped], backend=backend), "grad_norm", "tensors\\[0\\]"),
        (lambda: fused_ops.flatten([wrapped], backend=backend), "flatten", "tensors\\[0\\]"),
        (lambda: functional.unflatten_copy_([wrapped], torch.zeros(64), backend=backend), "unflatten_copy_",
         "tensors\\[0\\]"),
        (lambda: buf.copy_to_([wrapped]), "FlatBuffer.copy_to_", "tensors\\[0\\]"),
    ]:  # fmt: skip
        expect_error_unchanged(call, TypeError, f"^{fn}: {name} is a _Wrapper, not a plain tensor with memory of its",
                               plain, wrapped.elem, buf)  # fmt: skip
    for call, fn, name in [
        (lambda: fused_ops.unscale_(plain, _Wrapper(torch.ones(1)), None, backend=backend), "unscale_", "inv_scale"),
        (lambda: fused_ops.unscale_(plain, 0.5, _Wrapper(torch.zeros(1)), backend=backend), "unscale_", "found_inf"),
    ]:
        expect_error_unchanged(call, TypeError, f"^{fn}: {name} must be a 1-element floating-point tensor", plain)
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = _Wrapper(torch.randn(3))
    expect_error_unchanged(lambda: fused_ops.clip_grad_norm_([torch.nn.Parameter(torch.randn(2)), p], 1.0,
                                                             backend=backend), TypeError,
                           "^clip_grad_norm_: parameters\\[1\\].grad is a _Wrapper", p)  # fmt: skip
