"""Loading a queued request's stored prefix while another request computes.

A server runs at most `max_batch` requests on the compute thread; the next ones wait in
its queue. Their stored prefix chunks do not need the compute thread, so an I/O thread
reads them from the back while they wait (`PrefixPrefetch.run`). When the request starts, `take_back`
hands over the contiguous run of chunks loaded so far, from the last reusable chunk
down; Cake then schedules only the chunks below it, computing from the front and
loading from the back as usual. Held chunks count against a shared `ByteBudget`, so
waiting requests never hold more than its limit.
"""

from __future__ import annotations

import threading

from kvcake.chunk import ChunkKV
from kvcake.reuse.cake import ChunkLoader


class ByteBudget:
    """Bytes that prefetched chunks may hold at once, across all waiting requests."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used_bytes + nbytes > self.limit_bytes:
                return False
            self.used_bytes += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used_bytes -= nbytes


class PrefixPrefetch:
    def __init__(self, loader: ChunkLoader, num_chunks: int, budget: ByteBudget):
        self._loader = loader
        self._num_chunks = num_chunks
        self._budget = budget
        self._chunks: dict[int, ChunkKV] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self.held_bytes = 0

    def run(self) -> None:
        """Load chunks from the back until one is missing, the budget is spent, or the request starts."""
        for index in range(self._num_chunks - 1, -1, -1):
            if self._stopped:
                return
            loaded = self._loader(index)
            if loaded is None:
                return
            nbytes = loaded.nbytes
            if not self._budget.reserve(nbytes):
                return
            with self._lock:
                if self._stopped:
                    self._budget.release(nbytes)
                    return
                self._chunks[index] = loaded
                self.held_bytes += nbytes

    def take_back(self, num_chunks: int) -> dict[int, ChunkKV]:
        """Stop loading; the loaded chunks num_chunks-1, num_chunks-2, ... down to the first gap."""
        with self._lock:
            self._stopped = True
            taken: dict[int, ChunkKV] = {}
            index = num_chunks - 1
            while index in self._chunks:
                taken[index] = self._chunks.pop(index)
                index -= 1
            return taken

    def release(self) -> None:
        """Give the held bytes back to the budget (after the request has run, or if it never does)."""
        with self._lock:
            self._stopped = True
            self._chunks.clear()
            self._budget.release(self.held_bytes)
            self.held_bytes = 0
