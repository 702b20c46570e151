"""Safety regressions of the non-optimizer API (third file): the prepared launches called directly refuse a scalar
inside what they write, clip_grad_norm_ checks every grad before scaling any and scales under no_grad as torch does,
the overlap test of expanded views, the general-p norm in float64 on both backends, found_inf set to exactly 1 as
torch sets it, the fake kernels' results and errors equal to the eager ones, and a flatten buffer past int64 refused.
Each case failed before its fix."""

from __future__ import annotations

import math

import pytest
import torch

from fused_ops import functional
from tests.safety import expect_error_unchanged

pytestmark = [pytest.mark.safety]

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]
NAN = float("nan")


# -- 1. the prepared launches called directly: no lr / grad_scale / found_inf inside a tensor they write -------------
N = 32


def _launcher(kind: str):
    """A prepared launch of ``kind`` over two tensors of N elements, NaN grads (any launch would write NaN or move a
    step count), the kwargs of a direct call, and the written tensors by name."""
    from fused_ops.kernels.adam import AdamStep
    from fused_ops.kernels.adam_lowbit import AdamLowbitStep
    from fused_ops.kernels.lion import LionStep
    from fused_ops.kernels.sgd import SGDStep

    params = [torch.randn(N), torch.randn(N)]
    params[1][3] = 0.0  # (read as found_inf: 0, so an unchecked launch steps)
    grads = [torch.full((N,), NAN), torch.full((N,), NAN)]
    adam_kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
    if kind == "SGDStep":
        bufs = [torch.zeros(N), torch.zeros(N)]
        step = SGDStep(params, grads, bufs, chunk_size=16, block_size=16)
        kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                  first_step=True)  # fmt: skip
        return step, kw, {"params": params, "momentum_buffers": bufs}, grads
    if kind == "AdamStep":
        m, v = [torch.zeros(N), torch.zeros(N)], [torch.zeros(N), torch.zeros(N)]
        steps = [torch.zeros(()), torch.zeros(())]
        step = AdamStep(params, grads, m, v, [], steps, amsgrad=False, chunk_size=16, block_size=16)
        return step, adam_kw, {"params": params, "exp_avg_sqs": v, "state_steps": steps}, grads
    if kind == "LionStep":
        m = [torch.zeros(N), torch.zeros(N)]
        step = LionStep(params, grads, m, chunk_size=16, block_size=16)
        kw = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False)
        return step, kw, {"params": params, "exp_avgs": m}, grads
    codes = [torch.zeros(N, dtype=torch.uint8) for _ in range(4)]
    steps, scales = [torch.zeros(()), torch.zeros(())], [torch.zeros(1) for _ in range(4)]
    step = AdamLowbitStep(params, grads, codes[:2], codes[2:], steps, exp_avg_scales=scales[:2],
                          exp_avg_sq_scales=scales[2:], state="int8")  # fmt: skip
    return step, adam_kw, {"params": params, "state_steps": steps, "exp_avg_scales": scales[:2]}, grads


KINDS = ["SGDStep", "AdamStep", "LionStep", "AdamLowbitStep"]


@pytest.mark.interpret
@pytest.mark.parametrize("scalar", ["lr", "grad_scale", "found_inf"])
@pytest.mark.parametrize("kind", KINDS)
def test_prepared_launch_refuses_a_scalar_inside_what_it_writes(kind, scalar):
    """Before, a direct call launched with lr = params[1][3:4] (or found_inf inside a state, a step count as lr): every
    program read it while program 1 wrote it (params[1] stepped with another lr; on a GPU a race)."""
    step, kw, written, grads = _launcher(kind)
    for role, tensors in written.items():
        x = tensors[1].reshape(-1)[3:4] if tensors[1].numel() > 1 else tensors[1]
        call = dict(kw, **{scalar: x})
        match = f"{role}\\[1\\] and {scalar} share memory"
        err = expect_error_unchanged(lambda call=call: step(**call), ValueError, match, step, written, grads)
        assert type(step).__name__ in str(err)


@pytest.mark.interpret
@pytest.mark.parametrize("kind", KINDS)
def test_prepared_launch_takes_scalars_elsewhere(kind):
    """The check refuses only overlap: scalars of their own, or inside a grad (only read), launch as before."""
    step, kw, written, grads = _launcher(kind)
    for g in grads:
        g.zero_()
    step(**dict(kw, lr=torch.tensor([0.1]), grad_scale=grads[1][:1] + 1.0, found_inf=grads[0][5:6]))


