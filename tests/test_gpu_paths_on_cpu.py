"""Code paths that only a GPU reaches, driven on the CPU through stand-ins (probe 81).

A CUDA tensor is stood for by a tensor subclass reporting a CUDA device, or a CUDA call by a recorder: enough to
check which copy or synchronisation the code asks for, not how a GPU then runs it (the ``gpu`` tier does that).
"""

from __future__ import annotations

import torch

from fused_ops import buffers, functional

TRUE_SCALE = 1 / 1024


class _CudaScale(torch.Tensor):
    """A 1-element ``inv_scale`` as it would be on a CUDA device (a loss scaler's, with grads offloaded to the host).

    A non-blocking copy of a CUDA tensor to the host returns before the copy has run (torch gives it a pinned
    result the copy fills later): stood for by a result holding what that memory held before (0.5 here)."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    copies: list = []

    @property
    def device(self):
        return torch.device("cuda", 0)

    def detach(self):
        return self

    def reshape(self, *shape):
        return self

    def to(self, device, *args, non_blocking=False, **kwargs):
        _CudaScale.copies.append((str(device), non_blocking))
        return torch.full((1,), 0.5 if non_blocking else TRUE_SCALE)


def test_a_device_scale_is_moved_to_host_grads_with_a_blocking_copy():
    # (unscale_ and clip_grad_norm_ over grads on the host with a scale on a GPU: the host op reads the scale at
    # once, so its copy must have landed; it was a non-blocking copy, read before it landed)
    _CudaScale.copies.clear()
    inv_scale = torch.full((1,), TRUE_SCALE).as_subclass(_CudaScale)
    grads = [torch.full((5,), 1024.0), torch.full((3,), -2048.0)]
    launches = functional._prepare_unscale(
        "unscale_", grads, [], inv_scale, None, "reference", {torch.device("cpu")}, {torch.float32}, set()
    )
    functional._run_unscale(launches)
    assert _CudaScale.copies == [("cpu", False)]
    assert grads[0].tolist() == [1.0] * 5 and grads[1].tolist() == [-2.0] * 3


def test_params_left_on_their_pinned_host_copies_are_synchronized(monkeypatch):
    # FlatBuffer.from_params(stage_on_host=True) after an error: a param that cannot be put back on its device stays
    # on its host copy, written by a non-blocking device-to-host copy: the device is synchronised before the error
    # reaches the caller, who may read that param at once. (Here "cuda" cannot allocate: the put-back fails.)
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    p = torch.nn.Parameter(torch.arange(6.0))
    host = torch.arange(6.0)
    staged = [(0, host, (None, 0, torch.Size([6]), (1,), torch.float32, torch.device("cuda", 0)))]
    p.data = host
    error = MemoryError("out of memory")
    buffers._unstage([p], staged, error)
    assert synced == [torch.device("cuda", 0)]
    assert p.data is host or p.data.data_ptr() == host.data_ptr()
    assert any("could not be put back" in n for n in getattr(error, "__notes__", []))


def test_params_put_back_need_no_synchronisation(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    p = torch.nn.Parameter(torch.arange(4.0))
    original = p.data
    host = original.clone()
    staged = [(0, host, buffers._where(p))]
    p.data = host
    buffers._unstage([p], staged, MemoryError("out of memory"))
    assert synced == [] and p.data.data_ptr() == original.data_ptr()
