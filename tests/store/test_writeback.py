"""The write-back queue: bounded, and what it cannot hold is dropped and counted, never blocking a request."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import MakeChunk

from kvcake.reuse.writeback import WriteBack
from kvcake.store import open_store


def test_a_full_write_back_queue_drops_and_counts(tmp_path: Path, make_chunk: MakeChunk) -> None:
    store = open_store(f"file://{tmp_path}/kv")
    writing, may_write = threading.Event(), threading.Event()
    put = store.put

    def held_put(key, chunk, beside=None):  # the writer thread waits here, so the queue behind it fills
        writing.set()
        assert may_write.wait(30)
        return put(key, chunk, beside)

    store.put = held_put
    writeback = WriteBack(store, max_pending=2)
    keys = [f"{i:064x}" for i in range(4)]
    chunks = [make_chunk() for _ in keys]
    writeback.submit(keys[0], chunks[0])
    assert writing.wait(30)
    for key, chunk in zip(keys[1:], chunks[1:]):
        writeback.submit(key, chunk)
    assert writeback.dropped == 1, "two wait in the queue, the fourth does not fit"
    may_write.set()
    writeback.flush()
    assert [store.contains(key) for key in keys] == [True, True, True, False]
    writeback.close()
    store.close()


def test_a_stop_past_its_grace_period_leaves_a_usable_head(tmp_path: Path, make_chunk: MakeChunk) -> None:
    """A chain is written head first; a stop whose grace period ends during the third write keeps that write and
    drops the rest, so the store holds the chain's first three chunks, never a tail."""
    store = open_store(f"file://{tmp_path}/kv")
    third_started, may_finish = threading.Event(), threading.Event()
    put = store.put
    chain = [f"{i:064x}" for i in range(5)]

    def slow_third_put(key, chunk, beside=None):
        if key == chain[2]:
            third_started.set()
            assert may_finish.wait(30)
        return put(key, chunk, beside)

    store.put = slow_third_put
    writeback = WriteBack(store)
    writeback.submit_chain(chain, {key: make_chunk() for key in chain})
    assert third_started.wait(30)
    assert writeback.close(grace_s=0.05) == 5 - 2, "the chunk in flight and the two after it were not written yet"
    may_finish.set()
    writeback.flush()
    assert [store.contains(key) for key in chain] == [True, True, True, False, False]
    store.close()
