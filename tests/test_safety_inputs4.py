"""Safety regressions from an input-fuzzing probe (fourth file): float8 and meta grads refused by ``unscale_`` for
every group before any group runs, a master weight of another shape refused by ``adam_``, nested tensors refused
everywhere tensors are checked, and clear errors naming the argument for ``adam_``'s arguments, ``FlatBuffer`` and
``ZeroAdamW``. Each case failed before its fix: wrote some tensors, then raised torch's error (or none)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fused_ops
from fused_ops import FlatBuffer, functional
from tests.safety import expect_error_unchanged, message_names
from tests.test_distributed import one_rank_group  # noqa: F401 - a fixture

pytestmark = [pytest.mark.safety]

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]


# -- 1. unscale_: float8 and meta tensors refused up front ------------------------------------------------------
def _fp8(n=4):
    return torch.ones(n).to(torch.float8_e4m3fn)


UNSCALE_CASES = {
    # (grads, out, the argument named)
    "fp8 grad": (lambda: [torch.full((4,), 8.0), _fp8()], None, "grads[1]"),
    "fp8 e5m2 grad": (lambda: [torch.full((4,), 8.0), torch.ones(4).to(torch.float8_e5m2)], None, "grads[1]"),
    "meta grad": (lambda: [torch.full((4,), 8.0), torch.empty(4, device="meta")], None, "grads[1]"),
    "fp8 out": (lambda: [torch.full((4,), 8.0), torch.full((4,), 8.0)], lambda: [torch.zeros(4), _fp8()], "out[1]"),
}


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("case", list(UNSCALE_CASES))
def test_unscale_refuses_float8_and_meta_before_any_group_runs(case, backend):
    """Before, the reference (and auto, on CPU) path divided the fp32 grads, then raised torch's
    NotImplementedError ("isfinite" for Float8, "Cannot copy out of meta tensor"), found_inf never set."""
    make_grads, make_out, name = UNSCALE_CASES[case]
    grads, flag = make_grads(), torch.zeros(1)
    out = make_out() if make_out is not None else None
    real = [g for g in grads if not g.is_meta]
    err = expect_error_unchanged(lambda: fused_ops.unscale_(grads, 0.5, flag, out=out, backend=backend), TypeError,
                                 "^unscale_: ", real, out or [], flag)  # fmt: skip
    message_names(err, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaler_unscale_refuses_float8_and_allows_a_retry(backend):
    """Before, DynamicLossScaler.unscale_ divided the fp32 grad, raised, then refused the retry as already done."""
    s = fused_ops.DynamicLossScaler(init_scale=4.0, device="cpu", backend=backend)
    g32 = torch.full((4,), 8.0)
    err = expect_error_unchanged(lambda: s.unscale_([g32, _fp8()]), TypeError, "float8_e4m3fn", g32, s)
    message_names(err, "grads[1]")
    s.unscale_([g32])
    assert torch.equal(g32, torch.full((4,), 2.0))


# -- 2. adam_: master weights shaped like their param ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_adam_refuses_a_master_of_another_shape(backend):
    """Before, the reference path updated master, moments and step, then raised a broadcasting error; Triton took
    it."""
    p, g = torch.randn(6).bfloat16(), torch.randn(6).bfloat16()
    master = p.float().reshape(2, 3).clone()
    m, v, s = torch.zeros(6), torch.zeros(6), torch.zeros(())
    err = expect_error_unchanged(
        lambda: functional.adam_([p], [g], [m], [v], None, [s], lr=0.1, master_params=[master], backend=backend),
        ValueError, "^adam_: master_params\\[0\\] has shape \\(2, 3\\) but params\\[0\\] has \\(6,\\)",
        p, g, master, m, v, s,
    )  # fmt: skip
    message_names(err, "master_params[0]")
    functional.adam_([p], [g], [m], [v], None, [s], lr=0.1, master_params=[master.view(6)], backend=backend)
    assert s.item() == 1.0


# -- 3. nested tensors --------------------------------------------------------------------------------------------
def _nested():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.arange(2.0), torch.arange(3.0) + 10])


def _values(nt):
    return [t.clone() for t in nt.unbind()]


NESTED_CASES = {
    # (call(nested, backend), the argument named, the plain tensors it would touch)
    "grad_norm": lambda x, b: (lambda: functional.grad_norm([torch.ones(3), x], backend=b), "tensors[1]", []),
    "unscale_": lambda x, b: (lambda ok: (lambda: fused_ops.unscale_([ok, x], 0.5, backend=b), "grads[1]", [ok]))(
        torch.ones(3)
    ),
    "unflatten_copy_": lambda x, b: (
        lambda: functional.unflatten_copy_([x], torch.full((64,), -7.0), backend=b),
        "tensors[0]",
        [],
    ),
    "cast_": lambda x, b: (lambda: fused_ops.cast_([torch.zeros(5)], [x], backend=b), "src[0]", []),
    "adam_ param": lambda x, b: (
        lambda ms: (
            lambda: functional.adam_([x], [torch.ones(5)], [ms[0]], [ms[1]], step=1, lr=0.1, backend=b),
            "params[0]",
            ms,
        )
    )([torch.zeros(5), torch.zeros(5)]),
    "adam_ exp_avg": lambda x, b: (
        lambda ts: (
            lambda: functional.adam_([ts[0]], [ts[1]], [x], [ts[2]], step=1, lr=0.1, backend=b),
            "exp_avgs[0]",
            ts,
        )
    )([torch.ones(5), torch.ones(5), torch.zeros(5)]),
    "FlatBuffer": lambda x, b: (lambda: FlatBuffer([x], backend=b), "tensors[0]", []),
    "FlatBuffer.copy_from_": lambda x, b: (lambda buf: (lambda: buf.copy_from_([x]), "tensors[0]", [buf]))(
        FlatBuffer([torch.ones(5)], backend=b)
    ),
    "FlatBuffer.bind_data_": lambda x, b: (lambda buf: (lambda: buf.bind_data_([x]), "tensors[0]", [buf]))(
        FlatBuffer([torch.ones(5)], backend=b)
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(NESTED_CASES))
def test_nested_tensors_are_refused(case, backend):
    """A nested tensor reports ``layout == torch.strided`` and is a plain ``Tensor``: before, the Triton launches
    read and wrote its packed buffer as if it were dense, the reference path failed in torch's internals."""
    x = _nested()
    before = _values(x)
    call, name, touched = NESTED_CASES[case](x, backend)
    err = expect_error_unchanged(call, TypeError, "nested tensor", *touched)
    message_names(err, name)
    assert all(torch.equal(a, b) for a, b in zip(before, x.unbind()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["FusedAdamW", "FusedSGD", "FusedLion"])
def test_optimizers_refuse_nested_params(cls, backend):
    """Before, every optimizer raised torch's "NestedTensorImpl doesn't support sizes" (a RuntimeError)."""
    p = _nested().requires_grad_()
    torch.nested.to_padded_tensor(p, 0.0).pow(2).sum().backward()
    assert p.grad is not None and p.grad.is_nested
    before = _values(p.detach())
    opt = getattr(fused_ops, cls)([p], lr=0.1, backend=backend)
    with pytest.raises(TypeError, match="param 0 of param group 0 is a nested tensor"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, p.detach().unbind()))
    assert not opt.state.get(p)


