"""Harness of the safety tier (``pytest -m safety``): bad or changed input must raise a clear error and change
nothing, or give torch's result; no input may crash the process.

- :func:`isolated` runs a test body in a forked child, so a segfault or an abort fails that one test (with the
  signal's name) instead of killing the run. The child reports an exception's text back to the parent.
- :func:`snapshot` / :func:`assert_unchanged`: every tensor reachable from the objects given (optimizer params,
  grads, states, param groups, scalers, buffers, plain lists and dicts), compared bit for bit (NaN payloads
  included) together with dtype, shape, strides, device and address.
- :func:`expect_error_unchanged`: both at once: the call raises the expected type, the message matches, and
  every tensor is bit-identical to before.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

# ---------------------------------------------------------------------------------------------------------
# crash isolation


def _run_child(fn: Callable, args, kwargs, write_fd: int) -> None:
    try:
        fn(*args, **kwargs)
        result = ("ok", None)
    except pytest.skip.Exception as e:  # (a skip inside the child skips the test)
        result = ("skip", str(e))
    except BaseException as e:  # noqa: BLE001 (everything goes back to the parent)
        result = ("error", (type(e).__name__, "".join(traceback.format_exception(e))))
    data = pickle.dumps(result)
    with os.fdopen(write_fd, "wb") as f:
        f.write(data)


CHILD_TIMEOUT_S = 300


def run_isolated(fn: Callable, *args, timeout: float = CHILD_TIMEOUT_S, **kwargs) -> None:
    """Run ``fn(*args, **kwargs)`` in a forked child; re-raise its failure here (as ``AssertionError`` with the
    child's traceback), and fail with the signal's name if the child died of one (segfault, abort), or after
    ``timeout`` seconds (the child is killed) if it hangs.

    The child runs torch on one thread: GNU OpenMP is not fork-safe (a parallel region in a forked child waits
    forever for the parent's pool threads), so an intra-op parallel kernel would hang it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            torch.set_num_threads(1)
            _run_child(fn, args, kwargs, write_fd)
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)  # no atexit handlers, no pytest teardown in the child
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + timeout
    with os.fdopen(read_fd, "rb") as f:
        while True:
            ready, _, _ = select.select([f], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"the isolated child hung: killed after {timeout} s")
            chunk = os.read(f.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        raise AssertionError(f"the process crashed: killed by {signal.Signals(sig).name}")
    if not data:
        raise AssertionError(f"the child exited with status {os.WEXITSTATUS(status)} and reported nothing")
    kind, payload = pickle.loads(data)
    if kind == "skip":
        pytest.skip(payload)
    if kind == "error":
        name, text = payload
        raise AssertionError(f"in the isolated child: {name}\n{text}")


def isolated(fn: Callable) -> Callable:
    """Decorator: the test body runs in a forked child (see :func:`run_isolated`). Works with fixtures and with
    hypothesis (each example forks once)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        run_isolated(fn, *args, **kwargs)

    return wrapper


def step_messages(opt: Any, times: int = 2) -> list[str | None]:
    """``opt.step()`` ``times`` times: each RuntimeError's message, None where a step worked (a refusal must raise
    again, the same, as nothing changed)."""
    messages: list[str | None] = []
    for _ in range(times):
        try:
            opt.step()
            messages.append(None)
        except RuntimeError as e:
            messages.append(str(e))
    return messages


# ---------------------------------------------------------------------------------------------------------
# snapshots


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (a copy), so NaN payloads and signed zeros compare exactly."""
    x = t.detach()
    if x.is_sparse:
        x = x.to_dense()
    if not x.numel():
        return torch.empty(0, dtype=torch.uint8)
    if x.is_meta or not _within_storage(x):  # no data: compared by metadata (reading would crash)
        return torch.tensor([x.is_meta, x.untyped_storage().nbytes() if not x.is_meta else 0])
    flat = torch.empty(x.numel(), dtype=x.dtype).copy_(x.reshape(-1))  # (a fresh, truly contiguous copy)
    return flat.view(torch.uint8)


def _within_storage(x: torch.Tensor) -> bool:
    """Every element of ``x`` lies inside its storage (not so after ``untyped_storage().resize_(0)``)."""
    if x.data_ptr() == 0:
        return False
    last = x.storage_offset() + sum((n - 1) * st for n, st in zip(x.shape, x.stride()) if st > 0)
    return x.untyped_storage().nbytes() >= (last + 1) * x.element_size()


def _meta(t: torch.Tensor) -> tuple:
    if t.is_sparse:
        return ("sparse", t.dtype, tuple(t.shape), str(t.device))
    version = None if t.is_inference() else t._version  # (inference tensors have no version counter)
    return (t.dtype, tuple(t.shape), t.stride(), str(t.device), t.data_ptr(), version)


def _walk(obj: Any, path: str, out: dict, seen: set) -> None:
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key in seen:
            return
        seen.add(key)
        out[path] = (obj, _meta(obj), _bits(obj))
        if obj.grad is not None:
            _walk(obj.grad, path + ".grad", out, seen)
        return
    if id(obj) in seen:
        return
    if isinstance(obj, torch.optim.Optimizer):
        seen.add(id(obj))
        for gi, group in enumerate(obj.param_groups):
            for k, v in group.items():
                _walk(v, f"{path}.param_groups[{gi}][{k!r}]", out, seen)
                if k != "params":
                    out[f"{path}.param_groups[{gi}][{k!r}] (value)"] = (None, _plain(v), None)
        params = [p for g in obj.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        out[f"{path}.state keys"] = (None, sorted(index.get(id(p), -1) for p in obj.state), None)
        for p, st in obj.state.items():
            _walk(st, f"{path}.state[param {index.get(id(p), '?')}]", out, seen)
        for name in ("grad_scale", "found_inf"):
            if hasattr(obj, name):
                _walk(getattr(obj, name), f"{path}.{name}", out, seen)
        return
    if isinstance(obj, dict):
        seen.add(id(obj))
        out[path + " keys"] = (None, sorted(map(repr, obj.keys())), None)
        for k, v in obj.items():
            _walk(v, f"{path}[{k!r}]", out, seen)
        return
    if isinstance(obj, list | tuple):
        seen.add(id(obj))
        out[path + " len"] = (None, len(obj), None)
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", out, seen)
        return
    if isinstance(obj, int | float | str | bool | type(None)):
        out[path] = (None, _plain(obj), None)
        return
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        seen.add(id(obj))
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor | dict | list | tuple | int | float | bool) or hasattr(v, "__dict__"):
                _walk(v, f"{path}.{k}", out, seen)


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape))
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, list | tuple):
        return tuple(_plain(x) for x in v)
    if isinstance(v, int | float | str | bool | type(None)):
        return v
    return type(v).__name__


