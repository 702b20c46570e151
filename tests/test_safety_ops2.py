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


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_refuses_an_inv_scale_past_float32(backend):
    """Before, 1e39 passed the finite check: Triton made every grad inf, the reference raised torch's RuntimeError
    naming nothing."""
    g = torch.ones(64)
    flag = torch.zeros(1)
    expect_error_unchanged(lambda: fused_ops.unscale_([g], 1e39, flag, backend=backend), ValueError,
                           "unscale_: inv_scale must be finite in float32", g, flag)  # fmt: skip


# -- the prepared launches and the launchers called directly: no written tensor may share memory ------------------
N = 256


def _adam_step(params, grads, exp_avgs, steps=None):
    from fused_ops.kernels.adam import AdamStep

    steps = steps if steps is not None else [torch.zeros(()) for _ in params]
    return AdamStep(params, grads, exp_avgs, [torch.zeros(p.numel()) for p in params], [], steps, amsgrad=False)


def _prepared_cases():
    from fused_ops.kernels.adam import adam_launch
    from fused_ops.kernels.adam_lowbit import AdamLowbitStep
    from fused_ops.kernels.lion import LionStep
    from fused_ops.kernels.sgd import SGDStep, sgd_launch

    def lowbit(p, g, m, v):
        return AdamLowbitStep([p], [g], [m], [v], [torch.zeros(())],
                              exp_avg_scales=[torch.zeros(1)], exp_avg_sq_scales=[torch.zeros(1)], state="int8",
                              amsgrad=False)  # fmt: skip

    big = torch.randn(4 * N)
    p, g, shared_step = torch.randn(N), torch.randn(N), torch.zeros(())
    u8 = torch.zeros(2 * N, dtype=torch.uint8)
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
    return {
        "AdamStep exp_avgs=[param]": (lambda: _adam_step([p], [g], [p]), (p, g), "exp_avgs\\[0\\]"),
        "AdamStep grads=params": (lambda: _adam_step([p], [p], [torch.zeros(N)]), (p,), "grads\\[0\\]"),
        "AdamStep states partly overlapping": (lambda: _adam_step([big[:N]], [g], [big[N // 2 : N // 2 + N]]),
                                               (big, g), "share memory"),
        "AdamStep one step count for two params": (
            lambda: _adam_step([torch.randn(N), torch.randn(N)], [torch.randn(N), torch.randn(N)],
                               [torch.zeros(N), torch.zeros(N)], [shared_step, shared_step]),
            (shared_step,), "state_steps\\[0\\] and state_steps\\[1\\]"),
        "AdamLowbitStep codes overlapping": (lambda: lowbit(torch.randn(N), g, u8[:N], u8[N // 2 : N // 2 + N]), (u8,),
                                             "exp_avg_sqs\\[0\\]"),
        "SGDStep grads=params": (lambda: SGDStep([p], [p], [torch.zeros(N)]), (p,), "grads\\[0\\]"),
        "LionStep exp_avg overlapping param": (lambda: LionStep([big[:N]], [g], [big[N // 2 : N // 2 + N]]), (big,),
                                               "exp_avgs\\[0\\]"),
        "adam_launch grads=params": (lambda: adam_launch([p], [p], [torch.zeros(N)], [torch.zeros(N)], [],
                                                         [torch.zeros(())], amsgrad=False, **kw), (p,), "grads\\[0\\]"),
        "sgd_launch buffer=param": (lambda: sgd_launch([p], [g], [p], lr=0.1, momentum=0.9, dampening=0.0,
                                                       weight_decay=0.0, nesterov=False, maximize=False,
                                                       first_step=False), (p, g), "momentum_buffers\\[0\\]"),
    }  # fmt: skip


@pytest.mark.interpret
@pytest.mark.parametrize("case", list(_prepared_cases()))
def test_prepared_launches_refuse_shared_memory(case):
    """Before, they built and stepped (the kernel wrote a result no sequential order gives); functional.adam_ and
    the custom ops refused the same inputs."""
    make, tensors, names = _prepared_cases()[case]
    err = expect_error_unchanged(make, ValueError, "share memory", *tensors)
    assert names.replace("\\", "") in str(err), str(err)


@pytest.mark.interpret
def test_prepared_set_grads_refuses_a_grad_overlapping_a_written_tensor():
    """Before, SGDStep.set_grads took a grad overlapping its own param by half; the step smeared the param."""
    from fused_ops.kernels.sgd import SGDStep

    big = torch.arange(2.0 * N)
    p = big[N // 2 : N // 2 + N]
    step = SGDStep([p], [torch.zeros(N)], [])
    expect_error_unchanged(lambda: step.set_grads([big[:N]]), ValueError, "grads\\[0\\] and params\\[0\\] share",
                           big)  # fmt: skip
    step2 = _adam_step([torch.randn(N)], [torch.randn(N)], [torch.zeros(N)])
    exp_avg = step2._written_roles[1][1][0]
    expect_error_unchanged(lambda: step2.set_grads([exp_avg]), ValueError, "share memory", exp_avg)
    step.set_grads([torch.randn(N)])  # a good grad still goes in


# -- DynamicLossScaler: values its float32 / int32 / int64 device tensors cannot hold ------------------------------
LOAD_CASES = {
    "growth_tracker 2**40": (dict(growth_tracker=2**40), "growth_tracker"),
    "skipped_steps 2**63": (dict(skipped_steps=2**63, consecutive_skipped=0), "skipped_steps"),
    "min_scale_overflows 2**64": (dict(min_scale_overflows=2**64), "min_scale_overflows"),
    "consecutive_skipped 2**63": (dict(skipped_steps=2**62, consecutive_skipped=2**63), "consecutive_skipped"),
    "hysteresis 2**40": (dict(hysteresis=2**40, hysteresis_tracker=1), "hysteresis"),
    "scale 1e-46": (dict(scale=1e-46, min_scale=1e-46), "min_scale"),
    "scale 1e-46 below min_scale": (dict(scale=1e-46), "scale"),
    "scale 1e39": (dict(scale=1e39), "scale"),
    "scale below min_scale": (dict(scale=0.5, min_scale=1.0), "scale"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_scaler_load_refuses_out_of_range_fields_and_changes_nothing(case):
    """Before, growth_tracker=2**40 set the scale and the factors, then raised torch's int32 overflow (no field
    named); a scale of 1e-46 loaded as 0.0; hysteresis=2**40 overflowed in the next update()."""
    from fused_ops import DynamicLossScaler

    bad, names = LOAD_CASES[case]
    scaler = DynamicLossScaler(init_scale=1024.0, device="cpu")
    state = {**scaler.state_dict(), "scale": 8.0, "growth_factor": 4.0, "backoff_factor": 0.25, **bad}
    hyper = (scaler.growth_factor, scaler.backoff_factor, scaler.hysteresis, scaler.min_scale)
    err = expect_error_unchanged(lambda: scaler.load_state_dict(state), ValueError, names, scaler)
    assert names in str(err)
    assert (scaler.growth_factor, scaler.backoff_factor, scaler.hysteresis, scaler.min_scale) == hyper


@pytest.mark.parametrize("kwargs, names", [(dict(init_scale=1e-46, min_scale=1e-46), "init_scale"),
                                           (dict(init_scale=1e39, max_scale=None), "init_scale"),
                                           (dict(hysteresis=2**40), "hysteresis"),
                                           (dict(growth_interval=2**40), "growth_interval")])  # fmt: skip
def test_scaler_refuses_values_its_tensors_cannot_hold(kwargs, names):
    from fused_ops import DynamicLossScaler

    with pytest.raises(ValueError, match=names):
        DynamicLossScaler(device="cpu", **kwargs)


@pytest.mark.parametrize("flag", [float("nan"), -1.0])
def test_scaler_update_reads_any_non_zero_flag_as_a_skipped_step(flag):
    """Before, nan or -1 skipped adam_'s step but counted as a good step in update() (the scale grew)."""
    from fused_ops import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=1024.0, growth_interval=1, device="cpu")
    scaler.update(torch.tensor([flag]))
    assert scaler.skipped_steps == 1 and scaler.get_scale() == 512.0


# -- the Triton norm accumulates in float64, as documented and as the reference does -------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value, dtype, p", [(1e20, torch.float32, 2.0), (1e30, torch.bfloat16, 2.0),
                                             (3.0, torch.float32, 100.0), (1e-30, torch.float32, 2.0),
                                             (1e-40, torch.float32, 2.0)])  # fmt: skip
def test_grad_norm_is_the_float64_norm(value, dtype, p, backend):
    """Before, Triton summed |x|^p in float32: inf for 1e20 (p=2) and 3.0 (p=100), 0 for 1e-30; clip_grad_norm_
    then zeroed grads the reference clipped, and grad_scale_and_norm set found_inf where the reference did not."""
    from fused_ops import DynamicLossScaler

    x = torch.full((4,), value, dtype=dtype)
    want = torch.linalg.vector_norm(x.double(), p).float()
    got = functional.grad_norm([x], p, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    scaler = DynamicLossScaler(init_scale=1.0, device="cpu", backend=backend)
    _, norm = scaler.grad_scale_and_norm([x], norm_type=p)
    assert scaler.found_inf.item() == 0.0
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)


# -- tensors whose storage was freed or shrunk in place ---------------------------------------------------------------
def _freed(n=1000, nbytes=0):
    x = torch.randn(n)
    x.untyped_storage().resize_(nbytes)
    return x


def _storage_cases():
    from fused_ops.kernels.adam import adam_launch
    from fused_ops.kernels.sgd import SGDStep

    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)

    def clip(b, x):
        p = torch.nn.Parameter(torch.randn(1000))
        p.grad = x
        return functional.clip_grad_norm_([p], 1.0, backend=b)

    def scaler(b, x):
        return fused_ops.DynamicLossScaler(device="cpu").unscale_([x])

    return {
        "flatten": (lambda b, x: fused_ops.flatten([torch.randn(7), x], backend=b), "tensors\\[1\\]"),
        "grad_norm": (lambda b, x: fused_ops.grad_norm([x], backend=b), "tensors\\[0\\]"),
        "cast_ src": (lambda b, x: fused_ops.cast_([torch.zeros(1000, dtype=torch.bfloat16)], [x], backend=b),
                      "src\\[0\\]"),
        "cast_ dst": (lambda b, x: fused_ops.cast_([x], [torch.randn(1000)], backend=b), "dst\\[0\\]"),
        "unscale_": (lambda b, x: fused_ops.unscale_([x], 0.5, backend=b), "grads\\[0\\]"),
        "clip_grad_norm_": (clip, "grads\\[0\\]"),
        "DynamicLossScaler.unscale_": (scaler, "grads\\[0\\]"),
        "adam_ exp_avg_sq": (lambda b, x: functional.adam_([torch.randn(1000)], [torch.randn(1000)],
                                                           [torch.zeros(1000)], [x], None, [torch.zeros(())],
                                                           lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                                           weight_decay=0.0, amsgrad=False, maximize=False,
                                                           backend=b), "exp_avg_sqs\\[0\\]"),
        "op flatten": (lambda b, x: torch.ops.fused_ops.flatten([x], 8, b), "tensors\\[0\\]"),
        "op grad_norm": (lambda b, x: torch.ops.fused_ops.grad_norm([x], 2.0, b), "tensors\\[0\\]"),
        "adam_launch (direct)": (lambda b, x: adam_launch([torch.randn(1000)], [x], [torch.zeros(1000)],
                                                          [torch.zeros(1000)], [], [torch.zeros(())], amsgrad=False,
                                                          **kw), "grads\\[0\\]"),
        "SGDStep (direct)": (lambda b, x: SGDStep([x], [torch.randn(1000)], []), "params\\[0\\]"),
    }  # fmt: skip


@pytest.mark.parametrize("nbytes", [0, 16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_storage_cases()))
def test_tensors_outside_their_storage_are_refused(case, backend, nbytes):
    """A tensor whose storage was freed (``untyped_storage().resize_(0)``, as FSDP frees params) or shrunk keeps its
    sizes: every op read or wrote freed memory (a crash, or a silent read past 16 bytes). Now a ValueError naming
    it, before anything is read or written, on both backends."""
    from tests.safety import run_isolated

    def body():
        call, name = _storage_cases()[case]
        if case.endswith("(direct)") and backend == "reference":
            pytest.skip("the launchers are the Triton backend's")
        with pytest.raises(ValueError, match=f"{name} lies outside its storage"):
            call(backend, _freed(nbytes=nbytes))

    run_isolated(body)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["lr", "grad_scale", "found_inf"])
def test_scalars_outside_their_storage_are_refused(name, backend):
    """A 1-element ``lr``/``grad_scale``/``found_inf`` whose storage was freed: the Triton kernel read it through a
    null pointer (garbage params; on a GPU an illegal access), the reference raised torch's own error. Now a
    ValueError naming it, on both backends, through the functional API, the custom op and a prepared launch."""
    from tests.safety import run_isolated

    def body():
        scalar = torch.full((1,), 0.5)
        scalar.untyped_storage().resize_(0)
        p, g, m, v, st = torch.randn(300), torch.randn(300), torch.zeros(300), torch.zeros(300), torch.zeros(())
        kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
        kw[name] = scalar
        with pytest.raises(ValueError, match=name):
            functional.adam_([p], [g], [m], [v], None, [st], backend=backend, **kw)
        args = dict(lr=1e-3, lr_tensor=None, grad_scale=None, found_inf=None)
        args["lr_tensor" if name == "lr" else name] = scalar
        with pytest.raises(ValueError, match=name):
            torch.ops.fused_ops.sgd_([p], [g], [], [], args["lr"], args["lr_tensor"], 0.0, 0.0, 0.0, False, False,
                                     False, args["grad_scale"], args["found_inf"], backend)  # fmt: skip
        if backend == "triton":
            step = _adam_step([p], [g], [m])
            kw2 = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled=True)
            kw2[name] = scalar
            with pytest.raises(ValueError, match=name):
                step(**kw2)
        assert torch.equal(m, torch.zeros(300))

    run_isolated(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_freed_flat_buffer_negated_views_and_zero_tensors(backend):
    """``FlatBuffer.zero_()`` on a freed buffer crashed (SIGSEGV) where its copies refused; a negated view (its memory
    holds the negated values) was read as raw memory by the Triton kernels (cast_ of -3.0 gave 3.0); a ZeroTensor was
    refused as "outside its storage". Each is now a clear ValueError on both backends."""
    from tests.safety import run_isolated

    def body():
        buf = FlatBuffer.from_params([torch.nn.Parameter(torch.randn(10))])
        buf.data.untyped_storage().resize_(0)
        with pytest.raises(ValueError, match="FlatBuffer.zero_: data lies outside its storage"):
            buf.zero_()
        neg = torch._neg_view(torch.full((4,), 3.0))
        dst = torch.zeros(4, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="src\\[0\\] is a negated"):
            fused_ops.cast_([dst], [neg], backend=backend)
        assert torch.equal(dst, torch.zeros(4, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="ZeroTensor"):
            fused_ops.grad_norm([torch._efficientzerotensor(10)], backend=backend)

    run_isolated(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_written_tensors_that_require_grad_are_refused_under_grad_mode(backend):
    """cast_ / unscale_ / unflatten_copy_ write in place and are not differentiable: under grad mode a written
    tensor that requires grad and is not a leaf (an op's result, a view) is refused before anything is written.
    Before, a non-contiguous view of a leaf that requires grad raised only in the copy back, after the other
    tensors (and found_inf) were written, and a non-leaf destination (``y = x * 2; cast_([y], [z])``) gave silently
    wrong grads (x got y's, z none). Under torch.no_grad() the write is taken; a leaf (a param) is written as an
    optimizer writes it (tests/test_host_path.py: its version is bumped)."""
    a, w = torch.zeros(4), torch.zeros(2, 3, requires_grad=True)
    expect_error_unchanged(lambda: fused_ops.cast_([a, w.t()], [torch.ones(4), torch.ones(3, 2)], backend=backend),
                           RuntimeError, "^cast_: dst\\[1\\] requires grad and is not a leaf", a, w)  # fmt: skip
    x, z = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    y = x * 2
    expect_error_unchanged(lambda: fused_ops.cast_([y], [z], backend=backend), RuntimeError,
                           "^cast_: dst\\[0\\] requires grad", y.detach())  # fmt: skip
    g, v, flag = torch.full((4,), 2.0), torch.full((2, 3), 4.0, requires_grad=True), torch.zeros(1)
    expect_error_unchanged(lambda: fused_ops.unscale_([g, v.t()], 0.5, flag, backend=backend), RuntimeError,
                           "^unscale_: grads\\[1\\] requires grad", g, v, flag)  # fmt: skip
    flat = fused_ops.flatten([torch.ones(3)], backend=backend)
    expect_error_unchanged(lambda: fused_ops.functional.unflatten_copy_([w.view(-1)[:3]], flat, backend=backend),
                           RuntimeError, "^unflatten_copy_: tensors\\[0\\] requires grad", w)  # fmt: skip
    with torch.no_grad():
        fused_ops.cast_([a, w.t()], [torch.ones(4), torch.full((3, 2), 2.0)], backend=backend)
        fused_ops.unscale_([g, v.t()], 0.5, flag, backend=backend)
    assert torch.equal(a, torch.ones(4)) and torch.equal(w.detach(), torch.full((2, 3), 2.0))
    assert torch.equal(g, torch.ones(4)) and torch.equal(v.detach(), torch.full((2, 3), 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaler_and_flat_errors_name_the_argument(backend):
    """The same clear error on both backends (the reference path raised torch's "Cannot copy out of meta tensor"
    for meta grads, a freed flat raised from ``narrow``, a scale of 10**400 a bare OverflowError)."""
    s = fused_ops.DynamicLossScaler(device="cpu", backend=backend)
    expect_error_unchanged(lambda: s.grad_scale_and_norm([torch.ones(3, device="meta")], max_norm=1.0), TypeError,
                           "grad_scale_and_norm: grads\\[0\\] is a meta tensor", s)  # fmt: skip
    state = s.state_dict()
    expect_error_unchanged(lambda: s.load_state_dict({**state, "scale": 10**400}), ValueError,
                           "scale must be a finite number > 0, got inf", s)  # fmt: skip
    flat = fused_ops.flatten([torch.ones(3)], backend=backend)
    flat.untyped_storage().resize_(0)
    t = torch.zeros(3)
    expect_error_unchanged(lambda: functional.unflatten_copy_([t], flat, backend=backend), ValueError,
                           "^unflatten_copy_: flat lies outside its storage", t)  # fmt: skip
