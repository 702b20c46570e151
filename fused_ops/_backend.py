"""Backend selection: which implementation an op runs ("triton" kernels or the "reference" torch code)."""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "reference")


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


# (once, at import: a ``functools.cache`` read from a ``torch.compile``d step made Dynamo warn of "silent
# incorrectness" at every compile, probe 73; fused_ops imports triton anyway, for its kernels)
_TRITON_AVAILABLE = _import_triton()


def triton_available() -> bool:
    """True when triton imports."""
    return _TRITON_AVAILABLE


def default_backend() -> str:
    """The backend named by ``FUSED_OPS_BACKEND`` (default ``auto``)."""
    value = os.environ.get("FUSED_OPS_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"FUSED_OPS_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def check_backend(backend: str | None) -> str:
    """Validate a ``backend=`` argument (None means the environment's default)."""
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return "triton" or "reference" for tensors on ``device``.

    ``auto`` picks the Triton kernels on CUDA tensors and plain torch elsewhere. ``triton`` on CPU tensors
    needs the Triton interpreter (``TRITON_INTERPRET=1``, tests only) and fails clearly without it.
    """
    backend = check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs triton, which failed to import")
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' got tensors on {device}: the Triton kernels run on CUDA tensors, or on CPU "
                "tensors only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton). "
                "Use backend='auto' or 'reference' for CPU tensors."
            )
    return backend


def no_autocast() -> contextlib.ExitStack:
    """Autocast turned off where it is on: an optimizer step computes in the dtypes it chose (the reference backend's
    ``torch.cat`` of bf16 states failed inside a float16 ``torch.autocast`` region, where torch.optim steps)."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack
