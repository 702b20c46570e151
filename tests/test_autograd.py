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


# --- forward-mode AD, torch.func transforms, fullgraph compile ----------------------------------------------------

import torch.autograd.forward_ad as fwAD  # noqa: E402

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]
SIZES = [0, 1, 7, 1031]  # empty, one element, a prime, just over a block of 1024


def _padded(ts, align):
    """torch's flatten: each tensor flattened, then zeros up to the next multiple of align."""
    parts = []
    for t in ts:
        parts += [t.reshape(-1), t.new_zeros(-t.numel() % align)]
    return torch.cat(parts)


def _tangent(fn, primal, tangent):
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(primal, tangent))
        return fwAD.unpack_dual(out).tangent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("src, dst", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                      (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])  # fmt: skip
def test_cast_forward_ad_matches_to(backend, n, src, dst):
    x, t = torch.randn(n).to(src), (torch.randn(n) * 3).to(src)
    got = _tangent(lambda d: autograd.cast(d, dst, backend=backend), x, t)
    want = _tangent(lambda d: d.to(dst), x, t)
    assert got.dtype == dst and got.shape == (n,) and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cast_forward_ad_stochastic_primal_nearest_tangent(backend):
    """The primal rounds stochastically; the tangent is cast to nearest even (the rounding's derivative taken as
    the identity, as in backward)."""
    x, t = torch.randn(1031), torch.randn(1031)
    with fwAD.dual_level():
        y = autograd.cast(fwAD.make_dual(x, t), torch.bfloat16, stochastic=True, backend=backend)
        primal, tangent = fwAD.unpack_dual(y)
    assert torch.equal(tangent, t.to(torch.bfloat16))
    assert ((primal.float() - x).abs() <= x.abs() * 2**-7).all()  # rounded down or up (one bf16 step)
    assert not torch.equal(primal, x.to(torch.bfloat16))  # (1031 elements: some round away from the nearest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flatten_forward_ad_matches_cat_with_zero_padding(backend):
    """float64: exact. An input without a tangent counts as zeros; the padding's tangent is zero."""
    shapes = [(3, 5), (0,), (1,), (7,), (1031,)]
    xs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ts = [torch.randn(s, dtype=torch.float64) for s in shapes]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) if i != 2 else x for i, (x, t) in enumerate(zip(xs, ts))]
        primal, tangent = fwAD.unpack_dual(autograd.flatten(duals, align=16, backend=backend))
    assert torch.equal(primal, _padded(xs, 16))
    assert torch.equal(tangent, _padded([t if i != 2 else torch.zeros_like(t) for i, t in enumerate(ts)], 16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flatten_forward_ad_low_precision(backend, dtype):
    xs = [torch.randn(n).to(dtype) for n in (1, 7)]
    ts = [torch.randn(n).to(dtype) for n in (1, 7)]
    with fwAD.dual_level():
        out = autograd.flatten([fwAD.make_dual(x, t) for x, t in zip(xs, ts)], align=4, backend=backend)
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent.dtype == dtype and torch.equal(tangent, _padded(ts, 4))


def test_func_jvp_and_jacfwd_match_torch():
    x, t = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    got = torch.func.jvp(lambda r: autograd.cast(r, torch.float32), (x,), (t,))
    want = torch.func.jvp(lambda r: r.to(torch.float32), (x,), (t,))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    fl = lambda r, s: autograd.flatten([r, s], align=4)  # noqa: E731
    ref = lambda r, s: _padded([r, s], 4)  # noqa: E731
    y = torch.randn(2, 3, dtype=torch.float64)
    for jac in (torch.func.jacfwd, torch.func.jacrev):
        got, want = jac(fl, argnums=(0, 1))(x, y), jac(ref, argnums=(0, 1))(x, y)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # forward over reverse (jvp of the backward passes)
    got = torch.func.hessian(lambda r: (autograd.cast(r, torch.float64) ** 3).sum() + (fl(r, y) ** 3).sum())(x)
    want = torch.func.hessian(lambda r: (r**3).sum() + (ref(r, y) ** 3).sum())(x)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_matches_torch(backend):
    x = torch.randn(1031)
    w = torch.randn(1031).to(torch.bfloat16)
    got = torch.func.grad(lambda r: (autograd.cast(r, torch.bfloat16, backend=backend) * w).float().sum())(x)
    want = torch.func.grad(lambda r: (r.to(torch.bfloat16) * w).float().sum())(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    xs = (torch.randn(3, 5), torch.randn(7))
    weights = torch.randn(32)
    got = torch.func.grad(lambda a, b: (autograd.flatten([a, b], align=16, backend=backend) * weights).sum(),
                          argnums=(0, 1))(*xs)  # fmt: skip
    want = torch.func.grad(lambda a, b: (_padded([a, b], 16) * weights).sum(), argnums=(0, 1))(*xs)
    assert all(torch.allclose(a, b, rtol=0, atol=0) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vmap_cast_matches_to(backend, in_dim, dtype):
    x = torch.randn(3, 7) if in_dim == 0 else torch.randn(7, 3)
    got = torch.func.vmap(lambda r: autograd.cast(r, dtype, backend=backend), in_dims=in_dim)(x)
    want = torch.func.vmap(lambda r: r.to(dtype), in_dims=in_dim)(x)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_cast_stochastic_follows_randomness(backend):
    cast = lambda r: autograd.cast(r, torch.bfloat16, stochastic=True, backend=backend)  # noqa: E731
    x = torch.randn(1, 257).expand(3, 257) * (1 + 2**-10)  # (between bf16 values: rounding is random)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(cast)(x)
    same = torch.func.vmap(cast, randomness="same")(x)
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
    different = torch.func.vmap(cast, randomness="different")(x)
    assert not torch.equal(different[0], different[1])
    for y in (same, different):  # each element rounded down or up (one bf16 step)
        assert ((y.float() - x).abs() <= x.abs() * 2**-7).all()
    with pytest.raises(NotImplementedError, match="randomness='same'"):
        torch.func.grad(lambda t: torch.func.vmap(cast, randomness="same")(t).float().sum())(x.contiguous())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_vmap_flatten_matches_per_example(backend, n):
    """Row b is flatten of example b, padding zero; batch dims anywhere, an unbatched input read by each example."""
    a = torch.randn(n, 3)  # batched on dim 1
    b = torch.randn(3, 2, 2)  # batched on dim 0
    c = torch.randn(5)  # unbatched
    got = torch.func.vmap(lambda r, s, u: autograd.flatten([r, s, u], align=8, backend=backend),
                          in_dims=(1, 0, None))(a, b, c)  # fmt: skip
    want = torch.stack([_padded([a[:, i], b[i], c], 8) for i in range(3)])
    assert got.shape == want.shape and torch.equal(got, want)


def test_vmap_flatten_empty_batch_and_unbatched():
    got = torch.func.vmap(lambda r: autograd.flatten([r, torch.ones(3)], align=4))(torch.randn(0, 5))
    assert got.shape == (0, 12)  # (5 -> 8, then 3 -> 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_grad_matches_torch(backend):
    x = torch.randn(4, 7)
    f = lambda r: (autograd.flatten([r, r[:3] * 2], align=8, backend=backend) ** 2).sum()  # noqa: E731
    ref = lambda r: (_padded([r, r[:3] * 2], 8) ** 2).sum()  # noqa: E731
    assert torch.allclose(torch.func.vmap(torch.func.grad(f))(x), torch.func.vmap(torch.func.grad(ref))(x))
    g = lambda r: (autograd.cast(r, torch.bfloat16, backend=backend).float() ** 2).sum()  # noqa: E731
    h = lambda r: (r.to(torch.bfloat16).float() ** 2).sum()  # noqa: E731
    assert torch.equal(torch.func.vmap(torch.func.grad(g))(x), torch.func.vmap(torch.func.grad(h))(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    x = torch.randn(7, requires_grad=True)
    w = torch.randn(7)
    f = torch.compile(lambda t: (autograd.cast(t, torch.bfloat16, backend=backend).float() * w).sum(),
                      backend="aot_eager", fullgraph=True)  # fmt: skip
    f(x).backward()
    assert torch.equal(x.grad, w.to(torch.bfloat16).float())
    x.grad = None
    g = torch.compile(lambda t: (autograd.flatten([t, t * 2], align=4, backend=backend) * torch.arange(16.0)).sum(),
                      backend="aot_eager", fullgraph=True)  # fmt: skip
    g(x).backward()
    assert torch.equal(x.grad, torch.arange(7.0) + 2 * torch.arange(8.0, 15.0))


def test_compile_forward_ad_keeps_tangents():
    """Under torch.compile with a forward-AD level open, the Functions run out of the trace, with their jvp."""
    torch._dynamo.reset()
    x, t = torch.randn(5), torch.randn(5)
    got = _tangent(torch.compile(lambda d: autograd.cast(d, torch.float16), backend="eager"), x, t)
    assert torch.equal(got, t.to(torch.float16))
    got = _tangent(torch.compile(lambda d: autograd.flatten([d], align=4), backend="eager"), x, t)
    assert torch.equal(got, _padded([t], 4))
