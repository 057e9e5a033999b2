"""Tiers in order of speed (e.g. memory -> disk -> Redis) behind one ``KVStore``.

* ``get``: the first tier that has the entry serves it; the verified bytes are copied into
  the faster tiers (promotion: synchronously into the first tier, into the others the
  same way writes go). Entries move between tiers as encoded bytes, never re-encoded.
* ``get_layer`` / ``get_tokens``: first tier that has the entry; no promotion, since
  promoting would pull the whole entry over the link the partial read was meant to spare.
* ``put``: encoded once with this store's dtype. Write-through writes every tier before
  returning; write-back writes the first tier and queues the rest for a background
  thread. The queue is bounded: when it is full the lower-tier write is dropped
  (``errors["queue_full"]``), never blocking the caller. A pending write for a key is
  replaced by a newer one and cancelled by ``delete``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from kvcake.store import codec
from kvcake.store.base import KVStore, StatsCounter, StoreStats
from kvcake.store.codec import ChunkKV
from kvcake.runtime import confine_torch_to_this_thread

logger = logging.getLogger(__name__)

T = TypeVar("T")


class TieredStore(KVStore):
    """``tiers`` fastest first; see the module docstring for reads, promotion and writes."""

    def __init__(
        self, tiers: Sequence[KVStore], *, write_back: bool = False, queue_size: int = 64,
        dtype: str | None = None, page_tokens: int = codec.DEFAULT_PAGE_TOKENS,
    ) -> None:
        if not tiers:
            raise ValueError("a tiered store needs at least one tier")
        self.tiers = list(tiers)
        self.write_back = write_back
        self._queue_size = queue_size
        self._dtype = dtype
        self.page_tokens = page_tokens
        self._stats = StatsCounter()
        self._pending: OrderedDict[str, tuple[bytes, tuple[int, ...]]] = OrderedDict()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._worker: threading.Thread | None = None
        if write_back and len(self.tiers) > 1:
            self._worker = threading.Thread(target=self._drain, name="kvcake-write-back", daemon=True)
            self._worker.start()

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: str) -> ChunkKV | None:
        """From the first tier directly (a memory tier hands out its tensors); from a lower one its verified
        bytes, promoted, then decoded."""
        chunk = self.tiers[0].get(key)
        if chunk is not None:
            self._stats.add(hits=1)
            return chunk
        for i, tier in enumerate(self.tiers[1:], start=1):
            data = tier.get_encoded(key)
            if data is not None:
                self._promote(key, data, i)
                self._stats.add(hits=1)
                return codec.decode(data, check=False, key=key)  # the tier verified it
        self._stats.add(misses=1)
        return None

    def get_encoded(self, key: str) -> bytes | None:
        for i, tier in enumerate(self.tiers):
            data = tier.get_encoded(key)
            if data is not None:
                self._promote(key, data, i)
                self._stats.add(hits=1)
                return data
        self._stats.add(misses=1)
        return None

    def get_layer(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._first(lambda tier: tier.get_layer(key, layer))

    def get_tokens(self, key: str, start: int, end: int, layers: Sequence[int] | None = None) -> ChunkKV | None:
        return self._first(lambda tier: tier.get_tokens(key, start, end, layers))

    def contains(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def stored_prefix(self, keys: Sequence[str]) -> int:
        """The longest run of keys each stored in some tier: each tier is asked from the first key no tier has yet."""
        found, progress = 0, True
        while progress and found < len(keys):
            progress = False
            for tier in self.tiers:
                more = tier.stored_prefix(keys[found:])
                found += more
                progress = progress or more > 0
        return found

    # -- writes --------------------------------------------------------------------------
    def put(self, key: str, chunk: ChunkKV, beside: Sequence[str] | None = None) -> bool:
        return self.put_encoded(key, codec.encode(chunk, self._dtype, self.page_tokens, key), beside)

    def put_encoded(self, key: str, data: bytes, beside: Sequence[str] | None = None) -> bool:
        """True when the first tier stored it, or (write-through) any tier did, or it was queued. `beside` is
        checked by the first tier; lower tiers are written later and rely on the write-back's gap check."""
        first = self.tiers[0].put_encoded(key, data, beside)
        lower = self._write_lower(key, data, range(1, len(self.tiers)))
        if first or lower:
            self._stats.add(puts=1)
            return True
        self._stats.add(puts_failed=1)
        return False

    def touch(self, keys: Sequence[str]) -> None:
        for tier in self.tiers:
            tier.touch(keys)

    def delete(self, key: str) -> None:
        with self._cond:
            self._pending.pop(key, None)
        for tier in self.tiers:
            tier.delete(key)

    def flush(self) -> None:
        """Wait until queued write-backs (and promotions) reached the lower tiers."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending and not self._in_flight)

    def map_read_buffers(self, chunk_shape: tuple[int, int, int, int], dtype: torch.dtype, count: int) -> int:
        return sum(tier.map_read_buffers(chunk_shape, dtype, count) for tier in self.tiers)

    def stats(self) -> StoreStats:
        snap = self._stats.snapshot()
        for i, tier in enumerate(self.tiers):
            tier_stats = tier.stats()
            snap.tiers[f"{i}:{tier!r}"] = tier_stats
            snap.bytes_read += tier_stats.bytes_read
            snap.bytes_written += tier_stats.bytes_written
            snap.evictions += tier_stats.evictions
        return snap

    def close(self) -> None:
        if self._worker is not None:
            self.flush()
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._worker.join()
        for tier in self.tiers:
            tier.close()

    def __repr__(self) -> str:
        return f"TieredStore({', '.join(repr(t) for t in self.tiers)})"

    # -- internals -----------------------------------------------------------------------
    def _first(self, read: Callable[[KVStore], T | None]) -> T | None:
        for tier in self.tiers:
            value = read(tier)
            if value is not None:
                self._stats.add(hits=1)
                return value
        self._stats.add(misses=1)
        return None

    def _promote(self, key: str, data: bytes, found_at: int) -> None:
        if found_at == 0:
            return
        self._stats.add(promotions=1)
        self.tiers[0].put_encoded(key, data)
        self._write_lower(key, data, range(1, found_at))

    def _write_lower(self, key: str, data: bytes, targets: range) -> bool:
        """Write to tiers ``targets`` now (write-through) or queue it (write-back)."""
        if not targets:
            return False
        if not self.write_back:
            return any([self.tiers[i].put_encoded(key, data) for i in targets])
        with self._cond:
            queued = self._pending.pop(key, None)
            if queued is None and len(self._pending) >= self._queue_size:
                self._stats.error("queue_full")
                logger.debug("write-back queue full; %s not written to the lower tiers", key)
                return False
            wanted = set(targets) | (set(queued[1]) if queued else set())
            self._pending[key] = (data, tuple(sorted(wanted)))
            self._cond.notify_all()
        return True

    def _drain(self) -> None:
        """Write-back worker: oldest queued entry first."""
        confine_torch_to_this_thread()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                key, (data, targets) = self._pending.popitem(last=False)
                self._in_flight += 1
            try:
                for i in targets:
                    self.tiers[i].put_encoded(key, data)
            except Exception:  # a tier that breaks the never-raise contract must not kill the worker
                self._stats.error("internal")
                logger.exception("write-back of %s failed", key)
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()
