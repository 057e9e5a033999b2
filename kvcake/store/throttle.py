"""Emulated storage link: X Gbit/s plus a fixed latency, shared fairly by concurrent transfers.

The papers emulate slow storage by injecting delay; this does the same per backend call.
A ``Link`` hands out transmission slots on one virtual timeline: a transfer is cut into
slices, each slice takes the next free slot, and a transfer waits for a slice's slot to
pass before it books the next. Concurrent transfers therefore interleave slice by slice
(round robin, each gets an equal share), and one transfer alone gets the full rate.

Time is virtual-first: a transfer's first slot may start at the moment the request was
made, so the inner backend's own work (a memory copy, a disk read) is hidden under the
emulated transfer time; the caller sees max(inner time, latency + bytes / rate). Only
the final wait is precise (a short spin after the sleep), so late wake-ups between
slices do not accumulate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from kvcake.store.backend import Backend, Buffer, Range, Reader

_MIN_SLICE_BYTES = 64 * 1024
_SLICE_SECONDS = 0.002
_SPIN_SECONDS = 0.0005


class Link:
    """One direction of an emulated link."""

    def __init__(self, gbps: float, latency_s: float = 0.0) -> None:
        if gbps <= 0 or latency_s < 0:
            raise ValueError("a link needs gbps > 0 and latency >= 0")
        self.gbps = gbps
        self.latency_s = latency_s
        self._bytes_per_s = gbps * 1e9 / 8
        self._slice = max(_MIN_SLICE_BYTES, int(self._bytes_per_s * _SLICE_SECONDS))
        self._free_at = 0.0
        self._lock = threading.Lock()

    def book(self, nbytes: int, not_before: float) -> float:
        """Reserve the next slot for ``nbytes`` starting no earlier than ``not_before``; its end."""
        with self._lock:
            start = max(self._free_at, not_before)
            self._free_at = start + nbytes / self._bytes_per_s
            return self._free_at

    def transfer(self, nbytes: int, started: float) -> None:
        """Block until ``nbytes`` requested at ``started`` (perf_counter) have crossed the link."""
        end = started
        remaining = nbytes
        while remaining > 0:
            piece = min(remaining, self._slice)
            end = self.book(piece, end)
            remaining -= piece
            if remaining:
                _wait_until(end, precise=False)
        _wait_until(end + self.latency_s, precise=True)


def _wait_until(deadline: float, precise: bool) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_SECONDS:
        time.sleep(remaining - (_SPIN_SECONDS if precise else 0.0))
    while precise and time.perf_counter() < deadline:
        time.sleep(0)  # yields the GIL while spinning out the last fraction of a millisecond


class _ThrottledReader(Reader):
    def __init__(self, inner: Reader, link: Link) -> None:
        self._inner = inner
        self._link = link

    def read(self, ranges: Sequence[Range]) -> list[Buffer]:
        started = time.perf_counter()
        parts = self._inner.read(ranges)
        self._link.transfer(sum(len(p) for p in parts), started)
        return parts


class ThrottledBackend(Backend):
    """Wraps a backend: reads cross ``read_link``, writes ``write_link`` (full duplex)."""

    def __init__(self, inner: Backend, gbps: float, latency_s: float = 0.0) -> None:
        self.inner = inner
        self.name = f"{inner.name}@{gbps:g}Gbps+{latency_s * 1e3:g}ms"
        self.retry_s = inner.retry_s
        self.read_link = Link(gbps, latency_s)
        self.write_link = Link(gbps, latency_s)

    @property
    def evictions(self) -> int:
        return self.inner.evictions

    def read_all(self, key: str) -> Buffer | None:
        started = time.perf_counter()
        data = self.inner.read_all(key)
        self.read_link.transfer(0 if data is None else len(data), started)
        return data

    @contextmanager
    def open_reader(self, key: str) -> Iterator[Reader | None]:
        started = time.perf_counter()
        with self.inner.open_reader(key) as reader:
            if reader is None:
                self.read_link.transfer(0, started)
                yield None
            else:
                yield _ThrottledReader(reader, self.read_link)

    def write(self, key: str, data: bytes) -> None:
        started = time.perf_counter()
        self.inner.write(key, data)
        self.write_link.transfer(len(data), started)

    def exists(self, key: str) -> bool:
        started = time.perf_counter()
        found = self.inner.exists(key)
        self.read_link.transfer(0, started)
        return found

    def remove(self, key: str) -> None:
        started = time.perf_counter()
        self.inner.remove(key)
        self.write_link.transfer(0, started)

    def touch(self, keys: Sequence[str]) -> None:
        started = time.perf_counter()
        self.inner.touch(keys)
        self.write_link.transfer(0, started)

    def fits(self, keys: Sequence[str], nbytes: int) -> bool:
        return self.inner.fits(keys, nbytes)

    def route(self, key: str) -> str:
        return self.inner.route(key)

    def classify(self, exc: Exception) -> tuple[str, bool] | None:
        return self.inner.classify(exc)

    def close(self) -> None:
        self.inner.close()
