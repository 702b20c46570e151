"""GPU tier for the optimizer family (FusedSGD, FusedLion, FusedAdamW with 8-bit or bf16 states, pure-bf16 with
stochastic rounding or Kahan summation): the compiled kernels through ``opt.step()`` on CUDA, against the
reference backend on CPU copies, and each step captured in a CUDA graph against eager steps (run by
benchmarks/gpu_check.sh on a lent GPU).

The same bodies run in the interpret tier on CPU (Triton under the interpreter against the reference backend, and
the capture test with eager steps in place of replays), so the tests themselves are exercised on every CI run; only
the ``gpu`` cases need a GPU.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import fused_ops

SEED = 11


def _configs():
    """(id, optimizer class, kwargs, param dtype, params compared within (atol, rtol) after the steps)."""
    return [
        ("sgd-momentum-dampening-wd", fused_ops.FusedSGD, dict(lr=0.05, momentum=0.9, dampening=0.1,
                                                               weight_decay=0.01), torch.float32, (1e-5, 1e-5)),
        ("sgd-nesterov-bf16-masters", fused_ops.FusedSGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                                               master_weights=True), torch.bfloat16, (1e-2, 2**-7)),
        # Lion: a sign; an update whose sign the two backends' roundings disagree on moves a param by 2 lr
        ("lion-wd", fused_ops.FusedLion, dict(lr=1e-3, weight_decay=0.1), torch.float32, (2.1e-3, 1e-5)),
        ("lion-bf16", fused_ops.FusedLion, dict(lr=1e-3), torch.bfloat16, (1e-2, 2**-7)),
        # 8-bit moments: a code that rounds the other way at a boundary moves an update by a few per cent
        ("adamw-int8", fused_ops.FusedAdamW, dict(lr=1e-3, weight_decay=0.01, state_dtype="int8"), torch.float32,
         (5e-4, 1e-5)),
        ("adamw-int8-bf16-masters", fused_ops.FusedAdamW, dict(lr=1e-3, state_dtype="int8", master_weights=True),
         torch.bfloat16, (1e-2, 2**-7)),
        ("adamw-bf16-states", fused_ops.FusedAdamW, dict(lr=1e-3, state_dtype="bfloat16"), torch.float32,
         (5e-4, 1e-5)),
        ("adamw-bf16-sr", fused_ops.FusedAdamW, dict(lr=1e-3, stochastic_rounding=True, seed=SEED), torch.bfloat16,
         (1e-2, 2**-6)),
        ("adamw-bf16-kahan", fused_ops.FusedAdamW, dict(lr=1e-3, kahan_summation=True, state_dtype="bfloat16"),
         torch.bfloat16, (1e-2, 2**-6)),
    ]  # fmt: skip


CONFIGS = _configs()
IDS = [c[0] for c in CONFIGS]
GPU_SIZES = (1, 255, 257, 4099, 70001)  # blocks of 256 and a tensor over a chunk of 65,536
CPU_SIZES = (1, 255, 257, 300)


def _params(sizes, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype).to(device)) for n in sizes]


def _grads(sizes, dtype, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(n, generator=g).to(dtype) for n in sizes]


def _compare_backends(device: str, sizes, cls, kwargs, dtype, tol, steps: int = 5) -> None:
    """``steps`` steps of the Triton backend on ``device`` against the reference backend on CPU, same inputs."""
    ours = _params(sizes, dtype, device, 0)
    ref = _params(sizes, dtype, "cpu", 0)
    o = cls(ours, backend="triton", **kwargs)
    r = cls(ref, backend="reference", **kwargs)
    for k in range(steps):
        for p, q, g in zip(ours, ref, _grads(sizes, dtype, k)):
            p.grad, q.grad = g.to(device), g.clone()
        o.step()
        r.step()
    if device == "cuda":
        torch.cuda.synchronize()
    atol, rtol = tol
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert torch.isfinite(p).all(), f"param {i} (size {sizes[i]}) has non-finite values"
        torch.testing.assert_close(p.detach().cpu().float(), q.detach().float(), atol=atol, rtol=rtol,
                                   msg=lambda m, i=i: f"param {i} (size {sizes[i]}): {m}")  # fmt: skip
    # the states have the same layout (keys, dtypes, shapes) on both backends
    for p, q in zip(ours, ref):
        a, b = o.state[p], r.state[q]
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key


def _graph_against_eager(device: str, sizes, cls, kwargs, dtype, capture: bool, steps: int = 3) -> None:
    """One optimizer steps eagerly; a twin (same params, grads and seed) is warmed up eagerly, then its step is
    captured in a CUDA graph and replayed with new grads copied into the same grad tensors: bit for bit the eager
    steps, step counts and random bits included. ``capture=False`` (CPU): the twin steps eagerly instead."""
    eager_params = _params(sizes, dtype, device, 1)
    graph_params = _params(sizes, dtype, device, 1)
    o_eager = cls(eager_params, backend="triton", **kwargs)
    o_graph = cls(graph_params, backend="triton", **kwargs)
    first = _grads(sizes, dtype, 0)
    for p, q, g in zip(eager_params, graph_params, first):
        p.grad, q.grad = g.to(device), g.to(device)
    o_eager.step()
    side = torch.cuda.Stream() if capture else None
    if capture:
        side.wait_stream(torch.cuda.current_stream())  # (the grads were copied on the default stream)
    with torch.cuda.stream(side) if capture else contextlib.nullcontext():
        o_graph.step()  # warm-up: creates the states and the plan; compiles the kernels
    if capture:
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_graph.step()
        replay = graph.replay
    else:
        replay = o_graph.step
    for k in range(1, steps + 1):
        grads = _grads(sizes, dtype, k)
        for p, q, g in zip(eager_params, graph_params, grads):
            p.grad = g.to(device)
            q.grad.copy_(g)  # (in place: the graph reads the grads where they were at its capture)
        o_eager.step()
        replay()
    if capture:
        torch.cuda.synchronize()
    for i, (p, q) in enumerate(zip(eager_params, graph_params)):
        assert torch.equal(p.view(-1).view(torch.uint8 if p.dtype != torch.float32 else torch.int32),
                           q.view(-1).view(torch.uint8 if q.dtype != torch.float32 else torch.int32)), i  # fmt: skip
    for p, q in zip(eager_params, graph_params):
        a, b = o_eager.state[p], o_graph.state[q]
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]) or (a[key].isnan() == b[key].isnan()).all(), key


# -- GPU ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_family_on_cuda_matches_the_reference_backend(cfg):
    _, cls, kwargs, dtype, tol = cfg
    _compare_backends("cuda", GPU_SIZES, cls, kwargs, dtype, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_family_step_captured_in_a_cuda_graph_equals_eager_steps(cfg):
    _, cls, kwargs, dtype, _ = cfg
    _graph_against_eager("cuda", GPU_SIZES, cls, kwargs, dtype, capture=True)


@pytest.mark.gpu
def test_capture_after_one_warm_up_step_in_a_fresh_process():
    """Each configuration's second step captured after one eager step, in a process where no other step ran: the
    capture must launch only kernel variants an eager step already loaded (a stream capture forbids loading a
    module: a variant first launched inside it fails the capture, as FusedSGD's first-step variant once did). The
    tests above run after other tests have loaded every variant, which would hide it."""
    code = ("import torch, tests.test_gpu_family as t\n"
            "for c in t.CONFIGS:\n"
            "    t._graph_against_eager('cuda', t.GPU_SIZES[:3], c[1], c[2], c[3], capture=True, steps=2)\n"
            "    print('ok', c[0], flush=True)\n")  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("ok ") == len(CONFIGS), r.stdout


@pytest.mark.gpu
def test_int8_adamw_on_10k_small_tensors_in_one_launch():
    """The bench's launch-bound set (10,000 small tensors): one prepared launch per part, every tensor stepped."""
    sizes = [1 + (7 * i) % 300 for i in range(10_000)]
    _compare_backends("cuda", sizes, fused_ops.FusedAdamW, dict(lr=1e-3, state_dtype="int8"), torch.float32,
                      (5e-4, 1e-5), steps=2)  # fmt: skip


# -- the same bodies on CPU, Triton under the interpreter (so a GPU run does not meet these tests for the first time) --
@pytest.mark.interpret
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_family_interpreted_matches_the_reference_backend(cfg):
    _, cls, kwargs, dtype, tol = cfg
    _compare_backends("cpu", CPU_SIZES, cls, kwargs, dtype, tol, steps=3)


# one configuration per prepared launch (SGDStep, LionStep, AdamLowbitStep with masters, and with stochastic
# rounding): the body is the same for all, the interpreter is slow
_BODY_IDS = ("sgd-nesterov-bf16-masters", "lion-bf16", "adamw-int8-bf16-masters", "adamw-bf16-sr")


@pytest.mark.interpret
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] in _BODY_IDS], ids=list(_BODY_IDS))
def test_family_graph_test_body_with_eager_steps(cfg):
    _, cls, kwargs, dtype, _ = cfg
    _graph_against_eager("cpu", CPU_SIZES, cls, kwargs, dtype, capture=False, steps=2)
