"""In-process LRU of encoded entries with a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from kvcake.store.backend import Backend, BackendError, BufferReader


class MemoryBackend(Backend):
    """Entries are immutable ``bytes``; a reader keeps the version it opened even if replaced."""

    def __init__(self, max_bytes: int) -> None:
        self.name = f"memory(max={max_bytes / 1e9:g}GB)"
        self._max = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0
        self._evicted = 0
        self._lock = threading.Lock()

    @property
    def evictions(self) -> int:
        return self._evicted

    @property
    def used_bytes(self) -> int:
        return self._used

    def read_all(self, key: str) -> bytes | None:
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
            return data

    @contextmanager
    def open_reader(self, key: str) -> Iterator[BufferReader | None]:
        data = self.read_all(key)
        yield None if data is None else BufferReader(data)

    def write(self, key: str, data: bytes) -> None:
        if len(data) > self._max:
            raise BackendError("too_large", f"entry of {len(data)} bytes exceeds the budget of {self._max}")
        data = bytes(data)
        with self._lock:
            old = self._entries.pop(key, None)
            self._used -= len(old) if old is not None else 0
            self._entries[key] = data
            self._used += len(data)
            while self._used > self._max:
                _, evicted = self._entries.popitem(last=False)
                self._used -= len(evicted)
                self._evicted += 1

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def touch(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                if key in self._entries:
                    self._entries.move_to_end(key)

    def remove(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            self._used -= len(old) if old is not None else 0
