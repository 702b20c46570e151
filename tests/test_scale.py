"""unscale_ (fused unscale + inf/nan check), grad_norm and clip_grad_norm_: the kernels in the interpret tier (and
on CUDA with the `gpu` mark) against float64 math and torch, the public functions on both backends."""

import math

import pytest
import torch
from fused_ops.kernels import scale as scale_kernels

import fused_ops
from fused_ops import functional, reference
from tests.utils import no_host_reads

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy, in the interpreter

CHUNK, BLOCK = 64, 32
SIZES = [0, 1, 2, 13, 31, 32, 33, 64, 65, 97, 130]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]
BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference", "auto"]
GUARD = 5


def _guarded(n, dtype, device, fill=None):
    buf = torch.full((n + 2 * GUARD,), float("nan"), dtype=dtype, device=device)
    view = buf[GUARD : GUARD + n]
    if fill is not None:
        view.copy_(fill)
    return buf, view


def _check_guards(bufs):
    for b in bufs:
        assert torch.isnan(b[:GUARD]).all() and torch.isnan(b[-GUARD:]).all(), "kernel wrote outside a tensor"


def _same_bits(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


# -- unscale --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_kind", ["tensor", "float"])
def test_kernel_unscale_matches_torch_and_float64(device, dtype, scale_kind):
    bufs, grads = [], []
    for n in SIZES:
        buf, g = _guarded(n, dtype, device, 100 * torch.randn(n))
        bufs.append(buf)
        grads.append(g)
    inv = 1.0 / 1024.0 * 3.0  # not a power of two: the product rounds
    inv_arg = torch.tensor([inv], device=device) if scale_kind == "tensor" else inv
    expected_torch = [g.clone() for g in grads]
    torch._amp_foreach_non_finite_check_and_unscale_(expected_torch, torch.zeros(1, device=device),
                                                     torch.tensor([inv], device=device))  # fmt: skip
    expected64 = [g.double() * torch.tensor(inv, dtype=torch.float32).double() for g in grads]
    found_inf = torch.zeros(1, device=device)
    scale_kernels.unscale_launch(grads, inv_arg, found_inf, chunk_size=CHUNK, block_size=BLOCK, cache={})
    _check_guards(bufs)
    assert found_inf.item() == 0.0
    ulp = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    for g, e, e64 in zip(grads, expected_torch, expected64, strict=True):
        assert torch.equal(g, e), "bit-exact with torch's _amp_foreach_non_finite_check_and_unscale_"
        torch.testing.assert_close(g.double(), e64, rtol=ulp, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_unscale_out_writes_fp32_copies(device, dtype):
    """With ``out``: fp32 results in poisoned outputs, grads untouched."""
    grads = [torch.randn(n, device=device).to(dtype) for n in SIZES]
    before = [g.clone() for g in grads]
    bufs, outs = zip(*(_guarded(n, torch.float32, device) for n in SIZES), strict=True)
    found_inf = torch.zeros(1, device=device)
    scale_kernels.unscale_launch(grads, 0.125, found_inf, outs, chunk_size=CHUNK, block_size=BLOCK, cache={})
    _check_guards(bufs)
    for g, b, o in zip(grads, before, outs, strict=True):
        assert torch.equal(g, b)
        assert torch.equal(o, b.float() * 0.125)
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", [(1, 0), (9, 0), (10, 129), (10, 64)])
def test_kernel_unscale_sets_found_inf(device, dtype, bad, where):
    grads = [torch.randn(n, device=device).to(dtype) for n in SIZES]
    t, i = where
    grads[t][i] = float(bad)
    found_inf = torch.zeros(1, device=device)
    scale_kernels.unscale_launch(grads, torch.tensor([0.5], device=device), found_inf, chunk_size=CHUNK,
                                 block_size=BLOCK, cache={})  # fmt: skip
    assert found_inf.item() == 1.0
    # never cleared: a clean launch leaves a set flag set
    scale_kernels.unscale_launch([torch.ones(3, device=device)], 1.0, found_inf, cache={})
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_unscale_flags_overflow_on_narrowing(device):
    g = [torch.tensor([1.0, 6e4, -2.0], device=device)]
    out = [torch.empty(3, dtype=torch.float16, device=device)]
    found_inf = torch.zeros(1, device=device)
    scale_kernels.unscale_launch(g, 2.0, found_inf, out, cache={})  # 1.2e5 does not fit fp16
    assert found_inf.item() == 1.0 and torch.isinf(out[0][1])
    found_inf.zero_()
    scale_kernels.unscale_launch([torch.full((5,), 3e38, device=device)], 2.0, found_inf, cache={})
    assert found_inf.item() == 1.0


def test_kernel_unscale_rejects_bad_input():
    with pytest.raises(ValueError, match="grads\\[1\\]"):
        scale_kernels.unscale_launch([torch.zeros(3), torch.zeros(3, dtype=torch.float16)], 1.0, None, cache={})
    with pytest.raises(ValueError, match="out\\[0\\] has 4 elements"):
        scale_kernels.unscale_launch([torch.zeros(3)], 1.0, None, [torch.zeros(4)], cache={})
    with pytest.raises(ValueError, match="found_inf must be a 1-element"):
        scale_kernels.unscale_launch([torch.zeros(3)], 1.0, torch.zeros(2), cache={})


# -- norm -------------------------------------------------------------------------------------------------------


def _norm64(tensors, p):
    if not tensors:
        return torch.tensor(0.0, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]), p)


