"""The device and the environment: which device to run on, its name, and the header of a results JSON."""

from __future__ import annotations

import contextlib
import datetime
import platform
import re
from typing import Any

import torch

import fused_ops


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device found")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def device_label(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` on CUDA; ``CPU: <model> (<n> threads)`` on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU: {cpu_name()} ({n} thread{'s' if n != 1 else ''})"


def device_slug(device: torch.device | None = None) -> str:
    """File-name form of the device: ``nvidia-h100-80gb-hbm3``, or ``cpu``."""
    device = device or pick_device()
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def triton_version() -> str | None:
    """The installed triton's version, or None."""
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def environment(device: torch.device) -> dict[str, Any]:
    """The header of a results JSON: device, versions, date."""
    return {
        "device": device_label(device),
        "device_kind": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "fused_ops": getattr(fused_ops, "__version__", None),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": fused_ops.resolve_backend(None, device),
        **(_cuda_properties(device) if device.type == "cuda" else {}),
    }


def _cuda_properties(device: torch.device) -> dict[str, Any]:
    """Memory, compute capability and SM count of a CUDA device (for the JSON header)."""
    try:
        props = torch.cuda.get_device_properties(device)
        return {"device_memory_gb": round(props.total_memory / 1e9, 1), "device_capability": f"{props.major}."
                f"{props.minor}", "device_sms": props.multi_processor_count}  # fmt: skip
    except Exception:  # pragma: no cover - a header field must not stop the run
        return {}
