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
    for dst, src, match in [
        ([half[:8], half[:8]], [torch.randn(8), torch.randn(8)], "dst\\[0\\] and dst\\[1\\] share memory"),
        ([base[:8].view(torch.bfloat16)[:8]], [base[:8]], "dst\\[0\\] and src\\[0\\] share memory"),
        ([half[:8], half[8:16]], [torch.randn(8), half[4:12].float()], None),  # a copy: fine
        ([half[:8], half[8:16]], [torch.randn(8), half[:8]], "dst\\[0\\] and src\\[1\\] share memory"),
    ]:
        if match is None:
            fused_ops.cast_(dst, src, backend=backend)
            continue
        expect_error_unchanged(lambda dst=dst, src=src: fused_ops.cast_(dst, src, backend=backend), ValueError,
                               f"^cast_: {match}", base, half, src)  # fmt: skip
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
    expect_error_unchanged(lambda: two.copy_to_([dup, dup]), ValueError,
                           "^FlatBuffer.copy_to_: tensors\\[0\\] and tensors\\[1\\] share memory", two, dup)
    buf.copy_to_(buf.views)  # every view onto itself: nothing moves
    assert all(torch.equal(v, x) for v, x in zip(buf.views, xs, strict=True))


def test_flatbuffer_errors_name_the_method():
    """Errors from the ops FlatBuffer calls used to name those ops (cast_: src[0], dst[0]); each method names
    itself and checks everything first."""
    buf = FlatBuffer([torch.randn(4)], align=8)
    expect_error_unchanged(lambda: buf.copy_from_([torch.zeros(4, dtype=torch.int32)]), TypeError,
                           "^FlatBuffer.copy_from_: tensors\\[0\\] must be a floating-point tensor", buf)
    expect_error_unchanged(lambda: buf.copy_to_([torch.zeros(4, device="meta")]), ValueError,
                           "^FlatBuffer.copy_to_: tensors\\[0\\] is on meta, the buffer on cpu", buf)
    expect_error_unchanged(lambda: buf.copy_to_([torch.zeros(4, dtype=torch.int64)]), TypeError,
                           "^FlatBuffer.copy_to_: tensors\\[0\\] must be a floating-point tensor", buf)
    expect_error_unchanged(lambda: buf.copy_from_([1.0]), TypeError,
                           "^FlatBuffer.copy_from_: tensors\\[0\\] must be a Tensor", buf)
    p = torch.nn.Parameter(torch.randn(4))
    expect_error_unchanged(lambda: buf.bind_data_([p, p]), ValueError,
                           "^FlatBuffer.bind_data_: got 2 tensors, the buffer holds 1", buf, p)
    expect_error_unchanged(lambda: buf.bind_grads_(["x"]), TypeError,
                           "^FlatBuffer.bind_grads_: params\\[0\\] must be a Tensor", buf)
    expect_error_unchanged(lambda: FlatBuffer([torch.randn(3)], dtype="float32"), TypeError,
                           "^FlatBuffer: dtype must be a floating-point torch.dtype")


def test_flatbuffer_from_params_refuses_shared_params():
    """Tied params (the same tensor twice, or views of one storage) would be untied silently: refused, with every
    param still bound to its own memory."""
    a = torch.nn.Parameter(torch.randn(8))
    b = torch.nn.Parameter(torch.randn(3))
    for params, match in [([a, b, a], "params\\[0\\] and params\\[2\\] share memory"),
                          ([a, torch.nn.Parameter(a.data[2:5])], "params\\[0\\] and params\\[1\\] share memory")]:
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
    for like, match in [([(2,), (-1, 2)], "like\\[1\\] must be a tensor or a shape of ints >= 0"),
                        ([(2.5,)], "like\\[0\\] must be a tensor or a shape of ints >= 0"),
                        ([None], "like\\[0\\] must be a tensor or a shape of ints >= 0")]:
        with pytest.raises((ValueError, TypeError), match=f"^unflatten: {match}"):
            functional.unflatten(flat, like, align=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_type_and_parameters_are_checked_by_name(backend):
    params = _params([(4,)])
    expect_error_unchanged(lambda: fused_ops.grad_norm([params[0].grad], "two", backend=backend), ValueError,
                           "^grad_norm: norm_type must be inf or a number > 0, got 'two'", params)
    expect_error_unchanged(lambda: fused_ops.clip_grad_norm_([params[0], "x"], 1.0, backend=backend), TypeError,
                           "^clip_grad_norm_: parameters\\[1\\] must be a Tensor", params)
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
        (lambda: fused_ops.autograd.cast(x, torch.bfloat16, stochastic="yes"), TypeError,
         "^cast: stochastic must be a bool"),
        (lambda: fused_ops.autograd.cast(x, torch.bfloat16, backend="cuda"), ValueError, "backend must be one of"),
        (lambda: fused_ops.autograd.flatten(x), TypeError, "^flatten: tensors must be a sequence of tensors"),
        (lambda: fused_ops.autograd.flatten([x, 3]), TypeError, "^flatten: tensors\\[1\\] must be a Tensor"),
    ]:
        expect_error_unchanged(call, exc, match, x)