NORMS = [2.0, 1.0, 3.5, math.inf]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
def test_kernel_norm_matches_float64(device, dtype, p, monkeypatch):
    tensors = [(torch.randn(n, device=device) * 10 ** torch.randint(-3, 3, ()).item()).to(dtype) for n in SIZES]
    launches = []
    real = scale_kernels._norm_partials_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(scale_kernels, "_norm_partials_kernel", Counting())
    got = scale_kernels.norm_launch(tensors, p, chunk_size=CHUNK, block_size=BLOCK, cache={})
    # one launch; a general p two (the inf norm first: the elements are divided by it before the power)
    assert launches == [(sum(math.ceil(n / CHUNK) for n in SIZES),)] * (1 if p in (1.0, 2.0, math.inf) else 2)
    assert got.dtype == torch.float32 and got.shape == () and got.device.type == device
    # (the float64 value rounded once: within half a float32 ulp, and the rtol of 1 ulp leaves room for the float64
    # sums' order; general p too, since its log2/exp2 are float64: it was 2e-5, float32's log2 times p, before)
    torch.testing.assert_close(got.double().cpu(), _norm64(tensors, p).cpu(), rtol=2**-23, atol=0)
    again = scale_kernels.norm_launch(tensors, p, chunk_size=CHUNK, block_size=BLOCK, cache={})
    assert torch.equal(got, again), "deterministic: same inputs, same bits"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", NORMS)
def test_kernel_norm_propagates_inf_and_nan(device, p):
    tensors = [torch.randn(n, device=device) for n in (5, 70, 3)]
    tensors[1][66] = float("inf")
    got = scale_kernels.norm_launch(tensors, p, chunk_size=CHUNK, block_size=BLOCK, cache={})
    assert torch.isinf(got)
    tensors[2][1] = float("nan")
    got = scale_kernels.norm_launch(tensors, p, chunk_size=CHUNK, block_size=BLOCK, cache={})
    assert torch.isnan(got), "nan wins over inf, as in torch.linalg.vector_norm"
    empty = scale_kernels.norm_launch([torch.zeros(0, device=device)], p, cache={})
    assert empty.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1e15, 1e19, 1e300])
def test_kernel_norm_of_a_huge_p_is_the_largest_element(device, p):
    """For a huge finite p the norm is max |x| (the limit, as reference.grad_norm gives it): the largest element
    scaled by max |x| must be exactly 1. It was |x| times a rounded 1 / max, 1 - 2^-53 for 49, whose 1e19-th power
    is 0: the norm came out 0 (and clip_grad_norm_ skipped clipping)."""
    tensors = [torch.tensor([49.0, -1.0, 0.5], device=device), torch.rand(1031, device=device)]
    got = scale_kernels.norm_launch(tensors, p, chunk_size=CHUNK, block_size=BLOCK, cache={})
    assert got.item() == 49.0
    assert fused_ops.grad_norm(tensors, p, backend="reference").item() == 49.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", NORMS)
def test_grad_norm_matches_vector_norm(backend, p):
    tensors = [torch.randn(s).to(dt) for s, dt in zip([(3, 4), (0,), (97,), (), (2, 5, 7)], DTYPES * 2, strict=False)]
    got = fused_ops.grad_norm(tensors, p, backend=backend)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), _norm64(tensors, p), rtol=2e-5, atol=0)
    expected = torch.linalg.vector_norm(torch.cat([t.float().flatten() for t in tensors]), p)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=0)
    assert torch.equal(got, fused_ops.grad_norm(tensors, p, backend=backend))


