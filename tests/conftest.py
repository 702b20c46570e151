"""Shared test set-up.

Without CUDA, the Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET=1 must be set
before triton is imported, so it is set here, before anything imports fused_ops. On a GPU machine it is
left alone, and the `gpu` tests run the compiled kernels (the interpret tests skip themselves there).
"""

import os
import zlib

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed per test (a CRC of its name: Python's str hash changes between runs), so
    inputs differ between tests and a failure reproduces. FUSED_OPS_TEST_SEED=N draws other inputs."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("FUSED_OPS_TEST_SEED", "0")))
    yield


# Two worker processes (pytest-xdist, a test extra) on a machine without CUDA: the interpreted kernels run Python
# on one core each, so the suite takes about half its serial time on two cores. FUSED_OPS_TEST_WORKERS=N sets the
# count (0: serial, as on a GPU machine, where the tests share one device); "-n" on the command line wins; --pdb,
# --trace and -s run serially.
WORKERS = int(os.environ.get("FUSED_OPS_TEST_WORKERS", "0" if torch.cuda.is_available() else "2"))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    debugging = any(getattr(config.option, k, False) for k in ("usepdb", "trace")) or config.option.capture == "no"
    if (WORKERS > 0 and config.pluginmanager.hasplugin("xdist") and getattr(config.option, "numprocesses", None) is None
            and not os.environ.get("PYTEST_XDIST_WORKER") and not debugging):  # fmt: skip
        config.option.numprocesses = WORKERS
        if getattr(config.option, "dist", "no") == "no":  # (a file's tests on one worker: its module fixtures,
            config.option.dist = "loadfile"  # often a spawn of ranks, run once)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (set automatically without CUDA)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not INTERPRET:
            item.add_marker(skip_interp)
