"""The module-level caches of launch tables under threads (two models trained in two threads, a background thread
running ``grad_norm``): insertion and eviction must not race (an unlocked "over the limit, pop the oldest" popped a
key twice: a KeyError in a launch after earlier groups of the same op had run). Note that the Triton interpreter
(CPU tests) is itself not thread-safe: threads launching kernels under it at once fail inside Triton."""

from __future__ import annotations

import itertools
import sys
import threading

import pytest

from fused_ops import _ops

pytestmark = pytest.mark.safety


def _hammer(cache, limit: int, n_threads: int = 4, n: int = 20000) -> None:
    errors: list[BaseException] = []
    keys = itertools.count()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def worker() -> None:
        try:
            for _ in range(n):
                cache[("k", next(keys))] = None  # (what build_chunk_table does on a miss)
                cache.get(("k", 0))
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    try:
        threads = [threading.Thread(target=worker) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, repr(errors[0])
    assert len(cache) <= limit


def test_functional_table_cache_is_thread_safe():
    cache = _ops._BoundedCache(_ops._TABLE_CACHE_LIMIT)
    _hammer(cache, _ops._TABLE_CACHE_LIMIT)
    assert isinstance(_ops._table_cache(), _ops._BoundedCache)


def test_default_chunk_table_cache_is_thread_safe():
    mt = pytest.importorskip("fused_ops.kernels._multi_tensor")
    cache = mt._LRU(capacity=32)
    _hammer(cache, 32)
    assert isinstance(mt._DEFAULT_CACHE, mt._LRU)
