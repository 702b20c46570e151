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


def test_functional_table_cache_is_bounded_in_the_memory_its_tables_hold():
    """Tables of fresh addresses (grads reallocated elsewhere at every step) were kept 256 at a time whatever their
    size: about 1.7 MB each on the GPU for a 7B model's grads (probe 82). The oldest go while the tables held take
    more than the budget; the newest is kept whatever its size; the sizes are kept right under threads."""
    import torch
    from fused_ops.kernels._multi_tensor import build_chunk_table

    assert _ops._table_cache().max_bytes == _ops._TABLE_CACHE_BYTES
    budget = 3000
    cache = _ops._BoundedCache(_ops._TABLE_CACHE_LIMIT, budget)
    kept = []
    for k in range(40):  # (fresh tensors each time: fresh addresses, as a new key)
        ts = [torch.empty(40 + k) for _ in range(8)]
        kept.append(ts)
        table = build_chunk_table([ts], 16, cache)
        sizes = [_ops._held_bytes(v) for v in cache.values()]
        assert sum(sizes) <= budget or len(cache) == 1, (k, sizes)
        assert next(reversed(cache.values())) is table  # (the newest stays)
        assert cache._held == sum(_ops._held_bytes(v) for v in {id(v): v for v in cache.values()}.values())
    assert 1 < len(cache) < 40
    big = [torch.empty(5000)]
    table = build_chunk_table([big], 16, cache)  # (over the budget by itself: kept alone)
    assert list(cache.values()) == [table] and cache._held == _ops._held_bytes(table) > budget
    threaded = _ops._BoundedCache(_ops._TABLE_CACHE_LIMIT, 10**9)
    _hammer(threaded, _ops._TABLE_CACHE_LIMIT)
    assert threaded._held == 0 and set(threaded._keys) == {id(None)} and threaded._keys[id(None)][0] == len(threaded)
    # one table under two keys (kernels/flatten.py caches its segments' table so) is counted once (probe 87)
    twice = _ops._BoundedCache(_ops._TABLE_CACHE_LIMIT, 10**9)
    one = build_chunk_table([[torch.empty(100)]], 16, twice)
    twice[("again",)] = one
    assert len(twice) == 2 and twice._held == _ops._held_bytes(one)
    twice._drop(("again",))
    assert twice._held == _ops._held_bytes(one) and len(twice) == 1
    twice[("other",)] = None
    twice._drop(next(iter(twice)))
    assert twice._held == 0 and len(twice) == 1