def test_grad_norm_float64_and_empty():
    x = [torch.randn(9, dtype=torch.float64), torch.randn(4)]
    got = fused_ops.grad_norm(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _norm64(x, 2.0))
    assert fused_ops.grad_norm([]).item() == 0.0
    for p in (0, -1, float("nan"), -math.inf):
        with pytest.raises(ValueError, match="norm_type"):
            fused_ops.grad_norm(x, p)
    with pytest.raises(TypeError, match="tensors\\[1\\] must be a floating-point"):
        fused_ops.grad_norm([x[0], torch.zeros(3, dtype=torch.int64)])


# -- clip -------------------------------------------------------------------------------------------------------


def _params(shapes, dtype=torch.float32, scale=1.0):
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s).to(dtype))
        p.grad = (scale * torch.randn(s)).to(dtype)
        params.append(p)
    return params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(backend, p, max_norm):
    shapes = [(5, 3), (1,), (67,), (0,), (4, 4, 2)]
    ours = _params(shapes)
    theirs = [torch.nn.Parameter(q.detach().clone()) for q in ours]
    for q, t in zip(ours, theirs, strict=True):
        t.grad = q.grad.clone()
    ours.append(torch.nn.Parameter(torch.randn(3)))  # no grad: skipped
    norm = fused_ops.clip_grad_norm_(ours, max_norm, p, backend=backend)
    # torch refuses the inf norm of an empty grad; ours treats it as 0 (the empty grad changes nothing)
    expected = torch.nn.utils.clip_grad_norm_([t for t in theirs if t.numel()], max_norm, p)
    torch.testing.assert_close(norm, expected, rtol=2e-6, atol=0)
    for q, t in zip(ours, theirs, strict=False):
        torch.testing.assert_close(q.grad, t.grad, rtol=4e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clip_grad_norm_low_precision(backend, dtype):
    """bf16/fp16 grads: the norm is fp32 (torch's is in the grads' dtype); grads scaled within half an ulp."""
    params = _params([(33,), (7, 5)], dtype, scale=3.0)
    grads64 = [q.grad.double() for q in params]
    total64 = _norm64(grads64, 2.0)
    norm = fused_ops.clip_grad_norm_(params, 1.0, backend=backend)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), total64, rtol=1e-6, atol=0)
    coef = min(1.0, 1.0 / (total64.item() + 1e-6))
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    for q, g64 in zip(params, grads64, strict=True):
        torch.testing.assert_close(q.grad.double(), g64 * coef, rtol=ulp, atol=1e-6)


