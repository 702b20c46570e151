"""DynamicLossScaler: growth, backoff and hysteresis sequences against torch's GradScaler rule and DeepSpeed's
``delayed_shift`` rule, skip accounting and its warnings, state_dict, no host reads, and the folded
unscale + clip path (``grad_scale_and_norm``) feeding the fused Adam step."""

import math
import warnings

import pytest
import torch

import fused_ops
from fused_ops import DynamicLossScaler, functional
from fused_ops.precision import LossScalerWarning
from tests.utils import no_host_reads

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy, in the interpreter


def _flag(bad: bool) -> torch.Tensor:
    return torch.tensor([1.0 if bad else 0.0])


def _deepspeed_oracle(seq, init_scale, factor, window, delayed_shift, min_scale, consecutive_hysteresis):
    """DeepSpeed's DynamicLossScaler.update_scale (runtime/fp16/loss_scaler.py), restated in plain Python."""
    cur_scale, cur_iter, last_overflow_iter, cur_hysteresis = init_scale, 0, -1, delayed_shift
    scales = []
    for overflow in seq:
        if overflow:
            if delayed_shift == 1 or cur_hysteresis == 1:
                cur_scale = max(cur_scale / factor, min_scale)
            else:
                cur_hysteresis -= 1
            last_overflow_iter = cur_iter
        else:
            if consecutive_hysteresis:
                cur_hysteresis = delayed_shift
            if (cur_iter - last_overflow_iter) % window == 0:
                if not consecutive_hysteresis:
                    cur_hysteresis = delayed_shift
                cur_scale *= factor
        cur_iter += 1
        scales.append(cur_scale)
    return scales


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
@pytest.mark.parametrize("consecutive_hysteresis", [False, True])
@pytest.mark.parametrize("window", [1, 3])
def test_matches_deepspeed_delayed_shift(hysteresis, consecutive_hysteresis, window):
    seq = (torch.rand(80) < 0.35).tolist() + [True] * 8 + [False] * 7
    scaler = DynamicLossScaler(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=window,
                               hysteresis=hysteresis, min_scale=4.0, consecutive_hysteresis=consecutive_hysteresis,
                               warn_after=None)  # fmt: skip
    got = []
    for bad in seq:
        scaler.update(_flag(bad))
        got.append(scaler.get_scale())
    expected = _deepspeed_oracle(seq, 2.0**10, 2.0, window, hysteresis, 4.0, consecutive_hysteresis)
    assert got == expected
    assert scaler.skipped_steps == sum(seq)


def test_matches_torch_grad_scaler_rule():
    """hysteresis=1: the same scale and growth tracker as torch's _amp_update_scale_ (GradScaler.update)."""
    seq = (torch.rand(60) < 0.2).tolist()
    scaler = DynamicLossScaler(init_scale=2.0**16, growth_factor=3.0, backoff_factor=0.25, growth_interval=4,
                               min_scale=2.0**-30, warn_after=None)  # fmt: skip
    t_scale, t_tracker = torch.tensor([2.0**16]), torch.tensor([0], dtype=torch.int32)
    for bad in seq:
        scaler.found_inf.fill_(float(bad))
        scaler.update()
        torch._amp_update_scale_(t_scale, t_tracker, _flag(bad), 3.0, 0.25, 4)
        assert torch.equal(scaler.scale, t_scale)
        assert torch.equal(scaler._growth_tracker, t_tracker)
        assert scaler.found_inf.item() == 0.0, "update clears its own flag"


@pytest.mark.parametrize("init, growth, backoff", [
    (1382.4, 1.5, 0.9),  # factors that are not powers of two: one rounding of the double product, as torch
    (2.0**127, 2.0, 0.5),  # a growth past float32's range is skipped (torch), not a scale of inf forever
    (1e38, 1e38, 0.5),
])  # fmt: skip
def test_matches_torch_grad_scaler_rule_at_the_edges(init, growth, backoff):
    seq = [False, False, True, False, False, False, True, True, False, False]
    scaler = DynamicLossScaler(init_scale=init, growth_factor=growth, backoff_factor=backoff, growth_interval=1,
                               min_scale=2.0**-30, warn_after=None)  # fmt: skip
    t_scale, t_tracker = torch.tensor([init]), torch.tensor([0], dtype=torch.int32)
    for bad in seq:
        scaler.update(_flag(bad))
        torch._amp_update_scale_(t_scale, t_tracker, _flag(bad), growth, backoff, 1)
        assert torch.equal(scaler.scale, t_scale), (scaler.scale.item(), t_scale.item())
        assert torch.equal(scaler._growth_tracker, t_tracker)
        assert math.isfinite(scaler.get_scale())
    DynamicLossScaler().load_state_dict(scaler.state_dict())  # (what it saves, it loads)


