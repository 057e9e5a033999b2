from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import torch

from kvcake.store import codec, open_store
from kvcake.store.local_redis import LocalRedis, free_port

FAST_RETRY = "retry_s=0.05"


def _outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "unavailable" in r.getMessage()]


def _until(check, attempts: int = 200) -> bool:
    """Poll a condition (e.g. the store sees the restarted server); no timing assertion."""
    for _ in range(attempts):
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_and_range_reads(redis_server, make_chunk, same, tokens_of, dtype) -> None:
    store = open_store(redis_server.url)
    chunk = make_chunk(layers=4, tokens=45, dtype=dtype)
    assert store.put("k1", chunk)
    assert store.contains("k1") and not store.contains("k2")
    assert same(store.get("k1"), chunk)
    for layer in range(4):
        k, v = store.get_layer("k1", layer)
        assert k.equal(chunk.keys[layer]) and v.equal(chunk.values[layer])
    for a, b in [(0, 45), (16, 32), (15, 17), (44, 45)]:
        assert same(store.get_tokens("k1", a, b), tokens_of(chunk, a, b))
    assert store.get("k2") is None and store.get_layer("k2", 0) is None and store.get_tokens("k2", 0, 3) is None
    store.delete("k1")
    assert store.get("k1") is None
    stats = store.stats()
    assert stats.errors == {} and stats.hits == 9 and stats.misses == 4


def test_partial_reads_fetch_only_their_bytes(redis_server, make_chunk) -> None:
    store = open_store(redis_server.url)
    chunk = make_chunk(layers=4, tokens=64)
    store.put("k", chunk)
    h = codec.parse_header(codec.encode(chunk))
    store.get_layer("k", 0)  # first read of the entry also fetches its header
    before = store.stats().bytes_read
    store.get_layer("k", 2)
    start, end = codec.layer_range(h, 2)
    assert store.stats().bytes_read - before == end - start == 2 * 64 * h.token_bytes
    before = store.stats().bytes_read
    store.get_tokens("k", 20, 30)  # one 16-token page per layer and tensor
    assert store.stats().bytes_read - before == 2 * 4 * 16 * h.token_bytes
    before = store.stats().bytes_read
    store.get_tokens("k", 32, 64, layers=[1])  # two pages of one layer's K and V
    assert store.stats().bytes_read - before == 2 * 2 * 16 * h.token_bytes


def test_entry_whose_header_exceeds_the_first_read(redis_server, make_chunk, same, tokens_of) -> None:
    store = open_store(redis_server.url + "?page_tokens=1")
    chunk = make_chunk(layers=2, heads=1, tokens=1500, dim=2)
    store.put("k", chunk)
    assert store.get_layer("k", 0)[0].equal(chunk.keys[0])
    assert same(store.get_tokens("k", 3, 1499), tokens_of(chunk, 3, 1499))
    assert store.stats().errors == {}


def test_int8_and_prefix_and_ttl(redis_server, make_chunk) -> None:
    store = open_store(redis_server.url + "?dtype=int8&prefix=t1:&ttl_s=60")
    chunk = make_chunk()
    assert store.put("k", chunk)
    raw = redis_server.client()
    assert raw.exists("t1:k") and 0 < raw.pttl("t1:k") <= 60_000
    got = store.get("k")
    assert got.keys[0].dtype == torch.float32 and (got.keys[0] - chunk.keys[0]).abs().max() < 0.05


