"""Safety tier of ``FlatBuffer`` (``pytest -m safety``): its constructor's sources, its own ``data`` (which may be given
other memory, or freed, after construction), and binding, on both backends ("triton" under the interpreter,
"reference"). Each case raises a clear error naming the method and the argument with every tensor bit-identical to
before (``tests/safety.py``), or gives the plain-torch result. Cases that crashed the process run in a forked child.
"""

from __future__ import annotations

import pytest
import torch

from fused_ops import FlatBuffer
from tests.safety import expect_error_unchanged, isolated

pytestmark = pytest.mark.safety

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]


def _pair():
    return [torch.arange(1.0, 6.0), torch.arange(10.0, 13.0)]


# -- the constructor reads its sources as copy_from_ does ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_constructor_refuses_freed_or_shrunk_sources(backend):
    """A source whose storage was freed (``resize_(0)``) crashed the constructor (SIGSEGV) and one shrunk in place was
    read past its end, where copy_from_ refused both: the same ValueError now, on the gather and the cast paths; an
    existing grad freed in place is named as for_grads' argument (was ``cast_: src[0]``)."""
    for nbytes in (0, 16):
        ok, src = torch.randn(7), torch.arange(1000.0)
        src.untyped_storage().resize_(nbytes)
        for dtype in (None, torch.bfloat16):
            expect_error_unchanged(lambda xs=[ok, src], dtype=dtype: FlatBuffer(xs, dtype=dtype, backend=backend),
                                   ValueError, "^FlatBuffer: tensors\\[1\\] lies outside its storage", ok,
                                   src)  # fmt: skip
        p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(1000))
        q.grad = torch.randn(1000)
        q.grad.untyped_storage().resize_(nbytes)
        expect_error_unchanged(lambda p=p, q=q: FlatBuffer.for_grads([p, q], align=8, backend=backend), ValueError,
                               "^FlatBuffer.for_grads: params\\[1\\].grad lies outside its storage", p, q)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_constructor_refuses_negated_views(backend):
    """A negated view (its memory holds the negated values) was gathered as its raw memory by Triton (the wrong sign)
    and right by the reference; copy_from_ and from_params refuse it: so does the constructor now, on both backends
    and both paths (same dtype: the gather; another: the cast)."""
    negated = {
        "_neg_view": torch._neg_view(torch.tensor([-3.0, 4.0])),
        "conj().imag": torch.complex(torch.tensor([1.0]), torch.tensor([-3.0])).conj().imag,
    }
    for what, neg in negated.items():
        assert neg.is_neg(), what
        ok = torch.randn(5)
        for dtype in (None, torch.float16):
            expect_error_unchanged(lambda xs=[ok, neg], dtype=dtype: FlatBuffer(xs, dtype=dtype, backend=backend),
                                   ValueError, "^FlatBuffer: tensors\\[1\\] is a negated or conjugated view", ok,
                                   neg)  # fmt: skip
        buf = FlatBuffer([torch.zeros(5), torch.zeros(neg.shape)], align=4, backend=backend)
        expect_error_unchanged(lambda xs=[ok, neg], buf=buf: buf.copy_from_(xs), ValueError,
                               "^FlatBuffer.copy_from_: tensors\\[1\\] is a negated", ok, neg, buf)  # fmt: skip
    # resolved, the same values on both backends
    buf = FlatBuffer([negated["_neg_view"].resolve_neg()], align=4, backend=backend)
    assert buf.data.tolist() == [3.0, -4.0, 0.0, 0.0]


# -- every method uses the current data --------------------------------------------------------------------------