def test_launch_checks_refuse_nested():
    from fused_ops.kernels._checks import check_role

    with pytest.raises(TypeError, match="^f: xs\\[1\\] must be a dense tensor, got a nested tensor"):
        check_role("f", "xs", [torch.ones(5), _nested()], (torch.float32,))


# -- 4. clear errors naming the argument ---------------------------------------------------------------------------
def _x():
    return [torch.randn(4)]


ADAM_ARG_CASES = {
    "params=None": (dict(params=None), TypeError, "params"),
    "lr=None": (dict(lr=None), TypeError, "lr"),
    "lr='0.1'": (dict(lr="0.1"), TypeError, "lr"),
    "beta1=True": (dict(beta1=True), TypeError, "beta1"),
    "beta2=False": (dict(beta2=False), TypeError, "beta2"),
    "beta1=tensor([.9, .9])": (dict(beta1=torch.tensor([0.9, 0.9])), ValueError, "beta1"),
    "eps='1e-8'": (dict(eps="1e-8"), TypeError, "eps"),
    "step='2'": (dict(step="2"), TypeError, "step"),
    "step=10**400": (dict(step=10**400), ValueError, "step"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ADAM_ARG_CASES))
def test_adam_argument_errors_name_the_argument(case, backend):
    """Before: "'NoneType' object is not iterable", "float() argument must be ...", "only one element tensors can
    be converted", "must be real number, not str", and a string lr or a bool beta taken silently."""
    kw, exc, name = ADAM_ARG_CASES[case]
    p, g, m, v = _x(), _x(), _x(), _x()
    args = dict(params=p, step=1, lr=0.1) | kw
    params = args.pop("params")
    err = expect_error_unchanged(lambda: functional.adam_(params, g, m, v, backend=backend, **args), exc,
                                 f"^adam_: {name}", p, g, m, v)  # fmt: skip
    message_names(err, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_takes_what_torch_optim_takes(backend):
    """torch.optim.AdamW takes lr=True (1.0), a bool eps or weight decay, and 1-element tensor values."""
    p, g, m, v = torch.ones(4), torch.ones(4), torch.zeros(4), torch.zeros(4)
    functional.adam_([p], [g], [m], [v], step=1, lr=True, beta1=torch.tensor(0.9), weight_decay=False,
                     backend=backend)  # fmt: skip
    assert torch.allclose(p, torch.zeros(4), atol=1e-6)


def test_flatbuffer_align_too_large_names_align():
    """Before, torch's TypeError from ``empty()``: "Overflow when unpacking long long"."""
    with pytest.raises(ValueError, match="^FlatBuffer: align=1180591620717411303424 .*2\\*\\*63 - 1"):
        FlatBuffer([torch.randn(3)], align=2**70)


def test_flatbuffer_zero_refuses_inference_data():
    """Before, torch's RuntimeError ("Inplace update to inference tensor outside InferenceMode"); now the
    TypeError copy_from_ gives."""
    buf = FlatBuffer([torch.randn(3)])
    with torch.inference_mode():
        buf.data = torch.ones(buf.data.numel())
    with pytest.raises(TypeError, match="^FlatBuffer.zero_: the buffer is an inference tensor"):
        buf.zero_()
    assert torch.equal(buf.data, torch.ones(buf.data.numel()))
    with pytest.raises(TypeError, match="^FlatBuffer.copy_from_: the buffer is an inference tensor"):
        buf.copy_from_([torch.zeros(3)])


ZERO_CASES = {
    "process_group=3": (dict(process_group=3), TypeError, "process_group"),
    "align=2**70": (dict(align=2**70), ValueError, "align"),
    "stage=True": (dict(stage=True), TypeError, "stage"),
    "stage=1.0": (dict(stage=1.0), TypeError, "stage"),
}


@pytest.mark.parametrize("case", list(ZERO_CASES))
@pytest.mark.usefixtures("one_rank_group")
def test_zero_constructor_errors_name_the_argument(case):
    """Before: AttributeError ("'int' object has no attribute 'size'"), torch's overflow TypeError from
    ``zeros()``, and stage=True taken as stage 1."""
    from fused_ops.distributed import ZeroAdamW

    kw, exc, name = ZERO_CASES[case]
    model = torch.nn.Linear(2, 2)
    err = expect_error_unchanged(lambda: ZeroAdamW(model.parameters(), **kw), exc, f"^ZeroAdamW: {name}", model)
    message_names(err, name)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["float8", "meta_first", "meta_second"])
