"""The optimizer custom ops called directly (``torch.ops.fused_ops.adam_`` / ``adam_lowbit_`` / ``sgd_`` /
``lion_``: public through the dispatcher, and what ``torch.compile`` runs): every bad argument gets a clear error
before anything is written, on both backends, with the checks of the Triton launch.

Before, the reference backend checked nothing: its ``torch._fused_adamw_`` / ``torch._fused_sgd_`` read a short
grad past its end or corrupted the heap (``free(): invalid next size``), and its plain-torch paths wrote weight
decay into the params before a broadcast error. Each case runs in a forked child, so a crash fails one test.
"""

from __future__ import annotations

import pytest
import torch

import fused_ops  # noqa: F401 (registers the ops)
from tests.safety import isolated

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpret)]
N = 1000


def _f32(n=N):
    return torch.randn(n)


def _adam_args(**over):
    a = dict(params=[_f32()], grads=[_f32()], exp_avgs=[torch.zeros(N)], exp_avg_sqs=[torch.zeros(N)],
             max_exp_avg_sqs=[], master_params=[], state_steps=[torch.zeros(())])  # fmt: skip
    a.update(over)
    return a


def _call_adam(a, backend):
    torch.ops.fused_ops.adam_(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["max_exp_avg_sqs"],
                              a["master_params"], a["state_steps"], 1e-3, None, 0.9, 0.999, 1e-8, 0.01, False, False,
                              True, None, None, None, backend)  # fmt: skip


def _lowbit_args(**over):
    a = dict(params=[_f32()], grads=[_f32()], exp_avgs=[torch.zeros(N, dtype=torch.uint8)],
             exp_avg_sqs=[torch.zeros(N, dtype=torch.uint8)], state_steps=[torch.zeros(())],
             exp_avg_scales=[torch.zeros(4)], exp_avg_sq_scales=[torch.zeros(4)], master_params=[],
             kahan_comps=[])  # fmt: skip
    a.update(over)
    return a


def _call_lowbit(a, backend):
    torch.ops.fused_ops.adam_lowbit_(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["state_steps"],
                                     a["exp_avg_scales"], a["exp_avg_sq_scales"], a["master_params"], a["kahan_comps"],
                                     "int8", False, 0, 1e-3, None, 0.9, 0.999, 1e-8, 0.01, False, True, None, None,
                                     backend)  # fmt: skip


def _sgd_args(**over):
    a = dict(params=[_f32()], grads=[_f32()], momentum_buffers=[torch.zeros(N)], master_params=[])
    a.update(over)
    return a


def _call_sgd(a, backend):
    torch.ops.fused_ops.sgd_(a["params"], a["grads"], a["momentum_buffers"], a["master_params"], 0.1, None, 0.9, 0.0,
                             0.01, False, False, False, None, None, backend)  # fmt: skip


def _lion_args(**over):
    a = dict(params=[_f32()], grads=[_f32()], exp_avgs=[torch.zeros(N)], master_params=[])
    a.update(over)
    return a


def _call_lion(a, backend):
    torch.ops.fused_ops.lion_(a["params"], a["grads"], a["exp_avgs"], a["master_params"], 0.1, None, 0.9, 0.99, 0.1,
                              False, None, None, backend)  # fmt: skip


OPS = {"adam_": (_adam_args, _call_adam), "adam_lowbit_": (_lowbit_args, _call_lowbit),
       "sgd_": (_sgd_args, _call_sgd), "lion_": (_lion_args, _call_lion)}  # fmt: skip

# (op, case, the bad arguments, the exception, what its message names)
CASES = [
    ("adam_", "short grad", lambda: dict(grads=[_f32(10)]), ValueError, "grads"),
    ("adam_", "short exp_avg_sq", lambda: dict(exp_avg_sqs=[torch.zeros(10)]), ValueError, "exp_avg_sqs"),
    ("adam_", "bf16 state", lambda: dict(exp_avgs=[torch.zeros(N, dtype=torch.bfloat16)]), TypeError, "exp_avgs"),
    ("adam_", "strided state", lambda: dict(exp_avgs=[torch.zeros(2 * N)[::2]]), ValueError, "contiguous"),
    ("adam_", "missing step", lambda: dict(state_steps=[]), ValueError, "state_steps"),
    ("adam_", "state aliases param", None, ValueError, "share"),
    ("adam_lowbit_", "short grad", lambda: dict(grads=[_f32(10)]), ValueError, "grads"),
    ("adam_lowbit_", "short codes", lambda: dict(exp_avgs=[torch.zeros(10, dtype=torch.uint8)]), ValueError,
     "exp_avgs"),
    ("adam_lowbit_", "too few scales", lambda: dict(exp_avg_scales=[torch.zeros(1)]), ValueError, "exp_avg_scales"),
    ("adam_lowbit_", "fp32 codes", lambda: dict(exp_avg_sqs=[torch.zeros(N)]), TypeError, "exp_avg_sqs"),
    ("sgd_", "short grad", lambda: dict(grads=[_f32(10)]), ValueError, "grads"),
    ("sgd_", "short buffer", lambda: dict(momentum_buffers=[torch.zeros(10)]), ValueError, "momentum_buffers"),
    ("sgd_", "no buffer", lambda: dict(momentum_buffers=[]), ValueError, "momentum_buffers"),
    ("sgd_", "fp64 grad", lambda: dict(grads=[torch.randn(N, dtype=torch.float64)]), TypeError, "grads"),
    ("lion_", "short grad", lambda: dict(grads=[_f32(10)]), ValueError, "grads"),
    ("lion_", "short exp_avg", lambda: dict(exp_avgs=[torch.zeros(10)]), ValueError, "exp_avgs"),
    ("lion_", "exp_avg aliases grad", None, ValueError, "share"),
]  # fmt: skip


