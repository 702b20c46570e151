"""Asynchronous interruptions (a KeyboardInterrupt at any line) inside the optimizers' calls: what the next call
then does must follow from the state the optimizer shows."""

import copy
import sys

import torch
import torch.optim.optimizer as topt

from fused_ops import FusedAdamW


def _build():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64).bfloat16()) for _ in range(2)]
    opt = FusedAdamW(ps, lr=1e-2, master_weights=True, backend="reference")
    for p in ps:
        p.grad = torch.randn(64).bfloat16()
    opt.step()
    return ps, opt


def _load_then_step(ckpt, interrupt):
    ps, opt = _build()
    interrupted = False
    if interrupt:  # a KeyboardInterrupt once torch's Optimizer.__setstate__ has swapped in the loaded state
        code = topt.Optimizer.__setstate__.__code__

        def tracer(frame, event, arg):
            if frame.f_code is not code:
                return None

            def local(frame, event, arg):
                if event == "line" and frame.f_lineno > code.co_firstlineno + 1:
                    sys.settrace(None)
                    raise KeyboardInterrupt
                return local

            return local

        sys.settrace(tracer)
    try:
        opt.load_state_dict(copy.deepcopy(ckpt))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sys.settrace(None)
    visible = copy.deepcopy(opt.state_dict())
    g = torch.Generator().manual_seed(5)
    for p in ps:
        p.grad = torch.randn(64, generator=g).bfloat16()
    opt.step()
    return interrupted, visible, [p.detach().clone() for p in ps]


def test_load_interrupted_after_the_state_is_swapped_in_still_lets_the_params_win():
    """(probe 50) The interrupted load shows the loaded state; its next step must then be a completed load's next
    step: every master compared with its param, the params winning where they differ (not the loaded masters
    trusted because the marks of before the load were left)."""
    ps_o, opt_o = _build()
    for p in ps_o:
        p.grad = torch.randn(64).bfloat16()
    opt_o.step()
    ckpt = copy.deepcopy(opt_o.state_dict())  # (masters that differ from the params of a new run)
    _, visible_ok, after_ok = _load_then_step(ckpt, interrupt=False)
    interrupted, visible, after = _load_then_step(ckpt, interrupt=True)
    assert interrupted
    for i, st in visible_ok["state"].items():
        for k, v in st.items():
            assert torch.equal(v, visible["state"][i][k]), k
    assert all(torch.equal(a, b) for a, b in zip(after_ok, after))