def test_hand_sequence_growth_backoff_hysteresis():
    s = DynamicLossScaler(init_scale=8.0, growth_interval=3, hysteresis=2, min_scale=2.0, max_scale=32.0,
                          warn_after=None)  # fmt: skip
    trace = []
    for bad in [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]:
        s.update(_flag(bad))
        trace.append(s.get_scale())
    # grow after 3 good steps; 1st overflow absorbed by the hysteresis; 2nd backs off, and every one after it,
    # down to min_scale; growth resets the hysteresis; absorbed again; growth capped at max_scale
    assert trace == [8, 8, 16, 16, 8, 4, 2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32]
    s.update(_flag(False))
    s.update(_flag(False))
    s.update(_flag(False))
    assert s.get_scale() == 32.0
    assert s.skipped_steps == 5


def test_skip_count_and_warnings():
    s = DynamicLossScaler(init_scale=4.0, hysteresis=1, min_scale=1.0, warn_after=3, check_interval=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossScalerWarning)
        s.update(_flag(True))
        s.update(_flag(True))  # scale 1 = min_scale now
        s.update(_flag(False))
    with pytest.warns(LossScalerWarning, match="min_scale"):
        s.update(_flag(True))  # overflow at min_scale
    with pytest.warns(LossScalerWarning) as record:
        s.update(_flag(True))
        s.update(_flag(True))
    messages = [str(w.message) for w in record]
    assert any("last 3 optimizer steps were skipped" in m for m in messages), messages
    assert any("min_scale" in m for m in messages), "each new overflow at min_scale is reported"
    assert s.skipped_steps == 5
    assert s.skipped_steps_tensor.item() == 5