# -- 2. and 6. clip_grad_norm_ -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_refuses_an_expanded_grad_before_scaling_any(backend):
    """Before, the non-contiguous a.grad was scaled, then torch's _foreach_mul_ raised a bare RuntimeError on the
    expanded b.grad (unscale_ and cast_ name the same layout)."""
    a = torch.nn.Parameter(torch.zeros(3, 4))
    a.grad = (torch.randn(4, 3) * 10).t()
    b = torch.nn.Parameter(torch.zeros(3, 4))
    b.grad = torch.randn(1, 4).expand(3, 4)
    expect_error_unchanged(lambda: functional.clip_grad_norm_([a, b], 1.0, backend=backend), ValueError,
                           "clip_grad_norm_: grads\\[1\\] has elements that share memory", a, b)  # fmt: skip
    c = torch.nn.Parameter(torch.zeros(3, 4))
    c.grad = torch.randn(1, 4).expand(3, 4)
    expect_error_unchanged(lambda: functional.clip_grad_norm_(c, 1.0, backend=backend), ValueError,
                           "clip_grad_norm_: grads\\[0\\] has elements that share memory", c)  # fmt: skip


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_scales_a_grad_that_requires_grad_as_torch(backend, contiguous):
    """Before, a non-contiguous grad that requires grad (a view of a leaf) raised autograd's in-place error where
    torch's clip_grad_norm_ (run under no_grad) clips it."""

    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.zeros(3, 4))
        g = (torch.randn(4, 3) * 10).requires_grad_()
        p.grad = g.t().contiguous() if contiguous else g.t()
        return p

    ours, theirs = make(), make()
    norm = functional.clip_grad_norm_([ours], 1.0, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=0)
    assert ours.grad.requires_grad and ours.grad.stride() == theirs.grad.stride()


# -- 3. expanded (stride 0) views in the overlap test ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_expanded_source_overlapping_a_written_tensor_is_named(backend):
    """Before, the overlap test divided by the zero stride: a bare ZeroDivisionError."""
    base = torch.arange(4.0)
    e = base.expand(3, 4)  # stride (0, 1): read
    w = base.as_strided((1, 4), (0, 1))  # the same bytes, written
    dst0, one = torch.full((3, 4), NAN), torch.ones(1, 4)
    expect_error_unchanged(lambda: functional.cast_([dst0, w], [e, one], backend=backend), ValueError,
                           "cast_: dst\\[1\\] and src\\[0\\] share memory", base, dst0, one)  # fmt: skip
    expect_error_unchanged(lambda: functional.unscale_([e, one], 2.0, out=[dst0, w], backend=backend), ValueError,
                           "unscale_: grads\\[0\\] and out\\[1\\] share memory", base, dst0, one)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_expanded_source_interleaved_with_a_written_view_is_taken(backend):
    """The even elements expanded (read) and the odd ones (written) share no element: written as torch writes them
    (before: ZeroDivisionError)."""
    base = torch.arange(8.0)
    e = base.as_strided((3, 4), (0, 2), 0)  # base[0::2], three times
    w = base.as_strided((1, 4), (0, 2), 1)  # base[1::2]
    dst0 = torch.full((3, 4), NAN)
    functional.cast_([dst0, w], [e, torch.full((1, 4), -1.0)], backend=backend)
    assert torch.equal(base, torch.tensor([0.0, -1, 2, -1, 4, -1, 6, -1]))
    assert torch.equal(dst0, torch.tensor([0.0, 2, 4, 6]).expand(3, 4))


def test_interleaved_takes_stride_zero():
    from fused_ops._validate import _interleaved

    base = torch.arange(8.0)
    assert not _interleaved(base.expand(3, 8), base.as_strided((1, 8), (0, 1)))  # they share: not disjoint
    assert _interleaved(base.as_strided((3, 4), (0, 2), 0), base.as_strided((1, 4), (0, 2), 1))
    assert not _interleaved(base[:1].expand(4), base[:1].expand(2))


# -- 4. the general-p norm: the float64 value, no overflow ---------------------------------------------------------
def _scaled64(xs, p):
    """The p-norm in float64 with the elements divided by their max first (no overflow; where torch's float64 does
    not overflow this is its value to an fp64 ulp or so)."""
    x = torch.cat([t.double().flatten() for t in xs])
    m = x.abs().max()
    return (torch.linalg.vector_norm(x / m, p) * m).float() if m > 0 else torch.tensor(0.0)


GENERAL_P = [
    ([torch.tensor([1e30])], 3.0),
    ([torch.tensor([1e30])], 0.5),
    ([torch.tensor([1e30])], 7.5),
    ([torch.tensor([7.0e20, -3.3e19, 1e15])], 3.0),
    ([torch.tensor([1e30])], 100.0),
    ([torch.tensor([1e30, 1e30])], 100.0),  # torch's float64 sum of p-th powers: inf
    ([torch.tensor([1e-30, 1e-30, 3e-31])], 20.0),  # its float64 sum underflows: 0
    ([torch.tensor([1e30, 2.0]), torch.tensor([1e30, -3.0], dtype=torch.bfloat16)], 100.0),  # two groups
    ([torch.tensor([3.0, 1e-40, -2.5]), torch.tensor([0.25] * 40, dtype=torch.float16)], 0.1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(GENERAL_P)))
