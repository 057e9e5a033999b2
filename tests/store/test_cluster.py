from __future__ import annotations

import logging
import time

from kvcake.store import open_store

KEYS = [f"chunk{i:02d}" for i in range(30)]


def _node_of(store, key: str) -> str:
    return store.backend.route(key)


def test_entries_spread_over_the_nodes_and_round_trip(redis_cluster, make_chunk, same, tokens_of) -> None:
    store = open_store(redis_cluster.url)
    chunks = {key: make_chunk(layers=2, tokens=20, seed=i) for i, key in enumerate(KEYS)}
    for key, chunk in chunks.items():
        assert store.put(key, chunk)
    sizes = [node.client().dbsize() for node in redis_cluster.nodes]
    assert sum(sizes) == len(KEYS) and all(size > 0 for size in sizes)
    for key, chunk in chunks.items():
        assert same(store.get(key), chunk)
        k, v = store.get_layer(key, 1)
        assert k.equal(chunk.keys[1]) and v.equal(chunk.values[1])
        assert same(store.get_tokens(key, 5, 17), tokens_of(chunk, 5, 17))
    assert store.stats().errors == {}


def test_a_stopped_node_only_loses_its_own_keys(redis_cluster, make_chunk, same, caplog) -> None:
    store = open_store(redis_cluster.url + "?retry_s=0.05")
    chunk = make_chunk(layers=2, tokens=20)
    for key in KEYS:
        store.put(key, chunk)
    stopped = redis_cluster.nodes[1]
    dead = f"127.0.0.1:{stopped.port}"
    on_dead = {key for key in KEYS if _node_of(store, key) == dead}
    assert on_dead and len(on_dead) < len(KEYS)
    stopped.kill()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            for key in KEYS:
                got = store.get(key)
                if key in on_dead:
                    assert got is None and store.get_layer(key, 0) is None and not store.put(key, chunk)
                else:
                    assert same(got, chunk) and store.get_tokens(key, 0, 3) is not None
    outages = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outages) == 1 and dead in outages[0].getMessage()
    assert store.stats().errors["unavailable"] > 0
    # the node comes back (empty: nothing is persisted) and serves its slots again
    stopped.start()
    for _ in range(100):  # poll until the client reaches the node again (no timing assertion)
        if all(store.put(key, chunk) for key in on_dead):
            break
        time.sleep(0.05)
    assert all(same(store.get(key), chunk) for key in KEYS)
