"""The custom op fused_ops::adam_: torch.library.opcheck, torch.compile, and the functional layer."""

import pytest
import torch

import fused_ops
from fused_ops import functional
from tests.utils import f64


def _tensors(sizes=(3, 17, 40), amsgrad=True):
    params = [torch.randn(n) for n in sizes]
    return dict(
        params=params,
        grads=[torch.randn(n) for n in sizes],
        exp_avgs=[torch.zeros(n) for n in sizes],
        exp_avg_sqs=[torch.zeros(n) for n in sizes],
        max_exp_avg_sqs=[torch.zeros(n) for n in sizes] if amsgrad else [],
        state_steps=[torch.tensor(0.0) for _ in sizes],
    )


def _op_args(t, backend):
    return (t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], t["max_exp_avg_sqs"], [], t["state_steps"],
            1e-3, None, 0.9, 0.999, 1e-8, 0.01, True, False, True, None, None, torch.tensor(0.0), backend)  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
def test_opcheck(backend):
    torch.library.opcheck(torch.ops.fused_ops.adam_.default, _op_args(_tensors(), backend))


def test_compile_fullgraph_runs_the_op():
    t_eager, t_comp = _tensors(), None
    t_comp = {k: [x.clone() for x in v] for k, v in t_eager.items()}

    def step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr):
        torch.ops.fused_ops.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, [], state_steps, lr, None,
                                  0.9, 0.999, 1e-8, 0.01, True, False, True, None, None, None, "reference")  # fmt: skip

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for _ in range(3):
        step(**t_eager, lr=1e-2)
        compiled(**t_comp, lr=1e-2)
    for a, b in zip(t_eager["params"], t_comp["params"]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    assert t_comp["state_steps"][0].item() == 3


def test_compile_fullgraph_of_functional_adam():
    t_eager = _tensors(amsgrad=False)
    t_comp = {k: [x.clone() for x in v] for k, v in t_eager.items()}

    def step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        functional.adam_(params, grads, exp_avgs, exp_avg_sqs, None, state_steps, lr=1e-2, weight_decay=0.1,
                         decoupled_weight_decay=True, backend="reference")  # fmt: skip

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        step(**t_eager)
        compiled(**t_comp)
    for a, b in zip(t_eager["params"], t_comp["params"]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=pytest.mark.interpret)])
def test_functional_groups_mixed_dtypes(backend):
    """Tensors of several dtypes in one call: one op per (device, dtype) group, each right."""
    sizes = [5, 33, 2]
    dtypes = [torch.float32, torch.bfloat16, torch.float32]
    t = _tensors(sizes, amsgrad=False)
    t["params"] = [p.to(d) for p, d in zip(t["params"], dtypes)]
    t["grads"] = [g.to(d) for g, d in zip(t["grads"], dtypes)]
    ref = {k: f64(v) if k != "state_steps" else [s.clone() for s in v] for k, v in t.items()}
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
    fused_ops.reference.adam_(**ref, decoupled=True, **kw)
    functional.adam_(**t, decoupled_weight_decay=True, backend=backend, **kw)
    for p, r, d in zip(t["params"], ref["params"], dtypes):
        tol = 2e-6 if d == torch.float32 else 2**-7
        torch.testing.assert_close(p.double(), r, atol=tol, rtol=tol)
    assert [s.item() for s in t["state_steps"]] == [1.0, 1.0, 1.0]


def test_functional_rejects_bad_arguments():
    t = _tensors(amsgrad=False)
    with pytest.raises(ValueError, match="grads"):
        functional.adam_(t["params"], t["grads"][:2], t["exp_avgs"], t["exp_avg_sqs"], lr=1e-3, step=1)
    with pytest.raises(ValueError, match="amsgrad"):
        functional.adam_(t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], lr=1e-3, step=1, amsgrad=True)
    with pytest.raises(ValueError, match="step"):
        functional.adam_(t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        functional.adam_(t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], lr=float("nan"), step=1)
    with pytest.raises(ValueError, match="backend"):
        functional.adam_(t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], lr=1e-3, step=1, backend="x")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
def test_opcheck_with_master_weights_and_scaling(backend):
    t = _tensors(amsgrad=False)
    params = [p.bfloat16() for p in t["params"]]
    grads = [g.bfloat16() for g in t["grads"]]
    masters = [p.float() for p in params]
    args = (params, grads, t["exp_avgs"], t["exp_avg_sqs"], [], masters, t["state_steps"], 0.0, torch.tensor([1e-3]),
            0.9, 0.999, 1e-8, 0.01, False, True, True, None, torch.tensor(2.0), torch.tensor(0.0), backend)  # fmt: skip
    torch.library.opcheck(torch.ops.fused_ops.adam_.default, args)


@pytest.mark.parametrize("master", [False, True], ids=["", "master"])
def test_cpu_path_batches_low_precision_work(master):
    """The CPU path upcasts bf16 params/grads a cache-sized batch (2^18 elements) at a time: several batches,
    grad scaling and masters must all match the float64 oracle."""
    sizes = [150_001, 3, 200_000, 70_000]
    t = _tensors(sizes, amsgrad=True)
    t["params"] = [p.bfloat16() for p in t["params"]]
    t["grads"] = [(g * 64).bfloat16() for g in t["grads"]]
    masters = [p.float() for p in t["params"]] if master else None
    ref = {k: f64(v) if k != "state_steps" else [s.clone() for s in v] for k, v in t.items()}
    ref_masters = f64(masters) if master else ()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False)
    scale = torch.tensor(64.0)
    fused_ops.reference.adam_(**ref, decoupled=True, grad_scale=scale.double(), master_params=ref_masters, **kw)
    functional.adam_(**t, decoupled_weight_decay=True, grad_scale=scale, master_params=masters, backend="auto", **kw)
    for p, r in zip(masters if master else t["params"], ref_masters if master else ref["params"]):
        tol = 2e-6 if master else 2**-7
        torch.testing.assert_close(p.double(), r, atol=tol, rtol=tol)
    for m, r in zip(t["exp_avg_sqs"], ref["exp_avg_sqs"]):
        torch.testing.assert_close(m.double(), r, atol=1e-8, rtol=1e-5)