def test_grad_norm_refuses_float8_and_meta(backend, kind):
    """grad_norm (and so clip_grad_norm_ and the scaler's grad_scale_and_norm) refuses float8 and meta tensors with
    a TypeError naming them, on both backends: the reference path returned a meta tensor for [meta, cpu], or raised
    torch's "Cannot copy out of meta tensor" / float8 promotion errors."""
    x = torch.randn(5)
    other = {"float8": torch.randn(3).to(torch.float8_e4m3fn), "meta_first": torch.empty(3, device="meta"),
             "meta_second": torch.empty(3, device="meta")}[kind]  # fmt: skip
    tensors = [other, x] if kind == "meta_first" else [x, other]
    with pytest.raises(TypeError, match=r"tensors\[[01]\]"):
        fused_ops.grad_norm(tensors, backend=backend)


def test_grad_norm_meta_norm_type_and_scale_loss_of_a_number():
    with pytest.raises(ValueError, match="norm_type"):
        fused_ops.grad_norm([torch.randn(3)], norm_type=torch.tensor(2.0, device="meta"))
    scaler = fused_ops.DynamicLossScaler(device="cpu")
    for loss in (1.0, None):
        with pytest.raises(TypeError, match="loss must be a Tensor"):
            scaler.scale_loss(loss)


