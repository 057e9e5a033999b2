"""An entry is bound to its key: valid bytes copied under another key are a miss, in every tier."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
from redis.cluster import RedisCluster

from kvcake.store import codec, open_store, tiered_url
from kvcake.store.bytestore import ByteStore

Copy = Callable[[str, str], None]


def _reads(store, key: str) -> list[object]:
    return [store.get(key), store.get_layer(key, 0), store.get_tokens(key, 0, 4), store.get_encoded(key)]


def _assert_foreign_is_a_miss(store: ByteStore, copy: Copy, make_chunk, same) -> None:
    original, other = make_chunk(seed=1), make_chunk(seed=2)
    assert store.put("key-a", original) and store.put("key-b", other)
    copy("key-a", "key-b")  # key-b now holds key-a's valid bytes
    assert all(value is None for value in _reads(store, "key-b"))
    assert store.stats().errors.get("foreign_key", 0) >= 1
    assert same(store.get("key-a"), original)


def test_memory_entry_under_another_key_is_a_miss(make_chunk, same) -> None:
    store = open_store("memory://?throttle_gbps=100")  # the byte form of the memory tier (the tensor tier holds no bytes)

    def copy(source: str, target: str) -> None:
        store.backend.inner.write(target, store.backend.inner.read_all(source))

    _assert_foreign_is_a_miss(store, copy, make_chunk, same)


def test_file_copied_over_another_is_a_miss(tmp_path, make_chunk, same) -> None:
    store = open_store(f"file://{tmp_path}")

    def copy(source: str, target: str) -> None:
        shutil.copyfile(store.backend._path(source), store.backend._path(target))

    _assert_foreign_is_a_miss(store, copy, make_chunk, same)


def test_redis_value_set_under_another_key_is_a_miss(redis_server, make_chunk, same) -> None:
    store = open_store(redis_server.url)
    client = redis_server.client()

    def copy(source: str, target: str) -> None:
        client.set(f"kvcake:{target}", client.get(f"kvcake:{source}"))

    _assert_foreign_is_a_miss(store, copy, make_chunk, same)


def test_cluster_value_set_under_another_key_is_a_miss(redis_cluster, make_chunk, same) -> None:
    store = open_store(redis_cluster.url)
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)

    def copy(source: str, target: str) -> None:
        client.set(f"kvcake:{target}", client.get(f"kvcake:{source}"))

    _assert_foreign_is_a_miss(store, copy, make_chunk, same)
    client.close()


def test_tiered_store_never_promotes_a_foreign_entry(tmp_path, make_chunk, same) -> None:
    disk_url = f"file://{tmp_path}"
    disk = open_store(disk_url)
    disk.put("key-a", make_chunk(seed=1))
    shutil.copyfile(disk.backend._path("key-a"), tmp_path / "ke" / "key-b.kv")
    store = open_store(tiered_url(["memory://", disk_url]))
    assert store.get("key-b") is None and not store.tiers[0].contains("key-b")
    assert store.stats().tiers["1:" + repr(store.tiers[1])].errors == {"foreign_key": 1}


def test_encoded_bytes_of_another_key_are_not_stored(make_chunk) -> None:
    store = open_store("memory://")
    data = codec.encode(make_chunk(), key="key-a")
    assert not store.put_encoded("key-b", data) and not store.contains("key-b")
    assert store.stats().errors == {"foreign_key": 1} and store.put_encoded("key-a", data)


def test_an_entry_of_another_format_is_a_counted_miss(make_chunk) -> None:
    store = open_store("memory://?throttle_gbps=100")
    data = bytearray(codec.encode(make_chunk(), key="k"))
    data[4:6] = (codec.CODEC_VERSION - 1).to_bytes(2, "little")
    store.backend.inner.write("k", bytes(data))
    assert store.get("k") is None and store.stats().errors == {"other_version": 1}
    assert store.backend.inner.exists("k"), "another release's entry is left alone"


@pytest.mark.parametrize("key", ["key-a", ""])
def test_codec_checks_the_key_it_is_read_under(make_chunk, same, key: str) -> None:
    chunk = make_chunk()
    data = codec.encode(chunk, key=key)
    assert same(codec.decode(data, key=key), chunk)
    with pytest.raises(codec.CodecError) as raised:
        codec.decode(data, key=key + "x")
    assert raised.value.kind == "foreign_key"
