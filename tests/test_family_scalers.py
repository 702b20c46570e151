"""Loss scaling with every optimizer of the family: ``torch.amp.GradScaler`` and ``fused_ops.DynamicLossScaler``.

The optimizers take the scale and the inf flag on the device and unscale inside the step, so a run with scaled grads
(powers of two: dividing is exact) must equal, bit for bit, the same optimizer fed the unscaled grads, with the
overflowing step left out; the overflowing step changes nothing (params, every state, step counts); the scalers back
off and grow as they do for torch's optimizers.
"""

from __future__ import annotations

import pytest
import torch

import fused_ops

BACKENDS = ("triton", "reference")
STEPS = 6
BAD_STEP = 3  # an inf in one grad at this step

CONFIGS = {
    "sgd": (fused_ops.FusedSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), torch.float32),
    "lion": (fused_ops.FusedLion, dict(lr=1e-2, weight_decay=0.1), torch.float32),
    "adamw-int8": (fused_ops.FusedAdamW, dict(lr=1e-2, state_dtype="int8"), torch.float32),
    "adamw-bf16-states": (fused_ops.FusedAdamW, dict(lr=1e-2, state_dtype="bfloat16"), torch.float32),
    "adamw-bf16-sr": (fused_ops.FusedAdamW, dict(lr=1e-2, stochastic_rounding=True, seed=3), torch.bfloat16),
    "adamw-bf16-kahan": (fused_ops.FusedAdamW, dict(lr=1e-2, kahan_summation=True), torch.bfloat16),
    "sgd-master": (fused_ops.FusedSGD, dict(lr=0.05, momentum=0.9, master_weights=True), torch.bfloat16),
}
SHAPES = [(3, 5), (257,), (1,), (0,), (300, 2)]


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(k: int, dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return [(torch.randn(s, generator=g) * 0.5).to(dtype) for s in SHAPES]


def _snapshot(opt, params) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for p in params:
        out.extend(v.clone() for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor))
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


# every config on the reference backend; under the interpreter (slow), one per kernel and per low-bit mode
CASES = [(name, "reference") for name in CONFIGS] + [
    (name, "triton") for name in ("sgd", "lion", "adamw-int8", "adamw-bf16-sr", "adamw-bf16-kahan")
]


@pytest.mark.parametrize("name,backend", CASES)
def test_grad_scaler_equals_unscaled_grads(name, backend):
    cls, kw, dtype = CONFIGS[name]
    ours, twin = _params(dtype), _params(dtype)
    opt, ref = cls(ours, backend=backend, **kw), cls(twin, backend=backend, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    scaler.scale(torch.ones(()))  # (the scaler's state, made by its first scale())
    scales = []
    for k in range(STEPS):
        scale = scaler.get_scale()
        scales.append(scale)
        grads = _grads(k, dtype)
        for p, g in zip(ours, grads):
            p.grad = g * scale  # (exact: a power of two)
        if k == BAD_STEP:
            ours[0].grad[0, 0] = float("inf")
            before = _snapshot(opt, ours)
        scaler.step(opt)
        scaler.update()
        if k == BAD_STEP:
            assert _same(_snapshot(opt, ours), before), f"{name}: the overflowing step changed something"
            continue
        for p, g in zip(twin, grads):
            p.grad = g
        ref.step()
        assert _same(_snapshot(opt, ours), _snapshot(ref, twin)), f"{name}, step {k}"
    # torch's rule: x2 after every 2 good steps, /2 at the overflow
    assert scales == [1024.0, 1024.0, 2048.0, 2048.0, 1024.0, 1024.0], scales


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sgd", "adamw-int8"])
def test_dynamic_loss_scaler_with_clipping(name, backend):
    """``grad_scale_and_norm`` hands the optimizer the loss scale divided by the clip coefficient: unscale, clip and
    update in the one step; equals the optimizer fed the clipped unscaled grads (within fp32 rounding of the clip
    coefficient), and an overflow changes nothing and backs the scale off."""
    cls, kw, dtype = CONFIGS[name]
    ours, twin = _params(dtype), _params(dtype)
    opt, ref = cls(ours, backend=backend, **kw), cls(twin, backend=backend, **kw)
    scaler = fused_ops.DynamicLossScaler(init_scale=2.0**8, growth_interval=100, backend=backend, device="cpu")
    max_norm = 0.5
    for k in range(STEPS):
        scale = scaler.get_scale()
        grads = _grads(k, dtype)
        for p, g in zip(ours, grads):
            p.grad = g * scale
        if k == BAD_STEP:
            ours[1].grad[5] = float("nan")
            before = _snapshot(opt, ours)
        grad_scale, _ = scaler.grad_scale_and_norm([p.grad for p in ours], max_norm=max_norm)
        opt.step(grad_scale=grad_scale, found_inf=scaler.found_inf)
        skipped = bool(scaler.found_inf.item())
        scaler.update()
        assert skipped == (k == BAD_STEP)
        if skipped:
            assert _same(_snapshot(opt, ours), before), f"{name}: the overflowing step changed something"
            assert scaler.get_scale() == scale / 2
            continue
        for p, g in zip(twin, grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(twin, max_norm)
        ref.step()
        for a, b in zip(ours, twin):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-2,
                                       msg=lambda m, k=k: f"{name}, step {k}: {m}")  # fmt: skip