def test_warning_checked_lazily_every_check_interval():
    s = DynamicLossScaler(init_scale=2.0**20, warn_after=2, check_interval=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossScalerWarning)
        for _ in range(3):
            s.update(_flag(True))  # no check before the 4th update
    with pytest.warns(LossScalerWarning, match="last 4 optimizer steps"):
        s.update(_flag(True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossScalerWarning)
        for _ in range(4):
            s.update(_flag(False))  # the streak ended: no warning
    with pytest.warns(LossScalerWarning, match="last 2 optimizer steps"):
        s.update(_flag(True))
        s.update(_flag(True))
        assert s.skipped_steps == 6  # reading the count checks at once


def test_state_dict_round_trip():
    a = DynamicLossScaler(init_scale=64.0, growth_interval=2, hysteresis=2, warn_after=None)
    for bad in [0, 1, 1, 0, 0, 1]:
        a.update(_flag(bad))
    sd = a.state_dict()
    assert sd["scale"] == a.get_scale() and sd["skipped_steps"] == 3 and sd["hysteresis"] == 2
    b = DynamicLossScaler(warn_after=None)
    b.load_state_dict(sd)
    assert b.state_dict() == sd
    for bad in [1, 1, 0, 0, 0, 1]:
        a.update(_flag(bad))
        b.update(_flag(bad))
        assert a.get_scale() == b.get_scale()
    with pytest.raises(KeyError, match="scale"):
        b.load_state_dict({"growth_tracker": 0})


def test_rejects_bad_arguments():
    for kwargs, match in [
        (dict(init_scale=0.0), "init_scale"),
        (dict(init_scale=math.inf), "init_scale"),
        (dict(growth_factor=1.0), "growth_factor"),
        (dict(backoff_factor=1.0), "backoff_factor"),
        (dict(growth_interval=0), "growth_interval"),
        (dict(hysteresis=0), "hysteresis"),
        (dict(hysteresis=1.5), "hysteresis"),
        (dict(min_scale=-1.0), "min_scale"),
        (dict(init_scale=0.5, min_scale=1.0), "init_scale"),
        (dict(max_scale=0.5), "max_scale"),
        (dict(warn_after=0), "warn_after"),
        (dict(backend="cuda"), "backend must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            DynamicLossScaler(**kwargs)


def test_no_host_reads(monkeypatch):
    """update / unscale_ / grad_scale_and_norm read nothing on the host (checks disabled: on CPU the lazy check
    reads its snapshot at once; on CUDA it is asynchronous, see test_no_host_sync_cuda)."""
    s = DynamicLossScaler(init_scale=1024.0, growth_interval=2, hysteresis=2, check_interval=None, backend="reference")
    grads = [torch.randn(7), torch.randn(30)]
    with no_host_reads(monkeypatch):
        for _ in range(3):
            s.unscale_([g.clone() for g in grads])
            s.grad_scale_and_norm(grads, max_norm=1.0)
            s.update()
            s.update(_flag(True))


@pytest.mark.gpu
def test_no_host_sync_cuda():
    s = DynamicLossScaler(init_scale=1024.0, warn_after=2, check_interval=1, device="cuda")
    grads = [torch.randn(n, device="cuda") for n in (7, 3000)]
    s.unscale_([g.clone() for g in grads])
    s.grad_scale_and_norm(grads, max_norm=1.0)
    s.update()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            s.unscale_(grads)
            s.grad_scale_and_norm(grads, max_norm=1.0)
            s.update(torch.ones(1, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.skipped_steps == 5


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpret), "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unscale_and_found_inf(backend, dtype):
    s = DynamicLossScaler(init_scale=256.0, backend=backend, warn_after=None)
    true = [torch.randn(n) for n in (5, 70)]
    scaled = [(g * 256.0).to(dtype) for g in true]
    out = [torch.empty(g.shape) for g in scaled]
    found = s.unscale_(scaled, out=out)  # fp32 copies of the (bf16) grads
    assert found.item() == 0.0
    for o, sc in zip(out, scaled, strict=True):
        assert torch.equal(o, sc.float() / 256.0)
    scaled[1][3] = float("inf")
    s.unscale_(scaled)
    assert s.found_inf.item() == 1.0
    s.update()
    assert s.get_scale() == 128.0 and s.found_inf.item() == 0.0


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpret), "reference"])
def test_unscale_twice_before_update_is_refused(backend):
    """As torch's GradScaler refuses a second unscale_ of one optimizer before update(): grads that unscale_
    divided (in place, or the out it wrote) are refused by unscale_ and grad_scale_and_norm with nothing changed,
    until update(); other grads, and the same scaled grads read again into out, are fine."""
    s = DynamicLossScaler(init_scale=4.0, backend=backend, warn_after=None)
    a, b, c = torch.randn(7), torch.randn(300), torch.randn(5)
    empty = torch.empty(0)
    s.unscale_(x for x in [a, empty])  # (a generator is read once)
    assert torch.equal(s.found_inf, torch.zeros(1))
    before = (a.clone(), b.clone(), c.clone())
    for call in (lambda: s.unscale_([b, a]), lambda: s.grad_scale_and_norm([c, a]), lambda: s.unscale_(iter([b, a]))):
        with pytest.raises(RuntimeError, match=r"already unscaled by unscale_\(\) since the last update"):
            call()
        assert all(torch.equal(x, y) for x, y in zip((a, b, c), before))
    s.unscale_([b, empty])  # another grad (and an empty one again)
    out = torch.full((5,), float("nan"))
    s.unscale_([c], out=[out])
    s.unscale_([c], out=[out])  # c is left scaled: reading it again is right
    assert torch.equal(out, before[2] / 4.0) and torch.equal(c, before[2])
    with pytest.raises(RuntimeError, match="already unscaled"):
        s.unscale_([out])
    s.update()
    s.unscale_([a, out])
    assert torch.equal(a, before[0] / 4.0) and torch.equal(out, before[2] / 16.0)  # (before: a already unscaled)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpret), "reference"])
def test_grad_scale_and_norm_folds_unscale_and_clip_into_adam(backend):
    """One norm pass over the scaled grads gives the grad_scale that makes the fused Adam step unscale and clip
    in its own pass; the result matches unscale -> torch clip -> Adam. An inf grad skips the step on device."""
    torch.manual_seed(0)
    shapes = [(5, 3), (40,)]
    params = [torch.randn(s) for s in shapes]
    true = [torch.randn(s) * 3 for s in shapes]
    s = DynamicLossScaler(init_scale=1024.0, backend=backend, warn_after=None)
    scaled = [g * 1024.0 for g in true]
    grad_scale, norm = s.grad_scale_and_norm(scaled, max_norm=1.0)
    expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in true]))
    torch.testing.assert_close(norm, expected_norm, rtol=1e-6, atol=0)
    ref_params = [torch.nn.Parameter(p.clone()) for p in params]
    for rp, g in zip(ref_params, true, strict=True):
        rp.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    for g, rp in zip(scaled, ref_params, strict=True):
        torch.testing.assert_close(g / grad_scale, rp.grad, rtol=1e-6, atol=1e-7)

    def adam(ps, gs, gscale, found_inf):
        ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        fused_ops.functional.adam_(ps, gs, ms, vs, lr=0.1, step=1.0, grad_scale=gscale, found_inf=found_inf,
                                   decoupled_weight_decay=True, backend=backend)  # fmt: skip

    ours = [p.clone() for p in params]
    adam(ours, scaled, grad_scale, s.found_inf)
    theirs = [p.clone() for p in params]
    adam(theirs, [rp.grad for rp in ref_params], None, None)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    s.update()

    scaled[0][1, 2] = float("nan")
    before = [p.clone() for p in ours]
    grad_scale, norm = s.grad_scale_and_norm(scaled, max_norm=1.0)
    assert s.found_inf.item() == 1.0 and torch.isnan(norm)
    adam(ours, scaled, grad_scale, s.found_inf)
    for a, b in zip(ours, before, strict=True):
        assert torch.equal(a, b), "a step with found_inf set is a no-op"
    s.update()
    assert s.get_scale() == 512.0 and s.skipped_steps == 1


