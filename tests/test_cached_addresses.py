"""What the kernels and the scaler keep between calls, checked at every call (probe 60).

- The public launchers of ``fused_ops.kernels`` (``cast_launch``, ``unscale_launch``, ``norm_launch``,
  ``flatten_launch``) refuse a tensor outside its storage (freed or shrunk in place); ``flatten_launch``'s segment
  table, cached by ``flat``'s address, skipped the only guard when ``flat`` came back smaller at that address.
- The 8-bit quantisation maps every int8 launch reads through their addresses are private and checked at every
  launch; ``quant_maps()`` hands out copies (writing the live ones changed every later int8 step).
- A step launch interrupted part way (the interpreter on ``KeyboardInterrupt``) leaves no arrival counter moved in
  its cached chunk table (every later step on those tensors stepped part of each with the next step's count).
- ``DynamicLossScaler`` forgets the unscaled spans of grads freed in place (``untyped_storage().resize_(0)``), and
  its cache of its own state's memory follows a state tensor given more bytes at its address.
"""

from __future__ import annotations

import pytest
import torch
import triton.runtime.interpreter as interp
from fused_ops.kernels import adam_lowbit
from fused_ops.kernels.cast import cast_launch
from fused_ops.kernels.flatten import flatten_launch
from fused_ops.kernels.scale import norm_launch, unscale_launch

from fused_ops import DynamicLossScaler, FusedAdamW
from fused_ops import functional as F

from .safety import isolated

pytestmark = pytest.mark.safety

N = 4096


def _freed(n: int = N) -> torch.Tensor:
    t = torch.randn(n)
    t.untyped_storage().resize_(0)
    return t


@pytest.mark.parametrize(
    "call",
    [
        lambda: cast_launch([torch.empty(N, dtype=torch.bfloat16)], [_freed()]),
        lambda: cast_launch([_freed()], [torch.randn(N)]),
        lambda: unscale_launch([_freed()], 0.5, torch.zeros(1)),
        lambda: norm_launch([torch.randn(N), _freed()]),
        lambda: flatten_launch(torch.zeros(2 * N), [_freed()], [0], [N]),
    ],
    ids=["cast_src", "cast_dst", "unscale", "norm", "flatten"],
)
@isolated
def test_raw_launchers_refuse_tensors_outside_their_storage(call):
    with pytest.raises(ValueError, match="lies outside its storage"):
        call()


@isolated
def test_flatten_launch_checks_flat_at_every_call():
    for _ in range(40):
        flat, tensors = torch.zeros(N), [torch.randn(N // 2), torch.randn(N // 2)]
        flatten_launch(flat, tensors, [0, N // 2], [N // 2, N // 2])  # (its segment table is cached now)
        old, storage = flat.data_ptr(), flat.untyped_storage()
        for k in range(flat.nbytes - 16, flat.nbytes // 2, -512):
            storage.resize_(0)
            storage.resize_(k)
            if flat.data_ptr() == old:
                break
        if flat.data_ptr() == old:
            break
    else:
        pytest.fail("the allocator never returned the same address")
    with pytest.raises(ValueError, match="flat lies outside its storage"):
        flatten_launch(flat, tensors, [0, N // 2], [N // 2, N // 2])


def _int8_run(tamper=None) -> torch.Tensor:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    opt = FusedAdamW([p], lr=1e-2, state_dtype="int8", backend="triton")
    for i in range(3):
        p.grad = torch.randn(1000)
        opt.step()
        if i == 0 and tamper is not None:
            tamper()
    return p.detach().clone()


@pytest.mark.parametrize("how", ["write_copy", "write_live", "free_live"])
@isolated
def test_quant_maps_are_private_and_checked(how):
    clean = _int8_run()
    device = torch.device("cpu")

    def tamper():
        if how == "write_copy":
            adam_lowbit.quant_maps(device)[0].mul_(3.0)
        elif how == "write_live":
            adam_lowbit._MAPS[device][0][0].mul_(3.0)
        else:
            adam_lowbit._MAPS[device][0][1].untyped_storage().resize_(0)

    assert torch.equal(_int8_run(tamper), clean)
    signed, unsigned = adam_lowbit.quant_maps(device)
    assert signed.numel() == unsigned.numel() == 256 and signed.data_ptr() != adam_lowbit._MAPS[device][0][0].data_ptr()


def test_interrupted_launch_leaves_no_counter_moved(monkeypatch):
    n = 65536 * 2  # two programs per tensor (chunk size 65536): the first to arrive is not the last
    torch.manual_seed(0)
    g = torch.randn(n)
    state = [torch.randn(n), torch.zeros(n), torch.zeros(n), torch.zeros(())]

    def step(p, m, v, s):
        F.adam_([p], [g], [m], [v], None, [s], lr=1e-3, backend="triton")

    step(*state)
    original = interp.InterpreterBuilder.create_atomic_rmw
    calls = [0]

    def interrupting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 1:
            raise KeyboardInterrupt  # (right after the tensor's first program arrived)
        return out

    monkeypatch.setattr(interp.InterpreterBuilder, "create_atomic_rmw", interrupting)
    with pytest.raises(KeyboardInterrupt):
        step(*state)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_atomic_rmw", original)
    copies = [t.clone() for t in state]  # (the same values at new addresses: a fresh chunk table)
    for _ in range(2):
        step(*state)
        step(*copies)
    for a, b in zip(state, copies):
        assert torch.equal(a, b), "the cached table stepped other than a fresh one"


def test_scaler_forgets_grads_freed_in_place():
    for _ in range(40):
        scaler = DynamicLossScaler(device="cpu", backend="reference")
        a = torch.randn(N)
        scaler.unscale_([a])  # model A's grads, unscaled, then freed in place
        addr = a.data_ptr()
        a.untyped_storage().resize_(0)
        b = torch.randn(N)  # model B's grads, never unscaled
        if b.data_ptr() == addr:
            break
    else:
        pytest.fail("the allocator never returned the same address")
    scaler.unscale_([b])  # (it was refused as already unscaled)
    with pytest.raises(RuntimeError, match="already unscaled"):
        scaler.unscale_([b])


def test_scaler_state_given_more_bytes_is_still_refused_as_out():
    scaler = DynamicLossScaler(device="cpu", backend="reference")
    big = torch.zeros(64, dtype=torch.int64)
    skipped = scaler.skipped_steps_tensor  # (the scaler's own counter, handed out)
    skipped.set_(big.untyped_storage(), 0, (1,), (1,))
    g = torch.randn(16)
    scaler.unscale_([g])
    scaler.update()  # (the state's spans cached: skipped_steps is 8 bytes at big's address)
    skipped.set_(big.untyped_storage(), 0, (64,), (1,))  # (the same address, 512 bytes now)
    out = big.view(torch.float32)[32:48]  # (bytes 128..192 of big: inside skipped_steps now)
    with pytest.raises(ValueError, match="shares memory with the scaler's own skipped_steps"):
        scaler.unscale_([g], out=[out])


def test_flatten_op_names_a_shrunk_flat():
    flat = torch.zeros(N)
    flat.untyped_storage().resize_(16)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match="flat.* lies outside its storage"):
            torch.ops.fused_ops.flatten_into_(flat, [torch.randn(N)], [0], [N], backend)
