from __future__ import annotations

import threading
import time

import pytest

from kvcake.store import open_store
from kvcake.store.throttle import Link, ThrottledBackend


class RecordingLink(Link):
    """Link that records which transfer booked each slot."""

    def __init__(self, gbps: float) -> None:
        super().__init__(gbps)
        self.bookings: list[str] = []

    def book(self, nbytes: int, not_before: float) -> float:
        self.bookings.append(threading.current_thread().name)
        return super().book(nbytes, not_before)


def test_bookings_serialize_on_one_timeline() -> None:
    link = Link(8.0)  # 1 GB/s: 1 byte per ns
    assert link.book(1000, 10.0) == pytest.approx(10.0 + 1e-6)
    assert link.book(1000, 10.0) == pytest.approx(10.0 + 2e-6)  # waits for the first slot
    assert link.book(1000, 20.0) == pytest.approx(20.0 + 1e-6)  # idle link: starts when requested


def test_concurrent_transfers_share_the_link_slice_by_slice() -> None:
    link = RecordingLink(1.0)
    barrier = threading.Barrier(2)

    def transfer() -> None:
        barrier.wait()
        link.transfer(20 * link._slice, time.perf_counter())

    threads = [threading.Thread(target=transfer, name=name) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first_half = link.bookings[: len(link.bookings) // 2]
    assert len(link.bookings) == 40
    assert {"a", "b"} <= set(first_half)  # neither transfer waited for the other to finish


def test_throttled_store_returns_exact_data_and_counts_bytes(tmp_path, make_chunk, same, tokens_of) -> None:
    store = open_store(f"file://{tmp_path}?throttle_gbps=5&latency_ms=0.1")
    assert isinstance(store.backend, ThrottledBackend)
    chunk = make_chunk()
    assert store.put("k", chunk)
    assert same(store.get("k"), chunk)
    assert same(store.get_tokens("k", 2, 30), tokens_of(chunk, 2, 30))
    assert store.get_layer("k", 1)[0].equal(chunk.keys[1])
    assert store.get("missing") is None and store.stats().hits == 3


def test_link_validates_its_settings() -> None:
    with pytest.raises(ValueError):
        Link(0)
    with pytest.raises(ValueError):
        Link(1, -1)