def _repoint(buf, how):
    """Give ``buf.data`` other memory (7.0 everywhere), as ``set_`` or an assignment does."""
    new = torch.full((buf.numel,), 7.0)
    if how == "set_":
        buf.data.set_(new)
    else:
        buf.data = new
    return new


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["set_", "assign"])
def test_copies_and_binding_use_the_current_data(backend, how):
    """After ``buf.data`` was given other memory, copy_from_ with sources of another dtype wrote the old views (the
    new data kept its 7.0s, only its padding zeroed) while the same-dtype path wrote the new data: every path writes,
    reads and binds ``data`` as it is now."""
    expected = [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0, 10.0, 11.0, 12.0, 0.0]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        buf = FlatBuffer([torch.zeros(5), torch.zeros(3)], align=4, backend=backend)
        old = [v.clone() for v in buf.views]
        new = _repoint(buf, how)
        buf.copy_from_([x.to(dtype) for x in _pair()])
        assert buf.data.tolist() == expected, dtype
        assert new.tolist() == expected, dtype
        assert all(torch.equal(v, o) for v, o in zip(buf.views, old)), "the old memory was written"
        for out_dtype in (torch.float32, torch.float16):
            out = [torch.empty(5, dtype=out_dtype), torch.empty(3, dtype=out_dtype)]
            buf.copy_to_(out)
            assert [o.tolist() for o in out] == [x.tolist() for x in _pair()]
        params = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(3))]
        buf.bind_data_(params)
        buf.bind_grads_(params)
        base = new.data_ptr()
        assert [p.data_ptr() - base for p in params] == [0, 8 * 4]
        assert [p.grad.data_ptr() - base for p in params] == [0, 8 * 4]
        buf.zero_()
        assert not new.any()


# -- bind_data_ / bind_grads_ check everything before binding the first ---------------------------------------------


def test_bind_checks_every_tensor_before_binding():
    """A meta or sparse tensor second in the list raised torch's "incompatible tensor type" (naming nothing) after
    the first was bound: a clear error naming it now, and nothing bound."""
    buf = FlatBuffer([torch.zeros(3), torch.zeros(3)], align=4)
    for second, exc, match in [
        (torch.randn(3, device="meta"), ValueError, "tensors\\[1\\] is on meta, the buffer on cpu"),
        (torch.randn(3).to_sparse(), TypeError, "tensors\\[1\\] must be a dense tensor, got torch.sparse_coo"),
        (torch.randn(3, dtype=torch.float64), ValueError, "tensors\\[1\\] is torch.float64, the buffer torch.float32"),
    ]:
        first = torch.randn(3)
        expect_error_unchanged(lambda first=first, second=second: buf.bind_data_([first, second]), exc,
                               f"^FlatBuffer.bind_data_: {match}", first, second, buf)  # fmt: skip
    for second, exc, match in [
        (torch.nn.Parameter(torch.randn(3).to_sparse()), TypeError, "params\\[1\\] must be a dense tensor"),
        (torch.nn.Parameter(torch.randn(3, device="meta")), ValueError, "params\\[1\\] is torch.float32 on meta"),
    ]:
        first = torch.nn.Parameter(torch.randn(3))
        expect_error_unchanged(lambda first=first, second=second: buf.bind_grads_([first, second]), exc,
                               f"^FlatBuffer.bind_grads_: {match}", first, second, buf)  # fmt: skip
        assert first.grad is None
    # a param whose grad_dtype (torch >= 2.9) is not the buffer's: torch refuses the view as its grad, which it did
    # after the params before it were bound (from for_grads too)
    first, second = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    if hasattr(second, "grad_dtype"):
        second.grad_dtype = torch.bfloat16
        expect_error_unchanged(lambda: buf.bind_grads_([first, second]), ValueError,
                               "params\\[1\\] takes torch.bfloat16 grads", first, second, buf)  # fmt: skip
        with pytest.raises(ValueError, match="params\\[1\\] takes torch.bfloat16 grads"):
            FlatBuffer.for_grads([first, second], align=4)
        assert first.grad is None and second.grad is None


