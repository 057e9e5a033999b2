from __future__ import annotations

from kvcake.store import codec, open_store
from kvcake.store.tensors import TensorStore


def test_round_trip_and_partial_reads(make_chunk, same, tokens_of) -> None:
    store = open_store("memory://?max_gb=0.01")
    chunk = make_chunk()
    assert store.put("a", chunk)
    assert store.contains("a") and not store.contains("b")
    assert same(store.get("a"), chunk)
    k, v = store.get_layer("a", 1)
    assert k.equal(chunk.keys[1]) and v.equal(chunk.values[1])
    assert same(store.get_tokens("a", 3, 19), tokens_of(chunk, 3, 19))
    one_layer = store.get_tokens("a", 3, 19, layers=[1])
    assert one_layer.num_layers == 1 and one_layer.keys[0].equal(tokens_of(chunk, 3, 19).keys[1])
    assert store.get("b") is None and store.get_layer("b", 0) is None and store.get_tokens("b", 0, 1) is None
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.puts) == (4, 3, 1)
    assert stats.bytes_written == chunk.nbytes and stats.bytes_read > 0
    store.delete("a")
    assert store.get("a") is None


def test_lru_eviction_by_byte_budget(make_chunk) -> None:
    entry = make_chunk().nbytes
    store = open_store(f"memory://?max_gb={3.5 * entry / 1e9}")
    for i in range(3):
        store.put(f"k{i}", make_chunk(seed=i))
    assert store.get("k0") is not None  # k0 is now the most recently used
    store.put("k3", make_chunk(seed=3))
    assert [store.contains(f"k{i}") for i in range(4)] == [True, False, True, True]
    assert store.stats().evictions == 1


def test_entry_larger_than_budget_is_skipped(make_chunk) -> None:
    store = open_store("memory://?max_gb=0.000001")
    assert store.put("big", make_chunk()) is False
    stats = store.stats()
    assert stats.errors == {"too_large": 1} and stats.puts_failed == 1


def test_out_of_range_reads_miss_without_dropping_the_entry(make_chunk) -> None:
    store = open_store("memory://")
    store.put("a", make_chunk(layers=2, tokens=10))
    assert store.get_layer("a", 2) is None
    assert store.get_tokens("a", 5, 11) is None
    assert store.contains("a") and store.stats().errors == {"out_of_range": 2}


def test_memory_tier_hands_out_its_tensors_without_a_copy(make_chunk) -> None:
    store = open_store("memory://")
    assert isinstance(store, TensorStore)
    store.put("a", make_chunk())
    first, second = store.get("a"), store.get("a")
    assert first.keys[0].data_ptr() == second.keys[0].data_ptr(), "a hit is a lookup, not a decode"


def test_bytes_entering_the_memory_tier_are_verified_once(make_chunk, same) -> None:
    store = open_store("memory://")
    chunk = make_chunk()
    data = bytearray(codec.encode(chunk, key="a"))
    assert store.put_encoded("a", bytes(data)) and same(store.get("a"), chunk)
    data[-3] ^= 0xFF
    assert not store.put_encoded("a", bytes(data)) and not store.put_encoded("c", codec.encode(chunk, key="a"))
    assert same(store.get("a"), chunk), "a refused write leaves the entry as it was"
    assert store.stats().errors == {"foreign_key": 1, "checksum": 1}


def test_a_storage_dtype_gives_what_a_byte_tier_would(make_chunk) -> None:
    chunk = make_chunk()
    memory, byte_tier = open_store("memory://?dtype=int8"), open_store("memory://?dtype=int8&throttle_gbps=100")
    assert memory.put("a", chunk) and byte_tier.put("a", chunk)
    assert all(x.equal(y) for x, y in zip(memory.get("a").keys, byte_tier.get("a").keys))


def test_the_memory_tier_keeps_its_own_copy_of_what_is_put(make_chunk, same) -> None:
    store = open_store("memory://")
    chunk, original = make_chunk(), make_chunk()
    store.put("a", chunk)
    chunk.keys[0].fill_(7.0)
    assert same(store.get("a"), original), "the caller may reuse its tensors after put"