def test_scale_loss_backward():
    s = DynamicLossScaler(init_scale=8.0, warn_after=None)
    w = torch.nn.Parameter(torch.randn(3))
    s.scale_loss((w * 2).sum()).backward()
    assert torch.equal(w.grad, torch.full((3,), 16.0))
    assert torch.equal(s.inv_scale, torch.tensor([0.125]))
    assert isinstance(functional.clip_coef(torch.tensor(0.5), 1.0), torch.Tensor)


# -- issue 9, part 4: validate everything, then change anything ---------------------------------------------------


def _scaler_after_some_steps():
    s = DynamicLossScaler(init_scale=64.0, growth_interval=3, hysteresis=3, warn_after=None)
    for bad in [0, 1, 0, 1]:
        s.update(_flag(bad))
    return s


BAD_STATE = [
    ("scale", 0.0, ValueError, "scale must be a finite number > 0"),
    ("scale", -2.0, ValueError, "scale must be a finite number > 0"),
    ("scale", math.nan, ValueError, "scale must be a finite number > 0"),
    ("scale", math.inf, ValueError, "scale must be a finite number > 0"),
    ("scale", "64", TypeError, "scale must be a number"),
    ("scale", True, TypeError, "scale must be a number"),
    ("growth_tracker", -1, ValueError, "growth_tracker must be an int >= 0"),
    ("growth_tracker", 1.5, TypeError, "growth_tracker must be an int"),
    ("growth_tracker", True, TypeError, "growth_tracker must be an int"),
    ("hysteresis_tracker", -1, ValueError, "hysteresis_tracker must be an int in \\[0, 3\\]"),
    ("hysteresis_tracker", 4, ValueError, "hysteresis_tracker must be an int in \\[0, 3\\]"),
    ("skipped_steps", -3, ValueError, "skipped_steps must be an int >= 0"),
    ("consecutive_skipped", None, TypeError, "consecutive_skipped must be an int"),
    ("consecutive_skipped", 5, ValueError, "consecutive_skipped \\(5\\) exceeds skipped_steps \\(2\\)"),
    ("min_scale_overflows", -1, ValueError, "min_scale_overflows must be an int >= 0"),
    ("growth_factor", 1.0, ValueError, "growth_factor must be a finite number > 1"),
    ("growth_factor", math.inf, ValueError, "growth_factor must be a finite number > 1"),
    ("backoff_factor", 0.0, ValueError, "backoff_factor must be in \\(0, 1\\)"),
    ("backoff_factor", math.nan, ValueError, "backoff_factor must be in \\(0, 1\\)"),
    ("growth_interval", 0, ValueError, "growth_interval must be a positive int"),
    ("growth_interval", 2.0, ValueError, "growth_interval must be a positive int"),
    ("hysteresis", 0, ValueError, "hysteresis must be a positive int"),
    ("hysteresis", 2, ValueError, "hysteresis_tracker must be an int in \\[0, 2\\]"),  # the tracker is 3
    ("min_scale", 0.0, ValueError, "min_scale must be a finite number > 0"),
    ("max_scale", 0.5, ValueError, "max_scale must be None or a finite number >= min_scale"),
    ("max_scale", math.inf, ValueError, "max_scale must be None or a finite number >= min_scale"),
    ("consecutive_hysteresis", 1, TypeError, "consecutive_hysteresis must be a bool"),
    ("unknown_key", 1, KeyError, "unexpected keys \\['unknown_key'\\]"),
]