@isolated
def test_bind_refuses_a_freed_buffer():
    """Binding onto a buffer whose storage was freed was accepted: the tensor then lay at address 0x0."""
    buf = FlatBuffer([torch.zeros(3), torch.zeros(3)], align=4)
    buf.data.untyped_storage().resize_(0)
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))]
    expect_error_unchanged(lambda: buf.bind_data_(params), ValueError,
                           "^FlatBuffer.bind_data_: data lies outside its storage", params, buf)  # fmt: skip
    expect_error_unchanged(lambda: buf.bind_grads_(params), ValueError,
                           "^FlatBuffer.bind_grads_: data lies outside its storage", params, buf)  # fmt: skip
    assert all(p.grad is None for p in params)


# -- every method checks data, the same on both backends ------------------------------------------------------------


def _bad_data(numel):
    return {
        "bf16": (torch.zeros(numel, dtype=torch.bfloat16), ValueError, "of torch.bfloat16 on cpu"),
        "strided": (torch.zeros(2 * numel)[::2], ValueError, "a non-contiguous 1-d tensor"),
        "too short": (torch.zeros(numel - 1), ValueError, f"of {numel - 1} elements"),
        "2-d": (torch.zeros(2, numel), ValueError, "2-d tensor"),
        "meta": (torch.zeros(numel, device="meta"), ValueError, "on meta"),
        "sparse": (torch.zeros(numel).to_sparse(), TypeError, "must be a dense tensor"),
        "negated": (torch._neg_view(torch.zeros(numel)), ValueError, "data is a negated or conjugated view"),
    }


def _methods(buf):
    return {
        "copy_from_": lambda: buf.copy_from_(_pair()),
        "copy_from_ (cast)": lambda: buf.copy_from_([x.half() for x in _pair()]),
        "copy_to_": lambda: buf.copy_to_([torch.empty(5), torch.empty(3)]),
        "copy_to_ (cast)": lambda: buf.copy_to_([torch.empty(5, dtype=torch.half), torch.empty(3, dtype=torch.half)]),
        "zero_": buf.zero_,
        "bind_data_": lambda: buf.bind_data_([torch.zeros(5), torch.zeros(3)]),
        "bind_grads_": lambda: buf.bind_grads_([torch.zeros(5), torch.zeros(3)]),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_method_checks_data(backend):
    """With ``data`` of another dtype or strided, the reference accepted copy_from_/copy_to_ and Triton refused with
    an error naming ``flatten_launch``; a too-short ``data`` gave an IndexError naming nothing. Each method now refuses
    a ``data`` that is not a dense contiguous 1-d tensor of the buffer's dtype and device, of at least the layout's
    size, the same on both backends, naming ``data``; nothing is changed."""
    for what, (data, exc, detail) in _bad_data(12).items():
        buf = FlatBuffer(_pair(), align=4, backend=backend)
        assert buf.numel == 12
        buf.data = data
        for name, call in _methods(buf).items():
            fn = name.split()[0]
            err = expect_error_unchanged(call, exc, f"^FlatBuffer.{fn}: data ", buf)
            assert detail in str(err), (what, name, str(err))
    # a longer data is fine (the layout is its start)
    buf = FlatBuffer(_pair(), align=4, backend=backend)
    buf.data = torch.full((20,), 7.0)
    buf.copy_from_([x.half() for x in _pair()])
    assert buf.data.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0, 10.0, 11.0, 12.0, 0.0] + [7.0] * 8


@pytest.mark.parametrize("backend", BACKENDS)
@isolated
def test_every_method_refuses_freed_data(backend):
    """``data`` freed or shrunk in place: each method refuses it (zero_ did; the copies named "the buffer", binding
    accepted it)."""
    for nbytes in (0, 16):
        buf = FlatBuffer(_pair(), align=4, backend=backend)
        buf.data.untyped_storage().resize_(nbytes)
        for name, call in _methods(buf).items():
            fn = name.split()[0]
            expect_error_unchanged(call, ValueError, f"^FlatBuffer.{fn}: data lies outside its storage", buf)


