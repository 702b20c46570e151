"""Values the step reads that are valid Python numbers but not float32 numbers, or that changed in place where no
check reads them (device values): a clear error before anything changes, or torch's inf/NaN on both backends alike,
never an exception half-way through a step.

- Hyper-parameters above float32's range (1e39, 10**400): the kernels compute in float32, where they are inf, and
  torch's fused kernels refuse them ("value cannot be converted to type float without overflow"). Before, they
  were accepted, and FusedLion's reference path raised after an earlier group had stepped.
- A step count edited in place after the plan was built (``state["step"].fill_(-1.0)``, NaN): its value is a
  device value, checked when a plan is built or a state dict is loaded, not at every step (a host sync). The step
  then gives inf/NaN on both backends, as torch's does. Before, the low-bit CPU path raised ZeroDivisionError or
  a math domain error after the first tensors and their step counts were written.
"""

from __future__ import annotations

import pytest
import torch

import fused_ops
from tests.safety import expect_error_unchanged, isolated, message_names

pytestmark = pytest.mark.safety

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpret)]
HUGE = [1e39, 10**400, float("nan")]
CASES = [
    (fused_ops.FusedAdamW, {}, ["lr", "eps", "weight_decay"]),
    (fused_ops.FusedAdamW, dict(state_dtype="int8"), ["lr", "eps", "weight_decay"]),
    (fused_ops.FusedSGD, dict(momentum=0.9), ["lr", "momentum", "weight_decay"]),
    (fused_ops.FusedLion, {}, ["lr", "weight_decay"]),
]
NAMES = {"lr": "learning rate", "eps": "epsilon", "weight_decay": "weight_decay", "momentum": "momentum"}


def _two_groups(cls, kwargs, backend):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    a.grad, b.grad = torch.randn(4), torch.randn(3)
    return cls([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("cls", "kwargs", "names"), CASES, ids=["adamw", "adamw_int8", "sgd", "lion"])
def test_hyperparameters_outside_float32_are_refused(cls, kwargs, names, backend):
    for name in names:
        for value in HUGE:
            with pytest.raises(ValueError, match=f"Invalid {NAMES[name]}"):
                cls([torch.nn.Parameter(torch.randn(3))], **{**kwargs, name: value})
            opt = _two_groups(cls, kwargs, backend)
            opt.step()  # (a plan exists: the edited value is checked on the reused path too)
            opt.param_groups[1][name] = value
            err = expect_error_unchanged(opt.step, ValueError, f"Invalid {NAMES[name]}", opt)
            message_names(err, "param group 1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_beta_of_two_elements_is_named(backend):
    opt = _two_groups(fused_ops.FusedAdamW, {}, backend)
    opt.param_groups[1]["betas"] = (torch.tensor([0.9, 0.8]), torch.tensor(0.999))
    err = expect_error_unchanged(opt.step, ValueError, "betas\\[0\\] must be 1-element", opt)
    message_names(err, "param group 1")


STEP_KINDS = {
    "fp32": (torch.float32, {}),
    "int8": (torch.float32, dict(state_dtype="int8")),
    "bf16_states": (torch.float32, dict(state_dtype="bfloat16")),
    "stochastic_rounding": (torch.bfloat16, dict(master_weights=False, stochastic_rounding=True)),
}


def _edited_step_run(kind: str, value: float, backend: str) -> list[torch.Tensor]:
    dtype, kwargs = STEP_KINDS[kind]
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in (300, 307)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    opt = fused_ops.FusedAdamW(params, lr=0.1, backend=backend, **kwargs)
    opt.step()
    opt.state[params[1]]["step"].fill_(value)  # (in place: the plan is reused)
    opt.step()
    assert opt.state[params[0]]["step"].item() == 2.0
    return [p.detach().float() for p in params]


@pytest.mark.interpret
@pytest.mark.parametrize("value", [-1.0, float("nan")])
@pytest.mark.parametrize("kind", list(STEP_KINDS))
@isolated
def test_step_count_edited_in_place_gives_the_same_nan_on_both_backends(kind, value):
    """Step -1 becomes 0 (a zero bias correction: an inf step size), NaN stays NaN: the edited tensor's update is
    inf/NaN on both backends, the other tensor steps normally, and no backend raises half-way."""
    ref = _edited_step_run(kind, value, "reference")
    tri = _edited_step_run(kind, value, "triton")
    assert torch.isfinite(ref[0]).all() and torch.isfinite(tri[0]).all()
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-6, atol=1e-6)
    assert not torch.isfinite(ref[1]).any() and not torch.isfinite(tri[1]).any()
