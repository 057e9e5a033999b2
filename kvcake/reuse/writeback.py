"""Asynchronous write-back of computed chunks, off the time-to-first-token path.

A prefix chunk is useless without the chunks before it, so two rules keep whatever part
of a chain is stored usable:

- **Head first.** A prefix's new chunks are written in chain order, so a write-back cut
  short (a stop whose grace period ran out, a full store that refuses puts) leaves a
  head, never tails that can never hit.
- **Head most recent.** Before each write the chain up to it is touched from the tail to
  the head (and the whole chain once at the end), so in a store that evicts by recency
  the chain's head is its most recently used entry, and eviction takes the tail first.
- **No orphans.** A chain larger than the store's budget stops at the first put the store
  refuses: one that does not fit beside the chain's earlier chunks (Redis, whose eviction
  is approximate, says so before writing), or a full Redis with `noeviction`; and at the
  first write that evicted one of its own earlier chunks anyway (that write and anything
  after the gap are deleted). The stored part is always a head, and the same head hits on
  every repeat.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from kvcake.chunk import ChunkKV
from kvcake.runtime import confine_torch_to_this_thread
from kvcake.store import KVStore

log = logging.getLogger(__name__)


class WriteBack:
    """One background thread putting chunks into the store; a full queue drops (and counts) writes."""

    def __init__(self, store: KVStore, max_pending: int = 256):
        self.store = store
        self.dropped = 0
        self._pending_chunks = 0
        self._lock = threading.Lock()
        self._out_of_time = threading.Event()
        self._queue: queue.Queue[tuple[list[str], dict[str, ChunkKV], Callable[[], None]] | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="kvcake-writeback", daemon=True)
        self._thread.start()

    def submit(self, key: str, chunk: ChunkKV) -> None:
        """Queue one entry."""
        self._put([], {key: chunk})

    def submit_chain(self, chain: list[str], computed: dict[str, ChunkKV], when_done: Callable[[], None] = lambda: None) -> None:
        """Queue a prefix's chunks that were computed (by key; `chain` lists the prefix's keys head first):
        written head first (see the module's rules). `when_done` runs once they are written, or will not be
        (dropped, refused, out of time)."""
        if chain:
            self._put(chain, computed, when_done)
        else:
            when_done()

    @property
    def pending(self) -> int:
        """Chunks queued or being written."""
        with self._lock:
            return self._pending_chunks

    def _put(self, chain: list[str], computed: dict[str, ChunkKV], when_done: Callable[[], None] = lambda: None) -> None:
        with self._lock:
            try:
                self._queue.put_nowait((chain, computed, when_done))
            except queue.Full:
                self.dropped += len(computed)
                when_done()
                return
            self._pending_chunks += len(computed)

    def flush(self) -> None:
        """Wait until every submitted chunk has been written (or skipped)."""
        self._queue.join()

    def close(self, grace_s: float | None = None) -> int:
        """Write what is queued, waiting at most `grace_s` seconds (None: as long as it takes), then stop;
        the number of chunks left unwritten. Past the grace period the write in flight ends and the rest is
        dropped, so what was written of a chain is always a usable head."""
        deadline = None if grace_s is None else time.monotonic() + grace_s

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            self._queue.put(None, timeout=left())
        except queue.Full:
            self._out_of_time.set()
            self._queue.put(None)
        self._thread.join(left())
        if self._thread.is_alive():
            self._out_of_time.set()
        unwritten = self.pending
        if unwritten:
            log.warning("stopped with %d chunk(s) not written back after the %s s grace period", unwritten, grace_s)
        return unwritten

    def _run(self) -> None:
        confine_torch_to_this_thread()
        while (item := self._queue.get()) is not None:
            chain, computed, when_done = item
            done: list[str] = []
            try:
                self._write(chain, computed, done)
            except Exception:
                log.exception("write-back of %d chunk(s) failed", len(computed))
            finally:
                with self._lock:
                    self._pending_chunks -= len(computed) - len(done)
                when_done()
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, chain: list[str], computed: dict[str, ChunkKV], done: list[str]) -> None:
        """Store the chain's computed chunks head first, then any others; `done` collects the keys dealt with."""
        in_chain = set(chain)
        wrote = False
        for index, key in enumerate(chain):
            if key in computed:
                if not self._write_link(chain, index, computed[key], done):
                    break
                wrote = True
        if wrote and not self._out_of_time.is_set():
            self.store.touch(list(reversed(chain)))
        for key in (key for key in computed if key not in in_chain):
            if self._out_of_time.is_set():
                return
            if not self.store.contains(key):
                self.store.put(key, computed[key].to_cpu())
            self._done(key, done)

    def _write_link(self, chain: list[str], index: int, chunk: ChunkKV, done: list[str]) -> bool:
        """Put chain[index] after touching the chain before it (so its head is the most recent entry when the
        store must make room); False, and the rest of the chain is not written, when time is out, the store
        refused the put, or the put evicted one of the chain's own earlier chunks: a chain larger than the
        store's budget keeps a head that hits on every repeat, instead of tails that never can."""
        if self._out_of_time.is_set():
            return False
        key = chain[index]
        if index:
            self.store.touch(list(reversed(chain[:index])))
        if not self.store.contains(key) and not self.store.put(key, chunk.to_cpu(), beside=chain[:index]):
            return False
        self._done(key, done)
        gap = self._gap_before(chain, index)
        if gap is None:
            return True
        for orphan in set(chain[gap + 1 : index + 1]).intersection(done):  # only what this write-back wrote
            self.store.delete(orphan)
        return False

    def _gap_before(self, chain: list[str], index: int) -> int | None:
        """The first of chain[:index + 1] that is missing, confirmed: a store with writes of its own still
        queued (a tiered store writing back) lands them first, and a read error is not taken for a gap."""
        if self.store.stored_prefix(chain[: index + 1]) > index:
            return None
        self.store.flush()
        intact = self.store.stored_prefix(chain[: index + 1])
        if intact > index or self.store.contains(chain[intact]):
            return None
        return intact

    def _done(self, key: str, done: list[str]) -> None:
        done.append(key)
        with self._lock:
            self._pending_chunks -= 1