@pytest.mark.parametrize("key, value, exc, match", BAD_STATE, ids=[f"{k}={v!r}" for k, v, _, _ in BAD_STATE])
def test_load_state_dict_validates_everything_first(key, value, exc, match):
    """A bad field (scale 0 used to load, then give nan params) raises naming it, with every tensor and number of
    the scaler unchanged."""
    from tests.safety import expect_error_unchanged

    src = _scaler_after_some_steps()
    sd = src.state_dict()
    sd["hysteresis_tracker"] = 3
    sd[key] = value
    dst = DynamicLossScaler(init_scale=8.0, growth_interval=5, hysteresis=1, warn_after=None)
    dst.update(_flag(True))
    expect_error_unchanged(lambda: dst.load_state_dict(sd), exc, f"DynamicLossScaler.load_state_dict: {match}", dst)


def test_load_state_dict_refuses_a_non_dict_and_missing_keys():
    from tests.safety import expect_error_unchanged

    s = _scaler_after_some_steps()
    expect_error_unchanged(lambda: s.load_state_dict([1, 2]), TypeError, "state_dict must be a dict", s)
    sd = s.state_dict()
    del sd["growth_tracker"]
    expect_error_unchanged(lambda: s.load_state_dict(sd), KeyError, "missing keys \\['growth_tracker'\\]", s)


def test_load_state_dict_accepts_what_state_dict_gives_and_older_dicts():
    s = _scaler_after_some_steps()
    sd = s.state_dict()
    t = DynamicLossScaler(warn_after=None)
    t.load_state_dict(sd)
    assert t.state_dict() == sd
    old = {k: sd[k] for k in ("scale", "growth_tracker", "hysteresis_tracker")}  # counters default to 0
    u = DynamicLossScaler(hysteresis=3, warn_after=None)
    u.load_state_dict({**old, "scale": 32})  # an int scale is a number
    assert u.get_scale() == 32.0 and u.skipped_steps == 0


@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(2), TypeError, "found_inf must be a 1-element floating-point tensor"),
    (torch.zeros(1, dtype=torch.int32), TypeError, "found_inf must be a 1-element floating-point tensor"),
    (1.0, TypeError, "found_inf must be a 1-element floating-point tensor"),
])  # fmt: skip
def test_update_refuses_a_bad_found_inf(bad, exc, match):
    from tests.safety import expect_error_unchanged

    s = _scaler_after_some_steps()
    expect_error_unchanged(lambda: s.update(bad), exc, f"^DynamicLossScaler.update: {match}", s)


def _freed(t: torch.Tensor) -> torch.Tensor:
    t.untyped_storage().resize_(0)
    return t


@pytest.mark.safety
@pytest.mark.parametrize("make, match", [
    (lambda: _freed(torch.zeros(1)), "found_inf must be a tensor with memory: .* outside its storage"),
    (lambda: torch.zeros(1, device="meta"), r"found_inf must be a tensor with memory: .* \(meta\)"),
])  # fmt: skip
def test_update_refuses_a_found_inf_without_memory(make, match):
    """A freed or meta flag is refused before it is read (a freed one was read through a null pointer: SIGSEGV)."""
    from tests.safety import expect_error_unchanged, run_isolated

    def body():
        s = _scaler_after_some_steps()
        expect_error_unchanged(lambda: s.update(make()), ValueError, f"^DynamicLossScaler.update: {match}", s)

    run_isolated(body)


def test_update_takes_a_0d_found_inf():
    s = DynamicLossScaler(init_scale=8.0, warn_after=None)
    s.update(torch.ones(()))
    assert s.get_scale() == 4.0


@pytest.mark.parametrize("max_norm, norm_type, match", [
    (math.nan, 2.0, "max_norm must be a number"),
    ("1", 2.0, "max_norm must be a number"),
    (1.0, 0.0, "norm_type must be inf or a number > 0"),
])  # fmt: skip
def test_grad_scale_and_norm_checks_before_setting_found_inf(max_norm, norm_type, match):
    """found_inf used to be set (from the norm) before max_norm was checked: now nothing changes."""
    from tests.safety import expect_error_unchanged

    s = _scaler_after_some_steps()
    grads = [torch.randn(5), torch.randn(3)]
    grads[1][0] = float("inf")  # the norm is inf: found_inf would be set
    expect_error_unchanged(lambda: s.grad_scale_and_norm(grads, max_norm, norm_type), ValueError,
                           f"^DynamicLossScaler.grad_scale_and_norm: {match}", s, grads)  # fmt: skip


