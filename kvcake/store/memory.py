"""In-process LRUs with a byte budget: `SizedLru` (shared by both memory tiers) and the byte backend over it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

from kvcake.store.backend import Backend, BackendError, BufferReader

V = TypeVar("V")


class SizedLru(Generic[V]):
    """Thread-safe LRU map whose values are weighed by `size`; inserting past `max_bytes` evicts the oldest."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.evictions = 0

    def get(self, key: str) -> V | None:
        """The value, now the most recently used, or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> None:
        with self._lock:
            self._drop(key)
            self._entries[key] = value
            self.used_bytes += self._size(value)
            while self.used_bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.used_bytes -= self._size(evicted)
                self.evictions += 1

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def leading(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the first on, are present (one lock)."""
        with self._lock:
            return next((index for index, key in enumerate(keys) if key not in self._entries), len(keys))

    def touch(self, keys: Sequence[str]) -> None:
        """Mark present keys as used in this order (the last most recently)."""
        with self._lock:
            for key in keys:
                if key in self._entries:
                    self._entries.move_to_end(key)

    def remove(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.used_bytes = 0

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        self.used_bytes -= self._size(old) if old is not None else 0


class MemoryBackend(Backend):
    """Entries are immutable ``bytes``; a reader keeps the version it opened even if replaced."""

    def __init__(self, max_bytes: int) -> None:
        self.name = f"memory(max={max_bytes / 1e9:g}GB)"
        self._entries: SizedLru[bytes] = SizedLru(max_bytes, len)

    @property
    def evictions(self) -> int:
        return self._entries.evictions

    @property
    def used_bytes(self) -> int:
        return self._entries.used_bytes

    def read_all(self, key: str) -> bytes | None:
        return self._entries.get(key)

    @contextmanager
    def open_reader(self, key: str) -> Iterator[BufferReader | None]:
        data = self.read_all(key)
        yield None if data is None else BufferReader(data)

    def write(self, key: str, data: bytes) -> None:
        if len(data) > self._entries.max_bytes:
            raise BackendError("too_large", f"entry of {len(data)} bytes exceeds the budget of {self._entries.max_bytes}")
        self._entries.put(key, bytes(data))

    def exists(self, key: str) -> bool:
        return self._entries.contains(key)

    def touch(self, keys: Sequence[str]) -> None:
        self._entries.touch(keys)

    def remove(self, key: str) -> None:
        self._entries.remove(key)

    def close(self) -> None:
        """Drop every entry: an in-memory store ends with its owner."""
        self._entries.clear()
