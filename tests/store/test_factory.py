from __future__ import annotations

from urllib.parse import quote

import pytest

from kvcake.store import TieredStore, open_store, tiered_url
from kvcake.store.bytestore import ByteStore
from kvcake.store.disk import FileBackend
from kvcake.store.memory import MemoryBackend
from kvcake.store.tensors import TensorStore
from kvcake.store.redis_backend import RedisBackend
from kvcake.store.throttle import ThrottledBackend


def test_schemes(tmp_path) -> None:
    assert isinstance(open_store("memory://?max_gb=0.5"), TensorStore)
    assert isinstance(open_store("memory://?throttle_gbps=1").backend.inner, MemoryBackend)
    disk = open_store(f"file://{tmp_path}/a%20b?max_gb=1")
    assert isinstance(disk.backend, FileBackend) and disk.backend.root == tmp_path / "a b"
    redis = open_store("redis://127.0.0.1:6390/2?timeout_s=1&prefix=x:")
    assert isinstance(redis.backend, RedisBackend) and redis.backend.name == "redis(127.0.0.1:6390/2)"
    cluster = open_store("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    assert cluster.backend.name == "redis-cluster(127.0.0.1:7000,127.0.0.1:7001)"


def test_throttle_applies_to_any_scheme(tmp_path) -> None:
    for url in ("memory://?throttle_gbps=2", f"file://{tmp_path}?throttle_gbps=2&latency_ms=1",
                "redis://127.0.0.1:6390/0?throttle_gbps=2"):
        store = open_store(url)
        assert isinstance(store, ByteStore) and isinstance(store.backend, ThrottledBackend)
        assert store.backend.read_link.gbps == 2


def test_tiered_urls(tmp_path) -> None:
    url = tiered_url(["memory://?max_gb=0.1", f"file://{tmp_path}?throttle_gbps=1"], write="back", queue=8)
    store = open_store(url)
    assert isinstance(store, TieredStore) and store.write_back and store._queue_size == 8
    assert isinstance(store.tiers[1].backend, ThrottledBackend)
    store.close()
    hand_written = f"tiered://?tier={quote('memory://', safe='')}&tier={quote(f'file://{tmp_path}', safe='')}"
    assert len(open_store(hand_written).tiers) == 2


@pytest.mark.parametrize("url", [
    "memory://?max_gbs=1",  # typo
    "memory://?max_gb=-1",
    "memory://?dtype=fp8",
    "memory://?latency_ms=1",
    "file://relative/dir",
    "redis://h:port/0",
    "redis://h:1/x",
    "redis://a:1,b:2/0",
    "s3://bucket",
    "tiered://?write=sideways&tier=memory%3A%2F%2F",
    "tiered://",
])
def test_malformed_urls_raise(url) -> None:
    with pytest.raises(ValueError):
        open_store(url)