def test_grad_scale_and_norm_max_norm_inf_is_norm_only():
    s = DynamicLossScaler(init_scale=4.0, warn_after=None)
    grads = [torch.full((4,), 8.0)]
    grad_scale, norm = s.grad_scale_and_norm(grads, math.inf)
    assert grad_scale.item() == 4.0 and norm.item() == pytest.approx(4.0)


def test_update_skips_the_host_poll_during_cuda_graph_capture(monkeypatch):
    """In a capture the lazy warning check would pin memory and query an event (neither capturable): skipped
    while the current stream captures, the state update itself still recorded (all device ops)."""
    s = DynamicLossScaler(init_scale=8.0, warn_after=1, check_interval=1)
    monkeypatch.setattr(fused_ops.precision, "_capturing", lambda device: True)
    with no_host_reads(monkeypatch):
        s.update(_flag(True))
        s.update(_flag(True))
    monkeypatch.undo()
    assert s.get_scale() == 2.0
    with pytest.warns(LossScalerWarning, match="last 3 optimizer steps"):
        s.update(_flag(True))  # the next eager update checks


@pytest.mark.gpu
def test_update_captured_in_a_cuda_graph():
    """update() records only device work during a capture (the lazy check would pin memory and query an event):
    each replay advances the scale; the next eager update checks and warns."""
    s = DynamicLossScaler(init_scale=2.0**10, warn_after=2, check_interval=1, device="cuda")
    flag = torch.ones(1, device="cuda")
    s.update(flag)  # warm-up (eager)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s.update(flag)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert s.get_scale() == 2.0**6  # 2^10 halved by the warm-up and three replays (a capture runs nothing)
    with pytest.warns(LossScalerWarning):
        for _ in range(3):
            s.update(flag)
        s.skipped_steps  # noqa: B018 (reading it checks at once)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_scaler_on_first_gpu_grads_on_second():
    """A scaler made on cuda:0 and grads on cuda:1: scale, found_inf and the clip coefficient are moved to the
    grads' device (never a cuda:0 address read from cuda:1), with torch's numbers."""
    s = DynamicLossScaler(init_scale=512.0, device="cuda:0")
    grads = [torch.randn(n, device="cuda:1") * 512 for n in (7, 70_000)]
    expected = [g.cpu() / 512 for g in grads]
    s.unscale_(grads)
    assert s.found_inf.device == torch.device("cuda:0") and s.found_inf.item() == 0.0
    for g, e in zip(grads, expected, strict=True):
        assert g.device == torch.device("cuda:1")
        torch.testing.assert_close(g.cpu(), e, rtol=1e-6, atol=0)
    grads[1][5] = float("inf")
    s.unscale_(grads)
    assert s.found_inf.item() == 1.0
    s.update()
    grads = [torch.randn(n, device="cuda:1") for n in (7, 70_000)]
    grad_scale, norm = s.grad_scale_and_norm(grads, max_norm=1.0)
    ref = torch.linalg.vector_norm(torch.cat([g.cpu().double() for g in grads])) / s.get_scale()
    assert grad_scale.device == torch.device("cuda:0")
    torch.testing.assert_close(norm.cpu().double(), ref, rtol=1e-5, atol=0)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    twins = [torch.nn.Parameter(torch.zeros_like(g.cpu())) for g in grads]
    for p, q, g in zip(params, twins, grads, strict=True):
        p.grad, q.grad = g.clone(), g.cpu().clone()
    total = fused_ops.clip_grad_norm_(params, 0.5)
    torch.testing.assert_close(total.cpu(), torch.nn.utils.clip_grad_norm_(twins, 0.5), rtol=1e-5, atol=0)
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-5, atol=1e-7)


def test_unscale_between_updates_does_not_grow_the_scalers_records():
    """Each ``unscale_`` records the grads' storages until ``update()``; those of grads freed since are dropped.
    Before, an emptied record stayed: one per call, without bound, when updates are rare."""
    scaler = DynamicLossScaler(init_scale=2.0**4)
    for _ in range(50):
        grads = [torch.randn(16), torch.randn(5)]
        scaler.unscale_(grads)
        del grads
    scaler.unscale_([torch.randn(3)])
    assert len(scaler._unscaled_storages) <= 2