@pytest.mark.parametrize("cls", [fused_ops.FusedAdamW, fused_ops.FusedLion])
def test_betas_given_as_a_set_or_generator_are_refused(cls):
    """An unordered set (torch's ``betas[0]`` raises TypeError on it) or a generator: a TypeError naming betas, in
    the constructor and in add_param_group; they were taken in whatever order the set iterated."""
    p = torch.nn.Parameter(torch.randn(3))
    for betas in ({0.999, 0.9}, (b for b in (0.9, 0.99))):
        with pytest.raises(TypeError, match="betas"):
            cls([p], lr=1e-3, betas=betas)
    opt = cls([p], lr=1e-3)
    with pytest.raises(TypeError, match="betas"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "betas": {0.8, 0.9}})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [fused_ops.FusedAdamW, fused_ops.FusedSGD, fused_ops.FusedLion])
def test_differentiable_true_refused_in_loads_and_new_groups(cls):
    """The constructor refused differentiable=True; a loaded state dict or add_param_group took it, and the step
    ignored it (torch.optim would step differentiably). Now both raise, nothing changed."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = cls([p], lr=1e-3)
    p.grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["differentiable"] = True
    before = opt.state_dict()
    with pytest.raises(ValueError, match="differentiable"):
        opt.load_state_dict(sd)
    assert not opt.param_groups[0].get("differentiable")
    assert str(opt.state_dict()) == str(before)
    with pytest.raises(ValueError, match="differentiable"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "differentiable": True})
    assert len(opt.param_groups) == 1


def test_loss_scaler_on_meta_is_refused():
    with pytest.raises(ValueError, match="device"):
        fused_ops.DynamicLossScaler(device="meta")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["FusedAdamW", "FusedSGD", "FusedLion"])
def test_optimizer_step_takes_a_bool_lr_as_its_constructor_does(name, backend):
    """torch.optim takes lr=True (1.0) in the constructor and the step. Before, FusedAdamW's constructor took it
    and its every step raised "Invalid learning rate: True"."""
    cls = getattr(fused_ops, name)
    p, q = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    p.grad, q.grad = torch.full((5,), 0.5), torch.full((5,), 0.5)
    cls([p], lr=True, backend=backend).step()
    cls([q], lr=1.0, backend=backend).step()
    assert torch.equal(p, q) and not torch.equal(p, torch.ones(5))


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.usefixtures("one_rank_group")
def test_zero_steps_on_grads_made_in_inference_mode(stage):
    """torch.optim and FusedAdamW step on a grad made under ``torch.inference_mode()`` (they only read it). Before,
    ZeroAdamW stage 1 raised torch's "Inference tensors do not track version counter" after it had committed the
    grads' reduction (the step was lost)."""
    from fused_ops.distributed import ZeroAdamW

    torch.manual_seed(0)
    model, ref = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    opt = ZeroAdamW(model.parameters(), lr=1e-2, stage=stage, backend="reference")
    ref_opt = fused_ops.FusedAdamW(ref.parameters(), lr=1e-2, backend="reference")
    for k in range(3):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i))
                 for i, p in enumerate(model.parameters())]  # fmt: skip
        with torch.inference_mode():
            made = [g.clone() for g in grads]
        for p, q, g, h in zip(model.parameters(), ref.parameters(), made, grads):
            p.grad, q.grad = g, h.clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
