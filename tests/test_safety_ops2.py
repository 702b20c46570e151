"""Safety regressions of the non-optimizer API (second file): inference and meta tensors refused up front on both
backends, interleaved strided grads clipped, FlatBuffer.copy_to_ checked against what it reads, the Triton norm in
float64, and DynamicLossScaler's range checks. Each case failed before its fix."""

from __future__ import annotations

import pytest
import torch

import fused_ops
from fused_ops import FlatBuffer, functional
from tests.safety import expect_error_unchanged

pytestmark = [pytest.mark.safety]

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]


def _inference_zeros(n=64):
    with torch.inference_mode():
        return torch.zeros(n)


INFERENCE_CASES = {
    "cast_": (lambda x, b: fused_ops.cast_([x], [torch.ones(64)], backend=b), "dst\\[0\\]"),
    "unflatten_copy_": (lambda x, b: functional.unflatten_copy_([x], torch.ones(64), 8, backend=b), "tensors\\[0\\]"),
    "unscale_ out": (lambda x, b: fused_ops.unscale_([torch.ones(64)], 0.5, out=[x], backend=b), "out\\[0\\]"),
    "unscale_ found_inf": (lambda x, b: fused_ops.unscale_([torch.ones(64)], 0.5, x[:1], backend=b), "found_inf"),
    "op cast_": (lambda x, b: torch.ops.fused_ops.cast_([x], [torch.ones(64)], False, None, b), "dst\\[0\\]"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(INFERENCE_CASES))
def test_inference_tensors_are_refused_before_writing(case, backend):
    """Before, Triton wrote them silently and the reference wrote them, then raised torch's error."""
    call, names = INFERENCE_CASES[case]
    x = _inference_zeros()
    with pytest.raises(TypeError, match=f"{names} is an inference tensor"):
        call(x, backend)
    assert not x.any()  # (tests/safety.py's snapshot reads ``_version``, which an inference tensor lacks)


META_CASES = {
    "grad_norm": lambda m: functional.grad_norm([m], backend="triton"),
    "cast_": lambda m: fused_ops.cast_([m], [torch.empty(64, device="meta")], backend="triton"),
    "unscale_": lambda m: fused_ops.unscale_([m], 0.5, backend="triton"),
    "flatten": lambda m: functional.flatten([m], backend="triton"),
    "unflatten_copy_": lambda m: functional.unflatten_copy_([m], torch.empty(64, device="meta"), 8, backend="triton"),
    "clip_grad_norm_": lambda m: functional.clip_grad_norm_([_meta_param(m)], 1.0, backend="triton"),
}


def _meta_param(m):
    p = torch.nn.Parameter(torch.empty(64, device="meta"))
    p.grad = m
    return p


@pytest.mark.interpret
@pytest.mark.parametrize("case", list(META_CASES))
def test_meta_tensors_refused_up_front_on_triton(case):
    """Before, the interpreter failed inside the launch ("Cannot copy out of meta tensor"), naming nothing."""
    with pytest.raises(TypeError, match="meta tensors"):
        META_CASES[case](torch.empty(64, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_takes_interleaved_grads_that_share_no_element(backend):
    """Before, base[0::2] and base[1::2] were refused as sharing memory; torch clips them."""
    base = torch.arange(1.0, 65.0)
    ref = base.clone()
    p1, p2 = torch.nn.Parameter(torch.zeros(32)), torch.nn.Parameter(torch.zeros(32))
    t1, t2 = torch.nn.Parameter(torch.zeros(32)), torch.nn.Parameter(torch.zeros(32))
    p1.grad, p2.grad = base[0::2], base[1::2]
    t1.grad, t2.grad = ref[0::2], ref[1::2]
    expected = torch.nn.utils.clip_grad_norm_([t1, t2], 1.0)
    got = functional.clip_grad_norm_([p1, p2], 1.0, backend=backend)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(base, ref)
    # still refused: the same lattice with starts one element apart in another pair (base[0::2] and base[2::2])
    q1, q2 = torch.nn.Parameter(torch.zeros(32)), torch.nn.Parameter(torch.zeros(31))
    q1.grad, q2.grad = base[0::2], base[2::2]
    expect_error_unchanged(lambda: functional.clip_grad_norm_([q1, q2], 1.0, backend=backend), ValueError,
                           "share memory", base)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_flatbuffer_copy_to_checks_the_memory_it_reads(backend):
    """Before, copy_to_ checked against the views bound at construction but copied from ``data``: after
    ``data.set_()`` onto a tensor overlapping the destination, Triton smeared it."""
    n = 4096
    buf = FlatBuffer.from_params([torch.randn(n)], align=64, backend=backend)
    big = torch.arange(2.0 * n)
    buf.data.set_(big[:n])
    dst = big[1024 : 1024 + n]
    expect_error_unchanged(lambda: buf.copy_to_([dst]), ValueError, "share memory", big)
