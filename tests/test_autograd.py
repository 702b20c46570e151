"""fused_ops.autograd: differentiable cast and flatten, checked with gradcheck / gradgradcheck in float64, and
the backward dtypes and shapes on the Triton path (interpreter)."""

import pytest
import torch

import fused_ops
from fused_ops import autograd

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy, in the interpreter


def test_cast_gradcheck_float64():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: autograd.cast(t, torch.float64), (x,))
    assert torch.autograd.gradgradcheck(lambda t: autograd.cast(t, torch.float64), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cast_gradcheck_narrowing_on_exact_points(dtype):
    """Narrowing casts are exact on dyadic points with a dyadic step, so the finite differences are exact."""
    x = (torch.randint(-60, 60, (7,)).double()).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: autograd.cast(t, dtype).double(), (x,), eps=0.5, atol=0, rtol=0)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpret), "reference"])
def test_cast_backward_casts_grad_back(backend):
    x = torch.randn(5, 2, requires_grad=True)
    y = autograd.cast(x, torch.bfloat16, backend=backend)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x.detach().to(torch.bfloat16))
    g = torch.randn(5, 2).to(torch.bfloat16)
    y.backward(g)
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, g.float())


def test_flatten_gradcheck_float64():
    shapes = [(3, 2), (1,), (5,), (2, 2, 2)]
    xs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *t: autograd.flatten(t, align=4), xs)
    assert torch.autograd.gradgradcheck(lambda *t: autograd.flatten(t, align=4), xs)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpret), "reference"])
def test_flatten_backward_unflattens(backend):
    xs = [torch.randn(s, requires_grad=True) for s in [(3, 5), (0,), (70,)]]
    flat = autograd.flatten(xs, align=16, backend=backend)
    assert torch.equal(flat, fused_ops.flatten([x.detach() for x in xs], align=16))
    weights = torch.arange(flat.numel(), dtype=torch.float32)
    (flat * weights).sum().backward()
    for x, w in zip(xs, fused_ops.unflatten(weights, xs, align=16), strict=True):
        assert x.grad.shape == x.shape and torch.equal(x.grad, w)


def test_autograd_rejects_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        autograd.cast(torch.zeros(2), torch.int32)
    with pytest.raises(TypeError, match="x must be"):
        autograd.cast(torch.zeros(2, dtype=torch.int64), torch.float32)
    with pytest.raises(ValueError, match="empty"):
        autograd.flatten([])
