"""Pooled read buffers: reused only once nothing views them, so decoded chunks stay intact."""

from __future__ import annotations

import gc

import numpy as np
import torch

from kvcake.store import codec, open_store
from kvcake.store.buffers import POOLED_MIN_BYTES, BufferPool, private_copy
from kvcake.store.bytestore import ByteStore
from kvcake.store.disk import FileBackend

BIG = 4 * POOLED_MIN_BYTES


def test_a_buffer_returns_only_when_every_view_is_gone() -> None:
    pool = BufferPool()
    lease = pool.lease(BIG)
    block = torch.frombuffer(lease[64:4160], dtype=torch.float32).view(32, 32).t()
    array = np.frombuffer(lease[8:24], dtype=np.uint8)
    del lease
    gc.collect()
    assert pool.free_bytes == 0, "a slice, a tensor or an array of the lease still uses it"
    del block
    gc.collect()
    assert pool.free_bytes == 0
    del array
    gc.collect()
    assert pool.free_bytes == BIG
    again = pool.lease(BIG)
    assert pool.free_bytes == 0 and len(again) == BIG, "the freed buffer is reused"


def test_the_pool_keeps_at_most_its_budget_of_free_buffers() -> None:
    pool = BufferPool(max_free_bytes=2 * BIG)
    leases = [pool.lease(BIG) for _ in range(3)]
    del leases
    gc.collect()
    assert pool.free_bytes == 2 * BIG


def test_reserved_buffers_are_what_the_next_leases_get_within_the_budget() -> None:
    pool = BufferPool(max_free_bytes=3 * BIG)
    assert pool.reserve(BIG, 5) == 3 * BIG and pool.free_bytes == 3 * BIG
    assert pool.reserve(BIG, 1) == 0, "the budget is full"
    assert pool.reserve(100, 4) == 0, "small buffers are not pooled"
    leases = [pool.lease(BIG) for _ in range(3)]
    assert pool.free_bytes == 0 and all(len(lease) == BIG for lease in leases)


def test_a_store_maps_the_buffers_its_reads_lease(tmp_path, make_chunk, same) -> None:
    """After `map_read_buffers`, reading an entry of that shape takes a mapped buffer instead of a fresh one."""
    pool = BufferPool(max_free_bytes=64 * BIG)
    store = ByteStore(FileBackend(tmp_path, None, pool=pool), pool=pool)
    chunk = make_chunk(layers=4, heads=4, tokens=256, dim=32)
    entry = len(codec.encode(chunk))
    assert store.map_read_buffers((4, 4, 256, 32), torch.float32, 2) == 2 * entry
    assert store.put("k", chunk)
    got = store.get("k")
    assert same(got, chunk) and pool.free_bytes == entry, "the read leased one of the two mapped buffers"
    assert open_store("memory://").map_read_buffers((4, 4, 256, 32), torch.float32, 2) == 0, "memory:// reads into nothing"


def test_small_buffers_and_private_copies() -> None:
    pool = BufferPool()
    small = pool.lease(100)
    assert len(small) == 100 and not small.readonly
    data = bytes(range(256)) * (BIG // 256)
    copy = private_copy(data, pool)
    assert bytes(copy) == data and not copy.readonly


def test_decoded_chunks_survive_reads_that_reuse_buffers(tmp_path, make_chunk, same) -> None:
    """File reads land in pooled buffers and decode to views: a chunk held by the caller is never overwritten."""
    store = open_store(f"file://{tmp_path}")
    chunks = [make_chunk(layers=4, heads=4, tokens=256, dim=32, seed=seed) for seed in range(3)]
    for index, chunk in enumerate(chunks):
        assert store.put(f"k{index}", chunk)
    held = store.get("k0")
    assert held.nbytes >= BIG
    for _ in range(5):
        for index in (1, 2):
            got = store.get(f"k{index}")
            assert same(got, chunks[index])
            layer = store.get_layer(f"k{index}", 3)
            assert layer[0].equal(chunks[index].keys[3]) and layer[1].equal(chunks[index].values[3])
            del got, layer
            gc.collect()
    assert same(held, chunks[0])


def test_decode_of_immutable_bytes_does_not_alias_them(make_chunk, same) -> None:
    chunk = make_chunk()
    data = codec.encode(chunk)
    decoded = codec.decode(data)
    decoded.keys[0].zero_()
    assert same(codec.decode(data), chunk)