def test_clip_grad_norm_errors_and_edge_cases():
    params = _params([(4,), (3,)])
    before = [q.grad.clone() for q in params]
    with pytest.raises(ValueError, match="max_norm must be a number"):
        fused_ops.clip_grad_norm_(params, math.nan)
    with pytest.raises(ValueError, match="norm_type"):
        fused_ops.clip_grad_norm_(params, 1.0, 0.0)
    assert all(torch.equal(q.grad, b) for q, b in zip(params, before, strict=True)), "nothing modified"
    params[1].grad[0] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        fused_ops.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert torch.isinf(fused_ops.clip_grad_norm_(params, 1.0))
    assert fused_ops.clip_grad_norm_([torch.nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0
    single = torch.nn.Parameter(torch.ones(4))
    single.grad = torch.full((4,), 2.0)
    torch.testing.assert_close(fused_ops.clip_grad_norm_(single, 1.0), torch.tensor(4.0))
    torch.testing.assert_close(single.grad, torch.full((4,), 0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_public_groups_and_validation(backend):
    grads = [torch.randn(n).to(dt) for n, dt in zip(SIZES, DTYPES * 4, strict=False)]
    expected = [(g.float() * 0.25).to(g.dtype) for g in grads]
    found_inf = torch.zeros(1)
    fused_ops.unscale_(grads, torch.tensor(0.25), found_inf, backend=backend)
    assert found_inf.item() == 0.0
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(g, e)
    outs = [torch.full(g.shape, float("nan")) for g in grads]
    grads[3][0] = float("nan")
    fused_ops.unscale_(grads, 2.0, found_inf, out=outs, backend=backend)
    assert found_inf.item() == 1.0
    for g, o in zip(grads, outs, strict=True):
        assert _same_bits(o, g.float() * 2.0)

    strided = torch.randn(4, 3).t()  # a non-contiguous grad is fine when the results go to out
    o = torch.empty(3, 4)
    fused_ops.unscale_([strided], 0.5, None, out=[o], backend=backend)
    assert torch.equal(o, strided * 0.5)

    g = [torch.ones(3)]
    with pytest.raises(TypeError, match="inv_scale must be a 1-element"):
        fused_ops.unscale_(g, torch.ones(2), found_inf)
    with pytest.raises(ValueError, match="inv_scale must be finite"):
        fused_ops.unscale_(g, math.inf, found_inf)
    with pytest.raises(TypeError, match="found_inf must be a 1-element"):
        fused_ops.unscale_(g, 1.0, torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="out has 2 tensors"):
        fused_ops.unscale_(g, 1.0, None, out=[torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match="out\\[0\\] is \\(4,\\)"):
        fused_ops.unscale_(g, 1.0, None, out=[torch.ones(4)])
    strided = torch.randn(4, 3).t()  # updated in place through a contiguous copy, as torch's unscale takes it
    expected = strided * 0.5
    fused_ops.unscale_([strided], 0.5, None, backend=backend)
    assert torch.equal(strided, expected) and strided.stride() == (1, 3)
    with pytest.raises(ValueError, match="grads\\[0\\] has elements that share memory"):
        fused_ops.unscale_([torch.ones(1).expand(3)], 1.0, None)
    assert torch.equal(g[0], torch.ones(3))


def test_no_host_reads_reference(monkeypatch):
    """unscale_, grad_norm and clip_grad_norm_ never read a device value on the host (a sync on a GPU). The
    CPU path is checked here; the Triton path under the interpreter reads tensors through numpy by design,
    so it is checked on CUDA with torch's sync debug mode (test_no_host_sync_cuda)."""
    params = _params([(5,), (40,)])
    grads = [q.grad for q in params]
    found_inf = torch.zeros(1)
    with no_host_reads(monkeypatch):
        fused_ops.unscale_(grads, torch.tensor(0.5), found_inf, backend="reference")
        fused_ops.grad_norm(grads, backend="reference")
        fused_ops.grad_norm(grads, math.inf, backend="reference")
        fused_ops.clip_grad_norm_(params, 0.1, backend="reference")


@pytest.mark.gpu
def test_no_host_sync_cuda():
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (5, 4000, 70000)]
    for q in params:
        q.grad = torch.randn_like(q)
    found_inf = torch.zeros(1, device="cuda")
    scale = torch.tensor([0.5], device="cuda")
    fused_ops.clip_grad_norm_(params, 1.0)  # compile and build the tables first
    fused_ops.unscale_([q.grad for q in params], scale, found_inf)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_ops.unscale_([q.grad for q in params], scale, found_inf)
        fused_ops.grad_norm([q.grad for q in params])
        fused_ops.clip_grad_norm_(params, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    grads = [torch.randn(n, device=device) for n in (3, 0, 70)]
    outs = [torch.empty(n, dtype=torch.bfloat16, device=device) for n in (3, 0, 70)]
    found_inf = torch.zeros(1, device=device)
    inv = torch.tensor([0.5], device=device)
    op = torch.ops.fused_ops
    torch.library.opcheck(op.unscale_.default, ([g.clone() for g in grads], inv, 0.0, found_inf, [], "triton"))
    torch.library.opcheck(op.unscale_.default, (grads, None, 0.25, found_inf, outs, "triton"))
    torch.library.opcheck(op.grad_norm.default, (grads, 2.0, "triton"))
    torch.library.opcheck(op.grad_norm.default, (grads, math.inf, "triton"))


def test_opcheck_reference():
    grads = [torch.randn(n) for n in (3, 0, 70)]
    op = torch.ops.fused_ops
    torch.library.opcheck(op.unscale_.default, (grads, torch.tensor([0.5]), 0.0, torch.zeros(1), [], "reference"))
    torch.library.opcheck(op.grad_norm.default, (grads, 2.0, "reference"))


def test_reference_unscale_is_float64_capable():
    g = [torch.randn(5, dtype=torch.float64)]
    expected = g[0] * 0.1
    reference.unscale_(g, 0.1, None)
    assert torch.equal(g[0], expected)
    assert functional.clip_coef(torch.tensor(4.0), 1.0).item() == pytest.approx(1.0 / (4.0 + 1e-6))


# -- issue 9, part 4/5: scalar tensors and max_norm=inf ----------------------------------------------------------

TWO_BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]


@pytest.mark.parametrize("backend", TWO_BACKENDS)
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("bad", [False, True])
def test_unscale_0d_found_inf_as_torch(backend, with_out, bad):
    """A 0-d float found_inf is a 1-element tensor, as torch's GradScaler takes it: unscaled and flagged like a
    (1,) one (the reference path used to unscale, then raise on the 0-d flag)."""
    grads = [torch.randn(5), torch.randn(33)]
    if bad:
        grads[1][3] = float("inf")
    expected = [g * 0.5 for g in grads]
    outs = [torch.empty_like(g) for g in grads] if with_out else None
    found_inf = torch.zeros(())
    fused_ops.unscale_(grads, torch.tensor(0.5), found_inf, out=outs, backend=backend)
    assert found_inf.shape == () and found_inf.item() == float(bad)
    for r, e in zip(outs or grads, expected, strict=True):
        assert _same_bits(r, e)
    # torch's own kernel agrees on the 0-d flag
    ref_grads, ref_found = [e / 0.5 for e in expected], torch.zeros(())
    torch._amp_foreach_non_finite_check_and_unscale_(ref_grads, ref_found, torch.tensor(0.5))
    assert ref_found.item() == found_inf.item()


@pytest.mark.parametrize("backend", TWO_BACKENDS)
@pytest.mark.parametrize("name", ["inv_scale", "found_inf"])
@pytest.mark.parametrize("bad", ["2-element", "0-element", "int", "bool"])
def test_unscale_refuses_bad_scalar_tensors(backend, name, bad):
    """2-element scalars used to be read at element 0 by the kernel: refused before anything changes, on both
    backends, naming the argument."""
    from tests.safety import expect_error_unchanged

    make = {
        "2-element": lambda: torch.tensor([0.5, 0.5]),
        "0-element": lambda: torch.zeros(0),
        "int": lambda: torch.ones(1, dtype=torch.int32),
        "bool": lambda: torch.zeros(1, dtype=torch.bool),
    }
    grads = [torch.randn(5), torch.randn(40)]
    inv_scale, found_inf = torch.tensor([0.5]), torch.zeros(1)
    if name == "inv_scale":
        inv_scale = make[bad]()
    else:
        found_inf = make[bad]()
    expect_error_unchanged(lambda: fused_ops.unscale_(grads, inv_scale, found_inf, backend=backend), TypeError,
                           f"^unscale_: {name} must be a 1-element floating-point tensor", grads, inv_scale,
                           found_inf)  # fmt: skip


@pytest.mark.parametrize("backend", TWO_BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_grad_norm_max_norm_inf_is_norm_only_as_torch(backend, norm_type):
    """max_norm=inf is torch's "norm only" idiom: the norm is returned and the grads multiplied by 1."""
    ours, theirs = _params([(5,), (3, 7), (40,)]), _params([(5,), (3, 7), (40,)])
    for a, b in zip(ours, theirs, strict=True):
        b.grad.copy_(a.grad)
    norm = fused_ops.clip_grad_norm_(ours, math.inf, norm_type, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(theirs, math.inf, norm_type)
    torch.testing.assert_close(norm, expected)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_clip_grad_norm_max_norm_inf_with_an_inf_grad_as_torch(backend):
    """With an inf grad, torch's coefficient is inf / inf = nan: every grad becomes nan. Same here."""
    ours, theirs = _params([(5,), (4,)]), _params([(5,), (4,)])
    for a, b in zip(ours, theirs, strict=True):
        a.grad[0] = b.grad[0] = float("inf")
    norm = fused_ops.clip_grad_norm_(ours, math.inf, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(theirs, math.inf)
    assert torch.equal(norm, expected)
    for a, b in zip(ours, theirs, strict=True):
        assert _same_bits(a.grad, b.grad)


def test_clip_coef_and_max_norm_values():
    """clip_coef takes what torch's clip takes (inf, negative), refuses nan; the total norm is one element."""
    norm = torch.tensor(4.0)
    assert functional.clip_coef(norm, math.inf).item() == 1.0
    assert functional.clip_coef(norm, -2.0).item() == pytest.approx(-2.0 / (4.0 + 1e-6))
    with pytest.raises(ValueError, match="^clip_coef: max_norm must be a number, got nan"):
        functional.clip_coef(norm, math.nan)
    with pytest.raises(TypeError, match="^clip_coef: total_norm must be a 1-element floating-point tensor"):
        functional.clip_coef(torch.tensor([4.0, 1.0]), 1.0)
    params = _params([(4,)])
    before = params[0].grad.clone()
    with pytest.raises(ValueError, match="^clip_grad_norm_: max_norm must be a number, got nan"):
        fused_ops.clip_grad_norm_(params, math.nan)
    assert torch.equal(params[0].grad, before)


@pytest.mark.interpret
@pytest.mark.parametrize("with_out", [False, True])
def test_kernel_unscale_checks_every_call_after_a_cached_one(with_out):
    """After a valid call, a tensor at a cached address that is shorter, strided or of another dtype raises (or is
    handled) and nothing is written; the scalars are checked at every launch."""
    from tests.safety import expect_error_unchanged

    base = torch.randn(256)
    out = [torch.empty(64)] if with_out else None
    cache = {}
    scale_kernels.unscale_launch([base[:64]], 0.5, torch.zeros(1), out, cache=cache)
    name = "grads"
    for bad, exc, match in [
        (base[::2][:64], ValueError, f"{name}\\[0\\] must be contiguous"),
        (base[:64].view(torch.int32), TypeError, f"{name}\\[0\\] must be float32, bfloat16 or float16"),
    ]:
        expect_error_unchanged(
            lambda bad=bad: scale_kernels.unscale_launch([bad], 0.5, torch.zeros(1), out, cache=cache),  # fmt: skip
            exc,
            f"^unscale_launch: {match}",
            base,
            out,
        )
    for scalar, bad in [
        ("inv_scale", torch.ones(2)),
        ("inv_scale", torch.ones(1, device="meta")),
        ("found_inf", torch.zeros(1, dtype=torch.int32)),
        ("found_inf", torch.zeros(1, 1, 2)),
    ]:
        args = (torch.ones(1), torch.zeros(1))
        args = (bad, args[1]) if scalar == "inv_scale" else (args[0], bad)
        expect_error_unchanged(lambda args=args: scale_kernels.unscale_launch([base[:64]], *args, out, cache=cache),
                               ValueError, f"^unscale_launch: {scalar} must be a 1-element floating-point tensor",
                               base, out)  # fmt: skip


@pytest.mark.interpret
def test_kernel_norm_checks_every_call_after_a_cached_one():
    base = torch.randn(256)
    cache = {}
    scale_kernels.norm_launch([base[:64]], cache=cache)
    with pytest.raises(ValueError, match="^norm_launch: tensors\\[0\\] must be contiguous"):
        scale_kernels.norm_launch([base[::2][:64]], cache=cache)
    with pytest.raises(TypeError, match="^norm_launch: tensors\\[0\\] must be float32, bfloat16 or float16"):
        scale_kernels.norm_launch([base[:64].view(torch.int32)], cache=cache)


@pytest.mark.gpu
def test_unscale_graph_replays_survive_300_other_layouts_between_replays():
    """A captured unscale_ reads its own chunk table at every replay: 300 eager calls on other layouts between
    replays (which churn the shared table cache) never free or rewrite it."""
    grads = [torch.randn(n, device="cuda") for n in (7, 4097, 70_000)]
    found_inf = torch.zeros(1, device="cuda")
    inv = torch.tensor([0.5], device="cuda")
    fused_ops.unscale_(grads, inv, found_inf)  # warm-up: the table is built eagerly
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_ops.unscale_(grads, inv, found_inf)
    for _ in range(2):
        start = [g.clone() for g in grads]
        for k in range(300):
            others = [torch.randn(k % 13 + n, device="cuda") for n in (1, 31)]
            fused_ops.unscale_(others, 2.0, None)
            fused_ops.grad_norm(others)
        graph.replay()
        torch.cuda.synchronize()
        for g, s in zip(grads, start, strict=True):
            assert torch.equal(g, s * 0.5)
    assert found_inf.item() == 0.0


@pytest.mark.parametrize(("chunk", "block"), [(64, 8), (64, 48), (96, 64), (64, 0)])
def test_kernel_norm_refuses_a_block_it_cannot_split(chunk, block):
    # (a general p works on a quarter block at a time: 8 would be a range of 2, 48 no power of two, 64 not a divisor
    # of 96: a named error before any launch, not Triton's)
    with pytest.raises(ValueError, match="norm_launch: block_size must be a power of two >= 16"):
        scale_kernels.norm_launch([torch.ones(5)], 3.0, chunk_size=chunk, block_size=block, cache={})
