"""Asynchronous write-back of computed chunks, off the time-to-first-token path.

A prefix chunk is useless without the chunks before it, so a store that evicts by
recency must lose a chain's tail first: a prefix's new chunks are written tail first,
and then the whole chain is touched from the tail to the head, so its head is always its
most recently used entry.
"""

from __future__ import annotations

import logging
import queue
import threading

from kvcake.chunk import ChunkKV
from kvcake.store import KVStore

log = logging.getLogger(__name__)


class WriteBack:
    """One background thread putting chunks into the store; a full queue drops (and counts) writes."""

    def __init__(self, store: KVStore, max_pending: int = 256):
        self.store = store
        self.dropped = 0
        self._queue: queue.Queue[tuple[list[str], dict[str, ChunkKV]] | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="kvcake-writeback", daemon=True)
        self._thread.start()

    def submit(self, key: str, chunk: ChunkKV) -> None:
        """Queue one entry."""
        self._put([], {key: chunk})

    def submit_chain(self, chain: list[str], computed: dict[str, ChunkKV]) -> None:
        """Queue a prefix's chunks that were computed (by key; `chain` lists the prefix's keys head first):
        written tail first, then the chain is touched tail to head."""
        if chain:
            self._put(chain, computed)

    def _put(self, chain: list[str], computed: dict[str, ChunkKV]) -> None:
        try:
            self._queue.put_nowait((chain, computed))
        except queue.Full:
            self.dropped += len(computed)

    def flush(self) -> None:
        """Wait until every submitted chunk has been written (or skipped)."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            chain, computed = item
            in_chain = set(chain)
            order = [key for key in reversed(chain) if key in computed] + [key for key in computed if key not in in_chain]
            try:
                for key in order:
                    if not self.store.contains(key):
                        self.store.put(key, computed[key].to_cpu())
                if chain:
                    self.store.touch(list(reversed(chain)))
            except Exception:
                log.exception("write-back of %d chunk(s) failed", len(computed))
            finally:
                self._queue.task_done()
        self._queue.task_done()
