"""The request KV cache: pooled buffers are reused only after release, and copies keep every bit."""

from __future__ import annotations

import pytest
import torch

from kvcake.model import CachePool, KVCache
from kvcake.model.kv import copy_into


def _cache(pool: CachePool, capacity: int = 300) -> KVCache:
    return KVCache(2, 2, 8, CachePool.rounded(capacity), torch.device("cpu"), torch.float32, pool)


def test_released_buffers_serve_the_next_cache_of_that_shape() -> None:
    pool = CachePool(max_free_bytes=1 << 30)
    first = _cache(pool)
    pointers = [t.data_ptr() for t in first.keys + first.values]
    assert first.capacity == 512
    first.release()
    assert first.keys == [] and pool.free_bytes == 4 * 2 * 512 * 8 * 4
    second = _cache(pool, capacity=400)
    assert [t.data_ptr() for t in second.keys + second.values] == pointers
    other = _cache(pool, capacity=600)
    assert other.keys[0].data_ptr() not in pointers, "another size gets its own buffers"


def test_a_cache_in_use_is_never_handed_out() -> None:
    pool = CachePool(max_free_bytes=1 << 30)
    held = _cache(pool)
    fresh = _cache(pool)
    assert not {t.data_ptr() for t in held.keys} & {t.data_ptr() for t in fresh.keys}


def test_the_pool_keeps_at_most_its_budget() -> None:
    one_cache = 4 * 2 * 512 * 8 * 4
    pool = CachePool(max_free_bytes=one_cache)
    caches = [_cache(pool) for _ in range(3)]
    for cache in caches:
        cache.release()
    assert pool.free_bytes == one_cache
    big = _cache(pool, capacity=5000)
    big.release()
    assert pool.free_bytes <= one_cache, "a cache larger than the budget is not kept"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_copy_into_is_bit_exact_for_strided_views(dtype: torch.dtype) -> None:
    source = torch.randn(5, 3, 4).to(dtype).permute(1, 0, 2)  # (3, 5, 4) token-major underneath
    target = torch.zeros(3, 10, 4, dtype=dtype)
    copy_into(target[:, 2:7], source)
    assert torch.equal(target[:, 2:7].contiguous().view(torch.uint8), source.contiguous().view(torch.uint8))
    assert torch.equal(target[:, :2], torch.zeros(3, 2, 4, dtype=dtype))
    converted = torch.zeros(3, 5, 4, dtype=torch.float32)
    copy_into(converted, source)
    assert torch.equal(converted, source.float())