def snapshot(*objs: Any) -> dict:
    """Everything tensor-valued reachable from ``objs`` (optimizers: groups, params, grads, states), with bytes."""
    out: dict = {}
    seen: set = set()
    for i, obj in enumerate(objs):
        _walk(obj, f"arg{i}", out, seen)
    return out


def assert_unchanged(before: dict, after: dict, versions: bool = True) -> None:
    """Every entry of two snapshots equal: same keys, tensors with the same identity, metadata and bytes (and
    version counters, unless ``versions`` is False: the dispatcher bumps those of a custom op's mutated arguments
    even when the op raises)."""
    assert before.keys() == after.keys(), (
        f"what the objects hold changed: added {sorted(after.keys() - before.keys())[:5]}, "
        f"removed {sorted(before.keys() - after.keys())[:5]}"
    )
    for path, (t0, meta0, bits0) in before.items():
        t1, meta1, bits1 = after[path]
        if t0 is None:
            assert meta0 == meta1, f"{path} changed: {meta0!r} -> {meta1!r}"
            continue
        assert t0 is t1, f"{path} is another tensor now"
        # (the version counter may move when a failed call bumped nothing but ran a no-op in-place op: compare it)
        if not versions:
            meta0, meta1 = meta0[:-1], meta1[:-1]
        assert meta0 == meta1, f"{path} metadata changed: {meta0} -> {meta1}"
        assert torch.equal(bits0, bits1), f"{path} values changed"


def expect_error_unchanged(call: Callable[[], Any], exc: type | tuple, match: str, *objs: Any,
                           versions: bool = True) -> BaseException:  # fmt: skip
    """``call()`` must raise ``exc`` with a message matching ``match`` (regex) and leave every tensor reachable
    from ``objs`` bit-identical (``versions``: see :func:`assert_unchanged`). Returns the exception."""
    before = snapshot(*objs)
    with pytest.raises(exc, match=match) as info:
        call()
    assert_unchanged(before, snapshot(*objs), versions)
    return info.value


def message_names(err: BaseException, *words: str) -> None:
    """The error message contains every word (the argument's name, the index)."""
    text = str(err)
    for w in words:
        assert re.search(re.escape(w), text), f"the message {text!r} does not name {w!r}"


# ---------------------------------------------------------------------------------------------------------
# a storage allocated again smaller at the same address

_M_MMAP_THRESHOLD = -3  # (glibc's mallopt parameter)


def mmap_large_allocations(threshold: int = 32 * 1024) -> None:
    """In a forked child (:func:`isolated`) only: glibc serves every allocation of ``threshold`` bytes or more by its
    own ``mmap``, returned to the system when freed, so that a block freed and allocated again a little smaller
    comes back at the same address (the kernel reuses the hole), whatever the heap's state (in a long test run the
    heap's bins hand back other blocks). A no-op where the C library has no ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


def shrink_in_place(t: torch.Tensor) -> bool:
    """Free ``t``'s storage and allocate it again smaller (``untyped_storage().resize_(0)`` then ``resize_(k)``);
    True when it came back at the same address, ``t``'s last bytes then outside it (its sizes unchanged)."""
    old, storage = t.data_ptr(), t.untyped_storage()
    for k in range(t.nbytes - 16, t.nbytes // 2, -512):
        storage.resize_(0)
        storage.resize_(k)
        if t.data_ptr() == old:
            return True
    return False
