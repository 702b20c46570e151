"""Module conversions under a live optimizer, with ``torch.__future__.set_swap_module_params_on_conversion(True)``:
torch converts params and grads with ``torch.utils.swap_tensors``, which refuses a tensor that has weak references.
The optimizers' prepared launches held weak references to the grads they were built with, so ``model.half()`` (and
even the no-op ``model.float()``) failed half-way once the grads were kept (``zero_grad(set_to_none=False)``),
leaving the model half converted and one grad lost; torch.optim converts fine."""

from __future__ import annotations

import pytest
import torch

import fused_ops
from tests.test_zero_module_ops import _swap_flag

pytestmark = pytest.mark.interpret

MAKERS = {
    "adamw": lambda ps: fused_ops.FusedAdamW(ps, lr=1e-2, backend="triton"),
    "adamw_int8": lambda ps: fused_ops.FusedAdamW(ps, lr=1e-2, state_dtype="int8", backend="triton"),
    "sgd": lambda ps: fused_ops.FusedSGD(ps, lr=1e-2, momentum=0.9, backend="triton"),
    "lion": lambda ps: fused_ops.FusedLion(ps, lr=1e-3, backend="triton"),
}


@pytest.fixture
def swap_on_conversion():
    with _swap_flag(True):
        yield


@pytest.mark.parametrize("name", list(MAKERS))
def test_conversions_with_swap_tensors_after_a_step(name, swap_on_conversion):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = MAKERS[name](model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # (grads kept, zeroed in place)
    params = list(model.parameters())
    model.float()  # a no-op conversion
    model.to("cpu")
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 4
    model.double()
    assert [p.dtype for p in model.parameters()] == [torch.float64] * 4
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters())
    assert list(model.parameters()) == params  # (swapped in place: the optimizer's params are the model's)
    model.float()
    model(torch.randn(5, 4)).sum().backward()
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before))
