"""The store interface every tier implements, and its statistics."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from typing import Any

import torch

from kvcake.store.codec import DEFAULT_PAGE_TOKENS, ChunkKV


@dataclass
class StoreStats:
    """Counters of one store; ``tiers`` holds the per-tier stats of a tiered store."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    puts: int = 0
    puts_failed: int = 0
    evictions: int = 0
    promotions: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, StoreStats] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StatsCounter:
    """Thread-safe accumulation behind ``StoreStats`` snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = StoreStats()

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self._stats, name, getattr(self._stats, name) + n)

    def error(self, kind: str) -> None:
        with self._lock:
            self._stats.errors[kind] = self._stats.errors.get(kind, 0) + 1

    def snapshot(self) -> StoreStats:
        with self._lock:
            s = self._stats
            return StoreStats(
                s.hits, s.misses, s.bytes_read, s.bytes_written, s.puts, s.puts_failed,
                s.evictions, s.promotions, dict(s.errors),
            )


class KVStore(ABC):
    """Where chunk KV lives. No method raises on a backend failure: it is a miss or a skipped write.

    Keys are strings from ``kvcake.store.keys`` (letters, digits, ``-``, ``_``).
    """

    page_tokens: int = DEFAULT_PAGE_TOKENS
    """Entries are written and verified in pages of this many tokens: a token range that
    starts on a page boundary reads no byte of the tokens before it."""

    @abstractmethod
    def get(self, key: str) -> ChunkKV | None:
        """The whole entry, or None."""

    @abstractmethod
    def get_layer(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(K, V) of one layer, reading only that layer's bytes."""

    @abstractmethod
    def get_tokens(self, key: str, start: int, end: int, layers: Sequence[int] | None = None) -> ChunkKV | None:
        """Tokens [start, end) of every layer (or of `layers`, in that order), reading only the pages that cover them."""

    @abstractmethod
    def put(self, key: str, chunk: ChunkKV, beside: Sequence[str] | None = None) -> bool:
        """Store a chunk; False when the write was skipped (counted in stats). With `beside` (a chain's entries
        before this one), the write is skipped when the store could only make room for it by evicting them."""

    @abstractmethod
    def get_encoded(self, key: str) -> bytes | None:
        """The verified encoded entry (used to move entries between tiers without re-encoding)."""

    @abstractmethod
    def put_encoded(self, key: str, data: bytes, beside: Sequence[str] | None = None) -> bool:
        """Store an already encoded entry (`beside` as in `put`)."""

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether the entry exists (not verified; False when the backend is down)."""

    def stored_prefix(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the first on, exist: a prefix's stored chunks in one lookup.

        Tiers override it to make it one round trip; this default asks key by key.
        """
        for index, key in enumerate(keys):
            if not self.contains(key):
                return index
        return len(keys)

    @abstractmethod
    def touch(self, keys: Sequence[str]) -> None:
        """Mark entries as used, in this order (the last one most recently), where the tier evicts by recency."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the entry if present."""

    @abstractmethod
    def stats(self) -> StoreStats:
        """A snapshot of the counters."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and threads (a tiered store first flushes its write-back queue)."""

    def flush(self) -> None:  # noqa: B027 - stores that write synchronously have nothing to wait for
        """Wait until asynchronous writes (write-back tiers) have landed."""

    def map_read_buffers(self, chunk_shape: tuple[int, int, int, int], dtype: torch.dtype, count: int) -> int:
        """Map now the buffers that reads of `count` entries of chunks shaped (layers, KV heads, tokens,
        head dim) in `dtype` will copy into; the bytes mapped. Stores that hand out their own tensors
        (memory://) read into nothing."""
        return 0

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