def test_general_p_norm_is_the_float64_value(backend, case):
    """Before, Triton took log2 in float32 (11-15 float32 ulp off) and overflowed for [1e30] with p = 100 (inf where
    torch and the reference give 1e30)."""
    xs, p = GENERAL_P[case]
    got = functional.grad_norm(xs, p, backend=backend)
    want = _scaled64(xs, p)
    assert got.dtype == torch.float32 and got.shape == ()
    assert torch.equal(got, want), (got.item(), want.item())
    x64 = torch.cat([t.double().flatten() for t in xs])
    torch_value = torch.linalg.vector_norm(x64, p)
    if torch.isfinite(torch_value) and torch_value > 0:
        assert torch.equal(got, torch_value.float()), (got.item(), torch_value.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.5, 3.0, 7.5])
def test_general_p_norm_of_random_tensors(backend, p):
    xs = [(torch.randn(n) * 10.0 ** torch.randint(-20, 20, ()).item()).to(dt)
          for n, dt in ((70, torch.float32), (3, torch.float32), (129, torch.float32))]  # fmt: skip
    got = functional.grad_norm(xs, p, backend=backend)
    want = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in xs]), p)
    torch.testing.assert_close(got.double(), want, rtol=2**-24 * 1.01, atol=0)  # the float64 value rounded once


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.5, 3.0, 100.0])
def test_general_p_norm_of_zeros_inf_and_nan(backend, p):
    assert functional.grad_norm([torch.zeros(5), torch.zeros(3)], p, backend=backend).item() == 0.0
    assert functional.grad_norm([torch.tensor([1.0, math.inf]), torch.ones(3)], p, backend=backend).item() == math.inf
    assert math.isnan(functional.grad_norm([torch.tensor([NAN, math.inf, 1.0])], p, backend=backend).item())


# -- 5. found_inf is set to exactly 1, as torch sets it ------------------------------------------------------------
@pytest.mark.parametrize("out", [False, True])
@pytest.mark.parametrize("init", [5.0, NAN, -2.0, 0.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_is_set_to_one_as_torch(backend, init, out):
    """Before, the reference stored max(found_inf, 1): 5 stayed 5, NaN stayed NaN (torch and Triton store 1.0)."""
    g_torch, flag_torch = torch.tensor([math.inf, 1.0]), torch.full((1,), init)
    torch._amp_foreach_non_finite_check_and_unscale_([g_torch], flag_torch, torch.tensor([1.0]))
    g, flag = torch.tensor([math.inf, 1.0]), torch.full((1,), init)
    functional.unscale_([g], 1.0, flag, out=[torch.empty(2)] if out else None, backend=backend)
    assert flag.item() == 1.0 == flag_torch.item()
    # nothing found: left as it is (NaN too), as torch leaves it
    g, flag = torch.tensor([2.0, 1.0]), torch.full((), init)
    before = flag.clone()
    functional.unscale_([g], 0.5, flag, out=[torch.empty(2)] if out else None, backend=backend)
    assert torch.equal(flag.view(torch.int32), before.view(torch.int32))


# -- 7. the fake kernels give the eager results and errors -----------------------------------------------------------
def test_fake_grad_norm_and_flatten_agree_with_eager():
    """Before, grad_norm([]) traced raised IndexError (eager: tensor(0.)), flatten(align=0) a ZeroDivisionError (eager:
    a named ValueError)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.fused_ops
    assert ops.grad_norm([], 2.0, "reference").item() == 0.0
    with FakeTensorMode():
        out = ops.grad_norm([], 2.0, "reference")
        assert out.shape == () and out.dtype == torch.float32 and out.device.type == "cpu"
        with pytest.raises(ValueError, match="fused_ops::grad_norm: norm_type must be inf or a number > 0"):
            ops.grad_norm([torch.empty(3)], 0.0, "reference")
        with pytest.raises(ValueError, match="fused_ops::flatten: align must be a positive int, got 0"):
            ops.flatten([torch.empty(3)], 0, "reference")
        with pytest.raises(ValueError, match="fused_ops::flatten: tensors is empty"):
            ops.flatten([], 8, "reference")
    with pytest.raises(ValueError, match="fused_ops::flatten: align must be a positive int, got 0"):
        ops.flatten([torch.randn(3)], 0, "reference")
    compiled = torch.compile(lambda: ops.grad_norm([], 2.0, "reference"), backend="eager", fullgraph=True)
    assert compiled().item() == 0.0


# -- 8. a flatten buffer larger than int64 can describe ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_flatten_refuses_a_buffer_past_int64(backend):
    """Before: torch's bare "Storage size calculation overflowed" RuntimeError (align 2**62) or an overflow TypeError
    (2**64)."""
    x = torch.randn(3)
    for align in (2**62, 2**64):
        expect_error_unchanged(lambda align=align: functional.flatten([x], align, backend=backend), ValueError,
                               f"flatten: align={align} pads the buffer to", x)  # fmt: skip
    expect_error_unchanged(lambda: torch.ops.fused_ops.flatten([x], 2**62, backend), ValueError,
                           "fused_ops::flatten: align=4611686018427387904 pads the buffer", x)  # fmt: skip
    assert functional.flatten([x], 2**20, backend=backend).shape == (2**20,)  # (a large align that fits: taken)