# -- bool flags ---------------------------------------------------------------------------------------------------


def test_bool_flags_refuse_non_bools():
    """``copy=1`` and ``stage_on_host=1`` were accepted (``1 == True``); other bool arguments refuse non-bools."""
    xs = [torch.randn(3)]
    for value in (1, 0, "yes", None):
        expect_error_unchanged(lambda value=value: FlatBuffer(xs, copy=value), TypeError,
                               "^FlatBuffer: copy must be a bool", xs)  # fmt: skip
    params = [torch.nn.Parameter(torch.randn(3))]
    for value in (1, 0, "yes"):
        expect_error_unchanged(lambda value=value: FlatBuffer.from_params(params, stage_on_host=value), TypeError,
                               "^FlatBuffer.from_params: stage_on_host must be a bool or None", params)  # fmt: skip
    for value in (None, False, True):
        p = [torch.nn.Parameter(torch.randn(3))]
        FlatBuffer.from_params(p, stage_on_host=value)


# -- the public views are the user's: the methods never read or write through them --------------------------------


def _move_view(buf, how, other):
    with torch.no_grad():
        if how == "as_strided_":  # into the padding after its segment
            buf[1].as_strided_((16,), (1,), buf[1].storage_offset() + 16)
        elif how == "set_":
            buf[1].set_(other)
        elif how == "data":
            buf[1].data = other
        elif how == "t_":
            buf[1].t_()
        else:
            buf[1].resize_(8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["as_strided_", "set_", "data", "t_", "resize_"])
def test_methods_ignore_moved_public_views(backend, how):
    """``FlatBuffer`` trusted its public ``views`` when the first and last still lay at their offsets: a middle one
    moved by the user (``buf[1].set_(t)``, ``.data = t``, ``as_strided_``) was written by ``copy_from_`` of another
    dtype (the user's tensor got the values, the buffer kept stale ones), read by ``copy_to_`` of another dtype only
    (one buffer, two answers), and bound by ``bind_data_``/``bind_grads_`` (a param outside the buffer, or of the
    moved view's shape). Every method now goes through views of ``data`` that are never handed out."""
    torch.manual_seed(0)
    shapes = [(16,), (4, 4), (16,)]
    buf = FlatBuffer([torch.zeros(s) for s in shapes], align=32, backend=backend)
    other = torch.full((4, 4), -7.0)
    _move_view(buf, how, other)
    src = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    buf.copy_from_(src)
    offsets = buf.offsets
    for i, s in enumerate(src):
        assert torch.equal(buf.data[offsets[i] : offsets[i] + 16], s.float().reshape(-1))
    padding = torch.ones(buf.numel, dtype=torch.bool)
    for off in offsets:
        padding[off : off + 16] = False
    assert torch.equal(buf.data[padding], torch.zeros(int(padding.sum())))  # (padding zeroed, nothing else there)
    assert torch.equal(other, torch.full((4, 4), -7.0))  # (the user's tensor untouched)
    for dtype in (torch.bfloat16, torch.float32):
        out = [torch.full(s, float("nan"), dtype=dtype) for s in shapes]
        buf.copy_to_(out)
        for o, s in zip(out, src):
            assert torch.equal(o.float(), s.float())
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    buf.bind_data_(params)
    grads = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    buf.bind_grads_(grads)
    base, size = buf.data.data_ptr(), buf.data.element_size()
    for i, s in enumerate(shapes):
        for t in (params[i], grads[i].grad):
            assert t.shape == s and t.is_contiguous() and t.data_ptr() == base + offsets[i] * size
    grads[1].grad.t_()  # (a bound grad is the user's too: reshaping it moves no view of the buffer's)
    out = [torch.empty(s) for s in shapes]
    buf.copy_to_(out)
    assert torch.equal(out[1], src[1].float())
