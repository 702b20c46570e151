"""Test helpers: tolerances per dtype, float64 copies, poisoning."""

from __future__ import annotations

import contextlib

import torch

# Max abs error allowed between a kernel's result and the float64 reference, for values of magnitude ~1
# after ONE step. fp32: a few ulp. bf16/fp16: the param is stored rounded to nearest (half an ulp: 2^-9
# for bf16, 2^-12 for fp16, relative), so the bound is one ulp at the largest magnitude in the test.
ATOL = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def f64(tensors):
    return [t.detach().to(torch.float64) for t in tensors]


def poison_(tensors):
    """Fill with NaN (keeps the tensors' identity)."""
    for t in tensors:
        t.fill_(float("nan"))


def assert_close_list(actual, expected, dtype, msg=""):
    assert len(actual) == len(expected), f"{msg}: {len(actual)} tensors vs {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{msg}[{i}] shape {a.shape} vs {e.shape}"
        assert not torch.isnan(a).any() or torch.isnan(e).any(), f"{msg}[{i}] has NaN (unwritten?)"
        where = f"{msg}[{i}]"
        torch.testing.assert_close(
            a.to(torch.float64),
            e.to(torch.float64),
            atol=ATOL[dtype],
            rtol=RTOL[dtype],
            msg=lambda m, w=where: f"{w}: {m}",
        )


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Fail on any read of a tensor's value by the host (.item(), bool(), float(), .tolist(), .cpu(), numpy)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a device value")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, forbidden)
        yield