def _bad_args(op, case, bad):
    make, _ = OPS[op]
    if case == "state aliases param":
        a = make()
        a["exp_avgs"] = [a["params"][0]]
        return a
    if case == "exp_avg aliases grad":
        a = make()
        a["exp_avgs"] = [a["grads"][0]]
        return a
    return make(**bad())


@pytest.mark.safety
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, case, bad, exc, names", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@isolated
def test_bad_arguments_raise_before_anything_is_written(op, case, bad, exc, names, backend):
    a = _bad_args(op, case, bad)
    call = OPS[op][1]
    before = _snapshot(a)
    with pytest.raises(exc) as info:
        call(a, backend)
    assert names in str(info.value), str(info.value)
    # every tensor's bytes, shape, strides and address as they were (not its version counter: the dispatcher bumps
    # those of an op's mutable arguments before the op runs, as for any in-place op of torch)
    assert _snapshot(a) == before


def _snapshot(a) -> dict:
    def bits(t):
        return t.detach().contiguous().view(-1).view(torch.uint8).tolist() if t.numel() else []

    return {(k, i): (t.dtype, tuple(t.shape), t.stride(), t.data_ptr(), bits(t))
            for k, lst in a.items() for i, t in enumerate(lst)}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_good_arguments_step(op, backend):
    """The checks refuse nothing the ops run: a good call moves the params, on both backends alike."""
    torch.manual_seed(0)
    make, call = OPS[op]
    a = make()
    before = a["params"][0].clone()
    call(a, backend)
    assert torch.isfinite(a["params"][0]).all() and not torch.equal(a["params"][0], before)


# -- the copy ops: a bad pair or segment after good ones (the plain-torch path copies tensor by tensor) --------------
F = torch.ops.fused_ops
COPY_CASES = {
    "cast_ short src": (lambda: dict(dst=[torch.zeros(7, dtype=torch.bfloat16), torch.zeros(N, dtype=torch.bfloat16)],
                                     src=[_f32(7), _f32(10)]),
                        lambda a, b: F.cast_(a["dst"], a["src"], False, None, b), "src"),
    "unscale_ short out": (lambda: dict(grads=[_f32(7), _f32()], out=[torch.zeros(7), torch.zeros(10)],
                                        inv_scale=[torch.full((1,), 0.5)], found_inf=[torch.zeros(1)]),
                           lambda a, b: F.unscale_(a["grads"], a["inv_scale"][0], 1.0, a["found_inf"][0], a["out"], b),
                           "out"),
    "unscale_ empty found_inf": (lambda: dict(grads=[_f32(7)], found_inf=[torch.zeros(0)]),
                                 lambda a, b: F.unscale_(a["grads"], None, 0.5, a["found_inf"][0], [], b), "found_inf"),
    "flatten_into_ segment past flat": (lambda: dict(flat=[torch.zeros(100)], tensors=[_f32(10), _f32(50)]),
                                        lambda a, b: F.flatten_into_(a["flat"][0], a["tensors"], [0, 64], [10, 50], b),
                                        "outside flat"),
    "flatten_into_ tensor longer than its span": (
        lambda: dict(flat=[torch.zeros(100)], tensors=[_f32(10), _f32(40)]),
        lambda a, b: F.flatten_into_(a["flat"][0], a["tensors"], [0, 64], [10, 30], b), "segment only"),
    "unflatten_copy_ segment past flat": (lambda: dict(flat=[_f32(100)], tensors=[torch.zeros(10), torch.zeros(50)]),
                                          lambda a, b: F.unflatten_copy_(a["tensors"], a["flat"][0], [0, 64], b),
                                          "outside flat"),
}  # fmt: skip


@pytest.mark.safety
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(COPY_CASES))
@isolated
def test_copy_ops_check_every_pair_before_writing(case, backend):
    make, call, names = COPY_CASES[case]
    a = make()
    before = _snapshot(a)
    with pytest.raises(ValueError) as info:
        call(a, backend)
    assert names in str(info.value), str(info.value)
    assert _snapshot(a) == before


# -- the copy ops: a written tensor sharing memory with another argument; inputs one backend would refuse -----------
def _shifted():
    return dict(base=[torch.arange(5120.0)])


