from __future__ import annotations

import threading
from collections.abc import Sequence

from kvcake.store import TieredStore, open_store, tiered_url
from kvcake.store.bytestore import ByteStore
from kvcake.store.memory import MemoryBackend


class GatedTier(ByteStore):
    """A memory tier whose writes wait for ``gate``: makes write-back queueing deterministic."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend(10**8))
        self.gate = threading.Event()
        self.writing = threading.Event()

    def put_encoded(self, key: str, data: bytes, beside: Sequence[str] | None = None) -> bool:
        self.writing.set()
        self.gate.wait()
        return super().put_encoded(key, data, beside)


def test_read_through_promotes_into_faster_tiers(tmp_path, make_chunk, same) -> None:
    disk_url = f"file://{tmp_path}"
    chunk = make_chunk()
    open_store(disk_url).put("k", chunk)  # e.g. written by another process
    store = open_store(tiered_url(["memory://", disk_url]))
    memory, disk = store.tiers
    assert not memory.contains("k")
    assert same(store.get("k"), chunk)
    assert memory.contains("k") and memory.get_encoded("k") == disk.get_encoded("k")
    assert same(store.get("k"), chunk)
    stats = store.stats()
    assert (stats.hits, stats.promotions) == (2, 1)
    # memory: the check above and the 2nd get; disk: the 1st get and the check above
    assert [s.hits for s in stats.tiers.values()] == [2, 2]


def test_partial_reads_fall_through_without_promotion(tmp_path, make_chunk, tokens_of, same) -> None:
    chunk = make_chunk()
    store = open_store(tiered_url(["memory://", f"file://{tmp_path}"]))
    store.tiers[1].put("k", chunk)
    k, _ = store.get_layer("k", 2)
    assert k.equal(chunk.keys[2])
    assert same(store.get_tokens("k", 3, 9), tokens_of(chunk, 3, 9))
    assert not store.tiers[0].contains("k")
    assert store.get_layer("missing", 0) is None and store.stats().misses == 1


def test_write_through_writes_every_tier(tmp_path, make_chunk) -> None:
    store = open_store(tiered_url(["memory://", f"file://{tmp_path}"]) + "&dtype=fp16")
    assert store.put("k", make_chunk())
    assert all(tier.contains("k") for tier in store.tiers)
    assert store.get("k").keys[0].dtype.itemsize == 2  # encoded once, with the tiered store's dtype
    store.delete("k")
    assert not store.contains("k")


def test_write_back_reaches_lower_tiers_after_flush(tmp_path, redis_server, make_chunk, same) -> None:
    store = open_store(tiered_url(["memory://", f"file://{tmp_path}", redis_server.url], write="back"))
    chunks = {f"k{i}": make_chunk(seed=i) for i in range(5)}
    for key, chunk in chunks.items():
        assert store.put(key, chunk)
        assert store.tiers[0].contains(key)
    store.flush()
    for key, chunk in chunks.items():
        assert all(same(tier.get(key), chunk) for tier in store.tiers)
    store.close()


def test_write_back_queue_is_bounded_and_never_blocks(make_chunk) -> None:
    lower = GatedTier()
    store = TieredStore([ByteStore(MemoryBackend(10**8)), lower], write_back=True, queue_size=2)
    store.put("k0", make_chunk())
    lower.writing.wait()  # the worker holds k0 and waits at the gate
    for i in range(1, 5):
        assert store.put(f"k{i}", make_chunk())  # first tier stored it; lower write queued or dropped
    store.put("k1", make_chunk())  # replaces the queued write of k1, takes no new slot
    store.delete("k2")  # cancels the queued write of k2
    assert store.stats().errors == {"queue_full": 2}  # k3 and k4
    lower.gate.set()
    store.flush()
    assert [lower.contains(f"k{i}") for i in range(5)] == [True, True, False, False, False]
    store.close()


def test_a_down_lower_tier_does_not_fail_the_store(tmp_path, make_chunk, same) -> None:
    store = open_store(tiered_url(["memory://", "redis://127.0.0.1:1/0?connect_timeout_s=0.2"]))
    chunk = make_chunk()
    assert store.put("k", chunk)  # stored in memory, skipped in Redis
    assert same(store.get("k"), chunk)
    assert store.get("other") is None
    stats = store.stats()
    assert stats.tiers["1:ByteStore(redis(127.0.0.1:1/0))"].errors["unavailable"] >= 1


def test_a_stored_prefix_is_found_across_tiers(tmp_path, make_chunk) -> None:
    store = open_store(tiered_url(["memory://", f"file://{tmp_path}"]))
    memory, disk = store.tiers
    chunk = make_chunk(tokens=4)
    for key in ("k1", "k2"):
        memory.put(key, chunk)
    for key in ("k0", "k3"):
        disk.put(key, chunk)
    assert store.stored_prefix(["k0", "k1", "k2", "k3", "k4", "k5"]) == 4
    assert store.stored_prefix(["k4", "k0"]) == 0 and store.stored_prefix([]) == 0