def test_server_side_lru_eviction(redis_factory, make_chunk) -> None:
    server = redis_factory("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    store = open_store(server.url)
    chunk = make_chunk(layers=4, tokens=256, heads=2, dim=16)  # ~260 KB encoded
    for i in range(40):
        assert store.put(f"k{i}", chunk)
    present = [store.contains(f"k{i}") for i in range(40)]
    assert not present[0] and present[-1]
    assert store.get("k0") is None and store.get("k39") is not None
    assert store.stats().errors == {}


def test_write_refused_when_redis_is_out_of_memory(redis_factory, make_chunk) -> None:
    server = redis_factory("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")
    store = open_store(server.url)
    assert store.put("big", make_chunk(layers=4, tokens=512, heads=2, dim=64)) is False
    assert store.stats().errors == {"oom": 1} and store.stats().puts_failed == 1


def test_a_chain_put_that_only_fits_by_evicting_its_head_is_skipped(redis_factory, make_chunk) -> None:
    """With `beside`, a put Redis could make room for only by evicting those entries is skipped, not written;
    once another key exists, Redis evicts that one as usual."""
    server = redis_factory("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    store = open_store(server.url)
    chunk = make_chunk(layers=4, tokens=256, heads=2, dim=16)  # ~260 KB encoded
    chain = [f"c{i}" for i in range(40)]
    stored = 0
    while store.put(chain[stored], chunk, beside=chain[:stored]):
        stored += 1
    assert 0 < stored < 16
    assert [store.contains(key) for key in chain] == [True] * stored + [False] * (40 - stored)
    assert store.stats().errors == {"over_budget": 1} and store.stats().puts_failed == 1
    assert store.put("other", chunk)  # no `beside`: Redis evicts as it always does
    assert store.put(chain[stored], chunk, beside=chain[:stored]), "another key can make room"


@pytest.mark.parametrize("read", ["get", "get_layer", "get_tokens"])
def test_corrupted_entry_is_a_miss_and_is_removed(redis_server, make_chunk, read) -> None:
    store = open_store(redis_server.url)
    chunk = make_chunk(layers=2, tokens=32)
    store.put("k", chunk)
    h = codec.parse_header(codec.encode(chunk))
    raw = redis_server.client()
    offset = h.pages_range(1, 0, 1)[0] + 1  # layer 0, V, tokens 0..15
    raw.setrange("kvcake:k", offset, bytes([raw.getrange("kvcake:k", offset, offset)[0] ^ 0xFF]))
    result = {"get": lambda: store.get("k"), "get_layer": lambda: store.get_layer("k", 0),
              "get_tokens": lambda: store.get_tokens("k", 0, 3)}[read]()
    assert result is None
    assert not raw.exists("kvcake:k")
    assert store.stats().errors == {"checksum": 1}


def test_truncated_entry_is_a_miss_and_is_removed(redis_server, make_chunk) -> None:
    store = open_store(redis_server.url)
    store.put("k", make_chunk())
    raw = redis_server.client()
    raw.set("kvcake:k", raw.get("kvcake:k")[:-7])
    assert store.get_tokens("k", 30, 40) is None and not raw.exists("kvcake:k")
    assert store.stats().errors == {"truncated": 1}


def test_reconnects_after_the_server_is_killed_and_restarted(redis_server, make_chunk, same, caplog) -> None:
    store = open_store(f"{redis_server.url}?{FAST_RETRY}")
    chunk = make_chunk()
    assert store.put("k", chunk) and same(store.get("k"), chunk)
    redis_server.kill()
    with caplog.at_level(logging.WARNING):
        for _ in range(5):  # every operation degrades, none raises
            assert store.get("k") is None
            assert store.get_layer("k", 0) is None
            assert store.get_tokens("k", 0, 4) is None
            assert store.put("k", chunk) is False
            assert store.contains("k") is False
            store.delete("k")
    assert len(_outage_warnings(caplog)) == 1  # logged once per outage
    assert store.stats().errors["unavailable"] > 0
    redis_server.start()  # same port, empty (nothing persisted)
    assert _until(lambda: store.put("k", chunk))
    assert same(store.get("k"), chunk)
    assert store.get_layer("k", 1) is not None
    assert any("is back" in r.getMessage() for r in caplog.records)


def test_a_server_that_hangs_times_out(redis_server, make_chunk, same) -> None:
    store = open_store(f"{redis_server.url}?timeout_s=0.2&{FAST_RETRY}")
    chunk = make_chunk()
    store.put("k", chunk)
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        assert store.get("k") is None and store.get_layer("k", 0) is None
        assert store.stats().errors.get("timeout", 0) >= 1
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    assert _until(lambda: store.get("k") is not None)
    assert same(store.get("k"), chunk)


def test_store_opened_while_the_server_is_down(tmp_path, make_chunk, same, caplog) -> None:
    server = LocalRedis(tmp_path / "late", port=free_port())
    store = open_store(f"{server.url}?{FAST_RETRY}")
    with caplog.at_level(logging.WARNING):
        assert store.get("k") is None and store.put("k", make_chunk()) is False
    assert len(_outage_warnings(caplog)) == 1
    server.start()
    try:
        assert _until(lambda: store.put("k", make_chunk()))
        assert same(store.get("k"), make_chunk())
    finally:
        server.kill()


def test_a_stored_prefix_is_the_leading_run_of_stored_keys(redis_server, make_chunk) -> None:
    store = open_store(redis_server.url)
    for key in ("p0", "p1", "p3"):
        store.put(key, make_chunk(tokens=4))
    assert store.stored_prefix(["p0", "p1", "p2", "p3"]) == 2
    assert open_store("redis://127.0.0.1:1/0?connect_timeout_s=0.2").stored_prefix(["p0"]) == 0