OVERLAP_CASES = {
    "cast_": lambda a, b: F.cast_([a["base"][0][1024:]], [a["base"][0][:4096]], False, None, b),
    "unflatten_copy_": lambda a, b: F.unflatten_copy_([a["base"][0][1024:]], a["base"][0][:4096], [0], b),
    "flatten_into_": lambda a, b: F.flatten_into_(a["base"][0][1024:], [a["base"][0][:4096]], [0], [4096], b),
    "flatten_into_ overlapping segments": lambda a, b: F.flatten_into_(a["base"][0], [_f32(64), _f32(64)], [0, 32],
                                                                       [64, 64], b),
    "unscale_ out": lambda a, b: F.unscale_([a["base"][0][:4096]], None, 1.0, None, [a["base"][0][1024:]], b),
    "unscale_ found_inf in grads": lambda a, b: F.unscale_([a["base"][0][:4096]], None, 1.0, a["base"][0][100:101],
                                                           [], b),
}  # fmt: skip


@pytest.mark.safety
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OVERLAP_CASES))
def test_copy_ops_refuse_shared_memory_before_writing(case, backend):
    """Before, the Triton launch wrote a smeared copy (blocks read what earlier blocks had written) where the
    reference raised torch's overlap error (or, for unscale_ with out, accepted)."""
    a = _shifted()
    before = _snapshot(a)
    with pytest.raises(ValueError, match="share memory"):
        OVERLAP_CASES[case](a, backend)
    assert _snapshot(a) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_ops_still_take_an_exact_alias(backend):
    g = torch.full((100,), 4.0)
    F.unscale_([g], None, 0.5, None, [g], backend)
    F.cast_([g], [g], False, None, backend)
    assert torch.equal(g, torch.full((100,), 2.0))


x64 = torch.randn(64)
# (the call, the exception, what the message names): refused alike on both backends, before anything is written
DISAGREE_CASES = {
    "cast_ strided src": (lambda b: F.cast_([torch.zeros(16)], [x64[::4]], False, None, b), ValueError, "src[0]"),
    "cast_ int32 dst": (lambda b: F.cast_([torch.zeros(64, dtype=torch.int32)], [x64], False, None, b), TypeError,
                        "dst[0]"),
    "cast_ mixed dst": (lambda b: F.cast_([torch.zeros(4), torch.zeros(4).half()], [x64[:4], x64[4:8]], False, None,
                                          b), ValueError, "dst[1]"),
    "unscale_ int found_inf": (lambda b: F.unscale_([x64.clone()], None, 0.5, torch.zeros(1, dtype=torch.int32), [],
                                                    b), ValueError, "found_inf"),
    "unscale_ int inv_scale": (lambda b: F.unscale_([x64.clone()], torch.tensor([2]), 0.0, None, [], b), ValueError,
                               "inv_scale"),
    "unscale_ inv_scale over fp32": (lambda b: F.unscale_([x64.clone()], None, 1e39, None, [], b), ValueError,
                                     "inv_scale"),
    "unscale_ strided grads": (lambda b: F.unscale_([x64.clone()[::2]], None, 0.5, None, [], b), ValueError,
                               "grads[0]"),
    "flatten_into_ other dtype": (lambda b: F.flatten_into_(torch.zeros(64, dtype=torch.bfloat16), [x64], [0], [64],
                                                            b), ValueError, "tensors[0]"),
    "flatten_into_ strided flat": (lambda b: F.flatten_into_(torch.zeros(128)[::2], [x64], [0], [64], b), ValueError,
                                   "flat"),
    "grad_norm p=-1": (lambda b: F.grad_norm([x64], -1.0, b), ValueError, "norm_type"),
    "grad_norm p=0": (lambda b: F.grad_norm([x64], 0.0, b), ValueError, "norm_type"),
    "grad_norm p=nan": (lambda b: F.grad_norm([x64], float("nan"), b), ValueError, "norm_type"),
    "grad_norm mixed": (lambda b: F.grad_norm([x64, x64.half()], 2.0, b), ValueError, "tensors[1]"),
    "flatten align=0": (lambda b: F.flatten([x64], 0, b), ValueError, "align"),
    "flatten align=-64": (lambda b: F.flatten([torch.zeros(64), torch.arange(100.0)], -64, b), ValueError, "align"),
    "flatten []": (lambda b: F.flatten([], 8, b), ValueError, "tensors"),
}  # fmt: skip


@pytest.mark.safety
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DISAGREE_CASES))
def test_copy_ops_refuse_alike_on_both_backends(case, backend):
    """Before, the reference backend accepted these (grad_norm with p=0 returned 1.0; flatten with align=-64
    truncated a tensor) or raised ZeroDivisionError/IndexError, where the Triton launch refused them."""
    call, exc, names = DISAGREE_CASES[case]
    before = x64.clone()
    with pytest.raises(exc) as info:
        call(backend)
    assert names in str(info.value), str(info.value)
    assert torch.equal(x64, before)
